"""plora.data: record formats, loss masks, truncation, packing, collation, built-in problems."""

from __future__ import annotations

import json
import re

import pytest
import torch

from plora import data as D
from plora.errors import UserError

GSM = {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "5"},
    ]
}
EOT = "<|im_end|>"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def unmasked_text(tokenizer, ex):
    return tokenizer.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != D.IGNORE_INDEX])


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "record, fmt, user, assistant",
    [
        (GSM, "gsm8k", GSM["question"], GSM["answer"]),
        (ALPACA, "alpaca", "Add the numbers.\n\n2 and 3", "5"),
        ({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca", "Say hi.", "hi"),
        ({"instruction": "Say hi.", "output": "hi"}, "alpaca", "Say hi.", "hi"),
    ],
)
def test_formats_detected_and_converted(record, fmt, user, assistant):
    assert D.detect_format(record) == fmt
    assert D.to_messages(record) == [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    with_system = D.to_messages(record, system="S")
    assert with_system[0] == {"role": "system", "content": "S"} and with_system[1:] == D.to_messages(record)


def test_chat_format_keeps_turns_and_own_system():
    assert D.detect_format(CHAT) == "chat"
    assert D.to_messages(CHAT, system="other") == CHAT["messages"]


def test_load_jsonl_json_and_limit(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps(GSM) + "\n\n" + json.dumps(GSM) + "\n")  # blank lines are skipped
    assert D.load_records(str(jsonl)) == [GSM, GSM]
    as_list = tmp_path / "b.json"
    as_list.write_text(json.dumps([ALPACA, ALPACA, ALPACA], indent=2))
    assert D.load_records(as_list, limit=2) == [ALPACA, ALPACA]
    jsonl_named_json = write_jsonl(tmp_path / "c.json", [CHAT])
    assert D.load_records(jsonl_named_json) == [CHAT]


@pytest.mark.parametrize(
    "content, message",
    [
        (json.dumps(GSM) + "\n" + json.dumps(GSM) + '\n{"question": "x", \n', r"bad\.jsonl line 3: malformed JSON"),
        ("", r"bad\.jsonl holds no records"),
        ("\n\n", r"holds no records"),
        (json.dumps(GSM) + "\n" + json.dumps({"prompt": "p", "completion": "c"}),
         (r"bad\.jsonl line 2: unknown fields \['completion', 'prompt'\]; expected question/answer \(GSM8K\), "
          r"instruction/input/output \(Alpaca\) or messages \(chat\)")),
        (json.dumps(GSM) + "\n" + json.dumps(ALPACA), r"line 2: alpaca record, but the first record is gsm8k"),
        ("[1, 2]", r"line 1: expected a JSON object, got list"),
        (json.dumps({"question": "q", "answer": 5}), r"line 1: field 'answer' must be a string, got int"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), r"line 1: the last message must be"),
        (json.dumps({"messages": [{"role": "bot", "content": "hi"}]}), r"line 1: message 0 must be an object"),
        (json.dumps({"messages": []}), r"line 1: 'messages' must be a non-empty list"),
    ],
)
def test_bad_jsonl_inputs(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        D.load_records(path)


def test_bad_json_list_reports_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"question": "q", "answer": "a"},\n  {"question": "q" "answer": "a"}\n]')
    with pytest.raises(UserError, match=r"bad\.json line 3: malformed JSON"):
        D.load_records(path)
    path.write_text(json.dumps([GSM, {"text": "x"}]))
    with pytest.raises(UserError, match=r"bad\.json record 2: unknown fields \['text'\]"):
        D.load_records(path)


def test_missing_file_directory_and_bad_limit(tmp_path):
    with pytest.raises(UserError, match="no such file: .*missing.jsonl"):
        D.load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="is a directory"):
        D.load_records(tmp_path)
    with pytest.raises(UserError, match="limit must be a positive integer"):
        D.load_records(write_jsonl(tmp_path / "a.jsonl", [GSM]), limit=0)


