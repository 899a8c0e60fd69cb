"""Graph pruning and scores: circuit-tracer's ``prune_graph`` and ``compute_graph_scores`` without its
N x N temporaries or its sort of N^2 edge scores.

circuit-tracer's ``prune_graph`` at N nodes allocates the normalised matrix, a clone of the
adjacency, the pruned normalised matrix, the edge scores and their sorted copy and cumulative sum
(about 30 bytes per N^2 element) and sorts N^2 values. The dense path here keeps to the adjacency
(4 bytes per element, read in place), the boolean edge mask it returns (1 byte) and O(N) vectors,
plus at most 1 byte per element of candidate scores while the edge threshold is resolved:

1. node influence: one sweep over A (cpu) or the fused power iteration (cuda/triton);
2. node threshold: :func:`fastattr.threshold.find_threshold` on the N influences (exact);
3. edge influence on the pruned graph, with the edge scores |A_ij| / rs_i * (infl_i + w_i)
   histogrammed while each row is final (cpu: the same sweep order; the pruned matrix is never
   built: masked rows and columns are skipped on the fly);
4. edge threshold by radix select over those on-the-fly scores, and the edge mask;
5. circuit-tracer's iterative removal of dangling nodes, with the same (quirky) semantics.

Exactness against circuit-tracer: influences agree to float32 rounding (~1e-7 relative), so a node
or edge whose score is within that distance of the threshold can land on the other side. The edge
threshold also needs circuit-tracer's ``torch.sum`` over the N^2 sorted scores, which cannot be
reproduced without sorting them; the total is taken as the double sum rounded to float32. With
``edge_threshold=1.0`` that matters: circuit-tracer's own answer there flips between keeping every
one of the N^2 entries (threshold 0) and keeping the non-zero-score edges, depending on the last bit
of its float32 total; fastattr keeps the non-zero-score edges whenever the exactly rounded total
reaches 1. See ``tests/test_pruning.py`` and the module docstring of :mod:`fastattr.threshold`.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
import torch

from fastattr import _backends, _checks, _device, _ext, reference, threshold
from fastattr.influence import (
    NORMALIZE_EPS,
    compute_node_influence,
    influence_cpu,
    influence_sparse,
    power_influence_device,
)
from fastattr.reference import PruneResult
from fastattr.sparse_edges import SparseEdges, as_sparse_edges
from fastattr.topk_edges import topk_edges

logger = logging.getLogger("fastattr")

__all__ = ["PruneResult", "SparsePruneResult", "compute_graph_scores", "prune_graph", "prune_graph_sparse"]


class SparsePruneResult(NamedTuple):
    node_mask: torch.Tensor  # bool (N,): nodes kept
    edges: SparseEdges  # the kept edges (rows are targets), with the full-row |A| sums of the input
    cumulative_scores: torch.Tensor  # (N,): each node's cumulative influence rank score


def _sizes(graph: Any) -> tuple[int, int, int]:
    for field in ("adjacency_matrix", "input_tokens", "logit_targets", "logit_probabilities", "selected_features"):
        if not hasattr(graph, field):
            raise TypeError(f"graph: expected a circuit-tracer Graph (or an object with .{field}), got {type(graph).__name__}")
    return len(graph.input_tokens), len(graph.logit_targets), len(graph.selected_features)


def _logit_weights(n: int, probs: torch.Tensor, device: torch.device) -> torch.Tensor:
    w = torch.zeros(n, device=device)
    n_logits = probs.numel()
    if n_logits:
        w[-n_logits:] = probs.to(device)
    return w


def _check_graph(graph: Any) -> tuple[torch.Tensor, int, int, int]:
    n_tokens, n_logits, n_features = _sizes(graph)
    A = graph.adjacency_matrix
    _checks.check_tensor(A, "graph.adjacency_matrix", ndim=2)
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"graph.adjacency_matrix: expected a square matrix, got shape {tuple(A.shape)}")
    if not A.is_floating_point():
        raise TypeError(f"graph.adjacency_matrix: expected a floating-point tensor, got {A.dtype}")
    n = A.shape[0]
    if n_tokens + n_logits + n_features > n:
        raise ValueError(
            f"graph: expected at most {n} nodes (the adjacency's size), got {n_features} features + "
            f"{n_tokens} tokens + {n_logits} logits"
        )
    probs = graph.logit_probabilities
    _checks.check_tensor(probs, "graph.logit_probabilities", ndim=1)
    _checks.check_shape(probs, "graph.logit_probabilities", (n_logits,))
    return A, n_tokens, n_logits, n_features


# Where a top-k graph's record also lives: circuit-tracer's Graph.to_pt saves a fixed set of fields,
# but torch.save keeps a tensor's Python attributes and Graph.from_pt restores them. The adjacency
# carries it through a save; selected_features also survives Graph.to(device), which replaces the
# adjacency with a copy that has no attributes.
_RECORD_ATTR = "_fastattr_topk"


def record_topk(graph: Any, row_abs_sum: torch.Tensor, node_influence: torch.Tensor | None = None) -> None:
    """Attach to a top-k graph what pruning needs: the full rows' |A| sums (and the exact node
    influence when every feature was attributed), so that it survives ``Graph.to_pt``/``from_pt``.

    Sets ``graph.row_abs_sum`` (and ``graph.node_influence``) and records both on the graph's
    adjacency and selected_features tensors, which ``to_pt`` saves.
    """
    _checks.check_tensor(row_abs_sum, "row_abs_sum", ndim=1)
    _checks.check_shape(row_abs_sum, "row_abs_sum", (graph.adjacency_matrix.shape[0],))
    record = {"row_abs_sum": row_abs_sum, "node_influence": node_influence, "n_nodes": int(row_abs_sum.numel())}
    graph.row_abs_sum = row_abs_sum
    if node_influence is not None:
        graph.node_influence = node_influence
    for field in ("adjacency_matrix", "selected_features"):
        tensor = getattr(graph, field, None)
        if isinstance(tensor, torch.Tensor):
            setattr(tensor, _RECORD_ATTR, record)


def _topk_record(graph: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(row_abs_sum, node_influence or None) of a top-k graph, None for a dense one."""
    sums = getattr(graph, "row_abs_sum", None)
    if sums is not None:
        return sums, getattr(graph, "node_influence", None)
    for field in ("adjacency_matrix", "selected_features"):
        record = getattr(getattr(graph, field, None), _RECORD_ATTR, None)
        if isinstance(record, dict) and record.get("row_abs_sum") is not None:
            n = graph.adjacency_matrix.shape[0]
            if record.get("n_nodes") != n:
                raise ValueError(
                    f"graph.adjacency_matrix: this top-k graph recorded row sums for {record.get('n_nodes')} nodes, "
                    f"got an adjacency of {n}; its adjacency was replaced after attribution. Prune the graph "
                    "fastattr.attribute(edge_storage='topk') returned (or saved with Graph.to_pt), or attribute "
                    "again with edge_storage='dense'"
                )
            return record["row_abs_sum"], record.get("node_influence")
    return None


