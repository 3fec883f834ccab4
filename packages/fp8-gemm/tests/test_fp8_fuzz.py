"""Bad input, fuzzed: each tensor argument of quantize_fp8, fp8_gemm and FP8Linear spoiled one way (dtype, shape,
layout, device, type), and spoiled given scales: always a named error or a documented result, never a crash."""

from __future__ import annotations

import torch
from fp8_gemm import FP8Linear, fp8_gemm, quantize_fp8
from hypothesis import given
from hypothesis import strategies as st
from triton_ops_core.testing import TENSOR_MUTATIONS, device_for_tests, mutate, named_error_or_result

DEVICE = device_for_tests()  # a module constant: hypothesis runs each example without re-entering fixtures

GRANULARITIES = ("tensor", "row", "block", "channel")


@given(gran=st.sampled_from(GRANULARITIES), how=st.sampled_from(TENSOR_MUTATIONS), spoil_scale=st.booleans(),
       strict=st.booleans())
def test_quantize_a_spoiled_input_or_scale(gran, how, spoil_scale, strict):
    t = torch.randn(4, 256, device=DEVICE)
    scale = quantize_fp8(t, "e4m3", gran)[1] * 2 if spoil_scale else None
    if spoil_scale:
        scale = mutate(scale, how)
    else:
        t = mutate(t, how)
    named_error_or_result(quantize_fp8, t, "e4m3", gran, scale=scale, strict=strict)


@given(which=st.integers(0, 4), how=st.sampled_from(TENSOR_MUTATIONS), quantized=st.booleans())
def test_gemm_a_spoiled_operand(which, how, quantized):
    a, w = torch.randn(3, 128, device=DEVICE), torch.randn(64, 128, device=DEVICE)
    if quantized:
        (a, a_s), (b, b_s) = quantize_fp8(a, "e4m3", "row"), quantize_fp8(w.t(), "e4m3", "channel", role="weight")
    else:
        a, b, a_s, b_s = a.bfloat16(), w.t().bfloat16(), None, None
    args = [a, b, a_s, b_s, torch.randn(64, device=DEVICE)]
    if args[which] is not None:
        args[which] = mutate(args[which], how)
    a, b, a_s, b_s, bias = args
    named_error_or_result(fp8_gemm, a, b, a_scale=a_s, b_scale=b_s, bias=bias)


@given(how=st.sampled_from(TENSOR_MUTATIONS))
def test_linear_a_spoiled_input(how):
    lin = FP8Linear.from_linear(torch.nn.Linear(128, 32, device=DEVICE))
    named_error_or_result(lin, mutate(torch.randn(2, 128, device=DEVICE), how))
