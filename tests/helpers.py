"""What the test files share: backend parametrisation, random attribution graphs in circuit-tracer's
layout, and small random-weight circuit-tracer models.

Fixtures and pytest hooks live in conftest.py, which also sets TRITON_INTERPRET before triton is
first imported; import this module from test files only (conftest has run by then).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from fastattr import reference
from fastattr._runtime import backends as _backends

try:
    import circuit_tracer.graph as ctg
except ImportError:
    # A GPU machine may have no circuit-tracer; the graph-kernel tests must still run there.
    # fastattr.reference is then the oracle: it equals circuit-tracer's graph.py bit for bit, which
    # tests/ops/test_reference.py asserts wherever circuit-tracer is installed.
    ctg = reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
"""The device of tests that run every backend on one device."""


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------


def backend_device(name: str) -> torch.device:
    """The device a backend runs on here: triton on the GPU when there is one, else on the CPU."""
    if name == "cuda" or (name == "triton" and HAS_CUDA):
        return torch.device("cuda")
    return torch.device("cpu")


def backend_params(device: torch.device | None = None) -> list:
    """Parametrise over every backend, each skipped with its reason when it cannot run here.

    With ``device`` every backend runs on that one device (so on a GPU machine the cpu backend is
    skipped); without it each runs on its own ``backend_device``. The cuda backend is marked ``cuda``.
    """
    status = _backends.backend_status()
    params = []
    for name in _backends.BACKENDS:
        ok, why = status[name]
        marks = [pytest.mark.cuda] if name == "cuda" else []
        wrong_device = _backends.device_reason(name, device or backend_device(name)) if ok else None
        if not ok:
            marks.append(pytest.mark.skip(reason=f"{name} backend unavailable: {why}"))
        elif wrong_device is not None:
            marks.append(pytest.mark.skip(reason=wrong_device))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def interpreted(name: str) -> bool:
    """Triton on the numpy interpreter: keep shapes small."""
    return name == "triton" and not HAS_CUDA


# ------------------------------------------------------------------------------------------------
# Random graphs in circuit-tracer's layout
# ------------------------------------------------------------------------------------------------


def random_graph(n_layers=3, n_pos=5, feats_per=4, n_logits=3, density=0.5, seed=0, device="cpu", zero_rows=0):
    """A Graph-like object with a random DAG adjacency in circuit-tracer's node order.

    Nodes: features sorted by (layer, position), then errors (layer-major), tokens, logits. Rows
    are targets: a feature at (l, p) reads features and errors of layers < l at positions <= p and
    tokens at positions <= p; logits read every feature, error and token at the last position.
    Weights are heavy-tailed and signed. ``zero_rows`` feature rows are zeroed (no inputs).
    """
    g = torch.Generator().manual_seed(seed)
    feat_layer, feat_pos = [], []
    for layer in range(n_layers):
        for p in range(n_pos):
            k = int(torch.randint(0, feats_per + 1, (1,), generator=g))
            feat_layer += [layer] * k
            feat_pos += [p] * k
    nf, ne, nt = len(feat_layer), n_layers * n_pos, n_pos
    n = nf + ne + nt + n_logits
    layer = torch.full((n,), 10**6)
    pos = torch.full((n,), -1)
    layer[:nf] = torch.tensor(feat_layer, dtype=torch.long)
    pos[:nf] = torch.tensor(feat_pos, dtype=torch.long)
    layer[nf : nf + ne] = torch.arange(n_layers).repeat_interleave(n_pos)
    pos[nf : nf + ne] = torch.arange(n_pos).repeat(n_layers)
    layer[nf + ne : nf + ne + nt] = -1
    pos[nf + ne : nf + ne + nt] = torch.arange(n_pos)
    kind = torch.zeros(n, dtype=torch.long)  # 0 feature, 1 error, 2 token, 3 logit
    kind[nf : nf + ne] = 1
    kind[nf + ne : nf + ne + nt] = 2
    kind[nf + ne + nt :] = 3
    src_feat_err = (kind == 0) | (kind == 1)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    tgt_feat = kind == 0
    allowed |= tgt_feat[:, None] & src_feat_err[None, :] & (layer[None, :] < layer[:, None]) & (pos[None, :] <= pos[:, None])
    allowed |= tgt_feat[:, None] & (kind == 2)[None, :] & (pos[None, :] <= pos[:, None])
    allowed |= (kind == 3)[:, None] & (kind != 3)[None, :] & (pos[None, :] == n_pos - 1)
    vals = torch.randn(n, n, generator=g) * torch.exp(torch.randn(n, n, generator=g))
    keep = torch.rand(n, n, generator=g) < density
    A = torch.where(allowed & keep, vals, torch.zeros(()))
    if zero_rows:
        A[torch.randperm(max(nf, 1), generator=g)[: min(zero_rows, nf)]] = 0.0
    probs = torch.softmax(torch.randn(n_logits, generator=g), 0)
    return SimpleNamespace(
        adjacency_matrix=A.to(device),
        input_tokens=torch.zeros(n_pos, dtype=torch.long),
        logit_targets=list(range(n_logits)),
        logit_probabilities=probs.to(device),
        selected_features=torch.arange(nf),
        active_features=torch.zeros(nf, 3, dtype=torch.long),
        cfg=SimpleNamespace(n_layers=n_layers),
    )


def graph_for(backend: str, seed: int, **kw):
    """A ``random_graph`` on the backend's device, small where triton runs on the interpreter."""
    if interpreted(backend):
        kw = {"n_layers": 2, "n_pos": 3, "feats_per": 3} | kw
    else:
        kw = {"n_layers": 4, "n_pos": 6, "feats_per": 6} | kw
    return random_graph(seed=seed, device=backend_device(backend), **kw)


