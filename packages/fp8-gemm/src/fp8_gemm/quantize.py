"""FP8 quantization and dequantization: Triton kernels that find the absolute maximum and cast in one place.

Scale convention (one rule for every granularity, shared with the GEMM and with :mod:`fp8_gemm.reference`)::

    dequantized = quantized.float() * scale
    scale       = amax / fmt.max_value          (float32, IEEE division; 1.0 where amax == 0)
    quantized   = fp8(x.float() * (1.0 / scale)) (the reciprocal is an IEEE float32 division, then one multiply)

``x * (1/scale)`` and ``x / scale`` round differently; we use the multiply (one reciprocal per scale group, a
multiply per element) and the reference does exactly the same, so results are bit-identical to torch's own cast
of the same float32 values. Triton's plain ``/`` on float32 is an approximate division on NVIDIA GPUs, so the
kernels divide with ``tl.math.div_rn`` (correctly rounded, what torch does).

Only finite values enter the absolute maximum: NaN stays NaN, and an infinity saturates to +-448 in E4M3 (it has
no infinities; torch >= 2.13 and the hardware conversion do the same) and stays infinite in E5M2; neither changes
the scale of its group.

Triton's interpreter casts float32 to FP8 wrongly (lost rounding carries, no ties-to-even). Under the
interpreter the kernels therefore round in integer arithmetic (the ``EMULATE`` constexpr); on a GPU they use
the hardware conversion and pay nothing for the CPU path.

This module holds validation, the public functions and their registration; the kernels are in
``quantize_kernels``, the launch plans in ``quantize_plan``.
"""

from __future__ import annotations

import torch
from triton_ops_core.device import supports_fp8
from triton_ops_core.exceptions import (
    InvalidArgumentError,
    NumericalOverflowError,
    ShapeMismatchError,
    UnsupportedDtypeError,
)
from triton_ops_core.launch import call_key, cdiv
from triton_ops_core.library import capturing, direct_call_ok, op_name
from triton_ops_core.models import FP8Format
from triton_ops_core.validation import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    check_choice,
    check_dtype,
    check_kernel_device,
    check_ndim,
    check_same_device,
    check_tensor,
)

from .quantize_plan import _PLANS, _build_plan, _column_major, _put, _QuantPlan, _row_major
from .validation import ACTIVATION_BLOCK, SCALE_BLOCK, WEIGHT_BLOCK, WEIGHT_GROUP

GRANULARITIES = ("tensor", "row", "channel", "block", "group")
ROLES = ("activation", "weight")


# --------------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------------


def _check_block_size(block_size: object, role: str) -> tuple[int, int]:
    if block_size is None:
        return ACTIVATION_BLOCK if role == "activation" else WEIGHT_BLOCK
    size = tuple(block_size) if isinstance(block_size, (tuple, list)) else block_size
    if size not in (ACTIVATION_BLOCK, WEIGHT_BLOCK, WEIGHT_GROUP):
        raise InvalidArgumentError(
            f"block_size: expected {ACTIVATION_BLOCK} (activations), {WEIGHT_BLOCK} (weights) or {WEIGHT_GROUP} "
            f"(weight groups along K), got {block_size!r}"
        )
    return size  # type: ignore[return-value]


def _as_block(granularity: str, block_size: object) -> tuple[str, object]:
    """``group`` is ``block`` with 128x1 blocks (``WEIGHT_GROUP``): the one spelling the kernels take."""
    if granularity != "group":
        return granularity, block_size
    if block_size is not None:
        raise InvalidArgumentError(f"block_size: granularity 'group' has fixed {WEIGHT_GROUP} groups; pass "
                                   f"granularity='block' for another block size, got {block_size!r}")
    return "block", WEIGHT_GROUP


def scale_shape(shape: tuple[int, ...], granularity: str, block_size: tuple[int, int] | None = None,
                role: str = "activation") -> tuple[int, ...]:
    """The shape of the scale ``quantize_fp8`` returns for a tensor of ``shape``.

    ``tensor``: ``(1,)``; ``row``: ``(*shape[:-1], 1)``; ``channel`` (2-D ``[K, N]``): ``(1, N)``; ``block``
    (2-D): ``(ceil(M / bm), ceil(K / bk))`` for ``block_size = (bm, bk)``; ``group`` (2-D ``[K, N]``):
    ``(ceil(K / 128), N)``.
    """
    check_choice(granularity, "granularity", GRANULARITIES)
    granularity, block_size = _as_block(granularity, block_size)
    if granularity == "tensor":
        return (1,)
    if granularity == "row":
        return (*shape[:-1], 1)
    if granularity == "channel":
        return (1, shape[1])
    bm, bk = _check_block_size(block_size, role)
    return (cdiv(shape[0], bm), cdiv(shape[1], bk))


