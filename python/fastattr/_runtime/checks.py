"""Argument validation shared by every op.

Every message names the argument and gives the expected and the actual value, so that a wrong
call fails loudly at the boundary instead of producing a silently wrong graph.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

logger = logging.getLogger("fastattr")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class EmptyGraphError(ValueError, IndexError):
    """An empty input where circuit-tracer fails with an IndexError (it indexes element -1 of the
    sorted scores): a ValueError naming the argument that code written against circuit-tracer
    still catches as IndexError."""


class NonFiniteInfluenceError(ValueError, RuntimeError):
    """The influence series would have NaN or Inf terms (non-finite logit weights, or a float32
    overflow). circuit-tracer then iterates on them until max_iter and raises RuntimeError("...
    failed to converge ..."); this says why at once, and is still a RuntimeError for code written
    against circuit-tracer."""
INDEX_DTYPES = (torch.int32, torch.int64)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    t,
    name: str,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
    unit_last_stride: bool = False,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "meta":
        raise ValueError(f"{name}: expected a tensor with data (cpu or cuda), got a meta tensor of shape {tuple(t.shape)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()} for shape {tuple(t.shape)}")
    if unit_last_stride and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a unit stride in the last dimension, got strides {t.stride()}")
    return t


def check_shape(t: torch.Tensor, name: str, expected: Sequence[int | None]) -> None:
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")


def check_index_range(idx: torch.Tensor, name: str, upper: int) -> None:
    """Indices must lie in [0, upper): a kernel would otherwise write out of bounds."""
    if idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name}: expected indices in [0, {upper}), got values in [{lo}, {hi}]")


def check_same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b}: expected a tensor on {a.device} (the device of {name_a}), got one on {b.device}")


# Elements per isfinite pass: bounds the boolean temporary (16 MB) instead of one N x N mask.
FINITE_CHUNK = 1 << 24


def _row_chunks(t: torch.Tensor):
    """(first row, block) over dim 0, each block at most FINITE_CHUNK elements (one row at least)."""
    rows = max(1, FINITE_CHUNK // max(1, t[0].numel())) if t.shape[0] else 1
    for r0 in range(0, t.shape[0], rows):
        yield r0, t[r0 : r0 + rows]


def check_finite(t: torch.Tensor, name: str, error: type[Exception] = ValueError) -> None:
    if t.layout != torch.strided or t.dim() == 0 or t.numel() == 0:
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            raise error(f"{name}: expected finite values, got {describe_nonfinite(t, bad)}")
        return
    ok = None
    for _, block in _row_chunks(t):  # one device flag, read once: no sync per block
        block_ok = torch.isfinite(block).all()
        ok = block_ok if ok is None else ok & block_ok
    if not bool(ok):
        raise error(f"{name}: expected finite values, got {describe_nonfinite(t)}")


def describe_nonfinite(t: torch.Tensor, bad: torch.Tensor | None = None) -> str:
    """How many NaN and Inf entries ``t`` has, and the first one (index and value)."""
    if bad is None and t.layout == torch.strided and t.dim() > 0:
        n_nan = n_inf = 0
        first = ()
        for r0, block in _row_chunks(t):
            n_nan += int(torch.isnan(block).sum())
            n_inf += int(torch.isinf(block).sum())
            if not first:
                hits = torch.nonzero(~torch.isfinite(block))
                if hits.shape[0]:
                    first = (int(hits[0, 0]) + r0, *(int(i) for i in hits[0, 1:].tolist()))
    else:
        bad = ~torch.isfinite(t) if bad is None else bad
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist()) if bool(bad.any()) else ()
    where = first[0] if len(first) == 1 else first
    value = float(t[first]) if first else float("nan")
    return f"{n_nan} NaN and {n_inf} Inf entries (first: {value} at index {where})"


# Largest matrix copied to row-major without being asked (256 MB of float32). The kernels read
# rows; a transposed N x N adjacency would otherwise be copied whole (16 GB at N = 63k).
ROW_MAJOR_COPY_LIMIT = 1 << 26


def row_major(a: torch.Tensor, name: str) -> torch.Tensor:
    """``a`` if its rows are unit-stride, else a row-major copy, refused above ROW_MAJOR_COPY_LIMIT."""
    if a.dim() == 2 and a.shape[1] > 1 and a.stride(1) != 1:
        if a.numel() > ROW_MAJOR_COPY_LIMIT:
            raise ValueError(
                f"{name}: expected a row-major matrix (unit stride along rows), got strides {a.stride()} for shape "
                f"{tuple(a.shape)}; the kernels read rows, and a row-major copy would take "
                f"{a.numel() * a.element_size() / 2**30:.1f} GiB more: pass {name}.contiguous() to accept that copy"
            )
        logger.info("%s has strides %s; making a row-major copy", name, a.stride())
        return a.contiguous()
    return a


def check_number(x, name: str, *, integer: bool = False, expected: str | None = None):
    """A Python or numpy scalar (or 0-d tensor) as float/int; bools and NaN are rejected."""
    import numbers

    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise TypeError(f"{name}: expected a number, got a tensor of shape {tuple(x.shape)}")
        x = x.item()
    expected = expected or ("an int" if integer else "a float")
    if isinstance(x, bool):
        raise TypeError(f"{name}: expected {expected}, got {type(x).__name__}")
    if integer:
        if not isinstance(x, numbers.Integral):
            raise TypeError(f"{name}: expected {expected}, got {type(x).__name__}")
        return int(x)
    if not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected {expected}, got {type(x).__name__}")
    x = float(x)
    if math.isnan(x):
        raise ValueError(f"{name}: expected a finite number, got nan")
    return x


def check_fraction(x: float, name: str) -> None:
    if not (0.0 <= float(x) <= 1.0):
        raise ValueError(f"{name} must be between 0.0 and 1.0, got {x}")
