"""``patch_circuit_tracer()``: route circuit-tracer's hot paths through fastattr's kernels.

What is replaced, in every module that holds a reference to it:
- the backward-hook contraction of the attribution contexts (TransformerLens and nnsight): each
  layer's feature and error hooks become one :class:`ContractionPlan` call, planned once per
  context, so no (batch x features x d_model) tensor is gathered;
- the graph functions of ``circuit_tracer.graph`` (influence, thresholds, pruning, scores) and
  the copies of them imported into other modules (the attribute loop's
  ``compute_partial_influences``, ``demo_utils``' ``compute_node_influence``, ...).

The patch edits classes and module globals, so it must be applied before ``attribute()`` runs its
forward pass (the hooks are captured into the autograd graph there). It returns a handle whose
``undo()`` (or ``with`` exit) restores every replaced attribute.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch

from fastattr.contraction import ContractionPlan

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
_GRAPH_FUNCTIONS = ("normalize_matrix", "compute_influence", "compute_node_influence", "compute_edge_influence",
                    "find_threshold", "prune_graph", "compute_graph_scores", "compute_partial_influences")  # fmt: skip


class UnsupportedCircuitTracerError(RuntimeError):
    """The installed circuit-tracer does not have the structure this patch replaces."""


class PatchHandle:
    """Restores everything :func:`patch_circuit_tracer` replaced. Also a context manager."""

    def __init__(self, version: str):
        self.version = version
        self.replaced: list[str] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self.active = True

    def _set(self, owner: Any, name: str, value: Any, label: str) -> None:
        self._saved.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, value)
        self.replaced.append(label)

    def undo(self) -> None:
        for owner, name, old in reversed(self._saved):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
        self._saved.clear()
        self.active = False
        logger.info("fastattr: circuit-tracer patch undone")

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"<fastattr patch of circuit-tracer {self.version}, {state}: {len(self.replaced)} replacements>"


_MISSING = object()


def circuit_tracer_version() -> str:
    """The imported circuit-tracer's version; a source tree on sys.path shadows an installed one."""
    import os

    module = sys.modules.get("circuit_tracer") or importlib.import_module("circuit_tracer")
    try:
        from importlib.metadata import distribution

        dist = distribution("circuit-tracer")
        installed = os.path.realpath(str(dist.locate_file("circuit_tracer/__init__.py")))
        if installed == os.path.realpath(module.__file__ or ""):
            return dist.version
    except Exception:  # noqa: BLE001 - no metadata: a source checkout
        pass
    where = os.path.dirname(os.path.dirname(module.__file__ or "?"))
    return getattr(module, "__version__", None) or f"source tree at {where}"


def _unsupported(version: str, what: str) -> UnsupportedCircuitTracerError:
    return UnsupportedCircuitTracerError(
        f"circuit-tracer {version} is not supported by fastattr.patch_circuit_tracer(): {what}. "
        "Supported: circuit-tracer 0.5.0 (PyPI) and the upstream layout with "
        "attribution/attribute_transformerlens.py and attribute_nnsight.py."
    )


def _check_method(cls: type, name: str, params: tuple[str, ...], version: str) -> None:
    fn = getattr(cls, name, None)
    if fn is None:
        raise _unsupported(version, f"{cls.__module__}.{cls.__name__} has no method {name}")
    got = tuple(inspect.signature(fn).parameters)[: len(params)]
    if got != params:
        raise _unsupported(version, f"{cls.__module__}.{cls.__name__}.{name} takes {got}, expected {params}")


# ---------------------------------------------------------------------------------- contraction


def _layer_plan(ctx: Any, layer: int, *, features: bool, errors: bool) -> ContractionPlan | None:
    """One plan for the feature decoder rows and/or the error nodes that write at ``layer``."""
    n_layers, n_pos, _ = ctx.activation_matrix.shape
    n_features = ctx.activation_matrix._nnz()
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if features:
        nnz_layers, nnz_positions = ctx.decoder_locations
        mask = nnz_layers == layer
        if bool(mask.any()):
            parts.append((ctx.decoder_vecs[mask], nnz_positions[mask], torch.as_tensor(ctx.encoder_to_decoder_map)[mask]))
    if errors:
        dev = ctx.error_vectors.device
        positions = torch.arange(n_pos, device=dev)
        parts.append((ctx.error_vectors[layer], positions, n_features + layer * n_pos + positions))
    return _plan_from_parts(parts)


def _token_plan(ctx: Any) -> ContractionPlan:
    n_layers, n_pos, _ = ctx.activation_matrix.shape
    dev = ctx.token_vectors.device
    positions = torch.arange(n_pos, device=dev)
    start = ctx.activation_matrix._nnz() + n_layers * n_pos
    return _plan_from_parts([(ctx.token_vectors, positions, start + positions)])


