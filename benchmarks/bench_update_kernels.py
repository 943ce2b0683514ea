"""Where the update pass's time goes: plora's update kernels against variants and ceilings, one run.

Every linear weight of a model shape (bf16, random: the cost does not depend on values; LoRA
factors r=16 in fp32, as PEFT keeps them) is updated in place by one pass per mode, timed without
statistics (median over repetitions after warm-up, synchronised wall time), and reported as a share
of the device-to-device copy bandwidth measured in the same run, counting the bytes that must move
(W read and written: 4 bytes per element; compensated also the residual: 8). Rows:

- ceilings: torch's copy (the reference) and in-place ``add_`` on every weight, and an in-place
  ``W += 1`` with the update pass's own tiles and grid (``update_variants.inplace_add``);
- plora's kernels: the pipelined Gluon kernel (``plora.kernels_gluon``; what ``grouped_update_`` runs
  where it can) at ``--row-tiles`` and ``--stages``, and the triton ``update_tile`` (``pipelined=False``);
- rejected variants (``update_variants``): one tile per program with no layout conversion, a column
  strip with W prefetched in registers, the product on the CUDA cores.

"same bits" compares W (and the residual) after one pass over two layers of each shape with what
plora's triton kernel writes; the CUDA-core product rounds differently and is not expected to match.

    python benchmarks/bench_update_kernels.py                      # Llama-2-7B shape, every mode
    python benchmarks/bench_update_kernels.py --model llama-3.2-1b --modes direct --row-tiles 4,8,16
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_unload import (  # noqa: E402
    BYTES_PER_ELEMENT, MODES, RANK, SHAPES, Block, Clock, _triton_version, copy_bandwidth)
from plora.kernels import _MODE_ID as MODE_ID  # noqa: E402  (the kernels' MODE constant per mode)


def int_list(text: str) -> list[int]:
    """``--row-tiles`` / ``--stages``: comma-separated positive integers, at least one."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def modes_list(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}; got {text!r}")
    return names


class Group:
    """The layers of one shape: weights, residuals, factors, and plora's pointer tables."""

    def __init__(self, m, n, count, device):
        self.m, self.n, self.count = m, n, count
        self.W = [torch.randn(m, n, device=device).to(torch.bfloat16) for _ in range(count)]
        self.res = [torch.empty(m, n, device=device, dtype=torch.bfloat16).normal_(0, 1e-3) for _ in range(count)]
        self.L = [torch.randn(m, RANK, device=device) * 1e-2 for _ in range(count)]
        self.R = [torch.randn(RANK, n, device=device) * 1e-2 for _ in range(count)]
        self.ptrs = torch.tensor([[t.data_ptr() for t in ts] for ts in (self.W, self.res, self.L, self.R)],
                                 dtype=torch.int64, device=device)
        self.alphas = torch.full((count,), 2.0, device=device)
        self.keys = torch.arange(count, device=device, dtype=torch.int64) * 7919 + 12345
        self.stats = torch.zeros(count, 3, device=device)

    def first(self, k):
        """The same group cut to its first ``k`` layers (shared tensors)."""
        sub = object.__new__(Group)
        sub.__dict__.update(self.__dict__)
        sub.count = min(k, self.count)
        sub.ptrs = self.ptrs[:, :sub.count].contiguous()
        sub.alphas, sub.keys, sub.stats = self.alphas[:sub.count], self.keys[:sub.count], self.stats[:sub.count]
        return sub


def model_groups(shape, device):
    """One ``Group`` per weight shape of ``bench_unload``'s decoder block, times its layer count."""
    hidden, intermediate, layers, kv = SHAPES[shape]
    counts = {}
    for linear in Block(hidden, intermediate, kv, "meta", torch.bfloat16).children():
        counts[tuple(linear.weight.shape)] = counts.get(tuple(linear.weight.shape), 0) + layers
    return [Group(m, n, c, device) for (m, n), c in counts.items()]


def plora_update(mode, **options):
    from plora import kernels

    def run(groups):
        for g in groups:
            kernels.grouped_update_(g.ptrs, g.alphas, g.keys, g.stats, (g.m, g.n, RANK), (RANK, 1, g.n, 1),
                                    torch.float32, mode, mode == "compensated", has_stats=False, **options)
    return run


def pipelined(mode, row_tiles, stages):
    import triton.language as tl

    from plora import kernels_gluon

    def run(groups):
        for g in groups:
            kernels_gluon.update_(g.ptrs, g.alphas, g.keys, (g.m, g.n, RANK), (RANK, 1, g.n, 1), tl.float32,
                                  MODE_ID[mode], mode == "compensated", block_k=16, row_tiles=row_tiles,
                                  stages=stages)
    return run


