"""plora train / compare end to end on a tiny random-weight model (CPU), bad input, resume, recipes."""

import json

import pytest
import torch
import yaml

from plora.cli import main
from plora.train_config import build_config, merge, recipe_names

FAST = ["--max_steps", "6", "--batch_size", "4", "--logging_steps", "1", "--save_steps", "3",
        "--data_limit", "40", "--max_length", "512", "--eval.heldout_limit", "4", "--eval.loss_limit", "8",
        "--eval.train_slice", "8", "--eval.max_new_tokens", "8", "--eval.batch_size", "8", "--lr", "1e-3"]


def train(tmp_path, tiny_model_dir, name, *extra):
    out = tmp_path / name
    code = main(["train", "--quiet", "--model", str(tiny_model_dir), "--output_dir", str(out), *FAST, *extra])
    return code, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for name, extra in {
        "plora": ["--method", "plora", "--plora.unload_every", "2", "--eval.rank_every", "2"],
        "lora": ["--method", "lora"],
        "full": ["--method", "full", "--lr", "1e-4"],
    }.items():
        code, path = train(tmp, tiny_model_dir, name, *extra)
        assert code == 0
        out[name] = path
    return out


def test_run_directory_holds_every_output(runs):
    run = runs["plora"]
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "spectra.json", "loss.png", "model/config.json"):
        assert (run / f).exists(), f
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "plora" and summary["unloads"] == 3 and summary["steps"] == 6
    for key in ("base_train_loss", "final_train_loss", "heldout_loss", "heldout_loss_before", "heldout_acc"):
        assert summary[key] is not None, key
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("kind") == "rank"] == [2, 4, 6]
    assert max(r["unloads"] for r in rows if "loss" in r) == 3
    # after 3 unloads of rank 8 the accumulated update is far above rank 8 on some layer
    spectra = json.loads((run / "spectra.json").read_text())
    assert max(layer["numerical_rank"] for layer in spectra["layers"]) > 8
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["plora"]["unload_every"] == 2 and cfg["lora"]["r"] == 8


def test_merged_model_loads_without_adapter_layers(runs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs["plora"] / "model")
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert (runs["lora"] / "adapter" / "adapter_config.json").is_file()


def test_lora_update_stays_rank_r(runs):
    spectra = json.loads((runs["lora"] / "spectra.json").read_text())
    assert max(layer["numerical_rank"] for layer in spectra["layers"]) <= 8


def test_compare_report(runs, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(runs["lora"]), str(runs["plora"]), str(runs["full"]), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for method in ("lora", "plora", "full"):
        assert method in report
    assert (out / "loss.png").is_file() and (out / "spectra.png").is_file()


def test_resume_after_a_crash_continues_to_the_same_weights(tmp_path, tiny_model_dir):
    from transformers import TrainerCallback

    from plora.train import train as train_fn
    from plora.train_config import build_config, parse_overrides

    extra = ["--method", "plora", "--plora.unload_every", "2", "--eval.before", "false"]
    code, ref = train(tmp_path, tiny_model_dir, "ref", *extra)
    assert code == 0

    class Crash(TrainerCallback):  # dies during step 4, after the step-3 checkpoint
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt

    cut = tmp_path / "cut"
    overrides = parse_overrides(["--model", str(tiny_model_dir), "--output_dir", str(cut), *FAST, *extra])
    with pytest.raises(KeyboardInterrupt):
        train_fn(build_config("quickstart", overrides), progress=False, extra_callbacks=[Crash()])
    assert not (cut / "model").exists() and (cut / "checkpoints" / "checkpoint-3").is_dir()
    assert main(["train", "--quiet", "--resume", str(cut)]) == 0
    from safetensors.torch import load_file

    a, b = load_file(ref / "model" / "model.safetensors"), load_file(cut / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "qlora"], "method must be one of"),
        (["--lora.r", "0"], "lora.r"),
        (["--lora.rnk", "4"], "unknown config key 'lora.rnk'"),
        (["--data", "no/such/file.jsonl"], "no/such/file.jsonl"),
        (["--model", "no/such/model"], "no/such/model"),
        (["--plora.momentum", "2"], "momentum"),
        (["--recipe", "nope"], "recipe 'nope'"),
        (["--lr"], "needs a value"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, tiny_model_dir, capsys, args, message):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code = main(["train", "--model", str(tiny_model_dir), "--output_dir", str(out), *FAST, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written


def test_bad_data_files(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": oops}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"prompt": "x", "completion": "y"}\n')
    for path, message in ((bad, "line 2"), (empty, "empty"), (odd, "unknown fields")):
        code = main(["train", "--model", str(tiny_model_dir), "--data", str(path),
                     "--output_dir", str(tmp_path / "o"), *FAST])
        assert code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "o").exists()


def test_existing_output_dir_needs_overwrite(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("1")
    code = main(["train", "--model", str(tiny_model_dir), "--output_dir", str(out), *FAST])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "x").read_text() == "1"


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipe_parses(name):
    cfg = build_config(name, {})
    assert cfg.method in ("lora", "plora", "full")
    if cfg.method == "plora":
        cfg.plora.to_plora_config(cfg.seed)


def test_resume_of_a_non_run_is_refused(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a plora run directory" in capsys.readouterr().err


def test_debug_shows_the_traceback_instead():
    from plora.errors import UserError

    with pytest.raises(UserError, match="method must be one of"):
        main(["train", "--method", "qlora", "--debug"])


def test_an_override_of_one_unloading_point_replaces_the_recipes_other():
    cfg = build_config("gsm8k", {"plora": {"unload_every": 1}})  # the recipe unloads every 0.1 epochs
    assert cfg.plora.unload_every == 1 and cfg.plora.unload_every_epochs is None
    assert merge({"plora": {"stages": 4, "momentum": 0.5}}, {"plora": {"unload-every": 3}}) == {
        "plora": {"momentum": 0.5, "unload_every": 3}}
    assert merge({"plora": {"stages": 4}}, {"plora": {"momentum": 0.5}}) == {"plora": {"stages": 4, "momentum": 0.5}}
