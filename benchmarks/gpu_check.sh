#!/usr/bin/env bash
# The device check: one command for a fresh H100/H200 (no network) that ends within 8 minutes.
#
#   benchmarks/gpu_check.sh OUTDIR [--cpu] [--wheels DIR]
#
# Stages, each time-boxed; a failure is recorded and the next stage runs:
#   wheels     (with --wheels DIR) pip install --no-index --no-deps DIR/*.whl into a private
#              folder on PYTHONPATH, then try importing circuit_tracer, transformer_lens, nnsight
#   build      the extension for this card's arch only (FASTATTR_CUDA_ARCHS=<cc>-real), parallel
#              jobs, installed into a private folder on PYTHONPATH (the environment is not touched)
#   info       python -m fastattr info (fails when the cuda backend is unavailable)
#   selftest   python -m fastattr selftest --json OUTDIR/selftest.json: every op on every backend
#              against the reference, first of the checks (fails on any mismatch or crash)
#   tests      every CUDA/Triton kernel test, graph kernels included, without circuit-tracer
#              (pytest-xdist when installed); then the > 2^31-element cases (-m large), one at a time
#   timings    benchmarks/check_timings.py: contraction (Gemma-2-2B PLT/CLT, bf16/fp32, batch 256;
#              cuda, triton, torch), prune_graph N=16k/63k, find_threshold 1e9, as roofline fractions
#   e2e        FASTATTR_BENCH_TIER=full pytest benchmarks/bench_engine.py (needs circuit-tracer and
#              pytest-benchmark: --wheels), its rows added to the timings
#   report     benchmarks/device_report.py: OUTDIR/report.json, the self-test, the card and the measured
#              default per op, in the format fastattr's loader reads (_runtime/evidence.py); commit it
#              as benchmarks/results/<card>-<date>.json to make its defaults the automatic choice
#   sanitizer  compute-sanitizer memcheck over the self-test's CUDA kernels (--backend cuda) and a few
#              kernel tests; racecheck over the self-test's shared-memory kernels (contraction,
#              threshold, top-k), last
#
# OUTDIR gets at most 10 files: summary.md (stage table + timings table), info.txt (machine,
# wheels, build, fastattr info, self-test table), selftest.json, report.json, tests.txt, timings.md,
# timings.json, e2e.txt, e2e.json, sanitizer.txt. Exit status 1 if a stage failed (a stage skipped
# with its reason is no failure).
#
# --cpu: dry run on this machine's CPU (what CI runs): no build (the installed fastattr is used),
# a few tests, the timings at tiny shapes, the e2e stage only collects, no sanitizer.
# Environment: PYTHON (default python3), FASTATTR_CHECK_BUDGET (total seconds, default 470),
# FASTATTR_CHECK_BUILD=1 (build in a dry run too), FASTATTR_CUDA_ARCHS (override the arch).

set -u -o pipefail
die() { echo "gpu_check: $*" >&2; exit 2; }

OUTDIR="" DRYRUN=0 WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) DRYRUN=1 ;;
    --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; WHEELS="$(realpath -m "$2")"; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$OUTDIR" ] || die "one OUTDIR only"; OUTDIR="$(realpath -m "$1")" ;;
  esac
  shift
done
[ -n "$OUTDIR" ] || die "usage: benchmarks/gpu_check.sh OUTDIR [--cpu] [--wheels DIR]"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || die "cannot enter $ROOT"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || die "no python at '$PY' (set PYTHON)"
mkdir -p "$OUTDIR" || die "cannot create $OUTDIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1
unset FASTATTR_BACKEND
START=$SECONDS BUDGET="${FASTATTR_CHECK_BUDGET:-470}"
INFO="$OUTDIR/info.txt" TESTS="$OUTDIR/tests.txt" E2E="$OUTDIR/e2e.txt" SAN="$OUTDIR/sanitizer.txt"
: >"$INFO"; : >"$TESTS"; : >"$E2E"; : >"$SAN"
PRIV="$(mktemp -d /tmp/fastattr-check.XXXXXX)"

CARD=cpu CC=""
if [ "$DRYRUN" = 0 ]; then
  nvidia-smi -L >/dev/null 2>&1 || die "no CUDA device visible (nvidia-smi -L failed); for a dry run use --cpu"
  CARD="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)"
  CC="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')"
  [ -n "$CC" ] || CC="$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")' 2>/dev/null)"
else
  export CUDA_VISIBLE_DEVICES=""  # the CPU even where a GPU exists (the tests interpret Triton then)
fi

# Stage caps in seconds, in order; a stage may also use what earlier stages left unused, as long
# as the later stages keep their caps. The sum is the 8-minute box less some slack.
ORDER=(wheels build info selftest tests large timings report e2e sanitizer racecheck)
declare -A CAP=([wheels]=20 [build]=150 [info]=20 [selftest]=40 [tests]=80 [large]=35 [timings]=65 [report]=10
                [e2e]=40 [sanitizer]=40 [racecheck]=25)
