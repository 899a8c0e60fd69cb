"""fastattr.attribute: circuit-tracer's graphs with the edge rows kept on the device."""

from __future__ import annotations

import pytest
import torch

import fastattr
from fastattr import reference

from helpers import MODEL_KINDS, tracer_model, tracer_prompt

ct = pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed")


def _compare(g0, g1):
    A0, A1 = g0.adjacency_matrix, g1.adjacency_matrix
    assert A0.shape == A1.shape and A0.device == A1.device
    err = ((A0 - A1).abs().max() / A0.abs().max()).item()
    assert err <= 1e-5, f"adjacency differs by {err:.3g} relative"
    assert torch.equal(g0.selected_features, g1.selected_features)
    assert torch.equal(g0.active_features, g1.active_features)
    assert [t.vocab_idx for t in g0.logit_targets] == [t.vocab_idx for t in g1.logit_targets]
    p0, p1 = reference.prune_graph(g0), reference.prune_graph(g1)
    assert torch.equal(p0.node_mask, p1.node_mask) and torch.equal(p0.edge_mask, p1.edge_mask)


@pytest.mark.parametrize("backend,transcoder", MODEL_KINDS)
@pytest.mark.parametrize("max_nodes", [45, None], ids=["below", "all"])
def test_same_graph_as_circuit_tracer(backend, transcoder, max_nodes):
    model = tracer_model(backend, transcoder)
    prompt = tracer_prompt(11, seed=8)
    g0 = ct.attribute(prompt, model, batch_size=16, max_feature_nodes=max_nodes, update_interval=2)
    g1 = fastattr.attribute(prompt, model, batch_size=16, max_feature_nodes=max_nodes, update_interval=2)
    _compare(g0, g1)


def test_patch_routes_circuit_tracer_attribute():
    model = tracer_model("transformerlens", "plt")
    prompt = tracer_prompt(9, seed=2)
    g0 = ct.attribute(prompt, model, batch_size=32, max_feature_nodes=40)
    with fastattr.patch_circuit_tracer() as handle:
        assert "circuit_tracer.attribute" in handle.replaced
        assert ct.attribute is fastattr.attribute
        g1 = ct.attribute(prompt, model, batch_size=32, max_feature_nodes=40)
    assert ct.attribute is not fastattr.attribute
    _compare(g0, g1)


