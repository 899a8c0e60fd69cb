"""Cases above 2^31 elements, where a 32-bit index or offset would wrap: a contraction with
S * D > 2^31 (and grads whose per-tile offsets need 64 bits), find_threshold and its radix sort on
2^31 + 4099 scores, and prune_graph on a 47k x 47k adjacency. They need a GPU with tens of GB free and are skipped elsewhere, with the reason;
benchmarks/gpu_check.sh runs them."""

from __future__ import annotations

import types

import pytest
import torch

import fastattr
from fastattr import reference
from fastattr._runtime import backends as _backends

pytestmark = pytest.mark.large

GIB = 1 << 30


def _need_gpu(free_gib: float) -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA device with {free_gib:g} GiB free (a > 2^31-element case)")
    free, _ = torch.cuda.mem_get_info()
    if free < free_gib * GIB:
        pytest.skip(f"needs {free_gib:g} GiB of free GPU memory, {free / GIB:.1f} GiB free")
    return torch.device("cuda")


def _gpu_backends() -> list:
    status = _backends.backend_status()
    return [pytest.param(b, marks=[] if status[b][0] else [pytest.mark.skip(reason=f"{b}: {status[b][1]}")])
            for b in ("cuda", "triton")]


def _sampled_rows_check(out, grads, vectors, positions, rows, sample):
    """float64 results for the vectors in ``sample``, against ``out``'s rows (unique rows)."""
    want = torch.einsum("bsd,sd->sb", grads[:, positions[sample].long()].double(), vectors[sample].double())
    got = out[rows[sample].long()].double()
    err = (got - want).abs().max() / want.abs().max()
    return err.item()


@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_contraction_vectors_over_2_31_elements(backend, dtype):
    """S * D = 1,000,000 x 2304 > 2^31: the last vectors sit past a 32-bit element offset."""
    S, D, P, B = 1_000_000, 2304, 64, 24
    elt = 2 if dtype == torch.bfloat16 else 4
    # the float32 draw and the cast, then the plan's sorted copy beside the input
    device = _need_gpu(S * D * max(4 + elt, 2 * elt) * 1.1 / GIB + 2)
    gen = torch.Generator(device=device).manual_seed(0)
    vectors = (torch.randn(S, D, generator=gen, device=device) / 48).to(dtype)
    grads = torch.randn(B, P, D, generator=gen, device=device).to(dtype)
    positions = torch.randint(0, P, (S,), generator=gen, device=device)
    rows = torch.randperm(S, generator=gen, device=device)
    out = torch.zeros(S, B, device=device)
    fastattr.contract(grads, vectors, positions, rows, out, backend=backend)
    sample = torch.cat([torch.arange(S - 2000, S, device=device), torch.randint(0, S, (2000,), generator=gen, device=device)])
    assert _sampled_rows_check(out, grads, vectors, positions, rows, sample) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_descending_values_over_2_31_scores():
    """CUB's sort with a 64-bit item count, where torch.sort refuses: sorted, and the same multiset."""
    n = (1 << 31) + 4099
    device = _need_gpu(n * 4 * 3.2 / GIB + 2)  # scores, the sorted copy, CUB's scratch
    from fastattr.ops import threshold

    x = torch.rand(n, generator=torch.Generator(device=device).manual_seed(3), device=device) ** 2
    ordered = threshold.descending_values(x)
    assert threshold.threshold_stats().torch_sorts == 0
    assert bool((ordered[:-1] >= ordered[1:]).all())
    assert ordered[0] == x.max() and ordered[-1] == x.min()
    assert ordered.double().sum().item() == x.double().sum().item()


@pytest.mark.parametrize("backend", _gpu_backends())
def test_find_threshold_over_2_31_scores(backend):
    """Above torch.sort's limit circuit-tracer has no answer; fastattr's is its rule with the total
    taken as the exactly rounded sum (checked here on the CUB-sorted values)."""
    n = (1 << 31) + 4099
    device = _need_gpu(n * 4 * 6.5 / GIB + 2)  # scores, the sorted copy, its float64 prefix sums
    from fastattr.ops import threshold

    x = torch.rand(n, generator=torch.Generator(device=device).manual_seed(4), device=device) ** 4
    for t in (0.8, 0.98):
        got = fastattr.find_threshold(x, t, backend=backend)
        ordered = threshold.descending_values(x)
        cum = torch.cumsum(ordered.double(), 0)
        s = torch.tensor(float(cum[-1].item()), dtype=torch.float32, device=device)
        del ordered
        idx = int(torch.searchsorted(cum.float().div_(s), torch.tensor(t, dtype=torch.float32, device=device)).item())
        del cum
        want = threshold.descending_values(x)[min(idx, n - 1)]
        assert got.item() == want.item(), (t, got.item(), want.item())


