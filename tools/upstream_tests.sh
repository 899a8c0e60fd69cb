#!/usr/bin/env bash
# Run circuit-tracer's own test suite twice, plain and with fastattr patched in for the whole run
# (pytest -p fastattr.pytest_plugin), and print the file x plain/patched table (docs/compatibility.md).
#
# Usage: tools/upstream_tests.sh /path/to/circuit-tracer-source [test paths...]
# The tree goes first on PYTHONPATH, so its circuit_tracer shadows the installed one. Offline: the
# attribution tests want the gpt2 tokenizer from the hub; a stand-in byte-level tokenizer is saved
# into $HF_HOME under gpt2 and openai-community/gpt2 (the tests feed token ids, its content does
# not matter). PYTHON overrides the interpreter; OUT (default ./upstream-runs) keeps logs.
set -euo pipefail
tree=${1:?usage: tools/upstream_tests.sh /path/to/circuit-tracer [test paths...]}
shift
[ -d "$tree/tests" ] || { echo "no tests/ under $tree" >&2; exit 2; }
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
out=$(realpath -m "${OUT:-upstream-runs}")
mkdir -p "$out"
export HF_HOME=${HF_HOME:-$out/hf-home} HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
"$py" - <<'PY'
import os, shutil, json
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import GPT2TokenizerFast
home = os.environ["HF_HOME"]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(["The quick brown fox jumps over the lazy dog."] * 20, trainers.BpeTrainer(
    vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
fast = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                         unk_token="<|endoftext|>")
rev = "0" * 40
for name in ("gpt2", "openai-community/gpt2"):
    repo = os.path.join(home, "hub", "models--" + name.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", rev)
    fast.save_pretrained(snap)
    json.dump({"model_type": "gpt2", "vocab_size": 600}, open(os.path.join(snap, "config.json"), "w"))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    open(os.path.join(repo, "refs", "main"), "w").write(rev)
PY
cd "$tree"
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(tests)
# -rA lists every test's outcome at the end; the table is made from those lines.
"$py" -m pytest -q -rA -p no:cacheprovider "${args[@]}" > "$out/plain.log" 2>&1 || true
"$py" -m pytest -q -rA -p no:cacheprovider -p fastattr.pytest_plugin --fastattr-report="$out/calls.json" \
  "${args[@]}" > "$out/patched.log" 2>&1 || true
"$py" "$here/tools/upstream_table.py" "$out/plain.log" "$out/patched.log"
