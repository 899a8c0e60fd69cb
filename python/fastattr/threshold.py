"""Cumulative-influence thresholds without sorting.

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
differently from a correctly rounded sum (they disagree in roughly 40% of random cases). So the
select runs with S known only to an interval derived from the error bound of torch's summation
algorithm (:func:`torch_sum_error_bound`); if both ends of the interval give the same answer, that
answer is circuit-tracer's; if not (the crossing sits within ~1e-5 of the threshold), the scores are
sorted after all and the reference computes the answer. ``find_threshold`` is therefore always
exact; :func:`threshold_stats` counts the sorting fallbacks. Measured on 2400 random score vectors
(n <= 5000, six distributions, ties and zeros included): no fallback at t = 0, about 1% at t = 0.5
and 0.8, up to 10% at t = 0.98 for flat distributions, and every time at t = 1.0, where
circuit-tracer's answer itself hinges on whether its float32 total rounds above the cumulative sum.
On CUDA torch's float32 cumsum accumulates in float32, so the interval also widens the prefix by
a bound on that scan's error and fallbacks (torch's own sort, on the GPU) are more frequent.

The fused variant for the edges of ``prune_graph`` (see :mod:`fastattr.pruning`) cannot sort the
N^2 scores it never builds: it takes S as the double sum rounded to float32, which is the one
documented source of edge-mask differences from circuit-tracer.

All-zero scores: circuit-tracer divides 0 by 0, its search returns len(scores), the clamp picks the
last element, so the answer is 0. NaN/Inf scores raise ValueError. Negative scores break the bit
order; they are handed to the torch reference (exact) with an info log. Dtypes other than float32
also use the reference (its rounding is dtype-specific), logged at info level.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from fastattr import _backends, _checks, _device, _ext, reference

logger = logging.getLogger("fastattr")

# Must match csrc/graph.h: the digits of the three select levels.
SELECT_SHIFT = (20, 9, 0)
SELECT_BITS = (11, 11, 9)
N_BUCKETS0 = 1 << SELECT_BITS[0]

# Status codes shared with the compiled kernels (csrc/graph.h SelectStatus).
OK, AMBIGUOUS, ALL_ZERO, NEGATIVE, NON_FINITE = 0, 1, 2, 3, 4

_U = 2.0**-24  # float32 unit roundoff
_UD = 2.0**-53  # float64 unit roundoff


@dataclass
class ThresholdStats:
    calls: int = 0
    fallbacks: int = 0  # ambiguous answers resolved by sorting
    exact_total: int = 0  # ambiguous answers above torch.sort's size limit, resolved with the exact total


_stats = ThresholdStats()


def threshold_stats() -> ThresholdStats:
    """How often find_threshold had to sort because torch's rounding of the total mattered."""
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


# ------------------------------------------------------------------------------------------------
# The bucket search, shared by every backend that histograms on the device (cuda, triton).
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrossingTest:
    """circuit-tracer's crossing test fl32(fl32(C) / S) >= fl32(t), with S in [s_lo, s_hi]."""

    s_lo: np.float32
    s_hi: np.float32
    dc: float
    t: np.float32

    @staticmethod
    def exact(total: float, t: float) -> CrossingTest:
        s = np.float32(total)
        return CrossingTest(s, s, 0.0, np.float32(t))

    @staticmethod
    def banded(total: float, n: int, t: float, device: torch.device) -> CrossingTest:
        rel = torch_sum_error_bound(n, device) + 2.0 * (n + 4) * _UD
        lo = np.float32(total * (1.0 - rel))
        hi = np.float32(total * (1.0 + rel))
        lo = np.nextafter(lo, np.float32(0.0), dtype=np.float32)
        hi = np.nextafter(hi, np.float32(np.inf), dtype=np.float32)
        return CrossingTest(lo, hi, prefix_error_bound(n, device), np.float32(t))

    def _test(self, ends: np.ndarray, scale: float, s: np.float32) -> np.ndarray:
        c = ends * scale if scale != 1.0 else ends
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            q = c.astype(np.float32) / s
        return q >= self.t

    def early(self, ends: np.ndarray) -> np.ndarray:
        return self._test(ends, 1.0 + self.dc, self.s_lo)

    def late(self, ends: np.ndarray) -> np.ndarray:
        return self._test(ends, 1.0 - self.dc, self.s_hi)


@dataclass
class Pick:
    early: int
    late: int
    base_early: float
    base_late: float
    count_late: int


