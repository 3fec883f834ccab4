"""Validation and the input model of decode attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError
from triton_ops_core.validation.common import (
    FLOAT_DTYPES,
    check_divisible,
    check_dtype,
    check_kernel_device,
    check_last_dim_contiguous,
    check_ndim,
    check_same_device,
    check_same_dtype,
    check_tensor,
)

MAX_HEAD_DIM = 256  # one [BLOCK_M, head_dim] fp32 accumulator per program
MASK_DTYPES = (torch.bool, *FLOAT_DTYPES)


@dataclass(frozen=True)
class AttentionInput:
    """A validated call: sizes (``q [B, Hq, Sq, D]``, ``k``/``v [B, Hkv, S, D]``) and the mask's 4-D view
    shape (``None`` without a mask)."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    mask_shape: tuple[int, int, int, int] | None

    @property
    def group(self) -> int:
        """Query heads per KV head (1: multi-head, ``q_heads``: multi-query)."""
        return self.q_heads // self.kv_heads

    def kv_bytes(self, element_size: int, valid_len: int | None = None) -> int:
        """Bytes of K and V a call must read when ``valid_len`` positions (default all) are attended."""
        n = self.kv_len if valid_len is None else valid_len
        return 2 * self.batch * self.kv_heads * n * self.head_dim * element_size


def _check_qkv(t: object, name: str) -> torch.Tensor:
    check_tensor(t, name)
    check_dtype(t, name, FLOAT_DTYPES)
    check_ndim(t, name, exact=4)
    check_last_dim_contiguous(t, name)
    return t


def _broadcast_shape(mask: torch.Tensor, target: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The mask's shape as 4-D (leading 1s added); each dimension must be 1 or the target's."""
    if mask.dim() > 4 or mask.dim() == 0:
        raise ShapeMismatchError(
            f"attn_mask: expected 1 to 4 dimensions broadcastable to [B, Hq, Sq, S] = {list(target)}, got shape "
            f"{list(mask.shape)}")
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    names = ("batch", "query heads", "query length", "key length")
    for d, (got, want) in enumerate(zip(shape, target)):
        if got != want and got != 1:
            raise ShapeMismatchError(
                f"attn_mask: expected a shape broadcastable to [B, Hq, Sq, S] = {list(target)}, got "
                f"{list(mask.shape)} ({names[d]}: {got})")
    return shape  # type: ignore[return-value]


def _check_ring_start(ring_start: object, is_causal: bool, sliding_window: int | None) -> None:
    check_tensor(ring_start, "ring_start")
    check_dtype(ring_start, "ring_start", (torch.int32, torch.int64))
    if ring_start.numel() != 1:
        raise ShapeMismatchError(f"ring_start: expected one element (a ring buffer's counter), got shape "
                                 f"{list(ring_start.shape)}")
    if is_causal or sliding_window is not None:
        raise InvalidArgumentError("ring_start: a ring buffer's positions are not in slot order; expected neither "
                                   "is_causal nor sliding_window with it (express them in attn_mask, oldest first)")


def validate_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    is_causal: bool = False,
    num_splits: int | None = None,
    ring_start: torch.Tensor | None = None,
    softcap: float | None = None,
) -> AttentionInput:
    """Check a ``decode_attention`` call and return its sizes.

    ``q`` is ``[B, Hq, Sq, D]``, ``k`` and ``v`` ``[B, Hkv, S, D]`` (any strides but a unit last one), one float
    dtype (float16, bfloat16, float32), ``Hq`` a multiple of ``Hkv``, ``1 <= D <= 256``. ``attn_mask`` is bool or
    float (any float dtype), broadcastable to ``[B, Hq, Sq, S]``. ``sinks`` is ``[Hq]`` floating point.
    ``sliding_window`` and ``num_splits`` are None or ints >= 1; ``scale`` None or a finite number.
    ``ring_start`` None or an int32/int64 tensor of one element, without ``is_causal`` or ``sliding_window``.
    ``softcap`` None or a finite number > 0.
    """
    _check_qkv(q, "q")
    _check_qkv(k, "k")
    _check_qkv(v, "v")
    check_same_dtype(q=q, k=k, v=v)
    check_same_device(q=q, k=k, v=v, attn_mask=attn_mask, sinks=sinks, ring_start=ring_start)
    check_kernel_device(q, "q")
    b, hq, sq, d = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ShapeMismatchError(f"v: expected the shape of k {list(k.shape)}, got {list(v.shape)}")
    if k.shape[0] != b:
        raise ShapeMismatchError(f"k: expected batch {b} (q's) in dimension 0, got {k.shape[0]} "
                                 f"(shape {list(k.shape)})")
    if k.shape[3] != d:
        raise ShapeMismatchError(f"k: expected head dim {d} (q's) in dimension 3, got {k.shape[3]} "
                                 f"(shape {list(k.shape)})")
    if d == 0 or d > MAX_HEAD_DIM:
        raise ShapeMismatchError(f"q: expected a head dim (dimension 3) in [1, {MAX_HEAD_DIM}], got {d}")
    hkv, s = k.shape[1], k.shape[2]
    if hkv == 0:
        raise ShapeMismatchError(f"k: expected at least one KV head (dimension 1), got shape {list(k.shape)}")
    check_divisible(hq, hkv, "q", f"query heads in dimension 1, for k's {hkv} KV heads")
    mask_shape = None
    if attn_mask is not None:
        check_tensor(attn_mask, "attn_mask")
        check_dtype(attn_mask, "attn_mask", MASK_DTYPES)
        mask_shape = _broadcast_shape(attn_mask, (b, hq, sq, s))
    if sinks is not None:
        check_tensor(sinks, "sinks")
        check_dtype(sinks, "sinks", FLOAT_DTYPES)
        check_ndim(sinks, "sinks", exact=1)
        if sinks.shape[0] != hq:
            raise ShapeMismatchError(f"sinks: expected {hq} entries (one per query head), got {sinks.shape[0]}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise InvalidArgumentError(f"scale: expected None or a finite number, got {scale!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        raise InvalidArgumentError(f"softcap: expected None or a finite number > 0, got {softcap!r}")
    for name, value in (("sliding_window", sliding_window), ("num_splits", num_splits)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidArgumentError(f"{name}: expected None or an int >= 1, got {value!r}")
    if not isinstance(is_causal, bool):
        raise InvalidArgumentError(f"is_causal: expected a bool, got {is_causal!r}")
    if ring_start is not None:
        _check_ring_start(ring_start, is_causal, sliding_window)
    return AttentionInput(batch=b, q_heads=hq, kv_heads=hkv, q_len=sq, kv_len=s, head_dim=d, mask_shape=mask_shape)


__all__ = ["MASK_DTYPES", "MAX_HEAD_DIM", "AttentionInput", "validate_decode_attention"]
