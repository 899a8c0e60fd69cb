"""What one collective costs on this machine's process group, for the distributed engine's budget.

    python benchmarks/bench_collectives.py [--ranks 2] [--out result.json]

Launches ``--ranks`` gloo processes on this host (one thread each) and times, on rank 0, the
collectives fastattr's distributed attribute() makes: the small all-reduce of each agreement
step, all_gather_object (what agreement used before), a barrier, and all-gathers and per-rank
broadcasts of the sizes a partial-influence update and the final gather move. Each number is the
mean over many calls after a barrier; the load is printed first.
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

SIZES_KIB = (4, 64, 512, 4096)


def worker(rank: int, world: int, port: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip

    def mean_us(fn, n):
        fn()
        dist.barrier()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1e6

    flag = torch.zeros(1, dtype=torch.int32)
    got = {"all_reduce int32": mean_us(lambda: dist.all_reduce(flag), 200),
           "all_gather_object None": mean_us(lambda: dist.all_gather_object([None] * world, None), 200),
           "barrier": mean_us(dist.barrier, 200)}  # fmt: skip
    for kib in SIZES_KIB:
        piece = torch.zeros(kib * 256 // world)
        parts = [torch.empty_like(piece) for _ in range(world)]
        n = 200 if kib < 512 else 30
        got[f"all_gather {kib} KiB in all"] = mean_us(lambda: dist.all_gather(parts, piece), n)

        def broadcasts():
            for src in range(world):
                dist.broadcast(piece if src == rank else parts[src], src=src)

        got[f"{world} broadcasts {kib} KiB in all"] = mean_us(broadcasts, n)
    dist.barrier()  # every rank done before any ends its group
    dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(got))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", nargs=3, default=None)
    args = ap.parse_args()
    if args.worker:
        worker(int(args.worker[0]), int(args.worker[1]), args.worker[2])
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    load = os.getloadavg()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(args.ranks), port], env=env,
                              stdout=subprocess.PIPE, text=True) for r in range(args.ranks)]  # fmt: skip
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"exit codes {[p.returncode for p in procs]}")
    got = json.loads(outs[0].strip().splitlines()[-1])
    print(f"load {load[0]:.2f}; {args.ranks} gloo ranks on this host, mean per call:")
    for k, v in got.items():
        print(f"  {k:34s} {v:8.0f} us")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ranks": args.ranks, "loadavg_before": load, "us_per_call": got}, f, indent=1)


if __name__ == "__main__":
    main()
