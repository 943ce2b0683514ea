"""Tables of a finished (or partly finished) reproduction plan, beside ``plora compare``'s report.

    python benchmarks/reproduce_report.py OUT --plan docs/results/plans/reproduction.yaml > tables.md
    python benchmarks/reproduce_report.py OUT --plan PLAN --figure learning_ability.png > tables.md

``OUT`` is the folder ``benchmarks/reproduce.py`` wrote; the plan is read as the driver reads it
(``reproduce.load_plan``). Prints markdown: the learning-rate sweeps (held-out loss per learning
rate, the chosen one in bold), what each choice resolved to, every run that has seed variants
(NAME-seed1, ...) as mean and sample standard deviation (two such runs also paired by seed), and
each ablation as a difference from the run it changes one thing of. Learning ability is
``plora compare``'s: the base model's loss on a fixed slice of the training data minus the
smoothed final training loss. ``--figure`` also draws the learning ability of the one-epoch runs
named in ``FIGURE_RUNS`` against LoRA r=8's (seed mean, its seed spread shaded; runs with seeds
get their own spread as an error bar).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plora.compare import final_train_loss, load_run  # noqa: E402
from reproduce import Entry, load_plan  # noqa: E402  (the plan as the driver expands it)

METRICS = (  # (header, key, format)
    ("held-out loss", "heldout_loss", "{:.4f}"),
    ("test loss", "test_loss", "{:.4f}"),
    ("GSM8K", "gsm8k_acc", "{:.1%}"),
    ("MMLU (2,000)", "mmlu_acc", "{:.1%}"),
    ("learning ability", "learning_ability", "{:.4f}"),
)


@functools.lru_cache(maxsize=None)
def run_values(path: Path) -> dict | None:
    """The numbers of one run directory (None if it never finished training); read once per run
    (tables and figure ask for the same runs, and a run's spectra.json is megabytes)."""
    if not (path / "summary.json").is_file():
        return None
    run = load_run(path)
    s = run.summary
    final, _ = final_train_loss(run)
    base = s.get("base_train_loss")
    out = {key: s.get(key) for _, key, _ in METRICS}
    out["learning_ability"] = None if final is None or base is None else base - final
    out["lr"] = run.config.get("lr")
    return out


def _fmt(value, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def sweep_table(out: Path, entries: list[Entry], status: dict) -> list[str]:
    lines = ["| method | learning rate: held-out loss | chosen |", "| --- | --- | --- |"]
    for e in entries:
        if not e.sweep_lr:
            continue
        cells = []
        chosen = status["resolved"].get(e.name)
        for child in (c for c in entries if c.sweep_of == e.name):
            v = run_values(out / child.name)
            cell = f"{child.overrides['lr']:g}: {_fmt(v and v['heldout_loss'], '{:.4f}')}"
            cells.append(f"**{cell}**" if child.name == chosen else cell)
        lines.append(f"| {e.name} | {', '.join(cells)} | {chosen or 'not resolved'} |")
    return lines


def choice_lines(entries: list[Entry], status: dict) -> list[str]:
    lines = []
    for e in entries:
        if e.best_of and not e.sweep_lr:
            got = status["resolved"].get(e.name)
            lines.append(f"- `{e.name}` (lowest held-out loss of {', '.join(e.best_of)}): "
                         f"**{got or 'not resolved'}**")
    return lines


def mean_sd(values: list, percent: bool = False, unit: str = "%") -> str:
    """``mean ± sd (n=k)`` of the known values; accuracies in percent (``unit`` " pt" for differences)."""
    vals = [100 * v if percent else v for v in values if v is not None]
    if not vals:
        return "—"
    unit, digits = (unit, 2) if percent else ("", 4)
    m = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}{unit} (n=1)"
    return f"{m:.{digits}f}{unit} ± {statistics.stdev(vals):.{digits}f} (n={len(vals)})"


def seeds_table(out: Path, status: dict, groups: dict[str, list[str]]) -> list[str]:
    header = "| runs | " + " | ".join(h for h, _, _ in METRICS) + " |"
    lines = [header, "|" + " --- |" * (len(METRICS) + 1)]
    for label, names in groups.items():
        dirs = [status["resolved"].get(n, n) for n in names]
        vals = [run_values(out / d) for d in dirs]
        vals = [v for v in vals if v is not None]
        cells = [mean_sd([v[key] for v in vals], "%" in fmt) for _, key, fmt in METRICS]
        lines.append(f"| {label}: {', '.join(dirs)} | " + " | ".join(cells) + " |")
    if len(groups) == 2:
        # paired by seed: the two methods of a seed share its data order and initialisation, so the
        # per-seed difference removes the seed's own effect (the spread the rows above include)
        (label_a, names_a), (label_b, names_b) = groups.items()
        pairs = [(run_values(out / status["resolved"].get(a, a)), run_values(out / status["resolved"].get(b, b)))
                 for a, b in zip(names_a, names_b)]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if pairs:
            cells = [mean_sd([None if a.get(key) is None or b.get(key) is None else b[key] - a[key]
                              for a, b in pairs], "%" in fmt, " pt") for _, key, fmt in METRICS]
            lines.append(f"| {label_b} − {label_a}, paired by seed | " + " | ".join(cells) + " |")
    return lines


def delta_table(out: Path, status: dict, pairs: list[tuple[str, str]]) -> list[str]:
    header = "| change | against | " + " | ".join(f"Δ {h}" for h, _, _ in METRICS) + " |"
    lines = [header, "|" + " --- |" * (len(METRICS) + 2)]
    for name, ref in pairs:
        a = run_values(out / status["resolved"].get(name, name))
        b = run_values(out / status["resolved"].get(ref, ref))
        if a is None or b is None:
            continue  # not run (yet): listed under "Not run"
        cells = []
        for _, key, fmt in METRICS:
            if a.get(key) is None or b.get(key) is None:
                cells.append("—")
            else:
                d = a[key] - b[key]
                cells.append(("+" if d >= 0 else "") + (f"{100 * d:.1f} pt" if "%" in fmt else f"{d:.4f}"))
        lines.append(f"| {name} | {status['resolved'].get(ref, ref)} | " + " | ".join(cells) + " |")
    return lines


# one-epoch runs in the figure's order (top to bottom): the references, PLoRA's periods and
# momentum, then the one-factor ablations
FIGURE_RUNS = ("full", "lora-r64", "lora-r8", "plora-best", "plora-r8-m0.5", "plora-r8-25pct", "plora-r8-10pct",
               "plora-r8-every-step", "plora-rewarmup", "plora-keep-optimizer", "plora-direct-bf16",
               "plora-stochastic-bf16", "plora-attention", "lora-r8-attention")


def learning_ability_figure(out: Path, status: dict, seeds: dict[str, list[str]], path: Path) -> bool:
    """Learning ability relative to LoRA r=8's seed mean, one point per run (seed sd as error bar);
    False when LoRA r=8 is missing."""
    def values_of(name):
        return run_values(out / status["resolved"].get(name, name))

    def la(name):
        v = values_of(name)
        return None if v is None else v["learning_ability"]

    groups = {names[0]: names for names in seeds.values() if names}  # "lora-r8" -> its seed runs
    lora = [x for x in map(la, groups.get("lora-r8", ["lora-r8"])) if x is not None]
    if not lora:
        return False
    ref = statistics.fmean(lora)
    labels, values, errors = [], [], []
    for name in FIGURE_RUNS:
        vals = [x for x in map(la, groups.get(name, [name])) if x is not None]
        if not vals:
            continue
        lr = values_of(name)["lr"]
        labels.append(f"{name}, lr {lr:g}" + (f", {len(vals)} seeds" if len(vals) > 1 else ""))
        values.append(statistics.fmean(vals) / ref)
        errors.append(statistics.stdev(vals) / ref if len(vals) > 1 else 0.0)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 0.42 * len(labels) + 1.4), layout="constrained")
    ax = fig.subplots()
    ys = list(range(len(labels)))[::-1]
    for y, v, e, label in zip(ys, values, errors, labels):  # points: the axis does not start at 0
        ax.errorbar(v, y, xerr=e or None, fmt="o", color="#4c72b0" if label.startswith("plora") else "#555555",
                    capsize=3)
    if len(lora) > 1:
        sd = statistics.stdev(lora) / ref
        ax.axvspan(1 - sd, 1 + sd, color="#dd8452", alpha=0.25, label="LoRA r=8 seed sd")
        ax.legend(loc="lower right", fontsize=8)
    ax.axvline(1.0, color="#dd8452", lw=1)
    ax.set_yticks(ys, labels, fontsize=8)
    lo = min(v - e for v, e in zip(values, errors))
    ax.set_xlim(max(0.0, lo - 0.02), max(v + e for v, e in zip(values, errors)) + 0.02)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel("learning ability / LoRA r=8's (seed mean)")
    ax.set_title("Learning ability against LoRA r=8 (one epoch, held-out choices)", fontsize=10)
    fig.savefig(path, dpi=120)
    return True


