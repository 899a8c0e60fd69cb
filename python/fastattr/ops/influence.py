"""Influence of every node on the logits: sum_{k>=1} w A^k without materialising the normalised matrix.

circuit-tracer builds the row-normalised |A| (an N x N copy) and iterates ``x <- x @ A`` until the
vector is exactly zero, which happens after the DAG's depth. Here the normalisation is applied to
the vector instead, x_{k+1} = (x_k / max(rowsum_i, eps)) @ |A|, with |A| taken on the fly, so only
the adjacency itself is ever read.

Backends, one launch helper each, registered per op with the dtypes and layouts they take:

* cpu: one pass over A on a DAG. With Kahn's topological waves each target row is processed once,
  after every row that reads from it, and scattered with its final coefficient (w_i + infl_i) /
  rowsum_i; the longest path from a weighted node reproduces circuit-tracer's iteration count, so
  the non-convergence error is raised exactly when circuit-tracer raises. Matrices with a cycle
  fall back to the power series. Accumulation is in double, in a fixed order (deterministic).
* cuda / triton: the power series, one fused |A|-matvec kernel per step. Both backends' glue is
  the same kind of thing, a pair of launch functions (``_CUDA``: fastattr._C's bindings called by
  keyword; ``_TRITON``: fastattr.triton_kernels.influence's public functions).
* torch: circuit-tracer's code (``reference``) on dense input. Sparse input (:class:`~fastattr.SparseEdges`
  or torch sparse CSR/COO) runs here too, in torch on whatever device it lives: the power series
  over the stored entries, normalised by the recorded full-row |A| sums.

The compiled kernels reproduce circuit-tracer's float32 rounding step by step and take float32
only; other dtypes run circuit-tracer's own math (the torch backend).

One power series: :func:`_power_series` drives every iterative path in Python (cuda, triton,
sparse, the partial influences, and the top-k edge store's partial influences through
:func:`partial_influence_series`); csrc/influence_cpu.cpp has its one driver for the cpu backend;
``fastattr.reference`` keeps circuit-tracer's loops as the oracle.

Results agree with circuit-tracer to float32 rounding (relative differences ~1e-7: the order of
the additions differs, and the double accumulation here is the more accurate one).

Deterministic mode (``deterministic=True``, or ``torch.use_deterministic_algorithms``): the device
matvec adds its row chunks in a fixed order instead of in atomics, and sparse column sums on CUDA
use a sorted (fixed-order) scatter, so repeated calls give bitwise-identical influences. The cpu
backend is deterministic in either mode.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from fastattr import reference
from fastattr._runtime import backends as _backends
from fastattr._runtime import checks as _checks
from fastattr._runtime import device as _device
from fastattr._runtime import ext as _ext
from fastattr.ops.sparse_edges import SparseEdges, as_sparse_edges

logger = logging.getLogger("fastattr")

# circuit-tracer floors a row's |A| sum at two different values, and both are kept because each
# decides results against circuit-tracer: normalize_matrix (node and edge influence, pruning)
# clamps at 1e-10, compute_partial_influences (ranking features during attribution) at 1e-8. A row
# whose sum lies between the two sums to 1 after the first normalisation and to sum / 1e-8 < 1
# after the second. These are the only copies: every kernel is given its floor as ``eps``.
NORMALIZE_EPS = 1e-10
PARTIAL_EPS = 1e-8

# Statuses of the compiled kernels (csrc/graph.h InfluenceStatus).
_OK, _NO_CONVERGENCE, _NON_FINITE, _NEEDS_ROWS = 0, 1, 2, 3

_F32 = (torch.float32,)


def _converge_error(steps: int) -> RuntimeError:
    return RuntimeError(f"Influence computation failed to converge after {steps} iterations")


def _partial_converge_error() -> RuntimeError:
    return RuntimeError("Failed to converge")  # circuit-tracer's compute_partial_influences message


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _lda(a: torch.Tensor) -> int:
    """Row stride for the kernels (any value >= the row length when there are no rows)."""
    return a.stride(0) if a.shape[0] else a.shape[1]


def _layout(x) -> str:
    """The registry's layout of an input: "sparse" for SparseEdges and torch sparse tensors."""
    if isinstance(x, SparseEdges) or (isinstance(x, torch.Tensor) and x.layout != torch.strided):
        return "sparse"
    return "strided"


