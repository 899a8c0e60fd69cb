"""Backend discovery and selection.

Every op has up to four implementations: ``cuda`` (compiled kernels), ``triton``, ``cpu``
(compiled C++) and ``torch`` (the pure-torch reference). A call picks one from, in order: the
``backend=`` argument, the innermost :func:`use_backend` block of the calling thread, the choice
captured by deferred work (a :class:`~fastattr.ContractionPlan` keeps the ``use_backend`` choice in
force where it was built), the ``FASTATTR_BACKEND`` environment variable, and finally an automatic
choice by the tensors' device (on CUDA tensors by evidence, _runtime/evidence.py). Forced choices that cannot run raise; automatic choices are logged at
debug level, and the last backend each op used is kept for :func:`last_backend`, so no slow path is
ever taken silently.

``use_backend`` blocks are per thread, so concurrent callers never see each other's choice. Work
that runs on threads the caller did not choose (autograd's device threads run backward hooks, where
the patched contraction executes) carries the choice with it instead: a plan captures it when it is
built, on the caller's thread, and uses it on whichever thread calls it, unless that thread has a
``use_backend`` block of its own.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fastattr._runtime import evidence as _evidence
from fastattr._runtime import ext as _ext

logger = logging.getLogger("fastattr")

BACKENDS = ("cuda", "triton", "cpu", "torch")
_GPU_BACKENDS = ("cuda", "triton")


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here; the message says why."""


class BackendDtypeError(BackendUnavailableError, TypeError):
    """A forced backend whose kernels do not take the inputs' dtype. Also a TypeError, the error a
    wrong dtype gets everywhere else."""


class BackendLayoutError(BackendUnavailableError, TypeError):
    """A forced backend whose kernels do not take the input's layout (dense or sparse)."""


_local = threading.local()
# Process-wide: an op run on autograd's device thread still reports to the caller's last_backend().
_last_used: dict[str, str] = {}


