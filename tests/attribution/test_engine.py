"""The linear engine (fastattr.attribution.linear_engine) against circuit-tracer's own attribute().

Every TransformerLens architecture and transcoder placement the engine expresses, on random-weight
models that circuit-tracer builds (fastattr.synthetic), with shapes and seeds that the benchmarks
do not use: edge rows within 1e-5 of the largest entry, identical selected features, identical
prune masks. Plus what the engine promises beyond that: batch-size independence, the autograd
fallback with its reason, concurrent calls, dtypes, storage and offload.
"""

from __future__ import annotations

import importlib
import logging
import threading

import pytest
import torch
from helpers import assert_same_graph, tracer_prompt

import fastattr

ct = pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed (pip install '.[tracer]')")

attribute_module = importlib.import_module("fastattr.attribution.driver")
_MODELS: dict = {}


def _model(**kwargs):
    from fastattr import synthetic

    key = tuple(sorted(kwargs.items()))
    if key not in _MODELS:
        params = {"backend": "transformerlens", "n_layers": 2, "d_model": 32, "d_transcoder": 64, "n_heads": 4, "seed": 11} | kwargs
        _MODELS[key] = synthetic.make_replacement_model(**params)
    return _MODELS[key]


ARCHITECTURES = [
    pytest.param({"architecture": "llama"}, id="llama-rms-rotary-gated"),
    pytest.param({"architecture": "gpt2"}, id="gpt2-layernorm"),
    pytest.param({"architecture": "gemma2", "n_kv_heads": 2}, id="gemma2-postnorms-gqa"),
    pytest.param({"architecture": "gemma2", "feature_hooks": ("ln2.hook_normalized", "hook_mlp_out")}, id="gemma2-ln2-normalized"),
    pytest.param({"architecture": "gpt2", "feature_hooks": ("hook_resid_mid", "hook_mlp_out")}, id="gpt2-resid-mid"),
    pytest.param({"architecture": "gemma2", "n_kv_heads": 1, "feature_hooks": ("mlp.hook_in", "mlp.hook_out")}, id="gemma2-mqa-mlp-hooks"),
]


@pytest.mark.parametrize("transcoder", ["plt", "clt"])
@pytest.mark.parametrize("skip", [False, True], ids=["noskip", "skip"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_linear_engine_equals_circuit_tracer(arch, skip, transcoder):
    model = _model(transcoder=transcoder, skip_connection=skip, **arch)
    prompt = tracer_prompt(13, seed=7)
    g0 = ct.attribute(prompt, model, batch_size=24)
    g1 = fastattr.attribute(prompt, model, batch_size=24, engine="linear")
    assert attribute_module._LAST_RUN["engine"] == "linear"
    assert_same_graph(g0, g1)


@pytest.mark.parametrize("arch", [ARCHITECTURES[0], ARCHITECTURES[2]])
@pytest.mark.parametrize("transcoder", ["plt", "clt"])
def test_linear_engine_below_all_features(arch, transcoder):
    # Rows are ranked by partial influences every update_interval batches, as circuit-tracer does;
    # the engine also reorders each queue by position, which must not change the selection.
    model = _model(transcoder=transcoder, skip_connection=True, **arch)
    prompt = tracer_prompt(17, seed=3)
    g0 = ct.attribute(prompt, model, batch_size=16, max_feature_nodes=70, update_interval=2)
    g1 = fastattr.attribute(prompt, model, batch_size=16, max_feature_nodes=70, update_interval=2)
    assert attribute_module._LAST_RUN["engine"] == "linear"
    assert_same_graph(g0, g1)


@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "mha"])
def test_long_prompt_blocked_pattern_product_equals_circuit_tracer(n_kv_heads):
    # Past 2 x 64 positions the causal pattern product runs by key blocks (and with grouped heads,
    # one accumulated product per head of the group): still circuit-tracer's graph.
    model = _model(transcoder="plt", architecture="gemma2", n_kv_heads=n_kv_heads)
    prompt = tracer_prompt(150, seed=21)
    g0 = ct.attribute(prompt, model, batch_size=32, max_feature_nodes=96)
    g1 = fastattr.attribute(prompt, model, batch_size=32, max_feature_nodes=96, engine="linear")
    assert attribute_module._LAST_RUN["engine"] == "linear"
    assert max(p for _, p, _, _, _ in attribute_module._LAST_RUN["work"]["steps"]) > 128
    assert_same_graph(g0, g1)


