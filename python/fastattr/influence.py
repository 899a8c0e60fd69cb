"""Influence of every node on the logits: sum_{k>=1} w A^k without materialising the normalised matrix.

circuit-tracer builds the row-normalised |A| (an N x N copy) and iterates ``x <- x @ A`` until the
vector is exactly zero, which happens after the DAG's depth. Here the normalisation is applied to
the vector instead, x_{k+1} = (x_k / max(rowsum_i, eps)) @ |A|, with |A| taken on the fly, so only
the adjacency itself is ever read.

* cpu: one pass over A on a DAG. With Kahn's topological waves each target row is processed once,
  after every row that reads from it, and scattered with its final coefficient (w_i + infl_i) /
  rowsum_i; the longest path from a weighted node reproduces circuit-tracer's iteration count, so
  the non-convergence error is raised exactly when circuit-tracer raises. Matrices with a cycle
  fall back to the power iteration. Accumulation is in double.
* cuda / triton: the power iteration, one fused |A|-matvec kernel per step.
* torch: circuit-tracer's code (``reference``).

Results agree with circuit-tracer to float32 rounding (relative differences ~1e-7: the order of
the additions differs, and the double accumulation here is the more accurate one).

Sparse inputs (:class:`~fastattr.SparseEdges` or torch sparse CSR/COO) use the stored
entries and the recorded full-row |A| sums, by a power iteration over the non-zeros.
"""

from __future__ import annotations

import logging
import math

import torch

from fastattr import _backends, _checks, _device, _ext, reference
from fastattr.sparse_edges import SparseEdges, as_sparse_edges

logger = logging.getLogger("fastattr")

NORMALIZE_EPS = 1e-10  # circuit-tracer's normalize_matrix clamp
PARTIAL_EPS = 1e-8  # compute_partial_influences' clamp

# Statuses of the compiled kernels (csrc/graph.h InfluenceStatus).
_OK, _NO_CONVERGENCE, _NON_FINITE = 0, 1, 2


def _converge_error(steps: int) -> RuntimeError:
    return RuntimeError(f"Influence computation failed to converge after {steps} iterations")


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _check_dense(A: torch.Tensor, w: torch.Tensor, a_name: str) -> None:
    _checks.check_tensor(A, a_name, ndim=2)
    if not A.is_floating_point():
        raise TypeError(f"{a_name}: expected a floating-point tensor, got {_dt(A)}")
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"{a_name}: expected a square matrix, got shape {tuple(A.shape)}")
    _checks.check_tensor(w, "logit_weights", ndim=1)
    _checks.check_shape(w, "logit_weights", (A.shape[0],))
    _checks.check_same_device(a_name, A, "logit_weights", w)
    if not w.is_floating_point():
        raise TypeError(f"logit_weights: expected a floating-point tensor, got {_dt(w)}")
    _checks.check_finite(w, "logit_weights", _checks.NonFiniteInfluenceError)


def _check_sparse(edges: SparseEdges, w, a_name: str) -> None:
    if edges.shape[0] != edges.shape[1]:
        raise ValueError(f"{a_name}: expected a square matrix, got shape {edges.shape}")
    edges.validate(a_name)
    _checks.check_tensor(w, "logit_weights", ndim=1, device=edges.device)
    _checks.check_shape(w, "logit_weights", (edges.shape[0],))
    if not w.is_floating_point():
        raise TypeError(f"logit_weights: expected a floating-point tensor, got {_dt(w)}")
    _checks.check_finite(w, "logit_weights", _checks.NonFiniteInfluenceError)


def _check_result(infl: torch.Tensor, a_name: str) -> torch.Tensor:
    """Every backend raises where an influence term overflows float32 (circuit-tracer then fails to
    converge) rather than returning Inf (cpu, double accumulation) or NaN (triton)."""
    if not bool(torch.isfinite(infl).all()):
        raise _checks.NonFiniteInfluenceError(
            f"{a_name}: expected entries whose influence series fits float32, got an influence with "
            f"{_checks.describe_nonfinite(infl)}; circuit-tracer's iteration does not converge here. Scale {a_name} down"
        )
    return infl


def _torch_influence(A: torch.Tensor, w: torch.Tensor, max_iter: int, a_name: str) -> torch.Tensor:
    """reference.compute_influence's operations, stopping at the first non-finite term instead of
    iterating on it until max_iter."""
    term = w @ A
    total = term
    steps = 0
    while term.any():
        if not bool(torch.isfinite(term).all()):
            _check_result(term, a_name)
        if steps >= max_iter:
            raise _converge_error(steps)
        term = term @ A
        total += term
        steps += 1
    return total


