"""``make_replacement_model``: a small random transformer with random transcoders, wrapped as a
circuit-tracer ``ReplacementModel`` for either backend.

The network is one HF Llama for both backends (TransformerLens gets a copy of its weights), so
the same arguments give the same model, transcoders and graphs on either backend. Weights are
drawn on the CPU in float32 and only then cast / moved, so the same seed gives the same model on
every device and dtype, up to rounding.

What circuit-tracer 0.5.0 and nnsight 0.6.1 require of it (see the comments at each use):

* Models whose name contains "gemma-3" and ends in "-it" get 4 positions zeroed instead of 1,
  so the names here avoid that.
* ``NNSightReplacementModel.from_config`` loads the tokenizer from ``config._name_or_path`` and
  picks its hook mapping from ``config.architectures[0]``; for ``LlamaForCausalLM`` the
  transcoder hooks ``mlp.hook_in`` / ``mlp.hook_out`` map to ``post_attention_layernorm``
  output / ``mlp`` output. The TransformerLens backend wraps every ``block.mlp`` in a
  ``ReplacementMLP`` with the same two hook names, so both backends use them.
* ``model.transcoders`` on the nnsight model is an ``Envoy`` (the module is its ``._module``),
  and assigning it registers the transcoders as a submodule of the wrapped HF model
  (``model._model.transcoders``). ``from_config`` takes no device / dtype: it builds the HF
  model on the CPU at ``config.dtype``.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Literal

import torch

from .hf_models import HF_ARCHITECTURES, make_hf_replacement_model
from .tokenizer import _saved_vocab_size, build_tokenizer, default_tokenizer_dir
from .transcoders import (
    _FEATURE_INPUT_HOOK,
    _FEATURE_OUTPUT_HOOK,
    Activation,
    TranscoderKind,
    _build_transcoders,
    _calibrate,
    _calibration_size,
    _calibration_tokens,
    _collect_mlp_io,
    _collect_tl_io,
    _default_density,
)

Backend = Literal["transformerlens", "nnsight"]
Architecture = Literal["llama", "gpt2", "gemma2", "qwen3", "gemma3", "gemma3-conditional", "gpt-oss"]
_TL_ARCHITECTURES = ("llama", "gpt2", "gemma2")


def make_replacement_model(
    *,
    backend: Backend = "transformerlens",
    transcoder: TranscoderKind = "plt",
    n_layers: int = 2,
    d_model: int = 64,
    d_transcoder: int = 128,
    n_heads: int = 4,
    d_vocab: int = 512,
    d_mlp: int | None = None,
    n_ctx: int = 2048,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer_dir: str | os.PathLike | None = None,
    activation: Activation = "relu",
    feature_density: float | None = None,
    skip_connection: bool = False,
    architecture: Architecture = "llama",
    n_kv_heads: int | None = None,
    feature_hooks: tuple[str, str] | None = None,
):
    """A random-weight circuit-tracer ``ReplacementModel``, built offline.

    The network is a small Llama (RMSNorm, rotary attention, gated SiLU MLP, untied
    embeddings, no biases), drawn once as an HF ``LlamaForCausalLM``:

    * ``backend="nnsight"``: that HF model, wrapped by circuit-tracer's
      ``NNSightReplacementModel``;
    * ``backend="transformerlens"``: a ``HookedTransformer`` with the same weights.

    So for the same arguments both backends compute the same function with the same
    transcoders, and their attribution graphs agree up to floating-point error.

    Args:
        backend: "transformerlens" or "nnsight".
        transcoder: "plt" (a ``TranscoderSet`` of ``SingleLayerTranscoder``) or "clt" (one
            ``CrossLayerTranscoder`` with in-memory decoders).
        n_layers, d_model, n_heads, d_mlp (default 4 * d_model): model shape.
        n_ctx: the longest sequence the model takes (TransformerLens builds its rotary tables
            and causal mask this long).
        d_transcoder: features per layer.
        d_vocab: vocabulary size of the model, and of the tokenizer built for it (a tokenizer
            already in ``tokenizer_dir`` may be smaller).
        seed: model, transcoders and calibration data are all functions of the seed.
        dtype, device: where the finished model lives. Weights are drawn on the CPU in float32
            and calibrated in float32 (on ``device``), so they do not depend on either beyond
            rounding.
        tokenizer_dir: folder for the tokenizer (default :func:`default_tokenizer_dir`); it is
            built there if the folder holds none.
        activation: "relu" or "jumprelu" transcoder nonlinearity.
        feature_density: target fraction of features active per (layer, position) on random
            text. Default ``min(0.2, 64 / d_transcoder)``: ~64 per layer for large transcoders,
            at most 20% of them for small ones.
        skip_connection: give the transcoders a small random ``W_skip``. Drawn from its own
            random stream, so the other weights are the same with or without it.
        architecture: "llama" (both backends); TransformerLens: "gpt2" (LayerNorm with bias,
            learned absolute positions, GELU MLP) or "gemma2" (RMSNorm before and after each
            sublayer, rotary, gated GELU MLP, attention-score soft cap), drawn by TransformerLens'
            own initialiser with norm weights perturbed around 1; nnsight: "gemma2", "qwen3",
            "gemma3", "gemma3-conditional" or "gpt-oss" (and "llama" with other hooks or
            n_kv_heads), an HF model of that class built by circuit-tracer's ``from_config``
            (see :mod:`fastattr.synthetic.hf_models`).
        n_kv_heads: key/value heads for grouped-query attention (every architecture but the
            TransformerLens "llama"; default: one per head).
        feature_hooks: (feature_input_hook, feature_output_hook) of the transcoders, default
            ("mlp.hook_in", "mlp.hook_out"); TransformerLens also takes "hook_resid_mid" or
            "ln2.hook_normalized" as input and "hook_mlp_out" as output; nnsight models take any
            pair circuit-tracer's mapping names for the architecture (default: Llama and Qwen3
            the MLP's, the others hook_resid_mid / hook_mlp_out). Transcoders are then
            calibrated on the model's own activations at those hooks.

    Returns:
        A ``TransformerLensReplacementModel`` or ``NNSightReplacementModel``, ready for
        ``circuit_tracer.attribute``.
    """
    # Imported first, so that a missing circuit-tracer or transformers fails before anything is built.
    from circuit_tracer import ReplacementModel  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    hooks = tuple(feature_hooks) if feature_hooks is not None else (_FEATURE_INPUT_HOOK, _FEATURE_OUTPUT_HOOK)
    density = _default_density(d_transcoder) if feature_density is None else feature_density
    _check_arguments(backend, transcoder, activation, d_model, n_heads, architecture, hooks, n_kv_heads, density)
    tokenizer_dir, tok_size = _tokenizer_for(tokenizer_dir, d_vocab)
    llama_cfg = _llama_config(n_layers, d_model, n_heads, 4 * d_model if d_mlp is None else d_mlp, d_vocab, n_ctx,
                              tokenizer_dir)  # fmt: skip
    device = torch.device(device)
    default_hooks = hooks == (_FEATURE_INPUT_HOOK, _FEATURE_OUTPUT_HOOK)
    if backend == "nnsight" and (architecture != "llama" or not default_hooks or n_kv_heads is not None):
        model = make_hf_replacement_model(architecture, transcoder=transcoder, activation=activation,
                                          n_layers=n_layers, d_model=d_model, d_transcoder=d_transcoder,
                                          n_heads=n_heads, n_kv_heads=n_kv_heads,
                                          d_mlp=4 * d_model if d_mlp is None else d_mlp, d_vocab=d_vocab, n_ctx=n_ctx,
                                          seed=seed, skip_connection=skip_connection, density=density,
                                          feature_hooks=feature_hooks, tokenizer_dir=tokenizer_dir, tok_size=tok_size,
                                          random_streams=_random_streams)  # fmt: skip
    elif architecture != "llama" or not default_hooks:
        model = _native_tl_model(architecture, llama_cfg, n_ctx, tokenizer_dir, n_kv_heads, seed, hooks, transcoder,
                                 activation, d_transcoder, skip_connection, density, tok_size, device)  # fmt: skip
    else:
        hf, transcoders = _calibrated_llama(llama_cfg, seed, transcoder, activation, d_transcoder, skip_connection,
                                            density, tok_size, device)  # fmt: skip
        model = _wrap_llama(hf, llama_cfg, transcoders, backend, n_ctx, tokenizer_dir)
        del hf  # before the move: the wrapped model holds a copy of its weights
    _move(model, backend, device, dtype)
    return model


def _check_arguments(backend, transcoder, activation, d_model, n_heads, architecture, hooks, n_kv_heads, density):
    """Refuse arguments make_replacement_model cannot build, naming the argument."""
    if backend not in ("transformerlens", "nnsight"):
        raise ValueError(f"backend must be 'transformerlens' or 'nnsight', got {backend!r}")
    if transcoder not in ("plt", "clt"):
        raise ValueError(f"transcoder must be 'plt' or 'clt', got {transcoder!r}")
    if activation not in ("relu", "jumprelu"):
        raise ValueError(f"activation must be 'relu' or 'jumprelu', got {activation!r}")
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    known = sorted(set(_TL_ARCHITECTURES) | set(HF_ARCHITECTURES))
    if architecture not in known:
        raise ValueError(f"architecture: expected one of {', '.join(known)}, got {architecture!r}")
    if backend == "transformerlens" and architecture not in _TL_ARCHITECTURES:
        raise ValueError(f"architecture: the transformerlens backend builds {', '.join(_TL_ARCHITECTURES)}, "
                         f"got {architecture!r} (circuit-tracer maps it for the nnsight backend only)")  # fmt: skip
    if backend == "nnsight" and architecture not in HF_ARCHITECTURES:
        raise ValueError(f"architecture: the nnsight backend builds {', '.join(HF_ARCHITECTURES)}, got {architecture!r}")
    # TransformerLens' Llama shares its weights with the nnsight one, drawn with one head per key/value.
    shares_llama = architecture == "llama" and backend == "transformerlens"
    if n_kv_heads is not None and (shares_llama or n_heads % n_kv_heads):
        raise ValueError(f"n_kv_heads: expected a divisor of n_heads={n_heads}, and no value with the transformerlens "
                         f"'llama', got {n_kv_heads} with {backend!r} {architecture!r}")  # fmt: skip
    if not 0.0 < density <= 1.0:
        raise ValueError(f"feature_density must be in (0, 1], got {density}")


def _tokenizer_for(tokenizer_dir: str | os.PathLike | None, d_vocab: int) -> tuple[str, int]:
    """The tokenizer folder (built there when it holds none) as an absolute path, and its size."""
    if tokenizer_dir is None:
        tokenizer_dir = default_tokenizer_dir(d_vocab)
    if _saved_vocab_size(Path(tokenizer_dir)) is None:
        build_tokenizer(tokenizer_dir, vocab_size=d_vocab)
    tokenizer_dir = os.path.abspath(os.fspath(tokenizer_dir))
    tok_size = _saved_vocab_size(Path(tokenizer_dir))
    assert tok_size is not None
    if tok_size > d_vocab:
        raise ValueError(f"tokenizer in {tokenizer_dir} has {tok_size} tokens > d_vocab={d_vocab}")
    return tokenizer_dir, tok_size


def _random_streams(seed: int, n: int) -> list[torch.Generator]:
    """Generators seeded ``seed + 1``, ``seed + 2``, ...: separate streams, so that e.g.
    skip_connection=True adds W_skip without changing the encoders and decoders the same seed
    gives without it. In order: transcoders, skip maps, calibration tokens, then any others."""
    return [torch.Generator().manual_seed(seed + 1 + i) for i in range(n)]


def _calibrated_llama(llama_cfg, seed, kind, activation, d_transcoder, skip_connection, density, tok_size, device):
    """The HF Llama and its transcoders, calibrated on that model's MLP inputs and outputs."""
    from transformers import LlamaForCausalLM

    # Fork the global RNG: the HF initialiser draws from it, and building a model should not
    # change the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = LlamaForCausalLM(llama_cfg).eval()
        gen_tc, gen_skip, gen_calib = _random_streams(seed, 3)
        transcoders = _build_transcoders(kind, activation, llama_cfg.num_hidden_layers, llama_cfg.hidden_size,
                                         d_transcoder, skip_connection, gen=gen_tc, gen_skip=gen_skip)  # fmt: skip
        calib_tokens = _calibration_tokens(_calibration_size(density), tok_size, gen_calib)

    # Calibrate on the HF model, not on a wrapped one, so that both backends get identical
    # transcoders; in float32 on the target device (fast for large models on a GPU; on another
    # device the biases may differ from the CPU's at rounding level).
    hf.to(device)
    transcoders.to(device)
    mlp_in, mlp_out = _collect_mlp_io(hf, calib_tokens.to(device))
    _calibrate(transcoders, kind, activation, mlp_in, mlp_out, density)
    return hf, transcoders


