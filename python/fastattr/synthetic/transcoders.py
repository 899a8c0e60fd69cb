"""Random circuit-tracer transcoders (per-layer or cross-layer), calibrated on a model's own
activations.

Encoder and decoder directions are random unit vectors. Encoder biases (and JumpReLU thresholds)
are then set so that a chosen fraction of features fires per position, and decoders are scaled
so that the features write at the scale of the real MLP outputs: feature->feature and
feature->logit influences are then comparable to the error nodes, not negligible.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .tokenizer import _BOS, _SPECIAL_TOKENS

TranscoderKind = Literal["plt", "clt"]
Activation = Literal["relu", "jumprelu"]

# The transcoders read the MLP input and write the MLP output. Both backends know these names:
# TransformerLens via circuit-tracer's ReplacementMLP hook points, nnsight via its Llama mapping
# (post_attention_layernorm output -> mlp output).
_FEATURE_INPUT_HOOK = "mlp.hook_in"
_FEATURE_OUTPUT_HOOK = "mlp.hook_out"


def _default_density(d_transcoder: int) -> float:
    """~64 active features per layer and position (typical of real transcoders' L0), but at
    most 20% of the features, so tiny transcoders are not almost dense."""
    return min(0.2, 64.0 / d_transcoder)


def _calibration_size(density: float) -> int:
    """Calibration positions: enough that each feature's top ``density`` fraction holds >= ~32
    samples (a usable quantile estimate), bounded so calibration stays cheap for large
    transcoders."""
    return int(min(2048, max(512, math.ceil(32 / density))))


def _random_unit_rows(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Gaussian random vectors along the last dim, normalised to unit length."""
    w = torch.randn(*shape, generator=gen)
    return w / w.norm(dim=-1, keepdim=True)


def _random_skip(gen: torch.Generator, d_model: int) -> torch.Tensor:
    # A small random linear map (operator norm ~0.2) so the skip path is present but does not
    # dominate the features.
    return torch.randn(d_model, d_model, generator=gen) * (0.1 / math.sqrt(d_model))


@torch.no_grad()
def _build_transcoders(
    kind: TranscoderKind,
    activation: Activation,
    n_layers: int,
    d_model: int,
    d_transcoder: int,
    skip_connection: bool,
    gen: torch.Generator,
    gen_skip: torch.Generator,
    hooks: tuple[str, str] = (_FEATURE_INPUT_HOOK, _FEATURE_OUTPUT_HOOK),
):
    """Transcoders with random unit encoder / decoder directions and zero biases, on the CPU in
    float32; _calibrate then sets biases, thresholds and decoder scales in place."""
    import torch.nn.functional as F
    from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    f32, cpu = torch.float32, torch.device("cpu")
    if kind == "plt":
        layers = {}
        for layer in range(n_layers):
            # JumpReLU's bandwidth only matters for training gradients; 0.1 as in
            # circuit-tracer's own loaders.
            act_fn = (
                JumpReLU(torch.zeros(d_transcoder), bandwidth=0.1)
                if activation == "jumprelu"
                else F.relu
            )
            tc = SingleLayerTranscoder(
                d_model,
                d_transcoder,
                act_fn,
                layer,
                skip_connection=skip_connection,
                device=cpu,
                dtype=f32,  # the constructor's default is bfloat16
            )
            tc.W_enc.copy_(_random_unit_rows(gen, d_transcoder, d_model))
            tc.W_dec.copy_(_random_unit_rows(gen, d_transcoder, d_model))
            if skip_connection:
                tc.W_skip.copy_(_random_skip(gen_skip, d_model))
            layers[layer] = tc
        return TranscoderSet(
            layers,
            feature_input_hook=hooks[0],
            feature_output_hook=hooks[1],
            scan="fastattr-synthetic-plt",
        )

    clt = CrossLayerTranscoder(
        n_layers,
        d_transcoder,
        d_model,
        activation_function="jump_relu" if activation == "jumprelu" else "relu",
        skip_connection=skip_connection,
        lazy_decoder=False,  # the default (True) reads decoders from safetensors files
        lazy_encoder=False,
        feature_input_hook=hooks[0],
        feature_output_hook=hooks[1],
        scan="fastattr-synthetic-clt",
        device=cpu,
        dtype=f32,
    )
    clt.W_enc.copy_(_random_unit_rows(gen, n_layers, d_transcoder, d_model))
    for layer in range(n_layers):
        # W_dec[layer]: (d_transcoder, n_layers - layer, d_model): one decoder per feature and
        # per output layer >= layer.
        clt.W_dec[layer].copy_(_random_unit_rows(gen, d_transcoder, n_layers - layer, d_model))
        if skip_connection:
            # The CLT applies it as x @ W_skip[layer] (the PLT as x @ W_skip.T); a random
            # matrix needs no transposing either way.
            clt.W_skip[layer].copy_(_random_skip(gen_skip, d_model))
    return clt


def _calibration_tokens(
    n_positions: int, tok_size: int, gen: torch.Generator, seq_len: int = 128
) -> torch.Tensor:
    """A (n_seq, 1 + seq_len) batch of random sequences, each starting with <bos>, covering
    ~n_positions positions besides the <bos>.

    Tokens are drawn uniformly from the non-special ids. Short-ish sequences, because firing
    rates drift a little with position and tests / demos mostly use short prompts.
    """
    n_seq = max(1, math.ceil(n_positions / seq_len))
    toks = torch.randint(len(_SPECIAL_TOKENS), tok_size, (n_seq, seq_len), generator=gen)
    bos = torch.full((n_seq, 1), _SPECIAL_TOKENS.index(_BOS))
    return torch.cat([bos, toks], dim=1)


@torch.no_grad()
def _collect_mlp_io(hf, tokens: torch.Tensor):
    """Inputs and outputs of every layer's MLP (= mlp.hook_in / mlp.hook_out) of the HF Llama
    on the calibration tokens, <bos> positions dropped (circuit-tracer zeroes position 0):
    two lists of (n_positions, d_model) tensors."""
    n_layers = len(hf.model.layers)
    ins: list[torch.Tensor] = [torch.empty(0)] * n_layers
    outs: list[torch.Tensor] = [torch.empty(0)] * n_layers

    def make_hook(layer):
        def hook(module, args, output):
            d = output.shape[-1]
            ins[layer] = args[0][:, 1:].reshape(-1, d)
            outs[layer] = output[:, 1:].reshape(-1, d)

        return hook

    handles = [
        layer.mlp.register_forward_hook(make_hook(i)) for i, layer in enumerate(hf.model.layers)
    ]
    try:
        # Only the hidden states are needed; skip the (n_seq, seq_len, d_vocab) logits.
        hf.model(input_ids=tokens, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return ins, outs


@torch.no_grad()
def _calibrate(
    transcoders,
    kind: TranscoderKind,
    activation: Activation,
    mlp_in: list[torch.Tensor],
    mlp_out: list[torch.Tensor],
    density: float,
) -> None:
    """Set encoder biases / thresholds for the target firing density and scale the decoders to
    the MLP output norm, from the model's own MLP inputs / outputs on random tokens.

    For each feature f with encoder row w_f, q_f is the (1 - density) quantile of w_f . x over
    the calibration positions. ReLU: b_f = -q_f, so the feature is positive exactly on the top
    `density` fraction of positions. JumpReLU: b_f = tau_f - q_f and threshold tau_f (half the
    pre-activation spread), so the same positions pass the threshold and activations jump to
    >= tau_f, as in trained JumpReLU transcoders.
    """
    n_layers = len(mlp_in)
    n_pos = mlp_in[0].shape[0]
    k = max(1, min(n_pos, round(density * n_pos)))

    def enc(layer):
        return transcoders.W_enc[layer] if kind == "clt" else transcoders[layer].W_enc

    def set_bias_threshold(layer, b, tau):
        if kind == "clt":
            transcoders.b_enc[layer].copy_(b)
            if tau is not None:
                transcoders.activation_function.threshold[layer, 0].copy_(tau)
        else:
            transcoders[layer].b_enc.copy_(b)
            if tau is not None:
                transcoders[layer].activation_function.threshold.copy_(tau)

    # Mean over positions of sum_f a_f^2 per layer, used below to scale the decoders. Only this
    # scalar is kept: dense activations of every layer would not fit for large transcoders.
    act_energy = []
    for layer in range(n_layers):
        pre = mlp_in[layer] @ enc(layer).T  # (n_pos, d_transcoder), bias excluded
        q = pre.topk(k, dim=0).values[-1]  # per-feature k-th largest = (1 - density) quantile
        if activation == "jumprelu":
            tau = 0.5 * pre.std(dim=0)
            b = tau - q
            a = pre + b
            a = a * (a > tau)
        else:
            tau = None
            b = -q
            a = torch.relu(pre + b)
        set_bias_threshold(layer, b, tau)
        act_energy.append(a.pow(2).sum(-1).mean().clamp_min(1e-12))
        del pre, a

    # Decoder scale: one scalar per (source, output) layer pair, so that the mean squared norm
    # of the feature reconstruction matches that of the true MLP output. Random unit decoders
    # are nearly orthogonal, so ||sum_f a_f d_f||^2 ~ sum_f a_f^2 and the scale is closed form.
    for out_layer in range(n_layers):
        target = mlp_out[out_layer].pow(2).sum(-1).mean()
        # CLT: every layer <= out_layer writes here; split the target evenly among them.
        sources = range(out_layer + 1) if kind == "clt" else [out_layer]
        share = target / len(sources)
        for src in sources:
            scale = (share / act_energy[src]).sqrt()
            if kind == "clt":
                transcoders.W_dec[src][:, out_layer - src].mul_(scale)
            else:
                transcoders[src].W_dec.mul_(scale)


@torch.no_grad()
def _collect_tl_io(model, tokens: torch.Tensor, hooks: tuple[str, str]):
    """The activations at the transcoders' input and output hooks, <bos> positions dropped."""
    n_layers = model.cfg.n_layers
    names = [f"blocks.{i}.{h}" for h in hooks for i in range(n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=names, return_type=None)
    d = model.cfg.d_model
    take = [cache[n][:, 1:].reshape(-1, d).float() for n in names]
    return take[:n_layers], take[n_layers:]
