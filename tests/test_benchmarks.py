"""The benchmark scripts run end to end on a CPU (their --small smoke modes): they are what the
performance report is measured with, so a broken one must show here, not on the GPU machine."""

import argparse
import json

import pytest
from benchmark_scripts import load


def test_bench_unload_small_on_cpu(tmp_path, capsys):
    bench = load("bench_unload")
    out = tmp_path / "unload.json"
    assert bench.main(["--small", "--device", "cpu", "--reps", "1", "--warmup", "0", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    for res in results["models"].values():
        variants = {r["variant"] for r in res["rows"]}
        assert {"plora direct", "plora compensated", "plora stochastic", "naive merge (ReLoRA)"} <= variants
        assert all(r["ms"] > 0 for r in res["rows"])
    assert "| plora direct |" in capsys.readouterr().out


def test_bench_unload_refuses_a_malformed_tile():
    bench = load("bench_unload")
    with pytest.raises(argparse.ArgumentTypeError, match="ROWSxCOLSxWARPS"):
        bench.tiles_argument("3x3")
    with pytest.raises(argparse.ArgumentTypeError, match="powers of two"):
        bench.tiles_argument("24x128x4")
    assert bench.tiles_argument("32x64x4, 16x128x8") == [(32, 64, 4), (16, 128, 8)]


def test_bench_train_step_small_on_cpu(tmp_path):
    bench = load("bench_train_step")
    out = tmp_path / "step.json"
    assert bench.main(["--small", "--device", "cpu", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"full", "lora", "plora direct", "plora stochastic", "plora compensated", "lora (repeat)"}
    assert all(r["step_s"] > 0 and "step_vs_lora" in r for r in rows.values())
    assert all(set(r["pass"]) == {"every step", "every 100", "memory"} for v, r in rows.items() if v.startswith("plora"))
