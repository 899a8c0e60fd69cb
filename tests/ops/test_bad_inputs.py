"""Bad input on every op and backend: a ValueError or TypeError whose message names the argument.

Each row of the table is (op, case, expected exception, argument named in the message, call). The
call takes the backend name; every row runs on every backend available here (the cuda backend
runs the same Python-side checks before any launch). Arguments that circuit-tracer accepts
(numpy scalars) are in the second table and must work.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import fastattr
from fastattr._runtime import checks as _checks

from helpers import backend_device, backend_params

BACKENDS = backend_params()


def _dev(backend):
    return backend_device(backend)


def _contract_args(dev, **over):
    args = {
        "grads": torch.randn(2, 3, 4, device=dev),
        "vectors": torch.randn(3, 4, device=dev),
        "positions": torch.tensor([0, 1, 2], device=dev),
        "rows": torch.tensor([0, 1, 2], device=dev),
        "out": torch.zeros(3, 2, device=dev),
    }
    return args | over


def contract(backend, **over):
    a = _contract_args(_dev(backend), **over)
    layout = a.pop("out_layout", "rb")
    return fastattr.contract(a["grads"], a["vectors"], a["positions"], a["rows"], a["out"], out_layout=layout,
                             backend=backend)  # fmt: skip


def _overlapping(dev):
    buf = torch.zeros(64, device=dev)
    return {"grads": buf[:24].view(2, 3, 4), "out": buf[10:16].view(3, 2)}


def _tampered(backend):
    dev = _dev(backend)
    a = _contract_args(dev)
    plan = fastattr.ContractionPlan(a["vectors"], a["positions"], a["rows"])
    plan.rows[0] = 1000
    return plan(a["grads"], a["out"], backend=backend)


def _chain(dev, n=6, value=1e30):
    A = torch.zeros(n, n, device=dev)
    for i in range(n - 1):
        A[i, i + 1] = value
    w = torch.zeros(n, device=dev)
    w[0] = 1.0
    return A, w


def _dag(dev, n=5):
    return torch.rand(n, n, device=dev).tril(-1)


def _graph(dev, n=6, **over):
    fields = {
        "adjacency_matrix": _dag(dev, n),
        "input_tokens": torch.zeros(2, dtype=torch.long),
        "logit_targets": [0],
        "logit_probabilities": torch.ones(1, device=dev),
        "selected_features": torch.arange(2),
        "cfg": types.SimpleNamespace(n_layers=1),
    }
    return types.SimpleNamespace(**(fields | over))


def _csr(dev, n=4, **over):
    A = _dag(dev, n)
    e = fastattr.topk_edges(A, None, backend="torch")
    fields = {"crow_indices": e.crow_indices, "col_indices": e.col_indices, "values": e.values,
              "row_abs_sum": e.row_abs_sum, "shape": e.shape} | over  # fmt: skip
    return fastattr.SparseEdges(**fields)


def sparse_prune(backend, edges=None, **kw):
    dev = _dev(backend)
    args = {"logit_probabilities": torch.ones(1, device=dev), "n_tokens": 1, "n_features": 1} | kw
    return fastattr.prune_graph_sparse(edges if edges is not None else _csr(dev), 0.8, 0.98, backend=backend, **args)


def _w(dev, n=5, bad=None):
    w = torch.zeros(n, device=dev)
    w[-1] = 1.0
    if bad is not None:
        w[0] = bad
    return w


V, T = ValueError, TypeError
NF = _checks.NonFiniteInfluenceError
E0 = _checks.EmptyGraphError
META = torch.device("meta")

# (op, case, error, argument, call(backend))
CASES = [
    # ---------------------------------------------------------------- contract
    ("contract", "grads not a tensor", T, "grads", lambda b: contract(b, grads=[[1.0]])),
    ("contract", "grads 2-D", V, "grads", lambda b: contract(b, grads=torch.randn(2, 3, device=_dev(b)))),
    ("contract", "grads int", T, "grads", lambda b: contract(b, grads=torch.ones(2, 3, 4, dtype=torch.int32, device=_dev(b)))),
    ("contract", "grads dtype differs", T, "grads", lambda b: contract(b, grads=torch.randn(2, 3, 4, device=_dev(b)).half())),
    ("contract", "grads D differs", V, "grads", lambda b: contract(b, grads=torch.randn(2, 3, 5, device=_dev(b)))),
    ("contract", "grads too few positions", V, "grads", lambda b: contract(b, grads=torch.randn(2, 2, 4, device=_dev(b)))),
    ("contract", "grads meta", V, "grads", lambda b: contract(b, grads=torch.randn(2, 3, 4, device=META))),
    ("contract", "vectors strided", V, "vectors", lambda b: contract(b, vectors=torch.randn(4, 3, device=_dev(b)).T)),
    ("contract", "vectors meta", V, "vectors", lambda b: contract(b, vectors=torch.randn(3, 4, device=META))),
    ("contract", "positions float", T, "positions", lambda b: contract(b, positions=torch.zeros(3, device=_dev(b)))),
    ("contract", "positions negative", V, "positions", lambda b: contract(b, positions=torch.tensor([0, -1, 2], device=_dev(b)))),
    ("contract", "positions wrong length", V, "positions", lambda b: contract(b, positions=torch.tensor([0, 1], device=_dev(b)))),
    ("contract", "rows negative", V, "rows", lambda b: contract(b, rows=torch.tensor([0, -5, 2], device=_dev(b)))),
    ("contract", "rows past out", V, "out", lambda b: contract(b, rows=torch.tensor([0, 1, 7], device=_dev(b)))),
    ("contract", "out expanded", V, "out", lambda b: contract(b, out=torch.zeros(3, 1, device=_dev(b)).expand(3, 2))),
    ("contract", "out overlaps itself", V, "out",
     lambda b: contract(b, out=torch.zeros(8, device=_dev(b)).as_strided((3, 2), (1, 1)))),
    ("contract", "out overlaps grads", V, "out", lambda b: contract(b, **_overlapping(_dev(b)))),
    ("contract", "out wrong batch", V, "out", lambda b: contract(b, out=torch.zeros(3, 5, device=_dev(b)))),
    ("contract", "out int", T, "out", lambda b: contract(b, out=torch.zeros(3, 2, dtype=torch.int64, device=_dev(b)))),
    ("contract", "out_layout unknown", V, "out_layout", lambda b: contract(b, out_layout="bb")),
    ("contract", "plan modified in place", V, "plan", _tampered),
    # ---------------------------------------------------------------- find_threshold
    ("find_threshold", "scores 2-D", V, "scores", lambda b: fastattr.find_threshold(torch.rand(2, 2, device=_dev(b)), 0.5, backend=b)),
    ("find_threshold", "scores int", T, "scores", lambda b: fastattr.find_threshold(torch.arange(4, device=_dev(b)), 0.5, backend=b)),
    ("find_threshold", "scores empty", E0, "scores", lambda b: fastattr.find_threshold(torch.zeros(0, device=_dev(b)), 0.5, backend=b)),
    ("find_threshold", "scores NaN", V, "scores",
     lambda b: fastattr.find_threshold(torch.tensor([0.1, float("nan")], device=_dev(b)), 0.5, backend=b)),
    ("find_threshold", "scores meta", V, "scores", lambda b: fastattr.find_threshold(torch.rand(3, device=META), 0.5, backend=b)),
    ("find_threshold", "threshold NaN", V, "threshold", lambda b: fastattr.find_threshold(torch.rand(4, device=_dev(b)), float("nan"), backend=b)),
    ("find_threshold", "threshold str", T, "threshold", lambda b: fastattr.find_threshold(torch.rand(4, device=_dev(b)), "0.5", backend=b)),
    ("find_threshold", "threshold bool", T, "threshold", lambda b: fastattr.find_threshold(torch.rand(4, device=_dev(b)), True, backend=b)),
    # ---------------------------------------------------------------- influence
    ("compute_influence", "A not square", V, "A", lambda b: fastattr.compute_influence(torch.rand(3, 4, device=_dev(b)), _w(_dev(b), 3), backend=b)),
    ("compute_influence", "A int", T, "A", lambda b: fastattr.compute_influence(torch.ones(3, 3, dtype=torch.int64, device=_dev(b)), _w(_dev(b), 3), backend=b)),
    ("compute_influence", "A NaN", V, "A",
     lambda b: fastattr.compute_influence(_dag(_dev(b)).index_put_((torch.tensor([3]), torch.tensor([1])), torch.tensor(float("nan"), device=_dev(b))), _w(_dev(b)), backend=b)),
    ("compute_influence", "A overflows float32", NF, "A", lambda b: fastattr.compute_influence(*_chain(_dev(b)), backend=b)),
    ("compute_influence", "A meta", V, "A", lambda b: fastattr.compute_influence(torch.rand(3, 3, device=META), torch.rand(3, device=META), backend=b)),
    ("compute_influence", "logit_weights wrong length", V, "logit_weights", lambda b: fastattr.compute_influence(_dag(_dev(b)), _w(_dev(b), 4), backend=b)),
    ("compute_influence", "logit_weights NaN", NF, "logit_weights", lambda b: fastattr.compute_influence(_dag(_dev(b)), _w(_dev(b), bad=float("nan")), backend=b)),
    ("compute_influence", "logit_weights Inf", NF, "logit_weights", lambda b: fastattr.compute_influence(_dag(_dev(b)), _w(_dev(b), bad=float("inf")), backend=b)),
    ("compute_influence", "max_iter negative", V, "max_iter", lambda b: fastattr.compute_influence(_dag(_dev(b)), _w(_dev(b)), -1, backend=b)),
    ("compute_influence", "max_iter float", T, "max_iter", lambda b: fastattr.compute_influence(_dag(_dev(b)), _w(_dev(b)), 2.5, backend=b)),
    ("compute_influence", "sparse A bad column", V, "A.col_indices",
     lambda b: fastattr.compute_influence(_csr(_dev(b), col_indices=_csr(_dev(b)).col_indices + 10), _w(_dev(b), 4), backend=b)),
    ("compute_node_influence", "adjacency_matrix 1-D", V, "adjacency_matrix",
     lambda b: fastattr.compute_node_influence(torch.rand(4, device=_dev(b)), _w(_dev(b), 4), backend=b)),
    ("compute_node_influence", "adjacency_matrix Inf", V, "adjacency_matrix",
     lambda b: fastattr.compute_node_influence(_dag(_dev(b)).index_put_((torch.tensor([4]), torch.tensor([0])), torch.tensor(float("inf"), device=_dev(b))), _w(_dev(b)), backend=b)),
    ("compute_node_influence", "logit_weights NaN", NF, "logit_weights",
     lambda b: fastattr.compute_node_influence(_dag(_dev(b)), _w(_dev(b), bad=float("nan")), backend=b)),
    ("compute_node_influence", "logit_weights int", T, "logit_weights",
     lambda b: fastattr.compute_node_influence(_dag(_dev(b)), torch.ones(5, dtype=torch.int64, device=_dev(b)), backend=b)),
    ("compute_node_influence", "sparse adjacency negative row sum", V, "adjacency_matrix.row_abs_sum",
     lambda b: fastattr.compute_node_influence(_csr(_dev(b), row_abs_sum=-torch.ones(4, device=_dev(b))), _w(_dev(b), 4), backend=b)),
    ("compute_edge_influence", "pruned_matrix not square", V, "pruned_matrix",
     lambda b: fastattr.compute_edge_influence(torch.rand(3, 2, device=_dev(b)), _w(_dev(b), 3), backend=b)),
    ("compute_edge_influence", "logit_weights NaN", NF, "logit_weights",
     lambda b: fastattr.compute_edge_influence(_dag(_dev(b)), _w(_dev(b), bad=float("nan")), backend=b)),
    ("compute_partial_influences", "edge_matrix 1-D", V, "edge_matrix",
     lambda b: fastattr.compute_partial_influences(torch.rand(5, device=_dev(b)), torch.ones(1, device=_dev(b)), torch.arange(1, device=_dev(b)), backend=b)),
    ("compute_partial_influences", "logit_p longer than columns", V, "logit_p",
     lambda b: fastattr.compute_partial_influences(torch.rand(2, 3, device=_dev(b)), torch.ones(4, device=_dev(b)), torch.arange(2, device=_dev(b)), backend=b)),
    ("compute_partial_influences", "logit_p NaN", NF, "logit_p",
     lambda b: fastattr.compute_partial_influences(torch.rand(2, 3, device=_dev(b)), torch.tensor([float("nan")], device=_dev(b)), torch.arange(2, device=_dev(b)), backend=b)),
    ("compute_partial_influences", "row_to_node_index out of range", V, "row_to_node_index",
     lambda b: fastattr.compute_partial_influences(torch.rand(2, 3, device=_dev(b)), torch.ones(1, device=_dev(b)), torch.tensor([0, 3], device=_dev(b)), backend=b)),
    ("compute_partial_influences", "row_to_node_index float", T, "row_to_node_index",
     lambda b: fastattr.compute_partial_influences(torch.rand(2, 3, device=_dev(b)), torch.ones(1, device=_dev(b)), torch.zeros(2, device=_dev(b)), backend=b)),
    ("compute_partial_influences", "max_iter bool", T, "max_iter",
     lambda b: fastattr.compute_partial_influences(torch.rand(2, 3, device=_dev(b)), torch.ones(1, device=_dev(b)), torch.arange(2, device=_dev(b)), True, backend=b)),
    # ---------------------------------------------------------------- topk_edges
    ("topk_edges", "adjacency 1-D", V, "adjacency", lambda b: fastattr.topk_edges(torch.rand(4, device=_dev(b)), 2, backend=b)),
    ("topk_edges", "adjacency int", T, "adjacency", lambda b: fastattr.topk_edges(torch.ones(3, 3, dtype=torch.int32, device=_dev(b)), 2, backend=b)),
    ("topk_edges", "adjacency NaN", V, "adjacency", lambda b: fastattr.topk_edges(torch.full((3, 3), float("nan"), device=_dev(b)), 2, backend=b)),
    ("topk_edges", "adjacency meta", V, "adjacency", lambda b: fastattr.topk_edges(torch.rand(3, 3, device=META), 2, backend=b)),
    ("topk_edges", "k negative", V, "k", lambda b: fastattr.topk_edges(torch.rand(3, 3, device=_dev(b)), -1, backend=b)),
    ("topk_edges", "k float", T, "k", lambda b: fastattr.topk_edges(torch.rand(3, 3, device=_dev(b)), 1.5, backend=b)),
    ("topk_edges", "k bool", T, "k", lambda b: fastattr.topk_edges(torch.rand(3, 3, device=_dev(b)), True, backend=b)),
    # ---------------------------------------------------------------- prune_graph
    ("prune_graph", "not a graph", T, "graph", lambda b: fastattr.prune_graph(torch.rand(3, 3), backend=b)),
    ("prune_graph", "node_threshold NaN", V, "node_threshold", lambda b: fastattr.prune_graph(_graph(_dev(b)), float("nan"), 0.5, backend=b)),
    ("prune_graph", "edge_threshold NaN", V, "edge_threshold", lambda b: fastattr.prune_graph(_graph(_dev(b)), 0.5, float("nan"), backend=b)),
    ("prune_graph", "node_threshold above 1", V, "node_threshold", lambda b: fastattr.prune_graph(_graph(_dev(b)), 1.5, 0.5, backend=b)),
    ("prune_graph", "edge_threshold str", T, "edge_threshold", lambda b: fastattr.prune_graph(_graph(_dev(b)), 0.5, "x", backend=b)),
    ("prune_graph", "0 x 0 graph", E0, "graph.adjacency_matrix",
     lambda b: fastattr.prune_graph(_graph(_dev(b), adjacency_matrix=torch.zeros(0, 0, device=_dev(b)), input_tokens=torch.zeros(0),
                                           logit_targets=[], logit_probabilities=torch.zeros(0, device=_dev(b)),
                                           selected_features=torch.zeros(0)), backend=b)),  # fmt: skip
    ("prune_graph", "adjacency not square", V, "graph.adjacency_matrix",
     lambda b: fastattr.prune_graph(_graph(_dev(b), adjacency_matrix=torch.rand(6, 5, device=_dev(b))), backend=b)),
    ("prune_graph", "adjacency NaN", V, "graph.adjacency_matrix",
     lambda b: fastattr.prune_graph(_graph(_dev(b), adjacency_matrix=torch.full((6, 6), float("nan"), device=_dev(b))), backend=b)),
    ("prune_graph", "adjacency meta", V, "graph.adjacency_matrix",
     lambda b: fastattr.prune_graph(_graph(_dev(b), adjacency_matrix=torch.rand(6, 6, device=META)), backend=b)),
    ("prune_graph", "too many nodes", V, "graph", lambda b: fastattr.prune_graph(_graph(_dev(b), n=3), backend=b)),
    ("prune_graph", "logit_probabilities wrong length", V, "graph.logit_probabilities",
     lambda b: fastattr.prune_graph(_graph(_dev(b), logit_probabilities=torch.ones(2, device=_dev(b))), backend=b)),
    ("prune_graph", "logit_probabilities NaN", V, "graph.logit_probabilities",
     lambda b: fastattr.prune_graph(_graph(_dev(b), logit_probabilities=torch.tensor([float("nan")], device=_dev(b))), backend=b)),
    ("prune_graph", "logit_probabilities Inf", V, "graph.logit_probabilities",
     lambda b: fastattr.prune_graph(_graph(_dev(b), logit_probabilities=torch.tensor([float("inf")], device=_dev(b))), backend=b)),
    ("compute_graph_scores", "no cfg", T, "graph",
     lambda b: fastattr.compute_graph_scores(types.SimpleNamespace(**{k: v for k, v in vars(_graph(_dev(b))).items() if k != "cfg"}), backend=b)),
    # ---------------------------------------------------------------- prune_graph_sparse
    ("prune_graph_sparse", "n_tokens negative", V, "n_tokens", lambda b: sparse_prune(b, n_tokens=-1)),
    ("prune_graph_sparse", "n_features past N", V, "n_features", lambda b: sparse_prune(b, n_features=10)),
    ("prune_graph_sparse", "n_tokens float", T, "n_tokens", lambda b: sparse_prune(b, n_tokens=1.5)),
    ("prune_graph_sparse", "column index past N", V, "graph.col_indices",
     lambda b: sparse_prune(b, _csr(_dev(b), col_indices=_csr(_dev(b)).col_indices + 4))),
    ("prune_graph_sparse", "column index negative", V, "graph.col_indices",
     lambda b: sparse_prune(b, _csr(_dev(b), col_indices=-_csr(_dev(b)).col_indices - 1))),
    ("prune_graph_sparse", "row pointers decreasing", V, "graph.crow_indices",
     lambda b: sparse_prune(b, _csr(_dev(b), crow_indices=torch.tensor([0, 3, 1, 5, 6], device=_dev(b))))),
    ("prune_graph_sparse", "row pointers end short", V, "graph.crow_indices",
     lambda b: sparse_prune(b, _csr(_dev(b), crow_indices=torch.tensor([0, 0, 1, 2, 3], device=_dev(b))))),
    ("prune_graph_sparse", "row sums negative", V, "graph.row_abs_sum",
     lambda b: sparse_prune(b, _csr(_dev(b), row_abs_sum=torch.tensor([1.0, -1.0, 2.0, 1.0], device=_dev(b))))),
    ("prune_graph_sparse", "row sums NaN", V, "graph.row_abs_sum",
     lambda b: sparse_prune(b, _csr(_dev(b), row_abs_sum=torch.full((4,), float("nan"), device=_dev(b))))),
    ("prune_graph_sparse", "logit_probabilities NaN", V, "logit_probabilities",
     lambda b: sparse_prune(b, logit_probabilities=torch.tensor([float("nan")], device=_dev(b)))),
    ("prune_graph_sparse", "missing sizes", T, "n_features", lambda b: sparse_prune(b, n_features=None)),
    ("prune_graph_sparse", "0 x 0 graph", E0, "graph",
     lambda b: sparse_prune(b, _csr(_dev(b), n=0), logit_probabilities=torch.zeros(0, device=_dev(b)), n_tokens=0, n_features=0)),
    ("normalize_matrix", "matrix 1-D", V, "matrix", lambda b: fastattr.normalize_matrix(torch.rand(3, device=_dev(b)), backend=b)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,case,error,argument,call", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_names_the_argument(backend, op, case, error, argument, call):
    if op == "normalize_matrix" and backend not in ("torch", "cpu"):
        pass  # normalize_matrix has only the reference; the argument check runs before any choice
    with pytest.raises((ValueError, TypeError)) as info:
        call(backend)
    assert isinstance(info.value, error), f"{op} ({case}): {type(info.value).__name__}: {info.value}"
    message = str(info.value)
    # "argument: expected ..., got ..." (circuit-tracer's own range messages: "argument must be ...").
    assert message.startswith((f"{argument}:", f"{argument} ")), message
    assert "got" in message, message


# Accepted as circuit-tracer accepts them: numpy scalars and 0-d tensors.
@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalars_are_accepted(backend):
    dev = _dev(backend)
    x = torch.rand(50, device=dev)
    want = fastattr.find_threshold(x, 0.5, backend=backend)
    assert float(fastattr.find_threshold(x, np.float32(0.5), backend=backend)) == float(want)
    assert float(fastattr.find_threshold(x, np.float64(0.5), backend=backend)) == float(want)
    assert float(fastattr.find_threshold(x, torch.tensor(0.5), backend=backend)) == float(want)
    A = torch.rand(6, 6, device=dev)
    assert torch.equal(fastattr.topk_edges(A, np.int64(2), backend=backend).col_indices,
                       fastattr.topk_edges(A, 2, backend=backend).col_indices)  # fmt: skip
    g = _graph(dev)
    want = fastattr.prune_graph(g, 0.8, 0.9, backend=backend)
    got = fastattr.prune_graph(g, np.float32(0.8), np.float64(0.9), backend=backend)
    assert torch.equal(got.node_mask, want.node_mask) and torch.equal(got.edge_mask, want.edge_mask)
    A, w = _dag(dev), _w(dev)
    torch.testing.assert_close(fastattr.compute_influence(A, w, np.int64(50), backend=backend),
                               fastattr.compute_influence(A, w, 50, backend=backend))  # fmt: skip


def test_bf16_triton_interpreter_refuses():
    if "triton" not in fastattr.available_backends() or torch.cuda.is_available():
        pytest.skip("checks the Triton interpreter")
    a = _contract_args(torch.device("cpu"), grads=torch.randn(2, 3, 4).bfloat16(), vectors=torch.randn(3, 4).bfloat16())
    with pytest.raises(TypeError, match="grads: the triton backend under TRITON_INTERPRET=1 cannot contract bfloat16"):
        fastattr.contract(a["grads"], a["vectors"], a["positions"], a["rows"], a["out"], backend="triton")


def test_overflow_agrees_with_circuit_tracer():
    """circuit-tracer raises RuntimeError (no convergence) on a chain whose influence overflows;
    fastattr raises at once on every backend, an error that is both a ValueError naming the
    argument and the RuntimeError circuit-tracer callers catch."""
    ctg = pytest.importorskip("circuit_tracer.graph")
    A, w = _chain(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="failed to converge"):
        ctg.compute_influence(A, w)
    for backend in [p.values[0] for p in BACKENDS if not p.marks]:
        with pytest.raises(RuntimeError, match=r"A: expected entries whose influence series fits float32.*first: inf at index"):
            fastattr.compute_influence(*_chain(_dev(backend)), backend=backend)
