"""One graph split over 1, 2 and 3 gloo ranks (one thread each) vs one process (one thread).

    python benchmarks/bench_distributed.py [--ranks 1 2 3] [--out benchmarks/results/distributed.json]

The workload of issue 22: a cross-layer transcoder, 6 layers, d_model 128, 40 positions, 1,200
feature nodes. Each configuration is a fresh set of processes; the time is attribute()'s, on rank
0, the fastest of REPEAT calls after one untimed warm-up call. Dense storage, deterministic=False: the row-sharded store.
Bytes rank 0 sent per phase, against docs/distributed.md's formulas: per update u over st_u
rows (st_{u-1} before it), at most (1 + new_u * (1 + st_u) + old_u * (st_u - st_{u-1})) * 4 * (R - 1)
+ N * 8 * (R - 1), with the largest rank's new_u <= ceil((st_u - st_{u-1}) / R) + logits and
old_u <= ceil(st_{u-1} / R) + logits; gather (rank 0's rows) * (the graph's columns) * 4 * (R - 1).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time

# Timed calls per configuration; the fastest is reported (all of them are in the JSON).
REPEAT = 3
WORKLOAD = dict(n_layers=6, d_model=128, d_transcoder=512, n_pos=40, nodes=1200, batch_size=64)
# A larger graph of the same kind (--workload large), where the sweeps outweigh the per-call setup.
LARGE = dict(n_layers=6, d_model=256, d_transcoder=1024, n_pos=96, nodes=2400, batch_size=128)


def worker(rank: int, world: int, port: str, smoke: bool, large: bool = False) -> None:
    import torch

    torch.set_num_threads(1)
    import fastattr
    from fastattr import synthetic
    from fastattr.attribution import driver

    w = LARGE if large else WORKLOAD
    if smoke:
        w = dict(WORKLOAD, n_layers=2, d_model=32, d_transcoder=64, n_pos=8, nodes=40, batch_size=8)
    group = None
    if world > 0:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))  # fmt: skip
        group = dist.group.WORLD
    model = synthetic.make_replacement_model(transcoder="clt", n_layers=w["n_layers"], d_model=w["d_model"],
                                             d_transcoder=w["d_transcoder"], seed=0)  # fmt: skip
    prompt = synthetic.random_prompt(w["n_pos"], seed=1)
    kw = dict(batch_size=w["batch_size"], max_feature_nodes=w["nodes"], process_group=group)
    fastattr.attribute(prompt, model, **kw)  # warm-up
    runs = []
    for _ in range(REPEAT):
        t = time.perf_counter()
        graph = fastattr.attribute(prompt, model, **kw)
        runs.append(time.perf_counter() - t)
    seconds = min(runs)
    last = dict(driver._LAST_RUN)
    if group is not None:
        dist.destroy_process_group()
    if rank == 0:
        n_cols = graph.active_features.shape[0] + (w["n_layers"] + 1) * w["n_pos"] + len(graph.logit_targets)
        rows = len(graph.selected_features) + len(graph.logit_targets)
        print(json.dumps({"seconds": seconds, "runs": runs, "bytes_sent_rank0": last.get("bytes_sent", 0), "rows": rows,
                          "influence_rows": last["work"]["influence_rows"], "n_logits": len(graph.logit_targets),
                          "n_final": last["work"]["n_final"],
                          "bytes_by_phase_rank0": last.get("bytes_by_phase", {}),
                          "rows_owned_rank0": last.get("rows_owned", 0), "updates": last.get("influence_updates", 0),
                          "n_cols": n_cols, "engine": last["engine"],
                          "phases": {k: last[k] for k in ("precompute", "forward", "logits", "features", "gather", "assemble") if k in last}}))  # fmt: skip


def launch(world: int, smoke: bool, large: bool = False) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    n = max(world, 1)
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world), port] + (["--smoke"] if smoke else [])
                              + (["--workload", "large"] if large else []),
                              env=env, stdout=subprocess.PIPE, text=True) for r in range(n)]  # fmt: skip
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"world {world}: exit codes {[p.returncode for p in procs]}")
    return json.loads(outs[0].strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="a tiny model, to check that the script runs")
    ap.add_argument("--workload", choices=("issue", "large"), default="issue",
                    help="issue 22's workload, or LARGE (d_model 256, 96 positions, 2,400 nodes)")
    ap.add_argument("--worker", nargs=3, default=None)
    args = ap.parse_args()
    if args.worker:
        worker(int(args.worker[0]), int(args.worker[1]), args.worker[2], args.smoke, args.workload == "large")
        return
    load = os.getloadavg()
    large = args.workload == "large"
    result = {"workload": LARGE if large else WORKLOAD, "loadavg_before": load, "one_process": launch(0, args.smoke, large),
              "ranks": {}}  # fmt: skip
    base = result["one_process"]["seconds"]
    print(f"load {load[0]:.2f}; one process: {base:.2f}s ({result['one_process']['engine']} engine)")
    for r in args.ranks:
        got = launch(r, args.smoke, large)
        # Rank 0 sends, per update, its share of the state (float32) and its full-width share of
        # the result (N float64); then its own rows at the graph's columns.
        n, got_b = got["n_cols"], got.get("bytes_by_phase_rank0", {})
        gather_formula = got["rows_owned_rank0"] * got["n_final"] * 4 * (r - 1)
        influence_bound, before = 0, 0
        for st in got["influence_rows"]:
            new_u = -(-(st - before) // r) + got["n_logits"]
            old_u = min(before, -(-before // r) + got["n_logits"])
            influence_bound += ((1 + new_u * (1 + st) + old_u * (st - before)) * 4 + n * 8) * (r - 1)
            before = st
        got.update(speedup=base / got["seconds"], formula_gather_bytes=gather_formula,
                   formula_influence_bytes_at_most=influence_bound)
        result["ranks"][r] = got
        print(f"{r} rank(s): {got['seconds']:.2f}s, {base / got['seconds']:.2f}x; phases {got['phases']}; rank 0 sent "
              f"influence {got_b.get('influence', 0) / 2**20:.3f} MiB ({got['updates']} updates; formula at most "
              f"{influence_bound / 2**20:.3f} MiB), gather {got_b.get('gather', 0) / 2**20:.3f} MiB "
              f"(formula {gather_formula / 2**20:.3f} MiB)")
    result["loadavg_after"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
