"""The unload plan (plora.unload_plan): grouping, revalidation, the fused path end to end, and the
optimizer reset.

The fused path runs on CUDA: on a CUDA machine its checks run on the GPU, in this process; without
CUDA they run in triton's CPU interpreter, in a subprocess (see ``interpreter``), with
``plora.unload_plan._HOST_KERNELS`` routing CPU bf16 weights through the kernels. The rest runs in
process.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import interpreter
import plora
from plora import PeriodicUnloader, PLoRAConfig
from plora.layers import adapted_layers, reinit_seed, reinit_seeds
from plora.optim import reset_adapter_state
from plora.unload import UnloadPlan
from toys import randomise_adapters_, toy_inputs, toy_peft

MODES = ("direct", "compensated", "stochastic")


class Stack(nn.Module):
    """Three 48x48 layers, two 32x48 layers, one 48x32 layer: groups of several layers and of one."""

    def __init__(self, tied=False):
        super().__init__()
        self.square = nn.ModuleList(nn.Linear(48, 48) for _ in range(3))
        self.narrow = nn.ModuleList(nn.Linear(48, 32) for _ in range(2))
        self.wide = nn.Linear(32, 48)
        if tied:  # two adapted layers on one weight, as tied embeddings would give
            self.square[1].weight = self.square[0].weight

    def forward(self, x):
        for layer in self.square:
            x = torch.tanh(layer(x))
        return self.wide(sum(layer(x) for layer in self.narrow))


class GPT2Stack(nn.Module):
    """Three transformers Conv1D layers: fan_in_fan_out, so the factors are transposed views."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.proj = nn.ModuleList(Conv1D(20, 20) for _ in range(3))

    def forward(self, x):
        for layer in self.proj:
            x = layer(x)
        return x


def stack_peft(device, tied=False, **lora):
    """``Stack`` with LoRA r=4 on every layer (``lora``: more ``LoraConfig`` arguments), random adapters."""
    torch.manual_seed(0)
    targets = ["square.0", "square.1", "square.2", "narrow.0", "narrow.1", "wide"]
    model = get_peft_model(Stack(tied), LoraConfig(r=4, lora_alpha=8, target_modules=targets, **lora))
    randomise_adapters_(model, 0, scale=0.1)
    return model.to(device, torch.bfloat16)


def gpt2_stack_peft(device):
    torch.manual_seed(0)
    model = get_peft_model(GPT2Stack(), LoraConfig(r=3, target_modules=["proj.0", "proj.1", "proj.2"],
                                                   fan_in_fan_out=True))
    randomise_adapters_(model, 0, scale=0.1)
    return model.to(device, torch.bfloat16)


def _weights(model):
    return {layer.name: layer.weight.detach().clone() for layer in adapted_layers(model)}


# --- in triton's interpreter: the fused path ---------------------------------------------------


def _per_layer_reference(model, momentum, mode, seed, unload_index):
    """Weights and residuals after updating each layer alone with ``kernels.fused_update_``."""
    from plora.kernels import fused_update_

    weights, residuals = {}, {}
    for layer in adapted_layers(model):
        W = layer.weight.detach().clone()
        res = torch.zeros_like(W) if mode == "compensated" else None
        L, R = layer.factors()
        fused_update_(W.view(W.shape[0], -1), L.detach(), R.detach(), momentum * layer.scaling, mode, res,
                      seed=reinit_seed(seed, layer.name, unload_index))
        weights[layer.name], residuals[layer.name] = W, res
    return weights, residuals


def _update_norm(model, momentum=1.0) -> float:
    """The exact Frobenius norm of the update an unload at ``momentum`` merges, over every layer."""
    return math.sqrt(sum(((momentum * layer.scaling * L.double() @ R.double()) ** 2).sum().item()
                         for layer in adapted_layers(model) for L, R in [layer.factors()]))


def check_grouped_unload_equals_per_layer_kernel(device):
    """Through the plan, every weight (and residual) gets the per-layer kernel's bits."""
    for build, groups in ((stack_peft, 3), (gpt2_stack_peft, 1)):
        for mode in MODES:
            for momentum in (1.0, 0.5):
                model = build(device)
                want_w, want_r = _per_layer_reference(model, momentum, mode, seed=7, unload_index=3)
                want_norm = _update_norm(model, momentum)
                plan, residuals = UnloadPlan(adapted_layers(model)), {}
                stats = plora.unload_(model, momentum, merge_precision=mode, seed=7, unload_index=3,
                                      residuals=residuals, plan=plan)
                assert len(plan._devices[0].updates) == groups and not plan.torch_work
                for layer in adapted_layers(model):
                    assert torch.equal(layer.weight, want_w[layer.name]), (build.__name__, mode, layer.name)
                    if mode == "compensated":
                        assert torch.equal(residuals[layer.name], want_r[layer.name])
                assert stats.layers == (6 if build is stack_peft else 3)  # (without the brackets it asserted 3)
                assert stats.landed_share == pytest.approx(1.0, abs=0.05 if mode == "stochastic" else 1e-3)
                assert stats.update_norm == pytest.approx(want_norm, rel=1e-4)  # from the factors' Gram matrices


