"""benchmarks/floor.py: the floor model's counts, by hand on a tiny record and against a real
run's record."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
floor = importlib.import_module("floor")


def _record(**kw):
    layer = dict(d_model=8, n_heads=2, n_kv_heads=1, d_head=4, skip=True)
    return dict(layers=[layer, layer], causal=True, steps=[(1, 4, 0, 3, 5), (0, 4, 3, 6, 2), (-1, 4, 6, 0, 7)],
                n_pos=4, total_nodes=50, n_rows=6, n_final=20, influence_rows=[2, 4], **kw)  # fmt: skip


def test_sweep_flops_by_hand():
    f = floor.sweep_flops(_record())
    # Rows seeded at a layer skip its contraction and skip path (n_out), not its attention (n_in).
    # projections 2 P n_in D dh (H + Hkv); pattern 2 H dh n_in P(P+1)/2; skip 2 P n_out D^2;
    # contraction 2 n_out D vecs
    assert f["attention_projections"] == 2 * 4 * (3 + 6) * 8 * 4 * 3
    assert f["attention_pattern"] == 2 * 2 * 4 * (3 + 6) * 10
    assert f["skip"] == 2 * 4 * (0 + 3) * 64
    assert f["contraction"] == 2 * 8 * (0 * 5 + 3 * 2 + 6 * 7)
    nc = floor.sweep_flops(_record() | dict(causal=False))
    assert nc["attention_pattern"] == 2 * 2 * 4 * (3 + 6) * 16


def test_floor_time_and_traffic():
    shape = floor.Shape(n_layers=2, d_model=8, d_mlp=32, n_heads=2, n_kv_heads=1, d_vocab=16, d_transcoder=12, cross_layer=False)
    f = floor.floor(_record(), shape, n_active=9, flops_per_s=1e9, bytes_per_s=1e8)
    assert f.parts["edge_rows"] == 4 * 6 * 50 and f.parts["partial_influences"] == 4 * 50 * 6 and f.parts["adjacency"] == 4 * 400
    assert f.seconds == pytest.approx(f.flops / 1e9 + f.bytes / 1e8)
    assert f.fraction(2 * f.seconds) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="work: expected the record of a linear-engine run"):
        floor.floor({k: v for k, v in _record().items() if k != "steps"}, shape, 9, flops_per_s=1.0, bytes_per_s=1.0)
    with pytest.raises(ValueError, match="card: expected a name containing one of"):
        floor.gpu_rates("A100", "float32")
    assert floor.gpu_rates("NVIDIA H100 80GB HBM3", "bfloat16") == (989.4e12, 3.35e12)


def test_record_of_a_real_run():
    """The engine's record covers every row it computed: per run, the token step sees every row of
    the run, a layer step never more, and a layer contracts no more rows than it carries down."""
    import fastattr
    from fastattr import synthetic

    driver = importlib.import_module("fastattr.attribution.driver")
    model = synthetic.make_replacement_model(n_layers=3, d_model=32, d_transcoder=64, feature_density=0.1, seed=5)
    prompt = synthetic.random_prompt(7, seed=2)
    graph = fastattr.attribute(prompt, model, batch_size=8, max_feature_nodes=20, engine="linear")
    work = driver._LAST_RUN["work"]
    tokens = [s for s in work["steps"] if s[0] == -1]
    assert sum(n for _, _, n, _, _ in tokens) == work["n_rows"] == len(graph.selected_features) + len(graph.logit_targets)
    layer_steps = [s for s in work["steps"] if s[0] >= 0]
    assert all(n_out <= n_in <= max(t[2] for t in tokens) and P <= work["n_pos"] for _, P, n_out, n_in, _ in layer_steps)
    # Rows seeded below the top layer: some layer contracts fewer rows than it carries down.
    assert any(n_out < n_in for _, _, n_out, n_in, _ in layer_steps)
    assert len(work["influence_rows"]) == driver._LAST_RUN["influence_updates"] > 0
    assert work["n_final"] == graph.adjacency_matrix.shape[0]
