"""PeriodicUnloader: schedule, optimizer reset, re-warmup, resume, and the point of it all."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import plora
from plora import PeriodicUnloader, PLoRAConfig
from plora.analysis import numerical_rank, spectrum
from plora.checkpoint import load_unload_state, save_unload_state
from plora.layers import adapted_layers
from toys import toy_peft


def make_opt(model, lr=1e-2):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def train_steps(model, opt, unloader, n, seed=0, sched=None):
    g = torch.Generator().manual_seed(seed)
    stats = []
    for _ in range(n):
        tokens = torch.randint(0, 40, (4, 7), generator=g)
        loss = model(tokens).square().mean()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
        if unloader is not None:
            s = unloader.step()
            if s is not None:
                stats.append(s)
    return stats


# --- schedule --------------------------------------------------------------------------------
def test_unload_every_k_steps():
    model = toy_peft()
    u = PeriodicUnloader(model, make_opt(model), PLoRAConfig(unload_every=3))
    assert [s.step for s in train_steps(model, u.optimizer, u, 10)] == [3, 6, 9]
    assert u.num_unloads == 3


def test_stages_split_the_run_evenly():
    model = toy_peft()
    u = PeriodicUnloader(model, make_opt(model), PLoRAConfig(stages=4), total_steps=20)
    assert [s for s in range(1, 21) if u.is_due(s)] == [5, 10, 15]


def test_epoch_fraction_points():
    model = toy_peft()
    u = PeriodicUnloader(model, make_opt(model), PLoRAConfig(unload_every_epochs=0.25), steps_per_epoch=10)
    assert [s for s in range(1, 31) if u.is_due(s)] == [2, 5, 8, 10, 12, 15, 18, 20, 22, 25, 28, 30]
    u = PeriodicUnloader(model, make_opt(model), PLoRAConfig(unload_every_epochs=1.0), steps_per_epoch=7)
    assert [s for s in range(1, 22) if u.is_due(s)] == [7, 14, 21]


def test_schedule_inputs_required():
    model = toy_peft()
    with pytest.raises(ValueError, match="total_steps"):
        PeriodicUnloader(model, make_opt(model), PLoRAConfig(stages=3))
    with pytest.raises(ValueError, match="steps_per_epoch"):
        PeriodicUnloader(model, make_opt(model), PLoRAConfig(unload_every_epochs=0.5))


# --- config validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"unload_every": 0}, ValueError, "unload_every"),
        ({"unload_every": -2}, ValueError, "unload_every"),
        ({"unload_every": 2.5}, TypeError, "unload_every"),
        ({"stages": 0}, ValueError, "stages"),
        ({"unload_every_epochs": 0}, ValueError, "unload_every_epochs"),
        ({"unload_every": 5, "stages": 2}, ValueError, "only one"),
        ({"momentum": 0}, ValueError, "momentum"),
        ({"momentum": 1.2}, ValueError, "momentum"),
        ({"momentum": "high"}, TypeError, "momentum"),
        ({"optimizer_reset": "zero"}, ValueError, "optimizer_reset"),
        ({"lr_strategy": "cosine"}, ValueError, "lr_strategy"),
        ({"merge_precision": "fp8"}, ValueError, "merge_precision"),
        ({"on_nonfinite": "ignore"}, ValueError, "on_nonfinite"),
        ({"prune_ratio": 1.0}, ValueError, "prune_ratio"),
        ({"rewarmup_steps": 0}, ValueError, "rewarmup_steps"),
        ({"seed": "x"}, TypeError, "seed"),
    ],
)
def test_invalid_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PLoRAConfig(**kwargs)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown fields"):
        PLoRAConfig.from_dict({"unload_evry": 3})
    assert PLoRAConfig.from_dict({"stages": 3}).stages == 3
    assert PLoRAConfig().unload_every == 100


def test_optimizer_must_hold_the_adapter():
    model = toy_peft()
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="does not hold"):
        PeriodicUnloader(model, other, PLoRAConfig())
    with pytest.raises(TypeError, match="optimizer"):
        PeriodicUnloader(model, object(), PLoRAConfig())
    with pytest.raises(ValueError, match="no LoRA layers"):
        PeriodicUnloader(torch.nn.Linear(2, 2), other, PLoRAConfig())
    with pytest.raises(TypeError, match="PLoRAConfig"):
        PeriodicUnloader(model, make_opt(model), {"unload_every": 3})


# --- optimizer state ------------------------------------------------------------------------------
def _model_with_extra_trainable():
    model = toy_peft()
    extra = model.base_model.model.conv.base_layer.bias
    extra.requires_grad_(True)  # a non-adapter parameter the optimizer also trains
    return model, extra


@pytest.mark.parametrize("mode", ["reset", "prune", "keep"])
def test_optimizer_reset_touches_exactly_the_adapter(mode):
    model, extra = _model_with_extra_trainable()
    opt = make_opt(model)
    u = PeriodicUnloader(model, opt, PLoRAConfig(unload_every=1000, optimizer_reset=mode, prune_ratio=0.5))
    train_steps(model, opt, None, 3)
    extra_loss = model.base_model.model.conv(torch.randn(1, 3, 5, 5)).sum()
    extra_loss.backward(); opt.step(); opt.zero_grad()
    before = copy.deepcopy(opt.state_dict())
    u.unload()
    after = opt.state_dict()
    adapter_ids = {id(p) for p in u.adapter_params}
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    extra_idx = index[id(extra)]
    for k in before["state"][extra_idx]:  # the rest is byte-identical
        assert torch.equal(before["state"][extra_idx][k], after["state"][extra_idx][k])
    for p in u.adapter_params:
        i = index[id(p)]
        for k in ("exp_avg", "exp_avg_sq"):
            old, new = before["state"][i][k], after["state"][i][k]
            if mode == "reset":
                assert torch.count_nonzero(new) == 0 and after["state"][i]["step"] == 0
            elif mode == "keep":
                assert torch.equal(old, new)
            else:
                nz_new = torch.count_nonzero(new).item()
                keep = p.numel() - int(p.numel() * 0.5)  # the largest half by magnitude survives
                assert keep - 2 <= nz_new <= keep
                kept = new != 0
                assert torch.equal(new[kept], old[kept])  # survivors untouched
    assert len(adapter_ids) == len(u.adapter_params)


def test_reset_state_equals_fresh_optimizer():
    """After a reset, the next AdamW step is the one a newly built optimizer would take."""
    model = toy_peft()
    opt = make_opt(model)
    u = PeriodicUnloader(model, opt, PLoRAConfig(unload_every=1000))
    train_steps(model, opt, None, 3)
    u.unload()
    twin = copy.deepcopy(model)
    fresh = make_opt(twin)
    train_steps(model, opt, None, 1, seed=5)
    train_steps(twin, fresh, None, 1, seed=5)
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_kept_reset_follows_the_optimizers_state():
    """The unloader's reset keeps its grouping of the state tensors between unloads: it must still
    zero exactly what the optimizer holds after the state was replaced (a resume), dropped (a
    fresh state is built lazily), or given a plain-number counter, and never keep a dropped state
    alive."""
    import gc
    import weakref

    from plora.optim import AdapterStateReset

    model = toy_peft()
    opt = make_opt(model)
    adapter = [t for layer in adapted_layers(model) for t in layer.adapter_tensors()]
    reset = AdapterStateReset(opt, adapter)

    def held():  # parameters with state (the toy's conv adapter gets none from token-only steps)
        return sum(1 for p in adapter if opt.state.get(p))

    def zeroed():
        return all(not torch.any(v) if isinstance(v, torch.Tensor) else v == 0
                   for p in adapter for v in opt.state.get(p, {}).values())

    for i in range(3):  # trained, reset, trained again: the same tensors, the kept grouping
        train_steps(model, opt, None, 2, seed=i)
        assert not zeroed() and 0 < held() < len(adapter)
        assert reset("reset") == held() and zeroed()
    # a tensor counter replaced in place by a plain number, the state as long as before: the grouping
    # follows the tensors themselves, not their count
    train_steps(model, opt, None, 1, seed=3)
    step = opt.state[adapter[1]]["step"]
    opt.state[adapter[1]]["step"] = 3
    assert reset("reset") == held() and zeroed() and opt.state[adapter[1]]["step"] == 0
    opt.state[adapter[1]]["step"] = step.zero_()  # AdamW's own tensor counter back, for the steps below
    first = opt.state[adapter[0]]["exp_avg"]
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # a resume: every state tensor replaced
    train_steps(model, opt, None, 2, seed=7)
    assert opt.state[adapter[0]]["exp_avg"] is not first and not zeroed()
    dropped = weakref.ref(first)
    del first
    gc.collect()
    assert dropped() is None  # the reset's references are weak
    assert reset("reset") == held() and zeroed()
    opt.state.clear()  # state dropped: nothing to zero until the optimizer builds it again
    assert reset("reset") == 0
    train_steps(model, opt, None, 1, seed=8)
    opt.state[adapter[1]]["step"] = 3  # a plain-number counter, as some optimizers keep
    assert reset("reset") == held() and zeroed() and opt.state[adapter[1]]["step"] == 0
    opt.state[adapter[1]]["step"] = 3  # again (AdamW itself would not step on a plain counter)
    opt.state[adapter[1]]["exp_avg"].fill_(1.0)
    assert reset("reset") == held() and zeroed() and opt.state[adapter[1]]["step"] == 0  # set again, not cached


# --- learning rate ---------------------------------------------------------------------------------
def test_rewarmup_on_top_of_a_schedule():
    model = toy_peft()
    opt = make_opt(model, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 100)
    u = PeriodicUnloader(model, opt, PLoRAConfig(unload_every=5, lr_strategy="rewarmup", rewarmup_steps=4), sched)
    lrs = []
    opt.register_step_pre_hook(lambda o, a, k: lrs.append(o.param_groups[0]["lr"]))  # the LR each step runs with
    g = torch.Generator().manual_seed(0)
    for step in range(1, 13):
        model(torch.randint(0, 40, (2, 3), generator=g)).sum().backward()
        opt.step(); sched.step(); opt.zero_grad(); u.step()
    scheduled = [1.0 - s / 100 for s in range(12)]
    factors = [1, 1, 1, 1, 1, 0.25, 0.5, 0.75, 1, 1, 0.25, 0.5]
    for got, s, f in zip(lrs, scheduled, factors):
        assert got == pytest.approx(s * f)


def test_rewarmup_with_chained_scheduler_does_not_compound():
    model = toy_peft()
    opt = make_opt(model, lr=1.0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    u = PeriodicUnloader(model, opt, PLoRAConfig(unload_every=2, lr_strategy="rewarmup", rewarmup_steps=2), sched)
    for step in range(1, 7):
        opt.step(); sched.step(); u.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.9**6)


# --- the point: rank beyond r, lower loss than LoRA ----------------------------------------------------
def _regression_run(unload_every, steps=240, r=2, seed=0):
    torch.manual_seed(seed)
    d = 16
    target = torch.randn(d, d)  # full-rank target map
    net = torch.nn.Sequential(torch.nn.Linear(d, d, bias=False))
    torch.nn.init.zeros_(net[0].weight)
    model = get_peft_model(net, LoraConfig(r=r, lora_alpha=r, target_modules=["0"]))
    w0 = adapted_layers(model)[0].weight.detach().clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    u = PeriodicUnloader(model, opt, PLoRAConfig(unload_every=unload_every)) if unload_every else None
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(64, d, generator=g)
        loss = (model(x) - x @ target.T).square().mean()
        loss.backward(); opt.step(); opt.zero_grad()
        if u:
            u.step()
    x = torch.randn(512, d, generator=g)
    with torch.no_grad():
        final = float((model(x) - x @ target.T).square().mean())
    layer = adapted_layers(model)[0]
    update = (layer.weight + layer.delta_weight() - w0).detach()
    return final, numerical_rank(spectrum(update))


def test_plora_breaks_the_rank_bottleneck_and_learns_more():
    lora_loss, lora_rank = _regression_run(None)
    plora_loss, plora_rank = _regression_run(30)
    assert lora_rank <= 2
    assert plora_rank > 2 * 3  # k = 8 unloads of a rank-2 adapter
    assert plora_loss < 0.7 * lora_loss


# --- resume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision, dtype", [("direct", torch.float32), ("compensated", torch.bfloat16)])
def test_resume_midrun_equals_uninterrupted(tmp_path, precision, dtype):
    cfg = PLoRAConfig(unload_every=3, momentum=0.5, lr_strategy="rewarmup", rewarmup_steps=2, merge_precision=precision)

    def fresh():
        model = toy_peft(dtype)
        opt = make_opt(model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
        return model, opt, sched, PeriodicUnloader(model, opt, cfg, sched)

    model, opt, sched, u = fresh()
    train_steps(model, opt, u, 10, sched=sched)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched, u = fresh()
    train_steps(model, opt, u, 5, sched=sched)
    save_unload_state(u, tmp_path)
    adapter = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    opt_sd, sched_sd = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())

    model, opt, sched, u = fresh()  # a new process: original base weights
    model.load_state_dict(adapter, strict=False)
    opt.load_state_dict(opt_sd); sched.load_state_dict(sched_sd)
    load_unload_state(u, tmp_path)
    # the second half uses the data the uninterrupted run saw in steps 6..10
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        torch.randint(0, 40, (4, 7), generator=g)
    for _ in range(5):
        tokens = torch.randint(0, 40, (4, 7), generator=g)
        model(tokens).square().mean().backward()
        opt.step(); sched.step(); opt.zero_grad(); u.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_resume_refuses_a_different_config(tmp_path):
    model = toy_peft()
    u = PeriodicUnloader(model, make_opt(model), PLoRAConfig(unload_every=3))
    save_unload_state(u, tmp_path)
    other = PeriodicUnloader(model, make_opt(model), PLoRAConfig(unload_every=4))
    with pytest.raises(ValueError, match="unload_every"):
        load_unload_state(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="no PLoRA state"):
        load_unload_state(other, tmp_path / "nowhere")


def test_public_api():
    assert {"PLoRAConfig", "PeriodicUnloader", "PLoRACallback", "unload_"} <= set(plora.__all__)
    assert plora.PLoRACallback.__name__ == "PLoRACallback"
