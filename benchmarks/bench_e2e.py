"""End to end: circuit-tracer's ``attribute()`` then ``prune_graph``, as installed and under
``fastattr.patch_circuit_tracer()`` with each fastattr backend forced, on the same synthetic
replacement model and prompt.

The pipeline is what circuit-tracer's ``create_graph_files`` does: attribute, move the graph to
the device, prune. Models are random-weight ``ReplacementModel``\\ s from ``fastattr.synthetic``
shaped like the real workloads in shared/model_shapes.md (d_model, features per layer, L0 per
position and layer, transcoder kind), with fewer layers and, below the full tier, smaller
dimensions. Model building is not timed.

The backend is forced with ``FASTATTR_BACKEND``, not ``use_backend()``: on the GPU, autograd runs
backward hooks on its own device threads, which do not see a thread-local ``use_backend`` block.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import pytest
import torch

import benchutil
from benchutil import BASELINE, DEVICE, impl_params, per_tier


@dataclass(frozen=True)
class Case:
    name: str
    transcoder: str  # "plt" or "clt"
    n_layers: int
    d_model: int
    d_transcoder: int  # features per layer
    l0: int  # target active features per position and layer
    n_tokens: int
    batch_size: int
    max_feature_nodes: int
    n_heads: int = 4
    dtype: torch.dtype = torch.float32
    backend: str = "transformerlens"

    @property
    def model_key(self) -> tuple:
        return (self.backend, self.transcoder, self.n_layers, self.d_model, self.d_transcoder, self.l0, self.n_heads, self.dtype)

    @property
    def label(self) -> str:
        dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(self.dtype, str(self.dtype))
        return (f"{self.name}: {self.n_layers}L d{self.d_model} {self.d_transcoder}f {self.transcoder.upper()} "
                f"L0~{self.l0} {self.n_tokens}tok B{self.batch_size} N{self.max_feature_nodes} {dt}")  # fmt: skip


BF16 = torch.bfloat16
CASES = per_tier(
    smoke=[
        Case("tiny-plt", "plt", n_layers=2, d_model=64, d_transcoder=128, l0=8, n_tokens=8, batch_size=16, max_feature_nodes=32),
        Case("tiny-clt", "clt", n_layers=2, d_model=64, d_transcoder=128, l0=8, n_tokens=8, batch_size=16, max_feature_nodes=32),
    ],
    # This 2-core machine: d_model and feature counts scaled down about 10x, a few layers.
    cpu=[
        Case("gemma2-2b-plt", "plt", n_layers=6, d_model=256, d_transcoder=2048, l0=40, n_tokens=32, batch_size=64, max_feature_nodes=1024),
        Case("llama3.2-1b-plt", "plt", n_layers=4, d_model=256, d_transcoder=4096, l0=40, n_tokens=32, batch_size=64, max_feature_nodes=1024),
        Case("gemma2-2b-clt", "clt", n_layers=6, d_model=256, d_transcoder=1024, l0=20, n_tokens=32, batch_size=64, max_feature_nodes=1024),
        Case("long-prompt", "plt", n_layers=2, d_model=256, d_transcoder=2048, l0=8, n_tokens=1024, batch_size=64, max_feature_nodes=512),
    ],
    # GPUs: the real d_model, features per layer (Llama's 131k and the CLT scaled down so that the
    # random models build on the host in about a minute), L0 and batch; 8 of the layers; bf16.
    # long-prompt reuses the Gemma model, so it comes right after it (one model is kept at a time).
    full=[
        Case("gemma2-2b-plt", "plt", n_layers=8, d_model=2304, d_transcoder=16384, l0=64, n_heads=8, n_tokens=64, batch_size=256, max_feature_nodes=4096, dtype=BF16),
        Case("long-prompt", "plt", n_layers=8, d_model=2304, d_transcoder=16384, l0=64, n_heads=8, n_tokens=1024, batch_size=256, max_feature_nodes=4096, dtype=BF16),
        Case("llama3.2-1b-plt", "plt", n_layers=8, d_model=2048, d_transcoder=32768, l0=64, n_heads=16, n_tokens=64, batch_size=256, max_feature_nodes=4096, dtype=BF16),
        Case("gemma2-2b-clt", "clt", n_layers=8, d_model=2304, d_transcoder=8192, l0=40, n_heads=8, n_tokens=64, batch_size=256, max_feature_nodes=4096, dtype=BF16),
    ],
)
VOCAB = 512

_MODEL: dict = {}  # one model at a time: the full tier's would not all fit
_BASELINE: dict = {}  # case name -> circuit-tracer's (adjacency, node mask, edge mask), for the check


def _model(case: Case):
    if _MODEL.get("key") != case.model_key:
        _MODEL.clear()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        from fastattr import synthetic

        _MODEL["model"] = synthetic.make_replacement_model(
            backend=case.backend, transcoder=case.transcoder, n_layers=case.n_layers, d_model=case.d_model,
            d_transcoder=case.d_transcoder, n_heads=case.n_heads, d_vocab=VOCAB, n_ctx=max(2048, case.n_tokens + 8),
            feature_density=case.l0 / case.d_transcoder, seed=0, dtype=case.dtype, device=DEVICE,
        )  # fmt: skip
        _MODEL["key"] = case.model_key
    return _MODEL["model"]


def _patch():
    """The full patch; only the contraction while the graph ops are not importable (recorded as
    ``patched``; ``patch_replaced`` lists what the handle replaced)."""
    import fastattr

    try:
        return fastattr.patch_circuit_tracer(), "full"
    except ImportError as exc:
        return fastattr.patch_circuit_tracer(graph=False), f"contraction only (graph ops not importable: {exc})"


@pytest.mark.parametrize("impl", impl_params())
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_attribute_prune(measure, benchmark, monkeypatch, case: Case, impl: str):
    circuit_tracer = pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed (pip install '.[tracer]')")
    import circuit_tracer.graph as ct_graph

    from fastattr import BackendUnavailableError, synthetic

    model = _model(case)
    prompt = synthetic.random_prompt(case.n_tokens, seed=1, vocab_size=VOCAB)

    def pipeline():
        graph = circuit_tracer.attribute(prompt, model, batch_size=case.batch_size, max_feature_nodes=case.max_feature_nodes)
        graph.to(DEVICE)
        pruned = ct_graph.prune_graph(graph)  # looked up at call time: the patched one when patched
        return graph, pruned

    handle, patched, oom = None, None, None
    if impl != BASELINE:
        monkeypatch.setenv("FASTATTR_BACKEND", impl)
        handle, patched = _patch()
    try:
        graph, pruned = measure(
            pipeline, op="e2e attribute+prune", case=case.label, family=case.name, impl=impl, dtype=case.dtype,
            size=case.n_layers * (case.n_tokens + 1) * case.l0, size_label="active features (layers x positions x L0)",
            rounds=per_tier(smoke=1, cpu=2, full=3), warmup=1, patched=patched,
            patch_replaced=list(handle.replaced) if handle is not None else None,
        )  # fmt: skip
    except BackendUnavailableError as exc:
        pytest.skip(f"{impl}: an op of the pipeline cannot run on this backend: {exc}")
    except torch.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0]
    finally:
        if handle is not None:
            handle.undo()
    if oom is not None:
        # Outside the except block, so the traceback's frames (and their tensors) are gone first.
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        pytest.skip(f"{impl}: out of memory on {DEVICE} (circuit-tracer's gathered tensor at this size?): {oom}")

    # Same graph as circuit-tracer's? Recorded, not asserted (tests assert; benchmarks time).
    adjacency, node_mask, edge_mask = graph.adjacency_matrix.cpu(), pruned.node_mask.cpu(), pruned.edge_mask.cpu()
    info = benchmark.extra_info
    info.update(n_nodes=int(adjacency.shape[0]), n_active_features=int(graph.active_features.shape[0]),
                n_selected_features=int(len(graph.selected_features)), kept_nodes=int(node_mask.sum()),
                kept_edges=int(edge_mask.sum()))  # fmt: skip
    if impl != BASELINE:
        info.update(_attribute_timings())
    if impl == BASELINE:
        _BASELINE[case.name] = (adjacency, node_mask, edge_mask, graph.selected_features.cpu())
    elif case.name in _BASELINE and _BASELINE[case.name][0].shape == adjacency.shape:
        ref = _BASELINE[case.name]
        info["max_rel_err"] = benchutil.rel_err(adjacency, ref[0])
        info["masks_equal"] = bool(torch.equal(ref[1], node_mask) and torch.equal(ref[2], edge_mask))


def _attribute_timings() -> dict:
    """fastattr.attribute's split of its last run: the engine used, its own time and the attribution
    loop's share outside it (with FASTATTR_PROFILE=1), influence updates."""
    import importlib

    last = importlib.import_module("fastattr.attribution.driver")._LAST_RUN
    keys = ("engine", "engine_time", "loop_outside_engine", "influence_updates", "edge_storage")
    return {f"attribute_{k}": last[k] for k in keys if k in last}


