#!/usr/bin/env bash
# The GPU suite, one command on a CUDA machine without network access (H100/H200):
#   build for the card -> python -m fastattr info -> tests on CUDA -> compute-sanitizer memcheck over
#   the kernel tests -> the benchmark suite (full tier) -> report (markdown + plots).
#
#   benchmarks/gpu_suite.sh [OUTDIR] [--cpu] [--wheels DIR] [--stages LIST] [--tier TIER]
#
# OUTDIR (default benchmarks/results/<date>-<card>) receives at most 8 files: info.txt (machine,
# build log, fastattr info, what was skipped), tests.txt, sanitizer.txt, bench.txt (benchmark log),
# bench.json (pytest-benchmark), report.md (tables + this suite's stage table), speedup.png,
# memory.png. A short summary table is printed last.
#
# --cpu (or FASTATTR_GPU_SUITE_DRYRUN=1): dry run of the same stages on a machine without a GPU:
#   the build is a wheel into a temporary folder (the installed fastattr is left alone and is what
#   the later stages use), the tests and benchmarks run on the CPU with the smoke tier, and the
#   sanitizer is skipped with the reason.
# --wheels DIR: pip install --no-index --no-deps DIR/*.whl into a private folder first (e.g.
#   circuit-tracer, transformer-lens, nnsight and their missing dependencies). Without them the
#   tests and benchmarks that need circuit-tracer skip themselves; info.txt lists what was skipped.
# --stages LIST: a comma-separated subset of build,info,tests,sanitizer,bench (default: all), to
#   split the suite over several calls where one command may only run so long. Without build the
#   installed fastattr is used.
# --tier TIER: benchmark tier (default full; smoke in a dry run; FASTATTR_BENCH_TIER also works).
#
# Environment: PYTHON (default python3), FASTATTR_CUDA_ARCHS (default: the card's, e.g. 90-real),
# FASTATTR_SUITE_TEST_ARGS (pytest arguments of the tests stage, default "tests/"),
# FASTATTR_SUITE_BENCH_ARGS (pytest arguments of the bench stage, default "benchmarks/"),
# FASTATTR_SUITE_SANITIZER_K (-k expression of the sanitizer stage, default "cuda or triton"),
# FASTATTR_SUITE_TIMEOUT_<STAGE> (seconds; defaults below).
#
# Each stage's failure is recorded and the suite goes on; the exit status is 1 if any stage
# failed (a stage skipped for a stated reason is not a failure), 2 for bad usage.

set -u -o pipefail

die() { echo "gpu_suite: $*" >&2; exit 2; }

OUTDIR="" DRYRUN="${FASTATTR_GPU_SUITE_DRYRUN:-0}" WHEELS="" STAGES="build,info,tests,sanitizer,bench" TIER="${FASTATTR_BENCH_TIER:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu|--dry-run) DRYRUN=1 ;;
    --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; WHEELS="$(realpath -m "$2")"; shift ;;
    --stages) [ $# -ge 2 ] || die "--stages needs a list"; STAGES="$2"; shift ;;
    --tier) [ $# -ge 2 ] || die "--tier needs smoke, cpu or full"; TIER="$2"; shift ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$OUTDIR" ] || die "one OUTDIR only"; OUTDIR="$(realpath -m "$1")" ;;
  esac
  shift
done
[ "$DRYRUN" = 1 ] || DRYRUN=0
for s in ${STAGES//,/ }; do
  case "$s" in build|info|tests|sanitizer|bench) ;; *) die "unknown stage $s (build,info,tests,sanitizer,bench)" ;; esac
done
want() { [[ ",$STAGES," == *",$1,"* ]]; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || die "cannot enter $ROOT"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || die "no python at '$PY' (set PYTHON)"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# ---------------------------------------------------------------------------------- the device
HAVE_GPU=0 CARD="cpu" CC=""
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  HAVE_GPU=1
  CARD="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)"
  CC="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')"
fi
if [ -z "$CC" ] && [ "$HAVE_GPU" = 1 ]; then  # an old nvidia-smi has no compute_cap: ask torch
  CC="$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")' 2>/dev/null)"
fi
if [ "$DRYRUN" = 0 ] && [ "$HAVE_GPU" = 0 ]; then
  die "no CUDA device visible (nvidia-smi -L failed); for a dry run on the CPU use --cpu"
fi
if [ "$DRYRUN" = 1 ]; then
  TIER="${TIER:-smoke}"
  export FASTATTR_BENCH_DEVICE=cpu CUDA_VISIBLE_DEVICES=""  # the CPU even where a GPU exists
  CARD="cpu-dryrun"
