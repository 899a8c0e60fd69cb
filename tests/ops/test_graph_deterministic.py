"""Deterministic mode of the thresholds and of pruning: run-to-run bitwise identical results.

The device histograms (cuda, triton) add bucket sums with float64 atomics by default, whose order
varies on a GPU and with it the last bits of a sum: a cumulative sum that ties with the threshold
can then fall either way. ``deterministic=True`` (or ``torch.use_deterministic_algorithms``) sums
each bucket's float32 significands exactly in int64, which every order gives alike. These tests
check that the flag reaches the kernels (the sums they write are the exact integers), that the
results equal the reference and the default mode's, and that repeated calls give the same bits.
Under TRITON_INTERPRET=1 the programs run in order, so repetition alone would prove nothing there:
the exact integer sums are what is asserted. The cpu kernels have one mode, deterministic by
construction (static row splits merged in thread order), checked with threads in use.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

import fastattr
from fastattr import reference
from fastattr.ops import pruning
from fastattr.ops import threshold

from helpers import backend_device, backend_params, deterministic_algorithms, interpreted, random_graph

RADIX = [p for p in backend_params() if p.values[0] in ("cuda", "triton", "cpu")]
DEVICE = [p for p in backend_params() if p.values[0] in ("cuda", "triton")]


def _exact_significand_sums(x: np.ndarray, level: int, prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, int64 significand sum) per bucket of one level, by numpy."""
    bits = x.view(np.uint32)
    shift, nbits = threshold.SELECT_SHIFT[level], threshold.SELECT_BITS[level]
    up = shift + nbits
    sel = (x > 0) & (((bits >> up) == prefix) if up < 32 else True)
    b = (bits[sel] >> shift) & ((1 << nbits) - 1)
    mant = (bits[sel] & 0x7FFFFF).astype(np.int64)
    sig = np.where((bits[sel] >> 23) != 0, mant | 0x800000, mant)
    count = np.bincount(b, minlength=1 << nbits).astype(np.int64)
    isum = np.zeros(1 << nbits, dtype=np.int64)
    np.add.at(isum, b, sig)
    return count, isum


class _Spy:
    """Wraps a launch function; records the ``deterministic`` flag and the sums buffer it was given."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.calls.append((kwargs.get("deterministic"), args))
        return out


def _launch_hist(backend: str, scores: torch.Tensor, level: int, prefix: int):
    """The raw deterministic histogram of one level, from the backend's kernel."""
    count, sums, stats = threshold.hist_buffers(level, scores.device, True)
    count.fill_(-7), sums.fill_(-7), stats.fill_(-7)  # poisoned: the kernel must write every bucket
    if backend == "triton":
        from fastattr.triton_kernels import threshold as tk

        tk.hist_1d(scores, level, prefix, count, sums, stats, deterministic=True)
    else:
        from fastattr._runtime import ext as _ext

        _ext.ext.hist_1d_cuda(scores=scores.data_ptr(), scores_dtype=0, n=scores.numel(), level=level, prefix=prefix,
                              count=count.data_ptr(), sums=0, sig_sums=sums.data_ptr(), stats=stats.data_ptr(),
                              deterministic=True, stream=_ext.cuda_stream(scores.device))  # fmt: skip
    return count.cpu().numpy(), sums.cpu().numpy(), stats.cpu().numpy()


@pytest.mark.parametrize("backend", DEVICE)
def test_deterministic_kernels_write_exact_significand_sums(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(7000, generator=g) ** 8, torch.tensor([1e-45, 7e-42, 1.18e-38, 0.0, 3e30])])
    dev = backend_device(backend)
    xd = x.to(dev)
    prefix = 0
    for level in range(len(threshold.SELECT_BITS)):
        count, isum, stats = _launch_hist(backend, xd, level, prefix)
        want_count, want_sum = _exact_significand_sums(x.numpy(), level, prefix)
        assert np.array_equal(count, want_count) and np.array_equal(isum, want_sum), level
        if level == 0:
            pos = x[x > 0]
            assert stats[0] == pos.numel() and stats[1] == pos.min().view(torch.int32).item()
            assert stats[2] == 0 and stats[3] == 0
        prefix = (prefix << threshold.SELECT_BITS[level]) | int(want_count.argmax())


