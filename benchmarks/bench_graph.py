"""Graph ops: circuit-tracer's graph.py (``prune_graph``, ``compute_node_influence``,
``find_threshold``) against fastattr's on each backend.

Cases are random attribution-shaped DAGs of N nodes in circuit-tracer's node order: features of
16 layers x 32 positions (each reads half of the features and errors of earlier layers at earlier
positions, and the tokens), then errors, tokens and 10 logits that read the last position. The
adjacency is built in row blocks on the device, so no N x N temporary inflates the memory figures.

| tier | N |
|---|---|
| smoke | 600 |
| cpu | 2048, 8192 |
| full | 2048, 8192, 16384, 32768 |

Recorded per run (``extra_info``): ``peak_mem_bytes`` (above the adjacency, which exists before
the call) and ``bytes_per_element`` = that / N^2; for ``prune_graph`` the number of node and edge
mask entries that differ from circuit-tracer's (``mask_mismatches``); for influences the max
relative error. ``find_threshold`` runs on the node influences (N values) and on the flattened edge
scores of the pruned graph (N^2 values, given materialised, as circuit-tracer builds them).

``prune_graph`` and ``find_threshold`` run each backend twice: ``deterministic=False`` (impl
``<backend>``) and ``deterministic=True`` (impl ``<backend>-deterministic``), whose device
histograms add exact int64 significand sums instead of float64 atomics, and whose prune also runs
the fixed-order influence matvec: the pair measures the cost of reproducible graphs. The cpu
kernels are deterministic in both modes, so its two columns time the same code.
"""

from __future__ import annotations

import types

import pytest
import torch

import fastattr

import benchutil
from benchutil import BASELINE, DEVICE, impl_params, per_tier

try:
    import circuit_tracer.graph as ctg

    ORACLE = "circuit-tracer"
except ImportError:
    # Without circuit-tracer (a GPU image may lack it) the baseline column runs fastattr.reference:
    # circuit-tracer's graph.py, the same operations in the same order (equal bit for bit where both
    # are installed, tests/ops/test_reference.py). Each row records which one ran as ``oracle``.
    from fastattr import reference as ctg

    ORACLE = "fastattr.reference"

SIZES = per_tier(smoke=[600], cpu=[2048, 8192], full=[2048, 8192, 16384, 32768])
N_LAYERS, N_POS, N_LOGITS = 16, 32, 10

_GRAPHS: dict = {}
_BASELINE_RESULTS: dict = {}


