"""The automatic GPU backend by evidence (_runtime/evidence.py): triton until a committed device
report measured the card; a report's default counts only where its self-test cell is ok."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import fastattr
from fastattr._runtime import backends as _backends
from fastattr._runtime import evidence as _evidence

CARD = "NVIDIA Fake H100"


def _report(path, *, cell: str = "ok", card: str = CARD, backend: str = "cuda") -> None:
    selftest = {"ok": cell == "ok", "table": {"contract": {backend: {"status": cell, "cases": 9, "max_error": 1e-7},
                                                           "triton": {"status": "ok"}}}}
    path.write_text(json.dumps({"card": card, "cc": "90", "driver": "CUDA 13.0", "fastattr_commit": "abc1234",
                                "selftest": selftest,
                                "defaults": {"contract": {"backend": backend, "why": "1.8x faster than triton, bf16 B=256"}}}))


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTATTR_RESULTS_DIR", str(tmp_path))
    _evidence.clear_cache()
    yield tmp_path
    _evidence.clear_cache()


@pytest.fixture
def all_available(monkeypatch):
    """Every backend available and the tensors on CARD, as on a GPU machine (select() reads no tensor)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_backends, "backend_status", lambda: {b: (True, "fake") for b in _backends.BACKENDS})
    monkeypatch.setattr(_backends, "_card", lambda device: CARD)


def test_without_a_report_the_most_executed_backend_leads(results, all_available):
    order, why = _backends.OPS["contract"].gpu_order(CARD)
    assert order == ("triton", "cuda", "torch") and "Triton interpreter" in why
    assert _backends.OPS["contract"].select(torch.device("cuda"), dtype=torch.bfloat16).backend == "triton"
    # float64: triton has no fp64 kernel, so the next by evidence (cuda) runs.
    assert _backends.OPS["contract"].select(torch.device("cuda"), dtype=torch.float64).backend == "cuda"
    d = fastattr.info(print_report=False)["gpu_defaults"]
    assert d["contract"]["backend"] == "triton" and "interpreter" in d["contract"]["why"]
    assert d["normalize_matrix"]["backend"] == "torch"  # no GPU kernel: the reference, and it says so


def test_a_report_with_an_ok_cell_makes_cuda_the_default(results, all_available):
    _report(results / "fake-h100-2026-12-07.json")
    (results / "notes.json").write_text("[1, 2]")  # not a report: skipped
    order, why = _backends.OPS["contract"].gpu_order(CARD)
    assert order[0] == "cuda" and "measured on NVIDIA Fake H100 (fake-h100-2026-12-07.json)" in why and "1.8x" in why
    assert _backends.OPS["contract"].select(torch.device("cuda"), dtype=torch.float32).backend == "cuda"
    # Other ops and other cards keep the evidence order.
    assert _backends.OPS["find_threshold"].gpu_order(CARD)[0][0] == "triton"
    assert _backends.OPS["contract"].gpu_order("NVIDIA A100-SXM4-40GB")[0][0] == "triton"


@pytest.mark.parametrize("cell", ["mismatch", "error", "n/a"])
def test_a_report_whose_cell_is_not_ok_is_ignored(results, all_available, caplog, cell):
    _report(results / "fake-h100-2026-12-07.json", cell=cell)
    with caplog.at_level(logging.INFO, logger="fastattr"):
        order, _ = _backends.OPS["contract"].gpu_order(CARD)
    assert order[0] == "triton"
    assert _backends.OPS["contract"].select(torch.device("cuda"), dtype=torch.float32).backend == "triton"
    assert "self-test cell is not ok" in caplog.text


def test_unknown_backends_and_broken_files_are_not_defaults(results, caplog):
    _report(results / "a.json", backend="cpu")  # not a GPU backend
    (results / "b.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="fastattr"):
        assert _evidence.measured_defaults(CARD) == {}
    assert "b.json is unreadable" in caplog.text
