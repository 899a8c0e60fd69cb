"""The circuit-tracer adapter: ``patch_circuit_tracer()`` and what fastattr knows of circuit-tracer.

fastattr's ops (``fastattr.ops.contraction``, ``influence``, ``threshold``, ``pruning``, ...) take plain
tensors and know nothing of any tracer. This module is the adapter that routes circuit-tracer's hot
paths through them:

- the backward-hook contraction of the attribution contexts (TransformerLens and nnsight): each
  layer's feature and error hooks become one :class:`~fastattr.ContractionPlan` call, planned once
  per context (:mod:`fastattr.attribution.context_hooks`), so no (batch x features x d_model) tensor is gathered;
- the graph functions of ``circuit_tracer.graph`` (influence, thresholds, pruning, scores);
- ``circuit_tracer.attribute``, routed to :func:`fastattr.attribute`.

Each replaced function is replaced wherever a module holds it at module level: circuit-tracer's own
modules, and any module imported before the patch that bound the name itself (a graph server's
``from circuit_tracer import attribute``). ``undo()`` restores every one of them.

Supported: what users install, circuit-tracer 0.5.0 from PyPI (one ``attribution/attribute.py``)
and upstream's split layout (``attribute_transformerlens.py``, ``attribute_nnsight.py``). Structure
is checked, never version strings: a circuit-tracer (or TransformerLens, nnsight) whose structure
it does not recognise gets :class:`UnsupportedCircuitTracerError` naming what is missing.

The patch edits classes and module globals, so it must be applied before ``attribute()`` runs its
forward pass (the hooks are captured into the autograd graph there).
"""

from __future__ import annotations

import collections
import functools
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch

from fastattr._runtime import patching as _patching
from fastattr.attribution import context_hooks
from fastattr.attribution.driver import attribute as fast_attribute
from fastattr.attribution.replacement_model import (
    UnsupportedCircuitTracerError,
    circuit_tracer_version,
    nnsight_model_classes,
    unsupported,
)
from fastattr.ops import influence, pruning, threshold

logger = logging.getLogger("fastattr")

_GRAPH_FUNCTIONS = ("normalize_matrix", "compute_influence", "compute_node_influence", "compute_edge_influence",
                    "find_threshold", "prune_graph", "compute_graph_scores", "compute_partial_influences")  # fmt: skip


# ------------------------------------------------------------------------------ structure checks


def check_structure(version: str, *, attribute: bool) -> None:
    """Raise :class:`UnsupportedCircuitTracerError` naming what this circuit-tracer (or the
    TransformerLens / nnsight it runs on) lacks that the patch relies on. Structure only.

    A backend whose modules do not import is reported (logged) and skipped as long as the other
    one works; with neither, the error names what each lacks.
    """
    missing: list[str] = []
    usable, broken = [], []
    for library, modules in (("transformer_lens", _TL_MODULES), ("nnsight", _NNSIGHT_MODULES)):
        if importlib.util.find_spec(library) is None:
            continue
        try:
            for modname in modules:
                importlib.import_module(modname)
            usable.append(library)
        except ImportError as exc:
            broken.append(_backend_gap(library, modules, exc))
    if not usable:
        missing += broken or ["TransformerLens or nnsight (circuit-tracer's backends; neither is installed)"]
    elif broken:
        logger.info("fastattr: serving circuit-tracer's %s backend only; the other lacks %s", usable[0], broken[0])
    if attribute:
        # fastattr.attribute resolves targets through circuit-tracer's own AttributionTargets.
        targets = importlib.util.find_spec("circuit_tracer.attribution.targets")
        module = importlib.import_module("circuit_tracer.attribution.targets") if targets else None
        lacking = [n for n in ("AttributionTargets", "log_attribution_target_info") if not hasattr(module, n)]
        if lacking:
            missing.append("circuit_tracer.attribution.targets." + " and ".join(lacking) +
                           " (the attribution_targets API that fastattr.attribute serves)")
        graph = importlib.import_module("circuit_tracer.graph")
        params = inspect.signature(graph.Graph.__init__).parameters
        if "scan" not in params and "scan_name" not in params:
            missing.append("a scan or scan_name parameter of circuit_tracer.graph.Graph")
    if missing:
        raise unsupported(version, "missing " + "; ".join(missing))


_TL_MODULES = ("circuit_tracer.attribution.context_transformerlens",
               "circuit_tracer.replacement_model.replacement_model_transformerlens")
_NNSIGHT_MODULES = ("circuit_tracer.attribution.context_nnsight",
                    "circuit_tracer.replacement_model.replacement_model_nnsight")