def _plan_from_parts(parts) -> ContractionPlan | None:
    if not parts:
        return None
    dtype = parts[0][0].dtype
    device = parts[0][0].device
    vectors = torch.cat([v.to(dtype) for v, _, _ in parts])
    positions = torch.cat([p.to(device=device, dtype=torch.int64) for _, p, _ in parts])
    rows = torch.cat([r.to(device=device, dtype=torch.int64) for _, _, r in parts])
    return ContractionPlan(vectors, positions, rows)


def _run_plan(plan: ContractionPlan | None, grads: torch.Tensor, ctx: Any) -> None:
    if plan is None:
        return
    # fastattr.attribute points the contexts at rows of its device edge buffer (a (rows, batch)
    # strided view), so scores land there directly; otherwise they go to circuit-tracer's buffer.
    out = getattr(ctx, "_fastattr_out", None)
    # circuit-tracer contracts in the vectors' dtype; so do we (accumulating in fp32).
    plan(grads.to(plan.dtype), ctx._batch_buffer if out is None else out)


def _patched_make_attribution_hooks(self, feature_output_hook: str) -> list[tuple[str, Callable]]:
    """TransformerLens: one hook per layer (features + errors fused) and one for tokens."""
    import weakref

    n_layers = self.activation_matrix.shape[0]
    proxy = weakref.proxy(self)

    def make_hook(plan):
        def hook(grads: torch.Tensor, hook) -> None:  # noqa: ARG001 - TransformerLens passes the HookPoint
            _run_plan(plan, grads, proxy)

        return hook

    hooks = [
        (f"blocks.{layer}.{feature_output_hook}", make_hook(_layer_plan(self, layer, features=True, errors=True)))
        for layer in range(n_layers)
    ]
    hooks.append(("hook_embed", make_hook(_token_plan(self))))
    return hooks


