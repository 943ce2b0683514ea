"""The unload primitive: output invariance, re-initialisation, precision, NaN guard."""

import math

import pytest
import torch

import plora
from plora.layers import adapted_layers
from plora.unload import resolve_precision
from toys import gpt2_peft, toy_inputs, toy_peft

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def outputs(model, dtype):
    tokens, image = toy_inputs()
    y, c = model(tokens, image.to(dtype))
    return y.float(), c.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("rslora", [False, True])
def test_output_unchanged_by_unload(dtype, momentum, rslora):
    model = toy_peft(dtype, use_rslora=rslora)
    before = outputs(model, dtype)
    w_before = {l.name: l.weight.detach().clone() for l in adapted_layers(model)}
    stats = plora.unload_(model, momentum, landed_sample_rows=0)
    after = outputs(model, dtype)
    for b, a in zip(before, after):
        scale = b.abs().max().item()
        assert (b - a).abs().max().item() <= TOL[dtype] * max(1.0, scale)
    assert stats.layers == 4 and stats.update_norm > 0
    # the base really changed: the update went somewhere
    changed = [not torch.equal(w_before[l.name], l.weight) for l in adapted_layers(model)]
    assert all(changed)


def test_fan_in_fan_out_layer():
    model = gpt2_peft()
    x = torch.randn(5, 16)
    y0 = model(x)
    delta = adapted_layers(model)[0].delta_weight().clone()
    w0 = adapted_layers(model)[0].weight.detach().clone()
    plora.unload_(model, 1.0)
    torch.testing.assert_close(model(x), y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapted_layers(model)[0].weight, w0 + delta, atol=1e-6, rtol=1e-6)


def test_base_receives_exactly_m_times_peft_delta():
    model = toy_peft()
    layers = adapted_layers(model)
    deltas = {l.name: l.delta_weight().detach().clone() for l in layers}
    w0 = {l.name: l.weight.detach().clone() for l in layers}
    plora.unload_(model, 0.3)
    for l in layers:
        torch.testing.assert_close(l.weight, w0[l.name] + 0.3 * deltas[l.name], atol=1e-6, rtol=1e-5)
        # the adapter keeps the remaining 70%
        torch.testing.assert_close(l.delta_weight(), 0.7 * deltas[l.name], atol=1e-6, rtol=1e-5)


def test_full_unload_reinitialises_like_peft():
    model = toy_peft()
    plora.unload_(model, 1.0)
    for l in adapted_layers(model):
        m, a = l.module, l.adapter
        if l.kind == "embedding":
            assert torch.count_nonzero(m.lora_embedding_A[a]) == 0
            assert torch.count_nonzero(m.lora_embedding_B[a]) > 0
        else:
            assert torch.count_nonzero(m.lora_B[a].weight) == 0
            A = m.lora_A[a].weight
            assert torch.count_nonzero(A) == A.numel()  # never both zero
            bound = 1 / math.sqrt(A[0].numel())  # kaiming_uniform(a=sqrt(5)) bound
            assert A.abs().max() <= bound + 1e-6
        assert torch.count_nonzero(l.delta_weight()) == 0


def test_reinit_is_deterministic_in_seed_layer_and_count():
    def a_after(seed, index):
        model = toy_peft()
        plora.unload_(model, 1.0, seed=seed, unload_index=index)
        return {l.name: l.module.lora_A["default"].weight.clone() for l in adapted_layers(model) if l.kind != "embedding"}

    first, again = a_after(0, 3), a_after(0, 3)
    for k in first:
        assert torch.equal(first[k], again[k])
    other_seed, other_count = a_after(1, 3), a_after(0, 4)
    assert all(not torch.equal(first[k], other_seed[k]) for k in first)
    assert all(not torch.equal(first[k], other_count[k]) for k in first)
    values = list(first.values())
    assert not torch.equal(values[0][:2, :2], values[1][:2, :2])  # layers draw different A


