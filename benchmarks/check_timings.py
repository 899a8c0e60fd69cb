"""The timings of benchmarks/gpu_check.sh: one markdown table and one JSON, each row as a fraction
of the measured roofline (copy bandwidth, matmul rate), with peak memory.

    python benchmarks/check_timings.py OUTDIR [--cpu] [--budget SECONDS] [--e2e E2E.json]

Cases (GPU): the contraction at Gemma-2-2B shapes (PLT one layer, CLT last layer with 26 source
layers; bf16 and fp32; batch 256) on cuda, triton and torch; prune_graph at N = 16k and 63k;
find_threshold on 1e9 scores; the cost of deterministic=True (repeated-row contraction, prune_graph
at N = 16k, find_threshold on 1e8 scores). ``--cpu`` runs the same code on tiny shapes (a dry run). Cases are
run in order until the budget is spent; the rest are listed as not run, with the reason. A case
that fails is recorded with its error and the next one runs. ``--e2e`` adds the rows of a
pytest-benchmark JSON (bench_engine.py) to the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("FASTATTR_BENCH_TIER", "smoke")

import benchutil  # noqa: E402

import fastattr  # noqa: E402
from fastattr import ContractionPlan, reference  # noqa: E402
from fastattr._runtime import backends as _backends

GIB = 1 << 30


def _backend_ok(name: str, device: torch.device) -> str | None:
    ok, why = _backends.backend_status()[name]
    if not ok:
        return why
    return _backends.device_reason(name, device)


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return 8 * GIB


def _peak(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return benchutil.peak_memory(fn, device)[0]


class Run:
    def __init__(self, device, budget_s, roofline):
        self.device, self.deadline, self.roofline = device, time.monotonic() + budget_s, roofline
        self.rows, self.not_run = [], []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def case(self, op, case, impl, fn, *, flops=None, min_bytes=None, peak_key=None, n2=None, reps=5, extra=None):
        row = {"op": op, "case": case, "impl": impl}
        if self.left() <= 0:
            self.not_run.append({**row, "reason": "time box spent"})
            return
        try:
            secs = benchutil._time_best(fn, self.device, reps=reps, warmup=1)
            row["median_s"] = secs  # the fastest of the timed runs, as in benchutil's roofline
            row["peak_mem_bytes"] = _peak(fn, self.device)
            if n2:
                row["bytes_per_n2"] = row["peak_mem_bytes"] / n2
            if flops:
                peak = benchutil._peak_flops(self.roofline, peak_key)
                row["tflops"] = flops / secs / 1e12
                row["frac_flops"] = row["tflops"] / peak if peak else None
            if min_bytes:
                row["gbps"] = min_bytes / secs / 1e9
                row["frac_bw"] = row["gbps"] / self.roofline["copy_gbps"]
            row.update(extra or {})
            self.rows.append(row)
        except Exception as exc:  # recorded; the next case runs
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
            row["traceback"] = traceback.format_exc()[-1500:]
            self.rows.append(row)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def skip(self, op, case, impl, reason):
        self.not_run.append({"op": op, "case": case, "impl": impl, "reason": reason})


def contraction(run: Run, cpu: bool):
    # Gemma-2-2B (shared/model_shapes.md): d_model 2304, PLT L0 ~100 per position, 64 positions;
    # CLT last layer: rows of all 26 source layers, L0 40, 32 positions; batch 256 as circuit-tracer.
    shapes = [("gemma2-2b-plt", 2304, 64, 100, 1, 256), ("gemma2-2b-clt-last", 2304, 32, 40, 26, 256)]
    if cpu:
        shapes = [("tiny-plt", 64, 8, 8, 1, 16), ("tiny-clt", 64, 8, 4, 3, 16)]
    impls = ("cpu", "triton", "torch") if cpu else ("cuda", "triton", "torch")
    for name, D, P, l0, sources, B in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            S = l0 * P * sources
            dt = "bf16" if dtype == torch.bfloat16 else "fp32"
            case = f"{name} D={D} P={P} S={S} B={B} {dt}"
            gen = torch.Generator().manual_seed(0)
            grads = torch.randn(B, P, D, generator=gen).to(run.device, dtype)
            vectors = (torch.randn(S, D, generator=gen) / math.sqrt(D)).to(run.device, dtype)
            positions = torch.cat([torch.randint(0, P, (l0 * P,), generator=gen).sort().values for _ in range(sources)]).to(run.device)
            rows = torch.randperm(S, generator=gen).to(run.device)
            out = torch.zeros(S, B, dtype=dtype, device=run.device)
            elt = grads.element_size()
            flops, min_bytes = 2 * S * B * D, B * P * D * elt + S * D * elt + 2 * S * B * elt
            exact = None
            for impl in impls:
                why = _backend_ok(impl, run.device)
                if why is None and impl == "triton" and _backends.triton_interpret() and dtype == torch.bfloat16:
                    why = "bf16 tl.dot is wrong under TRITON_INTERPRET=1"
                if why is None and impl == "torch" and B * S * D * 4 * 1.5 > 0.5 * _free_bytes(run.device):
                    why = f"the reference's gathered B x S x D fp32 tensor ({B * S * D * 4 / GIB:.0f} GiB) does not fit"
                if why:
                    run.skip("contraction", case, impl, why)
                    continue
                plan = ContractionPlan(vectors, positions, rows)
                if exact is None:  # float64 on 256 rows, for the error column
                    idx = torch.arange(0, S, max(1, S // 256), device=run.device)
                    exact = (idx, torch.einsum("bsd,sd->sb", grads[:, positions[idx]].double(), vectors[idx].double()))
                plan(grads, out.zero_(), backend=impl)
                i, want = exact
                err = ((out[rows[i]].double() - want).abs().max() / want.abs().max()).item()
                run.case("contraction", case, impl, lambda: plan(grads, out, backend=impl), flops=flops,
                         min_bytes=min_bytes, peak_key=dtype, extra={"max_rel_err_vs_fp64": err})
            del grads, vectors, out, plan


def graph_ops(run: Run, cpu: bool):
    import bench_graph  # the benchmark suite's attribution-shaped DAG

    sizes = [600] if cpu else [16_384, 63_000]
    impls = ("cpu", "triton", "torch") if cpu else ("cuda", "triton", "torch")
    for n in sizes:
        if run.left() <= 0:
            run.skip("prune_graph", f"N~{n}", "*", "time box spent")
            continue
        if not cpu and 4.5 * n * n > _free_bytes(run.device):
            run.skip("prune_graph", f"N~{n}", "*", f"{4.5 * n * n / GIB:.0f} GiB needed, {_free_bytes(run.device) / GIB:.0f} free")
            continue
        graph = bench_graph.make_graph(n, run.device)
        N = graph.adjacency_matrix.shape[0]
        for impl in impls:
            why = _backend_ok(impl, run.device)
            # circuit-tracer's math holds ~32 B per element in N x N temporaries
            if why is None and impl == "torch" and 40 * N * N > _free_bytes(run.device):
                why = f"circuit-tracer's math needs ~32 B per N^2 element ({32 * N * N / GIB:.0f} GiB)"
            if why:
                run.skip("prune_graph", f"N={N}", impl, why)
                continue
            run.case("prune_graph", f"N={N}", impl, lambda: fastattr.prune_graph(graph, backend=impl),
                     min_bytes=4 * N * N, n2=N * N, reps=3,
                     extra={"note": "frac_bw: one read of the adjacency at copy bandwidth / time"})
        bench_graph._GRAPHS.clear()
        del graph


def threshold(run: Run, cpu: bool):
    n = 100_000 if cpu else 1_000_000_000
    case = f"{n:.0e} scores"
    if run.left() <= 0:
        run.skip("find_threshold", case, "*", "time box spent")
        return
    gen = torch.Generator(device=run.device).manual_seed(0)
    scores = torch.rand(n, generator=gen, device=run.device) ** 4
    # circuit-tracer's value (its sort needs ~24 B per score), when it fits
    want = reference.find_threshold(scores, 0.98) if 24 * n < _free_bytes(run.device) else None
    for impl in (("cpu", "triton", "torch") if cpu else ("cuda", "triton", "torch")):
        why = _backend_ok(impl, run.device)
        if why is None and impl == "torch" and want is None:
            why = f"circuit-tracer's sort needs ~24 B per score ({24 * n / GIB:.0f} GiB)"
        if why:
            run.skip("find_threshold", case, impl, why)
            continue
        sorts = fastattr.ops.threshold.threshold_stats().value_sorts
        got = fastattr.find_threshold(scores, 0.98, backend=impl)
        extra = {"value": float(got), "handed_over": fastattr.ops.threshold.threshold_stats().value_sorts > sorts}
        extra |= {} if want is None else {"equal_to_reference": bool(torch.equal(got, want))}
        run.case("find_threshold", case, impl, lambda: fastattr.find_threshold(scores, 0.98, backend=impl),
                 min_bytes=4 * n, reps=3, extra=extra)
    del scores


def deterministic(run: Run, cpu: bool):
    """The cost of deterministic=True where it changes the kernels: a contraction whose rows repeat
    (each cross-layer feature's decoder rows into its one row), prune_graph and find_threshold."""
    D, P, l0, sources, B = (64, 8, 4, 3, 16) if cpu else (2304, 32, 40, 26, 256)
    gen = torch.Generator().manual_seed(1)
    feats = l0 * P
    grads = torch.randn(B, P, D, generator=gen).to(run.device)
    vectors = (torch.randn(feats * sources, D, generator=gen) / math.sqrt(D)).to(run.device)
    positions = torch.randint(0, P, (feats,), generator=gen).repeat(sources).to(run.device)
    rows = torch.arange(feats).repeat(sources).to(run.device)  # every feature's rows meet in one row
    out = torch.zeros(feats, B, device=run.device)
    plan = ContractionPlan(vectors, positions, rows)
    case = f"repeated rows D={D} S={feats * sources} into {feats} rows B={B} fp32"
    for impl in (("cpu", "triton") if cpu else ("cuda", "triton")):
        why = _backend_ok(impl, run.device)
        if why:
            run.skip("contraction", case, impl, why)
            continue
        for det in (False, True):
            run.case("contraction", case, f"{impl} deterministic={det}",
                     lambda: plan(grads, out, backend=impl, deterministic=det), reps=3)
    del grads, vectors, out, plan
    import bench_graph

    graph = bench_graph.make_graph(600 if cpu else 16_384, run.device)
    N = graph.adjacency_matrix.shape[0]
    n = 100_000 if cpu else 100_000_000
    scores = torch.rand(n, generator=torch.Generator(device=run.device).manual_seed(0), device=run.device) ** 4
    for impl in (("cpu",) if cpu else ("cuda", "triton")):  # triton's graph passes take minutes interpreted
        why = _backend_ok(impl, run.device)
        for det in (False, True):
            label = f"{impl} deterministic={det}"
            if why:
                run.skip("prune_graph", f"N={N}", label, why)
                continue
            run.case("prune_graph", f"N={N}", label,
                     lambda: fastattr.prune_graph(graph, backend=impl, deterministic=det), reps=3)
            run.case("find_threshold", f"{n:.0e} scores", label,
                     lambda: fastattr.find_threshold(scores, 0.98, backend=impl, deterministic=det), reps=3)
    bench_graph._GRAPHS.clear()


def e2e_rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    rows = []
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        rows.append({"op": e.get("op", "attribute"), "case": e.get("case", b.get("name")), "impl": e.get("impl", "?"),
                     "median_s": e.get("median_s", b.get("stats", {}).get("median")),
                     "peak_mem_bytes": e.get("peak_mem_bytes"), "max_rel_err": e.get("max_rel_err")})
    for r in data.get("fastattr", {}).get("not_run", []):
        rows.append({"op": "attribute", "case": str(r)[:120], "impl": "-", "error": "not run"})
    return rows


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def contraction_default(rows: list[dict]) -> dict[str, dict]:
    """Per contraction case, the faster of the compiled backends timed (cuda and triton on a GPU):
    the measurement the GPU default is to be chosen by."""
    times: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("op") == "contraction" and r.get("impl") in ("cuda", "triton", "cpu") and r.get("median_s"):
            times.setdefault(r["case"], {})[r["impl"]] = r["median_s"]
    picks = {}
    for case, t in times.items():
        if len(t) >= 2:
            (fast, tf), (other, to) = sorted(t.items(), key=lambda kv: kv[1])[:2]
            picks[case] = {"fastest": fast, "other": other, "ratio": to / tf}
    return picks


def markdown(result: dict) -> str:
    rf = result["roofline"]
    lines = [
        f"# fastattr check timings ({rf.get('device')})", "",
        f"Roofline (measured): copy {rf['copy_gbps']:.0f} GB/s; matmul fp32 {rf.get('matmul_tflops_fp32', 0):.1f}, "
        f"tf32 {rf.get('matmul_tflops_tf32') or 0:.1f}, bf16 {rf.get('matmul_tflops_bf16') or 0:.1f} TFLOP/s. "
        "Time: fastest of the timed runs. frac: of the bf16 (bf16 rows) or fp32 (fp32 rows) matmul rate, "
        "and of the copy bandwidth over the fewest bytes.", "",
        "| op | case | impl | time | TFLOP/s (frac) | GB/s (frac) | peak memory | B per N^2 | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['case']} | {r['impl']} | FAILED | | | | | {r['error'][:150]} |")
            continue
        t = r.get("median_s")
        tt = "" if t is None else (f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s")
        fl = f"{r['tflops']:.1f} ({_fmt(r.get('frac_flops'), '.0%')})" if r.get("tflops") else ""
        bw = f"{r['gbps']:.0f} ({_fmt(r.get('frac_bw'), '.0%')})" if r.get("gbps") else ""
        pk = "" if r.get("peak_mem_bytes") is None else f"{r['peak_mem_bytes'] / 2**20:.1f} MiB"
        note = "; ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                         if k in ("max_rel_err_vs_fp64", "max_rel_err", "equal_to_reference") and v is not None)
        lines.append(f"| {r['op']} | {r['case']} | {r['impl']} | {tt} | {fl} | {bw} | {pk} | {_fmt(r.get('bytes_per_n2'), '.2f')} | {note} |")
    picks = contraction_default(result["rows"])
    if picks:
        lines += ["", "Contraction default by measurement (the faster compiled backend per case; the automatic "
                  "choice on CUDA tensors is cuda, then triton):", ""]
        lines += [f"- {case}: {p['fastest']} ({p['ratio']:.2f}x faster than {p['other']})" for case, p in picks.items()]
    if result["not_run"]:
        lines += ["", "Not run:", ""] + [f"- {r['op']} {r['case']} {r['impl']}: {r['reason']}" for r in result["not_run"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (dry run)")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for all cases (default 150)")
    ap.add_argument("--e2e", type=Path, default=None, help="a pytest-benchmark JSON to add (bench_engine.py)")
    ap.add_argument("--merge-e2e", type=Path, default=None,
                    help="add this JSON's rows to OUTDIR's existing timings.json/.md and stop")
    ap.add_argument("--only", default="contraction,graph,threshold,deterministic")
    ns = ap.parse_args()
    if ns.merge_e2e is not None:
        result = json.loads((ns.outdir / "timings.json").read_text())
        result["rows"] += e2e_rows(ns.merge_e2e)
        (ns.outdir / "timings.json").write_text(json.dumps(result, indent=1, default=str))
        (ns.outdir / "timings.md").write_text(markdown(result))
        return 0
    device = torch.device("cpu" if ns.cpu else "cuda")
    ns.outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    roofline = benchutil.measure_roofline(device)
    run = Run(device, ns.budget - (time.monotonic() - t0), roofline)
    parts = (("contraction", contraction), ("graph", graph_ops), ("threshold", threshold), ("deterministic", deterministic))
    for part, fn in parts:
        if part not in ns.only.split(","):
            continue
        try:
            fn(run, ns.cpu)
        except Exception as exc:
            run.rows.append({"op": part, "case": "setup", "impl": "-", "error": f"{type(exc).__name__}: {exc}"[:400],
                             "traceback": traceback.format_exc()[-1500:]})
    if ns.e2e is not None and ns.e2e.exists():
        run.rows += e2e_rows(ns.e2e)
    result = {"roofline": roofline, "device": benchutil.device_name(device), "torch": torch.__version__,
              "rows": run.rows, "not_run": run.not_run, "seconds": time.monotonic() - t0,
              "contraction_default": contraction_default(run.rows)}
    (ns.outdir / "timings.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    (ns.outdir / "timings.md").write_text(md)
    print(md)
    return 1 if any("error" in r and r["error"] != "not run" for r in run.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
