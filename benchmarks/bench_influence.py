"""The cost of the influence ops' deterministic mode: each backend with ``deterministic=False``
(impl ``<backend>``) and ``deterministic=True`` (impl ``<backend>-deterministic``), beside
circuit-tracer's code.

The device matvec adds its row chunks in float64 atomics by default; the deterministic variant
writes per-chunk column sums to a scratch block and adds them in chunk order in a second kernel
(one more pass over a (chunks, N) float64 block per step). The cpu backend is deterministic in both
modes, so its two columns time the same code. Graphs are ``bench_graph.make_graph``'s.

| tier | N |
|---|---|
| smoke | 600 |
| cpu | 2048 |
| full | 2048, 8192, 32768 |

Recorded per run: the max relative error against circuit-tracer (``check``) and ``deterministic``.
"""

from __future__ import annotations

import pytest
import torch

import fastattr

import benchutil
from bench_graph import N_LOGITS, ORACLE, ctg, make_graph
from benchutil import BASELINE, DEVICE, impl_params, per_tier

SIZES = per_tier(smoke=[600], cpu=[2048], full=[2048, 8192, 32768])


def _cases():
    """(N, impl, deterministic), N outermost so that each graph is built once."""
    out = []
    for n in SIZES:
        for p in impl_params(DEVICE):
            impl = p.values[0]
            for det in (False,) if impl == BASELINE else (False, True):
                label = impl if not det else f"{impl}-deterministic"
                out.append(pytest.param(n, impl, det, id=f"N{n}-{label}", marks=p.marks))
    return out


def _weights(graph) -> torch.Tensor:
    w = torch.zeros(graph.adjacency_matrix.shape[0], device=graph.adjacency_matrix.device)
    w[-N_LOGITS:] = graph.logit_probabilities
    return w


@pytest.mark.parametrize("n,impl,deterministic", _cases())
def test_node_influence_deterministic(measure, benchmark, n, impl, deterministic):
    graph = make_graph(n)
    A, w = graph.adjacency_matrix, _weights(graph)
    N = A.shape[0]
    ref = ctg.compute_node_influence(A, w)

    def fn():
        if impl == BASELINE:
            return ctg.compute_node_influence(A, w)
        return fastattr.compute_node_influence(A, w, backend=impl, deterministic=deterministic)

    label = impl if not deterministic else f"{impl}-deterministic"
    measure(fn, op="compute_node_influence (deterministic)", case=f"N={N}", impl=label, size=N,
            size_label="nodes N", family="compute_node_influence", check=lambda r: benchutil.rel_err(r, ref),
            deterministic=deterministic, oracle=ORACLE)  # fmt: skip


@pytest.mark.parametrize("n,impl,deterministic", _cases())
def test_partial_influences_deterministic(measure, benchmark, n, impl, deterministic):
    """The attribution loop's ranking: the logit rows and half of the feature rows, as after half
    of the features were attributed."""
    graph = make_graph(n)
    A = graph.adjacency_matrix
    N = A.shape[0]
    nf = len(graph.selected_features)
    rows = torch.cat([torch.arange(0, nf, 2), torch.arange(N - N_LOGITS, N)]).to(A.device)
    edges, p = A[rows], graph.logit_probabilities
    ref = ctg.compute_partial_influences(edges, p, rows, device=A.device)

    def fn():
        if impl == BASELINE:
            return ctg.compute_partial_influences(edges, p, rows, device=A.device)
        return fastattr.compute_partial_influences(edges, p, rows, backend=impl, deterministic=deterministic)

    label = impl if not deterministic else f"{impl}-deterministic"
    measure(fn, op="compute_partial_influences (deterministic)", case=f"N={N}", impl=label, size=N,
            size_label="nodes N", family="compute_partial_influences", check=lambda r: benchutil.rel_err(r, ref),
            deterministic=deterministic, oracle=ORACLE)  # fmt: skip
