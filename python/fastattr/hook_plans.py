"""Contraction plans for circuit-tracer's attribution contexts, and where their scores go.

An attribution context holds, per layer, the vectors whose dot products with the gradient at the
layer's feature-output hook are edge weights: decoder rows of the features that write there
(several per feature for a cross-layer transcoder) and the layer's error vectors; plus the token
embeddings, read at ``hook_embed``. :func:`layer_plan` and :func:`token_plan` turn those into
:class:`~fastattr.contraction.ContractionPlan`\\ s with circuit-tracer's row numbering
(features, then errors layer by layer, then tokens).

Both the patched hooks (:mod:`fastattr.integrations.circuit_tracer`) and the linear engine
(:mod:`fastattr.linear_engine`) use these plans. Where the hooks' scores go is a per-context
*route*, held here in a weak map rather than on the context object, so that concurrent
attributions on different contexts never see each other's buffers.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from fastattr import _backends, _patching
from fastattr.integrations.circuit_tracer import check_method, circuit_tracer_version, unsupported
from fastattr.contraction import ContractionPlan

logger = logging.getLogger("fastattr")


def _plan_from_parts(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> ContractionPlan | None:
    if not parts:
        return None
    dtype = parts[0][0].dtype
    device = parts[0][0].device
    vectors = torch.cat([v.to(dtype) for v, _, _ in parts])
    positions = torch.cat([p.to(device=device, dtype=torch.int64) for _, p, _ in parts])
    rows = torch.cat([r.to(device=device, dtype=torch.int64) for _, _, r in parts])
    return ContractionPlan(vectors, positions, rows)


def layer_plan(ctx: Any, layer: int, *, features: bool, errors: bool) -> ContractionPlan | None:
    """The feature decoder rows and/or error nodes that write at ``layer``."""
    n_layers, n_pos, _ = ctx.activation_matrix.shape
    n_features = ctx.activation_matrix._nnz()
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if features:
        nnz_layers, nnz_positions = ctx.decoder_locations
        mask = nnz_layers == layer
        if bool(mask.any()):
            parts.append((ctx.decoder_vecs[mask], nnz_positions[mask], torch.as_tensor(ctx.encoder_to_decoder_map)[mask]))
    if errors:
        positions = torch.arange(n_pos, device=ctx.error_vectors.device)
        parts.append((ctx.error_vectors[layer], positions, n_features + layer * n_pos + positions))
    return _plan_from_parts(parts)


def token_plan(ctx: Any) -> ContractionPlan | None:
    """The token-embedding nodes."""
    n_layers, n_pos, _ = ctx.activation_matrix.shape
    positions = torch.arange(n_pos, device=ctx.token_vectors.device)
    start = ctx.activation_matrix._nnz() + n_layers * n_pos
    return _plan_from_parts([(ctx.token_vectors, positions, start + positions)])


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


# ---------------------------------------------------- circuit-tracer's contexts, patched

_CONTEXT_MODULES = {
    "transformerlens": "circuit_tracer.attribution.context_transformerlens",
    "nnsight": "circuit_tracer.attribution.context_nnsight",
}
# Methods each context must have, with the parameters the replacement relies on.
_CONTEXT_API = {
    "transformerlens": {"_make_attribution_hooks": ("self", "feature_output_hook")},
    "nnsight": {
        "compute_feature_attributions": ("self", "layer", "grads"),
        "compute_error_attributions": ("self", "layer", "grads"),
        "compute_token_attributions": ("self", "grads"),
    },
}
_CONTEXT_FIELDS = ("activation_matrix", "decoder_vecs", "encoder_to_decoder_map", "decoder_locations",
                   "error_vectors", "token_vectors")  # fmt: skip



def _patched_make_attribution_hooks(self, feature_output_hook: str) -> list[tuple[str, Callable]]:
    """TransformerLens: one hook per layer (features + errors fused) and one for tokens."""

    n_layers = self.activation_matrix.shape[0]
    # A weak reference: the hooks live in the model, the context may not outlive the call.
    ref = weakref.ref(self)

    def make_hook(plan):
        def hook(grads: torch.Tensor, hook) -> None:  # noqa: ARG001 - TransformerLens passes the HookPoint
            run_plan(plan, grads, ref())

        return hook

    hooks = [
        (f"blocks.{layer}.{feature_output_hook}", make_hook(layer_plan(self, layer, features=True, errors=True)))
        for layer in range(n_layers)
    ]
    hooks.append(("hook_embed", make_hook(token_plan(self))))
    return hooks


def _patched_feature_attributions(self, layer, grads) -> None:
    build = lambda: layer_plan(self, int(layer), features=True, errors=False)  # noqa: E731
    run_plan(route_for(self).plan(("features", int(layer)), build), grads, self)


def _patched_error_attributions(self, layer, grads) -> None:
    build = lambda: layer_plan(self, int(layer), features=False, errors=True)  # noqa: E731
    run_plan(route_for(self).plan(("errors", int(layer)), build), grads, self)


def _patched_token_attributions(self, grads) -> None:
    run_plan(route_for(self).plan(("tokens",), lambda: token_plan(self)), grads, self)


_NNSIGHT_REPLACEMENTS = {
    "compute_feature_attributions": _patched_feature_attributions,
    "compute_error_attributions": _patched_error_attributions,
    "compute_token_attributions": _patched_token_attributions,
}


def patch_contexts(replace: Callable[[Any, str, Any, str], None], version: str) -> None:
    """Replace the contexts' contraction with these plans; ``replace(owner, name, value, label)`` saves and sets."""
    found = 0
    for kind, modname in _CONTEXT_MODULES.items():
        try:
            module = importlib.import_module(modname)
        except ImportError as exc:
            # nnsight is optional for circuit-tracer; a missing backend module is fine if the other exists.
            logger.debug("fastattr: %s not patched (%s)", modname, exc)
            continue
        cls = getattr(module, "AttributionContext", None)
        if cls is None:
            raise unsupported(version, f"{modname} has no AttributionContext")
        for name, params in _CONTEXT_API[kind].items():
            check_method(cls, name, params, version)
        init_params = inspect.signature(cls.__init__).parameters
        missing = [f for f in _CONTEXT_FIELDS if f not in init_params]
        if missing:
            raise unsupported(version, f"{modname}.AttributionContext no longer takes {missing}")
        if kind == "transformerlens":
            replace(cls, "_make_attribution_hooks", _patched_make_attribution_hooks, f"{modname}.AttributionContext._make_attribution_hooks")
        else:
            for name, fn in _NNSIGHT_REPLACEMENTS.items():
                replace(cls, name, fn, f"{modname}.AttributionContext.{name}")
        found += 1
    if not found:
        raise unsupported(version, "no attribution context module found (" + ", ".join(_CONTEXT_MODULES.values()) + ")")


