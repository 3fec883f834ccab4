"""Where kernels run: GPU presence, the Triton interpreter, and the device's peak figures.

Tests, benchmarks and kernels ask these questions in one place so the answers never diverge.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch

_TRUTHY = {"1", "true", "yes", "on"}
_T = TypeVar("_T")


def is_interpreter() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when it decorates a kernel, so it must be set before kernel
    modules are imported; this reports the environment, which is what decided that.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUTHY


def sm_count(device: torch.device, cpu: int) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (asked once per GPU: the query costs microseconds), else
    ``cpu``: what a kernel's grid heuristic should assume under the interpreter, which each caller states.
    Inside :func:`simulate_device`, the simulated device's count, whatever ``device`` is."""
    if _simulated is not None:
        return _simulated.sm_count
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


# ---- device identity and properties: what config selection keys on and what heuristics read -------------------


@dataclass(frozen=True)
class DeviceInfo:
    """Who a device is (``name`` and compute ``capability``: the key of every tuned-config table) and the properties
    a launch heuristic may read when no table has an entry for it.

    ``memory_bandwidth_gbps`` counts bytes read plus written, like :class:`DevicePeaks`: the measured figure for the
    lent GPUs, else an estimate from the memory clock and bus width (0.0 when neither is known). ``is_gpu`` is
    False for the CPU (the Triton interpreter), True for a CUDA device or a simulated one (:func:`simulate_device`).
    """

    name: str
    capability: tuple[int, int] | None
    sm_count: int
    l2_bytes: int
    smem_per_block: int
    memory_bandwidth_gbps: float
    is_gpu: bool
    source: str = ""

    @property
    def capability_str(self) -> str | None:
        """``"9.0"`` for compute capability 9.0; None for the CPU."""
        return None if self.capability is None else f"{self.capability[0]}.{self.capability[1]}"

    @property
    def arch(self) -> str:
        """``"sm_90"`` (or ``"cpu"``): the short form used in messages."""
        return "cpu" if self.capability is None else f"sm_{self.capability[0]}{self.capability[1]}"

    @property
    def identity(self) -> tuple[str, str | None]:
        """``(name, "9.0")``: what a device-keyed table is indexed by (never the SM count alone: an H200 has the H100's
        132 SMs and 1.4x its bandwidth)."""
        return self.name, self.capability_str

    @property
    def bandwidth_class(self) -> str:
        """A coarse tier of the copy bandwidth: ``"low"`` (< 1 TB/s), ``"medium"`` (< 2), ``"high"`` (< 3.5, the
        H100 SXM), ``"very high"`` (the H200, B200), or ``"unknown"``."""
        bw = self.memory_bandwidth_gbps
        if bw <= 0:
            return "unknown"
        return "low" if bw < 1000 else "medium" if bw < 2000 else "high" if bw < 3500 else "very high"

    def bytes_in_flight_per_sm(self, latency_us: float = 0.6) -> float:
        """Bytes each SM must have requested and not yet received to stream at the copy bandwidth (Little's law with
        ``latency_us`` of memory latency): what a memory-bound kernel's program size should cover. 0 when unknown."""
        if self.memory_bandwidth_gbps <= 0 or self.sm_count <= 0:
            return 0.0
        return self.memory_bandwidth_gbps * 1e3 * latency_us / self.sm_count

    def describe(self) -> str:
        """``"NVIDIA H200 (sm_90: 132 SMs, 60 MiB L2, 227 KiB shared memory per block, ~4300 GB/s)"``."""
        if not self.is_gpu:
            return self.name
        bw = f", ~{self.memory_bandwidth_gbps:.0f} GB/s" if self.memory_bandwidth_gbps > 0 else ""
        return (f"{self.name} ({self.arch}: {self.sm_count} SMs, {self.l2_bytes / 2**20:.0f} MiB L2, "
                f"{self.smem_per_block // 1024} KiB shared memory per block{bw})")

    def to_dict(self) -> dict:
        return asdict(self)


