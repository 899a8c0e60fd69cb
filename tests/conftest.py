"""Fixtures and hooks for every test; what test files share otherwise lives in helpers.py.

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

from helpers import DEVICE  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _clear_forced_backend(monkeypatch):
    # A developer's FASTATTR_BACKEND must not leak into tests that check automatic choices.
    monkeypatch.delenv("FASTATTR_BACKEND", raising=False)
