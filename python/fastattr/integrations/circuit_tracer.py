"""The circuit-tracer adapter: ``patch_circuit_tracer()`` and what fastattr knows of circuit-tracer.

fastattr's ops (``fastattr.contraction``, ``influence``, ``threshold``, ``pruning``, ...) take plain
tensors and know nothing of any tracer. This module is the adapter that routes circuit-tracer's hot
paths through them:

- the backward-hook contraction of the attribution contexts (TransformerLens and nnsight): each
  layer's feature and error hooks become one :class:`~fastattr.ContractionPlan` call, planned once
  per context (:mod:`fastattr.hook_plans`), so no (batch x features x d_model) tensor is gathered;
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

from fastattr import _patching


class UnsupportedCircuitTracerError(RuntimeError):
    """The installed circuit-tracer does not have the structure this patch replaces."""


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


def unsupported(version: str, what: str) -> UnsupportedCircuitTracerError:
    return UnsupportedCircuitTracerError(
        f"circuit-tracer {version} is not supported by fastattr.patch_circuit_tracer(): {what}. "
        "Supported: circuit-tracer 0.5.0 (PyPI) and the upstream layout with "
        "attribution/attribute_transformerlens.py and attribute_nnsight.py."
    )


def check_method(cls: type, name: str, params: tuple[str, ...], version: str) -> None:
    fn = getattr(cls, name, None)
    if fn is None:
        raise unsupported(version, f"{cls.__module__}.{cls.__name__} has no method {name}")
    got = tuple(inspect.signature(fn).parameters)[: len(params)]
    if got != params:
        raise unsupported(version, f"{cls.__module__}.{cls.__name__}.{name} takes {got}, expected {params}")


# ------------------------------------------------------------------- the replacement model

def model_device(ctx: Any) -> torch.device:
    return ctx.decoder_vecs.device


# circuit-tracer 0.5.0 (PyPI) gives both backends one attribution interface (run_forward_pass,
# unembed_proj, model_config, get_offload_targets_phase*); upstream's split layout has each
# backend's attribute() spell these out inline. The helpers below use the interface when the model
# has it and otherwise do what upstream's attribute_transformerlens.py / attribute_nnsight.py do.


def _nnsight_model_classes() -> tuple[type, ...]:
    """nnsight's Hugging Face model classes: ``LanguageModel`` up to 0.7, ``TransformersModel`` from
    0.8 (where ``LanguageModel`` is a deprecated subclass of it). Read from an nnsight already
    imported (a model of it exists only then), by attribute, never by version."""
    nnsight = sys.modules.get("nnsight")
    if nnsight is None:
        return ()
    found = []
    for name in ("TransformersModel", "LanguageModel"):
        try:
            cls = getattr(nnsight, name)  # lazy in nnsight >= 0.8: may import, may be unavailable
        except (AttributeError, ImportError):
            continue
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _is_nnsight(model: Any) -> bool:
    backend = getattr(model, "backend", None)
    if backend is not None:
        return backend == "nnsight"
    classes = _nnsight_model_classes()
    return bool(classes) and isinstance(model, classes)


def check_nnsight_tracer(tracer: Any) -> None:
    """The nnsight tracing calls upstream's nnsight attribute makes (``invoke``, ``barrier``)."""
    missing = [name for name in ("invoke", "barrier") if not callable(getattr(tracer, name, None))]
    if missing:
        raise unsupported(
            circuit_tracer_version(),
            f"nnsight's tracer {type(tracer).__module__}.{type(tracer).__name__} has no {', '.join(missing)}() "
            "(the forward pass of upstream's attribute_nnsight.py needs both)",
        )


def run_forward(model: Any, input_ids: torch.Tensor, batch_size: int, ctx: Any) -> None:
    if hasattr(model, "run_forward_pass"):
        model.run_forward_pass(input_ids, batch_size, ctx)
    elif _is_nnsight(model):
        with model.trace() as tracer:
            check_nnsight_tracer(tracer)
            with tracer.invoke(input_ids.expand(batch_size, -1)):
                pass
            barrier = tracer.barrier(2)
            model.configure_gradient_flow(tracer)
            model.configure_skip_connection(tracer, barrier=barrier)
            ctx.cache_residual(model, tracer, barrier=barrier)
    else:
        with ctx.install_hooks(model):
            residual = model.forward(input_ids.expand(batch_size, -1), stop_at_layer=model.cfg.n_layers)
            ctx._resid_activations[-1] = model.ln_final(residual)


def unembed(model: Any) -> torch.Tensor:
    if hasattr(model, "unembed_proj"):
        return model.unembed_proj
    return model.unembed_weight if _is_nnsight(model) else model.unembed.W_U


