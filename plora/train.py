"""``plora train``: supervised instruction tuning with LoRA, PLoRA or full fine-tuning.

One data pipeline and one loop (the transformers ``Trainer``) for all three methods, so that
comparisons are fair; PLoRA is LoRA plus ``PLoRACallback``. Examples::

    plora train                                   # the embedded default: quickstart recipe
    plora train --recipe plora --data ../shared/data/gsm8k/train.jsonl --max_steps 500
    plora train --method lora --lora.r 64 --lr 1e-4 --output_dir runs/lora64
    plora train --resume runs/plora-20261128-2310  # continue exactly where a run stopped

A run directory holds: config.yaml (resolved), metrics.jsonl, tb/ (TensorBoard), checkpoints/,
model/ (every update merged; loads with AutoModelForCausalLM.from_pretrained), adapter/ (LoRA
only), summary.json, spectra.json, loss.png.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import time
from pathlib import Path

import yaml

from plora.errors import UserError
from plora.train_config import TrainConfig, build_config, load_config_file, parse_overrides, recipe_names

DEFAULT_RECIPE = "quickstart"


# --------------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune with LoRA, PLoRA or full fine-tuning",
        description="Fine-tune a causal LM. Any config key can be overridden: --lr 1e-4, --plora.momentum 0.5, "
        "--lora.r 16 (see the shipped recipes: " + ", ".join(recipe_names()) + ").",
    )
    p.add_argument("--recipe", default=None, help=f"shipped recipe name or YAML path (default: {DEFAULT_RECIPE})")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli_train, accepts_overrides=True)


def _cli_train(args) -> int:
    overrides = parse_overrides(getattr(args, "overrides", []) or [])
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume {run_dir}: not a plora run directory (no config.yaml)")
        if overrides or args.recipe:
            raise UserError("--resume continues a run with its saved config; drop the overrides and --recipe")
        cfg = load_config_file(run_dir / "config.yaml")
        cfg.output_dir = str(run_dir)
    else:
        cfg = build_config(args.recipe or DEFAULT_RECIPE, overrides)
    summary = train(cfg, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.quiet)
    _print_summary(summary, cfg)
    return 0


def _print_summary(summary: dict, cfg: TrainConfig) -> None:
    def pct(x):
        return "—" if x is None else f"{100 * x:.1f}%"

    before, after = summary.get("heldout_acc_before"), summary.get("heldout_acc")
    print(f"\nrun: {summary['run_dir']}")
    print(f"  model (all updates merged): {Path(summary['run_dir']) / 'model'}")
    print(f"  metrics: {Path(summary['run_dir']) / 'metrics.jsonl'}   TensorBoard: {Path(summary['run_dir']) / 'tb'}")
    if after is not None:
        print(f"  held-out accuracy: before {pct(before)} -> after {pct(after)} (n={summary.get('heldout_n')})")
    if summary.get("heldout_loss") is not None:
        b = summary.get("heldout_loss_before")
        print(f"  held-out loss: before {b:.4f} -> after {summary['heldout_loss']:.4f}" if b is not None
              else f"  held-out loss: {summary['heldout_loss']:.4f}")
    if summary.get("numerical_rank") is not None:
        print(f"  accumulated update: mean numerical rank {summary['numerical_rank']:.1f}, "
              f"mean effective rank {summary['effective_rank']:.1f} (LoRA rank {cfg.lora.r})")


# --------------------------------------------------------------------------------- the run
def _prepare_output(cfg: TrainConfig, resume: bool, overwrite: bool) -> Path:
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(cfg.output_dir)
    if resume:
        return run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir {run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"output_dir {run_dir} exists and is not empty; pass --overwrite or choose another")
    return run_dir


def _load_data(cfg: TrainConfig):
    from plora import data as D

    if cfg.data is None:
        train_records, heldout = D.default_splits(seed=cfg.seed)
    else:
        train_records = D.load_records(cfg.data)
        heldout = None
    if cfg.eval_data is not None:
        heldout = D.load_records(cfg.eval_data)
    if cfg.data_limit:
        train_records = train_records[: cfg.data_limit]
    if not train_records:
        raise UserError("the training dataset is empty")
    return train_records, heldout


def _device(cfg: TrainConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available")
    return cfg.device


def _weights_dtype(cfg: TrainConfig, device: str):
    import torch

    if cfg.weights_dtype != "auto":
        return getattr(torch, cfg.weights_dtype)
    if device.startswith("cuda") and cfg.method != "full":
        return torch.bfloat16  # LoRA practice: frozen base in bf16, adapters in fp32
    return torch.float32  # full fine-tuning keeps fp32 master weights (bf16 autocast on CUDA)


def _target_modules(cfg: TrainConfig):
    t = cfg.lora.target_modules
    if t == "attention":
        return ["q_proj", "k_proj", "v_proj", "o_proj"]
    return t


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          extra_callbacks: list | None = None) -> dict:
    """Run one fine-tuning job described by ``cfg``; returns its summary (also saved as summary.json).

    ``extra_callbacks`` are added to the Trainer's (e.g. your own logging).
    """
    cfg.validate()
    # Bad data or a bad model path fails here, before anything is written.
    train_records, heldout = _load_data(cfg)
    from plora.models import load_model_and_tokenizer, resolve_model_dir

    resolve_model_dir(cfg.model)
    run_dir = _prepare_output(cfg, resume, overwrite)

    import torch
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint

    from plora import data as D
    from plora.compare import final_train_loss, load_run, plot_losses
    from plora.run_callbacks import MetricsCallback, ProgressBar, RankTracker, tensorboard_callback

    device = _device(cfg)
    set_seed(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=_weights_dtype(cfg, device), device=device)
    examples, data_stats = D.build_dataset(train_records, tokenizer, cfg.max_length, packing=cfg.packing)

    if run_dir.exists() and overwrite and not resume:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (run_dir / "metrics.jsonl").write_text("")

    summary: dict = {"name": run_dir.name, "method": cfg.method, "run_dir": str(run_dir), "data": data_stats}
    evaluator = _Evaluator(cfg, tokenizer, train_records, heldout, device)
    if not resume and cfg.eval.before:
        summary.update({f"{k}_before": v for k, v in evaluator.run(model, label="before").items()})
        summary["base_train_loss"] = summary.pop("train_slice_loss_before", None)

    if cfg.method in ("lora", "plora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=_target_modules(cfg), use_rslora=cfg.lora.use_rslora, task_type="CAUSAL_LM",
        ))
    from plora.analysis import snapshot

    start = snapshot(model, dtype=None) if cfg.analysis else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    steps_per_epoch = math.ceil(len(examples) / (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.epochs)
    use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        max_steps=total_steps, num_train_epochs=max(cfg.epochs, 1.0),
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_strategy="steps",
        save_total_limit=cfg.save_total_limit, report_to=[], seed=cfg.seed, data_seed=cfg.seed,
        bf16=use_bf16, use_cpu=not device.startswith("cuda"), dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, remove_unused_columns=False,
        **length_grouping_kwargs(cfg.group_by_length),
    )
    callbacks = [MetricsCallback(run_dir / "metrics.jsonl"), tensorboard_callback(run_dir / "tb")]
    plora_cb = None
    if cfg.method == "plora":
        from plora.callback import PLoRACallback

        plora_cb = PLoRACallback(cfg.plora.to_plora_config(cfg.seed))
        callbacks.insert(0, plora_cb)
    if start is not None and cfg.eval.rank_every > 0:
        callbacks.append(RankTracker(start, cfg.eval.rank_every, cfg.eval.rank_layers, run_dir / "metrics.jsonl",
                                     residuals=lambda: _residuals(plora_cb)))
    if progress:
        callbacks.append(ProgressBar())
    callbacks.extend(extra_callbacks or [])
    trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(examples),
                      data_collator=D.DataCollator(tokenizer.pad_token_id), callbacks=callbacks)
    trainer.remove_callback(ProgressCallback)
    if progress:  # our bar replaces the raw log-dict printing
        trainer.remove_callback(PrinterCallback)

    checkpoint = None
    if resume:
        ckpt_root = run_dir / "checkpoints"
        checkpoint = get_last_checkpoint(str(ckpt_root)) if ckpt_root.is_dir() else None
        if checkpoint is None:
            raise UserError(f"--resume {run_dir}: no checkpoint to resume from in {ckpt_root}")
        print(f"resuming from {checkpoint}", file=sys.stderr)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except KeyboardInterrupt:
        print(f"\ninterrupted: resume with `plora train --resume {run_dir}` (from the last checkpoint)", file=sys.stderr)
        raise
    train_seconds = time.time() - t0
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None

    # Everything below is the finished run's outputs.
    if start is not None:
        from plora.analysis import update_report

        report = update_report(model, start, residuals=_residuals(plora_cb))
        (run_dir / "spectra.json").write_text(json.dumps(report))
        agg = report["aggregate"]
        summary.update(numerical_rank=agg["numerical_rank"]["mean"], effective_rank=agg["effective_rank"]["mean"],
                       energy_rank_99=agg["energy_rank_99"]["mean"])
        del start
    final = _finalise_model(model, cfg, run_dir, tokenizer, plora_cb)
    summary.update({k: v for k, v in evaluator.run(final, label="after").items()})
    summary["final_train_slice_loss"] = summary.pop("train_slice_loss", None)
    run = load_run(run_dir)  # what was logged: smoothed final loss and the loss plot
    summary.update(
        final_train_loss=final_train_loss(run)[0],
        rank=cfg.lora.r if cfg.method != "full" else None,
        unload_every=cfg.plora.unload_every if cfg.method == "plora" else None,
        stages=cfg.plora.stages if cfg.method == "plora" else None,
        unload_every_epochs=cfg.plora.unload_every_epochs if cfg.method == "plora" else None,
        momentum=cfg.plora.momentum if cfg.method == "plora" else None,
        unloads=plora_cb.unloader.num_unloads if plora_cb else 0,
        steps=trainer.state.global_step, train_seconds=train_seconds, trainable_params=trainable,
        peak_memory_bytes=peak, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        tokens_per_s=_tokens_per_s(trainer, train_seconds), device=device,
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    plot_losses([run], run_dir / "loss.png")
    return summary


def length_grouping_kwargs(enabled: bool) -> dict:
    """TrainingArguments keywords for length-grouped batches, across transformers versions."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length" if enabled else "random"}
    if "group_by_length" in names:
        return {"group_by_length": enabled}
    return {}


