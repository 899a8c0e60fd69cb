"""Triton radix-select histograms for the cumulative thresholds (see fastattr/ops/threshold.py).

One level histograms counts and sums of the values whose higher digits equal ``prefix``, over the
level's digit of the float32 pattern (the digits are csrc/graph.h's, read from ``fastattr._C``).
Edge scores of the pruned graph are recomputed on the fly as fl32(fl32(|a| / scale_i) * factor_i)
with IEEE division (``div_rn``), the same rounding as circuit-tracer's normalize-then-multiply, so
the N x N scores are never stored. Level 0 also reports [non-zero count, smallest non-zero bit
pattern, any negative, any non-finite].

Bucket sums come in two modes. Default: float64 atomics, whose order on a GPU varies and with it
the last bits of a sum. Deterministic: the exact int64 sum of each bucket's float32 significands
(level 0 fixes the exponent, so within a bucket value = significand * one power of two), by integer
atomics, which give the same result in every order; fastattr.threshold scales them to float64.

Each launch function overwrites its outputs (``count``, ``sums``, ``stats``), allocated by the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastattr._runtime import ext as _ext

if _ext.ext is None:  # the digits are defined once, in the compiled extension
    raise ImportError(f"fastattr.triton_kernels.threshold reads the radix-select digits from fastattr._C: {_ext.EXT_ERROR}")

SELECT_SHIFT = tuple(_ext.ext.select_shift)
SELECT_BITS = tuple(_ext.ext.select_bits)
_INF_BITS = 0x7F800000
_BLOCK_1D = 1024


@triton.jit
def _add_to_hist(v, ok, count_ptr, sum_ptr, stats_ptr, prefix, SHIFT: tl.constexpr, BITS: tl.constexpr,
                 LEVEL0: tl.constexpr, EXACT: tl.constexpr):
    u = v.to(tl.uint32, bitcast=True)
    valid = ok & (v != 0.0)
    if LEVEL0:
        # Integer statistics: order-independent atomics in both modes.
        finite = (v == v) & (tl.abs(v) < float("inf"))
        neg = ok & finite & (v < 0.0)
        nonfin = ok & (finite == 0)
        valid = valid & finite & (v > 0.0)
        tl.atomic_add(stats_ptr + 0, tl.sum(valid.to(tl.int64), axis=0))
        tl.atomic_min(stats_ptr + 1, tl.min(tl.where(valid, u.to(tl.int64), 0x7F800000), axis=0))
        tl.atomic_max(stats_ptr + 2, tl.max(neg.to(tl.int64), axis=0))
        tl.atomic_max(stats_ptr + 3, tl.max(nonfin.to(tl.int64), axis=0))
    if SHIFT + BITS < 32:
        valid = valid & ((u >> (SHIFT + BITS)) == prefix)
    b = ((u >> SHIFT) & ((1 << BITS) - 1)).to(tl.int32)
    ones = tl.full(v.shape, 1, tl.int64)
    tl.atomic_add(count_ptr + b, ones, mask=valid)
    if EXACT:
        mant = (u & 0x7FFFFF).to(tl.int64)
        sig = tl.where((u >> 23) != 0, mant | 0x800000, mant)
        tl.atomic_add(sum_ptr + b, sig, mask=valid)
    else:
        tl.atomic_add(sum_ptr + b, v.to(tl.float64), mask=valid)


@triton.jit
def _hist_1d_kernel(s_ptr, n, count_ptr, sum_ptr, stats_ptr, prefix, SHIFT: tl.constexpr, BITS: tl.constexpr,
                    LEVEL0: tl.constexpr, EXACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    v = tl.load(s_ptr + offs, mask=ok, other=0.0)
    _add_to_hist(v, ok, count_ptr, sum_ptr, stats_ptr, prefix, SHIFT, BITS, LEVEL0, EXACT)


@triton.jit
def _edge_scores(a_ptr, mask_ptr, i, cols, ok, n, lda, sc, f):
    cm = tl.load(mask_ptr + cols, mask=ok, other=0)
    a = tl.load(a_ptr + i.to(tl.int64) * lda + cols, mask=ok, other=0.0)
    v = tl.where(cm != 0, tl.abs(a), 0.0)
    return tl.math.div_rn(v, tl.zeros_like(v) + sc) * f


@triton.jit
def _edge_hist_kernel(a_ptr, mask_ptr, scale_ptr, factor_ptr, n, lda, count_ptr, sum_ptr, stats_ptr, prefix,
                      SHIFT: tl.constexpr, BITS: tl.constexpr, LEVEL0: tl.constexpr, EXACT: tl.constexpr,
                      BLOCK: tl.constexpr):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.load(mask_ptr + i)
    f = tl.load(factor_ptr + i)
    sc = tl.load(scale_ptr + i)
    row_on = (keep != 0).to(tl.int32) * (f != 0.0).to(tl.int32)
    ok = (cols < n) & ((cols * 0 + row_on) != 0)  # broadcast first: the interpreter mistypes scalar & tensor
    s = _edge_scores(a_ptr, mask_ptr, i, cols, ok, n, lda, sc, f)
    s = tl.where(ok, s, 0.0)
    _add_to_hist(s, ok, count_ptr, sum_ptr, stats_ptr, prefix, SHIFT, BITS, LEVEL0, EXACT)


@triton.jit
def _edge_mask_kernel(a_ptr, mask_ptr, scale_ptr, factor_ptr, out_ptr, n, lda, thr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n
    keep = tl.load(mask_ptr + i)
    f = tl.load(factor_ptr + i)
    sc = tl.load(scale_ptr + i)
    row_on = (keep != 0).to(tl.int32) * (f != 0.0).to(tl.int32)
    active = in_row & ((cols * 0 + row_on) != 0)
    s = _edge_scores(a_ptr, mask_ptr, i, cols, active, n, lda, sc, f)
    out = (active & (s >= thr)).to(tl.uint8)
    tl.store(out_ptr + i.to(tl.int64) * n + cols, out, mask=in_row)


def _prepare(level: int, count: torch.Tensor, sums: torch.Tensor, stats: torch.Tensor, deterministic: bool) -> None:
    nb = 1 << SELECT_BITS[level]
    want_sums = torch.int64 if deterministic else torch.float64
    if count.numel() != nb or sums.numel() != nb or sums.dtype != want_sums or stats.numel() != 4:
        raise ValueError(
            f"count, sums, stats: expected {nb} int64 counts, {nb} {str(want_sums).replace('torch.', '')} sums and "
            f"4 int64 statistics, got {count.numel()}, {sums.numel()} {sums.dtype}, {stats.numel()}"
        )
    count.zero_()
    sums.zero_()
    if level == 0:
        stats.copy_(torch.tensor([0, _INF_BITS, 0, 0], dtype=torch.int64))


def _digit(level: int, deterministic: bool) -> dict:
    return {"SHIFT": SELECT_SHIFT[level], "BITS": SELECT_BITS[level], "LEVEL0": level == 0, "EXACT": bool(deterministic)}


def hist_1d(scores: torch.Tensor, level: int, prefix: int, count: torch.Tensor, sums: torch.Tensor,
            stats: torch.Tensor, *, deterministic: bool = False) -> None:
    """One select level over a 1-D float32 tensor into ``count`` (int64), ``sums`` (float64, or int64
    significand sums when ``deterministic``) and, at level 0, ``stats`` (4 int64)."""
    _prepare(level, count, sums, stats, deterministic)
    n = scores.numel()
    _hist_1d_kernel[(triton.cdiv(n, _BLOCK_1D),)](
        scores, n, count, sums, stats, prefix, BLOCK=_BLOCK_1D, **_digit(level, deterministic),
    )


def _row_block(n: int) -> int:
    return min(1024, triton.next_power_of_2(max(n, 16)))


def edge_hist(a: torch.Tensor, node_mask: torch.Tensor, row_scale: torch.Tensor, row_factor: torch.Tensor, level: int,
              prefix: int, count: torch.Tensor, sums: torch.Tensor, stats: torch.Tensor, *,
              deterministic: bool = False) -> None:
    """One select level over the pruned graph's edge scores (``node_mask`` uint8), as ``hist_1d``."""
    _prepare(level, count, sums, stats, deterministic)
    n = a.shape[0]
    if n:
        block = _row_block(n)
        _edge_hist_kernel[(n, triton.cdiv(n, block))](
            a, node_mask, row_scale, row_factor, n, a.stride(0), count, sums, stats, prefix, BLOCK=block,
            **_digit(level, deterministic),
        )


def edge_mask(a: torch.Tensor, node_mask: torch.Tensor, row_scale: torch.Tensor, row_factor: torch.Tensor, thr: float,
              out: torch.Tensor) -> None:
    """out[i, j] = score_ij >= thr (``out``: n x n uint8 or bool, contiguous, every entry written)."""
    n = a.shape[0]
    if n:
        block = _row_block(n)
        _edge_mask_kernel[(n, triton.cdiv(n, block))](
            a, node_mask, row_scale, row_factor, out.view(torch.uint8), n, a.stride(0), float(thr), BLOCK=block,
        )
