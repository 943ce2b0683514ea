"""Where an unload's time goes outside its weight updates: a torch.profiler trace of ``unload_``.

``bench_unload.py`` measures the whole unload and its update kernels; the difference (about 1 ms
on the 7B shape; docs/results/performance.md) is what this script takes apart. It unloads the Llama-shaped linear layers of
``bench_unload`` a few times with a kept ``UnloadPlan`` (as ``PeriodicUnloader`` does), profiles the
last unloads with each phase of ``plora.unload._enqueue_unload`` marked (the weights' pointers;
the update norms and the sampled statistics launched side by side once the weights are checked,
ahead of the plan's refresh; the refresh, the finiteness check with its host sync (where the plan checks on the host: a device-checked plan leaves it to the
kernels' gate), the grouped updates (with the re-init, where the plan runs it there), the re-init
otherwise, the next unload's seeds; the rest is the torch-path layers and the final statistics
sync),
and prints per phase its host time, then for the whole unload its wall time, the time the GPU was
busy (the union of its kernels and copies) and how long the GPU waited before the first update
kernel (``update_pipelined``; where the triton kernel updates, the first ``unload_tile*`` kernel,
which is the statistics pass when the statistics are sampled).
``--host-only`` times the same phases by ``time.perf_counter`` without the profiler, whose own
overhead inflates host times::

    python benchmarks/profile_unload.py --models llama-2-7b --trace trace.json
    python benchmarks/profile_unload.py --models llama-2-7b llama-3.2-1b --host-only --reps 20
    python benchmarks/profile_unload.py --from-trace trace.json.gz   # re-analyse a kept trace
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_unload  # noqa: E402

from plora.layers import adapted_layers  # noqa: E402
from plora.unload import unload_  # noqa: E402
from plora.unload_plan import UnloadPlan  # noqa: E402

# (a phase called from within another, as the weights' pointers from a rebuilding refresh, counts
# toward the outer one only: wrapped_phases times the outermost call)
PHASES = {"_weights_signature": "weights' pointers", "launch_ahead_": "norms and statistics launched ahead",
          "refresh": "refresh",
          "nonfinite": "finiteness check",
          "update_fused_": "grouped updates", "reinit_": "re-init", "scale_b_": "scale B",
          "prepare_keys": "next unload's seeds"}
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # what occupies the GPU in a chrome trace


@contextmanager
def wrapped_phases(plan: UnloadPlan, around):
    """Run each of the plan's phase methods inside ``around(label)`` (a context manager), for this
    block only; a phase method called from within another runs unwrapped, so that no time is
    counted twice."""
    depth = [0]
    for method, label in PHASES.items():
        original = getattr(plan, method)

        def wrapped(*args, _original=original, _label=label, **kwargs):
            if depth[0]:
                return _original(*args, **kwargs)
            depth[0] += 1
            try:
                with around(_label):
                    return _original(*args, **kwargs)
            finally:
                depth[0] -= 1

        setattr(plan, method, wrapped)
    try:
        yield
    finally:
        for method in PHASES:
            delattr(plan, method)  # the instance attribute goes; the class's method shows through


def marked_phases(plan: UnloadPlan):
    """The phases as ``record_function`` ranges of a torch.profiler trace."""
    return wrapped_phases(plan, lambda label: torch.profiler.record_function(f"plora: {label}"))


@contextmanager
def _stopwatch(label: str, sink: dict):
    start = time.perf_counter()
    try:
        yield
    finally:
        sink[label] = sink.get(label, 0.0) + (time.perf_counter() - start) * 1e6


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def analyse(trace: dict) -> dict:
    """Per profiled unload (``plora: unload`` ranges): phase host times, wall, GPU busy, first-kernel wait (µs)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    # host ranges only: with CUDA, each range also appears on the GPU's timeline (gpu_user_annotation)
    host = [e for e in events if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("plora: ")]
    unloads = sorted((e for e in host if e["name"] == "plora: unload"), key=lambda e: e["ts"])
    marks = [e for e in host if e["name"] != "plora: unload"]
    kernels = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") in GPU_WORK]
    rows = []
    for u in unloads:
        start, end = u["ts"], u["ts"] + u["dur"]
        inside = [(s, e, n) for s, e, n in kernels if s < end and e > start]
        phases = {}
        for m in marks:
            if start <= m["ts"] <= end:
                label = m["name"][len("plora: "):]
                phases[label] = phases.get(label, 0.0) + m["dur"]
        updates = ([s for s, _, n in inside if "update_pipelined" in n]
                   or [s for s, _, n in inside if "unload_tile" in n])
        rows.append({
            "wall_us": u["dur"],
            "gpu_busy_us": union_length([(max(s, start), min(e, end)) for s, e, _ in inside]),
            "kernels": len(inside),
            "first_update_kernel_after_us": (min(updates) - start) if updates else None,
            "phases_host_us": phases,
            "kernel_us_by_name": _by_name(inside),
        })
    return {"unloads": rows}


def _by_name(kernels) -> dict[str, float]:
    out: dict[str, float] = {}
    for s, e, n in kernels:
        short = n.split("(")[0][:60]
        out[short] = out.get(short, 0.0) + (e - s)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


