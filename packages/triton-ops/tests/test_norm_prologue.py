"""The RMSNorm prologues of decode_linear (fp8-gemm) and fused_gated_mlp (fused-gated-mlp) against
fused-rmsnorm-rope's own rmsnorm: the same normalized input, bit for bit (the gated MLP with FP8 weights on the GPU:
up to a rounding of the normalized row), so a layer may fold its input norm into the q/k/v projection and its
post-attention norm into the gated MLP without changing a result (small shapes under the interpreter, model shapes
on the GPU)."""

from __future__ import annotations

import pytest
import torch
from fp8_gemm import decode_linear
from fused_gated_mlp import fused_gated_mlp, quantize_weight_fp8
from fused_rmsnorm_rope import rmsnorm
from triton_ops_core.testing import device_for_tests, relative_error

DEVICE = device_for_tests()
DTYPES = [torch.float16, torch.bfloat16]
SHAPES = [(6144, 4096), (5120, 2880)] if DEVICE.type == "cuda" else [(40, 96), (24, 700)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3])
def test_prologue_equals_rmsnorm_then_decode_linear(dtype, n, k, m):
    g = torch.Generator().manual_seed(n + k + m)
    x = (torch.randn(m, k, generator=g) * 2 + 0.3).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    norm_w = (torch.rand(k, generator=g) + 0.5).to(DEVICE, dtype)
    fused = decode_linear(x, w, norm_weight=norm_w, norm_eps=1e-5)
    separate = decode_linear(rmsnorm(x, norm_w, 1e-5), w)
    assert torch.equal(fused, separate)


GATED_SHAPES = [(14336, 4096, "x-dtype"), (14336, 4096, "group"), (2880, 2880, "channel")] \
    if DEVICE.type == "cuda" else [(40, 96, "x-dtype"), (24, 700, "group"), (24, 256, "channel")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,weights", GATED_SHAPES)
@pytest.mark.parametrize("m", [1, 3])
def test_gated_mlp_prologue_equals_rmsnorm_then_fused_gated_mlp(dtype, n, k, weights, m):
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
    if weights == "x-dtype" or DEVICE.type == "cpu":
        assert torch.equal(fused, separate)
    else:
        # FP8 weights on the GPU: the compiled kernel may multiply the prologue's fp32 normalized row where the
        # separate path reads its 16-bit rounding (measured on the H200: a few outputs one rounding apart)
        assert torch.isfinite(fused).all() and relative_error(fused, separate) <= 1e-2
