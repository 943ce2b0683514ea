"""Tests of plora.evaluate: answer extraction, prompts, subsets, scorers and ``plora eval``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from plora import evaluate as E
from plora.errors import UserError
from plora.eval_gsm8k import (
    extract_answer,
    generate_greedy,
    gsm8k_prompt,
    reference_answer,
    same_number,
)
from plora.eval_mmlu import (
    MMLUQuestion,
    format_question,
    load_mmlu,
    mmlu_prompt,
    score_letters,
    stratified_indices,
)  # fmt: skip

GSM = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A pen costs $2. How much do 5 pens cost?", "answer": "5 * 2 = 10\n#### 10"},
    {"question": "What is 1,000 minus 1?", "answer": "#### 999"},
]


# --------------------------------------------------------------------------- answer extraction


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("so 3 + 4 = 7\n#### 7", "7"),
        ("#### 5 and afterwards 12 more words 9", "5"),  # the marked number wins over later ones
        ("The answer is 42.", "42"),  # last number, trailing dot dropped
        ("first 3, then 8, finally 15", "15"),
        ("She earns $1,234,567 in total", "1234567"),  # commas and $ dropped
        ("#### $1,000", "1000"),
        ("The temperature drops to -5 degrees", "-5"),
        ("It weighs 3.75 kg.", "3.75"),
        ("about .5 of it", ".5"),
        ("no number at all", None),
        ("", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_numbers_compare_numerically():
    assert same_number("18.00", "18") and same_number("-3", "-3.0")
    assert not same_number("18.5", "18") and not same_number(None, "18")
    assert reference_answer("2 + 2 = 4\n#### 1,024") == "1024"
    with pytest.raises(UserError, match="####"):
        reference_answer("no marker 4")


# --------------------------------------------------------------------------- prompts


def test_mmlu_prompt_format():
    shot = MMLUQuestion("high_school_biology", 0, "What is a cell?", ("w", "x", "y", "z"), "B")
    q = MMLUQuestion("high_school_biology", 3, "  Which organelle?\n", ("a", "b", "c", "d"), "D")
    assert mmlu_prompt(q, [shot, shot]) == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "What is a cell?\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n"
        "What is a cell?\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n"
        "Which organelle?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    )
    assert format_question(q, with_answer=True).endswith("\nAnswer: D")


def test_gsm8k_prompts(tiny_tokenizer):
    chat = gsm8k_prompt(tiny_tokenizer, "Q?", [GSM[0]], "chat")
    assert chat.endswith("<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n")
    assert f"<|im_start|>user\n{GSM[0]['question']}<|im_end|>\n<|im_start|>assistant\n{GSM[0]['answer']}<|im_end|>" in chat
    plain = gsm8k_prompt(tiny_tokenizer, "Q?", [GSM[0]], "plain")
    assert plain == f"Question: {GSM[0]['question']}\nAnswer: {GSM[0]['answer']}\n\nQuestion: Q?\nAnswer:"
    with pytest.raises(UserError, match="prompt style"):
        gsm8k_prompt(tiny_tokenizer, "Q?", [], "fancy")


# --------------------------------------------------------------------------- subsets


def test_stratified_indices_proportional_and_deterministic():
    sizes = {"a": 100, "b": 300, "c": 7, "d": 593}
    picks = stratified_indices(sizes, 100)
    assert sum(len(v) for v in picks.values()) == 100
    assert {s: len(v) for s, v in picks.items()} == {"a": 10, "b": 30, "c": 1, "d": 59}
    assert picks == stratified_indices(dict(reversed(sizes.items())), 100)
    assert picks["a"] == list(range(5, 100, 10))  # evenly spaced, not the head of the file
    for s, idx in picks.items():
        assert len(set(idx)) == len(idx) and all(0 <= i < sizes[s] for i in idx)
    assert stratified_indices({"a": 3, "b": 2}, 10) == {"a": [0, 1, 2], "b": [0, 1]}


# --------------------------------------------------------------------------- tiny model end to end


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from plora.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir, device="cpu", padding_side="left")
    return model.eval(), tok


def _write_mmlu(root: Path, subjects=("anatomy", "college_physics"), n_test=3) -> Path:
    for split, n in (("dev", 5), ("test", n_test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for s in subjects:
            rows = [f'"Question {i}, about {s}?",one,two,"three, with comma","four\nlines",{"ABCD"[i % 4]}' for i in range(n)]
            (root / split / f"{s}_{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def test_gsm8k_accuracy_runs(tiny):
    model, tok = tiny
    res = E.gsm8k_accuracy(model, tok, GSM, max_new_tokens=6, batch_size=2)
    assert 0.0 <= res["accuracy"] <= 1.0 and res["n"] == 3 and len(res["predictions"]) == 3
    assert [p["gold"] for p in res["predictions"]] == ["7", "10", "999"]
    res = E.gsm8k_accuracy(model, tok, GSM[:2], shots=1, fewshot_records=GSM[2:], prompt_style="plain", max_new_tokens=4)
    assert res["shots"] == 1 and 0.0 <= res["accuracy"] <= 1.0
    with pytest.raises(UserError, match="few-shot"):
        E.gsm8k_accuracy(model, tok, GSM, shots=2, fewshot_records=GSM[:1])
    assert model.training is False


def test_generation_does_not_depend_on_batching(tiny):
    model, tok = tiny
    prompts = [gsm8k_prompt(tok, r["question"]) for r in GSM]
    one = generate_greedy(model, tok, prompts, max_new_tokens=8, batch_size=1)
    three = generate_greedy(model, tok, prompts, max_new_tokens=8, batch_size=3)
    assert one == three


class _ScriptedGenerator(torch.nn.Module):
    """A 'model' whose generate() appends the same tokens to every row: text, eos, more text."""

    def __init__(self, tok, text: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]
        self.continuation = ids(text) + [tok.eos_token_id] + ids(" after eos 99")
        self.generation_config = None

    def generate(self, input_ids, attention_mask, generation_config, stopping_criteria):
        cont = torch.tensor(self.continuation).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, cont], dim=1)


def test_completions_end_at_stop_token_and_stop_string(tiny_tokenizer):
    model = _ScriptedGenerator(tiny_tokenizer, "It is 5.\nQuestion: and 7")
    prompts = ["short", "a much longer prompt than the other"]  # different left padding per row
    assert generate_greedy(model, tiny_tokenizer, prompts, batch_size=2) == ["It is 5.\nQuestion: and 7"] * 2
    plain = generate_greedy(model, tiny_tokenizer, prompts, batch_size=2, stop_strings=("Question:",))
    assert plain == ["It is 5.\n"] * 2


def test_greedy_generation_matches_reference_model(tiny):
    """Left padding must not change what a row generates (vs an unpadded transformers generate)."""
    model, tok = tiny
    prompts = [gsm8k_prompt(tok, r["question"]) for r in GSM]
    ours = generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=3)
    for prompt, text in zip(prompts, ours):
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)  # fmt: skip
        new = ref[0, ids.shape[1] :].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert text == tok.decode(new, skip_special_tokens=True)


def test_heldout_loss_matches_transformers_loss(tiny):
    model, tok = tiny
    from plora.data import encode, to_messages

    res = E.heldout_loss(model, tok, GSM, batch_size=2)
    assert res["n"] == 3 and res["tokens"] > 0 and math.isfinite(res["loss"]) and res["loss"] > 0
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    ex = encode(to_messages(GSM[0]), tok, 1024)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss.item()
    assert res["per_record"][0]["loss"] == pytest.approx(ref, rel=1e-4)
    assert E.heldout_loss(model, tok, GSM, batch_size=1)["loss"] == pytest.approx(res["loss"], rel=1e-5)


def test_mmlu_accuracy_runs(tiny, tmp_path):
    model, tok = tiny
    root = _write_mmlu(tmp_path / "mmlu")
    res = E.mmlu_accuracy(model, tok, root, batch_size=4)
    assert res["n"] == 6 and not res["subset"] and 0.0 <= res["micro"] <= 1.0 and 0.0 <= res["macro"] <= 1.0
    assert set(res["per_subject"]) == {"anatomy", "college_physics"}
    p = res["predictions"][0]
    assert p["pred"] == max(p["logprobs"], key=p["logprobs"].get)
    sub = E.mmlu_accuracy(model, tok, root, limit=3, shots=2)
    assert sub["subset"] and sub["n"] == 3 and "subset" in sub["name"]


def test_mmlu_scores_do_not_depend_on_batching(tiny, tmp_path):
    model, tok = tiny
    root = _write_mmlu(tmp_path / "mmlu", n_test=4)
    test, dev = load_mmlu(root, "test"), load_mmlu(root, "dev")
    prompts = [mmlu_prompt(q, dev[q.subject][:k]) for k, q in enumerate(q for v in test.values() for q in v)]
    single = score_letters(model, tok, prompts, batch_size=1)
    batched = score_letters(model, tok, prompts, batch_size=8)
    assert torch.allclose(torch.tensor(single), torch.tensor(batched), atol=1e-4)


# --------------------------------------------------------------------------- MMLU scorer on a fake model


def _letter_tokenizer():
    """A byte-level tokenizer in which " A" .. " D" are single tokens (as in real BPE vocabularies)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [("Ġ", letter) for letter in "ABCD"]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")