def _recorded_edges(graph: Any) -> SparseEdges | None:
    """A top-k graph from ``fastattr.attribute(edge_storage="topk")``: its stored (non-zero) entries
    with the row sums it recorded, which cover the edges that were not stored."""
    record = _topk_record(graph)
    if record is None:
        return None
    sums = record[0]
    A = graph.adjacency_matrix
    # Graph.to(device) moves the adjacency but not these O(N) extras; follow the adjacency.
    sums = sums.to(A.device)
    _checks.check_tensor(sums, "graph.row_abs_sum", ndim=1)
    _checks.check_shape(sums, "graph.row_abs_sum", (A.shape[0],))
    edges = topk_edges(A, None)
    return SparseEdges(edges.crow_indices, edges.col_indices, edges.values, sums.float(), edges.shape)


# ------------------------------------------------------------------------------------------------
# Dense pruning per backend
# ------------------------------------------------------------------------------------------------


def _prune_cpu(graph, node_threshold: float, edge_threshold: float) -> PruneResult:
    A, n_tokens, n_logits, n_features = _check_graph(graph)
    A = _checks.row_major(A, "graph.adjacency_matrix")
    n = A.shape[0]
    w = _logit_weights(n, graph.logit_probabilities, A.device)

    infl, info = influence_cpu(A, w, normalize=True, record_waves=True, a_name="graph.adjacency_matrix")
    node_mask = infl >= threshold.find_threshold(infl, node_threshold, backend="cpu")
    node_mask[-n_logits - n_tokens :] = True

    _, e = influence_cpu(
        A, w, normalize=True, node_mask=node_mask, waves=info["waves"], row_blocks=info["row_blocks"],
        edge_stats=True, a_name="graph.adjacency_matrix",
    )
    if float(e["row_factor"].min()) < 0.0:  # negative logit weights: scores lose the bit order
        logger.info("prune_graph: negative edge scores (negative logit weights); using the torch reference")
        return reference.prune_graph(graph, node_threshold, edge_threshold)
    if not np.isfinite(e["edge_sum"]):
        _check_edge_select(threshold.NON_FINITE, graph)
    edge_mask = torch.empty((n, n), dtype=torch.bool)
    mask_u8 = node_mask.to(torch.uint8)
    status, *_ = _ext.ext.edge_select_mask_cpu(
        A.data_ptr(), _ext.dtype_code(A), n, A.stride(0) if n else n, mask_u8.data_ptr(),
        e["row_scale"].data_ptr(), e["row_factor"].data_ptr(), e["hist_count"].data_ptr(), e["hist_sum"].data_ptr(),
        e["edge_sum"], e["edge_nnz"], e["edge_min"], float(edge_threshold), edge_mask.data_ptr(),
        # Candidates cost 12 B each plus a 4 B copy while resolved: n^2/24 of them stay within
        # 0.7 B per element (a bucket that is larger gets one more histogram pass instead).
        max(n * n // 24, 1 << 16), _ext.ptr(info["row_blocks"]),
    )
    _check_edge_select(status, graph)
    _ext.ext.remove_dangling_cpu(edge_mask.data_ptr(), n, node_mask.data_ptr(), n_features, n_logits + n_tokens)
    return PruneResult(node_mask, edge_mask, reference.cumulative_node_scores(infl))


def _prune_device(graph, node_threshold: float, edge_threshold: float, name: str) -> PruneResult:
    A, n_tokens, n_logits, n_features = _check_graph(graph)
    A = _checks.row_major(A, "graph.adjacency_matrix")
    n = A.shape[0]
    w = _logit_weights(n, graph.logit_probabilities, A.device)
    edges = _edge_kernels(name)

    infl, _ = power_influence_device(A, w, name, normalize=True, a_name="graph.adjacency_matrix")
    node_mask = infl >= threshold.find_threshold(infl, node_threshold, backend=name)
    node_mask[-n_logits - n_tokens :] = True

    mask_u8 = node_mask.to(torch.uint8)
    infl2, scale = power_influence_device(A, w, name, normalize=True, node_mask=node_mask,
                                          a_name="graph.adjacency_matrix")
    factor = infl2 + w
    sel = threshold.radix_select(
        lambda level, prefix: edges.hist(A, mask_u8, scale, factor, level, prefix),
        n * n,
        lambda total: threshold.CrossingTest.exact(total, edge_threshold),
    )
    if sel.status == threshold.NEGATIVE:
        logger.info("prune_graph: negative edge scores (negative logit weights); using the torch reference")
        return reference.prune_graph(graph, node_threshold, edge_threshold)
    _check_edge_select(sel.status, graph)
    if sel.status == threshold.ALL_ZERO or sel.clamped:
        edge_mask = torch.ones((n, n), dtype=torch.bool, device=A.device)
    else:
        edge_mask = edges.mask(A, mask_u8, scale, factor, sel.value)
    reference.remove_dangling_nodes(node_mask, edge_mask, n_features, n_logits + n_tokens)
    return PruneResult(node_mask, edge_mask, reference.cumulative_node_scores(infl))


def _check_edge_select(status: int, graph) -> None:
    """Raise unless the edge select ended in a state whose mask is circuit-tracer's.

    OK and ALL_ZERO have a defined mask; any other status has none, and treating it as "no
    threshold" would keep every non-zero edge."""
    if status in (threshold.OK, threshold.ALL_ZERO):
        return
    if status == threshold.NON_FINITE:
        _checks.check_finite(graph.adjacency_matrix, "graph.adjacency_matrix")
        _checks.check_finite(graph.logit_probabilities, "graph.logit_probabilities")
        raise ValueError(
            "graph: expected finite edge scores |A_ij| / rowsum_i * (influence_i + logit weight_i), got "
            "non-finite ones (the influences overflow float32; scale graph.logit_probabilities down)"
        )
    if status == threshold.AMBIGUOUS:
        # The select uses one fixed total, so two histogram passes over the same scores disagreed.
        raise RuntimeError(
            "prune_graph: the edge-threshold histogram passes disagree (the edge scores changed between "
            "passes); no edge mask is returned rather than one that keeps every edge"
        )
    raise RuntimeError(f"prune_graph: unexpected edge-select status {status}")


def _prune_cuda(graph, node_threshold, edge_threshold):
    return _prune_device(graph, node_threshold, edge_threshold, "cuda")


def _prune_triton(graph, node_threshold, edge_threshold):
    return _prune_device(graph, node_threshold, edge_threshold, "triton")


def _prune_torch(graph, node_threshold, edge_threshold):
    A, *_ = _check_graph(graph)
    _checks.check_finite(A, "graph.adjacency_matrix")
    return reference.prune_graph(graph, node_threshold, edge_threshold)


class _CudaEdgeKernels:
    @staticmethod
    def hist(A, mask_u8, scale, factor, level, prefix):
        n = A.shape[0]
        nb = 1 << threshold.SELECT_BITS[level]
        count = torch.empty(nb, dtype=torch.int64, device=A.device)
        sums = torch.empty(nb, dtype=torch.float64, device=A.device)
        stats = torch.zeros(4, dtype=torch.int64, device=A.device)
        _ext.ext.edge_hist_cuda(
            A.data_ptr(), _ext.dtype_code(A), n, A.stride(0) if n else n, mask_u8.data_ptr(), scale.data_ptr(),
            factor.data_ptr(), level, prefix, count.data_ptr(), sums.data_ptr(), stats.data_ptr(),
            _ext.cuda_stream(A.device),
        )
        nnz, mn, flags = threshold.decode_stats(stats)
        return count.cpu().numpy(), sums.cpu().numpy(), nnz, mn, flags

    @staticmethod
    def mask(A, mask_u8, scale, factor, thr):
        n = A.shape[0]
        out = torch.empty((n, n), dtype=torch.bool, device=A.device)
        _ext.ext.edge_mask_cuda(
            A.data_ptr(), _ext.dtype_code(A), n, A.stride(0) if n else n, mask_u8.data_ptr(), scale.data_ptr(),
            factor.data_ptr(), float(thr), out.data_ptr(), _ext.cuda_stream(A.device),
        )
        return out


def _edge_kernels(name: str):
    if name == "cuda":
        return _CudaEdgeKernels
    from fastattr.triton_kernels import threshold as tk

    return tk.EdgeKernels


def _check_thresholds(node_threshold, edge_threshold) -> tuple[float, float]:
    # numpy scalars and 0-d tensors pass, as in circuit-tracer; NaN, which its range test lets
    # through, does not.
    node_threshold = _checks.check_number(node_threshold, "node_threshold")
    edge_threshold = _checks.check_number(edge_threshold, "edge_threshold")
    try:
        reference._check_thresholds(node_threshold, edge_threshold)  # circuit-tracer's messages
    except ValueError as exc:
        got = node_threshold if str(exc).startswith("node") else edge_threshold
        raise ValueError(f"{exc}, got {got}") from None
    return node_threshold, edge_threshold


def _check_not_empty(A: torch.Tensor) -> None:
    if A.shape[0] == 0:
        raise _checks.EmptyGraphError(
            "graph.adjacency_matrix: expected at least one node, got shape (0, 0) (circuit-tracer's prune_graph "
            "fails with IndexError here)"
        )


@_device.guard("graph.adjacency_matrix")
def prune_graph(
    graph: Any, node_threshold: float = 0.8, edge_threshold: float = 0.98, *, backend: str | None = None
) -> PruneResult:
    """Keep the nodes and edges that carry the given fractions of influence on the logits.

    A drop-in for circuit-tracer's ``prune_graph``: same arguments, the same
    ``PruneResult(node_mask, edge_mask, cumulative_scores)``, computed without N x N temporaries
    beyond the returned edge mask (see the module docstring for exactness).
    """
    node_threshold, edge_threshold = _check_thresholds(node_threshold, edge_threshold)
    A, *_ = _check_graph(graph)
    _check_not_empty(A)
    if _topk_record(graph) is not None:
        # Normalising by the stored entries alone would inflate every top-k row's weights.
        logger.info("prune_graph: the graph has row_abs_sum (top-k edge storage); pruning its stored edges with those sums")
        res = prune_graph_sparse(graph, node_threshold, edge_threshold, backend=backend)
        edge_mask = torch.zeros(A.shape, dtype=torch.bool, device=A.device)
        edge_mask[res.edges.row_indices(), res.edges.col_indices] = True
        return PruneResult(res.node_mask, edge_mask, res.cumulative_scores)
    _, impl = _backends.select(
        "prune_graph", A.device, backend,
        {"cuda": _prune_cuda, "triton": _prune_triton, "cpu": _prune_cpu, "torch": _prune_torch},
        dtype=A.dtype, dtype_arg="graph.adjacency_matrix",
    )
    return impl(graph, node_threshold, edge_threshold)


# ------------------------------------------------------------------------------------------------
# compute_graph_scores
# ------------------------------------------------------------------------------------------------


def _error_fractions(A: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """sum_{j in [start, end)} |A_ij| / max(rowsum_i, eps), in row chunks (no N x N temporary);
    the same operations as circuit-tracer's ``normalize_matrix(A)[:, start:end].sum(-1)``."""
    n, m = A.shape
    out = torch.empty(n, dtype=A.dtype, device=A.device)
    chunk = max(1, (1 << 24) // max(m, 1))
    for r0 in range(0, n, chunk):
        a = A[r0 : r0 + chunk].abs()
        a /= a.sum(dim=1, keepdim=True).clamp(min=NORMALIZE_EPS)
        out[r0 : r0 + chunk] = a[:, start:end].sum(dim=-1)
    return out


@_device.guard("graph.adjacency_matrix")
def compute_graph_scores(graph: Any, *, backend: str | None = None) -> tuple[float, float]:
    """(replacement score, completeness score), as circuit-tracer's ``compute_graph_scores``."""
    A, n_tokens, n_logits, n_features = _check_graph(graph)
    if not hasattr(graph, "cfg") or not hasattr(graph.cfg, "n_layers"):
        raise TypeError(
            f"graph: expected .cfg.n_layers (the model's number of layers), got a {type(graph).__name__} without it"
        )
    error_start = n_features
    error_end = error_start + n_tokens * int(graph.cfg.n_layers)
    token_end = error_end + n_tokens
    w = _logit_weights(A.shape[0], graph.logit_probabilities, A.device)
    node_influence = compute_node_influence(A, w, backend=backend)
    token_influence = node_influence[error_end:token_end].sum()
    error_influence = node_influence[error_start:error_end].sum()
    replacement_score = token_influence / (token_influence + error_influence)
    non_error_fractions = 1 - _error_fractions(A, error_start, error_end)
    output_influence = node_influence + w
    completeness_score = (non_error_fractions * output_influence).sum() / output_influence.sum()
    return replacement_score.item(), completeness_score.item()


# ------------------------------------------------------------------------------------------------
# Sparse pruning (graphs too large for a dense N x N mask)
# ------------------------------------------------------------------------------------------------


def _threshold_fixed_total(scores: torch.Tensor, t: float, backend: str | None) -> tuple[float, bool]:
    """The crossing value of ``scores`` with the total taken as its exactly rounded double sum (the
    rule the fused edge threshold uses). Returns (value, keep_all)."""
    total = float(torch.sum(scores, dtype=torch.float64))
    if total == 0.0:
        return 0.0, True
    if scores.device.type == "cpu" and _ext.ext is not None and backend in (None, "cpu"):
        status, value, clamped = _ext.ext.select_threshold_cpu(
            scores.data_ptr(), _ext.dtype_code(scores), scores.numel(), t, 0.0, 0.0, float(np.float32(total))
        )
        if status == threshold.OK:
            return value, clamped
    # Reference semantics with the fixed total, by sorting (small inputs, other devices).
    ordered = torch.sort(scores, descending=True).values
    cum = torch.cumsum(ordered.double(), 0).float() / torch.tensor(np.float32(total), device=scores.device)
    idx = int(torch.searchsorted(cum, torch.tensor(t, dtype=torch.float32, device=scores.device)).item())
    clamped = idx >= ordered.numel()
    return float(ordered[min(idx, ordered.numel() - 1)]), clamped


def _remove_dangling_sparse(rows, cols, node_mask, n_features: int, n_fixed: int) -> torch.Tensor:
    """circuit-tracer's dangling-node loop on an edge list; returns which edges survive."""
    n = node_mask.numel()
    end = n - n_fixed

    def update(alive_edges):
        colany = torch.zeros(n, dtype=torch.bool, device=node_mask.device)
        rowany = torch.zeros(n, dtype=torch.bool, device=node_mask.device)
        colany[cols[alive_edges]] = True
        rowany[rows[alive_edges]] = True
        new = node_mask.clone()
        new[:end] &= colany[:end]
        new[:n_features] &= rowany[:n_features]
        return new

    every = torch.ones(rows.numel(), dtype=torch.bool, device=node_mask.device)
    new = update(every)
    if torch.equal(new, node_mask):
        return every  # circuit-tracer clears nothing when the first round removes nothing
    node_mask.copy_(new)
    while True:
        alive = node_mask[rows] & node_mask[cols]
        new = update(alive)
        if torch.equal(new, node_mask):
            return alive
        node_mask.copy_(new)


@_device.guard("graph", "graph.adjacency_matrix")
def prune_graph_sparse(
    graph: Any,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    *,
    k: int | None = None,
    logit_probabilities: torch.Tensor | None = None,
    n_tokens: int | None = None,
    n_features: int | None = None,
    backend: str | None = None,
) -> SparsePruneResult:
    """``prune_graph`` for graphs too large for a dense N x N edge mask; the result is CSR.

    ``graph`` is a circuit-tracer Graph (its adjacency dense, SparseEdges or torch sparse), or a
    :class:`SparseEdges` / torch sparse matrix together with ``logit_probabilities``, ``n_tokens``
    and ``n_features``. A dense adjacency is first reduced to its ``k`` strongest incoming edges per
    node (``k=None``: every non-zero) by :func:`topk_edges`. A graph from
    ``fastattr.attribute(edge_storage="topk")`` carries ``row_abs_sum`` (and, when every feature
    was attributed, the exact ``node_influence``); with ``k=None`` its stored entries are used with
    those sums and that influence (``prune_graph`` does the same for such a graph).

    With every non-zero stored, the masks equal the dense ``prune_graph``'s (edges kept = the true
    entries of its edge mask), except when the edge threshold clamps (threshold 0: the dense mask
    then keeps all N^2 entries, here every stored edge). With top-k, the unstored entries are
    treated as weak edges that are never kept: the row sums used for normalisation are still the
    full rows' (unstored |A| counts as input from kept nodes when the graph is pruned), and the
    cumulative edge fractions are over the stored edges.
    """
    node_threshold, edge_threshold = _check_thresholds(node_threshold, edge_threshold)
    edges = as_sparse_edges(graph)
    sparse_input = edges is not None
    recorded_influence = None
    if edges is not None:
        missing = [k for k, v in (("logit_probabilities", logit_probabilities), ("n_tokens", n_tokens),
                                  ("n_features", n_features)) if v is None]  # fmt: skip
        if missing:
            raise TypeError(
                f"{missing[0]}: expected a value when graph is a sparse matrix (pass logit_probabilities, n_tokens and "
                f"n_features), got None for {', '.join(missing)}"
            )
        probs = logit_probabilities
    else:
        n_tok, n_log, n_feat = _sizes(graph)
        probs = graph.logit_probabilities
        n_tokens = n_tok if n_tokens is None else n_tokens
        n_features = n_feat if n_features is None else n_features
        edges = as_sparse_edges(graph.adjacency_matrix)
        if edges is None and k is None:
            edges = _recorded_edges(graph)
            if edges is not None:
                recorded_influence = _topk_record(graph)[1]
        if edges is None:
            _check_graph(graph)
            edges = topk_edges(graph.adjacency_matrix, k, backend=backend)
    probs_name = "logit_probabilities" if sparse_input else "graph.logit_probabilities"
    n = edges.shape[0]
    if edges.shape[0] != edges.shape[1]:
        raise ValueError(f"graph: expected a square adjacency, got shape {edges.shape}")
    if n == 0:
        raise _checks.EmptyGraphError(
            "graph: expected at least one node, got a 0 x 0 adjacency (circuit-tracer's prune_graph fails with "
            "IndexError here)"
        )
    # User-supplied CSR is indexed by the kernels below: its structure is checked first.
    edges.validate("graph" if sparse_input else "graph.adjacency_matrix")
    _checks.check_tensor(probs, probs_name, ndim=1)
    if not probs.is_floating_point():
        raise TypeError(f"{probs_name}: expected a floating-point tensor, got {str(probs.dtype).replace('torch.', '')}")
    _checks.check_finite(probs, probs_name)
    n_logits = probs.numel()
    n_tokens = _checks.check_number(n_tokens, "n_tokens", integer=True)
    n_features = _checks.check_number(n_features, "n_features", integer=True)
    for arg, v in (("n_tokens", n_tokens), ("n_features", n_features)):
        if v < 0:
            raise ValueError(f"{arg}: expected a non-negative count, got {v}")
    if n_features + n_tokens + n_logits > n:
        raise ValueError(
            f"n_features: expected n_features + n_tokens + n_logits <= {n} (the adjacency's size), got "
            f"{n_features} + {n_tokens} + {n_logits}"
        )
    dev = edges.device
    w = _logit_weights(n, probs, dev)

    if recorded_influence is not None:
        # Accumulated from the full rows while they were written: exact, whatever the store dropped.
        recorded_influence = recorded_influence.to(dev)
        _checks.check_tensor(recorded_influence, "graph.node_influence", ndim=1)
        _checks.check_shape(recorded_influence, "graph.node_influence", (n,))
        infl = recorded_influence.float()
    else:
        infl = influence_sparse(edges, w, normalize=True)
    node_mask = infl >= threshold.find_threshold(infl, node_threshold, backend=backend)
    node_mask[-n_logits - n_tokens :] = True

    rows, cols = edges.row_indices(), edges.col_indices
    absv = edges.values.abs().double()
    kept = node_mask[rows] & node_mask[cols]
    stored = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, rows, absv)
    kept_sum = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, rows, torch.where(kept, absv, 0.0))
    unstored = (edges.row_abs_sum.double() - stored).clamp(min=0.0)
    # Relative round-off of the recorded float32 sums is not "unstored mass".
    unstored = torch.where(unstored > 1e-6 * edges.row_abs_sum.double(), unstored, 0.0)
    row_scale = torch.where(node_mask, kept_sum + unstored, 0.0).float().clamp(min=NORMALIZE_EPS)
    infl2 = influence_sparse(edges, w, normalize=True, node_mask=node_mask, row_scale=row_scale)
    factor = infl2 + w
    a32 = edges.values.abs().float()
    scores = torch.where(kept, (a32 / row_scale[rows]) * factor[rows], torch.zeros_like(a32))
    if bool((factor < 0).any()):
        raise ValueError("logit_probabilities: expected non-negative logit weights for sparse pruning")
    thr, keep_all = _threshold_fixed_total(scores, edge_threshold, backend)
    edge_keep = torch.ones_like(kept) if keep_all else scores >= thr
    er, ec = rows[edge_keep], cols[edge_keep]
    survive = _remove_dangling_sparse(er, ec, node_mask, n_features, n_logits + n_tokens)
    er, ec = er[survive], ec[survive]
    vals = edges.values[edge_keep][survive]
    crow = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    crow[1:] = torch.cumsum(torch.bincount(er, minlength=n), 0)
    kept_edges = SparseEdges(crow, ec, vals, edges.row_abs_sum, edges.shape)
    return SparsePruneResult(node_mask, kept_edges, reference.cumulative_node_scores(infl))


# The kernels reproduce circuit-tracer's float32 rounding; other dtypes run the torch reference.
_backends.declare_dtypes("prune_graph", ("cuda", "triton", "cpu"), (torch.float32,))