@pytest.mark.parametrize("backend", _gpu_backends())
def test_contraction_grads_over_2_31_elements(backend):
    """grads (70, 16384, 2304) bf16: 2.6e9 elements, and one 64-row batch block spans more than
    2^31 elements (the Triton kernel's 64-bit offset path); B = 70 leaves a partial block."""
    B, P, D, S = 70, 16384, 2304, 4096
    device = _need_gpu(B * P * D * 2 * 1.2 / GIB + 2)
    gen = torch.Generator(device=device).manual_seed(1)
    grads = torch.empty(B, P, D, dtype=torch.bfloat16, device=device)
    for b in range(B):  # row by row: no float32 temporary of the whole tensor
        grads[b] = torch.randn(P, D, generator=gen, device=device)
    vectors = (torch.randn(S, D, generator=gen, device=device) / 48).to(torch.bfloat16)
    positions = torch.cat([torch.full((64,), P - 1, device=device), torch.randint(0, P, (S - 64,), generator=gen, device=device)])
    rows = torch.randperm(S, generator=gen, device=device)
    out = torch.zeros(S, B, device=device)
    fastattr.contract(grads, vectors, positions, rows, out, backend=backend)
    sample = torch.arange(S, device=device)
    assert _sampled_rows_check(out, grads, vectors, positions, rows, sample) < 1e-2


def _big_graph(n: int, device: torch.device, seed: int = 0):
    """A DAG in circuit-tracer's node order, built in row blocks: each feature reads about 1% of
    the nodes before it; 10 logits read every node."""
    n_logits, n_tokens = 10, 32
    nf = n - n_logits - n_tokens
    gen = torch.Generator(device=device).manual_seed(seed)
    A = torch.zeros(n, n, device=device)
    cols = torch.arange(n, device=device)
    for r0 in range(0, nf, 1024):
        r1 = min(nf, r0 + 1024)
        r = torch.arange(r0, r1, device=device)[:, None]
        ok = ((cols[None, :] < r) | (cols[None, :] >= nf) & (cols[None, :] < nf + n_tokens)) & (
            torch.rand(r1 - r0, n, generator=gen, device=device) < 0.01)
        A[r0:r1] = torch.where(ok, torch.randn(r1 - r0, n, generator=gen, device=device), 0.0)
    A[n - n_logits:, : n - n_logits] = torch.randn(n_logits, n - n_logits, generator=gen, device=device)
    return types.SimpleNamespace(
        adjacency_matrix=A,
        input_tokens=torch.zeros(n_tokens, dtype=torch.long),
        logit_targets=list(range(n_logits)),
        logit_probabilities=torch.softmax(torch.randn(n_logits, generator=gen, device=device), 0),
        selected_features=torch.arange(nf),
        cfg=types.SimpleNamespace(n_layers=16),
    )


@pytest.fixture(scope="module")
def big_graph_and_reference():
    # The reference (circuit-tracer's math) holds several N x N temporaries: about 8 x 8.8 GB.
    device = _need_gpu(90)
    graph = _big_graph(47_000, device)
    want = reference.prune_graph(graph)
    torch.cuda.empty_cache()
    return graph, want


@pytest.mark.parametrize("backend", _gpu_backends())
def test_prune_graph_47k(backend, big_graph_and_reference):
    """47,000^2 = 2.2e9 adjacency elements: masks equal to the reference's."""
    graph, want = big_graph_and_reference
    got = fastattr.prune_graph(graph, backend=backend)
    assert torch.equal(got.node_mask, want.node_mask)
    assert int((got.edge_mask ^ want.edge_mask).sum()) == 0
    assert (got.cumulative_scores - want.cumulative_scores).abs().max().item() <= 1e-6
