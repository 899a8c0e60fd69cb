"""Pure-torch reference: circuit-tracer's slow path, reimplemented as the oracle for every kernel.

Each function reproduces the arithmetic of circuit-tracer 0.5.0 (``attribution/context_*.py`` and
``graph.py``) in the same order of operations, so that on the same device it returns bit-identical
results; tests check this against the installed circuit-tracer. The names, signatures and return
types are circuit-tracer's, which is what lets the fast ops stand in for them.

This module is also the ``torch`` backend of every op, and the CPU path of last resort.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

# --------------------------------------------------------------------------------------------
# The backward-hook contraction
# --------------------------------------------------------------------------------------------


def contract(
    grads: torch.Tensor,
    vectors: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    out: torch.Tensor,
    *,
    out_layout: str = "rb",
) -> torch.Tensor:
    """``out[rows[s], b] += sum_d grads[b, positions[s], d] * vectors[s, d]``, gathering like the hook.

    This is the einsum in circuit-tracer's ``_compute_score_hook``: it materialises
    ``grads[:, positions]`` (B x S x D) and contracts in ``vectors.dtype``. ``out_layout`` is "rb"
    for an (R, B) buffer, as circuit-tracer keeps it, or "br" for (B, R). Rows are accumulated
    with ``index_add_`` so that repeated rows sum (circuit-tracer's ``+=`` through an index never
    repeats a row within one hook).
    """
    gathered = grads.to(vectors.dtype)[:, positions]  # (B, S, D): the tensor fastattr avoids
    scores = torch.einsum("bsd,sd->sb", gathered, vectors)
    target = out if out_layout == "rb" else out.T
    target.index_add_(0, rows.to(torch.long), scores.to(target.dtype))
    return out


def feature_hook_scores(
    buffer: torch.Tensor,
    grads: torch.Tensor,
    layer: int,
    decoder_vecs: torch.Tensor,
    encoder_to_decoder_map: torch.Tensor,
    decoder_locations: torch.Tensor,
) -> None:
    """The feature-node hook of layer ``layer``: every decoder row that writes to it.

    For a per-layer transcoder each active feature has one decoder row; for a cross-layer
    transcoder a feature of layer l has one row for every layer >= l, and
    ``encoder_to_decoder_map`` sends each row to its source feature's buffer row.
    """
    nnz_layers, nnz_positions = decoder_locations
    mask = nnz_layers == layer
    if not bool(mask.any()):
        return
    buffer[encoder_to_decoder_map[mask]] += torch.einsum(
        "bsd,sd->sb", grads.to(decoder_vecs.dtype)[:, nnz_positions[mask]], decoder_vecs[mask]
    )


def error_hook_scores(buffer: torch.Tensor, grads: torch.Tensor, layer: int, error_vectors: torch.Tensor, n_features: int) -> None:
    """Error nodes of ``layer`` occupy rows n_features + layer * P ... + P, one per position."""
    n_pos = error_vectors.shape[1]
    start = n_features + layer * n_pos
    buffer[start : start + n_pos] += torch.einsum(
        "bpd,pd->pb", grads.to(error_vectors.dtype), error_vectors[layer]
    )


def token_hook_scores(buffer: torch.Tensor, grads: torch.Tensor, token_vectors: torch.Tensor, n_features: int, n_layers: int) -> None:
    """Token nodes follow the L * P error rows."""
    n_pos = token_vectors.shape[0]
    start = n_features + n_layers * n_pos
    buffer[start : start + n_pos] += torch.einsum("bpd,pd->pb", grads.to(token_vectors.dtype), token_vectors)


# --------------------------------------------------------------------------------------------
# graph.py: influence, thresholds, pruning, scores
# --------------------------------------------------------------------------------------------


class PruneResult(NamedTuple):
    node_mask: torch.Tensor  # bool (N,): nodes kept
    edge_mask: torch.Tensor  # bool (N, N): edges kept, rows are targets
    cumulative_scores: torch.Tensor  # (N,): each node's cumulative influence rank score


def normalize_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """Row-normalised |A|: each target's incoming |weights| sum to one (rows of zeros stay zero)."""
    absolute = matrix.abs()
    return absolute / absolute.sum(dim=1, keepdim=True).clamp(min=1e-10)


