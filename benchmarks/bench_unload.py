"""Benchmark: plora's unload against the naive ReLoRA merge and the device's copy bandwidth.

The linear layers of a Llama-2-7B-shaped and a Llama-3.2-1B-shaped model (bf16, random weights;
``--models`` also takes ``smollm2-135m``, see ``SHAPES``) get PEFT LoRA r=16 on every linear
layer. Timed, each as the median of several repetitions after a warm-up, in one run on one device:

- ``copy``: ``dst.copy_(src)`` of a large buffer, the roofline (bytes = read + write).
- ``plora <mode>``: ``plora.unload_`` with its default configuration (landed-share sampling of
  64 rows per layer included, as in training), per ``merge_precision`` direct / compensated /
  stochastic, reusing one ``UnloadPlan`` as ``PeriodicUnloader`` does. Its ``host us/layer`` is
  the time the host takes to enqueue the unload (``plora.unload._enqueue_unload``: everything up to
  the final statistics sync; the finiteness check's sync included where the plan checks on the
  host, which a device-checked plan does only for a non-finite adapter) divided by the number of
  layers: the overhead the grouped launches are there to keep small.
- ``update only <mode>``: just the weight updates of those unloads (``addmm_`` for direct, the
  grouped launches of the plan for all three modes, with their statistics on the same 64 sampled
  rows per layer and the norm kernels, launched one by one like their probes): what an unload
  cannot avoid. Probes of where the grouped kernels' time goes (GPU only): the same launches with
  one launch option changed (``--probes``: by default the statistics summed over every row, as
  ``landed_sample_rows=0``; no statistics; the triton ``update_tile`` instead of the pipelined
  Gluon kernel; others: the triton kernel's register cap and layout options, see ``PROBES``) and
  with other tilings of the triton kernel (``--tiles``);
  and ``norms only``: the exact ``update_norm`` (``UnloadPlan.update_norms_``) alone, also with
  other options (``--norm-variants``). ``bench_update_kernels.py`` compares the update
  kernels themselves.
- ``plora <mode>, GPU work only``: the same unload's launch sequences replayed back to back without
  any of its host work (pointer checks, seeds, the statistics read; ``gpu_work_only``): the floor
  of its bandwidth share, what it would reach if its host cost nothing (GPU only).
- ``plora <mode>, behind queued GPU work``: the same unload, up to its final read of the
  statistics (``_enqueue_unload``), enqueued behind a few ms of matmuls, as a training loop
  enqueues it behind the optimizer step (the host runs ahead of the GPU), timed by CUDA events
  from the end of the matmuls to the end of the unload's work: its cost on the GPU's timeline in
  training, its host work hidden where the queue outlasts it (GPU only).
- ``plora <mode>, no CUDA graphs``: the same unload with its launch sequences launched one by one
  instead of replayed as CUDA graphs (``plora.cuda_graphs``; GPU only).
- ``plora <mode>, torch path``: the unload with the Triton kernels switched off (GPU only).
- ``naive merge``: what axolotl's ReLoRA does per layer, ``W += B @ A * scaling`` then A
  re-initialised (kaiming) and B zeroed.
- under each table, ``optimizer reset``: the reset of an AdamW state of the adapter by one kept
  ``plora.optim.AdapterStateReset`` (what ``PeriodicUnloader`` runs after each unload; the runs recorded before
  ``82e2190`` timed ``reset_adapter_state``, which walks the state anew), synchronised and host only.

Bytes that must move per weight element: 4 (W read + written) for direct and stochastic, 8 for
compensated (the bf16 residual read + written too). Effective bandwidth = those bytes / time.
Peak memory growth is ``max_memory_allocated`` during one unload minus what was allocated before
it (the compensated residual buffers, +2 bytes per weight element, exist from the first unload
on and are reported apart), against the size of the largest single weight.

    python benchmarks/bench_unload.py --json unload.json           # GPU (its time: benchmarks/README.md)
    python benchmarks/bench_unload.py --small --device cpu         # smoke check on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling kernel_resources

import plora  # noqa: E402
from plora.layers import adapted_layers  # noqa: E402
from plora.optim import AdapterStateReset  # noqa: E402
from plora.unload import UnloadPlan, _enqueue_unload  # noqa: E402
from plora.unload_plan import fused_ok  # noqa: E402
from kernel_resources import norm_variants_argument, tiles_argument  # noqa: E402

MODES = ("direct", "compensated", "stochastic")
BYTES_PER_ELEMENT = {"direct": 4, "compensated": 8, "stochastic": 4}
TARGET_COPY_SHARE = 0.80
TARGET_SPEEDUP = 2.0
RANK = 16

_PLAIN = {"load_first": False, "cols_first": False, "streaming": False}
# --probes: name -> (row label, keyword options of kernels.grouped_update_); each times the plan's update
# launches with one thing changed (the bits of W never change)
PROBES = {
    "every-row": ("statistics on every row", {"sample_rows": 0}),
    "no-stats": ("no statistics", {"has_stats": False}),
    "triton-update": ("triton update_tile, not the pipelined kernel", {"pipelined": False}),
    # the triton kernel's own options (grouped_update_ takes the triton kernel when one is given)
    "128-registers": ("triton kernel, at most 128 registers", {"max_registers": 128}),
    # its update pass's layout (kernels.UPDATE_LAYOUT holds each mode's default), each probe absolute
    "plain-layout": ("triton kernel, rows first, no hints, W loaded after the factors", dict(_PLAIN)),
    "load-first": ("triton kernel, W loaded before the factors", dict(_PLAIN, load_first=True)),
    "cols-first": ("triton kernel, grid sweeps columns first", dict(_PLAIN, cols_first=True)),
    "streaming": ("triton kernel, streaming cache hints", dict(_PLAIN, streaming=True)),
    "combined": ("triton kernel, W loaded first, columns first, streaming",
                 {"load_first": True, "cols_first": True, "streaming": True}),
    "combined-no-stats": ("triton kernel, W loaded first, columns first, streaming, no statistics",
                          {"load_first": True, "cols_first": True, "streaming": True, "has_stats": False}),
}
DEFAULT_PROBES = "every-row,no-stats,triton-update"


def probes_argument(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown probe(s) {', '.join(unknown)}; choose from {', '.join(PROBES)}")
    return names


# name: (hidden, intermediate, layers, kv width): q/o hidden x hidden, k/v kv x hidden,
# gate/up intermediate x hidden, down hidden x intermediate (out x in, as nn.Linear stores them)
SHAPES = {
    "llama-2-7b": (4096, 11008, 32, 4096),
    "llama-3.2-1b": (2048, 8192, 16, 512),  # grouped-query attention: 8 KV heads of 64
    "smollm2-135m": (576, 1536, 30, 192),  # 210 small layers: the host's share of the unload
    "tiny": (64, 160, 2, 32),
}


class Block(nn.Module):
    """The seven linear layers of one Llama decoder layer (no attention or norms: not needed here)."""

    def __init__(self, hidden, intermediate, kv, device, dtype):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden, hidden, **kw)
        self.k_proj = nn.Linear(hidden, kv, **kw)
        self.v_proj = nn.Linear(hidden, kv, **kw)
        self.o_proj = nn.Linear(hidden, hidden, **kw)
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)


class LinearStack(nn.Module):
    def __init__(self, hidden, intermediate, layers, kv, device, dtype=torch.bfloat16):
        super().__init__()
        self.layers = nn.ModuleList(Block(hidden, intermediate, kv, device, dtype) for _ in range(layers))


def build(shape, device):
    """The PEFT LoRA model (r=16, alpha=32, every linear layer) on ``device``, with B non-zero."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    hidden, intermediate, layers, kv = SHAPES[shape]
    base = LinearStack(hidden, intermediate, layers, kv, device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=targets))
    randomise_b(model)
    return model