def test_hub_id_without_datasets_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UserError, match="no such file 'someone/some-data'.*install the `datasets` package"):
        D.load_records("someone/some-data")


# ----------------------------------------------------------------------------- loss mask


def test_loss_mask_covers_exactly_the_answer_and_end_of_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = D.to_messages(GSM)
    ex = D.encode(messages, tok, max_length=1024)
    full = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    prompt_text = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt_text, add_special_tokens=False)["input_ids"])
    n_response = len(tok(GSM["answer"] + EOT, add_special_tokens=False)["input_ids"])

    assert ex["input_ids"] == full and not ex["truncated"]
    expected = [D.IGNORE_INDEX] * len(full)
    expected[n_prompt : n_prompt + n_response] = full[n_prompt : n_prompt + n_response]
    assert ex["labels"] == expected  # -100 on system, user turn, template tokens and the final newline
    assert unmasked_text(tok, ex) == GSM["answer"] + EOT


def test_multi_turn_chat_trains_on_every_assistant_turn(tiny_tokenizer):
    ex = D.encode(D.to_messages(CHAT), tiny_tokenizer, max_length=1024)
    assert unmasked_text(tiny_tokenizer, ex) == "Hello!" + EOT + "5" + EOT


def test_template_without_prefix_property_falls_back_with_warning(tiny_tokenizer):
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    # The generation prompt ("assistant\n") is not how an assistant turn is rendered ("assistant: ").
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] }}{{ ': ' if m['role'] == 'assistant' else '\\n' }}"
        "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.warns(UserWarning, match="not prefix-stable"):
        ex = D.encode(D.to_messages(GSM), tok, max_length=1024)
    assert unmasked_text(tok, ex) == ": " + GSM["answer"] + EOT  # from the end of the common prefix


def test_tokenizer_without_chat_template_is_a_user_error(tiny_tokenizer):
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        D.encode(D.to_messages(GSM), tok, 64)


# ----------------------------------------------------------------------------- datasets


def test_truncation_is_counted_and_fully_cut_responses_dropped(tiny_tokenizer):
    tok = tiny_tokenizer
    full_len = len(D.encode(D.to_messages(GSM), tok, 10_000)["input_ids"])
    prompt_len = len(tok(tok.apply_chat_template(D.to_messages(GSM)[:1], tokenize=False,
                                                 add_generation_prompt=True), add_special_tokens=False)["input_ids"])
    short = {"question": "q", "answer": "a"}
    examples, stats = D.build_dataset([GSM, short], tok, max_length=prompt_len + 3)
    assert stats["truncated"] == 1 and stats["dropped"] == 0 and stats["rows"] == 2
    assert len(examples[0]["input_ids"]) == prompt_len + 3 < full_len
    assert stats["response_tokens"] == 3 + 2  # 3 kept of GSM's answer; "a" + end-of-turn
    _, stats = D.build_dataset([GSM, short], tok, max_length=prompt_len)  # GSM keeps no response token
    assert stats["dropped"] == 1 and stats["rows"] == 1 and stats["truncated"] == 1
    with pytest.raises(UserError, match="no record keeps any response token"):
        D.build_dataset([GSM], tok, max_length=prompt_len)
    with pytest.raises(UserError, match="empty"):
        D.build_dataset([], tok, max_length=64)


def test_packing_keeps_every_token_and_response_token(tiny_tokenizer):
    records = D.generate_arithmetic(12, seed=3)
    plain, s_plain = D.build_dataset(records, tiny_tokenizer, 1024)
    packed, s_packed = D.build_dataset(records, tiny_tokenizer, 1024, packing=True)
    assert s_packed["rows"] < s_plain["rows"] == 12
    assert s_packed["tokens"] == s_plain["tokens"]
    assert s_packed["response_tokens"] == s_plain["response_tokens"] > 0
    assert all(len(row["input_ids"]) <= 1024 for row in packed)
    # Whole examples, in order: the packed stream is the plain stream.
    assert [t for r in packed for t in r["labels"]] == [t for e in plain for t in e["labels"]]


