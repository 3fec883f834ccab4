"""The building blocks of input validation. Every check names the argument it inspects."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..device import can_run_on, is_interpreter
from ..exceptions import (
    DeviceMismatchError,
    InvalidArgumentError,
    LayoutError,
    ShapeMismatchError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HALF_DTYPES = (torch.float16, torch.bfloat16)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _dtype_list(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(t: object, name: str) -> torch.Tensor:
    """``t`` must be a ``torch.Tensor``."""
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def check_dtype(t: torch.Tensor, name: str, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        raise UnsupportedDtypeError(
            f"{name}: expected dtype in ({_dtype_list(allowed)}), got {str(t.dtype).removeprefix('torch.')}"
        )


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    """All given tensors (None skipped) share one dtype; the message names the first that differs."""
    items = [(n, check_tensor(t, n)) for n, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise UnsupportedDtypeError(
                f"{name}: expected the dtype of {first_name} ({str(first.dtype).removeprefix('torch.')}), "
                f"got {str(t.dtype).removeprefix('torch.')}"
            )


def check_ndim(t: torch.Tensor, name: str, *, exact: int | None = None, minimum: int | None = None) -> None:
    if exact is not None and t.dim() != exact:
        raise ShapeMismatchError(f"{name}: expected {exact} dimensions, got {t.dim()} (shape {tuple(t.shape)})")
    if minimum is not None and t.dim() < minimum:
        raise ShapeMismatchError(
            f"{name}: expected at least {minimum} dimensions, got {t.dim()} (shape {tuple(t.shape)})"
        )


def check_shape(t: torch.Tensor, name: str, expected: Sequence[int | None], what: str = "") -> None:
    """``t.shape`` equals ``expected``, where None matches any size."""
    shape = tuple(t.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        suffix = f" ({what})" if what else ""
        raise ShapeMismatchError(f"{name}: expected shape {want}{suffix}, got {list(shape)}")


def check_dim_size(t: torch.Tensor, name: str, dim: int, size: int, what: str = "") -> None:
    if t.shape[dim] != size:
        suffix = f" to match {what}" if what else ""
        raise ShapeMismatchError(
            f"{name}: expected size {size} in dimension {dim}{suffix}, got {t.shape[dim]} (shape {list(t.shape)})"
        )


def check_divisible(value: int, divisor: int, name: str, what: str = "") -> None:
    if divisor <= 0 or value % divisor != 0:
        suffix = f" ({what})" if what else ""
        raise ShapeMismatchError(f"{name}: expected a multiple of {divisor}{suffix}, got {value}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors (None skipped) live on one device; a non-tensor among them is named as such."""
    items = [(n, check_tensor(t, n)) for n, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise DeviceMismatchError(f"{name}: expected device {first.device} (that of {first_name}), got {t.device}")


def check_kernel_device(t: torch.Tensor, name: str) -> None:
    """``t`` lives where a Triton kernel can run in this process (CUDA, or CPU under the interpreter)."""
    if can_run_on(t.device):
        return
    if t.device.type == "cpu":
        raise UnsupportedDeviceError(
            f"{name}: expected a CUDA tensor, got a CPU tensor; CPU tensors run only under Triton's "
            "interpreter (set TRITON_INTERPRET=1 before importing triton)"
        )
    if t.device.type == "cuda" and is_interpreter():
        raise UnsupportedDeviceError(
            f"{name}: expected a CPU tensor under TRITON_INTERPRET=1, got a tensor on {t.device}"
        )
    raise UnsupportedDeviceError(f"{name}: expected a CUDA tensor, got a tensor on {t.device}")


def check_last_dim_contiguous(t: torch.Tensor, name: str) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise LayoutError(f"{name}: expected unit stride in the last dimension, got strides {tuple(t.stride())}")


def check_contiguous(t: torch.Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise LayoutError(
            f"{name}: expected a contiguous tensor, got strides {tuple(t.stride())} for shape {list(t.shape)}"
        )


def memory_span(t: torch.Tensor) -> int:
    """Bytes from ``t``'s first element to just past its last one (0 for an empty tensor): with ``t.data_ptr()``,
    the address range a kernel reading or writing ``t`` may touch. Constant for a call signature (shape, strides,
    dtype), so plans compute it once."""
    if t.numel() == 0:
        return 0
    return (sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()


def check_no_overlap(out: torch.Tensor, out_name: str, out_span: int, t: torch.Tensor, name: str, span: int) -> None:
    """``out`` (written in place by a kernel) and ``t`` (read by it) share no byte: a kernel whose programs write
    ``out`` while others still read ``t`` would compute from half-updated data. ``*_span``: :func:`memory_span`
    of each (cached by the caller). Conservative for interleaved strided views (their ranges overlap)."""
    a, b = out.data_ptr(), t.data_ptr()
    if out_span and span and a < b + span and b < a + out_span:
        raise InvalidArgumentError(
            f"{out_name}: shares memory with {name}; the op updates {out_name} in place while reading {name}: pass "
            f"a separate tensor (e.g. {name}.clone())")


def check_positive(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and value == value and value != float("inf")):
        raise InvalidArgumentError(f"{name}: expected a positive finite number, got {value!r}")


def check_choice(value: object, name: str, choices: Sequence[object]) -> None:
    if value not in choices:
        raise InvalidArgumentError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


__all__ = [
    "FLOAT_DTYPES",
    "FP8_DTYPES",
    "HALF_DTYPES",
    "check_choice",
    "check_contiguous",
    "check_dim_size",
    "check_divisible",
    "check_dtype",
    "check_kernel_device",
    "check_last_dim_contiguous",
    "check_ndim",
    "check_no_overlap",
    "check_positive",
    "check_same_device",
    "check_same_dtype",
    "check_shape",
    "check_tensor",
    "memory_span",
]
