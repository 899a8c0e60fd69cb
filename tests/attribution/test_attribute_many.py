"""attribute-many over 2 ranks: one whole .pt per prompt, and a restart after a killed rank
finishes the rest without redoing what was done."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed (pip install '.[tracer]')")

WORKER = Path(__file__).with_name("many_worker.py")
SYNTH = "plt,n_layers=2,d_model=32,d_transcoder=64,seed=0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, argv: list[str], **env_extra: str) -> list[int]:
    port = str(_free_port())
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", **env_extra)  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *argv], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
    return [p.wait(timeout=240) for p in procs]


def test_restart_after_killed_rank_finishes_the_rest(tmp_path):
    from circuit_tracer.graph import Graph

    from fastattr import synthetic

    prompts = tmp_path / "prompts.jsonl"
    ids = [f"p{i}" for i in range(6)]
    prompts.write_text("".join(json.dumps({"id": pid, "prompt": synthetic.random_prompt(6, seed=i)}) + "\n"
                               for i, pid in enumerate(ids)))  # fmt: skip
    out = tmp_path / "out"
    argv = ["attribute-many", str(prompts), "--out", str(out), "--synthetic", SYNTH, "--device", "cpu",
            "--batch-size", "8", "--max-feature-nodes", "8", "--timeout", "30"]  # fmt: skip
    codes = launch(2, argv, FASTATTR_TEST_KILL_RANK="1")
    assert codes[1] == 9 and codes[0] != 0, codes
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt") if not p.name.startswith(".")}
    assert 0 < len(done) < len(ids), sorted(done)
    assert list(out.glob(".tmp-*")), "the killed rank should have left its temporary file"

    assert launch(2, argv) == [0, 0]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{pid}.pt" for pid in ids)
    for name, mtime in done.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was attributed again"
    for pid in ids:
        assert Graph.from_pt(str(out / f"{pid}.pt")).selected_features.numel() > 0
