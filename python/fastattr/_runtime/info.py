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
    return "\n".join(lines)
