"""Attribution rows without B copies of the model: one batch-1 forward, explicit transposed maps.

circuit-tracer freezes every nonlinearity before it differentiates: attention patterns and
normalisation scales are detached, and each MLP output is replaced by its transcoder's skip path
plus a detached remainder. Under those freezes the map from any hooked activation to any later
one is linear and the same for every batch row. circuit-tracer still runs the whole model on B
identical copies of the prompt and keeps that autograd graph, so that one backward pass yields B
rows. Here the forward pass circuit-tracer's setup runs anyway (batch 1) records what the
transposed maps need (patterns and norm scales), and each batch of B seeds sweeps down through
the layers as batched matmuls on a (positions, B, d_model) cotangent:

- a feature seed enters at its layer's feature-input hook, a logit seed above the final norm;
- at each layer's feature-output hook the cotangent is contracted with the decoder rows and error
  vectors that write there (:mod:`fastattr.attribution.hook_plans`), and with the token
  embeddings at the bottom, straight into the caller's edge rows;
- nothing is differentiated and no graph is kept: the cache is O(layers x heads x P^2) once, the
  working set O(B x P x d_model).

One engine, two readers. This module is the sweep; what it sweeps is a :class:`FrozenModel` that a
reader builds from the model's own modules and the frozen state it captured:
:mod:`~fastattr.attribution.reader_transformerlens` for circuit-tracer's TransformerLens backend,
:mod:`~fastattr.attribution.reader_huggingface` for its nnsight backend (Hugging Face modules);
:mod:`~fastattr.attribution.readers` picks one, or says why none expresses a model.

Causal truncation: a batch whose largest seeded position is p only touches positions <= p, so the
sweep runs on that prefix, and the contraction reads only the plans' vectors at those positions.

Layers on several devices: each layer's maps and contraction plan live on the device that holds
its weights (:attr:`FrozenLayer.device`); the cotangent moves once where the sweep crosses from
one placement to the next, and rows contracted away from the rows' device are added into them
there (one (rows x B) block per layer).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastattr.attribution import hook_plans

# Key blocks of the causal pattern product: large enough for efficient matmuls.
_MIN_KEY_BLOCK = 64
# Rows per sweep when the caller's batch is smaller: each sweep pays a fixed cost per layer (launches,
# Python), so small batches waste it; the working set stays bounded by this many bytes of
# cotangent (a few times that with the attention transpose's temporaries), whatever the batch.
_SWEEP_BYTES = 16 * 2**20
_MAX_SWEEP_ROWS = 1024
# How much wider than its chunks' own prefixes a merged run may sweep (see cut_runs).
_PAD_SLACK = 0.25


class FrozenNorm:
    """A norm with its scale frozen, transposed: g_x = center(g_y * factor).

    ``factor`` (P, 1, D) or (P, 1, 1) is the norm's per-position linear map, formed once from the
    frozen scale and the weight (TransformerLens: w / scale; Hugging Face RMSNorm: w * rsqrt(var +
    eps), Gemma (1 + w) * rsqrt(...)), in float32 for half-precision models as both libraries
    normalise; ``center`` for a LayerNorm, whose centring is its own transpose. None: identity.
    """

    def __init__(self, factor: torch.Tensor | None = None, center: bool = False):
        self.factor = factor
        self.center = center

    def transpose(self, g: torch.Tensor) -> torch.Tensor:
        """g: (P', n, D) at positions 0..P'-1."""
        if self.factor is None:
            return g
        return self._finish(g.to(self.factor.dtype) * self.factor[: g.shape[0]], g.dtype)

    def transpose_(self, g: torch.Tensor) -> torch.Tensor:
        """:meth:`transpose` in place, for a ``g`` nobody else reads (no new (P', n, D) tensor)."""
        if self.factor is None:
            return g
        if g.dtype != self.factor.dtype:
            return self.transpose(g)
        g.mul_(self.factor[: g.shape[0]])
        if self.center:
            g.sub_(g.mean(-1, keepdim=True))
        return g

    def add_transposed_(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """g += transpose(u) for a ``u`` nobody else reads: one pass over g where the map is a
        scale in g's dtype (no transposed copy of u written and read back)."""
        if self.factor is None:
            return g.add_(u)
        if not self.center and u.dtype == g.dtype == self.factor.dtype:
            return g.addcmul_(u, self.factor[: u.shape[0]])
        return g.add_(self.transpose_(u))

    def transpose_at(self, g: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """g: (k, D) vectors at ``positions`` (k,)."""
        if self.factor is None:
            return g
        return self._finish(g.to(self.factor.dtype) * self.factor[positions, 0], g.dtype)

    def _finish(self, u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.center:
            u = u - u.mean(-1, keepdim=True)
        return u.to(dtype)

    def to(self, device: torch.device) -> FrozenNorm:
        return FrozenNorm(None if self.factor is None else self.factor.to(device), self.center)


_IDENTITY = FrozenNorm()


@dataclass
class FrozenLayer:
    """One block's transposed maps, on the device of its weights."""

    ln1: FrozenNorm  # the norm before attention
    ln1_post: FrozenNorm | None  # after attention, before the residual add (Gemma's sandwich norms)
    ln2: FrozenNorm | None  # between the residual and the feature-input hook, when the hook reads after it
    ln2_post: FrozenNorm | None  # between the feature-output hook and the residual, when the hook writes before it
    pattern: torch.Tensor  # (H, P, P), query x key, in the model's dtype
    w_o: torch.Tensor  # (D, H * d_head): g_z = g @ w_o
    w_v: torch.Tensor  # (H_kv * d_head, D): g_in = g_v @ w_v
    n_heads: int
    n_kv_heads: int
    d_head: int
    skip_t: torch.Tensor | None  # (D, D): the skip path's transpose, g_in = g @ skip_t
    device: torch.device
    # Which placement holds the layer (layers with equal labels share a device); the device's name
    # unless a dispatch map says otherwise.
    place: Hashable = None

    def __post_init__(self) -> None:
        if self.place is None:
            self.place = str(self.device)


@dataclass
class FrozenModel:
    """What a reader hands the sweep: the frozen, linearised model of one prompt."""

    layers: list[FrozenLayer]
    ln_final: FrozenNorm
    final_device: torch.device  # where logit seeds enter (the final norm's device)
    embed_device: torch.device  # where the token embeddings' contraction runs
    dtype: torch.dtype
    d_model: int
    n_pos: int
    # The gradient at the embedding hook is the residual stream's times this (Gemma-2 scales its
    # embeddings by sqrt(d_model) after the embedding module); None: 1.
    embed_scale: torch.Tensor | None = None
    final_place: Hashable = None
    embed_place: Hashable = None
    # The placement that holds the edge rows (the context's vectors): a plan elsewhere, or on
    # another placement of the same device, contracts into a compact block added there.
    rows_place: Hashable = None
    # What the reader records of how it read the model (reader name, architecture), for logs.
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.final_place is None:
            self.final_place = str(self.final_device)
        if self.embed_place is None:
            self.embed_place = str(self.embed_device)


@dataclass
class _PlacedPlan:
    """A contraction plan on its layer's device. ``rows`` is None when that is the rows' device
    (the plan writes straight into them); otherwise the plan writes a compact (len(rows), n)
    block there, added into the rows' device at ``rows``."""

    plan: Any
    rows: torch.Tensor | None = None


class LinearEngine:
    """A :class:`FrozenModel` swept backward batch by batch into edge rows."""

    name = "linear"

    def __init__(self, frozen: FrozenModel, ctx: Any, *, deterministic: bool | None = None):
        """``ctx``: circuit-tracer's attribution context (decoder rows, error vectors, tokens); the
        edge rows live on the device of its vectors. ``deterministic``: passed to every contraction
        (run-to-run identical sums; None follows ``torch.use_deterministic_algorithms``). The
        sweep's own torch ops need no atomics: matmuls, sums, and writes to distinct entries."""
        self.frozen = frozen
        self.deterministic = deterministic
        self.dtype = frozen.dtype
        self.d_model = frozen.d_model
        self.n_pos = frozen.n_pos
        self.n_layers = len(frozen.layers)
        self.layers = frozen.layers
        self.ln_final = frozen.ln_final
        self.out_device = ctx.decoder_vecs.device
        self.rows_place = str(self.out_device) if frozen.rows_place is None else frozen.rows_place
        self.causal = all(not bool(torch.triu(layer.pattern, diagonal=1).any()) for layer in self.layers)
        self.layer_plans = [
            self._placed(hook_plans.layer_plan(ctx, i, features=True, errors=True), layer.device, layer.place)
            for i, layer in enumerate(self.layers)
        ]
        self.token_plan = self._placed(hook_plans.token_plan(ctx), frozen.embed_device, frozen.embed_place)
        # Cotangent moves between placements in the last run() (one per boundary crossed), and
        # their bytes: what tests and the split-device docs check.
        self.last_transfers: list[tuple[Hashable, Hashable, int]] = []
        # What every run() since construction swept, per layer step: (layer, positions, rows
        # contracted and skipped, rows through the attention transpose, vectors contracted); layer
        # -1 is the token embeddings. The benchmarks' floor model counts the work an exact sweep
        # cannot skip from it.
        self.steps: list[tuple[int, int, int, int, int]] = []

    def _placed(self, plan: Any, device: torch.device, place: Hashable) -> _PlacedPlan | None:
        if plan is None:
            return None
        if place == self.rows_place and device == self.out_device:
            return _PlacedPlan(plan)
        rows, local = torch.unique(plan.rows.to(torch.int64), return_inverse=True)
        vectors = plan.vectors.to(device)
        return _PlacedPlan(type(plan)(vectors, plan.positions.to(device), local.to(device)), rows.to(self.out_device))

    def shapes(self) -> dict[str, Any]:
        """The maps' dimensions, for the floor model: per layer (d_model, heads, kv heads, d_head,
        whether a skip path is swept), and whether the patterns are causal."""
        layers = [dict(d_model=self.d_model, n_heads=la.n_heads, n_kv_heads=la.n_kv_heads, d_head=la.d_head,
                       skip=la.skip_t is not None) for la in self.layers]  # fmt: skip
        return dict(layers=layers, causal=self.causal, dtype=str(self.dtype).replace("torch.", ""))

    def rows_per_run(self, batch_size: int, out_row_bytes: int = 0) -> int:
        """How many seeds one :meth:`run` takes: the caller's batch, or more where a sweep of that
        many fits in ``_SWEEP_BYTES`` of cotangent and of output block (``out_row_bytes`` per
        row, a store's scratch). Rows do not depend on which run computes them (beyond float
        rounding), so this changes time, never the graph."""
        per_row = max(1, self.n_pos * self.d_model * torch.finfo(self.dtype).bits // 8, out_row_bytes)
        return max(batch_size, min(_MAX_SWEEP_ROWS, _SWEEP_BYTES // per_row))

    def cut_runs(self, positions: torch.Tensor, batch_size: int, max_rows: int) -> list[tuple[int, int]]:
        """Where to cut rows, in the caller's order, into :meth:`run` calls: chunks of
        ``batch_size`` merged, up to ``max_rows``, while the merged run's padded work (rows x its
        largest position, the prefix a causal sweep covers) stays within ``_PAD_SLACK`` of what the
        chunks would cover alone. A longer run saves fixed costs per layer; a wider prefix than a
        row needs is work on zeros. Changes time, never the graph."""
        n = len(positions)
        if not self.causal or max_rows <= batch_size:  # every run sweeps the whole prompt, or none merges
            step = max(batch_size, max_rows)
            return [(i, min(i + step, n)) for i in range(0, n, step)]
        chunks = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
        tops = [int(positions[a:b].max()) + 1 for a, b in chunks]
        runs: list[tuple[int, int]] = []
        start, top, own = 0, 0, 0  # the open run: first row, widest prefix, its chunks' own work
        for (a, b), p in zip(chunks, tops):
            wide = max(top, p)
            if a > start and (b - start > max_rows or (b - start) * wide > (1 + _PAD_SLACK) * (own + (b - a) * p)):
                runs.append((start, a))
                start, wide, own = a, p, 0
            top, own = wide, own + (b - a) * p
        runs.append((start, n))
        return runs

    # ----------------------------------------------------------------------------------- sweep

    @staticmethod
    def _vectors(placed: _PlacedPlan | None, n_pos: int) -> int:
        return 0 if placed is None else placed.plan.vectors_below(n_pos)

    def _contract(self, placed: _PlacedPlan | None, g: torch.Tensor, out: torch.Tensor) -> None:
        """Contract ``placed``'s vectors at the positions ``g`` (P, n, D) covers into ``out`` (rows x n)."""
        if placed is None:
            return
        # (n, P, D) view: the plan reads through strides; later positions' gradients are zero.
        grads = g.permute(1, 0, 2)
        if placed.rows is None:
            placed.plan(grads, out, positions_below=g.shape[0], deterministic=self.deterministic)
            return
        block = torch.zeros(len(placed.rows), g.shape[1], device=g.device, dtype=torch.float32)
        placed.plan(grads, block, positions_below=g.shape[0], deterministic=self.deterministic)
        # Rows of one plan are distinct, so this add has no order to vary.
        out.index_add_(0, placed.rows, block.to(out.device, out.dtype))

    def _move(self, g: torch.Tensor, device: torch.device, src: Hashable, dst: Hashable) -> torch.Tensor:
        if src == dst and g.device == device:
            return g
        self.last_transfers.append((src, dst, g.numel() * g.element_size()))
        return g.to(device)

    def _attention_transpose(self, g: torch.Tensor, layer: FrozenLayer) -> torch.Tensor:
        """g_in = sum_h pattern_h^T g W_O[h]^T W_V[h]^T: three large products, all heads at once."""
        P, n, D = g.shape
        H, Hkv, dh = layer.n_heads, layer.n_kv_heads, layer.d_head
        G = H // Hkv  # grouped-query attention: kv head j serves heads j * G ... (j + 1) * G - 1
        # (H, P * n, dh): one product per head over the same g (a stride-0 batch, no copies of g)
        # lands head-major, so the pattern product reads each head's (P, n * dh) block without a
        # permuted copy of g_z.
        w_o = layer.w_o.view(D, H, dh).permute(1, 0, 2)
        g_z = torch.bmm(g.reshape(P * n, D).expand(H, P * n, D), w_o).view(Hkv, G, P, n * dh)
        # z[q] = sum_k pattern[q, k] v[k], so g_v[k] = sum_q pattern[q, k] g_z[q], summed over the
        # kv head's G heads. With a causal pattern, key block [k0, k1) only hears queries >= k0:
        # about half of the P^2 term is skipped.
        pattern = layer.pattern.view(Hkv, G, *layer.pattern.shape[1:])
        block = max(_MIN_KEY_BLOCK, P // 16)
        if not self.causal or P <= 2 * block:
            # The G heads side by side along the reduced axis: (Hkv, P_k, G * P_q) @ (Hkv, G * P_q, n * dh).
            pattern_t = pattern[:, :, :P, :P].permute(0, 3, 1, 2).reshape(Hkv, P, G * P)
            g_v = torch.bmm(pattern_t, g_z.view(Hkv, G * P, n * dh))
        else:
            g_v = torch.empty(Hkv, P, n * dh, device=g.device, dtype=g.dtype)
            for k0 in range(0, P, block):
                k1 = min(k0 + block, P)
                g_v[:, k0:k1] = torch.bmm(pattern[:, 0, k0:P, k0:k1].transpose(1, 2), g_z[:, 0, k0:P])
                for h in range(1, G):
                    g_v[:, k0:k1].baddbmm_(pattern[:, h, k0:P, k0:k1].transpose(1, 2), g_z[:, h, k0:P])
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
        self.last_transfers = []
        B = len(layers)
        layers = layers.to("cpu", torch.int64)
        positions = positions.to("cpu", torch.int64)
        P = int(positions.max()) + 1 if self.causal else self.n_pos
        compact = B < 2 or bool((layers[:-1] >= layers[1:]).all())
        top = int(layers.max())
        # Seeds per layer: (rows, positions) on the host; values are moved where each layer runs.
        seeds = {layer: torch.nonzero(layers == layer).flatten() for layer in torch.unique(layers).tolist()}
        active = {layer: int((layers >= layer).sum()) if compact else B for layer in seeds}

        def seed(layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            rows = seeds[layer]
            return positions[rows].to(device), rows.to(device), values[rows.to(values.device)].to(device, self.dtype)

        def grow(g: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
            if g is not None and g.shape[1] == n:
                return g
            bigger = torch.empty(P, n, self.d_model, device=device, dtype=self.dtype)
            done = 0 if g is None else g.shape[1]
            if done:
                bigger[:, :done] = g
            bigger[:, done:].zero_()
            return bigger

        # circuit-tracer overwrites the seeded gradient entries; they are zero before (a row's
        # cotangent is zero above its seed), so each seed is written, transposed through whatever
        # lies between its hook and the residual stream, at its own (position, row) entry.
        g = None
        place = None
        if top == self.n_layers:
            place = self.frozen.final_place
            g = grow(None, active[top], self.frozen.final_device)
            pos, rows, vals = seed(top, g.device)
            g[pos, rows] = self.ln_final.transpose_at(vals, pos)
            top -= 1
        for i in range(top, -1, -1):
            layer = self.layers[i]
            # A row seeded at this layer enters at its feature-input hook, below the output hook,
            # so its cotangent there is zero: only the rows from above are contracted and skipped.
            above = 0
            if g is not None:
                g = self._move(g, layer.device, place, layer.place)
                above = g.shape[1]
                g_out = g if layer.ln2_post is None else layer.ln2_post.transpose(g)
                self._contract(self.layer_plans[i], g_out, out[:, :above])
                if layer.skip_t is not None:
                    g_in = g_out @ layer.skip_t
                    (layer.ln2 or _IDENTITY).add_transposed_(g, g_in)
            place = layer.place
            g = grow(g, active.get(i, g.shape[1] if g is not None else B) if compact else B, layer.device)
            self.steps.append((i, P, above, g.shape[1], self._vectors(self.layer_plans[i], P)))
            if i in seeds:
                pos, rows, vals = seed(i, layer.device)
                g[pos, rows] = vals if layer.ln2 is None else layer.ln2.transpose_at(vals, pos)
            g_attn = g if layer.ln1_post is None else layer.ln1_post.transpose(g)
            layer.ln1.add_transposed_(g, self._attention_transpose(g_attn, layer))
        g = self._move(g, self.frozen.embed_device, place, self.frozen.embed_place)
        if self.frozen.embed_scale is not None:
            g = g * self.frozen.embed_scale
        self.steps.append((-1, P, g.shape[1], 0, self._vectors(self.token_plan, P)))
        self._contract(self.token_plan, g, out)
