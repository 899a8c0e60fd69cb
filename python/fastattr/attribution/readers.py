"""Which reader turns a model into the linear engine's :class:`~fastattr.attribution.linear_engine.FrozenModel`.

A reader is a module with ``NAME``, ``claims(model)``, ``unsupported_reason(model)``,
``capture(model)`` (a context manager around circuit-tracer's ``setup_attribution`` that records
the frozen state of its forward pass) and ``read(model, ctx, input_ids, frozen)``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from fastattr.attribution import reader_huggingface, reader_transformerlens

READERS: tuple[ModuleType, ...] = (reader_transformerlens, reader_huggingface)


def reader_for(model: Any) -> ModuleType | None:
    """The reader of ``model``'s backend, or None when no reader knows it."""
    return next((r for r in READERS if r.claims(model)), None)


def unsupported_reason(model: Any) -> str | None:
    """Why the linear engine cannot express ``model`` exactly, or None if it can."""
    reader = reader_for(model)
    if reader is None:
        backend = getattr(model, "backend", type(model).__name__)
        return (f"the linear engine reads TransformerLens and nnsight (Hugging Face) models; this is a {backend!r} "
                "model, whose module structure no reader knows")  # fmt: skip
    return reader.unsupported_reason(model)
