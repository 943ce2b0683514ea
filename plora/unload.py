"""The unload: move a share ``m`` of each LoRA layer's update into its base weight.

For every adapted layer, with ``dW`` the layer's current update exactly as PEFT defines it::

    W       <- W + m * dW          (in place, under no_grad, one layer at a time)
    adapter <- (1 - m) * dW        (B scaled by 1 - m; at m = 1, re-initialised as PEFT does)

so the model's output is unchanged by an unload for every ``m``, up to the rounding of the
base weight's dtype. Re-initialisation draws from a generator seeded by (seed, layer name,
unload count), so every process of a distributed run, and a resumed run, draw the same A.

How the update enters low-precision weights is the ``merge_precision``:

- ``direct``: round ``W + m*dW`` to W's dtype. Exact in fp32; in bf16 an update smaller than
  half a unit in the last place of W is lost. Linear layers take one in-place GEMM
  (``W.addmm_``), so it costs one read and one write of W.
- ``compensated``: Kahan-style. A bf16 residual buffer per weight keeps what rounding dropped and
  adds it back at the next unload, so nothing is lost; +2 bytes per adapted weight element.
- ``stochastic``: stochastic rounding to bf16: unbiased, no memory, but noisy per element.

Each unload returns ``UnloadStats``; its ``landed_share`` is the measured share of the merged
update that arrived in the model's weight state (W, plus the residual buffer where one is kept):
on CUDA with bf16 weights, the fused Triton kernel (``plora.kernels``) updates each weight in one
pass and measures it over every element; elsewhere it is estimated on ``landed_sample_rows``
evenly spaced rows per layer (exact with 0 = all rows).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from plora.layers import AdaptedLayer, adapted_layers, reinit_generator, reinit_seed

# Row chunks of the elementwise paths hold at most this many elements per temporary,
# so no path allocates more than a few tens of MiB beyond the weights themselves.
_CHUNK_ELEMENTS = 1 << 22
_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class UnloadStats:
    """What one unload did."""

    unload_index: int
    layers: int
    update_norm: float  # Frobenius norm of the merged update m*dW over all layers
    landed_share: float  # share of that update that arrived in the weight state (1.0 = all)
    precision: dict = field(default_factory=dict)  # merge_precision -> number of layers
    skipped: list = field(default_factory=list)  # layers not merged because they held NaN/Inf
    seconds: float = 0.0
    step: int | None = None

    def as_log(self, prefix: str = "plora/") -> dict[str, float]:
        """Flat numeric dict for a trainer's logs (TensorBoard, W&B)."""
        return {
            f"{prefix}unloads": float(self.unload_index + 1),
            f"{prefix}unload_layers": float(self.layers),
            f"{prefix}update_norm": self.update_norm,
            f"{prefix}landed_share": self.landed_share,
            f"{prefix}skipped_layers": float(len(self.skipped)),
            f"{prefix}unload_seconds": self.seconds,
        }

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_precision(mode: str, dtype: torch.dtype) -> str:
    """The merge precision a weight of ``dtype`` gets under ``mode`` ('auto' picks by dtype)."""
    if mode == "auto":
        return "compensated" if dtype in _LOW_PRECISION else "direct"
    if mode == "stochastic" and dtype != torch.bfloat16:
        if dtype in (torch.float32, torch.float64):
            return "direct"  # fp32 needs no rounding trick
        raise ValueError(f"merge_precision='stochastic' supports bfloat16 weights, got {dtype}; use 'compensated'")
    if mode == "compensated" and dtype not in _LOW_PRECISION:
        return "direct"  # fp32 weights lose nothing worth a buffer
    return mode


def check_finite(layers: list[AdaptedLayer]) -> list[str]:
    """Names of layers whose adapter holds NaN or Inf.

    One multi-tensor norm per device and one host sync for all layers: a NaN or Inf anywhere in
    a tensor makes its norm non-finite.
    """
    if not layers:
        return []
    tensors = [t for layer in layers for t in layer.adapter_tensors()]
    owner = [i for i, layer in enumerate(layers) for _ in layer.adapter_tensors()]
    by_device: dict = {}
    for j, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(j)
    finite = [True] * len(tensors)
    for idx in by_device.values():
        group = [tensors[j].detach() for j in idx]
        norms = torch._foreach_norm(group) if hasattr(torch, "_foreach_norm") else [t.norm() for t in group]
        for j, ok in zip(idx, torch.isfinite(torch.stack([n.float() for n in norms])).tolist()):
            finite[j] = ok
    bad = sorted({owner[j] for j, ok in enumerate(finite) if not ok})
    return [layers[i].name for i in bad]


_ROWS_CACHE: dict = {}