def variant(name, mode):
    import triton.language as tl
    import update_variants as uv

    from plora import kernels_gluon

    bm, bn, warps = kernels_gluon.BLOCK_M, kernels_gluon.BLOCK_N, kernels_gluon.WARPS
    consts = dict(MODE=MODE_ID[mode], HAS_RES=mode == "compensated", FACTOR_DTYPE=tl.float32,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=16, num_warps=warps)
    layout, rows = kernels_gluon.tile_layout(bm, bn, warps), kernels_gluon.MAX_ROW_TILES

    def run(groups):
        for g in groups:
            tm, tn = -(-g.m // bm), -(-g.n // bn)
            args = (g.ptrs, g.alphas, g.keys, g.count, g.m, g.n, RANK, RANK, 1, g.n, 1)
            if name == "one_tile":
                uv.one_tile[(tn, tm, g.count)](*args, TILE_LAYOUT=layout, **consts)
            elif name == "strip":
                uv.strip[(tn, g.count, -(-tm // rows))](*args, rows, TILE_LAYOUT=layout, **consts)
            else:
                uv.cuda_core[(tn, tm, g.count)](*args, **consts)
    return run


def inplace_add():
    import update_variants as uv

    from plora import kernels_gluon

    bm, bn, warps = kernels_gluon.BLOCK_M, kernels_gluon.BLOCK_N, kernels_gluon.WARPS

    def run(groups):
        for g in groups:
            uv.inplace_add[(-(-g.n // bn), -(-g.m // bm), g.count)](g.ptrs, g.m, g.n, BLOCK_M=bm, BLOCK_N=bn,
                                                                    num_warps=warps)
    return run


def same_bits(groups, fn, reference, mode):
    """Whether ``fn`` writes the bits ``reference`` writes, over the first two layers of each group."""
    subs = [g.first(2) for g in groups]
    saved = [[t.clone() for t in g.W[:g.count] + g.res[:g.count]] for g in subs]
    out = []
    for run in (reference, fn):
        for g, keep in zip(subs, saved):
            for t, s in zip(g.W[:g.count] + g.res[:g.count], keep):
                t.copy_(s)
        run(subs)
        torch.cuda.synchronize()
        out.append([t.clone() for g in subs for t in g.W[:g.count] + (g.res[:g.count] if mode == "compensated" else [])])
    return all(torch.equal(a, b) for a, b in zip(*out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-2-7b", choices=sorted(SHAPES), help="the linear shapes to update")
    p.add_argument("--modes", type=modes_list, default=list(MODES), help="comma-separated merge modes")
    p.add_argument("--row-tiles", type=int_list, default=[8, 16, 32],
                   help="row tiles per program of the pipelined kernel to time (its default adapts to the group)")
    p.add_argument("--stages", type=int_list, default=[3, 4, 6], help="pipeline depths of the pipelined kernel to time")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this benchmark times GPU kernels and needs CUDA", file=sys.stderr)
        return 2
    from plora import kernels

    if not kernels.pipelined_available(torch.device("cuda"), 128, RANK):
        print("error: the pipelined kernel is not available here (gluon, sm_80+)", file=sys.stderr)
        return 2
    clock = Clock("cuda")
    groups = model_groups(args.model, "cuda")
    elements = sum(g.m * g.n * g.count for g in groups)
    copy_bps, _, _ = copy_bandwidth(clock, "cuda", 1 << 29)
    rows = []

    def time_row(label, mode, fn, bits=None):
        seconds, _, _ = clock.measure(lambda: fn(groups), reps=args.reps, warmup=2)
        share = BYTES_PER_ELEMENT.get(mode, 4) * elements / seconds / copy_bps
        rows.append({"variant": label, "mode": mode, "ms": seconds * 1e3, "copy_share": share, "same_bits": bits})
        print(f"{label:62s} {mode:12s} {seconds * 1e3:8.2f} ms {share:6.1%}", file=sys.stderr, flush=True)

    buffers = [torch.empty(elements, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    time_row("ceiling: torch copy_ of as many elements", "-", lambda _: buffers[1].copy_(buffers[0]))
    buffers.clear()
    time_row("ceiling: torch add_(1) in place, every weight", "-", lambda gs: [w.add_(1) for g in gs for w in g.W])
    time_row("ceiling: in-place W += 1, the update's tiles and grid", "-", inplace_add())
    for mode in args.modes:
        triton_kernel, default = plora_update(mode, pipelined=False), plora_update(mode)
        time_row("plora default (grouped_update_)", mode, default, same_bits(groups, default, triton_kernel, mode))
        time_row("plora triton update_tile (pipelined=False)", mode, triton_kernel)  # the reference itself
        for rt in args.row_tiles:
            for st in args.stages:
                fn = pipelined(mode, rt, st)
                time_row(f"plora pipelined, {rt} row tiles, {st} stages", mode, fn, same_bits(groups, fn, triton_kernel, mode))
        for name, label in [("one_tile", "variant: one tile per program, no layout conversion"),
                            ("strip", "variant: column strip, W prefetched in registers"),
                            ("cuda_core", "variant: product on the CUDA cores")]:
            fn = variant(name, mode)
            time_row(label, mode, fn, None if name == "cuda_core" else same_bits(groups, fn, triton_kernel, mode))

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {_triton_version()}; "
          f"{args.model} linear shapes, {elements / 1e9:.2f} G elements, rank {RANK} fp32 factors; "
          f"copy bandwidth {copy_bps / 1e9:.0f} GB/s; median of {args.reps}\n")
    print("| kernel | mode | ms | share of copy bandwidth | same bits as the triton kernel |")
    print("| --- | --- | ---: | ---: | --- |")
    for r in rows:
        bits = {True: "yes", False: "NO", None: "-"}[r["same_bits"]]
        print(f"| {r['variant']} | {r['mode']} | {r['ms']:.2f} | {r['copy_share']:.1%} | {bits} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "copy_GBps": copy_bps / 1e9, "elements": elements,
                                         "command": shlex.join(["python", "benchmarks/bench_update_kernels.py"]
                                                           + list(argv if argv is not None else sys.argv[1:])),
                                         "rows": rows}, indent=2))
    return 0 if all(r["same_bits"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
