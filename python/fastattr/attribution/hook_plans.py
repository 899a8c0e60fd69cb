"""Contraction plans for circuit-tracer's attribution contexts, and where their scores go.

An attribution context holds, per layer, the vectors whose dot products with the gradient at the
layer's feature-output hook are edge weights: decoder rows of the features that write there
(several per feature for a cross-layer transcoder) and the layer's error vectors; plus the token
embeddings, read at ``hook_embed``. :func:`layer_plan` and :func:`token_plan` turn those into
:class:`~fastattr.ops.contraction.ContractionPlan`\\ s with circuit-tracer's row numbering
(features, then errors layer by layer, then tokens).

Both the patched hooks (:mod:`fastattr.attribution.context_hooks`) and the linear engine
(:mod:`fastattr.attribution.linear_engine`) use these plans. Where the hooks' scores go is a per-context
*route*, held here in a weak map rather than on the context object, so that concurrent
attributions on different contexts never see each other's buffers.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from fastattr._runtime import backends as _backends
from fastattr.ops.contraction import ContractionPlan


def _plan_from_parts(parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]]) -> ContractionPlan | None:
    """A plan over parts (source vectors, the source rows taken or None for all, positions, output
    rows), its vectors gathered straight into the plan's position order. The largest part (the
    decoder rows, the largest input of a setup) is read in one index_select into a fresh tensor:
    one pass over it and one first touch of the result; the small parts are written over their
    slots after."""
    if not parts:
        return None
    dtype = parts[0][0].dtype
    device = parts[0][0].device
    positions = torch.cat([p.to(device=device, dtype=torch.int64) for _, _, p, _ in parts])
    rows = torch.cat([r.to(device=device, dtype=torch.int64) for _, _, _, r in parts])
    order = torch.argsort(positions, stable=True)  # the plan's own order (it sorts stably by position)
    slot = torch.empty_like(order)
    slot[order] = torch.arange(len(order), device=device)
    starts = [0]
    for _, _, p, _ in parts:
        starts.append(starts[-1] + len(p))
    big = max(range(len(parts)), key=lambda k: len(parts[k][2]))
    source, take, p, _ = parts[big]
    # Every slot reads some row of the big source; the other parts' slots are overwritten below.
    read = torch.zeros(len(order), dtype=torch.int64, device=source.device)
    read[slot[starts[big] : starts[big + 1]].to(source.device)] = (
        torch.arange(len(p), device=source.device) if take is None else take.to(source.device, torch.int64))
    vectors = source.index_select(0, read).to(device=device, dtype=dtype)
    for k, (source, take, p, _) in enumerate(parts):
        if k != big and len(p):
            picked = source if take is None else source.index_select(0, take.to(source.device))
            vectors.index_copy_(0, slot[starts[k] : starts[k + 1]], picked.to(device=device, dtype=dtype))
    return ContractionPlan(vectors, positions[order], rows[order], take_vectors=True)


def layer_plan(ctx: Any, layer: int, *, features: bool, errors: bool) -> ContractionPlan | None:
    """The feature decoder rows and/or error nodes that write at ``layer``."""
    n_layers, n_pos, _ = ctx.activation_matrix.shape
    n_features = ctx.activation_matrix._nnz()
    parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]] = []
    if features:
        nnz_layers, nnz_positions = ctx.decoder_locations
        mask = nnz_layers == layer
        if bool(mask.any()):
            take = torch.nonzero(mask).flatten()
            parts.append((ctx.decoder_vecs, take, nnz_positions[take], torch.as_tensor(ctx.encoder_to_decoder_map)[take]))
    if errors:
        positions = torch.arange(n_pos, device=ctx.error_vectors.device)
        parts.append((ctx.error_vectors[layer], None, positions, n_features + layer * n_pos + positions))
    return _plan_from_parts(parts)


def token_plan(ctx: Any) -> ContractionPlan | None:
    """The token-embedding nodes."""
    n_layers, n_pos, _ = ctx.activation_matrix.shape
    positions = torch.arange(n_pos, device=ctx.token_vectors.device)
    start = ctx.activation_matrix._nnz() + n_layers * n_pos
    return _plan_from_parts([(ctx.token_vectors, None, positions, start + positions)])


# ------------------------------------------------------------------------------------- routing


class Route:
    """Where one context's hook scores go: a (rows, batch) view set per backward pass, or
    circuit-tracer's own ``_batch_buffer`` while none is set."""

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None
        self.plans: dict[tuple, ContractionPlan | None] = {}
        # The attributing thread's use_backend choice: nnsight builds plans lazily on its own
        # intervention thread, which must still run them on the caller's backend.
        self.backend: str | None = None
        # attribute(deterministic=...) for the plans' calls; None follows torch's switch, read on
        # the thread that runs the hook.
        self.deterministic: bool | None = None

    def plan(self, key: tuple, build: Callable[[], ContractionPlan | None]) -> ContractionPlan | None:
        if key not in self.plans:
            if self.backend is None:
                self.plans[key] = build()
            else:
                with _backends.use_backend(self.backend):
                    self.plans[key] = build()
        return self.plans[key]


_ROUTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ROUTES_LOCK = threading.Lock()


def route_for(ctx: Any) -> Route:
    """The route of ``ctx``, created on first use; it lives as long as the context."""
    with _ROUTES_LOCK:
        route = _ROUTES.get(ctx)
        if route is None:
            route = _ROUTES[ctx] = Route()
        return route


def run_plan(plan: ContractionPlan | None, grads: torch.Tensor, ctx: Any) -> None:
    """Accumulate ``plan``'s scores for ``grads`` into the context's route."""
    if plan is None:
        return
    route = route_for(ctx)
    out = route.out
    # circuit-tracer contracts in the vectors' dtype; so do we (accumulating in fp32).
    plan(grads.to(plan.dtype), ctx._batch_buffer if out is None else out, deterministic=route.deterministic)
