"""Validation and the input model of fused RMSNorm + RoPE."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..exceptions import ShapeMismatchError
from ..models import TensorSpec
from .common import (
    FLOAT_DTYPES,
    check_choice,
    check_dim_size,
    check_divisible,
    check_dtype,
    check_kernel_device,
    check_last_dim_contiguous,
    check_ndim,
    check_positive,
    check_same_device,
    check_same_dtype,
    check_tensor,
)

ROPE_LAYOUTS = ("neox", "interleaved")


@dataclass(frozen=True)
class RMSNormRoPEInput:
    """A validated call of ``fused_rmsnorm_rope``: the sizes the kernel is launched with."""

    x: TensorSpec
    hidden_dim: int
    head_dim: int
    num_heads: int
    rotary_dim: int
    num_tokens: int
    seq_len: int
    eps: float
    layout: str = "neox"
    has_position_ids: bool = False

    @property
    def bytes_moved(self) -> int:
        """The fewest bytes the op must move: x read once, y written once (cos/sin and weight are small)."""
        return 2 * self.x.nbytes


def validate_rmsnorm_rope_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float = 1e-6,
    *,
    position_ids: torch.Tensor | None = None,
    rotary_dim: int | None = None,
    layout: str = "neox",
) -> RMSNormRoPEInput:
    """Check a ``fused_rmsnorm_rope`` call and return its sizes; raise a shared exception naming the argument.

    ``x`` is ``[..., seq, hidden]`` with unit stride in ``hidden``; ``weight`` is ``[hidden]``; ``cos`` and ``sin``
    are ``[seq, head_dim]`` (or a cache ``[max_position, head_dim]`` indexed by ``position_ids`` of shape
    ``[..., seq]``). ``head_dim`` is taken from ``cos`` and must divide ``hidden``; ``rotary_dim`` (default
    ``head_dim``) must be even and at most ``head_dim``.
    """
    for name, t in (("x", x), ("weight", weight), ("cos", cos), ("sin", sin)):
        check_tensor(t, name)
    check_dtype(x, "x", FLOAT_DTYPES)
    check_dtype(weight, "weight", FLOAT_DTYPES)
    check_dtype(cos, "cos", FLOAT_DTYPES)
    check_same_dtype(cos=cos, sin=sin)
    check_same_device(x=x, weight=weight, cos=cos, sin=sin, position_ids=position_ids)
    check_kernel_device(x, "x")
    check_positive(eps, "eps")
    check_choice(layout, "layout", ROPE_LAYOUTS)

    check_ndim(x, "x", minimum=2)
    check_last_dim_contiguous(x, "x")
    hidden = x.shape[-1]
    check_ndim(weight, "weight", exact=1)
    check_dim_size(weight, "weight", 0, hidden, "x's hidden size")
    check_ndim(cos, "cos", exact=2)
    check_ndim(sin, "sin", exact=2)
    if sin.shape != cos.shape:
        raise ShapeMismatchError(f"sin: expected the shape of cos {list(cos.shape)}, got {list(sin.shape)}")
    head_dim = cos.shape[1]
    if head_dim == 0:
        raise ShapeMismatchError("cos: expected a non-empty head_dim (dimension 1), got 0")
    check_divisible(hidden, head_dim, "x", f"hidden size divisible by head_dim {head_dim} taken from cos")
    rotary = head_dim if rotary_dim is None else rotary_dim
    if not isinstance(rotary, int) or rotary <= 0 or rotary > head_dim or rotary % 2:
        raise ShapeMismatchError(f"rotary_dim: expected an even integer in [2, head_dim={head_dim}], got {rotary_dim!r}")

    seq = x.shape[-2]
    if position_ids is None:
        check_dim_size(cos, "cos", 0, seq, "x's sequence length (pass position_ids to index a longer cache)")
    else:
        check_tensor(position_ids, "position_ids")
        check_dtype(position_ids, "position_ids", (torch.int32, torch.int64))
        if tuple(position_ids.shape) != tuple(x.shape[:-1]) and tuple(position_ids.shape) != (seq,):
            raise ShapeMismatchError(
                f"position_ids: expected shape {list(x.shape[:-1])} (x's leading dimensions) or [{seq}], "
                f"got {list(position_ids.shape)}"
            )
    return RMSNormRoPEInput(
        x=TensorSpec.from_tensor(x),
        hidden_dim=hidden,
        head_dim=head_dim,
        num_heads=hidden // head_dim,
        rotary_dim=rotary,
        num_tokens=x.numel() // hidden if hidden else 0,
        seq_len=seq,
        eps=float(eps),
        layout=layout,
        has_position_ids=position_ids is not None,
    )


__all__ = ["ROPE_LAYOUTS", "RMSNormRoPEInput", "validate_rmsnorm_rope_inputs"]