def check_fused_unload_keeps_the_output(device):
    """The model's output is unchanged by a fused unload, with fused, embedding and torch-path layers mixed."""
    for momentum in (1.0, 0.3):
        model = toy_peft(torch.bfloat16).to(device)  # emb, up, down fused; conv on the torch path
        plan = UnloadPlan(adapted_layers(model))
        tokens, image = (t.to(device) for t in toy_inputs())
        y0, c0 = model(tokens, image.bfloat16())
        w0 = _weights(model)
        plora.unload_(model, momentum, residuals={}, plan=plan)
        assert [layer.kind for layer, _, _ in plan.torch_work] == ["conv"]
        y1, c1 = model(tokens, image.bfloat16())
        for before, after in ((y0, y1), (c0, c1)):
            assert (before.float() - after.float()).abs().max().item() <= 3e-2 * max(1.0, before.abs().max().item())
        assert all(not torch.equal(w0[layer.name], layer.weight) for layer in adapted_layers(model))
        if momentum < 1:  # B scaled by 1 - m on every layer, embedding and conv included
            ref = toy_peft(torch.bfloat16).to(device)
            for layer, r in zip(adapted_layers(model), adapted_layers(ref)):
                for b, b_ref in zip(layer.b_tensors(), r.b_tensors()):
                    assert torch.equal(b, b_ref * (1 - momentum))


def check_fused_reinit(device):
    """Momentum 1: A drawn by the kaiming kernel from reinit_seed(seed + 1, layer, index), B zero."""
    from plora.kernels import kaiming_fill_

    def a_after(seed, index):
        model = stack_peft(device)
        plora.unload_(model, 1.0, seed=seed, unload_index=index)
        for layer in adapted_layers(model):
            assert torch.count_nonzero(layer.module.lora_B["default"].weight) == 0
            assert torch.count_nonzero(layer.delta_weight()) == 0
        return {layer.name: layer.module.lora_A["default"].weight.clone() for layer in adapted_layers(model)}

    first, again = a_after(0, 3), a_after(0, 3)
    assert all(torch.equal(first[k], again[k]) for k in first)
    other_seed, other_index = a_after(1, 3), a_after(0, 4)
    assert all(not torch.equal(first[k], other_seed[k]) for k in first)
    assert all(not torch.equal(first[k], other_index[k]) for k in first)
    values = list(first.values())
    assert not torch.equal(values[0], values[1])  # layers of one shape draw different A
    for name, A in first.items():
        bound = 1 / math.sqrt(A.shape[1])
        assert (A.float().abs() <= bound * (1 + 2.0**-8)).all() and torch.count_nonzero(A) == A.numel()
        want = torch.empty_like(A)
        table = torch.tensor([[want.data_ptr()], [reinit_seed(1, name, 3)]], device=device)
        kaiming_fill_(table[0], table[1], A.numel(), bound, A.dtype)
        assert torch.equal(A, want)  # the documented stream: the kernel's hash of reinit_seed(seed + 1, ...)


