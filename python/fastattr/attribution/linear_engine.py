"""Attribution rows without B copies of the model: one batch-1 forward, explicit transposed maps.

circuit-tracer freezes every nonlinearity before it differentiates: attention patterns and
normalisation scales are detached, and each MLP output is replaced by its transcoder's skip path
plus a detached remainder. Under those freezes the map from any hooked activation to any later
one is linear and the same for every batch row. circuit-tracer still runs the whole model on B
identical copies of the prompt and keeps that autograd graph, so that one backward pass yields B
rows. Here one forward pass with batch 1 caches what the transposed maps need (patterns and
norm scales), and each batch of B seeds sweeps down through the layers as batched matmuls on a
(positions, B, d_model) cotangent:

- a feature seed enters at its layer's feature-input hook, a logit seed above the final norm;
- at each layer's feature-output hook the cotangent is contracted with the decoder rows and error
  vectors that write there (:mod:`fastattr.attribution.hook_plans`), and with the token embeddings at the
  bottom, straight into the caller's edge rows;
- nothing is differentiated and no graph is kept: the cache is O(layers x heads x P^2) once, the
  working set O(B x P x d_model).

Causal truncation: a batch whose largest seeded position is p only touches positions <= p, so the
sweep runs on that prefix, and the contraction reads only the plans' vectors at those positions.

Only TransformerLens models are expressed (see :func:`unsupported_reason` for what is checked);
the caller runs circuit-tracer's autograd path for anything else and logs why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastattr.attribution import hook_plans

# Where the transcoders read and write, as circuit-tracer's TransformerLens backend names them.
_INPUT_HOOKS = ("hook_resid_mid", "ln2.hook_normalized", "mlp.hook_in")
_OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")
# Key blocks of the causal pattern product: large enough for efficient matmuls.
_MIN_KEY_BLOCK = 64


def unsupported_reason(model: Any) -> str | None:
    """Why the linear engine cannot express ``model`` exactly, or None if it can."""
    if getattr(model, "backend", None) != "transformerlens":
        return (f"the linear engine expresses TransformerLens models; this is a {getattr(model, 'backend', type(model).__name__)!r} "
                "model, whose module structure is not read")  # fmt: skip
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
    if getattr(cfg, "dtype", torch.float32) not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
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


def frozen_state_hooks(model: Any) -> tuple[list, dict[str, torch.Tensor]]:
    """Forward hooks that record the frozen state into the returned dict.

    Installed around the model's own attribution setup, they capture it from the forward pass
    that setup runs anyway, so the engine needs no forward pass of its own.
    """
    cache: dict[str, torch.Tensor] = {}

    def save(acts: torch.Tensor, hook: Any) -> None:
        cache[hook.name] = acts.detach()

    return [(name, save) for name in _frozen_names(model)], cache


class _Norm:
    """A norm with its scale frozen, transposed: g_x = center(g_y * w / scale).

    ``affine=False`` is the map from the norm's input to its ``hook_normalized`` output (before the
    weight), where a transcoder may read. The per-position factor w / scale is formed once, so a
    transpose is one multiply (plus the centring of a LayerNorm), in float32 for half-precision
    models as TransformerLens normalises.
    """

    def __init__(self, center: bool = False, weight: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 affine: bool = True):  # fmt: skip
        self.center = center
        self.factor = None  # (P, 1, D) or (P, 1, 1); None for an identity
        if scale is not None:  # scale: (P, 1), the norm's compute dtype
            w = weight.detach().to(scale.dtype) if affine and weight is not None else torch.ones(1, dtype=scale.dtype, device=scale.device)
            self.factor = (w / scale)[:, None, :]

    def transpose(self, g: torch.Tensor) -> torch.Tensor:
        """g: (P', n, D) at positions 0..P'-1."""
        if self.factor is None:
            return g
        return self._finish(g.to(self.factor.dtype) * self.factor[: g.shape[0]], g.dtype)

    def transpose_at(self, g: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """g: (k, D) vectors at ``positions`` (k,)."""
        if self.factor is None:
            return g
        return self._finish(g.to(self.factor.dtype) * self.factor[positions, 0], g.dtype)

    def _finish(self, u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.center:
            u = u - u.mean(-1, keepdim=True)
        return u.to(dtype)


@dataclass
class _Layer:
    ln1: _Norm
    ln1_post: _Norm | None
    ln2: _Norm | None  # on the path only when the transcoder reads after ln2
    ln2_post: _Norm | None  # on the path only when the transcoder writes before ln2_post
    pattern: torch.Tensor  # (H, P, P), query x key, in the model's dtype
    w_o: torch.Tensor  # (D, H * d_head): g_z = g @ w_o
    w_v: torch.Tensor  # (H_kv * d_head, D): g_in = g_v @ w_v
    n_heads: int
    n_kv_heads: int
    d_head: int
    skip_t: torch.Tensor | None  # (D, D): the skip path's transpose, g_in = g @ skip_t


class TransformerLensEngine:
    """The frozen, linearised TransformerLens model of one prompt, swept backward batch by batch."""

    name = "linear"

    def __init__(self, model: Any, ctx: Any, input_ids: torch.Tensor, frozen: dict[str, torch.Tensor] | None = None,
                 *, deterministic: bool | None = None):  # fmt: skip
        """``frozen``: what :func:`frozen_state_hooks` captured during the model's own forward pass
        over the prompt (its attribution setup); a forward pass of its own otherwise.
        ``deterministic``: passed to every contraction (run-to-run identical sums; None follows
        ``torch.use_deterministic_algorithms``). The sweep's own torch ops need no atomics: matmuls,
        sums, and writes to distinct entries."""
        from transformer_lens.components import LayerNorm, LayerNormPre

        self.deterministic = deterministic

        cfg = model.cfg
        self.dtype = cfg.dtype
        self.device = ctx.decoder_vecs.device
        self.n_layers = cfg.n_layers
        self.d_model = cfg.d_model
        self.n_pos = int(input_ids.numel())
        self.in_hook = model.feature_input_hook
        self.out_hook = model.original_feature_output_hook
        post_norms = bool(getattr(cfg, "use_normalization_before_and_after", False))
        names = _frozen_names(model)
        complete = frozen is not None and all(
            name in frozen and frozen[name].shape[0] == 1 and frozen[name].shape[-2] == self.n_pos for name in names
        )
        # Whether the setup's own forward pass supplied the frozen state (else one more pass).
        self.own_forward = not complete
        if not complete:
            frozen = self._frozen_state(model, input_ids)

        def norm(module: Any, key: str, affine: bool = True) -> _Norm:
            if isinstance(module, torch.nn.Identity) or key not in frozen:
                return _Norm()
            scale = frozen[key][0]  # (P, 1)
            return _Norm(isinstance(module, (LayerNorm, LayerNormPre)), getattr(module, "w", None), scale, affine)

        skip = bool(getattr(model, "skip_transcoder", False))
        eye = torch.eye(self.d_model, device=self.device, dtype=self.dtype) if skip else None
        self.layers = [self._layer(model, i, frozen, norm, eye, post_norms) for i in range(self.n_layers)]
        self.causal = all(not bool(torch.triu(layer.pattern, diagonal=1).any()) for layer in self.layers)
        self.ln_final = norm(model.ln_final, "ln_final.hook_scale")

        # One contraction plan per layer; a truncated sweep contracts only its position prefix.
        self.layer_plans = [hook_plans.layer_plan(ctx, layer, features=True, errors=True) for layer in range(self.n_layers)]
        self.token_plan = hook_plans.token_plan(ctx)

    def _layer(self, model: Any, i: int, frozen: dict[str, torch.Tensor], norm: Callable[..., _Norm],
               eye: torch.Tensor | None, post_norms: bool) -> _Layer:  # fmt: skip
        """Block ``i``'s transposed maps: its norms with frozen scales, pattern, W_O, W_V and the
        transcoder's skip path (``eye`` given: its matrix is its image of the identity)."""
        cfg, block = model.cfg, model.blocks[i]
        attn = block.attn
        n_heads, d_head = cfg.n_heads, cfg.d_head
        grouped = hasattr(attn, "_W_V") and not getattr(cfg, "ungroup_grouped_query_attention", False)
        w_v = attn._W_V if grouped else attn.W_V  # (H_kv, D, d_head)
        n_kv = w_v.shape[0]
        ln2 = None
        if self.in_hook != "hook_resid_mid":
            # ln2.hook_normalized is read before ln2's weight, mlp.hook_in after it.
            ln2 = norm(block.ln2, f"blocks.{i}.ln2.hook_scale", affine=self.in_hook == "mlp.hook_in")
        ln2_post = None
        if post_norms and self.out_hook == "mlp.hook_out":
            ln2_post = norm(block.ln2_post, f"blocks.{i}.ln2_post.hook_scale")
        return _Layer(
            ln1=norm(block.ln1, f"blocks.{i}.ln1.hook_scale"),
            ln1_post=norm(block.ln1_post, f"blocks.{i}.ln1_post.hook_scale") if post_norms else None,
            ln2=ln2,
            ln2_post=ln2_post,
            pattern=frozen[f"blocks.{i}.attn.hook_pattern"][0].to(self.dtype).contiguous(),  # (H, P, P)
            w_o=attn.W_O.detach().reshape(n_heads * d_head, self.d_model).T.contiguous(),
            w_v=w_v.detach().permute(0, 2, 1).reshape(n_kv * d_head, self.d_model).contiguous(),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            d_head=d_head,
            # compute_skip is linear without bias.
            skip_t=None if eye is None else model.transcoders.compute_skip(i, eye).detach().to(self.dtype).T.contiguous(),
        )

    @torch.no_grad()
    def _frozen_state(self, model: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        hooks, cache = frozen_state_hooks(model)
        model.run_with_hooks(input_ids.reshape(1, -1), fwd_hooks=hooks, return_type=None)
        return cache

    # ----------------------------------------------------------------------------------- sweep

    def _contract(self, plan: Any, g: torch.Tensor, out: torch.Tensor) -> None:
        """Contract ``plan``'s vectors at the positions ``g`` (P, n, D) covers into ``out`` (rows x n)."""
        if plan is not None:
            # (n, P, D) view: the plan reads through strides; later positions' gradients are zero.
            plan(g.permute(1, 0, 2), out, positions_below=g.shape[0], deterministic=self.deterministic)

    def _attention_transpose(self, g: torch.Tensor, layer: _Layer) -> torch.Tensor:
        """g_in = sum_h pattern_h^T g W_O[h]^T W_V[h]^T: three large products, all heads at once."""
        P, n, D = g.shape
        H, Hkv, dh = layer.n_heads, layer.n_kv_heads, layer.d_head
        g_z = (g.reshape(P * n, D) @ layer.w_o).view(P, n, H, dh).permute(2, 0, 1, 3).reshape(H, P, n * dh)
        # z[q] = sum_k pattern[q, k] v[k], so g_v[k] = sum_q pattern[q, k] g_z[q]. With a causal
        # pattern, key block [k0, k1) only hears queries >= k0: about half of the P^2 term is skipped.
        block = max(_MIN_KEY_BLOCK, P // 16)
        if not self.causal or P <= 2 * block:
            g_v = torch.bmm(layer.pattern[:, :P, :P].transpose(1, 2), g_z)
        else:
            g_v = torch.empty_like(g_z)
            for k0 in range(0, P, block):
                k1 = min(k0 + block, P)
                g_v[:, k0:k1] = torch.bmm(layer.pattern[:, k0:P, k0:k1].transpose(1, 2), g_z[:, k0:P])
        if Hkv != H:  # grouped-query attention: kv head j serves heads j * H / Hkv ... (j + 1) * H / Hkv - 1
            g_v = g_v.view(Hkv, H // Hkv, P, n * dh).sum(1)
        g_v = g_v.view(Hkv, P, n, dh).permute(1, 2, 0, 3).reshape(P * n, Hkv * dh)
        return (g_v @ layer.w_v).view(P, n, D)

    @torch.no_grad()
    def run(self, out: torch.Tensor, layers: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Accumulate the edge rows of B seeds into ``out`` (rows x B, any strides).

        ``layers`` / ``positions`` (B,) say where each seed enters (layer ``n_layers`` means above
        the final norm, as circuit-tracer injects logit directions); ``values`` (B, D) are the seeds.
        Rows sorted by descending layer are swept compacted: a row joins the matmuls only at its
        own layer (its cotangent is zero above it).
        """
        B = len(layers)
        layers = layers.to("cpu", torch.int64)
        positions = positions.to("cpu", torch.int64)
        values = values.to(self.device, self.dtype)
        P = int(positions.max()) + 1 if self.causal else self.n_pos
        compact = B < 2 or bool((layers[:-1] >= layers[1:]).all())
        # Seeds per layer: (positions, rows, values) on the device.
        seeds = {}
        for layer in torch.unique(layers).tolist():
            rows = torch.nonzero(layers == layer).flatten()
            seeds[layer] = (positions[rows].to(self.device), rows.to(self.device), values[rows.to(self.device)])
        active = {layer: int((layers >= layer).sum()) if compact else B for layer in seeds}
        top = max(seeds)

        def grow(g: torch.Tensor | None, n: int) -> torch.Tensor:
            if g is not None and g.shape[1] == n:
                return g
            bigger = torch.empty(P, n, self.d_model, device=self.device, dtype=self.dtype)
            done = 0 if g is None else g.shape[1]
            if done:
                bigger[:, :done] = g
            bigger[:, done:].zero_()
            return bigger

        # circuit-tracer overwrites the seeded gradient entries; they are zero before (a row's
        # cotangent is zero above its seed), so each seed is written, transposed through whatever
        # lies between its hook and the residual stream, at its own (position, row) entry.
        g = None
        if top == self.n_layers:
            g = grow(None, active[top])
            pos, rows, vals = seeds[top]
            g[pos, rows] = self.ln_final.transpose_at(vals, pos)
            top -= 1
        for i in range(top, -1, -1):
            g = grow(g, active.get(i, g.shape[1] if g is not None else B) if compact else B)
            n = g.shape[1]
            layer = self.layers[i]
            g_out = g if layer.ln2_post is None else layer.ln2_post.transpose(g)
            self._contract(self.layer_plans[i], g_out, out[:, :n])
            if layer.skip_t is not None:
                g_in = g_out @ layer.skip_t
                g.add_(g_in if layer.ln2 is None else layer.ln2.transpose(g_in))
            if i in seeds:
                pos, rows, vals = seeds[i]
                g[pos, rows] = vals if layer.ln2 is None else layer.ln2.transpose_at(vals, pos)
            g_attn = g if layer.ln1_post is None else layer.ln1_post.transpose(g)
            g.add_(layer.ln1.transpose(self._attention_transpose(g_attn, layer)))
        self._contract(self.token_plan, g, out)
