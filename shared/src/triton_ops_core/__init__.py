"""triton-ops-core: exceptions, input validation, data models and device helpers shared by triton-ops kernels."""

from .__about__ import __version__
from .device import (
    DevicePeaks,
    can_run_on,
    device_name,
    device_peaks,
    has_gpu,
    is_hopper,
    is_interpreter,
    kernel_device,
    measure_copy_bandwidth,
    supports_fp8,
)
from .exceptions import (
    DeviceMismatchError,
    InvalidArgumentError,
    LayoutError,
    NumericalOverflowError,
    ShapeMismatchError,
    TritonKernelError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
)
from .models import FP8Format, KernelMetrics, TensorSpec, TrialResult, TuningResult, dtype_from_name, dtype_name

__all__ = [
    "__version__",
    "DeviceMismatchError",
    "DevicePeaks",
    "FP8Format",
    "InvalidArgumentError",
    "KernelMetrics",
    "LayoutError",
    "NumericalOverflowError",
    "ShapeMismatchError",
    "TensorSpec",
    "TrialResult",
    "TritonKernelError",
    "TuningResult",
    "UnsupportedDeviceError",
    "UnsupportedDtypeError",
    "can_run_on",
    "device_name",
    "device_peaks",
    "dtype_from_name",
    "dtype_name",
    "has_gpu",
    "is_hopper",
    "is_interpreter",
    "kernel_device",
    "measure_copy_bandwidth",
    "supports_fp8",
]
