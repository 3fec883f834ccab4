"""decode_linear's RMSNorm prologue (fp8-gemm) against fused-rmsnorm-rope's own rmsnorm: the same normalized input,
bit for bit, so a layer may fold its input norm into the q/k/v projection without changing a result (small shapes
under the interpreter, model shapes on the GPU)."""

from __future__ import annotations

import pytest
import torch
from fp8_gemm import decode_linear
from fused_rmsnorm_rope import rmsnorm
from triton_ops_core.testing import device_for_tests

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