@pytest.mark.parametrize("backend", RADIX)
@pytest.mark.parametrize("source", ["argument", "torch switch"])
def test_find_threshold_deterministic_is_repeatable_and_exact(backend, source, monkeypatch):
    dev = backend_device(backend)
    spy = None
    if backend != "cpu":
        spy = _Spy(threshold._DEVICE_HIST[backend])
        monkeypatch.setitem(threshold._DEVICE_HIST, backend, spy)
    n = 3000 if interpreted(backend) else 200_000
    for seed in range(3):
        x = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) ** 6).to(dev)
        for t in (0.5, 0.8, 0.98):
            if source == "argument":
                runs = [fastattr.find_threshold(x, t, backend=backend, deterministic=True) for _ in range(3)]
            else:
                with deterministic_algorithms(True):
                    runs = [fastattr.find_threshold(x, t, backend=backend) for _ in range(3)]
            assert all(torch.equal(r, runs[0]) for r in runs)
            assert torch.equal(runs[0], reference.find_threshold(x, t))
            assert fastattr.last_backend("find_threshold") == backend
    if spy is not None:  # every histogram pass took the deterministic kernels
        assert spy.calls and all(flag is True for flag, _ in spy.calls)
        spy.calls.clear()
        fastattr.find_threshold(x, 0.8, backend=backend)  # the default: the float64 sums
        assert spy.calls and all(flag is False for flag, _ in spy.calls)


@pytest.mark.parametrize("backend", DEVICE)
def test_above_the_sort_limit_deterministic_totals(backend, monkeypatch):
    """Where circuit-tracer cannot sort, the answer rests on the histogram total: deterministic mode
    makes it the exactly rounded sum, every run."""
    dev = backend_device(backend)
    monkeypatch.setattr(threshold, "_sort_limit", lambda device: 0)
    x = (torch.rand(20_000, generator=torch.Generator().manual_seed(3)) ** 4).to(dev)
    total = float(torch.sum(x, dtype=torch.float64))
    for t in (0.5, 0.8, 0.98):
        runs = {fastattr.find_threshold(x, t, backend=backend, deterministic=True).item() for _ in range(3)}
        want, _ = threshold.find_threshold_fixed_total(x, t, total, backend="torch")
        assert runs == {want}, t


@pytest.mark.parametrize("backend", RADIX)
def test_fixed_total_deterministic_equals_default(backend):
    dev = backend_device(backend)
    x = (torch.rand(4000, generator=torch.Generator().manual_seed(4)) ** 5).to(dev)
    total = float(torch.sum(x, dtype=torch.float64))
    for t in (0.3, 0.8, 0.98, 1.0):
        want = threshold.find_threshold_fixed_total(x, t, total, backend="torch")
        runs = [threshold.find_threshold_fixed_total(x, t, total, backend=backend, deterministic=det)
                for det in (True, True, False)]  # fmt: skip
        assert runs == [want] * 3, t


def _graph(backend: str, seed: int):
    size = {"n_layers": 2, "n_pos": 3, "feats_per": 3} if interpreted(backend) else {"n_layers": 4, "n_pos": 6, "feats_per": 8}
    return random_graph(seed=seed, device=backend_device(backend), density=0.6, **size)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else _same_edges(x, y) for x, y in zip(a, b))


def _same_edges(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("crow_indices", "col_indices", "values", "row_abs_sum"))


@pytest.mark.parametrize("backend", RADIX)
def test_prune_graph_deterministic_is_repeatable_and_exact(backend, monkeypatch):
    spy = None
    if backend != "cpu":
        spy = _Spy(pruning._EDGE_PASSES[backend].hist)
        monkeypatch.setitem(pruning._EDGE_PASSES, backend, pruning._EdgePasses(spy, pruning._EDGE_PASSES[backend].mask))
    for seed in (0, 1):
        graph = _graph(backend, seed)
        runs = [fastattr.prune_graph(graph, 0.8, 0.98, backend=backend, deterministic=True) for _ in range(3)]
        assert all(_same(r, runs[0]) for r in runs)
        want = reference.prune_graph(graph, 0.8, 0.98)
        assert torch.equal(runs[0].node_mask, want.node_mask) and torch.equal(runs[0].edge_mask, want.edge_mask)
        assert _same(runs[0][:2], fastattr.prune_graph(graph, 0.8, 0.98, backend=backend, deterministic=False)[:2])
    if spy is not None:
        flags = [flag for flag, _ in spy.calls]
        assert flags and flags.count(True) == 3 * flags.count(False), flags