[ -n "$WHEELS" ] || CAP[wheels]=0
limit_for() {  # seconds the stage $1 may take now
  local later=0 seen=0 s
  for s in "${ORDER[@]}"; do
    [ "$seen" = 1 ] && later=$((later + CAP[$s]))
    [ "$s" = "$1" ] && seen=1
  done
  local left=$((BUDGET - (SECONDS - START) - later))
  [ $left -lt 10 ] && left=10
  echo $left
}

NAMES=() STATUS=() SECS=() NOTES=()
record() { NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); NOTES+=("${4//|//}"); echo "== $1: $2 (${3}s) $4"; }
run_stage() {  # run_stage NAME LOG CMD...: time-boxed, output appended to LOG
  local name="$1" log="$2" limit; shift 2
  limit="$(limit_for "$name")"
  local t0=$SECONDS
  echo "== $name: running (limit ${limit}s)"
  { echo; echo "### $name (limit ${limit}s): $*"; echo; } >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  LAST_SECS=$((SECONDS - t0))
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then LAST_NOTE="timed out after ${limit}s"; else LAST_NOTE="exit $rc"; fi
  return $rc
}
pytest_tail() { grep -E '[0-9]+ (passed|failed|error|skipped|deselected|tests? collected)|no tests ran' "$1" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//'; }

{
  echo "fastattr device check, $(date -u +%FT%TZ), $([ "$DRYRUN" = 1 ] && echo 'DRY RUN on the CPU (--cpu)' || echo "$CARD sm_$CC")"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty)'); python $("$PY" -c 'import sys; print(sys.version.split()[0])'); $(uname -srm), $(nproc) cores; budget ${BUDGET}s"
  [ "$DRYRUN" = 0 ] && nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm --format=csv
  command -v nvcc >/dev/null && nvcc --version | tail -n 1 || echo "nvcc: not found"
  "$PY" - <<'PYEOF'
from importlib.metadata import version, PackageNotFoundError
for n in ["torch", "triton", "transformers", "pytest", "pytest-xdist", "pytest-timeout", "pytest-benchmark",
          "circuit-tracer", "transformer-lens", "nnsight"]:
    try:
        print(f"  {n} {version(n)}")
    except PackageNotFoundError:
        print(f"  {n} MISSING")
PYEOF
} >>"$INFO" 2>&1

