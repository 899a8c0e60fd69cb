"""Every op runs on its tensors' device (made current) and refuses tensors on different devices.

The CUDA side is checked through the guard's own calls (no GPU here): the device an op enters is
recorded, and mixed devices are built from CPU and meta tensors.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastattr
from fastattr._runtime import device as _device

from helpers import random_graph


@pytest.fixture
def entered(monkeypatch):
    """Records the devices ops make current."""
    seen: list[torch.device] = []
    real = _device.current

    @contextlib.contextmanager
    def recording(device, what="op"):
        seen.append(device)
        with real(device, what):
            yield

    monkeypatch.setattr(_device, "current", recording)
    return seen


def _problem():
    g = torch.Generator().manual_seed(0)
    A = torch.tril(torch.rand(12, 12, generator=g), -1)
    w = torch.zeros(12)
    w[-2:] = 0.5
    return A, w


def test_every_op_enters_its_tensors_device(entered):
    A, w = _problem()
    cpu = torch.device("cpu")
    calls = {
        "compute_influence": lambda: fastattr.compute_influence(A, w),
        "compute_node_influence": lambda: fastattr.compute_node_influence(A, w),
        "compute_edge_influence": lambda: fastattr.compute_edge_influence(A, w),
        "find_threshold": lambda: fastattr.find_threshold(torch.rand(50), 0.8),
        "topk_edges": lambda: fastattr.topk_edges(A, 3),
        "prune_graph": lambda: fastattr.prune_graph(random_graph(seed=0)),
        "contract": lambda: fastattr.contract(
            torch.rand(2, 3, 8), torch.rand(4, 8), torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 3]), torch.zeros(4, 2)
        ),
    }
    for name, call in calls.items():
        entered.clear()
        call()
        assert cpu in entered, f"{name} did not enter its tensors' device"


def test_cuda_device_is_made_current(monkeypatch):
    """A guarded op with tensors on cuda:1 runs with cuda:1 current (torch.cuda.device entered)."""
    state = {"current": None}

    @contextlib.contextmanager
    def fake_cuda_device(device):
        state["current"] = torch.device(device)
        try:
            yield
        finally:
            state["current"] = None

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)

    class OnCuda1:  # stands for a tensor (or SparseEdges) on cuda:1
        device = torch.device("cuda", 1)

    @_device.guard("x", "y")
    def op(x, y, *, scale=1.0):
        return state["current"]

    assert op(OnCuda1(), OnCuda1()) == torch.device("cuda", 1)
    assert state["current"] is None  # restored after the call

    class OnCuda0:
        device = torch.device("cuda", 0)

    with pytest.raises(ValueError, match=r"y: expected a tensor on cuda:1 \(the device of x\), got one on cuda:0"):
        op(OnCuda1(), OnCuda0())


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda A, w, m: fastattr.compute_influence(A, w.to(m)), "logit_weights"),
        (lambda A, w, m: fastattr.compute_node_influence(A, w.to(m)), "logit_weights"),
        (lambda A, w, m: fastattr.compute_edge_influence(A.to(m), w), "logit_weights"),
        (lambda A, w, m: fastattr.compute_partial_influences(A, w[-2:].to(m), torch.arange(12)), "logit_p"),
        (lambda A, w, m: fastattr.contract(
            torch.rand(2, 3, 8), torch.rand(4, 8), torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 3]),
            torch.zeros(4, 2, device=m)), "out"),
    ],
    ids=["compute_influence", "compute_node_influence", "compute_edge_influence", "compute_partial_influences", "contract"],
)
def test_mixed_devices_raise_naming_the_argument(call, arg):
    A, w = _problem()
    with pytest.raises(ValueError, match=rf"{arg}: expected a tensor"):
        call(A, w, torch.device("meta"))


def test_sync_check_synchronises_after_each_op(monkeypatch):
    """FASTATTR_SYNC_CHECK=1 waits for the op's device and names the op when a kernel failed."""
    synced = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())

    def failing_sync(device):
        synced.append(device)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", failing_sync)

    class OnCuda1:
        device = torch.device("cuda", 1)

    @_device.guard("x")
    def some_op(x):
        return 1

    monkeypatch.delenv("FASTATTR_SYNC_CHECK", raising=False)
    assert some_op(OnCuda1()) == 1 and synced == []
    monkeypatch.setenv("FASTATTR_SYNC_CHECK", "1")
    with pytest.raises(RuntimeError, match=r"some_op: a kernel failed on cuda:1 \(FASTATTR_SYNC_CHECK=1\)"):
        some_op(OnCuda1())
    assert synced == [torch.device("cuda", 1)]
