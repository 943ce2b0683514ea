"""Host-side costs on the GPU machine: pointer checks of 336 parameters, stream/device switches."""
import operator, time, torch
from torch import nn
dev = torch.device("cuda", 0)
mods = [nn.Linear(16, 16, device=dev) for _ in range(336)]
dicts = [m._parameters for m in mods]; keys = ["weight"] * 336
params = [d[k] for d, k in zip(dicts, keys)]
ptrs = [p.data_ptr() for p in params]
idx = list(range(336))
DP = torch.Tensor.data_ptr
def t(fn, n=2000):
    for _ in range(200): fn()
    s = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - s) / n * 1e6
print("list comp d[k].data_ptr()   %.1f us" % t(lambda: [d[k].data_ptr() for d, k in zip(dicts, keys)]))
print("map(data_ptr, map(getitem)) %.1f us" % t(lambda: list(map(DP, map(operator.getitem, dicts, keys))) == ptrs))
f = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
if f is not None:
    print("C++ _tensors_data_ptrs_at_indices_equal (+map getitem) %.1f us" % t(lambda: f(list(map(operator.getitem, dicts, keys)), ptrs, idx)))
    print("C++ only (list given) %.1f us" % t(lambda: f(params, ptrs, idx)))
print("map getitem only %.1f us" % t(lambda: list(map(operator.getitem, dicts, keys))))
print("with torch.cuda.device(dev) %.2f us" % t(lambda: torch.cuda.device(dev).__enter__() or None))
def ctx():
    with torch.cuda.device(dev):
        pass
print("with torch.cuda.device(dev): pass  %.2f us" % t(ctx))
side = torch.cuda.Stream(dev)
print("current_stream(dev) %.2f us" % t(lambda: torch.cuda.current_stream(dev)))
cur = torch.cuda.current_stream(dev)
print("side.wait_stream(cur) %.2f us" % t(lambda: side.wait_stream(cur)))
def sw():
    with torch.cuda.stream(side):
        pass
print("with torch.cuda.stream(side) %.2f us" % t(sw))
torch.cuda.synchronize()
