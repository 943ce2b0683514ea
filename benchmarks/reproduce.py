"""Run a plan of ``plora train`` (+ ``plora eval``) jobs within a time budget: the reproduction driver.

    python benchmarks/reproduce.py --plan docs/results/plans/piece1.yaml \
        --model PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf --data-dir PATH/TO/shared/data \
        --out runs/repro --budget-s 540

A plan is YAML: ``common`` overrides applied to every run, then ``runs``: a list of
``{name, overrides, eval}`` where ``eval`` is a list of ``gsm8k`` / ``mmlu`` / ``loss``.
Runs go in order; a run is skipped (and reported as skipped) when the budget left is less than
the longest run so far, so a plan never overruns its machine. Each run's directory keeps
config.yaml, metrics.jsonl, summary.json, spectra.json, loss.png and eval results; the merged
model is deleted afterwards unless --keep-models (it is large and reproducible).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data-dir", required=True, help="folder holding gsm8k/ and mmlu/")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--only", default=None, help="comma-separated run names to run")
    ap.add_argument("--keep-models", action="store_true")
    args = ap.parse_args(argv)

    from plora.train import train
    from plora.train_config import build_config

    t_start = time.time()
    plan = yaml.safe_load(Path(args.plan).read_text())
    data = Path(args.data_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    longest = 0.0
    log = []
    for run in plan["runs"]:
        name = run["name"]
        if only and name not in only:
            continue
        left = args.budget_s - (time.time() - t_start)
        if left < max(longest * 1.1, 30):
            log.append({"name": name, "status": "skipped", "reason": f"{left:.0f}s left < longest run {longest:.0f}s"})
            print(f"== skip {name}: {left:.0f}s left", flush=True)
            continue
        overrides = _deep_merge(plan.get("common", {}), run.get("overrides", {}))
        overrides = _fill_paths(overrides, data)
        if args.model:
            overrides.setdefault("model", args.model)
        overrides["output_dir"] = str(out / name)
        t0 = time.time()
        print(f"== run {name}: {json.dumps(overrides)}", flush=True)
        try:
            cfg = build_config(plan.get("recipe", "gsm8k"), overrides)
            summary = train(cfg, overwrite=True, progress=False)
            summary.update(_evaluate(out / name, run.get("eval", []), data, plan.get("eval", {})))
            (out / name / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
            status = "ok"
        except Exception as exc:  # keep going: one failed run must not lose the others
            import traceback

            traceback.print_exc()
            status = f"failed: {type(exc).__name__}: {exc}"
        if not args.keep_models:
            shutil.rmtree(out / name / "model", ignore_errors=True)
            shutil.rmtree(out / name / "checkpoints", ignore_errors=True)
        took = time.time() - t0
        longest = max(longest, took)
        log.append({"name": name, "status": status, "seconds": round(took, 1)})
        print(f"== done {name} in {took:.0f}s: {status}", flush=True)
        (out / "plan_log.json").write_text(json.dumps(log, indent=1))
    (out / "plan_log.json").write_text(json.dumps(log, indent=1))
    return 0


def _evaluate(run_dir: Path, tasks: list, data: Path, opts: dict) -> dict:
    """Score the run's merged model on the requested tasks; returns summary fields."""
    if not tasks:
        return {}
    import torch

    from plora import evaluate as E
    from plora.data import load_records
    from plora.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(run_dir / "model"), dtype=torch.bfloat16, padding_side="left")
    model.eval()
    out = {}
    results = {}
    if "gsm8k" in tasks:
        records = load_records(str(data / "gsm8k" / "test.jsonl"))
        if opts.get("gsm8k_limit"):
            records = records[: opts["gsm8k_limit"]]
        r = E.gsm8k_accuracy(model, tok, records, batch_size=opts.get("batch_size", 128),
                             max_new_tokens=opts.get("max_new_tokens", 256))
        out["gsm8k_acc"], out["gsm8k_n"] = r["accuracy"], r["n"]
        results["gsm8k"] = {k: v for k, v in r.items() if k != "predictions"}
    if "mmlu" in tasks:
        r = E.mmlu_accuracy(model, tok, str(data / "mmlu"), limit=opts.get("mmlu_limit"),
                            batch_size=opts.get("mmlu_batch_size", 32))
        out["mmlu_acc"], out["mmlu_n"] = r["accuracy"], r["n"]
        out["mmlu_macro"] = r.get("macro")
        results["mmlu"] = {k: v for k, v in r.items() if k not in ("predictions",)}
    (run_dir / "eval.json").write_text(json.dumps(results, indent=1, default=str))
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "eval", **out}) + "\n")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _fill_paths(node, data: Path):
    if isinstance(node, dict):
        return {k: _fill_paths(v, data) for k, v in node.items()}
    if isinstance(node, str) and "{data}" in node:
        return node.replace("{data}", str(data))
    return node


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


if __name__ == "__main__":
    sys.exit(main())
