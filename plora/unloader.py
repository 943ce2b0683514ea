"""``PeriodicUnloader``: PLoRA for any training loop.

    unloader = PeriodicUnloader(model, optimizer, PLoRAConfig(unload_every=100), lr_scheduler)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step(); lr_scheduler.step(); optimizer.zero_grad()
        stats = unloader.step()          # None, or the UnloadStats of the unload it made

Call ``step()`` once per optimizer step (with gradient accumulation: once per accumulated step).
The LR re-warmup acts through the optimizer's step hooks, so it composes with any scheduler;
``lr_scheduler`` is accepted for the signature's sake and may be left out.
``state_dict()`` holds the counters and, for compensated merging, the residual buffers;
together with the base weights (``plora.checkpoint``) it gives an exact resume.
"""

from __future__ import annotations

import torch
from torch import nn

from plora.config import PLoRAConfig
from plora.layers import adapted_layers
from plora.optim import AdapterStateReset, check_optimizer_holds
from plora.schedule import ReWarmup
from plora.unload import UnloadPlan, UnloadStats, unload_


# Fields that must match between a checkpoint and the resuming run for the resume to be exact.
_RESUME_FIELDS = ("unload_every", "stages", "unload_every_epochs", "momentum", "seed", "merge_precision")


class PeriodicUnloader:
    def __init__(
        self,
        model: nn.Module,
        optimizer,
        config: PLoRAConfig | None = None,
        lr_scheduler=None,
        total_steps: int | None = None,
        steps_per_epoch: int | float | None = None,
    ):
        self.config = config if config is not None else PLoRAConfig()
        if not isinstance(self.config, PLoRAConfig):
            raise TypeError(f"config must be a PLoRAConfig, got {type(self.config).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.layers = adapted_layers(model, self.config.adapter_name)
        self.adapter_params = [t for layer in self.layers for t in layer.adapter_tensors()]
        self.plan = UnloadPlan(self.layers)  # what each unload does per layer; revalidated at every unload
        check_optimizer_holds(optimizer, self.adapter_params)
        self._reset_state = AdapterStateReset(optimizer, self.adapter_params)
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self._check_schedule_inputs()
        self.rewarmup = (
            ReWarmup(optimizer, self.config.rewarmup_steps)
            if self.config.lr_strategy == "rewarmup"
            else None
        )
        self.num_steps = 0
        self.num_unloads = 0
        self.residuals: dict[str, torch.Tensor] = {}
        self.last_stats: UnloadStats | None = None

    def _check_schedule_inputs(self) -> None:
        c = self.config
        if c.stages is not None:
            if not isinstance(self.total_steps, int) or self.total_steps <= 0:
                raise ValueError(f"stages={c.stages} needs total_steps (a positive int), got {self.total_steps!r}")
        if c.unload_every_epochs is not None:
            if not isinstance(self.steps_per_epoch, (int, float)) or self.steps_per_epoch <= 0:
                raise ValueError(
                    f"unload_every_epochs={c.unload_every_epochs} needs steps_per_epoch (> 0), got {self.steps_per_epoch!r}"
                )

    # --- when -----------------------------------------------------------------------------
    def is_due(self, step: int) -> bool:
        """Whether an unload follows optimizer step ``step`` (1 = after the first step)."""
        c = self.config
        if step <= 0:
            return False
        if c.unload_every is not None:
            return step % c.unload_every == 0
        if c.stages is not None:
            boundaries = {round(i * self.total_steps / c.stages) for i in range(1, c.stages)}
            return step in boundaries
        period = c.unload_every_epochs * self.steps_per_epoch
        j = max(1, round(step / period))
        return any(max(1, round(k * period)) == step for k in (j - 1, j, j + 1) if k >= 1)

    # --- what -----------------------------------------------------------------------------
    def step(self, global_step: int | None = None) -> UnloadStats | None:
        """Call after each optimizer step. Unloads when due; returns its stats or None.

        ``global_step`` (optional) is the caller's count of completed optimizer steps; by
        default the unloader counts calls itself.
        """
        self.num_steps = self.num_steps + 1 if global_step is None else int(global_step)
        if self.rewarmup is not None:
            self.rewarmup.tick()
        if not self.is_due(self.num_steps):
            return None
        return self.unload()

    def unload(self) -> UnloadStats:
        """Unload now (whether due or not), then reset the adapter's optimizer state and LR as configured."""
        c = self.config
        stats = unload_(
            self.model,
            c.momentum,
            merge_precision=c.merge_precision,
            seed=c.seed,
            unload_index=self.num_unloads,
            on_nonfinite=c.on_nonfinite,
            residuals=self.residuals,
            landed_sample_rows=c.landed_sample_rows,
            plan=self.plan,
        )
        self._reset_state(c.optimizer_reset, c.prune_ratio)
        if self.rewarmup is not None:
            self.rewarmup.restart()
        stats.step = self.num_steps
        self.num_unloads += 1
        self.last_stats = stats
        return stats

    # --- resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "num_unloads": self.num_unloads,
            "config": self.config.to_dict(),
            "rewarmup": self.rewarmup.state_dict() if self.rewarmup is not None else None,
            "residuals": dict(self.residuals),
        }

    def load_state_dict(self, state: dict) -> None:
        saved, now = state.get("config") or {}, self.config.to_dict()
        diff = sorted(k for k in _RESUME_FIELDS if k in saved and saved[k] != now.get(k))
        if diff:
            raise ValueError(f"load_state_dict: the checkpoint was made with a different PLoRAConfig (fields {diff})")
        self.num_steps = int(state["num_steps"])
        self.num_unloads = int(state["num_unloads"])
        if self.rewarmup is not None and state.get("rewarmup") is not None:
            self.rewarmup.load_state_dict(state["rewarmup"])
        self.residuals = {}
        weights = {layer.name: layer.weight for layer in self.layers}
        for name, tensor in (state.get("residuals") or {}).items():
            if name not in weights:
                raise ValueError(f"load_state_dict: residual for unknown layer {name!r}")
            self.residuals[name] = tensor.to(device=weights[name].device, dtype=torch.bfloat16).clone()

    def __repr__(self) -> str:
        return (
            f"PeriodicUnloader({len(self.layers)} layers, {self.config.describe_points()}, "
            f"momentum={self.config.momentum}, unloads={self.num_unloads})"
        )
