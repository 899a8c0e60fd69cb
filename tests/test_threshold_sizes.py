"""find_threshold at sizes where the rounding of circuit-tracer's float32 total decides the answer.

No circuit-tracer needed: fastattr.reference is its find_threshold (tests/test_reference.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastattr
from fastattr import reference, threshold

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


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] == "cpu"])
@pytest.mark.parametrize("n", [100_000, 1_000_000])
def test_large_inputs_stay_exact(backend, n):
    """Within torch.sort's limit the answer is circuit-tracer's, at every size. The total's
    rounding is not reproducible without the sorted order, so ambiguous cases still sort (counted)."""
    x = torch.rand(n, generator=torch.Generator().manual_seed(n)) ** 4
    for t in (0.5, 0.8, 0.98):
        assert fastattr.find_threshold(x, t, backend=backend).item() == reference.find_threshold(x, t).item()