def test_default_engine_under_the_patch_is_linear():
    model = _model(transcoder="clt", architecture="gpt2")
    prompt = tracer_prompt(9, seed=5)
    g0 = ct.attribute(prompt, model, batch_size=32)
    with fastattr.patch_circuit_tracer():
        g1 = ct.attribute(prompt, model, batch_size=32)
    assert attribute_module._LAST_RUN["engine"] == "linear"
    assert_same_graph(g0, g1, masks=False)


def test_graph_does_not_depend_on_batch_size():
    model = _model(transcoder="plt", architecture="gemma2", n_kv_heads=2)
    prompt = tracer_prompt(15, seed=9)
    small = fastattr.attribute(prompt, model, batch_size=16)
    large = fastattr.attribute(prompt, model, batch_size=256)
    a, b = small.adjacency_matrix, large.adjacency_matrix
    assert (a - b).abs().max() <= 1e-6 * a.abs().max()


def test_engines_agree_and_autograd_is_selectable():
    model = _model(transcoder="plt", skip_connection=True)
    prompt = tracer_prompt(11, seed=2)
    lin = fastattr.attribute(prompt, model, batch_size=20, engine="linear")
    auto = fastattr.attribute(prompt, model, batch_size=20, engine="autograd")
    assert attribute_module._LAST_RUN["engine"] == "autograd"
    assert_same_graph(auto, lin)


def test_unexpressed_model_falls_back_with_the_reason(caplog):
    model = _model(transcoder="plt")
    prompt = tracer_prompt(8, seed=4)
    model.cfg.parallel_attn_mlp = True  # what the engine checks; the forward does not run here
    try:
        with pytest.raises(ValueError, match="engine: 'linear' cannot express this model: cfg.parallel_attn_mlp"):
            fastattr.attribute(prompt, model, engine="linear")
        from fastattr.attribution.readers import unsupported_reason

        assert "parallel_attn_mlp" in unsupported_reason(model)
    finally:
        model.cfg.parallel_attn_mlp = False
    attribute_module._LOGGED_FALLBACKS.clear()
    nn_model = _model(backend="nnsight", transcoder="plt", n_layers=2)
    # A user's own torch hook changes the forward in a way no map can see.
    handle = nn_model._model.model.layers[1].mlp.register_forward_hook(lambda mod, args, out: out * 1.5)
    try:
        with caplog.at_level(logging.INFO, logger="fastattr"):
            fastattr.attribute(prompt, nn_model, batch_size=32)
            fastattr.attribute(prompt, nn_model, batch_size=32)
    finally:
        handle.remove()
    assert attribute_module._LAST_RUN["engine"] == "autograd"
    reasons = [r.getMessage() for r in caplog.records if "autograd engine (" in r.getMessage()]
    assert len(reasons) == 1 and "forward hook" in reasons[0]  # logged once per model
    with pytest.raises(ValueError, match="engine: expected one of"):
        fastattr.attribute(prompt, model, engine="jacobian")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_models(dtype):
    # circuit-tracer's backward runs in the model's dtype; so does the sweep, with the norms in
    # fp32 as TransformerLens computes them and the contraction accumulating in fp32. Rounding
    # differs from the B-copy autograd graph, so agreement is at half precision's level.
    model = _model(transcoder="plt", dtype=dtype, architecture="gemma2", n_kv_heads=2)
    prompt = tracer_prompt(10, seed=8)
    g0 = ct.attribute(prompt, model, batch_size=32)
    g1 = fastattr.attribute(prompt, model, batch_size=32, engine="linear")
    a0, a1 = g0.adjacency_matrix.float(), g1.adjacency_matrix.float()
    assert torch.equal(g0.selected_features, g1.selected_features)
    assert (a0 - a1).abs().max() <= 2e-2 * a0.abs().max()
    assert torch.corrcoef(torch.stack([a0.flatten(), a1.flatten()]))[0, 1] > 0.999


