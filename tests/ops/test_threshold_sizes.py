"""find_threshold at sizes where the rounding of circuit-tracer's float32 total decides the answer,
and the radix sort of the values that resolves it.

No circuit-tracer needed: fastattr.reference is its find_threshold (tests/ops/test_reference.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastattr
from fastattr import reference
from fastattr.ops import threshold

from helpers import backend_device, backend_params, interpreted


def _exact_total_answer(x: torch.Tensor, t: float) -> float:
    """circuit-tracer's rule with the total taken as the exactly rounded sum (by sorting, here only)."""
    total = np.float32(float(x.double().sum()))
    ordered = torch.sort(x, descending=True).values
    cum = torch.cumsum(ordered, 0) / torch.tensor(total)
    idx = min(int(torch.searchsorted(cum, t)), x.numel() - 1)
    return ordered[idx].item()


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] in ("cuda", "triton")])
def test_above_the_sort_limit_no_sort_runs(backend, monkeypatch):
    """Above torch.sort's element limit (2^31 - 1 on CUDA) circuit-tracer has no answer; fastattr
    resolves an ambiguous total with further histogram passes and never sorts."""
    n = 20_000 if interpreted(backend) else 1_000_000
    dev = backend_device(backend)
    monkeypatch.setattr(threshold, "_sort_limit", lambda device: 0)

    def no_sort(*args, **kwargs):
        raise AssertionError("find_threshold sorted")

    stats = threshold.threshold_stats()
    before = stats.exact_total
    checked = 0
    for seed in range(3):
        x = torch.rand(n, generator=torch.Generator().manual_seed(seed)) ** 4
        for t in (0.5, 0.8, 0.98):
            want_ct = reference.find_threshold(x, t).item()
            want_exact = _exact_total_answer(x, t)
            with monkeypatch.context() as m:
                m.setattr(reference, "find_threshold", no_sort)
                m.setattr(torch, "sort", no_sort)
                got = fastattr.find_threshold(x.to(dev), t, backend=backend)
            assert got.item() == want_exact, (seed, t)
            checked += got.item() == want_ct
    assert stats.exact_total > before  # the ambiguous path ran
    assert checked >= 6  # and mostly agrees with the sort it replaces


def _distributions(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sparse = torch.zeros(n)
    k = n // 20
    sparse[torch.randperm(n, generator=g)[:k]] = torch.rand(k, generator=g) ** 2
    return {
        "rand4": torch.rand(n, generator=g) ** 4,
        "lognormal": torch.exp(torch.randn(n, generator=g) * 3),
        "ties": torch.randint(0, 50, (n,), generator=g).float() / 7,
        "sparse": sparse,  # mostly zeros, as the edge scores of a pruned graph
    }


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] != "torch"])  # torch: the sort
def test_large_inputs_stay_exact_without_torch_sort(backend, monkeypatch):
    """circuit-tracer's answer at every size, and torch.sort never runs: where torch.sum's rounding of
    the sorted total decides, the select hands over to fastattr's radix sort of the values."""
    sizes = [20_000] if interpreted(backend) else [100_000, 1_000_000]
    dev = backend_device(backend)

    def no_sort(*args, **kwargs):
        raise AssertionError("find_threshold called torch.sort")

    stats = threshold.threshold_stats()
    before = stats.value_sorts
    for n in sizes:
        for name, x in _distributions(n, seed=n + 7).items():
            x = x.to(dev)
            for t in (0.5, 0.8, 0.98, 1.0):
                want = reference.find_threshold(x, t)
                with monkeypatch.context() as m:
                    m.setattr(torch, "sort", no_sort)
                    got = fastattr.find_threshold(x, t, backend=backend)
                assert torch.equal(got, want), (n, name, t, got.item(), want.item())
    assert stats.value_sorts > before  # the hand-over ran (it does on most calls at these sizes)


def _sort_cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [
        torch.tensor([0.7]),
        torch.zeros(7),
        torch.tensor([-0.0, 0.0, 1.0, -0.0, 2.0]),
        torch.tensor([5e-45, 1e-45, 0.0, 3.4e38, 1.0, 1e-38]),  # subnormals and the largest floats
        torch.full((1000,), 0.25),  # one key: every pass skipped
        torch.randint(0, 4, (4097,), generator=g).float(),
        torch.rand(12_345, generator=g) ** 8,
        torch.exp(torch.randn(100_003, generator=g) * 10).clamp(max=3e38),
        torch.rand(3001, generator=g).mul(2**-10).add(1.0),  # one exponent: the top digit skipped
        torch.rand(50_001, generator=g).pow(3).mul(torch.rand(50_001, generator=g) < 0.1),  # mostly zeros
        torch.tensor([0.0, 3.0, -0.0, 0.0, 1.0, -0.0, 0.0]),  # zeros of both signs, the majority
    ]


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_descending_values_equal_torch_sort(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU: the CUDA radix sort runs in the device check")
    if device == "cuda" and not hasattr(threshold._C, "sort_descending_cuda"):
        pytest.skip("the extension was built without CUDA kernels")
    for x in _sort_cases():
        x = x.to(device)
        got = threshold.descending_values(x)
        assert got.dtype == x.dtype and got.device == x.device and got.shape == x.shape
        assert torch.equal(got, torch.sort(x, descending=True).values), x[:8]
        assert threshold.threshold_stats().torch_sorts == 0


def test_descending_values_split_over_threads():
    """From 2^24 values the CPU sort splits its passes over threads; the order is the same."""
    n = (1 << 24) + 5
    x = torch.rand(n, generator=torch.Generator().manual_seed(5)) ** 3
    got = threshold.descending_values(x).numpy()
    want = np.sort(x.numpy())[::-1]
    assert np.array_equal(got, want)
    x[torch.rand(n, generator=torch.Generator().manual_seed(6)) < 0.7] = 0.0  # the compacting path
    got = threshold.descending_values(x).numpy()
    assert np.array_equal(got, np.sort(x.numpy())[::-1])
