"""apply_rope (torch.ops.triton_ops.rope / rope_ / rope_backward): RoPE alone on q and k in one launch, GQA head
counts, positions, in place on views of a packed QKV output, opcheck, torch.compile, gradients."""

from __future__ import annotations

import pytest
import torch
from _rope_helpers import DEVICE, TOL, f64, rope_tables
from fused_rmsnorm_rope import apply_rope, rope_reference
from hypothesis import given
from hypothesis import strategies as st
from triton_ops_core.exceptions import InvalidArgumentError, LayoutError, ShapeMismatchError
from triton_ops_core.testing import assert_close_rel, opcheck_op


def _rotate_half(x):
    # transformers' rotate_half, written out: the formula the models use
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _hf_rope(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb on [batch, seq, heads, d] tensors with per-token [batch, seq, d] tables,
    in float64."""
    c, s = cos.double().unsqueeze(-2), sin.double().unsqueeze(-2)
    q, k = q.double(), k.double()
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def _packed(lead, hq, hk, d, dtype, device=DEVICE):
    """q, k (views) and the packed [*lead, (hq + 2 hk) * d] buffer they live in, as an attention layer splits it."""
    qkv = torch.randn(*lead, (hq + 2 * hk) * d, device=device).to(dtype)
    q = qkv[..., : hq * d].unflatten(-1, (hq, d))
    k = qkv[..., hq * d: (hq + hk) * d].unflatten(-1, (hk, d))
    return qkv, q, k


def _check(qo, ko, q, k, cos, sin, pos=None, **opts):
    rq, rk = rope_reference(f64(q), f64(k), f64(cos), f64(sin), pos, **opts)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == q.dtype and ko.dtype == k.dtype
    assert_close_rel(qo, rq, TOL[q.dtype], "q")
    assert_close_rel(ko, rk, TOL[k.dtype], "k")


@st.composite
def rope_cases(draw):
    head_dim = draw(st.sampled_from([4, 8, 16, 32]))
    kv_heads = draw(st.integers(1, 3))
    return {
        "head_dim": head_dim, "kv_heads": kv_heads, "q_heads": kv_heads * draw(st.integers(1, 4)),
        "batch": draw(st.integers(1, 3)), "seq": draw(st.integers(1, 4)),
        "dtype": draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32])),
        "layout": draw(st.sampled_from(["neox", "interleaved"])),
        "rotary_dim": draw(st.one_of(st.none(), st.integers(1, head_dim // 2).map(lambda r: 2 * r))),
        "packed": draw(st.booleans()), "tables": draw(st.sampled_from(["seq", "positions", "per_token"])),
    }


@given(rope_cases())
def test_matches_float64_reference(c):
    d, hq, hk, b, s = c["head_dim"], c["q_heads"], c["kv_heads"], c["batch"], c["seq"]
    if c["packed"]:
        _, q, k = _packed((b, s), hq, hk, d, c["dtype"])
    else:
        q = torch.randn(b, s, hq, d, device=DEVICE).to(c["dtype"])
        k = torch.randn(b, s, hk, d, device=DEVICE).to(c["dtype"])
    width = d if c["rotary_dim"] is None else c["rotary_dim"]
    pos = None
    if c["tables"] == "positions":
        cos, sin = rope_tables(11, width, device=DEVICE, random=True)
        pos = torch.randint(0, 11, (b, s), device=DEVICE)
    elif c["tables"] == "per_token":  # [batch, seq, rot]: what transformers' rotary embedding returns
        cos, sin = (torch.randn(b, s, width, device=DEVICE) for _ in range(2))
    else:
        cos, sin = rope_tables(s, width, device=DEVICE, random=True)
    opts = {"rotary_dim": c["rotary_dim"], "layout": c["layout"]}
    q0, k0 = q.clone(), k.clone()
    qo, ko = apply_rope(q, k, cos, sin, pos, **opts)
    assert torch.equal(q, q0) and torch.equal(k, k0)  # out of place leaves the inputs alone
    _check(qo, ko, q, k, cos, sin, pos, **opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_like_gqa_equals_transformers_rotate_half_formula(device, dtype):
    # 8 query heads, 2 key/value heads of 32, per-token tables from real frequencies at decode positions
    b, s, hq, hk, d = 2, 3, 8, 2, 32
    _, q, k = _packed((b, s), hq, hk, d, dtype, device)
    table_cos, table_sin = rope_tables(64, d, device=device)
    pos = torch.tensor([[5, 6, 7], [40, 41, 42]], device=device)
    cos, sin = table_cos[pos].to(dtype), table_sin[pos].to(dtype)  # [b, s, d], in the model's dtype
    qo, ko = apply_rope(q, k, cos, sin)
    rq, rk = _hf_rope(q, k, cos, sin)
    assert_close_rel(qo, rq, TOL[dtype], "q")
    assert_close_rel(ko, rk, TOL[dtype], "k")
    # the same through the position ids and the 2-D table
    qp, kp = apply_rope(q, k, table_cos.to(dtype), table_sin.to(dtype), pos)
    assert torch.equal(qp, qo) and torch.equal(kp, ko)


def test_equals_transformers_apply_rotary_pos_emb(device):
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    q = torch.randn(2, 4, 4, 16, device=device)
    k = torch.randn(2, 4, 2, 16, device=device)
    cos, sin = (t[None].expand(2, -1, -1) for t in rope_tables(4, 16, device=device))
    rq, rk = modeling.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    qo, ko = apply_rope(q, k, cos, sin)
    torch.testing.assert_close(qo, rq.transpose(1, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ko, rk.transpose(1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_on_packed_qkv_views(device, dtype):
    hq, hk, d = 4, 2, 16
    qkv, q, k = _packed((2, 3), hq, hk, d, dtype, device)
    cos, sin = rope_tables(32, d, dtype, device)
    pos = torch.tensor([[0, 1, 2], [29, 30, 31]], device=device)
    before = qkv.clone()
    qo, ko = apply_rope(q, k, cos, sin, pos)
    assert torch.equal(qkv, before)
    ret = apply_rope(q, k, cos, sin, pos, inplace=True)
    assert ret[0] is q and ret[1] is k
    assert torch.equal(q, qo) and torch.equal(k, ko)
    assert torch.equal(qkv[..., (hq + hk) * d:], before[..., (hq + hk) * d:])  # v untouched
    _check(q, k, before[..., : hq * d].unflatten(-1, (hq, d)),
           before[..., hq * d: (hq + hk) * d].unflatten(-1, (hk, d)), cos, sin, pos)


def test_in_place_on_permuted_views_writes_back(device):
    q = torch.randn(3, 2, 4, 2, 8, device=device).permute(1, 0, 2, 3, 4)  # batch dims need a copy
    k = torch.randn(2, 3, 4, 1, 8, device=device)
    cos, sin = rope_tables(4, 8, device=device, random=True)
    qo, ko = apply_rope(q, k, cos, sin)
    apply_rope(q, k, cos, sin, inplace=True)
    assert torch.equal(q, qo) and torch.equal(k, ko)


def test_partial_rotary_passes_the_tail_through(device):
    q, k = torch.randn(1, 2, 3, 16, device=device), torch.randn(1, 2, 1, 16, device=device)
    cos, sin = rope_tables(2, 16, device=device, random=True)
    qo, ko = apply_rope(q, k, cos, sin, rotary_dim=6)
    assert torch.equal(qo[..., 6:], q[..., 6:]) and torch.equal(ko[..., 6:], k[..., 6:])
    _check(qo, ko, q, k, cos, sin, rotary_dim=6)


def test_nan_and_bad_positions_stay_in_their_token(device):
    q = torch.randn(1, 3, 2, 8, device=device)
    k = torch.randn(1, 3, 1, 8, device=device)
    q[0, 0, 1, 2] = float("nan")
    cos, sin = rope_tables(4, 8, device=device)
    pos = torch.tensor([[0, 9, 2]], device=device)  # 9 is outside the 4-row table
    qo, ko = apply_rope(q, k, cos, sin, pos)
    assert qo[0, 0, 1].isnan().any() and torch.isfinite(qo[0, 0, 0]).all()
    assert qo[0, 1].isnan().all() and ko[0, 1].isnan().all()  # the bad id poisons its token, reads nothing
    assert torch.isfinite(qo[0, 2]).all() and torch.isfinite(ko[0, ::2]).all()


@pytest.mark.parametrize("layout,rotary_dim", [("neox", None), ("interleaved", 6)])
def test_gradients_match_float64_autograd(device, layout, rotary_dim):
    q = torch.randn(2, 3, 4, 8, device=device, requires_grad=True)
    k = torch.randn(2, 3, 2, 8, device=device, requires_grad=True)
    cos, sin = rope_tables(7, 8, device=device, random=True)  # random tables: halves differ, the transpose is exact
    pos = torch.randint(0, 7, (2, 3), device=device)
    qo, ko = apply_rope(q, k, cos, sin, pos, rotary_dim=rotary_dim, layout=layout)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk), retain_graph=True)
    leaves = [t.detach().double().requires_grad_() for t in (q, k)]
    rq, rk = rope_reference(*leaves, cos.double(), sin.double(), pos, rotary_dim=rotary_dim, layout=layout)
    rdq, rdk = torch.autograd.grad((rq, rk), leaves, (gq.double(), gk.double()))
    assert dq.dtype == q.dtype
    assert_close_rel(dq, rdq, 1e-5, "dq")
    assert_close_rel(dk, rdk, 1e-5, "dk")
    # second order: dq = R^T gq is linear in gq, so d<dq, h>/d(gq) = R h, the rotation itself
    gq.requires_grad_()
    gk.requires_grad_()
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk), create_graph=True)
    hq, hk = torch.randn_like(dq), torch.randn_like(dk)
    ggq, ggk = torch.autograd.grad((dq, dk), (gq, gk), (hq, hk))
    rhq, rhk = rope_reference(hq.double(), hk.double(), cos.double(), sin.double(), pos, rotary_dim=rotary_dim,
                              layout=layout)
    assert_close_rel(ggq, rhq, 1e-5, "double backward q")
    assert_close_rel(ggk, rhk, 1e-5, "double backward k")


def test_only_one_output_in_the_loss(device):
    q = torch.randn(1, 2, 2, 8, device=device, requires_grad=True)
    k = torch.randn(1, 2, 1, 8, device=device, requires_grad=True)
    cos, sin = rope_tables(2, 8, device=device)
    qo, _ = apply_rope(q, k, cos, sin)
    qo.square().sum().backward()
    assert k.grad is None or not k.grad.any()
    rq, _ = rope_reference(q.detach().double(), k.detach().double(), cos.double(), sin.double())
    torch.testing.assert_close(q.grad.double(), 2 * _transpose_rotate(rq, cos.double(), sin.double()), rtol=1e-5,
                               atol=1e-6)


def _transpose_rotate(g, cos, sin):
    # the adjoint of y = x c + rotate_half(x) s with halves-repeated tables: g c - rotate_half(g) s
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return g * c - _rotate_half(g) * s


# ----------------------------------------------------------------------------------------------------------------
# Registered ops
# ----------------------------------------------------------------------------------------------------------------

def test_ops_are_registered_with_the_mutation_in_the_schema():
    for name in ("rope", "rope_", "rope_backward"):
        assert isinstance(getattr(torch.ops.triton_ops, name).default, torch._ops.OpOverload), name
    schema = str(torch.ops.triton_ops.rope_.default._schema)
    assert "Tensor(a0!) q" in schema and "Tensor(a1!) k" in schema


@pytest.mark.parametrize("requires_grad,packed,positions", [(False, True, True), (True, False, False)])
def test_opcheck_rope(requires_grad, packed, positions):
    if packed:
        _, q, k = _packed((2, 3), 4, 2, 8, torch.float32)
    else:
        q, k = torch.randn(2, 3, 4, 8, device=DEVICE), torch.randn(2, 3, 2, 8, device=DEVICE)
    if requires_grad:  # a leaf each: the packed views become leaves of their own
        q, k = (t.detach().clone().requires_grad_() for t in (q, k))
    cos, sin = rope_tables(9 if positions else 3, 8, device=DEVICE)
    pos = torch.randint(0, 9, (2, 3), device=DEVICE) if positions else None
    opcheck_op(torch.ops.triton_ops.rope.default, (q, k, cos, sin, pos, None, "neox"))


def test_opcheck_rope_inplace_and_backward():
    _, q, k = _packed((2, 3), 4, 2, 8, torch.float32)
    cos, sin = rope_tables(3, 8, device=DEVICE, random=True)
    opcheck_op(torch.ops.triton_ops.rope_.default, (q, k, cos, sin, None, 6, "interleaved"))
    opcheck_op(torch.ops.triton_ops.rope_backward.default,
               (torch.randn(2, 3, 4, 8, device=DEVICE), torch.randn(2, 3, 2, 8, device=DEVICE), cos, sin, None, None,
                "neox"))


def test_compiled_equals_eager_out_of_place_in_place_and_gradients():
    qkv, q, k = _packed((2, 3), 4, 2, 8, torch.float32)
    cos, sin = rope_tables(3, 8, device=DEVICE)
    eq, ek = apply_rope(q, k, cos, sin)

    cq, ck = torch.compile(lambda q, k: apply_rope(q, k, cos, sin), fullgraph=True, backend="aot_eager")(q, k)
    assert torch.equal(cq, eq) and torch.equal(ck, ek)

    def in_place(qkv):  # on the packed buffer's views, as the patched attention does
        q = qkv[..., :32].unflatten(-1, (4, 8))
        k = qkv[..., 32:48].unflatten(-1, (2, 8))
        apply_rope(q, k, cos, sin, inplace=True)
        return qkv.sum()

    buf = qkv.clone()
    torch.compile(in_place, fullgraph=True, backend="aot_eager")(buf)  # the mutation survives compilation
    assert torch.equal(buf[..., :32].unflatten(-1, (4, 8)), eq)
    assert torch.equal(buf[..., 32:48].unflatten(-1, (2, 8)), ek)
    assert torch.equal(buf[..., 48:], qkv[..., 48:])

    ql, kl = (t.detach().clone().requires_grad_() for t in (q, k))

    def loss(q, k):
        a, b = apply_rope(q, k, cos, sin)
        return a.square().sum() + (b * 3).sum()

    eager = torch.autograd.grad(loss(ql, kl), (ql, kl))
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(ql, kl), (ql, kl))
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------

def test_named_errors(device):
    q, k = torch.randn(1, 2, 4, 8, device=device), torch.randn(1, 2, 2, 8, device=device)
    cos, sin = rope_tables(2, 8, device=device)
    with pytest.raises(InvalidArgumentError, match=r"inplace: expected False when a gradient is wanted"):
        apply_rope(q.clone().requires_grad_(), k, cos, sin, inplace=True)
    with pytest.raises(InvalidArgumentError, match=r"inplace: expected a bool"):
        apply_rope(q, k, cos, sin, inplace=1)
    with pytest.raises(ShapeMismatchError, match=r"k: expected leading dimensions \[1, 2\]"):
        apply_rope(q, k[:, :1], cos, sin)
    with pytest.raises(ShapeMismatchError, match=r"k: .*q's head_dim"):
        apply_rope(q, k[..., :4], cos, sin)
    with pytest.raises(ShapeMismatchError, match=r"rotary_dim: expected an even integer"):
        apply_rope(q, k, cos, sin, rotary_dim=3)
    with pytest.raises(InvalidArgumentError, match=r"layout"):
        apply_rope(q, k, cos, sin, layout="gptj")
    with pytest.raises(ShapeMismatchError, match=r"cos: expected a 2-D table .* with position_ids"):
        apply_rope(q, k, cos[None], sin[None], torch.zeros(1, 2, dtype=torch.long, device=device))
    with pytest.raises(LayoutError, match=r"q"):
        apply_rope(torch.randn(1, 2, 4, 16, device=device)[..., ::2], k, cos, sin)
    with pytest.raises(Exception, match=r"k: expected .*float32|dtype"):
        apply_rope(q, k.half(), cos, sin)
    with pytest.raises(ShapeMismatchError, match=r"position_ids: expected shape"):
        apply_rope(q, k, cos, sin, torch.zeros(3, dtype=torch.long, device=device))


# ----------------------------------------------------------------------------------------------------------------
# GPU: Llama-3-8B heads, one launch, the same numbers as the float64 reference
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8, 2048])
def test_gpu_llama_heads_in_place_is_one_launch(tokens):
    hq, hk, d = 32, 8, 128
    qkv, q, k = _packed((1, tokens), hq, hk, d, torch.bfloat16, "cuda")
    table_cos, table_sin = rope_tables(8192, d, torch.bfloat16, "cuda")
    pos = torch.arange(4000, 4000 + tokens, device="cuda")[None]
    before = qkv.clone()
    qo, ko = apply_rope(q, k, table_cos, table_sin, pos)
    _check(qo, ko, q, k, table_cos, table_sin, pos)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        apply_rope(q, k, table_cos, table_sin, pos, inplace=True)
        torch.cuda.synchronize()
    assert sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) == 1
    assert torch.equal(q, qo) and torch.equal(k, ko)
    assert torch.equal(qkv[..., (hq + hk) * d:], before[..., (hq + hk) * d:])
