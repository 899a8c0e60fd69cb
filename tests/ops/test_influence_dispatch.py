"""What runs for every influence op and input kind (last_backend says it, and the result is the
reference's), and the deterministic mode: the flag reaches the kernels, results are bitwise
identical from run to run and equal the reference within float32 rounding."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import fastattr
from fastattr import reference
from fastattr._runtime import backends as _backends
from fastattr._runtime import ext as _ext
from fastattr.attribution import edge_store
from fastattr.ops import influence
from fastattr._runtime.backends import BackendDtypeError, BackendLayoutError, BackendUnavailableError
from fastattr._runtime.checks import NonFiniteInfluenceError

from helpers import backend_params, default_dtype, logit_weights, random_graph, shuffle_features

KINDS = ["dense", "sparse_edges", "torch_csr", "float64", "float16"]
SPARSE_KINDS = ("sparse_edges", "torch_csr")
COMPILED = ("cpu", "cuda", "triton")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def _graph(seed: int = 3):
    graph = random_graph(seed=seed, n_layers=2, n_pos=3, feats_per=3)
    return graph.adjacency_matrix, logit_weights(graph)


def _as_kind(A: torch.Tensor, kind: str):
    if kind == "sparse_edges":
        return fastattr.topk_edges(A, None)
    if kind == "torch_csr":
        return A.to_sparse_csr()
    return A.to({"dense": torch.float32, "float64": torch.float64, "float16": torch.float16}[kind])


def _expected(backend: str | None, kind: str, sparse_ok: bool) -> str | type[Exception]:
    """The backend that must run (or the error a call must raise) on the CPU."""
    if kind in SPARSE_KINDS:
        if not sparse_ok:
            return BackendLayoutError if backend is not None else BackendUnavailableError
        return "torch" if backend in (None, "torch") else BackendLayoutError
    if kind in ("float64", "float16"):
        return "torch" if backend in (None, "torch") else BackendDtypeError
    return "cpu" if backend is None else backend


def _run(op: str, fn, backend, expected, arg: str, kind: str):
    _backends._last_used.pop(op, None)
    if isinstance(expected, type):
        with pytest.raises(expected, match=rf"^{arg}: "):
            fn()
        assert _backends.last_backend(op) is None
        return None
    if kind == "float16" and op != "compute_influence":
        # normalize_matrix's clamp(min=1e-10) is 0 in float16, so circuit-tracer's normalised rows
        # of zeros are 0 / 0 = NaN (and its series then runs to max_iter): the torch backend runs
        # its operations and says so at the first NaN term.
        with pytest.raises(NonFiniteInfluenceError, match=rf"^{arg}: .* NaN"):
            fn()
        assert _backends.last_backend(op) == expected
        return None
    got = fn()
    assert _backends.last_backend(op) == expected
    return got


BACKENDS = [pytest.param(None, id="auto"), *backend_params(torch.device("cpu"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("op", ["compute_influence", "compute_node_influence"])
def test_influence_ops_report_what_ran(op, kind, backend):
    A, w = _graph()
    if op == "compute_influence":
        A = reference.normalize_matrix(A) * 0.9  # a series that converges on the raw matrix
    x = _as_kind(A, kind)
    wk = w.to(A.dtype if kind in SPARSE_KINDS else x.dtype)
    got = _run(op, lambda: getattr(fastattr, op)(x, wk, backend=backend), backend, _expected(backend, kind, True),
               "A" if op == "compute_influence" else "adjacency_matrix", kind)  # fmt: skip
    if got is None:
        return
    dense = A.to(wk.dtype)
    ref = getattr(reference, op)(dense, wk.clone())
    if kind in ("float64", "float16"):  # the torch backend: circuit-tracer's own operations
        assert got.dtype == x.dtype and torch.equal(got, ref)
    else:
        assert got.dtype == torch.float32 and rel_err(got, ref) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_edge_influence_reports_what_ran(kind, backend):
    A, w = _graph(4)
    x = _as_kind(A, kind)
    wk = w.to(x.dtype) if kind not in SPARSE_KINDS else w
    got = _run("compute_edge_influence", lambda: fastattr.compute_edge_influence(x, wk, backend=backend), backend,
               _expected(backend, kind, False), "pruned_matrix", kind)  # fmt: skip
    if got is not None:
        ref = reference.compute_edge_influence(x, wk.clone())
        assert got.dtype == x.dtype
        assert torch.equal(got, ref) if kind != "dense" else rel_err(got, ref) <= 1e-6


def _partial_problem(seed: int = 0, device="cpu"):
    graph = random_graph(seed=seed, n_layers=2, n_pos=3, feats_per=4)
    A = graph.adjacency_matrix
    n, n_logits = A.shape[0], len(graph.logit_targets)
    nf = len(graph.selected_features)
    visited = torch.randperm(nf, generator=torch.Generator().manual_seed(seed))[: max(1, nf // 2)]
    row_to_node = torch.cat([visited, torch.arange(n - n_logits, n)])
    return A[row_to_node].clone().to(device), graph.logit_probabilities.to(device), row_to_node.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_partial_influences_report_what_ran(kind, backend):
    e, p, idx = _partial_problem()
    x = _as_kind(e, kind)
    expected = _expected(backend, kind, False)
    if kind == "float16":  # rows of zeros normalise to NaN there (see _run); the float16 case is below
        expected = "torch" if backend in (None, "torch") else BackendDtypeError
        if expected == "torch":
            return
    got = _run("compute_partial_influences", lambda: fastattr.compute_partial_influences(x, p, idx, backend=backend),
               backend, expected, "edge_matrix", kind)  # fmt: skip
    if got is None:
        return
    if kind == "float64":
        assert got.dtype == torch.float64
        assert torch.equal(got, reference.compute_partial_influences(x, p.double(), idx))
    else:
        assert rel_err(got, reference.compute_partial_influences(e, p, idx)) <= 1e-6


def test_partial_influences_in_a_float64_default_dtype_equal_circuit_tracers():
    """Under torch.set_default_dtype(torch.float64) circuit-tracer's edge matrix is float64: the
    automatic choice runs its operations (the torch backend) and returns its values bit for bit."""
    ct_graph = pytest.importorskip("circuit_tracer.graph", reason="the oracle here is circuit-tracer itself")
    e, p, idx = _partial_problem(seed=5)
    with default_dtype(torch.float64):
        want = ct_graph.compute_partial_influences(e.double(), p.double(), idx, device="cpu")
        got = fastattr.compute_partial_influences(e.double(), p.double(), idx)
    assert fastattr.last_backend("compute_partial_influences") == "torch"
    assert got.dtype == torch.float64 and torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_normalize_matrix_reports_what_ran(kind, backend):
    A, _ = _graph()
    x = _as_kind(A, kind)
    if kind in SPARSE_KINDS:
        expected = BackendLayoutError if backend == "torch" else BackendUnavailableError
    else:
        expected = "torch" if backend in (None, "torch") else BackendUnavailableError
    _backends._last_used.pop("normalize_matrix", None)
    if isinstance(expected, type):
        with pytest.raises(expected):
            fastattr.normalize_matrix(x, backend=backend)
        return
    got = fastattr.normalize_matrix(x, backend=backend)
    assert _backends.last_backend("normalize_matrix") == "torch"
    # float16 rows of zeros are NaN in circuit-tracer too (its clamp(min=1e-10) is 0 in float16).
    torch.testing.assert_close(got, reference.normalize_matrix(x), rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# Deterministic mode
# ------------------------------------------------------------------------------------------------


def _ops(A, w, e, p, idx, **kw):
    return {
        "compute_influence": lambda: fastattr.compute_influence(reference.normalize_matrix(A) * 0.9, w, **kw),
        "compute_node_influence": lambda: fastattr.compute_node_influence(A, w, **kw),
        "compute_edge_influence": lambda: fastattr.compute_edge_influence(A, w, **kw),
        "compute_partial_influences": lambda: fastattr.compute_partial_influences(e, p, idx, **kw),
    }


def _references(A, w, e, p, idx):
    return {
        "compute_influence": reference.compute_influence(reference.normalize_matrix(A) * 0.9, w.clone()),
        "compute_node_influence": reference.compute_node_influence(A, w),
        "compute_edge_influence": reference.compute_edge_influence(A, w),
        "compute_partial_influences": reference.compute_partial_influences(e, p, idx),
    }


@pytest.mark.parametrize("backend", backend_params(torch.device("cpu")))
def test_deterministic_results_are_bitwise_repeatable_and_match_the_reference(backend):
    for seed in (0, 1):
        A, w = _graph(10 + seed)
        e, p, idx = _partial_problem(seed)
        refs = _references(A, w, e, p, idx)
        for op, call in _ops(A, w, e, p, idx, backend=backend, deterministic=True).items():
            first, second = call(), call()
            assert _backends.last_backend(op) == backend
            assert torch.equal(first, second), op
            assert rel_err(first, refs[op]) <= 1e-6, op


def _spy(monkeypatch, module, name: str, launches: list):
    """Wrap the @triton.jit kernel ``module.name`` to record each launch's keyword arguments."""
    kernel = getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((name, kwargs))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, name, Spy())


