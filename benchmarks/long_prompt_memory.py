"""Peak memory (and time) of circuit-tracer's attribute against fastattr.attribute on a ~1,000-position prompt.

Usage: python benchmarks/long_prompt_memory.py {ct,dense,topk} [max_feature_nodes=4096] [batch=16]
Run each path in its own process: the CPU peak is sampled RSS above the level before the call.
"""
import os, time, torch, sys
os.environ["HF_HUB_OFFLINE"]="1"
import circuit_tracer, fastattr
from fastattr import synthetic
from fastattr._memory import PeakMemory
which = sys.argv[1]
mf = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
bs = int(sys.argv[3]) if len(sys.argv) > 3 else 16
m = synthetic.make_replacement_model(backend="transformerlens", transcoder="plt", n_layers=2, d_model=64, d_transcoder=128, seed=0)
prompt = synthetic.random_prompt(1000, seed=3)
fn = {"topk": lambda: fastattr.attribute(prompt, m, batch_size=bs, max_feature_nodes=mf, edge_storage="topk"),
      "dense": lambda: fastattr.attribute(prompt, m, batch_size=bs, max_feature_nodes=mf),
      "ct": lambda: circuit_tracer.attribute(prompt, m, batch_size=bs, max_feature_nodes=mf)}[which]
with PeakMemory("cpu") as pm:
    t=time.time(); g = fn(); dt=time.time()-t
print(f"RES {which} mf={mf} batch={bs} N={g.adjacency_matrix.shape[0]} active={g.active_features.shape[0]} time={dt:.1f}s peak_above_start={pm.peak_bytes/2**20:.0f}MiB", flush=True)
