"""Shared test setup.

Without a GPU, Triton kernels run under the numpy interpreter; that must be decided before
triton is first imported, hence at the top of conftest.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastattr import _backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backends_for(device: torch.device) -> list[str]:
    """Every backend that can run on ``device`` here, the reference included."""
    status = _backends.backend_status()
    names = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "triton", "torch")
    return [n for n in names if status[n][0] and _backends._device_ok(n, device) is None]


def all_backend_params(device: torch.device = DEVICE) -> list:
    """Parametrise over every backend, skipping (with the reason) those that cannot run here."""
    status = _backends.backend_status()
    params = []
    for name in _backends.BACKENDS:
        ok, why = status[name]
        bad = _backends._device_ok(name, device) if ok else None
        marks = []
        if not ok:
            marks.append(pytest.mark.skip(reason=f"{name} backend unavailable: {why}"))
        elif bad:
            marks.append(pytest.mark.skip(reason=bad))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _clear_forced_backend(monkeypatch):
    # A developer's FASTATTR_BACKEND must not leak into tests that check automatic choices.
    monkeypatch.delenv("FASTATTR_BACKEND", raising=False)
