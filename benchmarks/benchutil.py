"""Shared machinery of the benchmark suite: tiers, implementations, the measured roofline, and
``run_case``, which times one (op, case, implementation) and records everything the report needs.

Every benchmark records the same ``extra_info`` keys (see ``run_case``), so that ``report.py``
can put any op, including ones added later, into its tables and plots without knowing about it.
Benchmark files import this module as ``benchutil`` (pytest puts ``benchmarks/`` on sys.path,
because the folder has no ``__init__.py``); the fixtures that use it live in ``conftest.py``.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from fastattr._runtime import backends as _backends
from fastattr._runtime.memory import PeakMemory

TIERS = ("smoke", "cpu", "full")
BASELINE = "circuit-tracer"  # the ``impl`` name of circuit-tracer's own path in every op


def _tier() -> str:
    name = os.environ.get("FASTATTR_BENCH_TIER", "smoke").strip().lower()
    if name not in TIERS:
        raise pytest.UsageError(f"FASTATTR_BENCH_TIER must be one of {', '.join(TIERS)}, got {name!r}")
    return name


TIER = _tier()
# FASTATTR_BENCH_DEVICE=cpu runs on the CPU of a GPU machine; the default follows what torch sees.
DEVICE = torch.device(os.environ.get("FASTATTR_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def per_tier(*, smoke: Any, cpu: Any, full: Any) -> Any:
    """The value for the tier this run uses."""
    return {"smoke": smoke, "cpu": cpu, "full": full}[TIER]


def device_name(device: torch.device = DEVICE) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads"


# ------------------------------------------------------------------------------ implementations


def _skip_reason(name: str, device: torch.device) -> str | None:
    ok, why = _backends.backend_status()[name]
    if not ok:
        return f"fastattr {name} backend unavailable: {why}"
    bad = _backends.device_reason(name, device)
    if bad:
        return bad
    if name == "triton" and _backends.triton_interpret():
        # The interpreter runs the kernel in numpy: its time says nothing about Triton.
        return "TRITON_INTERPRET=1: interpreted Triton would time numpy, not the kernel"
    return None


def impl_params(device: torch.device = DEVICE, *, baseline: bool = True, backends: tuple[str, ...] = _backends.BACKENDS) -> list:
    """``pytest.param`` per implementation: circuit-tracer's path first, then each fastattr backend.

    Backends that cannot run here stay in the list, skipped with the reason, so that the run's log
    and the report say why a column is missing instead of silently dropping it.
    """
    params = [pytest.param(BASELINE, id=BASELINE)] if baseline else []
    for name in backends:
        why = _skip_reason(name, device)
        params.append(pytest.param(name, id=name, marks=[pytest.mark.skip(reason=why)] if why else []))
    return params


# ------------------------------------------------------------------------------------ roofline


def sync(device: torch.device = DEVICE) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_best(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> float:
    """Fastest seconds of ``fn`` over ``reps`` runs: CUDA events on the GPU, perf_counter on the CPU.

    The fastest, not the median: a ceiling is what the device can do, and on a shared CPU the
    median of a few runs measures the neighbours as much as the device.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(times)


