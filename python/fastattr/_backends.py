"""Backend discovery and selection.

Every op has up to four implementations: ``cuda`` (compiled kernels), ``triton``, ``cpu``
(compiled C++) and ``torch`` (the pure-torch reference). A call picks one from, in order: the
``backend=`` argument, the innermost :func:`use_backend` block, the ``FASTATTR_BACKEND``
environment variable, and finally an automatic choice by the tensors' device. Forced choices that
cannot run raise; automatic choices are logged at debug level, and the last backend each op used is
kept for :func:`last_backend`, so no slow path is ever taken silently.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator

import torch

from fastattr import _ext

logger = logging.getLogger("fastattr")

BACKENDS = ("cuda", "triton", "cpu", "torch")
_GPU_BACKENDS = ("cuda", "triton")


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here; the message says why."""


# Process-wide rather than thread-local: on a GPU autograd runs backward hooks (where the patched
# contraction executes) on its own threads, which must see the caller's use_backend() choice.
_forced: list[str] = []
_last_used: dict[str, str] = {}


def _stack() -> list[str]:
    return _forced


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` for every op called inside the block (``backend=`` still wins)."""
    _validate_name(name, "use_backend(name)")
    _stack().append(name)
    try:
        yield
    finally:
        _stack().pop()


def _validate_name(name: str, what: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{what}: expected one of {', '.join(BACKENDS)}, got {name!r}")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _cuda_status() -> tuple[bool, str]:
    if _ext.ext is None:
        return False, _ext.EXT_ERROR or "fastattr._C is not importable"
    info = _ext.ext.build_info()
    if not info["cuda"]:
        return False, "fastattr._C was built without CUDA (no nvcc at build time, or FASTATTR_CUDA=OFF)"
    count, code, msg, driver = _ext.ext.cuda_probe()
    if code != 0:
        hint = ""
        if code == 35:  # cudaErrorInsufficientDriver: no driver, or one older than the build's CUDA
            hint = _insufficient_driver(info["cuda_version"], driver)
        return False, f"CUDA runtime error {code}: {msg}{hint}"
    if count == 0:
        return False, "no CUDA device is visible"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} has no CUDA support (a CPU build of torch)"
    return True, f"{count} device(s), driver {driver // 1000}.{driver % 1000 // 10}"


def _insufficient_driver(build_cuda: str, driver: int) -> str:
    """The reason suffix for cudaErrorInsufficientDriver, logged once (``_cuda_status`` is cached).

    CUDA's minor-version compatibility lets a build of CUDA X.y run on any driver for X.0 or newer,
    so this error means the driver predates CUDA X (or there is none). A driver that is merely old
    is worth a warning; no driver at all is the normal state of a CPU machine, so only info.
    """
    major = build_cuda.split(".")[0]
    if driver == 0:
        logger.info("no NVIDIA driver found: the CUDA kernels of this build (CUDA %s) are off; "
                    "using the triton, cpu and torch backends", build_cuda)
        return f" (no NVIDIA driver found; this build needs a driver for CUDA {major}.0 or newer)"
    found = f"{driver // 1000}.{driver % 1000 // 10}"
    logger.warning("the NVIDIA driver supports CUDA %s, but this build of fastattr (CUDA %s) needs a driver "
                   "for CUDA %s.0 or newer: its CUDA kernels are off and the triton, cpu and torch backends "
                   "run instead. Update the driver, or install the build for your driver's CUDA "
                   "(pip install fastattr-cu%s; see docs/wheels.md).", found, build_cuda, major, found.split(".")[0])
    return f" (the driver supports CUDA {found}; this build needs a driver for CUDA {major}.0 or newer)"


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed ({exc})"
    try:
        from fastattr import triton_kernels  # noqa: F401
    except ImportError as exc:
        return False, f"fastattr.triton_kernels failed to import ({exc})"
    if triton_interpret():
        return True, f"triton {triton.__version__} in interpreter mode (TRITON_INTERPRET=1), CPU tensors"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__}"
    return False, "no CUDA device for triton (set TRITON_INTERPRET=1 to run its kernels on the CPU)"


def backend_status() -> dict[str, tuple[bool, str]]:
    """Map each backend to (available, reason)."""
    cpu_ok = _ext.ext is not None
    return {
        "cuda": _cuda_status(),
        "triton": _triton_status(),
        "cpu": (cpu_ok, "compiled C++" if cpu_ok else (_ext.EXT_ERROR or "fastattr._C missing")),
        "torch": (True, "pure-torch reference"),
    }


def available_backends() -> list[str]:
    return [name for name, (ok, _) in backend_status().items() if ok]


def _device_ok(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on tensors on ``device`` (None if it can)."""
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got tensors on {device}"
    if name == "cpu" and device.type != "cpu":
        return f"the cpu backend needs CPU tensors, got tensors on {device}"
    if name == "triton" and device.type == "cpu" and not triton_interpret():
        return "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    if name == "triton" and device.type == "cuda" and triton_interpret():
        return "TRITON_INTERPRET=1 runs triton on CPU tensors only"
    return None


def select(op: str, device: torch.device, backend: str | None, implemented: dict[str, Callable]) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for tensors on ``device``."""
    forced, source = backend, "backend="
    if forced is None and _stack():
        forced, source = _stack()[-1], "use_backend()"
    if forced is None and os.environ.get("FASTATTR_BACKEND"):
        forced, source = os.environ["FASTATTR_BACKEND"], "FASTATTR_BACKEND"
    if forced is not None:
        _validate_name(forced, source)
        if forced not in implemented:
            raise BackendUnavailableError(
                f"{op}: backend {forced!r} (from {source}) is not implemented for this op; "
                f"implemented: {', '.join(implemented)}"
            )
        ok, why = backend_status()[forced]
        if not ok:
            raise BackendUnavailableError(f"{op}: backend {forced!r} (from {source}) is unavailable: {why}")
        bad = _device_ok(forced, device)
        if bad:
            raise BackendUnavailableError(f"{op}: backend {forced!r} (from {source}) cannot run here: {bad}")
        chosen = forced
    else:
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        status = backend_status()
        chosen = next(
            n for n in order if n in implemented and status[n][0] and _device_ok(n, device) is None
        )
        logger.debug("%s: automatic backend %r for tensors on %s", op, chosen, device)
        if chosen == "torch" and "torch" != order[0]:
            logger.info("%s: using the torch reference on %s (%s unavailable)", op, device, order[0])
    _last_used[op] = chosen
    return chosen, implemented[chosen]


def last_backend(op: str) -> str | None:
    """The backend that the most recent call of ``op`` ran on."""
    return _last_used.get(op)
