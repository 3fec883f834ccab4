"""Validation and the input models of fused RMSNorm + RoPE and of the fused QK-norm + RoPE.

Conventions shared by both ops:

- ``cos``/``sin`` are ``[positions, rot]`` (a table indexed by ``position_ids``, or by the sequence index when no
  ids are given) or ``[batch or 1, seq, rot]`` (already gathered per token, as Hugging Face's rotary embedding
  returns them). ``rot`` is the table width: ``rotary_dim`` defaults to it; when ``rotary_dim`` is given, the first
  ``rotary_dim`` columns are used, so a full ``[*, head_dim]`` table serves partial rotary too.
- ``position_ids`` are int32/int64 of shape ``[seq]`` or ``[batch or 1, seq]``, or equal to the input's leading
  dimensions (everything before ``hidden``, or before ``heads`` for q/k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError
from triton_ops_core.models import TensorSpec
from triton_ops_core.validation.common import (
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
POSITION_DTYPES = (torch.int32, torch.int64)


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
    gemma: bool = False

    @property
    def bytes_moved(self) -> int:
        """The fewest bytes the op must move: x read once, y written once (cos/sin and weight are small)."""
        return 2 * self.x.nbytes


@dataclass(frozen=True)
class QKNormRoPEInput:
    """A validated call of ``fused_qk_norm_rope``: per-head RMSNorm + RoPE on q and k (GQA head counts)."""

    q: TensorSpec
    k: TensorSpec
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    num_tokens: int
    seq_len: int
    eps: float
    layout: str = "neox"
    has_position_ids: bool = False
    gemma: bool = False

    @property
    def bytes_moved(self) -> int:
        """q and k read once and written once."""
        return 2 * (self.q.nbytes + self.k.nbytes)


@dataclass(frozen=True)
class RoPEInput:
    """A validated call of ``apply_rope`` (``torch.ops.triton_ops.rope``): RoPE alone on q and k (GQA head counts)."""

    q: TensorSpec
    k: TensorSpec
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    num_tokens: int
    seq_len: int
    layout: str = "neox"
    has_position_ids: bool = False

    @property
    def bytes_moved(self) -> int:
        """q and k read once and written once (only their rotated elements must move; the kernel moves all)."""
        return 2 * (self.q.nbytes + self.k.nbytes)


def _check_options(eps: float, layout: str, gemma: object) -> None:
    check_positive(eps, "eps")
    check_choice(layout, "layout", ROPE_LAYOUTS)
    if not isinstance(gemma, bool):
        raise InvalidArgumentError(f"gemma: expected a bool, got {gemma!r}")


def _check_tables(cos: torch.Tensor, sin: torch.Tensor, lead: tuple[int, ...], seq: int,
                  position_ids: torch.Tensor | None) -> int:
    """Check cos/sin against the input's leading dimensions ``lead`` (ending in ``seq``); return the table width."""
    check_tensor(cos, "cos")
    check_tensor(sin, "sin")
    check_dtype(cos, "cos", FLOAT_DTYPES)
    check_same_dtype(cos=cos, sin=sin)
    if cos.dim() not in (2, 3):
        raise ShapeMismatchError(
            f"cos: expected 2 dimensions [positions, rotary_dim] or 3 [batch, seq, rotary_dim], got {cos.dim()} "
            f"(shape {list(cos.shape)})"
        )
    if sin.shape != cos.shape:
        raise ShapeMismatchError(f"sin: expected the shape of cos {list(cos.shape)}, got {list(sin.shape)}")
    check_last_dim_contiguous(cos, "cos")
    check_last_dim_contiguous(sin, "sin")
    width = cos.shape[-1]
    if width == 0:
        raise ShapeMismatchError("cos: expected a non-empty last dimension (rotary_dim), got 0")
    if cos.dim() == 3:
        if position_ids is not None:
            raise ShapeMismatchError(
                f"cos: expected a 2-D table [max_position, rotary_dim] with position_ids, got the per-token "
                f"shape {list(cos.shape)}"
            )
        batch = 1
        for d in lead[:-1]:
            batch *= d
        if cos.shape[1] != seq or cos.shape[0] not in (1, batch):
            raise ShapeMismatchError(
                f"cos: expected shape [1 or {batch}, {seq}, *] (batch and sequence of the input), "
                f"got {list(cos.shape)}"
            )
    elif position_ids is None:
        check_dim_size(cos, "cos", 0, seq, "the sequence length (pass position_ids to index a longer cache)")
    return width


