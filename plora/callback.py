"""``PLoRACallback``: PLoRA inside the transformers ``Trainer`` or TRL's ``SFTTrainer``.

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[PLoRACallback(PLoRAConfig(unload_every=100))])
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

A thin shell over ``PeriodicUnloader``: it unloads after the optimizer step (the Trainer calls
``on_step_end`` only at gradient-accumulation boundaries), adds the unload statistics to the
trainer's logs (so TensorBoard / W&B get them), saves the unloaded base weights into every
checkpoint and restores them on ``resume_from_checkpoint``.
"""

from __future__ import annotations

import math
import os
import sys

from transformers import TrainerCallback

from plora.checkpoint import has_unload_state, load_unload_state, save_unload_state
from plora.config import PLoRAConfig
from plora.unloader import PeriodicUnloader


class PLoRACallback(TrainerCallback):
    def __init__(self, config: PLoRAConfig | None = None, resume_from: str | os.PathLike | None = None):
        self.config = config if config is not None else PLoRAConfig()
        if not isinstance(self.config, PLoRAConfig):
            raise TypeError(f"config must be a PLoRAConfig, got {type(self.config).__name__}")
        self.resume_from = resume_from
        self.unloader: PeriodicUnloader | None = None
        self._pending: dict[str, float] = {}
        self.history: list = []

    # --- set-up ------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError("PLoRACallback needs the Trainer's model and optimizer at on_train_begin")
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise ValueError("PLoRACallback: DeepSpeed and FSDP shard the base weights; run with DDP or one process")
        self.unloader = PeriodicUnloader(
            model, optimizer, self.config, lr_scheduler,
            total_steps=state.max_steps if state.max_steps and state.max_steps > 0 else None,
            steps_per_epoch=_steps_per_epoch(args, state, train_dataloader),
        )
        self._put_first_in_line()
        if state.global_step > 0:  # resuming
            directory = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if not has_unload_state(directory):
                raise FileNotFoundError(
                    f"resuming at step {state.global_step}, but {directory} holds no PLoRA state: the base weights "
                    "changed by earlier unloads would be lost. Pass PLoRACallback(config, resume_from=CHECKPOINT_DIR)"
                )
            load_unload_state(self.unloader, directory)

    def _put_first_in_line(self) -> None:
        """Move this callback before the reporting callbacks, so the unload stats it adds to
        ``logs`` reach TensorBoard / W&B. The Trainer puts user callbacks last and passes no
        handle to them; the handler is found on the call stack (best effort)."""
        frame = sys._getframe(1)
        for _ in range(5):  # the handler's call_event is a frame or two up
            if frame is None:
                return
            callbacks = getattr(frame.f_locals.get("self"), "callbacks", None)
            if isinstance(callbacks, list) and self in callbacks:
                callbacks.remove(self)
                callbacks.insert(0, self)
                return
            frame = frame.f_back

    # --- each step -----------------------------------------------------------------------------
    def on_step_end(self, args, state, control, **kwargs):
        stats = self.unloader.step(state.global_step)
        if stats is not None:
            self.history.append(stats)
            self._pending.update(stats.as_log())
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._pending and "loss" in logs:
            logs.update(self._pending)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending)  # the Trainer copied logs before on_log
            self._pending = {}
        if logs is not None and self.unloader is not None:
            logs.setdefault("plora/unloads", float(self.unloader.num_unloads))
        return control

    # --- checkpoints ---------------------------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        if self.unloader is None or not state.is_world_process_zero:
            return control
        directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        save_unload_state(self.unloader, directory)
        return control


def _steps_per_epoch(args, state, train_dataloader) -> float | None:
    try:
        batches = len(train_dataloader) if train_dataloader is not None else None
    except TypeError:
        batches = None
    if batches:
        return max(1, math.ceil(batches / max(1, args.gradient_accumulation_steps)))
    if state.max_steps and state.num_train_epochs:
        return state.max_steps / state.num_train_epochs
    return None
