"""The op validators of this package accept good inputs and reject each bad one with the right exception,
naming the argument."""

import pytest
import torch
from fused_rmsnorm_rope.validation import validate_qk_norm_rope_inputs, validate_rmsnorm_rope_inputs
from hypothesis import given
from hypothesis import strategies as st
from triton_ops_core.exceptions import (
    DeviceMismatchError,
    InvalidArgumentError,
    ShapeMismatchError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
)

FLOATS = st.sampled_from([torch.float16, torch.bfloat16, torch.float32])
BAD_DTYPES = st.sampled_from([torch.int32, torch.float64, torch.int8, torch.bool])


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------- RMSNorm + RoPE

@st.composite
def rope_case(draw):
    head_dim = draw(st.sampled_from([2, 4, 8, 16]))
    heads = draw(st.integers(1, 4))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    seq = draw(st.integers(1, 5))
    dtype = draw(FLOATS)
    x = torch.randn(*lead, seq, heads * head_dim).to(dtype)
    weight = torch.randn(heads * head_dim).to(dtype)
    cos, sin = torch.randn(seq, head_dim).to(dtype), torch.randn(seq, head_dim).to(dtype)
    return x, weight, cos, sin


@given(rope_case())
def test_rmsnorm_rope_accepts_good_inputs(case):
    x, weight, cos, sin = case
    info = validate_rmsnorm_rope_inputs(x, weight, cos, sin)
    assert info.hidden_dim == x.shape[-1]
    assert info.head_dim == cos.shape[1]
    assert info.num_heads * info.head_dim == info.hidden_dim
    assert info.num_tokens * info.hidden_dim == x.numel()


@given(rope_case(), st.integers(1, 3))
def test_rmsnorm_rope_rejects_wrong_weight_length(case, extra):
    x, weight, cos, sin = case
    with pytest.raises(ShapeMismatchError, match=r"^weight"):
        validate_rmsnorm_rope_inputs(x, torch.randn(weight.numel() + extra).to(weight.dtype), cos, sin)


@given(rope_case(), BAD_DTYPES)
def test_rmsnorm_rope_rejects_bad_dtype(case, bad):
    x, weight, cos, sin = case
    with pytest.raises(UnsupportedDtypeError, match=r"^x"):
        validate_rmsnorm_rope_inputs(x.to(bad), weight, cos, sin)


@given(rope_case())
def test_rmsnorm_rope_rejects_head_dim_not_dividing_hidden(case):
    x, weight, cos, sin = case
    bad_head = x.shape[-1] + 2
    bad = torch.randn(cos.shape[0], bad_head).to(cos.dtype)
    with pytest.raises(ShapeMismatchError, match=r"^x: .*head_dim"):
        validate_rmsnorm_rope_inputs(x, weight, bad, bad)


