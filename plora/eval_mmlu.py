"""MMLU accuracy by next-token log-likelihood of the answer letter, k-shot from the dev split.

Layout (as first published, one CSV per subject, no header; columns question, A, B, C, D,
answer letter)::

    MMLU_DIR/dev/<subject>_dev.csv     the few-shot examples (5 per subject)
    MMLU_DIR/test/<subject>_test.csv   the questions scored

The prompt is the standard one (the same text as lm-evaluation-harness's ``mmlu`` tasks)::

    The following are multiple choice questions (with answers) about <subject words>.\\n\\n
    <dev question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD. <d>\\nAnswer: <letter>\\n\\n    (x shots)
    <test question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD. <d>\\nAnswer:

and the prediction is the letter whose continuation `` A`` / `` B`` / `` C`` / `` D`` is most
likely. When each of those is one token that does not merge with the prompt (true of common
BPE tokenizers), one forward pass of the prompt is enough: the logits at its last position. Else
each continuation is scored as a sequence (4 rows per question).

``stratified_indices`` picks a deterministic subset spread over subjects in proportion to their
size, for quick runs; results name such a run a subset.
"""

from __future__ import annotations

import csv
import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path

from plora.errors import UserError
from plora.eval_common import (
    length_sorted_batches,
    model_device,
    pad_batch,
    pad_id_of,
    progress,
)

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class MMLUQuestion:
    """One MMLU row: question, four choices, the answer letter; ``index`` is its row in the file."""

    subject: str
    index: int
    question: str
    choices: tuple[str, str, str, str]
    answer: str


# --------------------------------------------------------------------------- loading


