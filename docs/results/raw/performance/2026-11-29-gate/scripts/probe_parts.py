"""Probe (device only, from the project root): the host's cost of each part of a kept plan's check,
the GPU span of each of its launch sequences and of kernel options, on the 1B shape.

    python .../scripts/probe_parts.py norms   # on 59f78ca (head_probe/): the norm kernel's options, partial Gram matrices
    python .../scripts/probe_parts.py gate    # on 78e9438 (gate/): the cheap gate's options instead
"""
import functools, json, os, statistics, sys, time, operator
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_common import graph_of, kept_plan, span
from plora import kernels, unload_plan as up
import triton, triton.language as tl

variants = sys.argv[1] if len(sys.argv) > 1 else "norms"
assert variants in ("norms", "gate"), variants
ahead_kw = {"exact": False} if variants == "gate" else {}  # 78e9438's device-checked launch
out = {}
model, plan = kept_plan("direct", redraw=True)
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
# ("ahead", 64), on 78e9438 ("ahead", 64, False); ("updates", 64, True) and ("updates", 64, True, True)
ahead_g = next(entry for key, entry in ents.items() if key[0] == "ahead")[0]
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
h["launch_ahead_call"] = host_us(lambda: plan.launch_ahead_(plan._key[0], (0, 0, 64), **ahead_kw), n=50)
torch.cuda.synchronize()
out["host_us_min_median"] = h

span30 = functools.partial(span, n=30)  # as these probes ran
g_sp = {}
g_sp["ahead_graph"] = span30(ahead_g.replay)
g_sp["updates_graph"] = span30(upd_g.replay)
g_sp["ahead_then_updates"] = span30(lambda: (ahead_g.replay(), upd_g.replay()))
seed_tables = plan._seed_keys(0, 0)
def stats_only():
    work.stats.zero_()
    up._branches(up._group_launches(work, seed_tables[0][0], 64, "stats", {}), d)
g_sp["stats_only"] = span30(graph_of(stats_only).replay)
def norms_variant(**kw):
    def fn():
        work.gate.fill_(1)
        for nt in work.norms:
            kernels.update_norms_(nt, work.stats, gate=work.gate, zero_sums=False, **kw)
    return fn
g_sp["norms_default"] = span30(graph_of(norms_variant()).replay)
if variants == "norms":
    for programs in (1024, 2048, 8192, 16384):
        g_sp[f"norms_programs{programs}"] = span30(graph_of(norms_variant(programs=programs)).replay)
    for chunk in (64, 128):
        g_sp[f"norms_chunk{chunk}"] = span30(graph_of(norms_variant(chunk=chunk)).replay)
        g_sp[f"norms_chunk{chunk}_p1024"] = span30(graph_of(norms_variant(chunk=chunk, programs=1024)).replay)
    g_sp["norms_tf32"] = span30(graph_of(norms_variant(precision="tf32")).replay)
    g_sp["norms_warps4"] = span30(graph_of(norms_variant(warps=4)).replay)


# partial sums instead of atomics
gram_block = kernels.gram_block

@triton.jit
def grams_parts(TABLE, PARTS, FACTOR_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
                KPAD: tl.constexpr, PRECISION: tl.constexpr):
    g = tl.program_id(0); s = tl.program_id(1); G = tl.num_programs(0); S = tl.num_programs(1)
    L = tl.load(TABLE + g).to(tl.pointer_type(FACTOR_DTYPE))
    R = tl.load(TABLE + G + g).to(tl.pointer_type(FACTOR_DTYPE))
    M = tl.load(TABLE + 2 * G + g).to(tl.int32)
    N = tl.load(TABLE + 3 * G + g).to(tl.int32)
    K = tl.load(TABLE + 4 * G + g).to(tl.int32)
    stride_lm = tl.load(TABLE + 5 * G + g).to(tl.int32)
    stride_lk = tl.load(TABLE + 6 * G + g).to(tl.int32)
    stride_rk = tl.load(TABLE + 7 * G + g).to(tl.int32)
    stride_rn = tl.load(TABLE + 8 * G + g).to(tl.int32)
    out = PARTS + (g * S + s) * (2 * KPAD * KPAD)
    for a0 in range(0, KPAD, BLOCK_K):
        ka = a0 + tl.arange(0, BLOCK_K)
        for b0 in range(0, KPAD, BLOCK_K):
            kb = b0 + tl.arange(0, BLOCK_K)
            gl = gram_block(L, M, stride_lm, stride_lk, K, ka, kb, s * CHUNK, S * CHUNK, CHUNK, BLOCK_K, PRECISION)
            gr = gram_block(R, N, stride_rn, stride_rk, K, ka, kb, s * CHUNK, S * CHUNK, CHUNK, BLOCK_K, PRECISION)
            offs = ka[:, None] * KPAD + kb[None, :]
            tl.store(out + offs, gl)
            tl.store(out + KPAD * KPAD + offs, gr)

