"""The fused Triton unload (plora.kernels) against the torch reference of plora.unload, and the
grouped and re-init kernels against the per-layer one.

On a CUDA machine the checks run on the GPU, in this process. Without CUDA they run in triton's
CPU interpreter, in a subprocess with TRITON_INTERPRET=1 (see ``interpreter``). Everything skips
when triton is not installed.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

import interpreter

triton = pytest.importorskip("triton")

# (rows, cols, rank, factor dtype, transposed factors): odd shapes exercise the masks, rank 40 the
# loop over rank blocks, bf16 factors the half-precision dot, transposed ones arbitrary strides.
CASES = [
    (100, 200, 5, torch.float32, False),
    (64, 128, 16, torch.float32, True),
    (33, 70, 40, torch.float32, False),
    (48, 96, 8, torch.bfloat16, False),
]


def _inputs(m, n, r, fdtype, transposed, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g).bfloat16()
    if transposed:  # the layout PEFT gives fan_in_fan_out layers: L = A.T, R = B.T
        L = torch.randn(r, m, generator=g).T
        R = torch.randn(n, r, generator=g).T
    else:
        L = torch.randn(m, r, generator=g)
        R = torch.randn(r, n, generator=g)
    L, R = (L * 0.05).to(fdtype), (R * 0.05).to(fdtype)
    return W.to(device), L.to(device), R.to(device)


def _reference(W, L, R, alpha, mode, residual=None):
    """plora.unload's own torch path on copies of the inputs."""
    from plora.unload import _update_rows

    W, residual = W.clone(), None if residual is None else residual.clone()
    Lf, Rf = L.float(), R.float()
    _update_rows(W, residual, lambda sel: (Lf[sel] @ Rf).mul_(alpha), slice(None), mode, None)
    return W, residual


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |x| (normal range)."""
    exp = torch.floor(torch.log2(x.abs().clamp_min(2.0**-120)))
    return torch.exp2(exp - 7)


def _d_tolerance(L, R, alpha):
    """Bound on |kernel d - fp32 d| per element: the GPU's tf32 dot keeps 10 of 23 mantissa bits."""
    return (L.float().abs() @ R.float().abs()) * abs(alpha) * 2.0**-8


