"""Running kernel checks in triton's CPU interpreter, in a subprocess.

Triton reads TRITON_INTERPRET when a kernel is decorated, so setting it inside the test session
would change every kernel of the session: a test file instead runs itself as a script with the
variable set (``run_script``), and the script runs its checks on CPU tensors (``main``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SKIP = 77  # exit code of the script when the interpreter cannot run the kernels at all


def run_script(path: str | os.PathLike) -> None:
    """Run the test file ``path`` as a script under TRITON_INTERPRET=1; fail with its output, or skip."""
    path = Path(path).resolve()
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = path.parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(path.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == SKIP:
        pytest.skip(f"triton's interpreter cannot run the kernels here: {proc.stdout.strip()[-500:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def main(checks) -> int:
    """The script side: run every check on CPU tensors in triton's interpreter; the exit code."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        sys.exit("set TRITON_INTERPRET=1 to run the kernel checks on the CPU")
    try:
        import torch

        from plora.kernels import fused_update_

        fused_update_(torch.zeros(16, 16, dtype=torch.bfloat16), torch.zeros(16, 1), torch.zeros(1, 16), 1.0, "direct")
    except Exception as exc:  # no interpreter, or one too old for what the kernels use
        print(f"{type(exc).__name__}: {exc}")
        if _supported_triton():
            raise  # the interpreter should run them: a broken kernel must fail, not skip
        return SKIP
    for check in checks:
        check("cpu")
        print(f"{check.__name__}: ok")
    return 0


def _supported_triton() -> bool:
    """Whether a triton the project supports (>= 3.6, as pyproject asks) is installed."""
    try:
        import triton
    except ImportError:
        return False
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 6)
