"""The benchmark scripts run end to end on a CPU (their --small smoke modes): they are what the
performance report is measured with, so a broken one must show here, not on the GPU machine."""

import argparse
import inspect
import json
import statistics

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


def test_bench_unload_probes_are_named_options_of_the_kernel():
    from plora.kernels import grouped_update_

    bench = load("bench_unload")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown probe.*nope"):
        bench.probes_argument("no-stats,nope")
    assert bench.probes_argument("") == []
    accepted = set(inspect.signature(grouped_update_).parameters)
    for name, (_, options) in bench.PROBES.items():  # a typo would only fail on a GPU
        assert set(options) <= accepted, name


def test_bench_unload_reads_norm_variants_and_refuses_malformed_ones():
    from plora.kernels import update_norms_

    bench = load("bench_unload")
    got = bench.norm_variants_argument("8192:64:2:tf32x3:1, 2048:16:4:ieee:3")
    assert got == [{"programs": 8192, "chunk": 64, "warps": 2, "precision": "tf32x3", "stages": 1},
                   {"programs": 2048, "chunk": 16, "warps": 4, "precision": "ieee", "stages": 3}]
    assert set(got[0]) <= set(inspect.signature(update_norms_).parameters)  # a typo would only fail on a GPU
    for bad in ("8192:64:2:ieee", "8192:48:2:ieee:1", "8192:64:3:ieee:1", "8192:64:2:tf32:1", "x:64:2:ieee:1",
                "0:16:4:ieee:1", "8192:64:2:ieee:0", "8192:64:2:ieee:1:1"):
        with pytest.raises(argparse.ArgumentTypeError, match="PROGRAMS:CHUNK:WARPS:PRECISION:STAGES"):
            bench.norm_variants_argument(bad)