def _wrap_llama(hf, llama_cfg, transcoders, backend: Backend, n_ctx: int, tokenizer_dir: str):
    """circuit-tracer's ReplacementModel of ``backend`` holding a copy of ``hf``'s weights.

    The replacement models are built on the CPU in float32 (what both configs say), get their
    weights copied from ``hf``, and are moved / cast by the caller."""
    from circuit_tracer import ReplacementModel

    if backend == "nnsight":
        # from_config builds its own HF model from the config (and loads the tokenizer from
        # config._name_or_path). Its random initialisation would be overwritten anyway, so skip
        # it where transformers allows (and keep the caller's RNG state where it does not).
        with torch.random.fork_rng(devices=[]), _hf_init_skipped():
            model = ReplacementModel.from_config(llama_cfg, transcoders, backend="nnsight")
        # Assigning model.transcoders made them a submodule of the HF model itself (nnsight
        # forwards module attributes to the wrapped module), hence strict=False.
        res = model._model.load_state_dict(hf.state_dict(), strict=False)
        stray = [k for k in res.missing_keys if not k.startswith("transcoders.")]
        if stray or res.unexpected_keys:
            raise RuntimeError(f"weight copy mismatch: {stray} {res.unexpected_keys}")
        return model
    tl_cfg = _tl_config(llama_cfg, n_ctx, tokenizer_dir)
    model = ReplacementModel.from_config(tl_cfg, transcoders, backend="transformerlens")
    _load_into_tl_replacement(model, _llama_to_tl_state_dict(hf, tl_cfg))
    return model


