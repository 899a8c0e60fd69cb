"""What fastattr knows of circuit-tracer's replacement models, attribution contexts and graphs.

:mod:`fastattr.attribution` attributes circuit-tracer's ``ReplacementModel`` (TransformerLens and
nnsight backends) into circuit-tracer's ``Graph``; this module is the one place that spells out
that interface, for both layouts users install: circuit-tracer 0.5.0 from PyPI, which gives both
backends one attribution interface (``run_forward_pass``, ``unembed_proj``, ``model_config``,
``get_offload_targets_phase*``), and upstream's split layout, whose backends' ``attribute()``
spell these out inline. Structure is checked, never version strings: what is missing raises
:class:`UnsupportedCircuitTracerError` naming it.

The adapter (:mod:`fastattr.integrations.circuit_tracer`) uses this module; nothing here imports
the adapter.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

import torch


class UnsupportedCircuitTracerError(RuntimeError):
    """The installed circuit-tracer does not have the structure this patch replaces."""


def circuit_tracer_version() -> str:
    """The imported circuit-tracer's version; a source tree on sys.path shadows an installed one."""
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


# The helpers below use 0.5.0's attribution interface when the model has it and otherwise do what
# upstream's attribute_transformerlens.py / attribute_nnsight.py do.


def nnsight_model_classes() -> tuple[type, ...]:
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
    classes = nnsight_model_classes()
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
