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
from dataclasses import dataclass

import torch

from fastattr import reference
from fastattr._runtime import backends as _backends
from fastattr._runtime import device as _device
from fastattr._runtime import ext as _ext
from fastattr._runtime.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_index_range,
    check_number,
    check_same_device,
    check_shape,
    check_tensor,
)

OP = _backends.op("contract")
# float64 too: circuit-tracer contracts in the model's dtype, and float64 models are how it checks
# its backends against each other. The cpu and cuda kernels accumulate float64 in float64.
DTYPES = (*FLOAT_DTYPES, torch.float64)


def tile_height(backend: str) -> int:
    """The most vectors one tile of ``backend``'s kernel holds: the height a plan cuts its tiles to.
    Defined once where the kernel is (csrc/contraction.h for cpu and cuda, the Triton module's
    ``tile_height``); the torch reference does not tile (0)."""
    if backend == "cpu":
        return int(_ext.ext.contract_cpu_tile_s)
    if backend == "cuda":
        return int(_ext.ext.contract_cuda_tile_s)
    if backend == "triton":
        from fastattr.triton_kernels import contraction as kernels

        return kernels.tile_height(_backends.triton_interpret())
    if backend == "torch":
        return 0
    raise ValueError(f"backend: expected one of {', '.join(_backends.BACKENDS)}, got {backend!r}")


@dataclass(frozen=True)
class Launches:
    """How a plan's last call ran (:attr:`ContractionPlan.last_launches`).

    ``launches``: kernel launches (the torch backend: reference calls); ``atomic``: whether any
    used float atomics, whose order, and so the rounding, changes from run to run;
    ``deterministic``: the resolved flag. A deterministic call on a plan with repeated rows runs
    one launch per pass on cuda, triton and torch, none atomic; the cpu kernel orders the adds
    itself, in one launch."""

    backend: str
    deterministic: bool
    launches: int
    atomic: bool


