"""No hidden N^2 temporaries: check_finite works in bounded blocks, and a column-major adjacency
is copied to row-major only below a size limit, above it refused with an error saying so."""

from __future__ import annotations

import pytest
import torch

import fastattr
from fastattr._runtime import checks as _checks

from helpers import logit_weights, random_graph


def _unchunked(t: torch.Tensor) -> str:
    return _checks.describe_nonfinite(t, ~torch.isfinite(t))


@pytest.mark.parametrize("shape", [(37, 23), (1000,), (5, 4, 3)])
def test_check_finite_in_blocks_reports_like_one_pass(monkeypatch, shape):
    monkeypatch.setattr(_checks, "FINITE_CHUNK", 50)  # many blocks, some of one row
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(*shape, generator=gen)
    _checks.check_finite(t, "t")
    flat = t.view(-1)
    for idx in (flat.numel() - 1, flat.numel() // 2, 0):
        flat[idx] = float("nan") if idx % 2 else float("inf")
        with pytest.raises(ValueError) as err:
            _checks.check_finite(t, "t")
        assert str(err.value) == f"t: expected finite values, got {_unchunked(t)}"
    assert "first: inf at index 0" in str(err.value) or "at index (0" in str(err.value)


def test_check_finite_blocks_bound_the_temporary(monkeypatch):
    seen = []
    real = torch.isfinite
    monkeypatch.setattr(_checks, "FINITE_CHUNK", 1000)
    monkeypatch.setattr(torch, "isfinite", lambda x: seen.append(x.numel()) or real(x))
    _checks.check_finite(torch.zeros(300, 40), "A")
    assert seen and max(seen) <= 1000


def test_transposed_adjacency_copied_below_the_limit_refused_above(monkeypatch):
    graph = random_graph(n_layers=3, n_pos=4, feats_per=4, seed=3)
    A = graph.adjacency_matrix
    w = logit_weights(graph)
    At = A.T.contiguous().T  # the same values, column-major
    want = fastattr.compute_node_influence(A, w, backend="cpu")
    assert torch.equal(fastattr.compute_node_influence(At, w, backend="cpu"), want)
    monkeypatch.setattr(_checks, "ROW_MAJOR_COPY_LIMIT", A.numel() - 1)
    with pytest.raises(ValueError, match=r"expected a row-major matrix .* got strides \(1, \d+\).*\.contiguous\(\)"):
        fastattr.compute_node_influence(At, w, backend="cpu")
    graph.adjacency_matrix = At
    with pytest.raises(ValueError, match=r"graph\.adjacency_matrix: expected a row-major matrix"):
        fastattr.prune_graph(graph, backend="cpu")
    assert torch.equal(fastattr.compute_node_influence(At.contiguous(), w, backend="cpu"), want)
