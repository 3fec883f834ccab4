"""Every bad input raises the shared core's exception, with a message that starts with the argument's name."""

from __future__ import annotations

import pytest
import torch
from _rope_helpers import rope_tables
from fused_rmsnorm_rope import FusedRMSNormRoPE, fused_qk_norm_rope, fused_rmsnorm_rope
from triton_ops_core.exceptions import (
    DeviceMismatchError,
    InvalidArgumentError,
    LayoutError,
    ShapeMismatchError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
)


@pytest.fixture
def good(device):
    x = torch.randn(2, 3, 32, device=device)
    w = torch.randn(32, device=device)
    cos, sin = rope_tables(3, 8, device=device)
    return x, w, cos, sin


def _bad_calls(x, w, cos, sin, device):
    long_cos, long_sin = rope_tables(9, 8, device=device)
    pos = torch.zeros(2, 3, dtype=torch.long, device=device)
    return [
        (InvalidArgumentError, "x", lambda: fused_rmsnorm_rope(x.tolist(), w, cos, sin)),
        (InvalidArgumentError, "weight", lambda: fused_rmsnorm_rope(x, None, cos, sin)),
        (InvalidArgumentError, "cos", lambda: fused_rmsnorm_rope(x, w, 1.0, sin)),
        (UnsupportedDtypeError, "x", lambda: fused_rmsnorm_rope(x.to(torch.int32), w, cos, sin)),
        (UnsupportedDtypeError, "x", lambda: fused_rmsnorm_rope(x.double(), w, cos, sin)),
        (UnsupportedDtypeError, "weight", lambda: fused_rmsnorm_rope(x, w.to(torch.int64), cos, sin)),
        (UnsupportedDtypeError, "cos", lambda: fused_rmsnorm_rope(x, w, cos.to(torch.int32), sin)),
        (UnsupportedDtypeError, "sin", lambda: fused_rmsnorm_rope(x, w, cos, sin.half())),
        (ShapeMismatchError, "x", lambda: fused_rmsnorm_rope(x[0, 0], w, cos, sin)),
        (ShapeMismatchError, "weight", lambda: fused_rmsnorm_rope(x, w[:16], cos, sin)),
        (ShapeMismatchError, "weight", lambda: fused_rmsnorm_rope(x, w.view(2, 16), cos, sin)),
        (ShapeMismatchError, "cos", lambda: fused_rmsnorm_rope(x, w, cos[0], sin[0])),
        (ShapeMismatchError, "sin", lambda: fused_rmsnorm_rope(x, w, cos, sin[:, :4])),
        (ShapeMismatchError, "cos", lambda: fused_rmsnorm_rope(x, w, long_cos, long_sin)),
        (ShapeMismatchError, "x", lambda: fused_rmsnorm_rope(x, w, *rope_tables(3, 12, device=device))),
        (ShapeMismatchError, "head_dim", lambda: fused_rmsnorm_rope(x, w, cos, sin, head_dim=0)),
        (ShapeMismatchError, "x", lambda: fused_rmsnorm_rope(x, w, cos, sin, head_dim=12)),
        (ShapeMismatchError, "rotary_dim", lambda: fused_rmsnorm_rope(x, w, cos, sin, rotary_dim=3)),
        (ShapeMismatchError, "rotary_dim", lambda: fused_rmsnorm_rope(x, w, cos, sin, rotary_dim=10)),
        (ShapeMismatchError, "rotary_dim", lambda: fused_rmsnorm_rope(x, w, cos, sin, rotary_dim=0)),
        (ShapeMismatchError, "cos", lambda: fused_rmsnorm_rope(x, w, cos[:, :4], sin[:, :4], rotary_dim=6,
                                                               head_dim=8)),
        (ShapeMismatchError, "cos", lambda: fused_rmsnorm_rope(x, w, cos.expand(5, 3, 8), sin.expand(5, 3, 8))),
        (ShapeMismatchError, "cos", lambda: fused_rmsnorm_rope(x, w, cos[None], sin[None], position_ids=pos)),
        (InvalidArgumentError, "eps", lambda: fused_rmsnorm_rope(x, w, cos, sin, 0.0)),
        (InvalidArgumentError, "eps", lambda: fused_rmsnorm_rope(x, w, cos, sin, float("nan"))),
        (InvalidArgumentError, "eps", lambda: fused_rmsnorm_rope(x, w, cos, sin, "1e-6")),
        (InvalidArgumentError, "layout", lambda: fused_rmsnorm_rope(x, w, cos, sin, layout="gptj")),
        (InvalidArgumentError, "gemma", lambda: fused_rmsnorm_rope(x, w, cos, sin, gemma=1)),
        (UnsupportedDtypeError, "position_ids", lambda: fused_rmsnorm_rope(x, w, cos, sin,
                                                                           position_ids=pos.float())),
        (ShapeMismatchError, "position_ids", lambda: fused_rmsnorm_rope(x, w, cos, sin, position_ids=pos[:, :2])),
        (ShapeMismatchError, "position_ids", lambda: fused_rmsnorm_rope(x, w, cos, sin, position_ids=pos[None])),
        (InvalidArgumentError, "position_ids", lambda: fused_rmsnorm_rope(x, w, cos, sin, position_ids=[0, 1, 2])),
        (LayoutError, "x", lambda: fused_rmsnorm_rope(x.transpose(-1, -2).contiguous().transpose(-1, -2), w,
                                                      cos, sin)),
        (LayoutError, "cos", lambda: fused_rmsnorm_rope(x, w, cos.t().contiguous().t(), sin)),
        (DeviceMismatchError, "weight", lambda: fused_rmsnorm_rope(x, w.to("meta"), cos, sin)),
        (DeviceMismatchError, "position_ids", lambda: fused_rmsnorm_rope(x, w, cos, sin,
                                                                         position_ids=pos.to("meta"))),
    ]


