"""The GPU timer's logic (events, L2 flush, cushion, CUDA-graph replay, the per-kernel choice between them) on the CPU,
with torch.cuda's events, graphs and streams replaced by stand-ins that read a fake clock. A fake "kernel" advances
the clock by its cost, plus a launch overhead when launched eagerly (none when replayed from a graph), so the
timings, and the configs they rank, are exact on any machine under any load.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from autotune_helpers import FakeClock
from kernel_autotune import CudaEventTimer, GpuTimer
from kernel_autotune.search import search
from triton_ops_core import device as core_device


class _Graph:
    capturing: _Graph | None = None

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.costs: list[float] = []

    def replay(self) -> None:
        for cost in self.costs:
            self.clock.advance(cost)


class _Event:
    def __init__(self, clock: FakeClock) -> None:
        self.clock, self.t = clock, None

    def record(self, stream=None) -> None:
        self.t = self.clock.now_ms

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: _Event) -> float:
        return other.t - self.t


class _Stream:
    def wait_stream(self, other) -> None:
        pass


@contextlib.contextmanager
def _capture(graph: _Graph):
    _Graph.capturing = graph
    try:
        yield
    finally:
        _Graph.capturing = None


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    if torch.cuda.is_available():
        pytest.skip("a real GPU is present: test_gpu.py times real kernels")
    clock = FakeClock()
    for name, value in {
        "synchronize": lambda *a, **k: None, "Event": lambda enable_timing=False: _Event(clock),
        "Stream": lambda *a, **k: _Stream(), "current_stream": lambda *a, **k: _Stream(),
        "stream": lambda s: contextlib.nullcontext(), "device": lambda d: contextlib.nullcontext(),
        "CUDAGraph": lambda: _Graph(clock), "graph": _capture, "_sleep": lambda cycles: None,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value, raising=False)
    monkeypatch.setattr(core_device, "FLUSH_BYTES", 1 << 12)
    return clock


def kernel(clock: FakeClock, cost_ms: float, overhead_ms: float = 0.0, calls: list | None = None):
    """A runner: ``cost_ms`` of GPU time, plus ``overhead_ms`` (launch gaps) when launched eagerly."""
    def run():
        if calls is not None:
            calls.append(1)
        if _Graph.capturing is not None:
            _Graph.capturing.costs.append(cost_ms)
        else:
            clock.advance(cost_ms + overhead_ms)
    return run


def test_run_samples_flush_before_every_run(clock, monkeypatch):
    timer = GpuTimer("cpu")
    flushes, calls = [], []
    monkeypatch.setattr(timer, "_flush_l2", lambda: flushes.append(clock.now_ms))
    assert timer.run_samples(kernel(clock, 0.5, calls=calls), 4) == [0.5] * 4
    assert len(flushes) == 4 and len(calls) == 4
    assert timer.estimate_ms(kernel(clock, 0.5), calls=3) == pytest.approx(0.5)
    # a graph of 10 calls, replayed 3 times: the per-call time, without the eager launch overhead
    assert timer.graph_samples(kernel(clock, 0.002, overhead_ms=0.005), calls=10, replays=3) == \
        pytest.approx([0.002] * 3)
    assert timer.graph_ms(kernel(clock, 0.004, overhead_ms=1.0)) == pytest.approx(0.004)


def test_calibrate_picks_graph_replay_for_short_kernels_only(clock):
    timer = CudaEventTimer("cpu", graph_below_ms=0.03, graph_replay_ms=0.3)
    assert timer.calibrate(kernel(clock, 0.002, overhead_ms=0.004)) == "graph"
    assert timer.graph_calls == 50  # 0.3 ms of replay / 0.006 ms per eager call
    assert timer.calibrate(kernel(clock, 0.2)) == "events"
    assert CudaEventTimer("cpu", graph="never").calibrate(kernel(clock, 0.002)) == "events"
    assert CudaEventTimer("cpu", graph="always").calibrate(kernel(clock, 0.2)) == "graph"


def test_a_runner_that_cannot_be_captured_is_timed_with_events(clock):
    def sync_inside():
        if _Graph.capturing is not None:
            raise RuntimeError("operation not permitted when stream is capturing")
        clock.advance(0.003)

    timer = CudaEventTimer("cpu")
    assert timer.calibrate(sync_inside) == "events"
    assert timer.samples(sync_inside, {}, 3) == pytest.approx([0.003] * 3)


def test_graph_samples_reuse_one_capture_per_config(clock):
    timer = CudaEventTimer("cpu")
    calls = []
    fn = kernel(clock, 0.002, calls=calls)
    timer.calibrate(fn)
    captured = len(calls)
    assert timer.samples(fn, {"w": 1}, 1) == pytest.approx([0.002])
    after_first = len(calls)
    assert timer.samples(fn, {"w": 1}, 5) == pytest.approx([0.002] * 5)
    assert len(calls) == after_first > captured  # the second batch replays the same graph: no new calls
    timer.samples(fn, {"w": 2}, 1)  # another config (same runner, overridden config): captured anew
    assert len(calls) > after_first
    timer.release()
    assert timer._captured is None


def test_graph_replay_ranks_configs_that_launch_overhead_would_misrank(clock):
    # Config A's kernel is the faster (2 us against 3 us), but it launches with more host-side gaps: timed eagerly it
    # looks 30 % slower. Replayed from a graph, the kernels alone are compared.
    costs = {"A": (0.002, 0.004), "B": (0.003, 0.0)}

    def make_runner(cfg):
        return kernel(clock, *costs[cfg["v"]])

    configs = [{"v": "A"}, {"v": "B"}]
    kw = dict(warmup_runs=1, benchmark_runs=5, default_config={"v": "B"})
    eager = search(configs, make_runner, timer=CudaEventTimer("cpu", graph="never"), **kw)
    replayed = search(configs, make_runner, timer=CudaEventTimer("cpu"), **kw)
    assert eager.best_config == {"v": "B"}
    assert replayed.best_config == {"v": "A"} and replayed.best.median_ms == pytest.approx(0.002)
    assert replayed.default.median_ms == pytest.approx(0.003)


def test_per_run_call_still_times_one_run(clock):
    timer = CudaEventTimer("cpu")
    assert timer(kernel(clock, 0.25), {}) == pytest.approx(0.25)
    assert timer._host_us > 0
