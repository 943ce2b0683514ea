"""The unload plan: what an unload does to each layer, worked out once and reused at every unload.

On models of many small layers the unload used to spend most of its time on the host, per layer:
picking the path, resolving the precision, one Triton launch, one seeded generator for the re-init.
An ``UnloadPlan`` sorts the layers once:

- layers the fused kernels can update (bf16 contiguous weight on CUDA, linear or embedding, both
  factors fp32, bf16 or fp16 alike) go into groups sharing device, weight shape, rank, factor dtype
  and strides, merge precision and residual-or-not. A group keeps small device tables (data
  pointers of W, residual, L, R; alpha = momentum * scaling; a stats slot per layer) and is updated
  by one launch of ``plora.kernels.grouped_update_``. The exact update norms of all fused layers of
  a device (its finiteness check) come from one launch pair per factor dtype and padded rank
  (``plora.kernels.update_norms_`` over a ``NormTable``), launched with the sampled statistics of
  the updates (``sample_stats_``), side by side, as soon as the weights are found unchanged
  (``launch_ahead_``), so that the GPU runs both while the host checks the factors;
- every other layer (CPU, fp32 or fp16 weights, conv) keeps the per-layer torch path of
  ``plora.unload``.

``refresh`` checks at every unload, in a fraction of a microsecond per layer, the data pointers of
every weight, factor and residual and the scalings against those the plan was built from, and
rebuilds the plan if anything changed (``model.to()``, a load that replaced tensors, a new
residual buffer, another momentum or merge precision).

On one CUDA device the plan's launch sequences (the norms with the sampled statistics, or either
alone, the grouped updates with the sums the unload reads, the fused re-init, which at momentum 1
joins the updates' sequence where every re-init is a fused fill: ``reinit_with_updates``, each
group's fills right after its own update) are captured as CUDA graphs at their second run and
replayed from then on (``plora.cuda_graphs``): their tables stay where they are until a rebuild,
which drops the graphs, and the per-unload seeds are written into one persistent device buffer per
device. Launches of a sequence that are independent of each other
(the norms and the groups' statistics passes, their updates unless tied weights order them, the
fills) are captured as parallel branches (``_branches``), so that they overlap when replayed.

Re-initialisation (momentum 1) on the fused path: the A factors of kaiming-initialised linear
layers are drawn by ``plora.kernels.kaiming_fill_``, one launch per update group and A shape,
from a hash of (``reinit_seed(seed + 1, layer, unload_index)``, element index): uniform in
+-1/sqrt(fan_in), the distribution of PEFT's ``kaiming_uniform_(A, a=sqrt(5))``, from a
different stream than torch's generator (which the torch path keeps), and as deterministic: the
same on every rank and on resume. Their B factors are zeroed by the same kernel's zero fill, one
launch per update group, size and dtype (any other B, and lora_bias, by one
``torch._foreach_zero_`` per device and dtype). Other layers
(embeddings, gaussian init, the torch path) are re-initialised per layer as before. Momentum < 1
scales B (and lora_bias) of every layer by one ``torch._foreach_mul_`` per device and dtype.

The finiteness check without a host sync: the norms' launch sequence opens a one-byte gate per
device and the norm kernel closes it wherever a norm is not finite; every writing kernel of the
unload (the updates, the kaiming and zero fills) masks its stores with it. When every write of
an unload is such a kernel's, on one device, at momentum 1 (``device_checked``), ``unload_``
reads the gate with the statistics after the updates, instead of reading the norms before them,
and only if it is closed (nothing was written) runs the host check to name the layers. The host
sync in front of the updates (131-137 µs of host time in an unload of a 1B-shaped model on an
H200) is gone; docs/results/performance.md has the measurements.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from dataclasses import dataclass

import torch

from plora.cuda_graphs import GraphCache
from plora.layers import AdaptedLayer, reinit_generator, reinit_seeds

_LOW_PRECISION = (torch.bfloat16, torch.float16)

# Tests set this in a process running triton's interpreter (TRITON_INTERPRET=1), so that CPU bf16
# weights take the fused path there; it is never set otherwise.
_HOST_KERNELS = False


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


def fused_ok(layer: AdaptedLayer, residual: torch.Tensor | None = None) -> bool:
    """Whether the fused kernels can update the layer: bf16 contiguous CUDA weight, linear or embedding,
    factors of one dtype the kernels read, a residual (if any) laid out like W, triton importable."""
    W = layer.weight
    if layer.kind == "conv" or W.dtype != torch.bfloat16 or not (W.is_cuda or _HOST_KERNELS):
        return False
    from plora import kernels  # imports triton: only for CUDA weights, so CPU installs never need it

    if not kernels.fused_available(W.data.view(W.shape[0], -1), on_host=_HOST_KERNELS):
        return False
    if residual is not None and not (residual.dtype == torch.bfloat16 and residual.shape == W.shape
                                     and residual.device == W.device and residual.is_contiguous()):
        return False
    L, R = layer.factors()
    return (L.dtype == R.dtype and L.dtype in kernels.FACTOR_DTYPES and L.device == R.device == W.device
            and all(_aligned(t) for t in (W, L, R, residual) if t is not None))


def _aligned(t: torch.Tensor) -> bool:
    """16-byte aligned data: the grouped kernels promise the compiler so, for vector loads and stores."""
    return t.data_ptr() % 16 == 0


@dataclass
class _UpdateGroup:
    """Layers updated by one launch of the grouped kernel."""

    names: list[str]
    shape: tuple[int, int, int]  # M, N, rank
    strides: tuple[int, int, int, int]  # L's two strides, then R's
    factor_dtype: torch.dtype
    mode: str
    has_res: bool
    ptrs: torch.Tensor  # int64 (4, G): W, residual (W without one), L, R
    alphas: torch.Tensor  # fp32 (G,)
    stats: torch.Tensor  # fp32 (G, 3): a view into its device's stats table


@dataclass
class _FillGroup:
    """A factors re-initialised by one launch of the kaiming kernel (or B factors zeroed by one launch
    of its zero fill)."""

    names: list[str]
    numel: int
    bound: float
    dtype: torch.dtype
    ptrs: torch.Tensor  # int64 (G,)
    group: int  # the update group (index in its device's updates) whose layers these are


@dataclass
class _DeviceWork:
    """The fused work of one device: its groups, the stats table they write into, the tables of the
    norms' launches (one per factor dtype and padded rank, every fused layer of the device), and the
    buffer its seeds are written into."""

    device: torch.device
    stats: torch.Tensor  # fp32 (layers, 3): [norm², landed·d, d·d] per layer
    updates: list[_UpdateGroup]
    fills: list[_FillGroup]
    norms: list  # kernels.NormTable per factor dtype and padded rank
    keys: torch.Tensor  # int64: the stochastic groups' seeds, then the fills' (written by _seed_tables)
    zero_fills: list[_FillGroup]  # the B factors of the fills' layers (those contiguous and aligned)
    b_rest: list[torch.Tensor]  # the fills' layers' other B tensors (zeroed by a foreach op)
    gate: torch.Tensor  # uint8 (1,): 1 if every update norm of the device is finite (set by update_norms_)
    tied: bool  # some groups update weights another group updates too: their updates go in turn
    result: torch.Tensor  # fp64 (4,): what update_fused_ returns: the stats table's sums, then 1 if the gate is closed


class UnloadPlan:
    """What an unload does to each of ``layers``; build once, pass to ``unload_`` at every unload.

    ``PeriodicUnloader`` keeps one. ``unload_`` calls ``refresh`` first, which (re)builds the plan
    when it is new or stale; the attributes below hold after it:

    - ``modes``: merge precision -> number of layers;
    - ``torch_work``: (layer, mode, residual) of the layers on the per-layer torch path;
    - ``bias_layers``: layers with a lora_bias to merge into the base bias;
    - ``torch_reinit``: layers ``reinit_`` re-initialises one by one from a seeded generator.
    """

    def __init__(self, layers: list[AdaptedLayer]):
        self.layers = list(layers)
        slots = [layer.tensor_slots() for layer in self.layers]  # W, A, B, (lora_bias) per layer
        # (dicts, keys) of the tensors the refresh checks: W and lora_bias, then the factors
        self._other_slots = _split([slot for own in slots for slot in own[:1] + own[3:]])
        self._factor_slots = _split([slot for own in slots for slot in own[1:3]])
        self._scalings = _split([(layer.module.scaling, layer.adapter) for layer in self.layers])
        self._names = [layer.name for layer in self.layers]
        self._key = None
        self._devices: list[_DeviceWork] = []  # built by refresh
        self._held: list[torch.Tensor] = []  # the fused factors' storages, kept while the tables point there
        self._keys = None
        self._stats_for = None  # (seed, unload_index, sample_rows) of the statistics passes last launched
        self._seed_prefixes: dict = {}  # (seed, layer name) -> its hash state (reinit_seeds)
        self._graphs = GraphCache()  # the launch sequences of this plan's tables, as CUDA graphs
        self.device_checked = False  # set by refresh
        self.reinit_with_updates = False  # set by refresh
        self.host_check_next = False  # the last check found a non-finite adapter: check on the host

    # --- build and revalidate ---------------------------------------------------------------------
    def refresh(self, merge_precision: str, momentum: float, residuals: dict | None,
                weights: tuple | None = None) -> bool:
        """Rebuild the plan unless it was built for these arguments and these very tensors; True
        if it was rebuilt (its norms and statistics, if computed, are then stale: ``update_norms_``
        again). ``weights``: what ``_weights_signature`` has just returned (not read again).

        Missing compensated residual buffers are created (zero) on a rebuild, as the unload needs them.
        """
        if weights is None:
            weights = self._weights_signature(merge_precision, momentum, residuals)
        if self._key is not None and self._key[0] == weights and self._key[1] == self._adapter_signature():
            return False
        self._build(merge_precision, float(momentum), residuals)
        self._key = (self._weights_signature(merge_precision, momentum, residuals), self._adapter_signature())
        return True

    def check_(self, merge_precision: str, momentum: float, residuals: dict | None,
               on_device: bool = False, stats_for: tuple[int, int, int] | None = None) -> list[str] | None:
        """``refresh``, then ``nonfinite`` of the factors as they are now.

        What the GPU can do before the refresh has checked every pointer is launched first, so that
        it works while the host checks (1B-shaped model: 112 weights and 224 factors): once the
        weights, residuals, merge precision and momentum are found unchanged, ``launch_ahead_``
        launches the norms, on the factors the plan holds, and the sampled statistics of the update
        to come (``stats_for`` = (seed, unload_index, sample_rows)), side by side. A rebuild
        computes both again; ``update_fused_(norms=False)`` builds on them.

        ``on_device=True`` on a ``device_checked`` plan returns None instead, without a host sync:
        the norms have set the device's gate, and every kernel of the unload that writes reads it,
        so a non-finite adapter makes the whole unload write nothing (``update_fused_``'s sums tell).
        After a check that found a non-finite adapter, the next one runs on the host (an adapter
        left non-finite under ``on_nonfinite='skip'`` would otherwise cost two passes each time)."""
        weights = self._weights_signature(merge_precision, momentum, residuals)
        ahead = self.launch_ahead_(weights, stats_for)
        if self.refresh(merge_precision, momentum, residuals, weights) or not ahead:
            self.update_norms_()
        if on_device and self.device_checked and not self.host_check_next:
            return None
        bad = self.nonfinite(norms_current=True)
        self.host_check_next = bool(bad)
        return bad

    def launch_ahead_(self, weights: tuple, stats_for: tuple[int, int, int] | None = None) -> bool:
        """Launch the norms (``update_norms_``) and, with ``stats_for`` = (seed, unload_index,
        sample_rows), the sampled statistics (``sample_stats_``) before the ``refresh`` that must
        follow, if the plan is built (with fused layers) for these ``weights`` (what
        ``_weights_signature`` has just returned): the GPU then runs them while the host checks
        the factors' pointers. They are independent of each other (the norms write the stats
        table's first column, the statistics add to the other two, zeroed first), so they go out
        as one launch sequence of parallel branches: the latency-bound norm kernels beside the
        statistics passes. The norm kernels read only the factors the plan's tables point to, whose
        storage the plan holds (``_held``: the very tensors of the model's adapter, so no memory
        beyond it, unless one was replaced since the last refresh, which then rebuilds and lets
        go); the statistics read the weights and residuals just checked. Both write only the
        plan's own tables. Returns whether it launched; what it launched stands unless that
        refresh rebuilds."""
        if self._key is None or not self._devices or self._key[0] != weights:
            return False
        if stats_for is None or not self._stats_passes(stats_for[2]):
            self.update_norms_()  # no statistics pass to launch (small layers): the norms alone
        else:
            seed, unload_index, sample_rows = stats_for
            seed_tables = self._seed_keys(seed, unload_index)  # before any capture, as in update_fused_

            def launch_all():
                for work, (work_tables, _) in zip(self._devices, seed_tables):
                    with _on(work.device):
                        work.stats.zero_()
                        _branches([functools.partial(_norms, work, zero_sums=False)]
                                  + _group_launches(work, work_tables, sample_rows, "stats", {}), work.device)

            self._launches(("ahead", sample_rows), launch_all, {})
        self._stats_for = stats_for  # (without statistics passes the norms have reset the sums: none to add)
        return True

    def _weights_signature(self, merge_precision, momentum, residuals) -> tuple:
        """What the statistics passes depend on besides the factors: precision, momentum, and the
        pointers of the weights (and lora_bias), and of the residuals where a layer may use one (only
        ``compensated`` does: the others are not read, a Python loop over the layers spared)."""
        res = None if residuals is None or merge_precision not in ("auto", "compensated") else [
            0 if (r := residuals.get(name)) is None else r.data_ptr() for name in self._names]
        return merge_precision, momentum, _pointers(self._other_slots), res

    def _adapter_signature(self) -> tuple:
        return _pointers(self._factor_slots), list(map(operator.getitem, *self._scalings))

    def _build(self, merge_precision: str, momentum: float, residuals: dict | None) -> None:
        self._keys = None  # the seed tables of _seed_keys, made for the groups built here
        self._stats_for = None
        self._passes = {}  # sample_rows -> whether a group has a statistics pass (_stats_passes)
        self._graphs.clear()  # captured with the old tables (waits for the graphs launched)
        self._held = []  # (eager launches still reading them precede any reuse of their memory: one stream)
        self.modes: dict[str, int] = {}
        self.torch_work: list[tuple[AdaptedLayer, str, torch.Tensor | None]] = []
        self.bias_layers = [layer for layer in self.layers if layer.lora_bias is not None]
        fused: dict[tuple, list] = {}
        w_seen: dict[int, int] = {}
        for layer in self.layers:
            mode = resolve_precision(merge_precision, layer.weight.dtype)
            self.modes[mode] = self.modes.get(mode, 0) + 1
            residual = None
            if mode == "compensated" and residuals is not None:
                residual = residuals.get(layer.name)
                if residual is None:
                    residual = residuals[layer.name] = torch.zeros_like(layer.weight, dtype=torch.bfloat16)
            if not fused_ok(layer, residual):
                self.torch_work.append((layer, mode, residual))
                continue
            L, R = layer.factors()
            W = layer.weight
            # the n-th layer on one shared (tied) weight goes into an n-th group: launches on one
            # stream run in order, programs of one launch would race on the weight
            nth = w_seen[W.data_ptr()] = w_seen.get(W.data_ptr(), -1) + 1
            key = (W.device, W.shape[0], W.numel() // W.shape[0], L.shape[1], L.dtype, L.stride() + R.stride(),
                   mode, residual is not None, nth)
            fused.setdefault(key, []).append((layer, residual, L, R))
        self._devices = self._device_work(fused, momentum)
        # aliases of the factors' storage: a factor given new storage leaves the old one alive for
        # the norms launched ahead of the next refresh, which then rebuilds (launch_ahead_)
        self._held = [t.detach() for members in fused.values() for _, _, L, R in members for t in (L, R)]
        # the fused layers' factors are checked through their update norms (``nonfinite``); every
        # other adapter tensor (the torch path's layers, a fused layer's lora_bias) by a norm of its own
        by_norm = {name for work in self._devices for g in work.updates for name in g.names}
        self._finite = _by_device_and_dtype(
            (t, layer.name) for layer in self.layers
            for t in (layer.adapter_tensors() if layer.name not in by_norm else [layer.lora_bias])
            if t is not None)
        self._b_all = _by_device_and_dtype((t, None) for layer in self.layers for t in layer.b_tensors())
        filled = {name for work in self._devices for fill in work.fills for name in fill.names}
        self._b_rest = _by_device_and_dtype((t, None) for work in self._devices for t in work.b_rest)
        self.torch_reinit = [layer for layer in self.layers if layer.name not in filled]
        # every re-init is a fused layer's fill, and no bias merge reads a lora_bias after the
        # updates: the re-init can then run inside the updates' launch sequence (update_fused_(reinit=True))
        self.reinit_with_updates = (any(work.fills for work in self._devices) and not self.torch_reinit
                                    and not self._b_rest and not self.bias_layers)
        # every tensor an unload writes is written by a kernel that reads its device's gate: the
        # finiteness check can then stay on the device (check_(on_device=True))
        self.device_checked = (len(self._devices) == 1 and momentum == 1.0 and not self.torch_work
                               and not self.bias_layers and not self.torch_reinit and not self._b_rest
                               and not self._finite)

    def _device_work(self, fused: dict, momentum: float) -> list[_DeviceWork]:
        if not fused:
            return []
        from plora import kernels

        per_device: dict[torch.device, list] = {}
        for key, members in fused.items():
            per_device.setdefault(key[0], []).append((key, members))
        out = []
        for device, groups in per_device.items():
            stats = torch.zeros(sum(len(members) for _, members in groups), 3, dtype=torch.float32, device=device)
            updates, start = [], 0
            # the norms' (factors, alphas, rows) per factor dtype and rank padded to the Gram blocks' 16:
            # one launch pair each (a few large ranks do not pad every layer's Gram matrices)
            by_dtype: dict[tuple, tuple[list, list, list]] = {}
            tied = any(key[-1] > 0 for key, _ in groups)  # an n-th layer on one weight (n > 0)
            for (_, M, N, K, fdtype, strides, mode, has_res, _), members in groups:
                norm_factors, norm_alphas, norm_rows = by_dtype.setdefault((fdtype, -(-K // 16)), ([], [], []))
                for i, (layer, _, L, R) in enumerate(members):
                    norm_factors.append((L, R))
                    norm_alphas.append(momentum * layer.scaling)
                    norm_rows.append(start + i)
                rows = [[layer.weight.data_ptr() for layer, _, _, _ in members],
                        [(res if res is not None else layer.weight).data_ptr() for layer, res, _, _ in members],
                        [L.data_ptr() for _, _, L, _ in members],
                        [R.data_ptr() for _, _, _, R in members]]
                updates.append(_UpdateGroup(
                    names=[layer.name for layer, _, _, _ in members], shape=(M, N, K), strides=strides,
                    factor_dtype=fdtype, mode=mode, has_res=has_res,
                    ptrs=torch.tensor(rows, dtype=torch.int64, device=device),
                    alphas=torch.tensor([momentum * layer.scaling for layer, _, _, _ in members],
                                        dtype=torch.float32, device=device),
                    stats=stats[start:start + len(members)]))
                start += len(members)
            norms = [kernels.norm_table(*tables) for tables in by_dtype.values()]
            fills = _fill_groups(device, groups)
            n_keys = sum(len(g.names) for g in updates if g.mode == "stochastic") + sum(len(f.names) for f in fills)
            keys = torch.zeros(n_keys, dtype=torch.int64, device=device)
            filled = {name for fill in fills for name in fill.names}
            zero_fills, b_rest = _zero_groups(device, [(group, t) for group, (_, members) in enumerate(groups)
                                                       for layer, _, _, _ in members
                                                       if layer.name in filled for t in layer.b_tensors()])
            gate = torch.ones(1, dtype=torch.uint8, device=device)
            result = torch.zeros(4, dtype=torch.float64, device=device)
            out.append(_DeviceWork(device, stats, updates, fills, norms, keys, zero_fills, b_rest, gate, tied,
                                   result))
        return out

    # --- what an unload runs ------------------------------------------------------------------------
    def nonfinite(self, norms_current: bool = False) -> list[str]:
        """Names of layers whose adapter holds NaN or Inf, in layer order.

        A NaN or Inf anywhere makes a norm non-finite. The fused layers' factors are checked through
        the exact norm of their update, ``||alpha L R||_F^2`` from the factors' Gram matrices, which
        ``update_norms_`` writes into the stats table, where ``update_fused_(norms=False)`` then
        finds them; ``norms_current=True`` says it has run since the factors last changed (``check_``
        launches it ahead of the refresh, ``launch_ahead_``), else it runs here first. The other
        adapter tensors are checked through one multi-tensor norm per device and dtype (an update
        whose norm overflows fp32 is refused as well: merging it would be no better). One host sync
        per device, reading the norms themselves: the host-checked unload's only one before its
        updates (a ``device_checked`` plan's unload has none there), so the host work in front of it
        is kept to a few launches (with a multi-tensor norm over every adapter tensor instead, the
        unload of a 7B-shaped model took 12.1 ms on an H200, 9.6 ms with Gram norms per weight shape).
        """
        if not norms_current:
            self.update_norms_()
        checks: dict[torch.device, list] = {}  # device -> [(norms, their layers' names)]
        for work in self._devices:
            names = [name for g in work.updates for name in g.names]  # the stats table's row order
            checks.setdefault(work.device, []).append((work.stats, names))
        for device, groups in self._finite.items():
            norms = torch.cat([torch.stack(torch._foreach_norm(ts)).float() for ts, _ in groups])
            checks.setdefault(device, []).append((norms, [name for _, names in groups for name in names]))
        bad = set()
        for parts in checks.values():
            # the sync, one per device; a lone stats table is read whole (one copy, no gather)
            if len(parts) == 1 and parts[0][0].dim() == 2:
                values = [row[0] for row in parts[0][0].tolist()]
            else:
                values = torch.cat([v[:, 0] if v.dim() == 2 else v for v, _ in parts]).tolist()
            names = (n for _, names in parts for n in names)
            bad.update(name for name, value in zip(names, values) if not math.isfinite(value))
        return [name for name in self._names if name in bad]

    def update_norms_(self, **launch) -> None:
        """Every fused layer's stats row set to [exact update norm², 0, 0] (``kernels.update_norms_``
        per device, factor dtype and padded rank: a zeroed buffer and two launches each; ``launch``
        its benchmark options): what ``nonfinite`` reads and ``update_fused_(norms=False)`` then
        builds on. The zeros restart the sums of the statistics passes (``sample_stats_``)."""
        if not self._devices:
            return
        self._stats_for = None  # the zeros below reset what statistics launched before had summed

        def launch_all():
            for work in self._devices:
                with _on(work.device):
                    _norms(work, **launch)

        self._launches("norms", launch_all, launch)

    def sample_stats_(self, seed: int, unload_index: int, sample_rows: int, **launch) -> None:
        """Launch the statistics passes of the grouped updates to come (``update_fused_`` with the same
        arguments): on about ``sample_rows`` rows per layer, from W as it is, adding [landed·d, d·d]
        to the stats rows that ``update_norms_`` has just reset (with ``sample_rows`` 0, or a layer
        of few rows, the update pass sums them over every row itself, and there is nothing to launch
        here). They read W, the residuals and the factors and write only the stats table. A kept
        plan's unload launches the same passes beside the norms, once the weights are checked
        (``launch_ahead_``); this runs them on their own, after a rebuild (``update_fused_``)."""
        if not self._devices:
            return
        self._stats_for = (seed, unload_index, sample_rows)
        if not launch and not self._stats_passes(sample_rows):
            return  # no group has a pass of its own (small layers): nothing to launch, no empty graph
        seed_tables = self._seed_keys(seed, unload_index)  # before any capture: new values, fixed addresses

        def launch_all():
            for work, (work_tables, _) in zip(self._devices, seed_tables):
                with _on(work.device):  # each pass writes its own rows of the stats table: independent
                    _branches(_group_launches(work, work_tables, sample_rows, "stats", launch), work.device)

        self._launches(("stats", sample_rows), launch_all, launch)

    def update_fused_(self, seed: int, unload_index: int, sample_rows: int = 0, *, norms: bool = True,
                      reinit: bool = False, **launch) -> list[torch.Tensor]:
        """Launch the grouped updates; per device, a float64 device tensor [norm², landed·d, d·d,
        closed]: the norm² of the merged update over every element, the next two over about
        ``sample_rows`` rows per layer (0 = all), as ``unload._unload_layer`` returns them, then 1
        if the device's gate was closed (its kernels wrote nothing), else 0. These tensors are the
        plan's own (a CUDA graph's outputs), which the next unload overwrites: read them first.

        ``norms=False``: ``update_norms_`` has just computed the norms for this plan and these
        factors (``check_`` runs it before the finiteness check), so the stats table is used as it
        left it (the benchmark's ``has_stats=False`` skips them as well). The statistics passes run
        first, unless ``sample_stats_`` has launched them for these arguments since the norms.

        Stochastic rounding draws from ``reinit_seed(seed, layer, unload_index)``, as a layer
        updated on its own by ``kernels.fused_update_`` with that seed would. ``launch`` goes to
        ``kernels.grouped_update_`` (its benchmark-only options: statistics, tiling, register cap, layout).

        ``reinit=True`` (on a plan whose ``reinit_with_updates`` holds, at momentum 1) re-initialises
        the adapters in the same launch sequence, as ``reinit_`` would: each group's fills follow its
        own update, beside the other groups' updates, instead of all of them after the last one.
        """
        if reinit and not self.reinit_with_updates:
            raise ValueError("update_fused_(reinit=True) needs a plan whose every re-init is a fused fill "
                             "(reinit_with_updates)")
        if not self._devices:
            return []
        if norms and launch.get("has_stats", True):
            self.update_norms_()
        if self._stats_for != (seed, unload_index, sample_rows) or launch:
            self.sample_stats_(seed, unload_index, sample_rows, **launch)
        self._stats_for = None  # the update passes add to the same sums
        seed_tables = self._seed_keys(seed, unload_index)  # before any capture: new values, fixed addresses

        def launch_all():
            out = []
            for work, (work_tables, fill_tables) in zip(self._devices, seed_tables):
                with _on(work.device):
                    updates = _group_launches(work, work_tables, sample_rows, "update", launch)
                    if reinit and not work.tied:  # a group's fills read nothing another group writes
                        updates = [_in_turn([update, *_fill_launches(work, fill_tables, group)])
                                   for group, update in enumerate(updates)]
                    # groups update other weights (other rows of the stats table) unless tied
                    _branches(updates, work.device, parallel=not work.tied)
                    if reinit and work.tied:
                        _branches(_fill_launches(work, fill_tables), work.device)
                    # the unload's one read: the sums and the gate together (no launch after the graph)
                    torch.sum(work.stats, 0, dtype=torch.float64, out=work.result[:3])
                    torch.logical_not(work.gate, out=work.result[3:])
                    out.append(work.result)
            return out

        return self._launches(("updates", sample_rows, reinit), launch_all, launch)

    def _stats_passes(self, sample_rows: int) -> bool:
        """Whether some group has a statistics pass of its own at ``sample_rows`` (kept per build)."""
        known = self._passes.get(sample_rows)
        if known is None:
            from plora import kernels

            known = self._passes[sample_rows] = any(kernels.stats_step(*g.shape[:2], sample_rows) > 1
                                                     for work in self._devices for g in work.updates)
        return known

    def prepare_keys(self, seed: int, unload_index: int) -> None:
        """Make the seed tables of an unload with (seed, unload_index) now, stochastic rounding's and
        the re-init's (``unload_`` makes the next unload's while the GPU runs this one's updates)."""
        self._seed_keys(seed, unload_index)

    def _seed_keys(self, seed: int, unload_index: int) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Per device work in ``_devices``' order: the stochastic groups' seed tables for ``seed``
        and the kaiming fills' for ``seed + 1`` (``reinit_``), at ``unload_index``; the last ones
        made are kept (``prepare_keys`` makes them ahead: a hash per layer costs host time)."""
        if self._keys is None or self._keys[0] != (seed, unload_index):
            tables = []
            for work in self._devices:
                stochastic = [g for g in work.updates if g.mode == "stochastic"]
                chunks = [(seed, g.names) for g in stochastic] + [(seed + 1, f.names) for f in work.fills]
                made = _seed_tables(chunks, unload_index, work.keys, self._seed_prefixes)
                tables.append((made[:len(stochastic)], made[len(stochastic):]))
            self._keys = ((seed, unload_index), tables)
        return self._keys[1]

    def _launches(self, key, launch_all, launch: dict):
        """``launch_all()``, as a CUDA graph (captured at its second run, replayed) when the plan's fused work
        is on one CUDA device; eagerly on several devices or with the benchmark's ``launch`` options."""
        if launch or len(self._devices) != 1:
            return launch_all()
        return self._graphs.run(key, launch_all, self._devices[0].device)

    def reinit_(self, seed: int, unload_index: int) -> None:
        """Re-initialise every adapter as PEFT does (A random, B zero).

        A is drawn from ``reinit_seed(seed + 1, layer, unload_index)``: by the kaiming kernel on the
        fused path, by a generator seeded with it elsewhere.
        """
        if any(work.fills for work in self._devices):
            seed_tables = self._seed_keys(seed, unload_index)  # before any capture, as in update_fused_

            def launch_all():
                for work, (_, fill_tables) in zip(self._devices, seed_tables):
                    with _on(work.device):  # every fill writes tensors of its own
                        _branches(_fill_launches(work, fill_tables), work.device)
                for device, groups in self._b_rest.items():
                    with _on(device):
                        for tensors, _ in groups:
                            torch._foreach_zero_(tensors)

            self._launches("reinit", launch_all, {})
        for layer in self.torch_reinit:
            layer.reinit_(reinit_generator(seed + 1, layer.name, unload_index, layer.adapter_tensors()[0].device))

    def scale_b_(self, factor: float) -> None:
        """Multiply every adapter's output by ``factor`` (B and lora_bias), A untouched."""
        for device, groups in self._b_all.items():
            # CUDA's foreach kernels apply a Python number in fp32, as mul_ does; the CPU fallback
            # would round it to bf16/fp16 first, where a 0-dim fp64 tensor gives mul_'s bits
            scalar = factor if device.type == "cuda" else torch.tensor(factor, dtype=torch.float64)
            for tensors, _ in groups:
                torch._foreach_mul_(tensors, scalar)


_DATA_PTR = torch.Tensor.data_ptr


def _split(slots: list[tuple]) -> tuple[list, list]:
    """[(dict, key), ...] -> ([dicts], [keys]): what ``_pointers`` maps over."""
    return [d for d, _ in slots], [k for _, k in slots]


def _pointers(slots: tuple[list, list]) -> list[int]:
    """The data pointers of ``dicts[i][keys[i]]``, in one pass of C-level maps (the refresh reads a few
    hundred at every unload, in front of its updates)."""
    return list(map(_DATA_PTR, map(operator.getitem, *slots)))


def _group_launches(work: _DeviceWork, seed_tables: list[torch.Tensor], sample_rows: int, passes: str,
                    launch: dict) -> list:
    """One device's ``kernels.grouped_update_`` launch per group, as functions (``passes`` and
    ``launch`` as it takes them); ``seed_tables``: one per stochastic group, in group order."""
    from plora import kernels

    tables = iter(seed_tables)
    return [functools.partial(kernels.grouped_update_, g.ptrs, g.alphas,
                              next(tables) if g.mode == "stochastic" else None, g.stats, g.shape, g.strides,
                              g.factor_dtype, g.mode, g.has_res, sample_rows=sample_rows, gate=work.gate,
                              passes=passes, **launch)
            for g in work.updates]


def _norms(work: _DeviceWork, **launch) -> None:
    """Launch the norms of every fused layer of one device into its stats table (``update_norms_``),
    the device's gate opened first: every writing kernel of the unload reads it, and the norm
    kernels close it where a norm is not finite."""
    from plora import kernels

    work.gate.fill_(1)
    for norms in work.norms:
        kernels.update_norms_(norms, work.stats, gate=work.gate, **launch)


def _fill_launches(work: _DeviceWork, fill_tables: list[torch.Tensor], group: int | None = None) -> list:
    """One device's re-init launches (``kernels.kaiming_fill_``: A drawn, B zeroed) as functions, those
    of one update group only if ``group`` is given; ``fill_tables``: the seeds, one per fill."""
    from plora.kernels import kaiming_fill_

    return ([functools.partial(kaiming_fill_, fill.ptrs, keys, fill.numel, fill.bound, fill.dtype, gate=work.gate)
             for fill, keys in zip(work.fills, fill_tables) if group is None or fill.group == group]
            + [functools.partial(kaiming_fill_, fill.ptrs, None, fill.numel, 0.0, fill.dtype, gate=work.gate)
               for fill in work.zero_fills if group is None or fill.group == group])


def _in_turn(launches: list):
    """One function that calls ``launches`` in order (a branch of ``_branches``)."""
    return lambda: [launch() for launch in launches]


def _branches(launches: list, device: torch.device, parallel: bool = True) -> None:
    """Call ``launches`` (functions that launch GPU work, each independent of the others) in order;
    while a CUDA graph is being captured, each on a stream of its own, forked from the capturing
    stream and joined back into it, so that the graph holds them as parallel branches. Its replays
    then run them side by side (one launch's last programs beside the next one's first, instead of
    a tail where SMs idle) at no host cost: streams are switched only while capturing."""
    if not parallel or len(launches) < 2 or device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        for launch in launches:
            launch()
        return
    main = torch.cuda.current_stream()
    side = [torch.cuda.Stream(main.device) for _ in launches[1:]]
    for stream in side:
        stream.wait_stream(main)
    launches[0]()
    for stream, launch in zip(side, launches[1:]):
        with torch.cuda.stream(stream):
            launch()
    for stream in side:
        main.wait_stream(stream)


def _on(device: torch.device):
    """``device`` as the current CUDA device (triton launches on the current device's stream);
    nothing to do elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _fill_groups(device: torch.device, groups: list) -> list[_FillGroup]:
    """The kaiming re-init groups of one device's fused layers: by update group, A's shape and dtype
    (so that a group's re-init can follow its own update, ``update_fused_(reinit=True)``)."""
    by_shape: dict[tuple, list] = {}
    for group, (_, members) in enumerate(groups):
        for layer, _, _, _ in members:
            if layer.kind != "linear" or layer.init_mode != "kaiming":
                continue
            A = layer.adapter_tensors()[0]
            if A.is_contiguous():  # its dtype, device and alignment: fused_ok checked them on the factors
                by_shape.setdefault((group, tuple(A.shape), A.dtype), []).append((layer.name, A))
    # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3), bound sqrt(3) * gain / sqrt(fan_in) = 1 / sqrt(fan_in)
    return [
        _FillGroup(names=[name for name, _ in members], numel=math.prod(shape), bound=1.0 / math.sqrt(shape[1]),
                   dtype=dtype, ptrs=torch.tensor([A.data_ptr() for _, A in members], dtype=torch.int64, device=device),
                   group=group)
        for (group, shape, dtype), members in by_shape.items()
    ]


def _zero_groups(device: torch.device, tensors: list[tuple[int, torch.Tensor]]
                 ) -> tuple[list[_FillGroup], list[torch.Tensor]]:
    """The zero fills of ``tensors`` ((update group, B factor to re-initialise) pairs) that the fill
    kernel can write (contiguous, 16-byte aligned, a dtype of ``FACTOR_DTYPES``), one per update
    group, size and dtype; and the rest."""
    from plora import kernels

    by_size: dict[tuple, list] = {}
    rest = []
    for group, t in tensors:
        if t.is_contiguous() and _aligned(t) and t.dtype in kernels.FACTOR_DTYPES and t.numel() > 0:
            by_size.setdefault((group, t.numel(), t.dtype), []).append(t)
        else:
            rest.append(t.detach())
    return [_FillGroup(names=[], numel=numel, bound=0.0, dtype=dtype,
                       ptrs=torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=device), group=group)
            for (group, numel, dtype), ts in by_size.items()], rest


def _seed_tables(chunks: list[tuple[int, list[str]]], unload_index: int, out: torch.Tensor,
                 prefixes: dict) -> list[torch.Tensor]:
    """Per (seed, names) chunk, its layers' ``reinit_seed(seed, name, unload_index)``, written into
    ``out`` (int64, on the device; one host-to-device copy in all) and returned as views of it: the
    same addresses at every unload, which a captured CUDA graph reads. ``prefixes``: the plan's
    hash states of ``reinit_seeds``."""
    if not chunks:
        return []
    seeds = [s for seed, names in chunks for s in reinit_seeds(seed, names, unload_index, prefixes)]
    table = torch.tensor(seeds, dtype=torch.int64, pin_memory=out.device.type == "cuda")
    out.copy_(table, non_blocking=True)  # stream-ordered behind the launches that read the last ones
    return list(out.split([len(names) for _, names in chunks]))


def _by_device_and_dtype(items) -> dict:
    """{device: [(tensors, tags) per dtype]} from (tensor, tag) pairs: the foreach ops' grouping."""
    groups: dict = {}
    for t, tag in items:
        tensors, tags = groups.setdefault(t.device, {}).setdefault(t.dtype, ([], []))
        tensors.append(t.detach())
        tags.append(tag)
    return {device: list(by_dtype.values()) for device, by_dtype in groups.items()}
