"""Probe (device only): the GPU span of ahead + updates, exact norms in front (old design) against
deferred beside the updates with fewer or more programs."""
import functools, json, os, statistics, sys
import torch
sys.path.insert(0, "benchmarks")
import bench_unload
import plora
from plora import kernels
from plora.layers import adapted_layers
from plora.unload_plan import UnloadPlan

mode = sys.argv[1] if len(sys.argv) > 1 else "direct"
model = bench_unload.build("llama-3.2-1b", "cuda")
plan = UnloadPlan(adapted_layers(model))
for i in range(4):
    plora.unload_(model, 1.0, merge_precision=mode, residuals={}, plan=plan, unload_index=i, landed_sample_rows=64)
torch.cuda.synchronize()
orig = kernels.update_norms_

def span(fn, n=40):
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        torch.cuda._sleep(200000)
        e0.record(); fn(); e1.record(); e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3)
    return round(min(ts), 1), round(statistics.median(ts), 1)

def both(exact):
    plan.launch_ahead_(plan._key[0], (0, 0, 64), exact=exact)
    plan.update_fused_(0, 0, 64, norms=False, reinit=True)

res = {}
for label, exact, kw in [("old: exact norms ahead", True, {}), ("deferred, programs 4096", False, {}),
                         ("deferred, programs 1024", False, dict(programs=1024)),
                         ("deferred, programs 512", False, dict(programs=512)),
                         ("deferred, programs 256", False, dict(programs=256)),
                         ("deferred, programs 128", False, dict(programs=128)),
                         ("deferred, programs 512 chunk 64", False, dict(programs=512, chunk=64)),
                         ("old again", True, {})]:
    kernels.update_norms_ = functools.partial(orig, **kw) if kw else orig
    plan._graphs.clear()
    for _ in range(3):
        both(exact)
    torch.cuda.synchronize()
    ents = plan._graphs._entries
    a = ents[("ahead", 64, exact)][0]
    u = ents[("updates", 64, True, not exact)][0]
    res[label] = {"ahead+updates": span(lambda: (a.replay(), u.replay())), "updates": span(u.replay),
                  "ahead": span(a.replay)}
    print(label, res[label], flush=True)
kernels.update_norms_ = orig
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), f"probe2_{mode}.json"), "w"), indent=1)
