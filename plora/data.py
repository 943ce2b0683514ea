"""One data pipeline for LoRA, PLoRA and full fine-tuning.

records  ->  chat messages  ->  token ids + labels  ->  padded batches

- ``load_records(source)`` reads a JSON list or a JSONL file (or a hub dataset, if ``datasets``
  is installed) and checks every record against one of three formats, detected per file:
  GSM8K ``question``/``answer``, Alpaca ``instruction``/``input``/``output``, chat ``messages``.
- ``to_messages(record)`` turns any of them into user/assistant turns.
- ``encode(messages, tokenizer, max_length)`` applies the tokenizer's chat template and masks
  the loss to the assistant's responses: ``labels`` is ``-100`` on everything else.
- ``build_dataset`` encodes a list of records (optionally packing them) and counts what happened;
  ``DataCollator`` pads a batch for the transformers ``Trainer`` or a plain loop.
- ``generate_arithmetic`` / ``default_splits``: built-in multi-step arithmetic word problems in
  GSM8K format, so training and evaluation work with no download.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from plora.errors import UserError

IGNORE_INDEX = -100  # the label value the loss of transformers models skips

GSM8K, ALPACA, CHAT = "gsm8k", "alpaca", "chat"
_EXPECTED = "expected question/answer (GSM8K), instruction/input/output (Alpaca) or messages (chat)"
_ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------- loading records


def detect_format(record: dict) -> str | None:
    """``"gsm8k"``, ``"alpaca"`` or ``"chat"`` from a record's fields; None if none matches."""
    if "messages" in record:
        return CHAT
    if "question" in record and "answer" in record:
        return GSM8K
    if "instruction" in record and "output" in record:
        return ALPACA
    return None


def _check_record(record, where: str, expected_format: str | None) -> str:
    """Validate one record; return its format. ``where`` names it in errors ("f.jsonl line 3")."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    fmt = detect_format(record)
    if fmt is None:
        raise UserError(f"{where}: unknown fields {sorted(record)}; {_EXPECTED}")
    if expected_format is not None and fmt != expected_format:
        raise UserError(f"{where}: {fmt} record, but the first record is {expected_format}; use one format per file")
    if fmt == CHAT:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise UserError(
                    f"{where}: message {i} must be an object with 'role' in {list(_ROLES)} and a string "
                    f"'content', got {m!r:.80}"
                )
        if messages[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message must be the assistant's (it is what the model learns)")
    else:
        required = ("question", "answer") if fmt == GSM8K else ("instruction", "output")
        optional = () if fmt == GSM8K else ("input",)
        for field in required + optional:
            value = record.get(field)
            if (field in required or value is not None) and not isinstance(value, str):
                raise UserError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return fmt


def _read_json_file(path: Path, limit: int | None) -> list[tuple[str, object]]:
    """``(where, record)`` pairs from a JSON list or JSONL file, raising on malformed JSON."""
    name = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{name} is not UTF-8 text ({exc})") from exc
    if path.suffix.lower() != ".jsonl" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{name} line {exc.lineno}: malformed JSON ({exc.msg})") from exc
        return [(f"{name} record {i}", r) for i, r in enumerate(data[:limit] if limit else data, 1)]
    if path.suffix.lower() == ".json":  # one (possibly pretty-printed) object is one record
        try:
            return [(f"{name} record 1", json.loads(text))]
        except json.JSONDecodeError:
            pass  # JSON lines in a .json file
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{name} line {lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{name} line {lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
        if limit and len(out) >= limit:
            break
    return out


def _read_hub_dataset(spec: str, limit: int | None) -> list[tuple[str, object]]:
    """Rows of a hub dataset ``ID[:CONFIG][@SPLIT]`` (split defaults to train), via ``datasets``."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"no such file {spec!r} (to load it as a hub dataset, install the `datasets` package)"
        ) from None
    repo, _, split = spec.partition("@")
    repo, _, config = repo.partition(":")
    split = split or "train"
    if limit:
        split = f"{split}[:{limit}]"
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as exc:  # offline, unknown id, unknown split or config
        raise UserError(f"could not load {spec!r} as a file or hub dataset ({type(exc).__name__}: {exc})") from exc
    return [(f"{spec} row {i}", dict(row)) for i, row in enumerate(ds, 1)]