def _decided(target: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """Elements whose nearest bf16 cannot change when the target moves by up to ``tol``."""
    ref = target.bfloat16()
    bits = ref.view(torch.int16)
    away = (bits + 1).view(torch.bfloat16).float()  # the bf16 neighbours of ref (sign-magnitude)
    toward = (bits - 1).view(torch.bfloat16).float()
    r = ref.float()
    m1, m2 = (r + away) / 2, (r + toward) / 2  # the rounding boundaries around ref
    low, high = torch.minimum(m1, m2), torch.maximum(m1, m2)
    return (r != 0) & (target - low > tol) & (high - target > tol)


def check_direct(device):
    from plora.kernels import fused_update_

    for m, n, r, fdtype, tr in CASES:
        W, L, R = _inputs(m, n, r, fdtype, tr, device)
        ref, _ = _reference(W, L, R, 0.7, "direct")
        out = fused_update_(W.clone(), L, R, 0.7, "direct")
        target = W.float() + (L.float() @ R.float()) * 0.7
        tol = _d_tolerance(L, R, 0.7)
        # the same rounding (RTNE) as the torch path wherever the tf32 error of the kernel's d
        # cannot carry the sum across a rounding boundary; within one unit everywhere
        decided = _decided(target, tol)
        assert decided.float().mean().item() > 0.5
        assert torch.equal(out[decided], ref[decided]), (m, n, r)
        assert ((out.float() - target).abs() <= _ulp(target) + tol).all()


def check_compensated(device):
    from plora.kernels import fused_update_

    for m, n, r, fdtype, tr in CASES:
        W, L, R = _inputs(m, n, r, fdtype, tr, device)
        res0 = (torch.randn(m, n, generator=torch.Generator().manual_seed(1)) * 1e-3).bfloat16().to(device)
        ref_w, ref_r = _reference(W, L, R, 0.7, "compensated", res0)
        out_w, out_r = W.clone(), res0.clone()
        fused_update_(out_w, L, R, 0.7, "compensated", out_r)
        d = (L.float() @ R.float()) * 0.7
        target = W.float() + d + res0.float()
        tol = _d_tolerance(L, R, 0.7)
        decided = _decided(target, tol)
        assert torch.equal(out_w[decided], ref_w[decided]), (m, n, r)
        state = out_w.float() + out_r.float()
        # W + residual holds the target up to the residual's own bf16 rounding, the fp32 rounding
        # of the sum's terms (which dominates where they cancel) and the tf32 error of d
        fp32_terms = (W.float().abs() + d.abs() + res0.float().abs()) * 2.0**-21
        assert ((state - target).abs() <= _ulp(target) * 2.0**-8 + fp32_terms + tol).all()
        # without a residual buffer: plain rounding, as in the torch path
        out = fused_update_(W.clone(), L, R, 0.7, "compensated", None)
        ref, _ = _reference(W, L, R, 0.7, "compensated", None)
        decided = _decided(W.float() + d, tol)
        assert torch.equal(out[decided], ref[decided])

    # many updates each far below half a unit in the last place: compensated keeps them all
    # (2^-13 is exact in tf32, so the kernel's d equals the torch path's bit for bit)
    m, n = 32, 64
    W = torch.ones(m, n, dtype=torch.bfloat16, device=device)
    L = torch.full((m, 1), 2.0**-13, device=device)
    R = torch.ones(1, n, device=device)
    res = torch.zeros_like(W)
    lost, ref_w, ref_r = W.clone(), W.clone(), res.clone()
    for _ in range(50):
        fused_update_(W, L, R, 1.0, "compensated", res)
        fused_update_(lost, L, R, 1.0, "direct")
        ref_w, ref_r = _reference(ref_w, L, R, 1.0, "compensated", ref_r)
    assert torch.equal(lost, torch.ones_like(lost))  # direct drops every one of them
    assert torch.equal(W, ref_w) and torch.equal(res, ref_r)  # bit for bit the torch path
    total = (W.float() + res.float()).mean().item()
    assert abs(total - (1 + 50 * 2.0**-13)) < 5e-4, total  # within the bf16 residual's own rounding, step after step


def check_stochastic(device):
    from plora.kernels import fused_update_

    for m, n, r, fdtype, tr in CASES:
        W, L, R = _inputs(m, n, r, fdtype, tr, device)
        target = W.float() + (L.float() @ R.float()) * 0.7
        out = fused_update_(W.clone(), L, R, 0.7, "stochastic", seed=123)
        # one of the two bf16 neighbours of the target (give or take the tf32 error of d)
        lo = target.bfloat16().float()
        assert ((out.float() - target).abs() < _ulp(lo) * 1.001 + _d_tolerance(L, R, 0.7)).all(), (m, n, r)
        # unbiased: on average the rounding error is zero (its spread is ~0.3 ulp per element)
        assert abs(((out.float() - target) / _ulp(lo)).mean().item()) < 0.03, (m, n, r)
        assert torch.equal(out, fused_update_(W.clone(), L, R, 0.7, "stochastic", seed=123))
        assert not torch.equal(out, fused_update_(W.clone(), L, R, 0.7, "stochastic", seed=124))

    # unbiased: 0.3 of a unit above 1.0 rounds up 30% of the time, as the torch reference does
    m, n = 64, 128
    W = torch.ones(m, n, dtype=torch.bfloat16, device=device)
    L = torch.full((m, 1), 0.3 * 2.0**-7, device=device)
    R = torch.ones(1, n, device=device)
    up = (fused_update_(W.clone(), L, R, 1.0, "stochastic", seed=(1 << 62) + 5).float() > 1.0).float().mean()
    ref, _ = _reference(W, L, R, 1.0, "stochastic")
    ref_up = (ref.float() > 1.0).float().mean()
    assert abs(up.item() - 0.3) < 0.03, up
    assert abs(ref_up.item() - 0.3) < 0.03, ref_up

    # the rounding decisions are independent: of neighbours in a row, in a column, and of two seeds
    # (8,192 pairs each: a correlation's standard error is about 0.011)
    half = torch.full((m, 1), 0.5 * 2.0**-7, device=device)
    ups = [(fused_update_(W.clone(), half, R, 1.0, "stochastic", seed=s).float() > 1.0).float() for s in (7, 8)]
    for a, b in ((ups[0][:, 1:], ups[0][:, :-1]), (ups[0][1:], ups[0][:-1]), (ups[0], ups[1])):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.05


def check_stats(device):
    """The in-kernel statistics: sum(landed * d) and sum(d * d) over every element."""
    from plora.kernels import fused_update_

    for mode in ("direct", "compensated", "stochastic"):
        for m, n, r, fdtype, tr in CASES:
            W, L, R = _inputs(m, n, r, fdtype, tr, device)
            res = torch.zeros_like(W) if mode == "compensated" else None
            stats = torch.zeros(2, dtype=torch.float32, device=device)
            W0 = W.clone()
            fused_update_(W, L, R, 0.7, mode, res, seed=5, stats=stats)
            d = (L.float() @ R.float()) * 0.7
            landed = W.float() - W0.float() + (res.float() if res is not None else 0)
            want = torch.stack([(landed * d).sum(), (d * d).sum()])
            assert torch.allclose(stats, want, rtol=2e-3, atol=1e-6), (mode, m, n, stats, want)


# (rows, cols, rank, factor dtype, transposed factors, layers): groups of several layers of one
# shape, odd shapes with bf16 factors, and the transposed strides of fan_in_fan_out layers
GROUPS = [
    (64, 96, 8, torch.float32, False, 3),
    (33, 70, 5, torch.bfloat16, False, 2),
    (48, 128, 16, torch.float32, True, 3),
    (40, 64, 40, torch.float32, False, 2),  # a rank over 32: the products and Gram matrices in blocks
]


def _group_tables(layers, residuals, device):
    """The int64 (4, G) pointer table of plora.unload_plan: W, residual (W without one), L, R."""
    rows = [[W.data_ptr() for W, _, _ in layers],
            [(r if r is not None else W).data_ptr() for (W, _, _), r in zip(layers, residuals)],
            [L.data_ptr() for _, L, _ in layers],
            [R.data_ptr() for _, _, R in layers]]
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _run_grouped(layers, res0, alphas, seeds, fdtype, mode, device, split=False, **options):
    """One ``grouped_update_`` call on fresh copies of the layers (``split``: its statistics pass and
    its update pass as two calls, ``passes="stats"`` then ``"update"``): (weights, residuals, stats)."""
    from plora.kernels import grouped_update_

    got_w = [W.clone() for W, _, _ in layers]
    got_r = [None if res is None else res.clone() for res in res0]
    stats = torch.zeros(len(layers), 3, dtype=torch.float32, device=device)
    (m, n), (L, R) = got_w[0].shape, layers[0][1:]
    tables = (_group_tables([(W, L_, R_) for W, (_, L_, R_) in zip(got_w, layers)], got_r, device),
              torch.tensor(alphas, dtype=torch.float32, device=device),
              torch.tensor(seeds, dtype=torch.int64, device=device), stats,
              (m, n, L.shape[1]), L.stride() + R.stride(), fdtype, mode, mode == "compensated")
    for passes in ("stats", "update") if split else ("both",):
        grouped_update_(*tables, passes=passes, **options)
    return got_w, got_r, stats


def check_grouped_update(device):
    """One grouped launch gives every layer the bits the per-layer kernel gives it, and its stats."""
    from plora.kernels import MODES, fused_update_

    for mode in MODES:
        for m, n, r, fdtype, tr, count in GROUPS:
            layers = [_inputs(m, n, r, fdtype, tr, device, seed=i) for i in range(count)]
            alphas = [0.7, -1.3, 0.25][:count]  # one scaling per layer
            seeds = [(1 << 62) + 12345 * i + 7 for i in range(count)]  # both 31-bit halves of the key matter
            res0 = [(torch.randn(m, n, generator=torch.Generator().manual_seed(10 + i)) * 1e-3).bfloat16().to(device)
                    if mode == "compensated" else None for i in range(count)]
            want = []
            for (W, L, R), alpha, seed, res in zip(layers, alphas, seeds, res0):
                W, res = W.clone(), None if res is None else res.clone()
                stats = torch.zeros(2, dtype=torch.float32, device=device)
                fused_update_(W, L, R, alpha, mode, res, seed=seed, stats=stats)
                want.append((W, res, stats))
            case = (layers, res0, alphas, seeds, fdtype, mode, device)
            got_w, got_r, stats = _run_grouped(*case)
            for i, (W, res, st) in enumerate(want):
                assert torch.equal(got_w[i], W), (mode, m, n, i)
                if res is not None:
                    assert torch.equal(got_r[i], res), (mode, m, n, i)
                # fp32 atomics: the order of the tile sums may differ on a GPU
                assert torch.allclose(stats[i, 1:], st, rtol=1e-4, atol=1e-7), (mode, m, n, i, stats[i], st)
            assert not stats[:, 0].any()  # the norm column is update_norms_'s
            # statistics on a sample of rows (whole tiles of rows, evenly spaced)
            got_w, got_r, stats = _run_grouped(*case, sample_rows=1, tile=(16, 32, 2))
            sampled = torch.zeros(m, dtype=torch.bool)
            sampled[:16] = True  # one row wanted: one tile of rows, the first
            for i, ((W0, L_, R_), (W, res, _)) in enumerate(zip(layers, want)):
                assert torch.equal(got_w[i], W), (mode, m, n, i, "sampled")
                d = (L_.float() @ R_.float()).cpu() * alphas[i]
                landed = got_w[i].float().cpu() - W0.float().cpu()
                if res is not None:
                    landed += got_r[i].float().cpu() - res0[i].float().cpu()
                want_s = torch.stack([(landed * d)[sampled].sum(), (d * d)[sampled].sum()])
                assert torch.allclose(stats[i, 1:].cpu(), want_s, rtol=2e-3, atol=1e-7), (mode, m, n, i, stats[i])
                assert stats[i, 2].item() < 0.9 * (d * d).sum().item()  # a sample, not every row
            # the same as the statistics pass and the update pass called apart (UnloadPlan.launch_ahead_,
            # sample_stats_)
            split_w, split_r, split_stats = _run_grouped(*case, sample_rows=1, tile=(16, 32, 2), split=True)
            assert all(torch.equal(a, b) for a, b in zip(split_w, got_w)), (mode, m, n)
            assert all(a is None or torch.equal(a, b) for a, b in zip(split_r, got_r)), (mode, m, n)
            assert torch.allclose(split_stats, stats, rtol=1e-5, atol=1e-7) and split_stats[:, 2].gt(0).all()
            # the benchmark's knobs: another tiling, no statistics, a register cap; the same bits, stats untouched;
            # and the update pass's layout options, also with the statistics summed in that pass
            knobs = [dict(has_stats=False, tile=(16, 32, 2), max_registers=128),
                     dict(has_stats=False, cols_first=True, streaming=True, load_first=True),
                     dict(sample_rows=0, tile=(16, 32, 2), cols_first=False, streaming=False, load_first=True),
                     dict(sample_rows=0, cols_first=True, load_first=False)]
            for options in knobs:
                got_w, got_r, stats = _run_grouped(*case, **options)
                for i, (W, res, st) in enumerate(want):
                    assert torch.equal(got_w[i], W), (mode, m, n, i, options)
                    if res is not None:
                        assert torch.equal(got_r[i], res), (mode, m, n, i, options)
                    if options.get("has_stats", True):
                        assert torch.allclose(stats[i, 1:], st, rtol=1e-4, atol=1e-7), (mode, m, n, i, options)
                if not options.get("has_stats", True):
                    assert not stats.any()


def check_update_norms(device):
    """The update's norm from the factors' Gram matrices, over several chunks, slices and rank blocks,
    for layers of different shapes, ranks and strides in one launch, each into its own stats row."""
    from plora.kernels import norm_table, update_norms_

    g = torch.Generator().manual_seed(3)
    # (rows, cols, rank, transposed): a rank over 16 and over 32 (Gram blocks), PEFT's transposed
    # strides, a layer longer than the others
    shapes = [(100, 70, 40, False), (37, 90, 5, True), (64, 300, 16, False), (8, 16, 1, True)]
    for fdtype in (torch.float32, torch.bfloat16):
        layers = []
        for m, n, r, tr in shapes:
            L = torch.randn(m, r, generator=g).to(fdtype)
            R = torch.randn(r, n, generator=g).to(fdtype)
            if tr:  # the strides of fan_in_fan_out layers
                L, R = L.T.contiguous().T, R.T.contiguous().T
            layers.append((L.to(device), R.to(device)))
        alphas = [0.5, -2.0, 1.25, 3.0]
        rows = [4, 0, 2, 5]  # stats rows in another order than the layers; rows 1 and 3 are not theirs
        norms = norm_table(layers, alphas, rows)
        assert norms.kpad == 48 and norms.longest == 300
        want = [((L.double() @ R.double()) * a).square().sum().item() for (L, R), a in zip(layers, alphas)]
        for slices in (3, 1, None):
            stats = torch.full((6, 3), -1.0, device=device)
            update_norms_(norms, stats, slices=slices)
            got = stats[rows, 0].double().cpu()
            assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-5), (fdtype, slices, got, want)
            assert (stats[rows, 1:] == 0).all()  # the start of the update pass's sums
            assert (stats[[1, 3]] == -1).all()  # other rows untouched
        # zero_sums=False: the norms alone, the sums (added to beside them) as they were
        stats = torch.full((6, 3), -1.0, device=device)
        update_norms_(norms, stats, zero_sums=False)
        assert torch.allclose(stats[rows, 0].double().cpu(), torch.tensor(want, dtype=torch.float64), rtol=1e-5)
        assert (stats[rows, 1:] == -1).all() and (stats[[1, 3]] == -1).all()
    with pytest.raises(ValueError, match="one dtype"):
        norm_table([(layers[0][0].float(), layers[0][1])], [1.0], [0])