def _backend_gap(library: str, modules: tuple[str, ...], exc: ImportError) -> str:
    """What a backend whose modules fail to import lacks, by the library's structure."""
    try:
        lib = importlib.import_module(library)
    except Exception:  # noqa: BLE001 - a library that does not import at all: the error says it
        lib = None
    if library == "transformer_lens" and lib is not None and not _lazy_has(lib, "HookedTransformer"):
        # circuit-tracer's TransformerLens model subclasses HookedTransformer; TransformerLens 4
        # replaced it with TransformerBridge.
        return "transformer_lens.HookedTransformer (TransformerLens 4 replaced it with TransformerBridge)"
    if library == "nnsight" and lib is not None and not nnsight_model_classes():
        return "nnsight.LanguageModel or nnsight.TransformersModel"
    return f"an importable {' and '.join(modules)} ({type(exc).__name__}: {exc})"


def _lazy_has(module: Any, name: str) -> bool:
    try:
        getattr(module, name)
    except (AttributeError, ImportError):
        return False
    return True


# ------------------------------------------------------------------------------ the patch handle


class PatchHandle:
    """Restores everything :func:`patch_circuit_tracer` replaced. Also a context manager.

    ``calls`` counts the calls of each replaced function (by circuit-tracer's qualified name) when
    the patch was made with ``count_calls=True``.
    """

    def __init__(self, version: str, *, count_calls: bool = False):
        self.version = version
        self.replaced: list[str] = []
        self.active = True
        self.count_calls = count_calls
        self.calls: collections.Counter[str] = collections.Counter()
        self._wrappers: dict[str, Callable] = {}

    def _set(self, owner: Any, name: str, value: Any, label: str, key: str | None = None) -> None:
        # A layer in the shared record (fastattr._runtime.patching): handles undone in any order, and the
        # contraction patch fastattr.attribute applies while it runs, restore circuit-tracer exactly.
        if self.count_calls and inspect.isfunction(value):
            value = self._counted(key or label, value)
        _patching.apply(owner, name, value, self)
        self.replaced.append(label)

    def _counted(self, key: str, fn: Callable) -> Callable:
        # One wrapper per replaced function, so that every binding of it holds the same object.
        if key not in self._wrappers:
            calls = self.calls

            @functools.wraps(fn)
            def counted(*args, **kwargs):
                calls[key] += 1
                return fn(*args, **kwargs)

            self._wrappers[key] = counted
        return self._wrappers[key]

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


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', '?'))}"


def _replace_everywhere(handle: PatchHandle, replacements: dict[int, tuple[Callable, Callable]]) -> None:
    """Replace, in every imported module, each module-level name bound to one of the originals.

    ``replacements`` maps id(original) -> (original, replacement). circuit-tracer's modules import
    these names into their globals, and so does code that imported them before the patch (a graph
    server's ``from circuit_tracer import attribute``): every such binding is swapped, whatever
    its name, and ``undo()`` restores each one. fastattr's own modules are left alone (they keep
    circuit-tracer's functions on purpose, to compare against them). Bindings held elsewhere (a
    class attribute, a dict, a functools.partial) are not reached.
    """
    for modname, module in list(sys.modules.items()):
        if module is None or modname == "fastattr" or modname.startswith("fastattr."):
            continue
        try:
            namespace = vars(module)
        except TypeError:  # not a module: some packages put other objects in sys.modules
            continue
        for name, value in list(namespace.items()):
            hit = replacements.get(id(value))
            if hit is not None and hit[0] is value:
                handle._set(module, name, hit[1], f"{modname}.{name}", key=_qualname(value))


# ------------------------------------------------------------------------------------- graph ops


def _graph_replacements() -> dict[str, Callable]:
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
        raise unsupported(version, f"circuit_tracer.graph lacks {missing}")
    replacements = _graph_replacements()
    # Import the modules that copy these names into their globals, so that every copy is swapped.
    for modname in ("circuit_tracer.attribution.attribute", "circuit_tracer.attribution.attribute_transformerlens",
                    "circuit_tracer.attribution.attribute_nnsight", "circuit_tracer.utils.demo_utils",
                    "circuit_tracer.utils.create_graph_files", "circuit_tracer"):  # fmt: skip
        try:
            importlib.import_module(modname)
        except ImportError as exc:
            logger.debug("fastattr: %s not imported (%s)", modname, exc)
    originals = {n: getattr(graph, n) for n in _GRAPH_FUNCTIONS}
    _replace_everywhere(handle, {id(fn): (fn, replacements[n]) for n, fn in originals.items()})


# ------------------------------------------------------------------------------------- attribute


