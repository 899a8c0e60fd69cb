"""The end-to-end demo: circuit-tracer's path against fastattr's on a bundled synthetic model.

It builds a random-weight replacement model (``fastattr.synthetic``), attributes one prompt and
prunes the graph twice, once with circuit-tracer as installed and once under
:func:`fastattr.patch_circuit_tracer`, checks that the two graphs agree, and prints the time and
peak memory of each. Exit status 0 means they agree.
"""

from __future__ import annotations

import os
import time

import torch

SIZES = {
    # about 20 s on a 2-core CPU
    "small": dict(n_layers=4, d_model=128, d_transcoder=1024, n_tokens=32, max_feature_nodes=800, batch_size=64, density=24 / 1024),
    # a hook-dominated workload (many features per layer): about 90 s on a 2-core CPU
    "medium": dict(n_layers=8, d_model=256, d_transcoder=4096, n_tokens=64, max_feature_nodes=3000, batch_size=128, density=48 / 4096),
}


def _measure(fn, device):
    from fastattr._runtime.memory import PeakMemory

    with PeakMemory(device) as mem:
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return result, seconds, mem.peak_bytes, mem.method


def run_demo(size: str = "small", device: str | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import circuit_tracer
    from circuit_tracer import graph as ct_graph

    import fastattr
    from fastattr import synthetic

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = SIZES[size]
    print(f"fastattr {fastattr.__version__} demo ({size}) on {dev}; circuit-tracer {fastattr.patch.circuit_tracer_version()}")
    model = synthetic.make_replacement_model(
        backend="transformerlens", transcoder="plt", n_layers=cfg["n_layers"], d_model=cfg["d_model"],
        d_transcoder=cfg["d_transcoder"], feature_density=cfg["density"], seed=0, device=dev,
    )  # fmt: skip
    prompt = synthetic.random_prompt(cfg["n_tokens"], seed=1)
    print(f"model: {cfg['n_layers']} layers, d_model {cfg['d_model']}, {cfg['d_transcoder']} features per layer; "
          f"{cfg['n_tokens']} tokens, up to {cfg['max_feature_nodes']} feature nodes, batch {cfg['batch_size']}")  # fmt: skip

    def pipeline():
        graph = circuit_tracer.attribute(prompt, model, batch_size=cfg["batch_size"], max_feature_nodes=cfg["max_feature_nodes"])
        return graph, ct_graph.prune_graph(graph)

    (g_ref, p_ref), t_ref, m_ref, method = _measure(pipeline, dev)
    with fastattr.patch_circuit_tracer():
        (g_fast, p_fast), t_fast, m_fast, _ = _measure(pipeline, dev)
        backends = fastattr.last_backend()

    A0, A1 = g_ref.adjacency_matrix, g_fast.adjacency_matrix
    rel = ((A0 - A1).abs().max() / A0.abs().max().clamp_min(1e-30)).item()
    checks = {
        "adjacency max rel. difference <= 1e-5": rel <= 1e-5,
        "selected features equal": torch.equal(g_ref.selected_features, g_fast.selected_features),
        "prune node masks equal": torch.equal(p_ref.node_mask, p_fast.node_mask),
        "prune edge masks equal": torch.equal(p_ref.edge_mask, p_fast.edge_mask),
    }
    n = A0.shape[0]
    print(f"graph: {n} nodes, {g_ref.active_features.shape[0]} active features, "
          f"{int(p_ref.node_mask.sum())} nodes and {int(p_ref.edge_mask.sum())} edges kept after pruning")  # fmt: skip
    print(f"fastattr backends used: {backends}")
    print(f"\n{'path':<26}{'time (s)':>10}{'peak memory (MB)':>20}")
    print(f"{'circuit-tracer':<26}{t_ref:>10.2f}{m_ref / 2**20:>20.1f}")
    print(f"{'fastattr (patched)':<26}{t_fast:>10.2f}{m_fast / 2**20:>20.1f}")
    print(f"speedup {t_ref / t_fast:.2f}x  (memory: {method})")
    print(f"\nadjacency max relative difference: {rel:.2e}")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    return 0 if all(checks.values()) else 1
