"""Backend selection, forcing, logging and fastattr.info()."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

import fastattr
from fastattr import _backends
from fastattr._backends import BackendUnavailableError

from conftest import DEVICE


def _tiny():
    g = torch.randn(2, 3, 4, device=DEVICE)
    v = torch.randn(3, 4, device=DEVICE)
    p = torch.tensor([0, 1, 2], device=DEVICE)
    r = torch.tensor([0, 1, 2], device=DEVICE)
    return g, v, p, r, torch.zeros(3, 2, device=DEVICE)


def test_automatic_choice_is_compiled_and_logged(caplog):
    with caplog.at_level(logging.DEBUG, logger="fastattr"):
        fastattr.contract(*_tiny())
    expected = "cuda" if DEVICE.type == "cuda" else "cpu"
    assert fastattr.last_backend("contract") == expected
    assert f"contract: automatic backend '{expected}'" in caplog.text


def test_use_backend_and_argument_precedence():
    with fastattr.use_backend("torch"):
        fastattr.contract(*_tiny())
        assert fastattr.last_backend("contract") == "torch"
        native = "cuda" if DEVICE.type == "cuda" else "cpu"
        fastattr.contract(*_tiny(), backend=native)
        assert fastattr.last_backend("contract") == native


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTATTR_BACKEND", "torch")
    fastattr.contract(*_tiny())
    assert fastattr.last_backend("contract") == "torch"
    monkeypatch.setenv("FASTATTR_BACKEND", "fortran")
    with pytest.raises(ValueError, match="FASTATTR_BACKEND: expected one of cuda, triton, cpu, torch, got 'fortran'"):
        fastattr.contract(*_tiny())


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="use_backend\\(name\\): expected one of"):
        with fastattr.use_backend("tpu"):
            pass
    with pytest.raises(ValueError, match="backend=: expected one of"):
        fastattr.contract(*_tiny(), backend="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_unavailable_reason_is_given():
    ok, why = _backends.backend_status()["cuda"]
    assert not ok and why
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' \\(from backend=\\) is unavailable: "):
        fastattr.contract(*_tiny(), backend="cuda")


def test_info_reports_build_and_backends(capsys):
    report = fastattr.info()
    text = capsys.readouterr().out
    assert report["version"] == fastattr.__version__
    assert set(report["backends"]) == {"cuda", "triton", "cpu", "torch"}
    for name, st in report["backends"].items():
        assert st["reason"], f"no reason given for backend {name}"
    assert report["build"]["extension"] is True
    assert "build:" in text and "backends:" in text
    if report["build"]["cuda"]:
        assert report["build"]["cuda_archs"]
        assert f"CUDA {report['build']['cuda_version']}" in text


def test_cli_info():
    res = subprocess.run([sys.executable, "-m", "fastattr", "info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "fastattr " in res.stdout and "backends:" in res.stdout and "cpu     yes" in res.stdout


def test_triton_kernels_ship_inside_the_package():
    import importlib.util

    spec = importlib.util.find_spec("fastattr.triton_kernels.contraction")
    assert spec is not None and spec.origin.endswith("contraction.py")