def check_reinit_with_the_updates_gives_reinit_s_bits(device):
    """At momentum 1 a plan of fused re-inits only runs each group's re-init right after its own
    update, in the updates' launch sequence (``update_fused_(reinit=True)``): weights, A and B come
    out bit for bit as with the re-init launched after every update (``reinit_``), over three unloads
    of a kept plan (on a GPU the third replays its graphs), tied weights too. A plan that has a
    re-init of another kind (a lora_bias merged after the updates here) refuses ``reinit=True``."""
    for tied in (False, True):
        states = []
        for together in (True, False):
            model = stack_peft(device, tied=tied)
            plan = UnloadPlan(adapted_layers(model))
            built = []  # reinit_with_updates as each build set it, before the override below
            real_build = plan._build
            plan._build = lambda *a: (real_build(*a), built.append(plan.reinit_with_updates),
                                      together or setattr(plan, "reinit_with_updates", False))
            calls = []  # which path each unload took
            real_update, real_reinit = plan.update_fused_, plan.reinit_
            plan.update_fused_ = lambda *a, **k: calls.append(("updates", k["reinit"])) or real_update(*a, **k)
            plan.reinit_ = lambda *a: calls.append(("reinit",)) or real_reinit(*a)
            for index in range(3):
                randomise_adapters_(model, seed=index, scale=0.1)
                plora.unload_(model, 1.0, merge_precision="stochastic", plan=plan, unload_index=index, seed=3)
                assert plan.reinit_with_updates == together
            assert built == [True], built  # built once, a plan that runs the re-init with its updates
            assert calls == ([("updates", True)] * 3 if together else [("updates", False), ("reinit",)] * 3), calls
            states.append([t.clone() for t in model.state_dict().values()])
        assert all(torch.equal(a, b) for a, b in zip(*states)), tied
    plan = UnloadPlan(adapted_layers(stack_peft(device, lora_bias=True)))
    plan.refresh("direct", 1.0, None)
    assert plan.bias_layers and not plan.reinit_with_updates
    stats = plan._devices[0].stats
    stats.fill_(-1)
    with pytest.raises(ValueError, match="reinit_with_updates"):
        plan.update_fused_(0, 0, reinit=True)
    assert (stats == -1).all()  # refused before it launched anything (no norms, no statistics)


def check_tied_weights_are_updated_in_turn(device):
    """Two layers on one weight go into separate launches: both updates land, as one after the other,
    at every unload of a kept plan (on a GPU the third replays its graph, whose update launches are
    not parallel branches when weights are tied)."""
    from plora.kernels import fused_update_

    model = stack_peft(device, tied=True)
    layers = adapted_layers(model)
    assert layers[0].weight is layers[1].weight
    plan = UnloadPlan(layers)
    for index in range(3):
        randomise_adapters_(model, seed=index, scale=0.1)
        want, _ = _per_layer_reference(model, 1.0, "direct", 0, index)
        W = want[layers[0].name]  # layer 0's update, then layer 1's on top
        L, R = layers[1].factors()
        fused_update_(W, L.detach(), R.detach(), layers[1].scaling, "direct")
        plora.unload_(model, 1.0, merge_precision="direct", plan=plan, unload_index=index)
        assert torch.equal(layers[0].weight, W), index
    assert len(plan._devices[0].updates) == 4  # the second layer on the weight has a launch of its own
    assert plan._devices[0].tied


def check_plan_follows_new_storage(device):
    """A weight given new storage between unloads is the one the next unload updates."""
    model = stack_peft(device)
    plan, residuals = UnloadPlan(adapted_layers(model)), {}
    plora.unload_(model, 0.5, residuals=residuals, plan=plan)
    layer = adapted_layers(model)[0]
    old = layer.weight.data
    layer.weight.data = old.clone()  # what model.to() or a load does to a parameter
    frozen = old.clone()
    before = layer.weight.detach().clone()
    plora.unload_(model, 0.5, residuals=residuals, plan=plan)
    assert torch.equal(old, frozen)  # the stale storage is untouched
    assert not torch.equal(layer.weight, before)  # the live one took the update


def check_replaced_factor_is_held_until_the_next_unload(device):
    """A factor given new storage between unloads: the plan holds the old storage (its norms are
    launched ahead of the refresh, on the factors it was built from) only until the next unload,
    which merges the new factor's update and lets the old storage go (no memory beyond LoRA's)."""
    model = stack_peft(device)
    plan = UnloadPlan(adapted_layers(model))
    for index in range(2):  # built, then kept (its norms launched ahead from now on)
        randomise_adapters_(model, seed=index)
        plora.unload_(model, 1.0, plan=plan, unload_index=index)
    randomise_adapters_(model, seed=2)
    layer = adapted_layers(model)[0]
    old_storages = []
    # both factors: A's old storage only the plan's held factors keep alive (B's the scale-B lists too)
    for factor in (layer.adapter_tensors()[0], layer.b_tensors()[0]):
        old = factor.data
        old_storages.append(old.untyped_storage()._weak_ref())
        factor.data = old.clone() * 2  # new storage, other values
        old.zero_()  # what the stale storage holds: an update of zero, were it read
        del old
    assert not any(map(torch.UntypedStorage._expired, old_storages))  # held by the plan
    W = layer.weight.detach().clone()
    delta = layer.delta_weight().float()
    want_norm = _update_norm(model)
    stats = plora.unload_(model, 1.0, plan=plan, unload_index=2)
    landed = layer.weight.float() - W.float()
    assert (landed - delta).norm() < 1e-2 * delta.norm()  # the new B's update
    assert stats.update_norm == pytest.approx(want_norm, rel=1e-4)  # the norm of the new factors, not the old
    assert all(map(torch.UntypedStorage._expired, old_storages))  # the rebuild let them go


