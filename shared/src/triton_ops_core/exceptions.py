"""The exception hierarchy every triton-ops kernel raises.

Each class also derives from the built-in exception a caller would naturally catch
(``ValueError``, ``TypeError``, ``ArithmeticError``), so code written against plain PyTorch
error handling keeps working. Messages always name the argument, what was expected and
what was given.
"""

from __future__ import annotations


class TritonKernelError(Exception):
    """Base class of every error raised by triton-ops."""


class ShapeMismatchError(TritonKernelError, ValueError):
    """A tensor's shape (rank, a dimension, divisibility) does not fit the operation."""


class UnsupportedDtypeError(TritonKernelError, TypeError):
    """A tensor's dtype is not supported, or dtypes that must agree do not."""


class DeviceMismatchError(TritonKernelError, ValueError):
    """Tensors that must live on one device live on several."""


class UnsupportedDeviceError(TritonKernelError, RuntimeError):
    """The device cannot run the kernel (CPU without the interpreter, no FP8 tensor cores)."""


class LayoutError(TritonKernelError, ValueError):
    """A tensor's memory layout (strides, contiguity) is not one the kernel can address."""


class InvalidArgumentError(TritonKernelError, ValueError):
    """A non-tensor argument (an option name, eps, block size) has an invalid value."""


class NumericalOverflowError(TritonKernelError, ArithmeticError):
    """Values exceed the representable range of the target format (raised only in strict mode)."""


__all__ = [
    "TritonKernelError",
    "ShapeMismatchError",
    "UnsupportedDtypeError",
    "DeviceMismatchError",
    "UnsupportedDeviceError",
    "LayoutError",
    "InvalidArgumentError",
    "NumericalOverflowError",
]
