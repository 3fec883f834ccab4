"""Pure-PyTorch versions of each op, written the way a PyTorch user would: the eager baselines.

The correctness references come from the kernel packages' own ``reference`` modules where they exist, evaluated
in float64 (CPU, small cases) or float32 (large GPU cases); these functions are the eager baselines (run in the
input's dtype, as Hugging Face models do) and what ``torch.compile`` compiles.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from fp8_gemm.reference import quantize_fp8_reference as _quantize_fp8_reference
from fused_gated_mlp import gated_mlp_reference as _gated_mlp_reference
from fused_rmsnorm_rope.reference import qk_norm_rope_reference as _qk_norm_rope_reference
from fused_rmsnorm_rope.reference import rmsnorm_rope_reference as _rmsnorm_rope_reference

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def rope_tables(seq: int, head_dim: int, dtype: torch.dtype, device, base: float = 10000.0):
    """cos/sin of the neox (rotate_half) layout, ``[seq, head_dim]``, as Llama builds them."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(y: torch.Tensor) -> torch.Tensor:
    half = y.shape[-1] // 2
    return torch.cat((-y[..., half:], y[..., :half]), dim=-1)


def rmsnorm_rope_eager(x, weight, cos, sin, eps: float = 1e-6, position_ids=None):
    """Llama-style RMSNorm (statistics in fp32, cast back, times weight) then neox RoPE on every head."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    head_dim = cos.shape[-1]
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]  # [..., seq, head_dim]
    y = y.view(*y.shape[:-1], -1, head_dim)
    out = y * cos.unsqueeze(-2) + _rotate_half(y) * sin.unsqueeze(-2)
    return out.view(x.shape)


def rmsnorm_rope_exact(x, weight, cos, sin, eps: float = 1e-6, position_ids=None, dtype=torch.float64):
    """The same computation carried out entirely in ``dtype`` (the correctness reference)."""
    return rmsnorm_rope_eager(x.to(dtype), weight.to(dtype), cos.to(dtype), sin.to(dtype), eps, position_ids)


def qk_norm_rope_eager(q, k, q_weight, k_weight, cos, sin, eps: float = 1e-6, position_ids=None):
    """Qwen3-style per-head RMSNorm of q and k then neox RoPE, on ``[batch, seq, heads, head_dim]``."""
    def norm(t, w):
        tf = t.float()
        return (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + eps)).to(t.dtype) * w

    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    qn, kn = norm(q, q_weight), norm(k, k_weight)
    return qn * c + _rotate_half(qn) * s, kn * c + _rotate_half(kn) * s


def qk_norm_rope_exact(q, k, q_weight, k_weight, cos, sin, eps: float = 1e-6, position_ids=None,
                       dtype=torch.float64):
    q2, k2 = qk_norm_rope_eager(q.to(dtype), k.to(dtype), q_weight.to(dtype), k_weight.to(dtype), cos.to(dtype),
                                sin.to(dtype), eps, position_ids)
    return torch.cat((q2.flatten(), k2.flatten()))


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


def gated_mlp_eager(x, gate_weight, up_weight, activation: str = "silu"):
    """``act(x @ Wg^T) * (x @ Wu^T)``: two cuBLAS GEMMs, two intermediates written and read back."""
    return _ACTIVATIONS[activation](F.linear(x, gate_weight)) * F.linear(x, up_weight)


def gpt_oss_expert_eager(x, weight, bias, alpha: float = 1.702, limit: float = 7.0):
    """One gpt-oss expert MLP as the model's PyTorch code computes it: one GEMM on the interleaved packed
    ``[2 * I, H]`` weight with its bias, gate = even columns, up = odd columns, then the clamped SwiGLU
    ``gate * sigmoid(alpha * gate) * (up + 1)`` (gate clamped above at ``limit``, up to ``[-limit, limit]``)."""
    gate_up = F.linear(x, weight, bias)
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def gpt_oss_expert_exact(x, weight, bias, dtype=torch.float64):
    return gpt_oss_expert_eager(x.to(dtype), weight.to(dtype), bias.to(dtype))


def gated_mlp_exact(x, gate_weight, up_weight, activation: str = "silu", dtype=torch.float64):
    return gated_mlp_eager(x.to(dtype), gate_weight.to(dtype), up_weight.to(dtype), activation)


def quantize_fp8_eager(x: torch.Tensor, granularity: str = "tensor", fp8_dtype=torch.float8_e4m3fn,
                       block: int = 128):
    """Dynamic scaling in plain PyTorch: absolute maximum, scale = amax / fmax, divide, clamp, cast.

    ``scale`` is the dequantization factor (``x ~= q * scale``); ``tensor``: a scalar, ``row``: ``[M, 1]``,
    ``block``: ``[M, K / block]`` (1 x ``block`` groups along the last dimension).
    """
    fmax = FP8_MAX[fp8_dtype]
    xf = x.float()
    # x * (1 / scale): one reciprocal per group, then a multiply (fp8_gemm's convention, bit for bit). Both
    # divisions take tensor operands: PyTorch's CUDA division by a Python scalar multiplies by the scalar's
    # reciprocal instead, which puts the scale one bit off for some inputs (and ~0.5 % of the values with it).
    if granularity == "block":
        m, k = xf.shape
        xf = xf.view(m, k // block, block)
    if granularity not in ("tensor", "row", "block"):
        raise ValueError(f"granularity: {granularity!r}")
    amax = xf.abs().amax() if granularity == "tensor" else xf.abs().amax(dim=-1, keepdim=True)
    amax = amax.clamp(min=2.0**-126)
    scale = amax / torch.full_like(amax, fmax)
    q = (xf * (torch.ones_like(scale) / scale)).clamp(-fmax, fmax).to(fp8_dtype)
    if granularity == "block":
        q, scale = q.view(x.shape), scale.squeeze(-1)
    return q, scale


# --------------------------------------------------------------------------- the kernel packages' references
# Each kernel package ships its reference (same arguments as the kernel). The suite uses it for the eager and
# torch.compile baselines (run in the input dtype) and, on upcast inputs, for the correctness reference. The umbrella
# depends on every kernel package: a missing one is an error, never a silently swapped reference.


class _NormState:
    """What an RMSNorm module's forward reads from ``self`` (``weight``, ``variance_epsilon``): transformers' own
    forward runs on it unchanged, without building a module (and a parameter) per call."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight, self.variance_epsilon = weight, eps