def _finalise_model(model, cfg: TrainConfig, run_dir: Path, tokenizer, plora_cb):
    """Merge every remaining update into the base and save a plain transformers checkpoint."""
    if cfg.method == "lora":
        model.save_pretrained(run_dir / "adapter")
    if cfg.method in ("lora", "plora"):
        from plora.unload import unload_

        # The last merge folds in what compensated merging still held back; what is left in the
        # residual afterwards is below half a unit of the weight's dtype, which it cannot hold.
        residuals = _residuals(plora_cb)
        unload_(model, 1.0, merge_precision=cfg.plora.merge_precision, residuals=residuals,
                unload_index=10**6, landed_sample_rows=0)
        model = model.unload()  # drop the (now zero) adapter layers
    model.save_pretrained(run_dir / "model")
    tokenizer.save_pretrained(run_dir / "model")
    return model


def _residuals(plora_cb) -> dict | None:
    """The compensated-merge residuals of a PLoRA run (they belong to its weight state), else None."""
    unloader = getattr(plora_cb, "unloader", None)
    return unloader.residuals if unloader is not None else None


def _tokens_per_s(trainer, seconds: float) -> float | None:
    tokens = getattr(trainer.state, "num_input_tokens_seen", 0) or 0
    return tokens / seconds if seconds > 0 and tokens else None


