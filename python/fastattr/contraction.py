"""The sparse feature-to-feature Jacobian product, circuit-tracer's backward-hook contraction.

    out[rows[s], b] += sum_d grads[b, positions[s], d] * vectors[s, d]

circuit-tracer computes this with ``einsum(grads[:, positions], vectors)``, which first gathers a
(B x S x D) tensor. Here the rows are sorted by position once per attribution run (a
:class:`ContractionPlan`); every backward pass then runs a grouped GEMM, one small
(S_p x D) @ (D x B) product per position, straight from ``grads``.

One op serves every node kind: feature decoder rows (scaled by activation), the several decoder
rows of a cross-layer transcoder feature, error nodes and token nodes.
"""

from __future__ import annotations

import math

import torch

from fastattr import _backends, _device, _ext, reference
from fastattr._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_index_range,
    check_number,
    check_same_device,
    check_shape,
    check_tensor,
)

OP = "contract"
# float64 too: circuit-tracer contracts in the model's dtype, and float64 models are how it checks
# its backends against each other. The cpu and cuda kernels accumulate float64 in float64.
DTYPES = (*FLOAT_DTYPES, torch.float64)
_TRITON_BLOCK_S_INTERPRET = 32
_TRITON_BLOCK_S = 64
_CPU_BLOCK_S = 64


