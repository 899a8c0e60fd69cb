import torch, time, sys
torch.set_num_threads(2)
from fastattr import synthetic
import circuit_tracer as ct
model = synthetic.make_replacement_model(transcoder="plt", n_layers=4, d_model=128, d_transcoder=1024, n_heads=4, d_vocab=512, n_ctx=2048,
    feature_density=32/1024, seed=0, architecture="gemma2", n_kv_heads=2, skip_connection=True)
prompt = synthetic.random_prompt(32, seed=1, vocab_size=512)
kw = dict(batch_size=64, max_feature_nodes=1024, verbose=False)
ct.attribute(prompt, model, **kw)
ts=[]
for _ in range(3):
    t=time.perf_counter(); ct.attribute(prompt, model, **kw); ts.append(time.perf_counter()-t)
print("ct", [round(x*1e3) for x in ts])
