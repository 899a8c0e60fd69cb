"""``fastattr.selftest()`` / ``python -m fastattr selftest``: every op on every backend that can run
here, on small fresh random inputs, against :mod:`fastattr.reference`.

What a GPU user runs first: one table (op x backend -> ok / mismatch (max error) / n/a (why)) that
says whether these kernels give the reference's answers on this card. Sizes are kept small enough
for the Triton interpreter, so a CPU machine finishes in seconds.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch

from fastattr import reference
from fastattr._runtime import backends as _backends
from fastattr._runtime import ext as _ext
from fastattr._runtime.info import __version__
from fastattr.ops.contraction import contract
from fastattr.ops.influence import compute_edge_influence, compute_node_influence
from fastattr.ops.pruning import prune_graph
from fastattr.ops.threshold import descending_values, find_threshold
from fastattr.ops.topk_edges import topk_edges

# Relative max-error bounds, the test suite's: reduced precision inputs only contract in their dtype.
_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}
_INFLUENCE_TOL = 1e-5


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    if got.shape != want.shape:
        return float("inf")
    if not torch.equal(torch.isnan(got), torch.isnan(want)):
        return float("inf")
    got, want = got.nan_to_num(0.0), want.nan_to_num(0.0)
    if got.numel() == 0:
        return 0.0
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    return diff / scale if scale > 0 else diff


def _exact(got: torch.Tensor, want: torch.Tensor) -> float:
    """0 when equal, else the number of differing entries (masks, indices, thresholds)."""
    got, want = got.cpu(), want.cpu()
    if got.shape != want.shape:
        return float("inf")
    if got.dtype == torch.bool:
        return float((got ^ want).sum())
    return 0.0 if torch.equal(got, want) else float((got != want).sum().clamp(min=1))


def _graph(seed: int, n_layers: int = 2, n_pos: int = 3, feats: int = 3, n_logits: int = 2):
    """A small random DAG in circuit-tracer's node order (features, errors, tokens, logits)."""
    g = torch.Generator().manual_seed(seed)
    f_layer, f_pos = [], []
    for layer in range(n_layers):
        for p in range(n_pos):
            k = int(torch.randint(0, feats + 1, (1,), generator=g))
            f_layer += [layer] * k
            f_pos += [p] * k
    nf, ne, nt = len(f_layer), n_layers * n_pos, n_pos
    n = nf + ne + nt + n_logits
    layer = torch.full((n,), 10**6)
    pos = torch.full((n,), -1)
    if nf:
        layer[:nf], pos[:nf] = torch.tensor(f_layer), torch.tensor(f_pos)
    layer[nf:nf + ne] = torch.arange(n_layers).repeat_interleave(n_pos)
    pos[nf:nf + ne] = torch.arange(n_pos).repeat(n_layers)
    layer[nf + ne:nf + ne + nt] = -1
    pos[nf + ne:nf + ne + nt] = torch.arange(n_pos)
    kind = torch.zeros(n, dtype=torch.long)
    kind[nf:nf + ne], kind[nf + ne:nf + ne + nt], kind[nf + ne + nt:] = 1, 2, 3
    src = (kind == 0) | (kind == 1)
    tgt = kind == 0
    allowed = tgt[:, None] & src[None, :] & (layer[None, :] < layer[:, None]) & (pos[None, :] <= pos[:, None])
    allowed |= tgt[:, None] & (kind == 2)[None, :] & (pos[None, :] <= pos[:, None])
    allowed |= (kind == 3)[:, None] & (kind != 3)[None, :] & (pos[None, :] == n_pos - 1)
    vals = torch.randn(n, n, generator=g) * torch.exp(torch.randn(n, n, generator=g))
    A = torch.where(allowed & (torch.rand(n, n, generator=g) < 0.5), vals, torch.zeros(()))
    probs = torch.softmax(torch.randn(n_logits, generator=g), 0)
    return SimpleNamespace(adjacency_matrix=A, input_tokens=torch.zeros(n_pos, dtype=torch.long),
                           logit_targets=list(range(n_logits)), logit_probabilities=probs,
                           selected_features=torch.arange(nf), active_features=torch.zeros(nf, 3, dtype=torch.long),
                           cfg=SimpleNamespace(n_layers=n_layers))