CPU_INTERPRETER = DeviceInfo("cpu-interpreter", None, 0, 0, 0, 0.0, False, "the CPU (Triton's interpreter)")

_simulated: DeviceInfo | None = None
_simulation_listeners: list = []


def _estimated_bandwidth(props: object, name: str) -> tuple[float, str]:
    table = _table_lookup(name)
    if table is not None:
        return table.memory_bandwidth_gbps, table.source
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz and bus_bits:
        # double data rate; a copy reaches about 90 % of the interface's rate (H100: 3017 of 3352 GB/s)
        return 0.9 * 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "estimated from the memory clock and bus width"
    return 0.0, "unknown"


@functools.cache
def _cuda_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    bandwidth, where = _estimated_bandwidth(props, props.name)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_block", 0) or 0
    return DeviceInfo(props.name, (props.major, props.minor), props.multi_processor_count,
                      int(getattr(props, "L2_cache_size", 0) or 0), int(smem), float(bandwidth), True,
                      f"torch.cuda.get_device_properties; bandwidth: {where}")


def device_info(device: torch.device | str | int | None = None) -> DeviceInfo:
    """The identity and properties of ``device`` (``None``: the current CUDA device when kernels run on one).

    A CPU device, or any device under the interpreter, is :data:`CPU_INTERPRETER`. Inside :func:`simulate_device`,
    the simulated record, whatever ``device`` is. Asked once per GPU (then a dict hit).
    """
    if _simulated is not None:
        return _simulated
    if isinstance(device, int):
        device = torch.device("cuda", device)
    elif isinstance(device, str):
        device = torch.device(device)
    if is_interpreter() or not has_gpu() or (device is not None and device.type != "cuda"):
        return CPU_INTERPRETER
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _cuda_info(index)


@contextlib.contextmanager
def simulate_device(info: DeviceInfo):
    """Within this block :func:`device_info` and :func:`sm_count` answer ``info`` for every device: tests of config
    selection on a GPU that is not there (an H200 record on the CPU interpreter). Callbacks registered with
    :func:`on_device_change` (kernel-autotune's memo) run on entry and exit. Not thread-safe; tests only."""
    global _simulated
    if not isinstance(info, DeviceInfo):
        from .exceptions import InvalidArgumentError

        raise InvalidArgumentError(f"info: expected a DeviceInfo, got {type(info).__name__}")
    previous = _simulated
    _simulated = info
    _notify_device_change()
    try:
        yield info
    finally:
        _simulated = previous
        _notify_device_change()


def on_device_change(callback) -> None:
    """Call ``callback()`` whenever :func:`simulate_device` changes what :func:`device_info` answers."""
    _simulation_listeners.append(callback)


def _notify_device_change() -> None:
    for callback in _simulation_listeners:
        callback()


def lookup_by_device(table: Mapping[tuple[str, str | None], _T], device: torch.device | str | int | None = None,
                     ) -> _T | None:
    """``table[(name, capability)]`` for ``device`` (``("NVIDIA H100 80GB HBM3", "9.0")``), or None.

    The one way a package's in-code, device-specific table is consulted: an exact match of product name and compute
    capability, never a match on SM count or a partial name (an H200 does not get the H100's table).
    """
    return table.get(device_info(device).identity)


__all__ = [
    "CPU_INTERPRETER",
    "DATASHEET_TFLOPS",
    "FLUSH_BYTES",
    "L2Flush",
    "DeviceInfo",
    "DevicePeaks",
    "can_run_on",
    "datasheet_tflops",
    "device_info",
    "device_name",
    "device_peaks",
    "has_gpu",
    "is_hopper",
    "is_interpreter",
    "kernel_device",
    "lookup_by_device",
    "measure_copy_bandwidth",
    "on_device_change",
    "simulate_device",
    "sm_count",
    "supports_fp8",
]