class ContractionPlan:
    """The fixed half of the contraction: vectors, their positions and output rows.

    Build it once per attribution run (positions and vectors do not change between batches) and
    call it with each batch's grads. Sorting by position and cutting tiles happen here, once.

    Args:
        vectors: (S, D) float32, float16, bfloat16 or float64, unit stride along D.
        positions: (S,) int32/int64 position of each vector in grads' second dimension.
        rows: (S,) int32/int64 output row of each vector. Repeated rows accumulate.
    """

    def __init__(self, vectors: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor):
        check_tensor(vectors, "vectors", ndim=2, dtypes=DTYPES, unit_last_stride=True)
        check_tensor(positions, "positions", ndim=1, dtypes=INDEX_DTYPES)
        check_tensor(rows, "rows", ndim=1, dtypes=INDEX_DTYPES)
        check_same_device("vectors", vectors, "positions", positions)
        check_same_device("vectors", vectors, "rows", rows)
        n = vectors.shape[0]
        check_shape(positions, "positions", (n,))
        check_shape(rows, "rows", (n,))
        check_index_range(positions, "positions", 2**31 - 1)
        check_index_range(rows, "rows", 2**31 - 1)

        self.device = vectors.device
        self.dtype = vectors.dtype
        self.n_vectors = n
        self.d_model = vectors.shape[1]
        order = torch.argsort(positions, stable=True)
        self.vectors = vectors[order].contiguous()
        self._positions = positions[order].to(torch.int32).contiguous()
        self._rows = rows[order].to(torch.int32).contiguous()
        # Bounds the grads and out shapes must cover, checked per call at no device cost.
        self.min_positions = int(self._positions.max()) + 1 if n else 0
        self.min_rows = int(self._rows.max()) + 1 if n else 0
        self.unique_rows = n == 0 or int(torch.unique(self._rows).numel()) == n
        self._tiles: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # Host copies of the sorted positions and tile positions, so that a position prefix is
        # found without a device round trip.
        self._positions_cpu = self._positions.cpu()
        self._tile_positions: dict[int, torch.Tensor] = {}
        self._tile_versions: dict[int, tuple[int, int, int]] = {}
        # The bounds above are what every launch relies on; an in-place write to the index tensors
        # bumps their version counters, which each call compares (no device work, no sync).
        self._versions = (self._positions._version, self._rows._version)
        # The use_backend() choice in force here: the plan runs on it from any thread (autograd's
        # device threads call it from backward hooks) unless the calling thread chooses otherwise.
        self.captured_backend = _backends.forced_choice()

    @property
    def positions(self) -> torch.Tensor:
        """(S,) int32 positions, sorted. Read-only: the plan's bounds and tiles are derived from it."""
        return self._positions

    @property
    def rows(self) -> torch.Tensor:
        """(S,) int32 output rows in position order. Read-only, like :attr:`positions`."""
        return self._rows

    def _check_unchanged(self) -> None:
        if (self._positions._version, self._rows._version) != self._versions or any(
            tuple(t._version for t in self._tiles[block_s]) != v for block_s, v in self._tile_versions.items()
        ):
            raise ValueError(
                "plan: expected the ContractionPlan's positions, rows and tiles unchanged since construction "
                "(its index bounds were validated then), got tensors modified in place; build a new ContractionPlan"
            )

    def tiles(self, block_s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(position, start, end) int32 per tile: runs of at most ``block_s`` same-position vectors."""
        if block_s not in self._tiles:
            if self.n_vectors == 0:
                empty = torch.zeros(0, dtype=torch.int32, device=self.device)
                self._tiles[block_s] = (empty, empty, empty)
            else:
                pos, counts = torch.unique_consecutive(self._positions, return_counts=True)
                group_start = torch.cumsum(counts, 0) - counts
                n_tiles = (counts + block_s - 1) // block_s
                tile_group = torch.repeat_interleave(torch.arange(len(pos), device=self.device), n_tiles)
                first_tile = torch.cumsum(n_tiles, 0) - n_tiles
                within = torch.arange(int(n_tiles.sum()), device=self.device) - first_tile[tile_group]
                start = group_start[tile_group] + within * block_s
                end = torch.minimum(start + block_s, (group_start + counts)[tile_group])
                self._tiles[block_s] = (
                    pos[tile_group].to(torch.int32).contiguous(),
                    start.to(torch.int32).contiguous(),
                    end.to(torch.int32).contiguous(),
                )
            self._tile_versions[block_s] = tuple(t._version for t in self._tiles[block_s])
        return self._tiles[block_s]

    def tiles_below(self, positions_below: int, block_s: int) -> int:
        """How many of :meth:`tiles` lie at positions < ``positions_below`` (a prefix: they are sorted)."""
        if block_s not in self._tile_positions:
            self._tile_positions[block_s] = self.tiles(block_s)[0].cpu()
        return int(torch.searchsorted(self._tile_positions[block_s], positions_below))

    def __call__(self, grads: torch.Tensor, out: torch.Tensor, *, out_layout: str = "rb", backend: str | None = None,
                 positions_below: int | None = None) -> torch.Tensor:  # fmt: skip
        """Accumulate this plan's scores for ``grads`` (B, P, D) into ``out`` and return ``out``.

        ``out`` is (R, B) for ``out_layout="rb"`` (circuit-tracer's buffer) or (B, R) for "br",
        float32 or the vectors' dtype, any strides. ``positions_below``: contract only the vectors at
        positions below it (grads then needs only that many positions), for a caller that knows the
        later positions' gradients are zero.
        """
        if positions_below is not None:
            positions_below = check_number(positions_below, "positions_below", integer=True)
            if positions_below < 0:
                raise ValueError(f"positions_below: expected a non-negative integer or None, got {positions_below}")
        check_tensor(grads, "grads", ndim=3, dtypes=DTYPES, device=self.device, unit_last_stride=True)
        if grads.dtype != self.dtype:
            raise TypeError(
                f"grads: expected dtype {str(self.dtype).replace('torch.', '')} (the vectors' dtype), "
                f"got {str(grads.dtype).replace('torch.', '')}"
            )
        B, P, D = grads.shape
        if D != self.d_model:
            raise ValueError(f"grads: expected last dimension {self.d_model} (the vectors' D), got shape {tuple(grads.shape)}")
        need = self.min_positions if positions_below is None else min(self.min_positions, positions_below)
        if P < need:
            why = "max position + 1" if positions_below is None else "positions_below"
            raise ValueError(f"grads: expected at least {need} positions ({why}), got shape {tuple(grads.shape)}")
        if out_layout not in ("rb", "br"):
            raise ValueError(f"out_layout: expected 'rb' or 'br', got {out_layout!r}")
        check_tensor(out, "out", ndim=2, device=self.device)
        if out.dtype not in (torch.float32, self.dtype):
            raise TypeError(f"out: expected dtype float32 or {str(self.dtype).replace('torch.', '')}, got {str(out.dtype).replace('torch.', '')}")
        R, out_b = out.shape if out_layout == "rb" else out.shape[::-1]
        if out_b != B:
            want = f"(*, {B})" if out_layout == "rb" else f"({B}, *)"
            raise ValueError(f"out: expected shape {want} for batch size {B} and out_layout={out_layout!r}, got {tuple(out.shape)}")
        if R < self.min_rows:
            raise ValueError(f"out: expected at least {self.min_rows} rows (max row + 1), got shape {tuple(out.shape)} with out_layout={out_layout!r}")
        stride_r, stride_b = out.stride() if out_layout == "rb" else out.stride()[::-1]
        _check_out_writable(out, grads)
        self._check_unchanged()

        name, impl = _backends.select(OP, grads.device, backend, _IMPLS, captured=self.captured_backend,
                                      dtype=self.dtype, dtype_arg="grads")
        if name == "triton" and self.dtype == torch.bfloat16 and _backends.triton_interpret():
            raise TypeError(
                "grads: the triton backend under TRITON_INTERPRET=1 cannot contract bfloat16 (the interpreter's "
                "numpy dot has no bfloat16 and returns wrong values); use backend='cpu' or 'torch', or float32"
            )
        below = self.min_positions if positions_below is None else min(positions_below, self.min_positions)
        if self.n_vectors and B and below:
            with _device.current(grads.device):
                impl(self, grads, out, R, stride_r, stride_b, out_layout, below)
        return out


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses a tensor's elements can touch."""
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        if size > 1:
            span = (size - 1) * stride * t.element_size()
            lo, hi = (lo + span, hi) if span < 0 else (lo, hi + span)
    return lo, hi + t.element_size()


def _check_out_writable(out: torch.Tensor, grads: torch.Tensor) -> None:
    """``out`` is accumulated into in place: each element must be its own memory, apart from grads."""
    for dim, (size, stride) in enumerate(zip(out.shape, out.stride())):
        if size > 1 and stride == 0:
            raise ValueError(
                f"out: expected a tensor whose elements do not share memory, got stride 0 in dimension {dim} "
                f"(shape {tuple(out.shape)}, strides {out.stride()}; an expand()ed tensor): clone() it first"
            )
    (n, m), (a, b) = out.shape, out.stride()
    if n > 1 and m > 1:
        # i * a + j * b repeats iff some 0 < di < n, 0 < dj < m have di * a == dj * b; the smallest
        # solution is di = b / g, dj = a / g with g = gcd(a, b).
        g = math.gcd(a, b)
        if b // g < n and a // g < m:
            raise ValueError(f"out: expected a tensor whose elements do not share memory, got strides {out.stride()} "
                             f"for shape {tuple(out.shape)}")
    if out.numel() and grads.numel():
        (o_lo, o_hi), (g_lo, g_hi) = _extent(out), _extent(grads)
        if o_lo < g_hi and g_lo < o_hi:
            raise ValueError(
                f"out: expected memory apart from grads (the contraction reads grads while it adds into out), "
                f"got overlapping address ranges [{o_lo:#x}, {o_hi:#x}) and [{g_lo:#x}, {g_hi:#x})"
            )


def contract(
    grads: torch.Tensor,
    vectors: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    out: torch.Tensor,
    *,
    out_layout: str = "rb",
    backend: str | None = None,
) -> torch.Tensor:
    """One-shot contraction. For repeated calls with the same vectors build a :class:`ContractionPlan`."""
    return ContractionPlan(vectors, positions, rows)(grads, out, out_layout=out_layout, backend=backend)


def _raw_args(plan: ContractionPlan, grads: torch.Tensor, tiles, out: torch.Tensor, R: int, stride_r: int, stride_b: int) -> tuple:
    B, P, D = grads.shape
    tile_pos, tile_start, tile_end = tiles
    return (
        _ext.ptr(grads), _ext.dtype_code(grads), B, P, D, grads.stride(0), grads.stride(1),
        _ext.ptr(plan.vectors), _ext.dtype_code(plan.vectors), plan.n_vectors, plan.vectors.stride(0),
        _ext.ptr(plan.rows), _ext.ptr(tile_pos), _ext.ptr(tile_start), _ext.ptr(tile_end), tile_pos.numel(),
        _ext.ptr(out), _ext.dtype_code(out), R, stride_r, stride_b, not plan.unique_rows,
    )  # fmt: skip


def _tiles_below(plan: ContractionPlan, block_s: int, below: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plan's tiles at positions < ``below`` (a prefix: tiles are sorted by position)."""
    tiles = plan.tiles(block_s)
    if below >= plan.min_positions:
        return tiles
    n_tiles = plan.tiles_below(below, block_s)
    return tiles[0][:n_tiles], tiles[1][:n_tiles], tiles[2][:n_tiles]


def _contract_cpu(plan, grads, out, R, stride_r, stride_b, layout, below):
    _ext.ext.contract_cpu(*_raw_args(plan, grads, _tiles_below(plan, _CPU_BLOCK_S, below), out, R, stride_r, stride_b))


def _contract_cuda(plan, grads, out, R, stride_r, stride_b, layout, below):
    tiles = _tiles_below(plan, int(_ext.ext.contract_cuda_tile_s), below)
    args = _raw_args(plan, grads, tiles, out, R, stride_r, stride_b)
    with torch.cuda.device(grads.device):
        _ext.ext.contract_cuda(*args, _ext.cuda_stream(grads.device))


def _contract_triton(plan, grads, out, R, stride_r, stride_b, layout, below):
    from fastattr.triton_kernels import contraction as kernels

    interpret = _backends.triton_interpret()
    block_s = _TRITON_BLOCK_S_INTERPRET if interpret else _TRITON_BLOCK_S
    tile_pos, tile_start, tile_end = _tiles_below(plan, block_s, below)
    kernels.contract(
        grads, plan.vectors, plan.rows, tile_pos, tile_start, tile_end, out, stride_r, stride_b,
        block_s=block_s, atomic=not plan.unique_rows, interpret=interpret, n_out_rows=R,
    )  # fmt: skip


def _contract_torch(plan, grads, out, R, stride_r, stride_b, layout, below):
    # fp32 like the kernels, so that backends agree to rounding on half-precision inputs too; float64
    # stays float64.
    acc = torch.float64 if plan.dtype == torch.float64 else torch.float32
    n = plan.n_vectors if below >= plan.min_positions else int(torch.searchsorted(plan._positions_cpu, below))
    reference.contract(grads.to(acc), plan.vectors[:n].to(acc), plan.positions[:n], plan.rows[:n], out, out_layout=layout)


_IMPLS = {"cuda": _contract_cuda, "triton": _contract_triton, "cpu": _contract_cpu, "torch": _contract_torch}
# The Triton kernel has no float64 tile path (it computes in float32).
_backends.declare_dtypes(OP, ("triton",), FLOAT_DTYPES)