@pytest.mark.parametrize("flag", [True, False, None])
def test_triton_deterministic_flag_reaches_the_kernel(monkeypatch, flag):
    pytest.importorskip("triton")
    if not _backends.backend_status()["triton"][0]:
        pytest.skip(_backends.backend_status()["triton"][1])
    from fastattr.triton_kernels import influence as tk

    A, w = _graph(5)
    e, p, idx = _partial_problem(2)
    for op, call in _ops(A, w, e, p, idx, backend="triton", deterministic=flag).items():
        for global_mode in (False, True):
            launches: list = []
            monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda g=global_mode: g)
            _spy(monkeypatch, tk, "_matvec_kernel", launches)
            _spy(monkeypatch, tk, "_sum_partials_kernel", launches)
            call()
            monkeypatch.undo()
            want = flag if flag is not None else global_mode
            matvecs = [kw for name, kw in launches if name == "_matvec_kernel"]
            sums = [kw for name, kw in launches if name == "_sum_partials_kernel"]
            assert matvecs and all(kw["PARTIALS"] is want for kw in matvecs), op
            assert len(sums) == (len(matvecs) if want else 0), op


class _PoisonedTorch:
    """torch, with torch.empty returning NaN-filled tensors: every entry a kernel must write."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*size, **kw):
        return torch.empty(*size, **kw).fill_(float("nan"))


def test_triton_fixed_order_matvec_equals_the_atomic_one(monkeypatch):
    pytest.importorskip("triton")
    if not _backends.backend_status()["triton"][0]:
        pytest.skip(_backends.backend_status()["triton"][1])
    from fastattr.triton_kernels import influence as tk

    monkeypatch.setattr(tk, "torch", _PoisonedTorch())  # the scratch and the outputs start as NaN
    g = torch.Generator().manual_seed(7)
    for n, m in ((300, 200), (5000, 40), (1, 3)):  # many row chunks; one chunk
        A = torch.randn(n, m, generator=g) * (torch.rand(n, m, generator=g) < 0.4)
        y = torch.randn(n, generator=g, dtype=torch.float64)
        y[: n // 3] = 0.0  # skipped tiles
        mask = (torch.rand(n, generator=g) < 0.8).to(torch.uint8) if n == m else None
        exact = (y[:, None] * A.abs().double()).sum(0).float()
        runs = [tk.matvec(A, y, mask, True, deterministic=True) for _ in range(3)]
        assert all(torch.equal(runs[0], r) for r in runs[1:])
        assert rel_err(runs[0], exact) <= 1e-6
        assert rel_err(runs[0], tk.matvec(A, y, mask, True)) <= 1e-6
        parts = torch.randn(4, m, generator=g, dtype=torch.float64)
        assert torch.equal(tk.sum_partials(parts), ((parts[0] + parts[1]) + parts[2]) + parts[3])


def test_cuda_glue_passes_the_flag_by_keyword(monkeypatch):
    """The cuda launch helper, against a stand-in for fastattr._C (no GPU needed): the fixed-order
    variant gets a scratch of matvec_partials_cuda(n, m) rows, the default one none."""
    calls: list = []

    def matvec_cuda(**kw):
        calls.append(kw)

    fake = types.SimpleNamespace(matvec_cuda=matvec_cuda, matvec_partials_cuda=lambda *, n, m: 3)
    monkeypatch.setattr(_ext, "ext", fake)
    monkeypatch.setattr(_ext, "cuda_stream", lambda device: 0)
    A, y = torch.rand(5, 4), torch.rand(5, dtype=torch.float64)
    influence._matvec_cuda(A, y, None, True, True)
    influence._matvec_cuda(A, y, None, True, False)
    assert calls[0]["partials"] != 0 and calls[0]["n_partials"] == 3
    assert calls[1]["partials"] == 0 and calls[1]["n_partials"] == 0
    assert all(kw["a"] == A.data_ptr() and kw["n"] == 5 and kw["m"] == 4 and kw["absolute"] is True for kw in calls)


# Kahn's waves (shuffled features) on a graph with N^2 >= 2^24, where the sweep uses threads.
_WIDE = "shuffle_features(random_graph(seed=21, n_layers=2, n_pos=8, feats_per=600), seed=1)"


def test_cpu_sweep_is_bitwise_repeatable_on_wide_waves():
    """Shuffled features force Kahn's waves; at N ~ 4.4k (N^2 >= 2^24) they run on every thread:
    static row partitions reduced in thread order, so the same bits every run."""
    graph = shuffle_features(random_graph(seed=21, n_layers=2, n_pos=8, feats_per=600), seed=1)
    A, w = graph.adjacency_matrix, logit_weights(graph)
    runs = [influence.influence_cpu(A, w, normalize=True, record_waves=True) for _ in range(3)]
    assert 0 < runs[0][1]["waves"][2] < A.shape[0]
    assert all(torch.equal(runs[0][0], r[0]) for r in runs[1:])
    assert rel_err(runs[0][0], reference.compute_node_influence(A.double(), w.double())) <= 1e-7


def test_cpu_sweep_with_fewer_threads_than_asked():
    """OpenMP may give a parallel region fewer threads than asked (here OMP_THREAD_LIMIT=1): the
    waves are split among the threads that run, and every row is swept."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