def _llama_config(n_layers, d_model, n_heads, d_mlp, d_vocab, n_ctx, tokenizer_dir):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=d_vocab,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=n_ctx,
        hidden_act="silu",
        # 1/sqrt(d_model) keeps each projection roughly norm-preserving, so attention scores
        # are O(1) and patterns not uniform (HF's default 0.02 suits wide models only).
        initializer_range=1.0 / math.sqrt(d_model),
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        # circuit-tracer picks its nnsight hook mapping from architectures[0].
        architectures=["LlamaForCausalLM"],
        dtype=torch.float32,
    )
    # NNSightReplacementModel.from_config loads the tokenizer from config._name_or_path, and
    # the graph's cfg takes model_name / tokenizer_name from it too.
    cfg._name_or_path = tokenizer_dir
    # What NNSightReplacementModel.from_config sets anyway (its attention freeze hooks need the
    # eager attention's dropout call); using it for calibration too keeps the numerics alike.
    cfg._attn_implementation = "eager"
    return cfg


def _tl_config(llama_cfg, n_ctx: int, tokenizer_dir: str):
    """The TransformerLens config of the same Llama network (what TL's own Llama loader would
    derive from ``llama_cfg``)."""
    from transformer_lens import HookedTransformerConfig

    d_head = llama_cfg.hidden_size // llama_cfg.num_attention_heads
    return HookedTransformerConfig(
        n_layers=llama_cfg.num_hidden_layers,
        d_model=llama_cfg.hidden_size,
        n_ctx=n_ctx,
        d_head=d_head,
        n_heads=llama_cfg.num_attention_heads,
        d_mlp=llama_cfg.intermediate_size,
        d_vocab=llama_cfg.vocab_size,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        eps=llama_cfg.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=llama_cfg.rope_theta,
        rotary_adjacent_pairs=False,  # HF Llama rotates halves, not adjacent pairs
        original_architecture="LlamaForCausalLM",
        # circuit-tracer checks model_name for "gemma-3 ... -it" to zero 4 positions instead of 1.
        model_name="fastattr-synthetic-llama",
        # HookedTransformer.__init__ loads it with AutoTokenizer.from_pretrained (local: offline).
        tokenizer_name=tokenizer_dir,
        init_weights=False,  # the weights are copied from the HF model
        dtype=torch.float32,
        device="cpu",
        default_prepend_bos=True,
    )


