"""fused_qk_norm_rope: per-head RMSNorm + RoPE on q and k in one launch, GQA head counts, packed QKV views."""

from __future__ import annotations

import pytest
import torch
from _rope_helpers import DEVICE, check_qk, rope_tables
from fused_rmsnorm_rope import fused_qk_norm_rope
from hypothesis import given
from hypothesis import strategies as st


@st.composite
def qk_cases(draw):
    head_dim = draw(st.sampled_from([4, 8, 16, 32]))
    kv_heads = draw(st.integers(1, 3))
    return {
        "head_dim": head_dim, "kv_heads": kv_heads, "q_heads": kv_heads * draw(st.integers(1, 3)),
        "lead": draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)), "seq": draw(st.integers(1, 3)),
        "dtype": draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32])),
        "layout": draw(st.sampled_from(["neox", "interleaved"])), "gemma": draw(st.booleans()),
        "rotary_dim": draw(st.one_of(st.none(), st.integers(1, head_dim // 2).map(lambda r: 2 * r))),
        "packed": draw(st.booleans()), "positions": draw(st.booleans()),
    }


def _qk_inputs(c, device):
    d, hq, hk = c["head_dim"], c["q_heads"], c["kv_heads"]
    lead = (*c["lead"][:-1], c["seq"]) if len(c["lead"]) > 1 else (c["lead"][0], c["seq"])
    if c["packed"]:  # q and k as views of one [.., (hq + 2 hk) * d] projection output: strided, not copied
        qkv = torch.randn(*lead, (hq + 2 * hk) * d, device=device).to(c["dtype"])
        q = qkv[..., : hq * d].unflatten(-1, (hq, d))
        k = qkv[..., hq * d: (hq + hk) * d].unflatten(-1, (hk, d))
    else:
        q = torch.randn(*lead, hq, d, device=device).to(c["dtype"])
        k = torch.randn(*lead, hk, d, device=device).to(c["dtype"])
    qw, kw = torch.randn(d, device=device).to(c["dtype"]), torch.randn(d, device=device).to(c["dtype"])
    width = d if c["rotary_dim"] is None else c["rotary_dim"]
    if c["positions"]:
        cos, sin = rope_tables(13, width, device=device, random=True)
        pos = torch.randint(0, 13, lead, device=device)
    else:
        cos, sin = rope_tables(c["seq"], width, device=device, random=True)
        pos = None
    return q, k, qw, kw, cos, sin, pos


@given(qk_cases())
def test_matches_float64_reference(c):
    q, k, qw, kw, cos, sin, pos = _qk_inputs(c, DEVICE)
    opts = {"rotary_dim": c["rotary_dim"], "layout": c["layout"], "gemma": c["gemma"]}
    qo, ko = fused_qk_norm_rope(q, k, qw, kw, cos, sin, pos, **opts)
    check_qk(qo, ko, q, k, qw, kw, cos, sin, pos, **opts)


def test_qwen3_like_heads_in_place_on_packed_qkv(device):
    hq, hk, d = 8, 2, 128
    qkv = torch.randn(2, 3, (hq + 2 * hk) * d, device=device, dtype=torch.bfloat16)
    q = qkv[..., : hq * d].unflatten(-1, (hq, d))
    k = qkv[..., hq * d: (hq + hk) * d].unflatten(-1, (hk, d))
    qw, kw = torch.randn(d, device=device, dtype=torch.bfloat16), torch.randn(d, device=device, dtype=torch.bfloat16)
    cos, sin = rope_tables(64, d, device=device)
    pos = torch.tensor([[5, 6, 7], [60, 61, 62]], device=device)
    q0, k0, v0 = q.clone(), k.clone(), qkv[..., (hq + hk) * d:].clone()
    qo, ko = fused_qk_norm_rope(q, k, qw, kw, cos, sin, pos)
    assert torch.equal(q, q0)  # out of place leaves the inputs alone
    check_qk(qo, ko, q0, k0, qw, kw, cos, sin, pos)
    ret = fused_qk_norm_rope(q, k, qw, kw, cos, sin, pos, inplace=True)
    assert ret[0] is q and ret[1] is k
    assert torch.equal(q, qo) and torch.equal(k, ko)
    assert torch.equal(qkv[..., (hq + hk) * d:], v0)  # v untouched


def test_in_place_on_permuted_views_writes_back(device):
    q = torch.randn(3, 2, 4, 2, 8, device=device).permute(1, 0, 2, 3, 4)  # batch dims need a copy
    k = torch.randn(2, 3, 4, 1, 8, device=device)
    w = torch.randn(8, device=device)
    cos, sin = rope_tables(4, 8, device=device, random=True)
    q0, k0 = q.clone(), k.clone()
    qo, ko = fused_qk_norm_rope(q0, k0, w, w, cos, sin)
    fused_qk_norm_rope(q, k, w, w, cos, sin, inplace=True)
    torch.testing.assert_close(q, qo)
    torch.testing.assert_close(k, ko)


def test_qk_nan_head_stays_in_its_head(device):
    q = torch.randn(1, 2, 4, 16, device=device)
    k = torch.randn(1, 2, 2, 16, device=device)
    q[0, 1, 2, 3] = float("nan")
    w = torch.randn(16, device=device)
    cos, sin = rope_tables(2, 16, device=device)
    qo, ko = fused_qk_norm_rope(q, k, w, w, cos, sin)
    assert qo[0, 1, 2].isnan().all()
    mask = torch.ones(1, 2, 4, dtype=torch.bool)
    mask[0, 1, 2] = False
    assert torch.isfinite(qo[mask]).all() and torch.isfinite(ko).all()


@pytest.mark.parametrize("layout", ["neox", "interleaved"])
def test_qk_gradients_match_autograd_of_reference(device, layout):
    from fused_rmsnorm_rope.reference import qk_norm_rope_reference

    q = torch.randn(2, 3, 4, 16, device=device, requires_grad=True)
    k = torch.randn(2, 3, 2, 16, device=device, requires_grad=True)
    qw = torch.randn(16, device=device, requires_grad=True)
    kw = torch.randn(16, device=device, requires_grad=True)
    cos, sin = rope_tables(5, 16, device=device, random=True)
    pos = torch.randint(0, 5, (2, 3), device=device)
    qo, ko = fused_qk_norm_rope(q, k, qw, kw, cos, sin, pos, layout=layout, rotary_dim=12, gemma=True)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    grads = torch.autograd.grad((qo, ko), (q, k, qw, kw), (gq, gk))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, qw, kw)]
    rq, rk = qk_norm_rope_reference(*leaves, cos.double(), sin.double(), pos, layout=layout, rotary_dim=12,
                                    gemma=True)
    refs = torch.autograd.grad((rq, rk), leaves, (gq.double(), gk.double()))
    from triton_ops_core.testing import assert_close_rel

    for got, want, name in zip(grads, refs, ("dq", "dk", "dq_weight", "dk_weight")):
        assert got.dtype == torch.float32
        assert_close_rel(got, want, 1e-5, name)
