"""``python -m fastattr attribute-many PROMPTS.jsonl --out DIR``: one graph per prompt, prompts
sharded over the ranks of a ``torchrun`` launch (or one process without it).

Each line of PROMPTS.jsonl is ``{"prompt": "...", "id": "name"}`` (``id`` optional: the line
number). A prompt is done when ``DIR/<id>.pt`` exists: that file is written to a temporary name
and renamed (``os.replace``), so it is whole or absent, and a restart only attributes what is not
done. The graph JSON (``--graph-json``) is written before the ``.pt``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("fastattr")

_ID = re.compile(r"^[A-Za-z0-9._-]+$")
_TMP = ".tmp-"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("attribute-many", help="one graph per prompt of a JSONL file, sharded over torchrun ranks")
    p.add_argument("prompts", help="JSONL file: one {\"prompt\": ..., \"id\": ...} per line")
    p.add_argument("--out", required=True, help="directory for <id>.pt (and graph JSON)")
    p.add_argument("--model", help="circuit-tracer ReplacementModel.from_pretrained model name")
    p.add_argument("--transcoder-set", help="circuit-tracer transcoder set name or path")
    p.add_argument("--synthetic", help="a random-weight model instead, e.g. 'clt,n_layers=2,d_model=32,seed=0'")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-feature-nodes", type=int, default=None)
    p.add_argument("--max-n-logits", type=int, default=10)
    p.add_argument("--desired-logit-prob", type=float, default=0.95)
    p.add_argument("--edge-storage", choices=["dense", "topk"], default="dense")
    p.add_argument("--graph-json", action="store_true", help="also write circuit-tracer's graph files (create_graph_files)")
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a rank waits for the others before failing")


def read_prompts(path: str) -> list[tuple[str, str]]:
    items, seen = [], set()
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {line.strip()[:80]!r} ({exc})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}:{i + 1}: expected an object with a string 'prompt', got {obj!r}"[:300])
            pid = str(obj.get("id", f"{i:06d}"))
            if not _ID.match(pid) or pid.startswith(_TMP):
                raise ValueError(f"{path}:{i + 1}: id: expected letters, digits, '.', '_' or '-', got {pid!r}")
            if pid in seen:
                raise ValueError(f"{path}:{i + 1}: id: expected unique ids, got {pid!r} twice")
            seen.add(pid)
            items.append((pid, obj["prompt"]))
    return items


def _model(args: Any, device: str):
    if args.synthetic:
        from fastattr import synthetic

        kind, *params = args.synthetic.split(",")
        kw = {k: int(v) for k, v in (p.split("=") for p in params)}
        return synthetic.make_replacement_model(transcoder=kind, device=device, **kw)
    if not (args.model and args.transcoder_set):
        raise ValueError("attribute-many: expected --model and --transcoder-set, or --synthetic")
    from circuit_tracer import ReplacementModel

    return ReplacementModel.from_pretrained(args.model, args.transcoder_set, device=device)


def write_graph(graph: Any, out: Path, pid: str, args: Any, rank: int) -> None:
    if args.graph_json:
        from circuit_tracer.utils.create_graph_files import create_graph_files

        create_graph_files(graph, slug=pid, output_path=str(out / "graph_json"),
                           node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)  # fmt: skip
    tmp = out / f"{_TMP}{rank}-{pid}.pt"
    graph.to_pt(str(tmp))
    # The rename is the commit: <id>.pt is whole or absent, whenever this process dies.
    os.replace(tmp, out / f"{pid}.pt")


def run(args: Any) -> int:
    import torch

    import fastattr
    from fastattr.attribution import distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    ranks = None
    if world > 1:
        import torch.distributed as dist

        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=args.timeout))  # fmt: skip
        ranks = distributed.Ranks(dist.group.WORLD)
    rank = 0 if ranks is None else ranks.rank
    out = Path(args.out)

    def prepare():
        out.mkdir(parents=True, exist_ok=True)
        items = read_prompts(args.prompts)
        return items, _model(args, device)

    try:
        items, model = prepare() if ranks is None else ranks.agree(prepare)
        if ranks is not None:
            ranks.dist.barrier()
        if rank == 0:
            for stale in out.glob(f"{_TMP}*"):  # what a killed rank left before its rename
                stale.unlink()
        if ranks is not None:
            ranks.dist.barrier()
        todo = [(pid, p) for pid, p in items if not (out / f"{pid}.pt").exists()]
        size = 1 if ranks is None else ranks.size
        mine = todo[rank::size]
        logger.info("fastattr attribute-many: rank %d of %d on %s, %d of %d prompts to do, %d here",
                    rank, size, device, len(todo), len(items), len(mine))  # fmt: skip
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="prompts", disable=rank != 0)
        for k in range(-(-len(todo) // size)):

            def one():
                if k < len(mine):
                    pid, prompt = mine[k]
                    graph = fastattr.attribute(prompt, model, batch_size=args.batch_size,
                                               max_feature_nodes=args.max_feature_nodes, max_n_logits=args.max_n_logits,
                                               desired_logit_prob=args.desired_logit_prob, edge_storage=args.edge_storage)  # fmt: skip
                    write_graph(graph, out, pid, args, rank)
                    return 1
                return 0

            if ranks is None:
                bar.update(one())
            else:
                ranks.agree(one)
                # Every rank finishes one prompt per round, except on the last round.
                bar.update(min(size, len(todo) - k * size))
        bar.close()
        if ranks is not None:
            ranks.settle()
    except BaseException:
        if ranks is not None and ranks.failed_together:  # every rank is raising: end together
            ranks.settle()
        raise
    finally:
        if ranks is not None:
            ranks.dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastattr")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
