"""Test helpers for the GEMM: E4M3 operands of any granularity and the float64 reference.

The operands come from the package's PyTorch reference quantization (``fp8_gemm.reference``: torch's own cast,
correct on CPU, unlike the interpreter's), so the GEMM tests do not depend on the package's quantization kernels.
"""

from __future__ import annotations

import torch
from fp8_gemm.reference import quantize_fp8_reference

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128


def _expand(scale: torch.Tensor, rows: int, cols: int, gran: str, is_b: bool) -> torch.Tensor:
    s = scale.to(torch.float64)
    if gran == "tensor":
        return s.reshape(1, 1).expand(rows, cols)
    if gran == "row":
        return s.reshape(rows, 1).expand(rows, cols)
    if gran == "channel":
        return s.reshape(1, cols).expand(rows, cols)
    if gran == "group":  # b: one scale per column and 128 rows of K
        return s.repeat_interleave(BLOCK, 0)[:rows, :cols]
    if is_b:
        return s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    return s.repeat_interleave(BLOCK, 1)[:rows, :cols]


def quantize_ref(t: torch.Tensor, gran: str, is_b: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 quantization with amax scaling: a [M, K] by tensor/row/block(1x128), b [K, N] by
    tensor/channel/block(128x128)/group(128x1). Returns (q, scale) with the scale shapes fp8_gemm takes."""
    q, scale = quantize_fp8_reference(t.float(), "e4m3", gran, role="weight" if is_b else "activation")
    if gran == "tensor":
        return q, scale.reshape(())
    return q, (scale.reshape(-1) if gran in ("row", "channel") else scale)  # [M] / [N]: the flat forms


def dequant(q: torch.Tensor, scale: torch.Tensor, gran: str, is_b: bool = False) -> torch.Tensor:
    rows, cols = q.shape
    return q.to(torch.float64) * _expand(scale.to(q.device), rows, cols, gran, is_b)


def gemm_ref(a_q, a_s, a_gran, b_q, b_s, b_gran, bias=None) -> torch.Tensor:
    """The float64 product of the dequantized operands (plus bias): what the kernel must reproduce."""
    out = dequant(a_q, a_s, a_gran) @ dequant(b_q, b_s, b_gran, is_b=True)
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out


def make_operands(m: int, n: int, k: int, a_gran: str, b_gran: str, device, *, kmajor_b: bool = False, seed: int = 0):
    """Random FP8 operands (never zeros) with their scales; b optionally as the transposed view of [N, K]."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g) * 3
    b = torch.randn(k, n, generator=g)
    a_q, a_s = quantize_ref(a, a_gran)
    b_q, b_s = quantize_ref(b, b_gran, is_b=True)
    if kmajor_b:
        b_q = b_q.t().contiguous().t()
    return a_q.to(device), a_s.to(device), b_q.to(device), b_s.to(device)
