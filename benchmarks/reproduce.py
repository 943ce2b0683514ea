"""Run a reproduction plan: ``plora train`` and ``plora eval`` jobs, in parallel, within a deadline.

    python benchmarks/reproduce.py --plan docs/results/plans/reproduction.yaml \
        --model PATH/TO/model --data-dir PATH/TO/shared/data --out runs/repro \
        --gpus 0,1 --per-gpu 6 --deadline-s 1500

A plan is YAML with ``recipe``, ``common`` overrides for every run, ``holdout`` (how many of the
last training records are held out to choose learning rates and settings, never the test set),
``test`` (the evaluation of the runs that are reported) and ``runs``, in priority order. A run is
one of:

- ``{name, overrides, sweep_lr: [..]}``: one training run per learning rate (``NAME-lrX``); the
  name then stands for the child with the lowest held-out loss.
- ``{name, overrides, base: OTHER, lr_from: OTHER}``: starts from the resolved settings of
  ``base`` (which may be a sweep or a ``best_of``), takes its learning rate from ``lr_from``,
  then applies its own overrides.
- ``{name, best_of: [NAMES]}``: no training; stands for the listed run with the lowest held-out loss.

Runs start as soon as what they refer to is resolved, highest priority first, ``per-gpu``
processes at a time on each GPU (a 135M model leaves an H200 mostly idle, so runs share one).
Every reported run (sweep winners and plain runs; ``test: false`` opts out) is then scored on
the test set by ``plora eval``. A job is started only if it can finish before the deadline
(judged from the longest job of its kind so far, per epoch for training); what is left is listed
as not run.

Each run directory keeps what ``plora train`` writes (config, metrics, summary, spectra, loss plot)
plus ``eval-test/`` (``plora eval``'s results); ``OUT/logs`` holds every job's output. Merged
models are deleted once scored unless ``--keep-models``. ``OUT/plan_status.json`` says, at any
moment, what ran, what runs, what is left and what each name resolved to; ``--status OUT``
prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plora.train_config import merge  # noqa: E402  (plan settings merge as config overrides do)

DEFAULT_SECONDS = {"train": 300.0, "eval": 200.0}


# ------------------------------------------------------------------------------------------ plan


@dataclass
class Entry:
    """One line of the plan's ``runs``."""

    name: str
    priority: int
    overrides: dict = field(default_factory=dict)
    base: str | None = None
    lr_from: str | None = None
    sweep_lr: list | None = None
    best_of: list | None = None
    sweep_of: str | None = None  # set on the children a sweep expands into
    test: bool = True


def load_plan(path: Path) -> tuple[dict, list[Entry]]:
    """The plan's settings and its entries, sweeps expanded; raises ValueError on a malformed plan."""
    plan = yaml.safe_load(path.read_text()) or {}
    if not isinstance(plan.get("runs"), list) or not plan["runs"]:
        raise ValueError(f"{path}: the plan needs a non-empty 'runs' list")
    entries: list[Entry] = []
    known = {"name", "overrides", "base", "lr_from", "sweep_lr", "best_of", "test"}
    for i, raw in enumerate(plan["runs"]):
        if not isinstance(raw, dict) or "name" not in raw:
            raise ValueError(f"{path}: run #{i + 1} needs a name")
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: run {raw['name']!r} has unknown keys {sorted(unknown)}")
        entry = Entry(name=str(raw["name"]), priority=i, overrides=raw.get("overrides") or {},
                      base=raw.get("base"), lr_from=raw.get("lr_from"), sweep_lr=raw.get("sweep_lr"),
                      best_of=raw.get("best_of"), test=bool(raw.get("test", True)))
        if entry.sweep_lr:
            children = [Entry(name=f"{entry.name}-lr{lr:g}", priority=i, base=entry.base,
                              overrides=merge(entry.overrides, {"lr": float(lr)}), sweep_of=entry.name)
                        for lr in entry.sweep_lr]
            entries += children
            entry.best_of = [c.name for c in children]
        entries.append(entry)
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path}: run names used twice: {dupes}")
    for e in entries:
        for ref in [e.base, e.lr_from, *(e.best_of or [])]:
            if ref is not None and ref not in names:
                raise ValueError(f"{path}: run {e.name!r} refers to unknown run {ref!r}")
    return plan, entries


