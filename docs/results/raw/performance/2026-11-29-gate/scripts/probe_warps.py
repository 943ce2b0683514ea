"""Probe (device only): the GPU span of the work in front of the updates (norms beside the sampled
statistics, as launch_ahead_ launches them) with other options of the norm kernel and tilings of
the statistics passes."""
import functools, json, os, statistics, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_unload
import plora
from plora import kernels, unload_plan as up
from plora.layers import adapted_layers
from plora.unload_plan import UnloadPlan

mode = sys.argv[1] if len(sys.argv) > 1 else "direct"
model = bench_unload.build("llama-3.2-1b", "cuda")
plan = UnloadPlan(adapted_layers(model))
for i in range(4):
    plora.unload_(model, 1.0, merge_precision=mode, residuals={}, plan=plan, unload_index=i, landed_sample_rows=64)
torch.cuda.synchronize()
work = plan._devices[0]
d = work.device
tables = plan._seed_keys(0, 0)[0][0]
out = {"groups": [(g.shape, g.mode) for g in work.updates]}

def span(fn, n=40):
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        torch.cuda._sleep(200000)
        e0.record(); fn(); e1.record(); e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3)
    return round(min(ts), 1), round(statistics.median(ts), 1)

def graph_of(fn):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g

def ahead(norm_kw, stats_kw, norms=True, stats=True):
    def fn():
        work.stats.zero_()
        launches = []
        if norms:
            launches.append(functools.partial(up._norms, work, zero_sums=False, **norm_kw))
        if stats:
            launches += up._group_launches(work, tables, 64, "stats", stats_kw)
        up._branches(launches, d)
    return fn

res = {}
def record(label, norm_kw, stats_kw):
    r = {"ahead": span(graph_of(ahead(norm_kw, stats_kw)).replay)}
    if not stats_kw:
        r["norms alone"] = span(graph_of(ahead(norm_kw, stats_kw, stats=False)).replay)
    if not norm_kw:
        r["stats alone"] = span(graph_of(ahead(norm_kw, stats_kw, norms=False)).replay)
    res[label] = r
    print(label, r, flush=True)

record("default", {}, {})
for p, c, w in ((4096, 16, 1), (8192, 16, 1), (16384, 16, 1), (2048, 16, 1), (4096, 32, 1), (8192, 32, 1), (8192, 16, 2)):
    record(f"norms programs {p} chunk {c} warps {w}", dict(programs=p, chunk=c, warps=w), {})
record("default again", {}, {})
out["spans_us_min_median"] = res
out["default_tiles"] = [kernels._block_sizes(g.shape[1]) for g in work.updates]
out["steps"] = [kernels.stats_step(g.shape[0], g.shape[1], 64) for g in work.updates]
print(out["default_tiles"], out["steps"])
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), f"probe4_{mode}.json"), "w"), indent=1)
