"""The CSR edge type every graph op accepts: sparse graphs with their full-row |A| sums.

A sparse graph keeps a subset of each row's edges, but influence and pruning normalise each row by
the sum of |A| over the FULL dense row. :class:`SparseEdges` carries that sum beside the stored
entries, so that a graph which keeps every non-zero computes exactly what the dense one does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from fastattr._runtime import checks as _checks


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
        """Every non-zero of a dense matrix: what ``topk_edges(a, None)`` returns, built here in
        torch (topk_edges builds SparseEdges, so this module does not import it)."""
        _checks.check_tensor(a, "a", ndim=2)
        if not a.is_floating_point():
            raise TypeError(f"a: expected a floating-point tensor, got {str(a.dtype).replace('torch.', '')}")
        _checks.check_finite(a, "a")
        n, m = a.shape
        rows, cols = torch.nonzero(a, as_tuple=True)  # row-major: CSR order
        crow = torch.zeros(n + 1, dtype=torch.int64, device=a.device)
        torch.cumsum(torch.bincount(rows, minlength=n), 0, out=crow[1:])
        return SparseEdges(crow, cols, a[rows, cols].float(), a.abs().double().sum(1).float(), (n, m))


def as_sparse_edges(x) -> SparseEdges | None:
    """``x`` as SparseEdges if it is sparse (SparseEdges or a torch sparse tensor), else None."""
    if isinstance(x, SparseEdges):
        return x
    if isinstance(x, torch.Tensor) and x.layout in (torch.sparse_csr, torch.sparse_coo):
        return SparseEdges.from_torch_sparse(x)
    return None