class _FavouriteTokenModel(torch.nn.Module):
    """Logits that are 0 everywhere except ``+5`` on one token; counts forward calls."""

    def __init__(self, vocab: int, favourite: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.favourite, self.calls, self.kept = vocab, favourite, 0, []
        self.training = False

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
        from types import SimpleNamespace

        self.calls += 1
        self.kept.append(logits_to_keep)
        length = logits_to_keep or input_ids.shape[1]
        logits = torch.zeros(input_ids.shape[0], length, self.vocab)
        logits[..., self.favourite] = 5.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("letter", "ABCD")
def test_mmlu_scorer_picks_the_most_likely_letter(letter):
    tok = _letter_tokenizer()
    assert len(tok(" " + letter, add_special_tokens=False)["input_ids"]) == 1
    model = _FavouriteTokenModel(len(tok), tok.convert_tokens_to_ids("Ġ" + letter))
    q = MMLUQuestion("anatomy", 0, "Which?", ("a", "b", "c", "d"), "A")
    scores = score_letters(model, tok, [mmlu_prompt(q, [q] * 2), mmlu_prompt(q, [])], batch_size=2)
    assert model.calls == 1 and model.kept == [1]  # one forward, last position only
    for row in scores:
        best = "ABCD"[max(range(4), key=lambda k: row[k])]
        assert best == letter
        assert math.isclose(math.exp(max(row)), math.exp(5) / (math.exp(5) + len(tok) - 1), rel_tol=1e-5)


# --------------------------------------------------------------------------- the command line


def _files(tmp_path: Path) -> dict:
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps(r) + "\n" for r in GSM), encoding="utf-8")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in GSM), encoding="utf-8")
    return {"gsm": gsm, "mmlu": _write_mmlu(tmp_path / "mmlu"), "train": train}


