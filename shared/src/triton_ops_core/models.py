"""Data models shared by the kernels, the tuner and the benchmarks.

All models are frozen dataclasses with ``to_dict``/``from_dict`` round trips through plain
JSON types, so tuning caches and benchmark reports never need pickle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from .exceptions import InvalidArgumentError


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the stable spelling used in keys and reports."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidArgumentError(f"dtype name: expected a torch dtype name such as 'bfloat16', got {name!r}")
    return dtype


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype, device and strides of a tensor, without its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str = "cpu"
    strides: tuple[int, ...] | None = None

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> TensorSpec:
        return cls(tuple(t.shape), t.dtype, str(t.device), tuple(t.stride()))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.element_size

    @property
    def is_contiguous(self) -> bool:
        if self.strides is None:
            return True
        expected, stride = [], 1
        for size in reversed(self.shape):
            expected.append(stride)
            stride *= size
        return all(s == e or size == 1 for s, e, size in zip(self.strides, reversed(expected), self.shape))

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": dtype_name(self.dtype), "device": self.device,
                "strides": None if self.strides is None else list(self.strides)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        strides = d.get("strides")
        return cls(tuple(d["shape"]), dtype_from_name(d["dtype"]), d.get("device", "cpu"),
                   None if strides is None else tuple(strides))


@dataclass(frozen=True)
class KernelMetrics:
    """What one timed kernel achieved.

    ``throughput`` is in the caller's unit of work per second (tokens/s by default in our
    benchmarks); ``bandwidth_gbps`` counts bytes read plus bytes written; ``bandwidth_pct_of_peak``
    and ``tflops`` are None where they do not apply (no peak known, no FLOPs).
    """

    latency_ms: float
    throughput: float | None = None
    bandwidth_gbps: float | None = None
    bandwidth_pct_of_peak: float | None = None
    tflops: float | None = None
    latency_std_ms: float | None = None
    latency_min_ms: float | None = None
    latency_max_ms: float | None = None

    @classmethod
    def from_timing(
        cls,
        latency_ms: float,
        *,
        bytes_moved: int | None = None,
        flops: int | None = None,
        work_items: int | None = None,
        peak_bandwidth_gbps: float | None = None,
        latency_std_ms: float | None = None,
        latency_min_ms: float | None = None,
        latency_max_ms: float | None = None,
    ) -> KernelMetrics:
        """Derive bandwidth, % of peak, TFLOP/s and throughput from one latency."""
        if not latency_ms > 0:
            raise InvalidArgumentError(f"latency_ms: expected a positive time, got {latency_ms!r}")
        seconds = latency_ms * 1e-3
        bandwidth = bytes_moved / seconds / 1e9 if bytes_moved is not None else None
        pct = (100.0 * bandwidth / peak_bandwidth_gbps
               if bandwidth is not None and peak_bandwidth_gbps else None)
        return cls(
            latency_ms=latency_ms,
            throughput=work_items / seconds if work_items is not None else None,
            bandwidth_gbps=bandwidth,
            bandwidth_pct_of_peak=pct,
            tflops=flops / seconds / 1e12 if flops is not None else None,
            latency_std_ms=latency_std_ms,
            latency_min_ms=latency_min_ms,
            latency_max_ms=latency_max_ms,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KernelMetrics:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class TrialResult:
    """One config tried by the tuner: its time, or why it could not run."""

    config: dict[str, Any]
    latency_ms: float | None = None
    latency_std_ms: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.latency_ms is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialResult:
        return cls(dict(d["config"]), d.get("latency_ms"), d.get("latency_std_ms"), d.get("error"))


@dataclass(frozen=True)
class TuningResult:
    """The outcome of a tuning run: the best config, its metrics, and every trial."""

    best_config: dict[str, Any]
    metrics: KernelMetrics
    trials: tuple[TrialResult, ...] = ()
    kernel: str = ""
    key: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"best_config": dict(self.best_config), "metrics": self.metrics.to_dict(),
                "trials": [t.to_dict() for t in self.trials], "kernel": self.kernel, "key": dict(self.key)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TuningResult:
        return cls(dict(d["best_config"]), KernelMetrics.from_dict(d["metrics"]),
                   tuple(TrialResult.from_dict(t) for t in d.get("trials", ())),
                   d.get("kernel", ""), dict(d.get("key", {})))


@dataclass(frozen=True)
class FP8Format:
    """An 8-bit floating-point format: its range, precision and dtypes in torch and Triton.

    Use the instances ``FP8Format.E4M3`` and ``FP8Format.E5M2``, or ``FP8Format.from_name``.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    max_value: float
    min_normal: float
    min_subnormal: float
    torch_dtype: torch.dtype
    triton_dtype_name: str
    bits: int = 8

    E4M3: ClassVar[FP8Format]
    E5M2: ClassVar[FP8Format]

    @property
    def triton_dtype(self):
        """The ``triton.language`` dtype (``tl.float8e4nv`` or ``tl.float8e5``)."""
        import triton.language as tl

        return getattr(tl, self.triton_dtype_name)

    @property
    def overflow_threshold(self) -> float:
        """The largest float32 value that the cast to this format rounds to ``max_value`` rather than clips
        (E4M3, which saturates) or makes infinite (E5M2): ``max_value`` plus half its step, less one float32 step
        when that midpoint rounds away from ``max_value`` (E5M2's largest value has an odd mantissa).

        E4M3: 464 (448 plus 16; the tie rounds to 448, whose mantissa is even). E5M2: 61439.996 (57344 plus
        4096 is a tie that rounds up, to infinity). A scaled value up to this threshold only rounds; past it,
        a given scale no longer holds the data.
        """
        return 464.0 if self.name == "e4m3" else 61439.99609375

    @classmethod
    def from_name(cls, name: str | FP8Format | torch.dtype) -> FP8Format:
        if isinstance(name, FP8Format):
            return name
        for fmt in (cls.E4M3, cls.E5M2):
            if name in (fmt.name, fmt.torch_dtype) or (isinstance(name, str) and name.lower() == fmt.name):
                return fmt
        raise InvalidArgumentError(f"fmt: expected 'e4m3' or 'e5m2' (or their torch dtypes), got {name!r}")

    @classmethod
    def from_dtype(cls, dtype: torch.dtype) -> FP8Format | None:
        for fmt in (cls.E4M3, cls.E5M2):
            if dtype == fmt.torch_dtype:
                return fmt
        return None


# float8_e4m3fn: no infinities, max 448 = 1.75 * 2^8, min normal 2^-6, min subnormal 2^-9.
FP8Format.E4M3 = FP8Format("e4m3", 4, 3, 448.0, 2.0**-6, 2.0**-9, torch.float8_e4m3fn, "float8e4nv")
# float8_e5m2: IEEE-like with infinities, max 57344 = 1.75 * 2^15, min normal 2^-14, min subnormal 2^-16.
FP8Format.E5M2 = FP8Format("e5m2", 5, 2, 57344.0, 2.0**-14, 2.0**-16, torch.float8_e5m2, "float8e5")


__all__ = ["FP8Format", "KernelMetrics", "TensorSpec", "TrialResult", "TuningResult", "dtype_from_name", "dtype_name"]
