"""Property tests: every public op against fastattr.reference (circuit-tracer's arithmetic) on
random shapes, strides, dtypes and values, adversarial ones included, on every backend here.

Graphs are DAGs in circuit-tracer's node layout (``helpers.random_graph``): features by
(layer, position), errors, tokens, logits; a target reads only earlier layers and positions.
Value families stress the kernels: heavy tails, exact ties, zero rows, denormals, entries near the
float32 range. Example counts are modest and derandomised so that CI runs the same few hundred
cases in about a minute (Triton runs on the numpy interpreter without a GPU, hence fewer cases).
"""

from __future__ import annotations

import types

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install '.[test]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastattr  # noqa: E402
from fastattr import reference  # noqa: E402
from fastattr._runtime import checks as _checks

from helpers import backend_device, backend_params, interpreted, logit_weights, random_graph  # noqa: E402

BACKENDS = backend_params()


def _settings(backend: str, n: int):
    return settings(
        max_examples=max(5, n // 3) if interpreted(backend) else n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def run(backend: str, n: int, strategy, check):
    """Run ``check(example)`` over ``n`` examples (fewer on the Triton interpreter)."""
    given(strategy)(_settings(backend, n)(check))()


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------

VALUE_KINDS = ("normal", "ties", "denormal", "huge", "tiny", "sparse")


def adversarial(x: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """Reshape the values of ``x`` (zeros stay zeros) into one of the adversarial families."""
    g = torch.Generator().manual_seed(seed)
    nz = x != 0
    if kind == "ties":  # few distinct magnitudes: sorting and radix selects meet equal keys
        x = torch.sign(x) * torch.randint(1, 4, x.shape, generator=g).to(x.dtype)
    elif kind == "denormal":
        x = x * 1e-40
    elif kind == "huge":  # large, but every circuit-tracer quantity still fits float32
        x = x * 1e15
    elif kind == "tiny":
        x = x * 1e-30
    elif kind == "sparse":
        x = torch.where(torch.rand(x.shape, generator=g) < 0.8, torch.zeros((), dtype=x.dtype), x)
    return torch.where(nz, x, torch.zeros((), dtype=x.dtype))


graphs = st.builds(
    dict,
    n_layers=st.integers(1, 3),
    n_pos=st.integers(1, 4),
    feats_per=st.integers(0, 3),
    n_logits=st.integers(1, 3),
    density=st.sampled_from([0.2, 0.6, 1.0]),
    seed=st.integers(0, 2**16),
    zero_rows=st.integers(0, 2),
    kind=st.sampled_from(VALUE_KINDS),
    layout=st.sampled_from(["contiguous", "strided"]),
)


def make_graph(spec: dict, device) -> types.SimpleNamespace:
    spec = dict(spec)
    kind, layout = spec.pop("kind"), spec.pop("layout")
    graph = random_graph(device="cpu", **spec)
    A = adversarial(graph.adjacency_matrix, kind, spec["seed"])
    if layout == "strided":  # a column-major view and a padded row stride: kernels take strides
        n = A.shape[0]
        padded = torch.zeros(n, n + 3)
        padded[:, :n] = A
        A = padded[:, :n] if spec["seed"] % 2 else A.T.contiguous().T
    graph.adjacency_matrix = A.to(device)
    graph.logit_probabilities = graph.logit_probabilities.to(device)
    return graph


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 2e-5) -> None:
    """Within rtol of the largest |entry| (float32 rounding, summation order)."""
    assert got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN entries differ"  # 0/0 cumulative scores, as circuit-tracer
    got, want = got[~nan], want[~nan]
    scale = max(float(want.abs().max()) if want.numel() else 0.0, 1e-38)
    err = float((got.double() - want.double()).abs().max()) if want.numel() else 0.0
    assert err <= rtol * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def same_outcome(fast, ref):
    """Run both; they must both raise (RuntimeError family) or both return. Returns the results."""
    try:
        want = ref()
    except RuntimeError:
        with pytest.raises(RuntimeError):
            fast()
        return None, None
    return fast(), want


# ------------------------------------------------------------------------------------------------
# The contraction
# ------------------------------------------------------------------------------------------------

contractions = st.builds(
    dict,
    B=st.integers(1, 5),
    P=st.integers(1, 5),
    D=st.integers(1, 40),
    S=st.integers(0, 40),
    R_extra=st.integers(0, 3),
    repeats=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    layout=st.sampled_from(["rb", "br"]),
    grads_view=st.sampled_from(["contiguous", "batch_slice", "position_slice"]),
    out_view=st.sampled_from(["contiguous", "transposed", "padded"]),
    out_fp32=st.booleans(),
    kind=st.sampled_from(VALUE_KINDS),
    seed=st.integers(0, 2**16),
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_contract_matches_reference(backend):
    dev = backend_device(backend)

    def check(c):
        if backend == "triton" and c["dtype"] == torch.bfloat16 and interpreted(backend):
            c["dtype"] = torch.float16  # refused under the interpreter (tested in test_bad_inputs)
        g = torch.Generator().manual_seed(c["seed"])
        B, P, D, S = c["B"], c["P"], c["D"], c["S"]
        big = torch.randn(B + 2, P + 2, D, generator=g)
        grads = {"contiguous": big[:B, :P], "batch_slice": big[1 : B + 1, :P], "position_slice": big[:B, 2 : P + 2]}[
            c["grads_view"]]
        grads = adversarial(grads, "ties" if c["kind"] == "ties" else "normal", c["seed"]).to(c["dtype"])
        vectors = adversarial(torch.randn(S, D, generator=g), c["kind"] if c["kind"] != "huge" else "normal", c["seed"])
        vectors = vectors.to(c["dtype"])
        positions = torch.randint(0, P, (S,), generator=g)
        n_rows = S if not c["repeats"] else max(1, S // 2)
        rows = torch.randperm(S, generator=g) if not c["repeats"] else torch.randint(0, n_rows, (S,), generator=g)
        R = max(n_rows, int(rows.max()) + 1 if S else 0) + c["R_extra"]
        out_dtype = torch.float32 if c["out_fp32"] else c["dtype"]
        shape = (R, B) if c["layout"] == "rb" else (B, R)
        if c["out_view"] == "transposed":
            out = torch.zeros(shape[::-1], dtype=out_dtype).T
        elif c["out_view"] == "padded":
            out = torch.zeros(shape[0], shape[1] + 2, dtype=out_dtype)[:, 1 : shape[1] + 1]
        else:
            out = torch.zeros(shape, dtype=out_dtype)
        init = torch.randn(shape, generator=g).to(out_dtype)
        out.copy_(init)
        want = reference.contract(grads.float(), vectors.float(), positions, rows, init.float().clone(),
                                  out_layout=c["layout"])  # fmt: skip
        got = fastattr.contract(grads.to(dev), vectors.to(dev), positions.to(dev), rows.to(dev), out.to(dev),
                                out_layout=c["layout"], backend=backend)  # fmt: skip
        tol = 2e-5 if c["dtype"] == torch.float32 and out_dtype == torch.float32 else 1e-2
        close(got.float().cpu(), want, rtol=tol)

    run(backend, 80, contractions, check)


# ------------------------------------------------------------------------------------------------
# Influence
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_node_and_edge_influence_match_reference(backend):
    dev = backend_device(backend)

    def check(spec):
        graph = make_graph(spec, dev)
        A, w = graph.adjacency_matrix, logit_weights(graph)
        got, want = same_outcome(lambda: fastattr.compute_node_influence(A, w, backend=backend),
                                 lambda: reference.compute_node_influence(A.cpu(), w.cpu()))  # fmt: skip
        if want is not None:
            assert torch.isfinite(got).all()
            close(got.cpu(), want)
        if A.shape[0] <= 40:
            got, want = same_outcome(lambda: fastattr.compute_edge_influence(A, w, backend=backend),
                                     lambda: reference.compute_edge_influence(A.cpu(), w.cpu()))  # fmt: skip
            if want is not None:
                close(got.cpu(), want)

    run(backend, 80, graphs, check)


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_influence_matches_or_raises_like_reference(backend):
    """compute_influence on the raw matrix: where circuit-tracer's series overflows float32 it
    fails to converge; fastattr raises too (a RuntimeError subclass), never returns Inf or NaN."""
    dev = backend_device(backend)

    def check(spec):
        graph = make_graph(spec, dev)
        A = graph.adjacency_matrix
        if spec["kind"] == "huge":
            A = A * 1e10  # products of entries along a path pass 3.4e38
        w = logit_weights(graph)
        got, want = same_outcome(lambda: fastattr.compute_influence(A, w, backend=backend),
                                 lambda: reference.compute_influence(A.cpu(), w.cpu()))  # fmt: skip
        if want is None:
            return
        if not torch.isfinite(want).all():  # only the total overflowed: fastattr raises there (documented)
            with pytest.raises(_checks.NonFiniteInfluenceError):
                fastattr.compute_influence(A, w, backend=backend)
            return
        close(got.cpu(), want, rtol=1e-4)

    run(backend, 60, graphs, check)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_influences_match_reference(backend):
    dev = backend_device(backend)

    def check(args):
        spec, n_rows_frac, seed = args
        graph = make_graph(spec, dev)
        A, probs = graph.adjacency_matrix, graph.logit_probabilities
        n, n_logits = A.shape[0], probs.numel()
        g = torch.Generator().manual_seed(seed)
        # Rows attributed so far: the logits first, then some feature/error/token rows.
        others = torch.randperm(n - n_logits, generator=g)[: int(n_rows_frac * (n - n_logits))]
        idx = torch.cat([torch.arange(n - n_logits, n), others])
        edge = A[idx.to(A.device)]
        got, want = same_outcome(
            lambda: fastattr.compute_partial_influences(edge, probs, idx.to(dev), backend=backend),
            lambda: reference.compute_partial_influences(edge.cpu(), probs.cpu(), idx),
        )
        if want is not None:
            close(got.cpu(), want)

    run(backend, 60, st.tuples(graphs, st.sampled_from([0.0, 0.5, 1.0]), st.integers(0, 2**16)), check)


# ------------------------------------------------------------------------------------------------
# Thresholds, top-k, pruning
# ------------------------------------------------------------------------------------------------

score_vectors = st.builds(
    dict,
    n=st.integers(1, 300),
    dist=st.sampled_from(["uniform", "exponential", "ties", "zeros", "denormal", "one_big", "huge"]),
    threshold=st.one_of(st.sampled_from([0.0, 0.5, 0.8, 0.98, 1.0]), st.floats(0.0, 1.0)),
    seed=st.integers(0, 2**16),
)


def make_scores(s: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(s["seed"])
    n = s["n"]
    x = {
        "uniform": lambda: torch.rand(n, generator=g),
        "exponential": lambda: torch.exp(3 * torch.randn(n, generator=g)),
        "ties": lambda: torch.randint(0, 4, (n,), generator=g).float() / 4,
        "zeros": lambda: torch.where(torch.rand(n, generator=g) < 0.9, 0.0, torch.rand(n, generator=g)),
        "denormal": lambda: torch.rand(n, generator=g) * 1e-41,
        "one_big": lambda: torch.cat([torch.tensor([1e6]), torch.rand(n - 1, generator=g)]),
        "huge": lambda: torch.rand(n, generator=g) * 1e34,
    }[s["dist"]]()
    return x.float()


@pytest.mark.parametrize("backend", BACKENDS)
def test_find_threshold_equals_reference(backend):
    dev = backend_device(backend)

    def check(s):
        x = make_scores(s)
        want = reference.find_threshold(x, s["threshold"])
        got = fastattr.find_threshold(x.to(dev), s["threshold"], backend=backend)
        assert got.dtype == want.dtype and got.dim() == 0
        assert float(got) == float(want), (float(got), float(want))

    run(backend, 150, score_vectors, check)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_edges_keeps_the_k_strongest(backend):
    dev = backend_device(backend)

    def check(args):
        spec, k = args
        A = make_graph(spec, "cpu").adjacency_matrix
        got = fastattr.topk_edges(A.to(dev), k, backend=backend)
        want = fastattr.topk_edges(A, k, backend="torch")  # stable sort by |A|: ties to the lower column
        assert torch.equal(got.crow_indices.cpu(), want.crow_indices)
        assert torch.equal(got.col_indices.cpu(), want.col_indices)
        assert torch.equal(got.values.cpu(), want.values)
        close(got.row_abs_sum.cpu(), A.abs().double().sum(1).float(), rtol=1e-6)
        dense = torch.zeros_like(A)
        dense[got.row_indices().cpu(), got.col_indices.cpu()] = got.values.cpu()
        assert torch.equal(dense, torch.where(dense != 0, A, 0.0))  # stored entries are A's own

    run(backend, 60, st.tuples(graphs, st.one_of(st.none(), st.integers(0, 6))), check)


THRESHOLD_PAIRS = [(0.8, 0.98), (0.5, 0.5), (0.0, 0.8), (0.95, 0.9), (0.3, 0.0)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_prune_graph_equals_reference(backend):
    dev = backend_device(backend)

    def check(args):
        spec, (nt, et) = args
        graph = make_graph(spec, dev)
        cpu_graph = types.SimpleNamespace(**{**vars(graph), "adjacency_matrix": graph.adjacency_matrix.cpu(),
                                             "logit_probabilities": graph.logit_probabilities.cpu()})  # fmt: skip
        want = reference.prune_graph(cpu_graph, nt, et)
        got = fastattr.prune_graph(graph, nt, et, backend=backend)
        assert torch.equal(got.node_mask.cpu(), want.node_mask)
        assert torch.equal(got.edge_mask.cpu(), want.edge_mask)
        close(got.cumulative_scores.cpu(), want.cumulative_scores, rtol=1e-5)
        sparse = fastattr.prune_graph_sparse(graph, nt, et, backend=backend)
        if bool(want.edge_mask.all()):
            # The edge threshold clamped to 0 (et = 0, or all-zero scores): the dense mask keeps all
            # N^2 entries, zeros included, so no node dangles; the sparse one keeps every stored
            # edge and drops nodes without any (documented in prune_graph_sparse).
            return
        assert torch.equal(sparse.node_mask.cpu(), want.node_mask)
        if et > 0:
            kept = torch.zeros_like(want.edge_mask)
            kept[sparse.edges.row_indices().cpu(), sparse.edges.col_indices.cpu()] = True
            assert torch.equal(kept, want.edge_mask & (cpu_graph.adjacency_matrix != 0))

    run(backend, 60, st.tuples(graphs, st.sampled_from(THRESHOLD_PAIRS)), check)


@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_scores_match_reference(backend):
    dev = backend_device(backend)

    def check(spec):
        graph = make_graph(spec, dev)
        graph.cfg = types.SimpleNamespace(n_layers=spec["n_layers"])
        cpu_graph = types.SimpleNamespace(**{**vars(graph), "adjacency_matrix": graph.adjacency_matrix.cpu(),
                                             "logit_probabilities": graph.logit_probabilities.cpu()})  # fmt: skip
        want = reference.compute_graph_scores(cpu_graph)
        got = fastattr.compute_graph_scores(graph, backend=backend)
        for a, b in zip(got, want):
            assert (a != a and b != b) or abs(a - b) <= 1e-5 * max(1.0, abs(b)), (got, want)

    run(backend, 40, graphs, check)
