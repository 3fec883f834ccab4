"""Gradients of fused_gated_mlp against torch autograd of a float64 reference."""

from __future__ import annotations

import pytest
import torch
from _gated_mlp_helpers import make_inputs, pack, reference64
from fused_gated_mlp import fused_gated_mlp
from triton_ops_core.testing import assert_close_rel

ACTS = ["silu", "gelu", "gelu_tanh", "swiglu_oai"]


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("bias", [False, True])
def test_gradients_match_float64_autograd(device, activation, bias):
    x, wg, wu, bg, bu = make_inputs(7, 24, 18, torch.float32, device, bias=bias, seed=11)
    if activation == "swiglu_oai":  # push some projections past the clamps so both branches are exercised
        wg, wu = wg * 6, wu * 6
    ins = [_leaf(t) for t in (x, wg, wu, bg, bu)]
    out = fused_gated_mlp(ins[0], ins[1], ins[2], activation, gate_bias=ins[3], up_bias=ins[4])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    out.backward(grad)
    refs = [None if t is None else t.detach().double().cpu().requires_grad_(True) for t in (x, wg, wu, bg, bu)]
    reference64(refs[0], refs[1], refs[2], activation, refs[3], refs[4]).backward(grad.double().cpu())
    for name, got, ref in zip(("x", "gate_weight", "up_weight", "gate_bias", "up_bias"), ins, refs):
        if ref is None:
            continue
        assert got.grad is not None, name
        assert_close_rel(got.grad, ref.grad, 1e-5, what=f"d{name}")


@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
def test_packed_weight_gradient(device, layout):
    x, wg, wu, bg, bu = make_inputs(5, 32, 12, torch.float32, device, bias=True, seed=12)
    w = pack(wg, wu, layout).requires_grad_(True)
    b = pack(bg, bu, layout).requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    out = fused_gated_mlp(xg, w, activation="swiglu_oai", gate_bias=b, weight_layout=layout)
    out.sum().backward()
    w64 = pack(wg, wu, layout).double().cpu().requires_grad_(True)
    b64 = pack(bg, bu, layout).double().cpu().requires_grad_(True)
    x64 = x.double().cpu().requires_grad_(True)
    if layout == "concatenated":
        g_w, u_w, g_b, u_b = w64[:12], w64[12:], b64[:12], b64[12:]
    else:
        g_w, u_w, g_b, u_b = w64[0::2], w64[1::2], b64[0::2], b64[1::2]
    reference64(x64, g_w, u_w, "swiglu_oai", g_b, u_b).sum().backward()
    assert_close_rel(w.grad, w64.grad, 1e-5, what="dW packed")
    assert_close_rel(b.grad, b64.grad, 1e-5, what="db packed")
    assert_close_rel(xg.grad, x64.grad, 1e-5, what="dx")


def test_half_precision_gradients(device):
    x, wg, wu, _, _ = make_inputs(70, 40, 24, torch.bfloat16, device, seed=13)
    ins = [_leaf(t) for t in (x, wg, wu)]
    out = fused_gated_mlp(*ins, "gelu")
    out.float().square().sum().backward()
    refs = [t.detach().double().cpu().requires_grad_(True) for t in (x, wg, wu)]
    reference64(*refs, "gelu").square().sum().backward()
    for got, ref in zip(ins, refs):
        assert got.grad.dtype == torch.bfloat16
        assert_close_rel(got.grad, ref.grad, 3e-2)


def test_only_requested_gradients(device):
    x, wg, wu, _, _ = make_inputs(3, 16, 8, torch.float32, device, seed=14)
    xg = x.clone().requires_grad_(True)
    fused_gated_mlp(xg, wg, wu).sum().backward()
    assert xg.grad is not None and wg.grad is None and wu.grad is None


def test_no_graph_without_grad(device):
    x, wg, wu, _, _ = make_inputs(3, 16, 8, torch.float32, device, seed=15)
    wg.requires_grad_(True)
    with torch.no_grad():
        out = fused_gated_mlp(x, wg, wu)
    assert out.grad_fn is None
    out = fused_gated_mlp(x, wg, wu)
    # autograd records the registered op (register_autograd), not a private Function
    assert out.grad_fn is not None and "fused_gated_mlp" in type(out.grad_fn).__name__
