"""GSM8K accuracy by greedy generation: prompts, answer extraction, scoring.

Two prompt styles (``prompt_style``):

- ``"chat"`` (default): the model's chat template with the question, verbatim, as the user turn
  and the generation prompt after it. For k shots, the first k training problems come before it
  as user (question) / assistant (full worked answer, ending ``#### <n>``) turns. Generation
  stops at eos / end-of-turn. This is how an instruct model is used, and how ``plora train``
  formats GSM8K records, so it measures what fine-tuning taught.
- ``"plain"``: lm-evaluation-harness's standard ``gsm8k`` text prompt, no chat template:
  ``Question: <q>\\nAnswer:`` with k shots ``Question: <q>\\nAnswer: <answer>`` joined by a blank
  line; generation also stops at the text ``Question:``.

The predicted answer is the number after the first ``####`` in the completion, else the last
number in it (``$``, thousands commas and a trailing ``.`` dropped); it is right when it equals
the number after ``####`` in the reference answer, compared as numbers (``18.00`` == ``18``).
"""

from __future__ import annotations

import re
import time

from plora.errors import UserError
from plora.eval_common import (
    length_sorted_batches,
    model_device,
    pad_batch,
    pad_id_of,
    progress,
    stop_token_ids,
)

PROMPT_STYLES = ("chat", "plain")
PLAIN_STOP_STRINGS = ("Question:",)

_NUMBER = r"-?\$?\s?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_MARKED = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(_NUMBER)


# --------------------------------------------------------------------------- answers


def normalize_number(text: str) -> str | None:
    """``"$1,234.50."`` -> ``"1234.50"``: drop ``$``, commas, spaces and a trailing dot; None if no number."""
    cleaned = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        float(cleaned)
    except ValueError:
        return None
    return cleaned


def extract_answer(completion: str) -> str | None:
    """The number after the first ``####``, else the last number in ``completion`` (normalized)."""
    marked = _MARKED.search(completion)
    if marked:
        return normalize_number(marked.group(1))
    numbers = _ANY_NUMBER.findall(completion)
    return normalize_number(numbers[-1]) if numbers else None


def reference_answer(answer: str) -> str:
    """The gold number of a GSM8K ``answer`` field (the text after ``####``)."""
    if "####" not in answer:
        raise UserError(f"GSM8K answer has no '#### <number>' line: {answer[-80:]!r}")
    value = normalize_number(answer.split("####")[-1].strip())
    if value is None:
        raise UserError(f"GSM8K answer does not end in a number after '####': {answer[-80:]!r}")
    return value


def same_number(pred: str | None, gold: str) -> bool:
    """Numeric equality of two normalized number strings (None never matches)."""
    if pred is None:
        return False
    a, b = float(pred), float(gold)
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


# --------------------------------------------------------------------------- prompts


def _check_record(record, i: int) -> None:
    if not isinstance(record, dict) or not isinstance(record.get("question"), str) or not isinstance(
        record.get("answer"), str
    ):
        raise UserError(f"GSM8K record {i} needs string fields 'question' and 'answer', got {record!r:.100}")


def gsm8k_prompt(tokenizer, question: str, shots: list[dict] = (), style: str = "chat") -> str:
    """The prompt text for one question (see the module docstring for both styles)."""
    if style == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise UserError("the tokenizer has no chat template; use prompt_style='plain' for a base model")
        messages = []
        for shot in shots:
            messages += [{"role": "user", "content": shot["question"]}, {"role": "assistant", "content": shot["answer"]}]
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if style == "plain":
        parts = [f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots]
        return "".join(parts) + f"Question: {question}\nAnswer:"
    raise UserError(f"unknown prompt style {style!r}; expected one of {PROMPT_STYLES}")


# --------------------------------------------------------------------------- generation


