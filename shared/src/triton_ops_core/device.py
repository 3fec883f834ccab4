"""Where kernels run: GPU presence, the Triton interpreter, and the device's peak figures.

Tests, benchmarks and kernels ask these questions in one place so the answers never diverge.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass

import torch

_TRUTHY = {"1", "true", "yes", "on"}


def is_interpreter() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when it decorates a kernel, so it must be set before kernel
    modules are imported; this reports the environment, which is what decided that.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUTHY


def has_gpu() -> bool:
    """True when a CUDA device is usable by torch."""
    return torch.cuda.is_available()


def kernel_device() -> torch.device:
    """The device kernels should run on here: the GPU, or the CPU under the interpreter.

    Raises ``UnsupportedDeviceError`` when neither is available.
    """
    if is_interpreter():
        return torch.device("cpu")
    if has_gpu():
        return torch.device("cuda", torch.cuda.current_device())
    from .exceptions import UnsupportedDeviceError

    raise UnsupportedDeviceError(
        "no CUDA device is available and TRITON_INTERPRET is not set: "
        "set TRITON_INTERPRET=1 (before importing triton) to run kernels on CPU tensors"
    )


def can_run_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of ``device`` in this process."""
    if device.type == "cuda":
        return not is_interpreter()
    if device.type == "cpu":
        return is_interpreter()
    return False


def supports_fp8(device: torch.device | str | None = None) -> bool:
    """Whether ``device`` has FP8 tensor cores (compute capability 8.9 or higher).

    Under the interpreter FP8 is emulated on the CPU, so the answer is True there.
    """
    device = torch.device(device) if device is not None else None
    if device is None or device.type == "cpu":
        return is_interpreter()
    if device.type != "cuda" or not has_gpu():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def is_hopper(device: torch.device | str | None = None) -> bool:
    """Whether ``device`` is a Hopper GPU (compute capability 9.x): TMA and wgmma."""
    if is_interpreter() or not has_gpu():
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def device_name(device: torch.device | str | None = None) -> str:
    """A readable name: the GPU's product name, or ``cpu (triton interpreter)``."""
    if has_gpu() and not is_interpreter():
        return torch.cuda.get_device_name(device)
    return "cpu (triton interpreter)" if is_interpreter() else "cpu"


@dataclass(frozen=True)
class DevicePeaks:
    """Peak figures for a device, with where they came from.

    ``memory_bandwidth_gbps`` counts bytes read plus bytes written, the way a copy moves them,
    so a memory-bound kernel's achieved GB/s divides by it directly.
    """

    name: str
    memory_bandwidth_gbps: float
    bf16_tflops: float
    fp8_tflops: float
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


# Measured on the lent H100 (../shared/baselines/h100-2026-11-22.json): copy bandwidth through
# torch, cuBLAS bf16 and FP8 at 8192^3. Datasheet figures are the fallback for other parts.
_PEAK_TABLE: dict[str, DevicePeaks] = {
    "H100 80GB HBM3": DevicePeaks(
        "NVIDIA H100 80GB HBM3", 3017.0, 694.0, 1267.0,
        "measured on the lent H100, 2026-11-22 (copy, cuBLAS bf16, cuBLAS FP8 at 8192^3)",
    ),
    "H100 PCIe": DevicePeaks("NVIDIA H100 PCIe", 2000.0, 756.0, 1513.0, "datasheet (dense)"),
    "H200": DevicePeaks("NVIDIA H200", 4300.0, 790.0, 1979.0, "measured copy and bf16 on a lent H200; FP8 datasheet"),
    "A100": DevicePeaks("NVIDIA A100", 1555.0, 312.0, 0.0, "datasheet (40GB SXM), no FP8"),
    "L40S": DevicePeaks("NVIDIA L40S", 864.0, 362.0, 733.0, "datasheet (dense)"),
}


def _table_lookup(name: str) -> DevicePeaks | None:
    for key, peaks in _PEAK_TABLE.items():
        if key in name:
            return peaks
    return None


def measure_copy_bandwidth(nbytes: int = 512 * 2**20, device: torch.device | str | None = None) -> float:
    """Measure device-to-device copy bandwidth in GB/s (bytes read plus written), median of do_bench.

    ``nbytes`` is the size of the source buffer. Small copies do not reach peak: pass the size of
    the tensor a kernel moves to get the ceiling for that size.
    """
    from triton.testing import do_bench

    numel = max(1, nbytes // 2)
    src = torch.randn(numel, device=device or "cuda", dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


@functools.cache
def device_peaks(device: torch.device | str | None = None, measure: bool = False) -> DevicePeaks:
    """Peak figures of ``device``: measured when ``measure`` is True (copy only), else from the table.

    Unknown GPUs with ``measure=False`` get a measured copy bandwidth anyway, since no table entry
    can stand for them; their compute peaks are reported as 0 (unknown).
    """
    if not has_gpu() or is_interpreter():
        return DevicePeaks(device_name(), 0.0, 0.0, 0.0, "no GPU: no peak figures")
    name = torch.cuda.get_device_name(device)
    table = _table_lookup(name)
    if measure or table is None:
        bandwidth = measure_copy_bandwidth(device=device)
        base = table or DevicePeaks(name, 0.0, 0.0, 0.0, "")
        return DevicePeaks(name, bandwidth, base.bf16_tflops, base.fp8_tflops,
                           f"copy bandwidth measured now (512 MiB); compute: {base.source or 'unknown'}")
    return table


__all__ = [
    "DevicePeaks",
    "can_run_on",
    "device_name",
    "device_peaks",
    "has_gpu",
    "is_hopper",
    "is_interpreter",
    "kernel_device",
    "measure_copy_bandwidth",
    "supports_fp8",
]
