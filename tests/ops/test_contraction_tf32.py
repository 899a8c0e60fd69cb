"""The Triton contraction's tensor-core arithmetic: the 3xTF32 split for fp32 inputs, checked in
torch with TF32 operands emulated bit for bit, and through the kernel under the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastattr
from fastattr import reference
from fastattr._runtime.backends import backend_status, triton_interpret

from helpers import DEVICE

TF32_DROPPED_BITS = 13  # fp32 has 23 explicit mantissa bits, TF32 10


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """What a TF32 tensor core reads of an fp32 value: the low 13 mantissa bits dropped."""
    return (x.view(torch.int32) & -(1 << TF32_DROPPED_BITS)).view(torch.float32)


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The kernel's _split_tf32, in torch.
    hi = _tf32(x)
    return hi, x - hi


def _values(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-60, 60, (n,), generator=gen).float())
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.1754944e-38, 3.4e38, -3.4e38, 1e-45, 2.0 ** -126 * 1.5])
    return torch.cat([x, specials])


def test_split_is_exact_and_hi_is_tf32():
    x = _values(100_000, 0)
    hi, lo = _split(x)
    assert torch.equal(hi + lo, x), "hi + lo must give x back exactly"
    assert torch.equal(_tf32(hi), hi), "hi must be representable in TF32 (a tensor core reads it whole)"
    normal = x.abs() >= 2.0 ** -126
    assert (lo[normal].abs() <= x[normal].abs() * 2.0 ** -10).all(), "lo must be below 2^-10 of x"
    assert (lo[~normal].abs() < 2.0 ** -136).all(), "a subnormal x loses at most its low 13 bits to lo"
    assert (hi.abs() <= x.abs()).all() and torch.equal(torch.sign(hi[hi != 0]), torch.sign(x[hi != 0]))


@pytest.mark.parametrize("D", [64, 2304])
def test_three_tf32_products_keep_fp32_accuracy(D):
    """hi*hi + hi*lo + lo*hi with every operand as a TF32 tensor core reads it (lo truncated again),
    against the float64 product: within 1e-5 of the largest entry, where a single TF32 product is not."""
    gen = torch.Generator().manual_seed(D)
    a, b = torch.randn(64, D, generator=gen), torch.randn(D, 64, generator=gen)
    exact = a.double() @ b.double()
    (a_hi, a_lo), (b_hi, b_lo) = _split(a), _split(b)

    def dot(x, y):  # a TF32 MMA: TF32 operands, exact products, fp32 accumulation (here float64)
        return _tf32(x).double() @ _tf32(y).double()

    three = (dot(a_lo, b_hi) + dot(a_hi, b_lo) + dot(a_hi, b_hi)).float().double()
    one = dot(a, b).float().double()
    scale = exact.abs().max()
    assert (three - exact).abs().max() / scale < 1e-6
    assert (one - exact).abs().max() / scale > 1e-5, "a single TF32 product should miss 1e-5 (else the test proves nothing)"


def _triton_ok():
    ok, why = backend_status()["triton"]
    if not ok:
        pytest.skip(f"triton backend unavailable: {why}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [2304, 200])
def test_triton_contraction_against_float64(dtype, D):
    """Gemma-2-2B's d_model and an odd one, many rows per position, repeated rows: the 3xTF32 path
    (fp32) within 1e-5 of the float64 result's largest entry; half precision to its input rounding."""
    _triton_ok()
    if dtype == torch.bfloat16 and triton_interpret():
        pytest.skip("bf16 tl.dot returns wrong values under TRITON_INTERPRET=1; bf16 Triton runs in the GPU check")
    gen = torch.Generator().manual_seed(D)
    B, P, S, R = 40, 3, 150, 90
    grads = (torch.randn(B, P, D, generator=gen) * 3).to(dtype).to(DEVICE)
    vectors = torch.randn(S, D, generator=gen).to(dtype).to(DEVICE)
    positions = torch.randint(0, P, (S,), generator=gen).to(DEVICE)
    rows = torch.randint(0, R, (S,), generator=gen).to(DEVICE)
    exact = torch.zeros(R, B, dtype=torch.float64, device=DEVICE)
    reference.contract(grads.double(), vectors.double(), positions, rows, exact)
    out = torch.zeros(R, B, device=DEVICE)
    fastattr.contract(grads, vectors, positions, rows, out, backend="triton")
    err = (out.double() - exact).abs().max() / exact.abs().max()
    assert err < (1e-5 if dtype == torch.float32 else 1e-3), err


def test_batch_size_does_not_specialise():
    """The last, partial batch of a run must not compile the kernel again. (Checked on the compiled
    JITFunction, in a process without TRITON_INTERPRET, where the kernel is not interpreted.)"""
    pytest.importorskip("triton")
    code = ("from fastattr.triton_kernels import contraction as k\n"
            "p = {q.name: q for q in k._contract_kernel.params}\n"
            "print(p['B'].do_not_specialize, p['stride_or'].do_not_specialize, p['D'].do_not_specialize)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["True", "True", "False"]