def _check_position_ids(position_ids: torch.Tensor | None, lead: tuple[int, ...], seq: int) -> None:
    if position_ids is None:
        return
    check_tensor(position_ids, "position_ids")
    check_dtype(position_ids, "position_ids", POSITION_DTYPES)
    shape = tuple(position_ids.shape)
    ok = shape == lead or shape == (seq,) or (
        len(lead) == 2 and len(shape) == 2 and shape[1] == seq and shape[0] in (1, lead[0])
    )
    if not ok:
        raise ShapeMismatchError(
            f"position_ids: expected shape {list(lead)} (the input's leading dimensions), [{seq}]"
            + (f" or [1, {seq}]" if len(lead) == 2 else "")
            + f", got {list(shape)}"
        )


def _check_rotary(rotary_dim: int | None, width: int, head_dim: int) -> int:
    rotary = width if rotary_dim is None else rotary_dim
    if isinstance(rotary, bool) or not isinstance(rotary, int) or rotary <= 0 or rotary % 2 or rotary > head_dim:
        raise ShapeMismatchError(
            f"rotary_dim: expected an even integer in [2, head_dim={head_dim}], got {rotary!r}"
        )
    if width < rotary or width > head_dim:
        raise ShapeMismatchError(
            f"cos: expected a last dimension between rotary_dim={rotary} and head_dim={head_dim}, got {width}"
        )
    return rotary


def validate_rmsnorm_rope_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float = 1e-6,
    *,
    position_ids: torch.Tensor | None = None,
    rotary_dim: int | None = None,
    head_dim: int | None = None,
    layout: str = "neox",
    gemma: bool = False,
) -> RMSNormRoPEInput:
    """Check a ``fused_rmsnorm_rope`` call and return its sizes; raise a shared exception naming the argument.

    ``x`` is ``[..., seq, hidden]`` with unit stride in ``hidden``; ``weight`` is ``[hidden]``; ``cos`` and ``sin``
    follow the module's conventions. ``head_dim`` defaults to the width of ``cos`` and must divide ``hidden``;
    ``rotary_dim`` (default: the width of ``cos``) must be even and at most ``head_dim``.
    """
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    check_dtype(x, "x", FLOAT_DTYPES)
    check_dtype(weight, "weight", FLOAT_DTYPES)
    _check_options(eps, layout, gemma)
    check_ndim(x, "x", minimum=2)
    lead, seq, hidden = tuple(x.shape[:-1]), x.shape[-2], x.shape[-1]
    width = _check_tables(cos, sin, lead, seq, position_ids)
    _check_position_ids(position_ids, lead, seq)
    check_same_device(x=x, weight=weight, cos=cos, sin=sin, position_ids=position_ids)
    check_kernel_device(x, "x")
    check_last_dim_contiguous(x, "x")
    check_ndim(weight, "weight", exact=1)
    check_dim_size(weight, "weight", 0, hidden, "x's hidden size")

    hd = width if head_dim is None else head_dim
    if isinstance(hd, bool) or not isinstance(hd, int) or hd <= 0:
        raise ShapeMismatchError(f"head_dim: expected a positive integer, got {head_dim!r}")
    check_divisible(hidden, hd, "x", f"hidden size divisible by head_dim {hd}")
    rotary = _check_rotary(rotary_dim, width, hd)
    return RMSNormRoPEInput(
        x=TensorSpec.from_tensor(x),
        hidden_dim=hidden,
        head_dim=hd,
        num_heads=hidden // hd,
        rotary_dim=rotary,
        num_tokens=x.numel() // hidden if hidden else 0,
        seq_len=seq,
        eps=float(eps),
        layout=layout,
        has_position_ids=position_ids is not None,
        gemma=gemma,
    )


