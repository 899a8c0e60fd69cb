"""Deterministic mode of the contraction and of fastattr.attribute: run-to-run bitwise identical.

Repeated output rows (several vectors adding into one row) are summed with float atomics by
default, in whatever order the threads or blocks run. ``deterministic=True`` (or torch's
``use_deterministic_algorithms``) runs the plan pass by pass, no row repeated within a launch and
no atomics. These tests check that the deterministic path is what ran (``plan.last_launches``),
that it agrees with the reference, and that repeated calls give the same bits.
"""

from __future__ import annotations


import pytest
import torch

import fastattr
from fastattr import ContractionPlan, reference

from helpers import backend_params, deterministic_algorithms, interpreted, tracer_model, tracer_prompt

BACKENDS = backend_params()


def _repeated_case(B=6, P=5, D=40, S=150, R=9, *, dtype=torch.float32, seed=0, device="cpu"):
    """Many vectors per row (S / R on average), spread over positions: atomics collide."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(B, P, D, generator=gen).to(dtype)
    vectors = torch.randn(S, D, generator=gen).to(dtype)
    positions = torch.randint(0, P, (S,), generator=gen)
    rows = torch.randint(0, R, (S,), generator=gen)
    return grads.to(device), vectors.to(device), positions.to(device), rows.to(device)


def _device(backend):
    from helpers import backend_device

    return backend_device(backend)


def _skip_bf16(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and interpreted("triton"):
        pytest.skip("bf16 tl.dot returns garbage under TRITON_INTERPRET=1; bf16 Triton runs in the GPU suite")


def test_passes_hold_each_row_once_and_cover_every_vector():
    grads, vectors, positions, rows = _repeated_case(S=200, R=7, seed=3)
    plan = ContractionPlan(vectors, positions, rows)
    assert not plan.unique_rows
    counts = torch.bincount(rows, minlength=7)
    assert plan.n_passes == int(counts.max())
    # Still sorted by position (prefixes and the plain tiles rely on it), and pass k holds the
    # k-th vector of each row in position order.
    assert bool((plan.positions[1:] >= plan.positions[:-1]).all())
    for k in range(plan.n_passes):
        in_pass = plan.rows[plan.passes == k]
        assert in_pass.numel() == len(torch.unique(in_pass)) == int((counts > k).sum())
    for block_s in (1, 4, 64):
        pos, start, end = plan.tiles(block_s, by_pass=True)
        covered = torch.cat([torch.arange(s, e) for s, e in zip(start.tolist(), end.tolist())])
        assert torch.equal(covered.sort().values, torch.arange(200))
        assert bool(((end - start) <= block_s).all()) and bool((end > start).all())
        tile_pass = torch.stack([plan.passes[s] for s in start.tolist()])
        assert bool((tile_pass[1:] >= tile_pass[:-1]).all()), "tiles are launched pass by pass"
        for p, s, e, k in zip(pos.tolist(), start.tolist(), end.tolist(), tile_pass.tolist()):
            assert bool((plan.positions[s:e] == p).all()) and bool((plan.passes[s:e] == k).all())


def test_unique_rows_have_one_pass():
    grads, vectors, positions, _ = _repeated_case(S=30, R=9)
    plan = ContractionPlan(vectors, positions, torch.randperm(30))
    assert plan.unique_rows and plan.n_passes == 1 and bool((plan.passes == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["fp32", "fp16", "bf16", "fp64"])  # fmt: skip
@pytest.mark.parametrize("layout", ["rb", "br"])
def test_deterministic_matches_reference_and_repeats_bitwise(backend, dtype, layout):
    _skip_bf16(backend, dtype)
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the triton backend takes no float64 (tested in test_float64.py)")
    dev = _device(backend)
    grads, vectors, positions, rows = _repeated_case(dtype=dtype, seed=5, device=dev)
    plan = ContractionPlan(vectors, positions, rows)
    R, B = 9, grads.shape[0]
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    base = torch.randn(R, B, generator=torch.Generator().manual_seed(1)).to(dev, out_dtype)
    base = base if layout == "rb" else base.T.contiguous()
    expected = base.clone().double()
    reference.contract(grads.double(), vectors.double(), positions, rows, expected, out_layout=layout)

    results = []
    for _ in range(4):
        out = base.clone()
        plan(out=out, grads=grads, out_layout=layout, backend=backend, deterministic=True)
        assert fastattr.last_backend("contract") == backend
        ran = plan.last_launches
        assert ran.backend == backend and ran.deterministic and not ran.atomic
        # The cpu kernel orders repeated rows itself (threads own batch columns), in one launch.
        assert plan.n_passes > 1 and ran.launches == (1 if backend == "cpu" else plan.n_passes)
        results.append(out)
    for out in results[1:]:
        assert torch.equal(out, results[0]), "deterministic runs differ"
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(results[0].double(), expected, rtol=tol, atol=tol * 10)

    default = base.clone()
    plan(grads, default, out_layout=layout, backend=backend, deterministic=False)
    assert not plan.last_launches.deterministic
    assert plan.last_launches.launches == 1
    assert plan.last_launches.atomic == (backend != "torch")
    torch.testing.assert_close(results[0].double(), default.double(), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_output_buffer(backend):
    dev = _device(backend)
    grads, vectors, positions, rows = _repeated_case(dtype=torch.float16, seed=8, device=dev)
    plan = ContractionPlan(vectors, positions, rows)
    base = torch.randn(9, grads.shape[0], generator=torch.Generator().manual_seed(2)).half().to(dev)
    runs = [plan(grads, base.clone(), backend=backend, deterministic=True) for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
    expected = base.clone().float()
    reference.contract(grads.float(), vectors.float(), positions, rows, expected)
    # Each pass rounds its partial sum into the half buffer: a few half ulps per pass.
    torch.testing.assert_close(runs[0].float(), expected, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("below", [0, 2, 4, 5])
def test_deterministic_positions_below(backend, below):
    dev = _device(backend)
    grads, vectors, positions, rows = _repeated_case(P=5, seed=9, device=dev)
    plan = ContractionPlan(vectors, positions, rows)
    g = grads[:, : max(below, 1)].contiguous()
    base = torch.randn(9, g.shape[0], generator=torch.Generator().manual_seed(4)).to(dev)
    keep = positions < below
    expected = base.clone().double()
    reference.contract(g.double(), vectors[keep].double(), positions[keep], rows[keep], expected)
    runs = [plan(g, base.clone(), backend=backend, positions_below=below, deterministic=True) for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
    torch.testing.assert_close(runs[0].double(), expected, rtol=1e-5, atol=1e-5)
    if below and backend != "cpu":
        # Only passes that have vectors below the bound launch.
        in_prefix = plan.passes[plan.positions < below]
        assert plan.last_launches.launches == len(torch.unique(in_prefix))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unique_rows_deterministic_is_the_default_path(backend):
    dev = _device(backend)
    grads, vectors, positions, _ = _repeated_case(S=60, seed=11, device=dev)
    rows = torch.randperm(70, generator=torch.Generator().manual_seed(0))[:60].to(dev)
    plan = ContractionPlan(vectors, positions, rows)
    a = plan(grads, torch.zeros(70, grads.shape[0], device=dev), backend=backend, deterministic=True)
    assert plan.last_launches.launches == 1 and not plan.last_launches.atomic
    b = plan(grads, torch.zeros(70, grads.shape[0], device=dev), backend=backend, deterministic=False)
    assert not plan.last_launches.atomic
    assert torch.equal(a, b)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_out_with_repeated_rows_is_not_atomic(out_dtype):
    """The cpu kernel has no half-precision atomic add: it runs repeated rows' tasks in order, so
    the default path is already run-to-run identical and last_launches says no atomics ran."""
    grads, vectors, positions, rows = _repeated_case(dtype=out_dtype, seed=13)
    plan = ContractionPlan(vectors, positions, rows)
    runs = []
    for _ in range(3):
        runs.append(plan(grads, torch.zeros(9, grads.shape[0], dtype=out_dtype), backend="cpu", deterministic=False))
        assert not plan.last_launches.deterministic and not plan.last_launches.atomic
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
    expected = torch.zeros(9, grads.shape[0], dtype=torch.float64)
    reference.contract(grads.double(), vectors.double(), positions, rows, expected)
    # every add rounds to the half-precision out: error relative to the largest row's magnitude
    tol = {torch.float16: 1e-2, torch.bfloat16: 4e-2}[out_dtype]
    assert (runs[0].double() - expected).abs().max() <= tol * expected.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_switch_turns_it_on(backend):
    dev = _device(backend)
    grads, vectors, positions, rows = _repeated_case(seed=12, device=dev)
    plan = ContractionPlan(vectors, positions, rows)
    out = torch.zeros(9, grads.shape[0], device=dev)
    with deterministic_algorithms(True):
        plan(grads, out, backend=backend)
        assert plan.last_launches.deterministic and not plan.last_launches.atomic
        # An explicit flag wins over torch's switch.
        plan(grads, out, backend=backend, deterministic=False)
        assert not plan.last_launches.deterministic
    fastattr.contract(grads, vectors, positions, rows, out, backend=backend, deterministic=True)
    with pytest.raises(TypeError, match="deterministic: expected True, False or None, got 'yes'"):
        plan(grads, out, backend=backend, deterministic="yes")


def test_cpu_kernel_sums_do_not_depend_on_alignment():
    """The CPU kernel's dot products must not take their order from the buffers' addresses (a
    vectoriser peeling to an aligned start would): the same values at shifted addresses give the
    same bits."""
    if "cpu" not in fastattr.available_backends():
        pytest.skip("the compiled cpu backend is unavailable")
    B, P, D, S = 5, 3, 67, 40
    gen = torch.Generator().manual_seed(0)
    grads0 = torch.randn(B, P, D, generator=gen)
    vectors0 = torch.randn(S, D, generator=gen)
    positions = torch.randint(0, P, (S,), generator=gen)
    rows = torch.randperm(S, generator=gen)
    results = []
    for shift in range(8):
        g = torch.empty(B * P * D + shift)[shift:].view(B, P, D)
        g.copy_(grads0)
        v = torch.empty(S * D + shift)[shift:].view(S, D)
        v.copy_(vectors0)
        out = torch.zeros(S, B)
        fastattr.contract(g, v, positions, rows, out, backend="cpu")
        results.append(out)
    for shift, out in enumerate(results[1:], 1):
        assert torch.equal(out, results[0]), f"shift {shift} changed the sums"


# ------------------------------------------------------------------------------------ attribute


def _graph_bits(graph):
    return (graph.adjacency_matrix, graph.active_features, graph.selected_features, graph.activation_values)


def _assert_same_bits(g0, g1):
    for a, b in zip(_graph_bits(g0), _graph_bits(g1)):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert [t.vocab_idx for t in g0.logit_targets] == [t.vocab_idx for t in g1.logit_targets]


@pytest.mark.parametrize("engine", ["linear", "autograd"])
@pytest.mark.parametrize("max_nodes", [30, None], ids=["ranked", "all"])
def test_attribute_deterministic_graphs_are_bitwise_identical(engine, max_nodes):
    """A cross-layer transcoder (several decoder rows per feature); with max_feature_nodes the
    features are ranked by partial influences between batches, so the influence ops run too."""
    from fastattr.attribution.driver import _LAST_RUN

    model = tracer_model("transformerlens", "clt")
    prompt = tracer_prompt(10, seed=5)
    kw = dict(batch_size=8, max_feature_nodes=max_nodes, update_interval=1, engine=engine)
    g0 = fastattr.attribute(prompt, model, deterministic=True, **kw)
    assert _LAST_RUN["deterministic"] is True and _LAST_RUN["engine"] == engine
    g1 = fastattr.attribute(prompt, model, deterministic=True, **kw)
    _assert_same_bits(g0, g1)
    default = fastattr.attribute(prompt, model, deterministic=False, **kw)
    assert _LAST_RUN["deterministic"] is False
    assert torch.equal(default.selected_features, g0.selected_features)
    torch.testing.assert_close(default.adjacency_matrix, g0.adjacency_matrix, rtol=1e-5, atol=1e-6)


def test_attribute_follows_torchs_switch_and_the_linear_engine_runs_under_it():
    """Under torch.usedeterministic_algorithms(True) the linear engine's torch ops must not raise
    (torch refuses ops that have no deterministic implementation), and the run is deterministic."""
    from fastattr.attribution.driver import _LAST_RUN

    model = tracer_model("transformerlens", "clt")
    prompt = tracer_prompt(9, seed=6)
    with deterministic_algorithms(True):
        g0 = fastattr.attribute(prompt, model, batch_size=8, engine="linear")
        assert _LAST_RUN["deterministic"] is True
        g1 = fastattr.attribute(prompt, model, batch_size=8, engine="linear")
    _assert_same_bits(g0, g1)
    plain = fastattr.attribute(prompt, model, batch_size=8, engine="linear")
    assert _LAST_RUN["deterministic"] is False
    torch.testing.assert_close(plain.adjacency_matrix, g0.adjacency_matrix, rtol=1e-5, atol=1e-6)


def test_attribute_rejects_a_bad_flag():
    model = tracer_model("transformerlens", "plt")
    with pytest.raises(TypeError, match="deterministic: expected True, False or None, got 1"):
        fastattr.attribute(tracer_prompt(5), model, deterministic=1)


@pytest.mark.parametrize("engine", ["linear", "autograd"])
def test_attribute_passes_the_flag_to_every_op_that_has_it(monkeypatch, engine):
    """Every contraction and every partial-influence update of the run gets the resolved flag."""
    from fastattr.attribution import edge_store

    seen = {"contract": [], "partial_influences": []}
    plan_call = ContractionPlan.__call__
    partial = edge_store.DenseRows.partial_influences

    def spy_plan(self, *args, **kwargs):
        seen["contract"].append(kwargs.get("deterministic"))
        return plan_call(self, *args, **kwargs)

    def spy_partial(self, *args, **kwargs):
        seen["partial_influences"].append(kwargs.get("deterministic"))
        return partial(self, *args, **kwargs)

    monkeypatch.setattr(ContractionPlan, "__call__", spy_plan)
    monkeypatch.setattr(edge_store.DenseRows, "partial_influences", spy_partial)
    model = tracer_model("transformerlens", "clt")
    for flag in (True, False):
        for calls in seen.values():
            calls.clear()
        fastattr.attribute(tracer_prompt(8, seed=2), model, batch_size=8, max_feature_nodes=20, update_interval=1,
                           engine=engine, deterministic=flag)  # fmt: skip
        for op, calls in seen.items():
            assert calls and set(calls) == {flag}, (op, calls)
