"""Turn pytest-benchmark JSON from ``benchmarks/`` into a markdown report and plots.

    python benchmarks/report.py bench.json [more.json ...] --out DIR [--summary]

Writes ``DIR/report.md`` (machine, measured roofline, one table per op, what did not run and
why), ``DIR/speedup.png`` (speedup over circuit-tracer against problem size, one panel per op),
``DIR/memory.png`` (peak memory against problem size) and ``DIR/floor.png`` (time over the
compute floor, for the cases with one). ``--summary`` also prints a few lines
per op to stdout. Needs matplotlib only for the plots (``--no-plots`` skips them).

Rows are read from the ``extra_info`` keys that ``benchutil.run_case`` records (op, case, impl,
size, peak_mem_bytes, gbps, ...); benchmarks that lack them still get a table row, from
pytest-benchmark's own group, name and params, but no plot point.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

BASELINE = "circuit-tracer"
# Series order in tables and legends: the baseline first, then fastattr's backends.
IMPL_ORDER = [BASELINE, "cuda", "triton", "cpu", "torch"]


def _impl_key(impl: str) -> tuple:
    return (IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER), impl)


# ------------------------------------------------------------------------------------- loading


def _row(bench: dict) -> dict:
    extra = bench.get("extra_info") or {}
    params = bench.get("params") or {}
    stats = bench.get("stats") or {}
    group = bench.get("group") or ""
    impl = extra.get("impl") or params.get("impl") or params.get("backend") or str(bench.get("param") or "?")
    case = extra.get("case")
    if case is None:
        rest = [f"{k}={v}" for k, v in params.items() if k not in ("impl", "backend")]
        case = ", ".join(rest) or bench.get("name", "?")
    op = extra.get("op") or (group.split(" | ")[0] if group else Path(bench.get("fullname", "?").split("::")[0]).stem)
    return {
        "op": op,
        "case": str(case),
        "family": str(extra.get("family") or case),
        "impl": str(impl),
        "baseline": bool(extra.get("baseline", impl == BASELINE)),
        "median_s": stats.get("median"),
        "iqr_s": stats.get("iqr"),
        "rounds": stats.get("rounds"),
        "size": extra.get("size"),
        "size_label": extra.get("size_label"),
        "dtype": extra.get("dtype"),
        "peak": extra.get("peak_mem_bytes"),
        "mem_method": extra.get("mem_method"),
        "gbps": extra.get("gbps"),
        "frac_bw": extra.get("frac_bw"),
        "tflops": extra.get("tflops"),
        "frac_flops": extra.get("frac_flops"),
        "err": extra.get("max_rel_err"),
        "masks_equal": extra.get("masks_equal"),
        "node_jaccard": extra.get("node_jaccard"),
        "outside_backward": extra.get("attribute_loop_outside_engine"),
        "floor_s": extra.get("floor_s"),
        "floor_rates": extra.get("floor_rates"),
        "note": extra.get("patched") if extra.get("patched") not in (None, "full", "contraction + graph ops") else None,
    }


def load(paths: list[Path]) -> tuple[list[dict], dict, list[dict]]:
    """(rows, machine info of the first file, benchmarks that did not run)."""
    rows, machine, not_run = [], {}, []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not machine:
            machine = {**(data.get("machine_info") or {}), "datetime": data.get("datetime"), "commit_info": data.get("commit_info"), "runs": []}
        fa = (data.get("machine_info") or {}).get("fastattr") or {}
        machine["runs"].append({"file": Path(path).name, "datetime": data.get("datetime"), "n": len(data.get("benchmarks", [])),
                                "loadavg_start": fa.get("loadavg_start"), "loadavg_end": fa.get("loadavg_end"),
                                "roofline": fa.get("roofline") or {}})  # fmt: skip
        rows += [_row(b) for b in data.get("benchmarks", [])]
        not_run += (data.get("fastattr") or {}).get("not_run", [])
    # The same (op, case, impl) in several files: the later file wins (a rerun replaces a run).
    rows = list({(r["op"], r["case"], r["impl"]): r for r in rows}.values())
    not_run = list({n["nodeid"]: n for n in not_run}.values())
    _add_speedups(rows)
    return rows, machine, not_run


def _add_speedups(rows: list[dict]) -> None:
    base = {(r["op"], r["case"]): r for r in rows if r["baseline"]}
    # The floor is the workload's (benchmarks/floor.py), recorded on the row whose run it was
    # counted from; every implementation of the case is measured against it.
    floors = {(r["op"], r["case"]): r for r in rows if r.get("floor_s")}
    for r in rows:
        f = floors.get((r["op"], r["case"]))
        r["floor_s"] = f["floor_s"] if f else None
        r["floor_rates"] = f["floor_rates"] if f else None
        r["frac_floor"] = r["floor_s"] / r["median_s"] if f and r["median_s"] else None
        b = base.get((r["op"], r["case"]))
        r["speedup"] = b["median_s"] / r["median_s"] if b and b["median_s"] and r["median_s"] else None
        r["mem_ratio"] = r["peak"] / b["peak"] if b and b.get("peak") and r.get("peak") is not None else None


# ------------------------------------------------------------------------------------ markdown


def _t(seconds) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _mib(nbytes) -> str:
    if nbytes is None:
        return "-"
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.3g} GiB"
    return f"{nbytes / 2**20:.3g} MiB" if nbytes >= 2**17 else f"{nbytes / 2**10:.3g} KiB"


def _rate(value, frac, unit) -> str:
    if value is None:
        return "-"
    return f"{value:.3g} {unit}" + (f" ({100 * frac:.2g}%)" if frac is not None else "")


def _speedup(x) -> str:
    return "-" if x is None else f"{x:.3g}x"


def _times(r) -> str:
    return "" if not r["frac_floor"] else f"{1 / r['frac_floor']:.3g}x"


def _err(r) -> str:
    parts = []
    if r["err"] is not None:
        parts.append(f"{r['err']:.1e}" if r["err"] == r["err"] else "NaN")
    if r["masks_equal"] is not None:
        parts.append("masks equal" if r["masks_equal"] else "MASKS DIFFER")
    if r.get("node_jaccard") is not None:
        parts.append(f"pruned nodes Jaccard {r['node_jaccard']:.3f}")
    if r.get("outside_backward") is not None:
        parts.append(f"{100 * r['outside_backward']:.1f}% of loop outside backward")
    return ", ".join(parts) or "-"


def _machine_lines(machine: dict) -> list[str]:
    fa = machine.get("fastattr") or {}
    roof = fa.get("roofline") or {}
    lines = [
        f"- device: **{fa.get('device_name', '?')}** ({fa.get('device', '?')}), tier `{fa.get('tier', '?')}`, "
        f"fastattr {fa.get('version', '?')}, torch {fa.get('torch', '?')} (CUDA {fa.get('torch_cuda')})",
        f"- run: {machine.get('datetime', '?')}, python {machine.get('python_version', '?')}, "
        f"commit {(machine.get('commit_info') or {}).get('id', '?')}"
        + (" (dirty)" if (machine.get("commit_info") or {}).get("dirty") else ""),
    ]
    if roof:
        flops = ", ".join(f"{k.rsplit('_', 1)[1]} {v:.3g} TFLOP/s" for k, v in roof.items() if k.startswith("matmul_tflops_"))
        lines.append(f"- measured roofline: copy **{roof['copy_gbps']:.4g} GB/s** (read + write of "
                     f"{roof['copy_bytes'] / 2**30:.3g} GiB); matmul {roof.get('matmul_n')}^3: {flops}")  # fmt: skip
    if fa.get("loadavg_start") is not None:
        load = lambda v: "/".join(f"{x:.1f}" for x in v)  # noqa: E731
        lines.append(f"- load average (1/5/15 min) at start {load(fa['loadavg_start'])}, at end "
                     f"{load(fa['loadavg_end'])} on {fa.get('threads')} torch threads: CPU times are only as "
                     "good as the machine was quiet")  # fmt: skip
    runs = machine.get("runs") or []
    if len(runs) > 1:  # merged files: each run's own conditions (the lines above are the first file's)
        for run in runs:
            roof = run["roofline"]
            load = "/".join(f"{x:.1f}" for x in run["loadavg_start"]) if run["loadavg_start"] else "?"
            lines.append(f"  - `{run['file']}`: {run['n']} benchmarks, {run['datetime']}, load at start {load}, "
                         f"copy {roof.get('copy_gbps', float('nan')):.4g} GB/s, matmul fp32 "
                         f"{roof.get('matmul_tflops_fp32', float('nan')):.3g} TFLOP/s")  # fmt: skip
    backends = fa.get("backends") or {}
    if backends:
        lines.append("- backends: " + "; ".join(
            f"{n} {'yes' if b['available'] else 'no (' + b['reason'] + ')'}" for n, b in backends.items()))  # fmt: skip
    return lines


def markdown(rows: list[dict], machine: dict, not_run: list[dict], title: str) -> str:
    out = [f"# {title}", ""]
    out += _machine_lines(machine)
    out += [
        "",
        "Time is the median over the timed rounds (after warm-up; GPU work synchronised inside the timed "
        "function). Speedup is circuit-tracer's median over this row's, on the same inputs in the same run. "
        "Peak memory is above the level at entry: `torch.cuda.max_memory_allocated` on GPUs, sampled "
        "anonymous RSS (resident minus file-backed pages) on CPUs (a lower bound). GB/s counts the fewest bytes the op must move, TFLOP/s its arithmetic; the "
        "percentages are of the roofline measured at the start of the run. Error is against circuit-tracer's "
        "result (contraction: sampled rows against float64). Floor (attribute): the least matmul work and "
        "memory traffic of an exact attribution of the case at the roofline's rates (measured on a CPU, "
        "the datasheet's on a GPU; benchmarks/floor.py), and the row's time as a multiple of it.",
        "",
    ]
    by_op = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    for op, op_rows in by_op.items():
        out += [f"## {op}", ""]
        size_label = next((r["size_label"] for r in op_rows if r["size_label"]), None)
        if size_label:
            out += [f"Plotted against: {size_label}.", ""]
        has_floor = any(r["floor_s"] for r in op_rows)
        out += ["| case | impl | time | speedup | peak memory | memory vs c-t | GB/s (% roofline) | TFLOP/s (% roofline) | error vs c-t |"
                + (" floor | time / floor |" if has_floor else ""),
                "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if has_floor else "")]  # fmt: skip
        cases = sorted({r["case"] for r in op_rows}, key=lambda c: (min((r["size"] or 0) for r in op_rows if r["case"] == c), c))
        for case in cases:
            for r in sorted((r for r in op_rows if r["case"] == case), key=lambda r: _impl_key(r["impl"])):
                impl = r["impl"] if r["baseline"] else f"fastattr {r['impl']}"
                if r["note"]:
                    impl += f" ({r['note'].split(' (')[0]})"
                mem_vs = "-" if r["mem_ratio"] is None or r["baseline"] else f"{100 * r['mem_ratio']:.3g}%"
                out.append(f"| {case} | {impl} | {_t(r['median_s'])} | {'' if r['baseline'] else _speedup(r['speedup'])} | "
                           f"{_mib(r['peak'])} | {mem_vs} | {_rate(r['gbps'], r['frac_bw'], 'GB/s')} | "
                           f"{_rate(r['tflops'], r['frac_flops'], 'TFLOP/s')} | {'' if r['baseline'] else _err(r)} |"
                           + (f" {_t(r['floor_s'])} | {_times(r)} |" if has_floor else ""))  # fmt: skip
        out.append("")
    if not_run:
        out += ["## Not run", "", "| benchmark | outcome | reason |", "|---|---|---|"]
        reasons = defaultdict(list)
        for n in not_run:
            reasons[(n["outcome"], n["reason"].removeprefix("Skipped: "))].append(n["nodeid"].split("::")[-1])
        for (outcome, reason), ids in sorted(reasons.items()):
            shown = ", ".join(f"`{i}`" for i in ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
            out.append(f"| {shown} | {outcome} | {reason.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def summary(rows: list[dict]) -> str:
    """A few lines per op: each fastattr backend's speedup over circuit-tracer across cases."""
    lines = []
    by = defaultdict(list)
    for r in rows:
        if not r["baseline"] and r["speedup"]:
            by[(r["op"], r["impl"])].append(r["speedup"])
    for (op, impl), xs in sorted(by.items(), key=lambda kv: (kv[0][0], _impl_key(kv[0][1]))):
        geo = math.exp(statistics.fmean(math.log(x) for x in xs))
        lines.append(f"{op:<24} fastattr {impl:<7} speedup geomean {geo:7.3g}x  (min {min(xs):.3g}x, max {max(xs):.3g}x, {len(xs)} cases)")
    return "\n".join(lines) or "no speedups: no case ran both circuit-tracer and a fastattr backend"