def check_statistics_passes_draw_the_updates_seeds(device):
    """Stochastic rounding with sampled statistics: each group's statistics pass, launched before
    the factors are checked (``check_``) or by ``update_fused_``, rounds with the seeds its update
    pass then uses, so that the landed share describes the update that happened. (CUDA graphs off:
    the spy sees every launch, the statistics launched ahead of the refresh included.)"""
    from plora import cuda_graphs, kernels

    model = stack_peft(device)
    plan = UnloadPlan(adapted_layers(model))
    seen = []  # (passes, first W pointer, seeds) per launch
    real = kernels.grouped_update_

    def spy(ptrs, alphas, keys, stats, shape, *a, **k):
        # a "stats" call of a group with no pass of its own (few rows) launches nothing: not counted
        if k["passes"] != "stats" or kernels.stats_step(*shape[:2], k["sample_rows"]) > 1:
            seen.append((k["passes"], ptrs[0, 0].item(), keys.tolist()))
        return real(ptrs, alphas, keys, stats, shape, *a, **k)

    kernels.grouped_update_ = spy
    enabled, cuda_graphs.ENABLED = cuda_graphs.ENABLED, False
    try:
        for index in range(3):  # built (statistics from update_fused_), then kept (from check_'s launch_ahead_)
            randomise_adapters_(model, seed=index, scale=0.1)
            plora.unload_(model, 1.0, plan=plan, unload_index=index, merge_precision="stochastic",
                          landed_sample_rows=16, seed=5)
    finally:
        kernels.grouped_update_ = real
        cuda_graphs.ENABLED = enabled
    stats = [(w, keys) for passes, w, keys in seen if passes == "stats"]
    updates = [(w, keys) for passes, w, keys in seen if passes == "update"]
    with_pass = sum(kernels.stats_step(*g.shape[:2], 16) > 1 for g in plan._devices[0].updates)
    assert with_pass and len(stats) == 3 * with_pass, seen  # each such group's pass, at each of the 3 unloads
    sampled = {w for w, _ in stats}
    assert sorted(stats) == sorted(u for u in updates if u[0] in sampled)  # the same seeds in both passes
    assert len({tuple(keys) for _, keys in updates}) == len(updates)  # new seeds at every unload


def check_nonfinite_layer_is_skipped_on_the_fused_path(device):
    model = stack_peft(device)
    w0 = _weights(model)
    bad = adapted_layers(model)[2]
    with torch.no_grad():
        bad.module.lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        plora.unload_(model, 1.0)
    assert all(torch.equal(w0[layer.name], layer.weight) for layer in adapted_layers(model))
    with pytest.warns(UserWarning, match="skipped 1 layer"):
        stats = plora.unload_(model, 1.0, on_nonfinite="skip")
    assert stats.skipped == [bad.name] and stats.layers == 5
    assert all(torch.equal(w0[layer.name], layer.weight) == (layer.name == bad.name)
               for layer in adapted_layers(model))


def check_nonfinite_is_caught_in_every_adapter_tensor(device):
    """B (through the update norm of the fused layers), A with -Inf, and a fused layer's lora_bias
    (through its own norm) are each caught before any weight is touched."""
    for where in ("B", "A", "bias"):
        model = stack_peft(device, lora_bias=True)
        layers = adapted_layers(model)
        bad = layers[4].module
        with torch.no_grad():
            {"B": bad.lora_B["default"].weight, "A": bad.lora_A["default"].weight,
             "bias": bad.lora_B["default"].bias}[where].view(-1)[1] = float("inf") if where == "B" else float("-inf")
        plan = UnloadPlan(layers)
        before = {n: t.clone() for n, t in model.state_dict().items()}
        with pytest.raises(FloatingPointError, match="1 layer"):
            plora.unload_(model, 1.0, plan=plan)
        assert len({name for work in plan._devices for g in work.updates for name in g.names}) == 6  # all fused
        assert all(torch.equal(before[n], t) for n, t in model.state_dict().items()), where
        assert plan.nonfinite() == [layers[4].name]


