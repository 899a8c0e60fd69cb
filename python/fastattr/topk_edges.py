"""Sparse graphs: the k strongest incoming edges of every node, as CSR.

A dense attribution graph over 100k nodes does not fit in memory (40 GB in float32), but most of
its influence flows through a few strong edges per node. :func:`topk_edges` keeps, for every row
(target), the k entries of largest |weight| and records the exact |A| row sum of the FULL row, so
that normalising the sparse graph (influence, pruning) divides by the same row sums as the dense
one: with k >= the number of non-zeros per row, every sparse computation equals the dense one.

Ties in |weight| are broken by the lower column index (deterministic on every backend); zeros are
never stored, so rows with fewer than k non-zeros keep all of them; within a row the kept edges are
sorted by column.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from fastattr import _backends, _checks, _device, _ext

logger = logging.getLogger("fastattr")


@dataclass
class SparseEdges:
    """A CSR graph: row i lists the sources j of target i with weights A[i, j].

    crow_indices: int64 (N + 1,); col_indices: int64 (nnz,); values: float32 (nnz,) signed weights;
    row_abs_sum: float32 (N,) sum of |A[i, :]| over the FULL dense row (not only stored entries);
    shape: (N, M).
    """

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    row_abs_sum: torch.Tensor
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        n, m = self.shape
        _checks.check_tensor(self.crow_indices, "crow_indices", ndim=1, dtypes=(torch.int64,))
        _checks.check_shape(self.crow_indices, "crow_indices", (n + 1,))
        dev = self.crow_indices.device
        _checks.check_tensor(self.col_indices, "col_indices", ndim=1, dtypes=(torch.int64,), device=dev)
        _checks.check_tensor(self.values, "values", ndim=1, device=dev)
        _checks.check_tensor(self.row_abs_sum, "row_abs_sum", ndim=1, device=dev)
        _checks.check_shape(self.row_abs_sum, "row_abs_sum", (n,))
        if self.col_indices.numel() != self.values.numel():
            raise ValueError(
                f"values: expected {self.col_indices.numel()} entries (one per column index), got {self.values.numel()}"
            )

    def validate(self, name: str) -> None:
        """Check what a kernel will index with, O(nnz): row pointers, column range, row sums.

        Construction checks shapes only (it runs on every internal result); user-supplied graphs
        are validated with this before use."""
        n, m = self.shape
        nnz = self.col_indices.numel()
        crow = self.crow_indices
        first, last = int(crow[0]), int(crow[-1])
        if first != 0 or last != nnz:
            raise ValueError(
                f"{name}.crow_indices: expected row pointers from 0 to {nnz} (the number of column indices), "
                f"got {first} to {last}"
            )
        if n:
            step = crow[1:] - crow[:-1]
            if bool((step < 0).any()):
                i = int(torch.nonzero(step < 0)[0])
                raise ValueError(
                    f"{name}.crow_indices: expected non-decreasing row pointers, got {int(crow[i])} then "
                    f"{int(crow[i + 1])} at rows {i} and {i + 1}"
                )
        _checks.check_index_range(self.col_indices, f"{name}.col_indices", m)
        for field, t in (("values", self.values), ("row_abs_sum", self.row_abs_sum)):
            if not t.is_floating_point():
                raise TypeError(f"{name}.{field}: expected a floating-point tensor, got {str(t.dtype).replace('torch.', '')}")
        _checks.check_finite(self.values, f"{name}.values")
        _checks.check_finite(self.row_abs_sum, f"{name}.row_abs_sum")
        if n and bool((self.row_abs_sum < 0).any()):
            i = int(torch.nonzero(self.row_abs_sum < 0)[0])
            raise ValueError(
                f"{name}.row_abs_sum: expected non-negative sums of |A| over each row, got {float(self.row_abs_sum[i])} "
                f"at row {i}"
            )

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def row_indices(self) -> torch.Tensor:
        """The row of every stored entry (int64, nnz)."""
        counts = self.crow_indices[1:] - self.crow_indices[:-1]
        return torch.repeat_interleave(torch.arange(self.shape[0], device=self.device), counts)

    def to(self, device) -> SparseEdges:
        return SparseEdges(
            self.crow_indices.to(device), self.col_indices.to(device), self.values.to(device),
            self.row_abs_sum.to(device), self.shape,
        )

    def to_dense(self) -> torch.Tensor:
        """The stored entries as a dense (N, M) matrix (unstored entries are zero)."""
        out = torch.zeros(self.shape, dtype=self.values.dtype, device=self.device)
        out[self.row_indices(), self.col_indices] = self.values
        return out

    def to_torch_sparse(self) -> torch.Tensor:
        """A ``torch.sparse_csr_tensor`` view of the stored entries (row_abs_sum is not carried)."""
        with warnings.catch_warnings():  # torch flags its CSR support as beta on every construction
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                self.crow_indices, self.col_indices, self.values, self.shape, check_invariants=False
            )

    @staticmethod
    def from_torch_sparse(t: torch.Tensor, row_abs_sum: torch.Tensor | None = None) -> SparseEdges:
        """From a torch sparse CSR (or COO) matrix; row sums default to those of the stored entries."""
        if t.layout == torch.sparse_coo:
            t = t.coalesce().to_sparse_csr()
        if t.layout != torch.sparse_csr:
            raise TypeError(f"t: expected a sparse CSR or COO tensor, got layout {t.layout}")
        crow = t.crow_indices().to(torch.int64)
        col = t.col_indices().to(torch.int64)
        vals = t.values()
        if row_abs_sum is None:
            rows = torch.repeat_interleave(torch.arange(t.shape[0], device=vals.device), crow[1:] - crow[:-1])
            row_abs_sum = torch.zeros(t.shape[0], dtype=torch.float64, device=vals.device)
            row_abs_sum.index_add_(0, rows, vals.abs().double())
            row_abs_sum = row_abs_sum.float()
        return SparseEdges(crow, col, vals, row_abs_sum, tuple(t.shape))

    @staticmethod
    def from_dense(a: torch.Tensor) -> SparseEdges:
        """Every non-zero of a dense matrix (same as topk_edges(a, None))."""
        return topk_edges(a, None)


def as_sparse_edges(x) -> SparseEdges | None:
    """``x`` as SparseEdges if it is sparse (SparseEdges or a torch sparse tensor), else None."""
    if isinstance(x, SparseEdges):
        return x
    if isinstance(x, torch.Tensor) and x.layout in (torch.sparse_csr, torch.sparse_coo):
        return SparseEdges.from_torch_sparse(x)
    return None


# ------------------------------------------------------------------------------------------------


def _check_adjacency(adjacency, k) -> int | None:
    _checks.check_tensor(adjacency, "adjacency", ndim=2)
    if not adjacency.is_floating_point():
        raise TypeError(f"adjacency: expected a floating-point tensor, got {str(adjacency.dtype).replace('torch.', '')}")
    if k is not None:
        k = _checks.check_number(k, "k", integer=True, expected="an int or None")  # numpy integers pass
        if k < 0:
            raise ValueError(f"k: expected a non-negative number of edges per row, got {k}")
    return k


def _row_major(a: torch.Tensor) -> torch.Tensor:
    return _checks.row_major(a, "adjacency")


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


def _topk_cpu(a: torch.Tensor, k: int | None) -> SparseEdges:
    a = _row_major(a)
    n, m = a.shape
    kk = -1 if k is None else k
    row_len = torch.empty(n, dtype=torch.int64)
    row_abs_sum = torch.empty(n, dtype=torch.float32)
    bad = _ext.ext.topk_count_cpu(
        a.data_ptr(), _ext.dtype_code(a), n, m, a.stride(0), kk, row_len.data_ptr(), row_abs_sum.data_ptr()
    )
    if bad:
        _checks.check_finite(a, "adjacency")
    crow = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(row_len, 0, out=crow[1:])
    nnz = int(crow[-1])
    col = torch.empty(nnz, dtype=torch.int64)
    val = torch.empty(nnz, dtype=torch.float32)
    _ext.ext.topk_fill_cpu(
        a.data_ptr(), _ext.dtype_code(a), n, m, a.stride(0), kk, crow.data_ptr(), nnz, col.data_ptr(), val.data_ptr()
    )
    return SparseEdges(crow, col, val, row_abs_sum, (n, m))


def _topk_cuda(a: torch.Tensor, k: int | None) -> SparseEdges:
    a = _row_major(a)
    n, m = a.shape
    kk = -1 if k is None else k
    stream = _ext.cuda_stream(a.device)
    row_len = torch.empty(n, dtype=torch.int64, device=a.device)
    row_abs_sum = torch.empty(n, dtype=torch.float32, device=a.device)
    flags = torch.zeros(1, dtype=torch.int32, device=a.device)
    _ext.ext.topk_count_cuda(
        a.data_ptr(), _ext.dtype_code(a), n, m, a.stride(0), kk, row_len.data_ptr(), row_abs_sum.data_ptr(),
        flags.data_ptr(), stream,
    )
    if int(flags.item()):
        _checks.check_finite(a, "adjacency")
    crow = torch.zeros(n + 1, dtype=torch.int64, device=a.device)
    torch.cumsum(row_len, 0, out=crow[1:])
    nnz = int(crow[-1].item())
    col = torch.empty(nnz, dtype=torch.int64, device=a.device)
    val = torch.empty(nnz, dtype=torch.float32, device=a.device)
    _ext.ext.topk_fill_cuda(
        a.data_ptr(), _ext.dtype_code(a), n, m, a.stride(0), kk, crow.data_ptr(), nnz, col.data_ptr(),
        val.data_ptr(), stream,
    )
    return SparseEdges(crow, col, val, row_abs_sum, (n, m))


def _topk_triton(a: torch.Tensor, k: int | None) -> SparseEdges:
    from fastattr.triton_kernels import topk_edges as tk

    a = _row_major(a)
    n, m = a.shape
    row_len, row_abs_sum, bad = tk.topk_count(a, -1 if k is None else k)
    if bad:
        _checks.check_finite(a, "adjacency")
    crow = torch.zeros(n + 1, dtype=torch.int64, device=a.device)
    torch.cumsum(row_len, 0, out=crow[1:])
    nnz = int(crow[-1].item())
    col, val = tk.topk_fill(a, -1 if k is None else k, crow, nnz)
    return SparseEdges(crow, col, val, row_abs_sum, (n, m))


@_device.guard("adjacency")
def topk_edges(adjacency: torch.Tensor, k: int | None, *, backend: str | None = None) -> SparseEdges:
    """The k strongest incoming edges (by |weight|) of every row of a dense adjacency matrix.

    ``k=None`` keeps every non-zero. Ties go to the lower column; rows store columns in increasing
    order; ``row_abs_sum`` is the exact |A| sum of the full dense row.
    """
    k = _check_adjacency(adjacency, k)
    _, impl = _backends.select(
        "topk_edges",
        adjacency.device,
        backend,
        {"cuda": _topk_cuda, "triton": _topk_triton, "cpu": _topk_cpu, "torch": _topk_torch},
        dtype=adjacency.dtype,
        dtype_arg="adjacency",
    )
    return impl(adjacency, k)


_backends.declare_dtypes("topk_edges", ("cuda", "triton", "cpu"), (torch.float32,))
