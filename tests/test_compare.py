"""`plora compare` on fabricated LoRA / PLoRA / full run directories."""

import json

import pytest
import torch
from torch import nn

from plora import analysis
from plora.cli import main
from plora.compare import compare_runs, load_run
from plora.errors import UserError

BASE = 2.0
# last 10 of 100 logged losses alternate around these means; the very last value differs from
# the mean, so a comparison that used the last step instead of the smoothed loss would fail
TAIL = {"lora": (1.4, 1.6), "plora": (1.0, 1.2), "full": (0.9, 1.1)}


def write_metrics(path, method, *, bad_line=False, rank_lines=False):
    lo, hi = TAIL[method]
    lines = []
    for i in range(100):
        loss = BASE - (BASE - lo) * i / 90 if i < 90 else (lo if i % 2 == 0 else hi)
        lines.append({"step": 10 * i, "loss": loss, "lr": 1e-4, "unloads": (10 * i) // 100 if method == "plora" else 0,
                      "tokens_per_s": 1000.0, "time_s": 1.5 * i})
        if rank_lines and i % 20 == 0:
            lines.append({"kind": "rank", "step": 10 * i, "effective_rank": 1.0 + i / 10, "numerical_rank": 8 + i})
    lines.append({"kind": "eval", "step": 990, "heldout_loss": lo + 0.2})
    text = "\n".join(json.dumps(x) for x in lines)
    if bad_line:
        text += '\n{"step": 1000, "loss": 0.5'  # truncated last line of a killed run
    path.write_text(text + "\n")


