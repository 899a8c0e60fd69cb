"""The linear engine's reader for circuit-tracer's TransformerLens backend.

It reads each block's weights from TransformerLens' components (``W_O``, ``W_V`` or grouped
``_W_V``, the norms' ``w``), the transcoders' skip path as ``compute_skip(layer, I)``, and the
frozen state (``attn.hook_pattern`` and the norms' ``hook_scale``) from forward hooks installed
around circuit-tracer's own ``setup_attribution``, which runs the model over the prompt anyway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from fastattr.attribution.linear_engine import FrozenLayer, FrozenModel, FrozenNorm

NAME = "transformerlens"
# Where the transcoders read and write, as circuit-tracer's TransformerLens backend names them.
_INPUT_HOOKS = ("hook_resid_mid", "ln2.hook_normalized", "mlp.hook_in")
_OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def claims(model: Any) -> bool:
    return getattr(model, "backend", None) == "transformerlens"


def unsupported_reason(model: Any) -> str | None:
    """Why the engine cannot express this TransformerLens model exactly, or None if it can."""
    try:
        from transformer_lens.components import Attention, GroupedQueryAttention, LayerNorm, LayerNormPre, RMSNorm, RMSNormPre
    except ImportError as exc:  # pragma: no cover - a TransformerLens model implies the package
        return f"transformer_lens components do not import ({exc})"
    cfg = model.cfg
    for flag in ("parallel_attn_mlp", "attn_only", "use_attn_in", "use_split_qkv_input", "load_in_4bit"):
        if getattr(cfg, flag, False):
            return f"cfg.{flag}=True is not expressed"
    if getattr(cfg, "original_architecture", None) in ("Olmo2ForCausalLM", "Olmo3ForCausalLM"):
        return f"{cfg.original_architecture} applies its norms after the sublayers, which is not expressed"
    if getattr(cfg, "dtype", torch.float32) not in _DTYPES:
        return f"model dtype {cfg.dtype} is not one of float64, float32, float16, bfloat16"
    in_hook = getattr(model, "feature_input_hook", None)
    out_hook = getattr(model, "original_feature_output_hook", None)
    if in_hook not in _INPUT_HOOKS:
        return f"feature_input_hook {in_hook!r} is not one of {_INPUT_HOOKS}"
    if out_hook not in _OUTPUT_HOOKS:
        return f"feature_output_hook {out_hook!r} is not one of {_OUTPUT_HOOKS}"
    norms = (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre, torch.nn.Identity)
    for i, block in enumerate(model.blocks):
        if type(block.attn) not in (Attention, GroupedQueryAttention):
            return f"blocks.{i}.attn is a {type(block.attn).__name__}, not TransformerLens' Attention or GroupedQueryAttention"
        for name in ("ln1", "ln2", "ln1_post", "ln2_post"):
            norm = getattr(block, name, None)
            if norm is not None and not isinstance(norm, norms):
                return f"blocks.{i}.{name} is a {type(norm).__name__}, not a LayerNorm/RMSNorm"
    if not isinstance(model.ln_final, norms):
        return f"ln_final is a {type(model.ln_final).__name__}, not a LayerNorm/RMSNorm"
    return _foreign_hooks(model, in_hook, out_hook)


def _foreign_hooks(model: Any, in_hook: str, out_hook: str) -> str | None:
    """A hook that circuit-tracer did not install changes the model in a way the engine cannot see.

    circuit-tracer's own are permanent forward hooks: detaching patterns and norm scales, enabling
    gradients at the embedding, caching the transcoder input and replacing the MLP output with the
    skip path (and it registers ln_final's once per layer).
    """
    n_layers = model.cfg.n_layers
    expected = {"hook_embed": 1, "ln_final.hook_scale": n_layers}
    for i in range(n_layers):
        for name in ("attn.hook_pattern", "ln1.hook_scale", "ln2.hook_scale", "ln1_post.hook_scale",
                     "ln2_post.hook_scale", in_hook, out_hook):  # fmt: skip
            expected[f"blocks.{i}.{name}"] = 1
    for name, point in model.hook_dict.items():
        fwd, bwd = getattr(point, "fwd_hooks", []), getattr(point, "bwd_hooks", [])
        temporary = [h for h in fwd if not getattr(h, "is_permanent", False)]
        if bwd or temporary or len(fwd) > expected.get(name, 0):
            return (f"{name} has hooks that circuit-tracer did not install ({len(fwd)} forward, {len(bwd)} backward); "
                    "the engine would not apply them")  # fmt: skip
    return None


def _frozen_names(model: Any) -> list[str]:
    """The hooks whose batch-1 values the transposed maps need: patterns and norm scales."""
    cfg = model.cfg
    post_norms = bool(getattr(cfg, "use_normalization_before_and_after", False))
    names = ["ln_final.hook_scale"]
    for i in range(cfg.n_layers):
        names += [f"blocks.{i}.attn.hook_pattern", f"blocks.{i}.ln1.hook_scale"]
        if post_norms:
            names += [f"blocks.{i}.ln1_post.hook_scale", f"blocks.{i}.ln2_post.hook_scale"]
        if model.feature_input_hook != "hook_resid_mid":
            names.append(f"blocks.{i}.ln2.hook_scale")
    present = set(model.hook_dict)
    return [name for name in names if name in present]


@contextlib.contextmanager
def capture(model: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Record the frozen state of the forward passes inside the block (circuit-tracer's setup)."""
    cache: dict[str, torch.Tensor] = {}

    def save(acts: torch.Tensor, hook: Any) -> None:
        cache[hook.name] = acts.detach()

    with model.hooks(fwd_hooks=[(name, save) for name in _frozen_names(model)]):
        yield cache


def _frozen_state(model: Any, input_ids: torch.Tensor, cache: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``cache`` when it holds every frozen value at batch 1 for this prompt; otherwise one forward
    pass of the engine's own (a caller that did not capture around the setup)."""
    n_pos = int(input_ids.numel())
    names = _frozen_names(model)
    if cache is not None and all(n in cache and cache[n].shape[0] == 1 and cache[n].shape[-2] == n_pos for n in names):
        return cache
    cache = {}

    def save(acts: torch.Tensor, hook: Any) -> None:
        cache[hook.name] = acts.detach()

    with torch.no_grad():
        model.run_with_hooks(input_ids.reshape(1, -1), fwd_hooks=[(n, save) for n in names], return_type=None)
    return cache


def read(model: Any, ctx: Any, input_ids: torch.Tensor, frozen: dict[str, torch.Tensor] | None) -> FrozenModel:
    """The frozen, linearised model of one prompt. ``frozen``: what :func:`capture` recorded."""
    from transformer_lens.components import LayerNorm, LayerNormPre

    cfg = model.cfg
    frozen = _frozen_state(model, input_ids, frozen)
    in_hook = model.feature_input_hook
    out_hook = model.original_feature_output_hook
    post_norms = bool(getattr(cfg, "use_normalization_before_and_after", False))

    def norm(module: Any, key: str, device: torch.device, affine: bool = True) -> FrozenNorm:
        if isinstance(module, torch.nn.Identity) or key not in frozen:
            return FrozenNorm()
        scale = frozen[key][0].to(device)  # (P, 1), the norm's compute dtype
        w = getattr(module, "w", None)
        w = w.detach().to(device, scale.dtype) if affine and w is not None else torch.ones(1, dtype=scale.dtype, device=device)
        return FrozenNorm((w / scale)[:, None, :], center=isinstance(module, (LayerNorm, LayerNormPre)))

    skip = bool(getattr(model, "skip_transcoder", False))
    layers = []
    for i, block in enumerate(model.blocks):
        attn = block.attn
        device = attn.W_O.device
        grouped = hasattr(attn, "_W_V") and not getattr(cfg, "ungroup_grouped_query_attention", False)
        w_v = attn._W_V if grouped else attn.W_V  # (H_kv, D, d_head)
        n_kv = w_v.shape[0]
        ln2 = None
        if in_hook != "hook_resid_mid":
            # ln2.hook_normalized is read before ln2's weight, mlp.hook_in after it.
            ln2 = norm(block.ln2, f"blocks.{i}.ln2.hook_scale", device, affine=in_hook == "mlp.hook_in")
        ln2_post = None
        if post_norms and out_hook == "mlp.hook_out":
            ln2_post = norm(block.ln2_post, f"blocks.{i}.ln2_post.hook_scale", device)
        skip_t = None
        if skip:  # compute_skip is linear without bias: its matrix is its image of the identity
            eye = torch.eye(cfg.d_model, device=ctx.decoder_vecs.device, dtype=cfg.dtype)
            skip_t = model.transcoders.compute_skip(i, eye).detach().to(device, cfg.dtype).T.contiguous()
        layers.append(FrozenLayer(
            ln1=norm(block.ln1, f"blocks.{i}.ln1.hook_scale", device),
            ln1_post=norm(block.ln1_post, f"blocks.{i}.ln1_post.hook_scale", device) if post_norms else None,
            ln2=ln2,
            ln2_post=ln2_post,
            pattern=frozen[f"blocks.{i}.attn.hook_pattern"][0].to(device, cfg.dtype).contiguous(),  # (H, P, P)
            w_o=attn.W_O.detach().reshape(cfg.n_heads * cfg.d_head, cfg.d_model).T.contiguous(),
            w_v=w_v.detach().permute(0, 2, 1).reshape(n_kv * cfg.d_head, cfg.d_model).contiguous(),
            n_heads=cfg.n_heads,
            n_kv_heads=n_kv,
            d_head=cfg.d_head,
            skip_t=skip_t,
            device=device,
        ))  # fmt: skip
    final_device = model.ln_final.w.device if hasattr(model.ln_final, "w") else layers[-1].device
    return FrozenModel(
        layers=layers,
        ln_final=norm(model.ln_final, "ln_final.hook_scale", final_device),
        final_device=final_device,
        embed_device=model.embed.W_E.device,
        dtype=cfg.dtype,
        d_model=cfg.d_model,
        n_pos=int(input_ids.numel()),
        source={"reader": NAME, "architecture": getattr(cfg, "original_architecture", None)},
    )