@pytest.mark.parametrize("backend", backend_params())
def test_prune_graph_sparse_deterministic_is_repeatable(backend):
    graph = _graph(backend, 2)
    runs = [fastattr.prune_graph_sparse(graph, 0.8, 0.98, backend=backend, deterministic=True) for _ in range(3)]
    assert all(_same(r, runs[0]) for r in runs)
    default = fastattr.prune_graph_sparse(graph, 0.8, 0.98, backend=backend, deterministic=False)
    assert _same(runs[0], default)
    dense = reference.prune_graph(graph, 0.8, 0.98)
    assert torch.equal(runs[0].node_mask, dense.node_mask)


def test_cpu_select_with_threads_is_repeatable(monkeypatch):
    """The cpu select uses threads from 2^24 elements: static splits merged in thread order give the
    same double sums, so the same bucket walk, on every run (exact total: its last bit matters)."""
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: nothing to split")
    x = torch.rand((1 << 24) + 3, generator=torch.Generator().manual_seed(5)) ** 4
    total = float(torch.sum(x, dtype=torch.float64))
    values = {threshold.select_1d(x, 0.8, "cpu", deterministic=False, rel_s=0.0, dc=0.0, s_fixed=0.0).value
              for _ in range(3)}  # fmt: skip
    assert len(values) == 1
    assert values == {threshold.find_threshold_fixed_total(x, 0.8, total, backend="cpu")[0]}


_FEWER_THREADS = """
import numpy as np, torch
from fastattr import reference
from fastattr._runtime import ext as _ext
from fastattr.ops import threshold
g = torch.Generator().manual_seed(6)
# 1-D select with threads (>= 2^24 scores), exact total.
x = torch.rand((1 << 24) + 3, generator=g) ** 4
total = float(torch.sum(x, dtype=torch.float64))
got = threshold.select_1d(x, 0.8, "cpu", deterministic=False, rel_s=0.0, dc=0.0, s_fixed=float(np.float32(total)))
assert got.value == threshold.find_threshold_fixed_total(x, 0.8, total, backend="torch")[0], got
del x
# The edge select (its own histogram passes, and the pass per level) and the dangling-node removal
# at N^2 >= 2^24.
n = 4100
A = torch.randn(n, n, generator=g) * (torch.rand(n, n, generator=g) < 0.05)
node = (torch.rand(n, generator=g) < 0.8).to(torch.uint8)
scale = A.abs().sum(1).clamp(min=1e-10)
factor = torch.rand(n, generator=g)
keep = node.bool()[:, None] & node.bool()[None, :]
scores = (torch.where(keep, A.abs(), 0.0) / scale[:, None]) * factor[:, None]
pos = scores[scores > 0]
total = float(pos.double().sum())
want, keep_all = threshold.find_threshold_fixed_total(scores.flatten(), 0.98, total, backend="torch")
del keep
for max_candidates in (1 << 30, 0):
    mask = torch.empty(n, n, dtype=torch.uint8)
    status, thr, clamped, passes, _ = _ext.ext.edge_select_mask_cpu(
        a=A.data_ptr(), a_dtype=0, n=n, lda=n, node_mask=node.data_ptr(), row_scale=scale.data_ptr(),
        row_factor=factor.data_ptr(), hist_count=0, hist_sum=0, total=total, nnz=int(pos.numel()),
        min_nz=float(pos.min()), t=0.98, edge_mask=mask.data_ptr(), max_candidates=max_candidates, row_blocks=0)
    assert status == 0 and thr == want and not keep_all, (status, thr, want)
    assert torch.equal(mask.bool(), scores >= want)
del scores
nm, ref_nm = node.clone(), node.bool().clone()
edge, ref_edge = mask.clone(), mask.bool().clone()
_ext.ext.remove_dangling_cpu(edge_mask=edge.data_ptr(), n=n, node_mask=nm.data_ptr(), n_features=3000, n_fixed=50)
reference.remove_dangling_nodes(ref_nm, ref_edge, 3000, 50)
assert torch.equal(nm.bool(), ref_nm) and torch.equal(edge.bool(), ref_edge)
print("ok")
"""


def test_cpu_kernels_with_fewer_threads_than_asked():
    """OpenMP may give a parallel region fewer threads than asked (here OMP_THREAD_LIMIT=1): the
    per-thread buffers of the threaded passes (>= 2^24 elements) are zeroed whoever runs, and every
    row is read once."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    out = subprocess.run([sys.executable, "-c", _FEWER_THREADS], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"