def _llama_to_tl_state_dict(hf, tl_cfg) -> dict[str, torch.Tensor]:
    """HF Llama weights under HookedTransformer parameter names. Llama has no biases; TL's
    bias parameters are set to zero."""
    n, h = tl_cfg.n_heads, tl_cfg.d_head
    sd = {
        "embed.W_E": hf.model.embed_tokens.weight,
        "ln_final.w": hf.model.norm.weight,
        "unembed.W_U": hf.lm_head.weight.T,
        "unembed.b_U": torch.zeros(tl_cfg.d_vocab),
    }
    for i, layer in enumerate(hf.model.layers):
        att, mlp = layer.self_attn, layer.mlp
        p = f"blocks.{i}."
        # HF projections are (n_heads * d_head, d_model) linear weights; TL keeps per-head
        # (n_heads, d_model, d_head) input maps and (n_heads, d_head, d_model) output maps.
        for name, proj in (("W_Q", att.q_proj), ("W_K", att.k_proj), ("W_V", att.v_proj)):
            sd[p + "attn." + name] = proj.weight.reshape(n, h, -1).transpose(1, 2)
            sd[p + "attn.b_" + name[-1]] = torch.zeros(n, h)
        sd[p + "attn.W_O"] = att.o_proj.weight.T.reshape(n, h, -1)
        sd[p + "attn.b_O"] = torch.zeros(tl_cfg.d_model)
        sd[p + "ln1.w"] = layer.input_layernorm.weight
        sd[p + "ln2.w"] = layer.post_attention_layernorm.weight
        sd[p + "mlp.W_in"] = mlp.up_proj.weight.T
        sd[p + "mlp.W_gate"] = mlp.gate_proj.weight.T
        sd[p + "mlp.W_out"] = mlp.down_proj.weight.T
        sd[p + "mlp.b_in"] = torch.zeros(tl_cfg.d_mlp)
        sd[p + "mlp.b_out"] = torch.zeros(tl_cfg.d_model)
    return {k: v.detach().contiguous() for k, v in sd.items()}