@torch.no_grad()
def randomise_b(model, std=1e-3):
    """A trained-looking adapter: B non-zero (PEFT starts it at zero; unloads zero it again)."""
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0.0, std)


class Clock:
    """Wall time around a synchronised call; peak-memory growth on CUDA."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, fn, prepare=None, reps=5, warmup=1):
        """(median seconds, all seconds, peak growth in bytes or None) of ``fn`` over ``reps`` runs."""
        for _ in range(warmup):
            if prepare:
                prepare()
            fn()
        times, growth = [], []
        for _ in range(reps):
            if prepare:
                prepare()
            self.sync()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
            if self.cuda:
                growth.append(torch.cuda.max_memory_allocated() - before)
        return statistics.median(times), times, (max(growth) if growth else None)

    def host(self, fn, prepare=None, reps=5, warmup=1):
        """Median seconds until ``fn`` returns, the device idle before: the host's share of its work."""
        for _ in range(warmup):
            if prepare:
                prepare()
            fn()
        times = []
        for _ in range(reps):
            if prepare:
                prepare()
            self.sync()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            self.sync()
        return statistics.median(times)


def behind_queued_work(enqueue, device, prepare, reps, warmup):
    """(median seconds, every run's seconds) of an unload's GPU work when its host enqueues it behind
    queued GPU work, as a training loop does (the host runs ahead of the optimizer step it has just
    launched, so an unload's host work overlaps that step's tail): a few ms of matmuls first, then
    ``enqueue`` (``_enqueue_unload``: the whole unload but its final read of the statistics),
    timed by CUDA events from the end of the matmuls to the end of everything it launched (its
    re-init included). CUDA only. Where the unload's host work outlasts nothing, this is its GPU
    time. (In training ``unload_`` then reads its statistics, which empties the queue: the next
    step's launches start from an idle GPU; the training-step benchmark measures that. Up to the
    runs of ``f47cbdc`` this row timed ``unload_`` itself, the end event recorded after that read
    and the host's work after it.)"""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(warmup + reps):
        if prepare:
            prepare()
        torch.cuda.synchronize()
        for _ in range(3):  # about 4 ms on an H200: more than the host takes to enqueue an unload
            a @ a
        start.record()
        enqueue()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    del a
    return statistics.median(times), times


