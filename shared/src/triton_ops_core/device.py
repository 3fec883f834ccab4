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


def sm_count(device: torch.device, cpu: int) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (asked once per GPU: the query costs microseconds), else
    ``cpu``: what a kernel's grid heuristic should assume under the interpreter, which each caller states."""
    if device.type != "cuda":
        return cpu
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Larger than any current GPU's L2 (H100: 50 MB, H200: 60 MB, B200: 126 MB): writing or reading it evicts a kernel's
# operands. One size for the tuner and the benchmarks, so both rank configs under the same conditions.
FLUSH_BYTES = 256 * 2**20


class L2Flush:
    """Empties the L2 cache of a CUDA ``device`` before a timed run (call it; it enqueues one kernel).

    ``by="write"`` zero-fills a 256 MiB buffer: L2 is left full of dirty lines, which the timed kernel writes back to
    HBM as it evicts them (about 10 us on an H100). ``by="read"`` sums the buffer: L2 is left full of clean lines, as
    after a layer that only read its operands, and eviction costs nothing.
    """

    def __init__(self, device: torch.device | str | None = None, by: str = "write") -> None:
        if by not in ("write", "read"):
            from .exceptions import InvalidArgumentError

            raise InvalidArgumentError(f"by: expected 'write' or 'read', got {by!r}")
        self.by = by
        self._buffer = torch.zeros(FLUSH_BYTES // 4, dtype=torch.float32, device=device or "cuda")
        self._sink = torch.empty((), dtype=torch.float32, device=self._buffer.device)

    def __call__(self) -> None:
        if self.by == "write":
            self._buffer.zero_()
        else:
            torch.sum(self._buffer, dim=None, out=self._sink)


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
    "H200": DevicePeaks("NVIDIA H200", 4300.0, 790.0, 1979.0,
                        "measured copy and cuBLAS bf16 on a lent H200 (datasheet bf16: 989); FP8 datasheet"),
    "A100": DevicePeaks("NVIDIA A100", 1555.0, 312.0, 0.0, "datasheet (40GB SXM), no FP8"),
    "L40S": DevicePeaks("NVIDIA L40S", 864.0, 362.0, 733.0, "datasheet (dense)"),
}


# Dense tensor-core peaks from the vendors' datasheets, TFLOP/s (no sparsity): what "% of datasheet" divides by. The
# table above holds what the lent GPUs measured (cuBLAS at 8192^3), which is below these.
DATASHEET_TFLOPS: dict[str, dict[str, float]] = {
    "H100 80GB HBM3": {"bf16": 989.4, "fp8": 1978.9},  # H100 SXM5
    "H100 SXM": {"bf16": 989.4, "fp8": 1978.9},
    "H100 NVL": {"bf16": 835.0, "fp8": 1670.0},
    "H100 PCIe": {"bf16": 756.0, "fp8": 1513.0},
    "H200": {"bf16": 989.4, "fp8": 1978.9},
    "L40S": {"bf16": 362.1, "fp8": 733.0},
    "L4": {"bf16": 121.0, "fp8": 242.0},
    "A100": {"bf16": 312.0},
}


def datasheet_tflops(device_name: str, compute_dtype: str | None) -> float | None:
    """The datasheet's dense TFLOP/s of ``device_name`` for ``"bf16"`` or ``"fp8"``; None when unknown."""
    if not compute_dtype:
        return None
    for key, peaks in DATASHEET_TFLOPS.items():
        if key in device_name:
            return peaks.get(compute_dtype)
    return None


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
    "DATASHEET_TFLOPS",
    "FLUSH_BYTES",
    "L2Flush",
    "DevicePeaks",
    "can_run_on",
    "datasheet_tflops",
    "device_name",
    "device_peaks",
    "has_gpu",
    "is_hopper",
    "is_interpreter",
    "kernel_device",
    "measure_copy_bandwidth",
    "sm_count",
    "supports_fp8",
]