_FP8_OK: dict[int, bool] = {}


def _fp8_ok(device: torch.device) -> bool:
    # A GPU's capability never changes: ask once per CUDA device (this is on every call's path).
    if device.type != "cuda":
        return supports_fp8(device)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    ok = _FP8_OK.get(idx)
    if ok is None:
        ok = _FP8_OK[idx] = supports_fp8(torch.device("cuda", idx))
    return ok


def _validate(t, fmt, granularity, scale, block_size, role):
    check_tensor(t, "t")
    fmt = FP8Format.from_name(fmt)
    check_choice(granularity, "granularity", GRANULARITIES)
    check_choice(role, "role", ROLES)
    check_dtype(t, "t", FLOAT_DTYPES)
    if granularity in ("channel", "block"):
        check_ndim(t, "t", exact=2)
    else:
        check_ndim(t, "t", minimum=1)
    if block_size is not None and granularity != "block":
        raise InvalidArgumentError(f"block_size: only applies to granularity 'block', got granularity {granularity!r}")
    block = _check_block_size(block_size, role) if granularity == "block" else None
    check_kernel_device(t, "t")
    if not _fp8_ok(t.device):
        name = torch.cuda.get_device_name(t.device) if t.device.type == "cuda" else str(t.device)
        raise UnsupportedDtypeError(
            f"t: FP8 needs a GPU with FP8 tensor cores (compute capability 8.9 or higher), got {name}"
        )
    expected = scale_shape(tuple(t.shape), granularity, block, role)
    if scale is not None:
        check_tensor(scale, "scale")
        check_same_device(t=t, scale=scale)
        check_dtype(scale, "scale", (torch.float32,))
        ok = scale.numel() == 1 if granularity == "tensor" else tuple(scale.shape) == expected
        if not ok:
            raise ShapeMismatchError(
                f"scale: expected shape {list(expected)} for granularity {granularity!r} and t of shape "
                f"{list(t.shape)}, got {list(scale.shape)}"
            )
    return fmt, block, expected


def _quantize(t, fmt, granularity, scale, block_size, strict, role):
    named = granularity  # what errors call it ("group" runs as 128x1 blocks)
    if granularity == "group":
        granularity, block_size = _as_block(granularity, block_size)
    try:
        key = call_key(t, fmt, granularity, scale, block_size, role)
    except (AttributeError, RuntimeError, TypeError):  # not tensors: validation says which
        key = None
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        fmt_, block, expected = _validate(t, fmt, granularity, scale, block_size, role)
        plan = _put(key, _build_plan(t, fmt_, granularity, scale, block, expected))
    if strict and scale is not None:
        _check_given_scale(scale)
    q, s, flag = plan.run(t, scale)
    _check_overflow(strict, flag, named, plan.fmt)
    return q, s


def _check_given_scale(scale: torch.Tensor) -> None:
    """Strict mode: a given scale must hold positive finite values (one host synchronization, which strict mode
    makes anyway). Without strict, such a group counts as overflowing and gets its dynamic scale (documented)."""
    if capturing(scale.device):
        return  # the overflow check that follows raises the capture error
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        first = scale.reshape(-1)[bad.reshape(-1)][0].item()
        raise InvalidArgumentError(
            f"scale: expected positive finite values, got {first:g} ({int(bad.sum())} of {scale.numel()} "
            "invalid); strict=False would replace each invalid group's scale with its dynamic one")


def _check_overflow(strict: bool, flag: torch.Tensor | None, granularity: str, fmt: FP8Format) -> None:
    if strict and flag is not None:  # the one host synchronization, only when asked for
        if capturing(flag.device):
            raise InvalidArgumentError(
                "strict: True reads the overflow count on the host, which a CUDA-graph capture does not allow; "
                "pass strict=False inside a captured region (the returned scale shows any raised group)")
        n_over = int(flag.item())
        if n_over:
            raise NumericalOverflowError(
                f"t: {n_over} scale group(s) ({granularity}) exceed the {fmt.name} range (max {fmt.max_value:g}, "
                f"values up to {fmt.overflow_threshold:g} round to it) with the given scale; pass strict=False to "
                "have the scale raised instead"
            )