def flatten(overrides: dict, prefix: str = "") -> list[str]:
    """``{"plora": {"momentum": 0.5}}`` -> ``["--plora.momentum", "0.5"]`` (JSON values read as YAML)."""
    args: list[str] = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            args += flatten(value, f"{prefix}{key}.")
        else:
            args += [f"--{prefix}{key}", json.dumps(value)]
    return args


# ------------------------------------------------------------------------------------------ state


@dataclass
class Job:
    name: str
    kind: str  # train | eval
    priority: int
    cmd: list
    log: Path
    gpu: str | None = None
    proc: subprocess.Popen | None = None
    started: float = 0.0
    settings: dict | None = None  # a training job's effective overrides
    size: float = 1.0  # its length in units of its kind's reference job (a 2-epoch run is 2)


class Driver:
    def __init__(self, plan: dict, entries: list[Entry], args):
        self.plan, self.args = plan, args
        self.entries = {e.name: e for e in entries}
        self.out = Path(args.out)
        self.data = Path(args.data_dir)
        self.holdout = self.out / "data" / "train_holdout.jsonl"
        self.fit_records = 0
        self.t0 = time.time()
        self.settings: dict[str, dict] = {}  # trained run -> its effective overrides
        self.score: dict[str, float] = {}  # trained run -> held-out loss
        self.resolved: dict[str, str] = {}  # any name -> the trained run it stands for
        self.failed: dict[str, str] = {}
        self.trained: set[str] = set()
        self.queued_eval: set[str] = set()
        self.running: list[Job] = []
        self.history: list[dict] = []
        self.longest: dict[str, float] = {}  # kind -> longest job per unit of size (DEFAULT_SECONDS until one ends)

    # --- paths and commands ------------------------------------------------------------------
    def fill(self, node):
        if isinstance(node, dict):
            return {k: self.fill(v) for k, v in node.items()}
        if isinstance(node, str):
            return node.replace("{data}", str(self.data)).replace("{holdout}", str(self.holdout))
        return node

    def prepare_holdout(self) -> None:
        """Split the last ``holdout.records`` training records off as the selection set."""
        spec = self.plan.get("holdout") or {}
        src = Path(self.fill(spec.get("source", "{data}/gsm8k/train.jsonl")))
        n = int(spec.get("records", 500))
        lines = [ln for ln in src.read_text().splitlines() if ln.strip()]
        if not 0 < n < len(lines):
            raise ValueError(f"holdout.records={n} must be between 1 and {len(lines) - 1}")
        self.holdout.parent.mkdir(parents=True, exist_ok=True)
        self.holdout.write_text("\n".join(lines[-n:]) + "\n")
        self.fit_records = len(lines) - n

    def train_cmd(self, name: str, overrides: dict) -> list:
        fixed = {"output_dir": str(self.out / name), "data_limit": self.fit_records}
        if self.args.model:
            fixed["model"] = self.args.model
        full = self.fill(merge(merge(self.plan.get("common") or {}, overrides), fixed))
        return [sys.executable, "-m", "plora.cli", "train", "--recipe", self.plan.get("recipe", "gsm8k"),
                "--quiet", "--overwrite", *flatten(full)]

    def eval_cmd(self, run: str) -> list:
        t = self.fill(self.plan.get("test") or {})
        cmd = [sys.executable, "-m", "plora.cli", "eval", "--model", str(self.out / run / "model"),
               "--out", str(self.out / run / "eval-test"), "--overwrite",
               "--batch-size", str(t.get("batch_size", 64))]
        for flag, key in (("--gsm8k", "gsm8k"), ("--mmlu", "mmlu"), ("--loss-data", "loss_data"),
                          ("--mmlu-limit", "mmlu_limit"), ("--max-new-tokens", "max_new_tokens")):
            if t.get(key) is not None:
                cmd += [flag, str(t[key])]
        return cmd

    # --- resolution ----------------------------------------------------------------------------
    def resolve(self, name: str) -> str | None:
        """The trained run ``name`` stands for, once known (raises KeyError when it failed)."""
        if name in self.failed:
            raise KeyError(name)
        if name in self.resolved:
            return self.resolved[name]
        e = self.entries[name]
        if e.best_of is None:
            return name if name in self.trained else None
        picks = []
        for member in e.best_of:
            try:
                run = self.resolve(member)
            except KeyError:
                continue
            if run is None:
                return None  # a member still runs
            picks.append(run)
        if not picks:
            self.failed[name] = "every run it chooses from failed"
            raise KeyError(name)
        best = min(picks, key=lambda r: self.score.get(r, float("inf")))
        self.resolved[name] = best
        print(f"== {name} -> {best} (held-out loss {self.score.get(best, float('nan')):.4f})", flush=True)
        return best

    def ready_settings(self, e: Entry) -> dict | None:
        """The effective overrides of a trainable entry, or None while its references are pending."""
        base: dict = {}
        if e.base:
            base = self._settings_of(e.base)
            if base is None:
                return None
        overrides = merge(base, e.overrides)
        if e.lr_from:
            ref = self._settings_of(e.lr_from)
            if ref is None:
                return None
            overrides["lr"] = ref["lr"]
        return overrides

    def _settings_of(self, name: str) -> dict | None:
        """The settings a reference stands for: a plain run's are known before it trains (so its
        seed variants start beside it), a choice's once the choice is made (KeyError if it failed)."""
        e = self.entries[name]
        if e.best_of is None:
            return self.ready_settings(e)
        run = self.resolve(name)
        return None if run is None else self.settings[run]

    def reported_runs(self) -> list[tuple[int, str]]:
        """(priority, trained run) of every run to be scored on the test set, known so far."""
        out = []
        for e in self.entries.values():
            if e.sweep_of is not None or not e.test:
                continue
            try:
                run = self.resolve(e.name)
            except KeyError:
                continue
            if run is not None:
                out.append((e.priority, run))
        return out

    def epochs(self, overrides: dict) -> float:
        """Training epochs of a run with ``overrides`` (the plan's common setting, else 1)."""
        return float(merge(self.plan.get("common") or {}, overrides).get("epochs", 1))

    # --- scheduling ----------------------------------------------------------------------------
    def candidates(self) -> list[Job]:
        jobs, listed = [], set()
        for prio, run in sorted(self.reported_runs()):
            # two names (a run and a best_of choosing it) can stand for one run: score it once
            if run not in self.queued_eval | listed and f"{run} (eval)" not in self.failed:
                listed.add(run)
                jobs.append(Job(run, "eval", prio, self.eval_cmd(run), self.out / "logs" / f"{run}.eval.log"))
        busy = {j.name for j in self.running if j.kind == "train"}
        for e in self.entries.values():
            if e.best_of is not None or e.name in self.trained or e.name in self.failed or e.name in busy:
                continue
            try:
                settings = self.ready_settings(e)
            except KeyError as exc:
                self.failed[e.name] = f"depends on failed run {exc.args[0]}"
                continue
            if settings is not None:
                jobs.append(Job(e.name, "train", e.priority, self.train_cmd(e.name, settings),
                                self.out / "logs" / f"{e.name}.train.log", settings=settings,
                                size=self.epochs(settings) / self.epochs({})))
        # evals first at equal priority: they free a model and finish a row of the report
        return sorted(jobs, key=lambda j: (j.priority, j.kind != "eval"))

    def held_gpus(self) -> set[str]:
        """GPUs whose ``--hold`` file exists: nothing starts on them."""
        return {g for g, flag in self.args.hold if Path(flag).exists()}

    def free_gpu(self) -> str | None:
        load = {g: 0 for g in self.args.gpus if g not in self.held_gpus()}
        if not load:
            return None
        for j in self.running:
            load[j.gpu] += 1
        gpu = min(load, key=load.get)
        return gpu if load[gpu] < self.args.per_gpu else None

    def held_back(self, pending: list) -> bool:
        """Whether ``pending`` jobs wait only because every GPU is held and time is left."""
        return bool(pending) and self.held_gpus() >= set(self.args.gpus) and self.left_s() > 0

    def left_s(self) -> float:
        return self.args.deadline_s - (time.time() - self.t0)

    def start(self, job: Job, gpu: str) -> None:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, OMP_NUM_THREADS=str(self.args.threads),
                   TOKENIZERS_PARALLELISM="false", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        if job.kind == "eval":
            self.queued_eval.add(job.name)
        job.gpu, job.started = gpu, time.time()
        with open(job.log, "w") as log:
            log.write(" ".join(job.cmd) + "\n")
            log.flush()
            job.proc = subprocess.Popen(job.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.running.append(job)
        print(f"== start {job.kind} {job.name} on GPU {gpu}", flush=True)

    def finish(self, job: Job) -> None:
        took = time.time() - job.started
        ok = job.proc.returncode == 0
        run_dir = self.out / job.name
        if ok and job.kind == "train":
            summary = json.loads((run_dir / "summary.json").read_text())
            self.trained.add(job.name)
            self.settings[job.name] = job.settings
            self.score[job.name] = summary.get("heldout_loss", float("inf"))
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        elif ok:
            add_test_results(run_dir)
            if not self.args.keep_models:
                shutil.rmtree(run_dir / "model", ignore_errors=True)
        else:
            key = job.name if job.kind == "train" else f"{job.name} (eval)"
            self.failed[key] = f"{job.kind} exited with {job.proc.returncode} (see {job.log.name})"
        self.longest[job.kind] = max(took / job.size, self.longest.get(job.kind, 0.0))
        self.history.append({"name": job.name, "kind": job.kind, "gpu": job.gpu, "ok": ok,
                             "seconds": round(took, 1), "finished_s": round(time.time() - self.t0, 1)})
        print(f"== done {job.kind} {job.name} in {took:.0f}s: {'ok' if ok else 'FAILED'}", flush=True)
        self.drop_unused_models()

    def members(self, name: str) -> set[str]:
        """The trained runs ``name`` may stand for (itself, or what its best_of may choose)."""
        e = self.entries[name]
        return {name} if e.best_of is None else set().union(*(self.members(m) for m in e.best_of))

    def pending(self, name: str) -> bool:
        try:
            return self.resolve(name) is None
        except KeyError:
            return False

    def drop_unused_models(self) -> None:
        """Delete the merged model of every trained run that will never be scored on the test set:
        neither reported now nor among the choices of a reported name still undecided."""
        if self.args.keep_models:
            return
        reported = {run for _, run in self.reported_runs()}
        undecided = set().union(*(self.members(e.name) for e in self.entries.values()
                                  if e.test and e.sweep_of is None and self.pending(e.name)))
        for run in self.trained - reported - undecided:
            shutil.rmtree(self.out / run / "model", ignore_errors=True)

    def write_status(self, pending: list, final: bool = False) -> None:
        pending = [f"{j.kind} {j.name}" for j in pending]
        status = {
            "elapsed_s": round(time.time() - self.t0, 1),
            "final": final,
            "resolved": self.resolved,
            "scores": {k: round(v, 5) for k, v in self.score.items()},
            "settings": self.settings,
            "failed": self.failed,
            "running": [f"{j.kind} {j.name} (GPU {j.gpu}, {time.time() - j.started:.0f}s)" for j in self.running],
            "ready_not_started": pending,
            "waiting": sorted(n for n, e in self.entries.items() if e.best_of is None and n not in self.trained
                              and n not in self.failed and not any(j.name == n for j in self.running)
                              and f"train {n}" not in pending),
            "history": self.history,
        }
        tmp = self.out / "plan_status.json.tmp"
        tmp.write_text(json.dumps(status, indent=1))
        tmp.replace(self.out / "plan_status.json")

    def run(self) -> int:
        self.prepare_holdout()
        while True:
            for job in [j for j in self.running if j.proc.poll() is not None]:
                self.running.remove(job)
                self.finish(job)
            started = False
            jobs = self.candidates()  # starting one changes no other's readiness: only finishing does
            for job in jobs:
                gpu = self.free_gpu()
                if gpu is None:
                    break
                if self.left_s() < self.longest.get(job.kind, DEFAULT_SECONDS[job.kind]) * job.size * 1.15:
                    continue  # would not finish in time; a shorter job kind may still fit
                self.start(job, gpu)
                started = True
            pending = [job for job in jobs if job.proc is None]
            self.write_status(pending)
            if not self.running and not started and not self.held_back(pending):
                break
            time.sleep(2)
        self.write_status(self.candidates(), final=True)
        print(f"== plan finished in {time.time() - self.t0:.0f}s; failed: {self.failed or 'none'}", flush=True)
        return 0


def add_test_results(run_dir: Path) -> None:
    """Copy ``plora eval``'s test numbers into the run's summary.json (where ``plora compare`` reads)."""
    res = json.loads((run_dir / "eval-test" / "results.json").read_text())["tasks"]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    if "gsm8k" in res:
        summary.update(gsm8k_acc=res["gsm8k"]["accuracy"], gsm8k_n=res["gsm8k"]["n"])
    if "mmlu" in res:
        summary.update(mmlu_acc=res["mmlu"]["micro"], mmlu_macro=res["mmlu"]["macro"], mmlu_n=res["mmlu"]["n"],
                       mmlu_subset=bool(res["mmlu"].get("subset")))
    if "loss" in res:
        summary.update(test_loss=res["loss"]["loss"], test_loss_n=res["loss"]["n"])
    summary_path.write_text(json.dumps(summary, indent=1, default=str))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan")
    ap.add_argument("--model", default=None, help="model for every run (default: the recipe's)")
    ap.add_argument("--data-dir", help="folder holding gsm8k/ and mmlu/")
    ap.add_argument("--out")
    ap.add_argument("--gpus", default="0", help="comma-separated GPU ids to spread the jobs over")
    ap.add_argument("--per-gpu", type=int, default=4, help="jobs at a time on one GPU")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per job")
    ap.add_argument("--deadline-s", type=float, default=1500, help="start no job that cannot end within this")
    ap.add_argument("--hold", action="append", default=[], metavar="GPU:FILE",
                    help="start nothing on GPU while FILE exists (e.g. while a benchmark has it)")
    ap.add_argument("--keep-models", action="store_true")
    ap.add_argument("--status", metavar="OUT", help="print the status of a (running) plan and exit")
    args = ap.parse_args(argv)
    if args.status:
        path = Path(args.status) / "plan_status.json"
        if not path.is_file():
            print(f"error: no plan status at {path}", file=sys.stderr)
            return 2
        s = json.loads(path.read_text())
        print(json.dumps({k: s[k] for k in ("elapsed_s", "final", "resolved", "failed", "running",
                                            "ready_not_started", "waiting")}, indent=1))
        return 0
    missing = [flag for flag, value in (("--plan", args.plan), ("--data-dir", args.data_dir), ("--out", args.out))
               if not value]
    if missing:
        ap.error(f"missing {', '.join(missing)}")
    args.gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if args.per_gpu < 1 or not args.gpus:
        ap.error("--gpus needs at least one id and --per-gpu must be >= 1")
    if any(":" not in h or h.partition(":")[0] not in args.gpus for h in args.hold):
        ap.error("--hold takes GPU:FILE with GPU one of --gpus")
    args.hold = [tuple(h.split(":", 1)) for h in args.hold]
    try:
        plan, entries = load_plan(Path(args.plan))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return Driver(plan, entries, args).run()


if __name__ == "__main__":
    sys.exit(main())