class _ListDataset:
    """A list of tokenized examples as a map-style dataset."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class _Evaluator:
    """Held-out accuracy and loss, and the loss on a fixed training slice, before and after."""

    def __init__(self, cfg: TrainConfig, tokenizer, train_records, heldout, device):
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        self.train_slice = train_records[: cfg.eval.train_slice] if cfg.eval.train_slice else []
        self.heldout = heldout or []

    def run(self, model, label: str) -> dict:
        e, out = self.cfg.eval, {}
        if not (self.train_slice or (self.heldout and (e.loss_limit or e.heldout_limit))):
            return out
        from plora import evaluate as E

        model.eval()
        if self.train_slice:
            out["train_slice_loss"] = E.heldout_loss(model, self.tokenizer, self.train_slice,
                                                     batch_size=e.batch_size, max_length=self.cfg.max_length)["loss"]
        if self.heldout and e.loss_limit:
            out["heldout_loss"] = E.heldout_loss(model, self.tokenizer, self.heldout[: e.loss_limit],
                                                 batch_size=e.batch_size, max_length=self.cfg.max_length)["loss"]
        gsm_like = [r for r in self.heldout if "question" in r and "answer" in r]
        if gsm_like and e.heldout_limit:
            res = E.gsm8k_accuracy(model, self.tokenizer, gsm_like[: e.heldout_limit],
                                   batch_size=e.batch_size, max_new_tokens=e.max_new_tokens)
            out["heldout_acc"], out["heldout_n"] = res["accuracy"], res["n"]
        print(f"[{label}] " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()),
              file=sys.stderr)
        model.train()
        return out
