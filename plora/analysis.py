"""Spectra and ranks of the accumulated update ``ΔW = W_now - W_start``.

PLoRA's claim is that unloading a rank-r adapter into the base weight every few steps lets
the *accumulated* update reach a rank far above r. This module measures that, for LoRA,
PLoRA and full fine-tuning alike:

    start = snapshot(model)                  # before training
    ...train...
    report = update_report(model, start)     # per-layer ranks + aggregates, JSON-ready

Layer keys are stable across LoRA and full fine-tuning runs (see :func:`layer_key`), so the
same layer of two runs can be compared. Work is done one layer at a time: only one layer's
float32 ``ΔW`` exists at any moment besides the snapshot itself.

Rank measures (all from the singular values ``s`` of ``ΔW``):

- ``numerical_rank``: number of ``s > tol``, with numpy's ``matrix_rank`` default
  ``tol = s.max() * max(m, n) * eps(float32)``. Exact for float32 weights; for bf16/fp16 weights
  the rounding of every unload adds full-rank noise, so it reads near full rank there.
- ``energy_rank_99``: fewest singular values holding 99% of ``||ΔW||_F^2``. Robust to that
  noise, so it is the headline rank for low-precision weights (the report says which it uses).
- ``effective_rank``: Roy & Vetterli (2007), ``exp(entropy(s / sum(s)))``.
- ``stable_rank``: ``||ΔW||_F^2 / ||ΔW||_2^2``.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Iterator

import torch
from torch import nn

from plora.errors import UserError
from plora.layers import adapted_layers, canonical_name

try:
    from peft.tuners.lora.layer import LoraLayer
except ImportError as exc:  # pragma: no cover
    raise ImportError("plora needs peft (pip install peft)") from exc

_PEFT_PREFIX = "base_model.model."
ENERGY = 0.99  # share of ||ΔW||_F^2 that energy_rank_99 must hold
DEFAULT_TOP_K = 1024  # singular values kept per layer in a report (bounds the JSON size)


def layer_key(name: str) -> str:
    """Stable key of a module name, identical for the same layer of a LoRA and a full model.

    Rule: drop DDP/compile wrapper prefixes (``module.``, ``_orig_mod.``, ...), then PEFT's
    ``base_model.model.`` prefix, then every ``.base_layer`` component. So
    ``base_model.model.model.layers.0.self_attn.q_proj.base_layer`` and the full model's
    ``model.layers.0.self_attn.q_proj`` both become ``model.layers.0.self_attn.q_proj``.
    """
    name = canonical_name(name)
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    parts = [p for p in name.split(".") if p != "base_layer"]
    return ".".join(parts)


def _is_plain_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a Linear with a transposed weight; matched by name so
    # that this module does not import transformers.
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None
        and module.weight.dim() == 2
    )


def _has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


class _Entry:
    """Where one layer's current weight comes from: a base weight, plus an adapter's update if any."""

    def __init__(self, weight: torch.Tensor, adapted=None, default: bool = True):
        self.weight = weight
        self.adapted = adapted  # plora.layers.AdaptedLayer or None
        self.default = default  # part of a full model's default snapshot (Linear layers)

    def current(self, device: torch.device, residuals: dict | None = None) -> torch.Tensor:
        """W_now in float32 on ``device``: base weight plus the adapter's not-yet-unloaded update,
        plus the layer's compensated-merge residual (what bf16 rounding held back) when given."""
        w = self.weight.detach().to(device=device, dtype=torch.float32, copy=True)
        layer = self.adapted
        if layer is not None and residuals and residuals.get(layer.name) is not None:
            w += residuals[layer.name].detach().to(device=device, dtype=torch.float32).view_as(w)
        if layer is not None:
            if layer.kind in ("linear", "embedding"):
                # Compute in float32 from the factors: PEFT's get_delta_weight rounds to the
                # adapter dtype (bf16), which would add noise to the rank measurement.
                L, R = layer.factors()
                w.addmm_(L.detach().to(device, torch.float32), R.detach().to(device, torch.float32),
                         alpha=layer.scaling)
            else:
                w += layer.delta_weight().detach().to(device=device, dtype=torch.float32)
        return w


def _layer_map(model: nn.Module, adapter_name: str | None, lora_only: bool) -> dict[str, _Entry]:
    """Key -> _Entry for the model's comparable layers.

    With LoRA: every LoRA layer (its base weight + the chosen adapter's update). Unless
    ``lora_only``, plain Linear and Embedding layers outside LoRA layers too (LoRA's own A/B
    are excluded); only the Linear ones are ``default``.
    """
    out: dict[str, _Entry] = {}
    lora_prefixes: list[str] = []
    if _has_lora(model):
        adapted = {id(layer.module): layer for layer in adapted_layers(model, adapter_name)}
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                lora_prefixes.append(name + ".")
                base = module.get_base_layer()
                if getattr(base, "weight", None) is not None:
                    out[layer_key(name)] = _Entry(base.weight, adapted.get(id(module)))
    if lora_only and out:
        return out
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in lora_prefixes):
            continue
        if _is_plain_linear(module):
            out.setdefault(layer_key(name), _Entry(module.weight))
        elif isinstance(module, nn.Embedding):
            out.setdefault(layer_key(name), _Entry(module.weight, default=False))
    return out


