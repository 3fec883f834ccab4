"""Per-row activation quantization inside the decode GEMM (one launch for a few tokens).

The fused path must give exactly what quantizing first and multiplying second gives: the same row scales, the
same E4M3 values, the same K tiles. Every test compares the two bit for bit (the two-launch path forced by
setting the size limit to zero), and checks the fused path was the one taken. (Against a separate
``quantize_fp8`` call the result can differ in the last bit when M = 1: the GEMM then reads the one row scale
as a per-tensor scale and multiplies the two scales first.)
"""

from __future__ import annotations

import pytest
import torch
from fp8_gemm import FP8Linear, clear_caches, fp8_gemm, quantize_fp8
from fp8_gemm import gemm as gemm_mod
from fp8_gemm import linear as linear_mod
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from triton_ops_core.testing import assert_close_rel, device_for_tests

DEV = device_for_tests()


def _two_launches(fn):
    """``fn()`` with the fused path switched off (fresh call plans before and after)."""
    clear_caches()
    saved, gemm_mod.FUSED_ROW_QUANT_MAX = gemm_mod.FUSED_ROW_QUANT_MAX, 0
    try:
        out = fn()
    finally:
        gemm_mod.FUSED_ROW_QUANT_MAX = saved
        clear_caches()
    return out


def _fused_calls() -> list[bool]:
    return [call.fused for call in gemm_mod._CALLS._plans.values()]


def _weight(n, k, gran, device, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device)
    return quantize_fp8(w.t(), "e4m3", gran, role="weight")  # b = [K, N], the view of an nn.Linear weight


def _activation(m, k, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    # rows of very different magnitudes: each gets its own scale (and fp16 outputs stay finite)
    return (torch.randn(m, k, generator=g) * torch.logspace(-3, 2, m)[:, None]).to(device=device, dtype=dtype)


def _assert_identical(out, ref):
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 16), k=st.integers(1, 300), n=st.integers(1, 80),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       b_gran=st.sampled_from(["channel", "tensor", "block"]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_equals_quantize_then_gemm(m, k, n, dtype, b_gran, bias, seed):
    clear_caches()
    device = DEV
    a = _activation(m, k, dtype, device, seed)
    b_q, b_s = _weight(n, k, b_gran, device, seed + 1)
    out_dtype = torch.float32 if dtype == torch.float32 else dtype
    b_bias = torch.randn(n, device=device).to(out_dtype) if bias else None
    out = fp8_gemm(a, b_q, b_scale=b_s, bias=b_bias, out_dtype=out_dtype)
    assert _fused_calls() == [True]
    ref = _two_launches(lambda: fp8_gemm(a, b_q, b_scale=b_s, bias=b_bias, out_dtype=out_dtype))
    _assert_identical(out, ref)


def test_fused_matches_the_float64_product(device):
    clear_caches()
    a = _activation(5, 384, torch.bfloat16, device, 3)
    b_q, b_s = _weight(96, 384, "channel", device, 4)
    out = fp8_gemm(a, b_q, b_scale=b_s, out_dtype=torch.float32)
    a_q, a_s = quantize_fp8(a, "e4m3", "row")
    ref = (a_q.double() * a_s.double()) @ (b_q.double() * b_s.double())
    assert_close_rel(out, ref, 1e-5)


def test_special_rows(device):
    # an all-zero row (scale 1), a row with an infinity (saturates to the largest E4M3 value without setting
    # the scale), a row with NaN; the other rows must not notice.
    clear_caches()
    a = _activation(4, 256, torch.bfloat16, device, 5)
    a[0] = 0.0
    a[1, 7] = float("inf")
    a[2, 9] = float("nan")
    b_q, b_s = _weight(64, 256, "channel", device, 6)
    bias = torch.randn(64, device=device).to(torch.bfloat16)
    out = fp8_gemm(a, b_q, b_scale=b_s, bias=bias)
    assert _fused_calls() == [True]
    a_q, a_s = quantize_fp8(a, "e4m3", "row")
    _assert_identical(out, fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, bias=bias))  # M > 1: same scale modes
    assert torch.equal(out[0], bias)
    assert torch.isfinite(out[[0, 1, 3]]).all()


