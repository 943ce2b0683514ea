"""The adapter's optimizer state at an unload: reset, prune or keep.

State is found by parameter *object*, never by name: a lookup by name once made a ReLoRA
implementation silently prune nothing. Everything else in the optimizer stays byte-identical.
"""

from __future__ import annotations

import torch


def optimizer_params(optimizer) -> set[int]:
    """ids of every parameter the optimizer updates."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def check_optimizer_holds(optimizer, tensors: list[torch.Tensor]) -> None:
    """Raise unless the optimizer holds every trainable adapter tensor (by identity)."""
    if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "state"):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or wrapper), got {type(optimizer).__name__}")
    held = optimizer_params(optimizer)
    trainable = [t for t in tensors if t.requires_grad]
    missing = [t for t in trainable if id(t) not in held]
    if not trainable:
        raise ValueError("optimizer: the adapter has no trainable parameters (requires_grad=False everywhere)")
    if missing:
        raise ValueError(
            f"optimizer: does not hold {len(missing)} of the adapter's {len(trainable)} trainable parameters; "
            "build it after get_peft_model, from model.parameters() or the adapter's parameters"
        )


@torch.no_grad()
def reset_adapter_state(optimizer, params: list[torch.Tensor], mode: str, prune_ratio: float = 0.9) -> int:
    """Reset (zero, step counter included), prune (zero the smallest ``prune_ratio`` by magnitude)
    or keep the optimizer state of ``params``. Returns how many parameters had state touched.

    Zeroing in place gives the same update as a freshly created Adam/AdamW/SGD state while keeping
    tensor identity (fused and capturable optimizers, CUDA graphs, sharded wrappers). A reset zeroes
    every state tensor (tensor ``step`` counters included) with one ``torch._foreach_zero_`` per
    device and dtype, not one kernel per tensor.
    """
    if mode == "keep":
        return 0
    touched = 0
    to_zero = []
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        touched += 1
        for key, value in state.items():  # values are replaced, never added: safe while iterating
            if isinstance(value, torch.Tensor):
                if mode == "reset":
                    to_zero.append(value)
                elif value.shape == p.shape and value.is_floating_point() and value.numel() > 1:
                    _prune_(value, prune_ratio)
            elif mode == "reset" and key == "step" and isinstance(value, (int, float)):
                state[key] = type(value)(0)
    _zero_(to_zero)
    return touched


def _zero_(tensors: list[torch.Tensor]) -> None:
    """Zero ``tensors`` in place, one foreach call per (device, dtype) group."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        torch._foreach_zero_(group)


def _prune_(t: torch.Tensor, ratio: float) -> None:
    """Zero the ``ratio`` share of entries with the smallest magnitude (ReLoRA's magnitude pruning)."""
    k = int(t.numel() * ratio)
    if k <= 0:
        return
    flat = t.abs().flatten().float()
    threshold = flat.kthvalue(k).values
    t.masked_fill_(t.abs() <= threshold, 0)