def check_kaiming_fill(device):
    """The re-init kernel: kaiming-uniform values, a function of the seed alone."""
    from plora.kernels import kaiming_fill_

    def fill(tensors, keys):
        ptrs = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)
        kaiming_fill_(ptrs, torch.tensor(keys, dtype=torch.int64, device=device), tensors[0].numel(),
                      1 / math.sqrt(tensors[0].shape[1]), tensors[0].dtype)
        return tensors

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        keys = [11, 12, (1 << 62) + 3]
        a = fill([torch.empty(8, 300, dtype=dtype, device=device) for _ in keys], keys)
        b = fill([torch.empty(8, 300, dtype=dtype, device=device) for _ in keys], keys)
        assert all(torch.equal(x, y) for x, y in zip(a, b))  # same seed, same values
        assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])  # another seed, other values
        alone = fill([torch.empty(8, 300, dtype=dtype, device=device)], keys[1:2])[0]
        assert torch.equal(alone, a[1])  # a tensor's values do not depend on its group
        bound = 1 / math.sqrt(300)
        ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
        for x in a:
            assert (x.float().abs() <= bound * (1 + ulp)).all()  # rounded to dtype: half a unit at most
            assert torch.count_nonzero(x) == x.numel()

    # the distribution on a large tensor: uniform on (-bound, bound), mean 0, variance bound^2 / 3
    x = fill([torch.empty(64, 4096, device=device)], [2024])[0].double()
    bound = 1 / 64
    assert abs(x.mean().item()) < 4 * bound / math.sqrt(3 * x.numel())
    assert abs(x.var().item() / (bound**2 / 3) - 1) < 0.01
    assert x.max().item() > 0.999 * bound and x.min().item() < -0.999 * bound
    hist = torch.histc(x.float(), bins=8, min=-bound, max=bound) / x.numel()
    assert (hist - 1 / 8).abs().max().item() < 0.005