def _quantize_delayed(t: torch.Tensor, fmt: FP8Format, hist: torch.Tensor, state: torch.Tensor, margin: int,
                      strict: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor E4M3/E5M2 with a delayed scale, in one launch: the kernel derives the scale from the amax
    history ``hist`` and records this call's amax there (``state``: the kernel's barrier words and call count)."""
    try:
        key = call_key(t, fmt, "delayed", hist.numel(), margin)
    except (AttributeError, RuntimeError, TypeError):
        key = None
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        fmt_, _, expected = _validate(t, fmt, "tensor", None, None, "activation")
        plan = _put(key, _build_plan(t, fmt_, "tensor", None, None, expected,
                                     delayed=(hist.numel(), float(2**margin))))
    q, s, flag = plan.run(t, None, (hist, state))
    _check_overflow(strict, flag, "tensor", plan.fmt)
    return q, s


def _activation_plan(x: torch.Tensor, granularity: str) -> _QuantPlan:
    """E4M3 with dynamic scales for a validated 2-D row-major activation (FP8Linear: no re-validation)."""
    block = ACTIVATION_BLOCK if granularity == "block" else None
    return _build_plan(x, FP8Format.E4M3, granularity, None, block,
                       scale_shape(tuple(x.shape), granularity, block, "activation"))


def quantize_fp8(
    t: torch.Tensor,
    fmt: str | FP8Format | torch.dtype = "e4m3",
    granularity: str = "tensor",
    *,
    scale: torch.Tensor | None = None,
    block_size: tuple[int, int] | None = None,
    strict: bool = False,
    role: str = "activation",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``t`` to FP8; returns ``(quantized, scale)`` with ``dequantized = quantized.float() * scale``.

    Args:
        t: fp16, bf16 or fp32; any rank for ``tensor`` and ``row``, 2-D for ``channel`` and ``block``. A 2-D
            column-major ``t`` (e.g. ``linear.weight.t()``) is read along its contiguous dimension and the
            result keeps that layout (``quantized.t()`` is then contiguous).
        fmt: ``"e4m3"`` (``torch.float8_e4m3fn``, max 448) or ``"e5m2"`` (``torch.float8_e5m2``, max 57344).
        granularity: ``"tensor"`` (scale ``[1]``), ``"row"`` (per token: ``[M, 1]``, or ``[*lead, 1]``),
            ``"channel"`` (per output column of a ``[K, N]`` weight used as ``a @ b``: ``[1, N]``; for an
            ``nn.Linear`` weight ``[out, in]`` pass ``weight.t()``, one scale per output feature), ``"block"``
            (``[ceil(M/bm), ceil(K/bk)]``) or ``"group"`` (weights ``[K, N]``: one scale per output column and
            128 rows of K, ``[ceil(K/128), N]``; the same as ``"block"`` with ``block_size=(128, 1)``). These are
            the shapes ``fp8_gemm`` accepts.
        scale: a given scale of that shape (float32), used as is unless some value of its group would not
            round to the format's largest value (``FP8Format.overflow_threshold``: 464 for E4M3); that group's
            scale is then raised to ``amax / max_value`` so nothing clips, and the returned scale says so. A
            non-positive or non-finite given scale counts as overflowing.
        block_size: ``(1, 128)`` (activations, DeepSeek-V3 style), ``(128, 128)`` (weights) or ``(128, 1)`` (weight
            groups); default by ``role``.
        strict: raise ``NumericalOverflowError`` when a given scale had to be raised (synchronizes the GPU).
        role: ``"activation"`` or ``"weight"``: picks the default ``block_size``.

    Without a given scale the absolute maximum of each group is computed in the kernel (non-finite values
    excluded); an all-zero group gets scale 1. NaN stays NaN.

    Registered as ``torch.ops.triton_ops.quantize_fp8`` (``fmt`` as its name, ``block_size`` as a list). With
    ``strict=True`` the call synchronizes with the GPU, which a CUDA-graph capture does not allow.
    """
    if direct_call_ok(t, scale):  # plain eager: no dispatcher round trip
        return _quantize(t, fmt, granularity, scale, block_size, strict, role)
    return _quantize_op(t, FP8Format.from_name(fmt).name, granularity, scale,
                        None if block_size is None else list(block_size), strict, role)


