"""The grouped update pass as a software-pipelined Gluon kernel: the bits of ``kernels.update_tile``,
at 92-94.5% of copy bandwidth instead of 77-92% (H200, Llama-2-7B shape, without statistics;
``benchmarks/bench_update_kernels.py``, docs/results/performance.md).

What limited the one-tile-per-program triton kernel was not its layout conversions (the same
kernel without any ran slower) but, by all we measured, how few bytes of W each SM had in
flight: a program has at most one W tile in flight and holds it through its factor loads and
product, while an in-place ``W += 1`` with the same tiles and grid reaches copy bandwidth. Here one program updates a column
strip of up to ``MAX_ROW_TILES`` row tiles of one layer:

- W's row tiles (and the residual's) stream through a ring of ``STAGES`` tiles in shared memory by
  asynchronous copies (``cp.async``), ``STAGES - 1`` tiles ahead, holding no registers;
- R's tile is loaded once per strip, L's rows per tile, straight into the tensor-core operand
  layouts; the product is the same mma (m16n8k8, tf32, fp32 accumulation, k in the same order) as
  triton's ``tl.dot`` in ``update_tile``, so ``d`` and every rounded bit are the same;
- R's columns are fed to the mma permuted so that each thread's accumulator registers hold 8
  neighbouring columns of W (a reshape and permute relabel them; no data moves), so W is read and
  written in 16-byte pieces with no layout conversion, and each thread copies into shared memory
  exactly the elements it later reads.

Gluon (``triton.experimental.gluon``, triton >= 3.4) is triton's lower-level language: layouts are
chosen here, not by the compiler. It has no CPU interpreter and needs sm_80 or newer (``cp.async``,
mma v2); ``kernels.grouped_update_`` uses this kernel where it can (``pipelined_available``) and
``update_tile`` otherwise. The GPU tests check both give the same bits.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from plora import kernels as _kernels  # (plora.kernels imports this module after its own helpers)

if _kernels.triton is None:  # PLORA_DISABLE_TRITON, or a broken triton: no helpers to build on
    raise ImportError("plora.kernels_gluon needs plora.kernels' triton helpers, which are not available")

# global -> shared asynchronous copy: async_load from triton 3.7 on, async_copy_global_to_shared before
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

# measured on an H200 (bench_update_kernels.py): 32 x 128 tiles with 4 warps; a ring of 4 tiles, 3 for
# compensated merging (its two rings, W's and the residual's, then leave room for a fourth program per
# SM); up to 16 row tiles per program
BLOCK_M, BLOCK_N, WARPS = 32, 128, 4
STAGES = {0: 4, 1: 3, 2: 4}  # per mode id: direct, compensated, stochastic
MAX_ROW_TILES = 16  # fewer where that would leave SMs without two programs
MAX_RANK = 32  # one operand tile of R per program: larger ranks take the triton kernel


# the bit-exact helpers of the triton kernel, compiled as Gluon functions from the same source, so
# both kernels round and hash alike (gluon wraps triton's own standard functions the same way)
_rtne_bf16 = gluon.jit(_kernels.to_bf16_rtne.fn)
_fmix32 = gluon.jit(_kernels.fmix32.fn)


@gluon.jit
def _product_tile(L, b, alpha, row0, M, K, stride_lm, stride_lk, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_K: gl.constexpr, TILE_LAYOUT: gl.constexpr, K_WIDTH: gl.constexpr):
    # d = alpha * L[row0:row0+BLOCK_M, :] @ R[:, strip] in TILE_LAYOUT, b being R's strip as permuted_columns
    # fed it: the mma's column j = e + 2q + 8w + 8*WARPS*rep (e < 2, lane q < 4, warp w, repeat rep)
    # holds W's column e + 2*rep + 2*REPS*q + WN*w
    WARPS: gl.constexpr = gl.num_warps()
    REPS: gl.constexpr = BLOCK_N // (8 * WARPS)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=K_WIDTH)
    rows = (row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_layout))).to(gl.int64)
    ks = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, a_layout))
    a = gl.load(L + rows[:, None] * stride_lm + ks[None, :] * stride_lk,
                mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0).to(gl.float32)
    acc = mma_v2(a, b, gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma), input_precision="tf32")
    acc = gl.reshape(acc, [BLOCK_M, REPS, WARPS, 4, 2])  # column j -> (rep, w, q, e)
    acc = gl.permute(acc, [0, 2, 3, 1, 4])  # -> (w, q, rep, e): W's column order
    acc = gl.reshape(acc, [BLOCK_M, BLOCK_N])
    # a renaming of registers (each thread's 8 columns made consecutive), no data movement
    return gl.convert_layout(acc, TILE_LAYOUT) * alpha


@gluon.jit
def _permuted_columns(R, col0, N, K, stride_rk, stride_rn, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                      K_WIDTH: gl.constexpr):
    # R[:, col0:col0+BLOCK_N] in the mma's B-operand layout, column j of it being W's column
    # col0 + e + 2*rep + 2*REPS*q + WN*w for j = e + 2q + 8w + 8*WARPS*rep (see _product_tile)
    WARPS: gl.constexpr = gl.num_warps()
    WN: gl.constexpr = BLOCK_N // WARPS
    REPS: gl.constexpr = WN // 8
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8])
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=K_WIDTH)
    j = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, b_layout))
    perm = (j % 2) + 2 * (j // (8 * WARPS)) + 2 * REPS * ((j // 2) % 4) + WN * ((j // 8) % WARPS)
    cols = (col0 + perm).to(gl.int64)
    ks = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, b_layout))
    return gl.load(R + ks[:, None] * stride_rk + cols[None, :] * stride_rn,
                   mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0).to(gl.float32)


@gluon.jit
def layer_tables(PTRS, ALPHAS, KEYS, G, g, FACTOR_DTYPE: gl.constexpr, MODE: gl.constexpr):
    # layer g's pointers (W, residual, L, R), alpha and mixed stochastic-rounding key from the tables
    # of kernels.grouped_update_. Pointers read from memory carry no alignment; the plan only groups
    # 16-byte aligned tensors.
    W = gl.multiple_of(gl.load(PTRS + g).to(gl.pointer_type(gl.bfloat16)), 16)
    RES = gl.multiple_of(gl.load(PTRS + G + g).to(gl.pointer_type(gl.bfloat16)), 16)
    L = gl.multiple_of(gl.load(PTRS + 2 * G + g).to(gl.pointer_type(FACTOR_DTYPE)), 16)
    R = gl.multiple_of(gl.load(PTRS + 3 * G + g).to(gl.pointer_type(FACTOR_DTYPE)), 16)
    kmix = 0
    if MODE == 2:
        key = gl.load(KEYS + g)
        kmix = _fmix32((key & 0x7FFFFFFF).to(gl.uint32) ^ _fmix32(((key >> 32) & 0x7FFFFFFF).to(gl.uint32)))
    return W, RES, L, R, gl.load(ALPHAS + g), kmix


@gluon.jit
def update_pipelined(
    PTRS,  # int64 (4, G): data pointers of each layer's W, residual (W's when none), L, R
    ALPHAS,  # fp32 (G,)
    KEYS,  # int64 (G,): stochastic-rounding seeds (read in MODE 2 only)
    G, M, N, K,
    stride_lm, stride_lk, stride_rk, stride_rn,
    row_tiles,  # row tiles per program (the last program of a column strip takes what is left)
    MODE: gl.constexpr, HAS_RES: gl.constexpr, FACTOR_DTYPE: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    STAGES: gl.constexpr, TILE_LAYOUT: gl.constexpr,
    K_WIDTH: gl.constexpr,  # operand elements per thread along k: 2 for 16-bit factors, 1 for fp32 (as triton's dot)
    GATE,  # uint8 (1,): with GATED, 0 masks every store (the loads go on: the gate's load waits on nothing)
    GATED: gl.constexpr,
):
    # program (column tile, layer, chunk of row tiles); the arithmetic is kernels.update_tile's
    layout: gl.constexpr = TILE_LAYOUT
    ring_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    RESIDUAL: gl.constexpr = MODE == 1 and HAS_RES

    tile_n = gl.program_id(0)
    g = gl.program_id(1)
    first = gl.program_id(2) * row_tiles
    count = gl.minimum(row_tiles, (M + BLOCK_M - 1) // BLOCK_M - first)
    opened = count >= 0  # (always)
    if GATED:
        opened = gl.load(GATE) != 0
    W, RES, L, R, alpha, kmix = layer_tables(PTRS, ALPHAS, KEYS, G, g, FACTOR_DTYPE, MODE)
    col0 = tile_n * BLOCK_N

    tile_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    cols = (col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))).to(gl.int64)
    col_ok = cols < N
    w_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_N], ring_layout)
    r_ring = w_ring
    if RESIDUAL:
        r_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_N], ring_layout)
    for s in gl.static_range(STAGES - 1):  # the first STAGES - 1 tiles in flight
        rows = ((first + s) * BLOCK_M + tile_rows).to(gl.int64)
        offs = rows[:, None] * N + cols[None, :]
        mask = (rows[:, None] < M) & col_ok[None, :] & (s < count)
        _async_load(w_ring.index(s), W + offs, mask=mask)
        if RESIDUAL:
            _async_load(r_ring.index(s), RES + offs, mask=mask)
        async_copy.commit_group()
    b = _permuted_columns(R, col0, N, K, stride_rk, stride_rn, BLOCK_N, BLOCK_K, K_WIDTH)

    for it in range(count):
        ahead = it + STAGES - 1  # this tile's copy goes into the stage read STAGES - 1 tiles from now
        rows = ((first + ahead) * BLOCK_M + tile_rows).to(gl.int64)
        offs = rows[:, None] * N + cols[None, :]
        mask = (rows[:, None] < M) & col_ok[None, :] & (ahead < count)
        _async_load(w_ring.index(ahead % STAGES), W + offs, mask=mask)
        if RESIDUAL:
            _async_load(r_ring.index(ahead % STAGES), RES + offs, mask=mask)
        async_copy.commit_group()

        row0 = (first + it) * BLOCK_M
        rows = (row0 + tile_rows).to(gl.int64)
        offs = rows[:, None] * N + cols[None, :]
        mask = (rows[:, None] < M) & col_ok[None, :] & opened
        d = _product_tile(L, b, alpha, row0, M, K, stride_lm, stride_lk, BLOCK_M, BLOCK_N, BLOCK_K, TILE_LAYOUT, K_WIDTH)
        async_copy.wait_group(STAGES - 1)  # this tile's copy has landed
        t = w_ring.index(it % STAGES).load(layout).to(gl.float32) + d
        r_old = t  # (read only with a residual)
        if RESIDUAL:
            r_old = r_ring.index(it % STAGES).load(layout)
        round_store(W, RES, offs, mask, t, r_old, kmix, MODE, HAS_RES)
    async_copy.wait_group(0)


@gluon.jit
def round_store(W, RES, offs, mask, t, r_old, kmix, MODE: gl.constexpr, HAS_RES: gl.constexpr):
    # kernels.update_tile's rounding and stores: t = W's tile + d in fp32, r_old the residual's tile
    if MODE == 1:
        if HAS_RES:
            t = t + r_old.to(gl.float32)
            new = _rtne_bf16(t)
            gl.store(RES + offs, _rtne_bf16(t - new.to(gl.float32)), mask=mask)
        else:
            new = _rtne_bf16(t)
    elif MODE == 2:  # kernels.update_tile's single hash of the element's index in W
        noise = _fmix32(offs.to(gl.uint32) * 0x9E3779B9 + kmix) >> 16
        new = ((t.to(gl.uint32, bitcast=True) + noise) & 0xFFFF0000).to(gl.float32, bitcast=True).to(gl.bfloat16)
    else:
        new = _rtne_bf16(t)
    gl.store(W + offs, new, mask=mask)


@functools.cache
def tile_layout(block_m: int, block_n: int, num_warps: int) -> gl.DistributedLinearLayout:
    """The register layout of a tile after ``_product_tile``'s relabelling: the mma m16n8 accumulator
    with warps along the columns, each thread's 2 * REPS neighbouring columns (REPS = block_n /
    (8 * num_warps)) in consecutive registers, then rows 8 apart."""
    reps = block_n // (8 * num_warps)
    if reps < 1 or block_m % 16 or reps & (reps - 1) or num_warps & (num_warps - 1):
        raise ValueError(f"no pipelined tile {block_m}x{block_n} with {num_warps} warps")

    def bits(n):  # 1, 2, 4, ... below n (n a power of two)
        return [1 << i for i in range(n.bit_length() - 1)]

    reg = [[0, 1]] + [[0, 2 * r] for r in bits(reps)] + [[8 * m, 0] for m in bits(block_m // 8)]
    lane = [[0, 2 * reps], [0, 4 * reps], [1, 0], [2, 0], [4, 0]]
    warp = [[0, 8 * reps * w] for w in bits(num_warps)]
    return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lane, warp_bases=warp, block_bases=[],
                                      shape=[block_m, block_n])


@functools.cache
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def device_properties(device: torch.device):
    """``torch.cuda.get_device_properties`` of ``device``, read once per device (the unload asks at
    every launch)."""
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


def row_tiles_for(tiles_m: int, tiles_n: int, layers: int, device: torch.device) -> int:
    """Row tiles per program: the most (up to MAX_ROW_TILES, halving) that still gives every SM of the
    device two programs, so small layers do not leave SMs idle."""
    sms = device_properties(device).multi_processor_count
    rows = MAX_ROW_TILES
    while rows > 1 and tiles_n * layers * -(-tiles_m // rows) < 2 * sms:
        rows //= 2
    return rows


def constants(mode_id: int, has_res: bool, tl_factor_dtype, block_k: int, stages: int | None = None,
              gated: bool = True) -> dict:
    """``update_pipelined``'s compile-time arguments for a group (also what
    ``benchmarks/kernel_resources.py`` compiles offline; ``gated``, as ``UnloadPlan`` launches it)."""
    return dict(MODE=mode_id, HAS_RES=has_res, FACTOR_DTYPE=tl_factor_dtype, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                BLOCK_K=block_k, STAGES=stages or STAGES[mode_id], TILE_LAYOUT=tile_layout(BLOCK_M, BLOCK_N, WARPS),
                K_WIDTH=1 if tl_factor_dtype.primitive_bitwidth == 32 else 2, GATED=gated)


def update_(ptrs, alphas, keys, shape, factor_strides, tl_factor_dtype, mode_id: int, has_res: bool,
            *, block_k: int, row_tiles: int | None = None, stages: int | None = None,
            gate: torch.Tensor | None = None) -> None:
    """Launch ``update_pipelined`` over a group (the tables and gate of ``kernels.grouped_update_``)."""
    M, N, K = shape
    G = ptrs.shape[1]
    tiles_m, tiles_n = -(-M // BLOCK_M), -(-N // BLOCK_N)
    rows = row_tiles or row_tiles_for(tiles_m, tiles_n, G, ptrs.device)
    update_pipelined[(tiles_n, G, -(-tiles_m // rows))](
        ptrs, alphas, keys if keys is not None else ptrs, G, M, N, K, *factor_strides, rows,
        GATE=gate if gate is not None else ptrs,
        **constants(mode_id, has_res, tl_factor_dtype, block_k, stages, gated=gate is not None), num_warps=WARPS,
    )