def test_topk_storage_and_offload_with_the_linear_engine():
    model = _model(transcoder="clt", skip_connection=True, architecture="gpt2")
    prompt = tracer_prompt(12, seed=6)
    dense = fastattr.attribute(prompt, model, batch_size=32, offload="cpu")
    assert attribute_module._LAST_RUN["engine"] == "linear"
    n = dense.adjacency_matrix.shape[0]
    topk = fastattr.attribute(prompt, model, batch_size=32, edge_storage="topk", topk=n)
    assert torch.allclose(topk.adjacency_matrix, dense.adjacency_matrix, rtol=0, atol=1e-6 * dense.adjacency_matrix.abs().max())
    # Offload put every module back where it was.
    assert all(p.device.type == "cpu" for p in model.parameters())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-6 * b.abs().max())


def test_concurrent_attributions_give_the_serial_graphs(monkeypatch):
    """Two autograd calls in two threads, one ending while the other is between backward passes:
    the contraction patch they need is shared, so the survivor keeps its hooks (an unshared patch
    undone under it gave an all-zero graph)."""
    m_first = _model(transcoder="clt", architecture="gpt2")
    m_second = _model(transcoder="plt", skip_connection=True)
    prompt = tracer_prompt(9, seed=1)
    serial = {name: fastattr.attribute(prompt, m, batch_size=16, engine="autograd") for name, m in (("first", m_first), ("second", m_second))}

    first_done = threading.Event()
    real = attribute_module._AutogradRows.compute
    calls: dict = {}

    def compute(self, *args, **kwargs):
        me = threading.current_thread().name
        calls[me] = calls.get(me, 0) + 1
        if me == "second" and calls[me] == 2:  # its second batch waits until the first call has ended
            assert first_done.wait(120)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(attribute_module._AutogradRows, "compute", compute)
    results: dict = {}
    errors: list = []

    def run(name, model, done=None):
        try:
            results[name] = fastattr.attribute(prompt, model, batch_size=16, engine="autograd")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            if done is not None:
                done.set()

    threads = [threading.Thread(target=run, args=("second", m_second), name="second"),
               threading.Thread(target=run, args=("first", m_first, first_done), name="first")]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert calls.get("second", 0) > 2  # the interleaving happened
    for name in ("first", "second"):
        assert results[name].adjacency_matrix.abs().sum() > 0
        assert _close(results[name].adjacency_matrix, serial[name].adjacency_matrix)