def wide_peft(device):
    """Layers wide enough for the pipelined kernel (on a GPU), as a Sequential of four; the last
    (96 rows: three row tiles, too few to sample 64 rows from) sums its statistics in the triton
    update pass instead."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 160), nn.Linear(256, 160), nn.Linear(160, 256), nn.Linear(128, 96))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1", "2", "3"]))
    randomise_adapters_(model, 0, scale=0.1)
    return model.to(device, torch.bfloat16)


def _same(a, b):
    """Equal, NaN where NaN (NaN != NaN)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def check_nonfinite_on_wide_layers_touches_nothing(device):
    """Layers wide enough for the pipelined kernel (on a GPU): a failed finiteness check leaves
    every weight and residual as it was; with on_nonfinite='skip' the healthy layers then get
    exactly what an unload without the bad one gives them."""
    for precision in ("compensated", "stochastic", "direct"):
        model, clean = wide_peft(device), wide_peft(device)
        residuals, clean_residuals = {}, {}
        plora.unload_(model, 0.5, merge_precision=precision, residuals=residuals, seed=5)
        plora.unload_(clean, 0.5, merge_precision=precision, residuals=clean_residuals, seed=5)
        bad = adapted_layers(model)[1]
        with torch.no_grad():
            bad.module.lora_B["default"].weight[3, 2] = float("nan")
        before = {n: t.clone() for n, t in model.state_dict().items()}
        res_before = {n: r.clone() for n, r in residuals.items()}
        with pytest.raises(FloatingPointError, match="1 layer"):
            plora.unload_(model, 1.0, merge_precision=precision, residuals=residuals, seed=6, unload_index=1)
        assert all(_same(before[n], t) for n, t in model.state_dict().items()), precision
        assert all(_same(res_before[n], r) for n, r in residuals.items()), precision
        with pytest.warns(UserWarning, match="skipped 1 layer"):
            stats = plora.unload_(model, 1.0, merge_precision=precision, residuals=residuals, seed=6,
                                  unload_index=1, on_nonfinite="skip")
        assert stats.skipped == [bad.name]
        healthy = [layer for layer in adapted_layers(clean) if layer.name != bad.name]
        plora.unload_(clean, 1.0, merge_precision=precision, residuals=clean_residuals, seed=6, unload_index=1,
                      layers=healthy)
        for a, b in zip(adapted_layers(model), adapted_layers(clean)):
            if a.name == bad.name:
                assert torch.equal(a.weight, before[f"{a.name}.base_layer.weight"]), precision
                continue
            assert torch.equal(a.weight, b.weight), (precision, a.name)
            if precision == "compensated":
                assert torch.equal(residuals[a.name], clean_residuals[b.name]), (precision, a.name)


def check_misaligned_weight_takes_the_torch_path(device):
    """The grouped kernels promise the compiler 16-byte aligned data; a weight that is not goes around them."""
    model = stack_peft(device)
    layer = adapted_layers(model)[0]
    W = layer.weight
    buf = torch.empty(W.numel() + 1, dtype=W.dtype, device=W.device)
    shifted = buf[1:].view(W.shape)  # 2 bytes past an aligned allocation
    shifted.copy_(W)
    layer.base.weight = torch.nn.Parameter(shifted, requires_grad=False)
    plan = UnloadPlan(adapted_layers(model))
    plora.unload_(model, 1.0, merge_precision="direct", plan=plan)
    assert [work[0].name for work in plan.torch_work] == [layer.name]
    fused = {name for work in plan._devices for g in work.updates for name in g.names}
    assert layer.name not in fused and len(fused) == 5


