"""What the probes in this folder share (device only, run from the project root): a kept plan of
the 1B-shaped model whose graphs are captured, and the GPU span of some launches."""
import statistics
import sys

import torch

sys.path.insert(0, "benchmarks")
import bench_unload  # noqa: E402
from launch_costs import graph_of  # noqa: E402,F401  (fn's launches captured as a CUDA graph)

import plora  # noqa: E402
from plora.layers import adapted_layers  # noqa: E402
from plora.unload_plan import UnloadPlan  # noqa: E402


def kept_plan(mode: str = "direct", redraw: bool = False):
    """(model, plan) after four unloads of the model's adapter, so that the plan's graphs are
    captured and replayed; ``redraw``: B drawn anew after each (probe_parts.py did)."""
    model = bench_unload.build("llama-3.2-1b", "cuda")
    plan = UnloadPlan(adapted_layers(model))
    for i in range(4):
        plora.unload_(model, 1.0, merge_precision=mode, residuals={}, plan=plan, unload_index=i,
                      landed_sample_rows=64)
        if redraw:
            bench_unload.randomise_b(model)
    torch.cuda.synchronize()
    return model, plan


def span(fn, n: int):
    """(min, median) µs of the GPU work ``fn`` launches, over ``n`` runs, by CUDA events; each run
    enqueued behind about 100 µs of a sleep kernel, so that no launch latency counts."""
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        torch.cuda._sleep(200000)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3)
    return round(min(ts), 1), round(statistics.median(ts), 1)
