"""Shared helpers of this package's tests: RoPE tables, reference comparison, tolerances."""

from __future__ import annotations

import torch
from fused_rmsnorm_rope.reference import qk_norm_rope_reference, rmsnorm_rope_reference
from triton_ops_core.testing import assert_close_rel, device_for_tests

DEVICE = device_for_tests()  # CUDA on a GPU, else the CPU under the interpreter

# fp16/bf16 outputs carry one rounding (the interpreter truncates to bf16: up to 1 ulp); fp32 is fp32 math.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def rope_tables(n: int, width: int, dtype: torch.dtype = torch.float32, device="cpu", interleaved=False,
                random: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Real RoPE tables (neox: frequencies repeated by halves; interleaved: by pairs), or random ones."""
    if random:
        return (torch.randn(n, width, device=device).to(dtype), torch.randn(n, width, device=device).to(dtype))
    inv = 1.0 / (10000 ** (torch.arange(0, width, 2, dtype=torch.float64) / width))
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    ang = ang.repeat_interleave(2, dim=-1) if interleaved else torch.cat((ang, ang), dim=-1)
    return ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)


def norm_inputs(shape, dtype, seed=0):
    """x (scaled by 3), a weight near 1 and a residual of ``shape`` for the RMSNorm tests."""
    torch.manual_seed(seed)
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    w = (1 + 0.2 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    r = torch.randn(shape, device=DEVICE).to(dtype)
    return x, w, r


def f64(t):
    return None if t is None else (t.double() if t.dtype.is_floating_point else t)


def check_rmsnorm_rope(out, x, weight, cos, sin, **kw) -> float:
    assert out.shape == x.shape and out.dtype == x.dtype
    ref = rmsnorm_rope_reference(f64(x), f64(weight), f64(cos), f64(sin), **kw)
    return assert_close_rel(out, ref, TOL[x.dtype])


def check_qk(qo, ko, q, k, qw, kw, cos, sin, position_ids=None, **opts) -> None:
    rq, rk = qk_norm_rope_reference(f64(q), f64(k), f64(qw), f64(kw), f64(cos), f64(sin), position_ids, **opts)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == q.dtype
    assert_close_rel(qo, rq, TOL[q.dtype], "q")
    assert_close_rel(ko, rk, TOL[k.dtype], "k")
