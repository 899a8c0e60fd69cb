"""fastattr.reference against the installed circuit-tracer: the oracle must be circuit-tracer's math.

Everything here compares bit for bit (torch.equal): the reference performs the same operations in
the same order on the same device.
"""

from __future__ import annotations

import pytest
import torch

from fastattr import reference

from helpers import tracer_model, tracer_prompt

ct_graph = pytest.importorskip("circuit_tracer.graph", reason="circuit-tracer is not installed")


def _context(backend, transcoder, **kw):
    model = tracer_model(backend, transcoder, **kw)
    ids = model.ensure_tokenized(tracer_prompt(9, seed=3))
    return model, model.setup_attribution(ids)


@pytest.mark.parametrize("transcoder", ["plt", "clt"])
def test_hooks_match_transformerlens_context(transcoder):
    model, ctx = _context("transformerlens", transcoder)
    n_layers, n_pos, _ = ctx.activation_matrix.shape
    n_features = ctx.activation_matrix._nnz()
    hooks = ctx._make_attribution_hooks(model.feature_output_hook)
    gen = torch.Generator().manual_seed(0)
    B = 5
    grads = torch.randn(B, n_pos, ctx.decoder_vecs.shape[1], generator=gen)
    rows = n_features + (n_layers + 1) * n_pos
    for layer in range(n_layers):
        name = f"blocks.{layer}.{model.feature_output_hook}"
        ctx._batch_buffer = torch.randn(rows, B, generator=gen)
        expected = ctx._batch_buffer.clone()
        for hook_name, fn in hooks:
            if hook_name == name:
                fn(grads, None)
        reference.feature_hook_scores(expected, grads, layer, ctx.decoder_vecs, ctx.encoder_to_decoder_map, ctx.decoder_locations)
        reference.error_hook_scores(expected, grads, layer, ctx.error_vectors, n_features)
        assert torch.equal(ctx._batch_buffer, expected)
    ctx._batch_buffer = torch.zeros(rows, B)
    expected = ctx._batch_buffer.clone()
    for hook_name, fn in hooks:
        if hook_name == "hook_embed":
            fn(grads, None)
    reference.token_hook_scores(expected, grads, ctx.token_vectors, n_features, n_layers)
    assert torch.equal(ctx._batch_buffer, expected)
    ctx._batch_buffer = None


def test_contract_equals_per_node_hooks():
    """reference.contract over all of a layer's rows equals the feature + error hooks."""
    model, ctx = _context("transformerlens", "clt")
    n_layers, n_pos, _ = ctx.activation_matrix.shape
    n_features = ctx.activation_matrix._nnz()
    grads = torch.randn(3, n_pos, ctx.decoder_vecs.shape[1])
    for layer in range(n_layers):
        buf = torch.zeros(n_features + (n_layers + 1) * n_pos, 3)
        expected = buf.clone()
        reference.feature_hook_scores(expected, grads, layer, ctx.decoder_vecs, ctx.encoder_to_decoder_map, ctx.decoder_locations)
        mask = ctx.decoder_locations[0] == layer
        reference.contract(grads, ctx.decoder_vecs[mask], ctx.decoder_locations[1][mask], ctx.encoder_to_decoder_map[mask], buf)
        torch.testing.assert_close(buf, expected, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module", params=["plt", "clt"])
def real_graph(request):
    from circuit_tracer import attribute

    model = tracer_model("transformerlens", request.param)
    return attribute(tracer_prompt(12, seed=5), model, batch_size=64, max_feature_nodes=150)


def test_graph_functions_match(real_graph):
    g = real_graph
    A = g.adjacency_matrix
    w = torch.zeros(A.shape[0])
    w[-len(g.logit_targets) :] = g.logit_probabilities
    assert torch.equal(reference.normalize_matrix(A), ct_graph.normalize_matrix(A))
    n = reference.normalize_matrix(A)
    assert torch.equal(reference.compute_influence(n, w), ct_graph.compute_influence(n, w))
    assert torch.equal(reference.compute_node_influence(A, w), ct_graph.compute_node_influence(A, w))
    assert torch.equal(reference.compute_edge_influence(A, w), ct_graph.compute_edge_influence(A, w))
    infl = reference.compute_node_influence(A, w)
    for t in (0.0, 0.5, 0.8, 0.98, 1.0):
        assert torch.equal(reference.find_threshold(infl, t), ct_graph.find_threshold(infl, t))


@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.5, 0.5), (0.0, 0.0), (1.0, 1.0), (0.98, 0.8)])
def test_prune_graph_matches(real_graph, thresholds):
    ours = reference.prune_graph(real_graph, *thresholds)
    theirs = ct_graph.prune_graph(real_graph, *thresholds)
    assert torch.equal(ours.node_mask, theirs.node_mask)
    assert torch.equal(ours.edge_mask, theirs.edge_mask)
    assert torch.equal(ours.cumulative_scores, theirs.cumulative_scores)
    assert 0 < int(ours.edge_mask.sum()) <= ours.edge_mask.numel()


def test_graph_scores_match(real_graph):
    assert reference.compute_graph_scores(real_graph) == ct_graph.compute_graph_scores(real_graph)


def test_partial_influences_match(real_graph):
    A = real_graph.adjacency_matrix
    n_logits = len(real_graph.logit_targets)
    n_feat = len(real_graph.selected_features)
    # Logit rows first, then some feature rows, as the attribute loop fills them.
    take = torch.cat([torch.arange(A.shape[0] - n_logits, A.shape[0]), torch.randperm(n_feat)[: n_feat // 2]])
    edge = A[take]
    ours = reference.compute_partial_influences(edge, real_graph.logit_probabilities, take)
    theirs = ct_graph.compute_partial_influences(edge, real_graph.logit_probabilities, take, device="cpu")
    assert torch.equal(ours, theirs)
    assert ours.abs().sum() > 0


def test_prune_rejects_bad_thresholds(real_graph):
    with pytest.raises(ValueError, match="node_threshold must be between 0.0 and 1.0"):
        reference.prune_graph(real_graph, 1.5, 0.9)
    with pytest.raises(ValueError, match="edge_threshold must be between 0.0 and 1.0"):
        reference.prune_graph(real_graph, 0.5, -0.1)