def _cached_plan(ctx: Any, key: tuple, build: Callable[[], ContractionPlan | None]) -> ContractionPlan | None:
    cache = ctx.__dict__.setdefault("_fastattr_plans", {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _patched_feature_attributions(self, layer, grads) -> None:
    plan = _cached_plan(self, ("features", int(layer)), lambda: _layer_plan(self, int(layer), features=True, errors=False))
    _run_plan(plan, grads, self)


def _patched_error_attributions(self, layer, grads) -> None:
    plan = _cached_plan(self, ("errors", int(layer)), lambda: _layer_plan(self, int(layer), features=False, errors=True))
    _run_plan(plan, grads, self)


def _patched_token_attributions(self, grads) -> None:
    _run_plan(_cached_plan(self, ("tokens",), lambda: _token_plan(self)), grads, self)


_NNSIGHT_REPLACEMENTS = {
    "compute_feature_attributions": _patched_feature_attributions,
    "compute_error_attributions": _patched_error_attributions,
    "compute_token_attributions": _patched_token_attributions,
}


def _patch_contexts(handle: PatchHandle, version: str) -> None:
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
            raise _unsupported(version, f"{modname} has no AttributionContext")
        for name, params in _CONTEXT_API[kind].items():
            _check_method(cls, name, params, version)
        init_params = inspect.signature(cls.__init__).parameters
        missing = [f for f in _CONTEXT_FIELDS if f not in init_params]
        if missing:
            raise _unsupported(version, f"{modname}.AttributionContext no longer takes {missing}")
        if kind == "transformerlens":
            handle._set(cls, "_make_attribution_hooks", _patched_make_attribution_hooks, f"{modname}.AttributionContext._make_attribution_hooks")
        else:
            for name, fn in _NNSIGHT_REPLACEMENTS.items():
                handle._set(cls, name, fn, f"{modname}.AttributionContext.{name}")
        found += 1
    if not found:
        raise _unsupported(version, "no attribution context module found (" + ", ".join(_CONTEXT_MODULES.values()) + ")")


# ------------------------------------------------------------------------------------- graph ops


def _graph_replacements() -> dict[str, Callable]:
    from fastattr import influence, pruning, threshold

    return {
        "normalize_matrix": influence.normalize_matrix,
        "compute_influence": influence.compute_influence,
        "compute_node_influence": influence.compute_node_influence,
        "compute_edge_influence": influence.compute_edge_influence,
        "compute_partial_influences": influence.compute_partial_influences,
        "find_threshold": threshold.find_threshold,
        "prune_graph": pruning.prune_graph,
        "compute_graph_scores": pruning.compute_graph_scores,
    }


def _patch_graph(handle: PatchHandle, version: str) -> None:
    graph = importlib.import_module("circuit_tracer.graph")
    missing = [n for n in _GRAPH_FUNCTIONS if not callable(getattr(graph, n, None))]
    if missing:
        raise _unsupported(version, f"circuit_tracer.graph lacks {missing}")
    originals = {n: getattr(graph, n) for n in _GRAPH_FUNCTIONS}
    replacements = _graph_replacements()
    # Import the modules that copy these names into their globals, then swap every copy.
    for modname in ("circuit_tracer.attribution.attribute", "circuit_tracer.attribution.attribute_transformerlens",
                    "circuit_tracer.attribution.attribute_nnsight", "circuit_tracer.utils.demo_utils",
                    "circuit_tracer.utils.create_graph_files", "circuit_tracer"):  # fmt: skip
        try:
            importlib.import_module(modname)
        except ImportError as exc:
            logger.debug("fastattr: %s not imported (%s)", modname, exc)
    for modname, module in list(sys.modules.items()):
        if module is None or not (modname == "circuit_tracer" or modname.startswith("circuit_tracer.")):
            continue
        for name, original in originals.items():
            if module.__dict__.get(name) is original:
                handle._set(module, name, replacements[name], f"{modname}.{name}")


# ------------------------------------------------------------------------------------- attribute


def _patch_attribute(handle: PatchHandle, version: str) -> None:
    """Route circuit-tracer's attribute() to fastattr.attribute, in both layouts.

    0.5.0 keeps one ``attribution/attribute.py``; upstream makes it a dispatcher over
    ``attribute_transformerlens.py`` and ``attribute_nnsight.py``, which it imports at call time,
    so their ``attribute`` is replaced too (for callers that import a backend's module directly).
    """
    from fastattr.attribute import attribute as fast_attribute

    try:
        module = importlib.import_module("circuit_tracer.attribution.attribute")
    except ImportError as exc:
        raise _unsupported(version, f"circuit_tracer.attribution.attribute does not import ({exc})") from exc
    if not callable(getattr(module, "attribute", None)):
        raise _unsupported(version, "circuit_tracer.attribution.attribute has no attribute()")
    handle._set(module, "attribute", fast_attribute, "circuit_tracer.attribution.attribute.attribute")
    for modname in ("circuit_tracer.attribution.attribute_transformerlens", "circuit_tracer.attribution.attribute_nnsight"):
        if importlib.util.find_spec(modname) is None:
            continue
        try:
            backend_module = importlib.import_module(modname)
        except ImportError as exc:  # nnsight is optional for circuit-tracer
            logger.debug("fastattr: %s not rerouted (%s)", modname, exc)
            continue
        if callable(getattr(backend_module, "attribute", None)):
            handle._set(backend_module, "attribute", fast_attribute, f"{modname}.attribute")
    for modname in ("circuit_tracer.attribution", "circuit_tracer"):
        package = importlib.import_module(modname)
        if callable(getattr(package, "attribute", None)):
            handle._set(package, "attribute", fast_attribute, f"{modname}.attribute")


def _contexts_patched() -> bool:
    for modname in _CONTEXT_MODULES.values():
        module = sys.modules.get(modname)
        cls = getattr(module, "AttributionContext", None) if module else None
        if cls is not None and (
            vars(cls).get("_make_attribution_hooks") is _patched_make_attribution_hooks
            or vars(cls).get("compute_feature_attributions") is _patched_feature_attributions
        ):
            return True
    return False


@contextlib.contextmanager
def contraction_patch():
    """The contraction patch for the duration of a block, unless it is already applied."""
    if _contexts_patched():
        yield
        return
    handle = patch_circuit_tracer(graph=False, attribute=False)
    try:
        yield
    finally:
        handle.undo()


def patch_circuit_tracer(*, contraction: bool = True, graph: bool = True, attribute: bool = True) -> PatchHandle:
    """Make circuit-tracer use fastattr's kernels; returns a handle whose ``undo()`` restores it.

    Args:
        contraction: replace the attribution contexts' backward-hook contraction.
        graph: replace the graph functions (influence, thresholds, pruning, scores).
        attribute: route ``circuit_tracer.attribute`` to :func:`fastattr.attribute` (device-resident
            edge rows); needs ``contraction``.
    """
    if attribute and not contraction:
        raise ValueError("attribute: expected contraction=True as well (fastattr.attribute writes through the patched hooks)")
    version = circuit_tracer_version()
    handle = PatchHandle(version)
    try:
        if contraction:
            _patch_contexts(handle, version)
        if graph:
            _patch_graph(handle, version)
        if attribute:
            _patch_attribute(handle, version)
    except BaseException:
        handle.undo()
        raise
    logger.info("fastattr: patched circuit-tracer %s (%d replacements)", version, len(handle.replaced))
    return handle
