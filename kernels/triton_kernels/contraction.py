"""Triton contraction: a grouped GEMM over positions on tensor cores, accumulated in fp32.

Program (tile, batch block) computes one (BLOCK_S x BLOCK_B) block of
``out[rows[s], b] += sum_d vectors[s, d] * grads[b, pos, d]`` for the vectors of one plan tile,
which all share the position ``pos``. Grads are read in place through their strides.

fp16/bf16 inputs use their own MMA. fp32 inputs use three TF32 products (3xTF32): each operand x
is split into ``hi`` (x with the low 13 mantissa bits cleared, exact in TF32) and ``lo = x - hi``
(exact in fp32), and ``hi*hi + hi*lo + lo*hi`` is accumulated in fp32. The dropped ``lo*lo`` and
the TF32 rounding of ``lo`` are each below 2^-20 of a product, so the result keeps the 1e-5
agreement of an fp32 dot, at tensor-core rate.
"""

from __future__ import annotations

import triton
import triton.language as tl

# TF32 keeps 10 of fp32's 23 mantissa bits: this mask clears the other 13 (0xFFFFE000 as int32).
TF32_HI_MASK = tl.constexpr(-8192)


@triton.jit
def _split_tf32(x):
    hi = (x.to(tl.int32, bitcast=True) & TF32_HI_MASK).to(tl.float32, bitcast=True)
    return hi, x - hi


# B and stride_or (the batch size, for circuit-tracer's (rows, batch) buffer) change for the last,
# partial batch of a run; specialising on them would compile the kernel again for that one batch.
@triton.jit(do_not_specialize=["B", "stride_or"])
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
    SPLIT_TF32: tl.constexpr,
    EVEN_D: tl.constexpr,
    WIDE: tl.constexpr,
):
    tile = tl.program_id(0)
    bblock = tl.program_id(1)
    pos = tl.load(tile_pos_ptr + tile)
    s_start = tl.load(tile_start_ptr + tile)
    s_end = tl.load(tile_end_ptr + tile)

    # The plan validated every index; these guards keep a corrupted plan from reading or writing
    # out of bounds (its tile then contributes nothing), as in the CUDA kernel.
    tile_ok = (pos >= 0) & (pos < P) & (s_start >= 0) & (s_end <= S)
    s_start = tl.where(tile_ok, s_start, 0)
    pos = tl.where(tile_ok, pos, 0)
    ar_s = tl.arange(0, BLOCK_S)
    ar_b = tl.arange(0, BLOCK_B)
    ar_d = tl.arange(0, BLOCK_D)
    mask_s = ar_s < tl.where(tile_ok, s_end - s_start, 0)
    b0 = bblock * BLOCK_B
    mask_b = ar_b < B - b0

    # 64-bit scalar bases (B * P * D passes 2^31 on long prompts) and 32-bit offsets within the
    # tile: 64x64 tensors of 64-bit pointers took 255 registers and spilled. The launcher sets WIDE
    # when an offset within one tile could pass 2^31.
    v_base = vectors_ptr + s_start.to(tl.int64) * stride_vs
    g_base = grads_ptr + pos.to(tl.int64) * stride_gp + b0.to(tl.int64) * stride_gb
    if WIDE:
        v_off = ar_s.to(tl.int64)[:, None] * stride_vs + ar_d[None, :]
        g_off = ar_b.to(tl.int64)[None, :] * stride_gb + ar_d[:, None]
    else:
        v_off = ar_s[:, None] * stride_vs + ar_d[None, :]
        g_off = ar_b[None, :] * stride_gb + ar_d[:, None]

    acc = tl.zeros((BLOCK_S, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        if EVEN_D:
            v = tl.load(v_base + v_off, mask=mask_s[:, None], other=0.0)
            g = tl.load(g_base + g_off, mask=mask_b[None, :], other=0.0)
        else:
            mask_d = ar_d < D - d0
            v = tl.load(v_base + v_off, mask=mask_s[:, None] & mask_d[None, :], other=0.0)
            g = tl.load(g_base + g_off, mask=mask_d[:, None] & mask_b[None, :], other=0.0)
        if SPLIT_TF32:
            v_hi, v_lo = _split_tf32(v)
            g_hi, g_lo = _split_tf32(g)
            # Small terms first, so that they are not lost against the large one.
            acc = tl.dot(v_lo, g_hi, acc, input_precision="tf32")
            acc = tl.dot(v_hi, g_lo, acc, input_precision="tf32")
            acc = tl.dot(v_hi, g_hi, acc, input_precision="tf32")
        else:
            acc = tl.dot(v, g, acc)
        v_base += BLOCK_D
        g_base += BLOCK_D

    offs_s = s_start + ar_s
    rows = tl.load(rows_ptr + offs_s, mask=mask_s, other=0)
    mask = (mask_s & (rows >= 0) & (rows < R))[:, None] & mask_b[None, :]
    dst = out_ptr + rows.to(tl.int64)[:, None] * stride_or + (b0 + ar_b).to(tl.int64)[None, :] * stride_ob
    if ATOMIC:
        tl.atomic_add(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        prev = tl.load(dst, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst, (prev + acc).to(out_ptr.dtype.element_ty), mask=mask)


def tile_height(interpret: bool) -> int:
    """BLOCK_S, the vectors of one program: the height the plan cuts its tiles to for this kernel.
    Small blocks keep the CPU interpreter quick; on a GPU, 64 rows feed the tensor cores."""
    return 32 if interpret else 64


def config(dtype_itemsize: int, interpret: bool) -> dict:
    """Tile sizes and launch options. On a GPU fp32 (three products per step, twice the bytes) takes
    a shallower D step than half precision, so that its staged operands fit in shared memory."""
    if interpret:
        return {"BLOCK_S": tile_height(True), "BLOCK_B": 32, "BLOCK_D": 32, "num_warps": 4, "num_stages": 1}
    block_d = 32 if dtype_itemsize == 4 else 64
    return {"BLOCK_S": tile_height(False), "BLOCK_B": 64, "BLOCK_D": block_d, "num_warps": 4, "num_stages": 3}


def contract(grads, vectors, rows, tile_pos, tile_start, tile_end, out, stride_or, stride_ob, *, atomic, interpret,
             n_out_rows=None):
    """Launch over the plan's tiles, cut to at most ``tile_height(interpret)`` vectors each; all
    index tensors are int32 on the tensors' device. ``atomic``: rows may repeat within the launch
    (float atomics, whose order is the programs' scheduling order); without it every out element
    is written by one program. ``n_out_rows`` (out's rows, R) bounds the rows written; None means
    every plan row fits."""
    B, P, D = grads.shape
    n_tiles = tile_pos.numel()
    if n_tiles == 0 or B == 0:
        return
    cfg = config(vectors.dtype.itemsize, interpret)
    block_s, block_b, block_d = cfg["BLOCK_S"], cfg["BLOCK_B"], cfg["BLOCK_D"]
    d_span = triton.cdiv(D, block_d) * block_d
    wide = max(block_s * vectors.stride(0), block_b * grads.stride(0)) + d_span >= 2**31
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
        SPLIT_TF32=vectors.dtype.itemsize == 4,
        EVEN_D=D % block_d == 0,
        WIDE=bool(wide),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
