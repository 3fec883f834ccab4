"""Measuring one config: warm-up, timed runs with the L2 cache flushed, median and spread.

On a GPU each run is timed with a pair of CUDA events around the launch, after a write over a
buffer larger than L2 so no run finds its inputs cached by the previous one. Under the Triton
interpreter (CPU) runs are timed with the wall clock. Tests inject a timer for determinism.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from triton_ops_core.device import L2Flush

Runner = Callable[[], Any]


class Timer(Protocol):
    """Times ONE run of ``fn`` (which launches the kernel with ``config``) and returns milliseconds."""

    def __call__(self, fn: Runner, config: Mapping[str, Any]) -> float: ...


class WallClockTimer:
    """``time.perf_counter`` around the call: right for the interpreter, where a launch runs synchronously."""

    def __call__(self, fn: Runner, config: Mapping[str, Any]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


class CudaEventTimer:
    """CUDA events around one launch, with L2 flushed first (``triton_ops_core.device.L2Flush``: the benchmark
    suite's flush, so tuner and benchmark rank configs under the same conditions).

    Before the start event the GPU is also kept busy (``torch.cuda._sleep``) for at least ``cushion_cycles``
    clock cycles, and for twice the shortest host time a call took to return: while the GPU waits, the host
    runs the Python of the call and queues its launches, so the events time the kernels and not the host
    overhead of a small call (which would hide the difference between configs).
    """

    CYCLES_PER_US = 2000  # ~2 GHz: an over-estimate of the clock only lengthens the wait

    def __init__(self, device: torch.device | str | int | None = None, flush_l2: bool = True,
                 cushion_cycles: int = 200_000) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.flush_l2 = flush_l2
        self.cushion_cycles = cushion_cycles
        self._host_us = 0.0
        self._flush: L2Flush | None = None

    def __call__(self, fn: Runner, config: Mapping[str, Any]) -> float:
        with torch.cuda.device(self.device):
            if self.flush_l2:
                if self._flush is None:
                    self._flush = L2Flush(self.device)
                self._flush()
            if self.cushion_cycles > 0:
                cycles = max(self.cushion_cycles, int(2 * self._host_us * self.CYCLES_PER_US))
                torch.cuda._sleep(min(cycles, 200_000_000))  # never more than ~0.1 s
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            host = time.perf_counter()
            fn()
            host_us = (time.perf_counter() - host) * 1e6
            # The smallest host time seen: a call that synchronizes inside would otherwise report the wait
            # itself, and the cushion would double run after run.
            self._host_us = host_us if self._host_us == 0 else min(self._host_us, host_us)
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))


def default_timer(device: torch.device | str | int | None, flush_l2: bool = True) -> Timer:
    """CUDA events on a CUDA device outside the interpreter, else the wall clock."""
    from triton_ops_core.device import is_interpreter

    if isinstance(device, int):
        device = torch.device("cuda", device)
    dev = torch.device(device) if device is not None else None
    gpu = torch.cuda.is_available() and not is_interpreter()
    if gpu and (dev is None or dev.type == "cuda"):
        return CudaEventTimer(dev, flush_l2=flush_l2)
    return WallClockTimer()


@dataclass(frozen=True)
class Timing:
    """Statistics of the timed runs of one config, in milliseconds."""

    median_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    runs: int


def _synchronize(device: torch.device | str | int | None) -> None:
    if torch.cuda.is_available():
        from triton_ops_core.device import is_interpreter

        if not is_interpreter():
            torch.cuda.synchronize()


def measure(
    fn: Runner,
    config: Mapping[str, Any],
    timer: Timer,
    *,
    warmup_runs: int = 10,
    benchmark_runs: int = 100,
    time_budget_ms: float | None = None,
    device: torch.device | str | int | None = None,
) -> Timing:
    """Time ``fn``: ``warmup_runs`` untimed calls (the first compiles), then up to ``benchmark_runs`` timed ones.

    With ``time_budget_ms``, the number of timed runs is cut so that they take about that long
    (at least 3 runs): a slow config does not cost 100 runs to be found slow. Exceptions
    (compile errors, out of resources) propagate to the caller, which records them.
    """
    fn()  # compile (and fail) before anything is timed; counts as the first warm-up run
    for _ in range(max(0, warmup_runs - 1)):
        fn()
    _synchronize(device)
    runs = max(1, benchmark_runs)
    times: list[float] = []
    for i in range(runs):
        times.append(float(timer(fn, config)))
        if time_budget_ms is not None and i == 0 and times[0] > 0:
            runs = max(min(3, runs), min(runs, int(time_budget_ms / times[0])))
        if len(times) >= runs:
            break
    return Timing(
        median_ms=statistics.median(times),
        std_ms=statistics.pstdev(times) if len(times) > 1 else 0.0,
        min_ms=min(times),
        max_ms=max(times),
        runs=len(times),
    )


__all__ = ["CudaEventTimer", "Runner", "Timer", "Timing", "WallClockTimer", "default_timer", "measure"]