def compute_influence(A: torch.Tensor, logit_weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """sum_{k>=1} w A^k, by iterating until the vector is exactly zero (at the DAG's depth)."""
    term = logit_weights @ A
    total = term
    steps = 0
    while term.any():
        if steps >= max_iter:
            raise RuntimeError(f"Influence computation failed to converge after {steps} iterations")
        term = term @ A
        total += term  # in place on the first term, as circuit-tracer does
        steps += 1
    return total


def compute_node_influence(adjacency_matrix: torch.Tensor, logit_weights: torch.Tensor) -> torch.Tensor:
    return compute_influence(normalize_matrix(adjacency_matrix), logit_weights)


def compute_edge_influence(pruned_matrix: torch.Tensor, logit_weights: torch.Tensor) -> torch.Tensor:
    """Score of edge (t <- s): its share of t's normalised input times t's influence (plus logit weight)."""
    normalized = normalize_matrix(pruned_matrix)
    influence = compute_influence(normalized, logit_weights)
    influence += logit_weights
    return normalized * influence[:, None]


def find_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The smallest score kept when keeping the top scores up to a cumulative fraction ``threshold``.

    Returns a 0-d tensor. Ties at the returned value are all kept by the callers' ``>=``.
    """
    return threshold_of_descending(torch.sort(scores, descending=True).values, threshold)


def threshold_of_descending(ordered: torch.Tensor, threshold: float) -> torch.Tensor:
    """:func:`find_threshold` after its sort: ``ordered`` holds the scores in descending order."""
    cumulative = torch.cumsum(ordered, dim=0) / torch.sum(ordered)
    index = int(torch.searchsorted(cumulative, threshold).item())
    index = min(index, len(cumulative) - 1)  # t = 1.0 can pass the last entry by rounding
    return ordered[index]


def _graph_sizes(graph: Any) -> tuple[int, int, int]:
    return len(graph.input_tokens), len(graph.logit_targets), len(graph.selected_features)


def _logit_weights(graph: Any) -> torch.Tensor:
    n_logits = len(graph.logit_targets)
    weights = torch.zeros(graph.adjacency_matrix.shape[0], device=graph.adjacency_matrix.device)
    weights[-n_logits:] = graph.logit_probabilities
    return weights


def check_thresholds(node_threshold: float, edge_threshold: float) -> None:
    if node_threshold > 1.0 or node_threshold < 0.0:
        raise ValueError("node_threshold must be between 0.0 and 1.0")
    if edge_threshold > 1.0 or edge_threshold < 0.0:
        raise ValueError("edge_threshold must be between 0.0 and 1.0")


def remove_dangling_nodes(node_mask: torch.Tensor, edge_mask: torch.Tensor, n_features: int, n_fixed: int) -> None:
    """Iteratively drop features/errors with no kept outgoing edge and features with no kept input.

    ``n_fixed`` trailing nodes (tokens and logits) are always kept. Both masks change in place.
    Removing a node can strand its neighbours, so this repeats to a fixed point.
    """
    end = node_mask.shape[0] - n_fixed
    before = node_mask.clone()
    node_mask[:end] &= edge_mask[:, :end].any(0)
    node_mask[:n_features] &= edge_mask[:n_features].any(1)
    while not torch.all(node_mask == before):
        before[:] = node_mask
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:end] &= edge_mask[:, :end].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)


def cumulative_node_scores(node_influence: torch.Tensor) -> torch.Tensor:
    """Each node's cumulative share of influence when nodes are ranked by influence."""
    ordered, order = torch.sort(node_influence, descending=True)
    cumulative = torch.cumsum(ordered, dim=0) / torch.sum(ordered)
    scores = torch.zeros_like(node_influence)
    scores[order] = cumulative
    return scores


def prune_graph(graph: Any, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Keep the nodes and edges that carry the given fractions of influence on the logits."""
    check_thresholds(node_threshold, edge_threshold)
    n_tokens, n_logits, n_features = _graph_sizes(graph)
    logit_weights = _logit_weights(graph)

    node_influence = compute_node_influence(graph.adjacency_matrix, logit_weights)
    node_mask = node_influence >= find_threshold(node_influence, node_threshold)
    node_mask[-n_logits - n_tokens :] = True

    pruned = graph.adjacency_matrix.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    edge_scores = compute_edge_influence(pruned, logit_weights)
    edge_mask = edge_scores >= find_threshold(edge_scores.flatten(), edge_threshold)

    remove_dangling_nodes(node_mask, edge_mask, n_features, n_logits + n_tokens)
    return PruneResult(node_mask, edge_mask, cumulative_node_scores(node_influence))


def compute_graph_scores(graph: Any) -> tuple[float, float]:
    """(replacement score, completeness score): how much influence flows through features, not errors."""
    n_tokens, n_logits, n_features = _graph_sizes(graph)
    error_start = n_features
    error_end = error_start + n_tokens * graph.cfg.n_layers
    token_end = error_end + n_tokens
    logit_weights = _logit_weights(graph)

    normalized = normalize_matrix(graph.adjacency_matrix)
    node_influence = compute_influence(normalized, logit_weights)
    token_influence = node_influence[error_end:token_end].sum()
    error_influence = node_influence[error_start:error_end].sum()
    replacement_score = token_influence / (token_influence + error_influence)

    non_error_fractions = 1 - normalized[:, error_start:error_end].sum(dim=-1)
    output_influence = node_influence + logit_weights
    completeness_score = (non_error_fractions * output_influence).sum() / output_influence.sum()
    return replacement_score.item(), completeness_score.item()


def compute_partial_influences(
    edge_matrix: torch.Tensor,
    logit_p: torch.Tensor,
    row_to_node_index: torch.Tensor,
    max_iter: int = 128,
    device=None,
) -> torch.Tensor:
    """Influence of every column node, from the rows computed so far (logit rows first).

    Row r of ``edge_matrix`` holds the inputs of node ``row_to_node_index[r]``; columns are all
    nodes. circuit-tracer copies the matrix to ``device`` (its default device) every call; here
    ``device=None`` means the matrix's own device.
    """
    device = device if device is not None else edge_matrix.device
    normalized = torch.empty_like(edge_matrix, device=device).copy_(edge_matrix)
    normalized = normalized.abs_()
    normalized /= normalized.sum(dim=1, keepdim=True).clamp(min=1e-8)

    # circuit-tracer allocates these in the default dtype, which works only when it is the matrix's;
    # in the matrix's dtype they are the same tensors wherever circuit-tracer runs.
    influences = torch.zeros(edge_matrix.shape[1], dtype=normalized.dtype, device=normalized.device)
    prod = torch.zeros(edge_matrix.shape[1], dtype=normalized.dtype, device=normalized.device)
    prod[-len(logit_p) :] = logit_p
    for _ in range(max_iter):
        prod = prod[row_to_node_index] @ normalized
        if not prod.any():
            break
        influences += prod
    else:
        raise RuntimeError("Failed to converge")
    return influences
