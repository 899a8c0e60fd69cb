"""patch_circuit_tracer(): circuit-tracer's attribute() and graph functions through fastattr.

The same random-weight models are attributed with and without the patch; the graphs must agree
(adjacency within 1e-5 relative, identical selected features and prune masks).
"""

from __future__ import annotations

import pytest
import torch

import fastattr
from fastattr.patch import UnsupportedCircuitTracerError

from helpers import MODEL_KINDS, tracer_model, tracer_prompt

ct = pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed")
from circuit_tracer.attribution import context_transformerlens  # noqa: E402
import circuit_tracer.graph as ct_graph  # noqa: E402


def _assert_same_graph(g0, g1):
    A0, A1 = g0.adjacency_matrix, g1.adjacency_matrix
    assert A0.shape == A1.shape
    scale = A0.abs().max()
    assert scale > 0
    err = ((A0 - A1).abs().max() / scale).item()
    assert err <= 1e-5, f"adjacency differs by {err:.3g} relative"
    assert torch.equal(g0.selected_features, g1.selected_features)
    p0 = fastattr.reference.prune_graph(g0)
    p1 = fastattr.reference.prune_graph(g1)
    assert torch.equal(p0.node_mask, p1.node_mask)
    assert torch.equal(p0.edge_mask, p1.edge_mask)


@pytest.mark.parametrize("backend,transcoder", MODEL_KINDS)
@pytest.mark.parametrize("limit", ["below", "all"])
def test_attribute_same_graph(backend, transcoder, limit):
    model = tracer_model(backend, transcoder)
    prompt = tracer_prompt(10, seed=2)
    max_nodes = 60 if limit == "below" else None
    g0 = ct.attribute(prompt, model, batch_size=32, max_feature_nodes=max_nodes)
    with fastattr.patch_circuit_tracer(graph=False):
        g1 = ct.attribute(prompt, model, batch_size=32, max_feature_nodes=max_nodes)
        assert fastattr.last_backend("contract") in ("cpu", "cuda")
    if limit == "all":
        assert len(g0.selected_features) == g0.active_features.shape[0]
    else:
        assert len(g0.selected_features) == 60 < g0.active_features.shape[0]
    _assert_same_graph(g0, g1)


def test_patch_and_undo_restore_everything():
    originals = {
        "hooks": context_transformerlens.AttributionContext.__dict__["_make_attribution_hooks"],
        "prune": ct_graph.prune_graph,
        "influence": ct_graph.compute_node_influence,
    }
    handle = fastattr.patch_circuit_tracer()
    try:
        assert context_transformerlens.AttributionContext.__dict__["_make_attribution_hooks"] is not originals["hooks"]
        assert ct_graph.prune_graph is fastattr.prune_graph
        # 0.5.0's attribute.py, or upstream's attribute_transformerlens.py / attribute_nnsight.py.
        loops = ("attribute", "attribute_transformerlens", "attribute_nnsight")
        assert any(r.endswith(f"{m}.compute_partial_influences") for r in handle.replaced for m in loops)
        assert any(r.endswith("demo_utils.compute_node_influence") for r in handle.replaced)
    finally:
        handle.undo()
    assert context_transformerlens.AttributionContext.__dict__["_make_attribution_hooks"] is originals["hooks"]
    assert ct_graph.prune_graph is originals["prune"]
    assert ct_graph.compute_node_influence is originals["influence"]
    with fastattr.patch_circuit_tracer() as h:
        assert h.active
    assert not h.active and ct_graph.prune_graph is originals["prune"]


def test_full_patch_graph_and_prune():
    model = tracer_model("transformerlens", "clt")
    prompt = tracer_prompt(10, seed=4)
    g0 = ct.attribute(prompt, model, batch_size=32, max_feature_nodes=80)
    p0 = ct_graph.prune_graph(g0)
    with fastattr.patch_circuit_tracer():
        g1 = ct.attribute(prompt, model, batch_size=32, max_feature_nodes=80)
        p1 = ct_graph.prune_graph(g1)
    _assert_same_graph(g0, g1)
    assert torch.equal(p0.node_mask, p1.node_mask)
    assert torch.equal(p0.edge_mask, p1.edge_mask)


