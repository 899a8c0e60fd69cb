"""The CUDA kernels (kernels/cuda/*.cu) executed on the CPU by fastattr's emulation, against
fastattr.reference.

tools/build_cuda_emu.py compiles every .cu source as C++ against kernels/cuda_emu/ (a fiber per CUDA
thread, real barriers, emulated mma.sync, CUB's block primitives) together with _C's own bindings,
into ``_fastattr_cuda_emu``. The ``emulated_cuda`` fixture swaps that module in for ``_C`` and lets
the cuda backend take CPU tensors, so each test below runs the cuda backend's whole path: the Python
launch helpers, the bindings' checks, the kernels. What the emulation does not model (memory model,
warp divergence, timing, nvcc/ptxas) is in docs/gpu_readiness.md; the first tests here check the
emulation itself (fragment layouts against a matmul, barriers, CUB's reuse contract, shuffles).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastattr
from fastattr import reference
from fastattr._runtime import backends as _backends
from fastattr._runtime import ext as _ext
from fastattr.ops import threshold

from helpers import random_graph

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def emu():
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "build_cuda_emu.py")], capture_output=True, text=True)
    assert res.returncode == 0, f"the emulated build failed:\n{res.stderr[-8000:]}"
    path = res.stdout.strip().splitlines()[-1]
    spec = importlib.util.spec_from_file_location("_fastattr_cuda_emu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.build_info()["emulation"] is True
    return mod


@pytest.fixture
def emulated_cuda(emu, monkeypatch):
    """backend='cuda' on CPU tensors, through the emulated module (tests only: not a backend)."""
    real_reason = _backends.device_reason
    monkeypatch.setattr(_ext, "ext", emu)
    monkeypatch.setattr(threshold, "_C", emu)
    monkeypatch.setattr(_ext, "cuda_stream", lambda device: 0)
    monkeypatch.setattr(_backends, "_cuda_status", lambda: (True, "CUDA kernels on the CPU emulation"))
    monkeypatch.setattr(
        _backends, "device_reason",
        lambda name, device: None if name == "cuda" and device.type == "cpu" else real_reason(name, device),
    )  # fmt: skip
    return emu


def _launched_since(emu, before: dict) -> set[str]:
    """The kernels (as their launches spell them) launched since the ``before`` snapshot."""
    return {k for k, v in emu.checks.launch_counts().items() if v > before.get(k, 0)}


# ------------------------------------------------------------------------------------------------
# The emulation itself
# ------------------------------------------------------------------------------------------------


def _build_tool():
    spec = importlib.util.spec_from_file_location("build_cuda_emu", ROOT / "tools" / "build_cuda_emu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_rewrite_touches_only_launches_and_shared_declarations():
    tool = _build_tool()
    src = (
        "  k<T, OutT><<<dim3(gx, (unsigned)gy), kThreads, 0, s>>>(a, f(b, c),\n      d);\n"
        "  init<<<1, 1>>>();\n"
        "  extern __shared__ ull smem[];\n"
        "  __shared__ typename Reduce::TempStorage tmp;\n"
        "  x = a < b && c > d; y = v >> 3;\n"
    )
    out = tool.rewrite(src, "x.cu")
    assert out.count("\n") == src.count("\n") + 1  # the #line directive, and no other new line
    assert ('::fastattr_emu::launch(::fastattr_emu::LaunchConfig(dim3(gx, (unsigned)gy), kThreads, 0, s), '
            '"k<T,OutT>", k<T, OutT>, a, f(b, c),\n      d);') in out
    assert '::fastattr_emu::launch(::fastattr_emu::LaunchConfig(1, 1), "init", init);' in out
    assert "ull* smem = ::fastattr_emu::dynamic_shared<ull>();" in out
    assert "__shared__ typename Reduce::TempStorage tmp; ::fastattr_emu::poison_shared(&tmp, sizeof(tmp));" in out
    assert "x = a < b && c > d; y = v >> 3;" in out
    with pytest.raises(tool.RewriteError):
        tool.rewrite("k<<<1, 1>>>;", "bad.cu")


def _tf32_reference(x: np.ndarray) -> np.ndarray:
    """cvt.rna.tf32.f32 by arithmetic (not bit tricks): round to 11 significant bits (TF32's grid
    is 2^-136 below the normal range), to nearest, ties away from zero; overflow gives inf."""
    x = x.astype(np.float64)
    mag = np.abs(x)
    _, e = np.frexp(mag)
    quantum = np.maximum(np.ldexp(1.0, e - 11), 2.0**-136)
    r = np.floor(mag / quantum + 0.5) * quantum
    r = np.where(r >= 2.0**128, np.inf, r)
    return (np.sign(x) * r).astype(np.float32)


def test_to_tf32_rounds_to_nearest_ties_away(emu):
    rng = np.random.default_rng()
    bits = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0x3F801000, 0xBF801000, 0x3F800FFF, 0x3F801001, 0x3F803000, 0x7F7FFFFF, 0xFF7FFFFF,
                        0x00001000, 0x00000FFF, 0x00800000, 0x807FF000, 0x00000000, 0x80000000, 0x7F800000,
                        0xFF800000, 0x7FC00000, 0x4B7FF000], dtype=np.uint32)  # fmt: skip
    x = np.concatenate([special, bits]).view(np.float32)
    out = np.full(x.size, 0xDEADBEEF, dtype=np.uint32)
    emu.checks.to_tf32(x=x.ctypes.data, out=out.ctypes.data, n=x.size)
    got = out.view(np.float32)
    nan = np.isnan(x)
    assert np.isnan(got[nan]).all()
    assert (out[~nan] & 0x1FFF == 0).all(), "TF32 keeps the low 13 bits zero"
    with np.errstate(over="ignore", invalid="ignore"):
        want = _tf32_reference(x[~nan])
    np.testing.assert_array_equal(got[~nan], want)
    assert got[0] == np.float32(1.0 + 2.0**-10) and got[1] == -got[0], "a tie rounds away from zero"
    assert np.isinf(got[5]) and got[6] == -np.inf


def _representable(x: torch.Tensor, kind: int) -> torch.Tensor:
    return {0: x.bfloat16(), 1: x.half(), 2: x}[kind].float()


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["bf16_m16n8k16", "f16_m16n8k16", "tf32_m16n8k8"])
def test_mma_fragments_match_a_plain_matmul(emu, kind):
    K = 8 if kind == 2 else 16
    for _ in range(3):
        a = _representable(torch.randn(16, K) * torch.exp(torch.randn(16, K)), kind).contiguous()
        b = _representable(torch.randn(K, 8), kind).contiguous()
        c = torch.randn(16, 8)
        d = torch.full((16, 8), float("nan"))
        emu.checks.mma(kind=kind, a=a.data_ptr(), b=b.data_ptr(), c=c.data_ptr(), d=d.data_ptr())
        if kind == 2:  # the kernel hands the mma TF32 operands (cvt.rna), so the reference rounds too
            a = torch.from_numpy(_tf32_reference(a.numpy()))
            b = torch.from_numpy(_tf32_reference(b.numpy()))
        want = a.double() @ b.double() + c.double()
        bound = a.double().abs() @ b.double().abs() + c.double().abs()
        err = (d.double() - want).abs()
        assert not d.isnan().any()
        assert (err <= 2.0**-22 * bound).all(), f"max error {err.max().item():.3g}"
        # The negative control: a fragment in the wrong register must give a wrong product.
        emu.checks.mma(kind=kind, a=a.data_ptr(), b=b.data_ptr(), c=c.data_ptr(), d=d.data_ptr(), perturb=True)
        assert ((d.double() - want).abs() > 1e-3 * bound).any()


def test_a_missing_barrier_is_seen(emu):
    out = torch.full((256,), -1, dtype=torch.int32)
    emu.checks.barrier(out=out.data_ptr(), threads=256, with_barrier=True)
    salt = int(out[255])  # thread 255 reads thread 0's value: 7 * 0 + salt
    assert torch.equal(out, 7 * ((torch.arange(256) + 1) % 256).to(torch.int32) + salt)
    emu.checks.barrier(out=out.data_ptr(), threads=256, with_barrier=False)
    salt = salt + 1000003
    # Without the barrier some threads read the neighbour's value of the previous launch.
    assert (out != 7 * ((torch.arange(256) + 1) % 256).to(torch.int32) + salt).sum() > 0


def test_cub_temp_storage_reuse_needs_a_barrier(emu):
    out = torch.full((2,), float("nan"), dtype=torch.float64)
    emu.checks.cub_reuse(out=out.data_ptr(), with_barrier=True)
    assert out.tolist() == [128.0, float(sum(range(128)))]
    with pytest.raises(RuntimeError, match="__syncthreads"):
        emu.checks.cub_reuse(out=out.data_ptr(), with_barrier=False)


def test_warp_shuffles(emu):
    out = torch.full((64, 5), -1, dtype=torch.int32)
    emu.checks.shuffle(out=out.data_ptr())
    t = torch.arange(64)
    lane, base = t % 32, t - t % 32
    assert torch.equal(out[:, 0], (3 * (base + (lane + 5) % 32)).int())
    assert torch.equal(out[:, 1], (t ^ 1).int())
    assert torch.equal(out[:, 2], torch.where(lane + 3 < 32, t + 3, t).int())
    assert torch.equal(out[:, 3], torch.where(t % 8 >= 2, t - 2, t).int())
    ballot = sum(1 << i for i in range(0, 32, 3))
    assert (out[:, 4].to(torch.int64) & 0xFFFFFFFF == ballot).all()


# ------------------------------------------------------------------------------------------------
# The cuda backend's ops on the emulation, against fastattr.reference
# ------------------------------------------------------------------------------------------------

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def _contraction_case(B, P, D, S, n_rows, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(B, P, D, generator=g).to(dtype)
    vectors = torch.randn(S, D, generator=g).to(dtype)
    # Half the vectors at one position, so that it needs several 64-vector tiles.
    positions = torch.where(torch.rand(S, generator=g) < 0.5, P - 1, torch.randint(0, P, (S,), generator=g))
    rows = torch.randint(0, n_rows, (S,), generator=g)
    return grads, vectors, positions, rows


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize(
    "B,P,D,S,n_rows",
    [(3, 4, 40, 150, 400), (70, 3, 17, 90, 30), (1, 1, 1, 1, 1), (5, 2, 16, 200, 7)],
    ids=["tiles", "two_batch_tiles_odd_D", "single", "repeated_rows"],
)
def test_contraction(emulated_cuda, dtype, B, P, D, S, n_rows):
    grads, vectors, positions, rows = _contraction_case(B, P, D, S, n_rows, dtype, seed=B + S)
    before = emulated_cuda.checks.launch_counts()
    for out_dtype in {dtype, torch.float32}:
        for deterministic in (False, True):
            out0 = torch.randn(n_rows, B).to(out_dtype)  # the op accumulates: never starts from zeros
            got = fastattr.contract(grads, vectors, positions, rows, out0.clone(), backend="cuda",
                                    deterministic=deterministic)  # fmt: skip
            acc = torch.float64
            want = reference.contract(grads.to(acc), vectors.to(acc), positions, rows, out0.to(acc))
            scale = grads.double().abs().amax() * vectors.double().abs().amax() * D * 8 + out0.double().abs().amax()
            tol = max(TOL[dtype], TOL[out_dtype]) * float(scale)
            err = (got.double() - want).abs().max().item()
            assert err <= tol, f"{dtype} -> {out_dtype}, deterministic={deterministic}: error {err:.3g} > {tol:.3g}"
            if dtype == out_dtype == torch.float32:  # the drop-in contract: 1e-5 of the largest entry (3xTF32)
                assert err <= 1e-5 * want.abs().max().item(), f"fp32: error {err:.3g} against max {want.abs().max().item():.3g}"
    # fp32 and the half types run on the tensor-core kernel (3xTF32 for fp32), fp64 on the SIMT one.
    kernel = "contract_simt_kernel<T,OutT>" if dtype == torch.float64 else "contract_mma_kernel<T,OutT>"
    assert kernel in _launched_since(emulated_cuda, before)


def test_contraction_out_layout_br_and_position_prefix(emulated_cuda):
    grads, vectors, positions, rows = _contraction_case(4, 6, 24, 120, 50, torch.float32, seed=7)
    plan = fastattr.ContractionPlan(vectors, positions, rows)
    out0 = torch.randn(4, 50)
    got = plan(grads, out0.clone(), out_layout="br", backend="cuda", positions_below=3)
    keep = positions < 3
    want = reference.contract(grads, vectors[keep], positions[keep], rows[keep], out0.clone(), out_layout="br")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def _score_cases(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sparse = torch.zeros(n)
    sparse[torch.randperm(n, generator=g)[: n // 10]] = torch.rand(n // 10, generator=g)
    return {
        "uniform": torch.rand(n, generator=g),
        "heavy": torch.rand(n, generator=g) ** 8,
        "lognormal": torch.exp(torch.randn(n, generator=g) * 4),
        "ties": torch.randint(0, 4, (n,), generator=g).float(),
        "sparse": sparse,
        "tiny": torch.rand(n, generator=g) * 1e-30,
        "one": torch.rand(1, generator=g),
        "zeros": torch.zeros(7),
    }


@pytest.mark.parametrize("deterministic", [False, True])
def test_find_threshold(emulated_cuda, deterministic):
    before = emulated_cuda.checks.launch_counts()
    for name, x in _score_cases(1500, seed=int(deterministic)).items():
        for t in (0.0, 0.3333, 0.8, 0.98, 1.0):
            got = fastattr.find_threshold(x, t, backend="cuda", deterministic=deterministic)
            want = reference.find_threshold(x, t)
            assert torch.equal(got, want), f"{name}, t={t}: got {got.item()!r}, reference {want.item()!r}"
    assert {"init_stats_kernel", f"hist_1d_kernel<{str(deterministic).lower()}>"} <= _launched_since(emulated_cuda, before)


def test_descending_sort_launcher(emulated_cuda):
    """The CUB sort's launcher and its temp-storage protocol; CUB's device algorithm itself is not
    executed (kernels/cuda_emu/cub_device.h keeps its contract)."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.rand(999, generator=g) ** 4, torch.zeros(5), -torch.zeros(3), torch.ones(4)])
    x = x[torch.randperm(x.numel(), generator=g)]
    got = threshold._descending_cuda(x.contiguous())
    assert torch.equal(got, torch.sort(x, descending=True).values)