@dataclass(frozen=True)
class _TileSet:
    """A plan's tiles of one height, grouped into launches. ``bounds[k]:bounds[k + 1]`` are the
    tiles of group k, sorted by position within it; ``pos_cpu`` is their positions on the host,
    so that a position prefix is found without a device round trip."""

    pos: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    pos_cpu: torch.Tensor
    bounds: tuple[int, ...]
    versions: tuple[int, int, int]

    def below(self, positions_below: int | None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each group's tiles at positions < ``positions_below`` (all of them for None)."""
        groups = []
        for lo, hi in zip(self.bounds[:-1], self.bounds[1:]):
            if positions_below is not None:
                hi = lo + int(torch.searchsorted(self.pos_cpu[lo:hi], positions_below))
            groups.append((self.pos[lo:hi], self.start[lo:hi], self.end[lo:hi]))
        return groups


def _cut_tiles(keys: torch.Tensor, block_s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(key, start, end) of each tile: runs of equal ``keys`` (sorted) cut to at most ``block_s``."""
    key, counts = torch.unique_consecutive(keys, return_counts=True)
    group_start = torch.cumsum(counts, 0) - counts
    n_tiles = (counts + block_s - 1) // block_s
    tile_group = torch.repeat_interleave(torch.arange(len(key), device=keys.device), n_tiles)
    first_tile = torch.cumsum(n_tiles, 0) - n_tiles
    within = torch.arange(int(n_tiles.sum()), device=keys.device) - first_tile[tile_group]
    start = group_start[tile_group] + within * block_s
    end = torch.minimum(start + block_s, (group_start + counts)[tile_group])
    return key[tile_group], start, end


def _occurrences(rows: torch.Tensor) -> torch.Tensor:
    """For each entry, how many earlier entries hold the same row (0 for its first occurrence)."""
    order = torch.argsort(rows, stable=True)
    _, counts = torch.unique_consecutive(rows[order], return_counts=True)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    occ = torch.empty_like(order)
    occ[order] = torch.arange(len(rows), device=rows.device) - first
    return occ


class ContractionPlan:
    """The fixed half of the contraction: vectors, their positions and output rows.

    Build it once per attribution run (positions and vectors do not change between batches) and
    call it with each batch's grads. Sorting by position and cutting tiles happen here, once.

    Args:
        vectors: (S, D) float32, float16, bfloat16 or float64, unit stride along D.
        positions: (S,) int32/int64 position of each vector in grads' second dimension.
        rows: (S,) int32/int64 output row of each vector. Repeated rows accumulate.

    Repeated rows: the kernels add them with float atomics, whose order (and so the last bits of
    the sums) changes from run to run. A deterministic call (``deterministic=True``, or torch's
    ``use_deterministic_algorithms``) runs the plan in :attr:`n_passes` passes instead, pass k
    holding each row's k-th vector (in position order), so that no row repeats within a launch,
    and launches them in that order without atomics (cuda, triton, torch). The cpu kernel needs no
    passes: its threads then own batch columns and add every tile in order, in one launch.
    """

    def __init__(self, vectors: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, *, take_vectors: bool = False):
        """``take_vectors``: the caller gives ``vectors`` up, so that a plan whose vectors are
        already in its order keeps that tensor instead of a copy (they are the largest input)."""
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
        self.unique_rows = n == 0 or int(torch.unique(rows).numel()) == n
        # Sorted by position, and within a position by pass (see the class docstring), so that
        # both the plain tiles (runs of one position) and the pass tiles (runs of one position and
        # pass) are contiguous vector ranges.
        order = torch.argsort(positions, stable=True)
        passes = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.n_passes = 1
        if not self.unique_rows:
            passes = _occurrences(rows[order])
            self.n_passes = int(passes.max()) + 1
            within = torch.argsort(positions[order].to(torch.int64) * self.n_passes + passes, stable=True)
            order, passes = order[within], passes[within]
        in_order = take_vectors and vectors.is_contiguous() and (n < 2 or bool((order[1:] > order[:-1]).all()))
        self.vectors = vectors if in_order else vectors[order].contiguous()
        self._positions = positions[order].to(torch.int32).contiguous()
        self._rows = rows[order].to(torch.int32).contiguous()
        self._passes = passes.to(torch.int32).contiguous()
        # Bounds the grads and out shapes must cover, checked per call at no device cost.
        self.min_positions = int(self._positions.max()) + 1 if n else 0
        self.min_rows = int(self._rows.max()) + 1 if n else 0
        self._tile_sets: dict[tuple[int, bool], _TileSet] = {}
        # A host copy of the sorted positions, so that a position prefix is found without a device
        # round trip.
        self._positions_cpu = self._positions.cpu()
        # The bounds above are what every launch relies on; an in-place write to the index tensors
        # bumps their version counters, which each call compares (no device work, no sync).
        self._versions = (self._positions._version, self._rows._version, self._passes._version)
        # The use_backend() choice in force here: the plan runs on it from any thread (autograd's
        # device threads call it from backward hooks) unless the calling thread chooses otherwise.
        self.captured_backend = _backends.forced_choice()
        self.last_launches: Launches | None = None

    @property
    def positions(self) -> torch.Tensor:
        """(S,) int32 positions, sorted. Read-only: the plan's bounds and tiles are derived from it."""
        return self._positions

    @property
    def rows(self) -> torch.Tensor:
        """(S,) int32 output rows in position order. Read-only, like :attr:`positions`."""
        return self._rows

    @property
    def passes(self) -> torch.Tensor:
        """(S,) int32 pass of each vector (how many vectors of its row come before it). Read-only."""
        return self._passes

    def vectors_below(self, positions_below: int) -> int:
        """How many vectors sit at positions < ``positions_below``: what a call with that bound reads."""
        return int(torch.searchsorted(self._positions_cpu, positions_below))

    def _check_unchanged(self) -> None:
        if (self._positions._version, self._rows._version, self._passes._version) != self._versions or any(
            (t.pos._version, t.start._version, t.end._version) != t.versions for t in self._tile_sets.values()
        ):
            raise ValueError(
                "plan: expected the ContractionPlan's positions, rows and tiles unchanged since construction "
                "(its index bounds were validated then), got tensors modified in place; build a new ContractionPlan"
            )

    def _tile_set(self, block_s: int, by_pass: bool) -> _TileSet:
        key = (block_s, by_pass)
        if key not in self._tile_sets:
            if self.n_vectors == 0:
                pos = start = end = torch.zeros(0, dtype=torch.int64, device=self.device)
                bounds: tuple[int, ...] = (0, 0)
            elif not by_pass:
                pos, start, end = _cut_tiles(self._positions, block_s)
                bounds = (0, len(pos))
            else:
                tile_key, start, end = _cut_tiles(self._positions.to(torch.int64) * self.n_passes + self._passes, block_s)
                tile_pass = tile_key % self.n_passes
                # Pass-major: a stable sort keeps each pass's tiles in position order.
                order = torch.argsort(tile_pass, stable=True)
                pos, start, end = tile_key[order] // self.n_passes, start[order], end[order]
                counts = torch.bincount(tile_pass, minlength=self.n_passes).cpu()
                bounds = (0, *torch.cumsum(counts, 0).tolist())
            pos, start, end = (t.to(torch.int32).contiguous() for t in (pos, start, end))
            self._tile_sets[key] = _TileSet(pos, start, end, pos.cpu(), bounds, (pos._version, start._version, end._version))
        return self._tile_sets[key]

    def tiles(self, block_s: int, *, by_pass: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(position, start, end) int32 per tile: runs of at most ``block_s`` same-position vectors.
        ``by_pass``: the deterministic mode's tiles, runs of one position and pass, pass by pass."""
        t = self._tile_set(block_s, by_pass)
        return t.pos, t.start, t.end

    def __call__(self, grads: torch.Tensor, out: torch.Tensor, *, out_layout: str = "rb", backend: str | None = None,
                 positions_below: int | None = None, deterministic: bool | None = None) -> torch.Tensor:  # fmt: skip
        """Accumulate this plan's scores for ``grads`` (B, P, D) into ``out`` and return ``out``.

        ``out`` is (R, B) for ``out_layout="rb"`` (circuit-tracer's buffer) or (B, R) for "br",
        float32 or the vectors' dtype, any strides. ``positions_below``: contract only the vectors at
        positions below it (grads then needs only that many positions), for a caller that knows the
        later positions' gradients are zero. ``deterministic``: run-to-run identical sums with
        repeated rows (class docstring); None follows ``torch.use_deterministic_algorithms``.
        """
        deterministic = _backends.deterministic(deterministic)
        positions_below = self._check_positions_below(positions_below)
        self._check_grads(grads, positions_below)
        R, stride_r, stride_b = self._check_out(out, out_layout, grads.shape[0])
        _check_out_writable(out, grads)
        self._check_unchanged()

        impl = OP.select(grads.device, backend, dtype=self.dtype, arg="grads", captured=self.captured_backend)
        below = self.min_positions if positions_below is None else min(positions_below, self.min_positions)
        call = _Call(self, grads, out, out_layout, R, stride_r, stride_b, below, deterministic)
        if self.n_vectors and grads.shape[0] and below:
            with _device.current(grads.device, "contract"):
                impl.fn(call)
        self.last_launches = Launches(impl.backend, deterministic, call.launches, call.atomic)
        return out

    @staticmethod
    def _check_positions_below(positions_below: int | None) -> int | None:
        if positions_below is None:
            return None
        positions_below = check_number(positions_below, "positions_below", integer=True)
        if positions_below < 0:
            raise ValueError(f"positions_below: expected a non-negative integer or None, got {positions_below}")
        return positions_below

    def _check_grads(self, grads: torch.Tensor, positions_below: int | None) -> None:
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

    def _check_out(self, out: torch.Tensor, out_layout: str, B: int) -> tuple[int, int, int]:
        """(R, stride along R, stride along B) of a valid ``out``."""
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
        return R, stride_r, stride_b


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
    deterministic: bool | None = None,
) -> torch.Tensor:
    """One-shot contraction. For repeated calls with the same vectors build a :class:`ContractionPlan`
    (its call documents ``deterministic``)."""
    plan = ContractionPlan(vectors, positions, rows)
    return plan(grads, out, out_layout=out_layout, backend=backend, deterministic=deterministic)


# ------------------------------------------------------------------------------ launch helpers


@dataclass
class _Call:
    """One call's validated arguments, handed to the backend's launch helper; the helper records
    how many launches it made and whether any was atomic."""

    plan: ContractionPlan
    grads: torch.Tensor
    out: torch.Tensor
    layout: str
    R: int
    stride_r: int
    stride_b: int
    below: int  # contract the vectors at positions < below (at most the plan's max position + 1)
    deterministic: bool
    launches: int = 0
    atomic: bool = False

    def schedule(self, block_s: int, *, passes: bool = True) -> list[tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], bool]]:
        """The (tiles, rows may repeat) launches, in order: one launch, or with repeated rows,
        ``deterministic`` and ``passes`` one launch per pass, none with repeated rows. A backend
        that orders repeated rows itself (``passes=False``) gets one launch and records no atomics."""
        plan = self.plan
        prefix = None if self.below >= plan.min_positions else self.below
        by_pass = passes and self.deterministic and not plan.unique_rows
        groups = plan._tile_set(block_s, by_pass).below(prefix)
        repeats = not plan.unique_rows and not by_pass
        launches = [(tiles, repeats) for tiles in groups if tiles[0].numel()]
        self.launches, self.atomic = len(launches), repeats and not self.deterministic and bool(launches)
        return launches


