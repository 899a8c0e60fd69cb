#!/usr/bin/env bash
# Download, here (with network), the wheels that benchmarks/gpu_check.sh --wheels DIR installs on a
# GPU machine without network: circuit-tracer, transformer-lens, nnsight, a transformers they accept
# (circuit-tracer 0.5.0 wants transformers <= 4.57.3; the GPU image has 5.x), and the modules they
# import that the image (Python 3.12, torch 2.11, transformers 5.x and its dependencies) lacks.
#
#   tools/gpu_wheels.sh DIR [--max-mb 40] [--with-arrow]
#
# transformer-lens imports datasets, and datasets imports pyarrow (53 MB) and pandas (12 MB): with
# them the set is 96 MB, without them 31 MB. They are left out unless --with-arrow (then raise
# --max-mb); on an image without them transformer_lens does not import, which gpu_check.sh records.
#
# Wheels only, for CPython 3.12 on manylinux x86_64, pinned, each without its dependencies (the
# list below is the closure, measured by importing circuit_tracer, transformer_lens and nnsight in
# this repository's .venv). Never torch. Exit 1 if a download fails or the total passes --max-mb.
# gpu_check.sh --wheels checks the imports on the GPU machine and records any module still missing.

set -u -o pipefail
DIR="" MAX_MB=40 ARROW=0
while [ $# -gt 0 ]; do
  case "$1" in
    --max-mb) MAX_MB="$2"; shift ;;
    --with-arrow) ARROW=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) DIR="$1" ;;
  esac
  shift
done
[ -n "$DIR" ] || { echo "usage: tools/gpu_wheels.sh DIR [--max-mb 40] [--with-arrow]" >&2; exit 2; }
mkdir -p "$DIR"
PY="${PYTHON:-python3}"

PINS=(
  # the three packages, and the transformers stack circuit-tracer 0.5.0 accepts
  circuit-tracer==0.5.0 transformer-lens==3.2.1 nnsight==0.6.1
  transformers==4.57.3 huggingface-hub==0.36.2 tokenizers==0.22.2
  # transformer-lens imports
  accelerate==1.15.0 better-abc==0.0.3 einops==0.8.2 jaxtyping==0.3.11 wadler-lindig==0.1.7 typeguard==4.6.1
  fancy-einsum==0.0.3 datasets==5.0.1 dill==0.4.1 multiprocess==0.70.19 xxhash==3.6.0 rich==15.0.0 markdown-it-py==4.0.0 mdurl==0.1.2 pygments==2.21.0
  # nnsight imports
  astor==0.8.1 cloudpickle==3.1.3 toml==0.10.2 zstandard==0.25.0 python-socketio==5.18.1 python-engineio==4.15.1
  bidict==0.24.1 simple-websocket==1.1.0 wsproto==1.2.0 websocket-client==1.9.2
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  # the benchmark harness (bench_engine.py runs under pytest-benchmark)
  pytest-benchmark==5.3.1 py-cpuinfo2==10.1.0
)

[ "$ARROW" = 1 ] && PINS+=(pyarrow==26.0.1 pandas==3.1.1 python-dateutil==2.9.0.post0)

fail=0
for pin in "${PINS[@]}"; do
  if ! "$PY" -m pip download -q --no-deps --only-binary :all: --python-version 3.12 --implementation cp \
       --abi cp312 --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
       --platform manylinux_2_28_x86_64 --platform any -d "$DIR" "$pin"; then
    echo "gpu_wheels: could not download $pin" >&2
    fail=1
  fi
done
if ls "$DIR" | grep -qi '^torch-'; then echo "gpu_wheels: torch must not be in $DIR" >&2; fail=1; fi
total=$(du -cb "$DIR"/*.whl 2>/dev/null | tail -n1 | cut -f1)
mb=$(( ${total:-0} / 1000000 ))
echo "gpu_wheels: $(ls "$DIR"/*.whl 2>/dev/null | wc -l) wheels, ${mb} MB in $DIR (limit ${MAX_MB} MB); largest:"
ls -S "$DIR"/*.whl 2>/dev/null | head -n 5 | while read -r f; do echo "  $(du -h "$f" | cut -f1) $(basename "$f")"; done
if [ "$mb" -ge "$MAX_MB" ]; then echo "gpu_wheels: over the limit" >&2; fail=1; fi
exit $fail