def check_gates(device):
    """A closed gate (0) makes the writing kernels write nothing: the grouped update (W and the
    residual, with and without its statistics), the kaiming fill and the zero fill; an open one
    (1) gives the ungated bits. The norms close an open gate on a non-finite norm, and never open one."""
    from plora.kernels import MODES, kaiming_fill_, norm_table, update_norms_

    def gate(value):
        return torch.full((1,), value, dtype=torch.uint8, device=device)

    for mode in MODES:
        for m, n, r, fdtype, tr, count in GROUPS[:3]:
            layers = [_inputs(m, n, r, fdtype, tr, device, seed=i) for i in range(count)]
            res0 = [torch.full((m, n), 1e-3, dtype=torch.bfloat16, device=device) if mode == "compensated" else None
                    for _ in range(count)]
            case = (layers, res0, [0.7, -1.3, 0.25][:count], [5, 6, 7][:count], fdtype, mode, device)
            for options in (dict(), dict(has_stats=False), dict(sample_rows=1)):
                got_w, got_r, _ = _run_grouped(*case, gate=gate(0), **options)
                assert all(torch.equal(W, W0) for W, (W0, _, _) in zip(got_w, layers)), (mode, m, options)
                assert all(r is None or torch.equal(r, r0) for r, r0 in zip(got_r, res0)), (mode, m, options)
                want_w, want_r, _ = _run_grouped(*case, **options)
                got_w, got_r, _ = _run_grouped(*case, gate=gate(1), **options)
                assert all(torch.equal(a, b) for a, b in zip(got_w, want_w)), (mode, m, options)
                assert all(a is None or torch.equal(a, b) for a, b in zip(got_r, want_r)), (mode, m, options)
                assert not all(torch.equal(W, W0) for W, (W0, _, _) in zip(got_w, layers))

    tensors = [torch.full((8, 300), 2.0, device=device) for _ in range(2)]
    ptrs = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)
    keys = torch.tensor([1, 2], dtype=torch.int64, device=device)
    for keys_ in (keys, None):  # kaiming, then zero
        kaiming_fill_(ptrs, keys_, 2400, 0.1, torch.float32, gate=gate(0))
        assert all((t == 2.0).all() for t in tensors)
    kaiming_fill_(ptrs, keys, 2400, 0.1, torch.float32, gate=gate(1))
    ungated = [torch.empty_like(t) for t in tensors]
    kaiming_fill_(torch.tensor([t.data_ptr() for t in ungated], dtype=torch.int64, device=device), keys, 2400, 0.1,
                  torch.float32)
    assert all(torch.equal(t, u) for t, u in zip(tensors, ungated))  # an open gate: the ungated values
    assert all((t.abs() <= 0.1).all() and t.count_nonzero() == t.numel() for t in tensors)
    kaiming_fill_(ptrs, None, 2400, 0.1, torch.float32, gate=gate(1))
    assert all(not t.any() and not t.signbit().any() for t in tensors)  # +0, as zero_() writes

    L, R = torch.randn(20, 4, device=device), torch.randn(4, 30, device=device)
    bad = R.clone()
    bad[1, 2] = float("nan")
    inf = L.clone()
    inf[3, 0] = -float("inf")
    # the non-finite cases above give NaN norms (an Inf in the factors, or overflows of both signs,
    # meet inf - inf somewhere); a rank-1 update of tf32-exact values overflows to +Inf alone, and the
    # gate must close on that too
    big = (torch.full((20, 1), 2.0**70, device=device), torch.ones(1, 30, device=device))
    for factors, start, want in [((L, R), 1, 1), ((L, R), 0, 0), ((L, bad), 1, 0), ((inf, R), 1, 0),
                                 ((L * 1e30, R * 1e30), 1, 0), (big, 1, 0)]:
        g, stats = gate(start), torch.zeros(1, 3, device=device)
        update_norms_(norm_table([factors], [1.0], [0]), stats, gate=g)
        assert g.item() == want, (start, want)
        if factors is big:
            assert stats[0, 0].item() == math.inf  # infinite, not NaN


