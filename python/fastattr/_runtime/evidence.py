"""Which GPU backend an op picks automatically, by the evidence that its kernels are right.

No kernel is trusted on a GPU because it compiled. Until a device report has measured a card, the
automatic order on CUDA tensors is the implementations' order of evidence (:data:`EVIDENCE_ORDER`):
triton first (its kernels executed in CI under the Triton interpreter), then cuda (only compiled),
then torch. A device report, written by ``benchmarks/gpu_check.sh`` and committed under
``benchmarks/results/``, is one JSON file per card::

    {"card": "NVIDIA H100 80GB HBM3", "cc": "90", "driver": "...", "fastattr_commit": "...",
     "selftest": <the JSON of python -m fastattr selftest --json>,
     "defaults": {"contract": {"backend": "cuda", "why": "...", "selftest_op": "contract"}, ...}}

A report's default for an op counts only where the report's own self-test cell for that op and
backend is ``ok`` (``selftest_op`` names the self-test row when it differs from the op's name), and
only for the card named in the report. ``FASTATTR_RESULTS_DIR`` points at another folder of reports.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("fastattr")

# Most evidence first (module docstring). The CPU order needs no report: the cpu kernels execute in CI.
EVIDENCE_ORDER = ("triton", "cuda", "torch")
EVIDENCE_WHY = {
    "triton": "executed in CI under the Triton interpreter; no device report for this card",
    "cuda": "compiled in CI only (never executed); no device report for this card",
    "torch": "the pure-torch reference",
}
# benchmarks/results of a source checkout (python/fastattr/_runtime/evidence.py -> the repo root).
_REPO_RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"


@dataclass(frozen=True)
class MeasuredDefault:
    op: str
    backend: str
    why: str
    report: str  # the report's file name


def results_dir() -> Path:
    return Path(os.environ.get("FASTATTR_RESULTS_DIR") or _REPO_RESULTS)


def _cell_ok(report: dict, selftest_op: str, backend: str) -> bool:
    cell = report.get("selftest", {}).get("table", {}).get(selftest_op, {}).get(backend, {})
    return cell.get("status") == "ok"


def load_reports(directory: Path) -> list[tuple[str, dict]]:
    """(file name, report) of every device report in ``directory`` (``*.json`` with a ``card`` and a
    ``defaults`` entry, in name order); files that are not reports are skipped, unreadable ones
    logged."""
    if not directory.is_dir():
        return []
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("device report %s is unreadable and ignored: %s", path, exc)
            continue
        if isinstance(data, dict) and isinstance(data.get("card"), str) and isinstance(data.get("defaults"), dict):
            out.append((path.name, data))
    return out


def measured_defaults(card: str, directory: Path | None = None) -> dict[str, MeasuredDefault]:
    """op -> the default measured on ``card``, from the reports whose self-test cell for it is ok.
    A later report (by file name: benchmarks/results/<card>-<date>.json) overrides an earlier one."""
    found: dict[str, MeasuredDefault] = {}
    for name, report in load_reports(results_dir() if directory is None else directory):
        if report["card"] != card:
            continue
        for op, entry in report["defaults"].items():
            backend = entry.get("backend") if isinstance(entry, dict) else None
            if backend not in EVIDENCE_ORDER:
                continue
            if not _cell_ok(report, entry.get("selftest_op", op), backend):
                logger.info("device report %s: the %s default %r is ignored (its self-test cell is not ok)",
                            name, op, backend)
                continue
            why = f"measured on {card} ({name}): {entry.get('why', 'no reason given')}"
            found[op] = MeasuredDefault(op, backend, why, name)
    return found


@functools.lru_cache(maxsize=None)
def _card_defaults(card: str, directory: str) -> dict[str, MeasuredDefault]:
    return measured_defaults(card, Path(directory))


def gpu_order(op: str, card: str | None) -> tuple[tuple[str, ...], str]:
    """The automatic backend order of ``op`` on CUDA tensors of ``card``, and why its first entry
    comes first."""
    measured = _card_defaults(card, str(results_dir())).get(op) if card else None
    if measured is None:
        return EVIDENCE_ORDER, EVIDENCE_WHY[EVIDENCE_ORDER[0]]
    rest = tuple(b for b in EVIDENCE_ORDER if b != measured.backend)
    return (measured.backend, *rest), measured.why


def clear_cache() -> None:
    """Forget the loaded reports (after FASTATTR_RESULTS_DIR or the folder changed)."""
    _card_defaults.cache_clear()