def check_cached_plan_gives_the_throwaway_plans_result(device):
    """A plan kept over several unloads (its pointer tables, the update norms it launches ahead of
    its refresh, the statistics it launches before the factors are checked, and the seed tables it
    makes ahead for the next unload index reused) gives what a fresh plan gives, statistics
    included: over stretches of one momentum (the plan reused), when the index jumps, the momentum
    changes, or a factor gets new storage within a stretch (the norms and statistics launched ahead
    then read the old factor, which the plan holds: they must not be what the unload uses)."""
    # (unload index, momentum, a factor given new storage first)
    steps = [(0, 1.0, False), (1, 1.0, False), (3, 1.0, False), (4, 0.5, False), (5, 0.5, False),
             (6, 0.5, True), (8, 1.0, False), (9, 1.0, False)]
    # 64 rows sampled of the fused layers (12-48 rows): statistics summed in the update pass; 16 rows:
    # passes of their own for the 40- and 48-row layers (the 12-row one still sums in its update pass)
    for precision, sample_rows in (("auto", 64), ("stochastic", 64), ("stochastic", 16)):
        results, norms = [], []
        for cached in (True, False):
            model = toy_peft(torch.bfloat16).to(device)
            plan = UnloadPlan(adapted_layers(model)) if cached else None
            builds, ahead, early = [], [], []
            if cached:
                real_build, real_ahead, real_stats = plan._build, plan.launch_ahead_, plan.sample_stats_
                plan._build = lambda *a: builds.append(1) or real_build(*a)
                plan.launch_ahead_ = lambda *a: ahead.append(real_ahead(*a)) or ahead[-1]
                plan.sample_stats_ = lambda *a: early.append(len(ahead)) or real_stats(*a)
            residuals, got = {}, []
            for i, (index, momentum, new_storage) in enumerate(steps):
                randomise_adapters_(model, seed=i)
                if new_storage:
                    B = next(layer for layer in adapted_layers(model) if layer.kind == "linear").b_tensors()[0]
                    B.data = B.data.clone() * 3  # new storage, other values: what a load may do
                stats = plora.unload_(model, momentum, unload_index=index, residuals=residuals, plan=plan,
                                      merge_precision=precision, seed=7 if i < 3 else 8,
                                      landed_sample_rows=sample_rows)
                got.append((stats.update_norm, stats.landed_share))
                if cached and plan._devices:  # every fused layer's sampled d·d was summed, by a pass or the update
                    assert (plan._devices[0].stats[:, 2] > 0).all(), (precision, sample_rows, i)
            results.append([t.clone() for t in model.state_dict().values()] + list(residuals.values()))
            norms.append(got)
            if cached:  # rebuilt at a new momentum or storage only; the norms and statistics launched
                # ahead of the refresh once the plan is built (fused layers only) unless the
                # momentum changed (a new weights signature); after every rebuild (unloads 1, 4, 6
                # with its new storage, 7) update_fused_ calls sample_stats_ again (which launches
                # passes only at 16 rows: at 64 every fused layer sums in its update pass)
                fused = bool(plan._devices)
                assert len(builds) == 4, builds
                assert ahead == [False] + [fused] * 2 + [False] + [fused] * 2 + [False, fused], ahead
                # unloads (1-based) that called sample_stats_: the rebuilt ones
                assert early == ([1, 4, 6, 7] if fused else []), early
        assert len(results[0]) == len(results[1])
        assert all(torch.equal(a, b) for a, b in zip(*results)), precision
        for (n1, s1), (n2, s2) in zip(*norms):  # fp32 atomics: the order of the sums may differ on a GPU
            assert n1 == pytest.approx(n2, rel=1e-6) and s1 == pytest.approx(s2, rel=1e-5), (precision, norms)


def check_nonfinite_caught_by_a_kept_plan(device):
    """A NaN written in place into a factor of a plan that is reused (no rebuild, its norms launched
    ahead of the refresh, its launches replayed as graphs on a GPU) is caught, in every merge
    precision, with nothing touched: weights, residuals, A and B (the re-init is gated too); 'skip'
    then merges the other layers. The plan leaves the check to the device (no host sync before
    the updates): a clean unload never reads the norms on the host, a failing one once, to name the
    layer. On layers the pipelined kernel updates (wide) and on small ones."""
    for build in (stack_peft, wide_peft):
        for precision in ("compensated", "stochastic", "direct"):
            model = build(device)
            plan = UnloadPlan(adapted_layers(model))
            host_checks = []
            real_nonfinite = plan.nonfinite
            plan.nonfinite = lambda *a, **k: host_checks.append(1) or real_nonfinite(*a, **k)
            residuals = {}
            for i in range(3):
                randomise_adapters_(model, seed=i, scale=0.1)
                plora.unload_(model, 1.0, plan=plan, unload_index=i, merge_precision=precision, residuals=residuals)
            assert plan.device_checked and host_checks == [], precision
            randomise_adapters_(model, seed=5, scale=0.1)
            bad = adapted_layers(model)[1]
            with torch.no_grad():
                bad.b_tensors()[0].view(-1)[2] = float("nan")
            before = {n: t.clone() for n, t in model.state_dict().items()}
            res_before = {n: r.clone() for n, r in residuals.items()}
            w0, a_bad, b_bad = _weights(model), bad.adapter_tensors()[0].clone(), bad.b_tensors()[0].clone()
            with pytest.raises(FloatingPointError, match="1 layer"):
                plora.unload_(model, 1.0, plan=plan, unload_index=3, merge_precision=precision, residuals=residuals)
            assert host_checks == [1], precision
            assert all(_same(before[n], t) for n, t in model.state_dict().items()), precision
            assert all(_same(res_before[n], r) for n, r in residuals.items()), precision
            updated = []  # the kept plan's update launches: none after a check that found a NaN
            real_update = plan.update_fused_
            plan.update_fused_ = lambda *a, **k: updated.append(1) or real_update(*a, **k)
            with pytest.warns(UserWarning, match="skipped 1 layer"):
                stats = plora.unload_(model, 1.0, plan=plan, unload_index=3, on_nonfinite="skip",
                                      merge_precision=precision, residuals=residuals)
            # the check after a refusal runs on the host first: one host check, no gated pass before it
            assert host_checks == [1, 1] and updated == [], (precision, host_checks, updated)
            assert stats.skipped == [bad.name]
            for layer in adapted_layers(model):  # the bad layer as it was; the others merged and re-initialised
                B = layer.b_tensors()[0]
                if layer.name == bad.name:
                    assert _same(w0[layer.name], layer.weight) and _same(b_bad, B), precision
                    assert torch.equal(a_bad, layer.adapter_tensors()[0]), precision
                else:
                    assert not torch.equal(w0[layer.name], layer.weight) and not B.any(), (precision, layer.name)


