"""Backend selection, forcing, logging and fastattr.info()."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

import fastattr
from fastattr._runtime import backends as _backends
from fastattr._runtime.backends import BackendUnavailableError

from helpers import DEVICE


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


# ------------------------------------------------------------------ use_backend and threads


def _run_in_thread(fn):
    import threading

    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive()
    if "error" in result:
        raise result["error"]
    return result.get("value")


_PROBE = _backends.Op("probe")
for _name in _backends.BACKENDS:
    _PROBE.register(_name)(lambda: None)


def _chosen():
    return _PROBE.select(DEVICE).backend


def test_use_backend_is_per_thread():
    """Two user threads: neither sees the other's block, and exits never pop the other's entry."""
    import threading

    native = "cuda" if DEVICE.type == "cuda" else "cpu"
    a_in, b_in, a_out, b_checked = (threading.Event() for _ in range(4))
    seen = {}

    def thread_a():
        with fastattr.use_backend("torch"):
            a_in.set()
            b_in.wait(30)
            seen["a_inside"] = _chosen()
        a_out.set()
        b_checked.wait(30)
        seen["a_after"] = _chosen()

    def thread_b():
        a_in.wait(30)
        seen["b_before"] = _chosen()  # thread A's block is open
        with fastattr.use_backend("triton" if DEVICE.type == "cpu" else "cuda"):
            b_in.set()
            a_out.wait(30)  # thread A's block closes while B's is open
            seen["b_inside"] = _backends.forced_choice()
        b_checked.set()
        seen["b_after"] = _backends.forced_choice()

    ta, tb = threading.Thread(target=thread_a), threading.Thread(target=thread_b)
    ta.start(), tb.start()
    ta.join(60), tb.join(60)
    assert seen == {
        "b_before": native,
        "a_inside": "torch",
        "b_inside": "triton" if DEVICE.type == "cpu" else "cuda",
        "b_after": None,
        "a_after": native,
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a backend that cannot run here")
def test_unavailable_choice_in_one_thread_does_not_break_another():
    import threading

    entered, done = threading.Event(), threading.Event()

    def hold_cuda():
        with fastattr.use_backend("cuda"):
            entered.set()
            done.wait(60)

    t = threading.Thread(target=hold_cuda)
    t.start()
    try:
        entered.wait(30)
        out = fastattr.contract(*_tiny())  # this thread chose nothing: the automatic backend runs
        ref = fastattr.reference.contract(*_tiny()[:4], torch.zeros_like(out))
        assert fastattr.last_backend("contract") == "cpu" and out.shape == ref.shape
        with pytest.raises(BackendUnavailableError):
            _run_in_thread(lambda: fastattr.contract(*_tiny(), backend="cuda"))
    finally:
        done.set()
        t.join(60)


def test_plan_carries_the_callers_choice_to_other_threads():
    """A plan built inside use_backend() runs on that backend from a thread with no choice of its
    own (as autograd's device threads call the patched hooks), unless that thread chooses."""
    g, v, p, r, out = _tiny()
    native = "cuda" if DEVICE.type == "cuda" else "cpu"
    with fastattr.use_backend("torch"):
        plan = fastattr.ContractionPlan(v, p, r)
    plain = fastattr.ContractionPlan(v, p, r)
    expected = fastattr.reference.contract(g, v, p, r, torch.zeros_like(out))

    res = _run_in_thread(lambda: (plan(g, torch.zeros_like(out)), fastattr.last_backend("contract")))
    assert res[1] == "torch"
    torch.testing.assert_close(res[0], expected)
    assert _run_in_thread(lambda: (plain(g, torch.zeros_like(out)), fastattr.last_backend("contract"))[1]) == native

    def own_choice():
        with fastattr.use_backend(native):
            plan(g, torch.zeros_like(out))
            return fastattr.last_backend("contract")

    assert _run_in_thread(own_choice) == native
    plan(g, torch.zeros_like(out), backend=native)
    assert fastattr.last_backend("contract") == native


def test_backward_hooks_see_the_choice_made_at_forward():
    """The patched hooks build their plans when the forward pass registers them; the choice in
    force there holds in the backward pass, whichever thread autograd runs it on (a device thread
    on GPU; here the backward is started from another thread)."""
    g, v, p, r, out = _tiny()
    ran = []
    with fastattr.use_backend("torch"):
        plan = fastattr.ContractionPlan(v, p, r)

    class Score(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            buf = torch.zeros(3, grad.shape[0], device=grad.device)
            plan(grad, buf)
            ran.append((fastattr.last_backend("contract"), buf))
            return grad

    y = Score.apply(g.clone().requires_grad_(True))
    _run_in_thread(lambda: y.backward(g.clone()))
    assert ran and ran[0][0] == "torch"
    torch.testing.assert_close(ran[0][1], fastattr.reference.contract(g, v, p, r, torch.zeros(3, 2, device=DEVICE)))