def _mask_u8(node_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if node_mask is None else node_mask.to(torch.uint8).contiguous()


# ------------------------------------------------------------------------------------------------
# Argument and result checks
# ------------------------------------------------------------------------------------------------


def _check_weights(w, a_name: str, n: int, device: torch.device) -> None:
    _checks.check_tensor(w, "logit_weights", ndim=1)
    _checks.check_shape(w, "logit_weights", (n,))
    if w.device != device:
        raise ValueError(f"logit_weights: expected a tensor on {device} (the device of {a_name}), got one on {w.device}")
    if not w.is_floating_point():
        raise TypeError(f"logit_weights: expected a floating-point tensor, got {_dt(w)}")
    _checks.check_finite(w, "logit_weights", _checks.NonFiniteInfluenceError)


def _check_dense(A, w, a_name: str) -> None:
    _checks.check_tensor(A, a_name, ndim=2)
    if not A.is_floating_point():
        raise TypeError(f"{a_name}: expected a floating-point tensor, got {_dt(A)}")
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"{a_name}: expected a square matrix, got shape {tuple(A.shape)}")
    _check_weights(w, a_name, A.shape[0], A.device)


def _check_sparse(edges: SparseEdges, w, a_name: str) -> None:
    if edges.shape[0] != edges.shape[1]:
        raise ValueError(f"{a_name}: expected a square matrix, got shape {edges.shape}")
    edges.validate(a_name)
    _check_weights(w, a_name, edges.shape[0], edges.device)


def _check_result(infl: torch.Tensor, a_name: str) -> torch.Tensor:
    """Every backend raises where an influence term overflows float32 (circuit-tracer then fails to
    converge) rather than returning Inf (cpu, double accumulation) or NaN (triton)."""
    if not bool(torch.isfinite(infl).all()):
        raise _checks.NonFiniteInfluenceError(
            f"{a_name}: expected entries whose influence series fits float32, got an influence with "
            f"{_checks.describe_nonfinite(infl)}; circuit-tracer's iteration does not converge here. Scale {a_name} down"
        )
    return infl


def _check_max_iter(max_iter) -> int:
    max_iter = _checks.check_number(max_iter, "max_iter", integer=True)
    if max_iter < 0:
        raise ValueError(f"max_iter: expected a non-negative int, got {max_iter}")
    return max_iter


def _check_row_sums(rs: torch.Tensor, a: torch.Tensor, mask_u8: torch.Tensor | None, a_name: str) -> None:
    """A non-finite row sum means a NaN or Inf in the (kept part of the) matrix: name it."""
    if bool(torch.isfinite(rs).all()):
        return
    keep = None if mask_u8 is None else mask_u8.bool()
    _checks.check_finite(a if keep is None else a[keep][:, keep], a_name)
    raise ValueError(f"{a_name}: expected finite values, got NaN or Inf")


# ------------------------------------------------------------------------------------------------
# The one power series
# ------------------------------------------------------------------------------------------------


