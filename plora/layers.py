"""Finding the LoRA layers of a PEFT model and reading/writing their factors.

Every other module goes through here, so the PEFT-specific knowledge (attribute names,
fan_in_fan_out, embedding layout, unsupported variants) lives in one place.

A supported layer's update is expressed as ``W += alpha * L @ R`` on the base weight's own
layout, with ``alpha = momentum * scaling``. That form lets an unload run as one in-place GEMM
(``W.addmm_(L, R)``) with no temporary of the weight's size.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

try:  # peft is a hard dependency, but keep the import error readable
    from peft.tuners.lora.layer import Embedding as LoraEmbedding
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.layer import _ConvNd as LoraConv
except ImportError as exc:  # pragma: no cover
    raise ImportError("plora needs peft (pip install peft)") from exc

# Wrappers that put a prefix in front of module names; stripped so that a DDP- or
# torch.compile-wrapped model draws the same re-initialisation as the bare one.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """Module name without DDP/compile wrapper prefixes (stable across launch modes)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


@dataclass
class AdaptedLayer:
    """One LoRA layer of one adapter, with the pieces an unload needs."""

    name: str  # canonical module name
    module: LoraLayer
    adapter: str

    @property
    def base(self) -> nn.Module:
        return self.module.get_base_layer()

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight that unloads write into."""
        return self.base.weight

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def kind(self) -> str:
        if isinstance(self.module, LoraLinear):
            return "linear"
        if isinstance(self.module, LoraEmbedding):
            return "embedding"
        return "conv"

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) with ``delta_weight == scaling * L @ R`` in the base weight's layout (linear/embedding)."""
        m, a = self.module, self.adapter
        if self.kind == "linear":
            B, A = m.lora_B[a].weight, m.lora_A[a].weight
            return (A.T, B.T) if m.fan_in_fan_out else (B, A)
        if self.kind == "embedding":
            A, B = m.lora_embedding_A[a], m.lora_embedding_B[a]
            return A.T, B.T
        raise TypeError(f"layer {self.name}: conv layers have no (L, R) factor form; use delta_weight()")

    def delta_weight(self) -> torch.Tensor:
        """The layer's current update exactly as PEFT defines it (scaling, rsLoRA, layout)."""
        return self.module.get_delta_weight(self.adapter)

    @property
    def init_mode(self) -> str:
        """How ``reinit_`` draws A: 'kaiming' (PEFT's default) or 'gaussian'."""
        return _init_mode(self.module, self.adapter)

    @property
    def lora_bias(self) -> torch.Tensor | None:
        """The adapter's own bias (PEFT's ``lora_bias=True``), or None."""
        m, a = self.module, self.adapter
        if self.kind == "embedding" or not m.lora_bias.get(a):
            return None
        return m.lora_B[a].bias

    def b_tensors(self) -> list[torch.Tensor]:
        """B and, with lora_bias, its bias: the tensors an unload scales by ``1 - m`` or zeroes."""
        m, a = self.module, self.adapter
        if self.kind == "embedding":
            return [m.lora_embedding_B[a]]
        bias = self.lora_bias
        return [m.lora_B[a].weight] if bias is None else [m.lora_B[a].weight, bias]

    def adapter_tensors(self) -> list[torch.Tensor]:
        """The trainable tensors of this adapter in this layer (for finiteness checks, optimizer lookup)."""
        m, a = self.module, self.adapter
        A = m.lora_embedding_A[a] if self.kind == "embedding" else m.lora_A[a].weight
        return [A, *self.b_tensors()]

    def tensor_slots(self) -> list[tuple[dict, str]]:
        """(dict, key) of where the base weight and the adapter's tensors live, in that order.

        Reading ``d[k]`` is a dict lookup: far cheaper than the properties above, so a cached
        ``UnloadPlan`` can check at every unload that no tensor was replaced or moved.
        """
        m, a = self.module, self.adapter
        slots = [(self.base._parameters, "weight")]
        if self.kind == "embedding":
            return slots + [(m.lora_embedding_A._parameters, a), (m.lora_embedding_B._parameters, a)]
        slots += [(m.lora_A[a]._parameters, "weight"), (m.lora_B[a]._parameters, "weight")]
        return slots + ([(m.lora_B[a]._parameters, "bias")] if self.lora_bias is not None else [])

    def reinit_(self, generator: torch.Generator) -> None:
        """Re-initialise the adapter the way PEFT does (never both factors zero), from ``generator``."""
        m, a = self.module, self.adapter
        if self.kind == "embedding":
            # PEFT's embedding init: A zero, B normal.
            nn.init.zeros_(m.lora_embedding_A[a])
            nn.init.normal_(m.lora_embedding_B[a], generator=generator)
            return
        A = m.lora_A[a].weight
        if self.init_mode == "gaussian":
            nn.init.normal_(A, std=1 / m.r[a], generator=generator)
        else:  # PEFT's default (True) and every data-driven init (pissa, olora, ...) fall back to kaiming
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        for t in self.b_tensors():
            nn.init.zeros_(t)


