"""Benchmark: training-step time and peak memory of full fine-tuning, LoRA and PLoRA.

One Llama-shaped model (by default about 1.0 B parameters, random init: hidden 2048, 16 layers,
32 attention heads and 32 KV heads, intermediate 5632, vocab 32000; bf16 weights, SDPA attention,
no gradient checkpointing), or a real one with ``--model DIR``. Every variant is built fresh from
the same seed and trains on the same random tokens:

- ``full``: every weight trainable, AdamW.
- ``lora``: PEFT LoRA r=16 (alpha 32) on every linear layer of the decoder, AdamW on the adapter.
- ``plora <mode>``: that LoRA plus ``plora.PeriodicUnloader`` unloading after every step, per
  ``merge_precision`` direct, stochastic (no extra memory) and compensated (+2 bytes per adapted
  weight element for its residual buffers).
- ``lora (repeat)``: LoRA again, last: the ratios are to the mean of the two LoRA measurements, and
  their gap shows how much the machine drifted over the run.

Each step is timed with a device sync at its end (median over the timed steps, after warm-up).
For PLoRA the unloader's call is timed apart from the training step, in the same step, so:

- every step: median of (training step + unload);
- every 100 steps (amortised): median training step + median unload / 100. The unload's cost does
  not depend on how often it runs (it always moves the whole adapter), so this is what a window of
  100 steps with one unload costs per step, measured without running 100 steps.

With ``--paired``, LoRA and the PLoRA variants are then built again side by side and stepped in
turn, one step each per round: each PLoRA step is divided by the LoRA step of its own round, so the
drift of the machine between variants (several percent on a small, launch-bound model) cancels.
Each paired median comes with a 95% bootstrap interval over the rounds; a target inside it is
reported as open: the run does not resolve it. ``--paired-seconds S`` ends the rounds after S
seconds (a long run under a time limit). ``--report FILE`` prints a saved run's tables again.

Peak memory is ``max_memory_allocated`` from the variant's build to its last step (weights,
optimizer state, activations and, for compensated, the residuals). Targets: PLoRA/LoRA step time
<= 1.03 unloading every step and <= 1.005 every 100 steps; PLoRA/LoRA peak memory <= 1.01.

    python benchmarks/bench_train_step.py --json train_step.json                  # GPU, about 40 s on an H200
    python benchmarks/bench_train_step.py --model DIR --paired --json train_step_smol.json  # a local HF model dir
    python benchmarks/bench_train_step.py --small --device cpu                    # smoke check on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import plora  # noqa: E402

PLORA_MODES = ("direct", "stochastic", "compensated")
TARGET_EVERY_STEP = 1.03
TARGET_EVERY_100 = 1.005
TARGET_MEMORY = 1.01
BOOTSTRAP_RESAMPLES = 2000
RANK = 16
# LoRA is measured first and again last: the reference is their mean, their difference the drift
# of the machine over the run (on a small, launch-bound model it can exceed the targets' margins).
LORA_RUNS = ("lora", "lora (repeat)")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CONFIGS = {
    # ~1.0 B parameters (0.82 B in the decoder's linear layers, 0.13 B in the two embeddings)
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=128, vocab_size=256, max_position_embeddings=256),
}


def build_base(args, device):
    """The base model in bf16 on ``device``, identical for every call (same seed)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="sdpa")
        model = model.to(device)
    else:
        config = LlamaConfig(**CONFIGS[args.config], attn_implementation="sdpa", use_cache=False)
        with torch.device(device):
            model = LlamaForCausalLM(config)
        model = model.to(torch.bfloat16)
    model.config.use_cache = False
    model.train()
    return model


