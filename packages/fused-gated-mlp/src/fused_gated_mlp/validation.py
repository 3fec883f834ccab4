"""Validation and the input model of the fused gated MLP."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError
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

    @property
    def flops(self) -> int:
        return 2 * 2 * self.num_tokens * self.hidden_dim * self.intermediate_dim

    @property
    def bytes_moved(self) -> int:
        """x read, both weights read, the gated output written (biases ignored)."""
        esize = self.x.element_size
        return esize * (self.num_tokens * self.hidden_dim + 2 * self.intermediate_dim * self.hidden_dim
                        + self.num_tokens * self.intermediate_dim)


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
) -> GatedMLPInput:
    """Check a ``fused_gated_mlp`` call and return its sizes.

    ``x`` is ``[..., hidden]``; with ``weight_layout="separate"`` ``gate_weight`` and ``up_weight`` are
    ``[intermediate, hidden]`` (``nn.Linear`` layout); with ``"concatenated"`` or ``"interleaved"``, ``gate_weight``
    is the packed ``[2 * intermediate, hidden]`` weight and ``up_weight`` is None. Biases are ``[intermediate]``
    (``[2 * intermediate]`` when packed, passed as ``gate_bias``). ``alpha`` and ``limit`` (``"swiglu_oai"``'s
    sigmoid scale and clamp) must be finite, ``limit`` positive.
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
    check_same_dtype(x=x, gate_weight=gate_weight, up_weight=up_weight)
    check_same_device(x=x, gate_weight=gate_weight, up_weight=up_weight, gate_bias=gate_bias, up_bias=up_bias)

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
    )


__all__ = ["ACTIVATIONS", "WEIGHT_LAYOUTS", "GatedMLPInput", "validate_gated_mlp_inputs"]