def graph_cfg(model: Any) -> Any:
    if hasattr(model, "model_config"):
        return model.model_config
    # Upstream's nnsight attribute passes the HF config; a model built from a config may hold it elsewhere.
    if _is_nnsight(model) and getattr(model, "config", None) is not None:
        return model.config
    return model.cfg


def _transcoder_list(model: Any) -> list:
    tc = model.transcoders
    return list(tc) if hasattr(tc, "__iter__") else [tc]


def offload_targets(model: Any, phase: int) -> list:
    method = getattr(model, f"get_offload_targets_phase{phase}", None)
    if method is not None:
        return method()
    if not _is_nnsight(model):
        return [_transcoder_list(model), [block.mlp for block in model.blocks], [model.unembed, model.embed]][phase]
    skip = bool(getattr(model, "skip_transcoder", False))
    if phase == 0:
        return [] if skip else _transcoder_list(model)
    if phase == 1:
        return [layer.mlp for layer in model.pre_logit_location.layers] + (_transcoder_list(model) if skip else [])
    tied = model.embed_weight.untyped_storage().data_ptr() == model.unembed_weight.untyped_storage().data_ptr()
    return [model.embed_location] + ([] if tied else [model.lm_head])


def model_scan(model: Any) -> Any:
    """The transcoders' identifier: ``model.scan``, or ``scan_name`` where a version renamed it."""
    return model.scan if hasattr(model, "scan") else getattr(model, "scan_name", None)


def graph_kwargs(graph_cls: type, scan: Any, **fields: Any) -> dict[str, Any]:
    """Keyword arguments for circuit-tracer's ``Graph``, with the scan under the name its
    ``__init__`` takes (``scan`` in 0.5.0, ``scan_name`` where renamed)."""
    params = inspect.signature(graph_cls.__init__).parameters
    for name in ("scan", "scan_name"):
        if name in params:
            return {**fields, name: scan}
    raise unsupported(circuit_tracer_version(), f"{graph_cls.__module__}.Graph takes neither scan nor scan_name")


def require_api(model: Any) -> None:
    missing = [name for name in ("ensure_tokenized", "setup_attribution", "tokenizer") if not hasattr(model, name)]
    if not hasattr(model, "scan") and not hasattr(model, "scan_name"):
        missing.append("scan")
    if missing:
        raise TypeError(
            f"model: expected a circuit-tracer ReplacementModel (TransformerLens or nnsight backend, with "
            f"{', '.join(missing)}), got {type(model).__name__}"
        )


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
    if library == "nnsight" and lib is not None and not _nnsight_model_classes():
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
        # A layer in the shared record (fastattr._patching): handles undone in any order, and the
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
        raise unsupported(version, f"circuit_tracer.attribution.attribute does not import ({exc})") from exc
    if not callable(getattr(module, "attribute", None)):
        raise unsupported(version, "circuit_tracer.attribution.attribute has no attribute()")
    originals = [module.attribute]
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
    _replace_everywhere(handle, {id(fn): (fn, fast_attribute) for fn in originals})
    # The packages export attribute lazily (a module __getattr__) and may not have bound it yet:
    # bind it for the patch's duration (undo removes it again), so ``circuit_tracer.attribute`` is
    # fastattr's without going through the lazy import.
    for modname in ("circuit_tracer.attribution", "circuit_tracer"):
        package = importlib.import_module(modname)
        if "attribute" not in vars(package) and callable(getattr(package, "attribute", None)):
            handle._set(package, "attribute", fast_attribute, f"{modname}.attribute", key=_qualname(originals[0]))


def patch_circuit_tracer(
    *, contraction: bool = True, graph: bool = True, attribute: bool = True, count_calls: bool = False
) -> PatchHandle:
    """Make circuit-tracer use fastattr's kernels; returns a handle whose ``undo()`` restores it.

    Args:
        contraction: replace the attribution contexts' backward-hook contraction.
        graph: replace the graph functions (influence, thresholds, pruning, scores).
        attribute: route ``circuit_tracer.attribute`` to :func:`fastattr.attribute` (device-resident
            edge rows); needs ``contraction``.
        count_calls: count the calls of each replaced function in ``handle.calls`` (the pytest
            plugin's report); the replacements are then counting wrappers around fastattr's.
    """
    from fastattr import (
        hook_plans,  # imports this module's helpers: imported here, not at the top
    )

    if attribute and not contraction:
        raise ValueError("attribute: expected contraction=True as well (fastattr.attribute writes through the patched hooks)")
    version = circuit_tracer_version()
    check_structure(version, attribute=attribute)
    handle = PatchHandle(version, count_calls=count_calls)
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


# The integration contract (see fastattr.integrations): apply() returns a handle with undo().
apply = patch_circuit_tracer
