"""The contraction op against the torch reference, on every backend, with poisoned outputs."""

from __future__ import annotations

import pytest
import torch

import fastattr
from fastattr import ContractionPlan, reference
from fastattr._runtime.backends import BackendUnavailableError, triton_interpret

from helpers import DEVICE, backend_params

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _skip_bf16_triton_interp(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and dtype == torch.bfloat16 and triton_interpret():
        pytest.skip("bf16 tl.dot returns garbage under TRITON_INTERPRET=1; bf16 Triton runs in the GPU suite")


def _case(B, P, D, S, R, *, dtype=torch.float32, seed=0, positions=None, unique=True, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(B, P, D, generator=gen).to(dtype)
    vectors = torch.randn(S, D, generator=gen).to(dtype)
    if positions is None:
        positions = torch.randint(0, P, (S,), generator=gen)
    rows = torch.randperm(R, generator=gen)[:S] if unique else torch.randint(0, R, (S,), generator=gen)
    return grads.to(device), vectors.to(device), positions.to(device), rows.to(device)


def _poisoned_out(R, B, rows, *, layout="rb", dtype=torch.float32, seed=1, device=DEVICE):
    """Random values in the rows the op must update, NaN in every row it must leave alone."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.full((R, B), float("nan"))
    touched = torch.zeros(R, dtype=torch.bool)
    touched[rows.cpu().long()] = True
    out[touched] = torch.randn(int(touched.sum()), B, generator=gen)
    out = out.to(dtype).to(device)
    return (out if layout == "rb" else out.T.contiguous()), touched.to(device)


def _expected(grads, vectors, positions, rows, out, layout):
    expected = out.clone().float()
    reference.contract(grads.float(), vectors.float(), positions, rows, expected, out_layout=layout)
    return expected


def _check(got, expected, touched, layout, dtype):
    rb_got = got if layout == "rb" else got.T
    rb_exp = expected if layout == "rb" else expected.T
    assert torch.isnan(rb_got[~touched]).all(), "the op wrote rows it does not own"
    assert not torch.isnan(rb_got[touched]).any(), "the op left NaN in rows it owns"
    torch.testing.assert_close(rb_got[touched].float(), rb_exp[touched], rtol=TOL[dtype], atol=TOL[dtype] * 10)


SHAPES = {
    "p1": (4, 1, 32, 20, 40),
    "odd_d": (3, 5, 37, 29, 64),
    "s_over_tiles": (5, 3, 48, 150, 200),
    "d_not_pow2_large": (6, 4, 100, 70, 90),
    "b_over_block": (70, 2, 24, 33, 50),
    "single_vector": (2, 3, 16, 1, 5),
}


@pytest.mark.parametrize("backend", backend_params(DEVICE))
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("layout", ["rb", "br"])
def test_matches_reference(backend, shape, layout):
    B, P, D, S, R = SHAPES[shape]
    grads, vectors, positions, rows = _case(B, P, D, S, R, seed=hash(shape) % 1000)
    out, touched = _poisoned_out(R, B, rows, layout=layout)
    expected = _expected(grads, vectors, positions, rows, out, layout)
    fastattr.contract(grads, vectors, positions, rows, out, out_layout=layout, backend=backend)
    assert fastattr.last_backend("contract") == backend
    _check(out, expected, touched, layout, torch.float32)


@pytest.mark.parametrize("backend", backend_params(DEVICE))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("out_dtype", ["fp32", "same"])
def test_half_precision(backend, dtype, out_dtype):
    _skip_bf16_triton_interp(backend, dtype)
    B, P, D, S, R = 5, 4, 40, 45, 60
    grads, vectors, positions, rows = _case(B, P, D, S, R, dtype=dtype, seed=7)
    odt = torch.float32 if out_dtype == "fp32" else dtype
    out, touched = _poisoned_out(R, B, rows, dtype=odt)
    expected = _expected(grads, vectors, positions, rows, out, "rb")
    fastattr.contract(grads, vectors, positions, rows, out, backend=backend)
    # Inputs are rounded to half precision on both sides; tolerances follow the input dtype.
    _check(out, expected, touched, "rb", dtype)


@pytest.mark.parametrize("backend", backend_params(DEVICE))
def test_many_rows_at_one_position(backend):
    B, P, D, S, R = 3, 6, 33, 200, 256
    positions = torch.full((S,), 4)
    grads, vectors, positions, rows = _case(B, P, D, S, R, positions=positions, seed=3)
    out, touched = _poisoned_out(R, B, rows)
    expected = _expected(grads, vectors, positions, rows, out, "rb")
    fastattr.contract(grads, vectors, positions, rows, out, backend=backend)
    _check(out, expected, touched, "rb", torch.float32)


@pytest.mark.parametrize("backend", backend_params(DEVICE))
def test_repeated_rows_accumulate(backend):
    """Cross-layer decoder rows of one feature land in the same output row and must sum."""
    B, P, D, S, R = 4, 5, 24, 90, 12
    grads, vectors, positions, rows = _case(B, P, D, S, R, unique=False, seed=11)
    out, touched = _poisoned_out(R, B, rows)
    expected = _expected(grads, vectors, positions, rows, out, "rb")
    fastattr.contract(grads, vectors, positions, rows, out, backend=backend)
    _check(out, expected, touched, "rb", torch.float32)


@pytest.mark.parametrize("backend", backend_params(DEVICE))
def test_strided_grads(backend):
    B, P, D, S, R = 4, 6, 20, 40, 50
    base = torch.randn(P * 2, B, D + 7, device=DEVICE)
    grads = base[::2, :, 3 : 3 + D].transpose(0, 1)  # (B, P, D), non-contiguous, unit last stride
    assert not grads.is_contiguous() and grads.stride(-1) == 1
    _, vectors, positions, rows = _case(B, P, D, S, R, seed=5)
    out, touched = _poisoned_out(R, B, rows)
    expected = _expected(grads, vectors, positions, rows, out, "rb")
    fastattr.contract(grads, vectors, positions, rows, out, backend=backend)
    _check(out, expected, touched, "rb", torch.float32)


@pytest.mark.parametrize("backend", backend_params(DEVICE))
def test_strided_out(backend):
    B, P, D, S, R = 3, 4, 16, 25, 30
    grads, vectors, positions, rows = _case(B, P, D, S, R, seed=9)
    big = torch.full((R, B * 3), float("nan"), device=DEVICE)
    big[rows.long(), ::3] = 0.5
    out = big[:, ::3]
    expected = out.clone()
    reference.contract(grads, vectors, positions, rows, expected)
    fastattr.contract(grads, vectors, positions, rows, out, backend=backend)
    torch.testing.assert_close(out[rows.long()], expected[rows.long()], rtol=1e-5, atol=1e-5)
    assert torch.isnan(big[:, 1::3]).all() and torch.isnan(big[:, 2::3]).all()


@pytest.mark.parametrize("backend", backend_params(DEVICE))
def test_empty_vectors_and_batch(backend):
    grads, vectors, positions, rows = _case(3, 4, 8, 0, 10, seed=1)
    out = torch.randn(10, 3, device=DEVICE)
    before = out.clone()
    fastattr.contract(grads, vectors, positions, rows, out, backend=backend)
    assert torch.equal(out, before)
    grads, vectors, positions, rows = _case(0, 4, 8, 5, 10, seed=1)
    out = torch.randn(10, 0, device=DEVICE)
    assert fastattr.contract(grads, vectors, positions, rows, out, backend=backend) is out
    assert out.shape == (10, 0)
    # An empty batch inside a filled buffer: nothing beside it is written.
    buffer = torch.randn(10, 3, device=DEVICE)
    before = buffer.clone()
    fastattr.contract(grads, vectors, positions, rows, buffer[:, 1:1], backend=backend)
    assert torch.equal(buffer, before)


@pytest.mark.parametrize("backend", backend_params(DEVICE))
def test_plan_reused_across_batches(backend):
    B, P, D, S, R = 6, 5, 24, 60, 80
    _, vectors, positions, rows = _case(B, P, D, S, R, seed=2)
    plan = ContractionPlan(vectors, positions, rows)
    for seed in range(3):
        grads = torch.randn(B, P, D, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        out, touched = _poisoned_out(R, B, rows, seed=seed)
        expected = _expected(grads, vectors, positions, rows, out, "rb")
        plan(grads, out, backend=backend)
        _check(out, expected, touched, "rb", torch.float32)


def test_plan_tiles_cover_each_vector_once():
    positions = torch.tensor([3, 0, 3, 3, 1, 0, 3, 3, 3])
    plan = ContractionPlan(torch.randn(9, 4), positions, torch.arange(9))
    tile_pos, start, end = plan.tiles(2)
    covered = torch.cat([torch.arange(s, e) for s, e in zip(start.tolist(), end.tolist())])
    assert torch.equal(covered, torch.arange(9))
    assert ((end - start) <= 2).all()
    for p, s, e in zip(tile_pos.tolist(), start.tolist(), end.tolist()):
        assert (plan.positions[s:e] == p).all()


# ---------------------------------------------------------------------------------- bad input


def _good():
    return _case(2, 3, 8, 5, 10, seed=0)


def test_rejects_wrong_dtype():
    grads, vectors, positions, rows = _good()
    with pytest.raises(TypeError, match=r"grads: expected dtype float32 \(the vectors' dtype\), got float16"):
        fastattr.contract(grads.half(), vectors, positions, rows, torch.zeros(10, 2, device=DEVICE))
    with pytest.raises(TypeError, match="positions: expected dtype int32 or int64, got float32"):
        fastattr.contract(grads, vectors, positions.float(), rows, torch.zeros(10, 2, device=DEVICE))
    with pytest.raises(TypeError, match="out: expected dtype float32 or float32, got float64"):
        fastattr.contract(grads, vectors, positions, rows, torch.zeros(10, 2, dtype=torch.float64, device=DEVICE))
    with pytest.raises(TypeError, match="vectors: expected a torch.Tensor, got list"):
        fastattr.contract(grads, [[1.0]], positions, rows, torch.zeros(10, 2, device=DEVICE))


def test_rejects_wrong_shapes():
    grads, vectors, positions, rows = _good()
    out = torch.zeros(10, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"grads: expected last dimension 8 \(the vectors' D\), got shape \(2, 3, 9\)"):
        fastattr.contract(torch.randn(2, 3, 9, device=DEVICE), vectors, positions, rows, out)
    with pytest.raises(ValueError, match=r"positions: expected shape \(5\), got \(4,\)"):
        fastattr.contract(grads, vectors, positions[:4], rows, out)
    with pytest.raises(ValueError, match=r"out: expected shape \(\*, 2\)"):
        fastattr.contract(grads, vectors, positions, rows, torch.zeros(10, 3, device=DEVICE))
    with pytest.raises(ValueError, match="vectors: expected a 2-D tensor"):
        fastattr.contract(grads, vectors[None], positions, rows, out)
    with pytest.raises(ValueError, match="out_layout: expected 'rb' or 'br', got 'bs'"):
        fastattr.contract(grads, vectors, positions, rows, out, out_layout="bs")


def test_rejects_out_of_range_indices():
    grads, vectors, positions, rows = _good()
    out = torch.zeros(10, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"out: expected at least 12 rows \(max row \+ 1\), got shape \(10, 2\)"):
        fastattr.contract(grads, vectors, positions, torch.tensor([0, 1, 2, 3, 11], device=DEVICE), out)
    with pytest.raises(ValueError, match=r"grads: expected at least 7 positions \(max position \+ 1\), got shape \(2, 3, 8\)"):
        fastattr.contract(grads, vectors, torch.tensor([0, 1, 6, 2, 2], device=DEVICE), rows, out)
    with pytest.raises(ValueError, match=r"rows: expected indices in \[0, 2147483647\), got values in \[-1, 9\]"):
        fastattr.contract(grads, vectors, positions, torch.tensor([-1, 1, 2, 3, 9], device=DEVICE), out)


def test_rejects_non_unit_last_stride():
    grads, vectors, positions, rows = _good()
    with pytest.raises(ValueError, match="grads: expected a unit stride in the last dimension"):
        fastattr.contract(grads.transpose(1, 2).contiguous().transpose(1, 2), vectors, positions, rows, torch.zeros(10, 2, device=DEVICE))
    with pytest.raises(ValueError, match="vectors: expected a unit stride in the last dimension"):
        fastattr.contract(grads, vectors.T.contiguous().T, positions, rows, torch.zeros(10, 2, device=DEVICE))


def test_compiled_layer_validates_on_its_own():
    """The C++ entry point re-checks indices: a bad plan must not reach the kernel."""
    from fastattr._runtime import ext as _ext

    if _ext.ext is None:
        pytest.skip(f"compiled extension unavailable: {_ext.EXT_ERROR}")
    grads = torch.randn(2, 3, 8)
    vectors = torch.randn(4, 8)
    rows = torch.tensor([0, 1, 2, 50], dtype=torch.int32)
    tiles = [torch.tensor(x, dtype=torch.int32) for x in ([0], [0], [4])]
    out = torch.zeros(10, 2)
    args = dict(grads=grads.data_ptr(), grads_dtype=0, B=2, P=3, D=8, grads_stride_b=grads.stride(0),
                grads_stride_p=grads.stride(1), vectors=vectors.data_ptr(), vectors_dtype=0, S=4, vectors_stride_s=8,
                rows=rows.data_ptr(), tile_pos=tiles[0].data_ptr(), tile_start=tiles[1].data_ptr(),
                tile_end=tiles[2].data_ptr(), n_tiles=1, out=out.data_ptr(), out_dtype=0, R=10, out_stride_r=2,
                out_stride_b=1, atomic=False, deterministic=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"rows: expected indices in \[0, 10\), got 50 at 3"):
        _ext.ext.contract_cpu(**args)
    with pytest.raises(ValueError, match="grads: expected the dtype of vectors"):
        _ext.ext.contract_cpu(**(args | {"grads_dtype": 1}))
    # Keyword only: a positional call cannot pass arguments in the wrong order.
    with pytest.raises(TypeError):
        _ext.ext.contract_cpu(*args.values())
    assert torch.equal(out, torch.zeros(10, 2))


def test_forced_unavailable_backend_raises():
    grads, vectors, positions, rows = _good()
    out = torch.zeros(10, 2, device=DEVICE)
    wrong = "cpu" if DEVICE.type == "cuda" else "cuda"
    with pytest.raises(BackendUnavailableError, match=f"contract: backend '{wrong}'"):
        fastattr.contract(grads, vectors, positions, rows, out, backend=wrong)


@pytest.mark.parametrize("backend", backend_params(DEVICE))
@pytest.mark.parametrize("below", [0, 1, 3, 7])
def test_positions_below_contracts_only_a_prefix(backend, below):
    # A truncated sweep passes grads for the first `below` positions only: the vectors at later
    # positions must be skipped (their rows keep whatever out held), the earlier ones contracted.
    B, P, D, S, R = 5, 7, 40, 90, 120
    _, vectors, positions, rows = _case(B, P, D, S, R, seed=4)
    plan = ContractionPlan(vectors, positions, rows)
    grads = torch.randn(B, max(below, 1), D, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    out, touched = _poisoned_out(R, B, rows, seed=3)
    keep = positions < below
    expected = out.clone().float()
    if below:
        reference.contract(grads.float(), vectors[keep].float(), positions[keep], rows[keep], expected, out_layout="rb")
    before = out.clone()
    plan(grads, out, backend=backend, positions_below=below)
    owned = torch.zeros(R, dtype=torch.bool, device=out.device)
    owned[rows[keep].long().to(out.device)] = True
    torch.testing.assert_close(out[owned], expected[owned], rtol=1e-5, atol=1e-4)
    # Rows of vectors at later positions, and rows of no vector (NaN), are left exactly as they were.
    assert torch.equal(out[~owned].nan_to_num(7.0), before[~owned].nan_to_num(7.0))
    with pytest.raises(ValueError, match="positions_below: expected a non-negative integer"):
        plan(grads, out, positions_below=-1)


def test_plan_takes_vectors_only_when_given_up_and_in_order():
    # take_vectors lets a plan keep the caller's tensor (no copy of the largest input) where it is
    # already in the plan's order; otherwise, or without it, the plan holds its own sorted copy.
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(6, 8, generator=gen)
    grads = torch.randn(3, 4, 8, generator=gen)
    rows = torch.tensor([4, 0, 2, 5, 1, 3])
    for positions, take, kept in (([0, 0, 1, 2, 2, 3], True, True), ([0, 0, 1, 2, 2, 3], False, False),
                                  ([2, 0, 1, 3, 2, 0], True, False)):  # fmt: skip
        pos = torch.tensor(positions)
        plan = ContractionPlan(vectors, pos, rows, take_vectors=take)
        assert (plan.vectors.data_ptr() == vectors.data_ptr()) is kept
        out = torch.zeros(6, 3)
        plan(grads, out, backend="cpu")
        want = torch.zeros(6, 3)
        want[rows] = torch.einsum("sd,bsd->sb", vectors.double(), grads[:, pos].double()).float()
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
