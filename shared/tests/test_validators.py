"""Every kernel validator accepts good inputs and rejects each bad one with the right exception, naming the argument."""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from triton_ops_core import (
    DeviceMismatchError,
    InvalidArgumentError,
    ShapeMismatchError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
    validate_fp8_gemm_inputs,
    validate_gated_mlp_inputs,
    validate_rmsnorm_rope_inputs,
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
    from triton_ops_core import validate_qk_norm_rope_inputs

    q, k, qw, kw, cos, sin = case
    info = validate_qk_norm_rope_inputs(q, k, qw, kw, cos, sin)
    assert (info.num_q_heads, info.num_kv_heads, info.head_dim) == (q.shape[2], k.shape[2], q.shape[3])
    assert info.seq_len == q.shape[1] and info.num_tokens == q.shape[0] * q.shape[1]


@given(qk_case(), BAD_DTYPES)
def test_qk_norm_rope_rejections(case, bad):
    from triton_ops_core import validate_qk_norm_rope_inputs

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