@torch.no_grad()
def _load_into_tl_replacement(model, sd: dict[str, torch.Tensor]) -> None:
    """Copy TL-named weights into a TransformerLens replacement model. circuit-tracer wrapped
    block.mlp and unembed (ReplacementMLP.old_mlp, ReplacementUnembed.old_unembed), so the
    model's own parameter names carry an extra component."""
    params = dict(model.named_parameters())
    loaded = set()
    for name, param in params.items():
        if name.startswith("transcoders."):
            continue
        key = name.replace(".old_mlp.", ".").replace(".old_unembed.", ".")
        if key not in sd:
            raise RuntimeError(f"no Llama weight for TransformerLens parameter {name}")
        param.copy_(sd[key])
        loaded.add(key)
    missing = set(sd) - loaded
    if missing:
        raise RuntimeError(f"TransformerLens model has no parameters for {sorted(missing)}")


def _native_tl_config(architecture: str, llama_cfg, n_ctx: int, tokenizer_dir: str, n_kv_heads: int | None):
    """A TransformerLens config for the TL-only architectures (or Llama, for other hooks)."""
    from transformer_lens import HookedTransformerConfig

    if architecture == "llama":
        return _tl_config(llama_cfg, n_ctx, tokenizer_dir)
    d_model, n_heads = llama_cfg.hidden_size, llama_cfg.num_attention_heads
    d_head = d_model // n_heads
    common = dict(
        n_layers=llama_cfg.num_hidden_layers, d_model=d_model, n_ctx=n_ctx, d_head=d_head, n_heads=n_heads,
        d_mlp=llama_cfg.intermediate_size, d_vocab=llama_cfg.vocab_size, model_name=f"fastattr-synthetic-{architecture}",
        tokenizer_name=tokenizer_dir, dtype=torch.float32, device="cpu", default_prepend_bos=True,
        n_key_value_heads=n_kv_heads, initializer_range=1.0 / math.sqrt(d_model),
    )  # fmt: skip
    if architecture == "gpt2":
        return HookedTransformerConfig(**common, act_fn="gelu_new", normalization_type="LN",
                                       positional_embedding_type="standard", original_architecture="GPT2LMHeadModel")  # fmt: skip
    return HookedTransformerConfig(
        **common, act_fn="gelu_pytorch_tanh", gated_mlp=True, normalization_type="RMS", final_rms=True,
        use_normalization_before_and_after=True, positional_embedding_type="rotary", rotary_dim=d_head,
        rotary_adjacent_pairs=False, attn_scores_soft_cap=50.0, output_logits_soft_cap=30.0, eps=1e-6,
        original_architecture="Gemma2ForCausalLM",
    )  # fmt: skip


