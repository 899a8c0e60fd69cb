#!/usr/bin/env bash
# Create .venv (Python 3.11+), install the CPU build of torch, then fastattr with its build and the
# extras for tracing and testing. Idempotent: a second run only rebuilds fastattr.
# FASTATTR_CUDA=AUTO|ON|OFF is passed through to CMake (AUTO builds CUDA kernels when nvcc exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and pinned: anything that asked for plain "torch" later would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
# The extension links no libtorch, so build isolation is safe and needs only scikit-build-core + pybind11.
python -m pip install --quiet ".[triton,tracer,test,bench]"
python -m fastattr info
