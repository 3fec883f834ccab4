"""The RMSNorms inside decode_linear (fp8-gemm) and fused_gated_mlp (fused-gated-mlp) against fused-rmsnorm-rope's
own rmsnorm launched first: the same result up to the normalized row's rounding to the activation dtype (the kernels
multiply x by the norm weight in fp32 and their sums by the row's rstd), so a layer may fold its input norm into the
q/k/v projection and its post-attention norm into the gated MLP; both against a float64 reference (small shapes
under the interpreter, model shapes on the GPU)."""

from __future__ import annotations

import pytest
import torch
from fp8_gemm import decode_linear
from fused_gated_mlp import fused_gated_mlp, quantize_weight_fp8
from fused_rmsnorm_rope import rmsnorm
from triton_ops_core.testing import assert_close_rel, device_for_tests

DEVICE = device_for_tests()
# fused against separate: one rounding of the normalized input (bf16 2^-9 relative per element at most, fp16 2^-12)
# and the outputs' own; against float64, the separate path's error and the fused one's
WITHIN_ONE_ROUNDING = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
AGAINST_FLOAT64 = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _normalized64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double().cpu()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * weight.double().cpu()
DTYPES = [torch.float16, torch.bfloat16]
SHAPES = [(6144, 4096), (5120, 2880)] if DEVICE.type == "cuda" else [(40, 96), (24, 700)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3])
def test_norm_in_decode_linear_matches_rmsnorm_then_decode_linear(dtype, n, k, m):
    g = torch.Generator().manual_seed(n + k + m)
    x = (torch.randn(m, k, generator=g) * 2 + 0.3).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    norm_w = (torch.rand(k, generator=g) + 0.5).to(DEVICE, dtype)
    fused = decode_linear(x, w, norm_weight=norm_w, norm_eps=1e-5)
    separate = decode_linear(rmsnorm(x, norm_w, 1e-5), w)
    assert torch.isfinite(fused).all()
    assert_close_rel(fused, separate, WITHIN_ONE_ROUNDING[dtype])
    want = _normalized64(x, norm_w, 1e-5) @ w.double().cpu().t()
    assert_close_rel(fused.cpu(), want, AGAINST_FLOAT64[dtype])


GATED_SHAPES = [(14336, 4096, "x-dtype"), (14336, 4096, "group"), (2880, 2880, "channel")] \
    if DEVICE.type == "cuda" else [(40, 96, "x-dtype"), (24, 700, "group"), (24, 256, "channel")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,weights", GATED_SHAPES)
@pytest.mark.parametrize("m", [1, 3])
def test_norm_in_gated_mlp_matches_rmsnorm_then_fused_gated_mlp(dtype, n, k, weights, m):
    """The post-attention norm inside the gated MLP's launch: the same intermediate as the norm's own launch."""
    g = torch.Generator().manual_seed(n + k + m)
    x = (torch.randn(m, k, generator=g) * 2 + 0.3).to(DEVICE, dtype)
    norm_w = (torch.rand(k, generator=g) + 0.5).to(DEVICE, dtype)
    if weights == "x-dtype":
        wg, wu = ((torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype) for _ in range(2))
        kwargs = {}
    else:
        wg, sg = quantize_weight_fp8((torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE), weights)
        wu, su = quantize_weight_fp8((torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE), weights)
        kwargs = dict(gate_scale=sg, up_scale=su)
    fused = fused_gated_mlp(x, wg, wu, **kwargs, norm_weight=norm_w, norm_eps=1e-5)
    separate = fused_gated_mlp(rmsnorm(x, norm_w, 1e-5), wg, wu, **kwargs)
    assert torch.isfinite(fused).all()
    assert_close_rel(fused, separate, WITHIN_ONE_ROUNDING[dtype])
