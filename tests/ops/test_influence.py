"""Influence kernels against circuit-tracer's graph.py (and the reference) on every backend."""

from __future__ import annotations

import pytest
import torch

import fastattr
from fastattr import reference
from fastattr._runtime import backends as _backends
from fastattr._runtime import ext as _ext
from fastattr.ops import influence
from fastattr._runtime.backends import BackendUnavailableError
from fastattr.ops.topk_edges import SparseEdges

from helpers import HAS_CUDA, backend_device, backend_params, ctg, graph_for, logit_weights, random_graph, shuffle_features


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def float64_node_influence(A: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n64 = reference.normalize_matrix(A.double().cpu())
    return reference.compute_influence(n64, w.double().cpu())


GRAPH_SEEDS = [0, 1, 2]


# ------------------------------------------------------------------------------------------------
# Dense influence
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("seed", GRAPH_SEEDS)
def test_node_influence_matches_circuit_tracer(backend, seed):
    graph = graph_for(backend, seed)
    A, w = graph.adjacency_matrix, logit_weights(graph)
    got = fastattr.compute_node_influence(A, w, backend=backend)
    assert got.dtype == torch.float32 and got.device == A.device and got.shape == (A.shape[0],)
    ref = ctg.compute_node_influence(A, w)
    assert rel_err(got, ref) <= 1e-6
    assert rel_err(got, reference.compute_node_influence(A, w)) <= 1e-6
    # Against exact arithmetic the double accumulation is within float32 rounding.
    assert rel_err(got, float64_node_influence(A, w)) <= 3e-7


@pytest.mark.parametrize("wide", [False, True], ids=["narrow", "wide-waves"])
def test_kahn_waves_when_not_in_reverse_order(wide):
    """Shuffled features force the Kahn path; wide waves (N ~ 2.4k) take its multi-thread branch."""
    kw = {"n_layers": 2, "n_pos": 8, "feats_per": 300} if wide else {}
    graph = shuffle_features(random_graph(seed=21, **kw), seed=1)
    A, w = graph.adjacency_matrix, logit_weights(graph)
    got, info = influence.influence_cpu(A, w, normalize=True, record_waves=True)
    n_waves = info["waves"][2]
    assert 0 < n_waves < A.shape[0]  # Kahn's waves, not one row per wave
    assert rel_err(got, ctg.compute_node_influence(A, w)) <= 1e-6
    assert rel_err(fastattr.compute_influence(ctg.normalize_matrix(A), w), ctg.compute_node_influence(A, w)) <= 1e-6


@pytest.mark.parametrize("backend", backend_params())
def test_compute_influence_raw_matrix(backend):
    graph = graph_for(backend, 5)
    A, w = graph.adjacency_matrix, logit_weights(graph)
    N = ctg.normalize_matrix(A) * 0.9  # a signed matrix works too
    N = N * torch.where(torch.rand(N.shape, generator=torch.Generator().manual_seed(0)) < 0.3, -1.0, 1.0).to(N.device)
    got = fastattr.compute_influence(N, w, backend=backend)
    ref = ctg.compute_influence(N, w.clone())
    assert rel_err(got, ref) <= 1e-6


@pytest.mark.parametrize("backend", backend_params())
def test_edge_influence_matches_circuit_tracer(backend):
    graph = graph_for(backend, 7)
    A, w = graph.adjacency_matrix, logit_weights(graph)
    pruned = A.clone()
    drop = torch.rand(A.shape[0], generator=torch.Generator().manual_seed(1)) < 0.3
    drop[-8:] = False
    pruned[drop.to(A.device)] = 0
    pruned[:, drop.to(A.device)] = 0
    got = fastattr.compute_edge_influence(pruned, w, backend=backend)
    ref = ctg.compute_edge_influence(pruned, w)
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= 1e-6


def _same_outcome_as_circuit_tracer(A, w, max_iter, backend) -> str:
    """compute_influence raises circuit-tracer's error where it raises, else returns its values
    (zeros where its are zero): "raise" or "ok"."""
    try:
        ref = ctg.compute_influence(A, w.clone(), max_iter=max_iter)
    except RuntimeError as exc:
        with pytest.raises(RuntimeError) as info:
            fastattr.compute_influence(A, w, max_iter=max_iter, backend=backend)
        assert str(info.value) == str(exc)
        return "raise"
    got = fastattr.compute_influence(A, w, max_iter=max_iter, backend=backend)
    assert torch.equal(got == 0, ref == 0) and rel_err(got, ref) <= 1e-6, (max_iter, got, ref)
    return "ok"


@pytest.mark.parametrize("backend", backend_params())
def test_early_stop_and_max_iter_like_circuit_tracer(backend):
    graph = graph_for(backend, 3)
    A, w = graph.adjacency_matrix, logit_weights(graph)
    N = ctg.normalize_matrix(A)
    outcomes = [_same_outcome_as_circuit_tracer(N, w, max_iter, backend) for max_iter in range(0, 8)]
    assert "raise" in outcomes and "ok" in outcomes  # the depth lies inside the range tried


@pytest.mark.parametrize("backend", backend_params())
def test_cycle_raises_like_circuit_tracer(backend):
    dev = backend_device(backend)
    A = torch.zeros(6, 6, device=dev)
    A[0, 1] = A[1, 2] = A[2, 0] = 1.0  # a cycle of weight-1 edges never decays
    A[5, 0] = 0.5
    w = torch.zeros(6, device=dev)
    w[5] = 1.0
    with pytest.raises(RuntimeError, match="failed to converge after 50 iterations"):
        ctg.compute_influence(ctg.normalize_matrix(A), w.clone(), max_iter=50)
    with pytest.raises(RuntimeError, match="failed to converge after 50 iterations"):
        fastattr.compute_influence(ctg.normalize_matrix(A), w, max_iter=50, backend=backend)


@pytest.mark.parametrize("backend", backend_params())
def test_decaying_cycle_converges_by_underflow_like_circuit_tracer(backend):
    dev = backend_device(backend)
    A = torch.zeros(3, 3, device=dev)
    A[0, 1] = A[1, 0] = 0.5  # halves every step: float32 underflows to exactly zero
    A[2, 0] = 1.0
    w = torch.tensor([0.0, 0.0, 1.0], device=dev)
    ref = ctg.compute_influence(A, w.clone())
    got = fastattr.compute_influence(A, w, backend=backend)
    assert rel_err(got, ref) <= 1e-6


@pytest.mark.parametrize("backend", backend_params())
def test_path_longer_than_max_iter_converges_by_underflow_like_circuit_tracer(backend):
    """A DAG whose longest path exceeds max_iter still converges where circuit-tracer's float32
    terms underflow (or cancel) to exactly zero first; it raises only where circuit-tracer does."""
    dev = backend_device(backend)
    n = 12
    chain = torch.zeros(n, n, device=dev)
    chain[torch.arange(1, n), torch.arange(n - 1)] = 1e-20  # node i reads node i - 1
    w = torch.zeros(n, device=dev)
    w[-1] = 1.0
    signed = torch.zeros(4, 4, device=dev)
    signed[3, 1] = signed[3, 2] = signed[1, 0] = 1.0
    signed[2, 0] = -1.0  # the second term cancels to exactly zero
    w4 = torch.tensor([0.0, 0.0, 0.0, 1.0], device=dev)
    for A, weights in ((chain, w), (signed, w4)):
        for max_iter in range(0, 4):
            _same_outcome_as_circuit_tracer(A, weights, max_iter, backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_matrix_raises_value_error(backend, bad):
    graph = graph_for(backend, 0)
    A, w = graph.adjacency_matrix.clone(), logit_weights(graph)
    A[-1, 0] = bad
    with pytest.raises(ValueError, match="adjacency_matrix: expected finite values"):
        fastattr.compute_node_influence(A, w, backend=backend)
    with pytest.raises(ValueError, match="A: expected finite values"):
        fastattr.compute_influence(A, w, backend=backend)


@pytest.mark.parametrize("backend", backend_params())
def test_zero_rows_and_zero_matrix(backend):
    graph = graph_for(backend, 4, zero_rows=5)
    A, w = graph.adjacency_matrix, logit_weights(graph)
    assert rel_err(fastattr.compute_node_influence(A, w, backend=backend), ctg.compute_node_influence(A, w)) <= 1e-6
    Z = torch.zeros_like(A)
    out = fastattr.compute_node_influence(Z, w, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))


def test_non_contiguous_and_other_dtypes():
    graph = random_graph(seed=9)
    A, w = graph.adjacency_matrix, logit_weights(graph)
    At = A.t().contiguous().t()  # same values, column-major strides
    assert rel_err(fastattr.compute_node_influence(At, w, backend="cpu"), ctg.compute_node_influence(A, w)) <= 1e-6
    A64 = A.double()
    got = fastattr.compute_node_influence(A64, w.double())  # automatic choice: the reference
    assert got.dtype == torch.float64
    with pytest.raises(TypeError, match="adjacency_matrix: the cpu backend expects dtype float32, got float64"):
        fastattr.compute_node_influence(A64, w.double(), backend="cpu")


def test_argument_errors_name_the_argument():
    A = torch.rand(4, 4)
    with pytest.raises(ValueError, match=r"adjacency_matrix: expected a square matrix, got shape \(4, 3\)"):
        fastattr.compute_node_influence(torch.rand(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match=r"logit_weights: expected shape \(4\), got \(5,\)"):
        fastattr.compute_node_influence(A, torch.rand(5))
    with pytest.raises(TypeError, match="adjacency_matrix: expected a floating-point tensor, got int64"):
        fastattr.compute_node_influence(torch.ones(4, 4, dtype=torch.long), torch.rand(4))
    with pytest.raises(TypeError, match="A: expected a torch.Tensor, got list"):
        fastattr.compute_influence([[0.0]], torch.rand(1))
    with pytest.raises(ValueError, match="max_iter: expected a non-negative int, got -1"):
        fastattr.compute_influence(A, torch.rand(4), max_iter=-1)
    out = torch.empty(4)
    w = torch.rand(4)

    def call(**changes):
        kw = dict(a=A.data_ptr(), a_dtype=0, n=4, lda=4, w=w.data_ptr(), out=out.data_ptr(), normalize=True,
                  eps=1e-10, node_mask=0, max_iter=10, order=0, wave_ptr=0, reuse_order=False, n_waves=0,
                  row_scale=0, row_factor=0, hist_count=0, hist_sum=0, row_blocks=0)  # fmt: skip
        return _ext.ext.influence_dense_cpu(**{**kw, **changes})

    with pytest.raises(ValueError, match="eps: expected a positive finite value"):
        call(eps=-1.0)
    with pytest.raises(ValueError, match="A: expected a row stride >= 4, got 3"):
        call(lda=3)
    with pytest.raises(ValueError, match="A: expected dtype float32, got bfloat16"):
        call(a_dtype=2)
    with pytest.raises(TypeError, match="incompatible function arguments"):  # keyword-only
        _ext.ext.influence_dense_cpu(A.data_ptr(), 0, 4, 4, w.data_ptr(), out.data_ptr(), True, 1e-10, 0, 10,
                                     0, 0, False, 0, 0, 0, 0, 0, 0)  # fmt: skip


def test_compiled_kernel_overwrites_poisoned_outputs():
    graph = random_graph(seed=11)
    A, w = graph.adjacency_matrix, logit_weights(graph)
    n = A.shape[0]
    out = torch.full((n,), float("nan"))
    order = torch.full((n,), -7, dtype=torch.int32)
    wave_ptr = torch.full((n + 1,), -7, dtype=torch.int32)
    blocks = torch.full((n, -(-n // 4096)), -1, dtype=torch.int64)
    status, n_waves, depth, *_ = _ext.ext.influence_dense_cpu(
        a=A.data_ptr(), a_dtype=0, n=n, lda=n, w=w.data_ptr(), out=out.data_ptr(), normalize=True, eps=1e-10,
        node_mask=0, max_iter=1000, order=order.data_ptr(), wave_ptr=wave_ptr.data_ptr(), reuse_order=False,
        n_waves=0, row_scale=0, row_factor=0, hist_count=0, hist_sum=0, row_blocks=blocks.data_ptr(),
    )
    assert status == 0 and n_waves > 0 and depth > 0
    assert bool(torch.isfinite(out).all())
    assert rel_err(out, ctg.compute_node_influence(A, w)) <= 1e-6
    assert sorted(order.tolist()) == list(range(n))  # every node in exactly one wave
    assert wave_ptr[0] == 0 and bool((wave_ptr[n_waves:] == n).all())


# ------------------------------------------------------------------------------------------------
# Sparse inputs
# ------------------------------------------------------------------------------------------------


def test_sparse_inputs_match_dense():
    graph = random_graph(seed=12)
    A, w = graph.adjacency_matrix, logit_weights(graph)
    dense = fastattr.compute_node_influence(A, w, backend="cpu")
    sp = fastattr.topk_edges(A, None)
    assert rel_err(fastattr.compute_node_influence(sp, w), dense) <= 1e-6
    csr = A.to_sparse_csr()
    assert rel_err(fastattr.compute_node_influence(csr, w), dense) <= 1e-6
    N = ctg.normalize_matrix(A)
    assert rel_err(fastattr.compute_influence(N.to_sparse_csr(), w), ctg.compute_influence(N, w.clone())) <= 1e-6
    # Top-k keeps the full row sums, so the kept edges are normalised as in the dense graph.
    k3 = fastattr.topk_edges(A, 3)
    assert isinstance(k3, SparseEdges)
    assert torch.allclose(k3.row_abs_sum, A.abs().sum(1), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# compute_partial_influences
# ------------------------------------------------------------------------------------------------


def _partial_problem(seed: int, device):
    graph = random_graph(seed=seed, n_layers=3, n_pos=4, feats_per=5)
    A = graph.adjacency_matrix
    n = A.shape[0]
    n_logits = len(graph.logit_targets)
    nf = len(graph.selected_features)
    g = torch.Generator().manual_seed(seed)
    visited = torch.randperm(nf, generator=g)[: max(1, nf // 2)]
    row_to_node = torch.cat([visited, torch.arange(n - n_logits, n)])
    edge_matrix = A[row_to_node].clone()
    return edge_matrix.to(device), graph.logit_probabilities.to(device), row_to_node.to(device)


@pytest.mark.parametrize("backend", backend_params())
def test_partial_influences_match_circuit_tracer(backend):
    dev = backend_device(backend)
    for seed in (0, 1):
        e, p, idx = _partial_problem(seed, dev)
        got = fastattr.compute_partial_influences(e, p, idx, backend=backend)
        assert got.device == e.device
        ref = ctg.compute_partial_influences(e, p, idx, device=dev)
        assert rel_err(got, ref) <= 1e-6
    with pytest.raises(RuntimeError, match="Failed to converge"):
        fastattr.compute_partial_influences(e, p, idx, max_iter=1, backend=backend)
    with pytest.raises(RuntimeError, match="Failed to converge"):
        ctg.compute_partial_influences(e, p, idx, max_iter=1, device=dev)


def test_partial_influences_errors():
    e, p, idx = _partial_problem(0, "cpu")
    bad = idx.clone()
    bad[0] = e.shape[1]
    with pytest.raises(ValueError, match=r"row_to_node_index: expected indices in \[0, \d+\)"):
        fastattr.compute_partial_influences(e, p, bad)
    with pytest.raises(ValueError, match=r"row_to_node_index: expected shape"):
        fastattr.compute_partial_influences(e, p, idx[:-1])
    e2 = e.clone()
    e2[0, 0] = float("nan")
    with pytest.raises(ValueError, match="edge_matrix: expected finite values"):
        fastattr.compute_partial_influences(e2, p, idx)
    # device= only receives the result; the matrix is not copied to it.
    out = fastattr.compute_partial_influences(e, p, idx, device="cpu")
    assert out.device.type == "cpu"


def _growing_rows(seed: int):
    """Rows in attribution's order: the logit rows, then features in random batches."""
    graph = random_graph(seed=seed, n_layers=3, n_pos=5, feats_per=6)
    A = graph.adjacency_matrix
    n, n_logits = A.shape[0], len(graph.logit_targets)
    g = torch.Generator().manual_seed(seed)
    features = torch.randperm(len(graph.selected_features), generator=g)
    row_to_node = torch.cat([torch.arange(n - n_logits, n), features])
    edges = torch.full((len(row_to_node) + 4, n), float("nan"))  # rows not written yet are poison
    cuts = sorted(set(torch.randint(1, len(features), (3,), generator=g).tolist()))
    return A, graph.logit_probabilities, row_to_node, edges, [n_logits + c for c in cuts] + [len(row_to_node)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partial_influence_state_follows_a_growing_matrix(seed):
    """The state a store keeps across updates gives circuit-tracer's result at every size, and
    circuit-tracer's convergence verdict at every max_iter."""
    A, p, row_to_node, edges, sizes = _growing_rows(seed)
    state = influence.PartialInfluenceState()
    for st in sizes:
        edges[:st] = A[row_to_node[:st]]
        e, idx = edges[:st], row_to_node[:st]
        got = fastattr.compute_partial_influences(e, p, idx, state=state, backend="cpu")
        ref = ctg.compute_partial_influences(e, p, idx, device="cpu")
        assert rel_err(got, ref) <= 1e-6
        assert torch.equal(got, fastattr.compute_partial_influences(e, p, idx, state=state, backend="cpu"))
    for max_iter in range(1, 8):
        try:
            ref = ctg.compute_partial_influences(e, p, idx, max_iter=max_iter, device="cpu")
        except RuntimeError:
            with pytest.raises(RuntimeError, match="Failed to converge"):
                fastattr.compute_partial_influences(e, p, idx, max_iter=max_iter, state=state, backend="cpu")
        else:
            got = fastattr.compute_partial_influences(e, p, idx, max_iter=max_iter, state=state, backend="cpu")
            assert rel_err(got, ref) <= 1e-6


def test_partial_influence_state_refuses_another_matrix():
    A, p, row_to_node, edges, sizes = _growing_rows(3)
    st = sizes[0]
    edges[:st] = A[row_to_node[:st]]
    state = influence.PartialInfluenceState()
    fastattr.compute_partial_influences(edges[:st], p, row_to_node[:st], state=state, backend="cpu")
    with pytest.raises(ValueError, match="state: expected the edge matrix it was used with"):
        fastattr.compute_partial_influences(edges[:st].clone(), p, row_to_node[:st], state=state, backend="cpu")
    moved = row_to_node[:st].clone()
    moved[[0, 1]] = moved[[1, 0]]
    with pytest.raises(ValueError, match="row_to_node_index unchanged"):
        fastattr.compute_partial_influences(edges[:st], p, moved, state=state, backend="cpu")
    with pytest.raises(ValueError, match="grown by rows"):
        fastattr.compute_partial_influences(edges[: st - 1], p, row_to_node[: st - 1], state=state, backend="cpu")
    with pytest.raises(TypeError, match="state: expected a PartialInfluenceState or None, got dict"):
        fastattr.compute_partial_influences(edges[:st], p, row_to_node[:st], state={}, backend="cpu")
    grown = sizes[1]
    edges[st:grown] = A[row_to_node[st:grown]]
    edges[grown - 1, 0] = float("inf")
    with pytest.raises(ValueError, match="edge_matrix: expected finite values"):
        fastattr.compute_partial_influences(edges[:grown], p, row_to_node[:grown], state=state, backend="cpu")


def test_triton_follows_interpreter_flag_at_call_time(monkeypatch):
    """TRITON_INTERPRET as it is when a kernel is called decides where triton runs: off, CPU tensors
    are refused (and without a GPU triton is unavailable); on, CPU tensors run the interpreted
    kernels (or, on a GPU machine, CUDA tensors are refused)."""
    pytest.importorskip("triton")
    graph = random_graph(seed=13, n_layers=2, n_pos=3, feats_per=3)
    A, w = graph.adjacency_matrix, logit_weights(graph)

    def triton_status():
        return _backends.backend_status()["triton"]

    try:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        ok, why = triton_status()
        assert ok == HAS_CUDA and "interpreter" not in why
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
            fastattr.compute_node_influence(A, w, backend="triton")

        monkeypatch.setenv("TRITON_INTERPRET", "1")
        ok, why = triton_status()
        assert ok and "interpreter mode" in why
        if HAS_CUDA:
            # The kernels were compiled for the GPU at import; the interpreter flag turns them away.
            with pytest.raises(BackendUnavailableError, match="runs triton on CPU tensors only"):
                fastattr.compute_node_influence(A.cuda(), w.cuda(), backend="triton")
        else:
            got = fastattr.compute_node_influence(A, w, backend="triton")
            assert _backends.last_backend("compute_node_influence") == "triton"
            assert rel_err(got, ctg.compute_node_influence(A, w)) <= 1e-6
    finally:
        monkeypatch.undo()
