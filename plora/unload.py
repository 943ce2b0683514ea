"""The unload: move a share ``m`` of each LoRA layer's update into its base weight.

For every adapted layer, with ``dW`` the layer's current update exactly as PEFT defines it::

    W       <- W + m * dW          (in place, under no_grad, one layer at a time)
    adapter <- (1 - m) * dW        (B scaled by 1 - m; at m = 1, re-initialised as PEFT does)

so the model's output is unchanged by an unload for every ``m``, up to the rounding of the
base weight's dtype. Re-initialisation draws A from a seed made of (seed, layer name, unload
count), so every process of a distributed run, and a resumed run, draw the same A: on the fused
path by the kaiming kernel's hash of that seed (PEFT's distribution, another stream than torch's
generator), elsewhere from a torch generator seeded with it.

What happens to each layer is worked out once by an ``UnloadPlan`` (``plora.unload_plan``), which
``PeriodicUnloader`` keeps between unloads: fused layers are updated one launch per group of
like-shaped layers, the others one by one on the torch path below.

How the update enters low-precision weights is the ``merge_precision``:

- ``direct``: round ``W + m*dW`` to W's dtype. Exact in fp32; in bf16 an update smaller than
  half a unit in the last place of W is lost. Linear layers take one in-place GEMM
  (``W.addmm_``), so it costs one read and one write of W.
- ``compensated``: Kahan-style. A bf16 residual buffer per weight keeps what rounding dropped and
  adds it back at the next unload, so nothing is lost; +2 bytes per adapted weight element.
- ``stochastic``: stochastic rounding to bf16: unbiased, no memory, but noisy per element.

Each unload returns ``UnloadStats``; its ``landed_share`` is the measured share of the merged
update that arrived in the model's weight state (W, plus the residual buffer where one is kept):
it is measured on about ``landed_sample_rows`` evenly spaced rows per layer (exact with 0 = all
rows): on CUDA with bf16 weights by the fused Triton kernels (``plora.kernels``), which update each
weight in one pass and sum the statistics in whole tiles of rows; elsewhere by the torch path.
``update_norm`` is exact on both paths (it comes from the factors).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from plora.layers import AdaptedLayer, adapted_layers, reinit_generator
from plora.unload_plan import UnloadPlan, resolve_precision

__all__ = ["UnloadPlan", "UnloadStats", "resolve_precision", "unload_"]

# Row chunks of the elementwise paths hold at most this many elements per temporary,
# so no path allocates more than a few tens of MiB beyond the weights themselves.
_CHUNK_ELEMENTS = 1 << 22


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


def _unload_layer(layer: AdaptedLayer, momentum: float, mode: str, residual, sample_rows: int, generator):
    """Merge ``momentum`` of one layer's update into its base weight (torch path).

    Returns a float64 device tensor (norm², landed·expected, expected², 0) over the sampled rows (the
    0: no gate closed, as ``UnloadPlan.update_fused_``'s last element says for the fused layers)."""
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
    zero = torch.zeros((), dtype=torch.float64, device=W.device)
    return torch.stack([norm2.double(), (landed * expected).sum().double(), expected.square().sum().double(), zero])


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
    plan: UnloadPlan | None = None,
) -> UnloadStats:
    """Unload ``momentum`` of every LoRA layer's update into the base weights, in place.

    The model's output is unchanged (up to the base dtype's rounding). At ``momentum == 1`` the
    adapter is re-initialised (A random from a seed made of ``(seed, layer, unload_index)``,
    B zero), else B is scaled by ``1 - momentum``.

    ``residuals`` is the per-layer buffer of ``merge_precision='compensated'``; pass the same dict
    at every unload (``PeriodicUnloader`` does). Without it, what rounding drops is dropped.
    An adapter holding NaN/Inf is never merged: ``on_nonfinite='raise'`` raises and no layer is
    touched, ``'skip'`` leaves those layers alone and warns. (Where every write of the unload is a
    kernel's, the check stays on the device: the kernels read a gate its norms set, and write
    nothing when one is not finite; the host reads the gate with the statistics, after the updates,
    and only then, if it is closed, finds the layers and raises or skips. The unload then has one
    host sync instead of two.)
    ``plan`` is an ``UnloadPlan`` of the layers to unload, kept from one unload to the next (it then
    replaces ``layers``); without it a throw-away one is built, with the same results.
    """
    start = time.perf_counter()
    args = dict(adapter_name=adapter_name, merge_precision=merge_precision, seed=seed, unload_index=unload_index,
                on_nonfinite=on_nonfinite, residuals=residuals, landed_sample_rows=landed_sample_rows,
                layers=layers, plan=plan)
    stats, sums, on_device = _enqueue_unload(model, momentum, **args)
    norm2, dot, den, opened = _results(sums)  # the one sync, after the updates' launch sequence
    if not opened and on_device:  # an adapter is not finite and nothing was written: find it on the host
        stats, sums, _ = _enqueue_unload(model, momentum, **args, check_on_device=False)
        norm2, dot, den, opened = _results(sums)
    if not opened:  # the host check passed, yet a gate closed: the kernels wrote nothing
        raise RuntimeError("plora: the unload's finiteness gate closed after its host check had passed; "
                           "nothing was merged (an update norm at the edge of fp32's range?)")
    stats.update_norm = math.sqrt(max(norm2, 0.0))
    stats.landed_share = dot / den if den > 0 else 1.0
    stats.seconds = time.perf_counter() - start
    return stats


