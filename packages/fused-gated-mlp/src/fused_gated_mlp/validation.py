"""Validation and the input model of the fused gated MLP."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from triton_ops_core.device import supports_fp8
from triton_ops_core.exceptions import (
    InvalidArgumentError,
    ShapeMismatchError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
)
from triton_ops_core.models import TensorSpec
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

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swiglu_oai")
WEIGHT_LAYOUTS = ("separate", "concatenated", "interleaved")
FP8_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_BLOCK = 128  # rows and columns of one block of a block-scaled FP8 weight


@dataclass(frozen=True)
class GatedMLPInput:
    """A validated call of ``fused_gated_mlp``: ``act(x @ Wg^T + bg) * (x @ Wu^T + bu)``."""

    x: TensorSpec
    num_tokens: int
    hidden_dim: int
    intermediate_dim: int
    activation: str
    weight_layout: str = "separate"
    has_bias: bool = False
    weight_scaling: str | None = None  # FP8 weights: "channel", "block" or "group"; None for weights in x's dtype
    weight_element_size: int | None = None  # bytes per weight element (1 for FP8); None: x's

    @property
    def flops(self) -> int:
        return 2 * 2 * self.num_tokens * self.hidden_dim * self.intermediate_dim

    @property
    def bytes_moved(self) -> int:
        """x read, both weights read, the gated output written (biases and FP8 scales ignored)."""
        esize = self.x.element_size
        wsize = self.weight_element_size or esize
        return (esize * (self.num_tokens * self.hidden_dim + self.num_tokens * self.intermediate_dim)
                + wsize * 2 * self.intermediate_dim * self.hidden_dim)


def validate_gated_mlp_inputs(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor | None = None,
    activation: str = "silu",
    *,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    weight_layout: str = "separate",
    alpha: float = 1.702,
    limit: float = 7.0,
    gate_scale: torch.Tensor | None = None,
    up_scale: torch.Tensor | None = None,
) -> GatedMLPInput:
    """Check a ``fused_gated_mlp`` call and return its sizes.

    ``x`` is ``[..., hidden]``; with ``weight_layout="separate"`` ``gate_weight`` and ``up_weight`` are
    ``[intermediate, hidden]`` (``nn.Linear`` layout); with ``"concatenated"`` or ``"interleaved"``, ``gate_weight``
    is the packed ``[2 * intermediate, hidden]`` weight and ``up_weight`` is None. Biases are ``[intermediate]``
    (``[2 * intermediate]`` when packed, passed as ``gate_bias``). ``alpha`` and ``limit`` (``"swiglu_oai"``'s
    sigmoid scale and clamp) must be finite, ``limit`` positive.

    Weights are in ``x``'s dtype, or FP8 (``float8_e4m3fn`` / ``float8_e5m2``, both alike) with float32 scales on
    ``x``'s device: ``gate_scale`` and ``up_scale`` (packed: one packed ``gate_scale``, ``up_scale`` None), each
    ``[rows]`` per output channel or ``[ceil(rows / 128), ceil(hidden / 128)]`` per 128 x 128 block (unit last
    stride), where ``rows`` is the weight's row count. Scales without FP8 weights, FP8 weights without scales,
    other FP8 formats, and FP8 on a GPU older than compute capability 8.9 are named errors.
    """
    check_tensor(x, "x")
    check_tensor(gate_weight, "gate_weight")
    check_choice(activation, "activation", ACTIVATIONS)
    check_choice(weight_layout, "weight_layout", WEIGHT_LAYOUTS)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidArgumentError(f"alpha: expected a finite number, got {alpha!r}")
    check_positive(limit, "limit")
    check_dtype(x, "x", HALF_DTYPES + (torch.float32,))
    check_kernel_device(x, "x")
    check_ndim(x, "x", minimum=1)
    check_last_dim_contiguous(x, "x")
    hidden = x.shape[-1]
    if hidden == 0:
        raise ShapeMismatchError(f"x: expected a non-empty hidden (last) dimension, got shape {list(x.shape)}")
    packed = weight_layout != "separate"

    check_ndim(gate_weight, "gate_weight", exact=2)
    check_dim_size(gate_weight, "gate_weight", 1, hidden, "x's hidden size")
    check_last_dim_contiguous(gate_weight, "gate_weight")
    if packed:
        if up_weight is not None:
            raise InvalidArgumentError(
                f"up_weight: expected None with the packed '{weight_layout}' layout (gate_weight holds both), "
                f"got a tensor of shape {list(up_weight.shape)}"
            )
        if up_bias is not None:
            raise InvalidArgumentError(
                f"up_bias: expected None with the packed '{weight_layout}' layout (pass the packed bias as gate_bias)"
            )
        if gate_weight.shape[0] % 2:
            raise ShapeMismatchError(
                f"gate_weight: expected an even number of rows [2 * intermediate, hidden] for the packed "
                f"'{weight_layout}' layout, got {list(gate_weight.shape)}"
            )
        intermediate = gate_weight.shape[0] // 2
    else:
        check_tensor(up_weight, "up_weight")
        check_ndim(up_weight, "up_weight", exact=2)
        intermediate = gate_weight.shape[0]
        check_dim_size(up_weight, "up_weight", 0, intermediate, "gate_weight's intermediate size")
        check_dim_size(up_weight, "up_weight", 1, hidden, "x's hidden size")
        check_last_dim_contiguous(up_weight, "up_weight")
    fp8 = gate_weight.dtype in FP8_WEIGHT_DTYPES
    if fp8:
        check_same_dtype(gate_weight=gate_weight, up_weight=up_weight)
    else:
        check_dtype(gate_weight, "gate_weight", (x.dtype, *FP8_WEIGHT_DTYPES))  # x's dtype, or FP8 with scales
        check_same_dtype(x=x, gate_weight=gate_weight, up_weight=up_weight)
    check_same_device(x=x, gate_weight=gate_weight, up_weight=up_weight, gate_bias=gate_bias, up_bias=up_bias,
                      gate_scale=gate_scale, up_scale=up_scale)
    scaling = _check_scales(x, gate_weight, gate_scale, up_scale, weight_layout, hidden) if fp8 else None
    if not fp8:
        for name, scale in (("gate_scale", gate_scale), ("up_scale", up_scale)):
            if scale is not None:
                raise InvalidArgumentError(
                    f"{name}: expected None: scales belong to FP8 weights (float8_e4m3fn or float8_e5m2), and "
                    f"gate_weight is {str(gate_weight.dtype).removeprefix('torch.')}")

    bias_len = 2 * intermediate if packed else intermediate
    for name, bias in (("gate_bias", gate_bias), ("up_bias", up_bias)):
        if bias is None:
            continue
        check_tensor(bias, name)
        check_dtype(bias, name, FLOAT_DTYPES)
        check_ndim(bias, name, exact=1)
        check_dim_size(bias, name, 0, bias_len, "the projection's output size")
    return GatedMLPInput(
        x=TensorSpec.from_tensor(x),
        num_tokens=x.numel() // hidden if hidden else 0,
        hidden_dim=hidden,
        intermediate_dim=intermediate,
        activation=activation,
        weight_layout=weight_layout,
        has_bias=gate_bias is not None or up_bias is not None,
        weight_scaling=scaling,
        weight_element_size=gate_weight.element_size(),
    )


def _check_scales(x: torch.Tensor, gate_weight: torch.Tensor, gate_scale: torch.Tensor | None,
                  up_scale: torch.Tensor | None, weight_layout: str, hidden: int) -> str:
    """FP8 weights: the device can convert them, and their scales fit; returns ``"channel"``, ``"block"`` or
    ``"group"``."""
    if x.device.type == "cuda" and not supports_fp8(x.device):
        raise UnsupportedDeviceError(
            f"gate_weight: FP8 weights need a GPU of compute capability 8.9 or higher (Triton's FP8 conversions), "
            f"got {torch.cuda.get_device_name(x.device)}")
    packed = weight_layout != "separate"
    rows = gate_weight.shape[0]
    wname = str(gate_weight.dtype).removeprefix("torch.")
    expected = (f"[{rows}] (per output channel), [{-(-rows // SCALE_BLOCK)}, {-(-hidden // SCALE_BLOCK)}] "
                f"(per 128 x 128 block) or [{rows}, {-(-hidden // SCALE_BLOCK)}] (per row and 128 columns)")
    if gate_scale is None:
        raise InvalidArgumentError(
            f"gate_scale: expected a float32 scale {expected} with {wname} weights, got None "
            "(fused_gated_mlp.quantize_weight_fp8 returns weight and scale)")
    if packed and up_scale is not None:
        raise InvalidArgumentError(
            f"up_scale: expected None with the packed '{weight_layout}' layout (pass the packed scale as gate_scale)")
    if not packed and up_scale is None:
        raise InvalidArgumentError(f"up_scale: expected a float32 scale {expected} with {wname} weights, got None")
    kinds = []
    for name, scale in (("gate_scale", gate_scale), ("up_scale", up_scale)):
        if scale is None:
            continue
        check_tensor(scale, name)
        if scale.dtype != torch.float32:
            raise UnsupportedDtypeError(
                f"{name}: expected dtype float32, got {str(scale.dtype).removeprefix('torch.')}")
        if scale.dim() == 1:
            check_dim_size(scale, name, 0, rows, "the weight's rows (per-channel scale)")
            kinds.append("channel")
        elif scale.dim() == 2:
            blocks = (-(-rows // SCALE_BLOCK), -(-hidden // SCALE_BLOCK))
            groups = (rows, blocks[1])
            if tuple(scale.shape) not in (blocks, groups):
                raise ShapeMismatchError(
                    f"{name}: expected shape [{blocks[0]}, {blocks[1]}] (128 x 128 blocks of the [{rows}, {hidden}] "
                    f"weight) or [{groups[0]}, {groups[1]}] (a scale per row and 128 columns), got "
                    f"{list(scale.shape)}")
            check_last_dim_contiguous(scale, name)
            kinds.append("block" if tuple(scale.shape) == blocks else "group")  # one row: the same scale
        else:
            raise ShapeMismatchError(f"{name}: expected shape {expected}, got {list(scale.shape)}")
    if len(kinds) == 2 and kinds[0] != kinds[1]:
        raise InvalidArgumentError(
            f"up_scale: expected a {kinds[0]} scale like gate_scale's, got a {kinds[1]} scale")
    return kinds[0]


__all__ = ["ACTIVATIONS", "FP8_WEIGHT_DTYPES", "WEIGHT_LAYOUTS", "GatedMLPInput", "validate_gated_mlp_inputs"]