@torch.library.custom_op(op_name("quantize_fp8"), mutates_args=())
def _quantize_op(t: torch.Tensor, fmt: str, granularity: str, scale: torch.Tensor | None,
                 block_size: list[int] | None, strict: bool, role: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = _quantize(t, fmt, granularity, scale, None if block_size is None else tuple(block_size), strict, role)
    # the op's outputs must not alias its inputs: a given per-tensor scale kept as is comes back as a copy
    return q, (s.clone() if s is scale else s)


@_quantize_op.register_fake
def _(t, fmt, granularity, scale, block_size, strict, role):
    granularity, block_size = _as_block(granularity, block_size)
    block = _check_block_size(block_size, role) if granularity == "block" else None
    s = t.new_empty(scale_shape(tuple(t.shape), granularity, block, role), dtype=torch.float32)
    dtype = FP8Format.from_name(fmt).torch_dtype
    if _keeps_column_major(t, granularity, block):
        return t.new_empty(t.shape[::-1], dtype=dtype).t(), s
    return t.new_empty(t.shape, dtype=dtype), s


def _keeps_column_major(t: torch.Tensor, granularity: str, block: tuple[int, int] | None) -> bool:
    """Whether the result of ``t`` comes back column-major (see ``_build_plan``)."""
    if not (t.dim() == 2 and not _row_major(t) and _column_major(t)):
        return False
    return granularity != "block" or (block[1], block[0]) in (ACTIVATION_BLOCK, WEIGHT_BLOCK)


# --------------------------------------------------------------------------------------------------------------
# Dequantization
# --------------------------------------------------------------------------------------------------------------


def expand_scale(scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Broadcast a scale of any granularity to ``shape`` (block scales repeat over their 128-wide blocks).

    Per dimension, a scale size equal to the tensor's is per element, 1 is the whole dimension, and
    ``ceil(n / 128)`` is 128-wide blocks (the cases coincide only where they mean the same thing).
    """
    if scale.numel() == 1:
        return scale.reshape(()).expand(shape)
    if scale.dim() != len(shape):
        raise ShapeMismatchError(
            f"scale: expected {len(shape)} dimensions (or one value) for a tensor of shape {list(shape)}, "
            f"got shape {list(scale.shape)}"
        )
    out = scale
    for dim, (s, n) in enumerate(zip(scale.shape, shape)):
        if s in (n, 1):
            continue
        if s == cdiv(n, SCALE_BLOCK):
            out = out.repeat_interleave(SCALE_BLOCK, dim=dim).narrow(dim, 0, n)
            continue
        raise ShapeMismatchError(
            f"scale: size {s} in dimension {dim} fits neither {n} (per element), 1 (whole dimension) nor "
            f"{cdiv(n, SCALE_BLOCK)} ({SCALE_BLOCK}-wide blocks) for a tensor of shape {list(shape)}"
        )
    return out.expand(shape)


def dequantize_fp8(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The exact inverse of :func:`quantize_fp8`'s scaling: ``(quantized.float() * scale).to(dtype)``.

    ``scale`` may have any granularity ``quantize_fp8`` returns; the product is formed in float32 and rounded
    once to ``dtype`` (fp16, bf16 or fp32).

    Registered as ``torch.ops.triton_ops.dequantize_fp8``, a composite of PyTorch operations
    (CompositeImplicitAutograd): ``torch.compile`` fuses it with its neighbours and autograd differentiates it.
    """
    if direct_call_ok(quantized, scale):
        return _dequantize(quantized, scale, dtype)
    return torch.ops.triton_ops.dequantize_fp8(quantized, scale, dtype)


def _dequantize(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    check_tensor(quantized, "quantized")
    check_tensor(scale, "scale")
    check_dtype(quantized, "quantized", FP8_DTYPES)
    check_dtype(scale, "scale", (torch.float32,))
    check_same_device(quantized=quantized, scale=scale)
    if dtype not in FLOAT_DTYPES:
        raise UnsupportedDtypeError(
            f"dtype: expected float16, bfloat16 or float32, got {str(dtype).removeprefix('torch.')}"
        )
    return (quantized.float() * expand_scale(scale, tuple(quantized.shape))).to(dtype)


torch.library.define(op_name("dequantize_fp8"), "(Tensor quantized, Tensor scale, ScalarType dtype) -> Tensor")
torch.library.impl(op_name("dequantize_fp8"), "CompositeImplicitAutograd", func=_dequantize)


def fp8_max(fmt: str | FP8Format | torch.dtype = "e4m3") -> float:
    """The largest finite value of the format (448 for E4M3, 57344 for E5M2)."""
    return FP8Format.from_name(fmt).max_value


__all__ = [
    "ACTIVATION_BLOCK",
    "GRANULARITIES",
    "WEIGHT_BLOCK",
    "WEIGHT_GROUP",
    "dequantize_fp8",
    "expand_scale",
    "fp8_max",
    "quantize_fp8",
    "scale_shape",
]
