"""Compiled quantization kernels on a GPU: bit-exact against torch's CUDA cast at realistic sizes."""

from __future__ import annotations

import pytest
import torch
from fp8_gemm import DelayedScaler, dequantize_fp8, expand_scale, quantize_fp8
from fp8_gemm.reference import quantize_fp8_reference
from test_quantize import CASE_IDS, CASES, FMTS, assert_same_fp8, wide_range

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize(("granularity", "block"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", [(1, 4096), (64, 11264), (1000, 2880), (4096, 4096)])
def test_gpu_bit_exact_against_torch(fmt, granularity, block, shape):
    x = wide_range(shape, torch.bfloat16, "cuda")
    x[0, 1] = float("nan")
    x[-1, 2] = float("inf")
    q, s = quantize_fp8(x, fmt, granularity, block_size=block)
    q_ref, s_ref = quantize_fp8_reference(x, fmt, granularity, block_size=block)
    assert torch.equal(s, s_ref)
    assert_same_fp8(q, q_ref)
    # NaN stays NaN, so compare with equal_nan: torch.equal treats NaN as unequal to itself.
    expected = q.float() * expand_scale(s, shape)
    torch.testing.assert_close(dequantize_fp8(q, s, torch.float32), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize(("granularity", "block"), CASES, ids=CASE_IDS)
def test_gpu_weight_layout_and_given_scale(fmt, granularity, block):
    w = wide_range((4096, 1408), torch.float16, "cuda", seed=1)  # an [N, K] weight, passed as w.t()
    x = w.t()
    _, dyn = quantize_fp8_reference(x, fmt, granularity, block_size=block)
    given = dyn * torch.where(torch.rand(dyn.shape, device="cuda") < 0.3, 0.5, 1.5)
    q, s = quantize_fp8(x, fmt, granularity, scale=given, block_size=block)
    q_ref, s_ref = quantize_fp8_reference(x, fmt, granularity, scale=given, block_size=block)
    assert torch.equal(s, s_ref)
    assert_same_fp8(q, q_ref)


def scaler_scale_ref(amax: torch.Tensor) -> torch.Tensor:
    return torch.div(amax, torch.full_like(amax, 448.0))


def test_gpu_fp32_input_and_delayed_scaler():
    x = torch.randn(2048, 4096, device="cuda")
    scaler = DelayedScaler("e4m3", history_len=4)
    for i in range(3):
        q, s = scaler(x * (1 + i))
        given = None if i == 0 else scaler_scale_ref((x * i).abs().amax().reshape(1))
        q_ref, s_ref = quantize_fp8_reference(x * (1 + i), "e4m3", "tensor", scale=given)
        assert torch.equal(s, s_ref)
        assert_same_fp8(q, q_ref)