def _graph(seed: int, **kw):
    return random_graph(seed=seed, n_layers=3, n_pos=4, feats_per=6, density=0.6, **kw)


@pytest.mark.parametrize("deterministic", [False, True])
def test_influence(emulated_cuda, deterministic):
    before = emulated_cuda.checks.launch_counts()
    for seed in (0, 1):
        graph = _graph(seed, zero_rows=2)
        A = graph.adjacency_matrix
        w = torch.zeros(A.shape[0])
        w[-len(graph.logit_targets):] = graph.logit_probabilities
        kw = {"backend": "cuda", "deterministic": deterministic}
        torch.testing.assert_close(fastattr.compute_node_influence(A, w, **kw),
                                   reference.compute_node_influence(A, w), rtol=1e-5, atol=1e-7)  # fmt: skip
        torch.testing.assert_close(fastattr.compute_edge_influence(A, w, **kw),
                                   reference.compute_edge_influence(A, w), rtol=1e-5, atol=1e-7)  # fmt: skip
        An = reference.normalize_matrix(A)
        torch.testing.assert_close(fastattr.compute_influence(An, w, **kw), reference.compute_influence(An, w),
                                   rtol=1e-5, atol=1e-7)  # fmt: skip
    kernels = {"row_abs_sum_kernel", "matvec_kernel"} | ({"sum_partials_kernel"} if deterministic else set())
    assert kernels <= _launched_since(emulated_cuda, before)


