"""The backward-hook contraction: circuit-tracer's gather + einsum against fastattr's plans.

    out[rows[s], b] += sum_d grads[b, positions[s], d] * vectors[s, d]

One case is one layer's feature hook of a real workload: grads (B, P, D) from the backward pass,
S = L0 x P active decoder rows at that layer (for a cross-layer transcoder's last layer, the rows
of every source layer: S = L0 x P x n_sources), written to S distinct rows of circuit-tracer's
(R, B) buffer in the model's dtype. ``circuit-tracer`` is ``fastattr.reference.contract`` (the
same gather + einsum, which builds a B x S x D tensor); each fastattr backend runs a
``ContractionPlan`` built once beforehand, as ``patch_circuit_tracer`` does once per attribution
run (the build time is recorded as ``plan_s``).

Counts for the roofline: flops = 2 S B D; fewest bytes = grads read once (the positions used),
vectors read once, out read and written once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytest
import torch

from fastattr import ContractionPlan, reference
from fastattr.ops import contraction

import benchutil
from benchutil import BASELINE, DEVICE, impl_params, per_tier


@dataclass(frozen=True)
class Case:
    model: str  # which real workload this layer hook is shaped like
    D: int  # d_model
    P: int  # prompt positions
    l0: int  # active features per position per (source) layer
    B: int  # batch: source nodes per backward pass
    dtype: torch.dtype = torch.float32
    sources: int = 1  # source layers writing at this layer (CLT: all layers up to it)
    # Vectors per buffer row: 1, or a CLT feature's decoder rows for ``sources`` layers contracted
    # in one call (all at the feature's position, into its one row), which the kernels sum with
    # atomics by default and in fixed-order passes when deterministic.
    row_repeats: int = 1

    @property
    def S(self) -> int:
        return self.l0 * self.P * self.sources

    @property
    def name(self) -> str:
        """The label in the report."""
        return f"{self.model} P={self.P} L0={self.l0}{self._sources_label} B={self.B} {self.dt}"

    @property
    def id(self) -> str:
        """The pytest id: no spaces, so that ``-k`` can select it."""
        clt = f"-x{self.sources}" if self.sources > 1 else ""
        rep = f"-rep{self.row_repeats}" if self.row_repeats > 1 else ""
        return f"{self.model}-P{self.P}-L{self.l0}{clt}{rep}-B{self.B}-{self.dt}"

    @property
    def family(self) -> str:
        """Cases that differ only in prompt length: one line in the report's plots."""
        return f"{self.model} L0={self.l0}{self._sources_label} B={self.B} {self.dt}"

    @property
    def _sources_label(self) -> str:
        clt = f" x{self.sources} src" if self.sources > 1 else ""
        return clt + (f", {self.row_repeats} vectors per row" if self.row_repeats > 1 else "")

    @property
    def dt(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


BF16 = torch.bfloat16
# Shapes from shared/model_shapes.md: Gemma-2-2B d_model 2304 (PLT L0 ~40-150 per position and
# layer; CLT rows from all 26 layers at the last one), Llama-3.2-1B d_model 2048; batch 256/512 as
# circuit-tracer runs it. The cpu tier keeps d_model and shrinks batch, positions and L0 so the
# reference's gathered tensor stays near 1-2 GB; the smoke tier is tiny, for plumbing only.
CASES = per_tier(
    smoke=[
        Case("tiny-plt", D=64, P=16, l0=8, B=16),
        Case("tiny-clt", D=64, P=16, l0=4, B=16, sources=3),
        Case("tiny-clt", D=64, P=16, l0=4, B=16, sources=3, row_repeats=3),
    ],
    cpu=[
        Case("gemma2-2b-plt", D=2304, P=8, l0=64, B=64),
        Case("gemma2-2b-plt", D=2304, P=32, l0=64, B=64),
        Case("gemma2-2b-plt", D=2304, P=64, l0=64, B=64),
        Case("llama3.2-1b-plt", D=2048, P=32, l0=64, B=64),
        Case("gemma2-2b-clt-last", D=2304, P=8, l0=16, B=64, sources=26),
        Case("gemma2-2b-clt-all", D=2304, P=8, l0=16, B=64, sources=26, row_repeats=26),
        Case("long-prompt", D=2304, P=1024, l0=4, B=32),
    ],
    full=[
        Case("gemma2-2b-plt", D=2304, P=16, l0=100, B=256, dtype=BF16),
        Case("gemma2-2b-plt", D=2304, P=64, l0=100, B=256, dtype=BF16),
        Case("gemma2-2b-plt", D=2304, P=128, l0=100, B=256, dtype=BF16),
        Case("gemma2-2b-plt", D=2304, P=64, l0=100, B=512, dtype=BF16),
        Case("gemma2-2b-plt", D=2304, P=64, l0=100, B=256),
        Case("llama3.2-1b-plt", D=2048, P=64, l0=100, B=256, dtype=BF16),
        Case("gemma2-2b-clt-last", D=2304, P=32, l0=40, B=256, dtype=BF16, sources=26),
        Case("gemma2-2b-clt-all", D=2304, P=32, l0=40, B=256, dtype=BF16, sources=26, row_repeats=26),
        Case("gemma2-2b-clt-all", D=2304, P=32, l0=40, B=256, dtype=BF16, sources=26, row_repeats=4),
        Case("long-prompt", D=2304, P=1024, l0=40, B=256, dtype=BF16),
    ],
)
# Input sets cycled through, so that repeated runs read memory, not a cache (about 256 MB in all).
_ROTATE_BYTES = 256 << 20


def _elt(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


_INPUTS: dict = {}  # the last case's inputs, shared by its implementations (drawing them takes seconds at full size)


def _inputs(case: Case, device: torch.device, seed: int = 0):
    if _INPUTS.get("key") != (case, device, seed):
        _INPUTS.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _INPUTS["value"] = _draw_inputs(case, device, seed)
        _INPUTS["key"] = (case, device, seed)
    return _INPUTS["value"]


def _draw_inputs(case: Case, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n_sets = max(1, min(8, math.ceil(_ROTATE_BYTES / (case.B * case.P * case.D * _elt(case.dtype)))))
    grads = [torch.randn(case.B, case.P, case.D, generator=gen).to(device, case.dtype) for _ in range(n_sets)]
    vectors = (torch.randn(case.S, case.D, generator=gen) / math.sqrt(case.D)).to(device, case.dtype)
    if case.row_repeats > 1:
        # Each feature's decoder rows, at its position, into its row; listed feature by feature.
        n_features = case.S // case.row_repeats
        feature_pos = torch.randint(0, case.P, (n_features,), generator=gen).sort().values
        positions = feature_pos.repeat_interleave(case.row_repeats)
        rows = torch.randperm(n_features, generator=gen).repeat_interleave(case.row_repeats)
        return grads, vectors, positions.to(device), rows.to(device)
    # circuit-tracer lists active features layer by layer, sorted by position within each layer.
    per_source = case.l0 * case.P
    positions = torch.cat([torch.randint(0, case.P, (per_source,), generator=gen).sort().values for _ in range(case.sources)])
    rows = torch.randperm(case.S, generator=gen)  # each feature owns one buffer row
    return grads, vectors, positions.to(device), rows.to(device)


def _workspace_bytes(case: Case, impl: str) -> int:
    """Temporary memory the implementation needs beyond its inputs (for a skip, not a measurement)."""
    gathered = case.B * case.S * case.D
    if impl == BASELINE:
        return gathered * _elt(case.dtype)
    if impl == "torch":  # fastattr's torch backend upcasts to fp32 before the same gather
        return (gathered + case.B * case.P * case.D + case.S * case.D) * 4
    return 0


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.9)
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    return int(avail * 0.7)  # leave room: overcommitting the host gets the process killed, not an error


def _check_rows(case, grads, vectors, positions, rows, run_once, device) -> float:
    """Relative error of one run on a random (never zero) buffer, on up to 256 rows, against float64."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(case.S, case.B, generator=gen).to(device, case.dtype)
    out = base.clone()
    run_once(grads[0], out)
    used = torch.unique(rows)
    pick = used[torch.randperm(len(used), generator=gen)[:256].to(device)]
    sel = torch.isin(rows, pick)  # every vector adding into a picked row
    g = grads[0][:, positions[sel]].double()  # (B, k, D): gather first, the full grads in fp64 can be GBs
    expected = base.double().index_add(0, rows[sel], torch.einsum("bkd,kd->kb", g, vectors[sel].double()))
    return benchutil.rel_err(out[pick], expected[pick])


# deterministic=True only where rows repeat: with distinct rows it is the default path.
_CASE_PARAMS = [pytest.param(c, False, id=c.id) for c in CASES] + [
    pytest.param(c, True, id=f"{c.id}-deterministic") for c in CASES if c.row_repeats > 1
]


@pytest.mark.parametrize("impl", impl_params())
@pytest.mark.parametrize("case,deterministic", _CASE_PARAMS)
def test_contraction(measure, case: Case, deterministic: bool, impl: str):
    """``deterministic``: fixed-order passes instead of atomics, reported as the implementation
    "<backend> deterministic" beside the default in the same case (its cost)."""
    if deterministic and impl == BASELINE:
        pytest.skip("circuit-tracer has no deterministic switch of its own; its row is the default run's")
    device = DEVICE
    grads, vectors, positions, rows = _inputs(case, device)  # first: it frees the previous case's
    need, free = _workspace_bytes(case, impl), _free_bytes(device)
    if need > free:
        pytest.skip(f"{impl}: needs ~{need / 2**30:.1f} GiB of workspace (the gathered B x S x D tensor), "
                    f"{free / 2**30:.1f} GiB usable on {device}")  # fmt: skip
    out = torch.randn(case.S, case.B, generator=torch.Generator().manual_seed(3)).to(device, case.dtype)

    extra = {}
    if impl == BASELINE:
        def run_once(g, o):
            reference.contract(g, vectors, positions, rows, o)
    else:
        benchutil.sync(device)
        t0 = time.perf_counter()
        plan = ContractionPlan(vectors, positions, rows)
        if impl != "torch":  # otherwise built lazily inside the first (untimed) call
            plan.tiles(contraction.tile_height(impl), by_pass=deterministic and not plan.unique_rows)
        benchutil.sync(device)
        extra["plan_s"] = time.perf_counter() - t0
        extra["deterministic"] = deterministic
        extra["passes"] = plan.n_passes

        def run_once(g, o):
            plan(g, o, backend=impl, deterministic=deterministic)

    try:
        extra["max_rel_err"] = _check_rows(case, grads, vectors, positions, rows, run_once, device)
        it = iter(range(1 << 62))

        def run():
            run_once(grads[next(it) % len(grads)], out)
            return out

        elt = _elt(case.dtype)
        used_positions = int(torch.unique(positions).numel())
        measure(
            run, op="contraction", case=case.name, family=case.family, dtype=case.dtype,
            impl=f"{impl} deterministic" if deterministic else impl,
            size=case.S * case.B * case.D, size_label="S x B x D (multiply-adds)",
            flops=2 * case.S * case.B * case.D,
            min_bytes=(case.B * used_positions * case.D + case.S * case.D) * elt + 2 * case.S * case.B * out.element_size(),
            rounds=per_tier(smoke=3, cpu=3, full=20),
            shape={"B": case.B, "P": case.P, "D": case.D, "S": case.S, "L0": case.l0, "sources": case.sources,
                   "row_repeats": case.row_repeats},
            rotated_input_sets=len(grads), **extra,
        )  # fmt: skip
    except torch.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0]
    else:
        return
    del out  # outside the except block, so that the memory is free for the next case
    if device.type == "cuda":
        torch.cuda.empty_cache()
    pytest.skip(f"{impl}: out of memory on {device}: {oom}")
