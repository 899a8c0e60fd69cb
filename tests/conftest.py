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


# ------------------------------------------------------------------ circuit-tracer model fixtures

_MODELS: dict = {}


def tracer_model(backend: str = "transformerlens", transcoder: str = "plt", **kwargs):
    """A cached random-weight circuit-tracer ReplacementModel (see fastattr.synthetic)."""
    pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed (pip install '.[tracer]')")
    if backend == "nnsight":
        pytest.importorskip("nnsight", reason="nnsight is not installed (pip install nnsight==0.6.1)")
    from fastattr import synthetic

    key = (backend, transcoder, tuple(sorted(kwargs.items())))
    if key not in _MODELS:
        params = {"n_layers": 2, "d_model": 64, "d_transcoder": 128, "seed": 0} | kwargs
        _MODELS[key] = synthetic.make_replacement_model(backend=backend, transcoder=transcoder, **params)
    return _MODELS[key]


def tracer_prompt(n_tokens: int = 10, seed: int = 1) -> str:
    from fastattr import synthetic

    return synthetic.random_prompt(n_tokens, seed=seed)


MODEL_KINDS = [
    pytest.param("transformerlens", "plt", id="tl-plt"),
    pytest.param("transformerlens", "clt", id="tl-clt"),
    pytest.param("nnsight", "plt", id="nnsight-plt"),
    pytest.param("nnsight", "clt", id="nnsight-clt"),
]