def done_in(out: Path, item: str) -> bool:
    """Whether the job ``item`` ("NAME", "train NAME" or "eval NAME") left its results in ``out``."""
    kind, _, name = item.partition(" ")
    if kind not in ("train", "eval"):
        kind, name = "train", item
    return (out / name / ("summary.json" if kind == "train" else "eval-test/results.json")).is_file()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--plan", type=Path, required=True)
    ap.add_argument("--figure", type=Path, default=None, help="also write the learning-ability figure here (PNG)")
    args = ap.parse_args(argv)
    try:
        plan, entries = load_plan(args.plan)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status_path = args.out / "plan_status.json"
    if not status_path.is_file():
        print(f"error: {status_path} not found: not a reproduce.py output folder", file=sys.stderr)
        return 2
    status = json.loads(status_path.read_text())
    names = {e.name for e in entries}
    records = (plan.get("holdout") or {}).get("records", 500)
    parts = [f"## Learning-rate sweeps (held-out loss on the last {records} training records)", "",
             *sweep_table(args.out, entries, status), ""]
    choices = choice_lines(entries, status)
    if choices:
        parts += ["## Choices", "", *choices, ""]
    # every run with seed variants (NAME-seed1, ...) in plan order; the headline pair by its labels
    labels = {"lora-r8": "LoRA r=8", "plora-best": "best PLoRA r=8"}
    seeds = {labels.get(e.name, e.name): [e.name] + [f"{e.name}-seed{i}" for i in (1, 2) if f"{e.name}-seed{i}" in names]
             for e in entries if f"{e.name}-seed1" in names}
    if seeds:
        parts += ["## Runs over seeds (mean ± sample standard deviation)", "",
                  *seeds_table(args.out, status, seeds), ""]
    pairs = [(n, ref) for n, ref in (
        ("plora-r8-10pct", "lora-r8"), ("plora-r8-25pct", "lora-r8"), ("plora-r8-every-step", "lora-r8"),
        ("plora-r8-m0.5", "plora-period"), ("plora-r8-m0.1", "plora-period"),
        ("plora-attention", "plora-period"), ("lora-r8-attention", "lora-r8"),
        ("plora-rewarmup", "plora-period"), ("plora-keep-optimizer", "plora-period"),
        ("plora-direct-bf16", "plora-period"), ("plora-stochastic-bf16", "plora-period"),
        ("plora-r8-epoch-2ep", "lora-r8-2ep"), ("plora-best-2ep", "lora-r8-2ep"), ("lora-r64", "lora-r8"),
        ("full", "lora-r8"),
    ) if n in names and ref in names]
    parts += ["## One change at a time (difference from the reference run; + is higher)", "",
              *delta_table(args.out, status, pairs), ""]
    left = list(dict.fromkeys(status.get("waiting", []) + status.get("ready_not_started", [])))
    by_hand = [item for item in left if done_in(args.out, item)]
    not_run = [item for item in left if item not in by_hand]
    parts += ["## Not run (deadline)", "", ", ".join(not_run) if not_run else "none", ""]  # names, or "eval X"
    if by_hand:
        parts += ["## Run after the driver ended (its command by hand; see logs/)", "", ", ".join(by_hand), ""]
    if status.get("failed"):
        parts += ["## Failed", "", *[f"- {k}: {v}" for k, v in status["failed"].items()], ""]
    if args.figure is not None:
        if learning_ability_figure(args.out, status, seeds, args.figure):
            parts += [f"![Learning ability against LoRA r=8]({args.figure.name})", ""]
        else:
            print("warning: no LoRA r=8 run: no learning-ability figure", file=sys.stderr)
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
