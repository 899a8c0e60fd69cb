"""Wheels from tools/build_wheel.py, installed and used the way a user would.

The ``wheels``-marked tests build the ``cpu`` wheel and a CUDA 13.0 wheel (sm_90 SASS only, for
time), install each with ``--no-deps`` into its own fresh venv, import it, compare a contraction
with the torch reference, read ``fastattr info`` and ``auditwheel show``, and check that the Triton
kernels import from a regular and from an editable install. They run by default (CI included) and
take about three minutes on 2 idle cores (2 min 50 s wall measured; 5 min 40 s on a machine loaded
by other jobs); deselect them with ``-m "not wheels"``.

The fresh venvs see the current interpreter's packages (torch, numpy, triton, scikit-build-core)
through a .pth file that points at a directory of symlinks to them, with every fastattr entry left
out: torch is not downloaded again, yet the only fastattr the venv can import is the one installed
into its own site-packages.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILDER = REPO / "tools" / "build_wheel.py"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _load_builder():
    spec = importlib.util.spec_from_file_location("fastattr_build_wheel", BUILDER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bw = _load_builder()


def _require(ok: bool, why: str) -> None:
    """Skip on a developer's machine that lacks a tool; in CI a missing tool is a failure."""
    if not ok:
        if IN_CI:
            pytest.fail(f"{why} (required in CI)")
        pytest.skip(why)