def _kernel_kwargs(call: _Call, tiles: tuple[torch.Tensor, torch.Tensor, torch.Tensor], atomic: bool) -> dict:
    """The keyword arguments of ``_C.contract_cpu`` / ``contract_cuda`` (csrc/contraction_ops.cpp)."""
    plan, grads, out = call.plan, call.grads, call.out
    B, P, D = grads.shape
    tile_pos, tile_start, tile_end = tiles
    return dict(
        grads=_ext.ptr(grads), grads_dtype=_ext.dtype_code(grads), B=B, P=P, D=D,
        grads_stride_b=grads.stride(0), grads_stride_p=grads.stride(1),
        vectors=_ext.ptr(plan.vectors), vectors_dtype=_ext.dtype_code(plan.vectors), S=plan.n_vectors,
        vectors_stride_s=plan.vectors.stride(0), rows=_ext.ptr(plan.rows),
        tile_pos=_ext.ptr(tile_pos), tile_start=_ext.ptr(tile_start), tile_end=_ext.ptr(tile_end),
        n_tiles=tile_pos.numel(),
        out=_ext.ptr(out), out_dtype=_ext.dtype_code(out), R=call.R, out_stride_r=call.stride_r,
        out_stride_b=call.stride_b, atomic=atomic,
    )  # fmt: skip


