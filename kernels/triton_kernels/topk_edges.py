"""Triton top-k incoming edges per row, as CSR (see fastattr/ops/topk_edges.py).

One program per row. The bit pattern T of the k-th largest |a| is found by a bitwise binary search
(non-negative floats order like their patterns: T is the largest pattern with at least k entries
>= T), which also gives how many entries equal to T are kept. A compaction loop then writes, in
column order, the entries above T and the first ones equal to T (ties go to the lower column).

Deterministic as it stands: row sums are ``tl.sum`` reductions in a fixed order, and the one atomic
is an integer maximum (the non-finite flag). The launch functions overwrite caller-allocated outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _count_kernel(a_ptr, row_len_ptr, row_sum_ptr, bad_ptr, cols, lda, k, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    row = a_ptr + i.to(tl.int64) * lda
    nz = tl.zeros((BLOCK,), dtype=tl.int64)
    s = tl.zeros((BLOCK,), dtype=tl.float64)
    for j0 in range(0, cols, BLOCK):
        offs = j0 + tl.arange(0, BLOCK)
        v = tl.load(row + offs, mask=offs < cols, other=0.0)
        nz += (v != 0.0).to(tl.int64)
        s += tl.abs(v).to(tl.float64)
    nnz = tl.sum(nz, axis=0)
    total = tl.sum(s, axis=0)
    finite = (total == total) & (total < float("inf"))
    tl.atomic_max(bad_ptr, (finite == 0).to(tl.int32))
    keep = tl.where(k < 0, nnz, tl.minimum(nnz, k))
    tl.store(row_len_ptr + i, keep)
    tl.store(row_sum_ptr + i, total.to(tl.float32))


@triton.jit
def _count_at_least(row, cols, cand, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), dtype=tl.int64)
    for j0 in range(0, cols, BLOCK):
        offs = j0 + tl.arange(0, BLOCK)
        v = tl.load(row + offs, mask=offs < cols, other=0.0)
        u = tl.abs(v).to(tl.int32, bitcast=True)
        acc += ((u >= cand) & (u != 0)).to(tl.int64)
    return tl.sum(acc, axis=0)


@triton.jit
def _fill_kernel(a_ptr, crow_ptr, col_ptr, val_ptr, cols, lda, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    row = a_ptr + i.to(tl.int64) * lda
    start = tl.load(crow_ptr + i)
    want = tl.load(crow_ptr + i + 1) - start
    if want > 0:
        nnz = _count_at_least(row, cols, 1, BLOCK)
        # Largest pattern T with count(|a| >= T) >= want (patterns of finite |a| are below 2^31):
        # the want-th largest |a|. Skipped when the row keeps every non-zero.
        thr = tl.zeros((), dtype=tl.int32)
        if want < nnz:
            for q in range(0, 31):
                cand = thr | (1 << (30 - q))
                if _count_at_least(row, cols, cand, BLOCK) >= want:
                    thr = cand
        need_eq = want - _count_at_least(row, cols, thr + 1, BLOCK)
        keep_all = (want >= nnz).to(tl.int32)
        carry_keep = tl.zeros((), dtype=tl.int64)
        carry_eq = tl.zeros((), dtype=tl.int64)
        for j0 in range(0, cols, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            ok = offs < cols
            v = tl.load(row + offs, mask=ok, other=0.0)
            u = tl.abs(v).to(tl.int32, bitcast=True)
            eq = (ok & (u == thr)).to(tl.int64)
            eq_rank = carry_eq + tl.cumsum(eq, axis=0) - eq
            # Broadcast the row flag first: the interpreter mistypes scalar & tensor.
            every = (offs * 0 + keep_all) != 0
            keep = ok & (u != 0) & (every | (u > thr) | ((eq != 0) & (eq_rank < need_eq)))
            k64 = keep.to(tl.int64)
            pos = carry_keep + tl.cumsum(k64, axis=0) - k64
            tl.store(col_ptr + start + pos, offs.to(tl.int64), mask=keep)
            tl.store(val_ptr + start + pos, v, mask=keep)
            carry_keep += tl.sum(k64, axis=0)
            carry_eq += tl.sum(eq, axis=0)


def _block(cols: int) -> int:
    return min(1024, triton.next_power_of_2(max(cols, 16)))


def topk_count(a: torch.Tensor, k: int, row_len: torch.Tensor, row_abs_sum: torch.Tensor, flags: torch.Tensor) -> None:
    """Kept edges per row (min(k, nnz); k < 0 keeps all) into ``row_len`` (int64), |A| row sums into
    ``row_abs_sum`` (float32), and ``flags[0]`` (int32, zeroed by the caller) set to 1 when a row
    is non-finite."""
    rows, cols = a.shape
    if rows:
        _count_kernel[(rows,)](a, row_len, row_abs_sum, flags, cols, a.stride(0), k, BLOCK=_block(cols))


def topk_fill(a: torch.Tensor, crow: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor) -> None:
    """Fill the CSR rows counted by ``topk_count`` (the row lengths in ``crow`` encode k)."""
    rows, cols = a.shape
    if rows and col_indices.numel():
        _fill_kernel[(rows,)](a, crow, col_indices, values, cols, a.stride(0), BLOCK=_block(cols))
