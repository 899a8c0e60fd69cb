"""The benchmark suite's plumbing: one benchmark file at the smoke tier through pytest-benchmark,
then report.py on its JSON. Nothing here is timed or compared: speed lives in benchmarks/ only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_smoke(tmp_path: Path, *args: str) -> tuple[dict, Path]:
    """Run a benchmark file at the smoke tier; (its environment, its JSON)."""
    env = {**os.environ, "FASTATTR_BENCH_TIER": "smoke"}
    # This test session's conftest turns on the Triton interpreter without a GPU; the benchmarks
    # must see the machine as it is, and no developer's forced backend.
    for name in ("TRITON_INTERPRET", "FASTATTR_BACKEND"):
        env.pop(name, None)
    bench_json = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args,
                          f"--benchmark-json={bench_json}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return env, bench_json


def test_contraction_smoke_benchmark_and_report(tmp_path):
    pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install '.[bench]')")
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install '.[bench]')")
    env, bench_json = _run_smoke(tmp_path, "benchmarks/bench_contraction.py")

    data = json.loads(bench_json.read_text())
    rows = [b["extra_info"] for b in data["benchmarks"]]
    impls = {r["impl"] for r in rows}
    assert "circuit-tracer" in impls and len(impls) >= 2, impls
    for r in rows:
        assert r["op"] == "contraction" and r["tier"] == "smoke"
        assert r["median_s"] > 0 and r["peak_mem_bytes"] >= 0 and r["flops"] > 0 and r["gbps"] > 0
    assert data["machine_info"]["fastattr"]["roofline"]["copy_gbps"] > 0
    assert "not_run" in data["fastattr"]

    out = tmp_path / "report"
    rep = subprocess.run(
        [sys.executable, "benchmarks/report.py", str(bench_json), "--out", str(out), "--summary"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rep.returncode == 0, rep.stdout + rep.stderr
    md = (out / "report.md").read_text()
    assert "## contraction" in md and "circuit-tracer" in md
    for png in ("speedup.png", "memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "contraction" in rep.stdout  # the --summary lines


def test_engine_smoke_benchmark_reports_the_floor(tmp_path):
    """bench_engine's linear rows carry the workload's floor (benchmarks/floor.py), and the report
    puts every row of the case against it."""
    pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install '.[bench]')")
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install '.[bench]')")
    env, bench_json = _run_smoke(tmp_path, "benchmarks/bench_engine.py", "-k", "tiny-plt")
    rows = [b["extra_info"] for b in json.loads(bench_json.read_text())["benchmarks"]]
    linear = [r for r in rows if r["impl"] == "linear"]
    assert len(linear) == 1
    parts = linear[0]["floor_parts"]
    assert linear[0]["floor_s"] > 0 and linear[0]["floor_rates"] == "measured"
    for key in ("attention_projections", "contraction", "forward", "edge_rows", "partial_influences", "adjacency"):
        assert parts[key] > 0, key
    assert linear[0]["floor_flops"] == pytest.approx(sum(v for k, v in parts.items() if k not in ("edge_rows", "partial_influences", "adjacency")))
    out = tmp_path / "report"
    rep = subprocess.run([sys.executable, "benchmarks/report.py", str(bench_json), "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert rep.returncode == 0, rep.stdout + rep.stderr
    md = (out / "report.md").read_text()
    assert "time / floor" in md
    table = [line for line in md.splitlines() if line.startswith("| tiny-plt")]
    assert len(table) == 3 and all(line.rstrip(" |").endswith("x") for line in table), table
    assert (out / "floor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
