"""Repeated launches of triton (and gluon) kernels without triton's per-launch argument binding.

``kernel[grid](*args, **kwargs)`` binds and specialises every argument in Python at every launch
(which arguments are 16-byte aligned or divisible by 16, the integer widths, the cache key of the
compiled kernel) before it launches; that is tens of microseconds per launch, and an unload runs
a dozen launches, several of them in front of its first weight update. ``launch`` makes the first
launch of each specialisation that way, keeps the compiled kernel it returns, and launches it
directly afterwards (``CompiledKernel[grid](*all_arguments)``, what the JIT path itself ends in).

Its own key is a superset of triton's specialisation: the kernel, the current device, the launch
options and compile-time arguments, and per positional argument its type and, for tensors, dtype
and 16-byte alignment, for integers divisibility by 16, equality to 1 and width. So a launch
reuses a kernel only for arguments triton would have compiled the same kernel for. Anything it
does not recognise (triton's interpreter, a JIT path that returns no compiled kernel, an
argument of another type) keeps triton's own path; ``FAST = False`` forces it (benchmarks compare
the two).
"""

from __future__ import annotations

import os

import torch

FAST = os.environ.get("TRITON_INTERPRET", "0") in ("", "0")  # the interpreter returns no compiled kernel

_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_COMPILED: dict = {}  # key -> (compiled kernel, the arguments after the positional ones), or None


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; ``kwargs`` are compile-time arguments and launch options."""
    if not FAST:
        kernel[grid](*args, **kwargs)
        return
    key = _key(kernel, args, kwargs)
    entry = _COMPILED.get(key, False) if key is not None else None
    if entry:
        compiled, tail = entry
        compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *tail)
        return
    compiled = kernel[grid](*args, **kwargs)
    if entry is False:  # first launch of this specialisation: keep what the JIT path compiled
        _COMPILED[key] = _entry(kernel, compiled, args, kwargs)


def _entry(kernel, compiled, args, kwargs):
    if compiled is None or not callable(getattr(compiled, "__getitem__", None)) or hasattr(compiled, "result"):
        return None
    names = getattr(kernel, "arg_names", None)
    signature = getattr(kernel, "signature", None)
    if names is None or signature is None:
        return None
    params = signature.parameters
    tail = []
    for name in names[len(args):]:
        if name in kwargs:
            tail.append(kwargs[name])
        elif params[name].default is not params[name].empty:
            tail.append(params[name].default)
        else:
            return None
    return compiled, tail


def _key(kernel, args, kwargs):
    spec = []
    for a in args:
        if isinstance(a, torch.Tensor):
            spec.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool):
            spec.append(("b", a))  # before int: bool is an int
        elif isinstance(a, int):
            spec.append(("i", a % 16 == 0, a == 1, -(1 << 31) <= a < (1 << 31), a < (1 << 63)))
        elif isinstance(a, float):
            spec.append(("f",))
        else:
            return None  # not an argument kind this cache knows how triton specialises
    constants = []
    for name, value in sorted(kwargs.items()):
        try:
            hash(value)
        except TypeError:
            value = ("id", id(value))  # e.g. a gluon layout; plora builds each one once (cached)
        constants.append((name, value))
    return (kernel, torch.cuda.current_device() if torch.cuda.is_available() else -1, tuple(spec), tuple(constants))