def _run(cmd: list, *, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> str:
    res = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout + res.stderr


def _clean_env() -> dict:
    """The environment a user's shell would have: nothing that redirects imports, and not the
    settings that conftest.py or a developer put in place (a forced backend, triton's interpreter)."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "FASTATTR_BACKEND", "TRITON_INTERPRET")
    return {k: v for k, v in os.environ.items() if k not in drop}


# ----------------------------------------------------------------------------- fresh venvs


_FASTATTR_ENTRY = re.compile(r"^(fastattr(_cu\d+)?([-_.].*)?|_editable_skbc_fastattr.*|__editable__.*fastattr.*)$")


@pytest.fixture(scope="module")
def deps_view(tmp_path_factory) -> Path:
    """Symlinks to this interpreter's installed packages minus fastattr (and its editable hooks)."""
    view = tmp_path_factory.mktemp("deps-view")
    for site in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        for entry in Path(site).iterdir():
            # .pth files are not followed from a .pth-added directory anyway; skip them to be plain.
            if _FASTATTR_ENTRY.match(entry.name) or entry.suffix == ".pth" or (view / entry.name).exists():
                continue
            (view / entry.name).symlink_to(entry)
    return view


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def make_venv(path: Path, deps_view: Path) -> Path:
    """A venv without pip (the outer pip installs into it with --python) that also sees deps_view.

    A .pth line appends to sys.path, so the venv's own site-packages still comes first."""
    _run([sys.executable, "-m", "venv", "--without-pip", path])
    (_site_packages(path) / "_fastattr_test_deps.pth").write_text(f"{deps_view}\n")
    return path / "bin" / "python"


def pip_into(python: Path, *args) -> str:
    return _run([sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check", *args], env=_clean_env())


def build(tmp: Path, *args) -> dict:
    report = tmp / "report.json"
    out = _run([sys.executable, BUILDER, *args, "--out", tmp / "wheelhouse", "--no-isolation", "--report", report], env=_clean_env())
    data = json.loads(report.read_text())
    data["log"] = out
    return data


SMOKE = r"""
import json, sys, sysconfig
from pathlib import Path
import torch
import fastattr, fastattr._C, fastattr.reference
site = Path(sysconfig.get_paths()["purelib"]).resolve()
for mod in (fastattr, fastattr._C):
    assert Path(mod.__file__).resolve().is_relative_to(site), (mod.__file__, site)
g = torch.randn(3, 5, 16)
v = torch.randn(40, 16)
p = torch.randint(0, 5, (40,))
r = torch.randperm(40)
got = fastattr.contract(g, v, p, r, torch.zeros(40, 3))
want = fastattr.reference.contract(g, v, p, r, torch.zeros(40, 3))
assert fastattr.last_backend("contract") == "cpu", fastattr.last_backend("contract")
torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
print(json.dumps(fastattr.info(print_report=False)))
"""


def smoke(python: Path, cwd: Path) -> dict:
    out = _run([python, "-c", SMOKE], env=_clean_env(), cwd=cwd)
    return json.loads(out.strip().splitlines()[-1])


def installed_so(venv: Path) -> Path:
    (so,) = (_site_packages(venv) / "fastattr").glob("_C*.so")
    return so


def check_needed(so: Path) -> None:
    """readelf's view of the installed extension: no CUDA runtime, driver or torch library."""
    _require(shutil.which("readelf") is not None, "readelf (binutils) is not installed")
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _run(["readelf", "-d", so]))
    assert needed, "readelf found no NEEDED entries"
    assert not [n for n in needed if n.startswith(bw.FORBIDDEN_NEEDED)], needed


def check_auditwheel(report: dict) -> None:
    shown = report["auditwheel_show"]
    assert re.search(r'consistent\s+with the following platform tag:\s+"manylinux_\d+_\d+_x86_64"', shown), shown
    assert re.search(r"-manylinux_\d+_\d+_x86_64\.whl$", report["wheel"]), report["wheel"]


def _have_auditwheel() -> bool:
    return importlib.util.find_spec("auditwheel") is not None and importlib.util.find_spec("elftools") is not None


@pytest.fixture(scope="module")
def cpu_install(tmp_path_factory, deps_view):
    _require(sys.platform.startswith("linux"), "manylinux wheels are built on Linux only")
    _require(_have_auditwheel(), "auditwheel is not installed (pip install '.[test]')")
    tmp = tmp_path_factory.mktemp("wheel-cpu")
    report = build(tmp, "--cuda", "cpu")
    python = make_venv(tmp / "venv", deps_view)
    pip_into(python, "install", "--no-deps", "--no-index", report["wheel"])
    return tmp, python, report


@pytest.fixture(scope="module")
def cuda_install(tmp_path_factory, deps_view):
    _require(sys.platform.startswith("linux"), "manylinux wheels are built on Linux only")
    _require(_have_auditwheel(), "auditwheel is not installed (pip install '.[test]')")
    _require(bw.find_local_nvcc((13, 0)) is not None, "no CUDA 13.0 toolkit (nvcc) on this machine")
    tmp = tmp_path_factory.mktemp("wheel-cu130")
    report = build(tmp, "--cuda", "13.0", "--archs", "90-real")
    python = make_venv(tmp / "venv", deps_view)
    pip_into(python, "install", "--no-deps", "--no-index", report["wheel"])
    return tmp, python, report


# ----------------------------------------------------------------------------------- wheels


@pytest.mark.parametrize("which", ["cpu", "cu130"])
@pytest.mark.wheels
@pytest.mark.slow
def test_wheel_installs_and_runs(which, request):
    tmp, python, report = request.getfixturevalue("cpu_install" if which == "cpu" else "cuda_install")
    dist = "fastattr" if which == "cpu" else "fastattr-cu13"
    assert Path(report["wheel"]).name.startswith(dist.replace("-", "_") + "-0.1.0-")
    check_auditwheel(report)
    venv = python.parent.parent
    check_needed(installed_so(venv))

    info = smoke(python, tmp)
    build_facts = info["build"]
    assert build_facts["extension"] and info["backends"]["cpu"]["available"]
    if which == "cpu":
        assert build_facts["cuda"] is False
    else:
        assert build_facts["cuda"] is True
        assert re.fullmatch(r"13\.0\.\d+", build_facts["cuda_version"]), build_facts
        assert build_facts["cuda_archs"] == "90-real"
        assert report["fatbin"] == {"elf": [90], "ptx": []}
        cuda = info["backends"]["cuda"]
        # Here (no GPU) the wheel must say why its kernels are off; with a driver they must run.
        assert cuda["available"] or "driver" in cuda["reason"] or "no CUDA device" in cuda["reason"], cuda

    # The console script and the distribution name, as pip sees them.
    text = _run([venv / "bin" / "fastattr", "info"], env=_clean_env(), cwd=tmp)
    if which == "cpu":
        assert "build: no CUDA kernels (CPU only)" in text, text
    else:
        assert re.search(r"build: CUDA 13\.0\.\d+, archs 90-real", text), text
    shown = pip_into(python, "show", dist)
    assert re.search(r"^Version: 0\.1\.0$", shown, re.M), shown


# A stand-in libcuda.so.1 that reports a CUDA 12.8 driver: enough of the driver API for the CUDA 13
# runtime linked into the wheel to look the driver up and refuse it as too old (error 35), the way
# it would on a real machine with an old driver. Every entry point resolves to a symbol it defines
# or to nothing.
FAKE_OLD_DRIVER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
typedef int CUresult;
CUresult cuDriverGetVersion(int *v) { *v = 12080; return 0; }
CUresult cuInit(unsigned flags) { (void)flags; return 0; }
CUresult cuGetProcAddress_v2(const char *s, void **p, int v, unsigned long long f, int *st) {
  (void)v; (void)f;
  *p = dlsym(RTLD_DEFAULT, s);
  if (st) *st = *p ? 0 : 1;
  return *p ? 0 : 500;
}
CUresult cuGetProcAddress(const char *s, void **p, int v, unsigned long long f) { return cuGetProcAddress_v2(s, p, v, f, 0); }
CUresult cuGetExportTable(const void **t, const void *id) { (void)id; *t = 0; return 500; }
"""


@pytest.mark.wheels
@pytest.mark.slow
def test_cuda_wheel_on_old_driver_falls_back(cuda_install):
    """The installed CUDA 13 wheel on a 'CUDA 12.8 driver': a warning, the reason in info(), and
    ops still run on the other backends."""
    _require(shutil.which("cc") is not None, "no C compiler for the stand-in driver")
    tmp, python, _ = cuda_install
    drv = tmp / "old-driver"
    drv.mkdir(exist_ok=True)
    (drv / "fake.c").write_text(FAKE_OLD_DRIVER)
    _run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", drv / "libcuda.so.1", drv / "fake.c", "-ldl"])
    code = (
        "import logging, torch, fastattr\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        "info = fastattr.info(print_report=False)\n"
        "print('REASON', info['backends']['cuda']['reason'])\n"
        "g = torch.randn(2, 3, 4)\n"
        "fastattr.contract(g, torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), torch.zeros(3, 2))\n"
        "print('BACKEND', fastattr.last_backend('contract'))\n"
    )
    out = _run([python, "-c", code], env=_clean_env() | {"LD_LIBRARY_PATH": str(drv)}, cwd=tmp)
    assert "REASON CUDA runtime error 35" in out and "the driver supports CUDA 12.8; this build needs a driver for CUDA 13.0 or newer" in out, out
    assert re.search(r"WARNING the NVIDIA driver supports CUDA 12\.8, but this build of fastattr \(CUDA 13\.0\.\d+\)", out), out
    assert out.count("WARNING the NVIDIA driver") == 1, out
    assert "BACKEND cpu" in out, out


@pytest.mark.wheels
@pytest.mark.slow
def test_triton_kernels_from_regular_install(cpu_install):
    pytest.importorskip("triton", reason="triton is not installed (pip install '.[triton]')")
    tmp, python, _ = cpu_install
    code = "import fastattr.triton_kernels.contraction as m; print(m.__file__)"
    path = Path(_run([python, "-c", code], env=_clean_env(), cwd=tmp).strip().splitlines()[-1]).resolve()
    assert path.is_relative_to(_site_packages(python.parent.parent).resolve()), path


@pytest.mark.wheels
@pytest.mark.slow
def test_triton_kernels_from_editable_install(tmp_path, deps_view):
    """pip install -e into a prefix, then site.addsitedir: the editable hook must map
    fastattr.triton_kernels onto kernels/triton_kernels of the checkout (pyproject's wheel.packages)."""
    pytest.importorskip("triton", reason="triton is not installed (pip install '.[triton]')")
    _require(sys.platform.startswith("linux"), "Linux only")
    python = make_venv(tmp_path / "venv", deps_view)
    prefix = tmp_path / "prefix"
    env = _clean_env() | {"FASTATTR_CUDA": "OFF"}
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-e", REPO, "--no-deps", "--no-build-isolation",
          "--prefix", prefix, "-C", f"build-dir={tmp_path / 'build'}"], env=env)
    site_dir = _site_packages(prefix)
    code = (
        "import site, sys; site.addsitedir(sys.argv[1])\n"
        "import fastattr, fastattr._C, fastattr.triton_kernels.contraction as m\n"
        "print(m.__file__); print(fastattr._C.__file__); print(fastattr.__file__)\n"
    )
    lines = _run([python, "-c", code, site_dir], env=_clean_env(), cwd=tmp_path).strip().splitlines()[-3:]
    kernel, ext, pkg = (Path(x).resolve() for x in lines)
    assert kernel == (REPO / "kernels" / "triton_kernels" / "contraction.py").resolve(), kernel
    assert pkg.is_relative_to((REPO / "python" / "fastattr").resolve()), pkg
    assert ext.is_relative_to(site_dir.resolve()), ext


# ------------------------------------------------------------------- builder, fast checks


def test_names_for_public_and_private_index():
    assert bw.dist_name_and_version("0.1.0", None, False) == ("fastattr", "0.1.0")
    assert bw.dist_name_and_version("0.1.0", (13, 0), False) == ("fastattr-cu13", "0.1.0")
    assert bw.dist_name_and_version("0.1.0", (12, 8), False) == ("fastattr-cu12", "0.1.0")
    assert bw.dist_name_and_version("0.1.0", (13, 0), True) == ("fastattr", "0.1.0+cu130")
    assert bw.dist_name_and_version("0.1.0", None, True) == ("fastattr", "0.1.0+cpu")


def test_pyproject_rewrite_touches_only_project_table():
    text = (REPO / "pyproject.toml").read_text()
    new = bw.rewrite_pyproject(text, "fastattr-cu13", "0.1.0+cu130")
    old_lines, new_lines = text.splitlines(), new.splitlines()
    changed = [(a, b) for a, b in zip(old_lines, new_lines) if a != b]
    assert len(old_lines) == len(new_lines) and len(changed) <= 2, changed


def test_expected_archs():
    assert bw.expected_archs("80-real;86-real;89-real;90-real;100-real;120-real;120-virtual") == {
        "elf": [80, 86, 89, 90, 100, 120], "ptx": [120]}
    assert bw.expected_archs("90") == {"elf": [90], "ptx": [90]}


def test_cuda12_without_toolkit_explains(tmp_path):
    """PyPI has no CUDA 12 nvcc: without --nvcc the builder must stop and say what to do."""
    if bw.find_local_nvcc((12, 8)) is not None:
        pytest.skip("a CUDA 12.8 toolkit is installed here")
    res = subprocess.run([sys.executable, BUILDER, "--cuda", "12.8", "--out", tmp_path], capture_output=True, text=True)
    assert res.returncode != 0
    assert "PyPI has no CUDA 12 nvcc" in res.stderr and "cibuildwheel" in res.stderr, res.stderr


# -------------------------------------------------------- fallback when the driver is too old


class _FakeCudaBuild:
    def __init__(self, driver: int):
        self.driver = driver

    def build_info(self):
        return {"cuda": True, "cuda_version": "13.0.88", "cuda_archs": "90-real"}

    def cuda_probe(self):
        return 0, 35, "CUDA driver version is insufficient for CUDA runtime version", self.driver


@pytest.mark.parametrize("driver, level, reason", [
    (12080, logging.WARNING, "the driver supports CUDA 12.8; this build needs a driver for CUDA 13.0 or newer"),
    (0, logging.INFO, "no NVIDIA driver found; this build needs a driver for CUDA 13.0 or newer"),
])
def test_insufficient_driver_is_explained_once(monkeypatch, caplog, driver, level, reason):
    from fastattr._runtime import backends as _backends
    from fastattr._runtime import ext as _ext

    monkeypatch.setattr(_ext, "ext", _FakeCudaBuild(driver))
    _backends._cuda_status.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG, logger="fastattr"):
            ok, why = _backends._cuda_status()
            _backends._cuda_status()  # cached: no second message
        assert not ok and why.startswith("CUDA runtime error 35") and reason in why, why
        msgs = [r for r in caplog.records if "driver" in r.getMessage()]
        assert len(msgs) == 1 and msgs[0].levelno == level, [(r.levelname, r.getMessage()) for r in msgs]
        if driver:
            assert "pip install fastattr:" in msgs[0].getMessage(), msgs[0].getMessage()
    finally:
        _backends._cuda_status.cache_clear()


