"""float64: the dtype circuit-tracer's own tests use to compare its backends exactly.

The contraction runs float64 on the cpu and cuda kernels and the torch reference; the Triton kernel
has no float64 path, which the dispatch registry says (automatic choices skip it, forced ones raise
BackendDtypeError naming the dtype). The graph ops run float64 through the torch reference, which
is circuit-tracer's own math. End to end, float64 models on both circuit-tracer backends give
circuit-tracer's graph, through fastattr.attribute and through the patched circuit-tracer.
"""

from __future__ import annotations

from types import SimpleNamespace

import fastattr
import pytest
import torch
from helpers import DEVICE, backend_params, logit_weights, random_graph
from fastattr import reference
from fastattr._runtime import backends as _backends
from fastattr.ops import contraction
from fastattr._runtime.backends import BackendDtypeError


def _case(B=5, P=7, D=45, S=150, R=170, *, unique=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(B, P, D, generator=gen, dtype=torch.float64)
    vectors = torch.randn(S, D, generator=gen, dtype=torch.float64)
    positions = torch.randint(0, P, (S,), generator=gen)
    rows = torch.randperm(R, generator=gen)[:S] if unique else torch.randint(0, R, (S,), generator=gen)
    return [t.to(DEVICE) for t in (grads, vectors, positions, rows)]


@pytest.mark.parametrize("backend", backend_params(DEVICE))
@pytest.mark.parametrize("unique", [True, False], ids=["unique_rows", "repeated_rows"])
@pytest.mark.parametrize("layout", ["rb", "br"])
def test_contract_float64(backend, unique, layout):
    grads, vectors, positions, rows = _case(unique=unique)
    R, B = 170, grads.shape[0]
    start = torch.randn(R, B, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    want = start.clone()
    reference.contract(grads, vectors, positions, rows, want)
    out = start.clone() if layout == "rb" else start.T.contiguous()
    if backend == "triton":
        with pytest.raises(BackendDtypeError, match="grads: the triton backend expects dtype .*, got float64"):
            fastattr.contract(grads, vectors, positions, rows, out, out_layout=layout, backend=backend)
        return
    fastattr.contract(grads, vectors, positions, rows, out, out_layout=layout, backend=backend)
    got = out if layout == "rb" else out.T
    assert got.dtype == torch.float64
    # float64 accumulation: only the summation order differs from the einsum.
    assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item()


@pytest.mark.parametrize("backend", [b for b in ("cpu", "cuda", "torch") if b in _backends.available_backends()])
def test_contract_float64_into_float32_buffer(backend):
    grads, vectors, positions, rows = _case()
    if _backends.device_reason(backend, grads.device):
        pytest.skip(_backends.device_reason(backend, grads.device))
    out = torch.zeros(170, grads.shape[0], dtype=torch.float32, device=DEVICE)
    want = torch.zeros(170, grads.shape[0], dtype=torch.float64, device=DEVICE)
    reference.contract(grads, vectors, positions, rows, want)
    fastattr.contract(grads, vectors, positions, rows, out, backend=backend)
    assert out.dtype == torch.float32
    # One rounding to float32 of the float64 result.
    torch.testing.assert_close(out.double(), want, rtol=2**-23, atol=1e-30)


def test_automatic_choice_skips_a_backend_without_the_dtype(monkeypatch):
    """Tensors on a GPU without the CUDA build: float32 goes to Triton, float64 to the reference."""
    status = {"cuda": (False, "no CUDA build"), "triton": (True, "triton"), "cpu": (True, "c++"), "torch": (True, "ref")}
    monkeypatch.setattr(_backends, "backend_status", lambda: status)
    monkeypatch.setattr(_backends, "triton_interpret", lambda: False)
    cuda = torch.device("cuda")
    op = contraction.OP
    assert op.select(cuda, None, dtype=torch.float32).backend == "triton"
    assert op.select(cuda, None, dtype=torch.float64).backend == "torch"
    with pytest.raises(BackendDtypeError, match=r"grads: the triton backend expects dtype float32 or float16 or "
                                                r"bfloat16, got float64 \(contract, backend from backend=; backends "
                                                r"that take float64: cuda, cpu, torch\)"):
        op.select(cuda, "triton", dtype=torch.float64, arg="grads")
    with fastattr.use_backend("triton"), pytest.raises(BackendDtypeError, match="from use_backend"):
        op.select(cuda, None, dtype=torch.float64, arg="grads")
    # Also the TypeError every other wrong dtype raises, and a BackendUnavailableError.
    assert issubclass(BackendDtypeError, TypeError) and issubclass(BackendDtypeError, fastattr.BackendUnavailableError)


def test_graph_ops_float64_are_circuit_tracers_math():
    ctg = pytest.importorskip("circuit_tracer.graph")
    graph = random_graph(seed=4)
    A = graph.adjacency_matrix.double()
    w = logit_weights(graph).double()
    assert torch.equal(fastattr.compute_node_influence(A, w), ctg.compute_node_influence(A, w))
    assert fastattr.last_backend("compute_node_influence") == "torch"
    assert torch.equal(fastattr.compute_influence(A, w), ctg.compute_influence(A, w))
    scores = A.abs().sum(0)
    assert torch.equal(fastattr.find_threshold(scores, 0.8), ctg.find_threshold(scores, 0.8))
    assert fastattr.last_backend("find_threshold") == "torch"
    edges = fastattr.topk_edges(A, 3)
    assert fastattr.last_backend("topk_edges") == "torch"
    kernel = fastattr.topk_edges(A.float(), 3, backend="cpu")
    assert torch.equal(edges.crow_indices, kernel.crow_indices) and torch.equal(edges.col_indices, kernel.col_indices)
    assert torch.equal(edges.values.double(), A[edges.row_indices(), edges.col_indices].float().double())
    g64 = SimpleNamespace(**{**vars(graph), "adjacency_matrix": A, "logit_probabilities": graph.logit_probabilities.double()})
    # circuit-tracer's prune_graph builds its logit weights in the default dtype: a float64 graph
    # prunes there only with float64 as the default.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got, want = fastattr.prune_graph(g64), ctg.prune_graph(g64)
    finally:
        torch.set_default_dtype(default)
    assert fastattr.last_backend("prune_graph") == "torch"
    assert torch.equal(got.node_mask, want.node_mask) and torch.equal(got.edge_mask, want.edge_mask)
    # A forced compiled backend refuses float64, whichever way it is forced.
    with fastattr.use_backend("cpu"):
        with pytest.raises(BackendDtypeError, match="adjacency_matrix: the cpu backend expects dtype float32, got float64"):
            fastattr.compute_node_influence(A, w)
        with pytest.raises(BackendDtypeError, match="scores: the cpu backend expects dtype float32, got float64"):
            fastattr.find_threshold(scores, 0.8)


# ------------------------------------------------------------------------------------- end to end

MODELS = [("transformerlens", "plt"), ("transformerlens", "clt"), ("nnsight", "plt")]


@pytest.mark.parametrize("backend,transcoder", MODELS, ids=[f"{b}-{t}" for b, t in MODELS])
def test_float64_model_end_to_end(backend, transcoder):
    ct = pytest.importorskip("circuit_tracer")
    if backend == "nnsight":
        pytest.importorskip("nnsight")
    from fastattr import synthetic

    model = synthetic.make_replacement_model(backend=backend, transcoder=transcoder, dtype=torch.float64,
                                             n_layers=2, d_model=64, d_transcoder=128, seed=0)
    prompt = synthetic.random_prompt(10, seed=2)
    want = ct.attribute(prompt, model, batch_size=32, max_feature_nodes=60)
    fast = fastattr.attribute(prompt, model, batch_size=32, max_feature_nodes=60)
    with fastattr.patch_circuit_tracer():
        patched = ct.attribute(prompt, model, batch_size=32, max_feature_nodes=60)
        assert fastattr.last_backend("contract") in ("cpu", "cuda")
    scale = want.adjacency_matrix.abs().max()
    for got in (fast, patched):
        assert got.adjacency_matrix.dtype == want.adjacency_matrix.dtype
        # float64 contraction: the float32 adjacency is circuit-tracer's to its last bit or two
        # (summation order only; a cross-layer feature's decoder rows add in another order).
        assert ((got.adjacency_matrix - want.adjacency_matrix).abs().max() / scale).item() <= 1e-7
        assert torch.equal(got.selected_features, want.selected_features)
        assert torch.equal(got.active_features, want.active_features)
        p_got, p_want = fastattr.reference.prune_graph(got), fastattr.reference.prune_graph(want)
        assert torch.equal(p_got.node_mask, p_want.node_mask) and torch.equal(p_got.edge_mask, p_want.edge_mask)
