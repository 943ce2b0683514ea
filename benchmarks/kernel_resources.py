"""Registers and shared memory of plora's update kernels for an H100/H200 (sm_90), compiled offline.

A memory-bound kernel needs many bytes in flight, so how many programs fit on one SM at a time
matters: an SM has 65,536 registers and 228 KiB of shared memory; a program of W warps using R
registers per thread takes 32 * W * R registers. This compiles each kernel configuration with
triton's own CUDA backend (no GPU needed), reads the register count from the cubin with the
``cuobjdump`` triton ships, and prints how many programs (and warps) fit per SM by registers and
by shared memory, and counts the block-wide barriers (``bar.sync``: layout conversions through
shared memory) in the PTX. The update kernels are compiled with the finiteness gate, as
``UnloadPlan`` launches them (the single-layer kernel has none). A second table does the same for
the update norms' Gram kernel (``factor_grams``) at plora's options and at ``--norm-variants``. It
explains, it does not time: speed comes from ``bench_unload.py`` on a GPU.

    python benchmarks/kernel_resources.py                 # grouped kernel per mode and tile, single-layer kernel,
                                                          # the pipelined Gluon kernel per mode, the norm kernel
    python benchmarks/kernel_resources.py --tiles 32x128x4,64x128x4
    python benchmarks/kernel_resources.py --norm-variants 4096:16:4:tf32x3:1,4096:32:2:ieee:1
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plora.kernels import _MODE_ID as MODES  # noqa: E402  (the kernels' MODE constant per mode)

SM90_REGISTERS = 65536
SM90_SHARED = 228 * 1024
SM90_MAX_WARPS = 64

# the kernels' signatures, for compiling them without launching
GROUPED = {"PTRS": "*i64", "ALPHAS": "*fp32", "KEYS": "*i64", "STATS": "*fp32", "G": "i32", "M": "i32", "N": "i32",
           "K": "i32", "stride_wm": "i32", "stride_lm": "i32", "stride_lk": "i32", "stride_rk": "i32",
           "stride_rn": "i32", "row_step": "i32", "GATE": "*u8", "MODE": "constexpr", "HAS_RES": "constexpr",
           "FACTOR_DTYPE": "constexpr", "HAS_STATS": "constexpr", "STORE": "constexpr", "BLOCK_M": "constexpr",
           "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
GROUPED_ALIGNED = ["PTRS", "ALPHAS", "KEYS", "STATS", "M", "N", "stride_wm", "stride_lm", "stride_rk"]
SINGLE = {"W": "*bf16", "RES": "*bf16", "L": "*fp32", "R": "*fp32", "STATS": "*fp32", "M": "i32", "N": "i32",
          "K": "i32", "stride_wm": "i32", "stride_lm": "i32", "stride_lk": "i32", "stride_rk": "i32",
          "stride_rn": "i32", "alpha": "fp32", "key_lo": "i32", "key_hi": "i32", "MODE": "constexpr",
          "HAS_RES": "constexpr", "HAS_STATS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
          "BLOCK_K": "constexpr"}
SINGLE_ALIGNED = ["W", "RES", "L", "R", "STATS", "M", "N", "stride_wm", "stride_lm", "stride_rk"]
# plora.kernels_gluon.update_pipelined's runtime arguments (its constexprs: kernels_gluon.constants)
PIPELINED = {"PTRS": "*i64", "ALPHAS": "*fp32", "KEYS": "*i64", "G": "i32", "M": "i32", "N": "i32", "K": "i32",
             "stride_lm": "i32", "stride_lk": "i32", "stride_rk": "i32", "stride_rn": "i32", "row_tiles": "i32",
             "GATE": "*u8"}
PIPELINED_ALIGNED = ["PTRS", "ALPHAS", "KEYS", "M", "N", "stride_lm", "stride_rk"]
NORM_SIGNATURE = {"TABLE": "*i64", "GRAMS": "*fp32"}  # plora.kernels.factor_grams' runtime arguments


def compile_sm90(fn, signature: dict, constants: dict, aligned: list, num_warps: int = 4,
                 max_registers: int | None = None, num_stages: int | None = None):
    """The compiled kernel for sm_90 (``.asm['ptx']``, ``.asm['cubin']``, ``.metadata``); raises
    RuntimeError when this triton has no CUDA backend."""
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        raise RuntimeError("this triton build has no CUDA backend")
    # constexpr options left out take the kernel's defaults (the probe knobs of grouped_update_)
    params = inspect.signature(fn.fn).parameters
    constants = {**{n: p.default for n, p in params.items() if n not in signature and n not in constants
                    and p.default is not inspect.Parameter.empty}, **constants}
    signature = {n: signature.get(n, "constexpr") for n in params if n in signature or n in constants}
    names = list(signature)
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    src = ASTSource(
        fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = {"num_warps": num_warps, **({"maxnreg": max_registers} if max_registers else {}),
                   **({"num_stages": num_stages} if num_stages else {})}
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_pipelined_sm90(mode: int, factor_dtype=None, block_k: int = 16):
    """``plora.kernels_gluon.update_pipelined`` for sm_90 with plora's own tiling and stages for
    ``mode``; ``factor_dtype`` a triton dtype (fp32 by default)."""
    import triton.language as tl

    from plora import kernels_gluon as kg

    constants = kg.constants(mode, mode == 1, factor_dtype or tl.float32, block_k)
    return compile_sm90(kg.update_pipelined, PIPELINED, constants, PIPELINED_ALIGNED, kg.WARPS)


def registers(kernel) -> tuple[int, int]:
    """Registers per thread and stack bytes (spills) of a compiled kernel, from its cubin
    (``cuobjdump --dump-resource-usage``)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    if not found:
        raise RuntimeError(f"no register count in cuobjdump's output: {out[-300:]}")
    return int(found.group(1)), int(found.group(2))


