"""Rank measures on matrices of known rank, and the accumulated update of LoRA / PLoRA / full models."""

import math

import pytest
import torch
from torch import nn

from plora import analysis
from plora.errors import UserError
from plora.layers import adapted_layers

peft = pytest.importorskip("peft")


def low_rank_sum(m: int, n: int, k: int, r: int, seed: int = 0) -> torch.Tensor:
    """Sum of k random rank-r products: rank k*r when k*r <= min(m, n)."""
    g = torch.Generator().manual_seed(seed)
    return sum(torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) for _ in range(k))


@pytest.mark.parametrize("k,r", [(1, 2), (3, 2), (5, 4)])
def test_numerical_rank_of_sum_of_low_rank_products(k, r):
    delta = low_rank_sum(48, 40, k, r)
    s = analysis.spectrum(delta)
    assert s.shape == (40,)
    assert torch.all(s[:-1] >= s[1:]), "singular values must be descending"
    assert analysis.numerical_rank(s, shape=tuple(delta.shape)) == k * r
    assert analysis.numerical_rank(s) == k * r  # without shape: tolerance from len(s)


def test_numerical_rank_saturates_at_min_dim():
    delta = low_rank_sum(30, 20, 6, 4)  # k*r = 24 > 20
    assert analysis.numerical_rank(analysis.spectrum(delta), shape=(30, 20)) == 20


def test_rtol_ignores_small_noise():
    clean = low_rank_sum(60, 40, 1, 3)
    noisy = clean + 1e-3 * torch.randn(60, 40, generator=torch.Generator().manual_seed(1))
    s = analysis.spectrum(noisy)
    assert analysis.numerical_rank(s, shape=(60, 40)) == 40  # the default tolerance counts the noise
    assert analysis.numerical_rank(s, rtol=1e-2) == 3
    assert analysis.energy_rank(s) <= 3


def test_simple_spectra_by_hand():
    n = 16
    s_id = analysis.spectrum(torch.eye(n))
    assert analysis.effective_rank(s_id) == pytest.approx(n)
    assert analysis.stable_rank(s_id) == pytest.approx(n)
    assert analysis.numerical_rank(s_id) == n
    assert analysis.energy_rank(s_id) == 16  # 15/16 < 99%
    assert analysis.energy_rank(torch.ones(100)) == 99

    s1 = analysis.spectrum(torch.outer(torch.arange(1.0, 9.0), torch.ones(5)))
    assert analysis.effective_rank(s1) == pytest.approx(1.0, abs=1e-5)
    assert analysis.stable_rank(s1) == pytest.approx(1.0, abs=1e-5)
    assert analysis.energy_rank(s1) == 1

    s = torch.tensor([3.0, 1.0])  # p = (3/4, 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert analysis.effective_rank(s) == pytest.approx(math.exp(h))
    assert analysis.stable_rank(s) == pytest.approx(10 / 9)
    assert analysis.energy_rank(s) == 2  # 9/10 < 0.99
    assert analysis.energy_rank(s, 0.9) == 1


def test_zero_update_and_bad_input():
    s = analysis.spectrum(torch.zeros(4, 3))
    assert (analysis.numerical_rank(s), analysis.energy_rank(s)) == (0, 0)
    assert (analysis.effective_rank(s), analysis.stable_rank(s)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        analysis.spectrum(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="matrix"):
        analysis.spectrum(torch.ones(3))


def test_layer_key_matches_lora_and_full_names():
    assert analysis.layer_key("base_model.model.model.layers.0.q_proj") == "model.layers.0.q_proj"
    assert analysis.layer_key("base_model.model.model.layers.0.q_proj.base_layer") == "model.layers.0.q_proj"
    assert analysis.layer_key("module.model.layers.0.q_proj") == "model.layers.0.q_proj"


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 32)
        self.down = nn.Linear(32, 20)
        self.head = nn.Linear(20, 8)


def lora_model(r: int = 2):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=r, lora_alpha=4, target_modules=["up", "down"], init_lora_weights=False)
    return peft.get_peft_model(Tiny(), cfg)


def ranks(model, start, **kw):
    return {k: analysis.numerical_rank(analysis.spectrum(d), shape=tuple(d.shape))
            for k, d in analysis.accumulated_update(model, start, **kw)}


