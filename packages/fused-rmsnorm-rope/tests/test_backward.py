"""Gradients of fused_rmsnorm_rope (Triton backward) against PyTorch autograd of the float64 reference."""

from __future__ import annotations

import pytest
import torch
from _rope_helpers import DEVICE, rope_tables
from fused_rmsnorm_rope import FusedRMSNormRoPE, fused_rmsnorm_rope
from fused_rmsnorm_rope.reference import rmsnorm_rope_reference
from hypothesis import given
from hypothesis import strategies as st
from triton_ops_core.testing import assert_close_rel


def _grads(x, w, cos, sin, g, **kw):
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    out = fused_rmsnorm_rope(xr, wr, cos, sin, **kw)
    dx, dw = torch.autograd.grad(out, (xr, wr), g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = rmsnorm_rope_reference(x64, w64, cos.double(), sin.double(), **kw)
    rdx, rdw = torch.autograd.grad(ref, (x64, w64), g.double())
    return (dx, dw), (rdx, rdw)


@given(
    head_dim=st.sampled_from([4, 8, 16]), heads=st.integers(1, 4), rows=st.integers(1, 6),
    layout=st.sampled_from(["neox", "interleaved"]), gemma=st.booleans(), partial=st.booleans(),
    positions=st.booleans(), strided=st.booleans(),
)
def test_gradients_match_autograd_of_reference(head_dim, heads, rows, layout, gemma, partial, positions, strided):
    hidden = heads * head_dim
    x = torch.randn(rows, 2, hidden + (4 if strided else 0), device=DEVICE)[..., -hidden:]
    w = torch.randn(hidden, device=DEVICE)
    rotary = head_dim // 2 if partial and head_dim >= 4 else None
    if rotary is not None and rotary % 2:
        rotary = None
    if positions:
        cos, sin = rope_tables(7, head_dim, device=DEVICE, random=True)
        pos = torch.randint(0, 7, (rows, 2), device=DEVICE)
    else:
        cos, sin = rope_tables(2, head_dim, device=DEVICE, random=True)
        pos = None
    g = torch.randn(rows, 2, hidden, device=DEVICE)
    (dx, dw), (rdx, rdw) = _grads(x, w, cos, sin, g, position_ids=pos, rotary_dim=rotary, layout=layout,
                                  gemma=gemma)
    assert dx.shape == x.shape and dw.shape == w.shape
    assert_close_rel(dx, rdx, 1e-5, "dx")
    assert_close_rel(dw, rdw, 1e-5, "dweight")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients(device, dtype):
    x = torch.randn(3, 4, 64, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(64, device=device)).to(dtype)
    cos, sin = rope_tables(4, 16, device=device)
    g = torch.randn(3, 4, 64, device=device).to(dtype)
    (dx, dw), (rdx, rdw) = _grads(x, w, cos, sin, g)
    assert dx.dtype == dtype and dw.dtype == dtype
    tol = 5e-3 if dtype == torch.float16 else 2e-2
    assert_close_rel(dx, rdx, tol, "dx")
    assert_close_rel(dw, rdw, tol, "dweight")


def test_non_contiguous_upstream_gradient_and_x_only(device):
    x = torch.randn(2, 3, 32, device=device, requires_grad=True)
    w = torch.randn(32, device=device)  # no grad wanted for the weight
    cos, sin = rope_tables(3, 8, device=device, random=True)
    out = fused_rmsnorm_rope(x, w, cos, sin)
    g = torch.randn(2, 32, 3, device=device).transpose(1, 2)  # last-dim stride != 1
    (dx,) = torch.autograd.grad(out, (x,), g)
    x64 = x.detach().double().requires_grad_()
    (rdx,) = torch.autograd.grad(rmsnorm_rope_reference(x64, w.double(), cos.double(), sin.double()), (x64,),
                                 g.double())
    assert_close_rel(dx, rdx, 1e-5, "dx")


def test_module_trains(device):
    torch.manual_seed(0)
    m = FusedRMSNormRoPE(64, 16, eps=1e-5).to(device)
    x = torch.randn(2, 3, 64, device=device, requires_grad=True)
    cos, sin = rope_tables(3, 16, device=device)
    g = torch.randn(2, 3, 64, device=device)
    (m(x, cos, sin) * g).sum().backward()  # not a square loss: RoPE preserves norms, its dx would cancel to ~0
    w64 = torch.ones(64, dtype=torch.float64, device=device, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    (rmsnorm_rope_reference(x64, w64, cos.double(), sin.double(), eps=1e-5) * g.double()).sum().backward()
    assert_close_rel(m.weight.grad, w64.grad, 1e-5, "weight.grad")
    assert_close_rel(x.grad, x64.grad, 1e-5, "x.grad")


def test_no_graph_under_no_grad(device):
    x = torch.randn(2, 3, 32, device=device, requires_grad=True)
    cos, sin = rope_tables(3, 8, device=device)
    with torch.no_grad():
        out = fused_rmsnorm_rope(x, torch.ones(32, device=device), cos, sin)
    assert out.grad_fn is None and not out.requires_grad
