"""Fused Triton kernels for the unload on CUDA: ``W += alpha * L @ R`` in one pass, and A's re-init.

The torch path of ``compensated`` and ``stochastic`` merging (``plora.unload._update_rows``) makes
several passes over each weight with fp32 temporaries. This kernel makes one: every program
computes a (BLOCK_M x BLOCK_N) tile of ``d = alpha * L @ R`` in fp32 from the small factors
(rank r, padded to a multiple of 16 with masked loads) and applies it to the same tile of W:

- ``direct``:      ``W = bf16(W + d)``                                  4 bytes/element moved
- ``compensated``: ``t = W + d + res; W = bf16(t); res = bf16(t - W)``   8 bytes/element moved
- ``stochastic``:  ``W = stochastic_round_bf16(W + d)``                 4 bytes/element moved

Rounding to nearest (ties to even) is done in integer arithmetic, so the GPU and triton's CPU
interpreter (whose own fp32->bf16 cast truncates) give the same bits. Stochastic rounding adds 16
random bits to the fp32 bit pattern and drops the low 16 bits, as the torch reference does. The
bits come from a counter-based hash of (seed, element index in W): one round of MurmurHash3's
32-bit finaliser over the index spread by a Weyl step and offset by the mixed seed. So the result
is deterministic for a given seed and independent of the tiling. (``tl.randint``'s Philox, ten
rounds per element, made the kernel compute-bound: 22% of copy bandwidth on an H200 against 46%
with two rounds of the finaliser, in the same measurement.)

Two launch forms run the same tile code (``update_tile``), so they give the same bits:
``fused_update_`` updates one layer per launch; ``grouped_update_`` updates a group of layers of one
shape per launch, one program per (row tile, column tile, layer), each reading its layer's
pointers, alpha and seed from small device tables. One launch per group instead of one per layer is what keeps the
unload's host time far below its kernel time on models of many small layers.

Where it can (``pipelined_available``: a GPU of sm_80 or newer, gluon in triton, weights of at
least 128 columns, a multiple of 16, rank at most 32), ``grouped_update_`` runs its update pass as
``plora.kernels_gluon``'s software-pipelined kernel instead: the same product and rounding, so the
same bits (GPU tests check every mode and factor dtype), with W streamed through shared memory by
asynchronous copies; on an H200 it took the update pass from 77-92% of copy bandwidth to 92-94.5%
(docs/results/performance.md). The triton kernel remains the reference, the statistics pass, and
the update pass everywhere else: where the statistics are summed in the update launch itself, and
with ``PLORA_DISABLE_GLUON=1``.

How the triton update pass walks W depends on the mode (``UPDATE_LAYOUT``, measured): whether
the grid sweeps a row tile's column tiles first, whether W's load and store carry streaming cache
hints, and whether W's tile is loaded before the factors (its DRAM latency then overlaps the small
product). None of this changes a bit of W.

``kaiming_fill_`` re-initialises the A factors of a group of layers in one launch: uniform in
(-bound, bound) from a hash of (seed, element index), two rounds of the same finaliser, 24 random
bits per element.

What landed: ``grouped_update_`` sums ``landed * d`` and ``d * d`` over about ``sample_rows`` rows
per layer, in a pass of the same tile code that stores nothing, run before the update (summing
them in every tile of the update took it from 80% of copy bandwidth to 54% on an H200; with
``sample_rows=0``, or when the sample covers every row tile, the update sums them itself), and
``update_norms_`` computes the update's exact norm from the factors' Gram matrices, for layers of
any shape in one launch pair.

Accuracy: the rank-r product runs on tensor cores in one tf32 pass with fp32 accumulation. bf16 and
fp16 factors are exact in tf32; fp32 factors are rounded to tf32 (10-bit mantissa), so ``d`` is off
from the torch reference's fp32 ``L @ R`` by about 1e-3 of max|d| at most (measured 8.8e-4 at r=16 on
an H200): less than rounding ``d`` once to bf16 (2^-9). Three passes (``tf32x3``, ~5e-6) measured
54% of copy bandwidth for direct merging against 67% for one pass, so the kernel takes one.

Triton is optional: this module imports it, and ``plora.unload_plan`` imports this module only when
a CUDA weight is unloaded, so ``import plora`` never needs triton. Without triton (or off CUDA)
``fused_available`` is False and the unload keeps its torch path; ``PLORA_DISABLE_TRITON=1`` in
the environment forces that path (an escape hatch should a triton build misbehave). With
``TRITON_INTERPRET=1`` set before this module is imported, the kernels run on CPU tensors in
triton's interpreter (for tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

MODES = ("direct", "compensated", "stochastic")
_MODE_ID = {mode: i for i, mode in enumerate(MODES)}


try:  # optional: torch's CUDA wheels ship triton; without it the unload keeps its torch path
    if os.environ.get("PLORA_DISABLE_TRITON", "0") not in ("", "0"):
        raise ImportError("PLORA_DISABLE_TRITON is set")
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install
    triton = None

# triton decides at decoration time whether a kernel runs compiled or in its CPU interpreter
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

if triton is not None:
    _TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    @triton.jit
    def to_bf16_rtne(x):
        # Round fp32 to the nearest bf16, ties to even, in integer arithmetic: the same bits on the
        # GPU and in the interpreter (whose own fp32->bf16 cast truncates). Finite inputs only
        # (the unload never merges non-finite adapters).
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def fmix32(h):
        # MurmurHash3's 32-bit finaliser: a bijection on uint32 with full avalanche
        h ^= h >> 16
        h *= 0x85EBCA6B
        h ^= h >> 13
        h *= 0xC2B2AE35
        h ^= h >> 16
        return h

    @triton.jit
    def load_tile(W, RES, rows, cols, N, offs, mask, HAS_RES: tl.constexpr, STREAM: tl.constexpr):
        # a tile of W and of the residual (W's tile again without one: never used), as stored
        if STREAM:
            w_old = tl.load(W + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        else:
            w_old = tl.load(W + offs, mask=mask, other=0.0)
        r_old = w_old
        if HAS_RES:
            r_old = tl.load(RES + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
        return w_old, r_old

    @triton.jit
    def update_tile(
        W, RES, L, R, STATS,
        M, N, K,
        stride_wm, stride_lm, stride_lk, stride_rk, stride_rn,
        alpha, key_lo, key_hi, pid_m, pid_n,
        MODE: tl.constexpr, HAS_RES: tl.constexpr, HAS_STATS: tl.constexpr, STORE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STREAM: tl.constexpr = False,
        LOAD_FIRST: tl.constexpr = False, GATE=None, GATED: tl.constexpr = False,
    ):
        # One (BLOCK_M x BLOCK_N) tile of one layer, row tile pid_m, column tile pid_n: the body both
        # launch forms share, so a layer gets the same bits whether it is updated alone or in a group.
        # STORE=False computes the tile's statistics without writing anything (the statistics pass of
        # grouped_update_). STREAM marks W's load and store as streaming (read and written once).
        # GATED: a 0 at GATE masks the stores (only they: the gate's load then waits on nothing).
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < M
        col_ok = cols < N

        mask = row_ok[:, None] & col_ok[None, :]
        store_mask = mask
        if GATED:
            store_mask = tl.where(tl.load(GATE) != 0, mask, False)  # (triton's interpreter rejects a scalar & here)
        offs = rows[:, None] * stride_wm + cols[None, :]
        if LOAD_FIRST:  # W's (and the residual's) loads in flight while the factors load and multiply
            w_old, r_old = load_tile(W, RES, rows, cols, N, offs, mask, MODE == 1 and HAS_RES, STREAM)

        # d = alpha * L[rows, :] @ R[:, cols], fp32, rank padded to BLOCK_K by masked loads
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            lt = tl.load(L + rows[:, None] * stride_lm + ks[None, :] * stride_lk,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            rt = tl.load(R + ks[:, None] * stride_rk + cols[None, :] * stride_rn,
                         mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(lt.to(tl.float32), rt.to(tl.float32), acc, input_precision="tf32")
        d = acc * alpha

        if not LOAD_FIRST:
            w_old, r_old = load_tile(W, RES, rows, cols, N, offs, mask, MODE == 1 and HAS_RES, STREAM)
        w_old = w_old.to(tl.float32)
        t = w_old + d
        res_delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if MODE == 1:
            if HAS_RES:
                r_old = r_old.to(tl.float32)
                t = t + r_old
                new = to_bf16_rtne(t)
                r_new = to_bf16_rtne(t - new.to(tl.float32))
                if STORE:
                    tl.store(RES + rows[:, None] * N + cols[None, :], r_new, mask=store_mask)
                res_delta = r_new.to(tl.float32) - r_old
            else:
                new = to_bf16_rtne(t)
        elif MODE == 2:
            # one hash per element, of its index in W (row-major: the stream does not depend on the
            # tiling) spread by a Weyl step and offset by the layer's key, mixed once per program;
            # hashing every element twice made this mode compute-bound (57% of copy bandwidth)
            kmix = fmix32(key_lo.to(tl.uint32) ^ fmix32(key_hi.to(tl.uint32)))
            index = (rows[:, None] * N + cols[None, :]).to(tl.uint32)
            noise = fmix32(index * 0x9E3779B9 + kmix) >> 16
            bits = (t.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
            new = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: already a bf16 value
        else:
            new = to_bf16_rtne(t)
        if STORE:
            if STREAM:
                tl.store(W + offs, new, mask=store_mask, cache_modifier=".cs")
            else:
                tl.store(W + offs, new, mask=store_mask)
        if HAS_STATS:
            # what arrived in the weight state (W, plus the residual where one is kept), against d
            landed = new.to(tl.float32) - w_old + res_delta
            dm = tl.where(mask, d, 0.0)
            # one reduction over the whole tile: per-axis sums kept more values live (sm_90, triton 3.6:
            # 212 -> 166 registers for compensated, 2 -> 3 programs per SM; benchmarks/kernel_resources.py).
            # Relaxed atomics: nothing in this launch reads the sums, and the launch's end orders them
            # for the reader; triton's default (acq_rel) made every program wait for its W stores to
            # complete first (47% -> 54% of copy bandwidth on an H200).
            tl.atomic_add(STATS, tl.sum(tl.where(mask, landed, 0.0) * dm), sem="relaxed")
            tl.atomic_add(STATS + 1, tl.sum(dm * dm), sem="relaxed")

    @triton.jit(do_not_specialize=["key_lo", "key_hi"])
    def unload_tile(
        W, RES, L, R, STATS,
        M, N, K,
        stride_wm, stride_lm, stride_lk, stride_rk, stride_rn,
        alpha, key_lo, key_hi,  # two 31-bit parts of the stochastic-rounding seed (62 bits used)
        MODE: tl.constexpr,  # 0 direct, 1 compensated, 2 stochastic
        HAS_RES: tl.constexpr,
        HAS_STATS: tl.constexpr,  # accumulate [sum(landed * d), sum(d * d)] into STATS (fp32 atomics)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        update_tile(W, RES, L, R, STATS, M, N, K, stride_wm, stride_lm, stride_lk, stride_rk, stride_rn,
                    alpha, key_lo, key_hi, tl.program_id(0), tl.program_id(1), MODE, HAS_RES, HAS_STATS, True,
                    BLOCK_M, BLOCK_N, BLOCK_K)

    @triton.jit
    def unload_tile_grouped(
        PTRS,  # int64 (4, G): data pointers of each layer's W, residual (W's when none), L, R
        ALPHAS,  # fp32 (G,): momentum * scaling per layer
        KEYS,  # int64 (G,): stochastic-rounding seed per layer (read in MODE 2 only)
        STATS,  # fp32 (G, 3): [norm², sum(landed * d), sum(d * d)] per layer; the last two accumulated here
        G, M, N, K,
        stride_wm, stride_lm, stride_lk, stride_rk, stride_rn,
        row_step,  # program (i, j, g) takes row tile i * row_step (1 but in the statistics pass)
        MODE: tl.constexpr, HAS_RES: tl.constexpr, FACTOR_DTYPE: tl.constexpr, HAS_STATS: tl.constexpr,
        STORE: tl.constexpr,  # False: the statistics pass, which writes nothing but STATS
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        COLS_FIRST: tl.constexpr = False,  # grid (tiles_n, tiles_m, G): neighbouring programs share rows
        STREAM: tl.constexpr = False,  # streaming cache hints on W (see update_tile)
        LOAD_FIRST: tl.constexpr = False,  # W's loads issued before the factors' (see update_tile)
        GATE=None,  # uint8 (1,): with GATED, 0 masks every store (see grouped_update_)
        GATED: tl.constexpr = False,
    ):
        # program (tile_m, tile_n, layer): the layers of a group share shape, rank, strides, dtypes
        g = tl.program_id(2)
        if COLS_FIRST:
            tile_m = tl.program_id(1)
            tile_n = tl.program_id(0)
        else:
            tile_m = tl.program_id(0)
            tile_n = tl.program_id(1)
        # Pointers read from memory carry no alignment: without the hint the compiler falls back to
        # 2-byte loads and stores (4x slower on an H200). The plan only groups 16-byte aligned tensors.
        W = tl.multiple_of(tl.load(PTRS + g).to(tl.pointer_type(tl.bfloat16)), 16)
        RES = tl.multiple_of(tl.load(PTRS + G + g).to(tl.pointer_type(tl.bfloat16)), 16)
        L = tl.multiple_of(tl.load(PTRS + 2 * G + g).to(tl.pointer_type(FACTOR_DTYPE)), 16)
        R = tl.multiple_of(tl.load(PTRS + 3 * G + g).to(tl.pointer_type(FACTOR_DTYPE)), 16)
        key_lo = 0
        key_hi = 0
        if MODE == 2:
            key = tl.load(KEYS + g)
            key_lo = key & 0x7FFFFFFF
            key_hi = (key >> 32) & 0x7FFFFFFF
        update_tile(W, RES, L, R, STATS + 3 * g + 1, M, N, K, stride_wm, stride_lm, stride_lk, stride_rk, stride_rn,
                    tl.load(ALPHAS + g), key_lo, key_hi, tile_m * row_step, tile_n,
                    MODE, HAS_RES, HAS_STATS, STORE, BLOCK_M, BLOCK_N, BLOCK_K, STREAM, LOAD_FIRST, GATE, GATED)

    @triton.jit
    def gram_block(P, count, stride_i, stride_k, K, ka, kb, start, step, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
                   PRECISION: tl.constexpr):
        # sum over i in chunks start, start + step, ... of P[i, ka]^T P[i, kb] (P: count x K, any
        # strides): L^T L with P = L, R R^T with P = R^T (strides swapped). The left operand is
        # loaded transposed as such: a transposed operand costs registers in tl.dot.
        acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)
        for i0 in range(start, count, step):
            i = (i0 + tl.arange(0, CHUNK)).to(tl.int64)
            a_t = tl.load(P + ka[:, None] * stride_k + i[None, :] * stride_i,
                          mask=(ka < K)[:, None] & (i < count)[None, :], other=0.0).to(tl.float32)
            b = tl.load(P + i[:, None] * stride_i + kb[None, :] * stride_k,
                        mask=(i < count)[:, None] & (kb < K)[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(a_t, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def factor_grams(
        TABLE,  # int64 (NORM_TABLE_ROWS, G) of a NormTable: per layer L, R, M, N, K, L's strides, R's strides, row
        GRAMS,  # fp32 (G, 2, KPAD, KPAD), zeroed: L^T L and R R^T per layer, accumulated
        FACTOR_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, KPAD: tl.constexpr,
        PRECISION: tl.constexpr,  # tl.dot's input_precision
    ):
        # Program (g, s) adds the Gram matrices of L's and R's s-th, (s+S)-th, ... chunks of CHUNK
        # rows / columns of layer g, in BLOCK_K x BLOCK_K blocks (any rank up to KPAD), with relaxed
        # atomics. Each layer has its own shape and strides: one launch serves a device's layers.
        g = tl.program_id(0)
        s = tl.program_id(1)
        G = tl.num_programs(0)
        S = tl.num_programs(1)
        L = tl.load(TABLE + g).to(tl.pointer_type(FACTOR_DTYPE))
        R = tl.load(TABLE + G + g).to(tl.pointer_type(FACTOR_DTYPE))
        M = tl.load(TABLE + 2 * G + g).to(tl.int32)
        N = tl.load(TABLE + 3 * G + g).to(tl.int32)
        K = tl.load(TABLE + 4 * G + g).to(tl.int32)
        stride_lm = tl.load(TABLE + 5 * G + g).to(tl.int32)
        stride_lk = tl.load(TABLE + 6 * G + g).to(tl.int32)
        stride_rk = tl.load(TABLE + 7 * G + g).to(tl.int32)
        stride_rn = tl.load(TABLE + 8 * G + g).to(tl.int32)
        out = GRAMS + g * (2 * KPAD * KPAD)
        for a0 in range(0, K, BLOCK_K):
            ka = a0 + tl.arange(0, BLOCK_K)
            for b0 in range(0, K, BLOCK_K):
                kb = b0 + tl.arange(0, BLOCK_K)
                gl = gram_block(L, M, stride_lm, stride_lk, K, ka, kb, s * CHUNK, S * CHUNK, CHUNK, BLOCK_K, PRECISION)
                gr = gram_block(R, N, stride_rn, stride_rk, K, ka, kb, s * CHUNK, S * CHUNK, CHUNK, BLOCK_K, PRECISION)
                offs = ka[:, None] * KPAD + kb[None, :]  # KPAD is a multiple of BLOCK_K: in bounds
                tl.atomic_add(out + offs, gl, sem="relaxed")
                tl.atomic_add(out + KPAD * KPAD + offs, gr, sem="relaxed")

    @triton.jit
    def gram_norms(
        GRAMS,  # fp32 (G, 2, KPAD, KPAD) from factor_grams
        TABLE,  # the NormTable's: row 9 is the layer's row of STATS
        ALPHAS,  # fp32 (G,)
        STATS,  # fp32 (rows, 3): a layer's row gets [||alpha L R||_F^2, 0, 0], the norm from
                # alpha^2 sum((L^T L) * (R R^T)), the zeros the start of the update pass's sums
        KPAD: tl.constexpr, BLOCK: tl.constexpr,
        GATE=None,  # uint8 (1,): with GATED, set to 0 where a norm is not finite (never set to 1 here)
        GATED: tl.constexpr = False,
        ZERO_SUMS: tl.constexpr = True,  # False: the two sums are left as they are (summed beside this)
    ):
        g = tl.program_id(0)
        row = tl.load(TABLE + 9 * tl.num_programs(0) + g)
        base = GRAMS + g * (2 * KPAD * KPAD)
        total = 0.0
        for i0 in range(0, KPAD * KPAD, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            ok = i < KPAD * KPAD
            total += tl.sum(tl.load(base + i, mask=ok, other=0.0) * tl.load(base + KPAD * KPAD + i, mask=ok, other=0.0))
        alpha = tl.load(ALPHAS + g)
        norm2 = alpha * alpha * total
        tl.store(STATS + 3 * row, norm2)
        if GATED:
            tl.store(GATE, tl.full([], 0, tl.uint8), mask=(norm2 != norm2) | (tl.abs(norm2) == float("inf")))
        if ZERO_SUMS:
            tl.store(STATS + 3 * row + 1, 0.0)
            tl.store(STATS + 3 * row + 2, 0.0)

    @triton.jit
    def kaiming_fill(
        PTRS,  # int64 (G,): data pointers of the (contiguous) tensors to fill, numel elements each
        KEYS,  # int64 (G,): seed per tensor
        numel, bound,
        DTYPE: tl.constexpr, BLOCK: tl.constexpr,
        GATE=None,  # uint8 (1,): with GATED, 0 masks the stores (the tensors stay as they are)
        GATED: tl.constexpr = False,
        ZERO: tl.constexpr = False,  # fill with +0 instead (KEYS unread)
    ):
        # uniform in (-bound, bound) from the hash of (seed, element index): independent of the tiling
        g = tl.program_id(1)
        out = tl.multiple_of(tl.load(PTRS + g).to(tl.pointer_type(DTYPE)), 16)  # aligned: see above
        offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        mask = offs < numel
        if GATED:
            mask = tl.where(tl.load(GATE) != 0, mask, False)
        if ZERO:
            value = tl.zeros((BLOCK,), DTYPE)
        else:
            key = tl.load(KEYS + g)
            h = fmix32(fmix32(offs.to(tl.uint32) ^ (key & 0x7FFFFFFF).to(tl.uint32))
                       ^ ((key >> 32) & 0x7FFFFFFF).to(tl.uint32))
            # 24 random bits -> an odd multiple of 2^-24 in (-1, 1): exact in fp32, symmetric, never 0
            u = ((h >> 8).to(tl.int32) * 2 - 0xFFFFFF).to(tl.float32) * 5.9604644775390625e-08
            x = u * bound
            if DTYPE == tl.bfloat16:
                value = to_bf16_rtne(x)
            else:
                value = x.to(DTYPE)
        tl.store(out + offs, value, mask=mask)


# the pipelined update pass (Gluon: compiled only, triton >= 3.4), imported after the helpers above,
# which it compiles from the same source; PLORA_DISABLE_GLUON=1 keeps the triton kernel for every
# update (the same bits, slower)
_gluon = None
if triton is not None and not _INTERPRETED and os.environ.get("PLORA_DISABLE_GLUON", "0") in ("", "0"):
    try:
        from plora import kernels_gluon as _gluon
    except Exception:  # an older triton without gluon, or a broken install
        _gluon = None


def triton_available() -> bool:
    """Whether triton imports here (it ships with torch's CUDA builds)."""
    return triton is not None


def fused_available(tensor: torch.Tensor, on_host: bool = False) -> bool:
    """Whether the kernels can update ``tensor``: a contiguous bf16 CUDA weight, triton importable.

    ``on_host`` (tests only) accepts CPU tensors instead when this process runs triton's interpreter.
    """
    # the interpreter runs on the host: never route real CUDA work to it
    placed = (on_host and _INTERPRETED and tensor.device.type == "cpu") or (tensor.is_cuda and not _INTERPRETED)
    return (
        placed
        and tensor.dtype == torch.bfloat16
        and tensor.dim() >= 2
        and tensor.is_contiguous()
        and triton_available()
    )


def parse_tiles(text: str) -> list[tuple[int, int, int]]:
    """``"32x64x4,16x128x8"`` -> ``[(32, 64, 4), (16, 128, 8)]``: tile rows, tile columns, warps, as
    ``grouped_update_``'s ``tile`` takes them (the benchmarks' ``--tiles``); ValueError names a bad one."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split("x")
        if len(parts) != 3 or not all(x.isdigit() for x in parts):
            raise ValueError(f"a tile is ROWSxCOLSxWARPS, e.g. 64x128x4; got {item!r}")
        bm, bn, warps = map(int, parts)
        if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1) or warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"tile {item!r}: rows and columns powers of two >= 16, warps 1-16")
        out.append((bm, bn, warps))
    return out


def pipelined_available(device: torch.device, n_cols: int, rank: int) -> bool:
    """Whether ``grouped_update_`` can run its update pass as ``plora.kernels_gluon``'s pipelined
    kernel for weights of ``n_cols`` columns at rank ``rank`` on ``device``: gluon importable, a GPU
    of compute capability 8.0 or newer, at least 128 columns and a multiple of 16 (rows then start
    16-byte aligned: its asynchronous copies move 16 bytes), rank at most 32."""
    return (
        _gluon is not None
        and device.type == "cuda"
        and _gluon.device_properties(device).major >= 8
        and n_cols >= _gluon.BLOCK_N
        and n_cols % 16 == 0
        and rank <= _gluon.MAX_RANK
    )


def _block_sizes(n_cols: int) -> tuple[int, int]:
    # 32 x 128 tiles with 4 warps: the fastest of the shapes measured on an H200 (16..128 rows,
    # 64..512 columns; fewer registers per program, more programs per SM). Narrow weights get
    # narrower tiles (tl.dot needs at least 16).
    block_n = 128 if n_cols >= 128 else max(16, 1 << (max(n_cols, 1) - 1).bit_length())
    return 32, block_n


def stats_step(n_rows: int, n_cols: int, sample_rows: int, block_m: int | None = None) -> int:
    """Row tiles from one statistics tile to the next when ``grouped_update_`` samples about
    ``sample_rows`` of a weight's ``n_rows`` rows (0 = all; ``block_m``: its tile rows, the default
    tiling's unless given). 1 means every tile: the update pass then sums the statistics itself,
    with no statistics pass of its own."""
    block_m = block_m or _block_sizes(n_cols)[0]
    return max(1, _cdiv(n_rows, block_m) // _cdiv(sample_rows, block_m)) if sample_rows > 0 else 1


def fused_update_(
    W2d: torch.Tensor,
    L: torch.Tensor,
    R: torch.Tensor,
    alpha: float,
    mode: str,
    residual2d: torch.Tensor | None = None,
    seed: int = 0,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place: ``W2d <- round(W2d + alpha * L @ R)`` under ``mode``; returns ``W2d``.

    ``W2d`` is a row-major contiguous bf16 (M, N) tensor, ``L`` is (M, r), ``R`` is (r, N), any
    strides, fp32 or bf16/fp16. ``residual2d`` (bf16, contiguous, same shape) is read and updated by
    ``compensated`` (without it, what rounding drops is dropped, as in the torch path).
    ``seed`` picks the random stream of ``stochastic``: the same seed gives the same result.
    ``stats`` (fp32, 2 elements, on W's device) gets ``[sum(landed * d), sum(d * d)]`` added over
    every element: the exact landed share and update norm, with no extra pass.
    """
    seed = int(seed)
    if triton is None:
        raise RuntimeError("plora.kernels.fused_update_ needs triton; check fused_available() first")
    if mode not in _MODE_ID:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if W2d.dim() != 2 or W2d.dtype != torch.bfloat16 or not W2d.is_contiguous():
        raise ValueError(f"W2d must be a contiguous 2-D bf16 tensor, got {W2d.dtype} {tuple(W2d.shape)}")
    M, N = W2d.shape
    if L.dim() != 2 or R.dim() != 2 or L.shape[0] != M or R.shape[1] != N or L.shape[1] != R.shape[0]:
        raise ValueError(f"factor shapes {tuple(L.shape)} @ {tuple(R.shape)} do not give {(M, N)}")
    has_res = mode == "compensated" and residual2d is not None
    if has_res and (residual2d.shape != W2d.shape or residual2d.dtype != torch.bfloat16
                    or not residual2d.is_contiguous()):
        raise ValueError("residual2d must be a contiguous bf16 tensor shaped like W2d")
    half = (torch.bfloat16, torch.float16)
    if L.dtype not in half or R.dtype not in half:
        L, R = L.float(), R.float()  # no copy when already fp32
    K = L.shape[1]
    has_stats = stats is not None
    if has_stats and (stats.dtype != torch.float32 or stats.numel() < 2 or stats.device != W2d.device):
        raise ValueError("stats must be a float32 tensor of 2 elements on W's device")
    block_m, block_n = _block_sizes(N)
    grid = (_cdiv(M, block_m), _cdiv(N, block_n))
    unload_tile[grid](
        W2d, residual2d if has_res else W2d, L, R, stats if has_stats else W2d,
        M, N, K,
        W2d.stride(0), L.stride(0), L.stride(1), R.stride(0), R.stride(1),
        float(alpha), seed & 0x7FFFFFFF, (seed >> 32) & 0x7FFFFFFF,
        MODE=_MODE_ID[mode], HAS_RES=has_res, HAS_STATS=has_stats,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=16 if K <= 16 else 32,
        num_warps=4,
    )
    return W2d


FACTOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the grouped kernels read

# The update pass's layout per mode (grouped_update_), from bench_unload's probes on an H200, Llama-2-7B
# shape, in three runs (docs/results/performance.md): against rows first with no hints, columns first
# took direct merging from 8.34-8.43 to 8.04-8.14 ms; all three options took compensated merging from
# 14.9-15.1 to 14.1-14.2 ms; stochastic rounding gained from none (each 1-4% slower), and loading W
# first costs it registers (168 against 128 per thread offline for sm_90: 3 programs per SM, not 4;
# benchmarks/kernel_resources.py --load-first).
UPDATE_LAYOUT = {
    "direct": {"cols_first": True, "streaming": False, "load_first": False},
    "compensated": {"cols_first": True, "streaming": True, "load_first": True},
    "stochastic": {"cols_first": False, "streaming": False, "load_first": False},
}


def grouped_update_(
    ptrs: torch.Tensor,
    alphas: torch.Tensor,
    keys: torch.Tensor | None,
    stats: torch.Tensor,
    shape: tuple[int, int, int],
    factor_strides: tuple[int, int, int, int],
    factor_dtype: torch.dtype,
    mode: str,
    has_res: bool,
    *,
    sample_rows: int = 0,
    has_stats: bool = True,
    tile: tuple[int, int, int] | None = None,
    max_registers: int | None = None,
    cols_first: bool | None = None,
    streaming: bool | None = None,
    load_first: bool | None = None,
    pipelined: bool | None = None,
    row_tiles: int | None = None,
    gate: torch.Tensor | None = None,
    passes: str = "both",
) -> None:
    """``fused_update_`` for a group of layers in one launch; each layer gets the same bits as alone.

    For every layer g: ``W_g <- round(W_g + alphas[g] * L_g @ R_g)`` under ``mode``. ``stats[g, 1:]``
    (fp32, shape (G, 3)) accumulates ``[sum(landed * d), sum(d * d)]`` over about ``sample_rows``
    evenly spaced rows of W (whole tiles of rows; 0 = every row, exact); ``stats[g, 0]``, the exact
    ``||d||_F^2``, is ``update_norms_``'s (``UnloadPlan`` runs it for every layer of a device at
    once, before any update: its finiteness check reads the norms). ``ptrs`` is an int64 (4, G)
    table on the weights' device of the data pointers of W (contiguous bf16, ``shape[:2]`` = (M, N)),
    the residual (bf16, contiguous; any valid pointer without one), L (M, r) and R (r, N);
    ``shape[2]`` is the rank r, ``factor_strides`` the strides of L and R (shared by the group),
    ``factor_dtype`` one of ``FACTOR_DTYPES``; ``keys`` (int64, (G,)) are the stochastic seeds.
    No checks: the caller (``plora.unload_plan``) built the tables from validated tensors.
    For the benchmark, to time what they cost:
    ``has_stats=False`` skips the statistics, ``tile`` = (block_m, block_n, num_warps) replaces the
    default tiling and ``max_registers`` caps the registers per thread (ptxas may spill).
    The update pass's layout options, each defaulting to the mode's entry in ``UPDATE_LAYOUT``:
    ``cols_first`` (the grid sweeps a row tile's column tiles first), ``streaming`` (W's load and
    store carry streaming cache hints), ``load_first`` (W's tile is loaded before the factors).
    The bits of W depend on none of these options.
    ``pipelined`` picks the update pass's kernel: ``plora.kernels_gluon``'s software-pipelined one
    (True), the triton ``update_tile`` (False), or the former wherever ``pipelined_available`` and no
    triton-only option (``tile``, ``max_registers``, the layout options) is given (None). It is
    used for update passes without statistics (the statistics of a sampled pass come from the
    triton statistics pass); W gets the same bits either way. ``row_tiles`` (benchmark) sets its row
    tiles per program.
    ``gate``: a uint8 (1,) tensor on the device; 0 there makes the update pass store nothing (W and
    the residual stay as they are; it still loads and computes, and the statistics are garbage), so
    a caller can decide on the device, after launching, whether the update happens (``UnloadPlan``'s
    finiteness check without a host sync).
    ``passes``: "both" (the default), or only the sampled statistics pass ("stats"; nothing to launch
    when the statistics are summed in the update pass) or only the update pass ("update", after a
    "stats" launch), so that a caller can run the statistics earlier (``UnloadPlan.sample_stats_``).
    """
    if passes not in ("both", "stats", "update"):
        raise ValueError(f"passes must be 'both', 'stats' or 'update', got {passes!r}")
    M, N, K = shape
    G = ptrs.shape[1]
    block_m, block_n = _block_sizes(N)
    num_warps = 4
    if tile is not None:
        block_m, block_n, num_warps = tile
    tiles_m, tiles_n = _cdiv(M, block_m), _cdiv(N, block_n)
    step = stats_step(M, N, sample_rows, block_m)
    args = (ptrs, alphas, keys if keys is not None else ptrs, stats, G, M, N, K, N, *factor_strides)
    options = dict(MODE=_MODE_ID[mode], HAS_RES=has_res, FACTOR_DTYPE=_TL_DTYPE[factor_dtype],
                   BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=16 if K <= 16 else 32, num_warps=num_warps,
                   **({"maxnreg": max_registers} if max_registers else {}))
    sampled = has_stats and step > 1
    if sampled and passes != "update":
        # The statistics of the sampled row tiles first, from W as it is (the same tile code, no
        # stores), then the update without statistics: their reductions and atomics in every
        # program took the kernel from 80% of copy bandwidth to 54% on an H200 (bench_unload).
        unload_tile_grouped[(_cdiv(tiles_m, step), tiles_n, G)](*args, step, HAS_STATS=True, STORE=False, **options)
    if passes == "stats":
        return
    triton_only = tile is not None or max_registers is not None or any(
        v is not None for v in (cols_first, streaming, load_first))
    stats_in_update = has_stats and not sampled
    if pipelined is None:
        pipelined = not triton_only and pipelined_available(ptrs.device, N, K)
    elif pipelined and triton_only:
        raise ValueError("tile, max_registers and the layout options are the triton kernel's: not with pipelined=True")
    elif pipelined and not stats_in_update and not pipelined_available(ptrs.device, N, K):
        raise ValueError(f"the pipelined kernel cannot update this group ({M}x{N}, rank {K}) here")
    if pipelined and not stats_in_update:
        _gluon.update_(ptrs, alphas, keys, shape, factor_strides, _TL_DTYPE[factor_dtype], _MODE_ID[mode], has_res,
                       block_k=options["BLOCK_K"], row_tiles=row_tiles, gate=gate)
    else:
        layout = dict(UPDATE_LAYOUT[mode])
        layout.update({k: v for k, v in (("cols_first", cols_first), ("streaming", streaming),
                                         ("load_first", load_first)) if v is not None})
        update_options = dict(options, COLS_FIRST=layout["cols_first"], STREAM=layout["streaming"],
                              LOAD_FIRST=layout["load_first"])
        grid = (tiles_n, tiles_m, G) if layout["cols_first"] else (tiles_m, tiles_n, G)
        unload_tile_grouped[grid](*args, 1, HAS_STATS=stats_in_update, STORE=True, **update_options,
                                  GATE=gate if gate is not None else ptrs, GATED=gate is not None)


NORM_TABLE_ROWS = 10  # L, R (data pointers), M, N, K, L's two strides, R's two strides, stats row


@dataclass(frozen=True)
class NormTable:
    """The layers whose update norms one ``update_norms_`` launch computes: any shapes, ranks and
    strides, one factor dtype, one device (``norm_table`` builds it)."""

    table: torch.Tensor  # int64 (NORM_TABLE_ROWS, G)
    alphas: torch.Tensor  # fp32 (G,)
    factor_dtype: torch.dtype
    kpad: int  # the largest rank, padded to the Gram blocks' 16
    longest: int  # the most rows of an L or columns of an R


def norm_table(factors: list[tuple[torch.Tensor, torch.Tensor]], alphas: list[float], rows: list[int]) -> NormTable:
    """A ``NormTable`` of layers with update ``alphas[g] * L_g @ R_g`` (``factors[g] = (L_g, R_g)``:
    L (M, r), R (r, N), any strides, one dtype of ``FACTOR_DTYPES``, one device), whose norms go to
    row ``rows[g]`` of a stats table."""
    if not factors:
        raise ValueError("norm_table needs at least one layer")
    dtype, device = factors[0][0].dtype, factors[0][0].device
    if any(t.dtype != dtype or t.device != device for pair in factors for t in pair) or dtype not in FACTOR_DTYPES:
        raise ValueError(f"norm_table: factors of one dtype of {FACTOR_DTYPES} on one device")
    columns = [[L.data_ptr(), R.data_ptr(), L.shape[0], R.shape[1], L.shape[1], *L.stride(), *R.stride(), row]
               for (L, R), row in zip(factors, rows)]
    rank = max(L.shape[1] for L, _ in factors)
    return NormTable(
        table=torch.tensor(columns, dtype=torch.int64).T.contiguous().to(device),
        alphas=torch.tensor(alphas, dtype=torch.float32, device=device),
        factor_dtype=dtype, kpad=_cdiv(rank, 16) * 16,
        longest=max(max(L.shape[0], R.shape[1]) for L, R in factors))


def update_norms_(norms: NormTable, stats: torch.Tensor, *, gate: torch.Tensor | None = None,
                  slices: int | None = None, programs: int = 8192, chunk: int = 16, warps: int = 1,
                  precision: str = "tf32x3", stages: int = 1, zero_sums: bool = True) -> None:
    """``stats[row_g] = [||alpha_g * L_g @ R_g||_F^2, 0, 0]`` for every layer of ``norms``: two launches.

    Exact while the update's other statistics are sampled, from the factors alone:
    ``alpha^2 sum((L^T L) * (R R^T))``. The Gram matrices are summed in 16 x 16 blocks over chunks
    of ``chunk`` rows (of L) and columns (of R) by ``slices`` programs per layer, about ``programs``
    in all (one program per layer, running through its factors serially, took about 1 ms for a 7B
    model on an H200); then one program per layer multiplies them out. One launch pair covers
    layers of every shape, so the unload's finiteness check, which waits for it, costs a few
    launches per device, not a few per weight shape. The zeros start the sums that
    ``grouped_update_``'s statistics add to, so the stats table needs no clearing of its own;
    ``zero_sums=False`` writes the norms alone, so that statistics passes can add to a zeroed
    table at the same time (``UnloadPlan.launch_ahead_``).
    ``gate`` (uint8 (1,), on the device) is set to 0 if any of these norms is not finite, else left
    as it is: the caller sets it to 1 before the norms of its layers (``UnloadPlan``'s device check).

    The products run on the tensor cores in three tf32 passes (``tf32x3``: about fp32's accuracy;
    a NaN or Inf still makes the norm non-finite), 16 rows per step, one warp, no software
    pipelining (which took the kernel to 255 registers and spills for sm_90). The kernel is bound
    by the latency of its loads, so what counts is how many programs wait on memory at once: one
    warp and 16 rows per step take 89 registers per thread, 21 programs per SM, against 115
    registers and 8 programs with 2 warps and 32 rows (``benchmarks/kernel_resources.py``, triton
    3.6; 71 and 28 against 128 and 8 with triton 3.9). On an
    H200 this took the 1B shape's norms from 58-60 to 43-44 µs (replayed as a graph; 70-75 against
    86-91 µs beside the sampled statistics, as an unload runs them). Before, fp32 products on the
    CUDA cores (16 rows per step, 4 warps, pipelined) had taken 0.45 ms on a 7B shape, 32 rows and
    2 warps on the tensor cores 0.21 ms (``bench_unload.py --norm-variants``,
    docs/results/performance.md).
    ``slices`` is for tests; ``programs``, ``chunk``, ``warps``, ``precision`` (tl.dot's
    ``input_precision``: "tf32x3", or "ieee" on the CUDA cores) and ``stages`` (triton's software
    pipelining of the loads; 1 = none) for the benchmark.
    """
    G = norms.table.shape[1]
    block = 16
    slices = slices or max(1, min(_cdiv(norms.longest, chunk), _cdiv(programs, G)))
    grams = torch.zeros(G, 2, norms.kpad, norms.kpad, dtype=torch.float32, device=stats.device)
    factor_grams[(G, slices)](norms.table, grams, FACTOR_DTYPE=_TL_DTYPE[norms.factor_dtype], BLOCK_K=block,
                              CHUNK=chunk, KPAD=norms.kpad, PRECISION=precision, num_warps=warps,
                              num_stages=stages)
    gram_norms[(G,)](grams, norms.table, norms.alphas, stats, KPAD=norms.kpad, BLOCK=1024, num_warps=4,
                     GATE=gate if gate is not None else stats, GATED=gate is not None, ZERO_SUMS=zero_sums)


def kaiming_fill_(ptrs: torch.Tensor, keys: torch.Tensor | None, numel: int, bound: float, dtype: torch.dtype,
                  *, gate: torch.Tensor | None = None) -> None:
    """Fill G contiguous tensors of ``numel`` elements uniformly in (-bound, bound), one launch.

    ``ptrs`` and ``keys`` are int64 (G,) tables of data pointers and seeds on the tensors' device;
    ``dtype`` one of ``FACTOR_DTYPES``. Tensor g is a function of ``keys[g]`` only: the same seed
    gives the same values on every device and at every tiling. ``keys=None`` fills with +0 instead
    (B's re-init). ``gate``: as in ``grouped_update_``, 0 there leaves the tensors as they are.
    """
    block = 1024
    kaiming_fill[(_cdiv(numel, block), ptrs.shape[0])](
        ptrs, keys if keys is not None else ptrs, numel, float(bound), DTYPE=_TL_DTYPE[dtype], BLOCK=block,
        num_warps=4, GATE=gate if gate is not None else ptrs, GATED=gate is not None, ZERO=keys is None,
    )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