def simulate_unload(model, seed: int):
    """What a PLoRA unload does: add the adapter's update into the base weight, re-randomise the adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model):
            m = layer.module
            m.get_base_layer().weight.data += m.get_delta_weight("default")
            m.lora_A["default"].weight.copy_(torch.randn(m.lora_A["default"].weight.shape, generator=g))
            m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=g))


def test_lora_update_has_rank_r_and_unloads_add_up():
    r = 2
    model = lora_model(r)
    start = analysis.snapshot(model)
    assert set(start) == {"up", "down"}  # LoRA layers only, PEFT prefix stripped
    assert all(t.dtype == torch.float32 for t in start.values())
    assert ranks(model, start) == {"up": r, "down": r}  # the adapter's pending update counts
    simulate_unload(model, seed=1)
    assert ranks(model, start) == {"up": 2 * r, "down": 2 * r}
    simulate_unload(model, seed=2)
    assert ranks(model, start) == {"up": 3 * r, "down": 3 * r}

    rep = analysis.update_report(model, start, top_k=4)
    assert [row["name"] for row in rep["layers"]] == ["up", "down"]
    row = rep["layers"][0]
    assert row["shape"] == [32, 24] and row["num_singular_values"] == 24
    assert row["numerical_rank"] == 3 * r and row["energy_rank_99"] <= 3 * r
    assert len(row["singular_values"]) == 4
    assert 1 <= row["effective_rank"] <= 3 * r and 1 <= row["stable_rank"] <= 3 * r
    agg = rep["aggregate"]
    assert agg["numerical_rank"]["mean"] == 3 * r and agg["headline_rank"] == "numerical_rank"
    assert agg["total_fro_norm"] == pytest.approx(math.hypot(*(x["fro_norm"] for x in rep["layers"])))
    assert rep["settings"]["energy"] == 0.99


def test_full_model_snapshot_uses_all_linear_layers_with_the_same_keys():
    torch.manual_seed(0)
    full = Tiny()
    start = analysis.snapshot(full)
    assert list(start) == ["up", "down", "head"]
    with torch.no_grad():
        full.down.weight += low_rank_sum(20, 32, 1, 5)
    assert ranks(full, start) == {"up": 0, "down": 5, "head": 0}
    # the LoRA model's snapshot keys are a subset of the full model's
    assert set(analysis.snapshot(lora_model())) <= set(start)


def test_embedding_layers_by_name():
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 4))
    assert list(analysis.snapshot(model)) == ["1"]  # default: Linear layers only
    start = analysis.snapshot(model, names=["0"])
    with torch.no_grad():
        model[0].weight += torch.outer(torch.ones(10), torch.arange(6.0))
    assert ranks(model, start) == {"0": 1}


def test_names_max_layers_and_errors():
    model = lora_model()
    start = analysis.snapshot(model, names=["head", "base_model.model.up"], dtype=None)
    assert list(start) == ["head", "up"]
    rep = analysis.update_report(model, analysis.snapshot(Tiny()), max_layers=2)
    assert [row["name"] for row in rep["layers"]] == ["up", "head"]  # evenly spaced, ends included
    with pytest.raises(UserError, match="nope"):
        analysis.snapshot(model, names=["nope"])
    with pytest.raises(UserError, match="not in the model"):
        list(analysis.accumulated_update(model, {"missing": torch.zeros(2, 2)}))
    with pytest.raises(UserError, match="shape"):
        list(analysis.accumulated_update(model, {"up": torch.zeros(2, 2)}))


def test_bf16_weights_headline_is_energy_rank():
    model = lora_model().to(torch.bfloat16)
    start = analysis.snapshot(model, dtype=None)
    assert start["up"].dtype == torch.bfloat16
    simulate_unload(model, seed=3)  # rounds the sum into bf16: full-rank noise
    rep = analysis.update_report(model, start)
    assert rep["aggregate"]["headline_rank"] == "energy_rank_99"
    assert rep["layers"][0]["weight_dtype"] == "bfloat16"
    assert rep["layers"][0]["energy_rank_99"] <= 4


def test_compensated_residuals_remove_the_rounding_noise_from_the_rank():
    """bf16 PLoRA: W alone carries full-rank rounding noise; W + the residual is the true low-rank sum."""
    from plora.unload import unload_

    r, unloads = 2, 3
    model = lora_model(r).to(torch.bfloat16)
    start = analysis.snapshot(model, dtype=None)
    residuals: dict = {}
    g = torch.Generator().manual_seed(0)
    for i in range(unloads):
        with torch.no_grad():
            for layer in adapted_layers(model):  # a trained-looking adapter: small update
                for t in layer.adapter_tensors():
                    t.copy_(torch.randn(t.shape, generator=g) * 0.02)
        unload_(model, 1.0, merge_precision="compensated", residuals=residuals, unload_index=i)
    k = r * unloads  # the true rank: the re-initialised adapter (B = 0) adds nothing yet
    for res, floor in ((None, (1e-2, 1.0)), (residuals, (0.0, 1e-3))):
        for key, delta in analysis.accumulated_update(model, start, residuals=res):
            s = analysis.spectrum(delta)
            tail = float(s[k] / s[0])  # the largest singular value beyond the true rank, relative
            assert floor[0] < tail < floor[1], (key, res is not None, tail)
    clean = analysis.update_report(model, start, residuals=residuals)["aggregate"]["effective_rank"]["max"]
    assert clean <= k
