"""plora.cuda_graphs: eager, then captured, then replayed; and an unload through graphs gives the
eager unload's bits."""

import contextlib

import pytest
import torch

from plora import cuda_graphs as CG


class FakeGraph:
    def __init__(self, log):
        self.log = log

    def replay(self):
        self.log.append("replay")


@pytest.fixture
def fake_cuda(monkeypatch):
    """Capture and replay without a GPU: the capture records the body's launches (runs it once, as
    recording does) and each replay is logged; a body marked ``fails`` cannot be captured (logged)."""
    log = []

    def capture(body, device):
        if getattr(body, "fails", False):
            log.append("capture failed")
            return CG._EAGER
        log.append("capture")
        out = body()
        return FakeGraph(log), out, device

    monkeypatch.setattr(CG.GraphCache, "_capture", staticmethod(capture))
    monkeypatch.setattr(CG.torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(CG, "ENABLED", True)
    return log


def _body(log, value):
    def body():
        log.append("eager")
        return value
    return body


def test_first_run_eager_second_captured_then_replayed(fake_cuda):
    cache, cuda = CG.GraphCache(), torch.device("cuda", 0)
    outs = [cache.run("k", _body(fake_cuda, i), cuda) for i in range(4)]
    # the capture records the body (its launches do not run then) and replays it at once
    assert fake_cuda == ["eager", "capture", "eager", "replay", "replay", "replay"]
    assert outs == [0, 1, 1, 1]  # a replay returns what the body returned at capture: the graph's outputs


def test_no_graphs_without_one_cuda_device_or_when_disabled(fake_cuda, monkeypatch):
    cache = CG.GraphCache()
    for device in (None, torch.device("cpu")):
        for _ in range(3):
            cache.run(("k", str(device)), _body(fake_cuda, 0), device)
    monkeypatch.setattr(CG, "ENABLED", False)
    for _ in range(3):
        cache.run("off", _body(fake_cuda, 0), torch.device("cuda", 0))
    assert fake_cuda == ["eager"] * 9


def test_a_failed_capture_stays_eager_and_clear_starts_over(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: fake_cuda.append("sync"))
    cache, cuda = CG.GraphCache(), torch.device("cuda", 0)
    failing = _body(fake_cuda, 0)
    failing.fails = True
    for _ in range(3):
        cache.run("bad", failing, cuda)
    assert fake_cuda == ["eager", "capture failed", "eager", "eager"]  # tried once, then eager for good
    fake_cuda.clear()
    for _ in range(3):
        cache.run("good", _body(fake_cuda, 1), cuda)
    cache.clear()  # a captured graph: its device is synchronised before the graphs go
    cache.run("good", _body(fake_cuda, 1), cuda)
    assert fake_cuda == ["eager", "capture", "eager", "replay", "replay", "sync", "eager"]


def test_the_plan_graphs_its_launches_on_one_cuda_device_only(fake_cuda):
    """UnloadPlan._launches: eager with the benchmark's launch options or with work on several
    devices; through the cache (eager, captured, replayed) with one CUDA device."""
    from types import SimpleNamespace

    from plora.unload_plan import UnloadPlan

    plan = UnloadPlan([])
    one, two = SimpleNamespace(device=torch.device("cuda", 0)), SimpleNamespace(device=torch.device("cuda", 1))
    plan._devices = [one, two]
    for _ in range(3):
        plan._launches("k", _body(fake_cuda, 0), {})
    plan._devices = [one]
    for _ in range(3):
        plan._launches("options", _body(fake_cuda, 0), {"has_stats": False})
    assert fake_cuda == ["eager"] * 6
    fake_cuda.clear()
    for _ in range(3):
        plan._launches("k", _body(fake_cuda, 0), {})
    assert fake_cuda == ["eager", "capture", "eager", "replay", "replay"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["direct", "compensated", "stochastic"])
def test_unload_through_cuda_graphs_gives_the_eager_bits_on_cuda(mode, monkeypatch):
    """Nine unloads with a kept plan, graphs on against graphs off: the same weights, residuals,
    adapters and statistics. Stretches of one momentum replay the graphs (from the second unload
    after a build on; the norms and statistics launched ahead of the refresh from the third);
    another momentum, and a factor given new storage within a stretch, rebuild the plan and drop
    them."""
    pytest.importorskip("triton")
    from peft import LoraConfig, get_peft_model
    from torch import nn

    import plora
    from plora.layers import adapted_layers
    from plora.unload_plan import UnloadPlan
    from toys import randomise_adapters_

    def run(enabled):
        monkeypatch.setattr(CG, "ENABLED", enabled)
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(256, 160), nn.Linear(160, 256), nn.Linear(256, 160)).to("cuda", torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=8, target_modules=["0", "1", "2"]))
        plan, residuals, stats = UnloadPlan(adapted_layers(model)), {}, []
        for i, momentum in enumerate((1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0)):
            randomise_adapters_(model, seed=i, scale=0.05)  # every factor its own values
            if i == 4:
                B = adapted_layers(model)[1].b_tensors()[0]
                B.data = B.data.clone()  # new storage: the plan is rebuilt, the graphs captured anew
            s = plora.unload_(model, momentum, merge_precision=mode, residuals=residuals, plan=plan,
                              unload_index=i, landed_sample_rows=32)
            stats.append((s.update_norm, s.landed_share))
        captured = [key for key, entry in plan._graphs._entries.items() if isinstance(entry, tuple)]
        return [t.clone() for t in model.state_dict().values()] + list(residuals.values()), stats, captured

    want, want_stats, none = run(False)
    got, got_stats, captured = run(True)
    # at momentum 1 the re-init runs inside the updates' sequence (reinit_with_updates): no graph of its own
    assert not none and {("ahead", 32), ("updates", 32, True)} <= set(captured) and "reinit" not in captured, captured
    assert len(want) == len(got) and all(torch.equal(a, b) for a, b in zip(want, got))
    for (n1, s1), (n2, s2) in zip(want_stats, got_stats):  # fp32 atomics: the order of sums may differ
        assert n1 == pytest.approx(n2, rel=1e-6) and s1 == pytest.approx(s2, rel=1e-5)
