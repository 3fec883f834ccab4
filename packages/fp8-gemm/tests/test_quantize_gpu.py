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


@pytest.mark.parametrize("shape", [(8192, 8192), (3, 5000)])
def test_gpu_per_tensor_one_launch_beyond_l2_and_tiny(shape):
    # 128 MiB of bf16: the cast pass cannot find everything in L2; 15000 values: fewer tiles than programs.
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    for given in (None, quantize_fp8_reference(x, "e4m3", "tensor")[1] * 2,
                  quantize_fp8_reference(x, "e4m3", "tensor")[1] / 4):  # dynamic; a scale that holds; one that not
        q, s = quantize_fp8(x, "e4m3", "tensor", scale=given)
        q_ref, s_ref = quantize_fp8_reference(x, "e4m3", "tensor", scale=given)
        assert torch.equal(s, s_ref)
        assert_same_fp8(q, q_ref)


def test_gpu_per_tensor_strided_rows():
    buf = torch.randn(1000, 3000, device="cuda", dtype=torch.float16)
    x = buf[:, 7:2887]  # rows 3000 apart, not 16-byte aligned
    q, s = quantize_fp8(x, "e5m2", "tensor")
    q_ref, s_ref = quantize_fp8_reference(x, "e5m2", "tensor")
    assert torch.equal(s, s_ref)
    assert_same_fp8(q, q_ref)


def test_gpu_cuda_graph_replays_per_tensor_and_delayed():
    # The cooperative kernel's barrier words and the scaler's history live on the device: graph replays must
    # find them reset and keep updating the history.
    x = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    static = quantize_fp8_reference(x, "e4m3", "tensor")[1] * 2
    scaler = DelayedScaler("e4m3", history_len=4)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles) outside the capture
        quantize_fp8(x, "e4m3", "tensor")
        quantize_fp8(x, "e4m3", "tensor", scale=static)
    torch.cuda.current_stream().wait_stream(stream)
    scaler(x)  # first call, dynamic: the history holds amax(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_dyn, s_dyn = quantize_fp8(x, "e4m3", "tensor")
        q_st, s_st = quantize_fp8(x, "e4m3", "tensor", scale=static)
        q_del, s_del = scaler(x)
    for factor in (0.5, 3.0, 1.0):
        hist_before = scaler.amax_history.clone()
        x.copy_(torch.randn_like(x) * factor)
        graph.replay()
        torch.cuda.synchronize()
        for (q, s), given in (((q_dyn, s_dyn), None), ((q_st, s_st), static)):
            q_ref, s_ref = quantize_fp8_reference(x, "e4m3", "tensor", scale=given)
            assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
        delayed = scaler_scale_ref(hist_before.amax().reshape(1))
        q_ref, s_ref = quantize_fp8_reference(x, "e4m3", "tensor", scale=delayed)
        assert torch.equal(s_del, s_ref) and torch.equal(q_del.view(torch.uint8), q_ref.view(torch.uint8))
        assert float(scaler.amax_history.max()) >= float(x.float().abs().amax())
