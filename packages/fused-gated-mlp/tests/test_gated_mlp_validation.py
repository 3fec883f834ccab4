"""The gated MLP's validator accepts good inputs and rejects each bad one with the right exception, naming the
argument."""

import pytest
import torch
from fused_gated_mlp.validation import validate_gated_mlp_inputs
from hypothesis import assume, given
from hypothesis import strategies as st
from triton_ops_core.exceptions import (
    DeviceMismatchError,
    InvalidArgumentError,
    ShapeMismatchError,
    UnsupportedDtypeError,
)

FLOATS = st.sampled_from([torch.float16, torch.bfloat16, torch.float32])
BAD_DTYPES = st.sampled_from([torch.int32, torch.float64, torch.int8, torch.bool])


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------- gated MLP

@st.composite
def mlp_case(draw):
    m, h, i = draw(st.integers(1, 5)), draw(st.integers(1, 12)), draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    return torch.randn(m, h).to(dtype), torch.randn(i, h).to(dtype), torch.randn(i, h).to(dtype)


@given(mlp_case())
def test_gated_mlp_accepts_good_inputs(case):
    x, wg, wu = case
    info = validate_gated_mlp_inputs(x, wg, wu, "silu")
    assert (info.num_tokens, info.hidden_dim, info.intermediate_dim) == (x.shape[0], x.shape[1], wg.shape[0])
    packed = validate_gated_mlp_inputs(x, torch.cat([wg, wu]), None, "gelu", weight_layout="concatenated")
    assert packed.intermediate_dim == wg.shape[0]


@given(mlp_case(), st.integers(1, 3))
def test_gated_mlp_rejects_shape_mismatch(case, extra):
    x, wg, wu = case
    with pytest.raises(ShapeMismatchError, match=r"^up_weight"):
        validate_gated_mlp_inputs(x, wg, torch.randn(wu.shape[0] + extra, wu.shape[1]).to(wu.dtype))
    with pytest.raises(ShapeMismatchError, match=r"^gate_weight"):
        validate_gated_mlp_inputs(x, torch.randn(wg.shape[0], wg.shape[1] + extra).to(wg.dtype), wu)


@given(mlp_case(), st.text(min_size=1, max_size=8))
def test_gated_mlp_rejects_unknown_activation(case, name):
    assume(name not in ("silu", "gelu", "gelu_tanh", "swiglu_oai"))
    x, wg, wu = case
    with pytest.raises(InvalidArgumentError, match=r"^activation"):
        validate_gated_mlp_inputs(x, wg, wu, name)


@given(mlp_case())
def test_gated_mlp_rejects_dtype_and_device_mismatch(case):
    x, wg, wu = case
    other = torch.float16 if x.dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(UnsupportedDtypeError, match=r"^up_weight"):
        validate_gated_mlp_inputs(x, wg, wu.to(other))
    with pytest.raises(DeviceMismatchError, match=r"^gate_weight"):
        validate_gated_mlp_inputs(x, wg.to("meta"), wu)


def test_gated_mlp_bias_and_packed_rejections():
    x, wg, wu = torch.randn(2, 8).half(), torch.randn(6, 8).half(), torch.randn(6, 8).half()
    with pytest.raises(ShapeMismatchError, match=r"^gate_bias"):
        validate_gated_mlp_inputs(x, wg, wu, gate_bias=torch.randn(5).half())
    with pytest.raises(ShapeMismatchError, match=r"^gate_weight"):
        validate_gated_mlp_inputs(x, torch.randn(7, 8).half(), None, weight_layout="interleaved")
    with pytest.raises(InvalidArgumentError, match=r"^up_weight"):
        validate_gated_mlp_inputs(x, torch.cat([wg, wu]), wu, weight_layout="concatenated")
    with pytest.raises(InvalidArgumentError, match=r"^weight_layout"):
        validate_gated_mlp_inputs(x, wg, wu, weight_layout="zigzag")
