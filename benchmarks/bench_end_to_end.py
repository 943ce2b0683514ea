"""End to end: ``plora train`` throughput against a plain transformers Trainer + PEFT LoRA run.

Same model, same tokenized data (plora's chat-template encoding), same batch size, precision,
optimizer and steps. Throughput = non-padding tokens trained on per second in the steady state:
from the end of step ``--warmup-steps`` to the end of the last step, with a device sync at both
ends (so data loading, tokenization, model loading and the first steps' allocator and kernel
warm-up are not counted, for every variant alike).

    python benchmarks/bench_end_to_end.py --model MODEL_DIR --data PATH/TO/gsm8k/train.jsonl \
        --steps 100 --warmup-steps 20 --reps 2 --batch-size 16 [--json out.json]

Variants: the plain baseline (what a user writes from the PEFT docs: Trainer, padding collator,
default sampler); ``plora train --method lora`` and ``--method plora`` (unload every 100 steps),
each with plora's defaults (length-grouped batches, metrics/TensorBoard callbacks); and
``plora train --method plora --packing true`` (several examples per row, no padding). The
variants run in turn, ``--reps`` rounds; the median of each is reported. A warm-up run (not
counted) comes first so CUDA initialisation is paid once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def steady_clock(warmup_steps: int):
    """A TrainerCallback timing the steps after ``warmup_steps`` (tokens from the Trainer's count)."""
    import torch
    from transformers import TrainerCallback

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    class SteadyClock(TrainerCallback):
        start = end = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup_steps or state.global_step == state.max_steps:
                sync()
                mark = (time.perf_counter(), state.num_input_tokens_seen)
                if state.global_step == warmup_steps:
                    self.start = mark
                else:
                    self.end = mark

        def result(self) -> dict:
            if self.start is None or self.end is None:
                raise RuntimeError("the run ended before the timed window (steps <= warmup steps?)")
            seconds, tokens = self.end[0] - self.start[0], self.end[1] - self.start[1]
            return {"tokens": tokens, "seconds": seconds}

    return SteadyClock()


def plain_trainer(model_dir, records, steps, batch_size, lr, max_length, seed, out, warmup_steps, group_by_length=False):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from plora.data import DataCollator, build_dataset
    from plora.train import length_grouping_kwargs

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    model = model.to('cuda' if cuda else 'cpu')
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    examples, _ = build_dataset(records, tok, max_length)
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size,
                             learning_rate=lr, lr_scheduler_type="cosine", bf16=cuda, use_cpu=not cuda, logging_steps=10,
                             save_strategy="no", report_to=[], seed=seed, disable_tqdm=True,
                             include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
                             **length_grouping_kwargs(group_by_length))
    clock = steady_clock(warmup_steps)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=DataCollator(tok.pad_token_id),
                      callbacks=[clock])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {**clock.result(), "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def plora_train(model_dir, data, steps, batch_size, lr, max_length, seed, out, warmup_steps, method, packing=False):
    import torch

    from plora.train import train
    from plora.train_config import build_config

    overrides = {
        "method": method, "model": str(model_dir), "data": str(data), "output_dir": str(out), "max_steps": steps,
        "batch_size": batch_size, "lr": lr, "max_length": max_length, "seed": seed, "logging_steps": 10,
        "packing": packing,
        "save_steps": 10**6, "analysis": False, "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "plora": {"unload_every": 100},
        "eval": {"before": False, "heldout_limit": 0, "loss_limit": 0, "train_slice": 0},
    }
    cfg = build_config("lora" if method == "lora" else "plora", overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    clock = steady_clock(warmup_steps)
    s = train(cfg, overwrite=True, progress=False, extra_callbacks=[clock])
    return {**clock.result(), "peak_memory_bytes": s["peak_memory_bytes"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--warmup-steps", type=int, default=20, help="steps before the timed window")
    ap.add_argument("--reps", type=int, default=2, help="rounds over the variants (median reported)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from plora.data import load_records
    from plora.models import resolve_model_dir

    if args.steps <= args.warmup_steps:
        ap.error("--steps must exceed --warmup-steps")
    model_dir = resolve_model_dir(args.model)
    records = load_records(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="e2e-"))
    common = (args.steps, args.batch_size, args.lr, args.max_length, 0)
    plain_trainer(model_dir, records, args.warmup_steps + 5, args.batch_size, args.lr, args.max_length, 0,
                  tmp / "warm", args.warmup_steps)  # warm-up run, not counted
    variants = {
        "plain Trainer + PEFT LoRA": lambda out: plain_trainer(model_dir, records, *common, out, args.warmup_steps),
        "plora train --method lora": lambda out: plora_train(model_dir, args.data, *common, out, args.warmup_steps,
                                                             "lora"),
        "plora train --method plora": lambda out: plora_train(model_dir, args.data, *common, out,
                                                              args.warmup_steps, "plora"),
        "plora train --method plora --packing true": lambda out: plora_train(
            model_dir, args.data, *common, out, args.warmup_steps, "plora", packing=True),
    }
    runs: dict[str, list] = {name: [] for name in variants}
    for rep in range(args.reps):
        for i, (name, fn) in enumerate(variants.items()):
            r = fn(tmp / f"r{rep}-{i}")
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            runs[name].append(r)
            print(f"rep {rep}: {name}: {r['tokens_per_s']:,.0f} tokens/s", flush=True)
    rows = {name: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                   "all_tokens_per_s": [round(r["tokens_per_s"]) for r in rs],
                   "peak_memory_bytes": max((r["peak_memory_bytes"] or 0) for r in rs) or None}
            for name, rs in runs.items()}
    base_tps = rows["plain Trainer + PEFT LoRA"]["tokens_per_s"]
    print(f"\nend to end, steps {args.warmup_steps + 1}..{args.steps} timed, batch {args.batch_size}, bf16, "
          f"LoRA r=16 all-linear, median of {args.reps}\n")
    print("| run | tokens/s (median) | each round | ratio vs plain | peak memory GiB |\n|---|---:|---|---:|---:|")
    for name, r in rows.items():
        r["ratio"] = r["tokens_per_s"] / base_tps
        mem = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f}"
        each = ", ".join(f"{x:,}" for x in r["all_tokens_per_s"])
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {each} | {r['ratio']:.3f} | {mem} |")
    ok = all(r["ratio"] >= 1.0 for name, r in rows.items() if name.startswith("plora") and "packing" not in name)
    print(f"\ntarget plora/plain >= 1.0 (same batches, no packing): {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