@torch.no_grad()
def _native_tl_model(architecture, llama_cfg, n_ctx, tokenizer_dir, n_kv_heads, seed, hooks, kind, activation,
                     d_transcoder, skip_connection, density, tok_size, device):  # fmt: skip
    """A TransformerLens replacement model whose transcoders are calibrated at ``hooks`` on the
    model itself (the other builders calibrate on the HF Llama at the MLP's input and output)."""
    from circuit_tracer import ReplacementModel
    from transformers import LlamaForCausalLM

    tl_cfg = _native_tl_config(architecture, llama_cfg, n_ctx, tokenizer_dir, n_kv_heads)
    d_model, n_layers = tl_cfg.d_model, tl_cfg.n_layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = LlamaForCausalLM(llama_cfg).eval() if architecture == "llama" else None
        gen_tc, gen_skip, gen_calib, gen_norm = _random_streams(seed, 4)
        transcoders = _build_transcoders(kind, activation, n_layers, d_model, d_transcoder, skip_connection,
                                         gen=gen_tc, gen_skip=gen_skip, hooks=hooks)  # fmt: skip
        calib_tokens = _calibration_tokens(_calibration_size(density), tok_size, gen_calib)
        model = ReplacementModel.from_config(tl_cfg, transcoders, backend="transformerlens")
    if hf is not None:
        _load_into_tl_replacement(model, _llama_to_tl_state_dict(hf, tl_cfg))
        del hf
    else:
        # Norm weights away from 1 and LayerNorm biases away from 0, so that both are exercised.
        for name, param in model.named_parameters():
            if name.startswith("transcoders."):
                continue
            if name.endswith(".w") and param.ndim == 1:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen_norm))
            elif name.endswith(".b") and param.ndim == 1:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen_norm))
    model.to(device, print_details=False)
    mlp_in, mlp_out = _collect_tl_io(model, calib_tokens.to(device), hooks)
    _calibrate(transcoders, kind, activation, mlp_in, mlp_out, density)
    return model


def _hf_init_skipped():
    """transformers' context that turns weight initialisation into a no-op (what
    from_pretrained uses), or a no-op context where it is not available."""
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - other transformers versions
        return contextlib.nullcontext()
    return no_init_weights()


def _raw_transcoders(model):
    """The transcoder module itself: nnsight wraps module attributes in an Envoy."""
    tc = model.transcoders
    return getattr(tc, "_module", tc)


def _move(model, backend: Backend, device: torch.device, dtype: torch.dtype) -> None:
    """Move / cast model and transcoders after calibration."""
    if device == torch.device("cpu") and dtype == torch.float32:
        return
    transcoders = _raw_transcoders(model)
    if backend == "transformerlens":
        # HookedTransformer.to (unlike nn.Module.to) also updates cfg.device / cfg.dtype, which
        # TL components read later.
        model.to(device, print_details=False)
        model.to(dtype, print_details=False)
    else:
        # Envoy.to only takes a device, so convert the raw HF module. nn.Module.to converts
        # parameters in place, so circuit-tracer's cached embed_weight / unembed_weight
        # references follow.
        model._model.to(device=device, dtype=dtype)
    transcoders.to(device, dtype)
