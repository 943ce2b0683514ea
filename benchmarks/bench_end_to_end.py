"""End to end: ``plora train`` throughput against a plain transformers Trainer + PEFT LoRA run.

Same model, same tokenized data (plora's chat-template encoding), same batch size, precision,
optimizer and steps. Throughput = non-padding tokens seen / wall time of ``trainer.train()``.

    python benchmarks/bench_end_to_end.py --model MODEL_DIR --data PATH/TO/gsm8k/train.jsonl \
        --steps 150 --batch-size 16 [--json out.json]

Variants: the plain baseline (what a user writes from the PEFT docs: Trainer, padding collator,
default sampler); ``plora train --method lora`` and ``--method plora`` (unload every 100 steps),
each with plora's defaults (length-grouped batches, metrics/TensorBoard callbacks).
A warm-up run (not counted) comes first so CUDA initialisation is paid once.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_trainer(model_dir, records, steps, batch_size, lr, max_length, seed, out, group_by_length=False):
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
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=DataCollator(tok.pad_token_id))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    trainer.train()
    sync()
    seconds = time.perf_counter() - t0
    return {"tokens": trainer.state.num_input_tokens_seen, "seconds": seconds,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def plora_train(model_dir, data, steps, batch_size, lr, max_length, seed, out, method):
    import torch

    from plora.train import train
    from plora.train_config import build_config

    overrides = {
        "method": method, "model": str(model_dir), "data": str(data), "output_dir": str(out), "max_steps": steps,
        "batch_size": batch_size, "lr": lr, "max_length": max_length, "seed": seed, "logging_steps": 10,
        "save_steps": 10**6, "analysis": False, "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "plora": {"unload_every": 100},
        "eval": {"before": False, "heldout_limit": 0, "loss_limit": 0, "train_slice": 0},
    }
    cfg = build_config("lora" if method == "lora" else "plora", overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    s = train(cfg, overwrite=True, progress=False)
    return {"tokens": s["tokens_per_s"] * s["train_seconds"], "seconds": s["train_seconds"],
            "peak_memory_bytes": s["peak_memory_bytes"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from plora.data import load_records
    from plora.models import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    records = load_records(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="e2e-"))
    common = (args.steps, args.batch_size, args.lr, args.max_length, 0)
    plain_trainer(model_dir, records, args.warmup_steps, args.batch_size, args.lr, args.max_length, 0, tmp / "warm")  # warm-up
    rows = {
        "plain Trainer + PEFT LoRA": plain_trainer(model_dir, records, *common, tmp / "plain"),
        "plora train --method lora": plora_train(model_dir, args.data, *common, tmp / "lora", "lora"),
        "plora train --method plora": plora_train(model_dir, args.data, *common, tmp / "plora", "plora"),
    }
    base = rows["plain Trainer + PEFT LoRA"]
    base_tps = base["tokens"] / base["seconds"]
    print(f"\nend to end, {args.steps} steps, batch {args.batch_size}, bf16, LoRA r=16 all-linear\n")
    print("| run | tokens/s | ratio vs plain | peak memory GiB |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        tps = r["tokens"] / r["seconds"]
        r["tokens_per_s"], r["ratio"] = tps, tps / base_tps
        mem = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f}"
        print(f"| {name} | {tps:,.0f} | {tps / base_tps:.3f} | {mem} |")
    ok = all(r["ratio"] >= 1.0 for name, r in rows.items() if name.startswith("plora"))
    print(f"\ntarget plora/plain >= 1.0: {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