def _contexts_patched() -> bool:
    for modname in _CONTEXT_MODULES.values():
        module = sys.modules.get(modname)
        cls = getattr(module, "AttributionContext", None) if module else None
        # A counting patch (patch_circuit_tracer(count_calls=True)) holds wrappers of these.
        hooks = getattr(vars(cls).get("_make_attribution_hooks"), "__wrapped__", None) if cls is not None else None
        feats = getattr(vars(cls).get("compute_feature_attributions"), "__wrapped__", None) if cls is not None else None
        if cls is not None and (
            _patched_make_attribution_hooks in (vars(cls).get("_make_attribution_hooks"), hooks)
            or _patched_feature_attributions in (vars(cls).get("compute_feature_attributions"), feats)
        ):
            return True
    return False


# The autograd attribution path needs the contraction patch while it runs. Concurrent calls share
# one internal handle, undone when the last of them ends, so that one call ending never unpatches
# the hooks under another's backward passes.
_INTERNAL_LOCK = threading.Lock()
_INTERNAL: dict[str, Any] = {"users": 0, "token": None}


@contextlib.contextmanager
def contraction_patch():
    """The contraction patch for the duration of a block (shared by concurrent blocks).

    Its replacements are layers in fastattr._patching's shared record, like a user's
    patch_circuit_tracer() handle: a handle made or undone while the block runs leaves
    circuit-tracer exactly as it was once both are undone, in either order."""
    with _INTERNAL_LOCK:
        if _INTERNAL["users"] == 0 and not _contexts_patched():
            token = object()

            def replace(owner: Any, name: str, value: Any, label: str) -> None:  # noqa: ARG001
                _patching.apply(owner, name, value, token)

            try:
                patch_contexts(replace, circuit_tracer_version())
            except BaseException:
                _patching.revert(token)
                raise
            _INTERNAL["token"] = token
        _INTERNAL["users"] += 1
    try:
        yield
    finally:
        with _INTERNAL_LOCK:
            _INTERNAL["users"] -= 1
            if _INTERNAL["users"] == 0 and _INTERNAL["token"] is not None:
                _patching.revert(_INTERNAL["token"])
                _INTERNAL["token"] = None