def pick_bucket(count: np.ndarray, sums: np.ndarray, base: float, test: CrossingTest, must_cross: bool) -> Pick:
    """The bucket holding the crossing, walking from the largest values down (as csrc does)."""
    nz = np.nonzero(count)[0][::-1]
    if nz.size == 0:
        return Pick(-1, -1, base, base, 0)
    # Sequential double accumulation in bucket order, like the C++ loop.
    ends = np.cumsum(np.concatenate(([base], sums[nz].astype(np.float64))))
    starts, ends = ends[:-1], ends[1:]
    e = np.nonzero(test.early(ends))[0]
    late = np.nonzero(test.late(ends))[0]
    ie = int(e[0]) if e.size else -1
    il = int(late[0]) if late.size else -1
    if must_cross:
        ie = ie if ie >= 0 else nz.size - 1
        il = il if il >= 0 else nz.size - 1
    return Pick(
        int(nz[ie]) if ie >= 0 else -1,
        int(nz[il]) if il >= 0 else -1,
        float(starts[ie]) if ie >= 0 else base,
        float(starts[il]) if il >= 0 else base,
        int(count[nz[il]]) if il >= 0 else 0,
    )


@dataclass
class Selection:
    status: int
    value: float = 0.0
    clamped: bool = False


def radix_select(hist_pass, n: int, test_for_total) -> Selection:
    """Drive the three levels with ``hist_pass(level, prefix) -> (count, sums, nnz, min, flags)``.

    ``test_for_total(total)`` builds the crossing test once the level-0 total is known. ``flags``
    (level 0 only) is (negative, nonfinite).
    """
    count, sums, nnz, mn, flags = hist_pass(0, 0)
    negative, nonfinite = flags
    if nonfinite:
        return Selection(NON_FINITE)
    if negative:
        return Selection(NEGATIVE)
    if nnz == 0:
        return Selection(ALL_ZERO, 0.0, True)
    test = test_for_total(float(np.sum(sums, dtype=np.float64)))
    p = pick_bucket(count, sums, 0.0, test, False)
    if p.early != p.late:
        return Selection(AMBIGUOUS)
    if p.late < 0:
        return Selection(OK, 0.0 if nnz < n else float(mn), True)
    prefix, base = p.late, p.base_late
    for level in (1, 2):
        count, sums, _, _, _ = hist_pass(level, prefix)
        p = pick_bucket(count, sums, base, test, True)
        if p.early != p.late or p.late < 0:
            return Selection(AMBIGUOUS)
        prefix = (prefix << SELECT_BITS[level]) | p.late
        base = p.base_late
    value = float(np.array([prefix], dtype=np.uint32).view(np.float32)[0])
    return Selection(OK, value, False)


# ------------------------------------------------------------------------------------------------
# find_threshold
# ------------------------------------------------------------------------------------------------


def _check_scores(scores, threshold) -> float:
    _checks.check_tensor(scores, "scores", ndim=1)
    if not scores.is_floating_point():
        raise TypeError(f"scores: expected a floating-point tensor, got {str(scores.dtype).replace('torch.', '')}")
    if scores.numel() == 0:
        raise _checks.EmptyGraphError("scores: expected a non-empty tensor, got 0 elements")
    threshold = _checks.check_number(threshold, "threshold")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold: expected a finite number, got {threshold}")
    return threshold


def _fallback(scores: torch.Tensor, threshold: float, why: str) -> torch.Tensor:
    logger.info("find_threshold: %s; using the sorting reference", why)
    return reference.find_threshold(scores, threshold)


def _finish(scores: torch.Tensor, threshold: float, sel: Selection) -> torch.Tensor:
    _stats.calls += 1
    if sel.status == NON_FINITE:
        _checks.check_finite(scores, "scores")
        raise ValueError("scores: expected finite values")  # pragma: no cover - check_finite raised
    if sel.status == NEGATIVE:
        return _fallback(scores, threshold, "negative scores break the radix order")
    if sel.status == AMBIGUOUS:
        _stats.fallbacks += 1
        logger.debug("find_threshold: the answer depends on torch's rounding of the total; sorting")
        return reference.find_threshold(scores, threshold)
    return torch.tensor(sel.value, dtype=scores.dtype, device=scores.device)


