"""Where PeriodicUnloader.step's time goes on the SmolLM2-135M shape (210 layers): phases and cProfile."""
import cProfile, pstats, sys, time, io
import torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import bench_unload
import plora
from plora.optim import reset_adapter_state

for mode in ("direct", "stochastic"):
    m = bench_unload.build("smollm2-135m", "cuda")
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    un = plora.PeriodicUnloader(m, opt, plora.PLoRAConfig(unload_every=1, merge_precision=mode))
    for _ in range(5):
        bench_unload.randomise_b(m); torch.cuda.synchronize(); un.step(); torch.cuda.synchronize()
    rows = []
    for _ in range(20):
        bench_unload.randomise_b(m); torch.cuda.synchronize()
        t0 = time.perf_counter(); un.step(); t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
        rows.append((t1 - t0, t2 - t0))
    rows.sort(key=lambda r: r[1])
    print(mode, "unloader.step host ms (median)", round(rows[10][0] * 1e3, 3), "wall ms", round(rows[10][1] * 1e3, 3))
    reset = []
    for _ in range(20):
        torch.cuda.synchronize(); t0 = time.perf_counter(); reset_adapter_state(opt, params, "reset"); torch.cuda.synchronize()
        reset.append(time.perf_counter() - t0)
    print(mode, "reset_adapter_state ms", round(sorted(reset)[10] * 1e3, 3))
    kept = []
    for _ in range(20):
        torch.cuda.synchronize(); t0 = time.perf_counter(); un._reset_state("reset"); torch.cuda.synchronize()
        kept.append(time.perf_counter() - t0)
    print(mode, "AdapterStateReset ms", round(sorted(kept)[10] * 1e3, 3))
    pr = cProfile.Profile()
    for _ in range(10):
        bench_unload.randomise_b(m); torch.cuda.synchronize()
        pr.enable(); un.step(); torch.cuda.synchronize(); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18); print(s.getvalue()[-5000:])
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumtime").print_stats(25); print(s.getvalue()[-5000:])
    del m, opt, un
