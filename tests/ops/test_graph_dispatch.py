"""What runs is what was chosen: ``last_backend`` after every graph op (find_threshold, its
fixed-total variant, topk_edges, prune_graph, prune_graph_sparse, compute_graph_scores) for each
input kind (dense float32, float64, float16, sparse) and each backend, forced and automatic.

The registered dtypes and layouts decide: the compiled backends take float32 only (their kernels
reproduce float32 rounding), the torch backend takes every float dtype, and the sparse layout (a
SparseEdges or torch sparse matrix, or a top-k graph with its recorded row sums) is taken by every
backend of the ops that prune it. A forced backend that cannot take the input raises naming the
argument; an automatic choice takes the first of the device's order that can.
"""

from __future__ import annotations


import pytest
import torch

import fastattr
from fastattr._runtime import backends as _backends
from fastattr.ops import pruning
from fastattr.ops import threshold

from helpers import backend_device, backend_params, default_dtype, random_graph

BACKENDS = backend_params()
COMPILED = ("cuda", "triton", "cpu")
DTYPES = (torch.float32, torch.float64, torch.float16)


def _automatic(device: torch.device, dtype: torch.dtype) -> str:
    """The first backend of the device's order that takes ``dtype``. On CUDA tensors the order of
    evidence: no device report is committed under benchmarks/results yet (tests/runtime/test_evidence.py
    checks the rule with reports)."""
    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
    status = _backends.backend_status()
    for name in order:
        if status[name][0] and _backends.device_reason(name, device) is None and (
                dtype == torch.float32 or name == "torch"):
            return name
    raise AssertionError("no backend")  # pragma: no cover


def _graph(device, dtype=torch.float32, seed=0):
    g = random_graph(n_layers=2, n_pos=3, feats_per=3, seed=seed, device=device, density=0.6)
    g.adjacency_matrix = g.adjacency_matrix.to(dtype)
    return g


def _run(op: str, backend: str | None, dtype: torch.dtype, call) -> None:
    """Call, then check last_backend(op): the forced backend, or the automatic choice; a forced
    compiled backend on a dtype it does not take raises BackendDtypeError instead."""
    if backend in COMPILED and dtype != torch.float32:
        with pytest.raises(fastattr.BackendDtypeError, match=f"the {backend} backend expects dtype float32"):
            call()
        return
    _backends._last_used.pop(op, None)
    call()
    assert fastattr.last_backend(op) == backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_find_threshold_reports_what_ran(backend, dtype):
    dev = backend_device(backend)
    x = (torch.rand(300, generator=torch.Generator().manual_seed(0)) ** 3).to(dev, dtype)
    _run("find_threshold", backend, dtype, lambda: fastattr.find_threshold(x, 0.8, backend=backend))
    _run("find_threshold_fixed_total", backend, dtype,
         lambda: threshold.find_threshold_fixed_total(x, 0.8, float(x.double().sum()), backend=backend))
    fastattr.find_threshold(x, 0.8)
    assert fastattr.last_backend("find_threshold") == _automatic(dev, dtype)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in COMPILED])
def test_negative_scores_run_the_torch_backend(backend, caplog):
    """The radix select cannot order negative scores; the sorting torch backend answers, and says so."""
    dev = backend_device(backend)
    x = torch.randn(400, generator=torch.Generator().manual_seed(1)).to(dev)
    with caplog.at_level("INFO", logger="fastattr"):
        got = fastattr.find_threshold(x, 0.8, backend=backend)
    assert torch.equal(got, fastattr.reference.find_threshold(x, 0.8))
    assert fastattr.last_backend("find_threshold") == "torch"
    assert "running the torch backend" in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_edges_reports_what_ran(backend, dtype):
    dev = backend_device(backend)
    A = _graph(dev, dtype).adjacency_matrix
    _run("topk_edges", backend, dtype, lambda: fastattr.topk_edges(A, 3, backend=backend))
    fastattr.topk_edges(A, 3)
    assert fastattr.last_backend("topk_edges") == _automatic(dev, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_prune_graph_dense_reports_what_ran(backend, dtype):
    dev = backend_device(backend)
    graph = _graph(dev, dtype)
    graph.logit_probabilities = graph.logit_probabilities.to(dtype)
    _backends._last_used.pop("find_threshold", None)
    with default_dtype(dtype):
        _run("prune_graph", backend, dtype, lambda: fastattr.prune_graph(graph, backend=backend))
        if backend in COMPILED and dtype == torch.float32:  # its node threshold ran on the same backend
            assert fastattr.last_backend("find_threshold") == backend
        fastattr.prune_graph(graph)
    assert fastattr.last_backend("prune_graph") == _automatic(dev, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prune_graph_float16_goes_to_the_torch_backend(backend):
    """circuit-tracer's own prune_graph does not converge on float16 graphs (its series of float16
    terms never reaches zero), so only the choice is checked: a compiled backend refuses the dtype,
    the automatic choice is the torch backend."""
    dev = backend_device(backend)
    graph = _graph(dev, torch.float16)
    if backend in COMPILED:
        with pytest.raises(fastattr.BackendDtypeError, match=f"the {backend} backend expects dtype float32"):
            fastattr.prune_graph(graph, backend=backend)
    impl = pruning.PRUNE.select(dev, None, dtype=torch.float16, arg="graph.adjacency_matrix")
    assert impl.backend == "torch"


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in COMPILED])
def test_negative_logit_weights_run_the_torch_backend(backend):
    graph = _graph(backend_device(backend))
    graph.logit_probabilities = -graph.logit_probabilities
    got = fastattr.prune_graph(graph, backend=backend)
    want = fastattr.reference.prune_graph(graph)
    assert torch.equal(got.node_mask, want.node_mask) and torch.equal(got.edge_mask, want.edge_mask)
    assert fastattr.last_backend("prune_graph") == "torch"


