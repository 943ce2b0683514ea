"""The reproduction driver's plan logic (benchmarks/reproduce.py): parsing, merging, resolution."""

import argparse
import json
from pathlib import Path

import pytest
from benchmark_scripts import load

ROOT = Path(__file__).resolve().parents[1]
R = load("reproduce")


def _write(tmp_path, text):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return path


PLAN = """
recipe: gsm8k
common: {epochs: 1}
runs:
  - name: lora
    sweep_lr: [1.0e-4, 1.0e-3]
    overrides: {method: lora}
  - name: plora
    sweep_lr: [1.0e-4, 1.0e-3]
    overrides: {method: plora, plora: {unload_every_epochs: 0.1}}
  - name: plora-step
    base: plora
    overrides: {plora: {unload_every: 1}}
  - name: plora-period
    best_of: [plora, plora-step]
  - name: plora-m
    base: plora-period
    overrides: {plora: {momentum: 0.5}}
  - name: lora-attn
    base: lora
    lr_from: plora
    overrides: {lora: {target_modules: attention}}
"""


def _driver(tmp_path, text=PLAN):
    plan, entries = R.load_plan(_write(tmp_path, text))
    args = argparse.Namespace(out=str(tmp_path / "out"), data_dir=str(tmp_path), model=None, gpus=["0"], per_gpu=2,
                              threads=1, deadline_s=100, keep_models=False, hold=[])
    return R.Driver(plan, entries, args)


def _trained(driver, name, loss):
    driver.trained.add(name)
    driver.score[name] = loss
    driver.settings[name] = driver.ready_settings(driver.entries[name])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "docs" / "results" / "plans").glob("*.yaml")))
def test_shipped_plans_parse_and_refer_to_known_runs(name):
    plan, entries = R.load_plan(ROOT / "docs" / "results" / "plans" / name)
    names = {e.name for e in entries}
    assert any(f"{n}-seed1" in names and f"{n}-seed2" in names for n in names)  # every round repeats over seeds
    from plora.train_config import build_config, merge

    for e in entries:  # every run's own settings make a valid training configuration
        if e.best_of is None or e.sweep_lr:
            build_config(plan.get("recipe", "gsm8k"), merge(plan.get("common") or {}, e.overrides))
    assert plan["holdout"]["records"] == 500


def test_sweep_expands_and_resolves_to_the_lowest_heldout_loss(tmp_path):
    d = _driver(tmp_path)
    assert d.resolve("lora") is None  # nothing trained yet
    _trained(d, "lora-lr0.0001", 1.2)
    assert d.resolve("lora") is None  # one child still to run
    _trained(d, "lora-lr0.001", 0.9)
    assert d.resolve("lora") == "lora-lr0.001"
    assert d.settings["lora-lr0.001"] == {"method": "lora", "lr": 1e-3}


def test_base_inherits_settings_and_a_new_point_replaces_the_old(tmp_path):
    d = _driver(tmp_path)
    _trained(d, "plora-lr0.0001", 0.8)
    _trained(d, "plora-lr0.001", 0.9)
    step = d.ready_settings(d.entries["plora-step"])
    assert step == {"method": "plora", "lr": 1e-4, "plora": {"unload_every": 1}}
    assert d.ready_settings(d.entries["plora-m"]) is None  # waits for plora-step
    _trained(d, "plora-step", 0.7)
    assert d.resolve("plora-period") == "plora-step"
    assert d.ready_settings(d.entries["plora-m"]) == {
        "method": "plora", "lr": 1e-4, "plora": {"unload_every": 1, "momentum": 0.5}}


def test_a_plain_runs_variants_start_beside_it(tmp_path):
    """A seed variant of a plain run needs only its settings, not its training: it is ready at once,
    and stays ready if that run fails."""
    d = _driver(tmp_path, PLAN + """  - name: fixed
    overrides: {method: plora, lr: 4.0e-3, plora: {momentum: 0.1}}
  - name: fixed-seed1
    base: fixed
    overrides: {seed: 1}
  - name: fixed-attn
    base: fixed-seed1
    lr_from: fixed
    overrides: {lora: {target_modules: attention}}
""")
    want = {"method": "plora", "lr": 4e-3, "plora": {"momentum": 0.1}, "seed": 1}
    assert d.ready_settings(d.entries["fixed-seed1"]) == want
    assert d.ready_settings(d.entries["fixed-attn"]) == {**want, "lora": {"target_modules": "attention"}}
    ready = {c.name for c in d.candidates()}
    assert {"fixed", "fixed-seed1", "fixed-attn"} <= ready
    d.failed["fixed"] = "boom"
    assert "fixed-seed1" in {c.name for c in d.candidates()}