def generate_greedy(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    stop_strings: tuple[str, ...] = (),
    add_special_tokens: bool = False,
    show_progress: bool = False,
) -> list[str]:
    """Greedy completions of ``prompts``, batched by length with left padding.

    Each completion ends at the first stop token (eos / end-of-turn) or stop string, which is
    not included. ``add_special_tokens=False`` for chat-template text (the template already
    wrote any BOS); True for plain text, so a tokenizer that adds a BOS does so.
    """
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList, StopStringCriteria

    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, not {max_new_tokens}")
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    stops = stop_token_ids(tokenizer, model)
    pad = pad_id_of(tokenizer)
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad)
    # Built once: preparing a stop-string criterion scans the whole vocabulary.
    criteria = StoppingCriteriaList([StopStringCriteria(tokenizer, list(stop_strings))] if stop_strings else [])
    device = model_device(model)
    out: list[str | None] = [None] * len(prompts)
    with torch.inference_mode():
        batches = length_sorted_batches([len(e) for e in encoded], batch_size)
        for batch in progress(batches, total_rows=len(prompts), desc="gsm8k", enabled=show_progress):
            ids, mask = pad_batch([encoded[i] for i in batch], pad, side="left")
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg,
                stopping_criteria=criteria,
            )  # fmt: skip
            for row, i in enumerate(batch):
                new = gen[row, ids.shape[1] :].tolist()
                cut = next((k for k, t in enumerate(new) if t in stops), len(new))
                text = tokenizer.decode(new[:cut], skip_special_tokens=True)
                for s in stop_strings:
                    text = text.split(s)[0]
                out[i] = text
    return out  # type: ignore[return-value]


def gsm8k_accuracy(
    model,
    tokenizer,
    records: list[dict],
    *,
    shots: int = 0,
    fewshot_records: list[dict] | None = None,
    prompt_style: str = "chat",
    max_new_tokens: int = 256,
    batch_size: int = 16,
    show_progress: bool = False,
) -> dict:
    """Greedy-decoding accuracy on GSM8K-style ``{"question", "answer"}`` records.

    ``shots`` worked examples are the first ``shots`` of ``fewshot_records`` (the train split),
    the same for every question; ``show_progress`` draws a progress bar. Returns ``{"accuracy",
    "n", "correct", "shots", "prompt_style", "max_new_tokens", "seconds", "predictions"}``; each
    prediction holds the index, question, gold and predicted number, correctness and the completion.
    """
    if prompt_style not in PROMPT_STYLES:
        raise UserError(f"unknown prompt style {prompt_style!r}; expected one of {PROMPT_STYLES}")
    if not records:
        raise UserError("no GSM8K records to evaluate")
    for i, r in enumerate(records):
        _check_record(r, i)
    if shots < 0:
        raise UserError(f"shots must be >= 0, not {shots}")
    examples = list(fewshot_records or [])[:shots]
    if len(examples) < shots:
        raise UserError(f"{shots}-shot GSM8K needs {shots} few-shot records (the train split), got {len(examples)}")
    for i, r in enumerate(examples):
        _check_record(r, i)
    golds = [reference_answer(r["answer"]) for r in records]
    prompts = [gsm8k_prompt(tokenizer, r["question"], examples, prompt_style) for r in records]
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        completions = generate_greedy(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
            stop_strings=PLAIN_STOP_STRINGS if prompt_style == "plain" else (),
            add_special_tokens=prompt_style == "plain", show_progress=show_progress,
        )  # fmt: skip
    finally:
        model.train(was_training)
    predictions = []
    for i, (r, gold, text) in enumerate(zip(records, golds, completions)):
        pred = extract_answer(text)
        predictions.append({
            "index": i, "question": r["question"], "gold": gold, "pred": pred,
            "correct": same_number(pred, gold), "completion": text,
        })  # fmt: skip
    correct = sum(p["correct"] for p in predictions)
    return {
        "accuracy": correct / len(records),
        "n": len(records),
        "correct": correct,
        "shots": shots,
        "prompt_style": prompt_style,
        "max_new_tokens": max_new_tokens,
        "seconds": round(time.perf_counter() - start, 2),
        "predictions": predictions,
    }
