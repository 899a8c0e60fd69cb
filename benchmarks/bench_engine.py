"""Attribution engines side by side: circuit-tracer's ``attribute()``, ``fastattr.attribute`` with
``engine="autograd"`` (circuit-tracer's forward over B copies and backward passes, fastattr's
contraction and device-resident rows) and with ``engine="linear"`` (one batch-1 forward and
explicit transposed maps), on the same synthetic model and prompt, in one run. Models are
TransformerLens ones, or Hugging Face ones through circuit-tracer's nnsight backend
(``backend="nnsight"``: Llama, Qwen3, Gemma-2, Gemma-3 and GPT-OSS configs).

Attribution only (pruning is benchmarked in bench_e2e and bench_graph). Model building is not
timed. Each case records the graph's agreement with circuit-tracer's (max relative error of the
adjacency, equal selected features).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import benchutil
import floor
from benchutil import BASELINE, DEVICE, per_tier


@dataclass(frozen=True)
class Case:
    name: str
    transcoder: str
    n_layers: int
    d_model: int
    d_transcoder: int
    l0: int
    n_tokens: int
    batch_size: int
    max_feature_nodes: int | None
    n_heads: int = 4
    dtype: torch.dtype = torch.float32
    architecture: str = "llama"
    n_kv_heads: int | None = None
    d_mlp: int | None = None
    engines: tuple[str, ...] = ("circuit-tracer", "autograd", "linear")
    backend: str = "transformerlens"
    skip: bool = False  # transcoders with skip connections

    @property
    def label(self) -> str:
        dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(self.dtype, str(self.dtype))
        via = (" nnsight" if self.backend == "nnsight" else "") + (" skip" if self.skip else "")
        return (f"{self.name}: {self.architecture}{via} {self.n_layers}L d{self.d_model} {self.d_transcoder}f "
                f"{self.transcoder.upper()} L0~{self.l0} {self.n_tokens}tok B{self.batch_size} "
                f"N{self.max_feature_nodes or 'all'} {dt}")  # fmt: skip


ENGINE_NAMES = ("circuit-tracer", "autograd", "linear")
CASES = per_tier(
    smoke=[
        Case("tiny-plt", "plt", n_layers=2, d_model=64, d_transcoder=128, l0=8, n_tokens=8, batch_size=16, max_feature_nodes=32),
        Case("tiny-nnsight-gemma3", "clt", n_layers=2, d_model=64, d_transcoder=128, l0=8, n_tokens=8, batch_size=16,
             max_feature_nodes=32, architecture="gemma3", n_kv_heads=2, backend="nnsight"),
    ],
    # A workload where the model's passes dominate circuit-tracer's time: 8 layers, d_model 256, 4,096 features, 64 positions,
    # ~48 active per position and layer, 3,000 feature nodes, batch 128; and a CLT of that shape.
    cpu=[
        Case("plt-8L", "plt", n_layers=8, d_model=256, d_transcoder=4096, l0=48, n_tokens=64, batch_size=128, max_feature_nodes=3000),
        Case("clt-8L", "clt", n_layers=8, d_model=256, d_transcoder=4096, l0=48, n_tokens=64, batch_size=128, max_feature_nodes=3000),
        Case("gemma2-gqa-plt", "plt", n_layers=6, d_model=256, d_transcoder=2048, l0=40, n_tokens=128, batch_size=64,
             max_feature_nodes=2048, architecture="gemma2", n_heads=8, n_kv_heads=2),  # fmt: skip
        # A small model, where fixed costs per batch and per call weigh most: Gemma-2-style, skip transcoders.
        Case("gemma2-skip-4L", "plt", n_layers=4, d_model=128, d_transcoder=1024, l0=32, n_tokens=32, batch_size=64,
             max_feature_nodes=1024, architecture="gemma2", n_kv_heads=2, skip=True),  # fmt: skip
        # circuit-tracer's nnsight backend (Hugging Face modules): a small size where circuit-tracer's
        # fixed costs weigh, and one where the model's passes do.
        *[Case(f"nnsight-{arch}-4L", "plt", n_layers=4, d_model=64, d_transcoder=512, l0=64, n_tokens=24, batch_size=32,
               max_feature_nodes=None, architecture=arch, n_kv_heads=2, backend="nnsight")
          for arch in ("llama", "qwen3", "gemma2", "gemma3", "gpt-oss")],
        *[Case(f"nnsight-{arch}-6L", "plt", n_layers=6, d_model=192, d_transcoder=2048, l0=64, n_tokens=48, batch_size=64,
               max_feature_nodes=1500, architecture=arch, n_kv_heads=2, backend="nnsight")
          for arch in ("qwen3", "gemma3")],
    ],
    # Gemma-2-2B shaped: 26 layers, d_model 2304, 8 heads (4 kv heads), d_mlp 9216, 16,384 features,
    # bf16, batch 256. circuit-tracer keeps B copies' patterns (B x 8 x P^2 x 26 layers), so it runs
    # at a batch that fits, for its time per batch.
    full=[
        Case("gemma2-2b-1k", "plt", n_layers=26, d_model=2304, d_transcoder=16384, l0=64, n_heads=8, n_kv_heads=4, d_mlp=9216,
             n_tokens=1024, batch_size=256, max_feature_nodes=4096, dtype=torch.bfloat16, architecture="gemma2",
             engines=("linear",)),
        Case("gemma2-2b-1k-b32", "plt", n_layers=26, d_model=2304, d_transcoder=16384, l0=64, n_heads=8, n_kv_heads=4, d_mlp=9216,
             n_tokens=1024, batch_size=32, max_feature_nodes=1024, dtype=torch.bfloat16, architecture="gemma2"),
        Case("gemma2-2b-4k", "plt", n_layers=26, d_model=2304, d_transcoder=16384, l0=64, n_heads=8, n_kv_heads=4, d_mlp=9216,
             n_tokens=4096, batch_size=256, max_feature_nodes=4096, dtype=torch.bfloat16, architecture="gemma2",
             engines=("linear",)),
        # The nnsight targets: Gemma-3-1B and Qwen3-4B widths (d_model, heads, kv heads, d_mlp; head_dim is
        # d_model / heads) with 8 of their layers, 16,384 features, bf16, 1,024 tokens, batch 256; circuit-tracer
        # at batch 32 for its time per batch.
        *[Case(f"{name}-1k{suffix}", "plt", n_layers=8, d_model=d, d_transcoder=16384, l0=64, n_heads=h, n_kv_heads=kv,
               d_mlp=mlp, n_tokens=1024, batch_size=b, max_feature_nodes=n, dtype=torch.bfloat16, architecture=arch,
               backend="nnsight", engines=engines)
          for name, arch, d, h, kv, mlp in (("gemma3-1b", "gemma3", 1152, 4, 1, 6912), ("qwen3-4b", "qwen3", 2560, 32, 8, 9728))
          for suffix, b, n, engines in (("", 256, 4096, ("linear",)), ("-b32", 32, 1024, ENGINE_NAMES))],
    ],  # fmt: skip
)
ENGINES = [BASELINE, "autograd", "linear"]
VOCAB = 512
_MODEL: dict = {}
_BASELINE: dict = {}


def _shape(case: Case) -> floor.Shape:
    return floor.Shape(n_layers=case.n_layers, d_model=case.d_model, d_mlp=case.d_mlp or 4 * case.d_model,
                       n_heads=case.n_heads, n_kv_heads=case.n_kv_heads or case.n_heads, d_vocab=VOCAB,
                       d_transcoder=case.d_transcoder, cross_layer=case.transcoder == "clt")  # fmt: skip


def _model_key(case: Case) -> tuple:
    return (case.backend, case.transcoder, case.n_layers, case.d_model, case.d_transcoder, case.l0, case.n_heads,
            case.n_kv_heads, case.d_mlp, case.dtype, case.architecture, case.skip)  # fmt: skip


def _model(case: Case):
    if _MODEL.get("key") != _model_key(case):
        _MODEL.clear()
        from fastattr import synthetic

        _MODEL["model"] = synthetic.make_replacement_model(
            backend=case.backend, transcoder=case.transcoder, n_layers=case.n_layers, d_model=case.d_model,
            d_transcoder=case.d_transcoder, n_heads=case.n_heads, d_vocab=VOCAB, n_ctx=max(2048, case.n_tokens + 8),
            feature_density=case.l0 / case.d_transcoder, seed=0, dtype=case.dtype, device=DEVICE,
            architecture=case.architecture, n_kv_heads=case.n_kv_heads, d_mlp=case.d_mlp, skip_connection=case.skip,
        )  # fmt: skip
        _MODEL["key"] = _model_key(case)
    return _MODEL["model"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_attribute_engine(measure, benchmark, roofline, case: Case, engine: str):
    circuit_tracer = pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed (pip install '.[tracer]')")
    import importlib

    if engine not in case.engines:
        pytest.skip(f"{engine} is not run at {case.name}: " + (
            "circuit-tracer's B copies of the model do not fit at this batch; see the -b32 case" if engine == BASELINE
            else "the case measures the linear engine's memory at full batch"))  # fmt: skip

    import fastattr
    from fastattr import synthetic

    model = _model(case)
    prompt = synthetic.random_prompt(case.n_tokens, seed=1, vocab_size=VOCAB)
    kwargs = dict(batch_size=case.batch_size, max_feature_nodes=case.max_feature_nodes)
    if engine == BASELINE:
        fn = lambda: circuit_tracer.attribute(prompt, model, **kwargs)  # noqa: E731
    else:
        fn = lambda: fastattr.attribute(prompt, model, engine=engine, **kwargs)  # noqa: E731
    graph = measure(fn, op="attribute", case=case.label, family=case.name, impl=engine, dtype=case.dtype,
                    size=case.n_layers * (case.n_tokens + 1) * case.l0, size_label="active features (layers x positions x L0)",
                    rounds=per_tier(smoke=1, cpu=2, full=2), warmup=per_tier(smoke=1, cpu=0, full=1))  # fmt: skip
    adjacency = graph.adjacency_matrix.cpu()
    info = benchmark.extra_info
    info.update(n_nodes=int(adjacency.shape[0]), n_active_features=int(graph.active_features.shape[0]))
    if engine != BASELINE:
        last = importlib.import_module("fastattr.attribution.driver")._LAST_RUN
        info.update({f"attribute_{k}": last[k] for k in ("engine", "forward", "logits", "features", "assemble") if k in last})
        if last.get("engine") == "linear":
            floor.record(info, last["work"], _shape(case), int(graph.active_features.shape[0]), roofline,
                         benchutil.device_name(DEVICE), info.get("dtype") or "float32")  # fmt: skip
    if engine == BASELINE:
        _BASELINE[case.name] = (adjacency, graph.selected_features.cpu())
    elif case.name in _BASELINE and _BASELINE[case.name][0].shape == adjacency.shape:
        ref, selected = _BASELINE[case.name]
        info["max_rel_err"] = benchutil.rel_err(adjacency, ref)
        info["selected_equal"] = bool(torch.equal(selected, graph.selected_features.cpu()))
    # Backward sweeps (or passes) per call, for time per batch: the logit batches, then the features'.
    n_sel, n_logits = len(graph.selected_features), len(graph.logit_targets)
    info["n_batches"] = -(-n_sel // case.batch_size) + -(-n_logits // case.batch_size)
