"""``plora compare``: one table and a few plots from several run directories.

A run directory is what ``plora train`` writes; every file in it is optional, and a missing
value shows as "—" rather than failing the comparison::

    RUN/config.yaml     resolved config (method, rank, unload settings, momentum, ...)
    RUN/metrics.jsonl   training lines {"step", "loss", ...}; eval lines {"kind": "eval", ...};
                        rank lines {"kind": "rank", "step", "effective_rank", "numerical_rank"}
    RUN/summary.json    final numbers (see SUMMARY_FIELDS)
    RUN/spectra.json    plora.analysis.update_report of the accumulated update

Output (``out_dir``): ``report.md`` (table + plots + notes), ``compare.json`` (the table's
raw numbers), ``loss.png``, ``spectra.png`` and, when any run logged rank lines, ``rank.png``.

Learning ability (docs/learning-ability.md): ``LA = base_train_loss - final_train_loss``, with
the final loss smoothed over the last 10% of logged steps; reported as a ratio to the LoRA run
of the same rank and as a share of full fine-tuning's LA.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from plora.errors import UserError

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "spectra.json")
SUMMARY_FIELDS = (
    "name", "method", "rank", "unload_every", "stages", "unload_every_epochs", "momentum",
    "final_train_loss", "base_train_loss", "heldout_loss", "test_loss", "gsm8k_acc", "mmlu_acc",
    "peak_memory_bytes", "train_seconds", "trainable_params", "numerical_rank",
    "effective_rank", "unloads",
)
FINAL_LOSS_SHARE = 0.10  # final train loss = mean over the last 10% of logged training steps
MISSING = "—"
_MAX_BAD_LINE_NOTES = 3


# ---------------------------------------------------------------------------------------------
# Reading a run directory


@dataclass
class Run:
    """What could be read from one run directory (missing parts are empty)."""

    path: Path
    label: str
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    spectra: dict | None = None
    train: list[dict] = field(default_factory=list)  # training lines, sorted by step, one per step
    evals: list[dict] = field(default_factory=list)
    ranks: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _num(value) -> float | None:
    """A number from a JSON/YAML value, or None (bools and strings are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _lookup(mapping: dict, key: str):
    """``mapping[key]``, else the same key one level down (configs may group keys in sections)."""
    if key in mapping:
        return mapping[key]
    for value in mapping.values():
        if isinstance(value, dict) and key in value:
            return value[key]
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: not readable as YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _read_metrics(path: Path, run: Run) -> None:
    """Split metrics.jsonl into training, eval and rank lines; bad lines are skipped with a note."""
    train: dict[int, dict] = {}
    bad = 0
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            bad += 1
            if bad <= _MAX_BAD_LINE_NOTES:
                run.notes.append(f"metrics.jsonl line {lineno} is not a JSON object (skipped)")
            continue
        kind = rec.get("kind", "train")
        step = _num(rec.get("step"))
        if kind == "eval":
            run.evals.append(rec)
        elif kind == "rank":
            if step is not None:
                run.ranks.append(rec)
        elif kind == "train" and step is not None and _num(rec.get("loss")) is not None:
            train[int(step)] = rec  # a resumed run repeats steps: the later line wins
    if bad > _MAX_BAD_LINE_NOTES:
        run.notes.append(f"metrics.jsonl: {bad} bad lines in all")
    run.train = [train[s] for s in sorted(train)]
    run.ranks.sort(key=lambda r: r["step"])


def load_run(path: str | Path) -> Run:
    """Read one run directory. Raises UserError if ``path`` is not a run directory or a file is corrupt."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"run directory {p} does not exist")
    if not p.is_dir():
        raise UserError(f"{p} is a file, not a run directory")
    present = [f for f in RUN_FILES if (p / f).is_file()]
    if not present:
        raise UserError(f"{p} is not a run directory: none of {', '.join(RUN_FILES)} is in it")
    run = Run(path=p, label=p.name or str(p))
    if (p / "config.yaml").is_file():
        run.config = _read_yaml(p / "config.yaml")
    if (p / "summary.json").is_file():
        run.summary = _read_json(p / "summary.json")
    if (p / "spectra.json").is_file():
        run.spectra = _read_json(p / "spectra.json")
    if (p / "metrics.jsonl").is_file():
        _read_metrics(p / "metrics.jsonl", run)
    run.notes.extend(f"no {f}" for f in RUN_FILES if f not in present)
    if isinstance(run.summary.get("name"), str) and run.summary["name"]:
        run.label = run.summary["name"]
    return run


# ---------------------------------------------------------------------------------------------
# The table's values


def _get(run: Run, key: str):
    """A value from summary.json, else from config.yaml."""
    value = run.summary.get(key)
    return value if value is not None else _lookup(run.config, key)


def _eval_value(run: Run, key: str) -> float | None:
    """An eval result from summary.json, else from the last eval line of metrics.jsonl that has it."""
    if _num(run.summary.get(key)) is not None:
        return _num(run.summary[key])
    for rec in reversed(run.evals):
        if _num(rec.get(key)) is not None:
            return _num(rec[key])
    return None


def final_train_loss(run: Run) -> tuple[float | None, str]:
    """Smoothed final training loss and where it came from.

    Mean of the losses of the last 10% of logged training steps (at least one), which cuts the
    batch-to-batch noise of a single last step. Falls back to summary.json's final_train_loss.
    """
    if run.train:
        k = max(1, math.ceil(FINAL_LOSS_SHARE * len(run.train)))
        tail = [float(r["loss"]) for r in run.train[-k:]]
        return sum(tail) / k, f"mean of last {k} of {len(run.train)} logged steps"
    value = _num(run.summary.get("final_train_loss"))
    return value, ("summary.json final_train_loss" if value is not None else "missing")


def _rank_values(run: Run) -> dict[str, float | None]:
    """Mean ranks over layers: spectra.json aggregates, else summary.json, else the last rank line."""
    out: dict[str, float | None] = {"numerical_rank": None, "energy_rank_99": None, "effective_rank": None}
    agg = (run.spectra or {}).get("aggregate")
    if isinstance(agg, dict):
        for key in out:
            stats = agg.get(key)
            if isinstance(stats, dict):
                out[key] = _num(stats.get("mean"))
    for key in ("numerical_rank", "effective_rank"):
        if out[key] is None:
            out[key] = _num(run.summary.get(key))
        if out[key] is None and run.ranks:
            out[key] = _num(run.ranks[-1].get(key))
    return out


def _unloading(run: Run, method: str | None) -> tuple[str | None, dict]:
    """A readable description of when a PLoRA run unloaded, plus the raw settings."""
    raw = {k: _get(run, k) for k in ("unload_every", "stages", "unload_every_epochs")}
    unloads = _num(run.summary.get("unloads"))
    if unloads is None:
        counts = [_num(r.get("unloads")) for r in run.train if _num(r.get("unloads")) is not None]
        unloads = max(counts) if counts else None
    raw["unloads"] = None if unloads is None else int(unloads)
    if method in ("lora", "full"):
        return "none", raw
    parts = []
    if _num(raw["unload_every"]):
        parts.append(f"every {int(raw['unload_every'])} steps")
    if _num(raw["unload_every_epochs"]):
        parts.append(f"every {raw['unload_every_epochs']:g} epochs")
    if _num(raw["stages"]):
        parts.append(f"{int(raw['stages'])} stages")
    if raw["unloads"] is not None:
        parts.append(f"({raw['unloads']} unloads)")
    return (" ".join(parts) or None), raw


def _row(run: Run) -> dict:
    method = _get(run, "method")
    method = str(method).lower() if method is not None else None
    final, final_src = final_train_loss(run)
    base = _num(run.summary.get("base_train_loss"))
    unloading, unload_raw = _unloading(run, method)
    seconds = _num(run.summary.get("train_seconds"))
    if seconds is None and run.train:
        seconds = _num(run.train[-1].get("time_s"))
    rank = _num(_get(run, "rank"))
    row = {
        "run": run.label,
        "path": str(run.path),
        "method": method,
        "rank": None if rank is None or method == "full" else int(rank),
        "unloading": unloading,
        **unload_raw,
        "momentum": _num(_get(run, "momentum")),
        "base_train_loss": base,
        "final_train_loss": final,
        "final_train_loss_source": final_src,
        "last_step": int(run.train[-1]["step"]) if run.train else None,
        **{key: _eval_value(run, key) for key in ("heldout_loss", "test_loss", "gsm8k_acc", "mmlu_acc")},
        "peak_memory_bytes": _num(run.summary.get("peak_memory_bytes")),
        "train_seconds": seconds,
        "trainable_params": _num(run.summary.get("trainable_params")),
        **_rank_values(run),
        "learning_ability": None if base is None or final is None else base - final,
        "la_vs_lora": None,
        "la_vs_full": None,
        "notes": list(run.notes),
    }
    return row


def _ratio(value: float | None, ref: float | None) -> float | None:
    if value is None or ref is None or not ref > 0:
        return None
    return value / ref


def learning_ability_ratios(rows: list[dict]) -> dict[str, str | None]:
    """Fill ``la_vs_lora`` and ``la_vs_full`` in ``rows``; return the reference runs used.

    LoRA reference of a run: the first LoRA run of the same rank; for a run without a rank
    (full fine-tuning), the LoRA run if there is exactly one rank among the LoRA runs.
    Full reference: the first full fine-tuning run. A reference with LA <= 0 gives no ratio.
    """
    lora = [r for r in rows if r["method"] == "lora"]
    full = [r for r in rows if r["method"] == "full"]
    lora_ranks = {r["rank"] for r in lora}
    used: dict[str, str | None] = {"full": full[0]["run"] if full else None}
    for row in rows:
        if row["rank"] is not None:
            ref = next((r for r in lora if r["rank"] == row["rank"]), None)
        else:
            ref = lora[0] if len(lora_ranks) == 1 else None
        if ref is not None:
            row["la_vs_lora"] = _ratio(row["learning_ability"], ref["learning_ability"])
            used[f"lora_rank_{ref['rank']}"] = ref["run"]
        if full:
            row["la_vs_full"] = _ratio(row["learning_ability"], full[0]["learning_ability"])
    return used


# ---------------------------------------------------------------------------------------------
# Formatting


def _fmt(value, kind: str) -> str:
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if kind == "loss":
        return f"{value:.4f}"
    if kind == "acc":  # fractions in [0, 1] shown as percent
        return f"{100 * value:.1f}%" if 0 <= value <= 1 else f"{value:.1f}"
    if kind == "bytes":
        return f"{value / 2**30:.2f} GiB"
    if kind == "seconds":
        s = int(round(value))
        if s < 60:
            return f"{value:.1f} s"
        h, rem = divmod(s, 3600)
        return f"{h}h {rem // 60:02d}m" if h else f"{rem // 60}m {rem % 60:02d}s"
    if kind == "count":
        for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(value) >= size:
                return f"{value / size:.3g}{unit}"
        return f"{int(value)}"
    if kind == "rank":
        return f"{value:.1f}"
    if kind == "ratio":
        return f"{value:.2f}×"
    if kind == "share":
        return f"{100 * value:.0f}%"
    if kind == "int":
        return str(int(value))
    return f"{value:g}"


# (header, row key, format kind)
COLUMNS = (
    ("run", "run", "str"),
    ("method", "method", "str"),
    ("rank", "rank", "int"),
    ("unloading", "unloading", "str"),
    ("momentum", "momentum", "num"),
    ("final train loss", "final_train_loss", "loss"),
    ("held-out loss", "heldout_loss", "loss"),
    ("test loss", "test_loss", "loss"),
    ("GSM8K", "gsm8k_acc", "acc"),
    ("MMLU", "mmlu_acc", "acc"),
    ("peak memory", "peak_memory_bytes", "bytes"),
    ("time", "train_seconds", "seconds"),
    ("trainable params", "trainable_params", "count"),
    ("numerical rank ΔW", "numerical_rank", "rank"),
    ("energy rank 99% ΔW", "energy_rank_99", "rank"),
    ("effective rank ΔW", "effective_rank", "rank"),
    ("learning ability", "learning_ability", "loss"),
    ("LA vs LoRA", "la_vs_lora", "ratio"),
    ("LA vs full", "la_vs_full", "share"),
)


def markdown_table(rows: list[dict]) -> str:
    """The comparison table in GitHub markdown."""
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        cells = [_fmt(row.get(key), kind).replace("|", "\\|") for _, key, kind in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's object API renders through Agg without touching pyplot's global backend)


def _figure(n_panels: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 * n_panels, 4.2), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(runs: list[Run], path: Path) -> bool:
    """Training loss against step (raw, faint, and a moving average); held-out loss beside it if logged."""
    with_eval = [r for r in runs if any(_num(e.get("heldout_loss")) is not None for e in r.evals)]
    if not any(r.train for r in runs):
        return False
    fig, axes = _figure(2 if with_eval else 1)
    ax = axes[0]
    for i, run in enumerate(runs):
        if not run.train:
            continue
        steps = [int(r["step"]) for r in run.train]
        loss = [float(r["loss"]) for r in run.train]
        color = f"C{i}"
        ax.plot(steps, loss, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _moving_average(loss, max(1, len(loss) // 50)), color=color, label=run.label)
    ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax.legend()
    if with_eval:
        ax = axes[1]
        for i, run in enumerate(runs):
            pts = [(e.get("step"), _num(e.get("heldout_loss"))) for e in run.evals]
            pts = [(s, v) for s, v in pts if _num(s) is not None and v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=run.label)
        ax.set(xlabel="step", ylabel="held-out loss", title="Held-out loss")
        ax.legend()
    fig.savefig(path, dpi=120)
    return True


def _mean_normalised_spectrum(spectra: dict) -> list[float] | None:
    """Mean over layers of s / s_max, index by index (layers with fewer values drop out)."""
    curves = []
    for layer in spectra.get("layers") or []:
        sv = [float(v) for v in (layer.get("singular_values") or []) if _num(v) is not None]
        if sv and sv[0] > 0:
            curves.append([v / sv[0] for v in sv])
    if not curves:
        return None
    out = []
    for i in range(max(len(c) for c in curves)):
        vals = [c[i] for c in curves if i < len(c)]
        out.append(sum(vals) / len(vals))
    return out


def plot_spectra(runs: list[Run], rows: list[dict], path: Path) -> bool:
    """Mean normalised singular-value spectrum of the accumulated update, one curve per run."""
    curves = [(i, run, _mean_normalised_spectrum(run.spectra)) for i, run in enumerate(runs) if run.spectra]
    curves = [(i, run, c) for i, run, c in curves if c]
    if not curves:
        return False
    fig, (ax,) = _figure(1)
    for i, run, curve in curves:
        ax.plot(range(1, len(curve) + 1), curve, color=f"C{i}", label=run.label)
        if rows[i]["rank"] and rows[i]["method"] in ("lora", "plora"):
            ax.axvline(rows[i]["rank"], color=f"C{i}", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set(xlabel="singular value index (dotted: adapter rank r)", ylabel="σ_i / σ_1 (mean over layers)",
           title="Singular values of ΔW = W_now − W_start")
    ax.legend()
    fig.savefig(path, dpi=120)
    return True


def plot_ranks(runs: list[Run], path: Path) -> bool:
    """Effective (and numerical, if logged) rank of the accumulated update against step."""
    def series(run, key):
        pts = [(r["step"], _num(r.get(key))) for r in run.ranks]
        return [(s, v) for s, v in pts if v is not None]

    keys = [k for k in ("effective_rank", "numerical_rank") if any(series(r, k) for r in runs)]
    if "effective_rank" not in keys:
        return False
    fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys):
        for i, run in enumerate(runs):
            pts = series(run, key)
            if pts:
                ax.plot(*zip(*pts), marker=".", color=f"C{i}", label=run.label)
        ax.set(xlabel="step", ylabel=f"{key.replace('_', ' ')} (mean over layers)",
               title=key.replace("_", " ").capitalize() + " of W_now − W_start")
        ax.legend()
    fig.savefig(path, dpi=120)
    return True


# ---------------------------------------------------------------------------------------------
# The report


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"--out {out_dir} exists and is not empty; pass --overwrite or choose another directory")
    out_dir.mkdir(parents=True, exist_ok=True)


def _unique_labels(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        n = seen.get(run.label, 0) + 1
        seen[run.label] = n
        if n > 1:
            run.label = f"{run.label} #{n}"


def _clean(value):
    """JSON-safe: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def compare_runs(run_dirs, out_dir, *, title: str | None = None, overwrite: bool = False) -> Path:
    """Compare run directories; write report.md, compare.json and PNG plots to ``out_dir``.

    Returns the path of report.md. Raises UserError for a path that is not a run directory,
    a corrupt summary/config/spectra file, or a non-empty ``out_dir`` without ``overwrite``.
    """
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise UserError("compare: give at least one run directory")
    runs = [load_run(p) for p in run_dirs]
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    _unique_labels(runs)
    rows = [_row(run) for run in runs]
    references = learning_ability_ratios(rows)

    notes: list[str] = []
    steps = {r["last_step"] for r in rows if r["last_step"] is not None}
    if len(steps) > 1:
        notes.append(f"runs end at different steps {sorted(steps)}: learning ability assumes the same data and steps")
    if not any(r["method"] == "lora" for r in rows):
        notes.append("no LoRA run: 'LA vs LoRA' is empty")
    if not any(r["method"] == "full" for r in rows):
        notes.append("no full fine-tuning run: 'LA vs full' is empty")
    for row in rows:
        if row["learning_ability"] is None:
            notes.append(f"{row['run']}: learning ability needs base_train_loss in summary.json and a final train loss")
        notes.extend(f"{row['run']}: {n}" for n in row["notes"])

    plots = {}
    for name, fn in (("loss.png", lambda p: plot_losses(runs, p)),
                     ("spectra.png", lambda p: plot_spectra(runs, rows, p)),
                     ("rank.png", lambda p: plot_ranks(runs, p))):
        if fn(out / name):
            plots[name] = True
        else:
            plots[name] = False
            notes.append(f"{name} skipped: no run has the data for it")

    title = title or "PLoRA comparison"
    md = [f"# {title}", "", markdown_table(rows), "",
          "Final train loss: mean over the last 10% of logged training steps. "
          "Learning ability (LA) = base_train_loss − final train loss; "
          "LA vs LoRA = LA / LA of the LoRA run of the same rank; LA vs full = LA / LA of full fine-tuning "
          "(see plora's docs/learning-ability.md). "
          "Rank columns: mean over analysed layers of the accumulated update ΔW = W_now − W_start; "
          "for bf16/fp16 weights rounding noise inflates the numerical rank, quote the energy rank instead.", ""]
    for name, heading in (("loss.png", "Loss"), ("spectra.png", "Singular-value spectra of ΔW"),
                          ("rank.png", "Effective rank during training")):
        if plots[name]:
            md += [f"## {heading}", "", f"![{heading}]({name})", ""]
    md += ["## Runs", ""] + [f"- {r['run']}: `{r['path']}`" for r in rows] + [""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    report = out / "report.md"
    report.write_text("\n".join(md))
    (out / "compare.json").write_text(json.dumps(_clean({
        "title": title,
        "runs": rows,
        "references": references,
        "plots": [n for n, ok in plots.items() if ok],
        "notes": notes,
        "definitions": {
            "final_train_loss": f"mean training loss over the last {FINAL_LOSS_SHARE:.0%} of logged steps",
            "learning_ability": "base_train_loss - final_train_loss",
            "la_vs_lora": "learning_ability / learning_ability of the LoRA run of the same rank",
            "la_vs_full": "learning_ability / learning_ability of the full fine-tuning run",
        },
    }), indent=2, ensure_ascii=False))
    return report


# ---------------------------------------------------------------------------------------------
# CLI


def register(subparsers) -> None:
    """Add ``plora compare`` to the CLI's sub-parsers."""
    p = subparsers.add_parser(
        "compare",
        help="compare run directories: table, loss/spectrum/rank plots, learning ability",
        description="Compare runs written by `plora train`: a markdown table (losses, accuracies, memory, "
        "time, ranks of the accumulated update, learning ability vs LoRA and vs full fine-tuning) "
        "and PNG plots, written to --out.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by `plora train`")
    p.add_argument("--out", metavar="DIR", help="output directory (default: compare-YYYYmmdd-HHMMSS)")
    p.add_argument("--title", help="title of the report")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out directory")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    out = args.out or time.strftime("compare-%Y%m%d-%H%M%S")
    report = compare_runs(args.runs, out, title=args.title, overwrite=args.overwrite)
    print(f"wrote {report}")
    return 0