@given(rope_case())
def test_rmsnorm_rope_rejects_cos_sin_mismatch_and_wrong_seq(case):
    x, weight, cos, sin = case
    with pytest.raises(ShapeMismatchError, match=r"^sin"):
        validate_rmsnorm_rope_inputs(x, weight, cos, sin[:, : cos.shape[1] // 2])
    longer = torch.randn(cos.shape[0] + 1, cos.shape[1]).to(cos.dtype)
    with pytest.raises(ShapeMismatchError, match=r"^cos"):
        validate_rmsnorm_rope_inputs(x, weight, longer, longer)


@given(rope_case(), st.integers(-3, 40))
def test_rmsnorm_rope_rotary_dim(case, rotary_dim):
    x, weight, cos, sin = case
    head_dim = cos.shape[1]
    if 0 < rotary_dim <= head_dim and rotary_dim % 2 == 0:
        assert validate_rmsnorm_rope_inputs(x, weight, cos, sin, rotary_dim=rotary_dim).rotary_dim == rotary_dim
    else:
        with pytest.raises(ShapeMismatchError, match=r"^rotary_dim"):
            validate_rmsnorm_rope_inputs(x, weight, cos, sin, rotary_dim=rotary_dim)


def test_rmsnorm_rope_misc_rejections(monkeypatch):
    x, w, c = torch.randn(2, 3, 8), torch.randn(8), torch.randn(3, 4)
    with pytest.raises(UnsupportedDtypeError, match=r"^sin"):
        validate_rmsnorm_rope_inputs(x, w, c, c.double())
    with pytest.raises(DeviceMismatchError, match=r"^weight"):
        validate_rmsnorm_rope_inputs(x, w.to("meta"), c, c)
    with pytest.raises(InvalidArgumentError, match=r"^eps"):
        validate_rmsnorm_rope_inputs(x, w, c, c, eps=-1.0)
    with pytest.raises(ShapeMismatchError, match=r"^x"):
        validate_rmsnorm_rope_inputs(torch.randn(8), w, c, c)
    with pytest.raises(UnsupportedDtypeError, match=r"^position_ids"):
        validate_rmsnorm_rope_inputs(x, w, c, c, position_ids=torch.zeros(2, 3))
    with pytest.raises(ShapeMismatchError, match=r"^position_ids"):
        validate_rmsnorm_rope_inputs(x, w, c, c, position_ids=torch.zeros(2, 4, dtype=torch.long))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedDeviceError, match=r"^x: expected a CUDA tensor"):
            validate_rmsnorm_rope_inputs(x, w, c, c)


# ---------------------------------------------------------------- QK-norm + RoPE

@st.composite
def qk_case(draw):
    head_dim = draw(st.sampled_from([4, 8, 16]))
    q_heads = draw(st.integers(1, 4))
    kv_heads = draw(st.integers(1, q_heads))
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    dtype = draw(FLOATS)
    packed = draw(st.booleans())
    if packed:  # q and k as strided views of one packed QKV projection output
        qkv = torch.randn(batch, seq, (q_heads + 2 * kv_heads) * head_dim).to(dtype)
        q = qkv[..., : q_heads * head_dim].view(batch, seq, q_heads, head_dim)
        k = qkv[..., q_heads * head_dim: (q_heads + kv_heads) * head_dim].view(batch, seq, kv_heads, head_dim)
    else:
        q = torch.randn(batch, seq, q_heads, head_dim).to(dtype)
        k = torch.randn(batch, seq, kv_heads, head_dim).to(dtype)
    w = torch.randn(head_dim).to(dtype)
    cos, sin = torch.randn(seq, head_dim).to(dtype), torch.randn(seq, head_dim).to(dtype)
    return q, k, w, w.clone(), cos, sin


@given(qk_case())
def test_qk_norm_rope_accepts_good_inputs(case):

    q, k, qw, kw, cos, sin = case
    info = validate_qk_norm_rope_inputs(q, k, qw, kw, cos, sin)
    assert (info.num_q_heads, info.num_kv_heads, info.head_dim) == (q.shape[2], k.shape[2], q.shape[3])
    assert info.seq_len == q.shape[1] and info.num_tokens == q.shape[0] * q.shape[1]


@given(qk_case(), BAD_DTYPES)
def test_qk_norm_rope_rejections(case, bad):

    q, k, qw, kw, cos, sin = case
    with pytest.raises(UnsupportedDtypeError, match=r"^q"):
        validate_qk_norm_rope_inputs(q.to(bad), k, qw, kw, cos, sin)
    other = torch.float16 if q.dtype != torch.float16 else torch.bfloat16
    with pytest.raises(UnsupportedDtypeError, match=r"^k"):
        validate_qk_norm_rope_inputs(q, k.to(other), qw, kw, cos, sin)
    with pytest.raises(ShapeMismatchError, match=r"^k"):
        validate_qk_norm_rope_inputs(q, torch.randn(*k.shape[:-1], k.shape[-1] * 2).to(k.dtype), qw, kw, cos, sin)
    with pytest.raises(ShapeMismatchError, match=r"^k"):
        validate_qk_norm_rope_inputs(q, k[:, :-1] if k.shape[1] > 1 else torch.cat([k, k], 1), qw, kw, cos, sin)
    with pytest.raises(ShapeMismatchError, match=r"^q_weight"):
        validate_qk_norm_rope_inputs(q, k, torch.randn(q.shape[-1] + 1).to(qw.dtype), kw, cos, sin)
    with pytest.raises(ShapeMismatchError, match=r"^q"):
        validate_qk_norm_rope_inputs(q[0, 0], k[0, 0], qw, kw, cos, sin)
    with pytest.raises(DeviceMismatchError, match=r"^k_weight"):
        validate_qk_norm_rope_inputs(q, k, qw, kw.to("meta"), cos, sin)
