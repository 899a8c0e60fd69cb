"""Graph pruning and scores: circuit-tracer's ``prune_graph`` and ``compute_graph_scores`` without its
N x N temporaries or its sort of N^2 edge scores.

circuit-tracer's ``prune_graph`` at N nodes allocates the normalised matrix, a clone of the
adjacency, the pruned normalised matrix, the edge scores and their sorted copy and cumulative sum
(about 30 bytes per N^2 element) and sorts N^2 values. The dense path here keeps to the adjacency
(4 bytes per element, read in place), the boolean edge mask it returns (1 byte) and O(N) vectors,
plus at most 1 byte per element of candidate scores while the edge threshold is resolved:

1. node influence: one sweep over A (cpu) or the fused power iteration (cuda/triton);
2. node threshold: :func:`fastattr.ops.threshold.find_threshold` on the N influences (exact);
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
reaches 1. See ``tests/ops/test_pruning.py`` and the module docstring of :mod:`fastattr.ops.threshold`.

Backends. ``prune_graph``'s backend runs every step above; negative logit weights (edge scores
without the bit order) run the torch backend instead, logged and reported by ``last_backend``. A
top-k graph (one with ``row_abs_sum``) is pruned as sparse: ``prune_graph_sparse`` on the same
backend. ``prune_graph_sparse``'s backend is the one whose kernels run its selects: the top-k of a
dense adjacency (``topk_edges``), the node threshold (``find_threshold``) and the edge threshold
with its fixed total (``find_threshold_fixed_total``), each reported by ``last_backend`` under its
own name; its influence power series over the stored entries and its O(nnz) edge scores are torch
code on the graph's device for every backend.

Determinism. ``deterministic=True`` (or torch.use_deterministic_algorithms) runs the fixed-order
variants of every reduction whose order varies: the device matvec of the influence series, the
device edge histograms (exact integer significand sums, see :mod:`fastattr.ops.threshold`) and, for
sparse graphs on CUDA, the row and column sums over the stored entries (sorted index order instead
of atomics). The cpu kernels are deterministic in both modes (static row splits, thread-order merges).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from fastattr import reference
from fastattr._runtime import backends as _backends
from fastattr._runtime import checks as _checks
from fastattr._runtime import device as _device
from fastattr._runtime import ext as _ext
from fastattr.ops import threshold
from fastattr.ops.influence import (
    NORMALIZE_EPS,
    compute_node_influence,
    influence_cpu,
    influence_sparse,
    power_influence_device,
    scatter_add,
)
from fastattr.reference import PruneResult
from fastattr.ops.sparse_edges import SparseEdges, as_sparse_edges
from fastattr.ops.topk_edges import topk_edges

logger = logging.getLogger("fastattr")

__all__ = ["PruneResult", "SparsePruneResult", "compute_graph_scores", "prune_graph", "prune_graph_sparse"]

PRUNE = _backends.op("prune_graph")
PRUNE_SPARSE = _backends.op("prune_graph_sparse")


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
    # circuit-tracer iterates to max_iter on a NaN weight; the influence would name no argument.
    _checks.check_finite(probs, "graph.logit_probabilities")
    return A, n_tokens, n_logits, n_features


def _node_mask(infl: torch.Tensor, node_threshold: float, n_fixed: int, backend: str, deterministic: bool):
    """circuit-tracer's node mask: influence >= its threshold, and the last n_fixed nodes (logits and
    tokens) kept (n_fixed = 0 keeps every node, as its ``mask[-0:]`` does)."""
    node_mask = infl >= threshold.find_threshold(infl, node_threshold, backend=backend, deterministic=deterministic)
    node_mask[-n_fixed:] = True
    return node_mask


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


# ------------------------------------------------------------------------------------------------
# The edge passes of the device backends: one histogram level and the mask, per backend
# ------------------------------------------------------------------------------------------------


class _EdgePasses(NamedTuple):
    hist: Callable  # (A, mask_u8, scale, factor, level, prefix, *, deterministic) -> threshold.Hist
    mask: Callable  # (A, mask_u8, scale, factor, thr) -> bool (n, n): score >= thr


def _edge_hist_cuda(A, mask_u8, scale, factor, level: int, prefix: int, *, deterministic: bool) -> threshold.Hist:
    count, sums, stats = threshold.hist_buffers(level, A.device, deterministic)
    n = A.shape[0]
    _ext.ext.edge_hist_cuda(
        a=A.data_ptr(), a_dtype=_ext.dtype_code(A), n=n, lda=A.stride(0) if n else n, node_mask=mask_u8.data_ptr(),
        row_scale=scale.data_ptr(), row_factor=factor.data_ptr(), level=level, prefix=prefix, count=count.data_ptr(),
        sums=0 if deterministic else sums.data_ptr(), sig_sums=sums.data_ptr() if deterministic else 0,
        stats=stats.data_ptr(), deterministic=deterministic, stream=_ext.cuda_stream(A.device),
    )
    return threshold.decode_hist(count, sums, stats, level, prefix, deterministic)


def _edge_mask_cuda(A, mask_u8, scale, factor, thr: float) -> torch.Tensor:
    n = A.shape[0]
    out = torch.empty((n, n), dtype=torch.bool, device=A.device)
    _ext.ext.edge_mask_cuda(
        a=A.data_ptr(), a_dtype=_ext.dtype_code(A), n=n, lda=A.stride(0) if n else n, node_mask=mask_u8.data_ptr(),
        row_scale=scale.data_ptr(), row_factor=factor.data_ptr(), thr=float(thr), edge_mask=out.data_ptr(),
        stream=_ext.cuda_stream(A.device),
    )
    return out


def _edge_hist_triton(A, mask_u8, scale, factor, level: int, prefix: int, *, deterministic: bool) -> threshold.Hist:
    from fastattr.triton_kernels import threshold as tk

    count, sums, stats = threshold.hist_buffers(level, A.device, deterministic)
    tk.edge_hist(A, mask_u8, scale, factor, level, prefix, count, sums, stats, deterministic=deterministic)
    return threshold.decode_hist(count, sums, stats, level, prefix, deterministic)


def _edge_mask_triton(A, mask_u8, scale, factor, thr: float) -> torch.Tensor:
    from fastattr.triton_kernels import threshold as tk

    n = A.shape[0]
    out = torch.empty((n, n), dtype=torch.bool, device=A.device)
    tk.edge_mask(A, mask_u8, scale, factor, thr, out)
    return out


_EDGE_PASSES = {"cuda": _EdgePasses(_edge_hist_cuda, _edge_mask_cuda),
                "triton": _EdgePasses(_edge_hist_triton, _edge_mask_triton)}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Dense pruning per backend
# ------------------------------------------------------------------------------------------------


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


def _negative_weights_on_torch(graph, node_threshold: float, edge_threshold: float, deterministic: bool):
    """Negative logit weights give negative edge scores, which lose the bit order: the torch backend
    (circuit-tracer's sort) runs instead, and last_backend says so."""
    logger.info("prune_graph: negative edge scores (negative logit weights); running the torch backend")
    A = graph.adjacency_matrix
    impl = PRUNE.select(A.device, "torch", dtype=A.dtype, arg="graph.adjacency_matrix")
    return impl.fn(graph, node_threshold, edge_threshold, deterministic, False)


def _edge_select_cpu(A: torch.Tensor, node_mask: torch.Tensor, e: dict, edge_threshold: float,
                     row_blocks: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The fused edge threshold and mask of the cpu backend, from the sweep's edge statistics."""
    n = A.shape[0]
    edge_mask = torch.empty((n, n), dtype=torch.bool)
    mask_u8 = node_mask.to(torch.uint8)  # held until the call returns: the kernel reads its pointer
    status, *_ = _ext.ext.edge_select_mask_cpu(
        a=A.data_ptr(), a_dtype=_ext.dtype_code(A), n=n, lda=A.stride(0) if n else n,
        node_mask=mask_u8.data_ptr(), row_scale=e["row_scale"].data_ptr(),
        row_factor=e["row_factor"].data_ptr(), hist_count=e["hist_count"].data_ptr(), hist_sum=e["hist_sum"].data_ptr(),
        total=e["edge_sum"], nnz=e["edge_nnz"], min_nz=e["edge_min"], t=float(edge_threshold),
        edge_mask=edge_mask.data_ptr(),
        # Candidates cost 12 B each plus a 4 B copy while resolved: n^2/24 of them stay within
        # 0.7 B per element (a bucket that is larger gets one more histogram pass instead).
        max_candidates=max(n * n // 24, 1 << 16), row_blocks=_ext.ptr(row_blocks),
    )
    return status, edge_mask


def _prune_dense_cpu(graph, node_threshold: float, edge_threshold: float, deterministic: bool) -> PruneResult:
    # The sweep and the edge select are deterministic in both modes (module docstring).
    A, n_tokens, n_logits, n_features = _check_graph(graph)
    A = _checks.row_major(A, "graph.adjacency_matrix")
    n = A.shape[0]
    w = _logit_weights(n, graph.logit_probabilities, A.device)

    infl, info = influence_cpu(A, w, normalize=True, record_waves=True, a_name="graph.adjacency_matrix")
    node_mask = _node_mask(infl, node_threshold, n_logits + n_tokens, "cpu", deterministic)
    _, e = influence_cpu(
        A, w, normalize=True, node_mask=node_mask, waves=info["waves"], row_blocks=info["row_blocks"],
        edge_stats=True, a_name="graph.adjacency_matrix",
    )
    if float(e["row_factor"].min()) < 0.0:
        return _negative_weights_on_torch(graph, node_threshold, edge_threshold, deterministic)
    if not np.isfinite(e["edge_sum"]):
        _check_edge_select(threshold.NON_FINITE, graph)
    status, edge_mask = _edge_select_cpu(A, node_mask, e, edge_threshold, info["row_blocks"])
    _check_edge_select(status, graph)
    _ext.ext.remove_dangling_cpu(edge_mask=edge_mask.data_ptr(), n=n, node_mask=node_mask.data_ptr(),
                                 n_features=n_features, n_fixed=n_logits + n_tokens)  # fmt: skip
    return PruneResult(node_mask, edge_mask, reference.cumulative_node_scores(infl))


def _prune_dense_device(graph, node_threshold: float, edge_threshold: float, backend: str,
                        deterministic: bool) -> PruneResult:
    A, n_tokens, n_logits, n_features = _check_graph(graph)
    A = _checks.row_major(A, "graph.adjacency_matrix")
    n = A.shape[0]
    w = _logit_weights(n, graph.logit_probabilities, A.device)
    passes = _EDGE_PASSES[backend]

    infl, _ = power_influence_device(A, w, backend, normalize=True, a_name="graph.adjacency_matrix",
                                     deterministic=deterministic)  # fmt: skip
    node_mask = _node_mask(infl, node_threshold, n_logits + n_tokens, backend, deterministic)
    mask_u8 = node_mask.to(torch.uint8)
    infl2, scale = power_influence_device(A, w, backend, normalize=True, node_mask=node_mask,
                                          a_name="graph.adjacency_matrix", deterministic=deterministic)  # fmt: skip
    factor = infl2 + w
    # The fused rule: S is the scores' exactly accumulated total rounded to float32 (rel_s = 0).
    sel = threshold.radix_select(
        lambda level, prefix: passes.hist(A, mask_u8, scale, factor, level, prefix, deterministic=deterministic),
        n * n, edge_threshold,
    )
    if sel.status == threshold.NEGATIVE:
        return _negative_weights_on_torch(graph, node_threshold, edge_threshold, deterministic)
    _check_edge_select(sel.status, graph)
    if sel.status == threshold.ALL_ZERO or sel.clamped:
        edge_mask = torch.ones((n, n), dtype=torch.bool, device=A.device)
    else:
        edge_mask = passes.mask(A, mask_u8, scale, factor, sel.value)
    reference.remove_dangling_nodes(node_mask, edge_mask, n_features, n_logits + n_tokens)
    return PruneResult(node_mask, edge_mask, reference.cumulative_node_scores(infl))


def _prune_stored(graph, node_threshold: float, edge_threshold: float, backend: str, deterministic: bool):
    """A top-k graph: its stored edges pruned with its recorded row sums on ``backend``, returned
    as prune_graph's dense masks."""
    A = graph.adjacency_matrix
    logger.info("prune_graph: the graph has row_abs_sum (top-k edge storage); pruning its stored edges with those sums")
    res = prune_graph_sparse(graph, node_threshold, edge_threshold, backend=backend, deterministic=deterministic)
    edge_mask = torch.zeros(A.shape, dtype=torch.bool, device=A.device)
    edge_mask[res.edges.row_indices(), res.edges.col_indices] = True
    return PruneResult(res.node_mask, edge_mask, res.cumulative_scores)


# The launch helpers: ``stored`` is the sparse layout, a top-k graph pruned by prune_graph_sparse.


@PRUNE.register("cpu", dtypes=(torch.float32,), layouts=("strided", "sparse"))
def _prune_cpu(graph, node_threshold, edge_threshold, deterministic, stored):
    if stored:
        return _prune_stored(graph, node_threshold, edge_threshold, "cpu", deterministic)
    return _prune_dense_cpu(graph, node_threshold, edge_threshold, deterministic)


@PRUNE.register("cuda", dtypes=(torch.float32,), layouts=("strided", "sparse"))
def _prune_cuda(graph, node_threshold, edge_threshold, deterministic, stored):
    if stored:
        return _prune_stored(graph, node_threshold, edge_threshold, "cuda", deterministic)
    return _prune_dense_device(graph, node_threshold, edge_threshold, "cuda", deterministic)


@PRUNE.register("triton", dtypes=(torch.float32,), layouts=("strided", "sparse"))
def _prune_triton(graph, node_threshold, edge_threshold, deterministic, stored):
    if stored:
        return _prune_stored(graph, node_threshold, edge_threshold, "triton", deterministic)
    return _prune_dense_device(graph, node_threshold, edge_threshold, "triton", deterministic)


@PRUNE.register("torch", layouts=("strided", "sparse"))
def _prune_torch(graph, node_threshold, edge_threshold, deterministic, stored):
    # circuit-tracer's code: sorts, cumsums and dense matmuls, fixed-order on every device.
    if stored:
        return _prune_stored(graph, node_threshold, edge_threshold, "torch", deterministic)
    A, *_ = _check_graph(graph)
    _checks.check_finite(A, "graph.adjacency_matrix")
    return reference.prune_graph(graph, node_threshold, edge_threshold)


def _check_thresholds(node_threshold, edge_threshold) -> tuple[float, float]:
    # numpy scalars and 0-d tensors pass, as in circuit-tracer; NaN, which its range test lets
    # through, does not.
    node_threshold = _checks.check_number(node_threshold, "node_threshold")
    edge_threshold = _checks.check_number(edge_threshold, "edge_threshold")
    try:
        reference.check_thresholds(node_threshold, edge_threshold)  # circuit-tracer's messages
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
    graph: Any, node_threshold: float = 0.8, edge_threshold: float = 0.98, *, backend: str | None = None,
    deterministic: bool | None = None,
) -> PruneResult:
    """Keep the nodes and edges that carry the given fractions of influence on the logits.

    A drop-in for circuit-tracer's ``prune_graph``: same arguments, the same
    ``PruneResult(node_mask, edge_mask, cumulative_scores)``, computed without N x N temporaries
    beyond the returned edge mask (see the module docstring for exactness, backends and
    ``deterministic``: None follows torch.are_deterministic_algorithms_enabled()).
    """
    node_threshold, edge_threshold = _check_thresholds(node_threshold, edge_threshold)
    A, *_ = _check_graph(graph)
    _check_not_empty(A)
    det = _backends.deterministic(deterministic)
    # Normalising a top-k graph by its stored entries alone would inflate every row's weights.
    stored = _topk_record(graph) is not None
    impl = PRUNE.select(A.device, backend, dtype=A.dtype, layout="sparse" if stored else "strided",
                        arg="graph.adjacency_matrix")  # fmt: skip
    return impl.fn(graph, node_threshold, edge_threshold, det, stored)


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
def compute_graph_scores(graph: Any, *, backend: str | None = None,
                         deterministic: bool | None = None) -> tuple[float, float]:
    """(replacement score, completeness score), as circuit-tracer's ``compute_graph_scores``.

    Its one kernel is the node influence: ``backend`` and ``deterministic`` go to
    :func:`fastattr.compute_node_influence` (``last_backend("compute_node_influence")`` reports it);
    the error fractions are row-chunked torch reductions on the graph's device."""
    A, n_tokens, n_logits, n_features = _check_graph(graph)
    if not hasattr(graph, "cfg") or not hasattr(graph.cfg, "n_layers"):
        raise TypeError(
            f"graph: expected .cfg.n_layers (the model's number of layers), got a {type(graph).__name__} without it"
        )
    error_start = n_features
    error_end = error_start + n_tokens * int(graph.cfg.n_layers)
    token_end = error_end + n_tokens
    w = _logit_weights(A.shape[0], graph.logit_probabilities, A.device)
    node_influence = compute_node_influence(A, w, backend=backend, deterministic=deterministic)
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


@dataclass
class _SparseGraph:
    """prune_graph_sparse's checked inputs: stored edges, or a dense adjacency to reduce to its top k."""

    edges: SparseEdges | None
    adjacency: torch.Tensor | None
    k: int | None
    row_abs_sum: torch.Tensor | None  # a top-k graph's recorded full-row sums (replace the stored rows')
    influence: torch.Tensor | None  # a top-k graph's recorded exact node influence
    probs: torch.Tensor
    n: int
    n_tokens: int
    n_features: int

    @property
    def device(self) -> torch.device:
        return self.edges.device if self.edges is not None else self.adjacency.device

    @property
    def dtype(self) -> torch.dtype:
        return self.edges.values.dtype if self.edges is not None else self.adjacency.dtype


def _check_counts(n: int, n_tokens, n_features, n_logits: int) -> tuple[int, int]:
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
    return n_tokens, n_features


def _check_probs(probs, name: str) -> None:
    _checks.check_tensor(probs, name, ndim=1)
    if not probs.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {str(probs.dtype).replace('torch.', '')}")
    _checks.check_finite(probs, name)


def _from_sparse_matrix(edges: SparseEdges, logit_probabilities, n_tokens, n_features) -> _SparseGraph:
    missing = [k for k, v in (("logit_probabilities", logit_probabilities), ("n_tokens", n_tokens),
                              ("n_features", n_features)) if v is None]  # fmt: skip
    if missing:
        raise TypeError(
            f"{missing[0]}: expected a value when graph is a sparse matrix (pass logit_probabilities, n_tokens and "
            f"n_features), got None for {', '.join(missing)}"
        )
    return _SparseGraph(edges, None, None, None, None, logit_probabilities, edges.shape[0], n_tokens, n_features)


def _from_graph(graph, k, n_tokens, n_features) -> _SparseGraph:
    n_tok, _, n_feat = _sizes(graph)
    n_tokens = n_tok if n_tokens is None else n_tokens
    n_features = n_feat if n_features is None else n_features
    probs = graph.logit_probabilities
    edges = as_sparse_edges(graph.adjacency_matrix)
    if edges is not None:
        return _SparseGraph(edges, None, None, None, None, probs, edges.shape[0], n_tokens, n_features)
    _check_graph(graph)
    A = graph.adjacency_matrix
    record = _topk_record(graph) if k is None else None
    if record is None:
        return _SparseGraph(None, A, k, None, None, probs, A.shape[0], n_tokens, n_features)
    # A top-k graph from fastattr.attribute(edge_storage="topk"): its stored (non-zero) entries with
    # the row sums it recorded, which cover the edges that were not stored. Graph.to(device) moves
    # the adjacency but not these O(N) extras: they follow the adjacency.
    sums = record[0].to(A.device)
    _checks.check_tensor(sums, "graph.row_abs_sum", ndim=1)
    _checks.check_shape(sums, "graph.row_abs_sum", (A.shape[0],))
    _checks.check_finite(sums, "graph.row_abs_sum")
    infl = record[1]
    if infl is not None:
        infl = infl.to(A.device)
        _checks.check_tensor(infl, "graph.node_influence", ndim=1)
        _checks.check_shape(infl, "graph.node_influence", (A.shape[0],))
    return _SparseGraph(None, A, None, sums.float(), infl, probs, A.shape[0], n_tokens, n_features)


def _sparse_graph(graph, k, logit_probabilities, n_tokens, n_features) -> _SparseGraph:
    """prune_graph_sparse's arguments, checked before any kernel runs."""
    edges = as_sparse_edges(graph)
    src = (_from_sparse_matrix(edges, logit_probabilities, n_tokens, n_features) if edges is not None
           else _from_graph(graph, k, n_tokens, n_features))  # fmt: skip
    sparse_input = edges is not None
    if src.edges is not None:
        if src.edges.shape[0] != src.edges.shape[1]:
            raise ValueError(f"graph: expected a square adjacency, got shape {src.edges.shape}")
    if src.n == 0:
        raise _checks.EmptyGraphError(
            "graph: expected at least one node, got a 0 x 0 adjacency (circuit-tracer's prune_graph fails with "
            "IndexError here)"
        )
    if src.edges is not None:  # user-supplied CSR is indexed by the kernels: its structure first
        src.edges.validate("graph" if sparse_input else "graph.adjacency_matrix")
    _check_probs(src.probs, "logit_probabilities" if sparse_input else "graph.logit_probabilities")
    src.n_tokens, src.n_features = _check_counts(src.n, src.n_tokens, src.n_features, src.probs.numel())
    return src


def _pruned_row_scale(edges: SparseEdges, node_mask: torch.Tensor, rows: torch.Tensor, kept: torch.Tensor,
                      deterministic: bool) -> torch.Tensor:
    """max(rowsum, eps) of the pruned graph: kept stored |A| plus the row's unstored |A| (the full
    row sum minus the stored entries), which counts as input from kept nodes."""
    n = edges.shape[0]
    absv = edges.values.abs().double()
    zeros = torch.zeros(n, dtype=torch.float64, device=edges.device)
    stored = scatter_add(zeros.clone(), rows, absv, deterministic=deterministic)
    kept_sum = scatter_add(zeros, rows, torch.where(kept, absv, 0.0), deterministic=deterministic)
    unstored = (edges.row_abs_sum.double() - stored).clamp(min=0.0)
    # Relative round-off of the recorded float32 sums is not "unstored mass".
    unstored = torch.where(unstored > 1e-6 * edges.row_abs_sum.double(), unstored, 0.0)
    return torch.where(node_mask, kept_sum + unstored, 0.0).float().clamp(min=NORMALIZE_EPS)


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


def _prune_sparse(src: _SparseGraph, node_threshold: float, edge_threshold: float, backend: str,
                  deterministic: bool) -> SparsePruneResult:
    """The sparse pipeline with ``backend``'s selects (module docstring, Backends)."""
    edges = src.edges
    if edges is None:
        edges = topk_edges(src.adjacency, src.k, backend=backend)
        if src.row_abs_sum is not None:
            edges = SparseEdges(edges.crow_indices, edges.col_indices, edges.values, src.row_abs_sum, edges.shape)
    n, dev = src.n, edges.device
    n_fixed = src.probs.numel() + src.n_tokens
    w = _logit_weights(n, src.probs, dev)
    # A recorded influence was accumulated from the full rows while they were written: exact,
    # whatever the store dropped.
    infl = (src.influence.float() if src.influence is not None
            else influence_sparse(edges, w, normalize=True, deterministic=deterministic))  # fmt: skip
    node_mask = _node_mask(infl, node_threshold, n_fixed, backend, deterministic)

    rows, cols = edges.row_indices(), edges.col_indices
    kept = node_mask[rows] & node_mask[cols]
    row_scale = _pruned_row_scale(edges, node_mask, rows, kept, deterministic)
    factor = influence_sparse(edges, w, normalize=True, node_mask=node_mask, row_scale=row_scale,
                              deterministic=deterministic) + w  # fmt: skip
    if bool((factor < 0).any()):
        raise ValueError("logit_probabilities: expected non-negative logit weights for sparse pruning")
    a32 = edges.values.abs().float()
    scores = torch.where(kept, (a32 / row_scale[rows]) * factor[rows], torch.zeros_like(a32))
    thr, keep_all = threshold.find_threshold_fixed_total(
        scores, edge_threshold, float(torch.sum(scores, dtype=torch.float64)), backend=backend,
        deterministic=deterministic,
    )
    edge_keep = torch.ones_like(kept) if keep_all else scores >= thr
    er, ec = rows[edge_keep], cols[edge_keep]
    survive = _remove_dangling_sparse(er, ec, node_mask, src.n_features, n_fixed)
    er, ec = er[survive], ec[survive]
    crow = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    crow[1:] = torch.cumsum(torch.bincount(er, minlength=n), 0)
    kept_edges = SparseEdges(crow, ec, edges.values[edge_keep][survive], edges.row_abs_sum, edges.shape)
    return SparsePruneResult(node_mask, kept_edges, reference.cumulative_node_scores(infl))


@PRUNE_SPARSE.register("cpu", dtypes=(torch.float32,), layouts=("strided", "sparse"))
def _prune_sparse_cpu(src, node_threshold, edge_threshold, deterministic):
    return _prune_sparse(src, node_threshold, edge_threshold, "cpu", deterministic)


@PRUNE_SPARSE.register("cuda", dtypes=(torch.float32,), layouts=("strided", "sparse"))
def _prune_sparse_cuda(src, node_threshold, edge_threshold, deterministic):
    return _prune_sparse(src, node_threshold, edge_threshold, "cuda", deterministic)


@PRUNE_SPARSE.register("triton", dtypes=(torch.float32,), layouts=("strided", "sparse"))
def _prune_sparse_triton(src, node_threshold, edge_threshold, deterministic):
    return _prune_sparse(src, node_threshold, edge_threshold, "triton", deterministic)


@PRUNE_SPARSE.register("torch", layouts=("strided", "sparse"))
def _prune_sparse_torch(src, node_threshold, edge_threshold, deterministic):
    return _prune_sparse(src, node_threshold, edge_threshold, "torch", deterministic)


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
    deterministic: bool | None = None,
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
    cumulative edge fractions are over the stored edges. ``backend`` and ``deterministic``: see
    the module docstring.
    """
    node_threshold, edge_threshold = _check_thresholds(node_threshold, edge_threshold)
    src = _sparse_graph(graph, k, logit_probabilities, n_tokens, n_features)
    det = _backends.deterministic(deterministic)
    impl = PRUNE_SPARSE.select(src.device, backend, dtype=src.dtype,
                               layout="sparse" if src.adjacency is None or src.row_abs_sum is not None else "strided",
                               arg="graph")  # fmt: skip
    return impl.fn(src, node_threshold, edge_threshold, det)
