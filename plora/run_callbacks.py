"""Trainer callbacks of ``plora train``: metrics file, progress bar, rank tracking, TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback


class MetricsCallback(TrainerCallback):
    """Appends every training log as one JSON line: step, loss, lr, unloads, tokens/s, time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._t0 = None
        self._last = None  # (time, tokens) at the previous log

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.time()
        self._last = (self._t0, state.num_input_tokens_seen or 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        now, tokens = time.time(), state.num_input_tokens_seen or 0
        dt = now - self._last[0]
        row = {
            "step": state.global_step,
            "loss": float(logs["loss"]),
            "lr": float(logs.get("learning_rate", 0.0)),
            "unloads": int(logs.get("plora/unloads", 0)),
            "tokens_per_s": (tokens - self._last[1]) / dt if dt > 0 else None,
            "time_s": now - self._t0,
            "epoch": logs.get("epoch"),
        }
        row.update({k: v for k, v in logs.items() if k.startswith("plora/") and k != "plora/unloads"})
        self._last = (now, tokens)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class ProgressBar(TrainerCallback):
    """One tqdm bar: step, loss, lr, unloads, tokens/s; tqdm adds elapsed time and ETA."""

    def __init__(self):
        self.bar = None
        self._t = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                        dynamic_ncols=True)
        self._t = (time.time(), state.num_input_tokens_seen or 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "loss" not in logs:
            return
        now, tokens = time.time(), state.num_input_tokens_seen or 0
        tps = (tokens - self._t[1]) / max(now - self._t[0], 1e-9)
        self._t = (now, tokens)
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}",
                             unloads=int(logs.get("plora/unloads", 0)), tok_s=f"{tps:.0f}", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RankTracker(TrainerCallback):
    """Every ``every`` steps, the mean effective and numerical rank of the accumulated update
    over ``layers`` sampled layers, as a ``"kind": "rank"`` metrics line."""

    def __init__(self, start: dict, every: int, layers: int, path: Path, residuals=None):
        self.start, self.every, self.layers, self.path = start, every, layers, Path(path)
        self.residuals = residuals  # () -> PLoRA's compensated-merge residuals (or None)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return
        from plora.analysis import update_report

        residuals = self.residuals() if self.residuals is not None else None
        agg = update_report(model, self.start, max_layers=self.layers, top_k=0, residuals=residuals)["aggregate"]
        row = {"kind": "rank", "step": state.global_step,
               "effective_rank": agg["effective_rank"]["mean"], "numerical_rank": agg["numerical_rank"]["mean"],
               "energy_rank_99": agg["energy_rank_99"]["mean"]}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def tensorboard_callback(log_dir: Path):
    """transformers' TensorBoard callback writing to ``log_dir`` (no environment variables needed)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))
