"""Compare a `plora eval --out DIR` run with lm_eval's `--log_samples` output, question by question.

Usage (see docs/evaluation.md for the runs that produce the inputs):

    python docs/lm_eval_tasks/compare_with_plora.py gsm8k PLORA_OUT LM_EVAL_OUT
    python docs/lm_eval_tasks/compare_with_plora.py mmlu  PLORA_OUT LM_EVAL_OUT

GSM8K: accuracy of both, how many prompts and completions are identical text, how many
extracted answers agree. MMLU: micro/macro accuracy of both, how many prompts are identical,
how many predicted letters agree and the largest difference between the two tools'
log-likelihoods of a letter. Prompts are rebuilt with plora (data paths and settings from
PLORA_OUT/results.json, the tokenizer of the model lm_eval loaded).
"""

import glob
import json
import sys
from pathlib import Path


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _samples(lm_eval_out, task_prefix):
    """``{task name: [sample, ...]}`` from every samples_<task>_*.jsonl under ``lm_eval_out``."""
    out = {}
    for path in glob.glob(str(Path(lm_eval_out) / "**" / f"samples_{task_prefix}*.jsonl"), recursive=True):
        task = Path(path).name[len("samples_") :].rsplit("_", 1)[0]
        out[task] = _jsonl(path)
    if not out:
        sys.exit(f"no samples_{task_prefix}*.jsonl under {lm_eval_out} (run lm_eval with --log_samples)")
    return out


def _lm_eval_tokenizer(lm_eval_out):
    from transformers import AutoTokenizer

    path = glob.glob(str(Path(lm_eval_out) / "**" / "results_*.json"), recursive=True)[0]
    model_args = json.loads(Path(path).read_text())["config"]["model_args"]
    if isinstance(model_args, str):  # older lm_eval: "pretrained=...,dtype=..."
        model_args = dict(kv.split("=", 1) for kv in model_args.split(","))
    return AutoTokenizer.from_pretrained(model_args["pretrained"])


def compare_gsm8k(plora_out, lm_eval_out):
    from plora.data import load_records
    from plora.eval_gsm8k import gsm8k_prompt

    ours = {p["index"]: p for p in _jsonl(Path(plora_out) / "gsm8k_predictions.jsonl")}
    settings = json.loads((Path(plora_out) / "results.json").read_text())["tasks"]["gsm8k"]
    (task, rows), = _samples(lm_eval_out, "plora_gsm8k").items()
    rows = [r for r in rows if r["filter"] == "plora-rule"]
    tok = _lm_eval_tokenizer(lm_eval_out)
    questions = load_records(settings["data"])
    shots = load_records(settings["fewshot_data"], limit=settings["shots"]) if settings["shots"] else []
    same_prompt = sum(
        gsm8k_prompt(tok, questions[r["doc_id"]]["question"], shots, settings["prompt_style"])
        == r["arguments"]["gen_args_0"]["arg_0"]
        for r in rows
    )
    same_text = sum(ours[r["doc_id"]]["completion"] == r["resps"][0][0] for r in rows)
    same_pred = sum((ours[r["doc_id"]]["pred"] or "[invalid]") == r["filtered_resps"][0]
                    or (ours[r["doc_id"]]["pred"] is not None and r["filtered_resps"][0] != "[invalid]"
                        and float(ours[r["doc_id"]]["pred"]) == float(r["filtered_resps"][0]))
                    for r in rows)  # fmt: skip
    acc_ours = sum(ours[r["doc_id"]]["correct"] for r in rows) / len(rows)
    acc_lm = sum(r["exact_match"] for r in rows) / len(rows)
    print(f"{task}: n={len(rows)}  plora {acc_ours:.4f}  lm_eval {acc_lm:.4f}  "
          f"identical prompts {same_prompt}/{len(rows)}  identical completions {same_text}/{len(rows)}  "
          f"same extracted answer {same_pred}/{len(rows)}")  # fmt: skip


def compare_mmlu(plora_out, lm_eval_out):
    from plora.eval_mmlu import load_mmlu, mmlu_prompt

    ours = {(p["subject"], p["index"]): p for p in _jsonl(Path(plora_out) / "mmlu_predictions.jsonl")}
    settings = json.loads((Path(plora_out) / "results.json").read_text())["tasks"]["mmlu"]
    test, dev = load_mmlu(settings["data"], "test"), load_mmlu(settings["data"], "dev")
    per_subject, agree, worst, n, same_prompt = {}, 0, 0.0, 0, 0
    for task, rows in _samples(lm_eval_out, "plora_mmlu_").items():
        subject = task[len("plora_mmlu_") :]
        for r in rows:
            lls = [float(x[0][0]) for x in r["resps"]]
            mine = ours[(subject, r["doc_id"])]
            prompt = mmlu_prompt(test[subject][r["doc_id"]], dev[subject][: settings["shots"]])
            same_prompt += prompt == r["arguments"]["gen_args_0"]["arg_0"]
            agree += "ABCD"[max(range(4), key=lambda k: lls[k])] == mine["pred"]
            worst = max(worst, *(abs(a - mine["logprobs"][k]) for a, k in zip(lls, "ABCD")))
            per_subject.setdefault(subject, []).append((r["acc"], mine["correct"]))
            n += 1
    micro = [sum(v[i] for rows in per_subject.values() for v in rows) / n for i in (0, 1)]
    macro = [sum(sum(v[i] for v in rows) / len(rows) for rows in per_subject.values()) / len(per_subject) for i in (0, 1)]
    print(f"mmlu: n={n} over {len(per_subject)} subjects  micro plora {micro[1]:.4f} lm_eval {micro[0]:.4f}  "
          f"macro plora {macro[1]:.4f} lm_eval {macro[0]:.4f}  identical prompts {same_prompt}/{n}  same letter {agree}/{n}  "
          f"max |log-likelihood difference| {worst:.1e}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("gsm8k", "mmlu"):
        sys.exit(__doc__)
    {"gsm8k": compare_gsm8k, "mmlu": compare_mmlu}[sys.argv[1]](sys.argv[2], sys.argv[3])