def test_cli_eval_writes_results(tiny_model_dir, tmp_path, capsys):
    from plora.cli import main

    f, out = _files(tmp_path), tmp_path / "out"
    argv = ["eval", "--model", str(tiny_model_dir), "--gsm8k", str(f["gsm"]), "--mmlu", str(f["mmlu"]),
            "--loss-data", str(f["gsm"]), "--shots", "1", "--limit", "2", "--max-new-tokens", "4",
            "--batch-size", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"gsm8k", "mmlu", "loss"}
    assert results["tasks"]["gsm8k"]["n"] == 2 and results["tasks"]["gsm8k"]["shots"] == 1
    assert results["tasks"]["mmlu"]["subset"] and results["tasks"]["mmlu"]["subset_indices"]
    for task in ("gsm8k", "mmlu", "loss"):
        assert (out / results["tasks"][task]["predictions_file"]).is_file()
    assert "gsm8k" in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(argv) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--tasks", "loss"]) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--gsm8k", "nowhere/test.jsonl"], "nowhere/test.jsonl"),
        (["--mmlu", "nowhere/mmlu"], "nowhere/mmlu"),
        (["--tasks", "loss"], "--loss-data"),
        (["--tasks", "gsm8k,trivia", "--gsm8k", "x"], "trivia"),
        ([], "nothing to evaluate"),
    ],
)
def test_cli_eval_bad_input_exits_2(tiny_model_dir, tmp_path, capsys, extra, message):
    from plora.cli import main

    assert main(["eval", "--model", str(tiny_model_dir), "--device", "cpu", *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_shots_need_training_examples(tiny_model_dir, tmp_path, capsys):
    from plora.cli import main

    gsm = tmp_path / "alone" / "test.jsonl"
    gsm.parent.mkdir()
    gsm.write_text(json.dumps(GSM[0]) + "\n")
    assert main(["eval", "--model", str(tiny_model_dir), "--gsm8k", str(gsm), "--shots", "2"]) == 2
    assert "train.jsonl" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real data


def test_real_data_loads(shared_data):
    test = load_mmlu(shared_data / "mmlu", "test")
    assert len(test) == 57 and sum(len(v) for v in test.values()) == 14079
    assert all(len(v) == 5 for v in load_mmlu(shared_data / "mmlu", "dev").values())
    from plora.data import load_records

    records = load_records(shared_data / "gsm8k" / "test.jsonl")
    assert len(records) == 1319 and all(reference_answer(r["answer"]) is not None for r in records)
