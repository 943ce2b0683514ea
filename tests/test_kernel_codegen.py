"""The kernels' machine code for an H100/H200 (sm_90), compiled offline on any machine.

Memory-bound kernels live or die by vector loads and stores. The grouped kernels read their
tensors' addresses from tables, and the compiler then knows nothing of their alignment: without
plora's alignment hints it fell back to 2-byte accesses, which ran 4x slower on an H200. This
checks, without a GPU, that every weight read and write of the update kernels is a 16-byte vector
access (``ld/st.global.v4``), and that no 2-byte store is left.
"""

import re
import warnings

import pytest

triton = pytest.importorskip("triton")
K = pytest.importorskip("plora.kernels")

if K.triton is None:  # pragma: no cover
    pytest.skip("triton not usable here", allow_module_level=True)

import triton.language as tl  # noqa: E402


def _ptx(fn, signature: dict, constants: dict, aligned: list) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(names.index(k),): v for k, v in constants.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton build has no CUDA backend")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # no skip on errors: with the backend present, a kernel that does not compile is a failure
        return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


def _memory_ops(ptx: str) -> set:
    return set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx))


GROUPED = {"PTRS": "*i64", "ALPHAS": "*fp32", "KEYS": "*i64", "STATS": "*fp32", "G": "i32", "M": "i32", "N": "i32",
           "K": "i32", "stride_wm": "i32", "stride_lm": "i32", "stride_lk": "i32", "stride_rk": "i32",
           "stride_rn": "i32", "MODE": "constexpr", "HAS_RES": "constexpr", "FACTOR_DTYPE": "constexpr",
           "HAS_STATS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
SINGLE = {"W": "*bf16", "RES": "*bf16", "L": "*fp32", "R": "*fp32", "STATS": "*fp32", "M": "i32", "N": "i32",
          "K": "i32", "stride_wm": "i32", "stride_lm": "i32", "stride_lk": "i32", "stride_rk": "i32",
          "stride_rn": "i32", "alpha": "fp32", "key_lo": "i32", "key_hi": "i32", "MODE": "constexpr",
          "HAS_RES": "constexpr", "HAS_STATS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
          "BLOCK_K": "constexpr"}


@pytest.mark.parametrize("has_stats", [True, False], ids=["stats", "no-stats"])
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["direct", "compensated", "stochastic"])
def test_grouped_update_uses_vector_loads_and_stores(mode, has_stats):
    constants = {"MODE": mode, "HAS_RES": mode == 1, "FACTOR_DTYPE": tl.float32, "HAS_STATS": has_stats,
                 "BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 16}
    ops = _memory_ops(_ptx(K.unload_tile_grouped, GROUPED, constants,
                           ["PTRS", "ALPHAS", "KEYS", "STATS", "M", "N", "stride_wm", "stride_lm", "stride_rk"]))
    assert "ld.global.v4.b32" in ops and "st.global.v4.b32" in ops, ops
    assert "st.global.b16" not in ops and "ld.global.b16" not in ops, ops


def test_single_layer_update_uses_vector_loads_and_stores():
    constants = {"MODE": 1, "HAS_RES": True, "HAS_STATS": True, "BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 16}
    ops = _memory_ops(_ptx(K.unload_tile, SINGLE, constants,
                           ["W", "RES", "L", "R", "STATS", "M", "N", "stride_wm", "stride_lm", "stride_rk"]))
    assert "st.global.v4.b32" in ops and "st.global.b16" not in ops, ops


def test_kaiming_fill_uses_vector_stores():
    sig = {"PTRS": "*i64", "KEYS": "*i64", "numel": "i32", "bound": "fp32", "DTYPE": "constexpr",
           "BLOCK": "constexpr"}
    ops = _memory_ops(_ptx(K.kaiming_fill, sig, {"DTYPE": tl.float32, "BLOCK": 1024}, ["PTRS", "KEYS", "numel"]))
    assert any(op.startswith("st.global.v") for op in ops), ops
