"""Sparse graphs: the k strongest incoming edges of every node, as CSR.

A dense attribution graph over 100k nodes does not fit in memory (40 GB in float32), but most of
its influence flows through a few strong edges per node. :func:`topk_edges` keeps, for every row
(target), the k entries of largest |weight| and records the exact |A| row sum of the FULL row, so
that normalising the sparse graph (influence, pruning) divides by the same row sums as the dense
one: with k >= the number of non-zeros per row, every sparse computation equals the dense one.

Ties in |weight| are broken by the lower column index (deterministic on every backend); zeros are
never stored, so rows with fewer than k non-zeros keep all of them; within a row the kept edges are
sorted by column.

Every backend is deterministic as it stands, so the op takes no ``deterministic`` flag: the row sums
are fixed-order reductions (a double loop on cpu, block reductions on cuda, ``tl.sum`` on triton) and
the only atomics are integer ones (bucket counts, the non-finite flag), whose result does not depend
on their order.
"""

from __future__ import annotations

import logging

import torch

from fastattr._runtime import backends as _backends
from fastattr._runtime import checks as _checks
from fastattr._runtime import device as _device
from fastattr._runtime import ext as _ext
from fastattr.ops.sparse_edges import SparseEdges

logger = logging.getLogger("fastattr")


def _check_adjacency(adjacency, k) -> int | None:
    _checks.check_tensor(adjacency, "adjacency", ndim=2)
    if not adjacency.is_floating_point():
        raise TypeError(f"adjacency: expected a floating-point tensor, got {str(adjacency.dtype).replace('torch.', '')}")
    if k is not None:
        k = _checks.check_number(k, "k", integer=True, expected="an int or None")  # numpy integers pass
        if k < 0:
            raise ValueError(f"k: expected a non-negative number of edges per row, got {k}")
    return k


TOPK_EDGES = _backends.op("topk_edges")


def _csr_offsets(row_len: torch.Tensor) -> tuple[torch.Tensor, int]:
    crow = torch.zeros(row_len.numel() + 1, dtype=torch.int64, device=row_len.device)
    torch.cumsum(row_len, 0, out=crow[1:])
    return crow, int(crow[-1].item())


@TOPK_EDGES.register("torch")
def _topk_torch(a: torch.Tensor, k: int | None) -> SparseEdges:
    _checks.check_finite(a, "adjacency")
    n, m = a.shape
    absa = a.abs()
    row_abs_sum = absa.double().sum(1).float()
    nnz_row = (a != 0).sum(1)
    keep_row = nnz_row if k is None else nnz_row.clamp(max=k)
    # A stable descending sort keeps equal |weights| in column order: ties go to the lower column.
    order = torch.sort(absa, dim=1, descending=True, stable=True).indices
    rank_ok = torch.arange(m, device=a.device)[None, :] < keep_row[:, None]
    rows = torch.arange(n, device=a.device)[:, None].expand(n, m)[rank_ok]
    cols = order[rank_ok]
    # Sort by (row, column) for CSR.
    key = rows * max(m, 1) + cols
    key = torch.sort(key).values
    rows, cols = key // max(m, 1), key % max(m, 1)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=a.device)
    crow[1:] = torch.cumsum(keep_row, 0)
    return SparseEdges(crow, cols, a[rows, cols].float(), row_abs_sum, (n, m))


