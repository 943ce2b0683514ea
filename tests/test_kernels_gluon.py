"""The pipelined Gluon kernel's host side, without a GPU: its register layout and its dispatch.

Its bits are checked against the triton kernel on a GPU (test_kernels.py); here, that the layout
it relabels the product into places every element of a tile exactly once, with each thread's
columns in 16-byte runs, and that the plan never routes CPU work to it.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")
kernels_gluon = pytest.importorskip("plora.kernels_gluon", reason="this triton has no gluon")


def _positions(layout):
    """(row, col) of every (register, lane, warp) of a linear layout: XOR of the bases of its set bits."""
    levels = [layout.reg_bases, layout.lane_bases, layout.warp_bases]
    out = {}
    for bits in itertools.product(*[range(1 << len(b)) for b in levels]):
        row = col = 0
        for index, bases in zip(bits, levels):
            for k, (r, c) in enumerate(bases):
                if index >> k & 1:
                    row ^= r
                    col ^= c
        out[bits] = (row, col)
    return out


@pytest.mark.parametrize("tile", [(kernels_gluon.BLOCK_M, kernels_gluon.BLOCK_N, kernels_gluon.WARPS),
                                  (16, 128, 4), (64, 256, 8), (32, 64, 2)])
def test_tile_layout_places_every_element_once_in_16_byte_runs(tile):
    bm, bn, warps = tile
    layout = kernels_gluon.tile_layout(bm, bn, warps)
    positions = _positions(layout)
    assert sorted(positions.values()) == [(r, c) for r in range(bm) for c in range(bn)]  # a bijection
    run = 2 * bn // (8 * warps)  # REPS * 2 columns per thread, consecutive registers
    assert run * 2 >= 16  # bf16: each run is at least one 16-byte load and store
    for (reg, lane, warp), (row, col) in positions.items():
        if reg % run:  # the registers of a run: same row, the next column
            assert positions[(reg - 1, lane, warp)] == (row, col - 1)


def test_tile_layout_refuses_a_tile_it_cannot_relabel():
    with pytest.raises(ValueError, match="no pipelined tile"):
        kernels_gluon.tile_layout(32, 16, 4)  # fewer columns than one mma column per warp
    with pytest.raises(ValueError, match="no pipelined tile"):
        kernels_gluon.tile_layout(24, 128, 4)


def test_the_pipelined_kernel_is_never_offered_off_cuda():
    from plora.kernels import pipelined_available

    assert not pipelined_available(torch.device("cpu"), 4096, 16)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_launch_arguments_bind_to_the_kernels_parameters(monkeypatch, gated):
    """``update_``'s launch binds every argument to the parameter it means (a positional one in a
    constexpr's slot fails only at launch, on a GPU)."""
    import inspect

    import triton.language as tl

    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, args, kwargs))

    real = kernels_gluon.update_pipelined
    monkeypatch.setattr(kernels_gluon, "update_pipelined", Recorder())
    ptrs, alphas, keys = torch.zeros(4, 3, dtype=torch.int64), torch.ones(3), torch.zeros(3, dtype=torch.int64)
    gate = torch.ones(1, dtype=torch.uint8) if gated else None
    strides = (16, 1, 256, 1)  # L's, then R's
    kernels_gluon.update_(ptrs, alphas, keys, (300, 256, 16), strides, tl.bfloat16, 2, False,
                          block_k=16, row_tiles=2, gate=gate)
    (grid, args, kwargs), = launched
    kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    bound = inspect.signature(real.fn).bind(*args, **kwargs).arguments
    assert bound["MODE"] == 2 and bound["KEYS"] is keys and bound["row_tiles"] == 2 and bound["K"] == 16
    assert bound["PTRS"] is ptrs and bound["ALPHAS"] is alphas and (bound["G"], bound["M"], bound["N"]) == (3, 300, 256)
    assert tuple(bound[k] for k in ("stride_lm", "stride_lk", "stride_rk", "stride_rn")) == strides
    assert bound["HAS_RES"] is False and bound["FACTOR_DTYPE"] == tl.bfloat16 and bound["BLOCK_K"] == 16
    assert bound["GATED"] is gated and bound["GATE"] is (gate if gated else ptrs)
    assert grid == (2, 3, 5)  # (column tiles, layers, chunks of row tiles)