def test_every_bad_input_raises_naming_the_argument(good, device):
    x, w, cos, sin = good
    fused_rmsnorm_rope(x, w, cos, sin)  # the good call works (and fills the plan cache: errors must not hit it)
    for exc, name, call in _bad_calls(x, w, cos, sin, device):
        with pytest.raises(exc, match=rf"^{name}\b"):
            call()


def test_cpu_tensors_without_the_interpreter(good, monkeypatch):
    x, w, cos, sin = good
    if x.device.type != "cpu":
        pytest.skip("CPU tensors are the case under test")
    fused_rmsnorm_rope(x, w, cos, sin)  # cached signature: the environment is part of the key
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UnsupportedDeviceError, match=r"^x: expected a CUDA tensor"):
        fused_rmsnorm_rope(x, w, cos, sin)
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(UnsupportedDeviceError, match=r"^q: expected a CUDA tensor"):
        fused_qk_norm_rope(q, q, w[:8], w[:8], cos, sin)


def test_bad_qk_inputs(device):
    q = torch.randn(2, 3, 4, 8, device=device)
    k = torch.randn(2, 3, 2, 8, device=device)
    w = torch.randn(8, device=device)
    cos, sin = rope_tables(3, 8, device=device)
    bad = [
        (InvalidArgumentError, "q", lambda: fused_qk_norm_rope(None, k, w, w, cos, sin)),
        (UnsupportedDtypeError, "k", lambda: fused_qk_norm_rope(q, k.half(), w, w, cos, sin)),
        (UnsupportedDtypeError, "q_weight", lambda: fused_qk_norm_rope(q, k, w.long(), w, cos, sin)),
        (ShapeMismatchError, "q", lambda: fused_qk_norm_rope(q[0, 0], k, w, w, cos, sin)),
        (ShapeMismatchError, "k", lambda: fused_qk_norm_rope(q, k[:1], w, w, cos, sin)),
        (ShapeMismatchError, "k", lambda: fused_qk_norm_rope(q, k[..., :4], w, w, cos, sin)),
        (ShapeMismatchError, "q_weight", lambda: fused_qk_norm_rope(q, k, w[:4], w, cos, sin)),
        (ShapeMismatchError, "k_weight", lambda: fused_qk_norm_rope(q, k, w, w[None], cos, sin)),
        (ShapeMismatchError, "cos", lambda: fused_qk_norm_rope(q, k, w, w, cos[:2], sin[:2])),
        (ShapeMismatchError, "rotary_dim", lambda: fused_qk_norm_rope(q, k, w, w, cos, sin, rotary_dim=5)),
        (ShapeMismatchError, "position_ids", lambda: fused_qk_norm_rope(q, k, w, w, cos, sin,
                                                                        torch.zeros(3, 3, dtype=torch.long))),
        (LayoutError, "k", lambda: fused_qk_norm_rope(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), w, w,
                                                      cos, sin)),
        (InvalidArgumentError, "layout", lambda: fused_qk_norm_rope(q, k, w, w, cos, sin, layout="x")),
        (InvalidArgumentError, "eps", lambda: fused_qk_norm_rope(q, k, w, w, cos, sin, eps=-1.0)),
        (InvalidArgumentError, "inplace", lambda: fused_qk_norm_rope(q, k, w, w, cos, sin, inplace="yes")),
        (InvalidArgumentError, "inplace", lambda: fused_qk_norm_rope(q.requires_grad_(), k, w, w, cos, sin,
                                                                     inplace=True)),
        (DeviceMismatchError, "k", lambda: fused_qk_norm_rope(q.detach(), k.to("meta"), w, w, cos, sin)),
    ]
    for exc, name, call in bad:
        with pytest.raises(exc, match=rf"^{name}\b"):
            call()


def test_bad_module_arguments():
    with pytest.raises(ShapeMismatchError, match=r"^hidden_dim"):
        FusedRMSNormRoPE(100, 64)
    with pytest.raises(ShapeMismatchError, match=r"^head_dim"):
        FusedRMSNormRoPE(128, 0)
    with pytest.raises(InvalidArgumentError, match=r"^eps"):
        FusedRMSNormRoPE(128, 64, eps=-1.0)
    with pytest.raises(InvalidArgumentError, match=r"^layout"):
        FusedRMSNormRoPE(128, 64, layout="rotate")
