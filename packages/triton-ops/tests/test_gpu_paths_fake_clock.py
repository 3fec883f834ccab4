"""The suite's GPU-only code (CUDA-event timer, L2 flush, copy ceilings, CUDA graphs, peak memory, cuBLAS
baselines, % metrics) driven on the CPU with torch.cuda's clock and graph calls replaced by host stand-ins.

Kernels still run under the interpreter; only timing is faked. This keeps the paths that normally run only on
the lent GPU covered by CI, so the one device run of the suite does not discover a typo.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from triton_ops.benchmark import BenchmarkSuite, _cases
from triton_ops.benchmark import _references as ref
from triton_ops.benchmark import _timing as timing
from triton_ops_core import device as core_device


class _Event:
    def __init__(self, enable_timing: bool = False) -> None:
        self.t = 0.0

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, other: _Event) -> float:
        return (other.t - self.t) * 1e3


class _Stream:
    def wait_stream(self, other) -> None:
        pass


class _Graph:
    def replay(self) -> None:
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a real GPU is present: the real paths run instead")
    # The suite's eager baselines import transformers' modules on first use; transformers cannot be imported once
    # torch.cuda is faked below, so import them first (whatever ran before this test).
    for name in ("llama", "qwen3"):
        ref._transformers_module(name)
    for name, value in {
        "synchronize": lambda *a, **k: None, "Event": _Event, "Stream": lambda *a, **k: _Stream(),
        "current_stream": lambda *a, **k: _Stream(), "stream": lambda s: contextlib.nullcontext(),
        "CUDAGraph": _Graph, "graph": lambda g: contextlib.nullcontext(), "empty_cache": lambda: None,
        "reset_peak_memory_stats": lambda *a: None, "memory_allocated": lambda *a: 1 << 20,
        "max_memory_allocated": lambda *a: 3 << 20,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(core_device, "FLUSH_BYTES", 1 << 16)
    monkeypatch.setattr(_cases, "_device", lambda suite: torch.device("cpu"))


@pytest.fixture
def gpu_suite(fake_cuda, monkeypatch) -> BenchmarkSuite:
    # Interpreted kernels cost milliseconds per call: a few calls per measurement are enough to cover the code.
    graph_ms, host_ms = timing.CudaTimer.graph_ms, timing.CudaTimer.host_ms
    monkeypatch.setattr(timing.CudaTimer, "graph_ms", lambda self, fn: graph_ms(self, fn, calls=2, replays=2))
    monkeypatch.setattr(timing.CudaTimer, "host_ms", lambda self, fn: host_ms(self, fn, calls=2))
    suite = BenchmarkSuite(progress=False, verbose=False, measure=False, compile_baselines=False, liger=False)
    suite.on_gpu = suite.measure = suite.cuda_graphs = True
    suite._gpu_timer = timing.CudaTimer(1, 2, max_ms=1.0, min_runs=1, device="cpu")
    suite._copy = timing.CopyBandwidth(suite._gpu_timer, peak_bytes=1 << 16)
    suite._timer = suite._gpu_timer
    suite._clean_timer = timing.CudaTimer(1, 2, max_ms=1.0, min_runs=1, device="cpu", flush_by="read")
    suite.environment = {"device": "NVIDIA H100 80GB HBM3", "timed": True}
    suite.peak_copy_gbps = suite._copy.peak()
    return suite


def test_cuda_timer_counts_runs_and_flushes(fake_cuda, monkeypatch) -> None:
    timer = timing.CudaTimer(3, 7, max_ms=1e9, min_runs=2, device="cpu", max_attempts=1)
    calls, flushes = [], []
    monkeypatch.setattr(timer, "_flush_l2", lambda: flushes.append(1))
    t = timer(lambda: calls.append(1))
    assert t.runs == 7 and len(calls) == 3 + 3 + 7  # warm-up, estimate, timed runs
    assert len(flushes) == 1 + 7  # once before the estimate, then before every timed run
    assert timer.graph_ms(lambda: calls.append(1)) >= 0 and timer.host_ms(lambda: None, calls=5) >= 0


def test_unstable_measurements_are_repeated(fake_cuda, monkeypatch) -> None:
    def timing_of(median, iqr):
        return timing.Timing(median, median - iqr / 2, median + iqr / 2, iqr, median - iqr, 10)

    timer = timing.CudaTimer(1, 2, device="cpu", max_attempts=3)
    warm = []
    queue = [timing_of(1.0, 0.6), timing_of(0.9, 0.05), timing_of(5.0, 0.0)]
    monkeypatch.setattr(timer, "_measure", lambda fn, warmup=True: (warm.append(warmup), queue.pop(0))[1])
    t = timer(lambda: None)
    assert (t.median_ms, t.attempts, warm) == (0.9, 2, [True, False])  # stable on the 2nd: no 3rd measurement
    queue[:] = [timing_of(1.0, 0.6), timing_of(2.0, 0.7), timing_of(1.5, 0.9)]
    t = timer(lambda: None)
    assert (t.median_ms, t.attempts) == (2.0, 3) and t.unstable  # never stable: the steadiest (IQR / median)


def test_read_flush_leaves_the_buffer_alone(fake_cuda) -> None:
    timer = timing.CudaTimer(1, 2, min_runs=1, device="cpu", flush_by="read")
    timer._flush._buffer.fill_(1.0)
    timer._flush_l2()
    assert timer._flush._sink.item() == timer._flush._buffer.numel()  # it read every element and wrote none
    with pytest.raises(ValueError, match="expected 'write' or 'read'"):
        timing.CudaTimer(device="cpu", flush_by="clean")


def test_copy_bandwidth_is_cached_per_size(fake_cuda) -> None:
    copy = timing.CopyBandwidth(timing.CudaTimer(1, 3, min_runs=3, device="cpu"), peak_bytes=1 << 16)
    assert copy.same_bytes(1 << 12) == copy.same_bytes(1 << 12) > 0
    assert copy.peak() > 0 and len(copy._cache) == 2


def test_gpu_only_paths_fill_every_metric(gpu_suite) -> None:
    (rms,) = gpu_suite.benchmark_rmsnorm_rope_decode(num_tokens=(2,), hidden_dims=(128,), head_dim=64,
                                                     max_position=16)
    ours = rms.impl("triton-ops")
    assert ours.status == "ok" and ours.timing is not None and ours.graph_ms is not None and ours.host_ms is not None
    assert rms.copy_same_gbps > 0 and ours.pct_copy_same is not None and ours.pct_peak is not None
    assert rms.impl("torch.compile").status == "n/a" and rms.impl("liger").status == "n/a"

    gated = gpu_suite.benchmark_gated_mlp(batch_sizes=(100,), hidden_dims=(), intermediate_dims=(),
                                          shapes=[(64, 48)], dtypes=(torch.bfloat16,))[0]
    ours = gated.impl("triton-ops")
    assert gated.impl("cuBLAS cat-GEMM").status == "ok"
    assert ours.tflops > 0 and ours.pct_cublas > 0 and ours.pct_datasheet > 0
    assert ours.peak_mem_bytes == 2 << 20
    assert ours.clean_ms is None, "compute-bound panels are timed once"

    decode = gpu_suite.benchmark_gated_mlp(batch_sizes=(2,), hidden_dims=(), intermediate_dims=(),
                                           shapes=[(64, 48)], dtypes=(torch.bfloat16,))[0]
    ours, ceiling = decode.impl("triton-ops"), decode.impl("weights read")
    assert ceiling.role == "ceiling" and ceiling.status == "ok" and "weights read" not in decode.speedups(ours)
    assert ours.clean_ms > 0 and ours.clean_pct_peak > 0 and ceiling.clean_ms > 0

    fp8 = gpu_suite.benchmark_fp8_gemm(sizes=[(32, 32, 64)], granularities=("row",), decode_m=(), decode_nk=())[0]
    names = {r.name: r for r in fp8.impls}
    assert set(names) == {"triton-ops", "triton-ops fast-accum", "cuBLAS _scaled_mm", "cuBLAS _scaled_mm fast-accum",
                          "bf16 matmul"}
    for r in fp8.impls:
        assert r.status in ("ok", "n/a"), (r.name, r.status, r.message)  # _scaled_mm on CPU depends on torch
    if names["cuBLAS _scaled_mm"].status == "ok":
        assert names["triton-ops"].pct_cublas is not None
        assert set(fp8.speedups(names["triton-ops fast-accum"])) == {"cuBLAS _scaled_mm fast-accum", "bf16 matmul"}
    md = gpu_suite.generate_report()
    assert "CUDA graph" in md and "% of datasheet peak" in md and "peak mem (eager)" in md
    assert "clean L2: time (% of peak copy)" in md and "L2 zero-filled / clean L2" in md
