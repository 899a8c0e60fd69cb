"""Compile every GPU kernel ahead of time, without a GPU, and report registers, spills and MMA use.

    python tools/kernel_report.py [--archs 80,90] > report.json

Triton kernels: each launcher is called on small CPU tensors with ``JITFunction.run`` intercepted,
which gives the exact argument types, constexprs and launch options of a real launch; that signature,
specialised as Triton specialises a launch on a GPU (alignment, multiples of 16, integers equal to 1), is compiled
with ``triton.compile`` for each ``GPUTarget("cuda", arch, 32)``; its cubin goes through
``cuobjdump -res-usage`` (registers, stack: spills) and ``cuobjdump -sass`` (HMMA/HGMMA). CUDA kernels: every
``kernels/cuda/*.cu`` through ``nvcc -Xptxas -v -cubin``, then the same cuobjdump reports per kernel. Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PTXAS_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")


def _ptxas_stats(text: str) -> dict:
    spills = [tuple(map(int, m.groups())) for m in _PTXAS_RE.finditer(text)]
    regs = [int(m.group(1)) for m in _REGS_RE.finditer(text)]
    return {
        "stack_bytes": max((s[0] for s in spills), default=0),
        "spill_store_bytes": sum(s[1] for s in spills),
        "spill_load_bytes": sum(s[2] for s in spills),
        "max_registers": max(regs, default=0),
    }


def _launches(match: str | None = None):
    """(name, JITFunction, args, kwargs) for every Triton kernel whose name contains ``match`` (all
    for None), from its launcher; the other launchers are not called."""
    from triton.runtime.jit import JITFunction

    captured = []

    class _Stop(Exception):
        pass

    def fake_run(self, *args, grid, warmup, **kwargs):
        captured.append((self, args, kwargs))
        raise _Stop

    JITFunction.run = fake_run

    def grab(name, call):
        if match and match not in name:
            return None
        before = len(captured)
        try:
            call()
        except _Stop:
            pass
        if len(captured) == before:
            raise RuntimeError(f"{name}: the launcher launched nothing")
        fn, args, kwargs = captured[-1]
        return name, fn, args, kwargs

    out = _graph_launches(grab) + _contraction_launches(grab)
    return [entry for entry in out if entry is not None]


def _graph_launches(grab) -> list:
    """The graph ops' kernels (influence, threshold, top-k edges), default and deterministic."""
    import torch

    from fastattr.triton_kernels import influence, threshold, topk_edges

    A = torch.rand(300, 300)
    m8 = torch.ones(300, dtype=torch.uint8)
    vec = torch.rand(300)

    def hist_buffers(level, deterministic):
        nb = 1 << threshold.SELECT_BITS[level]
        sums = torch.zeros(nb, dtype=torch.int64 if deterministic else torch.float64)
        return torch.zeros(nb, dtype=torch.int64), sums, torch.zeros(4, dtype=torch.int64)

    out = []
    for det, tag in ((False, ""), (True, "_deterministic")):
        out += [
            grab(f"hist_1d_level0{tag}", lambda: threshold.hist_1d(torch.rand(5000), 0, 0, *hist_buffers(0, det),
                                                                   deterministic=det)),
            grab(f"hist_1d_level1{tag}", lambda: threshold.hist_1d(torch.rand(5000), 1, 5, *hist_buffers(1, det),
                                                                   deterministic=det)),
            grab(f"edge_hist{tag}", lambda: threshold.edge_hist(A, m8, vec, vec, 0, 0, *hist_buffers(0, det),
                                                                deterministic=det)),
            grab(f"matvec{tag}", lambda: influence.matvec(A, torch.rand(300, dtype=torch.float64), m8, True,
                                                          deterministic=det)),
        ]  # fmt: skip
    return out + [
        grab("edge_mask", lambda: threshold.edge_mask(A, m8, vec, vec, 0.5, torch.empty(300, 300, dtype=torch.uint8))),
        grab("row_abs_sum", lambda: influence.row_abs_sum(A, m8)),
        grab("sum_partials", lambda: influence.sum_partials(torch.rand(7, 300, dtype=torch.float64))),
        grab("topk_count", lambda: topk_edges.topk_count(A, 8, torch.empty(300, dtype=torch.int64), torch.empty(300),
                                                         torch.zeros(1, dtype=torch.int32))),
        grab("topk_fill", lambda: topk_edges.topk_fill(A, torch.arange(0, 301 * 8, 8), torch.empty(300 * 8, dtype=torch.int64),
                                                       torch.empty(300 * 8))),
    ]  # fmt: skip


def _contraction_launches(grab) -> list:
    """The contraction for every input dtype, and its atomic variant (repeated rows by default). The
    deterministic mode launches the non-atomic variants, once per pass."""
    import torch

    from fastattr.triton_kernels import contraction

    h = contraction.tile_height(interpret=False)
    tiles = torch.arange(2, dtype=torch.int32)
    S = 2 * h
    rows = torch.arange(S, dtype=torch.int32)
    res = torch.zeros(S, 64)
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        grads = torch.rand(64, 8, 256, dtype=dtype)
        vectors = torch.rand(S, 256, dtype=dtype)
        out.append(grab(f"contract_{str(dtype).replace('torch.', '')}", lambda: contraction.contract(
            grads, vectors, rows, tiles, tiles * h, tiles * h + h, res, res.stride(0), res.stride(1),
            atomic=False, interpret=False, n_out_rows=S)))
    # D not a multiple of the D step, repeated rows (atomics).
    grads, vectors = torch.rand(64, 8, 300), torch.rand(S, 300)
    out.append(grab("contract_float32_odd_d_atomic", lambda: contraction.contract(
        grads, vectors, rows, tiles, tiles * h, tiles * h + h, res, res.stride(0), res.stride(1),
        atomic=True, interpret=False, n_out_rows=S)))
    return out