def _patch_attribute(handle: PatchHandle, version: str, process_group: Any = None, gather: str = "all") -> None:
    """Route circuit-tracer's attribute() to fastattr.attribute, in both layouts.

    0.5.0 keeps one ``attribution/attribute.py``; upstream makes it a dispatcher over
    ``attribute_transformerlens.py`` and ``attribute_nnsight.py``, which it imports at call time,
    so their ``attribute`` is replaced too (for callers that import a backend's module directly).
    """
    try:
        module = importlib.import_module("circuit_tracer.attribution.attribute")
    except ImportError as exc:
        raise unsupported(version, f"circuit_tracer.attribution.attribute does not import ({exc})") from exc
    if not callable(getattr(module, "attribute", None)):
        raise unsupported(version, "circuit_tracer.attribution.attribute has no attribute()")
    originals = [module.attribute]
    replacement = fast_attribute
    if process_group is not None:
        # circuit-tracer's attribute() has no process group: the patch binds the one it was given.
        @functools.wraps(fast_attribute)
        def replacement(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("process_group", process_group)
            kwargs.setdefault("gather", gather)
            return fast_attribute(*args, **kwargs)
    for modname in ("circuit_tracer.attribution.attribute_transformerlens", "circuit_tracer.attribution.attribute_nnsight"):
        if importlib.util.find_spec(modname) is None:
            continue
        try:
            backend_module = importlib.import_module(modname)
        except ImportError as exc:  # nnsight is optional for circuit-tracer
            logger.debug("fastattr: %s not rerouted (%s)", modname, exc)
            continue
        if callable(getattr(backend_module, "attribute", None)):
            originals.append(backend_module.attribute)
    _replace_everywhere(handle, {id(fn): (fn, replacement) for fn in originals})
    # The packages export attribute lazily (a module __getattr__) and may not have bound it yet:
    # bind it for the patch's duration (undo removes it again), so ``circuit_tracer.attribute`` is
    # fastattr's without going through the lazy import.
    for modname in ("circuit_tracer.attribution", "circuit_tracer"):
        package = importlib.import_module(modname)
        if "attribute" not in vars(package) and callable(getattr(package, "attribute", None)):
            handle._set(package, "attribute", replacement, f"{modname}.attribute", key=_qualname(originals[0]))


def patch_circuit_tracer(
    *, contraction: bool = True, graph: bool = True, attribute: bool = True, count_calls: bool = False,
    process_group: Any = None, gather: str = "all",
) -> PatchHandle:
    """Make circuit-tracer use fastattr's kernels; returns a handle whose ``undo()`` restores it.

    Args:
        contraction: replace the attribution contexts' backward-hook contraction.
        graph: replace the graph functions (influence, thresholds, pruning, scores).
        attribute: route ``circuit_tracer.attribute`` to :func:`fastattr.attribute` (device-resident
            edge rows); needs ``contraction``.
        count_calls: count the calls of each replaced function in ``handle.calls`` (the pytest
            plugin's report); the replacements are then counting wrappers around fastattr's.
        process_group, gather: with ``attribute``, every patched ``attribute`` call splits one
            graph over this ``torch.distributed`` group, as ``fastattr.attribute(...,
            process_group=, gather=)`` (see docs/distributed.md). None (default): one process,
            even when a default group is initialised: distribution is asked for, never implied.
    """
    if process_group is not None and not attribute:
        raise ValueError(f"process_group: expected attribute=True to route attribute() over the group, got attribute={attribute!r}")
    if gather == "shards":
        raise ValueError("gather: expected 'all' or 'rank0' under patch_circuit_tracer (circuit-tracer's "
                         "attribute returns a Graph), got 'shards'")  # fmt: skip
    if process_group is not None:
        from fastattr.attribution import distributed as _distributed

        _distributed.check_group(process_group, gather)
    if attribute and not contraction:
        raise ValueError("attribute: expected contraction=True as well (fastattr.attribute writes through the patched hooks)")
    version = circuit_tracer_version()
    check_structure(version, attribute=attribute)
    handle = PatchHandle(version, count_calls=count_calls)
    try:
        if contraction:
            context_hooks.patch_contexts(handle._set, version)
        if graph:
            _patch_graph(handle, version)
        if attribute:
            _patch_attribute(handle, version, process_group, gather)
    except BaseException:
        handle.undo()
        raise
    logger.info("fastattr: patched circuit-tracer %s (%d replacements)", version, len(handle.replaced))
    return handle


# The integration contract (see fastattr.integrations): apply() returns a handle with undo().
apply = patch_circuit_tracer