@triton.jit
def parts_norms(PARTS, TABLE, ALPHAS, STATS, GATE, S, KPAD: tl.constexpr, SB: tl.constexpr):
    g = tl.program_id(0)
    row = tl.load(TABLE + 9 * tl.num_programs(0) + g)
    e = tl.arange(0, KPAD * KPAD)
    accl = tl.zeros((SB, KPAD * KPAD), dtype=tl.float32)
    accr = tl.zeros((SB, KPAD * KPAD), dtype=tl.float32)
    base = PARTS + g * S * (2 * KPAD * KPAD)
    for s0 in range(0, S, SB):
        s = s0 + tl.arange(0, SB)
        m = (s < S)[:, None]
        p = base + s[:, None] * (2 * KPAD * KPAD) + e[None, :]
        accl += tl.load(p, mask=m, other=0.0)
        accr += tl.load(p + KPAD * KPAD, mask=m, other=0.0)
    total = tl.sum(tl.sum(accl, 0) * tl.sum(accr, 0), 0)
    alpha = tl.load(ALPHAS + g)
    norm2 = alpha * alpha * total
    tl.store(STATS + 3 * row, norm2)
    tl.store(GATE, tl.full([], 0, tl.uint8), mask=(norm2 != norm2) | (tl.abs(norm2) == float("inf")))

if variants == "norms":
    def parts_variant(programs=4096, chunk=32, warps=2, sb=8, precision="tf32x3"):
        nts = work.norms
        bufs = []
        for nt in nts:
            G = nt.table.shape[1]
            S = max(1, min(-(-nt.longest // chunk), -(-programs // G)))
            bufs.append((S, torch.empty(G * S * 2 * nt.kpad * nt.kpad, dtype=torch.float32, device=d)))
        def fn():
            work.gate.fill_(1)
            for nt, (S, parts) in zip(nts, bufs):
                G = nt.table.shape[1]
                grams_parts[(G, S)](nt.table, parts, FACTOR_DTYPE=kernels._TL_DTYPE[nt.factor_dtype], BLOCK_K=16,
                                    CHUNK=chunk, KPAD=nt.kpad, PRECISION=precision, num_warps=warps)
                parts_norms[(G,)](parts, nt.table, nt.alphas, work.stats, work.gate, S, KPAD=nt.kpad, SB=sb, num_warps=4)
        return fn
    # correctness against the default
    norms_variant()(); torch.cuda.synchronize(); ref = work.stats[:, 0].clone()
    parts_variant()(); torch.cuda.synchronize(); got = work.stats[:, 0].clone()
    out["parts_max_rel_err"] = float(((got - ref).abs() / ref.abs().clamp_min(1e-30)).max())
    for programs in (1024, 2048, 4096, 8192):
        g_sp[f"parts_programs{programs}"] = span30(graph_of(parts_variant(programs=programs)).replay)
    g_sp["parts_p4096_chunk64"] = span30(graph_of(parts_variant(chunk=64)).replay)
    g_sp["parts_p2048_chunk64"] = span30(graph_of(parts_variant(programs=2048, chunk=64)).replay)
    g_sp["parts_p4096_tf32"] = span30(graph_of(parts_variant(precision="tf32")).replay)
    g_sp["parts_p4096_sb16"] = span30(graph_of(parts_variant(sb=16)).replay)
else:
    def gate_variant(**kw):
        def fn():
            work.gate.fill_(1)
            for nt in work.norms:
                kernels.factor_gate_(nt, work.gate, **kw)
        return fn
    g_sp["gate_default"] = span30(graph_of(gate_variant()).replay)
    for programs in (512, 1024, 4096):
        g_sp[f"gate_programs{programs}"] = span30(graph_of(gate_variant(programs=programs)).replay)
    for chunk in (16, 32, 128):
        g_sp[f"gate_chunk{chunk}"] = span30(graph_of(gate_variant(chunk=chunk)).replay)
    g_sp["gate_warps2"] = span30(graph_of(gate_variant(warps=2)).replay)
    g_sp["gate_warps8"] = span30(graph_of(gate_variant(warps=8)).replay)
    def ahead_variant(**kw):
        def fn():
            work.stats.zero_()
            work.gate.fill_(1)
            up._branches([gate_variant(**kw)] + up._group_launches(work, seed_tables[0][0], 64, "stats", {}), d)
        return fn
    g_sp["ahead_gate_default"] = span30(graph_of(ahead_variant()).replay)
    g_sp["ahead_gate_p512"] = span30(graph_of(ahead_variant(programs=512)).replay)
    g_sp["ahead_gate_p1024"] = span30(graph_of(ahead_variant(programs=1024)).replay)
g_sp["sleep_only"] = span30(lambda: None)
out["gpu_span_us_min_median"] = g_sp
out["factor_dtypes"] = [str(nt.factor_dtype) for nt in work.norms]
out["G"] = [nt.table.shape[1] for nt in work.norms]
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "probe.json"), "w"), indent=1)
print(json.dumps(out, indent=1))