def test_lr_from_takes_another_runs_learning_rate(tmp_path):
    d = _driver(tmp_path)
    for name, loss in (("lora-lr0.0001", 1.0), ("lora-lr0.001", 2.0), ("plora-lr0.0001", 2.0), ("plora-lr0.001", 1.0)):
        _trained(d, name, loss)
    assert d.ready_settings(d.entries["lora-attn"]) == {
        "method": "lora", "lr": 1e-3, "lora": {"target_modules": "attention"}}


def test_a_failed_run_fails_what_depends_on_it_only(tmp_path):
    d = _driver(tmp_path)
    d.failed["plora-lr0.0001"] = "boom"
    _trained(d, "plora-lr0.001", 0.9)
    assert d.resolve("plora") == "plora-lr0.001"  # the sweep chooses among the runs that ended
    d.failed["lora-lr0.0001"] = d.failed["lora-lr0.001"] = "boom"
    d.candidates()
    assert "lora" in d.failed and "lora-attn" in d.failed
    assert "plora-step" not in d.failed


def test_reported_runs_are_sweep_winners_and_plain_runs(tmp_path):
    d = _driver(tmp_path)
    _trained(d, "lora-lr0.0001", 1.0)
    _trained(d, "lora-lr0.001", 2.0)
    assert [run for _, run in d.reported_runs()] == ["lora-lr0.0001"]
    for name, loss in (("plora-lr0.0001", 0.8), ("plora-lr0.001", 0.9), ("plora-step", 1.0)):
        _trained(d, name, loss)
    # the sweeps' winners, the plain run plora-step, the best_of plora-period; never a sweep's loser
    assert [run for _, run in d.reported_runs()] == ["lora-lr0.0001", "plora-lr0.0001", "plora-step",
                                                     "plora-lr0.0001"]


def test_a_run_chosen_under_two_names_is_scored_once(tmp_path):
    d = _driver(tmp_path)
    for name, loss in (("plora-lr0.0001", 0.8), ("plora-lr0.001", 0.9), ("plora-step", 1.0)):
        _trained(d, name, loss)
    assert d.resolve("plora-period") == d.resolve("plora") == "plora-lr0.0001"
    evals = [j.name for j in d.candidates() if j.kind == "eval"]
    assert evals.count("plora-lr0.0001") == 1


def test_a_model_is_kept_while_a_reported_choice_may_still_pick_it(tmp_path):
    """The bug this guards: a test: false run chosen later by a reported best_of had lost its model."""
    plan = PLAN.replace("  - name: plora-period\n    best_of: [plora, plora-step]\n",
                        "  - name: plora-period\n    best_of: [plora, plora-step]\n    test: false\n"
                        "  - name: plora-best\n    best_of: [plora-period, plora-m]\n")
    for overrides in ("{plora: {momentum: 0.5}}", "{plora: {unload_every: 1}}"):
        plan = plan.replace(f"overrides: {overrides}", f"overrides: {overrides}\n    test: false")

    def train_all(sub, losses):
        (tmp_path / sub).mkdir()
        d = _driver(tmp_path / sub, plan)
        for name, loss in zip(("plora-lr0.0001", "plora-lr0.001", "plora-step", "plora-m"), losses):
            (d.out / name / "model").mkdir(parents=True)
            (d.out / name / "summary.json").write_text(json.dumps({"heldout_loss": loss}))
            job = R.Job(name, "train", 0, [], d.out / "x.log", settings=d.ready_settings(d.entries[name]))
            job.proc = argparse.Namespace(returncode=0)
            d.finish(job)  # what the driver does when a training job ends
        return d

    d = train_all("a", (0.8, 0.9, 1.0, 0.7))
    assert (d.out / "plora-m" / "model").is_dir()  # plora-best may choose it: kept
    assert not (d.out / "plora-lr0.001" / "model").exists()  # lost its sweep and every choice
    assert (d.out / "plora-lr0.0001" / "model").is_dir()  # the sweep's winner is reported
    assert not (d.out / "plora-step" / "model").exists()  # lost plora-best once it was decided
    assert d.resolve("plora-best") == "plora-m"
    # plora-step wins plora-period (test: false, no sweep) before plora-best is decided: kept until
    # plora-m has trained, then chosen by plora-best
    d = train_all("b", (0.8, 0.9, 0.6, 0.7))
    assert d.resolve("plora-best") == "plora-step"
    assert (d.out / "plora-step" / "model").is_dir()