def _signature(fn, args, kwargs, arch: int):
    """signature, constexprs and attrs as a launch on a CUDA device would specialise them: 16-byte
    aligned pointers and multiples of 16 get ``tt.divisibility`` (that decides vectorised loads),
    an integer 1 becomes a constant, except for ``do_not_specialize`` parameters."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime import jit

    backend = CUDABackend(GPUTarget("cuda", arch, 32))
    values = dict(zip([p.name for p in fn.params], args))
    values.update(kwargs)
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[(i,)] = v
            continue
        specialize = getattr(jit, "native_specialize_impl", None) or jit.specialize_impl
        kind, spec = specialize(backend, v, p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
        sig[p.name] = kind
        if kind == "constexpr":
            const[(i,)] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = backend.parse_attr(spec)
    return sig, const, attrs


def tool(name: str) -> str | None:
    """A CUDA binary utility: the copy Triton's NVIDIA backend ships (it reads the PTX version that
    Triton emits, which an older toolkit's ptxas rejects), else the one on PATH."""
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return shutil.which(name)
    bundled = Path(nv.__file__).parent / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def triton_report(archs: list[int], tmp: Path, match: str | None = None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = tool("cuobjdump")
    report = {}
    for name, fn, args, kwargs in _launches(match):
        # The launch options the launcher chose (warps, pipeline stages) change registers and spills.
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        for arch in archs:
            sig, const, attrs = _signature(fn, args, kwargs, arch)
            k = triton.compile(ASTSource(fn, signature=sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                               options=options)
            entry = {"kernel": fn.__name__, "triton_spills": getattr(k.metadata, "n_spills", None), **options}
            cubin = tmp / f"{name}_{arch}.cubin"
            cubin.write_bytes(k.asm["cubin"])
            # The cubin Triton built with its own ptxas: its resource usage (a spill needs a stack
            # frame, STACK:0 means none) and its SASS.
            res = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
            if m is None:
                entry["cuobjdump_error"] = res[-400:]
            else:
                entry.update(max_registers=int(m.group(1)), stack_bytes=int(m.group(2)),
                             shared_bytes=int(m.group(3)), local_bytes=int(m.group(4)))
            sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True).stdout
            entry.update(_sass_counts(sass))
            report[f"{name}/sm_{arch}"] = entry
    return report


def _sass_counts(sass: str) -> dict:
    return {"hmma": len(re.findall(r"\bHMMA\b", sass)), "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
            "ffma": len(re.findall(r"\bFFMA\b", sass))}


def _kernel_names(mangled: list[str]) -> list[str]:
    """``contract_mma_kernel<float, float>`` for each mangled kernel name (c++filt, without return
    type, namespaces and parameters); the mangled names when c++filt is missing."""
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if filt is None or not mangled:
        return list(mangled)
    out = subprocess.run([filt], input="\n".join(mangled), capture_output=True, text=True).stdout.splitlines()
    names = []
    for full in out:
        sig = full.replace("(anonymous namespace)::", "").split("(")[0].removeprefix("void ")
        base, lt, args = sig.partition("<")
        names.append(base.rsplit("::", 1)[-1] + lt + args)
    return names if len(names) == len(mangled) else list(mangled)


def _cubin_functions(cubin: Path) -> dict:
    """Per kernel of a cubin: registers, stack and local bytes (cuobjdump -res-usage; a spill needs a
    stack frame) and its SASS's HMMA/HGMMA/FFMA counts."""
    cuobjdump = tool("cuobjdump")
    if cuobjdump is None:
        return {"cuobjdump_error": "cuobjdump not found"}
    res = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    funcs = {}
    for m in re.finditer(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res):
        funcs[m.group(1)] = {"max_registers": int(m.group(2)), "stack_bytes": int(m.group(3)),
                             "shared_bytes": int(m.group(4)), "local_bytes": int(m.group(5))}
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True).stdout
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name, body = chunk.split("\n", 1)
        funcs.setdefault(name.strip(), {}).update(_sass_counts(body))
    if not funcs:
        return {"cuobjdump_error": res[-400:]}
    return dict(zip(_kernel_names(list(funcs)), funcs.values()))


def cuda_report(archs: list[int], tmp: Path) -> dict:
    """Per .cu file and arch: ptxas's totals (stack, spills, registers) and, per kernel of its
    cubin, registers, stack, local memory and the MMA/FFMA instruction counts of its SASS."""
    report = {}
    for cu in sorted((ROOT / "kernels" / "cuda").glob("*.cu")):
        for arch in archs:
            cubin = tmp / f"{cu.stem}_{arch}.cubin"
            cmd = ["nvcc", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-DFASTATTR_WITH_CUDA=1",
                   f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'kernels' / 'cuda'}", f"-arch=sm_{arch}", "-Xptxas", "-v",
                   "-cubin", str(cu), "-o", str(cubin)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            entry = _ptxas_stats(r.stderr)
            if r.returncode != 0:
                entry["nvcc_error"] = r.stderr[-800:]
            else:
                entry["functions"] = _cubin_functions(cubin)
            report[f"{cu.name}/sm_{arch}"] = entry
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--only", choices=["triton", "cuda"], default=None)
    ap.add_argument("--match", default=None, help="only the Triton kernels whose report name contains this")
    ns = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernel_report: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
    archs = [int(a) for a in ns.archs.split(",")]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        if ns.only in (None, "triton"):
            out["triton"] = triton_report(archs, Path(tmp), ns.match)
        if ns.only in (None, "cuda"):
            out["cuda"] = cuda_report(archs, Path(tmp))
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
