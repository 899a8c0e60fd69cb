#!/usr/bin/env python3
"""Build ``_fastattr_cuda_emu``: every kernels/cuda/*.cu compiled as C++ for the CPU emulation.

A test instrument, not a backend (tests/ops/test_cuda_emulated.py builds and loads it; the installed
package never does). Each .cu source is rewritten in two places that are not C++ and nothing else:

- ``kernel<<<grid, block[, smem[, stream]]>>>(args)`` becomes
  ``::fastattr_emu::launch(LaunchConfig(grid, block, ...), "kernel", kernel, args)``;
- ``extern __shared__ T name[];`` becomes a pointer to the launch's dynamic shared memory;

and one statement is added after each static ``__shared__`` declaration (on its line): the poisoning
of that variable when a new block first reaches it, as a GPU hands a block shared memory with
whatever was there before (never zeros).

then compiled by the host C++ compiler with kernels/cuda_emu/include ahead of everything else, so
that <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h> and <cub/...> are the emulation's. The sources
are globbed, so whichever contraction.cu (SIMT or tensor-core) is checked out is what gets built.
The bindings (kernels/cuda_emu/module.cpp) take host pointers as integers, as ``_C``'s do.

Objects are cached under the output folder by a hash of everything a translation unit reads, so a
second run with nothing changed only links (or does nothing). Prints the module's path.

    python tools/build_cuda_emu.py [--out build/cuda_emu] [--jobs N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA = ROOT / "kernels" / "cuda"
EMU = ROOT / "kernels" / "cuda_emu"
MODULE = "_fastattr_cuda_emu"
# -O1: the kernels' loops get registers, the build stays short. ISO C++ (not gnu++), so that gcc
# contracts no a * b + c into an FMA the source did not write (the kernels say fmaf where they mean it).
FLAGS = ["-std=c++17", "-O1", "-g0", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-fno-fast-math",
         "-Wall", "-Wno-unused-variable", "-Wno-unused-function", "-Wno-unknown-pragmas"]
DEFINES = ["-DFASTATTR_WITH_CUDA=1", "-DFASTATTR_CUDA_EMULATION=1"]
OPENMP = ["-fopenmp", "-DFASTATTR_WITH_OPENMP=1"]


class RewriteError(ValueError):
    pass


def _match_forward(src: str, i: int, open_c: str, close_c: str) -> int:
    """Index of the bracket closing the one at ``src[i]``."""
    depth = 0
    for j in range(i, len(src)):
        if src[j] == open_c:
            depth += 1
        elif src[j] == close_c:
            depth -= 1
            if depth == 0:
                return j
    raise RewriteError(f"unbalanced {open_c}{close_c} from offset {i}")


def _kernel_start(src: str, end: int) -> int:
    """Start of the kernel expression that ends at ``end`` (a name, ``ns::name`` or ``name<T, U>``)."""
    k = end
    if k > 0 and src[k - 1] == ">":
        depth = 0
        while k > 0:
            k -= 1
            if src[k] == ">":
                depth += 1
            elif src[k] == "<":
                depth -= 1
                if depth == 0:
                    break
        else:
            raise RewriteError("unbalanced template arguments before <<<")
    while k > 0 and (src[k - 1].isalnum() or src[k - 1] in "_:"):
        k -= 1
    return k


def rewrite_launches(src: str, path: str = "<source>") -> str:
    out, i = [], 0
    while (j := src.find("<<<", i)) >= 0:
        end = j
        while end > i and src[end - 1].isspace():
            end -= 1
        start = _kernel_start(src, end)
        kernel = src[start:end]
        if not kernel or not (kernel[0].isalpha() or kernel[0] in "_:"):
            raise RewriteError(f"{path}: no kernel name before the launch at offset {j}")
        close = src.find(">>>", j + 3)
        if close < 0:
            raise RewriteError(f"{path}: <<< without >>> at offset {j}")
        config = src[j + 3:close]
        p = close + 3
        while p < len(src) and src[p].isspace():
            p += 1
        if p >= len(src) or src[p] != "(":
            raise RewriteError(f"{path}: a launch of {kernel} without its argument list")
        q = _match_forward(src, p, "(", ")")
        args = src[p + 1:q]
        name = re.sub(r"\s+", "", kernel)
        call = f'::fastattr_emu::launch(::fastattr_emu::LaunchConfig({config}), "{name}", {kernel}'
        out += [src[i:start], call, ", " + args if args.strip() else "", ")"]
        i = q + 1
    out.append(src[i:])
    return "".join(out)


_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:(?:__align__|alignas)\s*\(\s*\w+\s*\)\s*)?([A-Za-z_][\w:<>, ]*?)\s+(\w+)\s*\[\s*\]\s*;"
)


def rewrite_extern_shared(src: str) -> str:
    return _EXTERN_SHARED.sub(lambda m: f"{m[1]}* {m[2]} = ::fastattr_emu::dynamic_shared<{m[1]}>();", src)


_STATIC_SHARED = re.compile(r"^([ \t]*__shared__\s+[^;{}()]*?\b(\w+)\s*(?:\[[^\]]*\]\s*)*;)[ \t]*$", re.M)


def poison_static_shared(src: str) -> str:
    return _STATIC_SHARED.sub(lambda m: f"{m[1]} ::fastattr_emu::poison_shared(&{m[2]}, sizeof({m[2]}));", src)


def rewrite(src: str, path: str) -> str:
    """The .cu source as C++ for the emulation; line numbers are kept (no newline is added or dropped)."""
    body = poison_static_shared(rewrite_extern_shared(rewrite_launches(src, path)))
    if "extern __shared__" in body:
        raise RewriteError(f"{path}: an extern __shared__ declaration this tool does not understand")
    return f'#line 1 "{path}"\n' + body


def _python_includes() -> list[str]:
    import pybind11

    return [sysconfig.get_paths()["include"], pybind11.get_include()]


def _headers() -> list[Path]:
    found = []
    for base in (CUDA, EMU, ROOT / "csrc"):
        found += [p for p in base.rglob("*") if p.suffix in (".h", ".cuh", ".hpp")]
    return sorted(found)


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("build_cuda_emu: no C++ compiler (set CXX, or install g++)")
    return cxx


def _compiler_id(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]


def build(out_dir: Path | None = None, jobs: int | None = None) -> Path:
    out_dir = Path(out_dir or ROOT / "build" / "cuda_emu").resolve()
    gen, obj_dir = out_dir / "src", out_dir / "obj"
    gen.mkdir(parents=True, exist_ok=True)
    obj_dir.mkdir(parents=True, exist_ok=True)
    cxx = _compiler()
    includes = [f"-I{EMU / 'include'}", f"-I{EMU}", f"-I{CUDA}", f"-I{ROOT / 'csrc'}"]
    includes += [f"-I{p}" for p in _python_includes()]
    common = FLAGS + DEFINES + includes
    shared = hashlib.sha256()
    for h in _headers():
        shared.update(str(h.relative_to(ROOT)).encode() + b"\0" + h.read_bytes())
    shared.update(" ".join([_compiler_id(cxx), *common]).encode())
    shared.update(Path(__file__).read_bytes())

    units: list[tuple[Path, list[str]]] = []
    for cu in sorted(CUDA.glob("*.cu")) + sorted(EMU.glob("*.cu")):
        rel = cu.relative_to(ROOT).as_posix()
        text = rewrite(cu.read_text(), rel)
        cpp = gen / (cu.stem + ".cu.cpp")
        if not cpp.exists() or cpp.read_text() != text:
            cpp.write_text(text)
        units.append((cpp, ["-include", str(EMU / "runtime.h")]))
    units += [(EMU / "runtime.cpp", []), (EMU / "module.cpp", [])]
    # fastattr._C's bindings and CPU kernels, so that the module is _C with emulated CUDA entry points
    # (its own module.cpp replaces csrc/module.cpp, which names the module _C).
    # -O0: a shorter build; these are the bindings around the kernels (and CPU kernels linked with them).
    units += [(cpp, [*OPENMP, "-O0"]) for cpp in sorted((ROOT / "csrc").glob("*.cpp")) if cpp.name != "module.cpp"]

    def compile_one(unit: tuple[Path, list[str]]) -> Path:
        src, extra = unit
        h = shared.copy()
        h.update(src.read_bytes() + " ".join(extra).encode())
        obj = obj_dir / f"{src.stem}-{h.hexdigest()[:16]}.o"
        if not obj.exists():
            tmp = obj.with_suffix(".tmp.o")
            res = subprocess.run([cxx, *common, *extra, "-c", str(src), "-o", str(tmp)], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"build_cuda_emu: compiling {src} failed:\n{res.stderr[-6000:]}")
            tmp.replace(obj)
        return obj

    n_jobs = jobs or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=n_jobs) as pool:
        objects = list(pool.map(compile_one, units))
    target = out_dir / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    stamp = out_dir / (MODULE + ".objects")
    listing = "\n".join(str(o) for o in objects)
    if not target.exists() or not stamp.exists() or stamp.read_text() != listing:
        tmp = target.with_suffix(".tmp")
        res = subprocess.run([cxx, "-shared", "-pthread", "-fopenmp", *map(str, objects), "-o", str(tmp)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            raise RuntimeError(f"build_cuda_emu: linking failed:\n{res.stderr[-6000:]}")
        tmp.replace(target)
        stamp.write_text(listing)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default build/cuda_emu)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    args = ap.parse_args(argv)
    print(build(args.out, args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
