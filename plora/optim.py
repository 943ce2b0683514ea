"""The adapter's optimizer state at an unload: reset, prune or keep.

State is found by parameter *object*, never by name: a lookup by name once made a ReLoRA
implementation silently prune nothing. Everything else in the optimizer stays byte-identical.
"""

from __future__ import annotations

import operator
import weakref

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
    device and dtype, not one kernel per tensor (``AdapterStateReset``, here used once).
    """
    if mode == "keep":
        return 0
    if mode == "reset":
        return AdapterStateReset(optimizer, params)(mode)
    touched = 0
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        touched += 1
        for value in state.values():
            if (isinstance(value, torch.Tensor) and value.shape == p.shape and value.is_floating_point()
                    and value.numel() > 1):
                _prune_(value, prune_ratio)
    return touched


def _prune_(t: torch.Tensor, ratio: float) -> None:
    """Zero the ``ratio`` share of entries with the smallest magnitude (ReLoRA's magnitude pruning)."""
    k = int(t.numel() * ratio)
    if k <= 0:
        return
    flat = t.abs().flatten().float()
    threshold = flat.kthvalue(k).values
    t.masked_fill_(t.abs() <= threshold, 0)


class AdapterStateReset:
    """The 'reset' of ``reset_adapter_state`` for one optimizer and one parameter list, called at
    every unload; other modes go to ``reset_adapter_state``.

    It keeps the state tensors it found, as weak references grouped for the foreach zeroing, and
    reuses that grouping while the optimizer holds the very same tensors (checked by identity at
    each call; weak, so a state the optimizer drops is freed, not kept alive here). On a model of a
    few hundred small layers the walk over every parameter's state and the regrouping of every
    tensor otherwise cost about a millisecond of host time per unload. A state holding a
    plain-number ``step`` counter is walked at every call: that number is set anew each time.
    """

    def __init__(self, optimizer, params: list[torch.Tensor]):
        self.optimizer = optimizer
        self.params = list(params)
        self._ids = [id(p) for p in self.params]
        self._refs: list[weakref.ref] | None = None  # the state tensors last zeroed, in walk order
        self._groups: list[list[int]] = []  # their indices per (device, dtype)
        self._touched = 0

    @torch.no_grad()
    def __call__(self, mode: str, prune_ratio: float = 0.9) -> int:
        if mode != "reset":
            return reset_adapter_state(self.optimizer, self.params, mode, prune_ratio)
        by_id = {id(p): state for p, state in self.optimizer.state.items()}  # no tensor hashing
        states = [state for i in self._ids if (state := by_id.get(i))]
        values = [value for state in states for value in state.values()]
        refs = self._refs
        if refs is None or len(refs) != len(values) or not all(map(operator.is_, values, (r() for r in refs))):
            groups: dict = {}
            for i, v in enumerate(values):
                if isinstance(v, torch.Tensor):
                    groups.setdefault((v.device, v.dtype), []).append(i)
            plain = sum(map(len, groups.values())) != len(values)  # a plain number: walk again next time
            self._refs = None if plain else [weakref.ref(v) for v in values]
            self._groups, self._touched = list(groups.values()), len(states)
            if plain:  # values are replaced, never added: safe while iterating
                for state in states:
                    step = state.get("step")
                    if isinstance(step, (int, float)):
                        state["step"] = type(step)(0)
        for group in self._groups:
            torch._foreach_zero_([values[i] for i in group])
        return self._touched