def make_graph(n_target: int, device: torch.device = DEVICE, seed: int = 0):
    """A Graph-like namespace with ~n_target nodes (cached: one graph at a time)."""
    key = (n_target, str(device), seed)
    if key in _GRAPHS:
        return _GRAPHS[key]
    _GRAPHS.clear()
    _BASELINE_RESULTS.clear()
    per = max(1, round((n_target - (N_LAYERS + 1) * N_POS - N_LOGITS) / (N_LAYERS * N_POS)))
    nf = N_LAYERS * N_POS * per
    ne = N_LAYERS * N_POS
    n = nf + ne + N_POS + N_LOGITS
    layer = torch.cat([
        torch.arange(N_LAYERS).repeat_interleave(N_POS * per), torch.arange(N_LAYERS).repeat_interleave(N_POS),
        torch.full((N_POS + N_LOGITS,), -1),
    ])  # fmt: skip
    pos = torch.cat([
        torch.arange(N_POS).repeat_interleave(per).repeat(N_LAYERS), torch.arange(N_POS).repeat(N_LAYERS),
        torch.arange(N_POS), torch.full((N_LOGITS,), N_POS - 1),
    ])  # fmt: skip
    layer, pos = layer.to(device), pos.to(device)
    is_tok = torch.zeros(n, dtype=torch.bool, device=device)
    is_tok[nf + ne : nf + ne + N_POS] = True
    A = torch.zeros(n, n, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for r0 in range(0, nf, 512):
        r1 = min(nf, r0 + 512)
        earlier = (layer[None, :] >= 0) & (layer[None, :] < layer[r0:r1, None]) & (pos[None, :] <= pos[r0:r1, None])
        ok = (earlier | (is_tok[None, :] & (pos[None, :] <= pos[r0:r1, None]))) & (
            torch.rand(r1 - r0, n, generator=g, device=device) < 0.5
        )
        vals = torch.randn(r1 - r0, n, generator=g, device=device) * torch.rand(r1 - r0, n, generator=g, device=device) ** 3
        A[r0:r1] = torch.where(ok, vals, 0.0)
    last = (pos == N_POS - 1) & ~((torch.arange(n, device=device) >= n - N_LOGITS))
    A[n - N_LOGITS :] = torch.where(last[None, :], torch.randn(N_LOGITS, n, generator=g, device=device), 0.0)
    graph = types.SimpleNamespace(
        adjacency_matrix=A,
        input_tokens=torch.zeros(N_POS, dtype=torch.long),
        logit_targets=list(range(N_LOGITS)),
        logit_probabilities=torch.softmax(torch.randn(N_LOGITS, generator=g, device=device), 0),
        selected_features=torch.arange(nf),
        cfg=types.SimpleNamespace(n_layers=N_LAYERS),
    )
    _GRAPHS[key] = graph
    return graph


def _weights(graph) -> torch.Tensor:
    A = graph.adjacency_matrix
    w = torch.zeros(A.shape[0], device=A.device)
    w[-N_LOGITS:] = graph.logit_probabilities
    return w


def _cases(op_sizes=SIZES):
    """(N, impl) pairs, N outermost so that each graph is built once."""
    return [
        pytest.param(n, p.values[0], id=f"N{n}-{p.id}", marks=p.marks)
        for n in op_sizes
        for p in impl_params(DEVICE)
    ]


def _det_cases(op_sizes=SIZES):
    """(N, impl, deterministic): each fastattr backend in both modes, circuit-tracer once."""
    return [
        pytest.param(n, p.values[0], det, id=f"N{n}-{p.id}{'-deterministic' if det else ''}", marks=p.marks)
        for n in op_sizes
        for p in impl_params(DEVICE)
        for det in ((False,) if p.values[0] == BASELINE else (False, True))
    ]


def _label(impl: str, deterministic: bool) -> str:
    return f"{impl}-deterministic" if deterministic else impl


def _per_element(benchmark, N: int) -> None:
    benchmark.extra_info["oracle"] = ORACLE
    peak = benchmark.extra_info.get("peak_mem_bytes")
    if peak is not None:
        benchmark.extra_info["bytes_per_element"] = peak / N**2
        # The adjacency itself (4 B/element) exists before the call and is not in the peak.
        benchmark.extra_info["total_bytes_per_element"] = 4 + peak / N**2


def _baseline_prune(n: int):
    key = ("prune", n)
    if key not in _BASELINE_RESULTS:
        _BASELINE_RESULTS[key] = ctg.prune_graph(make_graph(n))
    return _BASELINE_RESULTS[key]


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,impl,deterministic", _det_cases())
def test_prune_graph(measure, benchmark, n, impl, deterministic):
    graph = make_graph(n)
    N = graph.adjacency_matrix.shape[0]

    def fn():
        if impl == BASELINE:
            return ctg.prune_graph(graph)
        return fastattr.prune_graph(graph, backend=impl, deterministic=deterministic)

    result = measure(fn, op="prune_graph", case=f"N={N}", impl=_label(impl, deterministic), size=N,
                     size_label="nodes N", family="prune_graph", deterministic=deterministic)  # fmt: skip
    _per_element(benchmark, N)
    want = result if impl == BASELINE else _baseline_prune(n)
    if impl == BASELINE:
        _BASELINE_RESULTS[("prune", n)] = result
    benchmark.extra_info["mask_mismatches"] = int((result.node_mask != want.node_mask).sum()) + int(
        (result.edge_mask != want.edge_mask).sum()
    )
    benchmark.extra_info["kept_nodes"] = int(result.node_mask.sum())
    benchmark.extra_info["kept_edges"] = int(result.edge_mask.sum())


@pytest.mark.parametrize("n,impl", _cases())
def test_compute_node_influence(measure, benchmark, n, impl):
    graph = make_graph(n)
    A, w = graph.adjacency_matrix, _weights(graph)
    N = A.shape[0]
    key = ("influence", n)
    if key not in _BASELINE_RESULTS:
        _BASELINE_RESULTS[key] = ctg.compute_node_influence(A, w)
    ref = _BASELINE_RESULTS[key]

    def fn():
        if impl == BASELINE:
            return ctg.compute_node_influence(A, w)
        return fastattr.compute_node_influence(A, w, backend=impl)

    measure(fn, op="compute_node_influence", case=f"N={N}", impl=impl, size=N, size_label="nodes N",
            family="compute_node_influence", check=lambda r: benchutil.rel_err(r, ref))  # fmt: skip
    _per_element(benchmark, N)


def _edge_scores(graph) -> torch.Tensor:
    """circuit-tracer's flattened edge scores of the pruned graph (the N^2 input of its search)."""
    A, w = graph.adjacency_matrix, _weights(graph)
    infl = ctg.compute_node_influence(A, w)
    mask = infl >= ctg.find_threshold(infl, 0.8)
    mask[-N_LOGITS - N_POS :] = True
    pruned = A.clone()
    pruned[~mask] = 0
    pruned[:, ~mask] = 0
    return ctg.compute_edge_influence(pruned, w).flatten()


@pytest.mark.parametrize("which", ["nodes", "edges"])
@pytest.mark.parametrize("n,impl,deterministic", _det_cases())
def test_find_threshold(measure, benchmark, n, impl, which, deterministic):
    graph = make_graph(n)
    key = ("scores", n, which)
    if key not in _BASELINE_RESULTS:
        if which == "nodes":
            _BASELINE_RESULTS[key] = ctg.compute_node_influence(graph.adjacency_matrix, _weights(graph))
        else:
            _BASELINE_RESULTS[key] = _edge_scores(graph)
    scores = _BASELINE_RESULTS[key]
    t = 0.8 if which == "nodes" else 0.98
    want = ctg.find_threshold(scores, t)

    def fn():
        if impl == BASELINE:
            return ctg.find_threshold(scores, t)
        return fastattr.find_threshold(scores, t, backend=impl, deterministic=deterministic)

    stats = fastattr.ops.threshold.threshold_stats()
    before = (stats.calls, stats.value_sorts)
    measure(fn, op=f"find_threshold ({which})", case=f"N={graph.adjacency_matrix.shape[0]}, {scores.numel()} scores",
            impl=_label(impl, deterministic), size=scores.numel(), size_label="scores",
            family=f"find_threshold-{which}", check=lambda r: 0.0 if torch.equal(r, want) else 1.0,
            deterministic=deterministic)  # fmt: skip
    benchmark.extra_info["oracle"] = ORACLE
    # Calls whose answer depended on torch.sum's rounding and were resolved on the radix-sorted values.
    benchmark.extra_info["value_sorts"] = stats.value_sorts - before[1]
    benchmark.extra_info["calls"] = stats.calls - before[0]