else
  TIER="${TIER:-full}"
fi
SLUG="$(echo "$CARD" | tr -cs 'A-Za-z0-9' '-' | sed 's/^-*//; s/-*$//' | tr 'A-Z' 'a-z')"
OUTDIR="${OUTDIR:-$ROOT/benchmarks/results/$(date +%F)-$SLUG}"
mkdir -p "$OUTDIR" || die "cannot create $OUTDIR"
INFO="$OUTDIR/info.txt" TESTS="$OUTDIR/tests.txt" SAN="$OUTDIR/sanitizer.txt" BENCH="$OUTDIR/bench.txt"
: >"$INFO"

# ------------------------------------------------------------------------------ stage bookkeeping
NAMES=() STATUS=() SECS=() NOTES=()
record() { NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); NOTES+=("$4"); echo "== $1: $2 (${3}s) $4"; }

# run_stage NAME LOG TIMEOUT CMD...: run CMD with a time limit, its output appended to LOG.
run_stage() {
  local name="$1" log="$2" limit="$3"; shift 3
  local t0=$SECONDS rc
  echo "== $name: running (limit ${limit}s; log $(basename "$log"))"
  { echo; echo "### $name: $*"; echo; } >>"$log"
  timeout --kill-after=30 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  LAST_RC=$rc LAST_SECS=$((SECONDS - t0))
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then LAST_NOTE="timed out after ${limit}s"; return 1; fi
  LAST_NOTE="exit $rc"
  return $rc
}
fail_tail() { echo "   last lines of $(basename "$1"):"; tail -n "${2:-15}" "$1" | sed 's/^/   | /'; }
timeout_for() { local v="FASTATTR_SUITE_TIMEOUT_${1^^}"; echo "${!v:-$2}"; }

{
  echo "fastattr GPU suite, $(date -u +%FT%TZ)"
  echo "mode: $([ "$DRYRUN" = 1 ] && echo "DRY RUN on the CPU (--cpu)" || echo "GPU")  stages: $STAGES  tier: $TIER"
  echo "repo: $ROOT  commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
  echo "host: $(uname -srm), $(nproc) cores"
  if [ "$HAVE_GPU" = 1 ]; then
    echo; nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1
  fi
  echo; command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not found"
  command -v compute-sanitizer >/dev/null && echo "compute-sanitizer: $(command -v compute-sanitizer)" || echo "compute-sanitizer: not found"
} >>"$INFO" 2>&1

