"""One record of every attribute fastattr replaces in circuit-tracer, shared by all patchers.

Several patches can be live at once (a user's ``patch_circuit_tracer()`` handles, the contraction
patch that ``fastattr.attribute`` applies while it runs) and be undone in any order. Each
replaced attribute keeps the value it had before fastattr first touched it and a stack of layers,
one per live patch. Undoing a patch removes its layers wherever they are in the stack; the
attribute then holds the topmost remaining layer's value, or the original once no layer is left.
So any order of undo restores circuit-tracer exactly, attribute by attribute, and a patch undone
while another is live never strips the other's replacements.

A value set by someone else after a layer (a test's monkeypatch, another library) is left in
place: removing a layer only writes when the attribute still holds the value that layer's stack
put there.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

_MISSING = object()
_LOCK = threading.RLock()


@dataclass
class _Slot:
    owner: Any
    name: str
    original: Any  # the value before any fastattr layer, or _MISSING (inherited / absent)
    layers: list[tuple[object, Any]] = field(default_factory=list)  # (token, value), bottom first


_SLOTS: dict[tuple[int, str], _Slot] = {}


def apply(owner: Any, name: str, value: Any, token: object) -> None:
    """Set ``owner.name = value`` as a layer belonging to ``token``."""
    with _LOCK:
        key = (id(owner), name)
        slot = _SLOTS.get(key)
        if slot is None:
            slot = _SLOTS[key] = _Slot(owner, name, vars(owner).get(name, _MISSING))
        slot.layers.append((token, value))
        setattr(owner, name, value)


def revert(token: object) -> None:
    """Remove every layer of ``token``; each attribute gets the value now on top (or the original)."""
    with _LOCK:
        for key, slot in list(_SLOTS.items()):
            kept = [layer for layer in slot.layers if layer[0] is not token]
            if len(kept) == len(slot.layers):
                continue
            shown = slot.layers[-1][1]
            slot.layers = kept
            if vars(slot.owner).get(slot.name, _MISSING) is not shown:
                # Replaced from outside since: that value stays.
                if not kept:
                    del _SLOTS[key]
                continue
            if kept:
                setattr(slot.owner, slot.name, kept[-1][1])
                continue
            if slot.original is _MISSING:
                delattr(slot.owner, slot.name)
            else:
                setattr(slot.owner, slot.name, slot.original)
            del _SLOTS[key]


def live_layers() -> dict[str, int]:
    """``"owner.name" -> number of live layers``, for tests and debugging."""
    with _LOCK:
        return {f"{getattr(s.owner, '__name__', s.owner)}.{s.name}": len(s.layers) for s in _SLOTS.values()}