def test_unknown_layout_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(context_transformerlens.AttributionContext, "_make_attribution_hooks")
    with pytest.raises(UnsupportedCircuitTracerError, match="has no method _make_attribution_hooks"):
        fastattr.patch_circuit_tracer()
    # Nothing may stay half-patched after the error.
    assert ct_graph.prune_graph.__module__ == "circuit_tracer.graph"


def test_changed_signature_is_a_clear_error(monkeypatch):
    def other(self, hook_names, extra):  # noqa: ARG001
        return []

    monkeypatch.setattr(context_transformerlens.AttributionContext, "_make_attribution_hooks", other)
    with pytest.raises(UnsupportedCircuitTracerError, match="takes \\('self', 'hook_names'\\)"):
        fastattr.patch_circuit_tracer()


# ------------------------------------------------------------------ handles undone in any order


def _patchable() -> dict:
    """Every attribute a patch can replace: (owner name, attribute) -> value (or a marker if absent)."""
    import itertools
    import sys

    from fastattr import patch as fpatch

    names = set(fpatch._GRAPH_FUNCTIONS) | {"attribute", "_make_attribution_hooks", "compute_feature_attributions",
                                           "compute_error_attributions", "compute_token_attributions"}
    owners = []
    for modname, module in list(sys.modules.items()):
        if module is not None and (modname == "circuit_tracer" or modname.startswith("circuit_tracer.")):
            owners.append((modname, module))
            cls = vars(module).get("AttributionContext")
            if isinstance(cls, type):
                owners.append((f"{modname}.AttributionContext", cls))
    return {(o, n): vars(owner).get(n, "<absent>") for (o, owner), n in itertools.product(owners, names)}


def _assert_same(before: dict, after: dict):
    changed = [k for k in before if after.get(k) is not before[k]]
    assert not changed, f"not restored: {changed[:5]}"


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
def test_handles_undone_in_any_order_restore_exactly(order):
    fastattr.patch_circuit_tracer().undo()  # every module the patch touches is imported from here on
    before = _patchable()
    hooks = (context_transformerlens.AttributionContext, "_make_attribution_hooks")
    options = [{}, {"graph": False}, {"attribute": False}]
    handles = [fastattr.patch_circuit_tracer(**o) for o in options]
    patched_by = {
        "prune": {0, 2},  # graph functions
        "attribute": {0, 1},
        "hooks": {0, 1, 2},
    }
    live = {0, 1, 2}
    for i in order:
        handles[i].undo()
        live.discard(i)
        assert not handles[i].active
        # What a live handle replaced stays replaced; the rest is circuit-tracer's own again.
        assert (ct_graph.prune_graph is fastattr.prune_graph) == bool(live & patched_by["prune"])
        assert (ct.attribute is fastattr.attribute) == bool(live & patched_by["attribute"])
        own = vars(hooks[0]).get(hooks[1]) is before[("circuit_tracer.attribution.context_transformerlens.AttributionContext", hooks[1])]
        assert own == (not live & patched_by["hooks"])
    _assert_same(before, _patchable())
    handles[order[0]].undo()  # a second undo changes nothing
    _assert_same(before, _patchable())


def test_handle_made_inside_attribute_restores_exactly(monkeypatch):
    """fastattr.attribute's own contraction patch ends first; the handle made under it keeps
    circuit-tracer patched until it is undone, and then everything is circuit-tracer's again."""
    fastattr.patch_circuit_tracer().undo()
    before = _patchable()
    model = tracer_model("transformerlens", "plt")
    made = []
    setup = model.setup_attribution

    def setup_and_patch(*args, **kwargs):
        made.append(fastattr.patch_circuit_tracer(attribute=False))
        return setup(*args, **kwargs)

    monkeypatch.setattr(model, "setup_attribution", setup_and_patch)
    graph = fastattr.attribute(tracer_prompt(8, seed=5), model, batch_size=32, max_feature_nodes=20, engine="autograd")
    monkeypatch.undo()
    assert len(made) == 1 and graph.adjacency_matrix.abs().sum() > 0
    assert ct_graph.prune_graph is fastattr.prune_graph
    assert vars(context_transformerlens.AttributionContext)["_make_attribution_hooks"] is not before[
        ("circuit_tracer.attribution.context_transformerlens.AttributionContext", "_make_attribution_hooks")
    ]
    made[0].undo()
    _assert_same(before, _patchable())