# ----------------------------------------------------------------------------- optional wheels
if [ -n "$WHEELS" ]; then
  SITE="$(mktemp -d /tmp/fastattr-suite-site.XXXXXX)"
  if ls "$WHEELS"/*.whl >/dev/null 2>&1 \
     && run_stage wheels "$INFO" 600 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    record wheels PASS "$LAST_SECS" "$(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE"
  else
    record wheels FAIL "${LAST_SECS:-0}" "pip install from $WHEELS failed or found no wheels (see info.txt)"
  fi
fi

# What needs packages that may be absent: listed in info.txt and the summary.
MISSING="$("$PY" - <<'EOF'
import importlib.util
names = {"circuit_tracer": "circuit-tracer", "transformer_lens": "transformer-lens", "nnsight": "nnsight",
         "triton": "triton", "matplotlib": "matplotlib", "pytest_benchmark": "pytest-benchmark"}
print(" ".join(v for k, v in names.items() if importlib.util.find_spec(k) is None))
EOF
)"
{
  echo; echo "python packages:"
  "$PY" - <<'EOF'
from importlib.metadata import version, PackageNotFoundError
for n in ["torch", "triton", "numpy", "pytest", "pytest-benchmark", "matplotlib", "scikit-build-core", "pybind11",
          "circuit-tracer", "transformer-lens", "nnsight", "transformers", "tokenizers"]:
    try:
        print(f"  {n} {version(n)}")
    except PackageNotFoundError:
        print(f"  {n} MISSING")
EOF
  echo
  if [ -n "$MISSING" ]; then
    echo "missing: $MISSING"
    [[ " $MISSING " == *" circuit-tracer "* ]] && echo "  -> skipped: end-to-end benchmarks (bench_e2e.py) and every test that needs circuit-tracer (patch, reference-vs-circuit-tracer, demo, README example)"
    [[ " $MISSING " == *" nnsight "* ]] && echo "  -> skipped: the nnsight-backend tests"
    [[ " $MISSING " == *" triton "* ]] && echo "  -> skipped: the triton backend"
    [[ " $MISSING " == *" matplotlib "* ]] && echo "  -> skipped: the plots (report.md is still written)"
    [[ " $MISSING " == *" pytest-benchmark "* ]] && echo "  -> the bench stage cannot run"
  else
    echo "missing: nothing"
  fi
} >>"$INFO" 2>&1

# --------------------------------------------------------------------------------------- build
if want build; then
  WHEEL_TAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
  if [ "$DRYRUN" = 1 ]; then
    # A wheel built into a temporary folder: proves the build command without replacing the
    # extension that this machine's developers have installed. CUDA sources compile when nvcc is
    # here, for the same arch a GPU run would use.
    TMPB="$(mktemp -d /tmp/fastattr-suite-build.XXXXXX)"
    if command -v nvcc >/dev/null; then CUDA_MODE=ON ARCHS="${FASTATTR_CUDA_ARCHS:-90-real}"; else CUDA_MODE=OFF ARCHS=""; fi
    echo "build (dry run): pip wheel into $TMPB, FASTATTR_CUDA=$CUDA_MODE FASTATTR_CUDA_ARCHS=$ARCHS; later stages use the installed fastattr" >>"$INFO"
    if FASTATTR_CUDA=$CUDA_MODE FASTATTR_CUDA_ARCHS=$ARCHS run_stage build "$INFO" "$(timeout_for build 1800)" \
         "$PY" -m pip wheel --no-build-isolation --no-deps -v -w "$TMPB/wheel" --config-settings=build-dir="$TMPB/build" .; then
      record build PASS "$LAST_SECS" "dry run: wheel $(basename "$(ls "$TMPB"/wheel/*.whl 2>/dev/null | head -n1)") (CUDA $CUDA_MODE $ARCHS), not installed"
    else
      record build FAIL "$LAST_SECS" "$LAST_NOTE"; fail_tail "$INFO"
    fi
    rm -rf "$TMPB"
  else
    ARCHS="${FASTATTR_CUDA_ARCHS:-${CC:+${CC}-real}}"
    [ -n "$ARCHS" ] || ARCHS=""  # empty: CMake's release list of archs
    if FASTATTR_CUDA=ON FASTATTR_CUDA_ARCHS="$ARCHS" run_stage build "$INFO" "$(timeout_for build 1800)" \
         "$PY" -m pip install --no-build-isolation --no-deps -v -e . --config-settings=build-dir="build/suite-$WHEEL_TAG"; then
      if "$PY" -c 'import fastattr._C as c, sys; sys.exit(0 if c.build_info()["cuda"] else 1)' >>"$INFO" 2>&1; then
        record build PASS "$LAST_SECS" "FASTATTR_CUDA=ON archs ${ARCHS:-release list}, editable install"
      else
        record build FAIL "$LAST_SECS" "installed, but fastattr._C has no CUDA kernels or does not import"
      fi
    else
      record build FAIL "$LAST_SECS" "$LAST_NOTE"; fail_tail "$INFO"
    fi
  fi
fi

# ---------------------------------------------------------------------------------------- info
if want info; then
  if run_stage info "$INFO" "$(timeout_for info 300)" "$PY" -m fastattr info; then
    if [ "$DRYRUN" = 0 ] && ! "$PY" -c 'from fastattr import _backends as b; import sys; sys.exit(0 if b.backend_status()["cuda"][0] else 1)' >/dev/null 2>&1; then
      record info FAIL "$LAST_SECS" "the cuda backend is unavailable on a GPU machine (see info.txt)"
    else
      record info PASS "$LAST_SECS" "backends: $("$PY" -c 'import fastattr; print(",".join(fastattr.available_backends()))' 2>/dev/null)"
    fi
  else
    record info FAIL "$LAST_SECS" "$LAST_NOTE"; fail_tail "$INFO"
  fi
fi

# --------------------------------------------------------------------------------------- tests
pytest_tail() { grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped)|no tests ran|(passed|failed|skipped).* in [0-9.]+s' "$1" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//'; }
if want tests; then
  : >"$TESTS"
  if run_stage tests "$TESTS" "$(timeout_for tests 1800)" "$PY" -m pytest -q -rfEs -p no:cacheprovider ${FASTATTR_SUITE_TEST_ARGS:-tests/}; then
    record tests PASS "$LAST_SECS" "$(pytest_tail "$TESTS")"
  else
    record tests FAIL "$LAST_SECS" "$LAST_NOTE: $(pytest_tail "$TESTS")"; fail_tail "$TESTS"
  fi
fi

# ----------------------------------------------------------------------------------- sanitizer
if want sanitizer; then
  : >"$SAN"
  SAN_K="${FASTATTR_SUITE_SANITIZER_K:-cuda or triton}"
  if [ "$DRYRUN" = 1 ]; then
    echo "skipped: dry run on the CPU; compute-sanitizer checks CUDA kernels and needs a CUDA device" >>"$SAN"
    record sanitizer SKIP 0 "dry run: compute-sanitizer needs a CUDA device"
  elif ! command -v compute-sanitizer >/dev/null; then
    echo "skipped: compute-sanitizer is not on PATH" >>"$SAN"
    record sanitizer SKIP 0 "compute-sanitizer not found"
  else
    # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an
    # out-of-bounds access even where it would land inside one of torch's pooled blocks.
    if PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage sanitizer "$SAN" "$(timeout_for sanitizer 1800)" \
         compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 50 --target-processes all \
         "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/ -m "not slow" -k "$SAN_K"; then
      record sanitizer PASS "$LAST_SECS" "$(grep -E 'ERROR SUMMARY' "$SAN" | tail -n1); $(pytest_tail "$SAN")"
    else
      record sanitizer FAIL "$LAST_SECS" "$LAST_NOTE: $(grep -E 'ERROR SUMMARY' "$SAN" | tail -n1)"; fail_tail "$SAN" 25
    fi
  fi
fi

# --------------------------------------------------------------------------------------- bench
REPORT_SUMMARY=""
if want bench; then
  : >"$BENCH"
  rm -f "$OUTDIR/bench.json" "$OUTDIR/speedup.png" "$OUTDIR/memory.png"
  FASTATTR_BENCH_TIER="$TIER" run_stage bench "$BENCH" "$(timeout_for bench 3600)" \
    "$PY" -m pytest -q -rfEs -p no:cacheprovider ${FASTATTR_SUITE_BENCH_ARGS:-benchmarks/} \
    --benchmark-json "$OUTDIR/bench.json" --benchmark-columns=median,iqr,rounds
  BENCH_RC=$? BENCH_SECS=$LAST_SECS BENCH_NOTE="$LAST_NOTE: $(pytest_tail "$BENCH")"
  if [ -s "$OUTDIR/bench.json" ]; then
    { echo; echo "### report"; } >>"$BENCH"
    REPORT_SUMMARY="$("$PY" benchmarks/report.py "$OUTDIR/bench.json" --out "$OUTDIR" --summary 2>>"$BENCH")"
    REPORT_RC=$?
    echo "$REPORT_SUMMARY" >>"$BENCH"
  else
    REPORT_RC=1 BENCH_NOTE="$BENCH_NOTE; no bench.json written"
  fi
  if [ $BENCH_RC -eq 0 ] && [ $REPORT_RC -eq 0 ]; then
    record bench PASS "$BENCH_SECS" "tier $TIER: $(pytest_tail "$BENCH")"
  else
    record bench FAIL "$BENCH_SECS" "tier $TIER, $BENCH_NOTE$([ $REPORT_RC -ne 0 ] && echo '; report.py failed')"; fail_tail "$BENCH"
  fi
fi

# ------------------------------------------------------------------------------------- summary
FAILED=0
TABLE="| stage | status | seconds | note |
|---|---|---|---|"
for i in "${!NAMES[@]}"; do
  [ "${STATUS[$i]}" = FAIL ] && FAILED=1
  TABLE+="
| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${NOTES[$i]//|//} |"
done
[ -n "$MISSING" ] && TABLE+="

Missing packages: $MISSING (what that skipped: see info.txt)."
{
  [ -s "$OUTDIR/report.md" ] || echo "# fastattr GPU suite ($CARD)"
  echo; echo "## Suite ($( [ "$DRYRUN" = 1 ] && echo 'dry run on the CPU' || echo "$CARD" ), $(date -u +%FT%TZ))"; echo
  echo "$TABLE"
} >>"$OUTDIR/report.md"
{ echo; echo "### summary"; echo "$TABLE"; } >>"$INFO"

echo
echo "fastattr GPU suite: $CARD, $([ "$DRYRUN" = 1 ] && echo 'DRY RUN (CPU), ')tier $TIER -> $OUTDIR ($(ls "$OUTDIR" | wc -l) files: $(ls "$OUTDIR" | tr '\n' ' '))"
[ -n "$REPORT_SUMMARY" ] && echo "$REPORT_SUMMARY"
echo
printf '%-10s %-5s %8s  %s\n' stage status seconds note
for i in "${!NAMES[@]}"; do
  printf '%-10s %-5s %8s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
done
[ -n "$MISSING" ] && echo "missing packages: $MISSING (skipped what needs them; see info.txt)"
exit $FAILED
