"""``python -m fastattr selftest``: the table and JSON on this machine, and a poisoned backend reported."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

import fastattr
from fastattr import __main__ as cli
from fastattr._runtime import backends as _backends

st = importlib.import_module("fastattr.selftest")  # the package exports the function under this name


def test_command_prints_the_table_and_writes_json(tmp_path):
    path = tmp_path / "selftest.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastattr", "selftest", "--json", str(path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(path.read_text())
    assert report["ok"] is True
    assert set(report["table"]) == set(st.CHECKS)
    for name in ("device", "driver", "torch", "triton", "build_cuda"):
        assert name in report["environment"]
    header = proc.stdout.splitlines()[1].split()
    assert header == ["op", *_backends.BACKENDS]
    for op_name, row in report["table"].items():
        assert op_name in proc.stdout
        for backend, cell in row.items():
            available, why = _backends.backend_status()[backend]
            if not available:
                assert cell == {"status": "n/a", "why": why}
            else:
                assert cell["status"] in ("ok", "n/a"), (op_name, backend, cell)
    assert report["table"]["contract"]["torch"]["status"] == "ok"
    assert report["table"]["contract"]["cpu"]["cases"] > 10


def test_a_poisoned_backend_is_a_mismatch_and_exits_non_zero(monkeypatch, tmp_path, capsys):
    impl = _backends.OPS["topk_edges"].impls["cpu"]

    def poisoned(adjacency, k):
        out = impl.fn(adjacency, k)
        out.values.mul_(1.5)
        return out

    monkeypatch.setitem(_backends.OPS["topk_edges"].impls, "cpu", _backends.Impl("cpu", poisoned, impl.dtypes, impl.layouts))
    path = tmp_path / "r.json"
    rc = cli.main(["selftest", "--backend", "cpu", "--backend", "torch", "--op", "topk_edges", "--op", "find_threshold",
                   "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "MISMATCH" in out and "topk_edges on cpu" in out
    report = json.loads(path.read_text())
    assert report["ok"] is False
    assert report["table"]["topk_edges"]["cpu"]["status"] == "mismatch"
    assert report["table"]["topk_edges"]["torch"]["status"] == "ok"
    assert report["table"]["find_threshold"]["cpu"]["status"] == "ok"


def test_a_crashing_backend_is_an_error(monkeypatch):
    impl = _backends.OPS["find_threshold"].impls["cpu"]

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setitem(_backends.OPS["find_threshold"].impls, "cpu", _backends.Impl("cpu", crash, impl.dtypes, impl.layouts))
    report = fastattr.selftest(backends=["cpu"], ops=["find_threshold"], print_report=False)
    assert report["ok"] is False
    assert report["table"]["find_threshold"]["cpu"] == {"status": "error", "why": "RuntimeError: boom"}


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="selftest\\(ops\\).*'nope'"):
        fastattr.selftest(ops=["nope"], print_report=False)
    with pytest.raises(ValueError, match="selftest\\(backends\\).*'gpu'"):
        fastattr.selftest(backends=["gpu"], print_report=False)