CHECKS = [check_direct, check_compensated, check_stochastic, check_stats, check_grouped_update, check_update_norms,
          check_kaiming_fill, check_gates]


# --- on a GPU: in process -------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_kernel_on_cuda(check):
    check("cuda")


@cuda
@pytest.mark.parametrize("mode", ["compensated", "stochastic"])
def test_unload_dispatches_to_kernel_on_cuda(mode, monkeypatch):
    """unload_ on a bf16 CUDA model goes through the kernel, deterministically, keeping the update."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    import plora
    from plora import kernels

    layers_updated = []
    real = kernels.grouped_update_

    def counted(ptrs, *a, **k):  # every row sampled: no statistics pass of its own, only update passes
        assert k.get("passes") == "update"
        layers_updated.append(ptrs.shape[1])
        return real(ptrs, *a, **k)

    monkeypatch.setattr(kernels, "grouped_update_", counted)

    def build():
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32)).to("cuda", torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["0", "1"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        return model

    weights = []
    for _ in range(2):
        model = build()
        stats = plora.unload_(model, merge_precision=mode, seed=3, residuals={}, landed_sample_rows=0)
        assert stats.landed_share == pytest.approx(1.0, abs=0.05 if mode == "stochastic" else 1e-3)
        weights.append([p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n])
    assert layers_updated == [1, 1, 1, 1]  # two shapes: one update launch per shape, two unloads
    assert all(torch.equal(a, b) for a, b in zip(*weights))  # same seed, same result


# (rows, cols, rank, factor dtype, transposed, layers): rows and columns off the 32 x 128 tile
# (columns a multiple of 16, as the kernel needs), ranks padded to 16 and 32, every factor dtype,
# PEFT's transposed strides
PIPELINED = [
    (100, 304, 16, torch.float32, False, 3),
    (64, 128, 8, torch.bfloat16, False, 2),
    (200, 384, 32, torch.float16, True, 2),
    (33, 144, 5, torch.float32, True, 3),
]


sm80 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                          reason="the pipelined kernel needs sm_80 or newer")


@cuda
@sm80
def test_pipelined_update_gives_the_triton_kernels_bits_on_cuda(monkeypatch):
    """The Gluon pipelined update pass writes every bit of W (and the residual) the per-layer triton
    kernel writes, for every mode, at any number of row tiles per program, with and without sampled
    statistics (which the triton statistics pass computes)."""
    from plora import kernels
    from plora.kernels import MODES, fused_update_, pipelined_available

    assert pipelined_available(torch.device("cuda"), 128, 32)
    pipelined_launches = []
    real_update = kernels._gluon.update_
    monkeypatch.setattr(kernels._gluon, "update_", lambda *a, **k: pipelined_launches.append(1) or real_update(*a, **k))
    for mode in MODES:
        for m, n, r, fdtype, tr, count in PIPELINED:
            layers = [_inputs(m, n, r, fdtype, tr, "cuda", seed=i) for i in range(count)]
            alphas = [0.7, -1.3, 0.25][:count]
            seeds = [(1 << 62) + 12345 * i + 7 for i in range(count)]
            res0 = [(torch.randn(m, n, generator=torch.Generator().manual_seed(10 + i)) * 1e-3).bfloat16().cuda()
                    if mode == "compensated" else None for i in range(count)]
            want = []
            for (W, L, R), alpha, seed, res in zip(layers, alphas, seeds, res0):
                W, res = W.clone(), None if res is None else res.clone()
                fused_update_(W, L, R, alpha, mode, res, seed=seed)
                want.append((W, res))
            case = (layers, res0, alphas, seeds, fdtype, mode, "cuda")
            for options in (dict(has_stats=False, pipelined=True), dict(has_stats=False, pipelined=True, row_tiles=1),
                            dict(has_stats=False, pipelined=True, row_tiles=2),
                            dict(sample_rows=32)):  # the default dispatch: statistics pass, then the pipelined update
                pipelined_launches.clear()
                got_w, got_r, stats = _run_grouped(*case, **options)
                assert pipelined_launches == [1], (mode, m, n, options)  # the Gluon kernel did the update
                for i, (W, res) in enumerate(want):
                    assert torch.equal(got_w[i], W), (mode, m, n, i, options)
                    if res is not None:
                        assert torch.equal(got_r[i], res), (mode, m, n, i, options)
                if "sample_rows" in options:
                    assert not stats[:, 0].any()  # the norm column is update_norms_'s
                    assert stats[:, 2].gt(0).all()  # the sampled sums came from the statistics pass


@cuda
@sm80
def test_pipelined_update_refuses_what_it_cannot_do_on_cuda():
    from plora.kernels import grouped_update_, pipelined_available

    assert pipelined_available(torch.device("cuda"), 256, 32)  # the refusals below are the shapes'

    layers = [_inputs(40, 256, 40, torch.float32, False, "cuda")]
    args = (_group_tables(layers, [None], "cuda"), torch.ones(1, device="cuda"), None,
            torch.zeros(1, 3, device="cuda"), (40, 256, 40), layers[0][1].stride() + layers[0][2].stride(),
            torch.float32, "direct", False)
    assert not pipelined_available(torch.device("cuda"), 256, 40)  # rank over 32
    assert not pipelined_available(torch.device("cuda"), 300, 16)  # rows not 16-byte aligned
    assert not pipelined_available(torch.device("cuda"), 96, 16)  # narrower than one tile
    with pytest.raises(ValueError, match="cannot update this group"):
        grouped_update_(*args, has_stats=False, pipelined=True)
    with pytest.raises(ValueError, match="triton kernel's"):
        grouped_update_(*args, has_stats=False, pipelined=True, tile=(32, 128, 4))


def test_stats_step_says_when_there_is_a_statistics_pass():
    from plora.kernels import stats_step

    assert stats_step(48, 48, 64) == 1  # 64 sampled rows of 48: every row, summed in the update pass
    assert stats_step(48, 48, 16) == 2  # two row tiles of 32, one sampled
    assert stats_step(2048, 2048, 64) == 32
    assert stats_step(2048, 2048, 0) == 1  # 0: every row
    assert stats_step(48, 48, 16, block_m=16) == 3  # the benchmark's tilings


def test_grouped_update_names_a_bad_passes_value():
    from plora.kernels import grouped_update_

    with pytest.raises(ValueError, match="passes must be 'both', 'stats' or 'update', got 'statistics'"):
        grouped_update_(None, None, None, None, (1, 1, 1), (1, 1, 1, 1), torch.float32, "direct", False,
                        passes="statistics")


# --- without a GPU: triton's interpreter, in a subprocess -----------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the kernel is tested on the GPU")
def test_kernel_in_interpreter():
    interpreter.run_script(__file__)


if __name__ == "__main__":
    sys.exit(interpreter.main(CHECKS))
