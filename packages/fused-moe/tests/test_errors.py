"""Bad input raises the shared named exceptions, naming the argument; fuzzed arguments give a named error or a
result, never a crash."""

from __future__ import annotations

import pytest
import torch
from _moe_helpers import make_moe
from fused_moe import FusedMoE, fused_moe, moe_experts, moe_route
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_ops_core.exceptions import (
    DeviceMismatchError,
    InvalidArgumentError,
    LayoutError,
    ShapeMismatchError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
)
from triton_ops_core.testing import TENSOR_MUTATIONS, device_for_tests, mutate, named_error_or_result

DEVICE = device_for_tests()


@pytest.fixture
def moe(device):
    return list(make_moe(3, 16, 8, 4, device=device, seed=0))


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_expert_counts_and_top_k(moe):
    x, rw, rb, w1, b1, w2, b2 = moe
    _raises(ShapeMismatchError, "router_weight", fused_moe, x, rw[:3], rb[:3], w1, b1, w2, b2, 2)
    _raises(ShapeMismatchError, "down_proj", fused_moe, x, rw, rb, w1, b1, w2[:3], b2, 2)
    _raises(ShapeMismatchError, "gate_up_proj_bias", fused_moe, x, rw, rb, w1, b1[:3], w2, b2, 2)
    _raises(ShapeMismatchError, "down_proj_bias", fused_moe, x, rw, rb, w1, b1, w2, b2[:, :5], 2)
    _raises(ShapeMismatchError, "router_bias", fused_moe, x, rw, rb[:2], w1, b1, w2, b2, 2)
    _raises(InvalidArgumentError, "top_k", fused_moe, x, rw, rb, w1, b1, w2, b2, 5)
    _raises(InvalidArgumentError, "top_k", fused_moe, x, rw, rb, w1, b1, w2, b2, 0)
    _raises(InvalidArgumentError, "top_k", fused_moe, x, rw, rb, w1, b1, w2, b2, True)


def test_shapes(moe):
    x, rw, rb, w1, b1, w2, b2 = moe
    _raises(ShapeMismatchError, "router_weight", fused_moe, x, rw[:, :8], rb, w1, b1, w2, b2, 2)
    _raises(ShapeMismatchError, "gate_up_proj", fused_moe, x, rw, rb, w1[:, :8], b1, w2, b2, 2)
    _raises(ShapeMismatchError, "gate_up_proj", fused_moe, x, rw, rb, w1[..., :15], b1[:, :15], w2, b2, 2)
    _raises(ShapeMismatchError, "down_proj", fused_moe, x, rw, rb, w1, b1, w2[:, :4], b2, 2)
    _raises(ShapeMismatchError, "down_proj", fused_moe, x, rw, rb, w1, b1, w2[0], b2, 2)
    _raises(ShapeMismatchError, "hidden", fused_moe, x[:, :0], rw[:, :0], rb, w1[:, :0], b1, w2[..., :0],
            b2[:, :0], 2)
    # transposed=False expects [E, 2I, H] / [E, H, I]: gpt-oss's tensors do not fit
    _raises(ShapeMismatchError, "down_proj|gate_up_proj", fused_moe, x, rw, rb, w1, b1, w2, b2, 2, transposed=False)


def test_routing_arguments_of_moe_experts(moe):
    x, rw, rb, w1, b1, w2, b2 = moe
    ids, wts = moe_route(x, rw, rb, 2)
    _raises(UnsupportedDtypeError, "topk_ids", moe_experts, x, ids.float(), wts, w1, b1, w2, b2)
    _raises(UnsupportedDtypeError, "topk_weights", moe_experts, x, ids, wts.long(), w1, b1, w2, b2)
    _raises(ShapeMismatchError, "topk_ids", moe_experts, x, ids[:2], wts, w1, b1, w2, b2)
    _raises(ShapeMismatchError, "topk_weights", moe_experts, x, ids, wts[:, :1], w1, b1, w2, b2)
    _raises(InvalidArgumentError, "top_k", moe_experts, x, torch.zeros(3, 5, dtype=torch.int32, device=x.device),
            torch.zeros(3, 5, device=x.device), w1, b1, w2, b2)


