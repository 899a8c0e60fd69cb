"""Triton contraction: a grouped GEMM over positions with fp32 accumulation.

Program (tile, batch block) computes one (BLOCK_S x BLOCK_B) block of
``out[rows[s], b] += sum_d vectors[s, d] * grads[b, pos, d]`` for the vectors of one plan tile,
which all share the position ``pos``. Grads are read in place through their strides.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _contract_kernel(
    grads_ptr,
    vectors_ptr,
    rows_ptr,
    tile_pos_ptr,
    tile_start_ptr,
    tile_end_ptr,
    out_ptr,
    B,
    P,
    D,
    S,
    R,
    stride_gb,
    stride_gp,
    stride_vs,
    stride_or,
    stride_ob,
    BLOCK_S: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ATOMIC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    bblock = tl.program_id(1)
    pos = tl.load(tile_pos_ptr + tile).to(tl.int64)
    s_start = tl.load(tile_start_ptr + tile)
    s_end = tl.load(tile_end_ptr + tile)

    # The plan validated every index; these guards keep a corrupted plan from reading or writing
    # out of bounds (its tile then contributes nothing), as in the CUDA kernel.
    tile_ok = (pos >= 0) & (pos < P) & (s_start >= 0) & (s_end <= S)
    offs_s = s_start + tl.arange(0, BLOCK_S)
    mask_s = offs_s < tl.where(tile_ok, s_end, s_start)
    offs_b = bblock * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < tl.where(tile_ok, B, 0)
    # int64 offsets: B * P * D passes 2^31 on long prompts.
    v_rows = vectors_ptr + offs_s.to(tl.int64)[:, None] * stride_vs
    g_cols = grads_ptr + pos * stride_gp + offs_b.to(tl.int64)[None, :] * stride_gb

    acc = tl.zeros((BLOCK_S, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        v = tl.load(v_rows + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        g = tl.load(g_cols + offs_d[:, None], mask=mask_d[:, None] & mask_b[None, :], other=0.0)
        acc = tl.dot(v, g, acc, input_precision=INPUT_PRECISION)

    rows = tl.load(rows_ptr + offs_s, mask=mask_s, other=0).to(tl.int64)
    dst = out_ptr + rows[:, None] * stride_or + offs_b.to(tl.int64)[None, :] * stride_ob
    mask = (mask_s & (rows >= 0) & (rows < R))[:, None] & mask_b[None, :]
    if ATOMIC:
        tl.atomic_add(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        prev = tl.load(dst, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst, (prev + acc).to(out_ptr.dtype.element_ty), mask=mask)


def contract(grads, vectors, rows, tile_pos, tile_start, tile_end, out, stride_or, stride_ob, *, block_s, atomic, interpret,
             n_out_rows=None):
    """Launch over the plan's tiles; all index tensors are int32 on the tensors' device.
    ``n_out_rows`` (out's rows, R) bounds the rows written; None means every plan row fits."""
    B, P, D = grads.shape
    n_tiles = tile_pos.numel()
    if n_tiles == 0 or B == 0:
        return
    # Small blocks keep the CPU interpreter quick; 64-wide tiles feed tensor cores on a GPU.
    block_b = 32 if interpret else 64
    block_d = 32 if interpret else 64
    precision = "ieee" if vectors.dtype.itemsize == 4 else "tf32"
    grid = (n_tiles, triton.cdiv(B, block_b))
    _contract_kernel[grid](
        grads,
        vectors,
        rows,
        tile_pos,
        tile_start,
        tile_end,
        out,
        B,
        P,
        D,
        vectors.shape[0],
        2**31 - 1 if n_out_rows is None else n_out_rows,
        grads.stride(0),
        grads.stride(1),
        vectors.stride(0),
        stride_or,
        stride_ob,
        BLOCK_S=block_s,
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        ATOMIC=atomic,
        INPUT_PRECISION=precision,
    )
