"""Cumulative-influence thresholds by radix select, without torch.sort.

circuit-tracer's ``find_threshold`` sorts the scores in descending order, divides their cumulative
sum by the total and returns the first score whose cumulative fraction reaches the threshold. On the
flattened N x N edge scores that sort is most of ``prune_graph``'s time. Here the same element is
found by a value-weighted radix select: non-negative float32 values order like their uint32 bit
patterns, so a histogram of counts and double sums over the top 11 bits finds the bucket where the
cumulative sum crosses the threshold, then 11 more bits inside it, then the last 9, which pin the
value.

Exactness. On the CPU, torch's float32 ``cumsum`` accumulates in double and rounds every prefix to
float32, the division is by ``torch.sum`` of the sorted scores in float32, ``searchsorted`` compares
in float32 (the Python threshold is rounded to float32 first), and the index is clamped to the last
element. The crossing test ``fl32(fl32(C) / S) >= fl32(t)`` is monotone in the prefix C, so testing
it at bucket ends is exact up to the order in which the double prefix is accumulated (a relative
difference of about n * 2^-53, included in the error band below). The one quantity that cannot be
reproduced without the sorted order is ``torch.sum(sorted)``: torch's cascade summation rounds
differently from a correctly rounded sum (they disagree in roughly 40% of random cases), and which
way depends on every element's rank (and, on the CPU, on the thread count). So the select runs with
S known only to an interval derived from the error bound of torch's summation algorithm
(:func:`torch_sum_error_bound`); if both ends of the interval give the same answer, that answer is
circuit-tracer's. If not, no further histogram pass can decide, because the deciding bit of S
comes from the order itself: the select hands over to the sorted values, produced by fastattr's
radix sort of the values (:func:`descending_values`: no comparison sort, no index tensor, no size
limit), and circuit-tracer's cumsum, sum and search run on them. ``find_threshold`` is therefore
always exact and never calls ``torch.sort``; :func:`threshold_stats` counts the hand-overs.
How often it hands over grows with n and t (docs/tolerances.md has the measured rates): rarely
at n = 5e3 and t <= 0.8, on every call at n = 1e6 and t >= 0.8, and at t = 1.0, where
circuit-tracer's answer itself hinges on whether its float32 total rounds above the cumulative
sum. On CUDA torch's float32 cumsum accumulates in float32, so the interval also widens the
prefix by a bound on that scan's error and hand-overs (a CUB radix sort) are more frequent.

The fused variant for the edges of ``prune_graph`` (see :mod:`fastattr.ops.pruning`) cannot sort the
N^2 scores it never builds: it takes S as the double sum rounded to float32, which is the one
documented source of edge-mask differences from circuit-tracer.

All-zero scores: circuit-tracer divides 0 by 0, its search returns len(scores), the clamp picks the
last element, so the answer is 0. NaN/Inf scores raise ValueError. Negative scores break the bit
order: the select reports them and the torch backend (the sorting reference, exact) runs instead,
logged at info level and reported by ``last_backend("find_threshold")``. Dtypes other than float32
are registered to the torch backend only (its rounding is dtype-specific).

One driver. The bucket walk and the crossing test are C++ (``pick_bucket`` and ``crossing_test``
in csrc/threshold_cpu.cpp); the cpu backend runs its levels in C++, the cuda and triton backends
run the same walk level by level from :func:`radix_select` over their device histograms.
tests/ops/test_threshold_drivers.py runs one table of adversarial score vectors through every
backend's driver and compares each answer bit for bit with ``reference.find_threshold``.

Backends. ``last_backend("find_threshold")`` names the backend whose radix select ran; the
hand-over to the sorted values is part of every radix backend's algorithm (counted in
:func:`threshold_stats`, sorted on the scores' device: the C++ sort on the CPU, CUB on CUDA; a
build without CUDA kernels orders CUDA scores with torch.sort, logged and counted as
``torch_sorts``).

Determinism. ``deterministic=True`` (or torch.use_deterministic_algorithms) makes the cuda and
triton histograms sum each bucket's float32 significands exactly in int64, so every run picks the
same buckets; by default they add doubles with float atomics, whose order varies, so a cumulative
sum that ties with the threshold can fall either way (the hand-over keeps ``find_threshold``
exact regardless; the fixed-total selects of ``prune_graph`` are where it shows). The cpu kernels
are deterministic in both modes: static row splits merged in thread order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from fastattr import reference
from fastattr._runtime import backends as _backends
from fastattr._runtime import checks as _checks
from fastattr._runtime import device as _device
from fastattr._runtime import ext as _ext

logger = logging.getLogger("fastattr")

FIND_THRESHOLD = _backends.op("find_threshold")
# prune_graph_sparse's edge threshold: circuit-tracer's rule with the total given (the exactly
# rounded double sum), which no sort of circuit-tracer's reproduces on N^2 scores.
FIXED_TOTAL = _backends.op("find_threshold_fixed_total")

_C = _ext.ext
if _C is not None:
    # The digits of the select levels and the status codes: csrc/graph.h, through fastattr._C.
    SELECT_SHIFT: tuple[int, ...] = tuple(_C.select_shift)
    SELECT_BITS: tuple[int, ...] = tuple(_C.select_bits)
    OK, AMBIGUOUS, ALL_ZERO, NEGATIVE, NON_FINITE = (
        _C.select_status[k] for k in ("ok", "ambiguous", "all_zero", "negative", "non_finite")
    )
else:  # without the extension only the torch backend runs, and it reads none of these
    SELECT_SHIFT = SELECT_BITS = ()
    OK = AMBIGUOUS = ALL_ZERO = NEGATIVE = NON_FINITE = None

_U = 2.0**-24  # float32 unit roundoff
_UD = 2.0**-53  # float64 unit roundoff


@dataclass
class ThresholdStats:
    calls: int = 0
    value_sorts: int = 0  # ambiguous answers resolved on the radix-sorted values
    torch_sorts: int = 0  # of those, ordered by torch.sort (a build without CUDA kernels, on a GPU)
    exact_total: int = 0  # ambiguous answers above torch.sort's size limit, resolved with the exact total

    @property
    def fallbacks(self) -> int:
        """``value_sorts`` under the name it had while the hand-over was torch.sort (kept for callers)."""
        return self.value_sorts


_stats = ThresholdStats()


def threshold_stats() -> ThresholdStats:
    """How often find_threshold needed the sorted values because torch's rounding of the total
    decided the answer."""
    return _stats


def _gamma(d: int, u: float = _U) -> float:
    return d * u / (1.0 - d * u)


def _ceil_log2(x: int) -> int:
    return max(0, (max(int(x), 1) - 1).bit_length())


def _cpu_lanes() -> int:
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        return 16
    return 16 if "512" in cap else 8


def torch_sum_error_bound(n: int, device: torch.device) -> float:
    """Relative error bound of ``torch.sum`` over n non-negative float32 values on ``device``.

    On the CPU torch sums with a 4-level cascade (ATen SumKernel.cpp, ``multi_row_sum``): m = n /
    (lanes * 4) vector rows are accumulated in chunks of L = 2^max(4, ceil(log2 m) / 4) per level,
    the top level takes the remaining m / L^3 chunk sums, then the 4 ILP accumulators, the vector
    lanes and the scalar tail are added. Every element passes through at most ``depth`` float
    additions, and for non-negative terms the error is at most gamma(depth) * sum. Inputs of 32768
    or more elements may be split across threads, adding one partial per thread. On CUDA one thread
    can accumulate n / 4096 values before the block tree, which the bound allows for.
    """
    if device.type == "cuda":
        return _gamma(-(-n // 4096) + 512)
    lanes = _cpu_lanes()
    m = max(n // (lanes * 4), 1)
    step = 1 << max(4, _ceil_log2(m) // 4)
    depth = 4 * step + -(-m // step**3) + 8 + 2 * lanes
    if n >= 32768:
        depth += max(torch.get_num_threads(), 1) + 1
    return _gamma(depth)


def prefix_error_bound(n: int, device: torch.device) -> float:
    """Relative difference between our double prefix sums and torch's cumsum prefixes.

    CPU: both accumulate in double (different orders), so at most ~2n double roundings. CUDA: torch
    scans float32 in float32 (a tile-wise scan with a look-back over tiles)."""
    if device.type == "cuda":
        return _gamma(-(-n // 256) + 512)
    return 2.0 * (n + 4) * _UD


def banded_total(n: int, device: torch.device) -> dict[str, float]:
    """The crossing test's arguments when S is torch.sum's float32 total of n scores on ``device``:
    the select's own double total widened by torch's rounding bound, the prefixes by the scan's."""
    return {"rel_s": torch_sum_error_bound(n, device) + 2.0 * (n + 4) * _UD, "dc": prefix_error_bound(n, device),
            "s_fixed": 0.0}


