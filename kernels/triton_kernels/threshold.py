"""Triton radix-select histograms for the cumulative thresholds (see fastattr/threshold.py).

One level histograms counts and float64 sums of the values whose higher digits equal ``prefix``,
over ``bits`` bits starting at ``shift`` of the float32 pattern. Edge scores of the pruned graph are
recomputed on the fly as fl32(fl32(|a| / scale_i) * factor_i) with IEEE division (``div_rn``), the
same rounding as circuit-tracer's normalize-then-multiply, so the N x N scores are never stored.
Level 0 also reports [non-zero count, smallest non-zero bit pattern, any negative, any non-finite].
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

# Must match csrc/graph.h and fastattr/threshold.py.
SELECT_SHIFT = (20, 9, 0)
SELECT_BITS = (11, 11, 9)
_INF_BITS = 0x7F800000


@triton.jit
def _add_to_hist(v, ok, count_ptr, sum_ptr, stats_ptr, prefix, SHIFT: tl.constexpr, BITS: tl.constexpr,
                 LEVEL0: tl.constexpr):
    u = v.to(tl.uint32, bitcast=True)
    valid = ok & (v != 0.0)
    if LEVEL0:
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
    tl.atomic_add(sum_ptr + b, v.to(tl.float64), mask=valid)


@triton.jit
def _hist_1d_kernel(s_ptr, n, count_ptr, sum_ptr, stats_ptr, prefix, SHIFT: tl.constexpr, BITS: tl.constexpr,
                    LEVEL0: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    v = tl.load(s_ptr + offs, mask=ok, other=0.0)
    _add_to_hist(v, ok, count_ptr, sum_ptr, stats_ptr, prefix, SHIFT, BITS, LEVEL0)


@triton.jit
def _edge_scores(a_ptr, mask_ptr, i, cols, ok, n, lda, sc, f):
    cm = tl.load(mask_ptr + cols, mask=ok, other=0)
    a = tl.load(a_ptr + i.to(tl.int64) * lda + cols, mask=ok, other=0.0)
    v = tl.where(cm != 0, tl.abs(a), 0.0)
    return tl.math.div_rn(v, tl.zeros_like(v) + sc) * f


@triton.jit
def _edge_hist_kernel(a_ptr, mask_ptr, scale_ptr, factor_ptr, n, lda, count_ptr, sum_ptr, stats_ptr, prefix,
                      SHIFT: tl.constexpr, BITS: tl.constexpr, LEVEL0: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.load(mask_ptr + i)
    f = tl.load(factor_ptr + i)
    sc = tl.load(scale_ptr + i)
    row_on = (keep != 0).to(tl.int32) * (f != 0.0).to(tl.int32)
    ok = (cols < n) & ((cols * 0 + row_on) != 0)  # broadcast first: the interpreter mistypes scalar & tensor
    s = _edge_scores(a_ptr, mask_ptr, i, cols, ok, n, lda, sc, f)
    s = tl.where(ok, s, 0.0)
    _add_to_hist(s, ok, count_ptr, sum_ptr, stats_ptr, prefix, SHIFT, BITS, LEVEL0)


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


def _buffers(level: int, device: torch.device):
    nb = 1 << SELECT_BITS[level]
    count = torch.zeros(nb, dtype=torch.int64, device=device)
    sums = torch.zeros(nb, dtype=torch.float64, device=device)
    stats = torch.tensor([0, _INF_BITS, 0, 0], dtype=torch.int64, device=device)
    return count, sums, stats


def _result(count, sums, stats):
    st = stats.cpu().tolist()
    mn = float(np.array([st[1] & 0xFFFFFFFF], dtype=np.uint32).view(np.float32)[0])
    return count.cpu().numpy(), sums.cpu().numpy(), int(st[0]), mn, (bool(st[2]), bool(st[3]))


def hist_1d(scores: torch.Tensor, level: int, prefix: int):
    """One select level over a 1-D float32 tensor: (count, sums, nnz, min, (negative, nonfinite))."""
    n = scores.numel()
    count, sums, stats = _buffers(level, scores.device)
    block = 1024
    _hist_1d_kernel[(triton.cdiv(n, block),)](
        scores, n, count, sums, stats, prefix,
        SHIFT=SELECT_SHIFT[level], BITS=SELECT_BITS[level], LEVEL0=level == 0, BLOCK=block,
    )
    return _result(count, sums, stats)


class EdgeKernels:
    """Edge-score passes of the pruned graph for fastattr.pruning (triton backend)."""

    @staticmethod
    def hist(A, mask_u8, scale, factor, level, prefix):
        n = A.shape[0]
        count, sums, stats = _buffers(level, A.device)
        if n:
            block = min(1024, triton.next_power_of_2(max(n, 16)))
            _edge_hist_kernel[(n, triton.cdiv(n, block))](
                A, mask_u8, scale, factor, n, A.stride(0), count, sums, stats, prefix,
                SHIFT=SELECT_SHIFT[level], BITS=SELECT_BITS[level], LEVEL0=level == 0, BLOCK=block,
            )
        return _result(count, sums, stats)

    @staticmethod
    def mask(A, mask_u8, scale, factor, thr):
        n = A.shape[0]
        out = torch.empty((n, n), dtype=torch.bool, device=A.device)
        if n:
            block = min(1024, triton.next_power_of_2(max(n, 16)))
            _edge_mask_kernel[(n, triton.cdiv(n, block))](
                A, mask_u8, scale, factor, out.view(torch.uint8), n, A.stride(0), float(thr), BLOCK=block,
            )
        return out
