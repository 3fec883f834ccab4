"""fp8_gemm against the float64 product of the same dequantized operands (CPU interpreter and GPU).

The interpreter accumulates exactly, so these tests check indexing, scales, masks, layouts and the three
kernel paths; accumulation precision on Hopper is checked by the GPU tests in test_gemm_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from _gemm_ref import FP8, gemm_ref, make_operands, quantize_ref
from fp8_gemm.gemm import _launch, _pick_path, fp8_gemm
from hypothesis import given
from hypothesis import strategies as st
from triton_ops_core.exceptions import (
    DeviceMismatchError,
    InvalidArgumentError,
    ShapeMismatchError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
)
from triton_ops_core.testing import assert_close_rel, device_for_tests, poison_, relative_error

DEV = device_for_tests()
A_GRANS = ("tensor", "row", "block")
B_GRANS = ("tensor", "channel", "block", "group")
# (M, N, K) reaching each kernel: aligned (tensor descriptors), odd K/N (pointer kernel), M <= 64 (decode)
SHAPES = {"tma": (80, 48, 256), "ptr": (70, 37, 201), "decode": (5, 40, 300)}
# Output rounding alone: fp32 ~1e-7, bf16 ~2^-9 / sqrt(3), fp16 ~2^-12 / sqrt(3) (relative, rms)
OUT_TOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}
# The kernel's own error: exact accumulation under the interpreter; fp32 promotion every K block on the GPU
# (~1.3e-4 on the H100), and the tensor core's reduced-precision running sum with fast_accum.
KERNEL_TOL = 1e-6 if DEV.type == "cpu" else 2e-3
FAST_TOL = 1e-6 if DEV.type == "cpu" else 5e-3
_A = {"tensor": 0, "row": 1, "block": 2}
_B = {"tensor": 0, "channel": 1, "block": 2, "group": 3}


def _run(a_q, a_s, b_q, b_s, **kw):
    return fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, **kw)


@pytest.mark.parametrize("path", list(SHAPES))
@pytest.mark.parametrize("a_gran", A_GRANS)
@pytest.mark.parametrize("b_gran", B_GRANS)
def test_every_granularity_pair(path, a_gran, b_gran):
    m, n, k = SHAPES[path]
    kmajor = (A_GRANS.index(a_gran) + B_GRANS.index(b_gran)) % 2 == 1  # both layouts of b across the grid
    a_q, a_s, b_q, b_s = make_operands(m, n, k, a_gran, b_gran, DEV, kmajor_b=kmajor, seed=hash((path, a_gran)) % 97)
    out = torch.empty(m, n, dtype=torch.float32, device=DEV)
    assert _pick_path(a_q, b_q, out, m) == path
    out = _run(a_q, a_s, b_q, b_s, out_dtype=torch.float32)
    assert_close_rel(out, gemm_ref(a_q.cpu(), a_s.cpu(), a_gran, b_q.cpu(), b_s.cpu(), b_gran), KERNEL_TOL)


@pytest.mark.parametrize("path", list(SHAPES))
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_bias_and_half_outputs(path, out_dtype):
    m, n, k = SHAPES[path]
    a_q, a_s, b_q, b_s = make_operands(m, n, k, "row", "channel", DEV, kmajor_b=True, seed=5)
    bias = (torch.randn(n) * 10).to(out_dtype).to(DEV)
    out = _run(a_q, a_s, b_q, b_s, out_dtype=out_dtype, bias=bias)
    assert out.dtype == out_dtype and out.shape == (m, n)
    ref = gemm_ref(a_q.cpu(), a_s.cpu(), "row", b_q.cpu(), b_s.cpu(), "channel", bias.cpu())
    assert_close_rel(out, ref, OUT_TOL[out_dtype] + KERNEL_TOL / 4)


@pytest.mark.parametrize("path", list(SHAPES))
def test_strided_bias_is_read_at_its_stride(path):
    # the kernels read the bias at unit stride: a strided view must give what its contiguous copy gives
    m, n, k = SHAPES[path]
    a_q, a_s, b_q, b_s = make_operands(m, n, k, "row", "group", DEV, kmajor_b=True, seed=6)
    wide = (torch.randn(2 * n) * 10).to(DEV)
    out = _run(a_q, a_s, b_q, b_s, out_dtype=torch.float32, bias=wide[::2])
    ref = gemm_ref(a_q.cpu(), a_s.cpu(), "row", b_q.cpu(), b_s.cpu(), "group", wide[::2].cpu())
    assert_close_rel(out, ref, KERNEL_TOL)


def test_row_major_b_with_k_off_sixteen_avoids_tma():
    # a row-major b goes to the TMA kernel through a K-major copy whose row stride is K: K = 1000 cannot (16-byte
    # rows), even when a's padded row stride (1024) and b's (N = 64) are aligned
    big = torch.randn(96, 1024)
    a_q, a_s = quantize_ref(big[:, :1000], "row")
    b_q, b_s = quantize_ref(torch.randn(1000, 64), "channel", is_b=True)
    a_q, a_s, b_q, b_s = (t.to(DEV) for t in (a_q, a_s, b_q, b_s))
    # padded on the device: moving a strided view to another device makes it contiguous
    a_q = torch.cat([a_q.float(), torch.zeros(96, 24, device=DEV)], 1).to(FP8)[:, :1000]
    out = torch.empty(96, 64, dtype=torch.float32, device=DEV)
    assert a_q.stride(0) == 1024 and b_q.stride(1) == 1
    assert _pick_path(a_q, b_q, out, 96) == "ptr"
    got = _run(a_q, a_s, b_q, b_s, out_dtype=torch.float32)
    assert_close_rel(got, gemm_ref(a_q.cpu(), a_s.cpu(), "row", b_q.cpu(), b_s.cpu(), "channel"), KERNEL_TOL)


@pytest.mark.parametrize("path", ["tma", "decode"])
def test_fast_accum_same_function(path):
    # The interpreter accumulates exactly either way: fast_accum must compute the same product.
    m, n, k = SHAPES[path]
    a_q, a_s, b_q, b_s = make_operands(m, n, k, "tensor", "channel", DEV, kmajor_b=True, seed=9)
    out = _run(a_q, a_s, b_q, b_s, out_dtype=torch.float32, fast_accum=True)
    assert_close_rel(out, gemm_ref(a_q.cpu(), a_s.cpu(), "tensor", b_q.cpu(), b_s.cpu(), "channel"), FAST_TOL)


@pytest.mark.parametrize("acc", [1, 2])
@pytest.mark.parametrize("subtile", [False, True])
def test_tma_variants(acc, subtile):
    # Persistent grid over more tiles than programs, both faithful schemes, split epilogue store.
    m, n, k = 96, 64, 192
    a_q, a_s, b_q, b_s = make_operands(m, n, k, "block", "block", DEV, kmajor_b=True, seed=11)
    out = poison_(torch.empty(m, n, dtype=torch.float32, device=DEV))
    cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2, "num_warps": 4, "num_stages": 2,
           "PERSISTENT": True, "FLATTEN": True, "FAITHFUL_ACC": acc, "EPI_SUBTILE": subtile}
    _launch(a_q, b_q, out, a_s, b_s, None, 2, 2, False, "tma", cfg)
    assert_close_rel(out, gemm_ref(a_q.cpu(), a_s.cpu(), "block", b_q.cpu(), b_s.cpu(), "block"), KERNEL_TOL)


@pytest.mark.parametrize("split, n, k", [(1, 40, 330), (3, 40, 330), (2, 64, 256)], ids=["s1", "s3", "s2-even"])
def test_decode_split_k_repeatable(split, n, k):
    # Split-K partials are summed by the last program in a fixed order: identical results on repeated calls
    # (which also shows the arrival counters were reset). 64 x 256: whole tiles, the loads without masks.
    m = 3
    a_q, a_s, b_q, b_s = make_operands(m, n, k, "row", "block", DEV, seed=13)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": split, "num_warps": 4, "num_stages": 1}
    outs = []
    for _ in range(2):
        out = poison_(torch.empty(m, n, dtype=torch.float32, device=DEV))
        _launch(a_q, b_q, out, a_s, b_s, None, 1, 2, False, "decode", cfg)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert_close_rel(outs[0], gemm_ref(a_q.cpu(), a_s.cpu(), "row", b_q.cpu(), b_s.cpu(), "block"), KERNEL_TOL)


@pytest.mark.parametrize("b_gran", ["group", "block"])
@pytest.mark.parametrize("m", [17, 40])
def test_decode_tiles_of_blocked_scales_at_17_to_64_rows(m, b_gran):
    # The GPU rule for block/group scales past 16 rows (64 columns, 128-deep K split in several slices, 32- or
    # 64-row tiles) on a small problem: rows and columns past the tile masked, a partial last K tile, two K slices.
    from fp8_gemm import gemm_configs as cfgs

    n, k = 96, 4 * 128 + 40
    cfg = cfgs._blocked_rows_config(32 if m <= 32 else 64, n, k, sms=4)
    assert cfg["SPLIT_K"] == 2 and cfg["BLOCK_N"] == 64
    a_q, a_s, b_q, b_s = make_operands(m, n, k, "block", b_gran, DEV, kmajor_b=True, seed=m)
    out = poison_(torch.empty(m, n, dtype=torch.float32, device=DEV))
    _launch(a_q, b_q, out, a_s, b_s, None, 2, 3 if b_gran == "group" else 2, False, "decode", cfg)
    assert_close_rel(out, gemm_ref(a_q.cpu(), a_s.cpu(), "block", b_q.cpu(), b_s.cpu(), b_gran), KERNEL_TOL)


def test_strided_operands_take_pointer_path():
    # a with a row stride past K (a slice of a wider buffer), b neither row- nor column-major contiguous.
    m, n, k = 72, 24, 96
    a_q, a_s, b_q, b_s = make_operands(m, n, k, "row", "tensor", "cpu", seed=17)
    a_wide = torch.zeros(m, k + 8, dtype=torch.uint8).view(FP8)
    a_wide[:, :k] = a_q
    b_big = torch.zeros(2 * k, 2 * n, dtype=torch.uint8).view(FP8)
    b_big[::2, ::2] = b_q
    a_v, b_v = a_wide[:, :k].to(DEV), b_big[::2, ::2].to(DEV)
    if DEV.type == "cuda":
        a_v, b_v = a_wide.to(DEV)[:, :k], b_big.to(DEV)[::2, ::2]
    out = _run(a_v, a_s.to(DEV), b_v, b_s.to(DEV), out_dtype=torch.float32)
    assert_close_rel(out, gemm_ref(a_q, a_s, "row", b_q, b_s, "tensor"), KERNEL_TOL)


@pytest.mark.parametrize("where", ["scale", "payload", "input"])
def test_nan_propagates_and_stays_local(where):
    # A NaN in a's row 7 (its scale, an E4M3 NaN payload, or a bf16 input quantized per row: the interpreter's FP8
    # upcast loses payloads, and the GEMM restores the GPU's behaviour there) and in b's scale of column 5 reach
    # exactly that row and column.
    m, n, k = 80, 48, 256
    a_q, a_s, b_q, b_s = make_operands(m, n, k, "row", "channel", "cpu", kmajor_b=True, seed=19)
    a_q, a_s, b_s = a_q.clone(), a_s.clone(), b_s.clone()
    if where == "payload":
        a_q.view(torch.uint8)[7, 100] = 0x7F  # E4M3 NaN
    elif where == "scale":
        a_s[7] = float("nan")
    b_s[5] = float("nan")
    if where == "input":  # unquantized activation: fp8_gemm quantizes it per row (its row 7 keeps the NaN)
        a = (a_q.float() * a_s.reshape(-1, 1)).to(torch.bfloat16)
        a[7, 100] = float("nan")
        out = fp8_gemm(a.to(DEV), b_q.to(DEV), b_scale=b_s.to(DEV), out_dtype=torch.float32).cpu()
        assert out[7].isnan().all() and out[:, 5].isnan().all()
        return
    out = _run(a_q.to(DEV), a_s.to(DEV), b_q.to(DEV), b_s.to(DEV), out_dtype=torch.float32).cpu()
    assert out[7].isnan().all() and out[:, 5].isnan().all()
    rest = torch.ones(m, n, dtype=torch.bool)
    rest[7] = False
    rest[:, 5] = False
    assert torch.isfinite(out[rest]).all()
    assert relative_error(out, gemm_ref(a_q, a_s, "row", b_q, b_s, "channel")) < KERNEL_TOL


def test_empty_and_k_zero():
    a_q, a_s, b_q, b_s = make_operands(4, 8, 16, "tensor", "tensor", DEV)
    out = _run(a_q[:0], a_s, b_q, b_s, out_dtype=torch.float32)
    assert out.shape == (0, 8)
    bias = torch.randn(8, device=DEV)
    out = _run(a_q[:, :0], a_s, b_q[:0], b_s, out_dtype=torch.float32, bias=bias)
    assert torch.equal(out, bias.expand(4, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_auto_quantized_inputs(dtype):
    m, n, k = 70, 48, 160
    g = torch.Generator().manual_seed(23)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    out = fp8_gemm(a.to(DEV), b.to(DEV))
    assert out.dtype == (dtype if dtype != torch.float32 else torch.bfloat16)
    # The per-row / per-channel references: the kernel adds only output rounding to their product.
    a_q, a_s = quantize_ref(a, "row")
    w_q, w_s = quantize_ref(b.t(), "row")
    ref = gemm_ref(a_q, a_s, "row", w_q.t(), w_s, "channel")
    assert relative_error(out, ref) < 5e-3
    # ... and the whole is an FP8 GEMM of the original product: E4M3 costs a few percent, not more.
    exact = a.double() @ b.double()
    assert relative_error(out, exact) < 0.08


def test_auto_quantized_weight_transposed_view():
    g = torch.Generator().manual_seed(29)
    x = torch.randn(3, 64, generator=g, dtype=torch.float32).to(torch.bfloat16)
    w = torch.randn(40, 64, generator=g, dtype=torch.float32).to(torch.bfloat16)  # nn.Linear layout [N, K]
    out = fp8_gemm(x.to(DEV), w.to(DEV).t())
    assert relative_error(out, x.double() @ w.double().t()) < 0.08


# ----------------------------------------------------------------------------------------------- bad inputs
def _fp8(shape):
    return torch.randn(*shape).to(FP8).to(DEV)


ONE = torch.ones((), device=DEV)


@pytest.mark.parametrize(
    "kwargs, exc, fragment",
    [
        ({"a": _fp8((4, 8)), "b": _fp8((8, 6)), "a_scale": None, "b_scale": ONE}, UnsupportedDtypeError, "a_scale"),
        ({"a": _fp8((4, 8)), "b": _fp8((8, 6)), "a_scale": ONE, "b_scale": None}, UnsupportedDtypeError, "b_scale"),
        ({"a": _fp8((4, 8)), "b": _fp8((9, 6))}, ShapeMismatchError, "b"),
        ({"a": _fp8((4, 8, 1)), "b": _fp8((8, 6))}, ShapeMismatchError, "a"),
        ({"a": _fp8((4, 8)), "b": _fp8((8, 6)), "a_scale": torch.ones(5, device=DEV)}, ShapeMismatchError,
         "a_scale"),
        ({"a": _fp8((4, 8)), "b": _fp8((8, 6)), "b_scale": torch.ones(2, 6, device=DEV)}, ShapeMismatchError,
         "b_scale"),
        ({"a": _fp8((4, 8)), "b": _fp8((8, 6)), "a_scale": ONE.half()}, UnsupportedDtypeError, "a_scale"),
        ({"a": _fp8((4, 8)), "b": _fp8((8, 6)), "bias": torch.ones(5, device=DEV)}, ShapeMismatchError, "bias"),
        ({"a": _fp8((4, 8)), "b": _fp8((8, 6)), "out_dtype": torch.int32}, UnsupportedDtypeError, "out_dtype"),
        ({"a": torch.ones(4, 8, dtype=torch.int8, device=DEV), "b": _fp8((8, 6))}, UnsupportedDtypeError, "a"),
        ({"a": torch.randn(4, 8).to(torch.float8_e5m2).to(DEV), "b": _fp8((8, 6))}, UnsupportedDtypeError, "a"),
        ({"a": [[1.0]], "b": _fp8((8, 6))}, InvalidArgumentError, "a"),
    ],
)
def test_bad_inputs(kwargs, exc, fragment):
    kwargs = dict(kwargs)
    a, b = kwargs.pop("a"), kwargs.pop("b")
    kwargs.setdefault("a_scale", ONE)
    kwargs.setdefault("b_scale", ONE)
    with pytest.raises(exc, match=fragment):
        fp8_gemm(a, b, **kwargs)


def test_gpu_without_fp8_tensor_cores(monkeypatch):
    import fp8_gemm.gemm as gemm

    monkeypatch.setattr(gemm, "_device_caps", lambda device, interpreter: (False, False))
    gemm.clear_caches()  # the capability is checked on a call signature's first call
    with pytest.raises(UnsupportedDtypeError, match="FP8 tensor cores"):
        fp8_gemm(_fp8((4, 8)), _fp8((8, 6)), a_scale=ONE, b_scale=ONE)


def test_wrong_device():
    if DEV.type == "cpu":
        meta = torch.empty(4, 8, device="meta", dtype=FP8)
        one = torch.ones((), device="meta")
        with pytest.raises(UnsupportedDeviceError, match="a"):
            fp8_gemm(meta, meta.t(), a_scale=one, b_scale=one)
        with pytest.raises(DeviceMismatchError, match="a_scale"):
            fp8_gemm(_fp8((4, 8)), _fp8((8, 6)), a_scale=one, b_scale=ONE)
    else:
        with pytest.raises(DeviceMismatchError, match="b"):
            fp8_gemm(_fp8((4, 8)), _fp8((8, 6)).cpu(), a_scale=ONE, b_scale=ONE)


@pytest.mark.parametrize("a_gran, b_gran", [("row", "block"), ("block", "channel"), ("tensor", "tensor"),
                                            ("row", "group")])
def test_half_inputs_with_given_scales(a_gran, b_gran):
    # fp16/bf16 operands with static scales (1 % headroom, so no group overflows and gets its scale raised):
    # quantized with exactly those scales, then the same GEMM as for FP8 inputs.
    from _gemm_ref import _expand, dequant

    m, n, k = 72, 40, 200
    a_q, a_s, b_q, b_s = make_operands(m, n, k, a_gran, b_gran, "cpu", seed=31)
    a = dequant(a_q, a_s, a_gran).to(torch.float16)
    b = dequant(b_q, b_s, b_gran, is_b=True).to(torch.bfloat16)
    a_s, b_s = a_s * 1.01, b_s * 1.01
    out = fp8_gemm(a.to(DEV), b.to(DEV), a_scale=a_s.to(DEV), b_scale=b_s.to(DEV), out_dtype=torch.float32)
    a_q2 = (a.float() / _expand(a_s, m, k, a_gran, False).float()).to(FP8)
    b_q2 = (b.float() / _expand(b_s, k, n, b_gran, True).float()).to(FP8)
    assert_close_rel(out, gemm_ref(a_q2, a_s, a_gran, b_q2, b_s, b_gran), KERNEL_TOL + 1e-5)


@given(
    m=st.integers(1, 140),
    n=st.integers(1, 70),
    k=st.integers(1, 300),
    a_gran=st.sampled_from(A_GRANS),
    b_gran=st.sampled_from(B_GRANS),
    kmajor=st.booleans(),
    fast=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(m, n, k, a_gran, b_gran, kmajor, fast, seed):
    # Any size, any granularity pair, either layout of b, either accumulation: the path is chosen from the
    # shape and strides (decode up to M = 64, tensor descriptors when aligned, pointers otherwise).
    a_q, a_s, b_q, b_s = make_operands(m, n, k, a_gran, b_gran, DEV, kmajor_b=kmajor, seed=seed)
    out = _run(a_q, a_s, b_q, b_s, out_dtype=torch.float32, fast_accum=fast)
    ref = gemm_ref(a_q.cpu(), a_s.cpu(), a_gran, b_q.cpu(), b_s.cpu(), b_gran)
    assert_close_rel(out, ref, FAST_TOL if fast else KERNEL_TOL)
