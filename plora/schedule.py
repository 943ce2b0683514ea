"""Learning-rate re-warmup after each unload, on top of any schedule.

After an unload the adapter restarts from scratch; ReLoRA and the PLoRA paper found a short
linear re-warmup helps. ``ReWarmup`` multiplies each group's scheduled LR by
``min(1, (n + 1) / warmup_steps)``, n = optimizer steps since the last unload.

It wraps the scheduler's ``step`` so that the scheduler always sees (and computes from) the
unscaled LR: exact for closed-form schedules (LambdaLR, every transformers schedule) and for
chained ones (ExponentialLR, ...). Without a scheduler, it scales the LR the run started with.
"""

from __future__ import annotations


class ReWarmup:
    def __init__(self, optimizer, scheduler=None, warmup_steps: int = 10):
        self.optimizer = optimizer
        self.warmup_steps = int(warmup_steps)
        self.since_unload: int | None = None  # None: no unload yet, factor 1
        self._unscaled = [group["lr"] for group in optimizer.param_groups]
        if scheduler is not None:
            self._wrap(scheduler)

    @property
    def factor(self) -> float:
        if self.since_unload is None:
            return 1.0
        return min(1.0, (self.since_unload + 1) / self.warmup_steps)

    def _wrap(self, scheduler) -> None:
        if getattr(scheduler, "_plora_rewarmup", None) is not None:
            raise ValueError("lr_scheduler: already wrapped by another PLoRA re-warmup")
        original = scheduler.step

        def step(*args, **kwargs):
            self._set(1.0)  # the scheduler computes from the unscaled LR
            out = original(*args, **kwargs)
            self._unscaled = [group["lr"] for group in self.optimizer.param_groups]
            self._set(self.factor)
            return out

        scheduler.step = step
        scheduler._plora_rewarmup = self

    def _set(self, factor: float) -> None:
        for group, lr in zip(self.optimizer.param_groups, self._unscaled):
            group["lr"] = lr * factor

    def restart(self) -> None:
        """Called at an unload: the next optimizer step runs at 1/warmup_steps of the LR."""
        self.since_unload = 0
        self._set(self.factor)

    def tick(self) -> None:
        """Called after each optimizer step (and after the scheduler's step)."""
        if self.since_unload is not None:
            self.since_unload += 1
            self._set(self.factor)

    def state_dict(self) -> dict:
        return {"since_unload": self.since_unload, "unscaled": list(self._unscaled)}

    def load_state_dict(self, state: dict) -> None:
        self.since_unload = state["since_unload"]
        self._unscaled = list(state["unscaled"])
        self._set(self.factor)