def copy_bandwidth(clock, device, elements):
    src = torch.randn(elements, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    seconds, _, _ = clock.measure(lambda: dst.copy_(src), reps=20, warmup=3)
    nbytes = 2 * src.numel() * src.element_size()
    return nbytes / seconds, seconds, nbytes


def naive_merge(model):
    """axolotl's ReLoRA merge: per layer W += B @ A * scaling, then A kaiming, B zero."""
    with torch.no_grad():
        for layer in adapted_layers(model):
            m, a = layer.module, layer.adapter
            m.base_layer.weight.data += m.lora_B[a].weight @ m.lora_A[a].weight * m.scaling[a]
            nn.init.kaiming_uniform_(m.lora_A[a].weight, a=math.sqrt(5))
            nn.init.zeros_(m.lora_B[a].weight)


def launched_one_by_one(fn):
    """``fn`` with the plan's CUDA graphs off: the ``no CUDA graphs`` rows, and the ``update only``
    and ``norms only`` rows like their probes (which take launch options, never captured)."""
    from plora import cuda_graphs

    def run():
        enabled, cuda_graphs.ENABLED = cuda_graphs.ENABLED, False
        try:
            return fn()
        finally:
            cuda_graphs.ENABLED = enabled

    return run


def gpu_work_only(plan, sample_rows=64):
    """The unload's GPU work with none of its host work: a kept plan's launch sequences (the norms
    that set the gate beside the sampled statistics where a group has a pass of its own, the grouped
    updates with the re-init, in one sequence where the plan allows it),
    replayed back to back as ``unload_`` launches them once the plan is checked, without the
    pointer checks, the seed hashing and the statistics read. What the unload would take if its
    host cost nothing: the floor its bandwidth share can reach (GPU only; the plan must have run
    twice, so that its graphs are captured; one unload index throughout, so the seed tables are
    made once)."""

    def run():
        plan.launch_ahead_(plan._key[0], (0, 0, sample_rows))
        plan.update_fused_(0, 0, sample_rows, norms=False, reinit=plan.reinit_with_updates)
        if not plan.reinit_with_updates:
            plan.reinit_(0, 0)

    return run


def update_only(layers, mode, plan, residuals, sample_rows=64, **launch):
    """The weight updates of one unload alone: addmm_ (direct, plan=None) or the plan's grouped kernels
    with their statistics on ``sample_rows`` rows per layer (``launch``: keyword options of
    ``kernels.grouped_update_``), launched one by one."""
    if plan is not None:
        plan.refresh(mode, 1.0, residuals)
        return launched_one_by_one(lambda: plan.update_fused_(1, 0, sample_rows, **launch))
    work = [(layer.weight.data, *layer.factors(), layer.scaling) for layer in layers]

    def run():
        with torch.no_grad():
            for W, L, R, alpha in work:
                W.addmm_(L.to(W.dtype), R.to(W.dtype), alpha=alpha)

    return run


def norms_only(plan, residuals, **launch):
    """The exact ``update_norm`` of one unload alone (``UnloadPlan.update_norms_``): the part of the
    statistics that sampling does not shrink, which the unload's finiteness check runs."""
    plan.refresh("direct", 1.0, residuals)
    return launched_one_by_one(lambda: plan.update_norms_(**launch))


def optimizer_reset(layers, device, clock, args):
    """(synchronised, host-only) seconds of the unloader's kept reset of an AdamW state of the adapter."""
    params = [t for layer in layers for t in layer.adapter_tensors()]
    opt = torch.optim.AdamW(params, fused=device.startswith("cuda"))
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the state: step, exp_avg, exp_avg_sq per tensor
    for p in params:
        p.grad = None
    kept = AdapterStateReset(opt, params)  # as PeriodicUnloader keeps it: the warm-up builds its grouping
    reset = lambda: kept("reset")  # noqa: E731
    synced, _, _ = clock.measure(reset, None, args.reps, args.warmup)
    host = clock.host(reset, None, args.reps, args.warmup)
    tensors = sum(torch.is_tensor(v) for p in params for v in opt.state[p].values())
    return {"ms": synced * 1e3, "host_us_per_layer": host * 1e6 / len(layers), "state_tensors": tensors}


def bench_model(shape, device, args, clock, copy_bps):
    model = build(shape, device)
    layers = adapted_layers(model)
    elements = sum(layer.weight.numel() for layer in layers)
    largest = max(layer.weight.numel() * layer.weight.element_size() for layer in layers)
    prepare = lambda: randomise_b(model)  # noqa: E731
    fused = fused_ok(layers[0])  # the plan's own test: bf16 CUDA weight, triton importable
    rows, residual_bytes, n_layers = [], 0, len(layers)

    def row(name, mode, seconds, growth, targets=False, reference=None, host=None, probe=False, each=None):
        nbytes = BYTES_PER_ELEMENT[mode] * elements
        r = {
            "variant": name,
            "mode": mode,
            "ms": seconds * 1e3,
            "ms_each": None if each is None else [t * 1e3 for t in each],  # every timed run, in order
            "host_us_per_layer": None if host is None else host * 1e6 / n_layers,
            "bytes": nbytes,
            "GBps": nbytes / seconds / 1e9,
            "copy_share": nbytes / seconds / copy_bps,
            "peak_growth_bytes": growth,
            "largest_layer_bytes": largest,
        }
        if probe:
            r["probe"] = True
        if reference is not None:
            r["speedup_vs_naive"] = reference / seconds
        if targets:
            r["pass"] = {
                "bandwidth": r["copy_share"] >= TARGET_COPY_SHARE,
                "speedup": r.get("speedup_vs_naive", 0.0) >= TARGET_SPEEDUP,
                "memory": None if growth is None else growth <= largest,
            }
        rows.append(r)
        return r

    naive_s, _, naive_growth = clock.measure(lambda: naive_merge(model), prepare, args.reps, args.warmup)

    for mode in MODES:
        residuals: dict = {}
        plan = UnloadPlan(layers)
        counter = iter(range(10**6))

        def unload(mode=mode, residuals=residuals, plan=plan, counter=counter, sample=args.landed_sample_rows):
            plora.unload_(model, 1.0, merge_precision=mode, residuals=residuals, plan=plan,
                          unload_index=next(counter), landed_sample_rows=sample)

        def enqueue(mode=mode, residuals=residuals, plan=plan, counter=counter):
            with torch.no_grad():
                _enqueue_unload(model, 1.0, adapter_name=None, merge_precision=mode, seed=0,
                                unload_index=next(counter), on_nonfinite="raise", residuals=residuals,
                                landed_sample_rows=args.landed_sample_rows, layers=None, plan=plan)

        s, each, growth = clock.measure(unload, prepare, args.reps, args.warmup)
        host = clock.host(enqueue, prepare, args.reps, args.warmup)
        row(f"plora {mode}", mode, s, growth, targets=True, reference=naive_s, host=host, each=each)
        if mode == "compensated":
            residual_bytes = sum(t.numel() * t.element_size() for t in residuals.values())
        if args.landed_rows is not None:
            s, _, growth = clock.measure(
                lambda: unload(sample=args.landed_rows), prepare, args.reps, args.warmup)
            row(f"plora {mode}, landed_sample_rows={args.landed_rows}", mode, s, growth, reference=naive_s)
        if fused:
            import plora.kernels as kernels

            s, each = behind_queued_work(enqueue, device, prepare, args.reps, args.warmup)
            row(f"plora {mode}, behind queued GPU work (as in training; CUDA events)", mode, s, None,
                reference=naive_s, probe=True, each=each)
            if plan.device_checked:  # its check is on the device: the replays are all it launches
                s, each, growth = clock.measure(gpu_work_only(plan, args.landed_sample_rows), prepare, args.reps,
                                                args.warmup)
                row(f"plora {mode}, GPU work only (its graphs replayed, no host work)", mode, s, growth,
                    reference=naive_s, probe=True, each=each)
            s, _, growth = clock.measure(launched_one_by_one(unload), prepare, args.reps, args.warmup)
            row(f"plora {mode}, no CUDA graphs", mode, s, growth, reference=naive_s, probe=True)
            real = kernels.fused_available
            kernels.fused_available = lambda t, **kw: False  # the unload's torch fallback path
            torch_plan = UnloadPlan(layers)  # built in the warm-up, while the kernels are off
            try:
                s, _, growth = clock.measure(lambda p=torch_plan: unload(plan=p), prepare, args.reps, args.warmup)
            finally:
                kernels.fused_available = real
            row(f"plora {mode}, torch path", mode, s, growth, reference=naive_s)
        if mode == "direct":
            s, _, growth = clock.measure(update_only(layers, mode, None, residuals), None, args.reps, args.warmup)
            row("update only direct (addmm_)", mode, s, growth, reference=naive_s)
        if fused:  # the plan's own launches, then the probes (launch options of grouped_update_)
            launches = [("", {})] + [(f", {PROBES[name][0]}", PROBES[name][1]) for name in args.probes]
            launches += [(f", {bm}x{bn} tile, {warps} warps", {"tile": (bm, bn, warps)}) for bm, bn, warps in args.tiles]
            for suffix, launch in launches:
                options = {"sample_rows": args.landed_sample_rows, **launch}
                s, _, growth = clock.measure(update_only(layers, mode, plan, residuals, **options), None,
                                             args.reps, args.warmup)
                row(f"update only {mode} (Triton, grouped{suffix})", mode, s, growth, reference=naive_s,
                    probe=bool(launch))
            if mode == "direct":  # the exact norm of the update alone (same for every mode)
                for launch in [{}] + args.norm_variants:  # {}: the kernel's defaults
                    suffix = "".join(f", {k} {v}" for k, v in launch.items())
                    s, _, growth = clock.measure(norms_only(plan, residuals, **launch), None, args.reps, args.warmup)
                    row(f"norms only (Triton, factor Grams{suffix})", mode, s, growth, reference=naive_s, probe=True)
        del residuals, plan

    row("naive merge (ReLoRA)", "direct", naive_s, naive_growth, reference=naive_s)
    reset = optimizer_reset(layers, device, clock, args)
    del model, layers
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "shape": dict(zip(("hidden", "intermediate", "layers", "kv"), SHAPES[shape])),
        "adapted_layers": n_layers,
        "weight_elements": elements,
        "largest_layer_bytes": largest,
        "compensated_residual_bytes": residual_bytes,
        "rows": rows,
        "optimizer_reset": reset,
    }


