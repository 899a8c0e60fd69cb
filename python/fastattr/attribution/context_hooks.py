"""circuit-tracer's attribution contexts with their backward-hook contraction replaced by plans.

The autograd engine runs circuit-tracer's own backward passes; its contexts' hooks (TransformerLens:
``_make_attribution_hooks``; nnsight: ``compute_{feature,error,token}_attributions``) are replaced
here by one :class:`~fastattr.ops.contraction.ContractionPlan` call per layer
(:mod:`fastattr.attribution.hook_plans`), whose scores go through the context's route straight into
the caller's rows. :func:`contraction_patch` applies that for the duration of an attribution;
``patch_circuit_tracer()`` applies it for as long as its handle lives (through
:func:`patch_contexts`). Both are layers in :mod:`fastattr._runtime.patching`'s shared record.
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

from fastattr._runtime import patching as _patching
from fastattr.attribution.hook_plans import layer_plan, route_for, run_plan, token_plan
from fastattr.attribution.replacement_model import check_method, circuit_tracer_version, unsupported

logger = logging.getLogger("fastattr")

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

    Its replacements are layers in fastattr._runtime.patching's shared record, like a user's
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
