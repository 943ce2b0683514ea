"""How much of each unload actually lands in bf16 weights, per merge precision.

A bf16 Linear (1024 x 1024, |W| ~ N(0, 0.02)) with a LoRA r=16 adapter; each of 20 stages gives
the adapter a fresh update of a set size relative to |W|, then unloads it (momentum 1). Printed:
the mean per-unload landed share (W, plus the residual buffer for compensated), and the share of
the sum of all updates visible in the bf16 weights themselves at the end.

    python benchmarks/bench_landed.py            # CPU, about a minute
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import plora  # noqa: E402
from plora.layers import adapted_layers  # noqa: E402


def run(mode: str, rel: float, stages: int = 20, n: int = 1024, seed: int = 0):
    torch.manual_seed(seed)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(n, n, bias=False)),
                           LoraConfig(r=16, lora_alpha=16, target_modules=["0"]))
    layer = adapted_layers(model)[0]
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
    model = model.to(torch.bfloat16)
    w0 = layer.weight.detach().float().clone()
    total = torch.zeros_like(w0)
    residuals, shares = {}, []
    g = torch.Generator().manual_seed(1)
    B = layer.module.lora_B["default"].weight
    for i in range(stages):
        with torch.no_grad():
            B.copy_(torch.randn(B.shape, generator=g))
            B.mul_(rel * w0.abs().mean() / layer.delta_weight().float().abs().mean())
        total += layer.delta_weight().detach().float()
        st = plora.unload_(model, 1.0, merge_precision=mode, residuals=residuals, unload_index=i, landed_sample_rows=0)
        shares.append(st.landed_share)
    w = layer.weight.detach().float()
    visible = float(((w - w0) * total).sum() / total.square().sum())
    error = float((w - w0 - total).norm() / total.norm())  # what W got wrong, relative to the sum
    extra = sum(t.numel() * t.element_size() for t in residuals.values())
    return sum(shares) / len(shares), visible, error, extra


if __name__ == "__main__":
    print("| merge_precision | update / abs(W) | mean landed share per unload | share of the summed update visible in bf16 W "
          "| error of bf16 W / norm of summed update | extra MiB (1M elements) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for rel in (5e-3, 5e-4, 5e-5):
        for mode in ("direct", "stochastic", "compensated"):
            share, visible, error, extra = run(mode, rel)
            print(f"| {mode} | {rel:g} | {share:.3f} | {visible:.3f} | {error:.3f} | {extra / 1024**2:.0f} |")
