"""Evaluation: GSM8K accuracy, MMLU accuracy, held-out loss; and the ``plora eval`` command.

The three measures are plain functions that ``plora train`` calls before and after training
and that any script can call on a loaded model:

- ``gsm8k_accuracy(model, tokenizer, records, ...)``: greedy generation, answer after ``####``
  else the last number (``plora.eval_gsm8k``);
- ``mmlu_accuracy(model, tokenizer, mmlu_dir, ...)``: k-shot, letter log-likelihood
  (``plora.eval_mmlu``);
- ``heldout_loss(model, tokenizer, records, ...)``: mean loss per response token on any
  instruction file, masked exactly as in training (``plora.data.encode``).

``plora eval`` loads a model, runs the tasks asked for and writes ``results.json``,
``results.md`` and one predictions JSONL per task to ``--out``. docs/evaluation.md gives the
prompts and a cross-check against lm-evaluation-harness.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import time
from pathlib import Path

from plora.errors import UserError
from plora.eval_common import (
    length_sorted_batches,
    model_device,
    pad_batch,
    pad_id_of,
    progress,
)
from plora.eval_gsm8k import PROMPT_STYLES, extract_answer, gsm8k_accuracy, gsm8k_prompt
from plora.eval_mmlu import mmlu_accuracy, mmlu_prompt, stratified_indices

__all__ = [
    "extract_answer",
    "gsm8k_accuracy",
    "gsm8k_prompt",
    "heldout_loss",
    "mmlu_accuracy",
    "mmlu_prompt",
    "register",
    "run",
    "stratified_indices",
]  # fmt: skip

TASKS = ("gsm8k", "mmlu", "loss")


# --------------------------------------------------------------------------- held-out loss


def heldout_loss(
    model,
    tokenizer,
    records: list[dict],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    system: str | None = None,
    show_progress: bool = False,
) -> dict:
    """Mean cross-entropy per response token (and its perplexity) on instruction records.

    Records may be GSM8K, Alpaca or chat (see ``plora.data.to_messages``); each is rendered
    with the chat template and only the assistant's tokens count, as in training. The mean is
    over all response tokens of all records (long answers weigh more). Records longer than
    ``max_length`` are cut (``truncated`` counts them); records left with no response token are
    skipped (``dropped``). ``show_progress`` draws a progress bar. Returns ``{"loss",
    "perplexity", "n", "tokens", "truncated", "dropped", "seconds", "per_record"}``.
    """
    import torch
    import torch.nn.functional as F

    from plora.data import IGNORE_INDEX, encode, to_messages

    if not records:
        raise UserError("no records to compute a held-out loss on")
    examples, truncated, dropped = [], 0, 0
    for i, record in enumerate(records):
        ex = encode(to_messages(record, system=system), tokenizer, max_length)
        truncated += ex["truncated"]
        if all(label == IGNORE_INDEX for label in ex["labels"][1:]):
            dropped += 1
            continue
        examples.append((i, ex["input_ids"], ex["labels"]))
    if not examples:
        raise UserError(f"no record keeps a response token within max_length={max_length}")

    start = time.perf_counter()
    pad, device = pad_id_of(tokenizer), model_device(model)
    per_record = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batches = length_sorted_batches([len(e[1]) for e in examples], batch_size)
            for batch in progress(batches, total_rows=len(examples), desc="loss", enabled=show_progress):
                ids, mask = pad_batch([examples[b][1] for b in batch], pad, side="right")
                labels, _ = pad_batch([examples[b][2] for b in batch], IGNORE_INDEX, side="right")
                ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
                targets = labels[:, 1:]
                keep = targets != IGNORE_INDEX
                # Only the response positions go through the float32 log-softmax.
                nll = F.cross_entropy(logits[keep].float(), targets[keep], reduction="none")
                row_of = keep.nonzero()[:, 0]
                sums = torch.zeros(len(batch), device=device).index_add_(0, row_of, nll)
                counts = keep.sum(dim=1)
                for row, b in enumerate(batch):
                    per_record.append({
                        "index": examples[b][0], "nll": sums[row].item(), "tokens": int(counts[row]),
                    })  # fmt: skip
    finally:
        model.train(was_training)
    per_record.sort(key=lambda r: r["index"])
    tokens = sum(r["tokens"] for r in per_record)
    loss = sum(r["nll"] for r in per_record) / tokens
    for r in per_record:
        r["loss"] = r.pop("nll") / r["tokens"]
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "n": len(per_record),
        "tokens": tokens,
        "truncated": truncated,
        "dropped": dropped,
        "seconds": round(time.perf_counter() - start, 2),
        "per_record": per_record,
    }


# --------------------------------------------------------------------------- the command


def register(subparsers) -> None:
    """Add ``plora eval`` to the CLI."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model: GSM8K accuracy, MMLU accuracy, held-out loss",
        description="Evaluate a model on GSM8K (greedy generation), MMLU (k-shot letter log-likelihood) "
        "and/or the held-out loss of an instruction file. See docs/evaluation.md.",
    )
    p.add_argument("--model", default=None, help="model directory, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tasks", default=None, metavar="LIST",
                   help="comma-separated subset of gsm8k,mmlu,loss (default: every task whose data is given)")
    p.add_argument("--gsm8k", metavar="FILE", help="GSM8K-style JSONL of {question, answer} (e.g. gsm8k/test.jsonl)")
    p.add_argument("--gsm8k-train", metavar="FILE",
                   help="few-shot source for --shots > 0 (default: train.jsonl beside --gsm8k)")
    p.add_argument("--mmlu", metavar="DIR", help="MMLU folder holding dev/ and test/ CSVs")
    p.add_argument("--mmlu-subjects", default=None, metavar="LIST", help="comma-separated MMLU subjects (default: all)")
    p.add_argument("--loss-data", metavar="FILE", help="instruction JSON/JSONL for the held-out loss")
    p.add_argument("--shots", type=int, default=0, metavar="K", help="GSM8K worked examples before each question (default 0)")
    p.add_argument("--mmlu-shots", type=int, default=5, metavar="K", help="MMLU dev examples per prompt (default 5)")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default="chat",
                   help="GSM8K prompt: chat template (default) or lm-eval's plain 'Question: ..\\nAnswer:'")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="first N GSM8K / loss records; a stratified subset of N MMLU questions")
    p.add_argument("--mmlu-limit", type=int, default=None, metavar="N",
                   help="MMLU only: a stratified subset of N questions (default: --limit, else all)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="prompts per forward/generate call (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="GSM8K generation budget (default 256)")
    p.add_argument("--max-length", type=int, default=1024, metavar="N", help="held-out loss: tokens kept per record (default 1024)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--out", metavar="DIR", help="write results.json, results.md and predictions here")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.set_defaults(func=run)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"{name} must be >= 1, not {value}")


