"""Triton kernels of the influence power series: |A| row sums and the fused |A|-matvec.

``matvec`` computes out_j = sum_i y_i * |A_ij| (or A_ij) over 2-D tiles, with y already carrying
1 / rowsum_i and the node mask, so the row-normalised matrix is never built. Tiles whose y rows are
all zero (not yet reached, or pruned) are skipped. Accumulation is in float64. The row chunks of
one column block meet in float64 atomics, whose order (and so the last bits of the sum) varies
from run to run; ``deterministic=True`` writes each chunk's column sums to a scratch block instead
and adds them in chunk order in a second kernel (``sum_partials``), bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_abs_sum_kernel(a_ptr, mask_ptr, out_ptr, m, lda, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    row = a_ptr + i.to(tl.int64) * lda
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for j0 in range(0, m, BLOCK):
        offs = j0 + tl.arange(0, BLOCK)
        ok = offs < m
        v = tl.abs(tl.load(row + offs, mask=ok, other=0.0))
        if HAS_MASK:
            cm = tl.load(mask_ptr + offs, mask=ok, other=0)
            v = tl.where(cm != 0, v, 0.0)
        acc += v.to(tl.float64)
    total = tl.sum(acc, axis=0)
    if HAS_MASK:
        keep = tl.load(mask_ptr + i)
        total = tl.where(keep != 0, total, 0.0)
    tl.store(out_ptr + i, total)


@triton.jit
def _matvec_kernel(
    a_ptr, y_ptr, mask_ptr, out_ptr, n, m, lda, rows_per_prog,
    HAS_MASK: tl.constexpr, ABSOLUTE: tl.constexpr, PARTIALS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < m
    if HAS_MASK:
        col_ok = col_ok & (tl.load(mask_ptr + cols, mask=cols < m, other=0) != 0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float64)
    r_start = pid_r * rows_per_prog
    r_end = tl.minimum(r_start + rows_per_prog, n)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < r_end
        y = tl.load(y_ptr + rows, mask=row_ok, other=0.0)
        if tl.max(tl.abs(y), axis=0) != 0.0:
            ptrs = a_ptr + rows.to(tl.int64)[:, None] * lda + cols[None, :]
            tile = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            if ABSOLUTE:
                tile = tl.abs(tile)
            acc += tl.sum(tile.to(tl.float64) * y[:, None], axis=0)
    if PARTIALS:
        # Row pid_r of the (row chunks, m) scratch, every column (0 where masked).
        tl.store(out_ptr + pid_r.to(tl.int64) * m + cols, acc, mask=cols < m)
    else:
        tl.atomic_add(out_ptr + cols, acc, mask=col_ok)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, n_parts, m, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < m
    ptrs = part_ptr + cols
    acc = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for _ in range(0, n_parts):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += m
    tl.store(out_ptr + cols, acc, mask=ok)


def row_abs_sum(A: torch.Tensor, mask_u8: torch.Tensor | None) -> torch.Tensor:
    """sum_j |A_ij| per row in float64 (with a node mask: kept rows and columns only)."""
    n, m = A.shape
    out = torch.empty(n, dtype=torch.float64, device=A.device)
    if n == 0:
        return out
    block = min(1024, triton.next_power_of_2(max(m, 16)))
    _row_abs_sum_kernel[(n,)](
        A, mask_u8 if mask_u8 is not None else A, out, m, A.stride(0),
        HAS_MASK=mask_u8 is not None, BLOCK=block,
    )
    return out


def matvec(
    A: torch.Tensor, y: torch.Tensor, mask_u8: torch.Tensor | None, absolute: bool, *, deterministic: bool = False
) -> torch.Tensor:
    """out_j = sum_i y_i * |A_ij| (or A_ij), masked columns zero; each term rounded to float32.
    ``deterministic``: the row chunks are added in a fixed order (see the module docstring)."""
    n, m = A.shape
    if n == 0 or m == 0:
        return torch.zeros(m, dtype=torch.float32, device=A.device)
    y = y.to(torch.float64).contiguous()
    block_n = min(256, triton.next_power_of_2(max(m, 16)))
    block_r = 32
    # About 4096 programs; the deterministic scratch then holds at most ~4096 * block_n doubles.
    rows_per_prog = max(block_r, triton.cdiv(n, max(1, 4096 // triton.cdiv(m, block_n))))
    rows_per_prog = triton.cdiv(rows_per_prog, block_r) * block_r
    grid = (triton.cdiv(m, block_n), triton.cdiv(n, rows_per_prog))
    if deterministic:
        target = torch.empty((grid[1], m), dtype=torch.float64, device=A.device)
    else:
        target = torch.zeros(m, dtype=torch.float64, device=A.device)
    _matvec_kernel[grid](
        A, y, mask_u8 if mask_u8 is not None else A, target, n, m, A.stride(0), rows_per_prog,
        HAS_MASK=mask_u8 is not None, ABSOLUTE=bool(absolute), PARTIALS=bool(deterministic),
        BLOCK_R=block_r, BLOCK_N=block_n,
    )
    out = sum_partials(target) if deterministic else target
    return out.float()


def sum_partials(parts: torch.Tensor) -> torch.Tensor:
    """out_j = sum_p parts[p, j], added in the order p = 0, 1, ... (float64, (m,))."""
    n_parts, m = parts.shape
    out = torch.empty(m, dtype=torch.float64, device=parts.device)
    if m == 0:
        return out
    block = min(1024, triton.next_power_of_2(max(m, 16)))
    _sum_partials_kernel[(triton.cdiv(m, block),)](parts, out, n_parts, m, BLOCK_N=block)
    return out
