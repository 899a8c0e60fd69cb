"""The linear engine's reader for circuit-tracer's nnsight backend: Hugging Face modules.

circuit-tracer's nnsight backend wraps a Hugging Face model and names, per architecture, where it
freezes (``circuit_tracer.utils.tl_nnsight_mapping``): the eager attention's probabilities (after
softmax, sinks and masks, including sliding windows), the RMSNorm scales, and the feature hooks.
This reader takes the same model apart along the same lines:

- weights from the HF modules: ``self_attn.o_proj`` and ``v_proj`` (grouped-query heads as HF
  repeats them), the norms' weights (``w`` or Gemma's ``1 + w``), the final norm, the embedding's
  scale where it follows the embedding module (Gemma-2);
- the frozen state from torch forward hooks on those modules, installed around circuit-tracer's
  own ``setup_attribution`` (whose nnsight trace runs the model over the prompt at batch 1): each
  attention module's returned probabilities, and each norm's input, from which its scale is
  recomputed as the module computes it (``rsqrt(mean(x^2) + eps)`` in float32);
- the transcoders' skip path as ``compute_skip(layer, I)``.

Mixture-of-experts MLPs (GPT-OSS) never enter the maps: circuit-tracer replaces every MLP output
by the transcoder's skip path plus a detached remainder, so the router and experts are frozen
like any other MLP.

Adding an architecture is one :class:`Architecture` entry in :data:`ARCHITECTURES`: the module
classes that identify it, where its pre-MLP norm sits, whether it has Gemma's sandwich norms, its
norm's weight convention, and which feature-output locations add straight into the residual
stream. Everything else is checked against circuit-tracer's own mapping at run time, so that a
mapping this entry does not match is a reason to fall back, never a wrong graph.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fastattr.attribution.linear_engine import FrozenLayer, FrozenModel, FrozenNorm

NAME = "huggingface"
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Architecture:
    """How one HF architecture's decoder layers are wired, as the linear engine needs it."""

    name: str  # the HF model class (config.architectures[0]), circuit-tracer's mapping key
    layer_classes: tuple[str, ...]
    attention_classes: tuple[str, ...]
    norm_classes: tuple[str, ...]
    norm_weight: Literal["w", "1+w"]  # y = w * x_hat (Llama) or (1 + w) * x_hat (Gemma)
    norm_eps: str  # the norm module's epsilon attribute
    pre_mlp_norm: str  # the norm between the residual stream and the MLP
    post_attention_norm: str | None  # Gemma: a norm on the attention output before the residual add
    # Feature-output locations (relative to the layer) whose value the layer adds to the residual
    # stream unchanged.
    residual_outputs: tuple[str, ...]
    # The embedding module's output is multiplied by sqrt(d_model) before the first layer (Gemma-2).
    embed_scaled_after: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("LlamaForCausalLM", ("LlamaDecoderLayer",), ("LlamaAttention",), ("LlamaRMSNorm",),
                     "w", "variance_epsilon", "post_attention_layernorm", None, ("mlp",)),
        Architecture("Qwen3ForCausalLM", ("Qwen3DecoderLayer",), ("Qwen3Attention",), ("Qwen3RMSNorm",),
                     "w", "variance_epsilon", "post_attention_layernorm", None, ("mlp",)),
        Architecture("GptOssForCausalLM", ("GptOssDecoderLayer",), ("GptOssAttention",), ("GptOssRMSNorm",),
                     "w", "variance_epsilon", "post_attention_layernorm", None, ("mlp", "mlp.source.self_experts_0")),
        Architecture("Gemma2ForCausalLM", ("Gemma2DecoderLayer",), ("Gemma2Attention",), ("Gemma2RMSNorm",),
                     "1+w", "eps", "pre_feedforward_layernorm", "post_attention_layernorm",
                     ("post_feedforward_layernorm",), embed_scaled_after=True),
        Architecture("Gemma3ForCausalLM", ("Gemma3DecoderLayer",), ("Gemma3Attention",), ("Gemma3RMSNorm",),
                     "1+w", "eps", "pre_feedforward_layernorm", "post_attention_layernorm",
                     ("post_feedforward_layernorm",)),
        Architecture("Gemma3ForConditionalGeneration", ("Gemma3DecoderLayer",), ("Gemma3Attention",),
                     ("Gemma3RMSNorm",), "1+w", "eps", "pre_feedforward_layernorm", "post_attention_layernorm",
                     ("post_feedforward_layernorm",)),
    )
}  # fmt: skip