def _check_max_iter(max_iter) -> int:
    max_iter = _checks.check_number(max_iter, "max_iter", integer=True)
    if max_iter < 0:
        raise ValueError(f"max_iter: expected a non-negative int, got {max_iter}")
    return max_iter


def _row_major(a: torch.Tensor, name: str) -> torch.Tensor:
    return _checks.row_major(a, name)


# ------------------------------------------------------------------------------------------------
# Dense kernels per backend: each returns the float32 influence or raises.
# ------------------------------------------------------------------------------------------------


def influence_cpu(
    A: torch.Tensor,
    w: torch.Tensor,
    *,
    normalize: bool,
    eps: float = NORMALIZE_EPS,
    node_mask: torch.Tensor | None = None,
    max_iter: int = 1000,
    waves: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    row_blocks: torch.Tensor | None = None,
    record_waves: bool = False,
    edge_stats: bool = False,
    a_name: str = "A",
):
    """The compiled CPU sweep. Returns (influence, info) where info holds the waves (for reuse on a
    pruned subgraph) and, with ``edge_stats``, the pruned graph's edge-score statistics."""
    A = _row_major(A, a_name)
    n = A.shape[0]
    w = w.to(torch.float32).contiguous()
    out = torch.empty(n, dtype=torch.float32)
    mask_u8 = None if node_mask is None else node_mask.to(torch.uint8).contiguous()
    if waves is not None:
        order, wave_ptr, n_waves = waves
        reuse = n_waves >= 0
    elif record_waves:
        order = torch.empty(n, dtype=torch.int32)
        wave_ptr = torch.empty(n + 1, dtype=torch.int32)
        n_waves, reuse = 0, False
    else:
        order = wave_ptr = None
        n_waves, reuse = 0, False
    if waves is not None and not reuse:
        order = wave_ptr = None
    if record_waves and row_blocks is None:
        # Bitmaps of each row's non-zero 64-column blocks, reused by the passes on the pruned graph.
        row_blocks = torch.empty((n, -(-n // 4096)), dtype=torch.int64)
    elif not reuse:
        row_blocks = None  # recorded by the first pass only
    row_scale = row_factor = hist_count = hist_sum = None
    if edge_stats:
        row_scale = torch.empty(n, dtype=torch.float32)
        row_factor = torch.empty(n, dtype=torch.float32)
        hist_count = torch.empty(1 << 11, dtype=torch.int64)
        hist_sum = torch.empty(1 << 11, dtype=torch.float64)
    status, got_waves, depth, edge_sum, edge_nnz, edge_min = _ext.ext.influence_dense_cpu(
        A.data_ptr(), _ext.dtype_code(A), n, A.stride(0) if n else n, w.data_ptr(), out.data_ptr(),
        bool(normalize), float(eps), _ext.ptr(mask_u8), int(max_iter), _ext.ptr(order), _ext.ptr(wave_ptr),
        bool(reuse), int(n_waves) if reuse else 0, _ext.ptr(row_scale), _ext.ptr(row_factor),
        _ext.ptr(hist_count), _ext.ptr(hist_sum), _ext.ptr(row_blocks),
    )
    if status == _NON_FINITE:
        _checks.check_finite(A, a_name)
        raise ValueError(f"{a_name}: expected finite values, got NaN or Inf")  # pragma: no cover
    if status == _NO_CONVERGENCE:
        raise _converge_error(max_iter)
    info = {
        "waves": (order, wave_ptr, got_waves) if order is not None else None,
        "row_blocks": row_blocks,
        "depth": depth,
        "row_scale": row_scale,
        "row_factor": row_factor,
        "hist_count": hist_count,
        "hist_sum": hist_sum,
        "edge_sum": edge_sum,
        "edge_nnz": edge_nnz,
        "edge_min": edge_min,
    }
    return out, info


def _power_series(step, w: torch.Tensor, max_iter: int) -> torch.Tensor:
    """sum_{k>=1} of step^k(w), until a term is exactly zero (circuit-tracer's stopping rule), in float64."""
    term = step(w.to(torch.float32))
    total = term.double()
    steps = 0
    while True:
        # One sync per step: the largest |term| is 0 when the series has ended, NaN or Inf when
        # it overflowed (the caller's result check then names the argument).
        peak = float(term.abs().max()) if term.numel() else 0.0
        if peak == 0.0:
            break
        if not math.isfinite(peak):
            break
        if steps >= max_iter:
            raise _converge_error(steps)
        term = step(term)
        total += term.double()
        steps += 1
    return total


def power_influence_device(
    A: torch.Tensor,
    w: torch.Tensor,
    kern,
    *,
    normalize: bool,
    eps: float = NORMALIZE_EPS,
    node_mask: torch.Tensor | None = None,
    max_iter: int = 1000,
    a_name: str = "A",
):
    """circuit-tracer's loop with a fused kernel per step (cuda and triton backends).

    ``kern`` provides ``row_abs_sum(A, mask_u8) -> float64 (n,)`` and
    ``matvec(A, y_f64, mask_u8, absolute) -> float32 (n,)`` computing sum_i y_i * A'_ij.
    Returns (influence, row_scale).
    """
    A = _row_major(A, a_name)
    mask_u8 = None if node_mask is None else node_mask.to(torch.uint8).contiguous()
    rs = kern.row_abs_sum(A, mask_u8)
    if not bool(torch.isfinite(rs).all()):
        _checks.check_finite(A if mask_u8 is None else A[mask_u8.bool()][:, mask_u8.bool()], a_name)
        raise ValueError(f"{a_name}: expected finite values, got NaN or Inf")
    scale = rs.float().clamp(min=eps) if normalize else torch.ones_like(rs, dtype=torch.float32)
    inv = 1.0 / scale.double()
    if mask_u8 is not None:
        inv = inv * mask_u8.double()

    def step(term: torch.Tensor) -> torch.Tensor:
        return kern.matvec(A, term.double() * inv, mask_u8, normalize)

    total = _power_series(step, w, max_iter)
    return total.float(), scale


def _cuda_kern():
    return _CudaGraphKernels


class _CudaGraphKernels:
    @staticmethod
    def row_abs_sum(A: torch.Tensor, mask_u8: torch.Tensor | None) -> torch.Tensor:
        n, m = A.shape
        out = torch.empty(n, dtype=torch.float64, device=A.device)
        _ext.ext.row_abs_sum_cuda(
            A.data_ptr(), _ext.dtype_code(A), n, m, A.stride(0) if n else m, _ext.ptr(mask_u8), out.data_ptr(),
            _ext.cuda_stream(A.device),
        )
        return out

    @staticmethod
    def matvec(A: torch.Tensor, y: torch.Tensor, mask_u8: torch.Tensor | None, absolute: bool) -> torch.Tensor:
        n, m = A.shape
        y = y.contiguous()
        out = torch.empty(m, dtype=torch.float64, device=A.device)
        _ext.ext.matvec_cuda(
            A.data_ptr(), _ext.dtype_code(A), n, m, A.stride(0) if n else m, y.data_ptr(), _ext.ptr(mask_u8),
            bool(absolute), out.data_ptr(), _ext.cuda_stream(A.device),
        )
        return out.float()  # each term rounded to float32, as circuit-tracer's float32 matvec


def _triton_kern():
    from fastattr.triton_kernels import influence as tk

    return tk


# ------------------------------------------------------------------------------------------------
# Sparse (CSR) inputs: power iteration over the stored entries.
# ------------------------------------------------------------------------------------------------


def influence_sparse(
    edges: SparseEdges,
    w: torch.Tensor,
    *,
    normalize: bool,
    eps: float = NORMALIZE_EPS,
    node_mask: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    max_iter: int = 1000,
) -> torch.Tensor:
    """sum_{k>=1} w A^k for a CSR matrix, normalising by ``row_scale`` (default: the recorded full
    row sums clamped at eps). With ``node_mask`` the rows and columns of unmasked nodes are zero."""
    n = edges.shape[0]
    if edges.shape[0] != edges.shape[1]:
        raise ValueError(f"A: expected a square matrix, got shape {edges.shape}")
    if not bool(torch.isfinite(edges.values).all()):
        _checks.check_finite(edges.values, "A.values")
    rows = edges.row_indices()
    cols = edges.col_indices
    vals = edges.values.abs().double() if normalize else edges.values.double()
    if node_mask is not None:
        keep = node_mask[rows] & node_mask[cols]
        vals = torch.where(keep, vals, torch.zeros_like(vals))
    if normalize:
        scale = row_scale if row_scale is not None else edges.row_abs_sum.float().clamp(min=eps)
        coef = 1.0 / scale.double()
    else:
        coef = torch.ones(n, dtype=torch.float64, device=edges.device)
    if node_mask is not None:
        coef = coef * node_mask.double()

    def step(term: torch.Tensor) -> torch.Tensor:
        y = term.double() * coef
        out = torch.zeros(n, dtype=torch.float64, device=edges.device)
        out.index_add_(0, cols, y[rows] * vals)
        return out.float()

    total = _power_series(step, w, max_iter)
    return total.float()


# ------------------------------------------------------------------------------------------------
# Public API (circuit-tracer's names and signatures, plus backend=)
# ------------------------------------------------------------------------------------------------


def normalize_matrix(matrix: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Row-normalised |matrix| (circuit-tracer's normalize_matrix). This materialises the N x N
    result by definition; the influence functions here never call it."""
    _checks.check_tensor(matrix, "matrix", ndim=2)
    if backend not in (None, "torch"):
        _backends.select("normalize_matrix", matrix.device, backend, {"torch": reference.normalize_matrix})
    return reference.normalize_matrix(matrix)


def _dense_influence(A, w, *, normalize, max_iter, backend, op, a_name, node_mask=None):
    _check_dense(A, w, a_name)
    name, _ = _backends.select(op, A.device, backend, {"cuda": None, "triton": None, "cpu": None, "torch": None},
                               dtype=A.dtype, dtype_arg=a_name)
    if name == "cpu":
        infl = influence_cpu(A, w, normalize=normalize, max_iter=max_iter, node_mask=node_mask, a_name=a_name)[0]
        return _check_result(infl, a_name)
    if name in ("cuda", "triton"):
        kern = _cuda_kern() if name == "cuda" else _triton_kern()
        infl = power_influence_device(A, w, kern, normalize=normalize, max_iter=max_iter, node_mask=node_mask,
                                      a_name=a_name)[0]
        return _check_result(infl, a_name)
    _checks.check_finite(A, a_name)  # the reference would loop to max_iter on NaN
    matrix = reference.normalize_matrix(A) if normalize else A
    return _check_result(_torch_influence(matrix, w.to(matrix.dtype), max_iter, a_name), a_name)


@_device.guard("A", "logit_weights")
def compute_influence(
    A, logit_weights: torch.Tensor, max_iter: int = 1000, *, backend: str | None = None
) -> torch.Tensor:
    """sum_{k>=1} logit_weights @ A^k, stopping when a term is exactly zero (circuit-tracer's
    compute_influence). ``A`` is dense or sparse; it is used as given (no normalisation).

    Raises RuntimeError (circuit-tracer's message) if a term is still non-zero after ``max_iter``
    further steps, and ValueError on NaN/Inf in ``A``.
    """
    max_iter = _check_max_iter(max_iter)
    sp = as_sparse_edges(A)
    if sp is not None:
        _check_sparse(sp, logit_weights, "A")
        _backends.select("compute_influence", sp.device, backend, {"cuda": None, "triton": None, "cpu": None, "torch": None})
        return _check_result(influence_sparse(sp, logit_weights, normalize=False, max_iter=max_iter), "A")
    return _dense_influence(A, logit_weights, normalize=False, max_iter=max_iter, backend=backend,
                            op="compute_influence", a_name="A")


@_device.guard("adjacency_matrix", "logit_weights")
def compute_node_influence(adjacency_matrix, logit_weights: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Influence on the row-normalised |adjacency| (circuit-tracer's compute_node_influence), with
    the normalisation applied on the fly."""
    sp = as_sparse_edges(adjacency_matrix)
    if sp is not None:
        _check_sparse(sp, logit_weights, "adjacency_matrix")
        _backends.select("compute_node_influence", sp.device, backend,
                         {"cuda": None, "triton": None, "cpu": None, "torch": None})
        return _check_result(influence_sparse(sp, logit_weights, normalize=True), "adjacency_matrix")
    return _dense_influence(adjacency_matrix, logit_weights, normalize=True, max_iter=1000, backend=backend,
                            op="compute_node_influence", a_name="adjacency_matrix")


@_device.guard("pruned_matrix", "logit_weights")
def compute_edge_influence(pruned_matrix: torch.Tensor, logit_weights: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """The (N, N) edge scores |A_ij| / rowsum_i * (infl_i + w_i) (circuit-tracer's
    compute_edge_influence). The result is N x N by definition; ``prune_graph`` never builds it."""
    _check_dense(pruned_matrix, logit_weights, "pruned_matrix")
    infl = _dense_influence(pruned_matrix, logit_weights, normalize=True, max_iter=1000, backend=backend,
                            op="compute_edge_influence", a_name="pruned_matrix")
    factor = infl.to(pruned_matrix.dtype) + logit_weights.to(pruned_matrix.dtype)
    # Same operations as normalize_matrix, in place on the one N x N result.
    out = pruned_matrix.abs()
    out /= out.sum(dim=1, keepdim=True).clamp(min=NORMALIZE_EPS)
    out *= factor[:, None]
    return out


@_device.guard("edge_matrix", "logit_p", "row_to_node_index")
def compute_partial_influences(
    edge_matrix: torch.Tensor,
    logit_p: torch.Tensor,
    row_to_node_index: torch.Tensor,
    max_iter: int = 128,
    device=None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Influence of every node from the rows attributed so far (circuit-tracer's
    compute_partial_influences, used while ranking features during attribution).

    Row r of ``edge_matrix`` holds the inputs of node ``row_to_node_index[r]``; columns are all
    nodes; the logits are the last ``len(logit_p)`` columns. The matrix is read where it lives and
    never copied or normalised (circuit-tracer copies it to its default device on every call):
    ``device=None`` means the matrix's device, and another ``device`` only receives the result.
    Raises RuntimeError("Failed to converge") like circuit-tracer.
    """
    _checks.check_tensor(edge_matrix, "edge_matrix", ndim=2)
    if not edge_matrix.is_floating_point():
        raise TypeError(f"edge_matrix: expected a floating-point tensor, got {_dt(edge_matrix)}")
    _checks.check_tensor(logit_p, "logit_p", ndim=1)
    _checks.check_tensor(row_to_node_index, "row_to_node_index", ndim=1, dtypes=_checks.INDEX_DTYPES)
    max_iter = _check_max_iter(max_iter)
    rows, cols = edge_matrix.shape
    _checks.check_shape(row_to_node_index, "row_to_node_index", (rows,))
    if logit_p.numel() > cols:
        raise ValueError(f"logit_p: expected at most {cols} entries (the matrix's columns), got {logit_p.numel()}")
    dev = edge_matrix.device
    out_device = torch.device(device) if device is not None else dev
    idx = row_to_node_index.to(dev, torch.int64)
    _checks.check_index_range(idx, "row_to_node_index", cols)
    logit_p = logit_p.to(dev, torch.float32)
    _checks.check_finite(logit_p, "logit_p", _checks.NonFiniteInfluenceError)
    name, _ = _backends.select("compute_partial_influences", dev, backend,
                               {"cuda": None, "triton": None, "cpu": None, "torch": None},
                               dtype=edge_matrix.dtype, dtype_arg="edge_matrix")
    if name == "cpu":
        e = _row_major(edge_matrix, "edge_matrix")
        idx = idx.contiguous()
        out = torch.empty(cols, dtype=torch.float32)
        status = _ext.ext.partial_influence_cpu(
            e.data_ptr(), _ext.dtype_code(e), rows, cols, e.stride(0) if rows else cols, logit_p.data_ptr(),
            logit_p.numel(), idx.data_ptr(), out.data_ptr(), max_iter, PARTIAL_EPS,
        )
        if status == _NON_FINITE:
            _checks.check_finite(e, "edge_matrix")
        if status == _NO_CONVERGENCE:
            raise RuntimeError("Failed to converge")
        return _check_result(out, "logit_p").to(out_device)
    if name in ("cuda", "triton"):
        kern = _cuda_kern() if name == "cuda" else _triton_kern()
        e = _row_major(edge_matrix, "edge_matrix")
        rs = kern.row_abs_sum(e, None)
        if not bool(torch.isfinite(rs).all()):
            _checks.check_finite(e, "edge_matrix")
        inv = 1.0 / rs.float().clamp(min=PARTIAL_EPS).double()
        prod = torch.zeros(cols, dtype=torch.float32, device=dev)
        if logit_p.numel():
            prod[-logit_p.numel():] = logit_p
        infl = torch.zeros(cols, dtype=torch.float64, device=dev)
        for _ in range(max_iter):
            prod = kern.matvec(e, prod[idx].double() * inv, None, True)
            if not bool(prod.any()):
                return _check_result(infl.float(), "logit_p").to(out_device)
            infl += prod.double()
        raise RuntimeError("Failed to converge")
    _checks.check_finite(edge_matrix, "edge_matrix")
    infl = reference.compute_partial_influences(edge_matrix, logit_p, idx, max_iter=max_iter, device=dev)
    return _check_result(infl, "logit_p").to(out_device)


# The compiled kernels reproduce circuit-tracer's float32 rounding step by step; other dtypes run
# circuit-tracer's own math, the torch reference (exact in float64 and the half types alike).
for _op in ("compute_influence", "compute_node_influence", "compute_edge_influence", "compute_partial_influences"):
    _backends.declare_dtypes(_op, ("cuda", "triton", "cpu"), (torch.float32,))