class _Unloads:
    """One shape's model, its layers and a kept plan, unloaded as ``PeriodicUnloader`` would; each
    unload gets a freshly drawn B first, as in ``bench_unload`` (an unload leaves it zero), the
    device then idle, so that it merges a trained-looking adapter. (Runs up to ``a0694fd`` unloaded
    B = 0 after the first unload.)"""

    def __init__(self, shape: str, device: str, mode: str):
        self.device, self.mode = device, mode
        self.model = bench_unload.build(shape, device)
        self.layers = adapted_layers(self.model)
        self.plan = UnloadPlan(self.layers)
        self.residuals = {} if mode == "compensated" else None

    def trained_adapter(self) -> None:
        bench_unload.randomise_b(self.model)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def unload(self, i: int) -> None:
        unload_(self.model, merge_precision=self.mode, residuals=self.residuals, layers=self.layers,
                plan=self.plan, unload_index=i)

    def close(self) -> None:
        del self.model, self.layers, self.plan
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def profile_model(shape: str, device: str, mode: str, warmup: int, reps: int, trace_path: str | None) -> dict:
    run = _Unloads(shape, device, mode)

    def one(i):
        run.trained_adapter()
        with torch.profiler.record_function("plora: unload"):
            run.unload(i)

    for i in range(warmup):
        one(i)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with marked_phases(run.plan), torch.profiler.profile(activities=activities) as prof:
        for i in range(reps):
            one(warmup + i)
    with tempfile.TemporaryDirectory() as tmp:
        path = trace_path or os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            result = analyse(json.load(f))
    result.update(shape=shape, mode=mode, layers=len(run.layers))
    run.close()
    return result


def host_times(shape: str, device: str, mode: str, warmup: int, reps: int) -> dict:
    """Each phase's host time, by ``time.perf_counter`` without a profiler (whose own overhead inflates
    host times), and each unload's wall time, over ``reps`` unloads after ``warmup``."""
    run = _Unloads(shape, device, mode)
    for i in range(warmup):
        run.trained_adapter()
        run.unload(i)
    rows = []
    for i in range(reps):
        run.trained_adapter()
        phases: dict = {}
        with wrapped_phases(run.plan, lambda label: _stopwatch(label, phases)):
            start = time.perf_counter()
            run.unload(warmup + i)
            wall = (time.perf_counter() - start) * 1e6  # unload_ ends on its statistics' sync
        rows.append({"wall_us": wall, "phases_host_us": phases})
    count = len(run.layers)
    run.close()
    return {"shape": shape, "mode": mode, "layers": count, "host_only": rows}


def _phases(rows: list[dict]) -> tuple[list[str], list[float], float]:
    """The phases the unloads ran (in ``PHASES``' order), each one's median host time, and the
    median of the rest of the wall time (what no phase covers)."""
    labels = sorted({k for r in rows for k in r["phases_host_us"]}, key=list(PHASES.values()).index)
    medians = [statistics.median(r["phases_host_us"].get(lb, 0.0) for r in rows) for lb in labels]
    rest = statistics.median(r["wall_us"] - sum(r["phases_host_us"].values()) for r in rows)
    return labels, medians, rest


def _table(head: list[str], cells: list[float]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head), "| " + " | ".join(f"{c:.0f}" for c in cells) + " |"]


def report_host(result: dict) -> str:
    rows = result["host_only"]
    labels, medians, rest = _phases(rows)
    return "\n".join([
        f"### {result['shape']}, {result['mode']}: {result['layers']} layers, host time by phase, no profiler, "
        f"{len(rows)} unloads (medians, µs)", "",
        *_table(["wall", *(f"host: {lb}" for lb in labels), "host: the rest (statistics sync included)"],
                [statistics.median(r["wall_us"] for r in rows), *medians, rest]), ""])


def report(result: dict) -> str:
    rows = result["unloads"]

    def med(key):
        values = [r[key] for r in rows if r[key] is not None]
        return statistics.median(values) if values else float("nan")

    labels, medians, rest = _phases(rows)
    return "\n".join([
        f"### {result['shape']}, {result['mode']}: {result['layers']} layers, {len(rows)} profiled unloads "
        "(medians, µs)", "",
        *_table(["wall", "GPU busy", "GPU idle", "kernels", "first update kernel after",
                 *(f"host: {lb}" for lb in labels), "host: the rest (torch-path layers, statistics sync)"],
                [med("wall_us"), med("gpu_busy_us"), med("wall_us") - med("gpu_busy_us"), med("kernels"),
                 med("first_update_kernel_after_us"), *medians, rest]),
        "", "GPU time by kernel (last unload, µs): " + ", ".join(
            f"{name} {us:.0f}" for name, us in list(rows[-1]["kernel_us_by_name"].items())[:8]), ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["llama-2-7b"], choices=sorted(bench_unload.SHAPES))
    p.add_argument("--modes", nargs="+", default=["direct", "compensated"], choices=bench_unload.MODES)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--trace", help="also write the chrome trace of the last profile here")
    p.add_argument("--host-only", action="store_true",
                   help="no profiler: each phase's host time by perf_counter (over --reps unloads)")
    p.add_argument("--json", help="write the analysis here")
    p.add_argument("--from-trace", metavar="TRACE",
                   help="only analyse this chrome trace (.json or .json.gz) of an earlier run, print it as JSON")
    args = p.parse_args(argv)
    if args.from_trace:
        opener = gzip.open if args.from_trace.endswith(".gz") else open
        try:
            with opener(args.from_trace, "rt") as f:
                trace = json.load(f)
        except (OSError, ValueError) as e:
            p.error(f"--from-trace {args.from_trace}: not a readable chrome trace ({e})")
        print(json.dumps(analyse(trace), indent=1))
        return 0
    if args.warmup < 1 or args.reps < 1:
        p.error("--warmup and --reps must be at least 1")
    results = []
    for shape in args.models:
        for mode in args.modes:
            if args.host_only:
                results.append(host_times(shape, args.device, mode, args.warmup, args.reps))
                print(report_host(results[-1]), flush=True)
            else:
                results.append(profile_model(shape, args.device, mode, args.warmup, args.reps, args.trace))
                print(report(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