@TOPK_EDGES.register("cpu", dtypes=(torch.float32,))
def _topk_cpu(a: torch.Tensor, k: int | None) -> SparseEdges:
    a = _checks.row_major(a, "adjacency")
    n, m = a.shape
    row_len = torch.empty(n, dtype=torch.int64)
    row_abs_sum = torch.empty(n, dtype=torch.float32)
    bad = _ext.ext.topk_count_cpu(
        a=a.data_ptr(), a_dtype=_ext.dtype_code(a), rows=n, cols=m, lda=a.stride(0), k=-1 if k is None else k,
        row_len=row_len.data_ptr(), row_abs_sum=row_abs_sum.data_ptr(),
    )
    if bad:
        _checks.check_finite(a, "adjacency")
    crow, nnz = _csr_offsets(row_len)
    col = torch.empty(nnz, dtype=torch.int64)
    val = torch.empty(nnz, dtype=torch.float32)
    _ext.ext.topk_fill_cpu(
        a=a.data_ptr(), a_dtype=_ext.dtype_code(a), rows=n, cols=m, lda=a.stride(0), crow=crow.data_ptr(), nnz=nnz,
        col_indices=col.data_ptr(), values=val.data_ptr(),
    )
    return SparseEdges(crow, col, val, row_abs_sum, (n, m))


@TOPK_EDGES.register("cuda", dtypes=(torch.float32,))
def _topk_cuda(a: torch.Tensor, k: int | None) -> SparseEdges:
    a = _checks.row_major(a, "adjacency")
    n, m = a.shape
    stream = _ext.cuda_stream(a.device)
    row_len = torch.empty(n, dtype=torch.int64, device=a.device)
    row_abs_sum = torch.empty(n, dtype=torch.float32, device=a.device)
    flags = torch.zeros(1, dtype=torch.int32, device=a.device)
    _ext.ext.topk_count_cuda(
        a=a.data_ptr(), a_dtype=_ext.dtype_code(a), rows=n, cols=m, lda=a.stride(0), k=-1 if k is None else k,
        row_len=row_len.data_ptr(), row_abs_sum=row_abs_sum.data_ptr(), flags=flags.data_ptr(), stream=stream,
    )
    if int(flags.item()):
        _checks.check_finite(a, "adjacency")
    crow, nnz = _csr_offsets(row_len)
    col = torch.empty(nnz, dtype=torch.int64, device=a.device)
    val = torch.empty(nnz, dtype=torch.float32, device=a.device)
    _ext.ext.topk_fill_cuda(
        a=a.data_ptr(), a_dtype=_ext.dtype_code(a), rows=n, cols=m, lda=a.stride(0), crow=crow.data_ptr(), nnz=nnz,
        col_indices=col.data_ptr(), values=val.data_ptr(), stream=stream,
    )
    return SparseEdges(crow, col, val, row_abs_sum, (n, m))


@TOPK_EDGES.register("triton", dtypes=(torch.float32,))
def _topk_triton(a: torch.Tensor, k: int | None) -> SparseEdges:
    from fastattr.triton_kernels import topk_edges as tk

    a = _checks.row_major(a, "adjacency")
    n, m = a.shape
    row_len = torch.empty(n, dtype=torch.int64, device=a.device)
    row_abs_sum = torch.empty(n, dtype=torch.float32, device=a.device)
    flags = torch.zeros(1, dtype=torch.int32, device=a.device)
    tk.topk_count(a, -1 if k is None else k, row_len, row_abs_sum, flags)
    if int(flags.item()):
        _checks.check_finite(a, "adjacency")
    crow, nnz = _csr_offsets(row_len)
    col = torch.empty(nnz, dtype=torch.int64, device=a.device)
    val = torch.empty(nnz, dtype=torch.float32, device=a.device)
    tk.topk_fill(a, crow, col, val)
    return SparseEdges(crow, col, val, row_abs_sum, (n, m))


@_device.guard("adjacency")
def topk_edges(adjacency: torch.Tensor, k: int | None, *, backend: str | None = None) -> SparseEdges:
    """The k strongest incoming edges (by |weight|) of every row of a dense adjacency matrix.

    ``k=None`` keeps every non-zero. Ties go to the lower column; rows store columns in increasing
    order; ``row_abs_sum`` is the exact |A| sum of the full dense row.
    """
    k = _check_adjacency(adjacency, k)
    impl = TOPK_EDGES.select(adjacency.device, backend, dtype=adjacency.dtype, arg="adjacency")
    return impl.fn(adjacency, k)
