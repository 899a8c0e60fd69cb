"""circuit-tracer's attribute() with and without fastattr's contraction, on a hook-dominated workload.

A workload where the backward hooks dominate: 8 layers, d_model 256, 4096 features per layer, ~64
positions, about 48 active features per position and layer, 3000 feature nodes, batch 128.

Usage: python benchmarks/attribute_hook_workload.py [plt|clt]
Prints both wall times, the speedup and the agreement of the two graphs.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    from circuit_tracer import attribute

    import fastattr
    from fastattr import synthetic

    kind = sys.argv[1] if len(sys.argv) > 1 else "plt"
    model = synthetic.make_replacement_model(transcoder=kind, n_layers=8, d_model=256, d_transcoder=4096, seed=0,
                                             feature_density=48 / 4096)  # fmt: skip
    prompt = synthetic.random_prompt(64, seed=1)
    start = time.perf_counter()
    g0 = attribute(prompt, model, batch_size=128, max_feature_nodes=3000)
    t0 = time.perf_counter() - start
    with fastattr.patch_circuit_tracer(graph=False, attribute=False):
        start = time.perf_counter()
        g1 = attribute(prompt, model, batch_size=128, max_feature_nodes=3000)
        t1 = time.perf_counter() - start
    rel = ((g0.adjacency_matrix - g1.adjacency_matrix).abs().max() / g0.adjacency_matrix.abs().max()).item()
    print(f"{kind}: {g0.active_features.shape[0]} active features, {len(g0.input_tokens)} positions")
    print(f"circuit-tracer {t0:.2f}s, patched contraction {t1:.2f}s, speedup {t0 / t1:.2f}x")
    print(f"adjacency max rel. difference {rel:.2e}, selected features equal: {torch.equal(g0.selected_features, g1.selected_features)}")


if __name__ == "__main__":
    main()