def markdown(results) -> str:
    out = []
    copy = results["copy"]
    out.append(f"Device: {results['device']}; copy bandwidth {copy['GBps']:.4g} GB/s "
               f"({copy['bytes'] / 1e9:.3g} GB read + written in {copy['ms']:.3g} ms).\n")
    for shape, res in results["models"].items():
        out.append(f"### {shape}: {res['adapted_layers']} adapted layers, "
                   f"{res['weight_elements'] / 1e9:.3g} G weight elements, largest weight "
                   f"{res['largest_layer_bytes'] / 2**20:.3g} MiB; compensated residuals "
                   f"{res['compensated_residual_bytes'] / 2**30:.3g} GiB (persistent)\n")
        out.append("| variant | ms | host us/layer | GB/s | % of copy | vs naive | peak growth MiB | targets |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in res["rows"]:
            growth = "n/a" if r["peak_growth_bytes"] is None else f"{r['peak_growth_bytes'] / 2**20:.1f}"
            verdict = ""
            if "pass" in r:
                p = r["pass"]
                verdict = ", ".join(f"{k} {'n/a' if v is None else 'PASS' if v else 'FAIL'}" for k, v in p.items())
            host = "" if r["host_us_per_layer"] is None else f"{r['host_us_per_layer']:.3g}"
            out.append(f"| {r['variant']} | {r['ms']:.3g} | {host} | {r['GBps']:.4g} | {100 * r['copy_share']:.0f}% | "
                       f"{r.get('speedup_vs_naive', float('nan')):.2f}x | {growth} | {verdict} |")
        update = {r["mode"]: r["ms"] for r in res["rows"]  # the last of addmm_ / grouped: the unload's own
                  if r["variant"].startswith("update only") and not r.get("probe")}
        for r in res["rows"]:
            if r["variant"] in (f"plora {m}" for m in MODES) and r["mode"] in update:
                extra = r["ms"] - update[r["mode"]]
                out.append(f"- {r['variant']}: {extra:.3g} ms beyond its weight updates, "
                           f"{1e3 * extra / res['adapted_layers']:.3g} us per layer")
        reset = res["optimizer_reset"]
        out.append(f"- optimizer reset (AdamW, {reset['state_tensors']} state tensors): {reset['ms']:.3g} ms, "
                   f"host {reset['host_us_per_layer']:.3g} us per layer")
        out.append("")
    out.append(f"Targets: plora unload >= {TARGET_COPY_SHARE:.0%} of copy bandwidth, >= {TARGET_SPEEDUP:g}x "
               "faster than the naive merge, peak growth <= the largest single weight.")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes: a smoke check that runs on a CPU")
    p.add_argument("--models", nargs="+", default=None, choices=sorted(SHAPES), help="shapes to run")
    p.add_argument("--reps", type=int, default=11, help="timed repetitions (median reported)")
    # three: a kept plan's graphs are captured at its second unload (updates, re-init) and third
    # (the norms and statistics it launches ahead, first used at the second)
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (graph captures)")
    p.add_argument("--landed-sample-rows", type=int, default=64, help="plora's default: 64 rows per layer")
    p.add_argument("--landed-rows", type=int, default=None,
                   help="also time the unload with this landed_sample_rows (e.g. 8)")
    p.add_argument("--tiles", type=tiles_argument, default=tiles_argument("32x64x4,16x128x4,32x128x8,64x128x4"),
                   help="other tilings of the grouped kernel to time, ROWSxCOLSxWARPS,... ('' for none)")
    p.add_argument("--probes", type=probes_argument, default=probes_argument(DEFAULT_PROBES),
                   help=f"launch probes of the grouped kernel to time, comma-separated ('' for none; "
                        f"default {DEFAULT_PROBES}): {', '.join(PROBES)}")
    p.add_argument("--norm-variants", type=norm_variants_argument, default=[],
                   help="also time the norm kernels with these options, PROGRAMS:CHUNK:WARPS:PRECISION:STAGES,... "
                        "(e.g. 8192:64:4:ieee:1)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    models = args.models or (["tiny"] if args.small else ["llama-3.2-1b", "llama-2-7b"])
    device = args.device
    clock = Clock(device)

    copy_bps, copy_s, copy_bytes = copy_bandwidth(clock, device, (1 << 16) if args.small else (1 << 29))
    results = {
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "command": shlex.join(["python", "benchmarks/bench_unload.py"] + list(argv if argv is not None else sys.argv[1:])),
        "copy": {"GBps": copy_bps / 1e9, "ms": copy_s * 1e3, "bytes": copy_bytes},
        "rank": RANK,
        "models": {},
    }
    for shape in models:
        start = time.perf_counter()
        results["models"][shape] = bench_model(shape, device, args, clock, copy_bps)
        print(f"[{shape}: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
