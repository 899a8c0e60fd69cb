import torch, time, cProfile, pstats, sys
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
import fastattr
from fastattr import synthetic
from fastattr.attribution import driver
model = synthetic.make_replacement_model(transcoder="plt", n_layers=4, d_model=128, d_transcoder=1024, n_heads=4, d_vocab=512, n_ctx=2048,
    feature_density=32/1024, seed=0, architecture="gemma2", n_kv_heads=2, skip_connection=True)
prompt = synthetic.random_prompt(32, seed=1, vocab_size=512)
kw = dict(batch_size=64, max_feature_nodes=1024)
fastattr.attribute(prompt, model, **kw)
ts=[]
for _ in range(5):
    t=time.perf_counter(); fastattr.attribute(prompt, model, **kw); ts.append(time.perf_counter()-t)
print("t", min(ts), {k:round(v,4) for k,v in driver._LAST_RUN.items() if isinstance(v,float)})
pr = cProfile.Profile(); pr.enable(); fastattr.attribute(prompt, model, **kw); pr.disable()
st = pstats.Stats(pr); st.sort_stats(sys.argv[2] if len(sys.argv) > 2 else "tottime").print_stats(int(sys.argv[3]) if len(sys.argv) > 3 else 40)