def check_refused_unload_touches_nothing_on_every_path(device):
    """A plan that cannot leave the check to the device (momentum < 1, gaussian init, a B the zero
    fill cannot write) checks on the host before any write: a refused unload touches nothing. And
    a kept plan whose device check refused an unload merges again, bit for bit as a twin that never
    failed, once its adapter is healthy (the gate reopens at every unload)."""
    def refused(model, momentum, expect_device_checked):
        plan = UnloadPlan(adapted_layers(model))
        plora.unload_(model, momentum, plan=plan, unload_index=0)
        assert plan.device_checked == expect_device_checked
        randomise_adapters_(model, seed=1, scale=0.1)
        with torch.no_grad():
            adapted_layers(model)[2].adapter_tensors()[0].view(-1)[1] = float("nan")
        before = {n: t.clone() for n, t in model.state_dict().items()}
        with pytest.raises(FloatingPointError, match="1 layer"):
            plora.unload_(model, momentum, plan=plan, unload_index=1)
        assert all(_same(before[n], t) for n, t in model.state_dict().items())
        return plan

    refused(stack_peft(device), 0.5, False)
    refused(stack_peft(device, init_lora_weights="gaussian"), 1.0, False)
    strided = stack_peft(device)
    B = adapted_layers(strided)[4].b_tensors()[0]
    B.data = B.data.T.contiguous().T  # the same values, column-major: the zero fill needs contiguous
    refused(strided, 1.0, False)

    model, twin = stack_peft(device), stack_peft(device)
    plan = refused(model, 1.0, True)
    twin_plan = UnloadPlan(adapted_layers(twin))  # what the model went through, without the NaN
    plora.unload_(twin, 1.0, plan=twin_plan, unload_index=0)
    randomise_adapters_(twin, seed=1, scale=0.1)
    with torch.no_grad():  # the adapter made healthy again, in place: the twin's values
        for mine, its in zip(adapted_layers(model), adapted_layers(twin)):
            for t, u in zip(mine.adapter_tensors(), its.adapter_tensors()):
                t.copy_(u)
            assert torch.equal(mine.weight, its.weight)
    for index in (2, 3):
        plora.unload_(model, 1.0, plan=plan, unload_index=index)
        plora.unload_(twin, 1.0, plan=twin_plan, unload_index=index)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values())), index
        randomise_adapters_(model, seed=index, scale=0.1)
        randomise_adapters_(twin, seed=index, scale=0.1)


