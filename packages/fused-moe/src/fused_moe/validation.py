"""Validation and the input model of the mixture of experts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.launch import cdiv
from triton_ops_core.validation.common import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    check_choice,
    check_dim_size,
    check_dtype,
    check_kernel_device,
    check_last_dim_contiguous,
    check_ndim,
    check_positive,
    check_same_device,
    check_same_dtype,
    check_tensor,
)

ACTIVATIONS = ("swiglu_oai", "silu", "gelu", "gelu_tanh")
# Weight-only FP8 experts: E4M3 or E5M2 weights with one fp32 scale per expert and output column
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
GATE_UP_LAYOUTS = ("interleaved", "concatenated")
MAX_EXPERTS = 1024  # every expert's logit of a token lives in one tile of the routing kernel
MAX_TOP_K = 64
SCALE_BLOCK = 128  # rows and columns of one block of block-scaled FP8 experts (DeepSeek-V3's, transformers' FP8Experts)


@dataclass(frozen=True)
class MoEInput:
    """A validated call of the experts: sizes and options."""

    num_tokens: int
    hidden_dim: int
    intermediate_dim: int
    num_experts: int
    top_k: int
    activation: str
    gate_up_layout: str
    transposed: bool

    def weight_bytes_touched(self, experts_hit: int, element_size: int) -> int:
        """Bytes of expert weights a forward must read when ``experts_hit`` distinct experts get a token."""
        return experts_hit * 3 * self.hidden_dim * self.intermediate_dim * element_size


def _check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidArgumentError(f"{name}: expected an int {bound}, got {value!r}")
    return value


def _check_float(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError(f"{name}: expected a finite number, got {value!r}")


def _check_x(x: object, name: str = "hidden") -> torch.Tensor:
    check_tensor(x, name)
    check_dtype(x, name, HALF_DTYPES + (torch.float32,))
    check_kernel_device(x, name)
    check_ndim(x, name, minimum=1)
    check_last_dim_contiguous(x, name)
    if x.shape[-1] == 0:
        raise ShapeMismatchError(f"{name}: expected a non-empty hidden (last) dimension, got shape {list(x.shape)}")
    return x


def _check_bias(bias: torch.Tensor | None, name: str, shape: tuple[int, ...]) -> None:
    if bias is None:
        return
    check_tensor(bias, name)
    check_dtype(bias, name, FLOAT_DTYPES)
    check_ndim(bias, name, exact=len(shape))
    for d, size in enumerate(shape):
        check_dim_size(bias, name, d, size)


def validate_route_inputs(hidden: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None,
                          top_k: int, renormalize: bool = True) -> tuple[int, int]:
    """Check a ``moe_route`` call; returns ``(num_experts, hidden_dim)``.

    ``hidden`` is ``[..., H]`` (fp16/bf16/fp32, unit last stride), ``router_weight`` ``[E, H]`` of its dtype with
    unit last stride, ``router_bias`` ``[E]`` or None, ``1 <= top_k <= E``.
    """
    _check_x(hidden)
    h = hidden.shape[-1]
    check_tensor(router_weight, "router_weight")
    check_ndim(router_weight, "router_weight", exact=2)
    check_dim_size(router_weight, "router_weight", 1, h, "hidden's hidden size")
    check_last_dim_contiguous(router_weight, "router_weight")
    check_same_dtype(hidden=hidden, router_weight=router_weight)
    e = router_weight.shape[0]
    if e == 0 or e > MAX_EXPERTS:
        raise ShapeMismatchError(f"router_weight: expected 1 to {MAX_EXPERTS} experts (rows), got {e}")
    _check_bias(router_bias, "router_bias", (e,))
    check_same_device(hidden=hidden, router_weight=router_weight, router_bias=router_bias)
    if not isinstance(renormalize, bool):
        raise InvalidArgumentError(f"renormalize: expected a bool, got {renormalize!r}")
    _check_int(top_k, "top_k", 1, min(e, MAX_TOP_K))
    return e, h


def validate_experts_inputs(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_proj_bias: torch.Tensor | None,
    down_proj: torch.Tensor,
    down_proj_bias: torch.Tensor | None,
    activation: str = "swiglu_oai",
    gate_up_layout: str = "interleaved",
    transposed: bool = True,
    alpha: float = 1.702,
    limit: float = 7.0,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    fp8_activations: bool = False,
) -> MoEInput:
    """Check a ``moe_experts`` call and return its sizes.

    With ``transposed=True`` (gpt-oss) ``gate_up_proj`` is ``[E, H, 2I]`` and ``down_proj`` ``[E, I, H]``
    (``x @ W``); with ``transposed=False`` (Qwen3-MoE, Mixtral in transformers 5) they are ``[E, 2I, H]`` and
    ``[E, H, I]`` (``F.linear``). Biases are ``[E, 2I]`` and ``[E, H]`` or None. ``topk_ids`` is ``[T, k]``
    integer (int32 or int64) with ids in ``[0, E)`` (not checked on the device: that would sync), and
    ``topk_weights`` ``[T, k]`` floating point, where ``T`` is the number of tokens of ``hidden``.

    FP8 experts: ``gate_up_proj`` and ``down_proj`` both ``float8_e4m3fn`` or both ``float8_e5m2``, with
    ``gate_up_scale`` ``[E, 2I]`` and ``down_scale`` ``[E, H]`` in fp32 (one scale per expert and output column;
    ``quantize_experts_fp8`` makes them), or with 128x128 block scales (FP8 checkpoints' experts, transformers'
    ``FP8Experts``): ``gate_up_scale`` ``[E, ceil(2I / 128), ceil(H / 128)]`` and ``down_scale`` ``[E, ceil(H /
    128), ceil(I / 128)]`` in fp32, output features by input features whatever the weights' layout, the
    concatenated gate/up layout only; 16/32-bit weights take no scales. ``fp8_activations`` (W8A8) needs
    ``float8_e4m3fn`` experts.
    """
    x = _check_x(hidden)
    h = x.shape[-1]
    t = x.numel() // h
    check_choice(activation, "activation", ACTIVATIONS)
    check_choice(gate_up_layout, "gate_up_layout", GATE_UP_LAYOUTS)
    if not isinstance(transposed, bool):
        raise InvalidArgumentError(f"transposed: expected a bool, got {transposed!r}")
    _check_float(alpha, "alpha")
    check_positive(limit, "limit")
    for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        check_tensor(w, name)
        check_ndim(w, name, exact=3)
    if not isinstance(fp8_activations, bool):
        raise InvalidArgumentError(f"fp8_activations: expected a bool, got {fp8_activations!r}")
    if fp8_activations and (gate_up_proj.dtype, down_proj.dtype) != (torch.float8_e4m3fn, torch.float8_e4m3fn):
        raise InvalidArgumentError(
            "fp8_activations: E4M3 activations go with float8_e4m3fn expert weights (W8A8); the weights are "
            f"{str(gate_up_proj.dtype).removeprefix('torch.')} and {str(down_proj.dtype).removeprefix('torch.')} "
            "(fused_moe.quantize_experts_fp8 makes them)")
    fp8 = gate_up_proj.dtype in FP8_DTYPES or down_proj.dtype in FP8_DTYPES
    if fp8:
        check_same_dtype(gate_up_proj=gate_up_proj, down_proj=down_proj)
    else:
        check_same_dtype(hidden=x, gate_up_proj=gate_up_proj, down_proj=down_proj)
    e = gate_up_proj.shape[0]
    if e == 0:
        raise ShapeMismatchError(f"gate_up_proj: expected at least one expert, got shape {list(gate_up_proj.shape)}")
    h_dim, n_dim = (1, 2) if transposed else (2, 1)
    check_dim_size(gate_up_proj, "gate_up_proj", h_dim, h, "hidden's hidden size")
    two_i = gate_up_proj.shape[n_dim]
    if two_i == 0 or two_i % 2:
        raise ShapeMismatchError(
            f"gate_up_proj: expected an even, non-zero 2 * intermediate size in dimension {n_dim}, got "
            f"shape {list(gate_up_proj.shape)}")
    inter = two_i // 2
    expected_down = (e, inter, h) if transposed else (e, h, inter)
    for d, size in enumerate(expected_down):
        check_dim_size(down_proj, "down_proj", d, size,
                       ("gate_up_proj's experts", "the intermediate size" if transposed else "the hidden size",
                        "the hidden size" if transposed else "the intermediate size")[d])
    _check_bias(gate_up_proj_bias, "gate_up_proj_bias", (e, two_i))
    _check_bias(down_proj_bias, "down_proj_bias", (e, h))
    blocks = isinstance(gate_up_scale, torch.Tensor) and gate_up_scale.dim() == 3
    if blocks and gate_up_layout != "concatenated":
        raise InvalidArgumentError(
            "gate_up_scale: 128x128 block scales go with the concatenated gate/up layout (transformers' FP8Experts), "
            f"got gate_up_layout={gate_up_layout!r}")
    if blocks and inter % 16:
        raise ShapeMismatchError(
            f"gate_up_proj: 128x128 block-scaled experts need an intermediate size that is a multiple of 16 (each "
            f"tile of the up half inside one scale block), got {inter}")
    shapes = (((e, cdiv(two_i, SCALE_BLOCK), cdiv(h, SCALE_BLOCK)), (e, cdiv(h, SCALE_BLOCK), cdiv(inter, SCALE_BLOCK)))
              if blocks else ((e, two_i), (e, h)))
    what = ("128x128 block scales (output features by input features)" if blocks
            else "one per expert and output column")
    for name, scale, shape in (("gate_up_scale", gate_up_scale, shapes[0]), ("down_scale", down_scale, shapes[1])):
        if not fp8:
            if scale is not None:
                raise InvalidArgumentError(
                    f"{name}: scales go with FP8 expert weights (float8_e4m3fn / float8_e5m2); the weights are "
                    f"{str(gate_up_proj.dtype).removeprefix('torch.')}")
            continue
        if scale is None:
            raise InvalidArgumentError(
                f"{name}: FP8 expert weights need their fp32 scales, {list(shape)} ({what}; "
                "fused_moe.quantize_experts_fp8 makes weights and scales)")
        check_tensor(scale, name)
        check_dtype(scale, name, (torch.float32,))
        check_ndim(scale, name, exact=len(shape))
        for d, size in enumerate(shape):
            check_dim_size(scale, name, d, size)

    check_tensor(topk_ids, "topk_ids")
    check_tensor(topk_weights, "topk_weights")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise UnsupportedDtypeError(
            f"topk_ids: expected dtype in (int32, int64), got {str(topk_ids.dtype).removeprefix('torch.')}")
    check_dtype(topk_weights, "topk_weights", FLOAT_DTYPES)
    check_ndim(topk_ids, "topk_ids", exact=2)
    check_dim_size(topk_ids, "topk_ids", 0, t, "hidden's number of tokens")
    k = topk_ids.shape[1]
    _check_int(k, "topk_ids.shape[1] (top_k)", 1, min(e, MAX_TOP_K))
    check_ndim(topk_weights, "topk_weights", exact=2)
    check_dim_size(topk_weights, "topk_weights", 0, t, "hidden's number of tokens")
    check_dim_size(topk_weights, "topk_weights", 1, k, "topk_ids' top_k")
    if e > MAX_EXPERTS:
        raise ShapeMismatchError(f"gate_up_proj: expected at most {MAX_EXPERTS} experts, got {e}")
    check_same_device(hidden=x, topk_ids=topk_ids, topk_weights=topk_weights, gate_up_proj=gate_up_proj,
                      gate_up_proj_bias=gate_up_proj_bias, down_proj=down_proj, down_proj_bias=down_proj_bias,
                      gate_up_scale=gate_up_scale, down_scale=down_scale)
    return MoEInput(num_tokens=t, hidden_dim=h, intermediate_dim=inter, num_experts=e, top_k=k,
                    activation=activation, gate_up_layout=gate_up_layout, transposed=transposed)


__all__ = ["ACTIVATIONS", "FP8_DTYPES", "GATE_UP_LAYOUTS", "MAX_EXPERTS", "MAX_TOP_K", "MoEInput", "SCALE_BLOCK",
           "validate_experts_inputs", "validate_route_inputs"]
