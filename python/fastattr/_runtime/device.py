"""One device per call, made current while the op runs.

Triton launches, the CUDA launchers (which take torch's current stream of the tensors' device) and
torch's own kernels run on the *current* CUDA device. With tensors on ``cuda:1`` while ``cuda:0``
is current that is an invalid-handle error or an illegal address, so every op enters its tensors'
device for the whole call, and first checks that all of its tensors are on that one device.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch


def _device_of(x: Any) -> torch.device | None:
    if isinstance(x, torch.Tensor):
        return x.device
    dev = getattr(x, "device", None)  # SparseEdges and other tensor bundles
    return dev if isinstance(dev, torch.device) else None


def common_device(named: dict[str, Any]) -> torch.device | None:
    """The device shared by every tensor in ``named`` (name -> value; non-tensors are ignored).

    Raises ValueError naming the first argument on another device than the first tensor's."""
    first_name, first = None, None
    for name, value in named.items():
        dev = _device_of(value)
        if dev is None:
            continue
        if first is None:
            first_name, first = name, dev
        elif dev != first:
            raise ValueError(f"{name}: expected a tensor on {first} (the device of {first_name}), got one on {dev}")
    return first


def sync_check_enabled() -> bool:
    """FASTATTR_SYNC_CHECK=1: synchronise and check after every op, so that an asynchronous fault
    (an illegal address in a Triton or CUDA kernel) is reported by the op that launched it."""
    return os.environ.get("FASTATTR_SYNC_CHECK", "0") == "1"


@contextlib.contextmanager
def current(device: torch.device | None, what: str = "fastattr op") -> Iterator[None]:
    """Make ``device`` the current CUDA device inside the block (a no-op for other devices)."""
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            yield
            if sync_check_enabled():
                try:
                    torch.cuda.synchronize(device)
                except RuntimeError as exc:
                    raise RuntimeError(f"{what}: a kernel failed on {device} (FASTATTR_SYNC_CHECK=1): {exc}") from exc
    else:
        yield


def _resolve(bound: inspect.BoundArguments, path: str) -> Any:
    head, *rest = path.split(".")
    value = bound.arguments.get(head)
    for attr in rest:
        value = getattr(value, attr, None)
    return value


def guard(*paths: str) -> Callable:
    """Decorate an op: the tensors at ``paths`` (argument names, ``graph.adjacency_matrix`` for an
    attribute) must share one device, which is current while the op runs. Arguments that are not
    tensors are left to the op's own checks and messages."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def op(*args, **kwargs):
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError:
                return fn(*args, **kwargs)  # the call's own TypeError
            device = common_device({p: _resolve(bound, p) for p in paths})
            with current(device, fn.__name__):
                return fn(*args, **kwargs)

        return op

    return wrap
