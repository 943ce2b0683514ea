"""Probe (device only, from the project root): the GPU span of the work in front of the updates
(the norms beside the sampled statistics, as launch_ahead_ launches them) with other options of
the norm kernel or other tilings of the statistics passes, on the 1B shape.

    python .../scripts/probe_ahead.py options direct   # options/ (probe3_direct.json; and stochastic)
    python .../scripts/probe_ahead.py warps direct     # warps/ (probe4_direct.json): warps and rows per step
"""
import functools, json, os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_common import graph_of, kept_plan, span
from plora import kernels, unload_plan as up

variants = sys.argv[1] if len(sys.argv) > 1 else "options"
assert variants in ("options", "warps"), variants
mode = sys.argv[2] if len(sys.argv) > 2 else "direct"
model, plan = kept_plan(mode)
work = plan._devices[0]
d = work.device
tables = plan._seed_keys(0, 0)[0][0]
out = {"groups": [(g.shape, g.mode) for g in work.updates]}

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

span40 = functools.partial(span, n=40)  # as these probes ran
res = {}
def record(label, norm_kw, stats_kw):
    r = {"ahead": span40(graph_of(ahead(norm_kw, stats_kw)).replay)}
    if not stats_kw:
        r["norms alone"] = span40(graph_of(ahead(norm_kw, stats_kw, stats=False)).replay)
    if not norm_kw:
        r["stats alone"] = span40(graph_of(ahead(norm_kw, stats_kw, norms=False)).replay)
    res[label] = r
    print(label, r, flush=True)

record("default", {}, {})
if variants == "options":
    for p in (1024, 2048, 8192):
        record(f"norms programs {p}", dict(programs=p), {})
    record("norms tf32", dict(precision="tf32"), {})
    for tile in ((32, 64, 4), (64, 64, 4), (32, 128, 4), (16, 128, 4), (64, 128, 8), (32, 256, 4)):
        record(f"stats tile {tile}", {}, dict(tile=tile))
    record("norms programs 2048, stats tile (32, 128, 4)", dict(programs=2048), dict(tile=(32, 128, 4)))
else:
    for p, c, w in ((4096, 16, 1), (8192, 16, 1), (16384, 16, 1), (2048, 16, 1), (4096, 32, 1), (8192, 32, 1), (8192, 16, 2)):
        record(f"norms programs {p} chunk {c} warps {w}", dict(programs=p, chunk=c, warps=w), {})
record("default again", {}, {})
out["spans_us_min_median"] = res
out["default_tiles"] = [kernels._block_sizes(g.shape[1]) for g in work.updates]
out["steps"] = [kernels.stats_step(g.shape[0], g.shape[1], 64) for g in work.updates]
print(out["default_tiles"], out["steps"])
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), f"probe{3 if variants == 'options' else 4}_{mode}.json"), "w"), indent=1)