def test_bench_train_step_small_on_cpu(tmp_path):
    bench = load("bench_train_step")
    out = tmp_path / "step.json"
    assert bench.main(["--small", "--device", "cpu", "--paired", "--paired-steps", "4", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = {r["variant"]: r for r in results["rows"]}
    assert set(rows) == {"full", "lora", "plora direct", "plora stochastic", "plora compensated", "lora (repeat)"}
    assert all(r["step_s"] > 0 and "step_vs_lora" in r for r in rows.values())
    assert all(set(r["pass"]) == {"every step", "every 100", "memory"} for v, r in rows.items() if v.startswith("plora"))
    # paired: LoRA and each PLoRA variant once per round, every ratio against the same round's LoRA step
    paired = {r["variant"]: r for r in results["paired"]}
    assert list(paired) == ["lora", "plora direct", "plora stochastic", "plora compensated"]
    assert paired["lora"]["vs_lora_per_round"] == [1.0] * 4
    for v, r in paired.items():
        assert len(r["step_s_all"]) == 4
        assert r["vs_lora_per_round"] == pytest.approx([s / l for s, l in zip(r["step_s_all"], paired["lora"]["step_s_all"])])
        if v != "lora":
            assert 0 < r["unload_vs_lora"] < r["step_vs_lora"] and set(r["pass"]) == {"every step", "every 100"}
            assert r["train_vs_lora"] > 0 and len(r["unload_s_all"]) == 4


def test_bench_train_step_paired_seconds_ends_the_rounds_in_time(tmp_path, capsys):
    """--paired-seconds stops after the round that reaches it (whole rounds, the warm-up not counted);
    a budget that is not a positive number is refused."""
    bench = load("bench_train_step")
    out = tmp_path / "step.json"
    assert bench.main(["--small", "--device", "cpu", "--variants", "lora", "plora direct", "--paired",
                       "--paired-steps", "50", "--paired-seconds", "1e-9", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    paired = results["paired"]
    assert [len(r["step_s_all"]) for r in paired] == [1, 1] and len(paired[1]["unload_s_all"]) == 1
    assert "--variants lora 'plora direct' --paired" in results["command"]  # the command as it can be run again
    assert "1 timed rounds" in capsys.readouterr().out
    for bad in ("0", "-5", "nan"):
        with pytest.raises(SystemExit):
            bench.main(["--small", "--device", "cpu", "--paired", "--paired-seconds", bad])
        assert "--paired-seconds must be a positive number" in capsys.readouterr().err


def test_bench_train_step_reports_a_saved_run_and_says_when_a_target_is_open(tmp_path, capsys):
    bench = load("bench_train_step")
    out = tmp_path / "step.json"
    assert bench.main(["--small", "--device", "cpu", "--paired", "--variants", "lora", "plora direct",
                       "--json", str(out)]) == 0
    measured = capsys.readouterr().out
    assert bench.main(["--report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == measured.strip()  # the same tables, from the file
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(SystemExit):
        bench.main(["--report", str(bad)])
    assert "not a readable bench_train_step result" in capsys.readouterr().err

    def row(ratios):  # a PLoRA row whose rounds have these step ratios (LoRA's step 1 s, no unload)
        r = {"variant": "plora direct", "step_s": 1.0, "unload_s": 0.0, "unload_vs_lora": 0.0,
             "train_vs_lora": 1.0, "step_vs_lora": statistics.median(ratios), "every_100_vs_lora": 1.0,
             "vs_lora_per_round": ratios, "step_s_all": ratios, "unload_s_all": [0.0] * len(ratios)}
        return {**r, "pass": bench.step_targets(r)}  # the script's own targets

    steady, noisy = [1.02] * 9, [0.90, 0.95, 1.0, 1.01, 1.02, 1.03, 1.05, 1.1, 1.2]
    assert bench.median_interval(steady) == (1.02, 1.02)
    assert "every step PASS" in bench.paired_row(row(steady), [1.0] * 9)
    assert "every step open (median PASS)" in bench.paired_row(row(noisy), [1.0] * 9)
    assert "every step FAIL" in bench.paired_row(row([1.05] * 9), [1.0] * 9)


def test_profile_unload_small_on_cpu(tmp_path, capsys):
    prof = load("profile_unload")
    out = tmp_path / "profile.json"
    assert prof.main(["--device", "cpu", "--models", "tiny", "--modes", "direct", "--warmup", "1", "--reps", "2",
                      "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    assert result["layers"] == 14 and len(result["unloads"]) == 2
    for row in result["unloads"]:
        # every phase the CPU unload runs is marked (momentum 1: no B scaling); on the CPU there are
        # no kernels
        assert set(row["phases_host_us"]) == set(prof.PHASES.values()) - {"scale B"}
        assert 0 < sum(row["phases_host_us"].values()) <= row["wall_us"] and row["kernels"] == 0
    assert "| wall | GPU busy |" in capsys.readouterr().out


def test_profile_unload_host_only_times_each_phase(tmp_path, capsys):
    prof = load("profile_unload")
    out = tmp_path / "host.json"
    assert prof.main(["--device", "cpu", "--models", "tiny", "--modes", "stochastic", "--warmup", "1", "--reps", "3",
                      "--host-only", "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    assert result["layers"] == 14 and len(result["host_only"]) == 3
    for row in result["host_only"]:
        assert set(row["phases_host_us"]) == set(prof.PHASES.values()) - {"scale B"}
        assert 0 < sum(row["phases_host_us"].values()) <= row["wall_us"]
    printed = capsys.readouterr().out
    assert "host time by phase, no profiler" in printed and "| wall | host: weights' pointers | host: norms and statistics launched ahead | host: refresh |" in printed


def test_profile_unload_analyses_a_trace():
    prof = load("profile_unload")
    assert prof.union_length([(0, 4), (2, 6), (10, 11), (3, 5)]) == 7
    trace = {"traceEvents": [
        {"ph": "X", "cat": "user_annotation", "name": "plora: unload", "ts": 100, "dur": 100},
        {"ph": "X", "cat": "user_annotation", "name": "plora: refresh", "ts": 101, "dur": 5},
        {"ph": "X", "cat": "user_annotation", "name": "plora: grouped updates", "ts": 110, "dur": 20},
        {"ph": "X", "cat": "kernel", "name": "triton_norm", "ts": 115, "dur": 10},
        {"ph": "X", "cat": "kernel", "name": "unload_tile_grouped_0d1d", "ts": 140, "dur": 50},
        {"ph": "X", "cat": "kernel", "name": "outside", "ts": 300, "dur": 5},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "plora: unload", "ts": 115, "dur": 90},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "plora: grouped updates", "ts": 140, "dur": 50},
    ]}
    (row,) = prof.analyse(trace)["unloads"]
    assert row["gpu_busy_us"] == 60 and row["kernels"] == 2 and row["first_update_kernel_after_us"] == 40
    assert row["phases_host_us"] == {"refresh": 5, "grouped updates": 20}


def test_profile_unload_reads_a_kept_trace(tmp_path, capsys):
    import gzip

    prof = load("profile_unload")
    trace = {"traceEvents": [{"ph": "X", "cat": "user_annotation", "name": "plora: unload", "ts": 0, "dur": 10},
                             {"ph": "X", "cat": "kernel", "name": "unload_tile_grouped", "ts": 2, "dur": 4}]}
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    assert prof.main(["--from-trace", str(path)]) == 0
    (row,) = json.loads(capsys.readouterr().out)["unloads"]
    assert row["gpu_busy_us"] == 4 and row["first_update_kernel_after_us"] == 2
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit):
        prof.main(["--from-trace", str(tmp_path / "bad.json")])
    assert "not a readable chrome trace" in capsys.readouterr().err


def test_bench_update_kernels_refuses_bad_lists_and_needs_cuda(capsys, monkeypatch):
    bench = load("bench_update_kernels")
    assert bench.int_list("8, 16") == [8, 16]
    for bad in ("", "8,x", "0", "-2"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integers"):
            bench.int_list(bad)
    assert bench.modes_list("direct,stochastic") == ["direct", "stochastic"]
    with pytest.raises(argparse.ArgumentTypeError, match="modes are"):
        bench.modes_list("direct,exact")
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_bench_update_kernels_groups_every_linear_layer_of_a_shape():
    bench = load("bench_update_kernels")
    groups = bench.model_groups("tiny", "cpu")
    hidden, intermediate, layers, kv = bench.SHAPES["tiny"]
    assert sum(g.count for g in groups) == 7 * layers
    assert {(g.m, g.n) for g in groups} == {(hidden, hidden), (kv, hidden), (intermediate, hidden),
                                            (hidden, intermediate)}
    sub = groups[0].first(1)
    assert sub.count == 1 and sub.ptrs.shape == (4, 1) and groups[0].count == 2 * layers


def test_launch_costs_refuses_without_a_gpu(capsys, monkeypatch):
    module = load("launch_costs")
    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: False)
    assert module.main() == 1
    assert "needs a CUDA device" in capsys.readouterr().err
