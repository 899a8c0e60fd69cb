import sys, os, datetime, time
import torch
torch.set_num_threads(1)
import fastattr
from fastattr import synthetic
from fastattr.attribution import driver, linear_engine as le
import torch.distributed as dist
rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
w = dict(n_layers=6, d_model=128, d_transcoder=512, n_pos=40, nodes=1200, batch_size=64)
model = synthetic.make_replacement_model(transcoder="clt", n_layers=w["n_layers"], d_model=w["d_model"], d_transcoder=w["d_transcoder"], seed=0)
prompt = synthetic.random_prompt(w["n_pos"], seed=1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
kw = dict(batch_size=w["batch_size"], max_feature_nodes=w["nodes"], process_group=dist.group.WORLD if world > 1 else None)
E=[]; o=le.LinearEngine.run
def r(self, out, layers, positions, values):
    t=time.perf_counter(); o(self, out, layers, positions, values); E.append((len(layers), time.perf_counter()-t))
le.LinearEngine.run=r
fastattr.attribute(prompt, model, **kw)
for _ in range(3):
    E.clear(); t=time.perf_counter(); fastattr.attribute(prompt, model, **kw); tot=time.perf_counter()-t
print(rank, "total", round(tot,3), "engine", round(sum(e[1] for e in E),4), "rows", sum(e[0] for e in E), "runs", len(E), file=sys.stderr)
dist.destroy_process_group()
