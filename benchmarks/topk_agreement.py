"""How far fastattr.attribute(edge_storage="topk") departs from dense storage, across k.

For each model, max_feature_nodes and k it attributes the same prompt with dense storage
(circuit-tracer's graph) and with top-k storage and reports:
- selected overlap: |features selected by both| / |features selected by dense|; top-k changes the
  partial influences that rank features when max_feature_nodes is below the number active;
- the pruned node sets, compared by node identity (active feature index, or error / token / logit
  node), so they stay comparable when the selected features differ: Jaccard index, nodes in one
  set only, and set sizes. Dense graphs go through circuit-tracer's prune_graph; top-k graphs
  through fastattr.prune_graph, which prunes the stored edges with the recorded row sums.
- the share of dense node influence (on the pruned dense set) that the top-k pruned set keeps.

Usage: python benchmarks/topk_agreement.py [--ks 64,256,1024] [--layers 2] [--tokens 64]
       [--features 256] [--max-nodes 300,all] [--seeds 0] [--kinds plt,clt] [--d-model 64] [--l0 N]
Prints a markdown table (the numbers in docs/attribute.md come from it).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def node_ids(graph) -> list:
    """Each node's identity, independent of which features were selected."""
    sel = graph.selected_features.tolist()
    n = graph.adjacency_matrix.shape[0]
    return [("feature", sel[i]) if i < len(sel) else ("other", i - len(sel)) for i in range(n)]


def pruned_set(graph, mask) -> set:
    ids = node_ids(graph)
    return {ids[i] for i in torch.nonzero(mask).flatten().tolist()}


def main() -> None:
    import circuit_tracer
    from circuit_tracer.graph import compute_node_influence, prune_graph

    import fastattr
    from fastattr import synthetic

    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="64,256,1024")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--max-nodes", default="300,all")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--kinds", default="plt,clt")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--l0", type=int, default=None, help="active features per position and layer (default: the builder's)")
    args = ap.parse_args()
    vocab = 512 if args.l0 else None
    ks = [int(k) for k in args.ks.split(",")]
    max_nodes_list = [None if m == "all" else int(m) for m in args.max_nodes.split(",")]

    print("| transcoder | seed | max nodes | active | N | k | selected overlap | node Jaccard | nodes differing | pruned dense / topk | influence kept |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            shape = {} if args.l0 is None else {"feature_density": args.l0 / args.features, "d_vocab": vocab, "n_ctx": 2048}
            model = synthetic.make_replacement_model(transcoder=kind, n_layers=args.layers, d_model=args.d_model,
                                                     d_transcoder=args.features, seed=seed, **shape)  # fmt: skip
            prompt = synthetic.random_prompt(args.tokens, seed=seed + 1, **({"vocab_size": vocab} if vocab else {}))
            for max_nodes in max_nodes_list:
                g0 = circuit_tracer.attribute(prompt, model, batch_size=64, max_feature_nodes=max_nodes)
                m0 = prune_graph(g0).node_mask
                p0 = pruned_set(g0, m0)
                n0 = g0.adjacency_matrix.shape[0]
                w = torch.zeros(n0)
                w[-len(g0.logit_probabilities):] = g0.logit_probabilities
                infl0 = compute_node_influence(g0.adjacency_matrix, w)
                infl_of = dict(zip(node_ids(g0), (infl0 + w).tolist()))
                for k in ks:
                    g1 = fastattr.attribute(prompt, model, batch_size=64, max_feature_nodes=max_nodes, edge_storage="topk", topk=k)
                    s0, s1 = set(g0.selected_features.tolist()), set(g1.selected_features.tolist())
                    overlap = len(s0 & s1) / len(s0)
                    p1 = pruned_set(g1, fastattr.prune_graph(g1).node_mask)
                    jac = len(p0 & p1) / len(p0 | p1)
                    kept = sum(infl_of.get(i, 0.0) for i in p0 & p1) / sum(infl_of[i] for i in p0)
                    print(f"| {kind} | {seed} | {max_nodes or 'all'} | {g0.active_features.shape[0]} | {n0} | {k} | "
                          f"{overlap:.3f} | {jac:.3f} | {len(p0 ^ p1)} | {len(p0)} / {len(p1)} | {kept:.4f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