# How a transcoder reads, relative to the pre-MLP norm (``{norm}``): the residual stream, the
# normalised vector before the weight, or the norm's output.
_INPUT_KINDS = {("{norm}", "input"): "resid", ("{norm}.source.self__norm_0", "output"): "normalized",
                ("{norm}", "output"): "norm_output"}  # fmt: skip
_NNSIGHT_HOOK = re.compile(r"(^|\.)nnsight\.|Interleaver")


def claims(model: Any) -> bool:
    return getattr(model, "backend", None) == "nnsight"


# ------------------------------------------------------------------------------ model structure


def _hf_module(model: Any) -> torch.nn.Module | None:
    hf = getattr(model, "_model", None)
    return hf if isinstance(hf, torch.nn.Module) else None


def _raw(module: Any) -> Any:
    """The module behind an nnsight Envoy (``model.transcoders`` is one)."""
    return getattr(module, "_module", module)


def _resolve(root: torch.nn.Module, path: str) -> tuple[Any, str]:
    """The object at a circuit-tracer location path (``model.layers[3].mlp``) and its module
    name as ``named_modules`` spells it (``model.layers.3.mlp``)."""
    current, names = root, []
    for token in path.split("."):
        name, _, index = token.partition("[")
        current = getattr(current, name)
        names.append(name)
        if index:
            current = current[int(index[:-1])]
            names.append(index[:-1])
    return current, ".".join(names)


@dataclass(frozen=True)
class _Plan:
    """Where everything the reader needs lives in one model: module paths and the input hook."""

    arch: Architecture
    layers: tuple[str, ...]  # each layer's path
    embed: str
    final_norm: str
    input_kind: str  # resid / normalized / norm_output


def _mapping(model: Any) -> Any:
    from circuit_tracer.utils.tl_nnsight_mapping import get_mapping

    arch = _architecture_name(model)
    return get_mapping(arch)


def _architecture_name(model: Any) -> str | None:
    cfg = getattr(model, "cfg", None)
    name = getattr(cfg, "original_architecture", None)
    if name is None:
        hf = _hf_module(model)
        archs = getattr(getattr(hf, "config", None), "architectures", None) or [None]
        name = archs[0]
    return name


