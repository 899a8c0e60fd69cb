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

import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable
from typing import Any


from fastattr import _patching, hook_plans
from fastattr._circuit_tracer import (  # noqa: F401 - re-exported: part of the patch's API
    UnsupportedCircuitTracerError,
    circuit_tracer_version,
)
from fastattr._circuit_tracer import unsupported as _unsupported

logger = logging.getLogger("fastattr")

_GRAPH_FUNCTIONS = ("normalize_matrix", "compute_influence", "compute_node_influence", "compute_edge_influence",
                    "find_threshold", "prune_graph", "compute_graph_scores", "compute_partial_influences")  # fmt: skip


class PatchHandle:
    """Restores everything :func:`patch_circuit_tracer` replaced. Also a context manager."""

    def __init__(self, version: str):
        self.version = version
        self.replaced: list[str] = []
        self.active = True

    def _set(self, owner: Any, name: str, value: Any, label: str) -> None:
        # A layer in the shared record (fastattr._patching): handles undone in any order, and the
        # contraction patch fastattr.attribute applies while it runs, restore circuit-tracer exactly.
        _patching.apply(owner, name, value, self)
        self.replaced.append(label)

    def undo(self) -> None:
        """Remove this handle's replacements; those of other live handles stay. Idempotent."""
        if not self.active:
            return
        _patching.revert(self)
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
            hook_plans.patch_contexts(handle._set, version)
        if graph:
            _patch_graph(handle, version)
        if attribute:
            _patch_attribute(handle, version)
    except BaseException:
        handle.undo()
        raise
    logger.info("fastattr: patched circuit-tracer %s (%d replacements)", version, len(handle.replaced))
    return handle
