#!/usr/bin/env bash
# Run tests against an AddressSanitizer build of the CPU kernels: the host-side counterpart of
# compute-sanitizer. The extension takes raw pointers, so an index past a buffer is silent heap
# corruption that surfaces later as a crash in unrelated code; ASan reports it where it happens.
#
# Usage: tools/asan_tests.sh [pytest args...]   (default: the graph-kernel and contraction tests)
# Builds _C with -fsanitize=address (CPU kernels only) into build/asan, runs pytest on an overlay
# of python/fastattr with that extension, and exits 1 if ASan reported anything (reports are kept
# in build/asan/reports). Needs gcc's libasan; takes a few minutes on 2 cores.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
build=$here/build/asan
overlay=$build/overlay
reports=$build/reports
cmake -S "$here" -B "$build/cmake" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFASTATTR_CUDA=OFF \
  -DCMAKE_CXX_FLAGS="-fsanitize=address -fno-omit-frame-pointer" -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address" \
  -DPython_EXECUTABLE="$py" -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" >"$build.configure.log" 2>&1
cmake --build "$build/cmake" -j"$(nproc)" >"$build.build.log" 2>&1
rm -rf "$overlay" "$reports"
mkdir -p "$overlay/fastattr" "$reports"
for f in "$here"/python/fastattr/*; do
  [ "$(basename "$f")" = __pycache__ ] || ln -s "$f" "$overlay/fastattr/"
done
ln -s "$here/kernels/triton_kernels" "$overlay/fastattr/triton_kernels"
cp "$build"/cmake/_C*.so "$overlay/fastattr/"
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(tests/ops/test_influence.py tests/ops/test_influence_dispatch.py tests/ops/test_threshold.py tests/ops/test_threshold_drivers.py
        tests/ops/test_topk_edges.py tests/ops/test_pruning.py tests/ops/test_prune_statuses.py tests/ops/test_graph_dispatch.py
        tests/ops/test_graph_deterministic.py tests/ops/test_contraction.py tests/attribution/test_deterministic.py tests/ops/test_bad_inputs.py)
fi
# libstdc++ preloaded beside libasan, so that ASan's exception interceptor finds the real __cxa_throw
# (the extension's argument errors are C++ exceptions); leaks are torch's and Python's, not ours.
cd "$here"
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so.6)" \
ASAN_OPTIONS=detect_leaks=0:log_path="$reports/asan" PYTHONPATH="$overlay" \
  "$py" -m pytest -q -p no:cacheprovider "${args[@]}" || status=$?
if grep -l "ERROR: AddressSanitizer" "$reports"/asan* 2>/dev/null; then
  grep -h -A12 "ERROR: AddressSanitizer" "$reports"/asan* | head -40
  exit 1
fi
echo "AddressSanitizer: no reports"
exit "${status:-0}"