def _sample_rows(n_rows: int, k: int, device) -> torch.Tensor:
    """Evenly spaced row indices, computed on the host once per shape (no device sync)."""
    key = (n_rows, k, str(device))
    rows = _ROWS_CACHE.get(key)
    if rows is None:
        if k <= 0 or k >= n_rows:
            idx = list(range(n_rows))
        else:
            idx = sorted({round(i * (n_rows - 1) / (k - 1)) for i in range(k)})
        rows = _ROWS_CACHE[key] = torch.tensor(idx, dtype=torch.long, device=device)
    return rows


def _update_rows(W2d, r2d, d_rows_fn, rows: slice, mode: str, generator) -> None:
    """Apply the fp32 update ``d`` to rows ``rows`` of the 2-D weight view under ``mode``."""
    d = d_rows_fn(rows)  # fp32, shape (rows, cols)
    w = W2d[rows]
    if mode == "compensated":
        target = w.float().add_(d)
        if r2d is not None:
            target.add_(r2d[rows].float())
        new = target.to(w.dtype)
        if r2d is not None:
            r2d[rows] = target.sub_(new.float()).to(r2d.dtype)
        w.copy_(new)
    elif mode == "stochastic":
        target = w.float().add_(d)
        bits = target.view(torch.int32)
        noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
        bits.add_(noise).bitwise_and_(-65536)  # keep the top 16 bits: a bf16 value, rounded stochastically
        w.copy_(target)  # exact: target is representable in bf16
    else:  # direct through fp32
        w.copy_(w.float().add_(d))


def _fused_ok(layer: AdaptedLayer) -> bool:
    """Whether the layer's update can go through the fused Triton kernel (bf16 CUDA weight)."""
    W = layer.weight
    if layer.kind == "conv" or not W.is_cuda or W.dtype != torch.bfloat16:
        return False
    from plora import kernels  # imports triton: only for CUDA weights, so CPU installs never need it

    return kernels.fused_available(W.data.view(W.shape[0], -1))


def _unload_layer_fused(layer: AdaptedLayer, momentum: float, mode: str, residual, seed: int, stats) -> None:
    """One Triton pass: update W (and the residual) and add [landed.d, d.d] over all elements to ``stats``."""
    from plora import kernels

    W = layer.weight.data
    L, R = layer.factors()
    r2d = residual.view(W.shape[0], -1) if residual is not None else None
    kernels.fused_update_(W.view(W.shape[0], -1), L.detach(), R.detach(), momentum * layer.scaling, mode, r2d,
                          seed=seed, stats=stats)