def shuffle_features(graph, seed: int = 0):
    """The same graph with its feature nodes in random order (still circuit-tracer's layout, but
    not a topological order read backwards: the CPU kernels must fall back to Kahn's waves)."""
    nf = len(graph.selected_features)
    n = graph.adjacency_matrix.shape[0]
    perm = torch.cat([torch.randperm(nf, generator=torch.Generator().manual_seed(seed)), torch.arange(nf, n)])
    perm = perm.to(graph.adjacency_matrix.device)
    out = SimpleNamespace(**vars(graph))
    out.adjacency_matrix = graph.adjacency_matrix[perm][:, perm].contiguous()
    return out


def logit_weights(graph) -> torch.Tensor:
    """The influence seed: the logit probabilities on the logit rows, zero elsewhere."""
    A = graph.adjacency_matrix
    w = torch.zeros(A.shape[0], device=A.device)
    w[-len(graph.logit_targets) :] = graph.logit_probabilities
    return w


# ------------------------------------------------------------------------------------------------
# circuit-tracer models (random weights, see fastattr.synthetic)
# ------------------------------------------------------------------------------------------------

_MODELS: dict = {}


def tracer_model(backend: str = "transformerlens", transcoder: str = "plt", **kwargs):
    """A cached random-weight circuit-tracer ReplacementModel; skips when circuit-tracer (or nnsight
    for ``backend="nnsight"``) is not installed."""
    pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed (pip install '.[tracer]')")
    if backend == "nnsight":
        pytest.importorskip("nnsight", reason="nnsight is not installed (pip install nnsight==0.6.1)")
    from fastattr import synthetic

    key = (backend, transcoder, tuple(sorted(kwargs.items())))
    if key not in _MODELS:
        params = {"n_layers": 2, "d_model": 64, "d_transcoder": 128, "seed": 0} | kwargs
        _MODELS[key] = synthetic.make_replacement_model(backend=backend, transcoder=transcoder, **params)
    return _MODELS[key]


def tracer_prompt(n_tokens: int = 10, seed: int = 1) -> str:
    from fastattr import synthetic

    return synthetic.random_prompt(n_tokens, seed=seed)


MODEL_KINDS = [
    pytest.param("transformerlens", "plt", id="tl-plt"),
    pytest.param("transformerlens", "clt", id="tl-clt"),
    pytest.param("nnsight", "plt", id="nnsight-plt"),
    pytest.param("nnsight", "clt", id="nnsight-clt"),
]
"""(backend, transcoder) of every model kind circuit-tracer builds, for ``parametrize``."""


# ------------------------------------------------------------------------------------------------
# torch's global switches, set for one block and restored
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def deterministic_algorithms(on: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(on)`` inside the block (fastattr's ops follow it when
    their ``deterministic=`` is None)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` inside the block: circuit-tracer allocates its vectors in
    the default dtype, so a float64 graph runs through its code only under a float64 default."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def assert_same_graph(g0, g1, *, masks: bool = True, tol: float = 1e-5) -> None:
    """Edge rows within ``tol`` of the largest entry of ``g0`` (circuit-tracer's), identical selected
    features and, with ``masks``, identical prune masks."""
    a0 = g0.adjacency_matrix
    a1 = g1.adjacency_matrix.to(a0.device)
    assert a0.shape == a1.shape
    assert torch.equal(g0.selected_features, g1.selected_features.to(g0.selected_features.device))
    err = (a0 - a1).abs().max() / a0.abs().max()
    assert err <= tol, f"max |difference| {err:.2e} of the largest entry"
    if masks:
        from circuit_tracer.graph import prune_graph

        p0, p1 = prune_graph(g0, 0.8, 0.98), prune_graph(g1, 0.8, 0.98)
        assert torch.equal(p0.node_mask, p1.node_mask)
        assert torch.equal(p0.edge_mask, p1.edge_mask)
