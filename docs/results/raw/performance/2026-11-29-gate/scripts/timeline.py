"""Probe (device only): where the whole unload's time goes, host and GPU on one timeline."""
import json, os, statistics, sys, time
import torch
sys.path.insert(0, "benchmarks")
import bench_unload
import plora
from plora import cuda_graphs
from plora.layers import adapted_layers
from plora.unload_plan import UnloadPlan

mode = sys.argv[1] if len(sys.argv) > 1 else "direct"
model = bench_unload.build("llama-3.2-1b", "cuda")
plan = UnloadPlan(adapted_layers(model))
marks = []  # (label, host µs, event)
T0 = [0.0]
def mark(label):
    e = torch.cuda.Event(enable_timing=True); e.record()
    marks.append((label, (time.perf_counter() - T0[0]) * 1e6, e))
real_run = cuda_graphs.GraphCache.run
def run(self, key, body, device):
    mark(f"before {key}")
    out = real_run(self, key, body, device)
    mark(f"after {key}")
    return out
cuda_graphs.GraphCache.run = run
rows = []
walls = []
for i in range(14):
    bench_unload.randomise_b(model)
    torch.cuda.synchronize()
    marks.clear()
    T0[0] = time.perf_counter()
    mark("start")
    plora.unload_(model, 1.0, merge_precision=mode, residuals={}, plan=plan, unload_index=i, landed_sample_rows=64)
    mark("returned")
    torch.cuda.synchronize()
    wall = (time.perf_counter() - T0[0]) * 1e6
    if i >= 4:
        ev0 = marks[0][2]
        rows.append([(lab, round(h, 1), round(ev0.elapsed_time(e) * 1e3, 1)) for lab, h, e in marks])
        walls.append(wall)
# without the marks
cuda_graphs.GraphCache.run = real_run
plain = []
for i in range(14, 25):
    bench_unload.randomise_b(model)
    torch.cuda.synchronize()
    t = time.perf_counter()
    plora.unload_(model, 1.0, merge_precision=mode, residuals={}, plan=plan, unload_index=i, landed_sample_rows=64)
    torch.cuda.synchronize()
    plain.append((time.perf_counter() - t) * 1e6)
print(mode, "plain whole unload µs: median", round(statistics.median(plain), 1), "all", [round(x) for x in plain])
print("marked: wall median", round(statistics.median(walls), 1))
labels = [lab for lab, _, _ in rows[0]]
for j, lab in enumerate(labels):
    hs = [r[j][1] for r in rows]; gs = [r[j][2] for r in rows]
    print(f"{lab:40s} host {statistics.median(hs):8.1f}  gpu {statistics.median(gs):8.1f}")
json.dump({"mode": mode, "plain": plain, "walls": walls, "rows": rows},
          open(os.path.join(os.environ.get("OUT", "."), f"timeline_{mode}.json"), "w"))