def test_dtypes(moe):
    x, rw, rb, w1, b1, w2, b2 = moe
    _raises(UnsupportedDtypeError, "hidden", fused_moe, x.double(), rw.double(), rb, w1, b1, w2, b2, 2)
    _raises(UnsupportedDtypeError, "hidden", fused_moe, x.to(torch.int32), rw, rb, w1, b1, w2, b2, 2)
    _raises(UnsupportedDtypeError, "router_weight", fused_moe, x, rw.bfloat16(), rb, w1, b1, w2, b2, 2)
    _raises(UnsupportedDtypeError, "gate_up_proj", fused_moe, x, rw, rb, w1.bfloat16(), b1, w2, b2, 2)
    _raises(UnsupportedDtypeError, "down_proj", fused_moe, x, rw, rb, w1, b1, w2.half(), b2, 2)
    _raises(UnsupportedDtypeError, "gate_up_proj_bias", fused_moe, x, rw, rb, w1, b1.long(), w2, b2, 2)


def test_layout_device_and_options(moe):
    x, rw, rb, w1, b1, w2, b2 = moe
    _raises(LayoutError, "hidden", fused_moe, torch.stack([x, x], -1)[..., 0], rw, rb, w1, b1, w2, b2, 2)
    _raises(LayoutError, "router_weight", fused_moe, x, torch.stack([rw, rw], -1)[..., 0], rb, w1, b1, w2, b2, 2)
    _raises(DeviceMismatchError, "router_bias", fused_moe, x, rw, rb.to("meta"), w1, b1, w2, b2, 2)
    _raises(UnsupportedDeviceError, "hidden", fused_moe, x.to("meta"), rw.to("meta"), rb, w1, b1, w2, b2, 2)
    _raises(InvalidArgumentError, "activation", fused_moe, x, rw, rb, w1, b1, w2, b2, 2, "relu")
    _raises(InvalidArgumentError, "gate_up_layout", fused_moe, x, rw, rb, w1, b1, w2, b2, 2, gate_up_layout="split")
    _raises(InvalidArgumentError, "transposed", fused_moe, x, rw, rb, w1, b1, w2, b2, 2, transposed=1)
    _raises(InvalidArgumentError, "renormalize", fused_moe, x, rw, rb, w1, b1, w2, b2, 2, renormalize="yes")
    _raises(InvalidArgumentError, "limit", fused_moe, x, rw, rb, w1, b1, w2, b2, 2, limit=0.0)
    _raises(InvalidArgumentError, "alpha", fused_moe, x, rw, rb, w1, b1, w2, b2, 2, alpha=float("nan"))
    _raises(InvalidArgumentError, "gate_up_proj", fused_moe, x, rw, rb, w1.tolist(), b1, w2, b2, 2)


def test_module_arguments():
    _raises(InvalidArgumentError, "top_k", FusedMoE, 16, 8, 4, 5)
    _raises(InvalidArgumentError, "hidden_dim", FusedMoE, 0, 8, 4, 2)
    _raises(InvalidArgumentError, "activation", FusedMoE, 16, 8, 4, 2, activation="relu")
    _raises(InvalidArgumentError, "GptOssMLP", FusedMoE.from_module, torch.nn.Linear(2, 2))


@settings(max_examples=10)
@given(which=st.integers(0, 6), how=st.sampled_from(TENSOR_MUTATIONS))
def test_a_spoiled_argument_is_a_named_error_or_a_result(which, how):
    args = list(make_moe(3, 16, 8, 4, device=DEVICE, seed=1))
    args[which] = mutate(args[which], how)
    out = named_error_or_result(fused_moe, *args, 2)
    if out is not None:
        assert out.shape[-1] == 16
