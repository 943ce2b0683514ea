"""Probe (device only): the GPU span of ahead + updates, exact norms in front (old design) against
deferred beside the updates with fewer or more programs."""
import functools, json, os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_common import kept_plan, span
from plora import kernels

mode = sys.argv[1] if len(sys.argv) > 1 else "direct"
model, plan = kept_plan(mode)
orig = kernels.update_norms_

span40 = functools.partial(span, n=40)  # as this probe ran

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
    res[label] = {"ahead+updates": span40(lambda: (a.replay(), u.replay())), "updates": span40(u.replay),
                  "ahead": span40(a.replay)}
    print(label, res[label], flush=True)
kernels.update_norms_ = orig
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), f"probe2_{mode}.json"), "w"), indent=1)
