"""One graph over 2 and 3 gloo ranks equals the one-process graph; a failing rank ends all ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed (pip install '.[tracer]')")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORKER = Path(__file__).with_name("dist_worker.py")
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, mode: str, out: Path) -> list[subprocess.CompletedProcess]:
    port = str(_free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), port, str(out), mode],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]  # fmt: skip
    done = []
    for p in procs:
        stdout, _ = p.communicate(timeout=TIMEOUT)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout))
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    for world, mode in ((1, "plain"), (2, "split"), (3, "split")):
        for r, p in enumerate(launch(world, mode, out)):
            assert p.returncode == 0, f"{mode} {world} rank {r}:\n{p.stdout}\n{_err(out, mode, world, r)}"
    return out


def _err(out: Path, mode: str, world: int, rank: int) -> str:
    f = out / f"{mode}-{world}-{rank}.err"
    return f.read_text() if f.exists() else ""


@pytest.mark.parametrize("world", [2, 3])
def test_split_graph_equals_one_process(runs, world):
    sys.path.insert(0, str(WORKER.parent))
    from dist_worker import CASES, PATCHED

    ref = torch.load(runs / "plain-1-0.pt")
    for rank in range(world):
        got = torch.load(runs / f"split-{world}-{rank}.pt")
        assert len(ref) == len(got) == len(CASES) + 1
        for case, a, b in zip(CASES + [PATCHED], ref, got):
            assert torch.equal(a["selected"], b["selected"]), case
            assert torch.equal(a["node_mask"], b["node_mask"]), case
            assert torch.equal(a["edge_mask"], b["edge_mask"]), case
            if case[3]:  # deterministic=True: bitwise
                assert torch.equal(a["adjacency"], b["adjacency"]), case
            else:
                scale = float(a["adjacency"].abs().max())
                assert float((a["adjacency"] - b["adjacency"]).abs().max()) <= 1e-6 * scale, case


@pytest.mark.parametrize("world", [2, 3])
def test_shards_load_as_the_gathered_graph(runs, world):
    sys.path.insert(0, str(WORKER.parent))
    from dist_worker import SHARDED

    gathered = torch.load(runs / f"split-{world}-0.pt")
    loaded = torch.load(runs / f"shards-{world}-0.pt")
    assert len(loaded) == len(SHARDED)
    for i, got in zip(SHARDED, loaded):
        for key in ("selected", "adjacency", "node_mask", "edge_mask"):
            assert torch.equal(gathered[i][key], got[key]), (i, key)
    files = sorted(p.name for p in (runs / f"shards-{world}-{SHARDED[0]}").iterdir())
    assert files == ["graph.pt"] + [f"rows-{r:05d}-of-{world:05d}.pt" for r in range(world)]


def test_incomplete_shard_sets_are_refused(runs, tmp_path):
    import shutil

    import fastattr

    sys.path.insert(0, str(WORKER.parent))
    from dist_worker import SHARDED

    broken = tmp_path / "missing-rank"
    shutil.copytree(runs / f"shards-3-{SHARDED[0]}", broken)
    (broken / "rows-00001-of-00003.pt").unlink()
    with pytest.raises(ValueError, match=r"shard_dir: .*missing \[1\]"):
        fastattr.load_graph_shards(broken)
    mixed = tmp_path / "two-runs"
    shutil.copytree(runs / f"shards-3-{SHARDED[0]}", mixed)
    shutil.copy(runs / f"shards-2-{SHARDED[0]}" / "rows-00000-of-00002.pt", mixed)
    with pytest.raises(ValueError, match="shard_dir: expected the row files of one run"):
        fastattr.load_graph_shards(mixed)


def test_shards_arguments_and_incomplete_sets(tmp_path):
    import fastattr
    from fastattr.attribution import distributed

    with pytest.raises(ValueError, match="process_group"):
        distributed.check_group(None, "shards", tmp_path)
    with pytest.raises(ValueError, match="shard_dir"):
        distributed.check_group(None, "all", tmp_path)
    group = object()  # the shard_dir checks come before the group's
    with pytest.raises(TypeError, match="shard_dir"):
        distributed.check_group(group, "shards", 7)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="shard_dir: expected a directory"):
        distributed.check_group(group, "shards", tmp_path / "a-file")
    with pytest.raises(ValueError, match="shard_dir"):
        fastattr.load_graph_shards(tmp_path)
    with pytest.raises(ValueError, match="gather"):  # circuit-tracer's attribute returns a Graph
        fastattr.patch_circuit_tracer(attribute=True, process_group=object(), gather="shards")
    with pytest.raises(ValueError, match="gather"):
        fastattr.patch_circuit_tracer(attribute=True, gather="shards")


@pytest.mark.parametrize("mode", ["bad-input", "mid-phase"])
def test_failing_rank_ends_every_rank(tmp_path, mode):
    world = 3 if mode == "mid-phase" else 2
    failing = world - 1 if mode == "mid-phase" else 1
    procs = launch(world, mode, tmp_path)
    for r, p in enumerate(procs):
        assert p.returncode == 3, p.stdout
        err = _err(tmp_path, mode, world, r)
        if r == failing:
            assert ("batch_size" in err) if mode == "bad-input" else ("injected failure" in err), err
        else:
            assert f"rank {failing} of {world} failed" in err, err


def test_bytes_per_phase_within_the_docs_formulas(tmp_path):
    # benchmarks/bench_distributed.py's smoke run: what rank 0 sent per phase, against the bounds
    # of docs/distributed.md (the benchmark computes them from the run's row counts).
    import json

    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_distributed.py"
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(bench), "--smoke", "--ranks", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    got = json.loads(out.read_text())["ranks"]["2"]
    sent = got["bytes_by_phase_rank0"]
    assert 0 < sent["influence"] <= got["formula_influence_bytes_at_most"]
    assert sent["gather"] == got["formula_gather_bytes"]
