"""A gated MLP's down projection in FP8 without its hidden state in 16 bits: ``act(gate) * up`` quantized in one
pass (:func:`quantize_gated_fp8`) and the W8A8 GEMM over it (:func:`fp8_gated_linear`).

A W8A8 prefill of ``down_proj(act(gate) * up)`` otherwise runs the activation, the product and the down
projection's quantization of the product as three passes over ``[tokens, intermediate]`` tensors (Llama-3-8B at
2048 tokens: 59 MB each in bf16, about 440 MB read and written per layer); here the product is formed in fp32 from
``gate`` and ``up`` as they are read and only its E4M3 values and scales are written (about 150 MB). The product is
never rounded to the inputs' dtype, so the result differs from the unfused path by at most that rounding (one bf16
ulp of the product), far below the FP8 cast that follows.

Scales follow :func:`fp8_gemm.quantize_fp8`'s convention (``dequantized = quantized.float() * scale``): per row
(``[..., 1]``) or per row and 128 columns (``[rows, ceil(intermediate / 128)]``, 1x128 blocks, DeepSeek-V3 style,
what 128x128 block-scaled weights pair with); a per-tensor scale is computed from the product in fp32 with torch
operations (there is no one-pass kernel for it: the whole product's maximum comes before the first cast).
"""

from __future__ import annotations

import math

import torch
from triton_ops_core import scratch as _scratch
from triton_ops_core.device import is_interpreter
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.gated_activation import (
    ACTIVATION_CODES,
    SWIGLU_OAI_ALPHA,
    SWIGLU_OAI_LIMIT,
    check_gate_up,
    gated_product,
)
from triton_ops_core.launch import Plan, PlanCache, call_key, cdiv, next_pow2
from triton_ops_core.library import direct_call_ok, op_name
from triton_ops_core.models import FP8Format
from triton_ops_core.validation import (
    check_choice,
    check_ndim,
    check_same_device,
    check_tensor,
)

from .gemm import _CACHE_CLEARERS, _new_call
from .quantize import _fp8_ok, expand_scale, quantize_fp8
from .quantize_kernels import _quant_gated_groups_kernel, _quant_gated_rows_kernel
from .validation import SCALE_BLOCK

ACTIVATIONS = tuple(ACTIVATION_CODES)
GATED_GRANULARITIES = ("tensor", "row", "block")

_QUANT_PLANS = PlanCache()
_LINEAR_PLANS = PlanCache()
_CACHE_CLEARERS.append(_QUANT_PLANS.clear)
_CACHE_CLEARERS.append(_LINEAR_PLANS.clear)

# The per-row kernel keeps a whole row in registers up to this many columns (one read of gate and up: Llama-3-8B's
# 14336, Qwen3's 12288 and 6144), on up to 16 warps (32 products a thread); longer rows are walked twice in tiles of
# _ROW_TILE columns (the second read finds them in L2 where the rows in flight fit there, else in HBM: still less
# than the unfused passes move).
_SINGLE_ROW_MAX = 16384
_ROW_TILE = 4096
_GROUP_ROWS = 32  # rows of a 1x128-block program's tile: 4096 products, as quantize_fp8's activation blocks


def gated_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu", *,
                    alpha: float = SWIGLU_OAI_ALPHA, limit: float = SWIGLU_OAI_LIMIT) -> torch.Tensor:
    """``act(gate) * up`` in float32 with torch operations: what the kernels compute before the cast (and the
    per-tensor path, and the backward's recomputation)."""
    check_choice(activation, "activation", ACTIVATIONS)
    return gated_product(gate.float(), up.float(), activation, alpha, limit)


def _validate_pair(gate: object, up: object, activation: object, granularity: object) -> None:
    check_gate_up(gate, up, activation)
    check_choice(granularity, "granularity", GATED_GRANULARITIES)
    if not _fp8_ok(gate.device):
        name = torch.cuda.get_device_name(gate.device) if gate.device.type == "cuda" else str(gate.device)
        raise UnsupportedDtypeError(f"gate: FP8 needs a GPU with FP8 tensor cores (compute capability 8.9 or "
                                    f"higher), got {name}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, C]`` with unit column stride (a view where it can be: a packed gate/up output's halves
    are row-strided views and stay so)."""
    t2 = t.reshape(math.prod(t.shape[:-1]), t.shape[-1]) if t.dim() != 2 else t  # (-1 fails for C == 0)
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


class _GatedQuantPlan:
    """One ``quantize_gated_fp8`` call signature: the launch (None for per-tensor scales, which run in torch)."""

    __slots__ = ("granularity", "activation", "alpha", "limit", "launch", "scale_shape", "lead")

    def run(self, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q [rows, C], scale)``: 2-D, the scale ``[rows, 1]`` or ``[rows, ceil(C / 128)]`` (or ``[1]``)."""
        g2, u2 = _rows(gate), _rows(up)
        if self.launch is None:
            h = gated_reference(g2, u2, self.activation, alpha=self.alpha, limit=self.limit)
            return quantize_fp8(h, "e4m3", "tensor")
        q = torch.empty(g2.shape, dtype=torch.float8_e4m3fn, device=gate.device)
        s = torch.empty(self.scale_shape, dtype=torch.float32, device=gate.device)
        if g2.numel():
            self.launch.launch(g2, u2, q.view(torch.uint8) if is_interpreter() else q, s)
        return q, s