def test_large_activations_keep_two_launches(device, monkeypatch):
    monkeypatch.setattr(gemm_mod, "FUSED_ROW_QUANT_MAX", 64 * 100)
    clear_caches()
    b_q, b_s = _weight(32, 100, "channel", device, 7)
    fp8_gemm(_activation(64, 100, torch.bfloat16, device, 8), b_q, b_scale=b_s)
    fp8_gemm(_activation(65, 100, torch.bfloat16, device, 8), b_q, b_scale=b_s)  # past the decode kernel
    fp8_gemm(_activation(64, 101, torch.bfloat16, device, 8), *_weight(32, 101, "channel", device, 7)[:1],
             b_scale=_weight(32, 101, "channel", device, 7)[1])  # past the size limit
    assert _fused_calls() == [True, False, False]
    clear_caches()


def test_given_activation_scale_is_not_fused(device):
    # a static activation scale follows the given-scale rules (overflow fallback): the quantizer's path
    clear_caches()
    a = _activation(2, 128, torch.bfloat16, device, 9)
    b_q, b_s = _weight(32, 128, "channel", device, 10)
    fp8_gemm(a, b_q, a_scale=torch.full((2,), 0.5, device=device), b_scale=b_s)
    assert _fused_calls() == [False]
    clear_caches()


@pytest.mark.parametrize("shape", [(1, 200), (2, 3, 200), (7, 200)])
def test_fp8_linear_decode_is_one_launch_and_unchanged(device, monkeypatch, shape):
    torch.manual_seed(0)
    mod = FP8Linear.from_linear(nn.Linear(200, 72, device=device))
    mod.path = "w8a8"  # decode's default is the weight-only kernel; this is the W8A8 path's one-launch form
    x = torch.randn(*shape, device=device, dtype=torch.bfloat16)
    clear_caches()
    out = mod(x)
    # FP8Linear keeps its own plans: (weight-only plan or None, activation quantizer or None, GEMM call, flat input)
    assert [(wo is None, quant is None, gemm.fused)
            for wo, quant, gemm, _ in linear_mod._PLANS._plans.values()] == [(True, True, True)]
    ref = _two_launches(lambda: mod(x))
    _assert_identical(out, ref)
    assert out.shape == (*shape[:-1], 72)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, k", [(64, 256), (16, 1024), (3, 5000)])
def test_fused_tiles_fit_with_wide_activations(m, k, dtype):
    # 64 rows of a float32 activation in 512-deep K tiles would overflow shared memory at the two-launch
    # path's pipeline depth: the fused config trims stages.
    clear_caches()
    a = _activation(m, k, dtype, "cuda", k)
    b_q, b_s = _weight(384, k, "channel", "cuda", m)
    out = fp8_gemm(a, b_q, b_scale=b_s, out_dtype=torch.float32)
    assert _fused_calls() == [True]
    _assert_identical(out, _two_launches(lambda: fp8_gemm(a, b_q, b_scale=b_s, out_dtype=torch.float32)))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n, k", [(4096, 4096), (11264, 4096), (4096, 11264), (2880, 2880)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_at_decode_sizes(monkeypatch, m, n, k, dtype):
    monkeypatch.setattr(gemm_mod, "FUSED_ROW_QUANT_MAX", 16 * 11264)  # every case fused, whatever the default
    clear_caches()
    a = _activation(m, k, dtype, "cuda", m + k)
    a[0, 3] = float("nan") if m > 1 else a[0, 3]
    b_q, b_s = _weight(n, k, "channel", "cuda", n)
    bias = torch.randn(n, device="cuda").to(dtype)
    out = fp8_gemm(a, b_q, b_scale=b_s, bias=bias)
    assert _fused_calls() == [True]
    _assert_identical(out, _two_launches(lambda: fp8_gemm(a, b_q, b_scale=b_s, bias=bias)))
    if m > 1:
        assert out[0].isnan().all() and torch.isfinite(out[1:]).all()
    clear_caches()


@pytest.mark.gpu
@pytest.mark.parametrize("fin, fout", [(4096, 4096), (11264, 4096)])  # the second splits K (scratch buffers)
def test_fp8_linear_one_launch_in_a_cuda_graph(fin, fout):
    torch.manual_seed(0)
    mod = FP8Linear.from_linear(nn.Linear(fin, fout, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(1, fin, device="cuda", dtype=torch.bfloat16)
    clear_caches()
    mod(x)  # validates, compiles and plans outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mod(x)
    for scale in (1e-3, 1.0, 300.0):
        x.copy_(torch.randn_like(x) * scale)
        graph.replay()
        torch.cuda.synchronize()
        _assert_identical(out, mod(x))
    clear_caches()
