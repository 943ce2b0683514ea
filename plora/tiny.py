"""A tiny random-weight Llama model with an offline tokenizer, for tests and CI.

``make_tiny_model_dir(path)`` writes a directory that ``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load without any download. It mirrors the shape of the
real default model (SmolLM2: Llama architecture, tied embeddings, ChatML chat template with a
default system prompt, ``<|im_end|>`` as both end-of-turn and pad token) at a size that builds
in well under a second, so tests of LoRA, PLoRA and full fine-tuning run on any CPU.

The tokenizer is byte-level with no merges: every byte is one token, so any text (including
non-ASCII) round-trips exactly, and token counts are easy to reason about in tests.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DEFAULT_SYSTEM_PROMPT = "You are a tiny test model."

# ChatML as SmolLM2 writes it: a default system turn when none is given, then one block per
# message, and "<|im_start|>assistant\n" as the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_tokenizer():
    """A byte-level ``PreTrainedTokenizerFast`` with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS),
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_model_dir(
    path: str | Path,
    *,
    vocab: int = 320,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    seed: int = 0,
) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` plus its tokenizer to ``path`` and return it.

    ``vocab`` is the embedding size; it must cover the tokenizer (259 tokens) and is padded
    above it like real models' vocabularies. The same ``seed`` gives the same weights.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer()
    if vocab < len(tok):
        raise ValueError(f"vocab={vocab} is smaller than the tiny tokenizer ({len(tok)} tokens)")
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    # Seed a private generator state: building the model must not disturb the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
