"""Peak-memory measurement for the demo and the benchmarks.

On CUDA the allocator's own peak counter is exact. On the CPU torch keeps no such counter, so a
background thread samples the process's anonymous resident memory (:func:`resident_bytes`) every
millisecond and reports the peak above the level at entry; short spikes between samples can be
missed, so CPU numbers are lower bounds.

The one place for memory probes: the demo, the benchmarks and the memory tests use these.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """The process's anonymous resident memory: its heap and private mappings, where tensors live.

    File-backed pages (shared-library code, which the kernel drops and re-reads on a busy machine)
    are left out: they are not allocations. From ``/proc/self/statm`` (resident minus shared), or
    elsewhere the lifetime peak of :func:`peak_resident_bytes`.
    """
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * _PAGE
    except OSError:
        return peak_resident_bytes()


def peak_resident_bytes() -> int:
    """The process's peak resident set over its whole life (``getrusage``; file pages included)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def release_free_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's ``malloc_trim``), so that
    the resident memory holds live data only; otherwise pages glibc kept from earlier work are
    reused and hide later allocations."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes`` (above ``m.base_bytes``, the level
    at entry)."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.001):
        self.device = torch.device(device)
        self.interval = interval
        self.base_bytes = 0
        self.peak_bytes = 0
        self.method = "cuda.max_memory_allocated" if self.device.type == "cuda" else "sampled anonymous RSS"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
        else:
            release_free_heap()
            self.base_bytes = resident_bytes()
            self._peak = self.base_bytes
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, resident_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base_bytes
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, resident_bytes()) - self.base_bytes