def _stack() -> list[tuple[object, str]]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def forced_choice() -> str | None:
    """The calling thread's innermost ``use_backend`` choice (None outside any block): what deferred
    work captures so that it runs on the caller's choice from any thread."""
    stack = _stack()
    return stack[-1][1] if stack else None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` for every op this thread calls inside the block (``backend=`` still wins).

    Per thread: other threads keep their own choice. A :class:`~fastattr.ContractionPlan` built
    inside the block keeps the choice wherever it is called (autograd's device threads included).
    """
    _validate_name(name, "use_backend(name)")
    entry = (object(), name)
    stack = _stack()
    stack.append(entry)
    try:
        yield
    finally:
        # By identity: blocks held by generators can close out of order on one thread.
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is entry:
                del stack[i]
                break


def _validate_name(name: str, what: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{what}: expected one of {', '.join(BACKENDS)}, got {name!r}")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _cuda_status() -> tuple[bool, str]:
    if _ext.ext is None:
        return False, _ext.EXT_ERROR or "fastattr._C is not importable"
    info = _ext.ext.build_info()
    if not info["cuda"]:
        return False, "fastattr._C was built without CUDA (no nvcc at build time, or FASTATTR_CUDA=OFF)"
    count, code, msg, driver = _ext.ext.cuda_probe()
    if code != 0:
        hint = ""
        if code == 35:  # cudaErrorInsufficientDriver: no driver, or one older than the build's CUDA
            hint = _insufficient_driver(info["cuda_version"], driver)
        return False, f"CUDA runtime error {code}: {msg}{hint}"
    if count == 0:
        return False, "no CUDA device is visible"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} has no CUDA support (a CPU build of torch)"
    return True, f"{count} device(s), driver {driver // 1000}.{driver % 1000 // 10}"


# Which wheel works with which driver (docs/wheels.md; fastattr.info() prints it).
WHEEL_FOR_DRIVER = (
    ("CUDA 13.0 or newer (R580+)", "fastattr-cu13", "CUDA and Triton kernels"),
    ("CUDA 12.x (R525 to R575)", "fastattr", "Triton kernels on torch's CUDA 12 runtime (no fastattr-cu12 is built yet)"),
    ("none (CPU only)", "fastattr", "C++ and (interpreted) Triton kernels"),
)


def wheel_advice(build_cuda: str | None, driver: int) -> str:
    """Which wheel suits this machine's driver (``driver``: CUDA version x 1000 + minor x 10, 0 for none)."""
    if not driver:
        return "no NVIDIA driver: the base wheel (pip install fastattr) is all this machine can use"
    found = f"{driver // 1000}.{driver % 1000 // 10}"
    if driver >= 13000:
        return f"driver for CUDA {found}: fastattr-cu13 (CUDA kernels) or the base fastattr (Triton kernels)"
    have = f"; installed: a CUDA {build_cuda} build, whose CUDA kernels this driver cannot run" if build_cuda else ""
    return f"driver for CUDA {found}: the base wheel (pip install fastattr), Triton kernels on torch's CUDA runtime{have}"


def _insufficient_driver(build_cuda: str, driver: int) -> str:
    """The reason suffix for cudaErrorInsufficientDriver, logged once (``_cuda_status`` is cached).

    CUDA's minor-version compatibility lets a build of CUDA X.y run on any driver for X.0 or newer,
    so this error means the driver predates CUDA X (or there is none). A driver that is merely old
    is worth a warning; no driver at all is the normal state of a CPU machine, so only info.
    """
    major = build_cuda.split(".")[0]
    if driver == 0:
        logger.info("no NVIDIA driver found: the CUDA kernels of this build (CUDA %s) are off; "
                    "using the triton, cpu and torch backends", build_cuda)
        return f" (no NVIDIA driver found; this build needs a driver for CUDA {major}.0 or newer)"
    found = f"{driver // 1000}.{driver % 1000 // 10}"
    logger.warning("the NVIDIA driver supports CUDA %s, but this build of fastattr (CUDA %s) needs a driver "
                   "for CUDA %s.0 or newer: its CUDA kernels are off and the triton, cpu and torch backends "
                   "run instead. Update the driver, or install the base wheel for this driver "
                   "(pip uninstall fastattr-cu%s && pip install fastattr: Triton kernels on torch's own CUDA "
                   "runtime; see docs/wheels.md).", found, build_cuda, major, major)
    return f" (the driver supports CUDA {found}; this build needs a driver for CUDA {major}.0 or newer)"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    try:
        from fastattr import triton_kernels  # noqa: F401
    except ImportError as exc:
        return f"fastattr.triton_kernels failed to import ({exc})"
    return None


def _triton_status() -> tuple[bool, str]:
    # Only the import is cached: TRITON_INTERPRET may change between calls, and a status cached
    # under the other setting would name a backend that cannot run.
    error = _triton_import_error()
    if error is not None:
        return False, error
    import triton

    if triton_interpret():
        return True, f"triton {triton.__version__} in interpreter mode (TRITON_INTERPRET=1), CPU tensors"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__}"
    return False, "no CUDA device for triton (set TRITON_INTERPRET=1 to run its kernels on the CPU)"


def backend_status() -> dict[str, tuple[bool, str]]:
    """Map each backend to (available, reason)."""
    cpu_ok = _ext.ext is not None
    return {
        "cuda": _cuda_status(),
        "triton": _triton_status(),
        "cpu": (cpu_ok, "compiled C++" if cpu_ok else (_ext.EXT_ERROR or "fastattr._C missing")),
        "torch": (True, "pure-torch reference"),
    }


def available_backends() -> list[str]:
    return [name for name, (ok, _) in backend_status().items() if ok]


def device_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on tensors on ``device`` (None if it can)."""
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got tensors on {device}"
    if name == "cpu" and device.type != "cpu":
        return f"the cpu backend needs CPU tensors, got tensors on {device}"
    if name == "triton" and device.type == "cpu" and not triton_interpret():
        return "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    if name == "triton" and device.type == "cuda" and triton_interpret():
        return "TRITON_INTERPRET=1 runs triton on CPU tensors only"
    return None


# ------------------------------------------------------------------------------------------------
# The dispatch registry: every op's implementations, with what each takes.
# ------------------------------------------------------------------------------------------------

LAYOUTS = ("strided", "sparse")  # dense tensors; SparseEdges or torch sparse CSR/COO


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of an op. ``dtypes=None`` takes every dtype the op accepts."""

    backend: str
    fn: Callable
    dtypes: tuple[torch.dtype, ...] | None
    layouts: tuple[str, ...]

    def takes(self, dtype: torch.dtype | None, layout: str) -> bool:
        return layout in self.layouts and (dtype is None or self.dtypes is None or dtype in self.dtypes)


class Op:
    """An op's implementations by backend; :meth:`select` picks one for a call (module docstring).

    Register with ``@OP.register("cpu", dtypes=(torch.float32,))`` above the launch helper; what
    :meth:`select` returns is what runs, and what :func:`last_backend` reports."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.impls: dict[str, Impl] = {}

    def register(self, backend: str, *, dtypes: tuple[torch.dtype, ...] | None = None,
                 layouts: tuple[str, ...] = ("strided",)) -> Callable[[Callable], Callable]:
        _validate_name(backend, "register(backend)")
        for layout in layouts:
            if layout not in LAYOUTS:
                raise ValueError(f"layouts: expected entries from {LAYOUTS}, got {layout!r}")
        if backend in self.impls:
            raise ValueError(f"{self.name}: backend {backend!r} is registered twice")

        def add(fn: Callable) -> Callable:
            self.impls[backend] = Impl(backend, fn, None if dtypes is None else tuple(dtypes), tuple(layouts))
            return fn

        return add

    def takes(self, backend: str, dtype: torch.dtype | None, layout: str = "strided") -> bool:
        impl = self.impls.get(backend)
        return impl is not None and impl.takes(dtype, layout)

    def select(
        self,
        device: torch.device,
        backend: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        layout: str = "strided",
        arg: str = "input",
        captured: str | None = None,
    ) -> Impl:
        """The implementation to run on ``arg`` (dtype ``dtype``, layout ``layout``, on ``device``).
        ``captured`` is the choice that deferred work recorded where it was built. A forced choice
        that cannot run raises, naming why; an automatic one takes the first of the device's order
        that can, and logs when that is the torch reference."""
        forced, source = _forced(backend, captured)
        if forced is not None:
            chosen = self._check_forced(forced, source, device, dtype, layout, arg)
        else:
            chosen = self._automatic(device, dtype, layout, arg)
        _last_used[self.name] = chosen
        return self.impls[chosen]

    def gpu_order(self, card: str | None) -> tuple[tuple[str, ...], str]:
        """The automatic order on CUDA tensors of ``card`` (None: no device report applies) and why
        its first entry leads: by evidence (_runtime/evidence.py)."""
        return _evidence.gpu_order(self.name, card)

    def gpu_default(self, card: str | None = None) -> tuple[str, str]:
        """(backend, why) this op picks on CUDA tensors of ``card`` for the inputs it was built for,
        when every backend is available: the first implemented entry of :meth:`gpu_order`."""
        order, why = self.gpu_order(card)
        for i, name in enumerate(order):
            if name in self.impls:
                if i == 0:
                    return name, why
                return name, f"{_evidence.EVIDENCE_WHY.get(name, name)}; no {', '.join(order[:i])} implementation"
        return "none", "no GPU implementation"

    def _check_forced(self, forced: str, source: str, device, dtype, layout: str, arg: str) -> str:
        _validate_name(forced, source)
        if forced not in self.impls:
            raise BackendUnavailableError(
                f"{self.name}: backend {forced!r} (from {source}) is not implemented for this op; "
                f"implemented: {', '.join(self.impls)}"
            )
        ok, why = backend_status()[forced]
        if not ok:
            raise BackendUnavailableError(f"{self.name}: backend {forced!r} (from {source}) is unavailable: {why}")
        bad = device_reason(forced, device)
        if bad:
            raise BackendUnavailableError(f"{self.name}: backend {forced!r} (from {source}) cannot run here: {bad}")
        impl = self.impls[forced]
        if layout not in impl.layouts:
            can = ", ".join(n for n, i in self.impls.items() if layout in i.layouts)
            raise BackendLayoutError(
                f"{arg}: the {forced} backend expects a dense (strided) tensor, got a {layout} one "
                f"({self.name}, backend from {source}; backends that take {layout} {arg}: {can})"
            )
        if not impl.takes(dtype, layout):
            name = _dtype_name(dtype)
            allowed = " or ".join(_dtype_name(d) for d in impl.dtypes)
            can = ", ".join(n for n, i in self.impls.items() if i.takes(dtype, layout))
            raise BackendDtypeError(
                f"{arg}: the {forced} backend expects dtype {allowed}, got {name} "
                f"({self.name}, backend from {source}; backends that take {name}: {can})"
            )
        return forced

    def _automatic(self, device: torch.device, dtype, layout: str, arg: str) -> str:
        order = self.gpu_order(_card(device))[0] if device.type == "cuda" else ("cpu", "torch")
        status = backend_status()
        runnable = [n for n in order if n in self.impls and status[n][0] and device_reason(n, device) is None]
        chosen = next((n for n in runnable if self.impls[n].takes(dtype, layout)), None)
        if chosen is None:
            raise BackendUnavailableError(
                f"{arg}: no backend of {self.name} takes a {layout} {_dtype_name(dtype) if dtype else ''} input on "
                f"{device}; implemented: " + ", ".join(
                    f"{n} ({'/'.join(i.layouts)}, {'any dtype' if i.dtypes is None else '/'.join(map(_dtype_name, i.dtypes))})"
                    for n, i in self.impls.items())
            )
        logger.debug("%s: automatic backend %r for %s tensors on %s", self.name, chosen, layout, device)
        first = order[0]
        if chosen != first:
            if first in self.impls and status[first][0] and device_reason(first, device) is None:
                impl = self.impls[first]
                why = (f"{layout} {arg}" if layout not in impl.layouts
                       else f"{_dtype_name(dtype)} {arg} (the {first} backend takes "
                            f"{' or '.join(map(_dtype_name, impl.dtypes or ()))} only)")
                logger.info("%s: using the %s backend for %s", self.name, chosen, why)
            else:
                logger.info("%s: using the %s backend on %s (%s unavailable)", self.name, chosen, device, first)
        return chosen


OPS: dict[str, Op] = {}


@functools.lru_cache(maxsize=None)
def _card_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _card(device: torch.device) -> str | None:
    """The card's name, as device reports name it (nvidia-smi's and torch's names agree)."""
    try:
        return _card_name(device.index if device.index is not None else torch.cuda.current_device())
    except (RuntimeError, AssertionError):  # no CUDA runtime: then no report can apply
        return None


def op(name: str) -> Op:
    """The registry entry of op ``name`` (created on first use)."""
    entry = OPS.get(name)
    if entry is None:
        entry = OPS[name] = Op(name)
    return entry


def _forced(backend: str | None, captured: str | None) -> tuple[str | None, str]:
    """The forced choice and where it came from, in precedence order (module docstring)."""
    if backend is not None:
        return backend, "backend="
    inner = forced_choice()
    if inner is not None:
        return inner, "use_backend()"
    if captured is not None:
        return captured, "use_backend() where the plan was built"
    env = os.environ.get("FASTATTR_BACKEND")
    if env:
        return env, "FASTATTR_BACKEND"
    return None, ""


def deterministic(flag: bool | None) -> bool:
    """Whether an op runs its fixed-order (run-to-run bitwise identical) kernels: ``flag`` when
    given, else torch's global switch (``torch.use_deterministic_algorithms``)."""
    if flag is None:
        return torch.are_deterministic_algorithms_enabled()
    if not isinstance(flag, bool):
        raise TypeError(f"deterministic: expected True, False or None, got {flag!r}")
    return flag


def last_backend(op: str | None = None) -> str | None | dict[str, str]:
    """The backend that the most recent call of ``op`` ran on; without ``op``, that of every op
    called so far in this process."""
    if op is None:
        return dict(_last_used)
    return _last_used.get(op)
