"""The kernels' machine code for an H100/H200 (sm_90), compiled offline on any machine.

Memory-bound kernels live or die by vector loads and stores. The grouped kernels read their
tensors' addresses from tables, and the compiler then knows nothing of their alignment: without
plora's alignment hints it fell back to 2-byte accesses, which ran 4x slower on an H200. This
checks, without a GPU, that every weight read and write of the update kernels is a 16-byte vector
access (``ld/st.global.v4``), and that no 2-byte store is left; and that the statistics' atomics
are relaxed (triton's default acq_rel made each program wait for its stores: on an H200 the
statistics then cost more than the update itself).
"""

import inspect
import re

import pytest
from benchmark_scripts import load

triton = pytest.importorskip("triton")
K = pytest.importorskip("plora.kernels")

if K.triton is None:  # pragma: no cover
    pytest.skip("triton not usable here", allow_module_level=True)

import triton.language as tl  # noqa: E402

KR = load("kernel_resources")
GROUPED, SINGLE = KR.GROUPED, KR.SINGLE


def _ptx(fn, signature: dict, constants: dict, aligned: list) -> str:
    if "nvidia" not in _backends():
        pytest.skip("this triton build has no CUDA backend")
    # no skip on errors: with the backend present, a kernel that does not compile is a failure
    return KR.compile_sm90(fn, signature, constants, aligned).asm["ptx"]


def _backends():
    from triton.backends import backends

    return backends


