"""Probe (device only): host micro-costs of the plan's check, GPU spans of the ahead work, norm variants."""
import json, os, statistics, sys, time, operator
import torch
sys.path.insert(0, "benchmarks")
import bench_unload
import plora
from plora import kernels, unload_plan as up
from plora.layers import adapted_layers
from plora.unload_plan import UnloadPlan
import triton, triton.language as tl

out = {}
dev = "cuda"
model = bench_unload.build("llama-3.2-1b", dev)
layers = adapted_layers(model)
plan = UnloadPlan(layers)
for i in range(4):
    plora.unload_(model, 1.0, merge_precision="direct", residuals={}, plan=plan, unload_index=i, landed_sample_rows=64)
    bench_unload.randomise_b(model)
torch.cuda.synchronize()
work = plan._devices[0]

def host_us(fn, n=400):
    for _ in range(20): fn()
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(n): fn()
        ts.append((time.perf_counter() - t) / n * 1e6)
    return min(ts), statistics.median(ts)

h = {}
h["weights_signature"] = host_us(lambda: plan._weights_signature("direct", 1.0, {}))
h["pointers_weights_112"] = host_us(lambda: up._pointers(plan._other_slots))
h["pointers_factors_224"] = host_us(lambda: up._pointers(plan._factor_slots))
h["adapter_signature"] = host_us(lambda: plan._adapter_signature())
objs_w = list(map(operator.getitem, *plan._other_slots))
objs_f = list(map(operator.getitem, *plan._factor_slots))
allobjs = objs_w + objs_f
h["getitem_336"] = host_us(lambda: list(map(operator.getitem, *plan._other_slots)) + list(map(operator.getitem, *plan._factor_slots)))
h["identity_336"] = host_us(lambda: all(map(operator.is_, map(operator.getitem, *plan._other_slots), objs_w)) and all(map(operator.is_, map(operator.getitem, *plan._factor_slots), objs_f)))
h["data_ptr_336_held"] = host_us(lambda: list(map(torch.Tensor.data_ptr, allobjs)))
ptrs = list(map(torch.Tensor.data_ptr, allobjs)); idx = list(range(len(allobjs)))
f = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
out["has_cpp_check"] = f is not None
if f is not None:
    assert f(allobjs, ptrs, idx)
    h["cpp_check_336"] = host_us(lambda: f(allobjs, ptrs, idx))
scal = plan._scalings
h["scalings_112"] = host_us(lambda: list(map(operator.getitem, *scal)))
key1 = plan._key[1]
h["adapter_compare"] = host_us(lambda: plan._adapter_signature() == key1)
d = work.device
def ctx():
    with torch.cuda.device(d):
        pass
h["cuda_device_with"] = host_us(ctx)
ents = plan._graphs._entries
out["graph_keys"] = [str(k) for k in ents]
ahead_g = ents[("ahead", 64, False)][0]
upd_key = [k for k in ents if k[0] == "updates" and k[-1]][0]
upd_g = ents[upd_key][0]
def replay_host(g, n=30):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize(); t = time.perf_counter(); g.replay(); ts.append((time.perf_counter() - t) * 1e6)
    torch.cuda.synchronize()
    return min(ts), statistics.median(ts)
h["replay_ahead_host"] = replay_host(ahead_g)
h["replay_updates_host"] = replay_host(upd_g)
h["launch_ahead_call"] = host_us(lambda: plan.launch_ahead_(plan._key[0], (0, 0, 64), exact=False), n=50)
torch.cuda.synchronize()
out["host_us_min_median"] = h

def span(fn, n=30, back_to_back=False):
    """median GPU span (µs) of fn's work, from idle, CUDA events."""
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        torch.cuda._sleep(200000)  # ~100 µs of busy GPU so that launch latency is excluded
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

g_sp = {}
g_sp["ahead_graph"] = span(ahead_g.replay)
g_sp["updates_graph"] = span(upd_g.replay)
g_sp["ahead_then_updates"] = span(lambda: (ahead_g.replay(), upd_g.replay()))
seed_tables = plan._seed_keys(0, 0)
def stats_only():
    work.stats.zero_()
    up._branches(up._group_launches(work, seed_tables[0][0], 64, "stats", {}), d)
g_sp["stats_only"] = span(graph_of(stats_only).replay)
def norms_variant(**kw):
    def fn():
        work.gate.fill_(1)
        for nt in work.norms:
            kernels.update_norms_(nt, work.stats, gate=work.gate, zero_sums=False, **kw)
    return fn
g_sp["norms_default"] = span(graph_of(norms_variant()).replay)
def gate_variant(**kw):
    def fn():
        work.gate.fill_(1)
        for nt in work.norms:
            kernels.factor_gate_(nt, work.gate, **kw)
    return fn
g_sp["gate_default"] = span(graph_of(gate_variant()).replay)
for programs in (512, 1024, 4096):
    g_sp[f"gate_programs{programs}"] = span(graph_of(gate_variant(programs=programs)).replay)
for chunk in (16, 32, 128):
    g_sp[f"gate_chunk{chunk}"] = span(graph_of(gate_variant(chunk=chunk)).replay)
g_sp["gate_warps2"] = span(graph_of(gate_variant(warps=2)).replay)
g_sp["gate_warps8"] = span(graph_of(gate_variant(warps=8)).replay)
def ahead_variant(**kw):
    def fn():
        work.stats.zero_()
        work.gate.fill_(1)
        up._branches([gate_variant(**kw)] + up._group_launches(work, seed_tables[0][0], 64, "stats", {}), d)
    return fn
g_sp["ahead_gate_default"] = span(graph_of(ahead_variant()).replay)
g_sp["ahead_gate_p512"] = span(graph_of(ahead_variant(programs=512)).replay)
g_sp["ahead_gate_p1024"] = span(graph_of(ahead_variant(programs=1024)).replay)
g_sp["sleep_only"] = span(lambda: None)
out["gpu_span_us_min_median"] = g_sp
out["factor_dtypes"] = [str(nt.factor_dtype) for nt in work.norms]
out["G"] = [nt.table.shape[1] for nt in work.norms]
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "probe.json"), "w"), indent=1)
print(json.dumps(out, indent=1))