def _unload_layer(layer: AdaptedLayer, momentum: float, mode: str, residual, sample_rows: int, generator):
    """Merge ``momentum`` of one layer's update into its base weight (torch path).

    Returns a device tensor (norm², landed·expected, expected²) over the sampled rows."""
    W = layer.weight.data
    W2d = W.view(W.shape[0], -1)
    r2d = residual.view(W.shape[0], -1) if residual is not None else None
    rows = _sample_rows(W2d.shape[0], sample_rows, W.device)

    def state_rows():
        s = W2d[rows].float()
        return s + r2d[rows].float() if r2d is not None else s

    if layer.kind == "conv":
        full = layer.delta_weight().float().reshape(W2d.shape).mul_(momentum)

        def d_rows_fn(sel):
            return full[sel]

        norm2 = full.square().sum()
    else:
        L, R = layer.factors()
        alpha = momentum * layer.scaling
        Lf, Rf = L.float(), R.float()

        def d_rows_fn(sel):
            return (Lf[sel] @ Rf).mul_(alpha)

        # ||alpha L R||_F^2 = alpha^2 tr((L^T L)(R R^T)): r x r work, no temporary of W's size
        norm2 = (Lf.T @ Lf * (Rf @ Rf.T)).sum() * (alpha * alpha)

    expected = d_rows_fn(rows)
    before = state_rows()
    if mode == "direct" and layer.kind != "conv":
        # One in-place GEMM: reads and writes W once, no temporary of W's size.
        W2d.addmm_(L.to(W.dtype), R.to(W.dtype), alpha=alpha)
    else:
        chunk = max(1, _CHUNK_ELEMENTS // max(1, W2d.shape[1]))
        for start in range(0, W2d.shape[0], chunk):
            _update_rows(W2d, r2d, d_rows_fn, slice(start, start + chunk), mode, generator)
    landed = state_rows() - before
    # stay on the device: one host sync per unload, not per layer
    return torch.stack([norm2.double(), (landed * expected).sum().double(), expected.square().sum().double()])


@torch.no_grad()
def unload_(
    model: nn.Module,
    momentum: float = 1.0,
    *,
    adapter_name: str | None = None,
    merge_precision: str = "auto",
    seed: int = 0,
    unload_index: int = 0,
    on_nonfinite: str = "raise",
    residuals: dict[str, torch.Tensor] | None = None,
    landed_sample_rows: int = 64,
    layers: list[AdaptedLayer] | None = None,
) -> UnloadStats:
    """Unload ``momentum`` of every LoRA layer's update into the base weights, in place.

    The model's output is unchanged (up to the base dtype's rounding). At ``momentum == 1`` the
    adapter is re-initialised (A random from a generator seeded by ``(seed, layer, unload_index)``,
    B zero), else B is scaled by ``1 - momentum``.

    ``residuals`` is the per-layer buffer of ``merge_precision='compensated'``; pass the same dict
    at every unload (``PeriodicUnloader`` does). Without it, what rounding drops is dropped.
    An adapter holding NaN/Inf is never merged: ``on_nonfinite='raise'`` raises before any layer
    is touched, ``'skip'`` leaves those layers alone and warns.
    """
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    start = time.perf_counter()
    layers = adapted_layers(model, adapter_name) if layers is None else layers
    bad = check_finite(layers)
    if bad and on_nonfinite == "raise":
        raise FloatingPointError(
            f"refusing to unload: the adapter holds NaN/Inf in {len(bad)} layer(s), e.g. {bad[:3]}; "
            "the base weights were not touched (set on_nonfinite='skip' to merge the healthy layers only)"
        )
    if bad:
        warnings.warn(f"plora: skipped {len(bad)} layer(s) whose adapter holds NaN/Inf: {bad[:3]}", stacklevel=2)
    bad_set = set(bad)
    sums = None  # torch path: (norm², landed·expected, expected²), accumulated on the device
    fused_stats: dict = {}  # fused path, per device: [landed·d, d·d] over every element
    modes: dict[str, int] = {}
    for layer in layers:
        if layer.name in bad_set:
            continue
        mode = resolve_precision(merge_precision, layer.weight.dtype)
        modes[mode] = modes.get(mode, 0) + 1
        residual = None
        if mode == "compensated" and residuals is not None:
            residual = residuals.get(layer.name)
            if residual is None:
                residual = residuals[layer.name] = torch.zeros_like(layer.weight, dtype=torch.bfloat16)
        if _fused_ok(layer):
            dev = layer.weight.device
            if dev not in fused_stats:
                fused_stats[dev] = torch.zeros(2, dtype=torch.float32, device=dev)
            _unload_layer_fused(layer, float(momentum), mode, residual, reinit_seed(seed, layer.name, unload_index),
                                fused_stats[dev])
        else:
            # the stochastic-rounding stream; the other modes draw nothing
            gen = reinit_generator(seed, layer.name, unload_index, layer.weight.device) if mode == "stochastic" else None
            part = _unload_layer(layer, float(momentum), mode, residual, landed_sample_rows, gen)
            sums = part if sums is None else sums + part.to(sums.device)
        _merge_bias(layer, float(momentum))
        if momentum >= 1.0:
            layer.reinit_(reinit_generator(seed + 1, layer.name, unload_index, _adapter_device(layer)))
        else:
            layer.scale_b_(1.0 - momentum)
    for stats in fused_stats.values():  # exact over all elements: norm² = sum(d²)
        extra = torch.stack([stats[1].double(), stats[0].double(), stats[1].double()])
        sums = extra if sums is None else sums + extra.to(sums.device)
    norm2, dot, den = sums.tolist() if sums is not None else (0.0, 0.0, 0.0)
    return UnloadStats(
        unload_index=unload_index,
        layers=len(layers) - len(bad),
        update_norm=math.sqrt(max(norm2, 0.0)),
        landed_share=dot / den if den > 0 else 1.0,
        precision=modes,
        skipped=bad,
        seconds=time.perf_counter() - start,
    )


def _adapter_device(layer: AdaptedLayer) -> torch.device:
    return layer.adapter_tensors()[0].device


def _merge_bias(layer: AdaptedLayer, momentum: float) -> None:
    """With PEFT's lora_bias, the adapter's bias term moves into the base bias as well."""
    m, a = layer.module, layer.adapter
    if layer.kind == "embedding" or not m.lora_bias.get(a) or m.lora_B[a].bias is None:
        return
    base_bias = layer.base.bias
    if base_bias is None:
        raise ValueError(f"layer {layer.name}: lora_bias=True but the base layer has no bias to unload into")
    base_bias.data.add_(m.lora_B[a].bias.to(base_bias.dtype), alpha=momentum * layer.scaling)
