"""Small helpers shared by the evaluators: batching by length, padding, stop tokens.

Evaluation runs over thousands of prompts of very different lengths, so every evaluator
tokenizes first, sorts by length (longest first: an out-of-memory error shows up in the first
batch, not after an hour) and pads each batch only to its own longest row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

# End-of-turn markers of common chat templates. Generation stops at any of them that the
# tokenizer knows as one token, besides the tokenizer's and the generation config's eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def model_device(model):
    """The device of the model's first parameter (where inputs must go)."""
    return next(model.parameters()).device


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length, longest batch first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def progress(batches, *, total_rows: int, desc: str, enabled: bool):
    """Wrap an iterator of index batches in a tqdm bar counting rows (a no-op when disabled)."""
    if not enabled:
        yield from batches
        return
    from tqdm.auto import tqdm

    with tqdm(total=total_rows, desc=desc, unit="q", dynamic_ncols=True) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))


def pad_batch(rows: list[list[int]], pad_id: int, side: str):
    """``(input_ids, attention_mask)`` long tensors, padded on ``side`` ("left" or "right")."""
    import torch

    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        if side == "left":
            ids[i, longest - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, longest - len(r) :] = 1
        else:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
    return ids, mask


def pad_id_of(tokenizer) -> int:
    """The pad token id, falling back to eos (what generation pads finished rows with)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pad


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end a generated answer: eos of tokenizer and generation config, end-of-turn."""
    ids: list[int] = []

    def add(value):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)

    add(tokenizer.eos_token_id)
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        add(gen_cfg.eos_token_id)
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", []))
    for tok in END_OF_TURN_TOKENS:
        if tok in vocab and tok in special:
            add(vocab[tok])
    return ids