def validate_qk_norm_rope_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    rotary_dim: int | None = None,
    layout: str = "neox",
    gemma: bool = False,
) -> QKNormRoPEInput:
    """Check a ``fused_qk_norm_rope`` call and return its sizes.

    ``q`` is ``[..., seq, q_heads, head_dim]`` and ``k`` ``[..., seq, kv_heads, head_dim]`` with the same leading
    dimensions, unit stride in ``head_dim`` and any other strides (views of a packed QKV output qualify);
    ``q_weight`` and ``k_weight`` are ``[head_dim]``.
    """
    for name, t in (("q", q), ("k", k), ("q_weight", q_weight), ("k_weight", k_weight)):
        check_tensor(t, name)
        check_dtype(t, name, FLOAT_DTYPES)
    check_same_dtype(q=q, k=k)
    _check_options(eps, layout, gemma)
    check_ndim(q, "q", minimum=3)
    check_ndim(k, "k", minimum=3)
    lead, seq, head_dim = tuple(q.shape[:-2]), q.shape[-3], q.shape[-1]
    if tuple(k.shape[:-2]) != lead:
        raise ShapeMismatchError(
            f"k: expected leading dimensions {list(lead)} (those of q before heads), got {list(k.shape[:-2])}"
        )
    check_dim_size(k, "k", k.dim() - 1, head_dim, "q's head_dim")
    width = _check_tables(cos, sin, lead, seq, position_ids)
    _check_position_ids(position_ids, lead, seq)
    check_same_device(q=q, k=k, q_weight=q_weight, k_weight=k_weight, cos=cos, sin=sin, position_ids=position_ids)
    check_kernel_device(q, "q")
    check_last_dim_contiguous(q, "q")
    check_last_dim_contiguous(k, "k")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        check_ndim(w, name, exact=1)
        check_dim_size(w, name, 0, head_dim, "head_dim")
    rotary = _check_rotary(rotary_dim, width, head_dim)
    return QKNormRoPEInput(
        q=TensorSpec.from_tensor(q),
        k=TensorSpec.from_tensor(k),
        num_q_heads=q.shape[-2],
        num_kv_heads=k.shape[-2],
        head_dim=head_dim,
        rotary_dim=rotary,
        num_tokens=q.numel() // (q.shape[-2] * head_dim) if q.numel() else 0,
        seq_len=seq,
        eps=float(eps),
        layout=layout,
        has_position_ids=position_ids is not None,
        gemma=gemma,
    )


def validate_rope_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    rotary_dim: int | None = None,
    layout: str = "neox",
) -> RoPEInput:
    """Check an ``apply_rope`` call and return its sizes.

    ``q`` is ``[..., seq, q_heads, head_dim]`` and ``k`` ``[..., seq, kv_heads, head_dim]`` with the same leading
    dimensions and dtype, unit stride in ``head_dim`` and any other strides (views of a packed QKV output qualify);
    ``cos``, ``sin``, ``position_ids`` and ``rotary_dim`` follow the module's conventions.
    """
    for name, t in (("q", q), ("k", k)):
        check_tensor(t, name)
        check_dtype(t, name, FLOAT_DTYPES)
    check_same_dtype(q=q, k=k)
    check_choice(layout, "layout", ROPE_LAYOUTS)
    check_ndim(q, "q", minimum=3)
    check_ndim(k, "k", minimum=3)
    lead, seq, head_dim = tuple(q.shape[:-2]), q.shape[-3], q.shape[-1]
    if tuple(k.shape[:-2]) != lead:
        raise ShapeMismatchError(
            f"k: expected leading dimensions {list(lead)} (those of q before heads), got {list(k.shape[:-2])}"
        )
    check_dim_size(k, "k", k.dim() - 1, head_dim, "q's head_dim")
    width = _check_tables(cos, sin, lead, seq, position_ids)
    _check_position_ids(position_ids, lead, seq)
    check_same_device(q=q, k=k, cos=cos, sin=sin, position_ids=position_ids)
    check_kernel_device(q, "q")
    check_last_dim_contiguous(q, "q")
    check_last_dim_contiguous(k, "k")
    rotary = _check_rotary(rotary_dim, width, head_dim)
    return RoPEInput(
        q=TensorSpec.from_tensor(q),
        k=TensorSpec.from_tensor(k),
        num_q_heads=q.shape[-2],
        num_kv_heads=k.shape[-2],
        head_dim=head_dim,
        rotary_dim=rotary,
        num_tokens=q.numel() // (q.shape[-2] * head_dim) if q.numel() else 0,
        seq_len=seq,
        layout=layout,
        has_position_ids=position_ids is not None,
    )


__all__ = [
    "POSITION_DTYPES",
    "ROPE_LAYOUTS",
    "QKNormRoPEInput",
    "RMSNormRoPEInput",
    "RoPEInput",
    "validate_qk_norm_rope_inputs",
    "validate_rmsnorm_rope_inputs",
    "validate_rope_inputs",
]