def test_cu13_wheel_on_a_cuda12_driver_falls_back_to_triton(monkeypatch, caplog):
    """The cu13 build on a driver for CUDA 12.8 (the driver version query mocked): the contraction's
    automatic choice on CUDA tensors is triton, with exactly one warning, which names the base wheel;
    info() says which wheel fits this driver."""
    import torch

    import fastattr
    from fastattr._runtime import backends as _backends
    from fastattr._runtime import ext as _ext

    monkeypatch.setattr(_ext, "ext", _FakeCudaBuild(12080))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_backends, "_triton_status", lambda: (True, "triton (fake GPU)"))
    monkeypatch.setattr(_backends, "_card", lambda device: "NVIDIA Fake L4")
    _backends._cuda_status.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG, logger="fastattr"):
            for dtype in (torch.float32, torch.bfloat16):
                assert _backends.OPS["contract"].select(torch.device("cuda"), dtype=dtype).backend == "triton"
            with pytest.raises(_backends.BackendUnavailableError, match="driver supports CUDA 12.8"):
                _backends.OPS["contract"].select(torch.device("cuda"), "cuda")
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "pip install fastattr:" in warnings[0].getMessage() and "fastattr-cu13" in warnings[0].getMessage()
        wheels = fastattr.info(print_report=False)["wheels"]
        assert "driver for CUDA 12.8: the base wheel (pip install fastattr)" in wheels["here"], wheels
        assert [r["wheel"] for r in wheels["table"]] == ["fastattr-cu13", "fastattr", "fastattr"]
    finally:
        _backends._cuda_status.cache_clear()
