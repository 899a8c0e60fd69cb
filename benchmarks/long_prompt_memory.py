"""Peak memory and time of one attribution (and optionally pruning) on a long prompt.

Run each path in its own process: the CPU peak is sampled RSS above the level before the call
(the model is built first and not counted); on CUDA it is the allocator's peak.

    python benchmarks/long_prompt_memory.py PATH [--tokens 512] [--layers 6] [--d-model 128]
        [--features 512] [--l0 16] [--batch 32] [--max-nodes 4096] [--storage dense|topk] [--prune]
        [--backend transformerlens|nnsight] [--architecture llama|qwen3|gemma2|gemma3|gpt-oss ...]

PATH is ``ct`` (circuit-tracer's attribute as installed), ``linear`` or ``autograd``
(fastattr.attribute with that engine). Prints one ``RES`` line.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import circuit_tracer  # noqa: E402
import fastattr  # noqa: E402
from fastattr import synthetic  # noqa: E402
from fastattr._runtime.memory import PeakMemory, peak_resident_bytes  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", choices=["ct", "linear", "autograd"])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--features", type=int, default=512)
    p.add_argument("--l0", type=float, default=16, help="target active features per position and layer")
    p.add_argument("--transcoder", choices=["plt", "clt"], default="plt")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-nodes", type=int, default=4096)
    p.add_argument("--storage", choices=["dense", "topk"], default="dense")
    p.add_argument("--prune", action="store_true", help="also prune (fastattr.prune_graph; circuit-tracer's for ct)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--backend", choices=["transformerlens", "nnsight"], default="transformerlens")
    p.add_argument("--architecture", default="llama", help="see fastattr.synthetic.make_replacement_model")
    p.add_argument("--kv-heads", type=int, default=None)
    a = p.parse_args()

    model = synthetic.make_replacement_model(
        backend=a.backend, architecture=a.architecture, n_kv_heads=a.kv_heads, transcoder=a.transcoder, n_layers=a.layers, d_model=a.d_model, n_heads=a.heads,
        d_transcoder=a.features, feature_density=a.l0 / a.features, n_ctx=max(2048, a.tokens + 8), seed=0,
        device=a.device, dtype=getattr(torch, a.dtype),
    )  # fmt: skip
    prompt = synthetic.random_prompt(a.tokens - 1, seed=3)  # + <bos>
    kwargs = dict(batch_size=a.batch, max_feature_nodes=a.max_nodes)

    def run():
        if a.path == "ct":
            graph = circuit_tracer.attribute(prompt, model, **kwargs)
            if a.prune:
                from circuit_tracer.graph import prune_graph

                return graph, prune_graph(graph)
            return graph, None
        graph = fastattr.attribute(prompt, model, engine=a.path, edge_storage=a.storage, **kwargs)
        return graph, fastattr.prune_graph(graph) if a.prune else None

    with PeakMemory(a.device) as pm:
        t = time.perf_counter()
        graph, pruned = run()
        dt = time.perf_counter() - t
    kept = "" if pruned is None else f" kept={int(pruned.node_mask.sum())}"
    print(f"RES {a.path} {a.backend}:{a.architecture} storage={a.storage if a.path != 'ct' else 'dense'} tokens={a.tokens} layers={a.layers} "
          f"d_model={a.d_model} batch={a.batch} N={graph.adjacency_matrix.shape[0]} active={graph.active_features.shape[0]}"
          f"{kept} time={dt:.1f}s peak_above_start={pm.peak_bytes / 2**20:.0f}MiB ({pm.method}) "
          f"process_peak_rss={peak_resident_bytes() / 2**30:.2f}GiB", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
