"""Loading the compiled extension and passing tensors to it as raw pointers.

The extension is built without libtorch, so tensors cross the boundary as (data_ptr, shape,
strides, dtype code). This module is the only place that knows that encoding.
"""

from __future__ import annotations

import torch

try:  # the extension is optional: a pure-Python install still has the triton and torch backends
    from fastattr import _C as ext  # type: ignore[attr-defined]

    EXT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    ext = None
    EXT_ERROR = f"fastattr._C failed to import: {exc}"

# Must match csrc/common.h DType.
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int32: 3,
    torch.int64: 4,
    torch.uint8: 5,
    torch.bool: 5,
    torch.float64: 6,
}


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def cuda_stream(device: torch.device) -> int:
    """The current torch stream as a raw handle, so kernels order correctly with torch's work."""
    return torch.cuda.current_stream(device).cuda_stream
