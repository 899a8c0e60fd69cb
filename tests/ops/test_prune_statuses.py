"""prune_graph never turns a failed edge select into a mask (which would keep every non-zero edge).

Runs without circuit-tracer: the oracle is fastattr.reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastattr
from fastattr import reference
from fastattr._runtime import ext as _ext
from fastattr.ops import pruning
from fastattr.ops import threshold

from helpers import backend_device, backend_params, interpreted, random_graph


def _graph(backend: str, seed: int = 0):
    size = {"n_layers": 2, "n_pos": 3, "feats_per": 3} if interpreted(backend) else {"n_layers": 3, "n_pos": 4, "feats_per": 5}
    return random_graph(seed=seed, device=backend_device(backend), density=0.6, **size)


def _tampered(backend: str, tamper):
    """The backend's edge passes with ``tamper(level, hist)`` rewriting each histogram level, and a
    mask pass that fails the test if it is reached."""
    real = pruning._EDGE_PASSES[backend]

    def hist(*args, **kwargs):
        return tamper(args[4], real.hist(*args, **kwargs))

    def mask(*args):  # pragma: no cover - reaching it is the failure the tests look for
        raise AssertionError("an edge mask was built from a failed select")

    return pruning._EdgePasses(hist, mask)


def _device_backends():
    return [p for p in backend_params() if p.values[0] in ("cuda", "triton")]


@pytest.mark.parametrize("backend", _device_backends())
def test_device_non_finite_edge_scores_raise(backend, monkeypatch):
    graph = _graph(backend)

    def nonfinite(level, h):
        h.nonfinite = True
        return h

    monkeypatch.setitem(pruning._EDGE_PASSES, backend, _tampered(backend, nonfinite))
    with pytest.raises(ValueError, match="graph: expected finite edge scores"):
        fastattr.prune_graph(graph, backend=backend)


@pytest.mark.parametrize("backend", _device_backends())
def test_device_disagreeing_passes_raise(backend, monkeypatch):
    graph = _graph(backend)

    def empty_inner_level(level, h):
        if level > 0:  # the level-0 bucket's scores vanish from the next pass
            return threshold.Hist(np.zeros_like(h.count), np.zeros_like(h.sums))
        return h

    monkeypatch.setitem(pruning._EDGE_PASSES, backend, _tampered(backend, empty_inner_level))
    with pytest.raises(RuntimeError, match="histogram passes disagree"):
        fastattr.prune_graph(graph, 0.8, 0.98, backend=backend)


@pytest.mark.skipif(_ext.ext is None, reason="fastattr._C is not built")
def test_cpu_statuses_raise(monkeypatch):
    graph = _graph("cpu")
    want = reference.prune_graph(graph, 0.8, 0.98)
    got = fastattr.prune_graph(graph, 0.8, 0.98, backend="cpu")
    assert torch.equal(got.node_mask, want.node_mask) and torch.equal(got.edge_mask, want.edge_mask)

    real = _ext.ext.edge_select_mask_cpu
    for status, exc, msg in (
        (threshold.AMBIGUOUS, RuntimeError, "histogram passes disagree"),
        (threshold.NON_FINITE, ValueError, "graph: expected finite edge scores"),
    ):
        def fake(_status=status, **kwargs):
            _, thr, clamped, passes, cand = real(**kwargs)
            return _status, thr, clamped, passes, cand

        monkeypatch.setattr(_ext.ext, "edge_select_mask_cpu", fake)
        with pytest.raises(exc, match=msg):
            fastattr.prune_graph(graph, 0.8, 0.98, backend="cpu")
    monkeypatch.setattr(_ext.ext, "edge_select_mask_cpu", real)
