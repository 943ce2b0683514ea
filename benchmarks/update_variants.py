"""Update-pass kernels that ``bench_update_kernels.py`` times against plora's, kept to show where the
time goes (docs/results/performance.md): none of them is used by plora.

- ``inplace_add``: W += 1 with the update pass's tiles and grid, no factors: what this access pattern
  reaches on its own.
- ``one_tile``: plora's product and relabelled layout (``plora.kernels_gluon``), one tile per program,
  W loaded into registers: no layout conversion through shared memory at all.
- ``strip``: a column strip of row tiles per program, R's tile loaded once, the next tile of W loaded
  into registers one iteration ahead.
- ``cuda_core``: the product on the CUDA cores, one fma per rank-1 term, in W's own blocked layout.

All are Gluon or triton kernels over the grouped tables of ``plora.kernels.grouped_update_`` (W's
pointer first); ``cuda_core`` rounds its product differently, the others give plora's bits.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from plora.kernels_gluon import _permuted_columns, _product_tile, layer_tables, round_store


@triton.jit
def inplace_add(PTRS, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid (column tiles, row tiles, layers), as plora's direct update pass
    g = tl.program_id(2)
    W = tl.multiple_of(tl.load(PTRS + g).to(tl.pointer_type(tl.bfloat16)), 16)
    rows = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None] * N + cols[None, :]
    tl.store(W + offs, (tl.load(W + offs, mask=mask).to(tl.float32) + 1.0).to(tl.bfloat16), mask=mask)


@gluon.jit
def one_tile(PTRS, ALPHAS, KEYS, G, M, N, K, stride_lm, stride_lk, stride_rk, stride_rn,
             MODE: gl.constexpr, HAS_RES: gl.constexpr, FACTOR_DTYPE: gl.constexpr, BLOCK_M: gl.constexpr,
             BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, TILE_LAYOUT: gl.constexpr):
    # grid (column tiles, row tiles, layers)
    W, RES, L, R, alpha, kmix = layer_tables(PTRS, ALPHAS, KEYS, G, gl.program_id(2), FACTOR_DTYPE, MODE)
    row0 = gl.program_id(1) * BLOCK_M
    col0 = gl.program_id(0) * BLOCK_N
    b = _permuted_columns(R, col0, N, K, stride_rk, stride_rn, BLOCK_N, BLOCK_K, 1)
    d = _product_tile(L, b, alpha, row0, M, K, stride_lm, stride_lk, BLOCK_M, BLOCK_N, BLOCK_K, TILE_LAYOUT, 1)
    rows = (row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, TILE_LAYOUT))).to(gl.int64)
    cols = (col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, TILE_LAYOUT))).to(gl.int64)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None] * N + cols[None, :]
    w_old = gl.load(W + offs, mask=mask, other=0.0)
    r_old = w_old
    if MODE == 1 and HAS_RES:
        r_old = gl.load(RES + offs, mask=mask, other=0.0)
    round_store(W, RES, offs, mask, w_old.to(gl.float32) + d, r_old, kmix, MODE, HAS_RES)


@gluon.jit
def strip(PTRS, ALPHAS, KEYS, G, M, N, K, stride_lm, stride_lk, stride_rk, stride_rn, row_tiles,
          MODE: gl.constexpr, HAS_RES: gl.constexpr, FACTOR_DTYPE: gl.constexpr, BLOCK_M: gl.constexpr,
          BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, TILE_LAYOUT: gl.constexpr):
    # grid (column tiles, layers, chunks of row tiles), as plora.kernels_gluon.update_pipelined
    W, RES, L, R, alpha, kmix = layer_tables(PTRS, ALPHAS, KEYS, G, gl.program_id(1), FACTOR_DTYPE, MODE)
    first = gl.program_id(2) * row_tiles
    count = gl.minimum(row_tiles, (M + BLOCK_M - 1) // BLOCK_M - first)
    col0 = gl.program_id(0) * BLOCK_N
    b = _permuted_columns(R, col0, N, K, stride_rk, stride_rn, BLOCK_N, BLOCK_K, 1)
    tile_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, TILE_LAYOUT))
    cols = (col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, TILE_LAYOUT))).to(gl.int64)
    rows = (first * BLOCK_M + tile_rows).to(gl.int64)
    offs = rows[:, None] * N + cols[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    w_next = gl.load(W + offs, mask=mask, other=0.0)
    r_next = w_next
    if MODE == 1 and HAS_RES:
        r_next = gl.load(RES + offs, mask=mask, other=0.0)
    for it in range(count):
        w_old = w_next
        r_old = r_next
        cur_offs = offs
        cur_mask = mask
        row0 = (first + it) * BLOCK_M
        rows = (row0 + BLOCK_M + tile_rows).to(gl.int64)
        offs = rows[:, None] * N + cols[None, :]
        mask = (rows[:, None] < M) & (cols[None, :] < N) & (it + 1 < count)
        w_next = gl.load(W + offs, mask=mask, other=0.0)
        if MODE == 1 and HAS_RES:
            r_next = gl.load(RES + offs, mask=mask, other=0.0)
        d = _product_tile(L, b, alpha, row0, M, K, stride_lm, stride_lk, BLOCK_M, BLOCK_N, BLOCK_K, TILE_LAYOUT, 1)
        round_store(W, RES, cur_offs, cur_mask, w_old.to(gl.float32) + d, r_old, kmix, MODE, HAS_RES)


@gluon.jit
def cuda_core(PTRS, ALPHAS, KEYS, G, M, N, K, stride_lm, stride_lk, stride_rk, stride_rn,
              MODE: gl.constexpr, HAS_RES: gl.constexpr, FACTOR_DTYPE: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
    # grid (column tiles, row tiles, layers); 8 neighbouring columns per thread
    TPW_N: gl.constexpr = BLOCK_N // 8 if BLOCK_N // 8 < 32 else 32
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_N, TPW_N], [gl.num_warps(), 1], [1, 0])
    W, RES, L, R, alpha, kmix = layer_tables(PTRS, ALPHAS, KEYS, G, gl.program_id(2), FACTOR_DTYPE, MODE)
    rows = (gl.program_id(1) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))).to(gl.int64)
    cols = (gl.program_id(0) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))).to(gl.int64)
    row_ok = rows < M
    col_ok = cols < N
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout)
    for k in gl.static_range(BLOCK_K):
        lk = gl.load(L + rows * stride_lm + k * stride_lk, mask=row_ok & (k < K), other=0.0).to(gl.float32)
        rk = gl.load(R + k * stride_rk + cols * stride_rn, mask=col_ok & (k < K), other=0.0).to(gl.float32)
        lb, rb = gl.broadcast(lk[:, None], rk[None, :])
        acc = gl.fma(lb, rb, acc)
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * N + cols[None, :]
    w_old = gl.load(W + offs, mask=mask, other=0.0)
    r_old = w_old
    if MODE == 1 and HAS_RES:
        r_old = gl.load(RES + offs, mask=mask, other=0.0)
    round_store(W, RES, offs, mask, w_old.to(gl.float32) + acc * alpha, r_old, kmix, MODE, HAS_RES)
