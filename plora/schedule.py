"""Learning-rate re-warmup after each unload, on top of any schedule.

After an unload the adapter restarts from scratch; ReLoRA and the PLoRA paper found a short
linear re-warmup helps. ``ReWarmup`` multiplies each group's LR by
``min(1, (n + 1) / warmup_steps)`` during the optimizer step, n = optimizer steps since the last
unload, and puts the scheduled LR back right after it.

It works through the optimizer's step pre/post hooks, so it needs no access to the scheduler:
any scheduler (closed-form or chained) keeps seeing and computing from the unscaled LR, and
nothing of it ends up in the scheduler's or optimizer's ``state_dict``.
"""

from __future__ import annotations


class ReWarmup:
    def __init__(self, optimizer, warmup_steps: int = 10):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap accelerate's wrapper
        self.warmup_steps = int(warmup_steps)
        self.since_unload: int | None = None  # None: no unload yet, factor 1
        self._saved: list[float] | None = None
        self._handles = [
            self.optimizer.register_step_pre_hook(self._scale),
            self.optimizer.register_step_post_hook(self._restore),
        ]

    @property
    def factor(self) -> float:
        if self.since_unload is None:
            return 1.0
        return min(1.0, (self.since_unload + 1) / self.warmup_steps)

    def _scale(self, optimizer, args, kwargs) -> None:
        factor = self.factor
        if factor == 1.0:
            return
        self._saved = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor

    def _restore(self, optimizer, args, kwargs) -> None:
        if self._saved is not None:
            for group, lr in zip(optimizer.param_groups, self._saved):
                group["lr"] = lr
            self._saved = None

    def restart(self) -> None:
        """Called at an unload: the next optimizer step runs at 1/warmup_steps of the LR."""
        self.since_unload = 0

    def tick(self) -> None:
        """Called after each optimizer step."""
        if self.since_unload is not None:
            self.since_unload += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def state_dict(self) -> dict:
        return {"since_unload": self.since_unload}

    def load_state_dict(self, state: dict) -> None:
        self.since_unload = state["since_unload"]