def _memory_ops(ptx: str) -> set:
    return set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx))


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("has_stats", [True, False], ids=["stats", "no-stats"])
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["direct", "compensated", "stochastic"])
def test_grouped_update_uses_vector_loads_and_stores(mode, has_stats, gated):
    constants = {"MODE": mode, "HAS_RES": mode == 1, "FACTOR_DTYPE": tl.float32, "HAS_STATS": has_stats,
                 "STORE": True, "BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 16, "GATED": gated}
    ops = _memory_ops(_ptx(K.unload_tile_grouped, GROUPED, constants,
                           KR.GROUPED_ALIGNED))
    assert "ld.global.v4.b32" in ops and "st.global.v4.b32" in ops, ops
    assert "st.global.b16" not in ops and "ld.global.b16" not in ops, ops


@pytest.mark.parametrize("layout", ["plain", "streaming", "load-first"])
def test_layout_options_keep_vector_accesses_and_mark_only_w(layout):
    """The layout options of the update pass (kernels.UPDATE_LAYOUT) keep 16-byte accesses; the
    streaming hints go on W's load and store alone, not on the residual's."""
    constants = {"MODE": 1, "HAS_RES": True, "FACTOR_DTYPE": tl.float32, "HAS_STATS": False, "STORE": True,
                 "BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 16, "COLS_FIRST": True,
                 "STREAM": layout == "streaming", "LOAD_FIRST": layout == "load-first"}
    ptx = _ptx(K.unload_tile_grouped, GROUPED, constants, KR.GROUPED_ALIGNED)
    ops = _memory_ops(ptx)
    assert "st.global.b16" not in ops and "ld.global.b16" not in ops, ops
    stores = [op for op in ops if op.startswith("st.")]
    assert stores and all(op.endswith(".v4.b32") for op in stores), ops
    streamed = [op for op in re.findall(r"st\.global[.\w]*", ptx) if ".cs" in op]
    evicted = re.findall(r"ld\.global\.L1::evict_first[.\w]*", ptx)
    if layout == "streaming":
        assert len(streamed) == len(evicted) == 4, (streamed, evicted)  # W's tile: 4 vectors per thread
        assert any(".cs" not in op for op in re.findall(r"st\.global[.\w]*", ptx))  # the residual's
    else:
        assert not streamed and not evicted


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "single-layer"])
def test_statistics_atomics_are_relaxed(grouped):
    constants = {"MODE": 1, "HAS_RES": True, "HAS_STATS": True, "BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 16}
    if grouped:
        constants.update(FACTOR_DTYPE=tl.float32, STORE=True)
        ptx = _ptx(K.unload_tile_grouped, GROUPED, constants, KR.GROUPED_ALIGNED)
    else:
        ptx = _ptx(K.unload_tile, SINGLE, constants, KR.SINGLE_ALIGNED)
    atomics = re.findall(r"(?<![\w.])(?:atom|red)\.global[.\w]*", ptx)
    assert len(atomics) == 2, atomics  # sum(landed * d) and sum(d * d), one each per program
    assert all(".relaxed." in a for a in atomics), atomics
    assert not re.search(r"\bfence\.|membar\.", ptx)


@pytest.mark.parametrize("mode", [0, 1, 2], ids=["direct", "compensated", "stochastic"])
def test_statistics_pass_writes_nothing_but_its_sums(mode):
    constants = {"MODE": mode, "HAS_RES": mode == 1, "FACTOR_DTYPE": tl.float32, "HAS_STATS": True,
                 "STORE": False, "BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 16}
    ptx = _ptx(K.unload_tile_grouped, GROUPED, constants, KR.GROUPED_ALIGNED)
    assert not any(op.startswith("st.") for op in _memory_ops(ptx)), _memory_ops(ptx)
    assert "ld.global.v4.b32" in _memory_ops(ptx)  # it reads W (and the residual) as the update does
    assert len(re.findall(r"(?<![\w.])(?:atom|red)\.global", ptx)) == 2


@pytest.mark.parametrize("kpad", [16, 64], ids=["rank<=16", "rank<=64"])
def test_norm_kernels_compile_with_relaxed_atomics(kpad):
    """The update's norm, as update_norms_ launches it: the Gram kernel runs its products on the
    tensor cores without spilling and accumulates with relaxed atomics; the product kernel stores."""
    defaults = {n: p.default for n, p in inspect.signature(K.update_norms_).parameters.items()}
    sig = {"TABLE": "*i64", "GRAMS": "*fp32", "FACTOR_DTYPE": "constexpr", "BLOCK_K": "constexpr",
           "CHUNK": "constexpr", "KPAD": "constexpr", "PRECISION": "constexpr"}
    if "nvidia" not in _backends():
        pytest.skip("this triton build has no CUDA backend")
    k = KR.compile_sm90(K.factor_grams, sig, {"FACTOR_DTYPE": tl.float32, "BLOCK_K": 16, "CHUNK": defaults["chunk"],
                                              "KPAD": kpad, "PRECISION": defaults["precision"]},
                        ["TABLE", "GRAMS"], num_warps=defaults["warps"], num_stages=defaults["stages"])
    assert KR.registers(k)[1] == 0  # no spill
    ptx = k.asm["ptx"]
    assert "mma.sync" in ptx  # tf32x3: on the tensor cores
    atomics = re.findall(r"(?<![\w.])(?:atom|red)\.global[.\w]*", ptx)
    assert atomics and all(".relaxed." in a for a in atomics), atomics
    sig = {"GRAMS": "*fp32", "TABLE": "*i64", "ALPHAS": "*fp32", "STATS": "*fp32", "KPAD": "constexpr",
           "BLOCK": "constexpr", "GATE": "*u8"}
    ptx = _ptx(K.gram_norms, sig, {"KPAD": kpad, "BLOCK": 1024, "GATED": True}, ["GRAMS", "TABLE", "ALPHAS", "STATS"])
    assert any(op.startswith("st.global") for op in _memory_ops(ptx))


def test_single_layer_update_uses_vector_loads_and_stores():
    constants = {"MODE": 1, "HAS_RES": True, "HAS_STATS": True, "BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 16}
    ops = _memory_ops(_ptx(K.unload_tile, SINGLE, constants, KR.SINGLE_ALIGNED))
    assert "ld.global.v4.b32" in ops and "ld.global.b16" not in ops, ops
    assert "st.global.v4.b32" in ops and "st.global.b16" not in ops, ops


@pytest.mark.parametrize("zero", [False, True], ids=["kaiming", "zero"])
@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
def test_kaiming_fill_uses_vector_stores(gated, zero):
    sig = {"PTRS": "*i64", "KEYS": "*i64", "numel": "i32", "bound": "fp32", "DTYPE": "constexpr",
           "BLOCK": "constexpr", "GATE": "*u8"}
    constants = {"DTYPE": tl.float32, "BLOCK": 1024, "GATED": gated, "ZERO": zero}
    ops = _memory_ops(_ptx(K.kaiming_fill, sig, constants, ["PTRS", "KEYS", "numel"]))
    assert any(op.startswith("st.global.v") for op in ops), ops


def test_resource_report_reads_registers_and_occupancy():
    """kernel_resources: a register count from the cubin, and the occupancy arithmetic of sm_90."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton build has no CUDA backend")
    k = KR.compile_sm90(K.unload_tile_grouped, GROUPED,
                        {"MODE": 0, "HAS_RES": False, "FACTOR_DTYPE": tl.float32, "HAS_STATS": False,
                         "STORE": True, "BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 16}, KR.GROUPED_ALIGNED)
    regs, stack = KR.registers(k)
    assert 16 <= regs <= 255 and stack >= 0
    capped = KR.compile_sm90(K.unload_tile_grouped, GROUPED,
                             {"MODE": 0, "HAS_RES": False, "FACTOR_DTYPE": tl.float32, "HAS_STATS": False,
                              "STORE": True, "BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 16}, KR.GROUPED_ALIGNED, max_registers=64)
    assert KR.registers(capped)[0] <= 64
    # 128 registers x 128 threads = 16,384: 4 programs by registers; 20 KiB shared: 11 by shared memory
    assert KR.occupancy(128, 20480, 4) == {"by_registers": 4, "by_shared": 11, "programs": 4, "warps": 16}
    assert KR.occupancy(214, 20480, 4)["programs"] == 2  # 214 rounds up to 216 registers


@pytest.mark.parametrize("factor", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["direct", "compensated", "stochastic"])
def test_pipelined_update_streams_w_in_16_byte_pieces(mode, factor):
    """plora.kernels_gluon: W (and the residual) reach shared memory by 16-byte asynchronous copies,
    are read from there and written back as 16-byte vectors, with no 2-byte store left (its only
    global loads are the small factors', element by element into the mma's operand layouts)."""
    pytest.importorskip("plora.kernels_gluon", reason="this triton has no gluon")
    if "nvidia" not in _backends():
        pytest.skip("this triton build has no CUDA backend")
    ptx = KR.compile_pipelined_sm90(mode, tl.float32 if factor == "fp32" else tl.bfloat16).asm["ptx"]
    copies = re.findall(r"cp\.async\.cg\.shared\.global[^;]*;", ptx)
    # cp.async.cg.shared.global [dst], [src], copy size, source size;
    assert copies and all(re.search(r"\],\s*(0x10|16)\s*[,;]", c) for c in copies), copies[:3]
    assert "ld.shared.v4.b32" in ptx
    ops = _memory_ops(ptx)
    assert "st.global.v4.b32" in ops and "st.global.b16" not in ops, ops
    assert not any(op.startswith("ld.global.v") for op in ops), ops  # no W tile through registers


def test_kernel_resources_lists_the_norm_kernel_default_first():
    if "nvidia" not in _backends():
        pytest.skip("this triton build has no CUDA backend")
    params = inspect.signature(K.update_norms_).parameters
    default = {k: params[k].default for k in ("programs", "chunk", "warps", "precision", "stages")}
    # plora's own options asked for again (at another program count: a launch choice) are not a second row
    rows = KR.norm_rows([{**default, "programs": 1}, {"programs": 2048, "chunk": 16, "warps": 4, "precision": "ieee",
                                                        "stages": 3}])
    assert len(rows) == 2 and "plora's default" in rows[0] and "| 16 | 4 | ieee | 3 |" in rows[1]
    assert f"| {default['chunk']} | {default['warps']} | {default['precision']} | {default['stages']} |" in rows[0]
    assert all(row.split(" | ")[6] == "0" for row in rows)  # neither spills