def build_variant(variant, args, device):
    """(model, optimizer, unloader or None) for one variant."""
    from peft import LoraConfig, get_peft_model

    model = build_base(args, device)
    if variant == "full":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5), None
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = get_peft_model(model, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if variant in LORA_RUNS:
        return model, optimizer, None
    mode = variant.split()[1]
    unloader = plora.PeriodicUnloader(model, optimizer, plora.PLoRAConfig(unload_every=1, merge_precision=mode))
    return model, optimizer, unloader


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_step(model, optimizer, unloader, batch, device):
    """One training step and the unloader's call, each ended by a sync: (train s, unload s, loss)."""
    sync(device)
    start = time.perf_counter()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    mid = time.perf_counter()
    if unloader is not None:
        unloader.step()
        sync(device)
    return mid - start, time.perf_counter() - mid, loss.item()


def run_variant(variant, args, device, batch):
    """Median step (and unload) seconds and peak memory of one variant."""
    cuda = device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_allocated = torch.cuda.memory_allocated()
    model, optimizer, unloader = build_variant(variant, args, device)
    train_s, unload_s, losses = [], [], []
    for i in range(args.warmup + args.steps):
        train, unload, loss = timed_step(model, optimizer, unloader, batch, device)
        if i >= args.warmup:
            train_s.append(train)
            unload_s.append(unload)
            losses.append(loss)
    peak = (torch.cuda.max_memory_allocated() - base_allocated) if cuda else None
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    residual_bytes = sum(t.numel() * t.element_size() for t in unloader.residuals.values()) if unloader else 0
    del model, optimizer, unloader
    step = statistics.median(t + u for t, u in zip(train_s, unload_s))
    return {
        "variant": variant,
        "step_s": step,
        "train_s": statistics.median(train_s),
        "unload_s": statistics.median(unload_s),
        "every_100_s": statistics.median(train_s) + statistics.median(unload_s) / 100,
        "step_s_all": [t + u for t, u in zip(train_s, unload_s)],
        "peak_bytes": peak,
        "params": params,
        "trainable": trainable,
        "residual_bytes": residual_bytes,
        "loss_first_last": [losses[0], losses[-1]],
    }


def run_paired(variants, args, device, batch):
    """LoRA and the PLoRA variants built side by side and stepped in turn, one step each per round.

    The variants above run one after another, so a drift of the machine between them (several
    percent on a small, launch-bound model) lands in their ratios. Here every round times one step
    of each, in an order rotated from round to round, and each PLoRA step is divided by the LoRA
    step of its own round: the median of those per-round ratios is what PLoRA costs over LoRA with
    the drift taken out. Memory is not measured here (the variants share the device).
    """
    names = ["lora"] + [v for v in variants if v.startswith("plora")]
    built = {name: build_variant(name, args, device) for name in names}
    times = {name: [] for name in names}
    deadline = None
    for i in range(args.warmup + args.paired_steps):
        if i == args.warmup and args.paired_seconds:
            deadline = time.perf_counter() + args.paired_seconds
        order = names[i % len(names):] + names[:i % len(names)]
        step = {name: timed_step(*built[name], batch, device)[:2] for name in order}
        if i >= args.warmup:
            for name in names:
                times[name].append(step[name])
        if deadline is not None and time.perf_counter() >= deadline:
            break  # --paired-seconds: as many whole rounds as fit
    del built
    gc.collect()
    lora = [t + u for t, u in times["lora"]]

    def vs_lora(values):  # the median over the rounds of each value over its round's LoRA step
        return statistics.median(v / ref for v, ref in zip(values, lora))

    out = []
    for name in names:
        total = [t + u for t, u in times[name]]
        per_round = [x / ref for x, ref in zip(total, lora)]
        row = {"variant": name, "step_s": statistics.median(total), "step_s_all": total,
               "vs_lora_per_round": per_round, "step_vs_lora": statistics.median(per_round)}
        if name != "lora":
            unload = [u for _, u in times[name]]
            row["unload_s"] = statistics.median(unload)
            row["unload_s_all"] = unload
            row["unload_vs_lora"] = vs_lora(unload)
            # the training step alone (forward, backward, optimizer): what PLoRA's hooks cost between unloads
            row["train_vs_lora"] = vs_lora([t for t, _ in times[name]])
            row["every_100_vs_lora"] = vs_lora([t + u / 100 for t, u in times[name]])
            row["pass"] = step_targets(row)
        out.append(row)
    return out


def step_targets(r: dict) -> dict:
    """A PLoRA row's step-time ratios against their targets (True: PASS)."""
    return {"every step": r["step_vs_lora"] <= TARGET_EVERY_STEP,
            "every 100": r["every_100_vs_lora"] <= TARGET_EVERY_100}


def compare(rows):
    """Ratios to LoRA and PASS/FAIL against the targets, added to the PLoRA rows in place."""
    loras = [r for r in rows if r["variant"] in LORA_RUNS]
    ref_step = statistics.fmean(r["step_s"] for r in loras)
    ref_peak = loras[0]["peak_bytes"]
    for r in rows:
        r["step_vs_lora"] = r["step_s"] / ref_step
        r["every_100_vs_lora"] = r["every_100_s"] / ref_step
        if r["peak_bytes"] is not None and ref_peak:
            r["memory_vs_lora"] = r["peak_bytes"] / ref_peak
        if r["variant"].startswith("plora"):
            r["pass"] = {**step_targets(r),
                         "memory": r["memory_vs_lora"] <= TARGET_MEMORY if "memory_vs_lora" in r else None}


def markdown(results) -> str:
    out = [f"Device: {results['device']}; model: {results['model']} "
           f"({results['params'] / 1e9:.3g} B parameters); batch {results['batch']} x {results['seq']} tokens; "
           f"{results['warmup']} warm-up + {results['steps']} timed steps per variant.\n",
           "| variant | step ms | unload ms | vs LoRA, every step | vs LoRA, every 100 | peak GiB | memory vs LoRA | targets |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results["rows"]:
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
        mem = f"{r['memory_vs_lora']:.3f}" if "memory_vs_lora" in r else "n/a"
        verdict = ", ".join(f"{k} {_verdict(v)}" for k, v in r.get("pass", {}).items())
        unload = f"{r['unload_s'] * 1e3:.2f}" if r["variant"].startswith("plora") else ""
        out.append(f"| {r['variant']} | {r['step_s'] * 1e3:.1f} | {unload} | {r['step_vs_lora']:.3f} | "
                   f"{r['every_100_vs_lora']:.4f} | {peak} | {mem} | {verdict} |")
    loras = [r for r in results["rows"] if r["variant"] in LORA_RUNS]
    if len(loras) == 2:
        a, b = (r["step_s"] * 1e3 for r in loras)
        out.append(f"\nLoRA measured first and last: {a:.1f} and {b:.1f} ms ({100 * abs(a - b) / min(a, b):.1f}% apart); "
                   "the ratios use their mean.")
    if results.get("paired"):
        lora_steps = results["paired"][0]["step_s_all"]
        out += [f"\nPaired: LoRA and the PLoRA variants side by side, one step each per round in a rotated order, "
                f"{results['warmup']} warm-up + {len(lora_steps)} timed rounds; "
                "ratios are medians over the rounds of each step over the same round's LoRA step.\n",
                "| variant | step ms | unload ms | unload / LoRA step | train step / LoRA step | vs LoRA, every step "
                "| 95% interval | vs LoRA, every 100 | 95% interval | targets |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        out += [paired_row(r, lora_steps) for r in results["paired"]]
        out.append("\n95% interval: of the median per-round ratio, by bootstrap over the rounds "
                   f"({BOOTSTRAP_RESAMPLES} resamples, seed 0). A target inside it is not resolved by this run "
                   "('open' in the targets column, with the median's side of it).")
    comp = next((r for r in results["rows"] if r["variant"] == "plora compensated"), None)
    if comp and comp["residual_bytes"]:
        out.append(f"\nCompensated residual buffers: {comp['residual_bytes'] / 2**30:.2f} GiB "
                   "(+2 bytes per adapted weight element, by design).")
    out.append(f"\nTargets: PLoRA/LoRA step time <= {TARGET_EVERY_STEP} unloading every step, <= {TARGET_EVERY_100} "
               f"every 100 steps (amortised: train step + unload/100); PLoRA/LoRA peak memory <= {TARGET_MEMORY}.")
    return "\n".join(out)


def paired_row(r: dict, lora_steps: list[float]) -> str:
    """One row of the paired table: medians, their 95% intervals, and a verdict per target that
    says 'open' where the target lies inside the interval."""
    if not r["variant"].startswith("plora"):
        return f"| {r['variant']} | {r['step_s'] * 1e3:.1f} |  |  |  | {r['step_vs_lora']:.3f} |  |  |  |  |"
    train = f"{r['train_vs_lora']:.4f}" if "train_vs_lora" in r else "n/a"  # (not kept before 6552808)
    every_step = median_interval(r["vs_lora_per_round"])
    every_100 = None
    if "unload_s_all" in r:  # (not kept before 6552808)
        every_100 = median_interval([(t - u + u / 100) / ref for t, u, ref
                                     in zip(r["step_s_all"], r["unload_s_all"], lora_steps)])
    verdicts = []
    for name, target, interval in (("every step", TARGET_EVERY_STEP, every_step),
                                   ("every 100", TARGET_EVERY_100, every_100)):
        median = r["pass"][name]
        if interval is not None and interval[0] <= target < interval[1]:
            verdicts.append(f"{name} open (median {_verdict(median)})")
        else:
            verdicts.append(f"{name} {_verdict(median)}")
    return (f"| {r['variant']} | {r['step_s'] * 1e3:.1f} | {r['unload_s'] * 1e3:.2f} | {r['unload_vs_lora']:.4f} | "
            f"{train} | {r['step_vs_lora']:.3f} | {every_step[0]:.3f}-{every_step[1]:.3f} | "
            f"{r['every_100_vs_lora']:.4f} | "
            + (f"{every_100[0]:.4f}-{every_100[1]:.4f}" if every_100 else "n/a") + f" | {', '.join(verdicts)} |")


def median_interval(values, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval of the median of ``values``: how far the rounds' scatter leaves it open."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    cut = int(resamples * (1 - level) / 2)
    return medians[cut], medians[resamples - 1 - cut]


def _verdict(ok) -> str:
    return "n/a" if ok is None else "PASS" if ok else "FAIL"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny model, short sequence: a CPU smoke check")
    p.add_argument("--model", default=None, help="a local Hugging Face model dir (safetensors) instead of the random 1B")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; 64 with --small)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; 2 with --small)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 3; 1 with --small)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; 3 with --small)")
    p.add_argument("--variants", nargs="+", default=None,
                   help="subset of: full lora 'plora direct' 'plora stochastic' 'plora compensated' 'lora (repeat)'")
    p.add_argument("--paired", action="store_true",
                   help="also time LoRA and the PLoRA variants side by side, one step each per round "
                        "(ratios per round, free of the drift between variants; needs their memory at once)")
    p.add_argument("--paired-steps", type=int, default=None,
                   help="timed rounds of --paired (default: --steps); the same --warmup rounds come first")
    p.add_argument("--paired-seconds", type=float, default=None,
                   help="stop the timed rounds of --paired after this many seconds (whole rounds; at most "
                        "--paired-steps): a long run that must end within a time limit")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="print the tables of a saved --json run again (no measurement)")
    args = p.parse_args(argv)
    if args.report:
        try:
            results = json.loads(args.report.read_text())
            print(markdown(results))
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"--report {args.report}: not a readable bench_train_step result ({type(e).__name__}: {e})")
        return 0
    args.config = "tiny" if args.small else "llama-1b"
    args.seq = args.seq or (64 if args.small else 2048)
    args.batch = args.batch or (2 if args.small else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 3)
    args.steps = args.steps or (3 if args.small else 10)
    args.paired_steps = args.paired_steps or args.steps
    if args.paired_seconds is not None and not args.paired_seconds > 0:
        p.error(f"--paired-seconds must be a positive number of seconds, got {args.paired_seconds}")
    device = args.device
    variants = args.variants or ["full", "lora"] + [f"plora {m}" for m in PLORA_MODES] + ["lora (repeat)"]
    if "lora" not in variants:
        variants = ["lora"] + variants  # the reference of every ratio
    vocab = build_base_vocab(args)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)

    rows = []
    for variant in variants:
        start = time.perf_counter()
        rows.append(run_variant(variant, args, device, batch))
        print(f"[{variant}: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    compare(rows)
    paired = None
    if args.paired:
        start = time.perf_counter()
        paired = run_paired(variants, args, device, batch)
        print(f"[paired: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    results = {
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "command": shlex.join(["python", "benchmarks/bench_train_step.py"] + list(argv if argv is not None else sys.argv[1:])),
        "model": args.model or f"random {args.config} ({', '.join(f'{k}={v}' for k, v in CONFIGS[args.config].items())})",
        "params": next(r["params"] - r["trainable"] for r in rows if r["variant"] in LORA_RUNS),  # base only
        "batch": args.batch,
        "seq": args.seq,
        "warmup": args.warmup,
        "steps": args.steps,
        "rank": RANK,
        "rows": rows,
        "paired": paired,
    }
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def build_base_vocab(args) -> int:
    if args.model:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(args.model).vocab_size
    return CONFIGS[args.config]["vocab_size"]


if __name__ == "__main__":
    sys.exit(main())
