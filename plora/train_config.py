"""The configuration of ``plora train``: a typed dataclass that doubles as YAML recipe and CLI help.

A run is described by a recipe (YAML shipped in ``plora/recipes/`` or a user file) plus
``--key value`` overrides (``--lr 1e-4``, ``--plora.momentum 0.5``). Unknown keys and bad
values are rejected with a message naming the key. The resolved config is saved in the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from plora.config import UNLOAD_POINT_FIELDS, PLoRAConfig
from plora.errors import UserError

METHODS = ("lora", "plora", "full")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass
class LoraSettings:
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rslora)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: str | list = field(
        default="all-linear", metadata={"help": "'all-linear', 'attention', or a list of module names"}
    )
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling"})


@dataclass
class PLoRASettings:
    unload_every: int | None = None
    stages: int | None = None
    unload_every_epochs: float | None = None
    momentum: float = 1.0
    optimizer_reset: str = "reset"
    prune_ratio: float = 0.9
    lr_strategy: str = "global"
    rewarmup_steps: int = 10
    merge_precision: str = "auto"
    on_nonfinite: str = "raise"

    def to_plora_config(self, seed: int) -> PLoRAConfig:
        return PLoRAConfig(seed=seed, **dataclasses.asdict(self))


@dataclass
class EvalSettings:
    heldout_limit: int = field(default=50, metadata={"help": "held-out questions scored by greedy generation (0 = off)"})
    loss_limit: int = field(default=200, metadata={"help": "held-out records for the held-out loss (0 = off)"})
    max_new_tokens: int = field(default=160, metadata={"help": "generation length for accuracy"})
    batch_size: int = field(default=32, metadata={"help": "evaluation batch size"})
    before: bool = field(default=True, metadata={"help": "also evaluate the model before training"})
    train_slice: int = field(default=64, metadata={"help": "training records scored before/after (learning ability)"})
    rank_every: int = field(default=0, metadata={"help": "track the effective rank of the update every N steps (0 = off)"})
    rank_layers: int = field(default=8, metadata={"help": "layers sampled for rank tracking"})


@dataclass
class TrainConfig:
    method: str = field(default="plora", metadata={"help": "lora | plora | full"})
    model: str | None = field(default=None, metadata={"help": "model dir, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)"})
    data: str | None = field(default=None, metadata={"help": "training data (JSON/JSONL, hub id); default: built-in arithmetic problems"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out data; default: the built-in held-out split"})
    output_dir: str | None = field(default=None, metadata={"help": "run directory (default runs/<method>-<time>)"})
    data_limit: int | None = field(default=None, metadata={"help": "use only the first N training records"})
    max_length: int = 512
    packing: bool = False
    group_by_length: bool = field(
        default=True, metadata={"help": "batch examples of similar length (less padding, same data per epoch)"}
    )
    epochs: float = 1.0
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; overrides epochs when > 0"})
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    weights_dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 base for lora/plora on CUDA, fp32 otherwise) | float32 | bfloat16"}
    )
    logging_steps: int = 5
    save_steps: int = 200
    save_total_limit: int = 2
    analysis: bool = field(default=True, metadata={"help": "keep W_start to report the accumulated update's spectra"})
    lora: LoraSettings = field(default_factory=LoraSettings)
    plora: PLoRASettings = field(default_factory=PLoRASettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if not isinstance(self.lora.r, int) or isinstance(self.lora.r, bool) or self.lora.r <= 0:
            raise UserError(f"lora.r (rank) must be a positive int, got {self.lora.r!r}")
        for name in ("batch_size", "grad_accum", "max_length", "logging_steps", "save_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise UserError(f"lr must be a positive number, got {self.lr!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise UserError(f"lr_scheduler must be one of {list(SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.max_steps <= 0 and not self.epochs > 0:
            raise UserError(f"set epochs > 0 or max_steps > 0 (epochs={self.epochs}, max_steps={self.max_steps})")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise UserError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.weights_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"weights_dtype must be auto, float32, bfloat16 or float16, got {self.weights_dtype!r}")
        if self.method == "plora":
            try:
                self.plora.to_plora_config(self.seed)
            except (ValueError, TypeError) as exc:
                raise UserError(f"plora.{exc}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _from_dict(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise UserError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key not in known:
            raise UserError(f"unknown config key {where + key!r}; known keys: {sorted(known)}")
        sub = _SECTIONS.get((cls, key))
        kwargs[key] = _from_dict(sub, value or {}, f"{where}{key}.") if sub else value
    return cls(**kwargs)


_SECTIONS = {(TrainConfig, "lora"): LoraSettings, (TrainConfig, "plora"): PLoRASettings, (TrainConfig, "eval"): EvalSettings}


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("plora.recipes").iterdir() if p.name.endswith(".yaml"))


def read_recipe(name_or_path: str) -> dict:
    """A recipe by shipped name (``quickstart``) or YAML path, as a dict."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = resources.files("plora.recipes") / f"{name_or_path}.yaml"
        if not shipped.is_file():
            raise UserError(f"recipe {name_or_path!r} is neither a YAML file nor a shipped recipe {recipe_names()}")
        text = shipped.read_text()
    else:
        text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {name_or_path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {name_or_path}: expected a mapping of keys to values")
    return data


def parse_overrides(tokens: list[str]) -> dict:
    """``["--lr", "1e-4", "--plora.momentum=0.5"]`` -> nested dict with YAML-typed values."""
    out: dict = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise UserError(f"unexpected argument {token!r}; overrides look like --key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise UserError(f"override --{key} needs a value")
            value = tokens[i + 1]
            i += 1
        i += 1
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        node = out
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parsed
    return out


def merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, section by section. PLoRA's unloading points are one choice: an
    ``extra`` that names one of them replaces whichever ``base`` named (they exclude each other)."""
    out = dict(base)
    for key, value in extra.items():
        key = key.replace("-", "_")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            parent = out[key]
            if key == "plora" and {k.replace("-", "_") for k in value} & set(UNLOAD_POINT_FIELDS):
                parent = {k: v for k, v in parent.items() if k.replace("-", "_") not in UNLOAD_POINT_FIELDS}
            out[key] = merge(parent, value)
        else:
            out[key] = value
    return out


def build_config(recipe: str | None, overrides: dict) -> TrainConfig:
    data = read_recipe(recipe) if recipe else {}
    cfg = _from_dict(TrainConfig, merge(data, overrides), "")
    cfg.validate()
    return cfg


def load_config_file(path: Path) -> TrainConfig:
    data = yaml.safe_load(path.read_text()) or {}
    cfg = _from_dict(TrainConfig, data, "")
    cfg.validate()
    return cfg
