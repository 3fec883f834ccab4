"""What a benchmark case is, and what it produced: plain dataclasses with JSON round trips."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# An implementation's role in a case: ours (gated for correctness, drives the exit status), a baseline
# (its time gives our speedup), or a ceiling (a bound we compare against, such as a GEMM with no epilogue).
ROLES = ("ours", "baseline", "ceiling")

# Status of one implementation in one case.
OK, FAIL, ERROR, NA, SKIPPED = "ok", "FAIL", "error", "n/a", "skipped"


@dataclass
class Impl:
    """One implementation of a case: a zero-argument callable returning its output.

    ``check`` turns the output into the tensor compared with the case's reference (default: the output itself);
    ``optional`` marks baselines whose absence or failure to build (Liger not installed, torch.compile failing)
    is reported as ``n/a`` rather than an error. ``gpu_only`` implementations are left out under the interpreter.
    ``tol`` overrides the case's tolerance (fast accumulation, say).
    """

    name: str
    fn: Callable[[], Any]
    role: str = "baseline"
    check: Callable[[Any], torch.Tensor] | None = None
    error_fn: Callable[[Any], float] | None = None
    tol: float | None = None
    optional: bool = False
    gpu_only: bool = False
    graph: bool = False
    track_memory: bool = False
    unavailable: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role: expected one of {ROLES}, got {self.role!r}")


@dataclass
class Case:
    """One problem (shape, dtype) with its reference and the implementations compared on it.

    ``reference`` returns the float64/float32 result every implementation is compared with, by relative error
    (``triton_ops_core.testing.relative_error``); ``tol`` is the stated tolerance. ``bytes_moved`` counts the
    fewest bytes the op must read plus write; ``flops`` its floating-point operations. ``x`` is the value a plot
    puts on its horizontal axis (its label in ``x_label``), ``panel`` the plot it belongs to.
    """

    group: str
    name: str
    dtype: str
    reference: Callable[[], torch.Tensor] | None
    impls: list[Impl]
    tol: float
    params: dict[str, Any] = field(default_factory=dict)
    bytes_moved: int | None = None
    flops: int | None = None
    panel: str = ""
    x: float | None = None
    x_label: str = ""
    metric: str = "gbps"  # what the plot shows: "gbps" (memory-bound) or "tflops"
    cublas: str | dict[str, str] | None = None  # what "% of cuBLAS" divides by (per ours implementation)
    speedup_pairs: dict[str, Sequence[str]] | None = None  # ours name -> baselines it is compared with
    compute_dtype: str | None = None  # "fp8" or "bf16": the datasheet peak "% of datasheet" divides by
    note: str = ""


@dataclass
class Timing:
    """Device-event timings of one implementation: median and spread, in milliseconds."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    std_ms: float
    min_ms: float
    runs: int
    attempts: int = 1  # measurements taken: an unstable one (see ``unstable``) is repeated, the steadiest kept

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms

    @property
    def unstable(self) -> bool:
        """Interquartile range above a quarter of the median: the runs did not measure one thing (most often the
        host stalled while the GPU waited for the next launch)."""
        return self.iqr_ms > 0.25 * self.median_ms

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> Timing:
        if not samples_ms:
            raise ValueError("samples_ms: expected at least one timing")
        xs = sorted(float(s) for s in samples_ms)
        return cls(
            median_ms=statistics.median(xs),
            p25_ms=_quantile(xs, 0.25),
            p75_ms=_quantile(xs, 0.75),
            std_ms=statistics.pstdev(xs) if len(xs) > 1 else 0.0,
            min_ms=xs[0],
            runs=len(xs),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Timing:
        return cls(**{k: d[k] for k in ("median_ms", "p25_ms", "p75_ms", "std_ms", "min_ms", "runs")},
                   attempts=d.get("attempts", 1))


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted data (numpy's default method)."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


@dataclass
class ImplResult:
    """What one implementation did on one case: its correctness, its time and the metrics derived from it."""

    name: str
    role: str
    status: str
    error: float | None = None
    tol: float | None = None
    message: str = ""
    timing: Timing | None = None
    graph_ms: float | None = None
    host_ms: float | None = None
    gbps: float | None = None
    pct_copy_same: float | None = None
    pct_peak: float | None = None
    tflops: float | None = None
    pct_cublas: float | None = None
    pct_datasheet: float | None = None
    peak_mem_bytes: int | None = None
    first_call_s: float | None = None
    clean_ms: float | None = None  # median with L2 emptied by a read (no dirty lines to write back); gbps panels
    clean_pct_peak: float | None = None
    note: str = ""

    @property
    def ms(self) -> float | None:
        return self.timing.median_ms if self.timing is not None else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timing"] = self.timing.to_dict() if self.timing is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImplResult:
        known = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in known}
        kw["timing"] = Timing.from_dict(d["timing"]) if d.get("timing") else None
        return cls(**kw)


@dataclass
class CaseResult:
    """A case's outcome: every implementation's result plus the case's sizes and its copy-bandwidth ceiling."""

    group: str
    name: str
    dtype: str
    tol: float
    params: dict[str, Any] = field(default_factory=dict)
    bytes_moved: int | None = None
    flops: int | None = None
    copy_same_gbps: float | None = None
    panel: str = ""
    x: float | None = None
    x_label: str = ""
    metric: str = "gbps"
    cublas: str | dict[str, str] | None = None
    speedup_pairs: dict[str, list[str]] | None = None
    compute_dtype: str | None = None
    note: str = ""
    impls: list[ImplResult] = field(default_factory=list)

    def impl(self, name: str) -> ImplResult | None:
        for r in self.impls:
            if r.name == name:
                return r
        return None

    @property
    def ours(self) -> list[ImplResult]:
        return [r for r in self.impls if r.role == "ours"]

    @property
    def baselines(self) -> list[ImplResult]:
        return [r for r in self.impls if r.role != "ours"]

    @property
    def failed(self) -> bool:
        """True when one of our implementations is wrong or raised."""
        return any(r.status in (FAIL, ERROR) for r in self.ours)

    def speedups(self, ours: ImplResult) -> dict[str, float | None]:
        """Baseline time divided by ``ours``' time, for each baseline this implementation is compared with."""
        names = (self.speedup_pairs or {}).get(ours.name)
        out: dict[str, float | None] = {}
        for b in self.baselines:
            if b.role != "baseline" or (names is not None and b.name not in names):
                continue
            out[b.name] = b.ms / ours.ms if (b.ms and ours.ms) else None
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["impls"] = [r.to_dict() for r in self.impls]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaseResult:
        known = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in known}
        kw["impls"] = [ImplResult.from_dict(r) for r in d.get("impls", [])]
        return cls(**kw)