def read_mmlu_csv(path: Path, subject: str) -> list[MMLUQuestion]:
    """The rows of one subject file, validated (6 fields, answer one of A-D)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f)):
            if len(row) != 6:
                raise UserError(f"{path.name} row {i + 1}: expected 6 fields (question, A, B, C, D, answer), got {len(row)}")
            answer = row[5].strip()
            if answer not in LETTERS:
                raise UserError(f"{path.name} row {i + 1}: answer must be one of A-D, got {row[5]!r}")
            rows.append(MMLUQuestion(subject, i, row[0], tuple(row[1:5]), answer))
    return rows


def mmlu_subjects(mmlu_dir: str | Path, split: str = "test") -> list[str]:
    """Subject names found in ``mmlu_dir/<split>/`` (sorted)."""
    folder = Path(mmlu_dir) / split
    if not folder.is_dir():
        raise UserError(f"MMLU folder {folder} not found (expected {split}/<subject>_{split}.csv files)")
    subjects = sorted(p.name[: -len(f"_{split}.csv")] for p in folder.glob(f"*_{split}.csv"))
    if not subjects:
        raise UserError(f"no *_{split}.csv files in {folder}")
    return subjects


def load_mmlu(mmlu_dir: str | Path, split: str = "test", subjects: list[str] | None = None) -> dict[str, list[MMLUQuestion]]:
    """``{subject: questions}`` of one split, for all subjects or the ones named."""
    available = mmlu_subjects(mmlu_dir, split)
    chosen = available if subjects is None else list(subjects)
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise UserError(f"unknown MMLU subject(s) {unknown} in {Path(mmlu_dir) / split}")
    return {s: read_mmlu_csv(Path(mmlu_dir) / split / f"{s}_{split}.csv", s) for s in chosen}


# --------------------------------------------------------------------------- prompts


def subject_description(subject: str) -> str:
    """``"The following are multiple choice questions (with answers) about high school biology.\\n\\n"``."""
    return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"


def format_question(q: MMLUQuestion, with_answer: bool) -> str:
    """``question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` (+ `` X`` for a shot)."""
    lines = [q.question.strip()] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)]
    text = "\n".join(lines) + "\nAnswer:"
    return f"{text} {q.answer}" if with_answer else text


def mmlu_prompt(q: MMLUQuestion, shots: list[MMLUQuestion]) -> str:
    """The full k-shot prompt for ``q``; it ends in ``Answer:`` (no trailing space)."""
    examples = "".join(format_question(s, with_answer=True) + "\n\n" for s in shots)
    return subject_description(q.subject) + examples + format_question(q, with_answer=False)


# --------------------------------------------------------------------------- subsets


def stratified_indices(sizes: dict[str, int], n: int) -> dict[str, list[int]]:
    """``n`` row indices spread over subjects in proportion to ``sizes``, deterministically.

    Each subject gets ``floor(n * size / total)`` rows; the rows left go to the largest
    remainders (ties by subject name). Within a subject the rows are evenly spaced over the
    file (``floor((j + 0.5) * size / k)``), so a subset is not just the head of each file.
    """
    total = sum(sizes.values())
    if n >= total:
        return {s: list(range(k)) for s, k in sizes.items()}
    if n < 1:
        raise UserError(f"the MMLU subset size must be >= 1, not {n}")
    quotas = {s: n * k / total for s, k in sizes.items()}
    counts = {s: math.floor(q) for s, q in quotas.items()}
    left = n - sum(counts.values())
    for s in sorted(sizes, key=lambda s: (-(quotas[s] - counts[s]), s))[:left]:
        counts[s] += 1
    return {s: [math.floor((j + 0.5) * sizes[s] / k) for j in range(k)] for s, k in counts.items() if k}


# --------------------------------------------------------------------------- scoring


def _letter_continuations(tokenizer, prompts: list[str], encoded: list[list[int]]) -> list[list[list[int]]]:
    """Token ids of `` A``..`` D`` after each prompt, as the tokenizer splits prompt + letter.

    Raises ValueError when a continuation is not the prompt's own ids followed by more tokens
    (a merge across the boundary); that does not happen with prompts ending in ``Answer:``.
    """
    wholes = [tokenizer([p + " " + letter for p in prompts], add_special_tokens=True)["input_ids"] for letter in LETTERS]
    out = []
    for i, (prompt, ids) in enumerate(zip(prompts, encoded)):
        conts = []
        for whole in (w[i] for w in wholes):
            if whole[: len(ids)] != ids or len(whole) == len(ids):
                raise ValueError(f"cannot split the answer letters from the prompt ending {prompt[-40:]!r}")
            conts.append(whole[len(ids) :])
        out.append(conts)
    return out


def _accepts_logits_to_keep(model) -> bool:
    """Whether the (base) model's forward takes ``logits_to_keep`` (transformers >= 4.50 models)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _forward_logits(model, ids, mask, last_only: bool):
    """Logits of a left- or right-padded batch; with ``last_only`` just the last position's.

    Position ids count real tokens only, so left padding does not shift the positions; the
    last-only path asks the model for one position of logits instead of ``len x vocab``.
    """
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, "use_cache": False}
    if not last_only:
        return model(**kwargs).logits
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1
    return model(**kwargs).logits[:, -1]


def score_letters(
    model, tokenizer, prompts: list[str], *, batch_size: int = 8, show_progress: bool = False
) -> list[list[float]]:
    """Log-likelihood of `` A``, `` B``, `` C``, `` D`` after each prompt (4 floats per prompt)."""
    import torch

    if not prompts:
        return []
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    conts = _letter_continuations(tokenizer, prompts, encoded)
    single = [all(len(c) == 1 for c in cs) for cs in conts]
    pad = pad_id_of(tokenizer)
    device = model_device(model)
    scores: list[list[float] | None] = [None] * len(prompts)

    fast = [i for i, s in enumerate(single) if s]
    slow = [i for i, s in enumerate(single) if not s]
    with torch.inference_mode():
        # One forward per prompt; read the 4 letters at the last prompt position (left padding).
        batches = length_sorted_batches([len(encoded[i]) for i in fast], batch_size)
        for batch in progress(batches, total_rows=len(fast), desc="mmlu", enabled=show_progress):
            rows = [fast[b] for b in batch]
            ids, mask = pad_batch([encoded[i] for i in rows], pad, side="left")
            logits = _forward_logits(model, ids.to(device), mask.to(device), last_only=True)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            letter_ids = torch.tensor([[c[0] for c in conts[i]] for i in rows], device=device)
            for row, i in enumerate(rows):
                scores[i] = logprobs[row, letter_ids[row]].tolist()
        # Multi-token letters: 4 sequences per prompt, summing the continuation's log-probs.
        seqs = [(i, k, encoded[i] + conts[i][k]) for i in slow for k in range(4)]
        partial = {i: [0.0] * 4 for i in slow}
        for batch in length_sorted_batches([len(s[2]) for s in seqs], batch_size):
            ids, mask = pad_batch([seqs[b][2] for b in batch], pad, side="right")
            logprobs = torch.log_softmax(_forward_logits(model, ids.to(device), mask.to(device), False).float(), -1)
            for row, b in enumerate(batch):
                i, k, seq = seqs[b]
                start = len(encoded[i])
                targets = torch.tensor(seq[start:], device=device)
                partial[i][k] = logprobs[row, start - 1 : len(seq) - 1].gather(-1, targets[:, None]).sum().item()
        for i in slow:
            scores[i] = partial[i]
    return scores  # type: ignore[return-value]


def mmlu_accuracy(
    model,
    tokenizer,
    mmlu_dir: str | Path,
    *,
    shots: int = 5,
    subjects: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    show_progress: bool = False,
) -> dict:
    """k-shot MMLU accuracy: per subject, micro average (over questions) and macro (over subjects).

    ``limit`` scores a stratified subset of ``limit`` test questions (see
    ``stratified_indices``); the result then says ``"subset": True`` and ``"name"`` names it.
    Returns ``{"name", "accuracy" (micro), "micro", "macro", "n", "total_available", "subset",
    "shots", "per_subject": {subject: {"accuracy", "n"}}, "seconds", "predictions"}``.
    ``show_progress`` draws a progress bar.
    """
    if shots < 0:
        raise UserError(f"shots must be >= 0, not {shots}")
    test = load_mmlu(mmlu_dir, "test", subjects)
    dev = load_mmlu(mmlu_dir, "dev", list(test)) if shots else {s: [] for s in test}
    for s, rows in dev.items():
        if len(rows) < shots:
            raise UserError(f"{shots}-shot MMLU needs {shots} dev rows for {s}, found {len(rows)}")
    total = sum(len(v) for v in test.values())
    subset = limit is not None and limit < total
    if subset:
        picks = stratified_indices({s: len(v) for s, v in test.items()}, limit)
        test = {s: [test[s][i] for i in idx] for s, idx in picks.items()}
    questions = [q for rows in test.values() for q in rows]
    prompts = [mmlu_prompt(q, dev[q.subject][:shots]) for q in questions]

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        scores = score_letters(model, tokenizer, prompts, batch_size=batch_size, show_progress=show_progress)
    finally:
        model.train(was_training)

    predictions, per_subject = [], {}
    for q, sc in zip(questions, scores):
        pred = LETTERS[max(range(4), key=lambda k: sc[k])]
        predictions.append({
            "subject": q.subject, "index": q.index, "answer": q.answer, "pred": pred,
            "correct": pred == q.answer, "logprobs": dict(zip(LETTERS, (round(x, 4) for x in sc))),
        })  # fmt: skip
        acc = per_subject.setdefault(q.subject, {"correct": 0, "n": 0})
        acc["correct"] += pred == q.answer
        acc["n"] += 1
    per_subject = {s: {"accuracy": v["correct"] / v["n"], "n": v["n"]} for s, v in per_subject.items()}
    n = len(questions)
    micro = sum(p["correct"] for p in predictions) / n
    macro = sum(v["accuracy"] for v in per_subject.values()) / len(per_subject)
    name = f"mmlu stratified subset ({n} of {total} test questions)" if subset else f"mmlu ({n} test questions)"
    return {
        "name": name,
        "accuracy": micro,
        "micro": micro,
        "macro": macro,
        "n": n,
        "total_available": total,
        "subset": subset,
        "shots": shots,
        "per_subject": per_subject,
        "seconds": round(time.perf_counter() - start, 2),
        "predictions": predictions,
    }