def _plan(args) -> dict:
    """Check every option and path before the (slow) model load; return ``{task: data path}``."""
    given = {"gsm8k": args.gsm8k, "mmlu": args.mmlu, "loss": args.loss_data}
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise UserError(f"unknown task(s) {unknown}; expected some of {', '.join(TASKS)}")
    else:
        tasks = [t for t in TASKS if given[t]]
        if not tasks:
            raise UserError("nothing to evaluate: pass --gsm8k FILE, --mmlu DIR and/or --loss-data FILE")
    flags = {"gsm8k": "--gsm8k FILE", "mmlu": "--mmlu DIR", "loss": "--loss-data FILE"}
    plan = {}
    for t in tasks:
        if not given[t]:
            raise UserError(f"task {t} needs {flags[t]}")
        path = Path(given[t]).expanduser()
        if t == "mmlu":
            if not path.is_dir():
                raise UserError(f"MMLU folder not found: {path}")
        elif not path.is_file():
            raise UserError(f"{t} data file not found: {path}")
        plan[t] = path
    _positive("--limit", args.limit)
    _positive("--mmlu-limit", args.mmlu_limit)
    _positive("--batch-size", args.batch_size)
    _positive("--max-new-tokens", args.max_new_tokens)
    if args.shots < 0 or args.mmlu_shots < 0:
        raise UserError("--shots and --mmlu-shots must be >= 0")
    if "gsm8k" in plan and args.shots:
        train = Path(args.gsm8k_train) if args.gsm8k_train else plan["gsm8k"].with_name("train.jsonl")
        if not train.is_file():
            raise UserError(f"--shots {args.shots} needs GSM8K training examples; not found: {train} (use --gsm8k-train)")
        plan["gsm8k_train"] = train
    if args.out:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not args.overwrite:
            raise UserError(f"--out {out} is not empty; pass --overwrite or choose another directory")
    return plan


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _markdown(results: dict) -> str:
    """A short human-readable report of ``results.json``."""
    header = f"{results['date']}, device {results['device']}, dtype {results['dtype']}"
    lines = [f"# Evaluation of {results['model']}", "", header, "", "| task | metric | value | n | notes |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    t = results["tasks"]
    if "gsm8k" in t:
        g = t["gsm8k"]
        lines.append(f"| gsm8k | accuracy | {g['accuracy']:.4f} | {g['n']} | {g['shots']}-shot, {g['prompt_style']} "
                     f"prompt, greedy, max_new_tokens {g['max_new_tokens']} |")  # fmt: skip
    if "mmlu" in t:
        m = t["mmlu"]
        lines.append(f"| {m['name']} | accuracy (micro) | {m['micro']:.4f} | {m['n']} | {m['shots']}-shot |")
        lines.append(f"| {m['name']} | accuracy (macro over {len(m['per_subject'])} subjects) | {m['macro']:.4f} "
                     f"| {m['n']} | |")  # fmt: skip
    if "loss" in t:
        h = t["loss"]
        lines.append(f"| loss | loss per response token | {h['loss']:.4f} | {h['n']} | perplexity {h['perplexity']:.3f}, "
                     f"{h['tokens']} tokens |")  # fmt: skip
    if "mmlu" in t:
        lines += ["", "## MMLU per subject", "", "| subject | accuracy | n |", "| --- | --- | --- |"]
        lines += [f"| {s} | {v['accuracy']:.4f} | {v['n']} |" for s, v in t["mmlu"]["per_subject"].items()]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """``plora eval``: check inputs, load the model, run the tasks, print and write the results."""
    from plora.data import load_records
    from plora.models import load_model_and_tokenizer

    plan = _plan(args)
    gsm_records = load_records(plan["gsm8k"], limit=args.limit) if "gsm8k" in plan else None
    gsm_train = load_records(plan["gsm8k_train"], limit=args.shots) if "gsm8k_train" in plan else None
    loss_records = load_records(plan["loss"], limit=args.limit) if "loss" in plan else None
    subjects = [s.strip() for s in args.mmlu_subjects.split(",") if s.strip()] if args.mmlu_subjects else None

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device, padding_side="left")
    model.eval()
    results = {
        "model": args.model or "default (SmolLM2-135M-Instruct)",
        "device": str(model_device(model)),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "tasks": {},
    }
    predictions: dict[str, list[dict]] = {}
    if gsm_records is not None:
        res = gsm8k_accuracy(
            model, tokenizer, gsm_records, shots=args.shots, fewshot_records=gsm_train, prompt_style=args.prompt_style,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, show_progress=True,
        )  # fmt: skip
        predictions["gsm8k"] = res.pop("predictions")
        results["tasks"]["gsm8k"] = {"data": str(plan["gsm8k"]), **res}
        if "gsm8k_train" in plan:
            results["tasks"]["gsm8k"]["fewshot_data"] = str(plan["gsm8k_train"])
        print(f"gsm8k: accuracy {res['accuracy']:.4f} ({res['correct']}/{res['n']}, {res['shots']}-shot, "
              f"{res['prompt_style']} prompt) in {res['seconds']:.0f} s")  # fmt: skip
    if "mmlu" in plan:
        res = mmlu_accuracy(model, tokenizer, plan["mmlu"], shots=args.mmlu_shots, subjects=subjects,
                            limit=args.mmlu_limit or args.limit, batch_size=args.batch_size,
                            show_progress=True)  # fmt: skip
        predictions["mmlu"] = res.pop("predictions")
        if res["subset"]:
            picked: dict[str, list[int]] = {}
            for p in predictions["mmlu"]:
                picked.setdefault(p["subject"], []).append(p["index"])
            res["subset_indices"] = picked
        results["tasks"]["mmlu"] = {"data": str(plan["mmlu"]), **res}
        print(f"{res['name']}: accuracy micro {res['micro']:.4f}, macro {res['macro']:.4f} "
              f"({res['shots']}-shot) in {res['seconds']:.0f} s")  # fmt: skip
    if loss_records is not None:
        res = heldout_loss(model, tokenizer, loss_records, batch_size=args.batch_size, max_length=args.max_length,
                           show_progress=True)
        predictions["loss"] = res.pop("per_record")
        results["tasks"]["loss"] = {"data": str(plan["loss"]), **res}
        print(f"loss: {res['loss']:.4f} per response token (perplexity {res['perplexity']:.3f}, "
              f"{res['n']} records, {res['tokens']} tokens)")  # fmt: skip

    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for task, rows in predictions.items():
            name = f"{task}_predictions.jsonl"
            _write_jsonl(out / name, rows)
            results["tasks"][task]["predictions_file"] = name
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (out / "results.md").write_text(_markdown(results), encoding="utf-8")
        print(f"wrote {out / 'results.json'}, results.md and predictions")
    return 0