# --------------------------------------------------------------------------------------- plots
#
# Colour = implementation, marker = family (the cases of one family differ only in size, e.g. the
# prompt length, and are joined by a line; a family of one case is a lone marker).

_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]


def _figure(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 5.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _si(v: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def _log_axis(axis, values, suffix: str = "", si: bool = False) -> None:
    """Log scale with 1-2-5 ticks labelled plainly: the default labels minor ticks in 10^x
    notation over short ranges, and they overlap."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = min(values), max(values)
    axis.axes.set(**{f"{axis.axis_name}scale": "log", f"{axis.axis_name}lim": (lo / 1.6, hi * 1.6)})
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: (_si(v) if si else f"{v:g}") + suffix))
    axis.set_minor_formatter(NullFormatter())


def _draw(ax, rows: list[dict], y, *, baseline: bool) -> list:
    """Plot ``y(row)`` against size; return the legend handles."""
    from matplotlib.lines import Line2D

    rows = [r for r in rows if r["size"] is not None and y(r) is not None and (baseline or not r["baseline"])]
    impls = sorted({r["impl"] for r in rows}, key=_impl_key)
    colours = {impl: ("black" if impl == BASELINE else f"C{i}") for i, impl in enumerate(i for i in impls if i != BASELINE)}
    colours.setdefault(BASELINE, "black")
    fams = sorted({r["family"] for r in rows}, key=lambda f: (min(r["size"] for r in rows if r["family"] == f), f))
    markers = {f: _MARKERS[i % len(_MARKERS)] for i, f in enumerate(fams)}
    for impl in impls:
        for fam in fams:
            rs = sorted((r for r in rows if r["impl"] == impl and r["family"] == fam), key=lambda r: r["size"])
            if rs:
                # The baseline on top: fastattr's torch backend often lies right on it.
                ax.plot([r["size"] for r in rs], [y(r) for r in rs], color=colours[impl], marker=markers[fam],
                        linestyle="--" if impl == BASELINE else "-", markersize=6, alpha=0.9,
                        zorder=3 if impl == BASELINE else 2, linewidth=1.8 if impl == BASELINE else 1.5)  # fmt: skip
    handles = [Line2D([], [], color=colours[i], linestyle="--" if i == BASELINE else "-",
                      label=i if i == BASELINE else f"fastattr {i}") for i in impls]  # fmt: skip
    handles += [Line2D([], [], color="grey", marker=markers[f], linestyle="none", label=f) for f in fams]
    return handles


def _finish(plt, fig, path: Path, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_ratio(want: list[dict], path: Path, title: str, y, *, baseline: bool, lines: tuple[float, ...],
                ylabel: str) -> bool:  # fmt: skip
    """One log-log panel per op of ``y(row)`` against size, with horizontal guides at ``lines``."""
    ops = list(dict.fromkeys(r["op"] for r in want))
    if not ops:
        return False
    plt, fig, axes = _figure(len(ops))
    for ax, op in zip(axes, ops):
        op_rows = [r for r in want if r["op"] == op]
        handles = _draw(ax, op_rows, y, baseline=baseline)
        for k, level in enumerate(lines):
            ax.axhline(level, color="black" if k == 0 else "grey", linestyle="--" if not baseline else ":", linewidth=1)
        _log_axis(ax.xaxis, [r["size"] for r in op_rows], si=True)
        _log_axis(ax.yaxis, [y(r) for r in op_rows] + [1.0], "x")
        ax.set_title(op)
        ax.set_xlabel(next((r["size_label"] for r in op_rows if r["size_label"]), "size"))
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(handles=handles, fontsize=7, loc="best")
    _finish(plt, fig, path, title)
    return True


def plot_speedup(rows: list[dict], path: Path, title: str) -> bool:
    want = [r for r in rows if r["speedup"] is not None and not r["baseline"] and r["size"] is not None]
    return _plot_ratio(want, path, title, lambda r: r["speedup"], baseline=False, lines=(1.0,),
                       ylabel="speedup over circuit-tracer (dashed line: 1x)")  # fmt: skip


def plot_floor(rows: list[dict], path: Path, title: str) -> bool:
    """Time over floor per case (1 = at the floor), fastattr and circuit-tracer."""
    want = [r for r in rows if r["frac_floor"] and r["size"] is not None]
    return _plot_ratio(want, path, title, lambda r: 1 / r["frac_floor"], baseline=True, lines=(1.0, 2.0),
                       ylabel="time / floor (dotted: 1x and 2x)")  # fmt: skip


_MEM_FLOOR_MIB = 0.01


def plot_memory(rows: list[dict], path: Path, title: str) -> bool:
    want = [r for r in rows if r["peak"] is not None and r["size"] is not None]
    ops = list(dict.fromkeys(r["op"] for r in want))
    if not ops:
        return False
    plt, fig, axes = _figure(len(ops))
    mib = lambda r: max(r["peak"] / 2**20, _MEM_FLOOR_MIB)  # noqa: E731 - a log axis has no zero
    for ax, op in zip(axes, ops):
        op_rows = [r for r in want if r["op"] == op]
        handles = _draw(ax, op_rows, mib, baseline=True)
        _log_axis(ax.xaxis, [r["size"] for r in op_rows], si=True)
        _log_axis(ax.yaxis, [mib(r) for r in op_rows])
        ax.set_title(op)
        ax.set_xlabel(next((r["size_label"] for r in op_rows if r["size_label"]), "size"))
        method = next((r["mem_method"] for r in op_rows if r["mem_method"]), "")
        ax.set_ylabel(f"peak memory above entry, MiB\n({method}; below {_MEM_FLOOR_MIB} drawn at {_MEM_FLOOR_MIB})")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(handles=handles, fontsize=7, loc="best")
    _finish(plt, fig, path, title)
    return True


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for report.md, speedup.png, memory.png")
    parser.add_argument("--title", default=None)
    parser.add_argument("--summary", action="store_true", help="also print a short summary to stdout")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    rows, machine, not_run = load(args.json)
    fa = machine.get("fastattr") or {}
    title = args.title or f"fastattr benchmarks: {fa.get('device_name', '?')}, tier {fa.get('tier', '?')}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(markdown(rows, machine, not_run, title))
    written, status = ["report.md"], 0
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("report: matplotlib is not installed (pip install matplotlib): no plots", file=sys.stderr)
            args.no_plots, status = True, 1
    if not args.no_plots:
        if plot_speedup(rows, args.out / "speedup.png", title):
            written.append("speedup.png")
        if plot_memory(rows, args.out / "memory.png", title):
            written.append("memory.png")
        if plot_floor(rows, args.out / "floor.png", title):
            written.append("floor.png")
    print(f"report: {len(rows)} benchmarks, {len(not_run)} not run -> {', '.join(str(args.out / w) for w in written)}")
    if args.summary:
        print(summary(rows))
    return status


if __name__ == "__main__":
    sys.exit(main())
