"""Where the spills of the capped kernel sit: plora.kernels_gluon.update_pipelined with the sampled
statistics of the patch in this folder, direct merging, bf16 factors, capped at 80 registers, for
sm_90 offline (triton 3.6.0); prints the SASS lines that spill (STL), fill (LDL), multiply (HMMA),
store W (STG) or branch (BRA), with their line numbers."""
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, "benchmarks")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import kernel_resources as KR  # noqa: E402

kernel = KR.compile_pipelined_sm90(0, tl.bfloat16, stats=True, max_registers=80)
tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
    f.write(kernel.asm["cubin"])
sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
lines = [line for line in sass.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", line)]
for i, line in enumerate(lines):
    if re.search(r"\b(STL|LDL|HMMA|STG|BRA)\b", line):
        print(i, line.split(";")[0].split("*/")[-1].strip())