# ------------------------------------------------------------------------------------------------
# The level-by-level driver of the device backends (cuda, triton) over their histograms.
# ------------------------------------------------------------------------------------------------


@dataclass
class Hist:
    """One select level read back from the device: counts and float64 sums per bucket, and the
    level-0 statistics (later levels leave them at their defaults)."""

    count: np.ndarray
    sums: np.ndarray
    nnz: int = 0
    min_nz: float = 0.0
    negative: bool = False
    nonfinite: bool = False


def hist_buffers(level: int, device: torch.device, deterministic: bool):
    """(count, sums, stats) for one device histogram level; the kernels overwrite them. ``sums``
    holds int64 significand sums in deterministic mode, float64 sums otherwise."""
    nb = 1 << SELECT_BITS[level]
    count = torch.empty(nb, dtype=torch.int64, device=device)
    sums = torch.empty(nb, dtype=torch.int64 if deterministic else torch.float64, device=device)
    stats = torch.empty(4, dtype=torch.int64, device=device)
    return count, sums, stats


def significand_sums(sig: np.ndarray, level: int, prefix: int) -> np.ndarray:
    """float64 bucket sums from exact significand sums: a bucket's values share the exponent e its
    digits fix (level 0 holds the whole exponent), value = significand * 2^(max(e, 1) - 150). The
    int64 -> float64 conversion is the one rounding, the same in every run."""
    nb = sig.size
    up = SELECT_SHIFT[level] + SELECT_BITS[level]
    high = (int(prefix) << up) if up < 32 else 0
    pattern = np.uint64(high) | (np.arange(nb, dtype=np.uint64) << np.uint64(SELECT_SHIFT[level]))
    exponent = ((pattern >> np.uint64(23)) & np.uint64(0xFF)).astype(np.int64)
    return sig.astype(np.float64) * np.ldexp(1.0, np.maximum(exponent, 1) - 150)