def tiny_report():
    """A real analysis.update_report: rank-4 update in one layer, rank-2 in the other."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 10))
    start = analysis.snapshot(model)
    with torch.no_grad():
        model[0].weight += torch.randn(12, 4) @ torch.randn(4, 16)
        model[1].weight += torch.randn(10, 2) @ torch.randn(2, 12)
    return analysis.update_report(model, start)


@pytest.fixture
def runs(tmp_path):
    dirs = {m: tmp_path / f"run-{m}" for m in TAIL}
    for d in dirs.values():
        d.mkdir()
    common = {"base_train_loss": BASE, "peak_memory_bytes": 3 * 2**30, "train_seconds": 125.0}
    # LoRA: no config.yaml, no spectra.json, a corrupt last metrics line
    (dirs["lora"] / "summary.json").write_text(json.dumps(
        {**common, "method": "lora", "rank": 8, "name": "lora-r8", "gsm8k_acc": 0.25, "trainable_params": 1_200_000,
         "numerical_rank": 8, "effective_rank": 6.5}))
    write_metrics(dirs["lora"] / "metrics.jsonl", "lora", bad_line=True)
    # PLoRA: everything, including rank lines and a spectra.json from analysis.update_report
    (dirs["plora"] / "config.yaml").write_text("method: plora\nrank: 8\nplora:\n  unload_every: 100\n  momentum: 1.0\n")
    (dirs["plora"] / "summary.json").write_text(json.dumps(
        {**common, "method": "plora", "rank": 8, "name": "plora-r8", "unload_every": 100, "unloads": 9,
         "gsm8k_acc": 0.3, "trainable_params": 1_200_000}))
    (dirs["plora"] / "spectra.json").write_text(json.dumps(tiny_report()))
    write_metrics(dirs["plora"] / "metrics.jsonl", "plora", rank_lines=True)
    # full: config only says the method; held-out loss only in the metrics' eval line
    (dirs["full"] / "config.yaml").write_text("method: full\n")
    (dirs["full"] / "summary.json").write_text(json.dumps({**common, "trainable_params": 135_000_000}))
    write_metrics(dirs["full"] / "metrics.jsonl", "full")
    return dirs


def table(report_text):
    lines = [ln for ln in report_text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_compare_table_plots_and_learning_ability(runs, tmp_path):
    out = tmp_path / "cmp"
    report = compare_runs([runs["lora"], runs["plora"], runs["full"]], out, title="Toy")
    assert report == out / "report.md"
    for png in ("loss.png", "spectra.png", "rank.png"):
        assert (out / png).stat().st_size > 1000, png
    text = report.read_text()
    assert text.startswith("# Toy")
    rows = {r["run"]: r for r in table(text)}
    assert list(rows) == ["lora-r8", "plora-r8", "run-full"]
    lora, plora, full = rows["lora-r8"], rows["plora-r8"], rows["run-full"]
    assert lora["final train loss"] == "1.5000" and plora["final train loss"] == "1.1000"
    assert full["final train loss"] == "1.0000"
    assert (lora["learning ability"], plora["learning ability"], full["learning ability"]) == ("0.5000", "0.9000", "1.0000")
    assert (lora["LA vs LoRA"], plora["LA vs LoRA"], full["LA vs LoRA"]) == ("1.00×", "1.80×", "2.00×")
    assert (lora["LA vs full"], plora["LA vs full"], full["LA vs full"]) == ("50%", "90%", "100%")
    assert plora["unloading"] == "every 100 steps (9 unloads)" and lora["unloading"] == "none"
    assert plora["momentum"] == "1" and lora["momentum"] == "—"
    assert full["method"] == "full" and full["rank"] == "—"
    assert full["held-out loss"] == "1.1000"  # from the eval line
    assert lora["GSM8K"] == "25.0%" and full["GSM8K"] == "—" and lora["MMLU"] == "—"
    assert lora["peak memory"] == "3.00 GiB" and lora["time"] == "2m 05s"
    assert lora["trainable params"] == "1.2M" and full["trainable params"] == "135M"
    assert lora["numerical rank ΔW"] == "8.0" and lora["energy rank 99% ΔW"] == "—"  # summary fallback
    assert plora["numerical rank ΔW"] == "3.0"  # spectra.json aggregate: mean of ranks 4 and 2
    assert full["effective rank ΔW"] == "—"

    data = json.loads((out / "compare.json").read_text())
    by_name = {r["run"]: r for r in data["runs"]}
    assert by_name["plora-r8"]["la_vs_lora"] == pytest.approx(1.8)
    assert by_name["lora-r8"]["la_vs_full"] == pytest.approx(0.5)
    assert by_name["plora-r8"]["final_train_loss_source"] == "mean of last 10 of 100 logged steps"
    assert data["references"] == {"full": "run-full", "lora_rank_8": "lora-r8"}
    assert any("line 102" in n for n in by_name["lora-r8"]["notes"])  # the truncated line, skipped
    assert set(data["plots"]) == {"loss.png", "spectra.png", "rank.png"}


def test_rank_plot_skipped_without_rank_lines(runs, tmp_path):
    out = tmp_path / "cmp"
    compare_runs([runs["lora"], runs["full"]], out)
    assert not (out / "rank.png").exists() and not (out / "spectra.png").exists()
    assert (out / "loss.png").exists()
    assert "rank.png skipped" in (out / "report.md").read_text()


def test_bad_input_raises_user_error(runs, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run directory"):
        compare_runs([runs["lora"], tmp_path / "empty"], tmp_path / "o1")
    (runs["full"] / "summary.json").write_text("{not json")
    with pytest.raises(UserError, match="summary.json"):
        load_run(runs["full"])
    out = tmp_path / "o2"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="--overwrite"):
        compare_runs([runs["lora"]], out)
    assert compare_runs([runs["lora"]], out, overwrite=True).exists()


def test_cli_exit_codes(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["compare", str(runs["lora"]), str(runs["plora"]), "--out", str(out), "--title", "T"]) == 0
    assert (out / "report.md").read_text().startswith("# T")
    assert main(["compare", str(tmp_path / "nope"), "--out", str(tmp_path / "cli2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compare", str(runs["lora"]), "--out", str(out)]) == 2  # non-empty, no --overwrite