def _plan(model: Any) -> _Plan | str:
    """Where the reader reads, or why it cannot (a string)."""
    hf = _hf_module(model)
    if hf is None:
        return f"the nnsight model {type(model).__name__} has no wrapped Hugging Face module (model._model)"
    name = _architecture_name(model)
    arch = ARCHITECTURES.get(name)
    if arch is None:
        return f"architecture {name!r} has no reader entry (expressed: {', '.join(ARCHITECTURES)})"
    if type(hf).__name__ != arch.name:
        return f"the wrapped module is a {type(hf).__name__}, but circuit-tracer maps it as {arch.name}"
    try:
        mapping = _mapping(model)
    except (ImportError, ValueError) as exc:
        return f"circuit-tracer has no nnsight mapping for {arch.name} ({exc})"
    prefix = mapping.attention_location_pattern.split(".self_attn.")[0]  # "model.layers[{layer}]"
    if "{layer}" not in prefix or not mapping.attention_location_pattern.startswith(
            prefix + ".self_attn.source.attention_interface_0"):  # fmt: skip
        return (f"circuit-tracer freezes {mapping.attention_location_pattern!r}, not the eager attention "
                "interface's probabilities that the reader captures")  # fmt: skip
    n_layers = int(model.cfg.n_layers)
    tc = _raw(model.transcoders)
    hooks = getattr(tc, "feature_input_hook", None), getattr(tc, "feature_output_hook", None)
    if hooks[0] not in mapping.feature_hook_mapping or hooks[1] not in mapping.feature_hook_mapping:
        return f"feature hooks {hooks} are not in circuit-tracer's {arch.name} mapping"
    in_loc, in_io = mapping.feature_hook_mapping[hooks[0]]
    out_loc, out_io = mapping.feature_hook_mapping[hooks[1]]
    layer0 = prefix.format(layer="{layer}")
    kinds = {(f"{layer0}.{loc.format(norm=arch.pre_mlp_norm)}", io): kind for (loc, io), kind in _INPUT_KINDS.items()}
    input_kind = kinds.get((in_loc, in_io))
    if input_kind is None:
        return f"feature input {hooks[0]!r} at {in_loc} ({in_io}) is not one the reader expresses for {arch.name}"
    if out_io != "output" or out_loc not in {f"{layer0}.{o}" for o in arch.residual_outputs}:
        return f"feature output {hooks[1]!r} at {out_loc} ({out_io}) does not add straight into the residual stream"
    return _Plan(arch, tuple(prefix.format(layer=i) for i in range(n_layers)), mapping.embed_location,
                 f"{mapping.pre_logit_location}.norm", input_kind)  # fmt: skip


def _frozen_norms(plan: _Plan, i: int) -> list[str]:
    """Norm modules of layer ``i`` on the gradient path, whose scale must be frozen."""
    a = plan.arch
    norms = ["input_layernorm"]
    if a.post_attention_norm:
        norms.append(a.post_attention_norm)
    if plan.input_kind != "resid":
        norms.append(a.pre_mlp_norm)
    return [f"{plan.layers[i]}.{n}" for n in norms]


def unsupported_reason(model: Any) -> str | None:
    """Why the engine cannot express this nnsight model exactly, or None if it can."""
    plan = _plan(model)
    if isinstance(plan, str):
        return plan
    hf = _hf_module(model)
    a = plan.arch
    if hf.training:
        return "the model is in training mode (attention dropout would differ between circuit-tracer's batch copies)"
    mapping = _mapping(model)
    frozen_scales = [p.format(layer=i) for p in mapping.layernorm_scale_location_patterns
                     for i in range(len(plan.layers))]  # fmt: skip
    for i, path in enumerate(plan.layers):
        layer, _ = _resolve(hf, path)
        if type(layer).__name__ not in a.layer_classes:
            return f"{path} is a {type(layer).__name__}, not {' / '.join(a.layer_classes)}"
        attn = layer.self_attn
        if type(attn).__name__ not in a.attention_classes:
            return f"{path}.self_attn is a {type(attn).__name__}, not {' / '.join(a.attention_classes)}"
        impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
        if impl != "eager":
            return (f"{path}.self_attn uses the {impl!r} attention implementation, which returns no pattern to "
                    "freeze (circuit-tracer loads models with attn_implementation='eager')")  # fmt: skip
        for proj in ("o_proj", "v_proj"):
            w = getattr(getattr(attn, proj, None), "weight", None)
            if not isinstance(w, torch.Tensor) or w.ndim != 2:
                return f"{path}.self_attn.{proj} is not a linear layer with a 2-D weight"
            if w.device.type == "meta":
                return f"{path}.self_attn.{proj} has its weights offloaded (on the meta device)"
        for norm_path in _frozen_norms(plan, i):
            norm, _ = _resolve(hf, norm_path)
            if type(norm).__name__ not in a.norm_classes or not hasattr(norm, a.norm_eps):
                return f"{norm_path} is a {type(norm).__name__}, not {' / '.join(a.norm_classes)}"
            if not any(s.startswith(norm_path + ".source.") for s in frozen_scales):
                return f"circuit-tracer does not freeze the scale of {norm_path}, which lies on the gradient path"
    final, _ = _resolve(hf, plan.final_norm)
    if type(final).__name__ not in a.norm_classes:
        return f"{plan.final_norm} is a {type(final).__name__}, not {' / '.join(a.norm_classes)}"
    if not any(s.startswith(plan.final_norm + ".source.") for s in frozen_scales):
        return f"circuit-tracer does not freeze the scale of {plan.final_norm}"
    dtype = next(hf.parameters()).dtype
    if dtype not in _DTYPES:
        return f"model dtype {dtype} is not one of float64, float32, float16, bfloat16"
    return _foreign_hooks(hf)