def _sparse_inputs(graph):
    """The sparse kinds prune_graph_sparse takes, with the metadata a bare matrix needs."""
    meta = {"logit_probabilities": graph.logit_probabilities, "n_tokens": len(graph.input_tokens),
            "n_features": len(graph.selected_features)}
    edges = fastattr.topk_edges(graph.adjacency_matrix.float(), None, backend="torch")
    return {"SparseEdges": (edges, meta), "torch_csr": (edges.to_torch_sparse(), meta)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_prune_graph_sparse_reports_what_ran_with_its_sub_ops(backend):
    """prune_graph_sparse's backend runs its selects: topk_edges (dense input), find_threshold and
    find_threshold_fixed_total all report it."""
    dev = backend_device(backend)
    graph = _graph(dev)
    for kind, (matrix, meta) in _sparse_inputs(graph).items():
        for op in ("prune_graph_sparse", "find_threshold", "find_threshold_fixed_total"):
            _backends._last_used.pop(op, None)
        fastattr.prune_graph_sparse(matrix, backend=backend, **meta)
        for op in ("prune_graph_sparse", "find_threshold", "find_threshold_fixed_total"):
            assert fastattr.last_backend(op) == backend, (kind, op)
    _backends._last_used.pop("topk_edges", None)
    fastattr.prune_graph_sparse(graph, k=3, backend=backend)
    assert fastattr.last_backend("topk_edges") == backend
    assert fastattr.last_backend("prune_graph_sparse") == backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float16), ids=str)
def test_prune_graph_sparse_other_dtypes(backend, dtype):
    dev = backend_device(backend)
    graph = _graph(dev, dtype)
    _run("prune_graph_sparse", backend, dtype, lambda: fastattr.prune_graph_sparse(graph, k=4, backend=backend))
    fastattr.prune_graph_sparse(graph, k=4)
    assert fastattr.last_backend("prune_graph_sparse") == _automatic(dev, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prune_graph_of_a_top_k_graph_is_sparse_on_the_same_backend(backend):
    dev = backend_device(backend)
    graph = _graph(dev)
    A = graph.adjacency_matrix
    pruning.record_topk(graph, A.abs().double().sum(1).float())
    got = fastattr.prune_graph(graph, backend=backend)
    assert fastattr.last_backend("prune_graph") == backend
    assert fastattr.last_backend("prune_graph_sparse") == backend
    want = fastattr.reference.prune_graph(graph)  # every non-zero stored: the dense answer
    assert torch.equal(got.node_mask, want.node_mask)
    assert torch.equal(got.edge_mask, want.edge_mask & (A != 0))


def test_forced_layout_and_dtype_errors_name_the_argument():
    x = torch.rand(10, dtype=torch.float64)
    with pytest.raises(fastattr.BackendDtypeError, match=r"scores: the cpu backend expects dtype float32, got float64"):
        fastattr.find_threshold(x, 0.5, backend="cpu")
    graph = _graph("cpu", torch.float64)
    with pytest.raises(fastattr.BackendDtypeError, match=r"graph.adjacency_matrix: the cpu backend expects dtype"):
        fastattr.prune_graph(graph, backend="cpu")
    with pytest.raises(fastattr.BackendDtypeError, match=r"adjacency: the cpu backend expects dtype float32"):
        fastattr.topk_edges(graph.adjacency_matrix, 2, backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compute_graph_scores_reports_its_node_influence(backend):
    """compute_graph_scores is a composition: its one kernel, the node influence, reports the backend."""
    dev = backend_device(backend)
    graph = _graph(dev)
    fastattr.compute_graph_scores(graph, backend=backend)
    assert fastattr.last_backend("compute_node_influence") == backend
