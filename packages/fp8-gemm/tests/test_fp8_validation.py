"""The FP8 GEMM's validator accepts good inputs and rejects each bad one with the right exception, naming the
argument."""

import pytest
import torch
from fp8_gemm.validation import validate_fp8_gemm_inputs
from hypothesis import assume, given
from hypothesis import strategies as st
from triton_ops_core.exceptions import (
    DeviceMismatchError,
    ShapeMismatchError,
    UnsupportedDtypeError,
)

FLOATS = st.sampled_from([torch.float16, torch.bfloat16, torch.float32])
BAD_DTYPES = st.sampled_from([torch.int32, torch.float64, torch.int8, torch.bool])


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------- FP8 GEMM

@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, 300), st.sampled_from(["tensor", "row", "block"]),
       st.sampled_from(["tensor", "channel", "block"]))
def test_fp8_gemm_scale_granularity_from_shapes(m, k, n, ga, gb):
    a = torch.randn(m, k).to(torch.float8_e4m3fn)
    b = torch.randn(k, n).to(torch.float8_e4m3fn)
    kb, nb = -(-k // 128), -(-n // 128)
    a_scale = {"tensor": torch.ones(()), "row": torch.ones(m, 1), "block": torch.ones(m, kb)}[ga]
    b_scale = {"tensor": torch.ones(1), "channel": torch.ones(1, n), "block": torch.ones(kb, nb)}[gb]
    # small shapes make some granularities coincide (one row, one block): only shapes that are unambiguous count
    assume(not (ga != "tensor" and a_scale.numel() == 1) and not (gb != "tensor" and b_scale.numel() == 1))
    assume(not (ga == "block" and kb == 1) and not (gb == "block" and (kb, nb) == (1, n)))
    info = validate_fp8_gemm_inputs(a, b, a_scale=a_scale, b_scale=b_scale)
    assert (info.m, info.n, info.k) == (m, n, k)
    assert (info.a_granularity, info.b_granularity) == (ga, gb)
    assert info.flops == 2 * m * n * k


def test_fp8_gemm_rejections():
    a, b = torch.randn(4, 32).half(), torch.randn(32, 8).half()
    validate_fp8_gemm_inputs(a, b)
    with pytest.raises(ShapeMismatchError, match=r"^b: expected size 32 in dimension 0"):
        validate_fp8_gemm_inputs(a, torch.randn(31, 8).half())
    with pytest.raises(ShapeMismatchError, match=r"^a: expected 2 dimensions"):
        validate_fp8_gemm_inputs(a[None], b)
    with pytest.raises(UnsupportedDtypeError, match=r"^a: expected dtype"):
        validate_fp8_gemm_inputs(a.to(torch.int8), b)
    with pytest.raises(UnsupportedDtypeError, match=r"^a_scale: expected a scale tensor"):
        validate_fp8_gemm_inputs(a.to(torch.float8_e4m3fn), b)
    with pytest.raises(ShapeMismatchError, match=r"^a_scale"):
        validate_fp8_gemm_inputs(a.to(torch.float8_e4m3fn), b, a_scale=torch.ones(3))
    with pytest.raises(ShapeMismatchError, match=r"^b_scale"):
        validate_fp8_gemm_inputs(a, b.to(torch.float8_e4m3fn), b_scale=torch.ones(7))
    with pytest.raises(UnsupportedDtypeError, match=r"^a_scale"):
        validate_fp8_gemm_inputs(a, b, a_scale=torch.ones(1, dtype=torch.float16))
    with pytest.raises(ShapeMismatchError, match=r"^bias"):
        validate_fp8_gemm_inputs(a, b, bias=torch.randn(9).half())
    with pytest.raises(UnsupportedDtypeError, match=r"^out_dtype"):
        validate_fp8_gemm_inputs(a, b, out_dtype=torch.int32)
    with pytest.raises(DeviceMismatchError, match=r"^b"):
        validate_fp8_gemm_inputs(a, b.to("meta"))
