#!/usr/bin/env bash
# Run the circuit-tracer comparison tests against another circuit-tracer source tree (e.g. upstream
# decoderesearch/circuit-tracer, whose attribution is split into attribute_transformerlens.py and
# attribute_nnsight.py) instead of the installed one: the tree goes first on PYTHONPATH.
#
# Usage: tools/check_upstream.sh /path/to/circuit-tracer [pytest args...]
# Needs the dev environment (tools/setup_env.sh); PYTHON overrides the interpreter.
set -euo pipefail
tree=${1:?usage: tools/check_upstream.sh /path/to/circuit-tracer [pytest args...]}
shift
[ -f "$tree/circuit_tracer/__init__.py" ] || { echo "no circuit_tracer package under $tree" >&2; exit 2; }
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
cd "$here"
# nnsight finds a trace's with-block by reading the source file: do not edit fastattr while this runs.
export HF_HUB_OFFLINE=1 PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1
"$py" -c "import circuit_tracer, fastattr.patch as p; print('circuit-tracer', p.circuit_tracer_version(), 'from', circuit_tracer.__file__)"
exec "$py" -m pytest -q -p no:cacheprovider tests/ops/test_reference.py tests/integrations/test_patch.py tests/attribution/test_attribute.py \
  tests/ops/test_pruning.py -m "not slow" "$@"