def decode_hist(count: torch.Tensor, sums: torch.Tensor, stats: torch.Tensor, level: int, prefix: int,
                deterministic: bool) -> Hist:
    """A device histogram level as the driver reads it (one copy to the host)."""
    c = count.cpu().numpy()
    s = significand_sums(sums.cpu().numpy(), level, prefix) if deterministic else sums.cpu().numpy()
    if level != 0:
        return Hist(c, s)
    st = stats.cpu().tolist()
    mn = float(np.array([st[1] & 0xFFFFFFFF], dtype=np.uint32).view(np.float32)[0]) if st[0] else 0.0
    return Hist(c, s, int(st[0]), mn, bool(st[2]), bool(st[3]))


@dataclass
class Selection:
    status: int
    value: float = 0.0
    clamped: bool = False


@dataclass(frozen=True)
class _Pick:
    early: int
    late: int
    base_early: float
    base_late: float
    count_late: int


def _pick(h: Hist, level: int, base: float, test: tuple, must_cross: bool) -> _Pick:
    count = np.ascontiguousarray(h.count, dtype=np.int64)
    sums = np.ascontiguousarray(h.sums, dtype=np.float64)
    s_lo, s_hi, dc, t = test[:4]
    return _Pick(*_C.select_pick_bucket(
        count=count.ctypes.data, sums=sums.ctypes.data, level=level, n_buckets=count.size, base=base, s_lo=s_lo,
        s_hi=s_hi, dc=dc, t=t, must_cross=must_cross,
    ))


