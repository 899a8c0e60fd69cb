"""One rank of the distributed tests (run as a script by test_distributed.py, not collected).

argv: rank world port out_dir mode. Each rank attributes every case and saves what the tests
compare; mode "plain" runs without a process group (the one-process reference)."""

from __future__ import annotations

import datetime
import os
import sys
import traceback

import torch

CASES = [  # (transcoder, edge_storage, engine, deterministic)
    ("plt", "dense", "linear", False),
    ("clt", "dense", "linear", True),
    ("plt", "topk", "linear", True),
    ("clt", "topk", "autograd", False),
    ("clt", "dense", "autograd", False),
]
# Cases also written with gather="shards": the row-sharded store and the broadcast path.
SHARDED = (0, 2)
# After CASES each rank saves one more graph: circuit-tracer's attribute() under patch_circuit_tracer.
PATCHED = ("clt", "dense", "patched circuit_tracer.attribute", False)


def summary(graph, ct_prune) -> dict:
    node_mask, edge_mask, _ = ct_prune(graph, node_threshold=0.8, edge_threshold=0.98)
    return {"selected": graph.selected_features, "adjacency": graph.adjacency_matrix,
            "node_mask": node_mask, "edge_mask": edge_mask}


def main() -> int:
    rank, world, port, out, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    import fastattr
    from fastattr import synthetic

    group = None
    if mode != "plain":
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        group = dist.group.WORLD
    prompt = synthetic.random_prompt(8, seed=1)
    try:
        if mode in ("bad-input", "mid-phase"):
            model = synthetic.make_replacement_model(transcoder="plt", n_layers=2, d_model=32, d_transcoder=64, seed=0)
            batch = 0 if (mode == "bad-input" and rank == 1) else 4
            if mode == "mid-phase" and rank == world - 1:
                from fastattr.attribution import driver

                def boom(*a, **k):
                    raise RuntimeError("injected failure")

                driver._LinearRows.compute = boom
            fastattr.attribute(prompt, model, batch_size=batch, max_feature_nodes=12, process_group=group)
            return 0
        from fastattr.ops.pruning import prune_graph

        results = []
        models = {}
        for transcoder, storage, engine, det in CASES:
            if transcoder not in models:
                models[transcoder] = synthetic.make_replacement_model(
                    transcoder=transcoder, n_layers=2, d_model=32, d_transcoder=64, seed=0)
            graph = fastattr.attribute(prompt, models[transcoder], batch_size=4, update_interval=2, max_feature_nodes=20,
                                       edge_storage=storage, topk=16, engine=engine, deterministic=det,
                                       process_group=group, gather="all")
            results.append(summary(graph, prune_graph))
        # circuit-tracer's own attribute(), routed by the patch over the group (none in "plain").
        import circuit_tracer

        handle = fastattr.patch_circuit_tracer(process_group=group)
        try:
            graph = circuit_tracer.attribute(prompt, models["clt"], batch_size=4, update_interval=2, max_feature_nodes=20)
        finally:
            handle.undo()
        results.append(summary(graph, prune_graph))
        torch.save(results, os.path.join(out, f"{mode}-{world}-{rank}.pt"))
        if mode == "split":
            # gather="shards" of the cases SHARDED, read back on rank 0 (the test compares them
            # with the same case gathered to every rank).
            loaded = []
            for i in SHARDED:
                transcoder, storage, engine, det = CASES[i]
                shard_dir = os.path.join(out, f"shards-{world}-{i}")
                none = fastattr.attribute(prompt, models[transcoder], batch_size=4, update_interval=2,
                                          max_feature_nodes=20, edge_storage=storage, topk=16, engine=engine,
                                          deterministic=det, process_group=group, gather="shards", shard_dir=shard_dir)
                assert none is None
                if rank == 0:
                    loaded.append(summary(fastattr.load_graph_shards(shard_dir), prune_graph))
            if rank == 0:
                torch.save(loaded, os.path.join(out, f"shards-{world}-0.pt"))
        return 0
    except Exception as exc:
        with open(os.path.join(out, f"{mode}-{world}-{rank}.err"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        return 3
    finally:
        # A group left to the interpreter's exit can abort there (gloo's threads outlive it), as
        # torch warns: every rank ends its group, whether it returns or raises.
        if group is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