# ---------------------------------------------------------------------------------------- wheels
if [ -n "$WHEELS" ]; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1 && run_stage wheels "$INFO" "$PY" -m pip install -q --no-index --no-deps \
       --no-compile --no-cache-dir --target "$PRIV/wheels" "$WHEELS"/*.whl; then
    export PYTHONPATH="$PRIV/wheels${PYTHONPATH:+:$PYTHONPATH}"
    MISSING="$("$PY" -c '
import importlib
bad = []
for m in ("circuit_tracer", "transformer_lens", "nnsight"):
    try:
        importlib.import_module(m)
    except Exception as e:
        bad.append(f"{m} ({type(e).__name__}: {e})")
print("; ".join(bad))' 2>>"$INFO")"
    echo "imports after the wheels: ${MISSING:-all of circuit_tracer, transformer_lens, nnsight}" >>"$INFO"
    if [ -z "$MISSING" ]; then record wheels PASS "$LAST_SECS" "$(ls "$WHEELS"/*.whl | wc -l) wheels"
    else record wheels FAIL "$LAST_SECS" "installed; not importable: $MISSING"; fi
  else
    record wheels FAIL "${LAST_SECS:-0}" "no wheels in $WHEELS or pip failed (info.txt)"
  fi
fi

# ----------------------------------------------------------------------------------------- build
if [ "$DRYRUN" = 1 ] && [ "${FASTATTR_CHECK_BUILD:-0}" != 1 ]; then
  record build SKIP 0 "dry run: the installed fastattr is used (FASTATTR_CHECK_BUILD=1 builds)"
else
  ARCHS="${FASTATTR_CUDA_ARCHS:-${CC:+${CC}-real}}"
  MODE=ON; [ "$DRYRUN" = 1 ] && ! command -v nvcc >/dev/null && MODE=OFF
  [ -n "$ARCHS" ] || ARCHS=90-real
  TAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
  if FASTATTR_CUDA=$MODE FASTATTR_CUDA_ARCHS="$ARCHS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
     run_stage build "$INFO" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v --target "$PRIV/fastattr" \
       --config-settings=build-dir="build/check-$TAG-$ARCHS" .; then
    export PYTHONPATH="$PRIV/fastattr${PYTHONPATH:+:$PYTHONPATH}"
    record build PASS "$LAST_SECS" "FASTATTR_CUDA=$MODE archs $ARCHS, $(nproc) jobs, into a private folder"
  else
    record build FAIL "$LAST_SECS" "$LAST_NOTE (info.txt)"
  fi
fi

# ------------------------------------------------------------------------------------------ info
if run_stage info "$INFO" "$PY" -m fastattr info; then
  if [ "$DRYRUN" = 0 ] && ! "$PY" -c 'from fastattr import _backends as b; import sys; sys.exit(0 if b.backend_status()["cuda"][0] else 1)' 2>/dev/null; then
    record info FAIL "$LAST_SECS" "the cuda backend is unavailable (info.txt)"
  else
    record info PASS "$LAST_SECS" "$("$PY" -c 'import fastattr; print("backends", ",".join(fastattr.available_backends()))' 2>/dev/null)"
  fi
else
  record info FAIL "$LAST_SECS" "$LAST_NOTE (info.txt)"
fi

# -------------------------------------------------------------------------------------- selftest
# First of the checks: the reference's answers on this card, op by op and backend by backend.
if run_stage selftest "$INFO" "$PY" -m fastattr selftest --json "$OUTDIR/selftest.json"; then
  record selftest PASS "$LAST_SECS" "$(tail -n 1 "$INFO" | head -c 160)"
else
  record selftest FAIL "$LAST_SECS" "$LAST_NOTE: $(grep -m1 -E 'MISMATCH|ERROR' "$INFO" | head -c 160) (info.txt)"
fi

# ----------------------------------------------------------------------------------------- tests
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider)
"$PY" -c 'import xdist' 2>/dev/null && [ "$DRYRUN" = 0 ] && PAR=(-n 8) || PAR=()
"$PY" -c 'import pytest_timeout' 2>/dev/null && TMO=(--timeout 240) || TMO=()
if [ "$DRYRUN" = 1 ]; then
  SEL=(tests/ops/test_contraction_tf32.py -k "split or three or float64")
else
  # Every kernel test; not the CPU-side ones (CI compiles the kernels and builds wheels), nor the
  # ones that need circuit-tracer (they skip themselves when it is absent).
  SEL=(tests/ --ignore=tests/package/test_kernel_compile.py --ignore=tests/package/test_wheels.py --ignore=tests/package/test_gpu_check.py
       --ignore=tests/package/test_benchmarks_smoke.py --ignore=tests/package/test_readme.py -m "not large and not wheels")
fi
if run_stage tests "$TESTS" "${PYTEST[@]}" "${PAR[@]}" "${TMO[@]}" "${SEL[@]}"; then
  record tests PASS "$LAST_SECS" "$(pytest_tail "$TESTS")"
else
  record tests FAIL "$LAST_SECS" "$LAST_NOTE: $(pytest_tail "$TESTS")"
fi
# One at a time: each needs tens of GB of the card.
if run_stage large "$TESTS" "${PYTEST[@]}" tests/ops/test_large.py -m large; then
  record large PASS "$LAST_SECS" "$(pytest_tail "$TESTS")"
else
  record large FAIL "$LAST_SECS" "$LAST_NOTE: $(pytest_tail "$TESTS")"
fi

# --------------------------------------------------------------------------------------- timings
T_ARGS=("$OUTDIR"); [ "$DRYRUN" = 1 ] && T_ARGS+=(--cpu)
T_LIMIT="$(limit_for timings)"
if run_stage timings "$PRIV/timings.log" "$PY" benchmarks/check_timings.py "${T_ARGS[@]}" --budget $((T_LIMIT - 15)); then
  record timings PASS "$LAST_SECS" "$(grep -c '^| ' "$OUTDIR/timings.md" 2>/dev/null) table lines (timings.md)"
else
  record timings FAIL "$LAST_SECS" "$LAST_NOTE: $(grep -m1 -E 'FAILED|Error' "$OUTDIR/timings.md" "$PRIV/timings.log" 2>/dev/null | head -c 200)"
fi
{ echo; echo "### timings (stdout and stderr of check_timings.py)"; cat "$PRIV/timings.log" 2>/dev/null; } >>"$INFO"

# ---------------------------------------------------------------------------------------- report
DRIVER="$([ "$DRYRUN" = 0 ] && nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n1)"
if [ ! -s "$OUTDIR/selftest.json" ]; then
  record report FAIL 0 "no selftest.json: the self-test stage wrote nothing"
elif run_stage report "$INFO" "$PY" benchmarks/device_report.py "$OUTDIR" --card "$CARD" --cc "$CC" \
       --driver "$DRIVER" --commit "$(git rev-parse --short HEAD 2>/dev/null)"; then
  record report PASS "$LAST_SECS" "defaults: $("$PY" -c 'import json, sys; d = json.load(open(sys.argv[1]))["defaults"]; print(", ".join(f"{k} {v['"'"'backend'"'"']}" for k, v in d.items()))' "$OUTDIR/report.json" 2>/dev/null)"
else
  record report FAIL "$LAST_SECS" "$LAST_NOTE (info.txt)"
fi

# ------------------------------------------------------------------------------------------- e2e
if [ "$DRYRUN" = 1 ]; then
  if run_stage e2e "$E2E" "${PYTEST[@]}" --collect-only benchmarks/bench_engine.py; then
    record e2e PASS "$LAST_SECS" "dry run: collected only ($(pytest_tail "$E2E"))"
  else
    record e2e FAIL "$LAST_SECS" "$LAST_NOTE: collection failed (e2e.txt)"
  fi
elif ! "$PY" -c 'import pytest_benchmark' 2>/dev/null; then
  record e2e SKIP 0 "pytest-benchmark is not installed (tools/gpu_wheels.sh + --wheels)"
else
  if FASTATTR_BENCH_TIER=full run_stage e2e "$E2E" "${PYTEST[@]}" benchmarks/bench_engine.py \
       --benchmark-json "$OUTDIR/e2e.json" --benchmark-columns=median,rounds; then
    record e2e PASS "$LAST_SECS" "$(pytest_tail "$E2E")"
  else
    record e2e FAIL "$LAST_SECS" "$LAST_NOTE: $(pytest_tail "$E2E")"
  fi
  [ -s "$OUTDIR/e2e.json" ] && "$PY" benchmarks/check_timings.py "$OUTDIR" --merge-e2e "$OUTDIR/e2e.json" >>"$E2E" 2>&1
fi

# ------------------------------------------------------------------------------------- sanitizer
if [ "$DRYRUN" = 1 ]; then
  echo "skipped: dry run; compute-sanitizer checks CUDA kernels" >>"$SAN"
  record sanitizer SKIP 0 "dry run: needs a CUDA device"
  record racecheck SKIP 0 "dry run: needs a CUDA device"
elif ! command -v compute-sanitizer >/dev/null; then
  record sanitizer SKIP 0 "compute-sanitizer not on PATH"
  record racecheck SKIP 0 "compute-sanitizer not on PATH"
else
  # Without torch's caching allocator every tensor is its own allocation, so an out-of-bounds
  # access is caught even where it would land inside a pooled block.
  if PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage sanitizer "$SAN" bash -c '
       compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 --target-processes all \
         "$0" -m fastattr selftest --backend cuda && \
       compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 --target-processes all "$0" "$@"' \
       "$PY" "${PYTEST[@]:1}" -x tests/ops/test_contraction.py tests/ops/test_pruning.py tests/ops/test_topk_edges.py \
       -k "cuda or triton" -m "not large"; then
    record sanitizer PASS "$LAST_SECS" "memcheck: $(grep 'ERROR SUMMARY' "$SAN" | tail -n1); $(pytest_tail "$SAN")"
  else
    record sanitizer FAIL "$LAST_SECS" "$LAST_NOTE: $(grep 'ERROR SUMMARY' "$SAN" | tail -n1)"
  fi
  # racecheck: shared-memory hazards, in the kernels that stage through shared memory.
  if run_stage racecheck "$SAN" compute-sanitizer --tool racecheck --error-exitcode 99 --print-limit 20 \
       "$PY" -m fastattr selftest --backend cuda; then
    record racecheck PASS "$LAST_SECS" "$(grep 'RACECHECK SUMMARY\|ERROR SUMMARY' "$SAN" | tail -n1)"
  else
    record racecheck FAIL "$LAST_SECS" "$LAST_NOTE: $(grep 'RACECHECK SUMMARY\|ERROR SUMMARY' "$SAN" | tail -n1)"
  fi
fi

# --------------------------------------------------------------------------------------- summary
FAILED=0
{
  echo "# fastattr device check: $([ "$DRYRUN" = 1 ] && echo 'dry run on the CPU' || echo "$CARD (sm_$CC)")"
  echo; echo "$(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null), $((SECONDS - START)) s in all."
  echo; echo "| stage | status | seconds | note |"; echo "|---|---|---|---|"
  for i in "${!NAMES[@]}"; do echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${NOTES[$i]} |"; done
  echo
  [ -s "$OUTDIR/timings.md" ] && sed 's/^# /## /' "$OUTDIR/timings.md"
} >"$OUTDIR/summary.md"
for s in "${STATUS[@]}"; do [ "$s" = FAIL ] && FAILED=1; done
rm -rf "$PRIV"
echo; echo "gpu_check: $((SECONDS - START)) s -> $OUTDIR ($(ls "$OUTDIR" | tr '\n' ' '))"
printf '%-10s %-5s %6s  %s\n' stage status secs note
for i in "${!NAMES[@]}"; do printf '%-10s %-5s %6s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"; done
exit $FAILED