def test_explicit_targets_and_verbose(caplog):
    model = tracer_model("transformerlens", "plt")
    prompt = tracer_prompt(9, seed=3)
    targets = torch.tensor([5, 17, 40])
    g0 = ct.attribute(prompt, model, attribution_targets=targets, batch_size=32, max_feature_nodes=30)
    with caplog.at_level("INFO", logger="fastattr"):
        g1 = fastattr.attribute(prompt, model, attribution_targets=targets, batch_size=32, max_feature_nodes=30, verbose=True)
    _compare(g0, g1)
    assert "fastattr.attribute:" in caplog.text and "features" in caplog.text


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"batch_size": 0}, "batch_size: expected a positive integer, got 0"),
        ({"max_feature_nodes": 0}, "max_feature_nodes: expected a positive integer or None, got 0"),
        ({"max_feature_nodes": -3}, "max_feature_nodes: expected a positive integer or None, got -3"),
        ({"update_interval": 0}, "update_interval: expected a positive integer, got 0"),
        ({"edge_storage": "sparse"}, "edge_storage: expected 'dense' or 'topk', got 'sparse'"),
        ({"edge_storage": "topk", "topk": 0}, "topk: expected a positive integer or None, got 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = tracer_model("transformerlens", "plt")
    with pytest.raises(ValueError, match=match):
        fastattr.attribute(tracer_prompt(5), model, **kwargs)


def test_empty_prompt():
    model = tracer_model("transformerlens", "plt")
    for empty in ("", "   ", [], torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match="prompt: expected at least one token, got an empty prompt"):
            fastattr.attribute(empty, model)


def test_unknown_target_token_keeps_circuit_tracers_error():
    model = tracer_model("transformerlens", "plt")
    prompt = tracer_prompt(6)
    with pytest.raises(Exception) as theirs:
        ct.attribute(prompt, model, attribution_targets=["zzzz-not-a-token-zzzz"])
    with pytest.raises(type(theirs.value)) as ours:
        fastattr.attribute(prompt, model, attribution_targets=["zzzz-not-a-token-zzzz"])
    assert str(ours.value) == str(theirs.value)


def test_dense_storage_that_does_not_fit_names_topk(monkeypatch):
    import os

    model = tracer_model("transformerlens", "plt")
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_AVPHYS_PAGES" else real(name))
    with pytest.raises(MemoryError, match=r"edge_storage='dense' needs .* GiB on cpu for a \d+ x \d+ fp32 edge buffer, "
                       r"but only 0\.00 GiB is free; use edge_storage='topk' \(about .* GiB at k=1024\)"):  # fmt: skip
        fastattr.attribute(tracer_prompt(6), model, batch_size=8)
    fastattr.attribute(tracer_prompt(6), model, batch_size=8, edge_storage="topk")  # top-k is not checked against it


def test_not_a_replacement_model():
    with pytest.raises(TypeError, match="model: expected a circuit-tracer ReplacementModel .* got object"):
        fastattr.attribute("hello", object())


# The attribution interface 0.5.0 adds to both model classes; upstream's split layout lacks it.
_UNIFIED_INTERFACE = ("run_forward_pass", "unembed_proj", "model_config", "get_offload_targets_phase0",
                      "get_offload_targets_phase1", "get_offload_targets_phase2")  # fmt: skip


@pytest.mark.parametrize("backend,transcoder", [("transformerlens", "plt"), ("nnsight", "clt")])
def test_models_without_the_unified_interface(monkeypatch, backend, transcoder):
    """Upstream's models: fastattr.attribute does what attribute_transformerlens/nnsight.py do inline."""
    model = tracer_model(backend, transcoder)
    prompt = tracer_prompt(9, seed=12)
    g0 = ct.attribute(prompt, model, batch_size=16, max_feature_nodes=30, update_interval=1, offload="cpu")
    for name in _UNIFIED_INTERFACE:
        for cls in type(model).__mro__:
            if name in vars(cls):
                monkeypatch.delattr(cls, name)
    assert not any(hasattr(model, name) for name in _UNIFIED_INTERFACE)
    g1 = fastattr.attribute(prompt, model, batch_size=16, max_feature_nodes=30, update_interval=1, offload="cpu")
    _compare(g0, g1)


def test_patch_reroutes_the_split_layout(monkeypatch):
    """Upstream's dispatcher imports attribute_<backend>.attribute at call time: both get replaced."""
    import importlib.machinery
    import sys
    import types

    originals = {}
    for name in ("attribute_transformerlens", "attribute_nnsight"):
        modname = f"circuit_tracer.attribution.{name}"
        module = types.ModuleType(modname)
        module.__spec__ = importlib.machinery.ModuleSpec(modname, None)
        module.attribute = originals[name] = lambda *a, **k: None
        monkeypatch.setitem(sys.modules, modname, module)
    with fastattr.patch_circuit_tracer() as handle:
        for name in originals:
            assert sys.modules[f"circuit_tracer.attribution.{name}"].attribute is fastattr.attribute
            assert f"circuit_tracer.attribution.{name}.attribute" in handle.replaced
        assert ct.attribute is fastattr.attribute
    for name, fn in originals.items():
        assert sys.modules[f"circuit_tracer.attribution.{name}"].attribute is fn


def test_topk_storage_with_every_edge_equals_dense():
    model = tracer_model("transformerlens", "clt")
    prompt = tracer_prompt(10, seed=6)
    dense = fastattr.attribute(prompt, model, batch_size=32)
    full = fastattr.attribute(prompt, model, batch_size=32, edge_storage="topk", topk=10**6)
    assert torch.equal(dense.selected_features, full.selected_features)
    torch.testing.assert_close(full.adjacency_matrix, dense.adjacency_matrix, rtol=1e-6, atol=1e-7)
    # With every feature selected the recorded sums are the dense rows' exact |weight| sums.
    torch.testing.assert_close(full.row_abs_sum, dense.adjacency_matrix.abs().sum(1), rtol=1e-5, atol=1e-6)


def test_topk_storage_keeps_k_strongest_per_row():
    model = tracer_model("transformerlens", "plt")
    prompt = tracer_prompt(10, seed=7)
    dense = fastattr.attribute(prompt, model, batch_size=32)
    k = 16
    top = fastattr.attribute(prompt, model, batch_size=32, edge_storage="topk", topk=k)
    assert torch.equal(dense.selected_features, top.selected_features)
    A, T = dense.adjacency_matrix, top.adjacency_matrix
    n_logits = len(top.logit_targets)
    n_features = len(top.selected_features)
    # Logit rows are stored dense; feature rows keep k entries.
    assert torch.equal(T[-n_logits:], A[-n_logits:])
    assert int((T[:n_features] != 0).sum(1).max()) == k
    assert int((T[n_features:-n_logits] != 0).sum()) == 0  # error and token rows have no inputs
    kept = T != 0
    torch.testing.assert_close(T[kept], A[kept], rtol=1e-5, atol=1e-6)
    # Every dropped entry is no stronger than the weakest kept one of its row.
    for r in range(n_features):
        assert A[r][~kept[r]].abs().max() <= T[r][kept[r]].abs().min() + 1e-6
    torch.testing.assert_close(top.row_abs_sum, A.abs().sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,transcoder", [("transformerlens", "plt"), ("nnsight", "clt")])
def test_topk_row_sums_cover_the_final_columns(backend, transcoder):
    """Below all features, the sums are over the kept columns (as circuit-tracer's final rows), not all."""
    model = tracer_model(backend, transcoder)
    prompt = tracer_prompt(12, seed=21)
    dense = fastattr.attribute(prompt, model, batch_size=8, max_feature_nodes=40, update_interval=1)
    # k at the row length: nothing is dropped, so every sum must be exact.
    top = fastattr.attribute(prompt, model, batch_size=8, max_feature_nodes=40, update_interval=1,
                             edge_storage="topk", topk=10**6)  # fmt: skip
    assert torch.equal(dense.selected_features, top.selected_features)
    torch.testing.assert_close(top.row_abs_sum, dense.adjacency_matrix.abs().sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(top.adjacency_matrix, dense.adjacency_matrix, rtol=1e-5, atol=1e-7)
    # With few edges kept, a sum misses only dropped entries of columns selected after its row was
    # written: it lies between the stored entries' sum and the dense row's.
    small = fastattr.attribute(prompt, model, batch_size=8, max_feature_nodes=40, update_interval=1,
                               edge_storage="topk", topk=8)  # fmt: skip
    if torch.equal(dense.selected_features, small.selected_features):
        exact = dense.adjacency_matrix.abs().sum(1)
        assert bool((small.row_abs_sum <= exact * (1 + 1e-5) + 1e-7).all())
    assert bool((small.row_abs_sum >= small.adjacency_matrix.abs().sum(1) * (1 - 1e-5) - 1e-7).all())


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_assembly_in_small_row_blocks(monkeypatch, storage):
    import importlib

    model = tracer_model("transformerlens", "clt")
    prompt = tracer_prompt(9, seed=4)
    kwargs = dict(batch_size=16, max_feature_nodes=35, update_interval=1, edge_storage=storage, topk=8)
    whole = fastattr.attribute(prompt, model, **kwargs)
    monkeypatch.setattr(importlib.import_module("fastattr.attribution.driver"), "_BLOCK_BYTES", 1)  # one row per block
    rowwise = fastattr.attribute(prompt, model, **kwargs)
    assert torch.equal(whole.adjacency_matrix, rowwise.adjacency_matrix)
    if storage == "topk":
        assert torch.equal(whole.row_abs_sum, rowwise.row_abs_sum)


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_keep_on_device(storage):
    model = tracer_model("transformerlens", "plt")
    prompt = tracer_prompt(8, seed=13)
    kwargs = dict(batch_size=16, max_feature_nodes=30, edge_storage=storage, topk=8)
    moved = fastattr.attribute(prompt, model, **kwargs)
    kept = fastattr.attribute(prompt, model, keep_on_device=True, **kwargs)
    model_device = next(model.parameters()).device
    assert kept.adjacency_matrix.device == model_device and moved.adjacency_matrix.device.type == "cpu"
    assert torch.equal(kept.adjacency_matrix.cpu(), moved.adjacency_matrix)
    if storage == "topk":
        assert kept.row_abs_sum.device == model_device
        assert torch.equal(kept.row_abs_sum.cpu(), moved.row_abs_sum)


def test_prune_graph_uses_the_recorded_sums_and_influence():
    from circuit_tracer.graph import compute_node_influence, prune_graph

    model = tracer_model("transformerlens", "clt")
    prompt = tracer_prompt(10, seed=9)
    dense = ct.attribute(prompt, model, batch_size=32)
    top = fastattr.attribute(prompt, model, batch_size=32, edge_storage="topk", topk=12)
    # Every feature attributed: the node influence was accumulated from the full rows, so it is
    # circuit-tracer's on the dense graph although each feature row keeps 12 entries.
    w = torch.zeros(dense.adjacency_matrix.shape[0])
    w[-len(dense.logit_probabilities) :] = dense.logit_probabilities
    torch.testing.assert_close(top.node_influence, compute_node_influence(dense.adjacency_matrix, w), rtol=1e-5, atol=1e-7)
    ours = fastattr.prune_graph(top)
    assert torch.equal(ours.node_mask, prune_graph(dense).node_mask)
    sparse = fastattr.prune_graph_sparse(top)
    assert torch.equal(ours.node_mask, sparse.node_mask)
    mask = torch.zeros_like(ours.edge_mask)
    mask[sparse.edges.row_indices(), sparse.edges.col_indices] = True
    assert torch.equal(ours.edge_mask, mask)
    assert not bool((ours.edge_mask & (top.adjacency_matrix == 0)).any())
    # Without the recorded sums and influence the stored entries alone would be normalised
    # (clones drop the record that record_topk keeps on the tensors for Graph.to_pt).
    del top.row_abs_sum, top.node_influence
    top.adjacency_matrix, top.selected_features = top.adjacency_matrix.clone(), top.selected_features.clone()
    assert not torch.equal(fastattr.prune_graph(top).cumulative_scores, ours.cumulative_scores)


def _pruned_identities(graph, node_mask) -> set:
    sel = graph.selected_features.tolist()
    return {("f", sel[i]) if i < len(sel) else ("x", i - len(sel)) for i in torch.nonzero(node_mask).flatten().tolist()}


@pytest.mark.parametrize("backend,transcoder", [("transformerlens", "plt"), ("nnsight", "clt")])
def test_topk_agreement_at_the_documented_level(backend, transcoder):
    """docs/attribute.md, at the default k: below all features, selected overlap >= 0.95 and
    pruned-node Jaccard >= 0.95 (measured >= 0.999 and >= 0.981 on other models and seeds), on a
    4-layer model whose rows (about 8,000 columns) are far longer than k; with every feature, the
    dense pruned node set (exact at any k: here a short prompt keeps the test fast)."""
    from circuit_tracer.graph import prune_graph

    from fastattr.attribution.driver import DEFAULT_TOPK

    model = tracer_model(backend, transcoder, n_layers=4, seed=5)
    for n_tokens, max_nodes in ((80, 150), (12, None)):
        prompt = tracer_prompt(n_tokens, seed=17)
        dense = ct.attribute(prompt, model, batch_size=64, max_feature_nodes=max_nodes)
        top = fastattr.attribute(prompt, model, batch_size=64, max_feature_nodes=max_nodes, edge_storage="topk")
        s0, s1 = set(dense.selected_features.tolist()), set(top.selected_features.tolist())
        p0 = _pruned_identities(dense, prune_graph(dense).node_mask)
        p1 = _pruned_identities(top, fastattr.prune_graph(top).node_mask)
        if max_nodes is None:
            assert s0 == s1 and p0 == p1
        else:
            assert dense.active_features.shape[0] > 6 * DEFAULT_TOPK
            assert len(s0 & s1) / len(s0) >= 0.95
            assert len(p0 & p1) / len(p0 | p1) >= 0.95, (len(p0), len(p1), len(p0 ^ p1))


def test_long_prompt_with_topk_storage():
    """About 1,000 positions on the CPU: the edge store is O(rows * k), not O(rows * nodes). Each
    feature row keeps the dense graph's own values at its k strongest sources, and its full |A| sum."""
    model = tracer_model("transformerlens", "plt")
    prompt = tracer_prompt(999, seed=3)
    k, n_sel = 64, 128
    top = fastattr.attribute(prompt, model, batch_size=16, max_feature_nodes=n_sel, edge_storage="topk", topk=k)
    dense = fastattr.attribute(prompt, model, batch_size=16, max_feature_nodes=n_sel)
    n_pos = len(top.input_tokens)
    assert n_pos == 1000
    n_nodes = n_sel + (model.cfg.n_layers + 1) * n_pos + len(top.logit_targets)
    assert top.adjacency_matrix.shape == dense.adjacency_matrix.shape == (n_nodes, n_nodes)
    assert torch.isfinite(top.adjacency_matrix).all()
    assert torch.equal(top.active_features, dense.active_features)

    # Selection runs on top-k influence, so the two graphs may select different features: compare
    # the features both selected, each mapped to its row and column in the dense graph.
    at_dense = {int(f): i for i, f in enumerate(dense.selected_features)}
    to_dense = torch.tensor([at_dense.get(int(f), -1) for f in top.selected_features] + list(range(n_sel, n_nodes)))
    rows = torch.nonzero(to_dense[:n_sel] >= 0).flatten()
    cols = torch.nonzero(to_dense >= 0).flatten()
    assert len(rows) >= n_sel // 2
    A = top.adjacency_matrix[rows][:, cols]
    D = dense.adjacency_matrix[to_dense[rows]][:, to_dense[cols]]
    kept = A != 0
    assert int(kept.sum(1).max()) <= k and bool(kept.any(1).all())
    scale = D.abs().amax(1, keepdim=True)
    assert float(((A - D).abs() * kept / scale).max()) <= 1e-5  # the dense values, where kept
    # The top k by magnitude: every source left out is no stronger than the weakest one kept.
    weakest_kept = torch.where(kept, A.abs(), torch.inf).amin(1)
    strongest_dropped = torch.where(kept, 0.0, D.abs()).amax(1)
    assert bool((strongest_dropped <= weakest_kept * (1 + 1e-5)).all())
    assert int((kept.sum(1) == k).sum()) >= len(rows) // 2  # most rows had more than k sources
    # row_abs_sum: the row's |A| over the graph's columns, short only of dropped entries in columns
    # selected after the row was written (TopKRows), so between the kept and the dense sums.
    sums = top.row_abs_sum[rows]
    assert bool((A.abs().sum(1) * (1 - 1e-5) <= sums).all()) and bool((sums <= D.abs().sum(1) * (1 + 1e-5)).all())