"""What runs for the contraction, for every dtype and backend (last_backend says it, and the result
is the reference's), and the registry as a whole: every op it holds is one the dispatch tests cover
(this file, test_influence_dispatch.py, test_graph_dispatch.py), and info() lists each of them."""

from __future__ import annotations

import pytest
import torch

import fastattr
from fastattr import reference
from fastattr._runtime import backends as _backends
from fastattr.ops import contraction

from helpers import backend_device, backend_params

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}

# Every op in the registry, and the dispatch test that covers it.
COVERED = {
    "contract": "test_contraction_dispatch.py",
    "compute_influence": "test_influence_dispatch.py",
    "compute_node_influence": "test_influence_dispatch.py",
    "compute_edge_influence": "test_influence_dispatch.py",
    "compute_partial_influences": "test_influence_dispatch.py",
    "normalize_matrix": "test_influence_dispatch.py",
    "find_threshold": "test_graph_dispatch.py",
    "find_threshold_fixed_total": "test_graph_dispatch.py",
    "topk_edges": "test_graph_dispatch.py",
    "prune_graph": "test_graph_dispatch.py",
    "prune_graph_sparse": "test_graph_dispatch.py",
}


def _case(dtype: torch.dtype, repeated: bool, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, P, D, S = 5, 6, 24, 40
    grads = torch.randn(B, P, D, generator=g).to(dtype)
    vectors = torch.randn(S, D, generator=g).to(dtype)
    positions = torch.randint(0, P, (S,), generator=g)
    rows = torch.randint(0, 9, (S,), generator=g) if repeated else torch.randperm(S, generator=g)
    return grads.to(device), vectors.to(device), positions.to(device), rows.to(device)


def _expected(backend: str | None, dtype: torch.dtype, device: torch.device):
    if backend is None:
        return "cuda" if device.type == "cuda" and _backends.backend_status()["cuda"][0] else (
            "cpu" if device.type == "cpu" else "triton")
    if backend == "triton" and dtype == torch.float64:
        return fastattr.BackendDtypeError
    if backend == "triton" and dtype == torch.bfloat16 and _backends.triton_interpret():
        return TypeError  # the interpreter's numpy dot has no bfloat16
    return backend


@pytest.mark.parametrize("repeated", [False, True], ids=["unique_rows", "repeated_rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", [pytest.param(None, id="auto"), *backend_params()])
def test_contract_reports_what_ran(backend, dtype, repeated):
    device = backend_device(backend) if backend else backend_device("cpu")
    grads, vectors, positions, rows = _case(dtype, repeated, device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.zeros((9 if repeated else 40, grads.shape[0]), dtype=acc, device=device)  # accumulated into
    want = torch.zeros(out.shape, dtype=acc, device=device)
    reference.contract(grads.to(want.dtype), vectors.to(want.dtype), positions, rows, want)
    expected = _expected(backend, dtype, device)
    _backends._last_used.pop("contract", None)
    if isinstance(expected, type):
        with pytest.raises(expected, match="^grads: "):
            fastattr.contract(grads, vectors, positions, rows, out, backend=backend)
        assert fastattr.last_backend("contract") in (None, "triton")
        return
    fastattr.contract(grads, vectors, positions, rows, out, backend=backend)
    assert fastattr.last_backend("contract") == expected
    scale = want.abs().max().item()
    assert (out.double() - want.double()).abs().max().item() <= TOLERANCE[dtype] * scale


def test_every_registered_op_has_a_dispatch_test():
    # Importing fastattr registers every op; a new one needs a row above and tests in its file.
    assert set(_backends.OPS) == set(COVERED)
    for op in _backends.OPS.values():
        assert op.impls, f"{op.name}: no implementation registered"
        assert "torch" in op.impls, f"{op.name}: no torch implementation (the reference) registered"


def test_info_lists_every_op_with_what_it_takes():
    report = fastattr.info(print_report=False)
    assert set(report["ops"]) == set(COVERED)
    assert report["ops"]["contract"]["triton"]["dtypes"] == "float32/float16/bfloat16"
    assert report["ops"]["compute_influence"]["torch"]["layouts"] == ["strided", "sparse"]


def test_contraction_registry_matches_its_kernels():
    # float64 has no Triton tile path; every other backend takes all four dtypes.
    assert not contraction.OP.takes("triton", torch.float64)
    for name in ("cuda", "cpu", "torch"):
        assert all(contraction.OP.takes(name, d) for d in DTYPES)