def test_a_longer_run_is_judged_by_its_epochs(tmp_path):
    d = _driver(tmp_path, PLAN + "  - name: lora-2ep\n    base: lora\n    overrides: {epochs: 2}\n")
    for name in ("lora-lr0.0001", "lora-lr0.001"):
        _trained(d, name, 1.0)
    sizes = {j.name: j.size for j in d.candidates() if j.kind == "train"}
    assert sizes["lora-2ep"] == 2.0 and sizes["plora-lr0.0001"] == 1.0


def test_train_command_flattens_overrides(tmp_path):
    d = _driver(tmp_path)
    d.fit_records = 10
    cmd = d.train_cmd("x", {"lr": 1e-4, "plora": {"momentum": 0.5}, "lora": {"target_modules": "attention"}})
    assert cmd[cmd.index("--plora.momentum") + 1] == "0.5"
    assert cmd[cmd.index("--lora.target_modules") + 1] == '"attention"'
    assert cmd[cmd.index("--data_limit") + 1] == "10"
    from plora.train_config import parse_overrides

    parsed = parse_overrides(cmd[cmd.index("--recipe") + 4:])
    assert parsed["lora"]["target_modules"] == "attention" and parsed["lr"] == 1e-4


@pytest.mark.parametrize("text, message", [
    ("runs: []", "non-empty"),
    ("runs: [{overrides: {}}]", "needs a name"),
    ("runs: [{name: a, base: b}]", "unknown run 'b'"),
    ("runs: [{name: a}, {name: a}]", "used twice"),
    ("runs: [{name: a, lrs: [1]}]", "unknown keys"),
])
def test_malformed_plans_are_refused(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        R.load_plan(_write(tmp_path, text))


def test_a_held_gpu_makes_the_plan_wait_not_end(tmp_path):
    d = _driver(tmp_path)
    flag = tmp_path / "bench.running"
    flag.write_text("")
    d.args.hold = [("0", str(flag))]
    pending = d.candidates()
    assert d.free_gpu() is None and d.held_back(pending)  # the bug this guards: the plan ended at once
    flag.unlink()
    assert d.free_gpu() == "0" and not d.held_back(pending)


def test_report_tables_from_a_plan_folder(tmp_path, capsys):
    """reproduce_report reads what the driver wrote: sweep winner in bold, seeds as mean ± sd, differences."""
    import json

    report = load("reproduce_report")
    plan = tmp_path / "plan.yaml"
    plan.write_text("""
runs:
  - {name: lora-r8, sweep_lr: [1.0e-4, 1.0e-3], overrides: {method: lora}}
  - {name: lora-r8-seed1, base: lora-r8, overrides: {seed: 1}}
  - {name: plora-best, overrides: {method: plora}}
  - {name: plora-best-seed1, base: plora-best, overrides: {seed: 1}}
  - {name: full, overrides: {method: full}}
""")
    out = tmp_path / "out"
    runs = {"lora-r8-lr0.0001": 0.8, "lora-r8-lr0.001": 0.6, "lora-r8-seed1": 0.62, "full": 0.5,
            "plora-best": 0.63, "plora-best-seed1": 0.64}
    for name, loss in runs.items():
        (out / name).mkdir(parents=True)
        (out / name / "summary.json").write_text(json.dumps(
            {"name": name, "heldout_loss": loss, "base_train_loss": 1.0, "final_train_loss": loss - 0.1,
             "gsm8k_acc": 0.04 if name == "full" else 0.03}))
        (out / name / "config.yaml").write_text("lr: 0.001\n")
    (out / "plan_status.json").write_text(json.dumps(
        {"resolved": {"lora-r8": "lora-r8-lr0.001"}, "waiting": [], "ready_not_started": ["eval full", "train lora-r8-seed1"],
         "failed": {}}))
    figure = tmp_path / "la.png"
    assert report.main([str(out), "--plan", str(plan), "--figure", str(figure)]) == 0
    text = capsys.readouterr().out
    assert figure.stat().st_size > 1000 and "![Learning ability against LoRA r=8](la.png)" in text
    assert "0.0001: 0.8000, **0.001: 0.6000**" in text
    assert "| LoRA r=8: lora-r8-lr0.001, lora-r8-seed1 | 0.6100 ± 0.0141 (n=2)" in text
    assert "| full | lora-r8-lr0.001 | -0.1000 |" in text and "+1.0 pt" in text
    # seed by seed: (0.63 - 0.60, 0.64 - 0.62)
    assert "| best PLoRA r=8 − LoRA r=8, paired by seed | 0.0250 ± 0.0071 (n=2)" in text
    assert "## Choices" not in text  # the plan makes none: no empty section
    not_run, by_hand = text.split("## Not run")[1].split("## Run after the driver ended")
    assert "eval full" in not_run and "lora-r8-seed1" not in not_run  # its summary is there: run by hand
    assert "train lora-r8-seed1" in by_hand