def _gated_plan(gate: torch.Tensor, up: torch.Tensor, activation: str, granularity: str, alpha: float,
                limit: float) -> _GatedQuantPlan:
    """The plan of a validated call."""
    plan = _GatedQuantPlan()
    plan.granularity, plan.activation, plan.alpha, plan.limit = granularity, activation, float(alpha), float(limit)
    plan.lead = tuple(gate.shape[:-1])
    g2, u2 = _rows(gate), _rows(up)
    r, c = g2.shape
    plan.launch = None
    if granularity == "tensor":
        plan.scale_shape = (1,)
        return plan
    e4m3 = FP8Format.E4M3
    code, emulate = ACTIVATION_CODES[activation], is_interpreter()
    stride_g, stride_u = (g2.stride(0) if r > 1 else c), (u2.stride(0) if r > 1 else c)
    if granularity == "row":
        plan.scale_shape = (r, 1)
        single = c <= _SINGLE_ROW_MAX
        block_c = next_pow2(c) if single else _ROW_TILE
        block_r = max(1, min(next_pow2(r), 4096 // block_c))
        tail = (r, c, stride_g, stride_u, c, plan.alpha, plan.limit, code, e4m3.max_value, True, emulate, block_r,
                block_c, single)
        warps = min(16, max(4, block_r * block_c // 1024))
        plan.launch = Plan(_quant_gated_rows_kernel, (cdiv(r, block_r),), tail, warps)
    else:
        groups = cdiv(c, SCALE_BLOCK)
        plan.scale_shape = (r, groups)
        tail = (r, c, stride_g, stride_u, c, groups, plan.alpha, plan.limit, code, e4m3.max_value, True, emulate,
                _GROUP_ROWS, SCALE_BLOCK)
        plan.launch = Plan(_quant_gated_groups_kernel, (cdiv(r, _GROUP_ROWS), groups), tail, 4)
    return plan


def _quantize_gated(gate, up, activation, granularity, alpha, limit) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        key = call_key(gate, up, activation, granularity, alpha, limit)
    except (AttributeError, RuntimeError, TypeError):  # not tensors: validation says which
        key = None
    plan = _QUANT_PLANS.get(key) if key is not None else None
    if plan is None:
        _validate_pair(gate, up, activation, granularity)
        plan = _gated_plan(gate, up, activation, granularity, alpha, limit)
        if key is not None:
            _QUANT_PLANS.put(key, plan)
    q, s = plan.run(gate, up)
    lead = plan.lead
    if len(lead) != 1:  # back to the caller's leading shape (row scales too); block scales stay [rows, groups]
        q = q.view(*lead, q.shape[-1])
        if granularity == "row":
            s = s.view(*lead, 1)
    return q, s


def quantize_gated_fp8(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu", granularity: str = "row", *,
                       alpha: float = SWIGLU_OAI_ALPHA,
                       limit: float = SWIGLU_OAI_LIMIT) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8(act(gate) * up, "e4m3", granularity)`` in one pass: the product formed in fp32 as ``gate`` and
    ``up`` are read, only its E4M3 values and scales written.

    Args:
        gate, up: ``[..., intermediate]``, same shape and dtype (fp16, bf16 or fp32), unit stride along the last
            dimension or any layout (copied then); the halves of a packed ``[rows, 2 * intermediate]`` output are
            read in place.
        activation: ``"silu"`` (SwiGLU), ``"gelu"`` (exact), ``"gelu_tanh"`` or ``"swiglu_oai"`` (gpt-oss:
            ``gate.clamp(max=limit) * sigmoid(alpha * gate) * (up.clamp(-limit, limit) + 1)``).
        granularity: ``"row"`` (per token: scale ``[..., 1]``), ``"block"`` (1x128 blocks of the 2-D
            ``[rows, intermediate]`` view: scale ``[rows, ceil(intermediate / 128)]``) or ``"tensor"`` (``[1]``;
            the product is formed in fp32 by torch first).
        alpha, limit: swiglu_oai's constants (ignored by the other activations).

    Returns ``(quantized, scale)``: ``quantized`` of ``gate``'s shape in ``torch.float8_e4m3fn`` with
    ``quantized.float() * scale ~= act(gate.float()) * up.float()`` (:func:`gated_reference`), each scale
    ``amax / 448`` of its group over finite values (1 for an all-zero group); NaN stays NaN. Needs FP8 (compute
    capability 8.9 or higher, or Triton's interpreter). Not differentiable (use :func:`fp8_gated_linear`).
    Registered as ``torch.ops.triton_ops.quantize_gated_fp8``.
    """
    if direct_call_ok(gate, up):  # plain eager: no dispatcher round trip
        return _quantize_gated(gate, up, activation, granularity, alpha, limit)
    return _quantize_gated_op(gate, up, activation, granularity, float(alpha), float(limit))


@torch.library.custom_op(op_name("quantize_gated_fp8"), mutates_args=())
def _quantize_gated_op(gate: torch.Tensor, up: torch.Tensor, activation: str, granularity: str, alpha: float,
                       limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_gated(gate, up, activation, granularity, alpha, limit)


@_quantize_gated_op.register_fake
def _(gate, up, activation, granularity, alpha, limit):
    shape = tuple(gate.shape)
    rows = 1
    for d in shape[:-1]:
        rows *= d
    if granularity == "tensor":
        s_shape = (1,)
    elif granularity == "row":
        s_shape = (*shape[:-1], 1)
    else:
        s_shape = (rows, cdiv(shape[-1], SCALE_BLOCK))
    return gate.new_empty(shape, dtype=torch.float8_e4m3fn), gate.new_empty(s_shape, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------
# The down projection over the quantized product
# --------------------------------------------------------------------------------------------------------------


def _validate_linear(gate, up, weight, weight_scale, bias, activation, granularity) -> None:
    _validate_pair(gate, up, activation, granularity)
    check_tensor(weight, "weight")
    check_ndim(weight, "weight", exact=2)
    if weight.dtype != torch.float8_e4m3fn:
        raise InvalidArgumentError(f"weight: expected torch.float8_e4m3fn ([out_features, in_features], an "
                                   f"FP8Linear's), got {weight.dtype}")
    if gate.shape[-1] != weight.shape[1]:
        raise ShapeMismatchError(f"gate: expected last dimension {weight.shape[1]} (the weight's in_features), got "
                                 f"shape {list(gate.shape)}")
    check_tensor(weight_scale, "weight_scale")
    check_same_device(gate=gate, weight=weight, weight_scale=weight_scale)
    if bias is not None:
        check_tensor(bias, "bias")
        check_same_device(gate=gate, bias=bias)


def _gated_linear(gate, up, weight, weight_scale, bias, activation, granularity, fast_accum, alpha,
                  limit) -> torch.Tensor:
    try:
        key = call_key(gate, up, weight, weight_scale, bias, activation, granularity, fast_accum, alpha, limit)
    except (AttributeError, RuntimeError, TypeError):
        key = None
    plan = _LINEAR_PLANS.get(key) if key is not None else None
    if plan is None:
        _validate_linear(gate, up, weight, weight_scale, bias, activation, granularity)
        quant = _gated_plan(gate, up, activation, granularity, alpha, limit)
        rows = 1
        for d in gate.shape[:-1]:
            rows *= d
        # the GEMM's plan depends on the quantized product's metadata only (fresh tensors: a fixed layout)
        a_q = torch.empty((rows, gate.shape[-1]), dtype=torch.float8_e4m3fn, device=gate.device)
        a_s = torch.empty(quant.scale_shape, dtype=torch.float32, device=gate.device)
        gemm = _new_call(a_q, weight.t(), a_s, weight_scale, gate.dtype, bias, fast_accum, None)
        plan = (quant, gemm)
        if key is not None:
            _LINEAR_PLANS.put(key, plan)
    quant, gemm = plan
    a_q, a_s = quant.run(gate, up)
    out = gemm.run(a_q, weight.t(), a_s, weight_scale, bias)
    return out.view(*gate.shape[:-1], weight.shape[0])


def fp8_gated_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, activation: str = "silu", activation_granularity: str = "row",
                     fast_accum: bool = False, *, alpha: float = SWIGLU_OAI_ALPHA,
                     limit: float = SWIGLU_OAI_LIMIT) -> torch.Tensor:
    """A gated MLP's down projection in FP8, W8A8: ``(act(gate) * up) @ dequant(weight)^T + bias``, the product
    quantized per ``activation_granularity`` in the pass that forms it (:func:`quantize_gated_fp8`), then the FP8
    GEMM (:func:`fp8_gemm`). Two launches where the unfused path makes four (activation, product, quantization,
    GEMM) and writes and reads the product in 16 bits twice.

    Args:
        gate, up: ``[..., in_features]``, as :func:`quantize_gated_fp8` takes them.
        weight: ``float8_e4m3fn`` ``[out_features, in_features]``; weight_scale: its scale in the GEMM's ``[K, N]``
            convention (``[1]``, ``[1, out]``, 128x128 blocks ``[ceil(in / 128), ceil(out / 128)]`` or groups
            ``[ceil(in / 128), out]``), as ``FP8Linear`` stores them (``down_proj.weight``,
            ``down_proj.weight_scale``).
        bias: ``[out_features]`` or None, added in fp32 before the output's rounding.
        activation: as :func:`quantize_gated_fp8`'s. activation_granularity: ``"row"``, ``"block"`` (1x128) or
            ``"tensor"``, as ``FP8Linear``'s. fast_accum: as :func:`fp8_gemm`'s.
        alpha, limit: swiglu_oai's constants.

    Returns ``[..., out_features]`` in ``gate``'s dtype. Always W8A8 (a decode step's few rows read the weight
    faster weight-only: ``fp8_linear(act(gate) * up, ...)``). Registered as
    ``torch.ops.triton_ops.fp8_gated_linear``. Differentiable in ``gate``, ``up`` and ``bias``, as
    :func:`fp8_linear` is in its input: the product's gradient is ``grad @ dequant(weight)`` (the quantization
    passes it straight through), then through ``act(gate) * up`` in fp32; the FP8 weight gets none.
    """
    if direct_call_ok(gate, up, weight, weight_scale, bias):  # plain eager: no dispatcher round trip
        return _gated_linear(gate, up, weight, weight_scale, bias, activation, activation_granularity, fast_accum,
                             alpha, limit)
    return _gated_linear_op(gate, up, weight, weight_scale, bias, activation, activation_granularity,
                            bool(fast_accum), float(alpha), float(limit))


@torch.library.custom_op(op_name("fp8_gated_linear"), mutates_args=())
def _gated_linear_op(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None, activation: str, activation_granularity: str, fast_accum: bool,
                     alpha: float, limit: float) -> torch.Tensor:
    with _scratch.per_call():  # no buffer outlives the call (torch.compile's CUDA graphs; see _scratch)
        return _gated_linear(gate, up, weight, weight_scale, bias, activation, activation_granularity, fast_accum,
                             alpha, limit)


@_gated_linear_op.register_fake
def _(gate, up, weight, weight_scale, bias, activation, activation_granularity, fast_accum, alpha, limit):
    return gate.new_empty((*gate.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    gate, up, weight, weight_scale, bias, activation, _, _, alpha, limit = inputs
    ctx.save_for_backward(gate, up, weight, weight_scale)
    ctx.activation, ctx.alpha, ctx.limit = activation, alpha, limit
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    gate, up, weight, weight_scale = ctx.saved_tensors
    out_features, in_features = weight.shape
    g2 = grad.reshape(-1, out_features)
    dgate = dup = dbias = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        w_kn = weight.t().float() * expand_scale(weight_scale, (in_features, out_features))
        dh = (g2 @ w_kn.t().to(grad.dtype)).reshape(gate.shape).float()
        with torch.enable_grad():
            g = gate.detach().float().requires_grad_()
            u = up.detach().float().requires_grad_()
            h = gated_reference(g, u, ctx.activation, alpha=ctx.alpha, limit=ctx.limit)
            dg, du = torch.autograd.grad(h, (g, u), dh)
        dgate, dup = dg.to(gate.dtype), du.to(up.dtype)
    if ctx.needs_input_grad[4]:
        dbias = g2.float().sum(0).to(ctx.bias_dtype)
    return dgate, dup, None, None, dbias, None, None, None, None, None


_gated_linear_op.register_autograd(_backward, setup_context=_setup_context)


__all__ = ["ACTIVATIONS", "GATED_GRANULARITIES", "fp8_gated_linear", "gated_reference", "quantize_gated_fp8"]
