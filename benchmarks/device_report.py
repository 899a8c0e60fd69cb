"""The device check's report: the self-test JSON, the measured timings and the default per op, in
the format fastattr's evidence loader reads (python/fastattr/_runtime/evidence.py).

    python benchmarks/device_report.py OUTDIR --card NAME --cc 90 --driver 580.65 [--commit SHA]

Reads OUTDIR/selftest.json and, if present, OUTDIR/timings.json; writes OUTDIR/report.json. Commit it
as benchmarks/results/<card>-<date>.json to make its defaults the automatic choice on that card.
An op's default is a GPU backend whose self-test cell is ok: the fastest by the timings' median where
both cuda and triton were timed on the same case, else the first ok one in the order of evidence
(no timing: no speed claim).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# self-test row -> dispatch-registry op (the descending sort has no op of its own).
SELFTEST_OPS = {"contract": "contract", "find_threshold": "find_threshold", "influence": "compute_node_influence",
                "topk_edges": "topk_edges", "prune_graph": "prune_graph"}
TIMED_AS = {"contract": "contraction", "prune_graph": "prune_graph", "find_threshold": "find_threshold"}
GPU_ORDER = ("triton", "cuda")  # by evidence; torch is the reference, not a kernel


def _speedups(timings: dict, timed_op: str) -> dict[str, list[float]]:
    """backend -> median seconds on each case both cuda and triton ran (same order)."""
    by_case: dict[str, dict[str, float]] = {}
    for r in timings.get("rows", []):
        if r.get("op") == timed_op and r.get("median_s") and "error" not in r and r.get("impl") in GPU_ORDER:
            by_case.setdefault(str(r.get("case")), {})[r["impl"]] = r["median_s"]
    both = [c for c in by_case.values() if len(c) == 2]
    return {b: [c[b] for c in both] for b in GPU_ORDER} if both else {}


def defaults(selftest: dict, timings: dict) -> dict:
    out = {}
    for st_op, op in SELFTEST_OPS.items():
        row = selftest.get("table", {}).get(st_op, {})
        ok = [b for b in GPU_ORDER if row.get(b, {}).get("status") == "ok"]
        if not ok:
            continue
        times = _speedups(timings, TIMED_AS.get(st_op, "")) if len(ok) == 2 else {}
        if times:
            total = {b: sum(t) for b, t in times.items()}
            best = min(total, key=total.get)
            other = next(b for b in total if b != best)
            why = (f"self-test ok; {total[other] / total[best]:.2f}x faster than {other} over "
                   f"{len(times[best])} timed case(s) (timings.json)")
        else:
            best = ok[0]
            why = "self-test ok; " + ("the only GPU backend ok" if len(ok) == 1 else "not timed: the order of evidence")
        out[op] = {"backend": best, "why": why, "selftest_op": st_op}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--card", required=True)
    ap.add_argument("--cc", default="")
    ap.add_argument("--driver", default="")
    ap.add_argument("--commit", default="")
    ns = ap.parse_args()
    selftest = json.loads((ns.outdir / "selftest.json").read_text())
    tpath = ns.outdir / "timings.json"
    timings = json.loads(tpath.read_text()) if tpath.exists() else {}
    report = {"card": ns.card, "cc": ns.cc, "driver": ns.driver, "fastattr_commit": ns.commit,
              "selftest": selftest, "defaults": defaults(selftest, timings)}
    (ns.outdir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    for op, d in report["defaults"].items():
        print(f"{op:<24} {d['backend']:<7} {d['why']}")


if __name__ == "__main__":
    main()