def _init_mode(module: LoraLayer, adapter: str) -> str:
    """'gaussian' when the adapter was created with init_lora_weights='gaussian', else 'kaiming'."""
    return getattr(module, "_plora_init", {}).get(adapter, "kaiming")


def _peft_init_setting(model: nn.Module, adapter: str) -> str:
    for candidate in (model, getattr(model, "module", None)):
        cfg = getattr(candidate, "peft_config", None)
        if isinstance(cfg, dict) and adapter in cfg:
            init = getattr(cfg[adapter], "init_lora_weights", True)
            return "gaussian" if isinstance(init, str) and init.lower() == "gaussian" else "kaiming"
    return "kaiming"


def reinit_seed(seed: int, name: str, unload_index: int) -> int:
    """A 63-bit seed from (seed, layer, unload count): identical on every rank and on resume."""
    return _seed_of(hashlib.sha256(f"{seed}/{name}/{unload_index}".encode()))


def _seed_of(h) -> int:
    """The 63-bit seed of a SHA-256 hash object."""
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


def reinit_seeds(seed: int, names: list[str], unload_index: int, prefixes: dict) -> list[int]:
    """``reinit_seed(seed, name, unload_index)`` for each name, the same values, faster at the
    next unload: ``prefixes`` (kept by the caller) holds each layer's hash state after its fixed
    ``"seed/name/"``, so an unload hashes only its own index (a plan of a few hundred small layers
    otherwise spends a large part of its unload's host time on these hashes)."""
    tail = f"{unload_index}".encode()
    out = []
    for name in names:
        state = prefixes.get((seed, name))
        if state is None:
            state = prefixes[(seed, name)] = hashlib.sha256(f"{seed}/{name}/".encode())
        h = state.copy()
        h.update(tail)
        out.append(_seed_of(h))
    return out


def reinit_generator(seed: int, name: str, unload_index: int, device: torch.device) -> torch.Generator:
    """A generator seeded by ``reinit_seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(reinit_seed(seed, name, unload_index))
    return g


def _adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for key in list(module.lora_A.keys()) + list(module.lora_embedding_A.keys()):
                if key not in names:
                    names.append(key)
    return names


def resolve_adapter(model: nn.Module, adapter_name: str | None) -> str:
    """The adapter to unload: the named one, or the only one. Raises ValueError otherwise."""
    names = _adapter_names(model)
    if not names:
        raise ValueError(
            "model has no LoRA layers: wrap it with peft.get_peft_model(model, LoraConfig(...)) first"
        )
    if adapter_name is None:
        if len(names) > 1:
            raise ValueError(f"adapter_name: the model has several adapters {names}; name the one to unload")
        return names[0]
    if adapter_name not in names:
        raise ValueError(f"adapter_name: no adapter named {adapter_name!r}; the model has {names}")
    return adapter_name


def _check_supported(name: str, module: LoraLayer, adapter: str) -> None:
    if not isinstance(module, (LoraLinear, LoraEmbedding, LoraConv)):
        raise ValueError(
            f"layer {name}: {type(module).__name__} LoRA layers are not supported "
            "(supported: Linear, Embedding, Conv; quantized bases cannot take an unload)"
        )
    if module.use_dora.get(adapter) or adapter in getattr(module, "lora_variant", {}):
        raise ValueError(
            f"layer {name}: adapter {adapter!r} is a LoRA variant (e.g. DoRA); "
            "periodic unloading supports plain LoRA adapters only"
        )
    if getattr(module, "merged", False):
        raise ValueError(f"layer {name}: the adapter is PEFT-merged; call model.unmerge_adapter() first")
    weight = module.get_base_layer().weight
    if not weight.is_floating_point() or weight.numel() == 0:
        raise ValueError(
            f"layer {name}: base weight is {weight.dtype} with {weight.numel()} elements; "
            "an unload needs a local floating-point weight (not quantized, not sharded by ZeRO-3/FSDP)"
        )
    if type(weight).__name__ == "DTensor" or type(getattr(weight, "data", None)).__name__ == "DTensor":
        raise ValueError(f"layer {name}: sharded (DTensor) weights are not supported")


def adapted_layers(model: nn.Module, adapter_name: str | None = None) -> list[AdaptedLayer]:
    """All LoRA layers of ``adapter_name`` in ``model``, checked to be unloadable.

    Raises ValueError for a model without LoRA layers, an ambiguous or unknown adapter name,
    or a layer type/variant an unload cannot handle.
    """
    adapter = resolve_adapter(model, adapter_name)
    init = _peft_init_setting(model, adapter)
    out: list[AdaptedLayer] = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter not in module.lora_A and adapter not in module.lora_embedding_A:
            continue
        _check_supported(name, module, adapter)
        module.__dict__.setdefault("_plora_init", {})[adapter] = init
        out.append(AdaptedLayer(canonical_name(name), module, adapter))
    return out
