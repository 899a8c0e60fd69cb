"""How far fastattr.attribute(edge_storage="topk") departs from dense storage, across k.

For each model and k it attributes the same prompt with dense and with top-k storage and reports:
- selected-feature overlap (top-k changes the partial influences that rank features);
- pruned node sets: dense graph with circuit-tracer's prune_graph, against the top-k graph pruned
  with its exact row sums (fastattr.prune_graph_sparse on graph.row_abs_sum), as Jaccard index and
  count of differing nodes.

Usage: python benchmarks/topk_agreement.py [--ks 64,256,1024] [--layers 4] [--tokens 24]
Prints a markdown table (the numbers quoted in docs/attribute.md come from it).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _sparse_prune(graph):
    from fastattr import prune_graph_sparse
    from fastattr.topk_edges import SparseEdges

    dense = graph.adjacency_matrix
    crow = torch.zeros(dense.shape[0] + 1, dtype=torch.int64)
    nz = dense != 0
    crow[1:] = torch.cumsum(nz.sum(1), 0)
    rows, cols = nz.nonzero(as_tuple=True)
    edges = SparseEdges(crow, cols, dense[rows, cols], graph.row_abs_sum.float(), tuple(dense.shape))
    return prune_graph_sparse(
        edges, logit_probabilities=graph.logit_probabilities, n_tokens=len(graph.input_tokens),
        n_features=len(graph.selected_features),
    )  # fmt: skip


def main() -> None:
    import circuit_tracer
    from circuit_tracer.graph import prune_graph

    import fastattr
    from fastattr import synthetic

    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="32,128,512,2048")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--features", type=int, default=256)
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]

    print("| transcoder | max nodes | N | k | selected overlap | node Jaccard | nodes differing | kept dense / topk |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in ("plt", "clt"):
        model = synthetic.make_replacement_model(transcoder=kind, n_layers=args.layers, d_model=64,
                                                 d_transcoder=args.features, seed=0)  # fmt: skip
        prompt = synthetic.random_prompt(args.tokens, seed=1)
        for max_nodes in (200, None):
            g0 = circuit_tracer.attribute(prompt, model, batch_size=64, max_feature_nodes=max_nodes)
            m0 = prune_graph(g0).node_mask
            for k in ks:
                g1 = fastattr.attribute(prompt, model, batch_size=64, max_feature_nodes=max_nodes, edge_storage="topk", topk=k)
                s0, s1 = set(g0.selected_features.tolist()), set(g1.selected_features.tolist())
                overlap = len(s0 & s1) / len(s0)
                if s0 == s1:
                    m1 = _sparse_prune(g1).node_mask
                    jac = float((m0 & m1).sum() / (m0 | m1).sum())
                    diff = int((m0 ^ m1).sum())
                    kept = f"{int(m0.sum())} / {int(m1.sum())}"
                else:
                    jac, diff, kept = float("nan"), -1, "(different features)"
                print(f"| {kind} | {max_nodes or 'all'} | {m0.numel()} | {k} | {overlap:.3f} | {jac:.3f} | {diff} | {kept} |", flush=True)


if __name__ == "__main__":
    main()
