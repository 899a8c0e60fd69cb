"""Graphs saved with circuit-tracer's Graph.to_pt and loaded with Graph.from_pt prune as before.

A top-k graph (``fastattr.attribute(edge_storage="topk")``) prunes with the full rows' |A| sums it
recorded; ``Graph.to_pt`` saves a fixed set of fields, so the record also rides on the adjacency
and selected-features tensors, which it saves (see ``fastattr.ops.pruning.record_topk``).
"""

from __future__ import annotations

import pytest
import torch

import fastattr
from fastattr.ops import pruning

from helpers import tracer_model, tracer_prompt

ct = pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed")
from circuit_tracer.graph import Graph  # noqa: E402


def _round_trip(graph, tmp_path, name="g.pt"):
    path = tmp_path / name
    graph.to_pt(str(path))
    return Graph.from_pt(str(path))


def _same_prune(a, b):
    assert torch.equal(a.node_mask, b.node_mask)
    assert torch.equal(a.edge_mask, b.edge_mask)
    torch.testing.assert_close(a.cumulative_scores, b.cumulative_scores, rtol=0, atol=0, equal_nan=True)


def test_dense_graph_round_trips_exactly(tmp_path):
    model = tracer_model("transformerlens", "plt")
    graph = ct.attribute(tracer_prompt(8, seed=3), model, batch_size=32, max_feature_nodes=40)
    loaded = _round_trip(graph, tmp_path)
    assert torch.equal(loaded.adjacency_matrix, graph.adjacency_matrix)
    for backend in ("cpu", "torch"):
        _same_prune(fastattr.prune_graph(loaded, 0.8, 0.98, backend=backend),
                    fastattr.prune_graph(graph, 0.8, 0.98, backend=backend))  # fmt: skip


@pytest.fixture(scope="module")
def topk_graph():
    model = tracer_model("transformerlens", "plt")
    graph = fastattr.attribute(tracer_prompt(10, seed=4), model, batch_size=32, edge_storage="topk", topk=3)
    assert graph.row_abs_sum is not None
    # Some row must have lost mass to the top-k cut, or the test would not tell the sums apart.
    stored = graph.adjacency_matrix.abs().sum(1)
    assert bool((graph.row_abs_sum > stored * (1 + 1e-4)).any())
    return graph


def _recorded(graph):
    pruning.record_topk(graph, graph.row_abs_sum, getattr(graph, "node_influence", None))
    return graph


def test_topk_graph_round_trips_with_its_sums(topk_graph, tmp_path):
    graph = _recorded(topk_graph)
    expected = fastattr.prune_graph(graph, 0.8, 0.98)
    loaded = _round_trip(graph, tmp_path)
    assert not hasattr(loaded, "row_abs_sum")  # to_pt dropped the attribute; the tensors kept the record
    _same_prune(fastattr.prune_graph(loaded, 0.8, 0.98), expected)
    sparse = fastattr.prune_graph_sparse(loaded, 0.8, 0.98)
    assert torch.equal(sparse.node_mask, expected.node_mask)
    # Without the sums the stored rows would be normalised by their own (smaller) totals.
    dense_view = Graph.from_pt(str(tmp_path / "g.pt"))
    dense_view.adjacency_matrix = dense_view.adjacency_matrix.clone()
    dense_view.selected_features = dense_view.selected_features.clone()
    plain = fastattr.prune_graph(dense_view, 0.8, 0.98)
    assert not (torch.equal(plain.node_mask, expected.node_mask) and torch.equal(plain.edge_mask, expected.edge_mask))


def test_topk_record_survives_graph_to(topk_graph, tmp_path):
    """Graph.to(device) replaces the adjacency with a copy without attributes; selected_features,
    which it does not move, still carries the record."""
    loaded = _round_trip(_recorded(topk_graph), tmp_path)
    expected = fastattr.prune_graph(loaded, 0.8, 0.98)
    loaded.adjacency_matrix = loaded.adjacency_matrix.clone()  # what .to(another device) does
    _same_prune(fastattr.prune_graph(loaded, 0.8, 0.98), expected)


def test_topk_record_of_another_adjacency_is_refused(topk_graph, tmp_path):
    loaded = _round_trip(_recorded(topk_graph), tmp_path)
    n = loaded.adjacency_matrix.shape[0]
    loaded.adjacency_matrix = torch.zeros(n + 1, n + 1)
    loaded.logit_probabilities = loaded.logit_probabilities
    with pytest.raises(ValueError, match=r"graph.adjacency_matrix: this top-k graph recorded row sums for \d+ nodes.*"
                                         r"attribute again with edge_storage='dense'"):
        fastattr.prune_graph(loaded, 0.8, 0.98)


def test_attribute_records_topk_sums_for_to_pt(tmp_path):
    model = tracer_model("transformerlens", "plt")
    graph = fastattr.attribute(tracer_prompt(6, seed=5), model, batch_size=32, edge_storage="topk", topk=3)
    expected = fastattr.prune_graph(graph, 0.8, 0.98)
    _same_prune(fastattr.prune_graph(_round_trip(graph, tmp_path), 0.8, 0.98), expected)