def test_partial_influences(emulated_cuda):
    before = emulated_cuda.checks.launch_counts()
    graph = _graph(2)
    A = reference.normalize_matrix(graph.adjacency_matrix)
    n, n_logits = A.shape[0], len(graph.logit_targets)
    g = torch.Generator().manual_seed(2)
    # Logit rows first, then a random subset of feature rows, as the attribution loop builds them.
    idx = torch.cat([torch.arange(n - n_logits, n), torch.randperm(n - n_logits, generator=g)[: n // 3]])
    edge_matrix = A[idx].contiguous()
    for deterministic in (False, True):
        got = fastattr.compute_partial_influences(edge_matrix, graph.logit_probabilities, idx, backend="cuda",
                                                  deterministic=deterministic)  # fmt: skip
        want = reference.compute_partial_influences(edge_matrix, graph.logit_probabilities, idx)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert "matvec_kernel" in _launched_since(emulated_cuda, before)


def _topk_brute_force(A: torch.Tensor, k):
    crow, cols, vals = [0], [], []
    for r in A.tolist():
        cand = sorted((j for j in range(len(r)) if r[j] != 0.0), key=lambda j: (-abs(r[j]), j))
        keep = sorted(cand if k is None else cand[:k])
        cols += keep
        vals += [r[j] for j in keep]
        crow.append(len(cols))
    return torch.tensor(crow), torch.tensor(cols, dtype=torch.int64), torch.tensor(vals, dtype=torch.float32)


def test_topk_edges(emulated_cuda):
    g = torch.Generator().manual_seed(4)
    A = _graph(4, zero_rows=3).adjacency_matrix
    tie = torch.rand(A.shape, generator=g) < 0.3
    A = torch.where(tie, torch.round(A * 2) / 2, A)  # equal |values| of both signs in a row
    before = emulated_cuda.checks.launch_counts()
    wide = torch.randn(5, 700, generator=g) * (torch.rand(5, 700, generator=g) < 0.7)  # rows longer than a block
    for M in (A, wide):
        for k in (None, 0, 1, 3, 40, 10**6):
            got = fastattr.topk_edges(M, k, backend="cuda")
            crow, col, val = _topk_brute_force(M, k)
            assert torch.equal(got.crow_indices, crow) and torch.equal(got.col_indices, col)
            assert torch.equal(got.values, val)
            torch.testing.assert_close(got.row_abs_sum, M.double().abs().sum(1).float(), rtol=1e-6, atol=0)
    assert {"topk_count_kernel", "topk_fill_kernel"} <= _launched_since(emulated_cuda, before)


@pytest.mark.parametrize("deterministic", [False, True])
def test_prune_graph(emulated_cuda, deterministic):
    before = emulated_cuda.checks.launch_counts()
    for seed in (0, 1):
        graph = _graph(seed)
        for nt, et in [(0.8, 0.98), (0.5, 0.5), (0.0, 0.8), (0.98, 0.0)]:
            got = fastattr.prune_graph(graph, nt, et, backend="cuda", deterministic=deterministic)
            want = reference.prune_graph(graph, nt, et)
            assert torch.equal(got.node_mask, want.node_mask), "node masks differ"
            assert torch.equal(got.edge_mask, want.edge_mask), f"{int((got.edge_mask ^ want.edge_mask).sum())} edges differ"
            assert (got.cumulative_scores - want.cumulative_scores).abs().max().item() <= 1e-6
    det = str(deterministic).lower()
    assert {f"edge_hist_kernel<{det}>", "edge_mask_kernel", "matvec_kernel"} <= _launched_since(emulated_cuda, before)


def test_a_corrupted_launch_is_an_error_not_a_wrong_answer(emulated_cuda):
    """A failure inside an emulated kernel comes back as the launch's error, naming the kernel."""
    with pytest.raises(RuntimeError, match="launch failure|__syncthreads"):
        emulated_cuda.checks.cub_reuse(out=torch.zeros(2, dtype=torch.float64).data_ptr(), with_barrier=False)
    # and the next launch starts clean
    out = torch.zeros(2, dtype=torch.float64)
    emulated_cuda.checks.cub_reuse(out=out.data_ptr(), with_barrier=True)
    assert out[0].item() == 128.0