def _on(graph, device: torch.device):
    out = SimpleNamespace(**vars(graph))
    out.adjacency_matrix = graph.adjacency_matrix.to(device)
    out.logit_probabilities = graph.logit_probabilities.to(device)
    return out


def _weights(graph) -> torch.Tensor:
    w = torch.zeros(graph.adjacency_matrix.shape[0], device=graph.adjacency_matrix.device)
    w[-len(graph.logit_targets):] = graph.logit_probabilities
    return w


# Each check runs one op on one backend and returns (max error, tolerance) per case; a case whose
# dtype the backend does not take is left out (the registry says which dtypes each takes).

def _contract_cases(backend: str, device: torch.device) -> list[tuple[str, float, float]]:
    results = []
    shapes = [(1, 3, 16, 5, 8, True), (2, 4, 40, 17, 24, False), (3, 2, 7, 1, 3, True), (2, 3, 16, 0, 4, True)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        if not _backends.OPS["contract"].takes(backend, dtype):
            continue
        if backend == "triton" and dtype == torch.bfloat16 and _backends.triton_interpret():
            continue  # bf16 tl.dot is wrong under TRITON_INTERPRET=1 (a Triton interpreter limit)
        for seed, (B, P, D, S, R, unique) in enumerate(shapes):
            for layout in ("rb", "br"):
                g = torch.Generator().manual_seed(seed)
                grads = torch.randn(B, P, D, generator=g).to(dtype)
                vectors = torch.randn(S, D, generator=g).to(dtype)
                positions = torch.randint(0, P, (S,), generator=g)
                rows = torch.randperm(R, generator=g)[:S] if unique else torch.randint(0, R, (S,), generator=g)
                base = torch.randn(R, B, generator=g)
                start = base.to(dtype).double()  # the output starts from what the kernel reads
                want_d = start.clone() if layout == "rb" else start.T.contiguous()
                reference.contract(grads.double(), vectors.double(), positions, rows, want_d, out_layout=layout)
                out = (base.clone() if layout == "rb" else base.T.contiguous()).to(dtype).to(device)
                contract(grads.to(device), vectors.to(device), positions.to(device), rows.to(device), out,
                                  out_layout=layout, backend=backend)
                results.append((f"{str(dtype)[6:]} {B}x{P}x{D} S={S} {layout}", _rel_err(out, want_d), _TOL[dtype]))
    return results


def _threshold_cases(backend: str, device: torch.device):
    g = torch.Generator().manual_seed(3)
    inputs = {
        "n=1": torch.rand(1, generator=g),
        "n=257": torch.rand(257, generator=g),
        "ties": torch.round(torch.rand(300, generator=g) * 4) / 4,
        "zeros": torch.zeros(64),
        "heavy tail": torch.exp(torch.randn(500, generator=g) * 3),
    }
    results = []
    for name, x in inputs.items():
        for t in (0.0, 0.5, 0.8, 1.0):
            got = find_threshold(x.to(device), t, backend=backend)
            results.append((f"{name} t={t}", _exact(got, reference.find_threshold(x, t)), 0.0))
    return results


def _influence_cases(backend: str, device: torch.device):
    results = []
    for seed in range(2):
        graph = _graph(seed)
        A, w = graph.adjacency_matrix, _weights(graph)
        Ad, wd = A.to(device), w.to(device)
        got = compute_node_influence(Ad, wd, backend=backend)
        want = reference.compute_node_influence(A.double(), w.double())
        results.append((f"node seed={seed}", _rel_err(got, want), _INFLUENCE_TOL))
        got = compute_edge_influence(Ad, wd, backend=backend)
        want = reference.compute_edge_influence(A.double(), w.double())
        results.append((f"edge seed={seed}", _rel_err(got, want), _INFLUENCE_TOL))
    return results


def _topk_cases(backend: str, device: torch.device):
    results = []
    A = _graph(5).adjacency_matrix
    A = torch.where(torch.rand(A.shape, generator=torch.Generator().manual_seed(5)) < 0.3, torch.round(A * 2) / 2, A)
    for k in (None, 0, 1, 3, 1000):
        got = topk_edges(A.to(device), k, backend=backend)
        want = topk_edges(A, k, backend="torch") if backend != "torch" else _brute_topk(A, k)
        err = max(_exact(got.crow_indices, want.crow_indices), _exact(got.col_indices, want.col_indices),
                  _exact(got.values, want.values), _rel_err(got.row_abs_sum, A.abs().double().sum(1)) > 1e-6)
        results.append((f"k={k}", err, 0.0))
    return results


def _brute_topk(A: torch.Tensor, k):
    """The oracle for the torch backend itself: per row, sorted by (-|w|, column)."""
    cols, vals, crow = [], [], [0]
    for row in A.tolist():
        cand = sorted((j for j, v in enumerate(row) if v != 0.0), key=lambda j: (-abs(row[j]), j))
        keep = sorted(cand if k is None else cand[:k])
        cols += keep
        vals += [row[j] for j in keep]
        crow.append(len(cols))
    return SimpleNamespace(crow_indices=torch.tensor(crow), col_indices=torch.tensor(cols, dtype=torch.int64),
                           values=torch.tensor(vals, dtype=torch.float32))


def _prune_cases(backend: str, device: torch.device):
    results = []
    for seed in range(2):
        graph = _graph(10 + seed)
        want = reference.prune_graph(graph, 0.8, 0.98)
        got = prune_graph(_on(graph, device), 0.8, 0.98, backend=backend)
        err = max(_exact(got.node_mask, want.node_mask), _exact(got.edge_mask, want.edge_mask))
        results.append((f"masks seed={seed}", err, 0.0))
        results.append((f"cumulative seed={seed}", _rel_err(got.cumulative_scores, want.cumulative_scores), 1e-5))
    return results


def _sort_cases(backend: str, device: torch.device):
    g = torch.Generator().manual_seed(7)
    results = []
    for name, x in {"n=1": torch.rand(1, generator=g), "n=1000": torch.rand(1000, generator=g),
                    "ties+zeros": torch.round(torch.rand(777, generator=g) * 3) / 3}.items():
        got = descending_values(x.to(device))
        results.append((name, _exact(got, torch.sort(x, descending=True).values), 0.0))
    return results


# op name in the table -> (registry op deciding which backends implement it, check)
CHECKS: dict[str, tuple[str | None, Callable]] = {
    "contract": ("contract", _contract_cases),
    "find_threshold": ("find_threshold", _threshold_cases),
    "influence": ("compute_node_influence", _influence_cases),
    "topk_edges": ("topk_edges", _topk_cases),
    "prune_graph": ("prune_graph", _prune_cases),
    "descending_sort": (None, _sort_cases),
}


def _device_for(backend: str) -> torch.device:
    if backend == "cuda" or (backend in ("triton", "torch") and torch.cuda.is_available() and not _backends.triton_interpret()):
        return torch.device("cuda")
    return torch.device("cpu")


def _sort_reason(backend: str) -> str | None:
    """descending_values has no registry entry: CPU tensors take the C++ sort, CUDA ones CUB's."""
    if backend == "cpu":
        return None
    if backend == "cuda":
        return None if hasattr(_ext.ext, "sort_descending_cuda") else "this build has no CUDA kernels"
    return "no implementation on this backend (the cpu and cuda sorts only)"


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "fastattr": __version__, "device": "cpu", "driver": None, "triton": None}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = f"{props.name} (sm_{props.major}{props.minor})"
    if _ext.ext is not None:
        b = _ext.ext.build_info()
        env["build_cuda"] = b.get("cuda_version") if b.get("cuda") else None
        if b.get("cuda"):
            driver = _ext.ext.cuda_probe()[3]
            env["driver"] = f"CUDA {driver // 1000}.{driver % 1000 // 10}" if driver else "none"
    env["triton_interpret"] = _backends.triton_interpret()
    return env


