"""Bad input raises the shared named exceptions, naming the argument; fuzzed arguments give a named error or a
result, never a crash."""

from __future__ import annotations

import pytest
import torch
from _attention_helpers import make_qkv
from decode_attention import decode_attention
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
def qkv(device):
    return make_qkv(2, 4, 2, 1, 10, 16, device=device, seed=0)


def _raises(exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match):
        decode_attention(*args, **kwargs)


def test_shapes(qkv):
    q, k, v = qkv
    _raises(ShapeMismatchError, "q: expected a multiple of 2", q[:, :3], k, v)  # heads not a multiple
    _raises(ShapeMismatchError, "v: expected the shape of k", q, k, v[:, :, :9])
    _raises(ShapeMismatchError, "k: expected batch 2", q, k[:1], v[:1])
    _raises(ShapeMismatchError, "k: expected head dim 16", q, k[..., :8], v[..., :8])
    _raises(ShapeMismatchError, "q: expected 4 dimensions", q[0], k, v)
    _raises(ShapeMismatchError, "k: expected at least one KV head", q, k[:, :0], v[:, :0])
    big = torch.zeros(1, 1, 1, 512, device=q.device)
    _raises(ShapeMismatchError, "head dim", big, big, big)


def test_mask_shapes_and_dtypes(qkv):
    q, k, v = qkv
    _raises(ShapeMismatchError, "attn_mask", q, k, v, torch.ones(2, 1, 1, 9, dtype=torch.bool, device=q.device))
    _raises(ShapeMismatchError, "attn_mask", q, k, v, torch.ones(3, 1, 1, 10, dtype=torch.bool, device=q.device))
    _raises(ShapeMismatchError, "attn_mask", q, k, v, torch.ones(2, 2, 1, 10, dtype=torch.bool, device=q.device))
    _raises(ShapeMismatchError, "attn_mask", q, k, v, torch.ones(1, 2, 4, 1, 10, dtype=torch.bool, device=q.device))
    _raises(ShapeMismatchError, "attn_mask", q, k, v, torch.tensor(True, device=q.device))
    _raises(UnsupportedDtypeError, "attn_mask", q, k, v, torch.ones(2, 1, 1, 10, dtype=torch.int32, device=q.device))
    _raises(UnsupportedDtypeError, "attn_mask", q, k, v, torch.ones(10, dtype=torch.float64, device=q.device))
    _raises(InvalidArgumentError, "attn_mask", q, k, v, [[True] * 10])


def test_dtypes_devices_and_layouts(qkv):
    q, k, v = qkv
    _raises(UnsupportedDtypeError, "q", q.double(), k.double(), v.double())
    _raises(UnsupportedDtypeError, "k", q, k.half(), v.half())
    _raises(UnsupportedDtypeError, "v", q, k, v.half())
    _raises(UnsupportedDtypeError, "q", q.int(), k, v)
    _raises(UnsupportedDeviceError, "q", q.to("meta"), k.to("meta"), v.to("meta"))
    _raises(DeviceMismatchError, "k", q, k.to("meta"), v)
    _raises(DeviceMismatchError, "sinks", q, k, v, sinks=torch.zeros(4, device="meta"))
    _raises(LayoutError, "k", q, torch.stack([k, k], -1)[..., 0], v)
    _raises(LayoutError, "q", torch.stack([q, q], -1)[..., 0], k, v)
    _raises(InvalidArgumentError, "v", q, k, v.tolist())


def test_options(qkv):
    q, k, v = qkv
    _raises(ShapeMismatchError, "sinks: expected 4", q, k, v, sinks=torch.zeros(2, device=q.device))
    _raises(ShapeMismatchError, "sinks", q, k, v, sinks=torch.zeros(1, 4, device=q.device))
    _raises(UnsupportedDtypeError, "sinks", q, k, v, sinks=torch.zeros(4, dtype=torch.int64, device=q.device))
    _raises(InvalidArgumentError, "sliding_window", q, k, v, sliding_window=0)
    _raises(InvalidArgumentError, "sliding_window", q, k, v, sliding_window=True)
    _raises(InvalidArgumentError, "sliding_window", q, k, v, sliding_window=2.5)
    _raises(InvalidArgumentError, "num_splits", q, k, v, num_splits=0)
    _raises(InvalidArgumentError, "scale", q, k, v, scale=float("nan"))
    _raises(InvalidArgumentError, "scale", q, k, v, scale="0.1")
    _raises(InvalidArgumentError, "is_causal", q, k, v, is_causal=1)
    decode_attention(q, k, v, sliding_window=1)  # a valid call of the same signature is cached...
    _raises(InvalidArgumentError, "sliding_window", q, k, v, sliding_window=True)  # ...and never excuses True


@settings(max_examples=10)
@given(which=st.integers(0, 3), how=st.sampled_from(TENSOR_MUTATIONS))
def test_a_spoiled_argument_is_a_named_error_or_a_result(which, how):
    q, k, v = make_qkv(2, 4, 2, 1, 10, 16, device=DEVICE, seed=1)
    args = [q, k, v, torch.ones(2, 1, 1, 10, dtype=torch.bool, device=DEVICE)]
    args[which] = mutate(args[which], how)
    out = named_error_or_result(decode_attention, *args)
    if out is not None:
        assert out.shape[-1] == args[0].shape[-1]
