"""Toy PEFT models shared by the core tests.

Adapters start NON-identity (B random, like PEFT's own merge tests) so that an unload moves a
real update and output-invariance tests cannot pass trivially.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn


class ToyNet(nn.Module):
    """Embedding -> Linear -> Linear, plus a Conv2d branch: every LoRA layer kind PEFT has."""

    def __init__(self, vocab=40, dim=24, hidden=48, out=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, out)
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, tokens, image=None):
        y = self.down(torch.tanh(self.up(self.emb(tokens))))
        if image is not None:
            return y, self.conv(image)
        return y


class GPT2Style(nn.Module):
    """A transformers Conv1D layer: weight stored (in, out), PEFT's fan_in_fan_out=True."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.proj = Conv1D(20, 16)  # nf=20 outputs, nx=16 inputs

    def forward(self, x):
        return self.proj(x)


def randomise_adapters_(model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def toy_peft(dtype=torch.float32, r=4, seed=0, use_rslora=False, targets=("emb", "up", "down", "conv"), **kw):
    torch.manual_seed(seed)
    net = ToyNet()
    model = get_peft_model(net, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                           use_rslora=use_rslora, **kw))
    randomise_adapters_(model, seed)
    return model.to(dtype)


def gpt2_peft(dtype=torch.float32):
    torch.manual_seed(0)
    model = get_peft_model(GPT2Style(), LoraConfig(r=3, target_modules=["proj"], fan_in_fan_out=True))
    randomise_adapters_(model)
    return model.to(dtype)


def toy_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (3, 7), generator=g), torch.randn(2, 3, 9, 9, generator=g)
