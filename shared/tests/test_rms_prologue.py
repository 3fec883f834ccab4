"""triton_ops_core.rms_prologue: the RMSNorm prologue's helpers in a launch of their own, against float64; the
torch stand-in; the sum-of-squares block rule."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from triton_ops_core.rms_prologue import norm_block, normalized, rms_normalized, row_rstd
from triton_ops_core.testing import assert_close_rel, device_for_tests

DEVICE = device_for_tests()


@triton.jit
def _normalize_kernel(x_ptr, w_ptr, out_ptr, rstd_ptr, M, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                      NORM_BLOCK: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rstd = row_rstd(x_ptr, offs_m, M, K, K, 1, eps, BLOCK_M, NORM_BLOCK)
    tl.store(rstd_ptr + offs_m, rstd, mask=offs_m < M)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_m < M)[:, None] & (kk < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * K + kk[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + offs_m[:, None] * K + kk[None, :], normalized(x, rstd[:, None], w_ptr, kk[None, :], K),
                 mask=mask)


def _reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 64), (3, 300), (5, 1000)])
def test_helpers_normalize_rows_as_float64_does(dtype, m, k):
    g = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, generator=g) * 3 + 0.5).to(DEVICE, dtype)
    w = (torch.rand(k, generator=g) + 0.5).to(DEVICE, dtype)
    out = torch.full_like(x, float("nan"))
    rstd = torch.full((m,), float("nan"), device=DEVICE)
    _normalize_kernel[(triton.cdiv(m, 4),)](x, w, out, rstd, m, k, 1e-5, 4, 128, 64)
    assert_close_rel(out, _reference(x, w, 1e-5), 1e-3 if dtype == torch.float16 else 1e-6)
    want_rstd = torch.rsqrt(x.double().pow(2).mean(-1) + 1e-5)
    assert_close_rel(rstd, want_rstd, 1e-6)
    # the torch stand-in computes the same values (up to the last bit)
    assert_close_rel(rms_normalized(x, w, 1e-5), _reference(x, w, 1e-5), 1e-3 if dtype == torch.float16 else 1e-6)


def test_nan_stays_in_its_row_and_zero_rows_give_zeros():
    x = torch.randn(3, 64, device=DEVICE)
    x[1, 7] = float("nan")
    x[2] = 0.0
    out = torch.empty_like(x)
    rstd = torch.empty(3, device=DEVICE)
    _normalize_kernel[(1,)](x, torch.ones(64, device=DEVICE), out, rstd, 3, 64, 1e-6, 4, 64, 64)
    assert out[1].isnan().all() and torch.isfinite(out[0]).all() and torch.equal(out[2], torch.zeros(64, device=DEVICE))


def test_norm_block():
    assert norm_block(4096, 1) == 2048 and norm_block(4096, 16) == 128 and norm_block(100, 1) == 128
    assert norm_block(4096, 1024) == 16  # never below 16 columns
    assert norm_block(4096, 1, interpreter=True) == 64