def occupancy(regs: int, shared: int, num_warps: int) -> dict:
    """Programs per SM allowed by registers and by shared memory (register allocation in units of
    8 per thread, as the hardware does), and the warps that makes."""
    per_program_regs = 32 * num_warps * (-(-regs // 8) * 8)
    by_regs = SM90_REGISTERS // per_program_regs
    by_shared = SM90_SHARED // max(shared, 1)
    by_warps = SM90_MAX_WARPS // num_warps
    programs = min(by_regs, by_shared, by_warps)
    return {"by_registers": by_regs, "by_shared": by_shared, "programs": programs, "warps": programs * num_warps}


def tiles_argument(text: str) -> list[tuple[int, int, int]]:
    """``--tiles`` of this script and of bench_unload.py: ``plora.kernels.parse_tiles`` for argparse."""
    from plora.kernels import parse_tiles

    try:
        return parse_tiles(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def norm_variants_argument(text: str) -> list[dict]:
    """``--norm-variants``: comma-separated PROGRAMS:CHUNK:WARPS:PRECISION:STAGES, options of
    ``kernels.update_norms_`` (PRECISION: ieee or tf32x3)."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        try:
            programs, chunk, warps, stages = (int(x) for x in parts[:3] + parts[4:])
            ok = (len(parts) == 5 and programs >= 1 and chunk >= 16 and chunk & (chunk - 1) == 0
                  and warps in (1, 2, 4, 8) and 1 <= stages <= 6)
        except ValueError:
            ok = False
        if not ok or parts[3] not in ("ieee", "tf32x3"):
            raise argparse.ArgumentTypeError(
                f"norm variant {item!r}: PROGRAMS:CHUNK:WARPS:PRECISION:STAGES, e.g. 8192:64:4:ieee:1 (CHUNK a "
                "power of two >= 16, WARPS 1, 2, 4 or 8, PRECISION ieee or tf32x3, STAGES 1-6)")
        out.append({"programs": programs, "chunk": chunk, "warps": warps, "precision": parts[3], "stages": stages})
    return out


def resource_cells(kernel, num_warps: int) -> tuple[str, dict]:
    """A compiled kernel's table cells (registers/thread, spill stack B, shared KiB, programs/SM by
    registers and by shared) and its ``occupancy``."""
    (regs, stack), shared = registers(kernel), kernel.metadata.shared
    occ = occupancy(regs, shared, num_warps)
    return (f"{regs} | {stack} | {shared / 1024:.0f} | {occ['programs']} ({occ['by_registers']}, "
            f"{occ['by_shared']})"), occ


def norm_rows(variants: list[dict]) -> list[str]:
    """Table rows of the norm kernel (``factor_grams``, fp32 factors, ranks up to 16) compiled with
    each variant's chunk, warps, precision and stages: plora's default (``update_norms_``) first."""
    import triton.language as tl

    from plora import kernels

    params = inspect.signature(kernels.update_norms_).parameters
    compiled = ("chunk", "warps", "precision", "stages")  # (programs is a launch choice)
    default = {k: params[k].default for k in compiled}
    rows = []
    for i, v in enumerate([default] + [v for v in variants if {k: v[k] for k in compiled} != default]):
        constants = {"FACTOR_DTYPE": tl.float32, "BLOCK_K": 16, "CHUNK": v["chunk"], "KPAD": 16,
                     "PRECISION": v["precision"]}
        k = compile_sm90(kernels.factor_grams, NORM_SIGNATURE, constants, ["TABLE", "GRAMS"], v["warps"],
                         num_stages=v["stages"])
        label = "factor_grams (plora's default)" if i == 0 else "factor_grams"
        rows.append(f"| {label} | {v['chunk']} | {v['warps']} | {v['precision']} | {v['stages']} | "
                    f"{resource_cells(k, v['warps'])[0]} |")
    return rows


def update_row(kind: str, mode: str, stats: bool, tile: str, warps: int, kernel) -> str:
    """One row of the update kernels' table, for a compiled kernel."""
    cells, occ = resource_cells(kernel, warps)
    return (f"| {kind} | {mode} | {'yes' if stats else 'no'} | {tile} | {warps} | {cells} | {occ['warps']} | "
            f"{kernel.asm['ptx'].count('bar.sync')} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=tiles_argument, default=tiles_argument("32x128x4,64x128x4,32x256x4"),
                    help="ROWSxCOLSxWARPS,... (the kernel's default tile is 32x128x4)")
    ap.add_argument("--max-registers", type=int, default=None, help="compile with maxnreg (ptxas may spill)")
    ap.add_argument("--load-first", action="store_true",
                    help="grouped kernel with W's tile loaded before the factors (its LOAD_FIRST option)")
    ap.add_argument("--norm-variants", type=norm_variants_argument, default=[],
                    help="also compile the norm kernel with these options, PROGRAMS:CHUNK:WARPS:PRECISION:STAGES,... "
                         "(PROGRAMS is a launch choice: ignored here)")
    args = ap.parse_args(argv)
    if not args.tiles:
        ap.error("--tiles: name at least one tile (the single-layer rows use the first)")
    try:
        import triton
        import triton.language as tl

        from plora import kernels
    except ImportError as exc:
        print(f"error: needs triton: {exc}", file=sys.stderr)
        return 2
    print(f"triton {triton.__version__}, compiled for sm_90 (65,536 registers, 228 KiB shared memory, "
          f"64 warps per SM)\n")
    if args.max_registers:
        print(f"registers capped at {args.max_registers} per thread (maxnreg)\n")
    if args.load_first:
        print("grouped kernel: W's tile loaded before the factors (LOAD_FIRST)\n")
    print("| kernel | mode | statistics | tile | warps | registers/thread | spill stack B | shared KiB | "
          "programs/SM (by registers, by shared) | warps/SM | bar.sync in PTX |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    rows = [("grouped", mode, stats, tile) for mode in MODES for stats in (True, False) for tile in args.tiles]
    rows += [("single-layer", mode, stats, args.tiles[0]) for mode in ("direct", "compensated") for stats in (True, False)]
    for kind, mode, stats, (bm, bn, warps) in rows:
        constants = {"MODE": MODES[mode], "HAS_RES": mode == "compensated", "HAS_STATS": stats,
                     "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 16}
        if kind == "grouped":
            constants.update(FACTOR_DTYPE=tl.float32, STORE=True, LOAD_FIRST=args.load_first, GATED=True)
            k = compile_sm90(kernels.unload_tile_grouped, GROUPED, constants, GROUPED_ALIGNED, warps,
                             args.max_registers)
        else:
            k = compile_sm90(kernels.unload_tile, SINGLE, constants, SINGLE_ALIGNED, warps, args.max_registers)
        print(update_row(kind, mode, stats, f"{bm}x{bn}", warps, k))
    try:
        from plora import kernels_gluon as kg
    except ImportError:
        pass  # no gluon: no pipelined kernel
    else:  # plora's pipelined update pass (no statistics)
        for mode, mode_id in MODES.items():
            print(update_row("pipelined (Gluon)", mode, False, f"{kg.BLOCK_M}x{kg.BLOCK_N}", kg.WARPS,
                             compile_pipelined_sm90(mode_id)))
    print("\n| kernel | rows per step | warps | precision | stages | registers/thread | spill stack B | shared KiB | "
          "programs/SM (by registers, by shared) |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for row in norm_rows(args.norm_variants):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