def radix_select(hist_pass, n: int, t: float, *, rel_s: float = 0.0, dc: float = 0.0, s_fixed: float = 0.0) -> Selection:
    """circuit-tracer's crossing over ``n`` scores, driven level by level with
    ``hist_pass(level, prefix) -> Hist``. The total S is ``s_fixed`` when positive, else the level-0
    total (rounded to float32 when ``rel_s`` is 0, widened by ``rel_s`` otherwise); ``dc`` bounds
    the prefixes' relative error. The bucket walk is csrc's, shared with the cpu backend."""
    h = hist_pass(0, 0)
    if h.nonfinite:
        return Selection(NON_FINITE)
    if h.negative:
        return Selection(NEGATIVE)
    if h.nnz == 0:
        return Selection(ALL_ZERO, 0.0, True)
    sums0 = np.ascontiguousarray(h.sums, dtype=np.float64)
    test = _C.select_crossing_test(sums=sums0.ctypes.data, n_buckets=sums0.size, t=t, rel_s=rel_s, dc=dc,
                                   s_fixed=s_fixed)
    p = _pick(h, 0, 0.0, test, False)
    if p.early != p.late or test[4]:  # test[4]: torch.sum's total may overflow (graph.h, may_overflow)
        return Selection(AMBIGUOUS)
    if p.late < 0:
        return Selection(OK, 0.0 if h.nnz < n else h.min_nz, True)
    prefix, base = p.late, p.base_late
    for level in range(1, len(SELECT_BITS)):
        p = _pick(hist_pass(level, prefix), level, base, test, True)
        if p.early != p.late or p.late < 0:
            return Selection(AMBIGUOUS)
        prefix = (prefix << SELECT_BITS[level]) | p.late
        base = p.base_late
    value = float(np.array([prefix], dtype=np.uint32).view(np.float32)[0])
    return Selection(OK, value, False)


# ------------------------------------------------------------------------------------------------
# Launch helpers: one per backend, the only callers of their kernels.
# ------------------------------------------------------------------------------------------------


def _select_cpu(scores: torch.Tensor, t: float, *, rel_s: float, dc: float, s_fixed: float) -> Selection:
    """The cpu backend's whole select (every level in C++)."""
    status, value, clamped = _C.select_threshold_cpu(
        scores=scores.data_ptr(), scores_dtype=_ext.dtype_code(scores), n=scores.numel(), t=t, rel_s=rel_s, dc=dc,
        s_fixed=s_fixed,
    )
    return Selection(status, value, clamped)


def _hist_1d_cuda(scores: torch.Tensor, level: int, prefix: int, *, deterministic: bool) -> Hist:
    count, sums, stats = hist_buffers(level, scores.device, deterministic)
    _C.hist_1d_cuda(
        scores=scores.data_ptr(), scores_dtype=_ext.dtype_code(scores), n=scores.numel(), level=level, prefix=prefix,
        count=count.data_ptr(), sums=0 if deterministic else sums.data_ptr(),
        sig_sums=sums.data_ptr() if deterministic else 0, stats=stats.data_ptr(), deterministic=deterministic,
        stream=_ext.cuda_stream(scores.device),
    )
    return decode_hist(count, sums, stats, level, prefix, deterministic)


def _hist_1d_triton(scores: torch.Tensor, level: int, prefix: int, *, deterministic: bool) -> Hist:
    from fastattr.triton_kernels import threshold as tk

    count, sums, stats = hist_buffers(level, scores.device, deterministic)
    tk.hist_1d(scores, level, prefix, count, sums, stats, deterministic=deterministic)
    return decode_hist(count, sums, stats, level, prefix, deterministic)


_DEVICE_HIST = {"cuda": _hist_1d_cuda, "triton": _hist_1d_triton}


def select_1d(scores: torch.Tensor, t: float, backend: str, *, deterministic: bool, rel_s: float, dc: float,
              s_fixed: float) -> Selection:
    """One backend's radix select over contiguous float32 ``scores`` (no fallback): the C++ select
    on cpu, :func:`radix_select` over the backend's histograms on cuda and triton."""
    if backend == "cpu":
        return _select_cpu(scores, t, rel_s=rel_s, dc=dc, s_fixed=s_fixed)
    hist = _DEVICE_HIST[backend]
    return radix_select(lambda level, prefix: hist(scores, level, prefix, deterministic=deterministic),
                        scores.numel(), t, rel_s=rel_s, dc=dc, s_fixed=s_fixed)


def _descending_cpu(scores: torch.Tensor) -> torch.Tensor:
    out, tmp = torch.empty_like(scores), torch.empty_like(scores)
    _C.sort_descending_cpu(scores=scores.data_ptr(), scores_dtype=_ext.dtype_code(scores), n=scores.numel(),
                           out=out.data_ptr(), tmp=tmp.data_ptr())
    return out


def _descending_cuda(scores: torch.Tensor) -> torch.Tensor:
    n = scores.numel()
    out = torch.empty_like(scores)
    temp_bytes = _C.sort_descending_cuda_temp_bytes(n=n)
    temp = torch.empty(max(temp_bytes, 1), dtype=torch.uint8, device=scores.device)
    _C.sort_descending_cuda(scores=scores.data_ptr(), scores_dtype=_ext.dtype_code(scores), n=n,
                            out=out.data_ptr(), temp=temp.data_ptr(), temp_bytes=temp_bytes,
                            stream=_ext.cuda_stream(scores.device))
    return out