def load_records(source: str | Path, *, limit: int | None = None) -> list[dict]:
    """Read and validate the records of a JSON / JSONL file (or hub dataset ``ID[:CONFIG][@SPLIT]``).

    All records of one source must share one format. ``limit`` keeps the first ``limit`` records.
    Raises ``UserError`` naming the file and line for anything wrong.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive integer, not {limit!r}")
    path = Path(source).expanduser()
    if path.is_dir():
        raise UserError(f"{source} is a directory; give a .json or .jsonl file")
    if path.is_file():
        rows = _read_json_file(path, limit)
    elif path.suffix.lower() in (".json", ".jsonl") or str(source).startswith((".", "/", "~")):
        raise UserError(f"no such file: {source}")
    else:
        rows = _read_hub_dataset(str(source), limit)
    if not rows:
        raise UserError(f"{source} holds no records")
    fmt = None
    for where, record in rows:
        fmt = _check_record(record, where, fmt)
    return [record for _, record in rows]


def to_messages(record: dict, *, system: str | None = None) -> list[dict]:
    """User/assistant turns for a record of any known format; ``system`` is prepended if given
    and the record has no system message of its own."""
    fmt = detect_format(record)
    if fmt == CHAT:
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    elif fmt == GSM8K:
        messages = [
            {"role": "user", "content": record["question"]},
            {"role": "assistant", "content": record["answer"]},
        ]
    elif fmt == ALPACA:
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    else:
        raise UserError(f"unknown fields {sorted(record)}; {_EXPECTED}")
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


# --------------------------------------------------------------------------- tokenising


def _render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # The template writes the special tokens itself; adding them again would double the BOS.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode(messages: list[dict], tokenizer, max_length: int) -> dict:
    """Token ids of a conversation and labels that train only on the assistant's responses.

    For each assistant turn, the conversation up to it is rendered with the generation prompt
    (``<|im_start|>assistant\\n``) and the conversation including it without; the tokens between
    the two lengths are the response. That span is cut just after its last eos token (the
    end-of-turn token for ChatML templates), so the model learns to stop but not the newline the
    template writes after it. If a template breaks the prefix property (rendering earlier turns
    differently once later turns exist), the longest common prefix is used instead, with a
    warning. Sequences longer than ``max_length`` are cut at the right; ``truncated`` says so.

    Returns ``{"input_ids": [...], "labels": [...], "truncated": bool}``.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("the tokenizer has no chat template; use an instruct/chat model or add a template")
    if max_length < 2:
        raise UserError(f"max_length must be at least 2, not {max_length}")
    ids = _render_ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    eos = tokenizer.eos_token_id
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render_ids(tokenizer, messages[:turn], add_generation_prompt=True)
        upto = ids if turn == len(messages) - 1 else _render_ids(tokenizer, messages[: turn + 1], False)
        start, end = _common_prefix(prompt, ids), _common_prefix(upto, ids)
        if start != len(prompt) or end != len(upto):
            warnings.warn("chat template is not prefix-stable; response mask uses the common prefix", stacklevel=2)
        span = ids[start:end]
        if eos is not None and eos in span:
            end = start + len(span) - span[::-1].index(eos)
        labels[start:end] = ids[start:end]
    truncated = len(ids) > max_length
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "truncated": truncated}


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate whole examples, in order, into rows of at most ``max_length`` tokens.

    Examples are never split, so every response keeps its prompt. This is the simple kind of
    packing: positions run on across a row and attention crosses example boundaries (a later
    example can attend to an earlier one; its labels are unaffected). That costs a little
    purity for far fewer pad tokens; leave packing off for exact per-example training.
    """
    rows: list[dict] = []
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex["input_ids"]) > max_length:
            rows.append({"input_ids": ids, "labels": labels})
            ids, labels = [], []
        ids = ids + ex["input_ids"]
        labels = labels + ex["labels"]
    if ids:
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def build_dataset(
    records: list[dict], tokenizer, max_length: int, *, packing: bool = False, system: str | None = None
) -> tuple[list[dict], dict]:
    """Encode ``records`` into ``{"input_ids", "labels"}`` examples, plus statistics.

    Examples whose response is cut away entirely by truncation are dropped (they would carry
    no loss). ``stats``: records, rows (examples out, after packing), truncated, dropped,
    tokens, response_tokens (tokens with a label).
    """
    if not records:
        raise UserError("the dataset is empty")
    examples, truncated, dropped = [], 0, 0
    for record in records:
        ex = encode(to_messages(record, system=system), tokenizer, max_length)
        truncated += ex["truncated"]
        if all(label == IGNORE_INDEX for label in ex["labels"]):
            dropped += 1
            continue
        examples.append({"input_ids": ex["input_ids"], "labels": ex["labels"]})
    if not examples:
        raise UserError(f"no record keeps any response token within max_length={max_length}; raise it")
    if packing:
        examples = pack(examples, max_length)
    stats = {
        "records": len(records),
        "rows": len(examples),
        "truncated": truncated,
        "dropped": dropped,
        "tokens": sum(len(ex["input_ids"]) for ex in examples),
        "response_tokens": sum(sum(label != IGNORE_INDEX for label in ex["labels"]) for ex in examples),
    }
    return examples, stats


# --------------------------------------------------------------------------- batching


@dataclass
class DataCollator:
    """Pads a list of examples into ``input_ids`` / ``labels`` / ``attention_mask`` tensors.

    ``input_ids`` are padded with ``pad_id``, ``labels`` with -100 (so padding is never trained
    on, even when the pad token is also the eos token) and ``attention_mask`` with 0. Other keys
    of an example are ignored. Pass it as ``Trainer(data_collator=...)``.
    """

    pad_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        if not batch:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(ex["input_ids"]) for ex in batch)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids, labels, mask = [], [], []
        for ex in batch:
            n = len(ex["input_ids"])
            pad = longest - n
            rows = (list(ex["input_ids"]), list(ex.get("labels", ex["input_ids"])), [1] * n)
            fills = ([self.pad_id] * pad, [IGNORE_INDEX] * pad, [0] * pad)
            if self.padding_side == "left":
                rows = tuple(f + r for r, f in zip(rows, fills))
            else:
                rows = tuple(r + f for r, f in zip(rows, fills))
            ids.append(rows[0])
            labels.append(rows[1])
            mask.append(rows[2])
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }


def collate(batch: list[dict], pad_id: int) -> dict:
    """Pad ``batch`` on the right; see ``DataCollator``."""
    return DataCollator(pad_id)(batch)


# --------------------------------------------------------------------------- built-in data

_PEOPLE = [
    ("Mia", "she", "her"), ("Noah", "he", "his"), ("Ava", "she", "her"), ("Liam", "he", "his"),
    ("Zoe", "she", "her"), ("Omar", "he", "his"), ("Lena", "she", "her"), ("Ravi", "he", "his"),
    ("Sara", "she", "her"), ("Tom", "he", "his"), ("Yuki", "she", "her"), ("Ben", "he", "his"),
]  # fmt: skip
_PACKS = ["pencils", "stickers", "cards", "marbles", "buttons", "beads"]
_GOODS = [("notebooks", "pens"), ("apples", "pears"), ("cups", "plates"), ("books", "maps"), ("shirts", "hats")]
_MADE = ["toys", "bottles", "bricks", "chairs", "cans"]


def _eq(a: int, op: str, b: int) -> tuple[str, int]:
    """``("a op b = c", c)`` for integer arithmetic (division must be exact)."""
    c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    assert op != "/" or a % b == 0, (a, b)
    return f"{a} {op} {b} = {c}", c


def _shopping_left(r):
    (n, p, _), item = r.choice(_PEOPLE), r.choice(_PACKS)
    a, b = r.randint(2, 6), r.randint(3, 12)
    c = r.randint(1, a * b - 1)
    e1, t = _eq(a, "*", b)
    e2, left = _eq(t, "-", c)
    q = (f"{n} buys {a} packs of {item} with {b} {item} in each pack. {p.capitalize()} gives {c} {item} "
         f"to a friend. How many {item} does {n} have left?")  # fmt: skip
    return q, [f"{n} buys {e1} {item}.", f"After giving some away, {p} has {e2} {item} left."], left


def _change(r):
    (n, p, _), (g1, g2) = r.choice(_PEOPLE), r.choice(_GOODS)
    a, x, b, y = r.randint(2, 5), r.randint(2, 9), r.randint(2, 5), r.randint(2, 9)
    e1, c1 = _eq(a, "*", x)
    e2, c2 = _eq(b, "*", y)
    e3, total = _eq(c1, "+", c2)
    bill = 50 if total < 50 else 100
    e4, change = _eq(bill, "-", total)
    q = (f"{n} buys {a} {g1} at ${x} each and {b} {g2} at ${y} each. {p.capitalize()} pays with a "
         f"${bill} bill. How much change does {n} get?")  # fmt: skip
    steps = [f"The {g1} cost {e1} dollars.", f"The {g2} cost {e2} dollars.",
             f"Together they cost {e3} dollars.", f"The change is {e4} dollars."]  # fmt: skip
    return q, steps, change


def _sharing(r):
    n, p, _ = r.choice(_PEOPLE)
    k, each = r.randint(2, 6), r.randint(2, 9)
    b = r.choice([d for d in range(2, 13) if (k * each) % d == 0 and k * each // d > 1])
    a = k * each // b
    e1, t = _eq(a, "*", b)
    e2, share = _eq(t, "/", k)
    q = (f"{n} has {a} bags with {b} marbles in each bag. {p.capitalize()} shares all the marbles equally "
         f"among {k} friends. How many marbles does each friend get?")  # fmt: skip
    return q, [f"{n} has {e1} marbles.", f"Each friend gets {e2} marbles."], share


def _machine(r):
    thing = r.choice(_MADE)
    rate, h1, h2 = r.randint(3, 15), r.randint(2, 8), r.randint(2, 8)
    e1, hours = _eq(h1, "+", h2)
    e2, made = _eq(rate, "*", hours)
    q = (f"A machine makes {rate} {thing} per hour. It runs for {h1} hours on Monday and {h2} hours on "
         f"Tuesday. How many {thing} does it make in total?")  # fmt: skip
    return q, [f"It runs for {e1} hours.", f"It makes {e2} {thing}."], made


def _savings(r):
    n, p, _ = r.choice(_PEOPLE)
    s, w = r.randint(3, 12), r.randint(3, 8)
    c, d = r.randint(2, 10), r.randint(2, 10)
    if c + d >= s * w:
        s, w = s + 5, w + 2
    e1, saved = _eq(s, "*", w)
    e2, spent = _eq(c, "+", d)
    e3, left = _eq(saved, "-", spent)
    q = (f"{n} saves ${s} every week for {w} weeks. Then {p} spends ${c} on a game and ${d} on a book. "
         f"How much money does {n} have left?")  # fmt: skip
    return q, [f"{n} saves {e1} dollars.", f"{p.capitalize()} spends {e2} dollars.",
               f"{p.capitalize()} has {e3} dollars left."], left  # fmt: skip


def _cyclist(r):
    v1, t1, v2, t2 = r.randint(8, 20), r.randint(2, 4), r.randint(8, 20), r.randint(2, 4)
    e1, d1 = _eq(v1, "*", t1)
    e2, d2 = _eq(v2, "*", t2)
    e3, total = _eq(d1, "+", d2)
    q = (f"A cyclist rides at {v1} km per hour for {t1} hours and then at {v2} km per hour for {t2} "
         f"hours. How many kilometers does the cyclist ride in total?")  # fmt: skip
    return q, [f"First {e1} km.", f"Then {e2} km.", f"In total {e3} km."], total


def _baking(r):
    n, p, _ = r.choice(_PEOPLE)
    a, b, d = r.randint(2, 5), r.randint(6, 12), r.randint(3, 6)
    t = a * b
    boxes = r.randint(max(1, (t - 12) // d + 1), (t - 1) // d)
    c = t - d * boxes
    e1, _ = _eq(a, "*", b)
    e2, rest = _eq(t, "-", c)
    e3, filled = _eq(rest, "/", d)
    q = (f"{n} bakes {a} trays of {b} cookies. {p.capitalize()} eats {c} cookies and puts the rest into "
         f"boxes of {d}. How many boxes does {n} fill?")  # fmt: skip
    return q, [f"{n} bakes {e1} cookies.", f"{e2} cookies are left.", f"{p.capitalize()} fills {e3} boxes."], filled


def _reading(r):
    n, _, _ = r.choice(_PEOPLE)
    per_day, days = r.randint(5, 30), r.randint(2, 7)
    read = per_day * days
    total = read + r.randint(5, 100)
    e1, _ = _eq(per_day, "*", days)
    e2, left = _eq(total, "-", read)
    q = (f"{n} reads {per_day} pages a day for {days} days. The book has {total} pages. "
         f"How many pages are left to read?")  # fmt: skip
    return q, [f"{n} reads {e1} pages.", f"There are {e2} pages left."], left


def _garden(r):
    rows, cols, k, new = r.randint(3, 9), r.randint(4, 12), r.randint(1, 9), r.randint(2, 15)
    e1, t = _eq(rows, "*", cols)
    e2, u = _eq(t, "-", k)
    e3, now = _eq(u, "+", new)
    q = (f"A garden has {rows} rows with {cols} plants in each row. {k} plants die and the gardener "
         f"plants {new} new ones. How many plants are in the garden now?")  # fmt: skip
    return q, [f"There were {e1} plants.", f"After some die, {e2} remain.", f"Now there are {e3} plants."], now


def _tickets(r):
    adult, child, x, y = r.randint(8, 20), r.randint(3, 9), r.randint(1, 4), r.randint(1, 5)
    e1, c1 = _eq(adult, "*", x)
    e2, c2 = _eq(child, "*", y)
    e3, total = _eq(c1, "+", c2)
    q = (f"Tickets cost ${adult} for adults and ${child} for children. A family of {x} adults and {y} "
         f"children goes to the zoo. How much does the family pay?")  # fmt: skip
    return q, [f"Adults pay {e1} dollars.", f"Children pay {e2} dollars.", f"The family pays {e3} dollars."], total


def _ages(r):
    n, _, pos = r.choice(_PEOPLE)
    a, b, k = r.randint(6, 10), r.randint(3, 4), 3
    e1, brother = _eq(a, "+", b)
    e2, father = _eq(brother, "*", k)
    q = (f"{n} is {a} years old. {pos.capitalize()} brother is {b} years older. Their father is {k} times "
         f"as old as the brother. How old is the father?")  # fmt: skip
    return q, [f"The brother is {e1} years old.", f"The father is {e2} years old."], father


def _tank(r):
    cap, rate, mins, add = r.randint(60, 200), r.randint(2, 9), r.randint(3, 6), r.randint(5, 30)
    e1, out = _eq(rate, "*", mins)
    e2, u = _eq(cap, "-", out)
    e3, now = _eq(u, "+", add)
    q = (f"A tank holds {cap} liters of water. A pump removes {rate} liters per minute for {mins} "
         f"minutes, and then {add} liters are poured back in. How many liters are in the tank now?")  # fmt: skip
    return q, [f"The pump removes {e1} liters.", f"That leaves {e2} liters.", f"Now there are {e3} liters."], now


_TEMPLATES = (_shopping_left, _change, _sharing, _machine, _savings, _cyclist, _baking, _reading, _garden,
              _tickets, _ages, _tank)  # fmt: skip


def generate_arithmetic(n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct multi-step arithmetic word problems in GSM8K format, deterministic in ``seed``.

    Twelve templates (shopping, change, sharing, rates, savings, distance, baking, reading,
    gardens, tickets, ages, tanks), 2 to 4 steps, small positive integers, exact division.
    Each answer writes one step per line with its equation and ends with ``#### <number>``.
    The first ``k`` problems of a seed do not depend on ``n``.
    """
    if n < 0:
        raise UserError(f"n must be >= 0, not {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise UserError(f"could not generate {n} distinct problems; ask for fewer")
        question, steps, result = rng.choice(_TEMPLATES)(rng)
        if question in seen:
            continue
        seen.add(question)
        out.append({"question": question, "answer": "\n".join(steps) + f"\n#### {result}"})
    return out


DEFAULT_N_TRAIN = 2000
DEFAULT_N_HELDOUT = 200


def default_splits(
    n_train: int = DEFAULT_N_TRAIN, n_heldout: int = DEFAULT_N_HELDOUT, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """The built-in training and held-out sets: disjoint questions from one generator stream.

    Sizes: 2000 training problems are about one epoch for 250 steps at batch 8, so a few hundred
    steps see each problem once or twice; 200 held-out problems keep greedy-decoding evaluation
    short while giving accuracy to about +-3 points. With SmolLM2's chat template an example is
    95-140 tokens (median 117, of which about 30 are its default system prompt). On a CPU the
    time per step, not the data size, sets the run time: use a small batch there.
    """
    problems = generate_arithmetic(n_train + n_heldout, seed)
    return problems[:n_train], problems[n_train:]
