"""Validation and the input model of the FP8 GEMM, including scale granularity from scale shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton_ops_core.exceptions import ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.launch import cdiv
from triton_ops_core.models import TensorSpec
from triton_ops_core.validation.common import (
    FP8_DTYPES,
    HALF_DTYPES,
    check_dim_size,
    check_dtype,
    check_kernel_device,
    check_ndim,
    check_same_device,
    check_tensor,
)

GRANULARITIES = ("tensor", "row", "channel", "block", "group")
SCALE_BLOCK = 128
# The block shapes of block scaling: 1x128 activation groups (DeepSeek-V3 style), 128x128 weight blocks, and weight
# groups of 128 input features per output feature (128x1 in the [K, N] operand: one scale per output column and
# 128-deep K block, finer than a 128x128 block where the rows of a weight differ in range).
ACTIVATION_BLOCK = (1, SCALE_BLOCK)
WEIGHT_BLOCK = (SCALE_BLOCK, SCALE_BLOCK)
WEIGHT_GROUP = (SCALE_BLOCK, 1)


def a_scale_granularity(scale: torch.Tensor, m: int, k: int, name: str = "a_scale") -> str:
    """Granularity of the scale of ``a`` ``[M, K]`` from its shape: ``tensor`` (one value), ``row`` (``[M]`` or
    ``[M, 1]``) or ``block`` (1x128 blocks: ``[M, ceil(K/128)]``)."""
    if scale.numel() == 1 and scale.dim() <= 2:
        return "tensor"
    if tuple(scale.shape) in ((m,), (m, 1)):
        return "row"
    if tuple(scale.shape) == (m, cdiv(k, SCALE_BLOCK)):
        return "block"
    raise ShapeMismatchError(
        f"{name}: expected one value (per-tensor), [{m}] or [{m}, 1] (per-row), or [{m}, {cdiv(k, SCALE_BLOCK)}] "
        f"(1x{SCALE_BLOCK} blocks) for a of shape [{m}, {k}], got {list(scale.shape)}"
    )


def b_scale_granularity(scale: torch.Tensor, k: int, n: int, name: str = "b_scale") -> str:
    """Granularity of the scale of ``b`` ``[K, N]``: ``tensor``, ``channel`` (``[N]`` or ``[1, N]``), ``block``
    (128x128 blocks: ``[ceil(K/128), ceil(N/128)]``) or ``group`` (one scale per column and 128-deep K block:
    ``[ceil(K/128), N]``; for N = 1 that is also the block shape, with the same meaning)."""
    if scale.numel() == 1 and scale.dim() <= 2:
        return "tensor"
    if tuple(scale.shape) in ((n,), (1, n)):
        return "channel"
    if tuple(scale.shape) == (cdiv(k, SCALE_BLOCK), cdiv(n, SCALE_BLOCK)):
        return "block"
    if tuple(scale.shape) == (cdiv(k, SCALE_BLOCK), n):
        return "group"
    raise ShapeMismatchError(
        f"{name}: expected one value (per-tensor), [{n}] or [1, {n}] (per-channel), "
        f"[{cdiv(k, SCALE_BLOCK)}, {cdiv(n, SCALE_BLOCK)}] ({SCALE_BLOCK}x{SCALE_BLOCK} blocks) or "
        f"[{cdiv(k, SCALE_BLOCK)}, {n}] (groups of {SCALE_BLOCK} along K per column) for b of shape "
        f"[{k}, {n}], got {list(scale.shape)}"
    )


@dataclass(frozen=True)
class FP8GEMMInput:
    """A validated call of ``fp8_gemm``: ``a [M, K] @ b [K, N]`` with the scales' granularities."""

    a: TensorSpec
    b: TensorSpec
    m: int
    n: int
    k: int
    out_dtype: torch.dtype
    a_granularity: str | None = None
    b_granularity: str | None = None
    has_bias: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k

    @property
    def needs_quantization(self) -> bool:
        return self.a.dtype not in FP8_DTYPES or self.b.dtype not in FP8_DTYPES


def validate_fp8_gemm_inputs(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    bias: torch.Tensor | None = None,
) -> FP8GEMMInput:
    """Check an ``fp8_gemm`` call and return its sizes and scale granularities.

    ``a`` is ``[M, K]`` and ``b`` ``[K, N]``, each either fp16/bf16/fp32 (quantized by the caller's op) or
    ``float8_e4m3fn`` with its scale given. ``out_dtype`` is fp16 or bf16 (default: the dtype of a half-precision
    input, else bf16). ``bias`` is ``[N]``.
    """
    check_tensor(a, "a")
    check_tensor(b, "b")
    allowed = HALF_DTYPES + (torch.float32, torch.float8_e4m3fn)
    check_dtype(a, "a", allowed)
    check_dtype(b, "b", allowed)
    check_same_device(a=a, b=b, a_scale=a_scale, b_scale=b_scale, bias=bias)
    check_kernel_device(a, "a")
    check_ndim(a, "a", exact=2)
    check_ndim(b, "b", exact=2)
    m, k = a.shape
    check_dim_size(b, "b", 0, k, "a's inner dimension K")
    n = b.shape[1]

    a_gran = b_gran = None
    for name, t, scale in (("a", a, a_scale), ("b", b, b_scale)):
        if t.dtype == torch.float8_e4m3fn and scale is None:
            raise UnsupportedDtypeError(
                f"{name}_scale: expected a scale tensor for FP8 operand {name} (float8_e4m3fn), got None"
            )
    if a_scale is not None:
        check_tensor(a_scale, "a_scale")
        check_dtype(a_scale, "a_scale", (torch.float32,))
        a_gran = a_scale_granularity(a_scale, m, k)
    if b_scale is not None:
        check_tensor(b_scale, "b_scale")
        check_dtype(b_scale, "b_scale", (torch.float32,))
        b_gran = b_scale_granularity(b_scale, k, n)

    if out_dtype is None:
        out_dtype = a.dtype if a.dtype in HALF_DTYPES else torch.bfloat16
    if out_dtype not in HALF_DTYPES + (torch.float32,):
        raise UnsupportedDtypeError(
            f"out_dtype: expected float16, bfloat16 or float32, got {str(out_dtype).removeprefix('torch.')}"
        )
    if bias is not None:
        check_tensor(bias, "bias")
        check_dtype(bias, "bias", HALF_DTYPES + (torch.float32,))
        check_ndim(bias, "bias", exact=1)
        check_dim_size(bias, "bias", 0, n, "b's output dimension N")
    return FP8GEMMInput(TensorSpec.from_tensor(a), TensorSpec.from_tensor(b), m, n, k, out_dtype,
                        a_gran, b_gran, bias is not None)


__all__ = [
    "ACTIVATION_BLOCK",
    "GRANULARITIES",
    "SCALE_BLOCK",
    "WEIGHT_BLOCK",
    "WEIGHT_GROUP",
    "FP8GEMMInput",
    "a_scale_granularity",
    "b_scale_granularity",
    "validate_fp8_gemm_inputs",
]
