"""fused_rmsnorm_rope forward against a float64 reference: shapes, dtypes, layouts, positions, partial rotary,
Gemma offset, strided views, cos/sin conventions, and the ops' output being fully written."""

from __future__ import annotations

import math

import pytest
import torch
from _rope_helpers import DEVICE, TOL, check_rmsnorm_rope, rope_tables
from fused_rmsnorm_rope import fused_rmsnorm_rope
from fused_rmsnorm_rope.reference import rmsnorm_rope_reference
from hypothesis import given
from hypothesis import strategies as st
from triton_ops_core.testing import assert_close_rel

DTYPES = st.sampled_from([torch.float16, torch.bfloat16, torch.float32])


@st.composite
def cases(draw):
    head_dim = draw(st.sampled_from([4, 8, 16, 32]))
    heads = draw(st.integers(1, 5))
    lead = draw(st.lists(st.integers(1, 3), max_size=2))
    seq = draw(st.integers(1, 4))
    rotary_dim = draw(st.one_of(st.none(), st.integers(1, head_dim // 2).map(lambda r: 2 * r)))
    table_width = head_dim if rotary_dim is None else draw(st.sampled_from([rotary_dim, head_dim]))
    return {
        "head_dim": head_dim, "heads": heads, "lead": lead, "seq": seq, "rotary_dim": rotary_dim,
        "table_width": table_width, "dtype": draw(DTYPES), "layout": draw(st.sampled_from(["neox", "interleaved"])),
        "gemma": draw(st.booleans()), "positions": draw(st.sampled_from(["none", "1d", "2d", "full", "per_token"])),
        "strided": draw(st.booleans()), "eps": draw(st.sampled_from([1e-6, 1e-5, 0.1])),
        "table_dtype": draw(st.sampled_from([None, torch.float32])),
    }


def _build(c, device):
    hidden = c["heads"] * c["head_dim"]
    shape = (*c["lead"], c["seq"], hidden)
    if c["strided"]:  # a view into a wider buffer (e.g. one output of a fused projection)
        x = torch.randn(*shape[:-1], hidden + 8, device=device).to(c["dtype"])[..., 8:]
    else:
        x = torch.randn(shape, device=device).to(c["dtype"])
    weight = torch.randn(hidden, device=device).to(c["dtype"])
    tdtype = c["table_dtype"] or c["dtype"]
    batch = math.prod(c["lead"])
    pos, kw = None, {}
    if c["positions"] == "none":
        cos, sin = rope_tables(c["seq"], c["table_width"], tdtype, device, random=True)
    elif c["positions"] == "per_token":
        cos, sin = rope_tables(batch * c["seq"], c["table_width"], tdtype, device, random=True)
        cos, sin = cos.view(batch, c["seq"], -1), sin.view(batch, c["seq"], -1)
    else:
        cos, sin = rope_tables(11, c["table_width"], tdtype, device, random=True)
        pshape = {"1d": (c["seq"],), "2d": (1, c["seq"]), "full": shape[:-1]}[c["positions"]]
        if c["positions"] == "2d" and len(c["lead"]) != 1:
            pshape = (c["seq"],)
        pos = torch.randint(0, 11, pshape, device=device)
    kw = {"position_ids": pos, "rotary_dim": c["rotary_dim"], "head_dim": c["head_dim"], "layout": c["layout"],
          "gemma": c["gemma"]}
    return x, weight, cos, sin, kw


@given(cases())
def test_matches_float64_reference(c):
    x, weight, cos, sin, kw = _build(c, DEVICE)
    out = fused_rmsnorm_rope(x, weight, cos, sin, c["eps"], **kw)
    check_rmsnorm_rope(out, x, weight, cos, sin, eps=c["eps"], **kw)


@pytest.mark.parametrize("layout", ["neox", "interleaved"])
def test_real_tables_and_head_sizes(device, layout):
    for head_dim, heads in ((64, 3), (128, 2), (256, 1)):
        x = torch.randn(2, 3, heads * head_dim, device=device, dtype=torch.float16)
        w = torch.randn(heads * head_dim, device=device, dtype=torch.float16)
        cos, sin = rope_tables(3, head_dim, device=device, interleaved=layout == "interleaved")
        check_rmsnorm_rope(fused_rmsnorm_rope(x, w, cos, sin, layout=layout), x, w, cos, sin, layout=layout)


def test_rotation_is_the_model_convention(device):
    """With unit weights and real tables, neox RoPE preserves each head's norm and position 0 is the identity."""
    x = torch.randn(1, 4, 64, device=device)
    cos, sin = rope_tables(4, 16, device=device)
    out = fused_rmsnorm_rope(x, torch.ones(64, device=device), cos, sin)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out[0, 0], normed[0, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.view(4, 4, 16).norm(dim=-1), normed.view(4, 4, 16).norm(dim=-1), rtol=1e-5,
                               atol=1e-5)


def test_hidden_2880_gpt_oss(device):
    x = torch.randn(1, 2, 2880, device=device, dtype=torch.bfloat16)
    w = torch.randn(2880, device=device, dtype=torch.bfloat16)
    cos, sin = rope_tables(2, 64, device=device)
    check_rmsnorm_rope(fused_rmsnorm_rope(x, w, cos, sin), x, w, cos, sin)


def test_permuted_batch_dims_are_copied_correctly(device):
    base = torch.randn(3, 2, 4, 32, device=device)
    x = base.permute(1, 0, 2, 3)  # [2, 3, 4, 32]: batch dims not addressable by one stride
    w = torch.randn(32, device=device)
    cos, sin = rope_tables(4, 8, device=device, random=True)
    pos = torch.randint(0, 4, (3, 2, 4), device=device).permute(1, 0, 2)
    check_rmsnorm_rope(fused_rmsnorm_rope(x, w, cos, sin, position_ids=pos), x, w, cos, sin, position_ids=pos)


def test_strided_position_ids_and_int32(device):
    x = torch.randn(2, 3, 16, device=device)
    w = torch.randn(16, device=device)
    cos, sin = rope_tables(9, 8, device=device, random=True)
    pos = torch.randint(0, 9, (2, 6), device=device, dtype=torch.int32)[:, ::2]
    check_rmsnorm_rope(fused_rmsnorm_rope(x, w, cos, sin, position_ids=pos), x, w, cos, sin, position_ids=pos)


def test_out_of_range_position_ids_give_nan_not_a_crash(device):
    x = torch.randn(1, 3, 16, device=device)
    w = torch.randn(16, device=device)
    cos, sin = rope_tables(4, 8, device=device)
    pos = torch.tensor([[0, 4, -1]], device=device)
    out = fused_rmsnorm_rope(x, w, cos, sin, position_ids=pos)
    assert torch.isfinite(out[0, 0]).all()
    assert out[0, 1].isnan().all() and out[0, 2].isnan().all()
    # partial rotary: the pass-through elements stay finite
    out = fused_rmsnorm_rope(x, w, cos, sin, position_ids=pos, rotary_dim=4)
    assert out.view(3, 2, 8)[1:, :, :4].isnan().all() and torch.isfinite(out.view(3, 2, 8)[:, :, 4:]).all()


def test_same_signature_reuses_the_plan_and_stays_correct(device):
    w = torch.randn(32, device=device)
    cos, sin = rope_tables(3, 16, device=device, random=True)
    for _ in range(3):  # new tensors with the same metadata: the cached plan must serve their data
        x = torch.randn(2, 3, 32, device=device)
        check_rmsnorm_rope(fused_rmsnorm_rope(x, w, cos, sin), x, w, cos, sin)
    # same shapes, a data pointer off 16-byte alignment: a different plan (Triton specializes on alignment)
    x = torch.randn(2 * 3 * 32 + 1, device=device)[1:].view(2, 3, 32)
    check_rmsnorm_rope(fused_rmsnorm_rope(x, w, cos, sin), x, w, cos, sin)


def test_output_is_fully_written(device, monkeypatch):
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    x = torch.randn(3, 5, 48, device=device, dtype=torch.float16)
    w = torch.randn(48, device=device, dtype=torch.float16)
    cos, sin = rope_tables(5, 16, device=device)
    out = fused_rmsnorm_rope(x, w, cos, sin, rotary_dim=10)
    assert torch.isfinite(out).all()


def test_empty_input(device):
    x = torch.randn(0, 3, 32, device=device)
    cos, sin = rope_tables(3, 16, device=device)
    out = fused_rmsnorm_rope(x, torch.randn(32, device=device), cos, sin)
    assert out.shape == x.shape


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_nan_and_inf_rows_propagate_only_there(device, dtype):
    x = torch.randn(2, 4, 64, device=device).to(dtype)
    x[0, 1, 5] = float("nan")
    x[1, 2, 60] = float("inf")
    x[1, 3, 0] = float("-inf")
    w = torch.randn(64, device=device).to(dtype)
    cos, sin = rope_tables(4, 16, device=device)
    out = fused_rmsnorm_rope(x, w, cos, sin)
    ref = rmsnorm_rope_reference(x.double(), w.double(), cos.double(), sin.double())
    assert_close_rel(out, ref, TOL[dtype])  # NaN pattern identical to PyTorch's, finite values close
    assert out[0, 1].isnan().all()
    assert not torch.isfinite(out[1, 2]).all() and not torch.isfinite(out[1, 3]).all()
    good = torch.ones(2, 4, dtype=torch.bool)
    good[0, 1] = good[1, 2] = good[1, 3] = False
    assert torch.isfinite(out[good]).all()