@_device.guard("scores")
def descending_values(scores: torch.Tensor) -> torch.Tensor:
    """Contiguous, non-negative, finite float32 ``scores`` in descending order: what circuit-tracer's
    ``torch.sort(scores, descending=True).values`` holds, by fastattr's radix sort of the values
    (no index tensor, no size limit; csrc/radix_sort_cpu.cpp, kernels/cuda/radix_sort.cu)."""
    if scores.device.type == "cpu":
        return _descending_cpu(scores)
    if hasattr(_C, "sort_descending_cuda"):
        return _descending_cuda(scores)
    _stats.torch_sorts += 1
    logger.info("find_threshold: this build has no CUDA kernels, so torch.sort orders the scores")
    return torch.sort(scores, descending=True).values


# ------------------------------------------------------------------------------------------------
# find_threshold
# ------------------------------------------------------------------------------------------------


def _check_scores(scores, threshold, *, allow_empty: bool = False) -> float:
    _checks.check_tensor(scores, "scores", ndim=1)
    if not scores.is_floating_point():
        raise TypeError(f"scores: expected a floating-point tensor, got {str(scores.dtype).replace('torch.', '')}")
    if scores.numel() == 0 and not allow_empty:
        raise _checks.EmptyGraphError("scores: expected a non-empty tensor, got 0 elements")
    threshold = _checks.check_number(threshold, "threshold")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold: expected a finite number, got {threshold}")
    return threshold


def _sort_limit(device: torch.device) -> float:
    """The most elements circuit-tracer's ``torch.sort`` accepts on ``device``."""
    return 2**31 - 1 if device.type == "cuda" else math.inf


def _as_tensor(value: float, scores: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=scores.dtype, device=scores.device)


def _radix_find_threshold(scores: torch.Tensor, threshold: float, backend: str, deterministic: bool) -> torch.Tensor:
    """find_threshold on a radix-select backend: the select, then what its status calls for."""
    scores = scores.contiguous()
    n = scores.numel()
    sel = select_1d(scores, threshold, backend, deterministic=deterministic, **banded_total(n, scores.device))
    _stats.calls += 1
    if sel.status == NON_FINITE:
        _checks.check_finite(scores, "scores")
        raise ValueError("scores: expected finite values")  # pragma: no cover - check_finite raised
    if sel.status == NEGATIVE:
        logger.info("find_threshold: negative scores break the radix order; running the torch backend")
        return FIND_THRESHOLD.select(scores.device, "torch", dtype=scores.dtype, arg="scores").fn(
            scores, threshold, deterministic)
    if sel.status == AMBIGUOUS and n > _sort_limit(scores.device):
        # circuit-tracer's own sort rejects this many elements, so there is no value of its to
        # match: use the exactly rounded total, the rule of the fused edge threshold.
        logger.info("find_threshold: %d scores exceed torch.sort's limit; the total is the exactly rounded sum", n)
        _stats.exact_total += 1
        sel = select_1d(scores, threshold, backend, deterministic=deterministic, rel_s=0.0, dc=0.0, s_fixed=0.0)
        if sel.status not in (OK, ALL_ZERO):
            raise RuntimeError(f"find_threshold: histogram passes disagree with a fixed total (status {sel.status})")
    elif sel.status == AMBIGUOUS:
        # torch.sum's float32 rounding of the sorted total decides, and only the order reproduces it.
        _stats.value_sorts += 1
        logger.debug("find_threshold: torch's rounding of the total decides; resolving on the sorted values")
        return reference.threshold_of_descending(descending_values(scores), threshold)
    return _as_tensor(sel.value, scores)


@FIND_THRESHOLD.register("cpu", dtypes=(torch.float32,))
def _find_threshold_cpu(scores: torch.Tensor, threshold: float, deterministic: bool) -> torch.Tensor:
    return _radix_find_threshold(scores, threshold, "cpu", deterministic)


@FIND_THRESHOLD.register("cuda", dtypes=(torch.float32,))
def _find_threshold_cuda(scores: torch.Tensor, threshold: float, deterministic: bool) -> torch.Tensor:
    return _radix_find_threshold(scores, threshold, "cuda", deterministic)


