"""``fastattr.info()``: what was built and which backends can run here, with reasons."""

from __future__ import annotations

import platform

import torch

from fastattr._runtime import ext as _ext
from fastattr._runtime import backends as _backends
from fastattr._runtime.backends import backend_status

__version__ = "0.1.0"


def build_info() -> dict:
    if _ext.ext is None:
        return {"extension": False, "error": _ext.EXT_ERROR}
    return {"extension": True, **_ext.ext.build_info()}


def info(print_report: bool = True) -> dict:
    """Collect (and by default print) the version, the build and the backends' availability."""
    report = {
        "version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "build": build_info(),
        "backends": {name: {"available": ok, "reason": why} for name, (ok, why) in backend_status().items()},
        "ops": ops_table(),
        "gpu_defaults": gpu_defaults(),
        "wheels": wheels(),
    }
    if print_report:
        print(format_info(report))
    return report


def _dtype_names(dtypes) -> str:
    return "any dtype" if dtypes is None else "/".join(str(d).replace("torch.", "") for d in dtypes)


def ops_table() -> dict:
    """op -> backend -> what its implementation takes, from the dispatch registry."""
    return {
        name: {b: {"dtypes": _dtype_names(i.dtypes), "layouts": list(i.layouts)} for b, i in op.impls.items()}
        for name, op in sorted(_backends.OPS.items())
    }


def _card() -> str | None:
    try:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except RuntimeError:
        return None


def gpu_defaults() -> dict:
    """op -> the backend it picks automatically on CUDA tensors (of this machine's first card, when
    it has one) and why: by evidence, or by a committed device report (_runtime/evidence.py)."""
    card = _card()
    out = {}
    for name, op in sorted(_backends.OPS.items()):
        backend, why = op.gpu_default(card)
        out[name] = {"backend": backend, "why": why}
    return out


def wheels() -> dict:
    """The driver -> wheel table, and what fits this machine's driver."""
    b = build_info()
    driver = 0
    if b.get("extension") and b.get("cuda"):
        driver = _ext.ext.cuda_probe()[3]
    elif torch.cuda.is_available():
        driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: 0)()
    return {"table": [{"driver": d, "wheel": w, "kernels": k} for d, w, k in _backends.WHEEL_FOR_DRIVER],
            "here": _backends.wheel_advice(b.get("cuda_version") if b.get("cuda") else None, driver)}


def format_info(report: dict) -> str:
    b = report["build"]
    lines = [f"fastattr {report['version']}  (python {report['python']}, torch {report['torch']}, torch CUDA {report['torch_cuda']})"]
    if not b.get("extension"):
        lines.append(f"build: extension missing: {b.get('error')}")
    elif b["cuda"]:
        lines.append(f"build: CUDA {b['cuda_version']}, archs {b['cuda_archs']}, OpenMP {b['openmp']}, {b['compiler']}")
    else:
        lines.append(f"build: no CUDA kernels (CPU only), OpenMP {b['openmp']}, {b['compiler']}")
    lines.append("backends:")
    for name, st in report["backends"].items():
        mark = "yes" if st["available"] else "no "
        lines.append(f"  {name:<7} {mark}  {st['reason']}")
    if report.get("ops"):
        lines.append("ops (backend: dtypes, layouts):")
        for name, impls in report["ops"].items():
            parts = [f"{b}: {i['dtypes']}, {'+'.join(i['layouts'])}" for b, i in impls.items()]
            lines.append(f"  {name:<27} " + "; ".join(parts))
    if report.get("gpu_defaults"):
        lines.append("default on CUDA tensors (why):")
        for name, d in report["gpu_defaults"].items():
            lines.append(f"  {name:<27} {d['backend']:<7} ({d['why']})")
    if report.get("wheels"):
        lines.append("wheels by NVIDIA driver:")
        for row in report["wheels"]["table"]:
            lines.append(f"  {row['driver']:<27} {row['wheel']:<14} {row['kernels']}")
        lines.append(f"  here: {report['wheels']['here']}")
    return "\n".join(lines)
