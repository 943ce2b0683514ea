"""plora.launch: a compiled kernel is reused only for arguments triton would specialise alike."""

import inspect

import pytest
import torch

from plora import launch as L


class FakeCompiled:
    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("fast", grid, args))


class FakeKernel:
    """The JIT surface plora.launch uses: kernel[grid](*args, **kwargs) returns the compiled kernel."""

    def __init__(self, returns=True):
        self.calls = []
        self.returns = returns

        def fn(A, n, x, BLOCK, MODE=2):
            pass

        self.signature = inspect.signature(fn)
        self.arg_names = list(self.signature.parameters)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return FakeCompiled(self.calls) if self.returns else None
        return run


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setattr(L, "FAST", True)
    monkeypatch.setattr(L, "_COMPILED", {})


def test_second_launch_of_a_specialisation_goes_to_the_compiled_kernel():
    k = FakeKernel()
    A = torch.zeros(8)
    L.launch(k, (4,), A, 32, 0.5, BLOCK=64, num_warps=4)
    L.launch(k, (5, 2), A, 48, 1.5, BLOCK=64, num_warps=4)  # 48: divisible by 16 like 32
    assert [c[0] for c in k.calls] == ["jit", "fast"]
    # the compiled kernel gets every argument in order: the compile-time ones and defaults after
    # the positional ones, no launch options; the grid padded to three dimensions
    assert k.calls[1][1] == (5, 2, 1) and k.calls[1][2] == (A, 48, 1.5, 64, 2)


@pytest.mark.parametrize("other", [
    dict(n=33), dict(n=1), dict(n=1 << 40),  # divisibility by 16, 1, a 64-bit integer
    dict(A=torch.zeros(8, dtype=torch.float64)), dict(A=torch.zeros(9)[1:]),  # dtype, alignment
    dict(BLOCK=128), dict(num_warps=8),
])
def test_another_specialisation_goes_through_the_jit(other):
    k = FakeKernel()
    base = dict(A=torch.zeros(8), n=32, BLOCK=64, num_warps=4)
    L.launch(k, (1,), base["A"], base["n"], 0.5, BLOCK=base["BLOCK"], num_warps=base["num_warps"])
    changed = {**base, **other}
    L.launch(k, (1,), changed["A"], changed["n"], 0.5, BLOCK=changed["BLOCK"], num_warps=changed["num_warps"])
    assert [c[0] for c in k.calls] == ["jit", "jit"], other


def test_unknown_arguments_and_kernels_without_a_compiled_result_keep_the_jit_path(monkeypatch):
    k = FakeKernel()
    for _ in range(2):
        L.launch(k, (1,), torch.zeros(8), None, 0.5, BLOCK=64)  # None: not a kind the cache knows
    nothing = FakeKernel(returns=False)
    for _ in range(2):
        L.launch(nothing, (1,), torch.zeros(8), 32, 0.5, BLOCK=64)
    assert [c[0] for c in k.calls + nothing.calls] == ["jit"] * 4
    monkeypatch.setattr(L, "FAST", False)
    off = FakeKernel()
    for _ in range(2):
        L.launch(off, (1,), torch.zeros(8), 32, 0.5, BLOCK=64)
    assert [c[0] for c in off.calls] == ["jit"] * 2


def test_unhashable_compile_time_arguments_are_told_apart():
    k = FakeKernel()
    layout_a, layout_b = [1, 2], [1, 2]  # equal, not hashable: distinct objects, distinct kernels
    L.launch(k, (1,), torch.zeros(8), 32, 0.5, BLOCK=layout_a)
    L.launch(k, (1,), torch.zeros(8), 32, 0.5, BLOCK=layout_b)
    L.launch(k, (1,), torch.zeros(8), 32, 0.5, BLOCK=layout_a)
    assert [c[0] for c in k.calls] == ["jit", "jit", "fast"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["direct", "compensated", "stochastic"])
def test_unload_gives_the_same_bits_through_either_launch_path_on_cuda(mode, monkeypatch):
    """Unloads through triton's own launch path, then twice through plora.launch (the first launch
    of each kernel compiles through the JIT, the next ones reuse it): the same weights, residuals
    and statistics."""
    pytest.importorskip("triton")
    from peft import LoraConfig, get_peft_model
    from torch import nn

    import plora
    from plora.layers import adapted_layers
    from plora.unload_plan import UnloadPlan

    def run(fast):
        monkeypatch.setattr(L, "FAST", fast)
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(256, 160), nn.Linear(160, 256), nn.Linear(256, 160)).to("cuda", torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=8, target_modules=["0", "1", "2"]))
        plan, residuals, stats = UnloadPlan(adapted_layers(model)), {}, []
        for i in range(3):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.normal_(0, 0.05)
            s = plora.unload_(model, 1.0, merge_precision=mode, residuals=residuals, plan=plan, unload_index=i,
                              landed_sample_rows=32)
            stats.append((s.update_norm, s.landed_share))
        return [t.clone() for t in model.state_dict().values()] + list(residuals.values()), stats

    want, want_stats = run(False)
    for _ in range(2):
        got, got_stats = run(True)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
        for (n1, s1), (n2, s2) in zip(want_stats, got_stats):  # fp32 atomics: the order of sums may differ
            assert n1 == pytest.approx(n2, rel=1e-6) and s1 == pytest.approx(s2, rel=1e-5)
    assert L._COMPILED and any(entry for entry in L._COMPILED.values())  # the fast path was taken