@OP.register("cuda", dtypes=DTYPES)
def _contract_cuda(call: _Call) -> None:
    stream = _ext.cuda_stream(call.grads.device)
    for tiles, atomic in call.schedule(tile_height("cuda")):
        _ext.ext.contract_cuda(**_kernel_kwargs(call, tiles, atomic), stream=stream)


# The Triton kernel has no float64 tile path (it computes in float32).
@OP.register("triton", dtypes=FLOAT_DTYPES)
def _contract_triton(call: _Call) -> None:
    from fastattr.triton_kernels import contraction as kernels

    interpret = _backends.triton_interpret()
    if interpret and call.plan.dtype == torch.bfloat16:
        raise TypeError(
            "grads: the triton backend under TRITON_INTERPRET=1 cannot contract bfloat16 (the interpreter's "
            "numpy dot has no bfloat16 and returns wrong values); use backend='cpu' or 'torch', or float32"
        )
    plan = call.plan
    for (tile_pos, tile_start, tile_end), atomic in call.schedule(kernels.tile_height(interpret)):
        kernels.contract(
            call.grads, plan.vectors, plan.rows, tile_pos, tile_start, tile_end, call.out, call.stride_r,
            call.stride_b, atomic=atomic, interpret=interpret, n_out_rows=call.R,
        )  # fmt: skip


@OP.register("cpu", dtypes=DTYPES)
def _contract_cpu(call: _Call) -> None:
    # Deterministic with repeated rows: one launch whose threads own batch columns and add in tile
    # order (csrc/contraction_cpu.cpp), cheaper than one fork and join per pass.
    launches = call.schedule(tile_height("cpu"), passes=False)
    # A half-precision out has no atomic add: the kernel runs repeated rows' tasks in order instead.
    call.atomic = call.atomic and call.out.dtype not in (torch.float16, torch.bfloat16)
    for tiles, atomic in launches:
        _ext.ext.contract_cpu(**_kernel_kwargs(call, tiles, atomic), deterministic=call.deterministic)


@OP.register("torch", dtypes=DTYPES)
def _contract_torch(call: _Call) -> None:
    """The reference's gather and einsum, accumulated with index_add_. Repeated rows under
    ``deterministic``: one call per pass, so that no index_add_ sees a row twice."""
    plan = call.plan
    # fp32 like the kernels, so that backends agree to rounding on half-precision inputs too; float64
    # stays float64.
    acc = torch.float64 if plan.dtype == torch.float64 else torch.float32
    n = plan.n_vectors if call.below >= plan.min_positions else int(torch.searchsorted(plan._positions_cpu, call.below))
    grads = call.grads.to(acc)
    vectors, positions, rows = plan.vectors[:n].to(acc), plan.positions[:n], plan.rows[:n]
    if not call.deterministic or plan.unique_rows:
        reference.contract(grads, vectors, positions, rows, call.out, out_layout=call.layout)
        # index_add_ adds a repeated row's entries with atomics on a GPU.
        call.launches, call.atomic = 1, not plan.unique_rows and call.out.is_cuda
        return
    passes = plan.passes[:n]
    for k in range(plan.n_passes):
        idx = torch.nonzero(passes == k).flatten()
        if idx.numel():
            reference.contract(grads, vectors[idx], positions[idx], rows[idx], call.out, out_layout=call.layout)
            call.launches += 1
