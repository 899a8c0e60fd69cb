"""find_threshold by radix select: exactly circuit-tracer's sort + cumsum + searchsorted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastattr
from fastattr import reference
from fastattr._runtime import ext as _ext
from fastattr.ops import threshold

from helpers import backend_device, backend_params, interpreted

ctg = pytest.importorskip("circuit_tracer.graph", reason="circuit-tracer is not installed")

THRESHOLDS = [0.0, 0.5, 0.8, 0.98, 1.0]


def _distributions(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sparse = torch.zeros(n)
    k = max(1, n // 10)
    sparse[torch.randperm(n, generator=g)[:k]] = torch.rand(k, generator=g)
    return {
        "uniform": torch.rand(n, generator=g),
        "heavy": torch.rand(n, generator=g) ** 8,
        "lognormal": torch.exp(torch.randn(n, generator=g) * 4),
        "ties": torch.randint(0, 4, (n,), generator=g).float(),
        "sparse": sparse,
        "tiny": torch.rand(n, generator=g) * 1e-30,  # subnormal-adjacent magnitudes
    }


def _check_equal(scores: torch.Tensor, t: float, backend: str) -> None:
    got = fastattr.find_threshold(scores, t, backend=backend)
    want = ctg.find_threshold(scores, t)
    assert got.shape == () and got.dtype == scores.dtype and got.device == scores.device
    assert torch.equal(got, want), f"t={t}: got {got.item()!r}, circuit-tracer {want.item()!r}"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_circuit_tracer(backend, seed):
    n = 150 if interpreted(backend) else 3000 + 617 * seed
    dev = backend_device(backend)
    for name, x in _distributions(n, seed).items():
        for t in THRESHOLDS + [0.3333]:
            _check_equal(x.to(dev), t, backend)


@pytest.mark.parametrize("backend", backend_params())
def test_edge_cases(backend):
    dev = backend_device(backend)
    cases = [
        torch.tensor([0.7]),
        torch.tensor([0.0]),
        torch.zeros(9),  # all zero: circuit-tracer divides 0 by 0 and clamps: 0
        torch.tensor([1.0, 1.0, 1.0, 1.0]),  # all tied
        torch.tensor([3.0, 0.0, 0.0, 1.0, 1.0, 2.0]),
        torch.tensor([1e30, 1.0, 1e-30]),
        torch.tensor([5e-45, 1e-45, 0.0]),  # subnormals
        torch.tensor([-0.0, 0.0, 1.0]),
        # finite scores whose float32 total is inf: circuit-tracer's ratios are 0 then NaN
        torch.tensor([3.0e38, 2.0e38, 1.0e38]),
        torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 1e37,
        torch.tensor([3.0e38, 1e-3, 2.0e38, 0.0]),
    ]
    for x in cases:
        for t in THRESHOLDS + [1e-9, 0.999999]:
            _check_equal(x.to(dev), t, backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_raise(backend, bad):
    x = torch.rand(20)
    x[3] = bad
    with pytest.raises(ValueError, match="scores: expected finite values"):
        fastattr.find_threshold(x.to(backend_device(backend)), 0.8, backend=backend)


def test_argument_errors():
    with pytest.raises(ValueError, match="scores: expected a non-empty tensor"):
        fastattr.find_threshold(torch.zeros(0), 0.5)
    with pytest.raises(ValueError, match=r"scores: expected a 1-D tensor, got shape \(2, 2\)"):
        fastattr.find_threshold(torch.rand(2, 2), 0.5)
    with pytest.raises(TypeError, match="scores: expected a floating-point tensor, got int64"):
        fastattr.find_threshold(torch.arange(4), 0.5)
    with pytest.raises(ValueError, match="threshold: expected a finite number, got nan"):
        fastattr.find_threshold(torch.rand(4), float("nan"))
    with pytest.raises(TypeError, match="threshold: expected a float, got str"):
        fastattr.find_threshold(torch.rand(4), "0.5")
    with pytest.raises(TypeError, match="scores: the cpu backend expects dtype float32, got float64"):
        fastattr.find_threshold(torch.rand(4, dtype=torch.float64), 0.5, backend="cpu")
    with pytest.raises(ValueError, match="threshold: expected a finite number"):
        _ext.ext.select_threshold_cpu(scores=torch.rand(4).data_ptr(), scores_dtype=0, n=4, t=float("inf"), rel_s=0.0,
                                      dc=0.0, s_fixed=0.0)
    with pytest.raises(ValueError, match="scores: expected a non-empty tensor, got 0 elements"):
        _ext.ext.select_threshold_cpu(scores=0, scores_dtype=0, n=0, t=0.5, rel_s=0.0, dc=0.0, s_fixed=0.0)
    with pytest.raises(ValueError, match="n_buckets: expected 2048 .level 1., got 512"):
        z = np.zeros(2048)
        _ext.ext.select_pick_bucket(count=z.ctypes.data, sums=z.ctypes.data, level=1, n_buckets=512, base=0.0,
                                    s_lo=1.0, s_hi=1.0, dc=0.0, t=0.5, must_cross=True)


def test_negative_and_other_dtypes_use_the_exact_reference(caplog):
    x = torch.randn(500, generator=torch.Generator().manual_seed(3))
    with caplog.at_level("INFO", logger="fastattr"):
        got = fastattr.find_threshold(x, 0.8, backend="cpu")
    assert torch.equal(got, ctg.find_threshold(x, 0.8))
    assert "negative scores" in caplog.text
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        y = torch.rand(300, generator=torch.Generator().manual_seed(4)).to(dtype)
        assert torch.equal(fastattr.find_threshold(y, 0.8), ctg.find_threshold(y, 0.8))


def test_rounding_facts_the_emulation_relies_on():
    """The facts about torch this module reproduces (checked, so a torch change shows up here)."""
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) ** 4
    # float32 cumsum on the CPU: double accumulation, each prefix rounded to float32.
    assert torch.equal(torch.cumsum(x, 0), torch.from_numpy(np.cumsum(x.double().numpy())).float())
    # searchsorted compares a Python float in float32: fl32(0.79999996) == 0.79999995 counts as >=.
    c = torch.tensor([0.79999995232, 0.9])
    assert int(torch.searchsorted(c, 0.79999996)) == 0
    # The all-zero case: NaN fractions, index len, clamped to the last element.
    z = torch.zeros(5)
    assert int(torch.searchsorted(torch.cumsum(z, 0) / torch.sum(z), 0.5)) == 5


def _numpy_hist_pass(x: np.ndarray):
    """A host histogram with the device kernels' contract, to drive radix_select without a device."""
    bits = x.view(np.uint32)

    def hist_pass(level, prefix):
        shift, nb = threshold.SELECT_SHIFT[level], 1 << threshold.SELECT_BITS[level]
        up = shift + threshold.SELECT_BITS[level]
        sel = (x > 0) & ((bits >> up) == prefix) if up < 32 else (x > 0)
        b = (bits[sel] >> shift) & (nb - 1)
        count = np.bincount(b, minlength=nb).astype(np.int64)
        sums = np.zeros(nb)
        np.add.at(sums, b, x[sel].astype(np.float64))
        nz = x[x > 0]
        if level:
            return threshold.Hist(count, sums)
        return threshold.Hist(count, sums, int(nz.size), float(nz.min()) if nz.size else 0.0, bool((x < 0).any()))

    return hist_pass


