"""Measuring one config: warm-up, timed runs with the L2 cache flushed, median and spread.

One GPU timer serves the tuner and the benchmark suite (``triton_ops.benchmark``), so both rank configs under the same
conditions: :class:`GpuTimer` flushes L2 before each timed run (``triton_ops_core.device.L2Flush``, a write over
256 MiB), brackets each run with its own pair of CUDA events, queues the runs back to back and synchronizes once, and
replays CUDA graphs for per-call times without host overhead. The tuner's :class:`CudaEventTimer` adds a wait
(``torch.cuda._sleep``) before the runs so the host gets ahead of the GPU, and, for a kernel too short for events to
rank (launch gaps and event resolution are microseconds; a small norm kernel takes a few), times replays of a CUDA
graph of many back-to-back calls instead. Under the Triton interpreter (CPU) runs are timed with the wall clock.
Tests inject a timer (or fake ``torch.cuda``'s clock) for determinism.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from triton_ops_core.device import L2Flush

Runner = Callable[[], Any]


class Timer(Protocol):
    """Times ONE run of ``fn`` (which launches the kernel with ``config``) and returns milliseconds.

    A timer may also offer ``samples(fn, config, runs) -> list[float]`` (several runs at once; :func:`measure` then
    uses it) and ``calibrate(fn)`` (called by the search once, with the baseline config's runner, before any config
    is timed: the timer chooses how to time this kernel).
    """

    def __call__(self, fn: Runner, config: Mapping[str, Any]) -> float: ...


class WallClockTimer:
    """``time.perf_counter`` around the call: right for the interpreter, where a launch runs synchronously."""

    def __call__(self, fn: Runner, config: Mapping[str, Any]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


def _cuda_device(device: torch.device | str | int | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else 0.0


class GpuTimer:
    """CUDA-event timing on one device: the tuner's and the benchmark suite's (one implementation, one L2 flush).

    - :meth:`run_samples`: ``runs`` runs queued back to back; before each, L2 is flushed (``flush_by="write"``
      zero-fills a 256 MiB buffer, ``"read"`` sums it: see ``L2Flush``), outside the run's events; one synchronize.
    - :meth:`estimate_ms`: the per-call time of a few back-to-back calls after one flush (a first estimate).
    - :meth:`graph_samples`: per-call times of replays of a CUDA graph of ``calls`` back-to-back calls (no host
      overhead; within a replay, operands small enough stay in L2, as in a captured decode step).
    - :meth:`host_ms`: the host's wall time per call of back-to-back calls.

    ``cushion_cycles`` > 0 keeps the GPU busy (``torch.cuda._sleep``) before queued runs, for at least that many clock
    cycles and twice the host time the runs take to queue: the host then queues every run before the GPU reaches the
    first, and the events time the kernels, not the Python between them. The suite leaves it at 0 (each run's flush,
    ~60-90 us, hides that much host time per run).
    """

    CYCLES_PER_US = 2000  # ~2 GHz: an over-estimate of the clock only lengthens the wait
    MAX_CUSHION_CYCLES = 200_000_000  # ~0.1 s

    def __init__(self, device: torch.device | str | int | None = None, *, flush_l2: bool = True,
                 flush_by: str = "write", cushion_cycles: int = 0) -> None:
        self.device = _cuda_device(device)
        self.flush_l2 = flush_l2
        self.flush_by = flush_by
        self.cushion_cycles = int(cushion_cycles)
        self._flush: L2Flush | None = L2Flush(self.device, flush_by) if flush_l2 else None
        self._host_us = 0.0  # the shortest host time of one call seen so far

    # ---- pieces --------------------------------------------------------------------------------------------------

    def _flush_l2(self) -> None:
        if self._flush is not None:
            self._flush()

    def _cushion(self, runs: int = 1) -> None:
        if self.cushion_cycles <= 0:
            return
        cycles = max(self.cushion_cycles, int(2 * runs * self._host_us * self.CYCLES_PER_US))
        torch.cuda._sleep(min(cycles, self.MAX_CUSHION_CYCLES))

    def _host_timed(self, fn: Runner) -> None:
        start = time.perf_counter()
        fn()
        host_us = (time.perf_counter() - start) * 1e6
        # The smallest host time seen: a call that synchronizes inside would otherwise report the wait itself, and
        # the cushion would double run after run.
        self._host_us = host_us if self._host_us == 0 else min(self._host_us, host_us)

    def _synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    # ---- measurements --------------------------------------------------------------------------------------------

    def estimate_ms(self, fn: Runner, calls: int = 3) -> float:
        """Per-call time of ``calls`` back-to-back calls after one L2 flush (at least 1 ns)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._flush_l2()
        self._cushion(calls)
        start.record()
        for _ in range(calls):
            self._host_timed(fn)
        end.record()
        self._synchronize()
        return max(start.elapsed_time(end) / calls, 1e-6)

    def run_samples(self, fn: Runner, runs: int) -> list[float]:
        """Milliseconds of each of ``runs`` runs, each after an L2 flush, queued back to back (one synchronize)."""
        runs = max(1, int(runs))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        self._cushion(runs)
        for i in range(runs):
            self._flush_l2()
            starts[i].record()
            self._host_timed(fn)
            ends[i].record()
        self._synchronize()
        return [float(s.elapsed_time(e)) for s, e in zip(starts, ends)]

    def capture(self, fn: Runner, calls: int) -> Any:
        """A CUDA graph of ``calls`` back-to-back calls of ``fn`` (warmed up on a side stream first, as capture
        requires), replayed once; ``graph.replay()`` then runs them with no host work."""
        current = torch.cuda.current_stream(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        current.wait_stream(stream)
        self._synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        self._synchronize()
        return graph

    def replay_samples(self, graph: Any, calls: int, replays: int, *, flush: bool = False) -> list[float]:
        """Per-call milliseconds of ``replays`` replays of ``graph`` (of ``calls`` calls); ``flush``: L2 flushed
        before each replay, outside its events."""
        replays = max(1, int(replays))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
        for i in range(replays):
            if flush:
                self._flush_l2()
            starts[i].record()
            graph.replay()
            ends[i].record()
        self._synchronize()
        return [float(s.elapsed_time(e)) / calls for s, e in zip(starts, ends)]

    def graph_samples(self, fn: Runner, calls: int = 20, replays: int = 20, *, flush: bool = False) -> list[float]:
        """Per-call milliseconds of each replay of a CUDA graph of ``calls`` back-to-back calls of ``fn``."""
        graph = self.capture(fn, calls)
        try:
            return self.replay_samples(graph, calls, replays, flush=flush)
        finally:
            del graph

    def graph_ms(self, fn: Runner, calls: int = 20, replays: int = 20) -> float:
        """Median per-call time of ``fn`` replayed from a CUDA graph of ``calls`` back-to-back calls.

        The calls inside one replay run back to back, so their operands may sit in L2: this is the time a decode
        step captured in a graph sees for a small op, not a cold-cache figure.
        """
        return _median(self.graph_samples(fn, calls, replays))

    def host_ms(self, fn: Runner, calls: int = 200) -> float:
        """Wall-clock time per call of ``calls`` back-to-back launches (the host's cost, when it exceeds the
        device's: what decode without CUDA graphs pays)."""
        fn()
        self._synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        self._synchronize()
        return (time.perf_counter() - t0) * 1e3 / calls


class CudaEventTimer(GpuTimer):
    """The tuner's GPU timer: :class:`GpuTimer` with the host-overhead cushion, choosing per kernel how to time it.

    Called as a :class:`Timer` (``timer(fn, config)``) it times one run: L2 flushed, the cushion, events, a
    synchronize. The search uses it batched instead (``samples``), after :meth:`calibrate` has chosen the mode
    from the baseline config: ``"events"``, one flushed run per sample (:meth:`GpuTimer.run_samples`, the suite's
    measurement), or, when one call takes under ``graph_below_ms`` (``graph="auto"``; ``"always"``, ``"never"``),
    ``"graph"``: each sample is the per-call time of one replay of a CUDA graph of enough back-to-back calls to last
    about ``graph_replay_ms``, with L2 flushed before each replay. For a kernel of a few microseconds, launch gaps and
    event resolution are as large as the differences between its configs; in a graph they vanish. Every config of
    one search is timed in the same mode. A runner that cannot be captured keeps the events mode.
    """

    def __init__(self, device: torch.device | str | int | None = None, flush_l2: bool = True,
                 cushion_cycles: int = 200_000, *, flush_by: str = "write", graph: str = "auto",
                 graph_below_ms: float = 0.03, graph_replay_ms: float = 0.3) -> None:
        if graph not in ("auto", "always", "never"):
            from triton_ops_core.exceptions import InvalidArgumentError

            raise InvalidArgumentError(f"graph: expected 'auto', 'always' or 'never', got {graph!r}")
        super().__init__(device, flush_l2=flush_l2, flush_by=flush_by, cushion_cycles=cushion_cycles)
        self.graph = graph
        self.graph_below_ms = graph_below_ms
        self.graph_replay_ms = graph_replay_ms
        self.mode = "events"
        self.graph_calls = 0
        self._captured: tuple[Any, Any] | None = None  # (token, graph) of the last capture

    def __call__(self, fn: Runner, config: Mapping[str, Any]) -> float:
        with torch.cuda.device(self.device):
            self._flush_l2()
            self._cushion(1)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            self._host_timed(fn)
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))

    def calibrate(self, fn: Runner) -> str:
        """Choose the mode of the coming search from ``fn`` (the baseline config's runner); returns it."""
        self.mode, self.graph_calls, self._captured = "events", 0, None
        if self.graph == "never":
            return self.mode
        fn()  # compile before anything is timed
        self._synchronize()
        per_call = min(self.estimate_ms(fn) for _ in range(2))
        if self.graph == "auto" and per_call >= self.graph_below_ms:
            return self.mode
        calls = min(1000, max(10, math.ceil(round(self.graph_replay_ms / per_call, 6))))
        try:
            self.graph_samples(fn, calls=2, replays=1)  # can this runner be captured at all?
        except Exception:  # noqa: BLE001 - a runner that syncs or allocates host memory: events it is
            try:
                self._synchronize()
            except Exception:  # noqa: BLE001
                pass
            return self.mode
        self.mode, self.graph_calls = "graph", calls
        return self.mode

    def samples(self, fn: Runner, config: Mapping[str, Any], runs: int) -> list[float]:
        """``runs`` samples of ``fn`` (which runs ``config``) in the calibrated mode, in milliseconds per call."""
        if self.mode != "graph":
            return self.run_samples(fn, runs)
        token = (id(fn), repr(sorted(config.items())))
        if self._captured is None or self._captured[0] != token:
            self._captured = None  # free the previous graph's memory before capturing the next
            self._captured = (token, self.capture(fn, self.graph_calls))
        return self.replay_samples(self._captured[1], self.graph_calls, runs, flush=self.flush_l2)

    def release(self) -> None:
        """Drop the last captured graph (and its memory pool)."""
        self._captured = None


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
    (at least 3 runs): a slow config does not cost 100 runs to be found slow. A timer with ``samples`` (the GPU
    timer) times the runs after the first in one batch. Exceptions (compile errors, out of resources) propagate to
    the caller, which records them.
    """
    fn()  # compile (and fail) before anything is timed; counts as the first warm-up run
    for _ in range(max(0, warmup_runs - 1)):
        fn()
    _synchronize(device)
    runs = max(1, benchmark_runs)
    times: list[float] = []
    batched = getattr(timer, "samples", None)
    if batched is not None:  # one run first (for the time budget), then the rest queued at once
        times = [float(t) for t in batched(fn, config, 1)]
        if time_budget_ms is not None and times[0] > 0:
            runs = max(min(3, runs), min(runs, int(time_budget_ms / times[0])))
        if runs > 1:
            times += [float(t) for t in batched(fn, config, runs - 1)]
    else:
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


__all__ = ["CudaEventTimer", "GpuTimer", "Runner", "Timer", "Timing", "WallClockTimer", "default_timer", "measure"]
