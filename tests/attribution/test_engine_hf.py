"""The linear engine on circuit-tracer's nnsight backend (Hugging Face models) against circuit-tracer.

Every architecture circuit-tracer's nnsight mapping names (Llama, Qwen3, Gemma-2, Gemma-3 text and
conditional generation, GPT-OSS), built by circuit-tracer's ``from_config`` from small random
configs (fastattr.synthetic) with what distinguishes each switched on: grouped-query attention,
sliding windows shorter than the prompts, attention sinks, soft caps, sandwich norms, norm weights
away from 1. Per-layer and cross-layer transcoders, with and without skip, at every feature hook
the mapping names. Shapes and seeds differ from the benchmarks'. Plus the automatic choice, the
fallback reasons, half precision, batch independence and a model split across placements.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from helpers import assert_same_graph, tracer_prompt

import fastattr

ct = pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed (pip install '.[tracer]')")
pytest.importorskip("nnsight", reason="nnsight is not installed (circuit-tracer's nnsight backend)")
from circuit_tracer.utils.tl_nnsight_mapping import get_mapping  # noqa: E402

from fastattr.attribution.linear_engine import LinearEngine  # noqa: E402
from fastattr.synthetic.hf_models import _CLASS, HF_ARCHITECTURES  # noqa: E402

driver = importlib.import_module("fastattr.attribution.driver")
_MODELS: dict = {}
_INPUT_HOOKS = ("hook_resid_mid", "mlp.hook_in", "ln2.hook_normalized")
_OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")


def _model(architecture: str, **kwargs):
    from fastattr import synthetic

    key = (architecture, *sorted(kwargs.items()))
    if key not in _MODELS:
        params = {"backend": "nnsight", "architecture": architecture, "n_layers": 3, "d_model": 32,
                  "d_transcoder": 48, "n_heads": 4, "n_kv_heads": 2, "seed": 17} | kwargs  # fmt: skip
        _MODELS[key] = synthetic.make_replacement_model(**params)
    return _MODELS[key]


def _mapped_hooks() -> list:
    """Every (input, output) feature-hook pair circuit-tracer's mapping names, per architecture."""
    cases = []
    for arch in HF_ARCHITECTURES:
        names = get_mapping(_CLASS[arch]).feature_hook_mapping
        for i in (h for h in _INPUT_HOOKS if h in names):
            for o in (h for h in _OUTPUT_HOOKS if h in names):
                cases.append(pytest.param(arch, (i, o), id=f"{arch}-{i}-{o}"))
    return cases


@pytest.mark.parametrize("skip", [False, True], ids=["noskip", "skip"])
@pytest.mark.parametrize("transcoder", ["plt", "clt"])
@pytest.mark.parametrize("arch", HF_ARCHITECTURES)
def test_auto_engine_is_linear_and_equals_circuit_tracer(arch, transcoder, skip):
    model = _model(arch, transcoder=transcoder, skip_connection=skip)
    prompt = tracer_prompt(11, seed=23)  # longer than the sliding window (5)
    g0 = ct.attribute(prompt, model, batch_size=40, verbose=False)
    g1 = fastattr.attribute(prompt, model, batch_size=40)
    assert driver._LAST_RUN["engine"] == "linear"
    assert driver._LAST_RUN["reader"] == "huggingface"
    assert_same_graph(g0, g1)


@pytest.mark.parametrize(("arch", "hooks"), _mapped_hooks())
def test_every_mapped_feature_hook(arch, hooks):
    model = _model(arch, transcoder="plt", skip_connection=True, feature_hooks=hooks, n_layers=2, seed=29)
    prompt = tracer_prompt(9, seed=31)
    g0 = ct.attribute(prompt, model, batch_size=64, verbose=False)
    g1 = fastattr.attribute(prompt, model, batch_size=64, engine="linear")
    assert_same_graph(g0, g1)


def test_the_patched_tracer_runs_the_linear_engine():
    model = _model("qwen3", transcoder="clt")
    prompt = tracer_prompt(10, seed=37)
    g0 = ct.attribute(prompt, model, batch_size=32, verbose=False)
    with fastattr.patch_circuit_tracer():
        g1 = ct.attribute(prompt, model, batch_size=32, verbose=False)
    assert driver._LAST_RUN["engine"] == "linear"
    assert_same_graph(g0, g1, masks=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "gemma3", "gpt-oss"])
def test_half_precision_models(arch, dtype):
    # circuit-tracer's backward runs in the model's dtype; so does the sweep, with the norm scales
    # in float32 as the HF norms compute them and the contraction accumulating in float32.
    model = _model(arch, transcoder="plt", dtype=dtype, n_layers=2, seed=41)
    prompt = tracer_prompt(9, seed=43)
    g0 = ct.attribute(prompt, model, batch_size=32, verbose=False)
    g1 = fastattr.attribute(prompt, model, batch_size=32, engine="linear")
    a0, a1 = g0.adjacency_matrix.float(), g1.adjacency_matrix.float()
    assert torch.equal(g0.selected_features, g1.selected_features)
    assert (a0 - a1).abs().max() <= 2e-2 * a0.abs().max()


