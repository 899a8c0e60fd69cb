"""topk_edges: the k strongest incoming edges per row, identical on every backend."""

from __future__ import annotations

import importlib

import pytest
import torch

import fastattr
from fastattr._runtime import ext as _ext

from helpers import backend_device, backend_params, interpreted, random_graph

te = importlib.import_module("fastattr.ops.topk_edges")  # the package re-exports the function under this name


def _brute_force(A: torch.Tensor, k):
    """Per row: non-zeros ranked by (|a| desc, column asc), first k, stored by column."""
    cols, vals = [], []
    crow = [0]
    for i in range(A.shape[0]):
        r = A[i].tolist()
        cand = sorted((j for j in range(len(r)) if r[j] != 0.0), key=lambda j: (-abs(r[j]), j))
        keep = sorted(cand if k is None else cand[:k])
        cols += keep
        vals += [r[j] for j in keep]
        crow.append(len(cols))
    return torch.tensor(crow), torch.tensor(cols, dtype=torch.int64), torch.tensor(vals, dtype=torch.float32)


def _matrix(backend: str, seed: int) -> torch.Tensor:
    kw = {"n_layers": 2, "n_pos": 3, "feats_per": 3} if interpreted(backend) else {"n_layers": 3, "n_pos": 5, "feats_per": 6}
    A = random_graph(seed=seed, **kw).adjacency_matrix
    # Ties: round some weights to a coarse grid so equal |values| occur in a row, with both signs.
    g = torch.Generator().manual_seed(seed)
    tie = torch.rand(A.shape, generator=g) < 0.3
    return torch.where(tie, torch.round(A * 2) / 2, A)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("k", [None, 0, 1, 2, 5, 1000])
def test_matches_brute_force(backend, k):
    A = _matrix(backend, 0)
    crow, col, val = _brute_force(A, k)
    sp = fastattr.topk_edges(A.to(backend_device(backend)), k, backend=backend)
    assert sp.shape == tuple(A.shape)
    assert torch.equal(sp.crow_indices.cpu(), crow)
    assert torch.equal(sp.col_indices.cpu(), col)
    assert torch.equal(sp.values.cpu(), val)
    assert torch.allclose(sp.row_abs_sum.cpu(), A.abs().double().sum(1).float(), rtol=1e-6, atol=0)


def test_ties_go_to_the_lower_column():
    A = torch.tensor([[0.0, -2.0, 2.0, 1.0, -2.0], [1.0, 1.0, 1.0, 1.0, 0.0], [0.0] * 5])
    for backend in ("cpu", "torch"):
        sp = fastattr.topk_edges(A, 2, backend=backend)
        assert sp.crow_indices.tolist() == [0, 2, 4, 4]
        assert sp.col_indices.tolist() == [1, 2, 0, 1]
        assert sp.values.tolist() == [-2.0, 2.0, 1.0, 1.0]


def test_conversions_round_trip():
    A = _matrix("cpu", 1)
    sp = fastattr.topk_edges(A, None)
    assert torch.equal(sp.to_dense(), A)
    assert torch.equal(sp.to_torch_sparse().to_dense(), A)
    back = te.SparseEdges.from_torch_sparse(A.to_sparse_csr())
    assert torch.equal(back.col_indices, sp.col_indices) and torch.equal(back.values, sp.values)
    assert torch.allclose(back.row_abs_sum, sp.row_abs_sum, rtol=1e-6)
    coo = te.SparseEdges.from_torch_sparse(A.to_sparse())
    assert torch.equal(coo.to_dense(), A)
    k2 = fastattr.topk_edges(A, 2)
    assert torch.equal(k2.row_indices(), torch.repeat_interleave(torch.arange(A.shape[0]), k2.crow_indices.diff()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_from_dense_is_topk_edges_without_k(dtype):
    """SparseEdges.from_dense builds in torch what topk_edges(a, None) returns: every non-zero,
    in CSR order, with the full rows' |A| sums."""
    A = _matrix("cpu", 5).to(dtype)
    A[2] = 0.0  # an empty row
    got = te.SparseEdges.from_dense(A)
    want = fastattr.topk_edges(A, None, backend="torch")
    for name in ("crow_indices", "col_indices", "values", "row_abs_sum"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.shape == want.shape
    with pytest.raises(TypeError, match="a: expected a floating-point tensor, got int64"):
        te.SparseEdges.from_dense(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="a: expected finite values"):
        te.SparseEdges.from_dense(torch.tensor([[0.0, float("inf")]]))


def test_errors():
    A = torch.rand(4, 4)
    with pytest.raises(ValueError, match="k: expected a non-negative number of edges per row, got -1"):
        fastattr.topk_edges(A, -1)
    with pytest.raises(TypeError, match="k: expected an int or None, got float"):
        fastattr.topk_edges(A, 2.0)
    with pytest.raises(ValueError, match=r"adjacency: expected a 2-D tensor, got shape \(4,\)"):
        fastattr.topk_edges(torch.rand(4), 2)
    B = A.clone()
    B[1, 2] = float("nan")
    with pytest.raises(ValueError, match="adjacency: expected finite values"):
        fastattr.topk_edges(B, 2, backend="cpu")
    with pytest.raises(ValueError, match="adjacency: expected finite values"):
        fastattr.topk_edges(B, 2, backend="torch")
    with pytest.raises(ValueError, match=r"values: expected 3 entries \(one per column index\), got 2"):
        te.SparseEdges(torch.tensor([0, 3]), torch.tensor([0, 1, 2]), torch.ones(2), torch.ones(1), (1, 3))
    crow = torch.tensor([0, 5, 3], dtype=torch.int64)
    col = torch.empty(3, dtype=torch.int64)
    val = torch.empty(3)
    with pytest.raises(ValueError, match="crow_indices: expected non-decreasing offsets"):
        _ext.ext.topk_fill_cpu(a=A.data_ptr(), a_dtype=0, rows=2, cols=4, lda=4, crow=crow.data_ptr(), nnz=3,
                               col_indices=col.data_ptr(), values=val.data_ptr())


def test_compiled_fill_overwrites_poisoned_outputs():
    A = _matrix("cpu", 2)
    n, m = A.shape
    row_len = torch.full((n,), -5, dtype=torch.int64)
    sums = torch.full((n,), float("nan"))
    assert not _ext.ext.topk_count_cpu(a=A.data_ptr(), a_dtype=0, rows=n, cols=m, lda=m, k=3, row_len=row_len.data_ptr(),
                                       row_abs_sum=sums.data_ptr())
    crow = torch.zeros(n + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(row_len, 0)
    nnz = int(crow[-1])
    col = torch.full((nnz,), -9, dtype=torch.int64)
    val = torch.full((nnz,), float("nan"))
    _ext.ext.topk_fill_cpu(a=A.data_ptr(), a_dtype=0, rows=n, cols=m, lda=m, crow=crow.data_ptr(), nnz=nnz,
                           col_indices=col.data_ptr(), values=val.data_ptr())
    ref_crow, ref_col, ref_val = _brute_force(A, 3)
    assert torch.equal(crow, ref_crow) and torch.equal(col, ref_col) and torch.equal(val, ref_val)
