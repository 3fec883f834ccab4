"""The gated activations of transformer MLPs, shared by every package that computes ``act(gate) * up``: the fused
gated MLP's epilogue and its one-pass ``gated_activation``, FP8's fused quantization of a gated MLP's hidden state.

``ACTIVATION_CODES`` maps the names the packages accept to the ``ACTIVATION`` constexpr of :func:`gate_times_up`
(``@triton.jit``, fp32); :func:`gated_product` is the same function in PyTorch operations (the references).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .exceptions import ShapeMismatchError
from .validation.common import (
    FLOAT_DTYPES,
    check_choice,
    check_dtype,
    check_kernel_device,
    check_ndim,
    check_same_device,
    check_same_dtype,
    check_tensor,
)

ACT_SILU = 0
ACT_GELU = 1
ACT_GELU_TANH = 2
ACT_SWIGLU_OAI = 3
ACTIVATION_CODES = {
    "silu": ACT_SILU,  # SwiGLU: Llama, Qwen, Mistral
    "gelu": ACT_GELU,  # exact (erf)
    "gelu_tanh": ACT_GELU_TANH,  # GeGLU with the tanh approximation: Gemma
    "swiglu_oai": ACT_SWIGLU_OAI,  # gpt-oss: clamped gate and up, (up + 1), sigmoid(alpha * gate)
}


# gpt-oss's swiglu_oai constants (transformers' GptOssExperts: alpha 1.702, limit 7.0)
SWIGLU_OAI_ALPHA = 1.702
SWIGLU_OAI_LIMIT = 7.0


def check_gate_up(gate: object, up: object, activation: object) -> None:
    """The inputs of one gated activation: ``gate`` and ``up`` tensors of one shape (at least 1-D), dtype (fp16,
    bf16 or fp32) and device, on a device the kernels run on, and an activation of :data:`ACTIVATION_CODES`;
    named errors otherwise."""
    check_tensor(gate, "gate")
    check_tensor(up, "up")
    check_dtype(gate, "gate", FLOAT_DTYPES)
    check_ndim(gate, "gate", minimum=1)
    if up.shape != gate.shape:
        raise ShapeMismatchError(f"up: expected gate's shape {list(gate.shape)}, got {list(up.shape)}")
    check_same_dtype(gate=gate, up=up)
    check_same_device(gate=gate, up=up)
    check_choice(activation, "activation", tuple(ACTIVATION_CODES))
    check_kernel_device(gate, "gate")


def gated_product(gate: torch.Tensor, up: torch.Tensor, activation: str, alpha: float = SWIGLU_OAI_ALPHA,
                  limit: float = SWIGLU_OAI_LIMIT) -> torch.Tensor:
    """``act(gate) * up`` with PyTorch operations in the inputs' dtype (``activation``: a key of
    :data:`ACTIVATION_CODES`, already validated)."""
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    g = gate.clamp(max=limit)
    return g * torch.sigmoid(alpha * g) * (up.clamp(-limit, limit) + 1)


@triton.jit
def sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def gate_times_up(gate, up, alpha, limit, ACTIVATION: tl.constexpr):
    """``act(gate) * up`` in fp32 (``alpha``, ``limit``: swiglu_oai's only). Clamps use ``tl.where`` so NaN passes
    through as in ``torch.clamp``."""
    if ACTIVATION == 0:  # silu
        out = gate * sigmoid(gate) * up
    elif ACTIVATION == 1:  # gelu, exact (erf)
        out = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)) * up
    elif ACTIVATION == 2:  # gelu, tanh approximation: 0.5 g (1 + tanh(z)) == g * sigmoid(2 z)
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        out = gate * sigmoid(2.0 * z) * up
    else:  # swiglu_oai (gpt-oss): clamped gate and up, (up + 1)
        g = tl.where(gate > limit, limit, gate)
        u = tl.where(up > limit, limit, tl.where(up < -limit, -limit, up))
        out = g * sigmoid(alpha * g) * (u + 1.0)
    return out