def _node_identities(selected: torch.Tensor, node_mask: torch.Tensor) -> set:
    n_sel = len(selected)
    sel = selected.tolist()
    return {("f", sel[i]) if i < n_sel else ("x", i - n_sel) for i in torch.nonzero(node_mask).flatten().tolist()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_attribute_prune_topk(measure, benchmark, case: Case):
    """fastattr.attribute with edge_storage="topk" (default k) then fastattr.prune_graph, automatic backend.

    Runs after test_attribute_prune, whose circuit-tracer graph it is compared with: the pruned node
    sets by node identity (they stay comparable when the selected features differ)."""
    pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed (pip install '.[tracer]')")
    import fastattr
    from fastattr import synthetic

    model = _model(case)
    prompt = synthetic.random_prompt(case.n_tokens, seed=1, vocab_size=VOCAB)

    def pipeline():
        graph = fastattr.attribute(prompt, model, batch_size=case.batch_size, max_feature_nodes=case.max_feature_nodes,
                                   edge_storage="topk")  # fmt: skip
        graph.to(DEVICE)  # as create_graph_files does; prune_graph moves the recorded sums along
        return graph, fastattr.prune_graph(graph)

    from fastattr.attribution.driver import DEFAULT_TOPK

    graph, pruned = measure(
        pipeline, op="e2e attribute+prune", case=case.label, family=case.name, impl=f"topk{DEFAULT_TOPK}",
        dtype=case.dtype, size=case.n_layers * (case.n_tokens + 1) * case.l0,
        size_label="active features (layers x positions x L0)", rounds=per_tier(smoke=1, cpu=2, full=3), warmup=1,
    )  # fmt: skip
    info = benchmark.extra_info
    info.update(_attribute_timings(), n_nodes=int(graph.adjacency_matrix.shape[0]),
                kept_nodes=int(pruned.node_mask.sum()), topk=DEFAULT_TOPK)  # fmt: skip
    if case.name in _BASELINE:
        _, ref_nodes, _, ref_selected = _BASELINE[case.name]
        mine = _node_identities(graph.selected_features.cpu(), pruned.node_mask.cpu())
        ref = _node_identities(ref_selected, ref_nodes)
        info["selected_overlap"] = len(set(ref_selected.tolist()) & set(graph.selected_features.tolist())) / max(len(ref_selected), 1)
        info["node_jaccard"] = len(mine & ref) / max(len(mine | ref), 1)