def _results(sums) -> tuple[float, float, float, bool]:
    """(norm², landed·expected, expected², every gate open), in one read: ``sums`` (a tensor, or
    ``_read_ahead``'s copy in flight) adds up the parts of every path, whose last element counts the
    closed gates (``update_fused_``)."""
    if sums is None:
        return 0.0, 0.0, 0.0, True
    if isinstance(sums, tuple):  # a copy to the host in flight: wait for it, not for what came after
        sums, copied = sums
        copied.synchronize()
    values = sums.tolist()
    return values[0], values[1], values[2], values[3] == 0


def _read_ahead(sums: torch.Tensor | None):
    """``sums`` copied to pinned host memory as soon as the updates have written it, with the event
    that says it has arrived: ``_results`` then waits for the updates' launch sequence only (which
    holds the re-init where the plan runs it there, ``reinit_with_updates``), while what is
    launched after it still runs: B's scaling at momentum < 1, the bias merges, a re-init of its
    own (stream-ordered before whatever the caller launches next). Anything not on a CUDA device is
    returned as it is."""
    if sums is None or sums.device.type != "cuda":
        return sums
    with torch.cuda.device(sums.device):
        host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
        host.copy_(sums, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
    return host, copied


def _enqueue_unload(model, momentum, *, adapter_name, merge_precision, seed, unload_index, on_nonfinite, residuals,
                    landed_sample_rows, layers, plan, check_on_device=True
                    ) -> tuple[UnloadStats, torch.Tensor | tuple[torch.Tensor, torch.cuda.Event] | None, bool]:
    """``unload_`` up to its last host sync: every update enqueued, the statistics still on the device
    (so a benchmark can time the host's share alone).

    Returns the stats without the measured numbers, what they come from (norm², landed·expected,
    expected², closed gates; on a GPU, a copy to the host in flight, which ``_results`` reads; None
    when no layer was merged; a gate closed: its device's kernels wrote nothing), and whether the
    finiteness check was left to the device (``UnloadPlan.check_(on_device=True)``): then a closed
    gate means an adapter is not finite, nothing was written, and the unload must run again with
    ``check_on_device=False``.
    """
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    momentum = float(momentum)
    kept = plan is not None  # the caller's plan serves the next unload too
    if plan is None:
        plan = UnloadPlan(adapted_layers(model, adapter_name) if layers is None else layers)
    bad = plan.check_(merge_precision, momentum, residuals, on_device=check_on_device,
                      stats_for=(seed, unload_index, landed_sample_rows))  # None: on the device
    if bad and on_nonfinite == "raise":
        raise FloatingPointError(
            f"refusing to unload: the adapter holds NaN/Inf in {len(bad)} layer(s), e.g. {bad[:3]}; "
            "the base weights were not touched (set on_nonfinite='skip' to merge the healthy layers only)"
        )
    if bad:
        # stacklevel: this function, unload_, torch.no_grad's wrapper, then unload_'s caller
        warnings.warn(f"plora: skipped {len(bad)} layer(s) whose adapter holds NaN/Inf: {bad[:3]}", stacklevel=4)
        skipped = set(bad)
        plan = UnloadPlan([layer for layer in plan.layers if layer.name not in skipped])
        plan.refresh(merge_precision, momentum, residuals)
        plan.update_norms_()
    sums = None  # (norm², landed·expected, expected², closed gates), accumulated on the device
    # at momentum 1 on a plan of fused re-inits only, each group's re-init follows its own update
    reinit_now = momentum >= 1.0 and plan.reinit_with_updates
    for part in plan.update_fused_(seed, unload_index, landed_sample_rows, norms=False,  # norms: above
                                   reinit=reinit_now):
        sums = part if sums is None else sums + part.to(sums.device)
    for layer, mode, residual in plan.torch_work:
        # the stochastic-rounding stream; the other modes draw nothing
        gen = reinit_generator(seed, layer.name, unload_index, layer.weight.device) if mode == "stochastic" else None
        part = _unload_layer(layer, momentum, mode, residual, landed_sample_rows, gen)
        sums = part if sums is None else sums + part.to(sums.device)
    sums = _read_ahead(sums)  # on its way to the host while the rest runs
    for layer in plan.bias_layers:
        _merge_bias(layer, momentum)
    if momentum >= 1.0:
        if not reinit_now:
            plan.reinit_(seed, unload_index)
    else:
        plan.scale_b_(1.0 - momentum)
    if kept and not bad:  # (None: checked on the device, most likely clean)
        # while the GPU runs the updates: the next unload's stochastic-rounding and re-init seeds (a
        # hash per layer), which would otherwise cost host time in front of and among its launches
        plan.prepare_keys(seed, unload_index + 1)
    stats = UnloadStats(unload_index=unload_index, layers=len(plan.layers), update_norm=0.0, landed_share=1.0,
                        precision=dict(plan.modes), skipped=bad or [])
    return stats, sums, bad is None


def _merge_bias(layer: AdaptedLayer, momentum: float) -> None:
    """With PEFT's lora_bias, the adapter's bias term moves into the base bias as well."""
    base_bias = layer.base.bias
    if base_bias is None:
        raise ValueError(f"layer {layer.name}: lora_bias=True but the base layer has no bias to unload into")
    base_bias.data.add_(layer.lora_bias.to(base_bias.dtype), alpha=momentum * layer.scaling)
