"""An RMSNorm inside the GEMM it feeds (``@triton.jit`` helpers), two ways.

A decoder layer's RMSNorm feeds a projection. For the few rows of a decode step the projection kernel can normalize
its own input instead of a separate launch writing the normalized row and the GEMM reading it back.

- Deferred (:func:`weighed`, :func:`rstd_from_squares`): ``rstd`` is one number per row, so ``(x * rstd * w) @ W^T
  == rstd * ((x * w) @ W^T)``. The GEMM multiplies each ``x`` tile it loads by the norm weight and sums the tile's
  squares alongside; where the row's K slices meet, ``rstd`` multiplies the sums. Nothing is read before the weight
  streaming starts; the result differs from the separate norm only by the normalized row's rounding to x's dtype,
  which is skipped. Users: ``fp8_gemm``'s weight-only decode kernel (``decode_linear(..., norm_weight=)``) and
  ``fused_gated_mlp``'s decode kernel (``fused_gated_mlp(..., norm_weight=)``).
- Prologue (:func:`row_rstd`, :func:`normalized`), bit for bit what the RMSNorm kernel writes: every program sums
  its rows' squares over all of K (the row is a few KB, served by L2), then multiplies each loaded ``x`` tile by
  ``rstd`` and the norm weight and rounds it once to x's dtype. That is ``fused_rmsnorm_rope.rmsnorm``'s output:
  the same fp64 sum of exact fp64 squares, correctly rounded fp32 division and square root, the same fp32 products
  in the same order (``(x * rstd) * w``), one rounding. The fp64 sum is exact, hence the same in any order, unless a
  row's magnitudes span more than about 2^15 (fp16/bf16) to 2^2 (fp32, 24-bit significands squared): only then may
  the two sums round apart, by an ulp of fp64, which reaches ``rstd`` (and a normalized value's last bit) only at an
  fp32 rounding tie. Users: ``fused_moe``'s router, expert GEMMs and activation quantization, and the tests'
  reference launch (``triton_ops_core.testing.normalized_like_the_prologue``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .exceptions import DeviceMismatchError, InvalidArgumentError, ShapeMismatchError
from .validation.common import FLOAT_DTYPES, check_dtype, check_ndim, check_tensor


@triton.jit
def row_rstd(x_ptr, offs_m, M, K, stride_xm, stride_xk, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``1 / sqrt(mean(x^2) + eps)`` of rows ``offs_m`` of ``x`` (``[M, K]``) over all of K, ``BLOCK_K`` columns a
    step: an fp64 sum of exact fp64 squares, then correctly rounded fp32 division and square root. ``[BLOCK_M]``."""
    offs_k = tl.arange(0, BLOCK_K)
    rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float64)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(rows + kk[None, :] * stride_xk, mask=(offs_m < M)[:, None] & (kk < K)[None, :], other=0.0)
        x64 = x.to(tl.float32).to(tl.float64)
        acc += x64 * x64
    sum_sq = tl.sum(acc, axis=1)
    one = tl.full(sum_sq.shape, 1.0, tl.float32)
    mean_sq = tl.math.div_rn(sum_sq.to(tl.float32), one * K)
    return tl.math.div_rn(one, tl.sqrt_rn(mean_sq + eps))


@triton.jit
def normalized(x, rstd, nw_ptr, kk, K):
    """An ``x`` tile normalized: ``(x * rstd) * w[kk]`` in fp32, rounded once to x's dtype (what the RMSNorm kernel
    stores). ``rstd`` and ``kk`` (the tile's K positions) broadcast against ``x`` as the caller shaped them; the
    weight reads 0 past ``K`` (where a masked ``x`` is 0 too)."""
    w = tl.load(nw_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
    return (x.to(tl.float32) * rstd * w).to(x.dtype)


@triton.jit
def weighed(x, ss, nw_ptr, kk, K, EVEN_K: tl.constexpr = False):
    """A step of the deferred norm (:func:`rstd_from_squares`) on an ``x`` tile: ``x * w[kk]`` in fp32, un-normalized
    (the rows' ``rstd`` multiplies the GEMM's sums at the end), and ``ss`` (fp32, x's shape) plus the tile's squares.
    ``kk`` (the tile's K positions) broadcasts against ``x``; the weight reads 0 past ``K`` (``EVEN_K``: the tile
    lies inside K, no mask)."""
    xf = x.to(tl.float32)
    if EVEN_K:
        w = tl.load(nw_ptr + kk).to(tl.float32)
    else:
        w = tl.load(nw_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
    return xf * w, ss + xf * xf


@triton.jit
def rstd_from_squares(sum_sq, K, eps):
    """``1 / sqrt(sum_sq / K + eps)`` in fp32, correctly rounded division and square root, as ``row_rstd``."""
    one = tl.full(sum_sq.shape, 1.0, tl.float32)
    mean_sq = tl.math.div_rn(sum_sq.to(tl.float32), one * K)
    return tl.math.div_rn(one, tl.sqrt_rn(mean_sq + eps))


def norm_block(k: int, rows: int, interpreter: bool = False) -> int:
    """Columns per step of :func:`row_rstd` for a tile of ``rows`` rows and ``k`` columns: 2048 fp64 squares a
    program per step (32 registers a thread at 4 warps), so a 4096-wide decode row takes two L2 round trips before
    the weight streaming starts; fewer columns per row as the row tile grows; 64 under the interpreter (small tests
    loop)."""
    if interpreter:
        return 64
    return max(16, min(triton.next_power_of_2(max(1, k)), 2048 // max(1, rows)))


def check_norm_eps(eps: object, name: str = "norm_eps") -> None:
    """The norm's epsilon: a positive finite number, not a bool (``rmsnorm``'s rule: with 0 an all-zero row, a
    padding row, would become NaN)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise InvalidArgumentError(f"{name}: expected a positive finite number, got {eps!r}")


def check_norm(x: torch.Tensor, norm_weight: torch.Tensor, norm_eps: object, *, name: str = "norm_weight",
               size: int | None = None, size_name: str = "x's last dimension") -> None:
    """A prologue's norm weight for ``x`` (``[x.shape[-1]]``, or ``[size]`` when given: ``size_name`` says what
    it is; a float dtype, contiguous, on x's device) and its epsilon (:func:`check_norm_eps`): the named errors
    every op with ``norm_weight=`` raises (``name``: the argument's name in them)."""
    check_tensor(norm_weight, name)
    check_dtype(norm_weight, name, FLOAT_DTYPES)
    check_ndim(norm_weight, name, exact=1)
    size = x.shape[-1] if size is None else size
    if norm_weight.shape[0] != size or norm_weight.stride(0) != 1:
        raise ShapeMismatchError(f"{name}: expected a contiguous [{size}] tensor ({size_name}), "
                                 f"got shape {list(norm_weight.shape)} with stride {norm_weight.stride()}")
    if norm_weight.device != x.device:
        raise DeviceMismatchError(f"{name}: expected x's device {x.device}, got {norm_weight.device}")
    check_norm_eps(norm_eps, name.replace("weight", "eps"))


def rms_normalized(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The prologue's result in torch, differentiable: RMSNorm in fp32, rounded once to x's dtype (what a GEMM with
    the prologue computes on when autograd must record the call; equal to the kernel's up to the last bit)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


__all__ = ["check_norm", "check_norm_eps", "norm_block", "normalized", "rms_normalized", "row_rstd",
           "rstd_from_squares", "weighed"]