def _foreign_hooks(hf: torch.nn.Module) -> str | None:
    """A torch hook that nnsight did not install changes the model in a way the engine cannot see
    (circuit-tracer's own freezes are nnsight interventions, not hooks)."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    for name, module in hf.named_modules():
        for kind in kinds:
            for hook in getattr(module, kind, {}).values():
                where = f"{getattr(hook, '__module__', '')}.{getattr(hook, '__qualname__', type(hook).__name__)}"
                if not _NNSIGHT_HOOK.search(where):
                    return f"{name or type(hf).__name__} has a {kind[1:-1].replace('_', ' ')} ({where}) that the engine would not apply"
    from torch.nn.modules import module as nn_module

    for kind in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        if getattr(nn_module, kind, None):
            return f"torch has global module hooks ({kind}) that the engine would not apply"
    return None


# ------------------------------------------------------------------------------ frozen state


def _scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The RMSNorm scale the module computes from its input (1, P, D): rsqrt(mean(x^2) + eps), (P, 1)."""
    return torch.rsqrt(x[0].float().pow(2).mean(-1, keepdim=True) + eps)


@contextlib.contextmanager
def capture(model: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Record the patterns and norm scales of the batch-1 forward pass inside the block."""
    plan = _plan(model)
    if isinstance(plan, str):
        raise ValueError(f"model: the linear engine cannot read this model: {plan}")
    hf = _hf_module(model)
    cache: dict[str, torch.Tensor] = {}
    handles = []

    def on_attention(path: str):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if isinstance(weights, torch.Tensor):
                cache[path] = weights[0].detach()

        return hook

    def on_norm(path: str, eps: float):
        def hook(module, args, output):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.ndim == 3:
                cache[path] = _scale(x.detach(), eps)

        return hook

    try:
        norms = {plan.final_norm}
        for i, path in enumerate(plan.layers):
            attn, _ = _resolve(hf, f"{path}.self_attn")
            handles.append(attn.register_forward_hook(on_attention(f"{path}.self_attn")))
            norms.update(_frozen_norms(plan, i))
        for path in sorted(norms):
            norm, _ = _resolve(hf, path)
            handles.append(norm.register_forward_hook(on_norm(path, float(getattr(norm, plan.arch.norm_eps)))))
        yield cache
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------ the frozen model


def _placement(hf: torch.nn.Module, module_name: str, device: torch.device) -> Hashable:
    """The placement label of a module: its entry in an accelerate dispatch map (``hf_device_map``,
    longest matching prefix) where the model has one, else its weights' device."""
    device_map = getattr(hf, "hf_device_map", None)
    if isinstance(device_map, dict) and device_map:
        best = None
        for key in device_map:
            if key == "" or module_name == key or module_name.startswith(key + "."):
                if best is None or len(key) > len(best):
                    best = key
        if best is not None:
            return device_map[best]
    return str(device)


def read(model: Any, ctx: Any, input_ids: torch.Tensor, frozen: dict[str, torch.Tensor]) -> FrozenModel:
    """The frozen, linearised model of one prompt from what :func:`capture` recorded."""
    plan = _plan(model)
    if isinstance(plan, str):
        raise ValueError(f"model: the linear engine cannot read this model: {plan}")
    hf = _hf_module(model)
    a = plan.arch
    n_pos = int(input_ids.numel())
    dtype = next(hf.parameters()).dtype
    tc = _raw(model.transcoders)
    skip = bool(getattr(tc, "skip_connection", False))

    def scale(path: str, device: torch.device) -> torch.Tensor:
        r = frozen.get(path)
        if r is None or r.shape[0] != n_pos:
            raise RuntimeError(f"the forward pass of circuit-tracer's setup recorded no batch-1 scale for {path} "
                               f"(got {None if r is None else tuple(r.shape)}, expected ({n_pos}, 1))")  # fmt: skip
        return r.to(device)

    def norm(path: str, device: torch.device, affine: bool = True) -> FrozenNorm:
        module, _ = _resolve(hf, path)
        r = scale(path, device)
        if not affine:
            return FrozenNorm(r[:, None, :])
        w = module.weight.detach().to(device, torch.float32)
        w = 1.0 + w if a.norm_weight == "1+w" else w
        return FrozenNorm((w * r)[:, None, :])

    layers = []
    for i, path in enumerate(plan.layers):
        layer, name = _resolve(hf, path)
        attn = layer.self_attn
        w_o = attn.o_proj.weight.detach()  # (D, H * d_head)
        w_v = attn.v_proj.weight.detach()  # (H_kv * d_head, D)
        device = w_o.device
        pattern = frozen.get(f"{path}.self_attn")
        if pattern is None or pattern.shape[-1] != n_pos:
            raise RuntimeError(f"the forward pass of circuit-tracer's setup recorded no batch-1 attention pattern for {path}")
        n_heads = pattern.shape[0]
        d_head = w_o.shape[1] // n_heads
        ln2 = None
        if plan.input_kind != "resid":
            ln2 = norm(f"{path}.{a.pre_mlp_norm}", device, affine=plan.input_kind == "norm_output")
        skip_t = None
        if skip:  # compute_skip is linear without bias: its matrix is its image of the identity
            eye = torch.eye(w_o.shape[0], device=ctx.decoder_vecs.device, dtype=ctx.decoder_vecs.dtype)
            skip_t = tc.compute_skip(i, eye).detach().to(device, dtype).T.contiguous()
        layers.append(FrozenLayer(
            ln1=norm(f"{path}.input_layernorm", device),
            ln1_post=norm(f"{path}.{a.post_attention_norm}", device) if a.post_attention_norm else None,
            ln2=ln2,
            ln2_post=None,  # every expressed output location adds straight into the residual stream
            pattern=pattern.to(device, dtype).contiguous(),
            w_o=w_o.contiguous(),
            w_v=w_v.contiguous(),
            n_heads=n_heads,
            n_kv_heads=w_v.shape[0] // d_head,
            d_head=d_head,
            skip_t=skip_t,
            device=device,
            place=_placement(hf, name, device),
        ))  # fmt: skip
    final, final_name = _resolve(hf, plan.final_norm)
    embed, embed_name = _resolve(hf, plan.embed)
    final_device, embed_device = final.weight.device, embed.weight.device
    embed_scale = None
    if a.embed_scaled_after:  # Gemma-2: hidden = embed(ids) * sqrt(d_model), the factor in the model dtype
        embed_scale = torch.tensor(math.sqrt(embed.weight.shape[1]), dtype=dtype, device=embed_device)
    rows_device = ctx.decoder_vecs.device
    rows_place = _placement(hf, "transcoders", rows_device)
    if rows_place == str(rows_device) and rows_device == embed_device:
        rows_place = _placement(hf, embed_name, embed_device)
    return FrozenModel(
        layers=layers,
        ln_final=norm(plan.final_norm, final_device),
        final_device=final_device,
        embed_device=embed_device,
        dtype=dtype,
        d_model=embed.weight.shape[1],
        n_pos=n_pos,
        embed_scale=embed_scale,
        final_place=_placement(hf, final_name, final_device),
        embed_place=_placement(hf, embed_name, embed_device),
        rows_place=rows_place,
        source={"reader": NAME, "architecture": a.name, "input": plan.input_kind},
    )