def _find_threshold_cpu(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    scores = scores.contiguous()
    n = scores.numel()
    # The kernel takes S as its own double sum widened by torch's rounding bound.
    rel = torch_sum_error_bound(n, scores.device) + 2.0 * (n + 4) * _UD
    status, value, clamped = _ext.ext.select_threshold_cpu(
        scores.data_ptr(), _ext.dtype_code(scores), n, threshold, rel, prefix_error_bound(n, scores.device), 0.0
    )
    return _finish(scores, threshold, Selection(status, value, clamped))


def _sort_limit(device: torch.device) -> float:
    """The most elements circuit-tracer's ``torch.sort`` accepts on ``device``."""
    return 2**31 - 1 if device.type == "cuda" else math.inf


def _find_threshold_device(scores: torch.Tensor, threshold: float, hist_1d) -> torch.Tensor:
    scores = scores.contiguous()
    n = scores.numel()
    hist = lambda level, prefix: hist_1d(scores, level, prefix)  # noqa: E731
    sel = radix_select(hist, n, lambda total: CrossingTest.banded(total, n, threshold, scores.device))
    if sel.status == AMBIGUOUS and n > _sort_limit(scores.device):
        # circuit-tracer's own sort rejects this many elements, so there is no value of its to
        # match: use the exactly rounded total, the rule of the fused edge threshold.
        logger.info("find_threshold: %d scores exceed torch.sort's limit; the total is the exactly rounded sum", n)
        _stats.calls += 1
        _stats.exact_total += 1
        sel = radix_select(hist, n, lambda total: CrossingTest.exact(total, threshold))
        if sel.status == ALL_ZERO:
            return torch.tensor(0.0, dtype=scores.dtype, device=scores.device)
        if sel.status != OK:
            raise RuntimeError(f"find_threshold: histogram passes disagree with a fixed total (status {sel.status})")
        return torch.tensor(sel.value, dtype=scores.dtype, device=scores.device)
    return _finish(scores, threshold, sel)


def _find_threshold_cuda(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    return _find_threshold_device(scores, threshold, _hist_1d_cuda)


def _find_threshold_triton(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    from fastattr.triton_kernels import threshold as tk

    return _find_threshold_device(scores, threshold, tk.hist_1d)


def decode_stats(stats: torch.Tensor) -> tuple[int, float, tuple[bool, bool]]:
    """[nnz, bits of the smallest non-zero, any negative, any non-finite] from the device kernels."""
    st = stats.cpu().tolist()
    mn = float(np.array([st[1] & 0xFFFFFFFF], dtype=np.uint32).view(np.float32)[0])
    return int(st[0]), mn, (bool(st[2]), bool(st[3]))


def _hist_1d_cuda(scores: torch.Tensor, level: int, prefix: int):
    nb = 1 << SELECT_BITS[level]
    count = torch.empty(nb, dtype=torch.int64, device=scores.device)
    sums = torch.empty(nb, dtype=torch.float64, device=scores.device)
    stats = torch.zeros(4, dtype=torch.int64, device=scores.device)
    _ext.ext.hist_1d_cuda(
        scores.data_ptr(), _ext.dtype_code(scores), scores.numel(), level, prefix,
        count.data_ptr(), sums.data_ptr(), stats.data_ptr(), _ext.cuda_stream(scores.device),
    )
    nnz, mn, flags = decode_stats(stats)
    return count.cpu().numpy(), sums.cpu().numpy(), nnz, mn, flags


@_device.guard("scores")
def find_threshold(scores: torch.Tensor, threshold: float, *, backend: str | None = None) -> torch.Tensor:
    """The smallest score kept when keeping the top scores up to a cumulative fraction ``threshold``.

    Exactly circuit-tracer's ``find_threshold`` (a 0-d tensor of ``scores``' dtype and device), found
    by radix select instead of a sort. ``scores`` must be 1-D and finite.
    """
    threshold = _check_scores(scores, threshold)
    _, impl = _backends.select(
        "find_threshold",
        scores.device,
        backend,
        {
            "cuda": _find_threshold_cuda,
            "triton": _find_threshold_triton,
            "cpu": _find_threshold_cpu,
            "torch": _find_threshold_torch,
        },
        dtype=scores.dtype,
        dtype_arg="scores",
    )
    return impl(scores, threshold)


def _find_threshold_torch(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    _checks.check_finite(scores, "scores")
    return reference.find_threshold(scores, threshold)


# The radix select orders float32 bit patterns and reproduces float32 rounding; other dtypes round
# differently and run the sorting reference.
_backends.declare_dtypes("find_threshold", ("cuda", "triton", "cpu"), (torch.float32,))