@pytest.mark.parametrize("arch", ["gemma3", "gpt-oss"])
def test_every_feature_at_batch_16_equals_batch_256(arch):
    model = _model(arch, transcoder="clt", skip_connection=True, seed=47)
    prompt = tracer_prompt(12, seed=53)
    small = fastattr.attribute(prompt, model, batch_size=16, max_feature_nodes=None)
    large = fastattr.attribute(prompt, model, batch_size=256, max_feature_nodes=None)
    assert torch.equal(small.selected_features, large.selected_features)
    assert len(small.selected_features) == len(small.active_features)
    a, b = small.adjacency_matrix, large.adjacency_matrix
    assert (a - b).abs().max() <= 1e-6 * a.abs().max()


def _fallback(model, prompt, match: str, caplog) -> None:
    """engine='auto' runs circuit-tracer's autograd path and logs ``match`` once; 'linear' raises it."""
    driver._LOGGED_FALLBACKS.clear()
    g0 = ct.attribute(prompt, model, batch_size=64, verbose=False)
    with caplog.at_level(logging.INFO, logger="fastattr"):
        g1 = fastattr.attribute(prompt, model, batch_size=64)
        fastattr.attribute(prompt, model, batch_size=64)
    assert driver._LAST_RUN["engine"] == "autograd"
    reasons = [r.getMessage() for r in caplog.records if "autograd engine (" in r.getMessage()]
    assert len(reasons) == 1 and match in reasons[0], reasons
    assert_same_graph(g0, g1, masks=False)
    with pytest.raises(ValueError, match=f"engine: 'linear' cannot express this model: .*{match}"):
        fastattr.attribute(prompt, model, engine="linear")


def test_an_attention_without_a_pattern_is_named():
    # circuit-tracer itself freezes the eager attention's probabilities (it cannot trace sdpa), so
    # there is no graph to compare: the reason is what a forced linear engine reports.
    from fastattr.attribution.readers import unsupported_reason

    model = _model("gemma2", transcoder="plt", n_layers=2, seed=59)
    config = model._model.config
    config._attn_implementation = "sdpa"
    try:
        assert "'sdpa' attention implementation" in unsupported_reason(model)
        with pytest.raises(ValueError, match="engine: 'linear' cannot express this model: .*'sdpa' attention"):
            fastattr.attribute(tracer_prompt(8, seed=61), model, engine="linear")
    finally:
        config._attn_implementation = "eager"


def test_a_users_torch_hook_falls_back(caplog):
    model = _model("llama", transcoder="plt", n_layers=2, n_kv_heads=1, seed=67)
    hf = model._model
    handle = hf.model.layers[0].self_attn.register_forward_hook(lambda m, args, out: (out[0] * 0.5, *out[1:]))
    try:
        _fallback(model, tracer_prompt(8, seed=71), "forward hook", caplog)
    finally:
        handle.remove()


def test_an_unknown_layer_class_falls_back(caplog):
    model = _model("qwen3", transcoder="plt", n_layers=2, seed=73)
    layer = model._model.model.layers[1]
    known = type(layer)
    layer.__class__ = type("MyDecoderLayer", (known,), {})  # same forward, a class no entry names
    try:
        _fallback(model, tracer_prompt(8, seed=79), "MyDecoderLayer", caplog)
    finally:
        layer.__class__ = known


def test_a_model_split_across_placements(monkeypatch):
    # accelerate's dispatch records where each module lives in hf_device_map; labels that differ on
    # one CPU exercise every boundary the engine crosses on several GPUs: the cotangent moves once
    # per boundary, and rows contracted away from the rows' placement are added into them.
    model = _model("gemma3", transcoder="clt", skip_connection=True, n_layers=4, seed=83)
    prompt = tracer_prompt(10, seed=89)
    g0 = ct.attribute(prompt, model, batch_size=32, verbose=False)
    whole = fastattr.attribute(prompt, model, batch_size=32, engine="linear")
    transfers: list = []
    run = LinearEngine.run

    def recording(self, out, layers, *args):
        run(self, out, layers, *args)
        transfers.append((int(layers.max()), list(self.last_transfers)))

    monkeypatch.setattr(LinearEngine, "run", recording)
    hf = model._model
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.layers.2": 1,
                  "model.layers.3": 2, "model.norm": 2, "lm_head": 2, "transcoders": 0}  # fmt: skip
    monkeypatch.setattr(hf, "hf_device_map", device_map, raising=False)
    split = fastattr.attribute(prompt, model, batch_size=32, engine="linear")
    assert_same_graph(g0, split)
    a, b = whole.adjacency_matrix, split.adjacency_matrix
    assert (a - b).abs().max() <= 1e-6 * a.abs().max()
    place = {4: 2, 3: 2, 2: 1, 1: 1, 0: 0}  # a seed above layer i enters at its layer's placement
    for top, moves in transfers:
        hops = [(src, dst) for src, dst, _ in moves]
        expected = [(p, q) for p, q in zip([place[i] for i in range(top, -1, -1)], [place[i] for i in range(top - 1, -1, -1)]) if p != q]
        assert hops == expected, (top, hops)
        assert all(n > 0 for _, _, n in moves)
    assert any(top == 4 for top, _ in transfers)  # the logit batch crossed both boundaries
