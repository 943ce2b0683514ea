"""``PLoRAConfig``: when to unload, how much, and what happens around an unload.

Validated on construction: every error names the field and what it accepts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

UNLOAD_POINT_FIELDS = ("unload_every", "stages", "unload_every_epochs")
OPTIMIZER_RESETS = ("reset", "prune", "keep")
LR_STRATEGIES = ("global", "rewarmup")
MERGE_PRECISIONS = ("auto", "direct", "compensated", "stochastic")
NONFINITE_POLICIES = ("raise", "skip")
DEFAULT_UNLOAD_EVERY = 100


@dataclass
class PLoRAConfig:
    """Periodic unloading of a LoRA adapter into its base weights.

    Exactly one of ``unload_every``, ``stages`` and ``unload_every_epochs`` sets the unloading
    points; with none given, ``unload_every`` defaults to 100 optimizer steps.
    """

    unload_every: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps between unloads (1 = every mini-batch). Default 100."},
    )
    stages: int | None = field(
        default=None,
        metadata={"help": "Split the run into this many equal stages (needs the total step count)."},
    )
    unload_every_epochs: float | None = field(
        default=None,
        metadata={"help": "Unload every this fraction of an epoch (1.0 = at each epoch end; needs steps per epoch)."},
    )
    momentum: float = field(
        default=1.0,
        metadata={"help": "Share m in (0, 1] of the adapter's update moved into the base at an unload (1 = plain PLoRA)."},
    )
    optimizer_reset: str = field(
        default="reset",
        metadata={"help": "Adapter optimizer state at an unload: 'reset' (fresh state), 'prune' (zero the smallest "
                  "prune_ratio by magnitude, ReLoRA-style) or 'keep'."},
    )
    prune_ratio: float = field(
        default=0.9, metadata={"help": "Share of each adapter optimizer-state tensor zeroed by optimizer_reset='prune'."}
    )
    lr_strategy: str = field(
        default="global",
        metadata={"help": "'global': the run's own schedule; 'rewarmup': linear re-warmup after each unload."},
    )
    rewarmup_steps: int = field(default=10, metadata={"help": "Steps of the re-warmup after each unload."})
    merge_precision: str = field(
        default="auto",
        metadata={"help": "How updates enter the base weights: 'direct' (in the weight's dtype), 'compensated' "
                  "(a bf16 residual buffer keeps what rounding dropped; +2 bytes per adapted weight), "
                  "'stochastic' (unbiased stochastic rounding, bf16 only, no memory) or 'auto' "
                  "(direct for fp32/fp64 weights, compensated for bf16/fp16)."},
    )
    on_nonfinite: str = field(
        default="raise",
        metadata={"help": "An adapter holding NaN/Inf is never merged: 'raise' an error or 'skip' those layers with a warning."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the adapter re-initialisation (with layer and unload count)."})
    adapter_name: str | None = field(
        default=None, metadata={"help": "Adapter to unload; needed only when the model has several."}
    )
    landed_sample_rows: int = field(
        default=64,
        metadata={"help": "Rows per layer sampled to measure landed_share (0 = every row; exact but slower)."},
    )

    def __post_init__(self) -> None:
        given = [name for name in UNLOAD_POINT_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"unloading points: set only one of {list(UNLOAD_POINT_FIELDS)}, got {given}")
        if not given:
            self.unload_every = DEFAULT_UNLOAD_EVERY
        _positive_int("unload_every", self.unload_every, optional=True)
        _positive_int("stages", self.stages, optional=True)
        if self.unload_every_epochs is not None:
            _number("unload_every_epochs", self.unload_every_epochs)
            if not self.unload_every_epochs > 0:
                raise ValueError(f"unload_every_epochs must be > 0 (a fraction of an epoch), got {self.unload_every_epochs}")
        _number("momentum", self.momentum)
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1] (1 = plain PLoRA), got {self.momentum}")
        _choice("optimizer_reset", self.optimizer_reset, OPTIMIZER_RESETS)
        _number("prune_ratio", self.prune_ratio)
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")
        _choice("lr_strategy", self.lr_strategy, LR_STRATEGIES)
        _positive_int("rewarmup_steps", self.rewarmup_steps)
        _choice("merge_precision", self.merge_precision, MERGE_PRECISIONS)
        _choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.adapter_name is not None and not isinstance(self.adapter_name, str):
            raise TypeError(f"adapter_name must be a string or None, got {type(self.adapter_name).__name__}")
        if not isinstance(self.landed_sample_rows, int) or self.landed_sample_rows < 0:
            raise ValueError(f"landed_sample_rows must be an int >= 0 (0 = all rows), got {self.landed_sample_rows}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PLoRAConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"PLoRAConfig: unknown fields {unknown}; accepted: {sorted(known)}")
        return cls(**data)

    def describe_points(self) -> str:
        """Human-readable unloading points, for logs and reports."""
        if self.stages is not None:
            return f"{self.stages} stages"
        if self.unload_every_epochs is not None:
            return f"every {self.unload_every_epochs:g} epoch"
        return f"every {self.unload_every} steps"


def _positive_int(name: str, value, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int (>= 1), got {value}")


def _number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")


def _choice(name: str, value, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {list(accepted)}, got {value!r}")