def selftest(*, backends: list[str] | None = None, ops: list[str] | None = None, print_report: bool = True,
             json_path: str | None = None, interpret: bool | None = None) -> dict:
    """Run every op on every backend against the reference; return (and print) the report.

    ``report["ok"]`` is False when any case mismatched. ``interpret`` (None: when there is no GPU and
    triton's kernels are not imported yet) runs the Triton kernels on the CPU interpreter.
    """
    for name in backends or ():
        _backends._validate_name(name, "selftest(backends)")
    for name in ops or ():
        if name not in CHECKS:
            raise ValueError(f"selftest(ops): expected names from {', '.join(CHECKS)}, got {name!r}")
    if interpret is None:
        interpret = not torch.cuda.is_available() and "fastattr.triton_kernels" not in sys.modules
    if interpret and "TRITON_INTERPRET" not in os.environ:
        # Triton reads this when its kernels are decorated, so it must precede their import.
        os.environ["TRITON_INTERPRET"] = "1"
    status = _backends.backend_status()
    chosen = [b for b in _backends.BACKENDS if backends is None or b in backends]
    table: dict[str, dict[str, dict]] = {}
    start = time.perf_counter()
    for op_name, (registry, check) in CHECKS.items():
        if ops is not None and op_name not in ops:
            continue
        row = table[op_name] = {}
        for backend in chosen:
            ok, why = status[backend]
            if not ok:
                row[backend] = {"status": "n/a", "why": why}
                continue
            missing = (_sort_reason(backend) if registry is None
                       else None if backend in _backends.OPS[registry].impls else "not implemented for this op")
            if missing:
                row[backend] = {"status": "n/a", "why": missing}
                continue
            t0 = time.perf_counter()
            try:
                cases = check(backend, _device_for(backend))
            except Exception as exc:  # a crash is a result too: report it, go on with the rest
                row[backend] = {"status": "error", "why": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            worst = max(cases, key=lambda c: c[1] / c[2] if c[2] else (c[1] > 0) * float("inf"), default=None)
            bad = [c for c in cases if not c[1] <= c[2]]
            row[backend] = {"status": "mismatch" if bad else "ok", "cases": len(cases),
                            "max_error": worst[1] if worst else 0.0, "worst_case": worst[0] if worst else None,
                            "failed": [c[0] for c in bad], "seconds": round(time.perf_counter() - t0, 3)}
    report = {"environment": environment(), "backends": {b: {"available": status[b][0], "reason": status[b][1]}
                                                         for b in chosen},
              "table": table, "seconds": round(time.perf_counter() - start, 2)}
    report["ok"] = all(cell["status"] in ("ok", "n/a") for row in table.values() for cell in row.values())
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
    if print_report:
        print(format_report(report))
    return report


def _cell(cell: dict) -> str:
    if cell["status"] == "ok":
        return f"ok ({cell['max_error']:.1e})"
    if cell["status"] == "mismatch":
        return f"MISMATCH ({cell['max_error']:.2e}, {len(cell['failed'])}/{cell['cases']})"
    if cell["status"] == "error":
        return "ERROR"
    return "n/a"


def format_report(report: dict) -> str:
    env = report["environment"]
    lines = [f"fastattr {env['fastattr']} self-test: device {env['device']}, driver {env['driver']}, "
             f"build CUDA {env.get('build_cuda')}, torch {env['torch']} (CUDA {env['torch_cuda']}), "
             f"triton {env['triton']}{' (interpreter)' if env['triton_interpret'] else ''}"]
    backends = list(report["backends"])
    lines.append(f"{'op':<16}" + "".join(f"{b:<26}" for b in backends))
    notes = []
    for op_name, row in report["table"].items():
        lines.append(f"{op_name:<16}" + "".join(f"{_cell(row[b]):<26}" for b in backends))
        for b in backends:
            cell = row[b]
            if cell["status"] in ("mismatch", "error"):
                notes.append(f"  {op_name} on {b}: {cell.get('why') or 'failed cases: ' + ', '.join(cell['failed'])}")
    unavailable = [f"  {b}: {s['reason']}" for b, s in report["backends"].items() if not s["available"]]
    if unavailable:
        lines.append("not available:")
        lines += unavailable
    if notes:
        lines.append("failures:")
        lines += notes
    lines.append(f"{'all ok' if report['ok'] else 'MISMATCH'} in {report['seconds']} s "
                 "(ok (e): the error of the case nearest its tolerance; n/a: not implemented for the op, or unavailable)")
    return "\n".join(lines)
