"""Random-weight Hugging Face models of every architecture circuit-tracer's nnsight backend maps
(Llama, Qwen3, Gemma-2, Gemma-3 text and conditional generation, GPT-OSS), wrapped by
circuit-tracer's ``NNSightReplacementModel.from_config`` with random transcoders calibrated on
the model's own activations at the feature hooks.

The configs are the real architectures' shapes scaled down, with what distinguishes each kept on:
grouped-query attention, Qwen3's and Gemma-3's query/key norms, Gemma's sandwich norms, (1 + w)
norm weights and embedding scales, Gemma-2's attention and logit soft caps, sliding-window layers
(a window shorter than the test prompts, so that it matters), GPT-OSS's attention sinks, biases and
mixture-of-experts MLP. Norm weights (and GPT-OSS's sinks) are drawn away from their initial
values, so that they are exercised.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .transcoders import _build_transcoders, _calibrate, _calibration_size, _calibration_tokens

HFArchitecture = Literal["llama", "qwen3", "gemma2", "gemma3", "gemma3-conditional", "gpt-oss"]
HF_ARCHITECTURES = ("llama", "qwen3", "gemma2", "gemma3", "gemma3-conditional", "gpt-oss")

# circuit-tracer's nnsight mapping names these hooks per architecture (tl_nnsight_mapping.py).
DEFAULT_HOOKS = {
    "llama": ("mlp.hook_in", "mlp.hook_out"),
    "qwen3": ("mlp.hook_in", "mlp.hook_out"),
    "gemma2": ("hook_resid_mid", "hook_mlp_out"),
    "gemma3": ("hook_resid_mid", "hook_mlp_out"),
    "gemma3-conditional": ("hook_resid_mid", "hook_mlp_out"),
    "gpt-oss": ("hook_resid_mid", "hook_mlp_out"),
}
_CLASS = {
    "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM", "gemma3-conditional": "Gemma3ForConditionalGeneration",
    "gpt-oss": "GptOssForCausalLM",
}  # fmt: skip
# Sliding-window layers see this many keys: shorter than the test prompts.
_WINDOW = 5


def hf_config(architecture: HFArchitecture, *, n_layers: int, d_model: int, n_heads: int, n_kv_heads: int,
              d_mlp: int, d_vocab: int, n_ctx: int, tokenizer_dir: str):  # fmt: skip
    """The HF config of a small model of ``architecture``."""
    import transformers as tf

    d_head = d_model // n_heads
    common = dict(
        vocab_size=d_vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=d_head,
        max_position_embeddings=n_ctx, initializer_range=1.0 / math.sqrt(d_model), tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, architectures=[_CLASS[architecture]], dtype=torch.float32,
    )  # fmt: skip
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if architecture == "llama":
        cfg = tf.LlamaConfig(**common, hidden_act="silu", rms_norm_eps=1e-6)
    elif architecture == "qwen3":
        cfg = tf.Qwen3Config(**common, hidden_act="silu", rms_norm_eps=1e-6)
    elif architecture == "gemma2":
        cfg = tf.Gemma2Config(**common, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=d_head,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=_WINDOW,
                              layer_types=alternating, rms_norm_eps=1e-6)  # fmt: skip
    elif architecture in ("gemma3", "gemma3-conditional"):
        text = dict(common, architectures=None) if architecture == "gemma3-conditional" else common
        cfg = tf.Gemma3TextConfig(**text, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=d_head,
                                  sliding_window=_WINDOW, layer_types=alternating, rope_local_base_freq=10000.0,
                                  rms_norm_eps=1e-6)  # fmt: skip
        if architecture == "gemma3-conditional":
            vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
            cfg = tf.Gemma3Config(text_config=cfg, vision_config=vision, mm_tokens_per_image=4,
                                  architectures=[_CLASS[architecture]], dtype=torch.float32)  # fmt: skip
    elif architecture == "gpt-oss":
        cfg = tf.GptOssConfig(**common, hidden_act="silu", num_local_experts=4, num_experts_per_tok=2,
                              sliding_window=_WINDOW, layer_types=alternating, attention_bias=True,
                              rope_scaling=None, rms_norm_eps=1e-5)  # fmt: skip
    else:
        raise ValueError(f"architecture: expected one of {', '.join(HF_ARCHITECTURES)}, got {architecture!r}")
    # from_config loads the tokenizer from config._name_or_path; the graph's cfg takes
    # model_name / tokenizer_name from it too.
    cfg._name_or_path = tokenizer_dir
    cfg._attn_implementation = "eager"  # what from_config sets (the attention freeze needs it)
    return cfg


@torch.no_grad()
def _perturb(hf: torch.nn.Module, gen: torch.Generator) -> None:
    """Norm weights away from their initial value (1 for w, 0 for Gemma's 1 + w) and GPT-OSS's
    attention sinks to O(1), so that the engine's reading of each is exercised."""
    for name, param in hf.named_parameters():  # noqa: SIM210
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim == 1 and ("norm" in name and leaf == "weight"):
            param.add_(0.2 * torch.randn(param.shape, generator=gen))
        elif leaf == "sinks":
            param.copy_(torch.randn(param.shape, generator=gen))


@torch.no_grad()
def _collect_feature_io(model, tokens: torch.Tensor):
    """The activations at the transcoders' input and output locations, read through circuit-tracer's
    own location accessors in one nnsight trace, <bos> positions dropped."""
    from nnsight import save

    n_layers = model.cfg.n_layers
    n_seq, seq_len = tokens.shape
    ins, outs = [], []  # outside the trace: nnsight 0.6 does not hand names bound inside it back
    with model.trace(tokens):
        for layer in range(n_layers):
            ins.append(save(model.get_feature_input_loc(layer).output))
            outs.append(save(model.get_feature_output_loc(layer).output))

    def flat(t: torch.Tensor) -> torch.Tensor:
        d = t.shape[-1]
        return t.reshape(n_seq, seq_len, d)[:, 1:].reshape(-1, d).float()  # GPT-OSS's experts give (n_tokens, d)

    return [flat(t) for t in ins], [flat(t) for t in outs]


def make_hf_replacement_model(architecture: HFArchitecture, *, transcoder, activation, n_layers: int, d_model: int,
                              d_transcoder: int, n_heads: int, n_kv_heads: int | None, d_mlp: int, d_vocab: int,
                              n_ctx: int, seed: int, skip_connection: bool, density: float, feature_hooks,
                              tokenizer_dir: str, tok_size: int, random_streams):  # fmt: skip
    """circuit-tracer's NNSightReplacementModel of a random ``architecture`` model (see the module
    docstring), on the CPU in float32; the caller moves and casts it."""
    from circuit_tracer import ReplacementModel

    hooks = tuple(feature_hooks) if feature_hooks is not None else DEFAULT_HOOKS[architecture]
    cfg = hf_config(architecture, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                    n_kv_heads=n_kv_heads or n_heads, d_mlp=d_mlp, d_vocab=d_vocab, n_ctx=n_ctx,
                    tokenizer_dir=tokenizer_dir)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen_tc, gen_skip, gen_calib, gen_norm = random_streams(seed, 4)
        transcoders = _build_transcoders(transcoder, activation, n_layers, d_model, d_transcoder, skip_connection,
                                         gen=gen_tc, gen_skip=gen_skip, hooks=hooks)  # fmt: skip
        calib_tokens = _calibration_tokens(_calibration_size(density), tok_size, gen_calib)
        model = ReplacementModel.from_config(cfg, transcoders, backend="nnsight")
    _perturb(model._model, gen_norm)
    ins, outs = _collect_feature_io(model, calib_tokens)
    _calibrate(getattr(model.transcoders, "_module", model.transcoders), transcoder, activation, ins, outs, density)
    return model