def snapshot(
    model: nn.Module,
    *,
    names: Iterable[str] | None = None,
    adapter_name: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> dict[str, torch.Tensor]:
    """Copy the weights to compare against later (``W_start``), keyed by :func:`layer_key`.

    Default layers: the base weights of the LoRA-adapted layers if the model has LoRA layers
    (the adapter's own initial contribution is *not* included: with PEFT's default init it is
    zero), else every 2-D Linear weight (full fine-tuning). ``names`` picks layers by key or
    module name instead (Embedding layers may be named too). ``dtype=None`` keeps each
    weight's dtype (a bf16 snapshot of bf16 weights is exact and half the memory of float32).
    """
    layers = _layer_map(model, adapter_name, lora_only=names is None)
    if names is None:
        keys = [k for k, entry in layers.items() if entry.default]
        if not keys:
            raise UserError("snapshot: the model has no LoRA layers and no Linear layers to analyse")
    else:
        keys = [layer_key(n) for n in names]
        missing = [k for k in keys if k not in layers]
        if missing:
            sample = ", ".join(list(layers)[:5])
            raise UserError(f"snapshot: no layer named {missing[0]!r} in the model (layers include: {sample}, ...)")
    return {
        k: layers[k].weight.detach().to(device=device, dtype=dtype or layers[k].weight.dtype, copy=True)
        for k in keys
    }


def accumulated_update(
    model: nn.Module,
    start: dict[str, torch.Tensor],
    *,
    adapter_name: str | None = None,
    device: str | torch.device | None = None,
    residuals: dict[str, torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, ΔW)`` with ``ΔW = W_now - W_start`` in float32, one layer at a time.

    For a LoRA layer ``W_now`` includes the adapter's current, not yet unloaded update, so plain
    LoRA shows its rank-r update and PLoRA the sum of all its stages. ``residuals`` are PLoRA's
    compensated-merge buffers (``PeriodicUnloader.residuals``): with them, a bf16 model's update is
    measured without the full-rank rounding noise that bf16 weights alone carry. ``ΔW`` is
    computed on ``device`` (default: the weight's own device, so a GPU model is analysed on the GPU).
    """
    if not start:
        raise UserError("accumulated_update: the snapshot is empty; take it with analysis.snapshot(model)")
    layers = _layer_map(model, adapter_name, lora_only=False)
    for key, w0 in start.items():
        entry = layers.get(key)
        if entry is None:
            raise UserError(f"accumulated_update: layer {key!r} of the snapshot is not in the model")
        if tuple(entry.weight.shape) != tuple(w0.shape):
            raise UserError(
                f"accumulated_update: layer {key!r} has shape {tuple(entry.weight.shape)} "
                f"but the snapshot has {tuple(w0.shape)}"
            )
        dev = torch.device(device) if device is not None else entry.weight.device
        with torch.no_grad():
            delta = entry.current(dev, residuals)
            delta -= w0.to(device=dev, dtype=torch.float32)
        yield key, delta


def spectrum(delta: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Singular values of ``delta`` in descending order (computed in ``dtype``: float32 or float64).

    Tensors of more than two dimensions (conv kernels) are viewed as ``(out, -1)``.
    """
    if delta.dim() < 2:
        raise ValueError(f"spectrum: need a matrix, got a tensor of shape {tuple(delta.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"spectrum: dtype must be torch.float32 or torch.float64, got {dtype}")
    m = delta.detach().reshape(delta.shape[0], -1).to(dtype)
    if not torch.isfinite(m).all():
        raise ValueError("spectrum: the update contains NaN or Inf")
    return torch.linalg.svdvals(m)


def default_rtol(shape: tuple[int, ...] | None, n_values: int) -> float:
    """numpy.linalg.matrix_rank's relative tolerance: ``max(m, n) * eps(float32)``.

    Without ``shape`` only ``min(m, n) = len(s)`` is known, which gives a tighter tolerance.
    """
    big = max(shape[0], math.prod(shape[1:])) if shape else n_values
    return big * torch.finfo(torch.float32).eps


def numerical_rank(s: torch.Tensor, rtol: float | None = None, *, shape: tuple[int, ...] | None = None) -> int:
    """Number of singular values above ``s.max() * rtol``.

    ``rtol`` defaults to :func:`default_rtol` (numpy's ``matrix_rank`` rule with float32 eps).
    Pass a larger ``rtol`` (e.g. 1e-2) for updates stored in bf16, whose rounding noise is full-rank.
    """
    if s.numel() == 0:
        return 0
    smax = float(s.max())
    if smax == 0.0:
        return 0
    tol = smax * (default_rtol(shape, s.numel()) if rtol is None else rtol)
    return int((s > tol).sum())


def energy_rank(s: torch.Tensor, energy: float = ENERGY) -> int:
    """Fewest singular values whose squares hold ``energy`` of ``sum(s**2)`` (0 for a zero update)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy_rank: energy must be in (0, 1], got {energy}")
    sq = s.detach().to(torch.float64).square()
    total = float(sq.sum())
    if total == 0.0:
        return 0
    share = torch.cumsum(sq, 0) / total
    # tiny slack so that e.g. 99 equal values out of 100 count as 99%, not 100
    return int((share < energy * (1 - 1e-12)).sum()) + 1


def effective_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli (2007): ``exp(-sum p log p)`` with ``p = s / sum(s)`` (0 for a zero update)."""
    s = s.detach().to(torch.float64)
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(s: torch.Tensor) -> float:
    """``||ΔW||_F^2 / ||ΔW||_2^2 = sum(s**2) / max(s)**2`` (0 for a zero update)."""
    s = s.detach().to(torch.float64)
    if s.numel() == 0 or float(s.max()) == 0.0:
        return 0.0
    return float(s.square().sum() / s.max().square())


def _pick(keys: list[str], max_layers: int | None) -> list[str]:
    """All keys, or ``max_layers`` of them evenly spaced over depth (first and last included)."""
    if max_layers is None or max_layers >= len(keys):
        return keys
    if max_layers < 1:
        raise UserError(f"update_report: max_layers must be >= 1, got {max_layers}")
    if max_layers == 1:
        return keys[:1]
    step = (len(keys) - 1) / (max_layers - 1)
    return [keys[round(i * step)] for i in range(max_layers)]


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": float(statistics.fmean(values)),
        "median": float(statistics.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
    }


def update_report(
    model: nn.Module,
    start: dict[str, torch.Tensor],
    *,
    max_layers: int | None = None,
    top_k: int | None = DEFAULT_TOP_K,
    rtol: float | None = None,
    adapter_name: str | None = None,
    device: str | torch.device | None = None,
    residuals: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Per-layer rank measures of the accumulated update plus aggregates, as a JSON-ready dict.

    Layout::

        {"layers": [{"name", "shape", "weight_dtype", "numerical_rank", "energy_rank_99",
                     "effective_rank", "stable_rank", "fro_norm", "num_singular_values",
                     "singular_values"}, ...],
         "aggregate": {"layers", "total_fro_norm", "headline_rank",
                       "<measure>": {"mean", "median", "min", "max"}, ...},
         "settings": {"rtol", "energy", "top_k", "max_layers", "headline_rank"}}

    ``singular_values`` keeps the ``top_k`` largest (None keeps all). ``max_layers`` analyses
    that many layers evenly spaced over depth. ``headline_rank`` names the measure to quote:
    ``numerical_rank`` when every analysed weight is float32/float64, else ``energy_rank_99``
    (rounding noise of low-precision weights inflates the numerical rank). ``residuals``: see
    :func:`accumulated_update`.
    """
    if top_k is not None and top_k < 0:
        raise UserError(f"update_report: top_k must be >= 0 or None, got {top_k}")
    keys = _pick(list(start), max_layers)
    layers_by_key = _layer_map(model, adapter_name, lora_only=False)
    rows: list[dict] = []
    low_precision = False
    for key, delta in accumulated_update(model, {k: start[k] for k in keys},
                                         adapter_name=adapter_name, device=device, residuals=residuals):
        try:
            s = spectrum(delta)
        except ValueError as exc:
            raise ValueError(f"layer {key}: {exc}") from None
        wdtype = layers_by_key[key].weight.dtype
        low_precision |= wdtype not in (torch.float32, torch.float64)
        kept = s if top_k is None else s[:top_k]
        rows.append({
            "name": key,
            "shape": list(delta.shape),
            "weight_dtype": str(wdtype).removeprefix("torch."),
            "numerical_rank": numerical_rank(s, rtol, shape=tuple(delta.shape)),
            "energy_rank_99": energy_rank(s, ENERGY),
            "effective_rank": effective_rank(s),
            "stable_rank": stable_rank(s),
            "fro_norm": float(s.to(torch.float64).square().sum().sqrt()),
            "num_singular_values": int(s.numel()),
            "singular_values": [float(v) for v in kept.cpu()],
        })
        del delta, s
    headline = "energy_rank_99" if low_precision else "numerical_rank"
    aggregate: dict = {
        "layers": len(rows),
        "total_fro_norm": math.sqrt(sum(r["fro_norm"] ** 2 for r in rows)),
        "headline_rank": headline,
    }
    if rows:
        for measure in ("numerical_rank", "energy_rank_99", "effective_rank", "stable_rank", "fro_norm"):
            aggregate[measure] = _stats([r[measure] for r in rows])
    return {
        "layers": rows,
        "aggregate": aggregate,
        "settings": {"rtol": rtol, "energy": ENERGY, "top_k": top_k, "max_layers": max_layers,
                     "headline_rank": headline},
    }