def measure_roofline(device: torch.device = DEVICE) -> dict:
    """The two ceilings of this device, measured rather than taken from a datasheet.

    Bandwidth: a large device-to-device copy, counting bytes read plus bytes written. Compute: a
    large matrix product (fp32, and on the GPU also tf32 and bf16). Inputs are random, never
    zeros, which can run faster than real data. Each is the fastest of several timed runs.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        copy_bytes, n, reps = 1 << 30, 8192, 10  # 1 GiB: far beyond any L2
    else:
        copy_bytes, n, reps = (64 << 20, 1024, 5) if TIER == "smoke" else (512 << 20, 2048, 5)
    src = torch.rand(copy_bytes // 4, generator=gen, device=device)
    dst = torch.empty_like(src)
    copy_s = _time_best(lambda: dst.copy_(src), device, reps, warmup=2)
    del src, dst

    out: dict[str, Any] = {
        "device": device_name(device),
        "copy_bytes": 2 * copy_bytes,
        "copy_gbps": 2 * copy_bytes / copy_s / 1e9,
        "matmul_n": n,
    }
    dtypes = {"fp32": torch.float32}
    if device.type == "cuda":
        dtypes["bf16"] = torch.bfloat16
    for label, dtype in dtypes.items():
        a = torch.randn(n, n, generator=gen, device=device).to(dtype)
        b = torch.randn(n, n, generator=gen, device=device).to(dtype)
        secs = _time_best(lambda: a @ b, device, reps, warmup=2)
        out[f"matmul_tflops_{label}"] = 2 * n**3 / secs / 1e12
        if device.type == "cuda" and dtype == torch.float32:
            # Triton's float32 dot and cuBLAS with allow_tf32 use tf32; recorded for reference.
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                out["matmul_tflops_tf32"] = 2 * n**3 / _time_best(lambda: a @ b, device, reps, warmup=2) / 1e12
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
        del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _peak_flops(roofline: dict, dtype: torch.dtype | None) -> float | None:
    key = {torch.bfloat16: "matmul_tflops_bf16", torch.float16: "matmul_tflops_bf16"}.get(dtype, "matmul_tflops_fp32")
    value = roofline.get(key) or roofline.get("matmul_tflops_fp32")
    return value


# --------------------------------------------------------------------------------------- memory


def peak_memory(fn: Callable[[], Any], device: torch.device = DEVICE) -> tuple[int, str]:
    """(bytes above the level at entry, method) for one untimed run of ``fn``.

    A separate run: the CPU sampler is a thread, and on a small CPU it would slow the timed runs.
    On the CPU, PeakMemory first hands the heap pages freed by the warm-up back to the OS, which
    glibc would otherwise reuse, so that the peak does not read low.
    """
    with PeakMemory(device) as mem:
        result = fn()
        sync(device)
    del result
    return mem.peak_bytes, mem.method


# ----------------------------------------------------------------------------------- run a case


def run_case(
    benchmark,
    fn: Callable[[], Any],
    *,
    op: str,
    case: str,
    impl: str,
    size: float,
    size_label: str,
    roofline: dict | None = None,
    flops: float | None = None,
    min_bytes: float | None = None,
    dtype: torch.dtype | None = None,
    rounds: int | None = None,
    warmup: int | None = None,
    memory: bool = True,
    check: Callable[[Any], float | None] | None = None,
    device: torch.device = DEVICE,
    **extra: Any,
) -> Any:
    """Warm up, measure peak memory once, time ``rounds`` runs, and fill ``benchmark.extra_info``.

    ``fn`` runs the implementation ``impl`` (``BASELINE`` or a fastattr backend name) of ``op`` on
    the inputs named ``case``; every implementation of one case must get the same inputs. ``size``
    is the x-axis of the report's plots (``size_label`` names it). ``flops`` and ``min_bytes``, if
    the op has a clean count, give achieved TFLOP/s and GB/s and their fractions of the measured
    roofline. ``family`` (an extra keyword) names the cases that differ only in size, which the
    report's plots join by a line (default: each case alone). ``check(result)`` may return an
    error against circuit-tracer's result (recorded as ``max_rel_err``; never asserted here:
    benchmarks time, tests assert). Extra keyword arguments go into ``extra_info`` as they are
    (JSON-serialisable values only).

    GPU work is synchronised inside the timed function, so the host timer covers the kernels.
    Returns the result of the last timed run.
    """
    rounds = rounds if rounds is not None else per_tier(smoke=3, cpu=5, full=20)
    warmup = warmup if warmup is not None else per_tier(smoke=1, cpu=1, full=3)
    benchmark.group = f"{op} | {case}"  # pytest-benchmark's terminal table compares within a group

    def target():
        result = fn()
        sync(device)
        return result

    for _ in range(warmup):
        target()
    info = benchmark.extra_info
    info.update(op=op, case=case, impl=impl, baseline=impl == BASELINE, tier=TIER, device=device_name(device),
                size=float(size), size_label=size_label, dtype=str(dtype).replace("torch.", "") if dtype else None)  # fmt: skip
    if memory:
        info["peak_mem_bytes"], info["mem_method"] = peak_memory(target, device)
    result = benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0)

    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else None  # None under --benchmark-disable
    info["median_s"] = median
    if flops is not None:
        info["flops"] = float(flops)
    if min_bytes is not None:
        info["min_bytes"] = float(min_bytes)
    if median and roofline:
        info["roofline_gbps"] = roofline["copy_gbps"]
        if min_bytes is not None:
            info["gbps"] = min_bytes / median / 1e9
            info["frac_bw"] = info["gbps"] / roofline["copy_gbps"]
        peak = _peak_flops(roofline, dtype)
        info["roofline_tflops"] = peak
        if flops is not None and peak:
            info["tflops"] = flops / median / 1e12
            info["frac_flops"] = info["tflops"] / peak
    if check is not None:
        err = check(result)
        info["max_rel_err"] = None if err is None else float(err)
    info.update(extra)
    return result


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in float64 on the CPU."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    scale = ref.abs().max().clamp_min(1e-300)
    return float((got - ref).abs().max() / scale)