@FIND_THRESHOLD.register("triton", dtypes=(torch.float32,))
def _find_threshold_triton(scores: torch.Tensor, threshold: float, deterministic: bool) -> torch.Tensor:
    return _radix_find_threshold(scores, threshold, "triton", deterministic)


@FIND_THRESHOLD.register("torch")
def _find_threshold_torch(scores: torch.Tensor, threshold: float, deterministic: bool) -> torch.Tensor:
    # torch.sort, cumsum and sum: fixed-order on every device, so deterministic in both modes.
    _checks.check_finite(scores, "scores")
    return reference.find_threshold(scores, threshold)


@_device.guard("scores")
def find_threshold(scores: torch.Tensor, threshold: float, *, backend: str | None = None,
                   deterministic: bool | None = None) -> torch.Tensor:
    """The smallest score kept when keeping the top scores up to a cumulative fraction ``threshold``.

    Exactly circuit-tracer's ``find_threshold`` (a 0-d tensor of ``scores``' dtype and device), found
    by radix select instead of a sort. ``scores`` must be 1-D and finite. ``deterministic`` (None:
    torch.are_deterministic_algorithms_enabled()) makes the device histograms order-independent.
    """
    threshold = _check_scores(scores, threshold)
    det = _backends.deterministic(deterministic)
    impl = FIND_THRESHOLD.select(scores.device, backend, dtype=scores.dtype, arg="scores")
    return impl.fn(scores, threshold, det)


# ------------------------------------------------------------------------------------------------
# The fixed-total variant (prune_graph_sparse's edge threshold)
# ------------------------------------------------------------------------------------------------


def _fixed_total_radix(scores: torch.Tensor, threshold: float, s: np.float32, backend: str,
                       deterministic: bool) -> tuple[float, bool]:
    sel = select_1d(scores.contiguous(), threshold, backend, deterministic=deterministic, rel_s=0.0, dc=0.0,
                    s_fixed=float(s))
    if sel.status == ALL_ZERO:
        return 0.0, True
    if sel.status == NON_FINITE:
        _checks.check_finite(scores, "scores")
    if sel.status != OK:  # negative scores, or passes that disagree with one fixed total
        raise RuntimeError(f"find_threshold_fixed_total: the {backend} select ended with status {sel.status}")
    return sel.value, sel.clamped


@FIXED_TOTAL.register("cpu", dtypes=(torch.float32,))
def _fixed_total_cpu(scores, threshold, s, deterministic):
    return _fixed_total_radix(scores, threshold, s, "cpu", deterministic)


@FIXED_TOTAL.register("cuda", dtypes=(torch.float32,))
def _fixed_total_cuda(scores, threshold, s, deterministic):
    return _fixed_total_radix(scores, threshold, s, "cuda", deterministic)


@FIXED_TOTAL.register("triton", dtypes=(torch.float32,))
def _fixed_total_triton(scores, threshold, s, deterministic):
    return _fixed_total_radix(scores, threshold, s, "triton", deterministic)


@FIXED_TOTAL.register("torch")
def _fixed_total_torch(scores, threshold, s, deterministic):
    """circuit-tracer's operations with the total replaced by ``s``: sort, cumsum, searchsorted."""
    _checks.check_finite(scores, "scores")
    ordered = torch.sort(scores, descending=True).values
    cum = torch.cumsum(ordered.double(), 0).float() / torch.tensor(s, device=scores.device)
    idx = int(torch.searchsorted(cum, torch.tensor(threshold, dtype=torch.float32, device=scores.device)).item())
    return float(ordered[min(idx, ordered.numel() - 1)]), idx >= ordered.numel()


@_device.guard("scores")
def find_threshold_fixed_total(scores: torch.Tensor, threshold: float, total: float, *, backend: str | None = None,
                               deterministic: bool | None = None) -> tuple[float, bool]:
    """circuit-tracer's crossing with the total S = fl32(``total``) instead of torch.sum's float32
    total: (value, keep_all). keep_all when S is 0 or no prefix reaches ``threshold`` (the search
    clamps; no scores have S = 0). ``scores`` are non-negative and finite."""
    threshold = _check_scores(scores, threshold, allow_empty=True)
    det = _backends.deterministic(deterministic)
    impl = FIXED_TOTAL.select(scores.device, backend, dtype=scores.dtype, arg="scores")
    s = np.float32(total)
    if s == 0.0 or scores.numel() == 0:
        return 0.0, True
    return impl.fn(scores, threshold, s, det)