def _power_series(
    step: Callable[[torch.Tensor], torch.Tensor],
    seed: torch.Tensor,
    max_terms: int,
    error: Callable[[], Exception],
    source: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_{k>=1} x_k with x_k = step(x_{k-1}) and x_0 = ``seed``, accumulated in float64, stopping
    at the first term that is exactly zero (circuit-tracer's rule); ``source`` is added to x_1.

    Raises ``error()`` when x_{max_terms} is still non-zero. A term with NaN or Inf ends the series
    with it in the total, for the caller's result check to name the argument. One sync per term."""
    total = None
    term = seed
    for k in range(max_terms):
        term = step(term)
        if k == 0 and source is not None:
            term = term + source
        if total is None:
            total = torch.zeros(term.shape, dtype=torch.float64, device=term.device)
        peak = float(term.abs().max()) if term.numel() else 0.0
        if peak == 0.0:
            return total
        total += term.double()
        if not math.isfinite(peak):
            return total
    raise error()


def _dense_terms(max_iter: int) -> int:
    """circuit-tracer's compute_influence counts its steps after the first term."""
    return max_iter + 1


def scatter_add(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor, *, deterministic: bool) -> torch.Tensor:
    """out[index[e]] += values[e], in place. On CUDA ``index_add_`` meets repeated indices in
    atomics; ``index_put_`` with ``accumulate=True`` sorts the indices and adds each one's values in
    a fixed order (torch's own deterministic index_add). On the CPU ``index_add_`` is a serial loop."""
    if deterministic and out.is_cuda:
        return out.index_put_((index,), values, accumulate=True)
    return out.index_add_(0, index, values)


def partial_influence_series(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    row_abs_sum: torch.Tensor,
    logit_p: torch.Tensor,
    row_to_node: torch.Tensor,
    n_cols: int,
    *,
    max_iter: int = 128,
    source: torch.Tensor | None = None,
) -> torch.Tensor:
    """circuit-tracer's compute_partial_influences over rows held in any form.

    ``matvec(y)`` returns sum_r y_r |E_r| as float32 (n_cols,) for float64 y (rows,): how the rows
    are stored (a dense matrix and a kernel, or the top-k edge store) is the caller's. Row r is
    normalised by max(fl32(row_abs_sum[r]), PARTIAL_EPS); the logits are seeded in the last
    ``len(logit_p)`` columns; ``source`` is influence entering with the first term. Returns float32.
    Raises RuntimeError("Failed to converge") like circuit-tracer."""
    inv = 1.0 / row_abs_sum.float().clamp(min=PARTIAL_EPS).double()
    seed = torch.zeros(n_cols, dtype=torch.float32, device=inv.device)
    if logit_p.numel():
        seed[-logit_p.numel() :] = logit_p
    total = _power_series(lambda term: matvec(term[row_to_node].double() * inv), seed, max_iter,
                          _partial_converge_error, source)  # fmt: skip
    return total.float()


# ------------------------------------------------------------------------------------------------
# Device kernels of the power series: the same two launch functions per backend
# ------------------------------------------------------------------------------------------------


class _DeviceKernels(NamedTuple):
    row_abs_sum: Callable  # (A, mask_u8) -> float64 (n,): sum_j |A_ij| over kept rows and columns
    matvec: Callable  # (A, y, mask_u8, absolute, deterministic) -> float32 (m,): sum_i y_i A'_ij


def _row_abs_sum_cuda(A: torch.Tensor, mask_u8: torch.Tensor | None) -> torch.Tensor:
    n, m = A.shape
    out = torch.empty(n, dtype=torch.float64, device=A.device)
    _ext.ext.row_abs_sum_cuda(a=A.data_ptr(), a_dtype=_ext.dtype_code(A), n=n, m=m, lda=_lda(A),
                              mask=_ext.ptr(mask_u8), out=out.data_ptr(), stream=_ext.cuda_stream(A.device))  # fmt: skip
    return out


def _matvec_cuda(A: torch.Tensor, y: torch.Tensor, mask_u8, absolute: bool, deterministic: bool) -> torch.Tensor:
    n, m = A.shape
    y = y.contiguous()
    out = torch.empty(m, dtype=torch.float64, device=A.device)
    partials, n_partials = None, 0
    if deterministic:  # the fixed-order variant writes per-chunk column sums here
        n_partials = _ext.ext.matvec_partials_cuda(n=n, m=m)
        partials = torch.empty((n_partials, m), dtype=torch.float64, device=A.device)
    _ext.ext.matvec_cuda(a=A.data_ptr(), a_dtype=_ext.dtype_code(A), n=n, m=m, lda=_lda(A), y=y.data_ptr(),
                         mask=_ext.ptr(mask_u8), absolute=bool(absolute), partials=_ext.ptr(partials),
                         n_partials=n_partials, out=out.data_ptr(), stream=_ext.cuda_stream(A.device))  # fmt: skip
    return out.float()  # each term rounded to float32, as circuit-tracer's float32 matvec


def _row_abs_sum_triton(A: torch.Tensor, mask_u8: torch.Tensor | None) -> torch.Tensor:
    from fastattr.triton_kernels import influence as tk

    return tk.row_abs_sum(A, mask_u8)


def _matvec_triton(A: torch.Tensor, y: torch.Tensor, mask_u8, absolute: bool, deterministic: bool) -> torch.Tensor:
    from fastattr.triton_kernels import influence as tk

    return tk.matvec(A, y, mask_u8, absolute, deterministic=deterministic)


_CUDA = _DeviceKernels(_row_abs_sum_cuda, _matvec_cuda)
_TRITON = _DeviceKernels(_row_abs_sum_triton, _matvec_triton)
DEVICE_BACKENDS = {"cuda": _CUDA, "triton": _TRITON}


# ------------------------------------------------------------------------------------------------
# Influence on a whole (square) matrix, per kind of implementation. These are also the entry
# points of pruning, which runs them on its own backend choice.
# ------------------------------------------------------------------------------------------------


def _wave_buffers(n: int, waves, record_waves: bool):
    """(order, wave_ptr, n_waves, reuse): given waves to reuse, fresh buffers to record them, or none."""
    if waves is not None:
        order, wave_ptr, n_waves = waves
        if n_waves >= 0:
            return order, wave_ptr, n_waves, True
        return None, None, 0, False  # the supergraph had a cycle: nothing to reuse
    if record_waves:
        return torch.empty(n, dtype=torch.int32), torch.empty(n + 1, dtype=torch.int32), 0, False
    return None, None, 0, False


def _edge_stat_buffers(n: int) -> dict[str, torch.Tensor]:
    buckets = 1 << _ext.ext.select_bits[0]  # the radix select's level-0 histogram (csrc/graph.h)
    return {
        "row_scale": torch.empty(n, dtype=torch.float32),
        "row_factor": torch.empty(n, dtype=torch.float32),
        "hist_count": torch.empty(buckets, dtype=torch.int64),
        "hist_sum": torch.empty(buckets, dtype=torch.float64),
    }


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
    """The compiled CPU sweep (fixed-order sums: deterministic). Returns (influence, info) where
    info holds the waves (for reuse on a pruned subgraph) and, with ``edge_stats``, the pruned
    graph's edge-score statistics."""
    A = _checks.row_major(A, a_name)
    n = A.shape[0]
    w = w.to(torch.float32).contiguous()
    out = torch.empty(n, dtype=torch.float32)
    mask_u8 = _mask_u8(node_mask)  # held here: the kernel reads it by address
    order, wave_ptr, n_waves, reuse = _wave_buffers(n, waves, record_waves)
    if record_waves and row_blocks is None:
        # Bitmaps of each row's non-zero 64-column blocks, reused by the passes on the pruned graph.
        row_blocks = torch.empty((n, -(-n // _ext.ext.cols_per_block_word)), dtype=torch.int64)
    elif not reuse:
        row_blocks = None  # recorded by the first pass only
    stats = _edge_stat_buffers(n) if edge_stats else dict.fromkeys(("row_scale", "row_factor", "hist_count", "hist_sum"))
    status, got_waves, depth, edge_sum, edge_nnz, edge_min = _ext.ext.influence_dense_cpu(
        a=A.data_ptr(), a_dtype=_ext.dtype_code(A), n=n, lda=_lda(A), w=w.data_ptr(), out=out.data_ptr(),
        normalize=bool(normalize), eps=float(eps), node_mask=_ext.ptr(mask_u8), max_iter=int(max_iter),
        order=_ext.ptr(order), wave_ptr=_ext.ptr(wave_ptr), reuse_order=reuse, n_waves=int(n_waves),
        row_scale=_ext.ptr(stats["row_scale"]), row_factor=_ext.ptr(stats["row_factor"]),
        hist_count=_ext.ptr(stats["hist_count"]), hist_sum=_ext.ptr(stats["hist_sum"]), row_blocks=_ext.ptr(row_blocks),
    )
    if status == _NON_FINITE:
        _checks.check_finite(A, a_name)
        raise ValueError(f"{a_name}: expected finite values, got NaN or Inf")  # pragma: no cover
    if status == _NO_CONVERGENCE:
        raise _converge_error(max_iter)
    info = {"waves": (order, wave_ptr, got_waves) if order is not None else None, "row_blocks": row_blocks,
            "depth": depth, "edge_sum": edge_sum, "edge_nnz": edge_nnz, "edge_min": edge_min, **stats}  # fmt: skip
    return out, info


def power_influence_device(
    A: torch.Tensor,
    w: torch.Tensor,
    backend: str,
    *,
    normalize: bool,
    eps: float = NORMALIZE_EPS,
    node_mask: torch.Tensor | None = None,
    max_iter: int = 1000,
    a_name: str = "A",
    deterministic: bool = False,
):
    """circuit-tracer's loop with a fused kernel per step on ``backend`` ("cuda" or "triton").
    Returns (influence, row_scale); ``deterministic`` takes the fixed-order matvec."""
    kern = DEVICE_BACKENDS[backend]
    A = _checks.row_major(A, a_name)
    mask_u8 = _mask_u8(node_mask)
    rs = kern.row_abs_sum(A, mask_u8)
    _check_row_sums(rs, A, mask_u8, a_name)
    scale = rs.float().clamp(min=eps) if normalize else torch.ones_like(rs, dtype=torch.float32)
    inv = 1.0 / scale.double()
    if mask_u8 is not None:
        inv = inv * mask_u8.double()

    def step(term: torch.Tensor) -> torch.Tensor:
        return kern.matvec(A, term.double() * inv, mask_u8, normalize, deterministic)

    total = _power_series(step, w.to(torch.float32), _dense_terms(max_iter), lambda: _converge_error(max_iter))
    return total.float(), scale


def influence_sparse(
    edges: SparseEdges,
    w: torch.Tensor,
    *,
    normalize: bool,
    eps: float = NORMALIZE_EPS,
    node_mask: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    max_iter: int = 1000,
    deterministic: bool = False,
) -> torch.Tensor:
    """sum_{k>=1} w A^k for a CSR matrix, in torch, normalising by ``row_scale`` (default: the
    recorded full row sums clamped at eps). With ``node_mask`` the rows and columns of unmasked
    nodes are zero. ``deterministic``: fixed-order column sums on CUDA (see :func:`scatter_add`)."""
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
        return scatter_add(out, cols, y[rows] * vals, deterministic=deterministic).float()

    total = _power_series(step, w.to(torch.float32), _dense_terms(max_iter), lambda: _converge_error(max_iter))
    return total.float()


# ------------------------------------------------------------------------------------------------
# compute_influence, compute_node_influence, compute_edge_influence: one launch helper per backend
# ------------------------------------------------------------------------------------------------

_INFLUENCE = _backends.op("compute_influence")
_NODE_INFLUENCE = _backends.op("compute_node_influence")
_EDGE_INFLUENCE = _backends.op("compute_edge_influence")


def _influence_cpu(A, w, *, normalize, max_iter, a_name, deterministic):
    return influence_cpu(A, w, normalize=normalize, max_iter=max_iter, a_name=a_name)[0]


def _influence_cuda(A, w, *, normalize, max_iter, a_name, deterministic):
    return power_influence_device(A, w, "cuda", normalize=normalize, max_iter=max_iter, a_name=a_name,
                                  deterministic=deterministic)[0]  # fmt: skip


def _influence_triton(A, w, *, normalize, max_iter, a_name, deterministic):
    return power_influence_device(A, w, "triton", normalize=normalize, max_iter=max_iter, a_name=a_name,
                                  deterministic=deterministic)[0]  # fmt: skip


def _torch_series(A: torch.Tensor, w: torch.Tensor, max_iter: int, a_name: str) -> torch.Tensor:
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


def _influence_torch(A, w, *, normalize, max_iter, a_name, deterministic):
    if isinstance(A, SparseEdges):
        return influence_sparse(A, w, normalize=normalize, max_iter=max_iter, deterministic=deterministic)
    _checks.check_finite(A, a_name)  # the reference would loop to max_iter on NaN
    matrix = reference.normalize_matrix(A) if normalize else A
    return _torch_series(matrix, w.to(matrix.dtype), max_iter, a_name)


for _op in (_INFLUENCE, _NODE_INFLUENCE, _EDGE_INFLUENCE):
    _op.register("cpu", dtypes=_F32)(_influence_cpu)
    _op.register("cuda", dtypes=_F32)(_influence_cuda)
    _op.register("triton", dtypes=_F32)(_influence_triton)
    # compute_edge_influence's result is N x N by definition: dense input only.
    _op.register("torch", layouts=("strided",) if _op is _EDGE_INFLUENCE else ("strided", "sparse"))(_influence_torch)


def _influence(op: _backends.Op, A, w, *, normalize: bool, max_iter: int, a_name: str, backend, deterministic):
    """Check the input, select the backend (dense or sparse layout) and run it."""
    sp = as_sparse_edges(A)
    if sp is not None:
        _check_sparse(sp, w, a_name)
        impl = op.select(sp.device, backend, dtype=sp.values.dtype, layout="sparse", arg=a_name)
        A = sp
    else:
        _check_dense(A, w, a_name)
        impl = op.select(A.device, backend, dtype=A.dtype, layout="strided", arg=a_name)
    infl = impl.fn(A, w, normalize=normalize, max_iter=max_iter, a_name=a_name,
                   deterministic=_backends.deterministic(deterministic))  # fmt: skip
    return _check_result(infl, a_name)


@_device.guard("A", "logit_weights")
def compute_influence(
    A, logit_weights: torch.Tensor, max_iter: int = 1000, *, backend: str | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """sum_{k>=1} logit_weights @ A^k, stopping when a term is exactly zero (circuit-tracer's
    compute_influence). ``A`` is dense or sparse; it is used as given (no normalisation).

    Raises RuntimeError (circuit-tracer's message) if a term is still non-zero after ``max_iter``
    further steps, and ValueError on NaN/Inf in ``A``. ``deterministic`` (None: torch's
    ``use_deterministic_algorithms``): bitwise-identical results from run to run.
    """
    max_iter = _check_max_iter(max_iter)
    return _influence(_INFLUENCE, A, logit_weights, normalize=False, max_iter=max_iter, a_name="A",
                      backend=backend, deterministic=deterministic)  # fmt: skip


@_device.guard("adjacency_matrix", "logit_weights")
def compute_node_influence(
    adjacency_matrix, logit_weights: torch.Tensor, *, backend: str | None = None, deterministic: bool | None = None
) -> torch.Tensor:
    """Influence on the row-normalised |adjacency| (circuit-tracer's compute_node_influence), with
    the normalisation applied on the fly."""
    return _influence(_NODE_INFLUENCE, adjacency_matrix, logit_weights, normalize=True, max_iter=1000,
                      a_name="adjacency_matrix", backend=backend, deterministic=deterministic)  # fmt: skip


@_device.guard("pruned_matrix", "logit_weights")
def compute_edge_influence(
    pruned_matrix: torch.Tensor, logit_weights: torch.Tensor, *, backend: str | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """The (N, N) edge scores |A_ij| / rowsum_i * (infl_i + w_i) (circuit-tracer's
    compute_edge_influence). The result is N x N by definition; ``prune_graph`` never builds it.
    The backend computes the influence; the scores are then torch operations on the one result."""
    infl = _influence(_EDGE_INFLUENCE, pruned_matrix, logit_weights, normalize=True, max_iter=1000,
                      a_name="pruned_matrix", backend=backend, deterministic=deterministic)  # fmt: skip
    factor = infl.to(pruned_matrix.dtype) + logit_weights.to(pruned_matrix.dtype)
    # Same operations as normalize_matrix, in place on the one N x N result.
    out = pruned_matrix.abs()
    out /= out.sum(dim=1, keepdim=True).clamp(min=NORMALIZE_EPS)
    out *= factor[:, None]
    return out


# ------------------------------------------------------------------------------------------------
# compute_partial_influences
# ------------------------------------------------------------------------------------------------

_PARTIAL = _backends.op("compute_partial_influences")


class PartialInfluenceState:
    """What :func:`compute_partial_influences` keeps between calls on one edge matrix that only
    grows by rows, as attribution's does (rows are appended, never changed): each row's |sum| and
    every row's |entry| at every row's node column. An update then reads the new rows, the old rows
    at the new nodes' columns, and the full width once for the result, instead of the full width
    once per term of the series (about n_layers + 2 times). The block is rows x rows float32, no
    larger than the rows themselves whenever some feature is left out (the only time attribution
    asks for partial influences). The cpu backend keeps it; the others recompute."""

    def __init__(self) -> None:
        self.rows = 0
        self.row_sum = torch.empty(0)
        self.block = torch.empty(0, 0)
        self.nodes = torch.empty(0, dtype=torch.int64)
        self._matrix: tuple[int, int] | None = None  # (data_ptr, row stride) of the matrix it follows

    def _grow(self, e: torch.Tensor, idx: torch.Tensor) -> None:
        st, st0 = e.shape[0], self.rows
        if self._matrix not in (None, (e.data_ptr(), e.stride(0))) or st < st0 or not torch.equal(idx[:st0], self.nodes[:st0]):
            raise ValueError("state: expected the edge matrix it was used with, grown by rows (same storage, "
                             f"the first {st0} rows and their row_to_node_index unchanged), got another matrix")  # fmt: skip
        if st > self.block.shape[0]:
            cap = max(st, 2 * self.block.shape[0], 64)
            block, row_sum = torch.empty(cap, cap), torch.empty(cap)
            block[:st0, :st0] = self.block[:st0, :st0]
            row_sum[:st0] = self.row_sum[:st0]
            self.block, self.row_sum = block, row_sum
            self.nodes = torch.cat([self.nodes[:st0], torch.empty(cap - st0, dtype=torch.int64)])
        self.nodes[st0:st] = idx[st0:]
        status = _ext.ext.partial_influence_grow_cpu(
            e=e.data_ptr(), e_dtype=_ext.dtype_code(e), cols=e.shape[1], lde=_lda(e), row_to_node=idx.data_ptr(),
            st0=st0, st=st, row_sum=self.row_sum.data_ptr(), block=self.block.data_ptr(), ldb=self.block.stride(0),
        )  # fmt: skip
        if status == _NON_FINITE:
            _checks.check_finite(e, "edge_matrix")
        self._matrix, self.rows = (e.data_ptr(), e.stride(0)), st


def grow_partial_rows(e: torch.Tensor, row_to_node: torch.Tensor, *, rows0: int, st0: int, row_sum: torch.Tensor,
                      block: torch.Tensor) -> None:  # fmt: skip
    """A partial-influence state over some rows of a split graph (host float32): ``e`` holds this
    rank's rows, of which ``rows0`` onwards are new; ``row_to_node`` (st,) is every row's node, of
    which ``st0`` onwards are new. Fills ``row_sum[rows0:]`` (float32 |sums|) and
    ``block[r, t] = |e[r, row_to_node[t]]|`` for the new rows at every node column and the old rows
    at the new ones. A non-finite row is a ValueError naming ``edge_matrix``."""
    e = _checks.row_major(e, "edge_matrix")
    idx = row_to_node.contiguous()
    status = _ext.ext.partial_influence_grow_cpu(
        e=e.data_ptr(), e_dtype=_ext.dtype_code(e), cols=e.shape[1], lde=_lda(e), row_to_node=idx.data_ptr(),
        st0=st0, st=len(idx), row_sum=row_sum.data_ptr(), block=block.data_ptr(), ldb=block.stride(0),
        rows0=rows0, rows=e.shape[0],
    )  # fmt: skip
    if status == _NON_FINITE:
        _checks.check_finite(e[rows0:], "edge_matrix")


def partial_coefficients(row_sum: torch.Tensor, block: torch.Tensor, logit_p: torch.Tensor, row_to_node: torch.Tensor,
                         n_cols: int, *, max_iter: int = 128) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The series of :func:`compute_partial_influences` on a state of all rows alone (host): float64
    ``total_coef`` (rows,), the result being sum_r total_coef[r] |E_r|. With a second tensor, the
    last allowed term was zero at every node column: the series converged iff that term, sum_r
    last[r] |E_r|, is zero everywhere too, which only the rows' holders can tell. Raises
    circuit-tracer's RuntimeError when it does not converge."""
    rows = len(row_to_node)
    idx = row_to_node.contiguous()
    logit_p = logit_p.to(torch.float32).contiguous()
    total, last = torch.empty(rows, dtype=torch.float64), torch.empty(rows, dtype=torch.float64)
    status = _ext.ext.partial_influence_coef_cpu(
        rows=rows, cols=n_cols, logit_p=logit_p.data_ptr(), n_logits=logit_p.numel(), row_to_node=idx.data_ptr(),
        total_coef=total.data_ptr(), last_coef=last.data_ptr(), max_iter=max_iter, eps=PARTIAL_EPS,
        row_sum=row_sum.data_ptr(), block=block.data_ptr(), ldb=block.stride(0),
    )  # fmt: skip
    if status == _NO_CONVERGENCE:
        raise _partial_converge_error()
    return total, (last if status == _NEEDS_ROWS else None)


def abs_weighted_row_sum(e: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """sum_r coef[r] |e[r, :]| in float64 (host float32 ``e``, float64 ``coef``), summed as
    :func:`compute_partial_influences` sums its result."""
    e = _checks.row_major(e, "edge_matrix")
    coef = coef.to(torch.float64).contiguous()
    out = torch.empty(e.shape[1], dtype=torch.float64)
    _ext.ext.abs_weighted_row_sum_cpu(e=e.data_ptr(), e_dtype=_ext.dtype_code(e), rows=e.shape[0], cols=e.shape[1],
                                      lde=_lda(e), coef=coef.data_ptr(), out=out.data_ptr())  # fmt: skip
    return out


# The compiled kernels take float32, the dtype of circuit-tracer's edge matrix. Other dtypes (a
# float64 default dtype makes circuit-tracer's edge matrix float64) run circuit-tracer's operations
# in the matrix's dtype on the torch backend.
@_PARTIAL.register("cpu", dtypes=_F32)
def _partial_cpu(e, logit_p, idx, *, max_iter, deterministic, state=None):
    e = _checks.row_major(e, "edge_matrix")
    idx = idx.contiguous()
    rows, cols = e.shape
    out = torch.empty(cols, dtype=torch.float32)
    kept = {}
    if state is not None:
        state._grow(e, idx)
        kept = dict(row_sum=state.row_sum.data_ptr(), block=state.block.data_ptr(), ldb=state.block.stride(0))
    status = _ext.ext.partial_influence_cpu(
        e=e.data_ptr(), e_dtype=_ext.dtype_code(e), rows=rows, cols=cols, lde=_lda(e), logit_p=logit_p.data_ptr(),
        n_logits=logit_p.numel(), row_to_node=idx.data_ptr(), out=out.data_ptr(), max_iter=max_iter, eps=PARTIAL_EPS,
        **kept,
    )
    if status == _NON_FINITE:
        _checks.check_finite(e, "edge_matrix")
    if status == _NO_CONVERGENCE:
        raise _partial_converge_error()
    return out


def _partial_device(kern: _DeviceKernels, e, logit_p, idx, max_iter: int, deterministic: bool) -> torch.Tensor:
    e = _checks.row_major(e, "edge_matrix")
    rs = kern.row_abs_sum(e, None)
    _check_row_sums(rs, e, None, "edge_matrix")
    return partial_influence_series(lambda y: kern.matvec(e, y, None, True, deterministic), rs, logit_p, idx,
                                    e.shape[1], max_iter=max_iter)  # fmt: skip


@_PARTIAL.register("cuda", dtypes=_F32)
def _partial_cuda(e, logit_p, idx, *, max_iter, deterministic, state=None):
    return _partial_device(_CUDA, e, logit_p, idx, max_iter, deterministic)


@_PARTIAL.register("triton", dtypes=_F32)
def _partial_triton(e, logit_p, idx, *, max_iter, deterministic, state=None):
    return _partial_device(_TRITON, e, logit_p, idx, max_iter, deterministic)


@_PARTIAL.register("torch")
def _partial_torch(e, logit_p, idx, *, max_iter, deterministic, state=None):
    _checks.check_finite(e, "edge_matrix")
    return reference.compute_partial_influences(e, logit_p.to(e.dtype), idx, max_iter=max_iter, device=e.device)


def _check_partial(edge_matrix, logit_p, row_to_node_index, max_iter) -> int:
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
    return max_iter


@_device.guard("edge_matrix", "logit_p", "row_to_node_index")
def compute_partial_influences(
    edge_matrix: torch.Tensor,
    logit_p: torch.Tensor,
    row_to_node_index: torch.Tensor,
    max_iter: int = 128,
    device=None,
    *,
    backend: str | None = None,
    deterministic: bool | None = None,
    state: PartialInfluenceState | None = None,
) -> torch.Tensor:
    """Influence of every node from the rows attributed so far (circuit-tracer's
    compute_partial_influences, used while ranking features during attribution).

    ``state``: a :class:`PartialInfluenceState` kept across calls on one matrix that grows by rows
    (a ValueError if the matrix is another, or its old rows' nodes changed); the result is the same.

    Row r of ``edge_matrix`` holds the inputs of node ``row_to_node_index[r]``; columns are all
    nodes; the logits are the last ``len(logit_p)`` columns. The matrix is read where it lives and
    never copied or normalised (circuit-tracer copies it to its default device on every call):
    ``device=None`` means the matrix's device, and another ``device`` only receives the result.
    Raises RuntimeError("Failed to converge") like circuit-tracer.
    """
    if _layout(edge_matrix) == "sparse":
        _PARTIAL.select(edge_matrix.device, backend, layout="sparse", arg="edge_matrix")  # no backend takes it: raises
    max_iter = _check_partial(edge_matrix, logit_p, row_to_node_index, max_iter)
    dev = edge_matrix.device
    out_device = torch.device(device) if device is not None else dev
    idx = row_to_node_index.to(dev, torch.int64)
    _checks.check_index_range(idx, "row_to_node_index", edge_matrix.shape[1])
    logit_p = logit_p.to(dev, torch.float32)
    _checks.check_finite(logit_p, "logit_p", _checks.NonFiniteInfluenceError)
    impl = _PARTIAL.select(dev, backend, dtype=edge_matrix.dtype, layout="strided", arg="edge_matrix")
    if state is not None and not isinstance(state, PartialInfluenceState):
        raise TypeError(f"state: expected a PartialInfluenceState or None, got {type(state).__name__}")
    infl = impl.fn(edge_matrix, logit_p, idx, max_iter=max_iter, deterministic=_backends.deterministic(deterministic),
                   state=state)  # fmt: skip
    return _check_result(infl, "logit_p").to(out_device)


# ------------------------------------------------------------------------------------------------
# normalize_matrix
# ------------------------------------------------------------------------------------------------

_NORMALIZE = _backends.op("normalize_matrix")


@_NORMALIZE.register("torch")
def _normalize_torch(matrix: torch.Tensor) -> torch.Tensor:
    return reference.normalize_matrix(matrix)


def normalize_matrix(matrix: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Row-normalised |matrix| (circuit-tracer's normalize_matrix). This materialises the N x N
    result by definition; the influence functions here never call it."""
    if _layout(matrix) == "sparse":
        _NORMALIZE.select(matrix.device, backend, layout="sparse", arg="matrix")  # no backend takes it: raises
    _checks.check_tensor(matrix, "matrix", ndim=2)
    impl = _NORMALIZE.select(matrix.device, backend, dtype=matrix.dtype, arg="matrix")
    return impl.fn(matrix)
