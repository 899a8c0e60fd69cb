"""pytest setup for the benchmark suite (run as ``pytest benchmarks/ ...``; the main ``pytest`` run
never collects it: pyproject's testpaths is ``tests``).

- Collects ``bench_*.py`` files (their test functions are ``test_*`` as usual).
- ``roofline``: the device's measured copy bandwidth and matmul rate, once per session; also
  written into the JSON's ``machine_info["fastattr"]``.
- ``measure``: ``benchutil.run_case`` bound to this test's ``benchmark`` and the roofline.
- Records every benchmark (or whole file) that was skipped or failed, with the reason, in the JSON
  (``output_json["fastattr"]["not_run"]``), so the report can say why a column is missing.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import benchutil  # noqa: E402

_SESSION: dict = {"roofline": None, "not_run": [], "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself whatever their name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config):
    return (f"fastattr benchmarks: tier {benchutil.TIER} (FASTATTR_BENCH_TIER), device {benchutil.DEVICE} "
            f"({benchutil.device_name()})")  # fmt: skip


@pytest.fixture(scope="session")
def roofline() -> dict:
    if _SESSION["roofline"] is None:
        _SESSION["roofline"] = benchutil.measure_roofline(benchutil.DEVICE)
    return _SESSION["roofline"]


@pytest.fixture
def measure(benchmark, roofline):
    """``measure(fn, op=..., case=..., impl=..., size=..., size_label=..., ...)``: see benchutil.run_case."""

    def _measure(fn, **kwargs):
        return benchutil.run_case(benchmark, fn, roofline=roofline, **kwargs)

    return _measure


@pytest.fixture
def bench_device() -> torch.device:
    return benchutil.DEVICE


def pytest_runtest_logreport(report):
    # A skip is reported in the setup phase (marks) or the call phase (pytest.skip inside the test).
    if report.skipped or report.failed:
        reason = report.longrepr
        if isinstance(reason, tuple):  # (file, line, "Skipped: why")
            reason = reason[2]
        text = str(getattr(report, "longreprtext", "") or reason or "")
        if report.failed:
            text = text.strip().splitlines()[-1] if text.strip() else "failed"
        _SESSION["not_run"].append({
            "nodeid": report.nodeid, "outcome": "skipped" if report.skipped else "failed",
            "when": report.when, "reason": str(reason if report.skipped else text)[:500],
        })  # fmt: skip


def pytest_collectreport(report):
    # A whole file skipped at import (e.g. pytest.importorskip("circuit_tracer") at module level).
    if report.skipped or report.failed:
        reason = report.longrepr
        if isinstance(reason, tuple):
            reason = reason[2]
        text = str(reason or "")
        _SESSION["not_run"].append({
            "nodeid": report.nodeid or "(collection)", "outcome": "skipped" if report.skipped else "failed",
            "when": "collect", "reason": (text if report.skipped else text.strip().splitlines()[-1] if text.strip() else "failed")[:500],
        })  # fmt: skip


def pytest_benchmark_update_machine_info(config, machine_info):
    import fastattr

    machine_info["fastattr"] = {
        "version": fastattr.__version__,
        "tier": benchutil.TIER,
        "device": str(benchutil.DEVICE),
        "device_name": benchutil.device_name(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        # CPU timings mean little on a loaded machine: keep the load beside them.
        "loadavg_start": _SESSION["loadavg_start"],
        "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "roofline": _SESSION["roofline"],
        "backends": {n: {"available": ok, "reason": why} for n, (ok, why) in fastattr._runtime.backends.backend_status().items()},
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastattr"] = {"tier": benchutil.TIER, "not_run": _SESSION["not_run"]}
