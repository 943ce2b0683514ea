"""Host time per launch (GPU only): a torch op, a triton launch through its JIT path and through the
compiled kernel, the unload plan's norm and grouped-update launches (the pipelined Gluon kernel's
among them), and the same sequences replayed as CUDA graphs. Each figure is the host time of one
call in µs: the median of 5 loops of ``n`` calls between syncs.

    python benchmarks/launch_costs.py > launch_costs.txt

The numbers in docs/results/performance.md come from a first form of this script run on the code
of ``a866d4b``, before the plan replayed its own graphs, and from this script on ``26d153b``; the
plan's graphs are switched off here, so that it measures the same eager launches on later code.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_unload  # noqa: E402

from plora.layers import adapted_layers  # noqa: E402
from plora.unload import unload_  # noqa: E402
from plora.unload_plan import UnloadPlan, _pointers  # noqa: E402


def per_call(f, n: int = 200) -> float:
    for _ in range(10):
        f()
    torch.cuda.synchronize()
    out = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            f()
        out.append((time.perf_counter() - start) / n * 1e6)
        torch.cuda.synchronize()
    return round(statistics.median(out), 1)


def single_launches() -> None:
    from triton.runtime import driver

    from plora import kernels

    x = torch.zeros(1024, device="cuda")
    print("torch add_ (1 launch)", per_call(lambda: x.add_(1)))
    print("torch zeros(2x2x16x16)", per_call(lambda: torch.zeros(2, 2, 16, 16, device="cuda")))
    A = [torch.empty(16, 4096, device="cuda") for _ in range(4)]
    ptrs = torch.tensor([a.data_ptr() for a in A], dtype=torch.int64, device="cuda")
    keys = torch.arange(4, dtype=torch.int64, device="cuda")
    fp32 = kernels._TL_DTYPE[torch.float32]
    args = (ptrs, keys, A[0].numel(), 0.01)
    print("triton kaiming_fill_ JIT", per_call(lambda: kernels.kaiming_fill_(*args, torch.float32)))
    # the compiled kernel takes every parameter positionally, constexprs included (in the signature's
    # order): as kaiming_fill_ launches it ungated, the gate's slot holds a placeholder pointer
    const = dict(DTYPE=fp32, BLOCK=1024, GATE=ptrs, GATED=False, ZERO=False)
    params = (*args, *const.values())
    compiled = kernels.kaiming_fill[(64, 4)](*args, num_warps=4, **const)
    runner = compiled[(64, 4, 1)]
    print("triton kaiming_fill compiled[grid]", per_call(lambda: runner(*params)))
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    print("driver get_current_stream", per_call(lambda: driver.active.get_current_stream(device)))
    meta = compiled.launch_metadata((64, 4, 1), stream, *params)
    print("compiled.run raw", per_call(lambda: compiled.run(64, 4, 1, stream, compiled.function,
                                                            compiled.packed_metadata, meta, None, None,
                                                            *params)))


def plan_launches(shape: str) -> None:
    from plora import kernels

    model = bench_unload.build(shape, "cuda")
    layers = adapted_layers(model)
    plan = UnloadPlan(layers)
    for i in range(2):
        unload_(model, merge_precision="direct", layers=layers, plan=plan, unload_index=i)
    print(shape, "plan.update_norms_ (gate fill, zeros + 2 launches)", per_call(plan.update_norms_, 50))
    print(shape, "plan._factor_pointers", per_call(lambda: _pointers(plan._factor_slots), 50))  # the factors' pointers
    print(shape, "plan.refresh", per_call(lambda: plan.refresh("direct", 1.0, None), 50))
    print(shape, "plan.nonfinite (sync)", per_call(plan.nonfinite, 50))
    g = plan._devices[0].updates[0]
    group = (g.ptrs, g.alphas, None, g.stats, g.shape, g.strides, g.factor_dtype, "direct", False)
    print(shape, "grouped_update_ one group (stats pass + update)",
          per_call(lambda: kernels.grouped_update_(*group, sample_rows=64), 20))
    print(shape, "grouped_update_ one group, no stats (1 gluon launch)",
          per_call(lambda: kernels.grouped_update_(*group, has_stats=False), 20))
    print(shape, "update_fused_ all groups", per_call(lambda: plan.update_fused_(0, 5, 64, norms=False), 20))
    updates = graph_of(lambda: plan.update_fused_(0, 5, 64, norms=False))
    print(shape, "CUDA graph replay of update_fused_", per_call(updates.replay, 20))
    print(shape, "CUDA graph replay of update_norms_", per_call(graph_of(plan.update_norms_).replay, 50))


def graph_of(fn) -> torch.cuda.CUDAGraph:
    """``fn``'s launches captured as a CUDA graph, after two warm-up runs on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def main() -> int:
    if not torch.cuda.is_available():
        print("launch_costs.py needs a CUDA device", file=sys.stderr)
        return 1
    from plora import cuda_graphs

    cuda_graphs.ENABLED = False  # the plan's own CUDA graphs off: every launch above is eager
    single_launches()
    plan_launches("llama-3.2-1b")
    return 0


if __name__ == "__main__":
    sys.exit(main())