def test_collator_pads_ids_labels_and_mask():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "truncated": False}, {"input_ids": [8], "labels": [8]}]
    out = D.collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert set(out) == {"input_ids", "labels", "attention_mask"}
    left = D.DataCollator(pad_id=0, padding_side="left", pad_to_multiple_of=4)(batch)
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert left["labels"].tolist()[1] == [-100, -100, -100, 8]


def test_padding_does_not_change_the_loss(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples, _ = D.build_dataset(D.generate_arithmetic(2, seed=1), tiny_tokenizer, 512)
    examples.sort(key=lambda e: len(e["input_ids"]))
    collator = D.DataCollator(tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        alone = model(**collator(examples[:1])).loss
        batch = collator(examples)
        assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # the first one is padded
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    n = len(examples[0]["input_ids"])
    padded = torch.nn.functional.cross_entropy(logits[0, : n - 1], batch["labels"][0, 1:n])
    assert torch.allclose(alone, padded, atol=1e-5)


def test_trainer_accepts_dataset_and_collator(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    examples, _ = D.build_dataset(D.generate_arithmetic(8, seed=0), tiny_tokenizer, 256)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args, train_dataset=examples,
                      data_collator=D.DataCollator(tiny_tokenizer.pad_token_id))
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


# ----------------------------------------------------------------------------- built-in problems

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def test_arithmetic_problems_are_correct_and_use_their_numbers():
    problems = D.generate_arithmetic(300, seed=7)
    assert len({p["question"] for p in problems}) == 300
    for p in problems:
        assert D.detect_format(p) == "gsm8k"
        *steps, final = p["answer"].split("\n")
        assert 2 <= len(steps) <= 4 and final.startswith("#### ")
        results, operands = [], set()
        for step in steps:
            (a, op, b, c), = EQUATION.findall(step)  # exactly one equation per step
            a, b, c = int(a), int(b), int(c)
            assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] and c > 0, step
            results.append(c)
            operands |= {a, b}
        assert int(final[5:]) == results[-1]
        assert {int(x) for x in re.findall(r"\d+", p["question"])} <= operands, p


def test_arithmetic_is_deterministic_and_varied():
    assert D.generate_arithmetic(50, seed=1) == D.generate_arithmetic(50, seed=1)
    assert D.generate_arithmetic(20, seed=1) == D.generate_arithmetic(50, seed=1)[:20]
    assert D.generate_arithmetic(50, seed=1) != D.generate_arithmetic(50, seed=2)
    openings = {" ".join(p["question"].split()[1:3]) for p in D.generate_arithmetic(200, seed=0)}
    assert len(openings) >= 10  # many templates, not one


def test_default_splits_are_disjoint(tiny_tokenizer):
    train, heldout = D.default_splits(n_train=300, n_heldout=100, seed=0)
    assert len(train) == 300 and len(heldout) == 100
    assert not {p["question"] for p in train} & {p["question"] for p in heldout}
    assert D.default_splits(300, 100, seed=0) == (train, heldout)
    full_train, full_heldout = D.default_splits()
    assert len(full_train) == D.DEFAULT_N_TRAIN and len(full_heldout) == D.DEFAULT_N_HELDOUT
    assert not {p["question"] for p in full_train} & {p["question"] for p in full_heldout}


# ----------------------------------------------------------------------------- real data


def test_real_gsm8k_train_file(shared_data, tiny_tokenizer):
    path = shared_data / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    records = D.load_records(str(path))
    assert len(records) == 7473
    assert all(D.detect_format(r) == "gsm8k" and "\n#### " in r["answer"] for r in records)
    examples, stats = D.build_dataset(records[:100], tiny_tokenizer, max_length=2048)
    assert stats["rows"] == 100 and stats["truncated"] == 0
    assert unmasked_text(tiny_tokenizer, examples[0]) == records[0]["answer"] + EOT
