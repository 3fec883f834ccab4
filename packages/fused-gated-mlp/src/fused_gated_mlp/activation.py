"""``gated_activation(gate, up)``: a gated MLP's ``act(gate) * up`` in one pass, for the prefill paths whose gate and
up come out of GEMMs of their own (FP8 W8A8 projections, a packed ``gate_up_proj``).

PyTorch computes ``silu(gate) * up`` as two kernels: the activation writes a tensor that the product reads back
(Llama-3-8B at 2048 tokens: 59 MB each in bf16, about 290 MB moved per layer); here each element is formed in fp32 as
the inputs are read and written once (about 176 MB). The product is rounded once, where PyTorch's composition rounds
the activation first: the results differ by at most that rounding (about one ulp of the output's dtype).
"""

from __future__ import annotations

import math

import torch
from triton_ops_core.gated_activation import ACTIVATION_CODES, SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT, check_gate_up
from triton_ops_core.launch import Plan, PlanCache, call_key, cdiv, next_pow2
from triton_ops_core.library import direct_call_ok, op_name

from . import _kernels as K

_PLANS = PlanCache()
_TILE = 4096  # elements a program: 16 KB of bf16 inputs, the memory-bound kernels' usual share


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, C]`` with unit column stride (a view where it can be)."""
    t2 = t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # (-1 fails for C == 0)
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _plan(gate: torch.Tensor, up: torch.Tensor, activation: str, alpha: float, limit: float) -> Plan:
    g2, u2 = _rows(gate), _rows(up)
    r, c = g2.shape
    block_c = min(next_pow2(max(c, 1)), 1024)
    block_r = max(1, min(next_pow2(max(r, 1)), _TILE // block_c))
    tail = (r, c, g2.stride(0) if r > 1 else c, u2.stride(0) if r > 1 else c, c, float(alpha), float(limit),
            ACTIVATION_CODES[activation], block_r, block_c)
    return Plan(K._gated_activation_kernel, (cdiv(r, block_r), cdiv(c, block_c)), tail, 4 if block_r * block_c <= 2048
                else 8)


def _gated_activation(gate, up, activation, alpha, limit) -> torch.Tensor:
    try:
        key = call_key(gate, up, activation, alpha, limit)
    except (AttributeError, RuntimeError, TypeError):  # not tensors: validation says which
        key = None
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        check_gate_up(gate, up, activation)
        plan = _plan(gate, up, activation, alpha, limit)
        if key is not None:
            _PLANS.put(key, plan)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        plan.launch(_rows(gate), _rows(up), out)
    return out


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu", *,
                     alpha: float = SWIGLU_OAI_ALPHA, limit: float = SWIGLU_OAI_LIMIT) -> torch.Tensor:
    """``act(gate) * up`` in one pass (one read of each input, one write), computed in fp32.

    Args:
        gate, up: same shape and dtype (fp16, bf16 or fp32), unit stride along the last dimension or any layout
            (copied then); the halves of a packed ``[rows, 2 * intermediate]`` output are read in place.
        activation: ``"silu"`` (SwiGLU), ``"gelu"`` (exact), ``"gelu_tanh"`` or ``"swiglu_oai"`` (gpt-oss:
            ``gate.clamp(max=limit) * sigmoid(alpha * gate) * (up.clamp(-limit, limit) + 1)``).
        alpha, limit: swiglu_oai's constants (ignored by the other activations).

    Returns a contiguous tensor of ``gate``'s shape and dtype: PyTorch's ``act(gate) * up`` up to its rounding of
    the activation (this rounds once). Differentiable in ``gate`` and ``up`` (the fused gated MLP's backward
    formulas, fp32). Registered as ``torch.ops.triton_ops.gated_activation``.
    """
    if direct_call_ok(gate, up):  # plain eager: no dispatcher round trip
        return _gated_activation(gate, up, activation, alpha, limit)
    return _gated_activation_op(gate, up, activation, float(alpha), float(limit))


@torch.library.custom_op(op_name("gated_activation"), mutates_args=())
def _gated_activation_op(gate: torch.Tensor, up: torch.Tensor, activation: str, alpha: float,
                         limit: float) -> torch.Tensor:
    return _gated_activation(gate, up, activation, alpha, limit)


@_gated_activation_op.register_fake
def _(gate, up, activation, alpha, limit):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _activation_grads(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, activation: str,
                      alpha: float, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``d(act(gate) * up)`` with respect to gate and up, given the upstream gradient (all fp32)."""
    if activation == "silu":
        s = torch.sigmoid(gate)
        act = gate * s
        dact = s * (1.0 + gate * (1.0 - s))
        return grad * up * dact, grad * act
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(gate * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * gate * gate) * (1.0 / math.sqrt(2.0 * math.pi))
        return grad * up * (cdf + gate * pdf), grad * gate * cdf
    if activation == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (gate + 0.044715 * gate**3))
        act = 0.5 * gate * (1.0 + t)
        dact = 0.5 * (1.0 + t) + 0.5 * gate * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * gate * gate)
        return grad * up * dact, grad * act
    # swiglu_oai: torch.clamp passes the gradient where min <= v <= max, and so do we.
    g = gate.clamp(max=limit)
    u = up.clamp(-limit, limit)
    s = torch.sigmoid(alpha * g)
    glu = g * s
    dglu = s * (1.0 + alpha * g * (1.0 - s))
    d_gate = grad * (u + 1.0) * dglu * (gate <= limit)
    d_up = grad * glu * ((up >= -limit) & (up <= limit))
    return d_gate, d_up


def _setup_context(ctx, inputs, output) -> None:
    gate, up, activation, alpha, limit = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation, ctx.alpha, ctx.limit = activation, alpha, limit


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    d_gate, d_up = _activation_grads(gate.float(), up.float(), grad.float(), ctx.activation, ctx.alpha, ctx.limit)
    return d_gate.to(gate.dtype), d_up.to(up.dtype), None, None, None


_gated_activation_op.register_autograd(_backward, setup_context=_setup_context)


__all__ = ["gated_activation"]