def _transformers_module(name: str):
    """``transformers.models.<name>.modeling_<name>``, or None where transformers is not installed."""
    try:
        return importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError:
        return None


def _rope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate_half) -> torch.Tensor:
    # [..., seq, heads, head_dim] against [..., seq, head_dim] tables: the models' q * cos + rotate_half(q) * sin
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return y * c + rotate_half(y) * s


def rmsnorm_rope_baseline():
    """``f(x, weight, cos, sin, eps, position_ids)``, the code users run: transformers' own ``LlamaRMSNorm`` forward
    and its rotary formula (``q * cos + rotate_half(q) * sin``) in the input dtype; without transformers, the same
    code written out (``rmsnorm_rope_eager``)."""
    llama = _transformers_module("llama")
    if llama is None:
        return rmsnorm_rope_eager

    def f(x, weight, cos, sin, eps=1e-6, position_ids=None):
        y = llama.LlamaRMSNorm.forward(_NormState(weight, eps), x)
        if position_ids is not None:
            cos, sin = cos[position_ids], sin[position_ids]
        y = y.view(*y.shape[:-1], -1, cos.shape[-1])
        return _rope(y, cos, sin, llama.rotate_half).view(x.shape)

    return f


def rmsnorm_rope_reference(x, weight, cos, sin, eps=1e-6, position_ids=None, dtype=torch.float64):
    """The correctness reference: the package's reference, all in ``dtype``."""
    return _rmsnorm_rope_reference(x.to(dtype), weight.to(dtype), cos.to(dtype), sin.to(dtype), eps,
                                   position_ids=position_ids)


def add_rmsnorm_eager(x, residual, weight, eps: float = 1e-6):
    """The decoder layer's residual add then Llama's RMSNorm, in the input dtype: ``(y, new residual)``."""
    s = x + residual
    sf = s.float()
    return (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype) * weight, s


def add_rmsnorm_baseline():
    """``f(x, residual, weight, eps)``: the residual add and transformers' own ``LlamaRMSNorm`` forward, as a decoder
    layer runs them, in the input dtype; without transformers, ``add_rmsnorm_eager``."""
    llama = _transformers_module("llama")
    if llama is None:
        return add_rmsnorm_eager

    def f(x, residual, weight, eps=1e-6):
        s = x + residual
        return llama.LlamaRMSNorm.forward(_NormState(weight, eps), s), s

    return f


def add_rmsnorm_reference(x, residual, weight, eps=1e-6, dtype=torch.float64):
    """The correctness reference in ``dtype``: the norm of the sum, then the sum, flattened into one vector."""
    s = x.to(dtype) + residual.to(dtype)
    y = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + eps) * weight.to(dtype)
    return torch.cat((y.flatten(), s.flatten()))


def qk_norm_rope_baseline():
    """``f(q, k, q_weight, k_weight, cos, sin, eps, position_ids)``: transformers' own ``Qwen3RMSNorm`` forward on each
    head, then the rotary formula, in the input dtype; without transformers, ``qk_norm_rope_eager``."""
    qwen3 = _transformers_module("qwen3")
    if qwen3 is None:
        return qk_norm_rope_eager

    def f(q, k, q_weight, k_weight, cos, sin, eps=1e-6, position_ids=None):
        qn = qwen3.Qwen3RMSNorm.forward(_NormState(q_weight, eps), q)
        kn = qwen3.Qwen3RMSNorm.forward(_NormState(k_weight, eps), k)
        if position_ids is not None:
            cos, sin = cos[position_ids], sin[position_ids]
        return _rope(qn, cos, sin, qwen3.rotate_half), _rope(kn, cos, sin, qwen3.rotate_half)

    return f


def qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps=1e-6, position_ids=None, dtype=torch.float64):
    """The correctness reference: the package's reference, all in ``dtype``, q and k flattened into one vector."""
    qo, ko = _qk_norm_rope_reference(q.to(dtype), k.to(dtype), q_weight.to(dtype), k_weight.to(dtype),
                                     cos.to(dtype), sin.to(dtype), position_ids, eps)
    return torch.cat((qo.flatten(), ko.flatten()))


def gated_mlp_baseline():
    def f(x, gate_weight, up_weight, activation="silu"):
        return _gated_mlp_reference(x, gate_weight, up_weight, activation)

    return f


def gated_mlp_reference(x, gate_weight, up_weight, activation="silu", dtype=torch.float64):
    return gated_mlp_baseline()(x.to(dtype), gate_weight.to(dtype), up_weight.to(dtype), activation)


def quantize_fp8_spec(x: torch.Tensor, granularity: str):
    """``(quantized, scale)`` as ``quantize_fp8`` must return them: the package's bit-exact reference."""
    return _quantize_fp8_reference(x, "e4m3", granularity)