CHECKS = [
    check_grouped_unload_equals_per_layer_kernel,
    check_misaligned_weight_takes_the_torch_path,
    check_fused_unload_keeps_the_output,
    check_fused_reinit,
    check_reinit_with_the_updates_gives_reinit_s_bits,
    check_tied_weights_are_updated_in_turn,
    check_plan_follows_new_storage,
    check_replaced_factor_is_held_until_the_next_unload,
    check_statistics_passes_draw_the_updates_seeds,
    check_nonfinite_layer_is_skipped_on_the_fused_path,
    check_nonfinite_is_caught_in_every_adapter_tensor,
    check_nonfinite_on_wide_layers_touches_nothing,
    check_cached_plan_gives_the_throwaway_plans_result,
    check_nonfinite_caught_by_a_kept_plan,
    check_refused_unload_touches_nothing_on_every_path,
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_fused_path_on_cuda(check):
    pytest.importorskip("triton")
    check("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the fused path is tested on the GPU")
def test_fused_path_in_interpreter():
    pytest.importorskip("triton")
    interpreter.run_script(__file__)


# --- in process: revalidation and the optimizer reset -------------------------------------------


def _count_builds(monkeypatch) -> list:
    builds = []
    real = UnloadPlan._build
    monkeypatch.setattr(UnloadPlan, "_build", lambda self, *a: builds.append(1) or real(self, *a))
    return builds


def test_kept_hash_prefixes_give_reinit_seeds_values():
    """The plan's seed tables hash each layer's fixed prefix once; every seed must still be
    reinit_seed's, for any seed, unload index and name (one prefix dict across all of them)."""
    names = ["base_model.model.layers.0.q_proj", "a/b", "ünïcode", "", "x" * 300]
    prefixes: dict = {}
    for seed in (0, 1, 2**40):
        for index in (0, 1, 9, 10, 12345):
            assert reinit_seeds(seed, names, index, prefixes) == [reinit_seed(seed, n, index) for n in names]
    assert len(prefixes) == 3 * len(names)
    # pairs whose seed and name run together ("1" + "23", "12" + "3", "1" + "2/3", "12" + "/3") are
    # kept apart in the one dict: each gets its own prefix, and reinit_seed's value
    pairs = [(12, "3"), (1, "23"), (1, "2/3"), (12, "/3")]
    for seed, name in pairs:
        assert reinit_seeds(seed, [name], 4, prefixes) == [reinit_seed(seed, name, 4)], (seed, name)
    # and those seeds differ: the loop above tells all four apart
    assert len({reinit_seed(seed, name, 4) for seed, name in pairs}) == 4
    assert len(prefixes) == 3 * len(names) + 4


def test_plan_is_rebuilt_only_when_something_changed(monkeypatch):
    builds = _count_builds(monkeypatch)
    model = toy_peft(torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    u = PeriodicUnloader(model, opt, PLoRAConfig(unload_every=1, momentum=0.5))
    u.unload()
    u.unload()
    assert len(builds) == 1  # the first unload built it (and the residual buffers), the second reused it
    layer = u.layers[1]
    layer.weight.data = layer.weight.data.clone()  # new storage
    u.unload()
    assert len(builds) == 2
    u.load_state_dict(u.state_dict())  # new residual buffers
    u.unload()
    assert len(builds) == 3
    layer.module.scaling["default"] *= 2  # another scaling
    u.unload()
    assert len(builds) == 4
    u.config.momentum = 0.25  # another alpha for every layer
    u.unload()
    assert len(builds) == 5
    B = layer.b_tensors()[0]
    B.data = B.data.clone()  # a factor given new storage: the pointers the refresh reads after the norms
    u.unload()
    assert len(builds) == 6
    u.unload()
    assert len(builds) == 6


def test_cached_plan_gives_the_throwaway_plans_result():
    check_cached_plan_gives_the_throwaway_plans_result("cpu")  # the torch path; the fused one in CHECKS


def _old_reset(optimizer, params):
    """The per-tensor reset that the foreach one replaces."""
    for p in params:
        state = optimizer.state.get(p)
        for key, value in list((state or {}).items()):
            if isinstance(value, torch.Tensor):
                value.zero_()
            elif key == "step" and isinstance(value, (int, float)):
                state[key] = type(value)(0)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
], ids=["adamw", "adamw-single", "adamw-fused", "sgd-momentum"])
def test_foreach_reset_equals_per_tensor_reset(make_opt):
    def trained():
        model = toy_peft()
        extra = model.base_model.model.conv.base_layer.bias
        extra.requires_grad_(True)  # a non-adapter parameter with state of its own
        opt = make_opt([p for p in model.parameters() if p.requires_grad])
        for _ in range(2):
            tokens, image = toy_inputs()
            y, c = model(tokens, image)
            (y.square().mean() + c.square().mean()).backward()
            opt.step()
            opt.zero_grad()
        adapter = [t for layer in adapted_layers(model) for t in layer.adapter_tensors()]
        opt.state[adapter[0]]["step"] = 7  # a plain-number counter, as some optimizers keep
        return opt, adapter

    new_opt, adapter = trained()
    old_opt, old_adapter = trained()
    ids = {key: id(value) for key, value in new_opt.state[adapter[1]].items()}
    assert reset_adapter_state(new_opt, adapter, "reset") == len(adapter)
    _old_reset(old_opt, old_adapter)
    new_sd, old_sd = new_opt.state_dict()["state"], old_opt.state_dict()["state"]
    assert new_sd.keys() == old_sd.keys()
    for i in new_sd:
        for key, value in new_sd[i].items():
            old = old_sd[i][key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == old.dtype and value.device == old.device and torch.equal(value, old), (i, key)
            else:
                assert type(value) is type(old) and value == old, (i, key)
    assert {key: id(value) for key, value in new_opt.state[adapter[1]].items()} == ids  # zeroed in place


if __name__ == "__main__":
    from plora import unload_plan

    unload_plan._HOST_KERNELS = True
    sys.exit(interpreter.main(CHECKS))
