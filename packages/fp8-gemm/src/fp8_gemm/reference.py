"""Plain-PyTorch references: the specification the kernels are tested against, bit for bit.

They follow :mod:`fp8_gemm.quantize`'s convention exactly: ``scale = amax / max_value`` (float32 IEEE division,
1.0 where amax == 0, never below 2**-126), ``quantized = (x.float() * (1.0 / scale)).to(fp8)`` with torch's own
cast, non-finite values left out of the absolute maximum, infinities saturated to +-448 in E4M3.
"""

from __future__ import annotations

import torch
from triton_ops_core.launch import cdiv
from triton_ops_core.models import FP8Format

from .quantize import ACTIVATION_BLOCK, WEIGHT_BLOCK, WEIGHT_GROUP, expand_scale, scale_shape


def group_amax(x: torch.Tensor, granularity: str, block_size: tuple[int, int] | None = None,
               role: str = "activation") -> torch.Tensor:
    """Absolute maximum of the finite values of each scale group, in the scale's shape (float32)."""
    a = x.float().abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros((), dtype=a.dtype, device=a.device))
    if granularity == "tensor":
        return a.amax().reshape(1)
    if granularity == "row":
        return a.amax(dim=-1, keepdim=True)
    if granularity == "channel":
        return a.amax(dim=0, keepdim=True)
    if granularity == "group":
        block_size = WEIGHT_GROUP
    bm, bk = block_size or (ACTIVATION_BLOCK if role == "activation" else WEIGHT_BLOCK)
    m, k = a.shape
    padded = torch.zeros((cdiv(m, bm) * bm, cdiv(k, bk) * bk), dtype=a.dtype, device=a.device)
    padded[:m, :k] = a
    return padded.view(cdiv(m, bm), bm, cdiv(k, bk), bk).amax(dim=(1, 3))


def scale_from_amax(amax: torch.Tensor, fmt: str | FP8Format = "e4m3") -> torch.Tensor:
    """``amax / max_value`` with the kernels' guards (1.0 for an all-zero group, at least 2**-126)."""
    fmt = FP8Format.from_name(fmt)
    amax = amax.float()
    dyn = _ieee_div(amax, torch.full_like(amax, fmt.max_value)).clamp_min(2.0**-126)
    return torch.where(amax > 0, dyn, torch.ones_like(dyn))


def _ieee_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` correctly rounded on every device. Both operands must be tensors on one device: PyTorch's CUDA
    division by a Python scalar multiplies by the scalar's reciprocal instead (one bit less exact), and so does
    ``1.0 / t`` through ``reciprocal() * 1.0`` in some versions."""
    return torch.div(a, b)


def quantize_fp8_reference(
    t: torch.Tensor,
    fmt: str | FP8Format = "e4m3",
    granularity: str = "tensor",
    *,
    scale: torch.Tensor | None = None,
    block_size: tuple[int, int] | None = None,
    role: str = "activation",
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``quantize_fp8`` computes, in PyTorch: ``(quantized, scale)`` (overflowing groups of a given scale
    raised to the dynamic scale)."""
    fmt = FP8Format.from_name(fmt)
    amax = group_amax(t, granularity, block_size, role)
    dyn = scale_from_amax(amax, fmt)
    if scale is None:
        s = dyn
    else:
        given = scale.float().reshape(amax.shape)
        inv_given = _ieee_div(torch.ones_like(given), given)
        bad = ~(given > 0) | (inv_given == 0)
        over = bad | (amax * inv_given > fmt.overflow_threshold)
        s = torch.where(over, dyn, given)
    shape = scale_shape(tuple(t.shape), granularity, block_size, role)
    s = s.reshape(shape).contiguous()
    inv = _ieee_div(torch.ones_like(s), s)
    scaled = t.float() * expand_scale(inv, tuple(t.shape))
    if fmt.name == "e4m3":
        # E4M3 has no infinity: saturate, as torch >= 2.13 does (older torch made infinities NaN).
        scaled = torch.where(scaled.isinf(), scaled.sign() * fmt.max_value, scaled)
    q = scaled.to(fmt.torch_dtype)
    return q, s


def overflow_groups(t: torch.Tensor, scale: torch.Tensor, fmt: str | FP8Format = "e4m3", granularity: str = "tensor",
                    block_size: tuple[int, int] | None = None, role: str = "activation") -> int:
    """How many scale groups of ``t`` a given ``scale`` cannot hold (what strict mode reports)."""
    fmt = FP8Format.from_name(fmt)
    amax = group_amax(t, granularity, block_size, role)
    given = scale.float().reshape(amax.shape)
    inv_given = _ieee_div(torch.ones_like(given), given)
    over = ~(given > 0) | (inv_given == 0) | (amax * inv_given > fmt.overflow_threshold)
    return int(over.sum())


def fp8_matmul_reference(a_q: torch.Tensor, b_q: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 ``dequant(a) @ dequant(b) + bias``: what an FP8 GEMM computes before its output rounding."""
    a = a_q.double() * expand_scale(a_scale, tuple(a_q.shape)).double()
    b = b_q.double() * expand_scale(b_scale, tuple(b_q.shape)).double()
    out = a @ b
    if bias is not None:
        out = out + bias.double()
    return out


__all__ = ["fp8_matmul_reference", "group_amax", "overflow_groups", "quantize_fp8_reference", "scale_from_amax"]