def test_concurrent_linear_and_autograd_calls():
    m_lin = _model(transcoder="plt", architecture="gemma2", n_kv_heads=2)
    m_auto = _model(transcoder="clt")
    prompt = tracer_prompt(9, seed=12)
    jobs = [(m_lin, "linear"), (m_auto, "autograd")]
    serial = [fastattr.attribute(prompt, m, batch_size=8, engine=e) for m, e in jobs]
    results: list = [None, None]

    def run(i, m, e):
        results[i] = fastattr.attribute(prompt, m, batch_size=8, engine=e)

    threads = [threading.Thread(target=run, args=(i, m, e)) for i, (m, e) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for got, want in zip(results, serial):
        assert _close(got.adjacency_matrix, want.adjacency_matrix)


def test_a_users_hook_runs_the_autograd_engine(caplog):
    # A hook of the user's (here one that scales the residual stream) changes the model in a way the
    # linear engine does not see: the automatic choice takes circuit-tracer's path, and says why.
    model = _model(transcoder="plt", architecture="gpt2")
    prompt = tracer_prompt(8, seed=13)

    def scale(acts, hook):
        return acts * 0.5

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", scale)]):
        g0 = ct.attribute(prompt, model, batch_size=16)
        with caplog.at_level(logging.INFO, logger="fastattr"):
            g1 = fastattr.attribute(prompt, model, batch_size=16)
        assert attribute_module._LAST_RUN["engine"] == "autograd"
        with pytest.raises(ValueError, match="blocks.0.hook_resid_post has hooks that circuit-tracer did not install"):
            fastattr.attribute(prompt, model, engine="linear")
    assert any("blocks.0.hook_resid_post" in r.getMessage() for r in caplog.records)
    assert_same_graph(g0, g1)
    fastattr.attribute(prompt, model, batch_size=16)
    assert attribute_module._LAST_RUN["engine"] == "linear"  # the hook is gone with its block


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_from_parts_is_the_stable_position_sort_of_its_parts(seed):
    # The plan's vectors are its parts' picked rows, concatenated then sorted stably by position:
    # however the largest part is read (one gather), whichever part is largest, with taken or
    # whole sources, a part of another dtype and a part at no position.
    from fastattr.attribution import hook_plans

    gen = torch.Generator().manual_seed(seed)
    d = 5
    sizes = torch.randint(0, 9, (3,), generator=gen).tolist() + [0]
    out_rows = torch.randperm(50, generator=gen)  # distinct, as one layer's rows are
    parts, picked = [], []
    for k, n in enumerate(sizes):
        source = torch.randn(n + 4, d, generator=gen, dtype=torch.float64 if k == 1 else torch.float32)
        take = None if k == 2 else torch.randperm(n + 4, generator=gen)[:n]
        source = source[:n] if take is None else source
        positions = torch.randint(0, 4, (n,), generator=gen)
        parts.append((source, take, positions, out_rows[sum(sizes[:k]) : sum(sizes[: k + 1])]))
        picked.append(source if take is None else source[take])
    plan = hook_plans._plan_from_parts(parts)
    positions = torch.cat([p for _, _, p, _ in parts])
    order = torch.argsort(positions, stable=True)
    assert torch.equal(plan.vectors, torch.cat([v.float() for v in picked])[order])
    assert torch.equal(plan.rows.long(), torch.cat([r for _, _, _, r in parts])[order])
    assert torch.equal(plan.positions.long(), positions[order])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_runs_are_whole_batches_in_order_and_merge_only_short_padding(seed):
    # cut_runs: consecutive runs covering every row once, in order, each a union of whole
    # batch_size chunks, at most max_rows, and two chunks share a run only while the run's padded
    # work (rows x its widest prefix) stays within the slack of their own.
    from fastattr.attribution import linear_engine

    gen = torch.Generator().manual_seed(seed)
    engine = linear_engine.LinearEngine.__new__(linear_engine.LinearEngine)
    engine.causal = True
    n, batch = int(torch.randint(1, 400, (1,), generator=gen)), int(torch.randint(1, 40, (1,), generator=gen))
    max_rows = batch * int(torch.randint(1, 8, (1,), generator=gen))
    positions = torch.sort(torch.randint(0, 90, (n,), generator=gen)).values
    runs = engine.cut_runs(positions, batch, max_rows)
    assert runs[0][0] == 0 and runs[-1][1] == n and all(b == c for (_, b), (c, _) in zip(runs, runs[1:]))
    for a, b in runs:
        assert a % batch == 0 and (b - a) % batch == 0 or b == n
        assert b - a <= max_rows
        chunks = [(i, min(i + batch, b)) for i in range(a, b, batch)]
        own = sum((d - c) * (int(positions[c:d].max()) + 1) for c, d in chunks)
        assert len(chunks) == 1 or (b - a) * (int(positions[a:b].max()) + 1) <= (1 + linear_engine._PAD_SLACK) * own
    # Without causal truncation every run sweeps the whole prompt: runs are max_rows long.
    engine.causal = False
    assert engine.cut_runs(positions, batch, max_rows) == [(i, min(i + max_rows, n)) for i in range(0, n, max_rows)]


def test_graph_does_not_depend_on_how_runs_are_cut(monkeypatch):
    from fastattr.attribution import linear_engine

    model = _model(transcoder="clt", architecture="llama", skip_connection=True)
    prompt = tracer_prompt(17, seed=4)
    calls = []
    run = linear_engine.LinearEngine.run
    monkeypatch.setattr(linear_engine.LinearEngine, "run", lambda self, *a: calls.append(len(a[1])) or run(self, *a))
    graphs, runs = {}, {}
    for slack in (0.0, 1e9):  # no padding beyond the batches' own / each phase one run
        monkeypatch.setattr(linear_engine, "_PAD_SLACK", slack)
        calls.clear()
        graphs[slack] = fastattr.attribute(prompt, model, batch_size=4, max_feature_nodes=48)
        runs[slack] = len(calls)
    tight, merged = graphs[0.0], graphs[1e9]
    assert runs[0.0] > runs[1e9]
    assert torch.equal(tight.selected_features, merged.selected_features)
    a, b = tight.adjacency_matrix, merged.adjacency_matrix
    assert (a - b).abs().max() <= 1e-6 * a.abs().max()