def test_python_driver_matches_the_reference():
    """The level loop of the cuda/triton paths, driven by a numpy histogram here."""
    for seed in range(3):
        for name, xt in _distributions(2000, 10 + seed).items():
            x = xt.numpy()
            for t in THRESHOLDS:
                sel = threshold.radix_select(_numpy_hist_pass(x), x.size, t, **threshold.banded_total(x.size, xt.device))
                want = reference.find_threshold(xt, t)
                if sel.status == threshold.AMBIGUOUS:
                    continue  # resolved by sorting in find_threshold
                value = 0.0 if sel.status == threshold.ALL_ZERO else sel.value
                assert np.float32(value) == want.item(), (name, t)


def test_significand_sums_scale_to_the_exact_bucket_sums():
    """The deterministic histograms' int64 significand sums, scaled on the host, equal the exactly
    rounded bucket sums at every level (denormals, and the smallest normal exponent, included)."""
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.rand(3000, generator=g) ** 6, torch.tensor([1e-45, 3e-44, 1.17549435e-38, 2e-38, 3e38])])
    bits = x.numpy().view(np.uint32)
    prefix = 0
    for level in range(len(threshold.SELECT_BITS)):
        shift, nbits = threshold.SELECT_SHIFT[level], threshold.SELECT_BITS[level]
        up = shift + nbits
        sel = (bits != 0) & (((bits >> up) == prefix) if up < 32 else True)
        b = (bits[sel] >> shift) & ((1 << nbits) - 1)
        exponent = bits[sel] >> 23
        mant = bits[sel] & 0x7FFFFF
        sig = np.where(exponent != 0, mant | 0x800000, mant).astype(np.int64)
        isum = np.zeros(1 << nbits, dtype=np.int64)
        np.add.at(isum, b, sig)
        got = threshold.significand_sums(isum, level, prefix)
        for bucket in np.unique(b):
            vals = x.numpy()[sel][b == bucket].astype(np.float64)
            assert got[bucket] == float(sum(map(__import__("fractions").Fraction, vals))), (level, bucket)
        prefix = (prefix << nbits) | int(np.bincount(b).argmax())


def test_fixed_total_variant_matches_its_definition():
    """The fused edge variant's rule: the total is the exactly rounded double sum."""
    for seed in range(4):
        for name, x in _distributions(4000, 20 + seed).items():
            for t in THRESHOLDS:
                total = float(x.double().sum())
                value, keep_all = threshold.find_threshold_fixed_total(x, t, total, backend="cpu")
                assert fastattr.last_backend("find_threshold_fixed_total") == "cpu"
                if np.float32(total) == 0:
                    assert keep_all
                    continue
                for backend in ("torch",):
                    assert threshold.find_threshold_fixed_total(x, t, total, backend=backend) == (value, keep_all)
                ordered = torch.sort(x, descending=True).values
                cum = torch.cumsum(ordered, 0) / torch.tensor(np.float32(total))
                idx = min(int(torch.searchsorted(cum, t)), x.numel() - 1)
                assert value == ordered[idx].item(), (name, t)