from helpers import logit_weights, random_graph, shuffle_features
from fastattr import reference
from fastattr.ops import influence
graph = {_WIDE}
A, w = graph.adjacency_matrix, logit_weights(graph)
got = influence.influence_cpu(A, w, normalize=True)[0].double()
ref = reference.compute_node_influence(A.double(), w.double())
print(float((got - ref).abs().max() / ref.abs().max()))
"""
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-7


# ------------------------------------------------------------------------------------------------
# The top-k edge store's partial influences go through the one series
# ------------------------------------------------------------------------------------------------


def _topk_store(E: torch.Tensor, n_logits: int, k: int, batch: int = 4):
    rows, n_cols = E.shape
    store = edge_store.TopKRows(rows, n_cols, n_logits, n_cols - n_logits, batch, k, torch.device("cpu"))
    for st in range(0, n_logits, batch):
        n = min(batch, n_logits - st)
        store.target(st, n).copy_(E[st : st + n])
        store.commit(st, n)
    for st in range(n_logits, rows, batch):
        n = min(batch, rows - st)
        store.target(st, n).copy_(E[st : st + n])
        store.commit(st, n, nodes=torch.arange(st, st + n))
    return store


def _old_topk_loop(store, st, logit_p, row_to_node, max_iter=128):
    """An independent oracle for the store: circuit-tracer's loop over pre-normalised float32
    weights (logit rows dense, feature rows as stored entries), accumulated in float32."""
    floor = influence.PARTIAL_EPS
    nf = st - store.n_logits
    logit_w = store.logit_rows.abs()
    logit_w /= logit_w.sum(1, keepdim=True).clamp(min=floor)
    weights = store.values[:nf].abs() / store.abs_sum[:nf].clamp(min=floor)[:, None]
    cols = store.cols[:nf].reshape(-1)
    prod = torch.zeros(store.n_cols)
    prod[-len(logit_p) :] = logit_p
    total = torch.zeros_like(prod)
    for step in range(max_iter):
        nxt = prod[row_to_node[: store.n_logits]] @ logit_w
        nxt.index_add_(0, cols, (prod[row_to_node[store.n_logits : st]][:, None] * weights).reshape(-1))
        if step == 0:
            nxt += store.dropped_flow
        prod = nxt
        if not prod.any():
            break
        total += prod
    return total


@pytest.mark.parametrize("k", [6, 10**6])
def test_topk_store_partial_influences(k):
    g = torch.Generator().manual_seed(k % 97)
    n_logits, n_feat, n_cols = 3, 20, 30
    # Row r (logits first, then features) is the input row of node row_to_node[r]; a DAG: features
    # read only lower-numbered columns.
    row_to_node = torch.cat([torch.arange(n_cols - n_logits, n_cols), torch.arange(n_feat)])
    E = torch.zeros(n_logits + n_feat, n_cols)
    for r, node in enumerate(row_to_node.tolist()):
        lim = n_feat if r < n_logits else node
        E[r, :lim] = torch.randn(lim, generator=g) * (torch.rand(lim, generator=g) < 0.7)
    logit_p = torch.rand(n_logits, generator=g)
    store = _topk_store(E, n_logits, k)
    st = E.shape[0]
    got = store.partial_influences(st, logit_p, row_to_node)
    again = store.partial_influences(st, logit_p, row_to_node, deterministic=True)
    assert torch.equal(got, again)
    assert rel_err(got, _old_topk_loop(store, st, logit_p, row_to_node)) <= 1e-6
    if k >= n_cols:  # every entry kept: circuit-tracer's partial influences on the dense rows
        assert rel_err(got, reference.compute_partial_influences(E, logit_p, row_to_node)) <= 1e-6
