"""Registers per thread and spill bytes of plora.kernels_gluon.update_pipelined for sm_90, offline
(triton 3.6.0; no GPU needed), with and without the sampled statistics of the patch in this folder
(bf16 factors, rank 16, plora's tiling and stages; at a register cap, the spills that cap makes)."""
import sys

sys.path.insert(0, "benchmarks")
import triton.language as tl  # noqa: E402

import kernel_resources as KR  # noqa: E402

for name, mode in (("direct", 0), ("compensated", 1), ("stochastic", 2)):
    for stats, cap in ((False, None), (True, None), (True, 128 if mode == 1 else 80)):
        regs, stack = KR.registers(KR.compile_pipelined_sm90(mode, tl.bfloat16, stats=stats, max_registers=cap))
        print(f"{name:12s} statistics {'sampled' if stats else 'none   '} cap {cap or '-':>4}: "
              f"{regs} registers, {stack} B spilled")