def test_nan_adapter_is_never_merged():
    model = toy_peft()
    w0 = {l.name: l.weight.detach().clone() for l in adapted_layers(model)}
    bad = adapted_layers(model)[1]
    with torch.no_grad():
        bad.module.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        plora.unload_(model, 1.0)
    for l in adapted_layers(model):  # nothing touched, healthy layers included
        assert torch.equal(l.weight, w0[l.name])
    with pytest.warns(UserWarning, match="skipped 1 layer"):
        stats = plora.unload_(model, 1.0, on_nonfinite="skip")
    assert stats.skipped == [bad.name] and stats.layers == 3
    assert torch.equal(bad.weight, w0[bad.name])
    assert torch.isfinite(adapted_layers(model)[0].weight).all()


def test_inf_is_caught_too():
    model = toy_peft()
    with torch.no_grad():
        adapted_layers(model)[0].module.lora_embedding_A["default"][0, 0] = float("inf")
    with pytest.raises(FloatingPointError):
        plora.unload_(model)


def _bf16_linear_model(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False))
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(net, LoraConfig(r=8, lora_alpha=8, target_modules=["0"]))
    layer = adapted_layers(model)[0]
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
    return model.to(torch.bfloat16), layer


def _train_stage_(layer, rel_delta, generator):
    """Stand-in for a training stage: give the adapter an update of ~rel_delta of |W| per element."""
    B = layer.module.lora_B["default"].weight
    with torch.no_grad():
        B.copy_(torch.randn(B.shape, generator=generator))
        typical = layer.delta_weight().float().abs().mean()
        B.mul_(rel_delta * layer.weight.float().abs().mean() / typical)


@pytest.mark.parametrize("rel", [5e-4, 5e-5])
def test_direct_bf16_loses_small_updates_and_compensated_keeps_them(rel):
    mean_share, drift = {}, {}
    for mode in ("direct", "compensated"):
        model, layer = _bf16_linear_model()
        w0 = layer.weight.detach().float().clone()
        total = torch.zeros_like(w0)
        residuals, shares = {}, []
        g = torch.Generator().manual_seed(1)
        for i in range(20):
            _train_stage_(layer, rel, g)
            total += layer.delta_weight().detach().float()
            st = plora.unload_(model, 1.0, merge_precision=mode, residuals=residuals, landed_sample_rows=0, unload_index=i)
            shares.append(st.landed_share)
        mean_share[mode] = sum(shares) / len(shares)
        # what the model's bf16 weights hold of the sum of all updates, residual aside
        drift[mode] = float(((layer.weight.detach().float() - w0) * total).sum() / total.square().sum())
    assert mean_share["direct"] < 0.9  # rounding ate a real share of the update
    assert mean_share["compensated"] >= 0.99
    assert drift["compensated"] > drift["direct"]


def test_stochastic_rounding_is_unbiased_in_the_mean():
    model, layer = _bf16_linear_model()
    g = torch.Generator().manual_seed(2)
    shares = []
    for i in range(10):
        _train_stage_(layer, 5e-3, g)
        shares.append(plora.unload_(model, 1.0, merge_precision="stochastic", landed_sample_rows=0, unload_index=i).landed_share)
    assert abs(sum(shares) / len(shares) - 1.0) < 0.05


def test_precision_resolution():
    assert resolve_precision("auto", torch.float32) == "direct"
    assert resolve_precision("auto", torch.bfloat16) == "compensated"
    assert resolve_precision("auto", torch.float16) == "compensated"
    with pytest.raises(ValueError, match="bfloat16"):
        resolve_precision("stochastic", torch.float16)


def test_model_without_lora_is_refused():
    with pytest.raises(ValueError, match="no LoRA layers"):
        plora.unload_(torch.nn.Linear(3, 3))


def test_several_adapters_need_a_name():
    from peft import LoraConfig

    model = toy_peft()
    model.add_adapter("second", LoraConfig(r=2, target_modules=["up"]))
    with pytest.raises(ValueError, match="several adapters"):
        plora.unload_(model)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        plora.unload_(model, adapter_name="nope")
    stats = plora.unload_(model, adapter_name="second")
    assert stats.layers == 1


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), True])
def test_unload_momentum_validated(bad):
    with pytest.raises(ValueError, match="momentum"):
        plora.unload_(toy_peft(), bad)


def test_dora_is_refused():
    model = toy_peft(targets=("up",), use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        plora.unload_(model)
