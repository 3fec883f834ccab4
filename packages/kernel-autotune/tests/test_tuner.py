import json
import subprocess
import sys

import pytest
import torch
import triton
from autotune_env import subprocess_env
from autotune_helpers import FAKE_MS, SCALE_SPACE, fake_timer, scale_grid, scale_kernel, scale_launch
from kernel_autotune import ConfigSpace, TritonAutoTuner, TuningError, cache
from triton_ops_core.device import is_interpreter
from triton_ops_core.exceptions import InvalidArgumentError, UnsupportedDeviceError
from triton_ops_core.models import TuningResult

# These tests drive a real kernel on CPU tensors with injected or wall-clock timers: the interpreter's world.
# test_gpu.py covers the same tuner with CUDA events on a GPU.
pytestmark = pytest.mark.skipif(not is_interpreter(), reason="CPU-interpreter test (GPU variant: test_gpu.py)")


def make_tuner(**over):
    kw = dict(name="scale", version="1", grid=scale_grid, timer=fake_timer)
    kw.update(over)
    return TritonAutoTuner(scale_kernel, SCALE_SPACE, 1, 2, **kw)


def test_picks_the_config_with_the_lowest_measured_time_and_runs_the_kernel(cache_dir):
    x = torch.randn(100)
    y = torch.full_like(x, float("nan"))
    result = make_tuner().tune(x, y, problem_size={"n": 100}, device="cpu", bytes_moved=800, flops=100, n=100,
                               alpha=2.0)
    assert isinstance(result, TuningResult)
    assert result.best_config == {"BLOCK_SIZE": 32, "num_warps": 1}
    assert len(result.trials) == 6 and all(t.ok for t in result.trials)
    assert result.metrics.latency_ms == pytest.approx(1.1)
    assert result.metrics.bandwidth_gbps == pytest.approx(800 / 1.1e-3 / 1e9)
    assert result.metrics.tflops == pytest.approx(100 / 1.1e-3 / 1e12)
    assert result.key["problem"] == {"n": 100} and result.key["dtypes"] == ["float32", "float32"]
    torch.testing.assert_close(y, 2 * x)  # every config really launched the kernel


def test_persists_and_a_fresh_process_gets_it_back_without_timing(cache_dir):
    x, y = torch.randn(100), torch.empty(100)
    first = make_tuner().tune(x, y, problem_size={"n": 100}, device="cpu", n=100, alpha=2.0)
    script = """
import json, torch
from autotune_helpers import SCALE_SPACE, scale_grid, scale_kernel
from kernel_autotune import TritonAutoTuner


def no_timing(fn, config):
    raise AssertionError("timed a config although the result is cached")

def no_launch(*a, **k):
    raise AssertionError("launched although the result is cached")

t = TritonAutoTuner(no_launch, SCALE_SPACE, name="scale", version="1", timer=no_timing)
x = torch.empty(100)
cached = t.get_cached_config(x, x, problem_size={"n": 100}, device="cpu")
again = t.tune(x, x, problem_size={"n": 100}, device="cpu")
print(json.dumps([cached.best_config, again.best_config, len(cached.trials)]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=subprocess_env(cache_dir), timeout=120)
    assert proc.returncode == 0, proc.stderr
    cached, again, n_trials = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cached == again == first.best_config and n_trials == 6


def test_get_cached_config_is_none_when_nothing_was_tuned():
    x = torch.randn(8)
    assert make_tuner().get_cached_config(x, x, problem_size={"n": 8}, device="cpu") is None


def test_failing_configs_are_recorded_and_skipped(cache_dir):
    # BLOCK_SIZE 24 is not a power of two: tl.arange refuses it, a compile-time error.
    space = ConfigSpace({"BLOCK_SIZE": [24, 32, 64], "num_warps": [1]})
    x, y = torch.randn(64), torch.empty(64)
    tuner = TritonAutoTuner(scale_kernel, space, 0, 2, name="scale_bad", grid=scale_grid,
                            timer=lambda fn, cfg: (fn(), {32: 2.0, 64: 1.0}[cfg["BLOCK_SIZE"]])[1])
    result = tuner.tune(x, y, problem_size=(64,), device="cpu", n=64, alpha=1.0)
    assert result.best_config == {"BLOCK_SIZE": 64, "num_warps": 1}
    failed = [t for t in result.trials if not t.ok]
    assert [t.config["BLOCK_SIZE"] for t in failed] == [24] and failed[0].error


def test_all_configs_failing_raises_tuning_error(cache_dir):
    def broken(*args, BLOCK_SIZE, num_warps):
        raise RuntimeError("out of resource: shared memory")

    tuner = TritonAutoTuner(broken, SCALE_SPACE, 0, 1, timer=fake_timer)
    with pytest.raises(TuningError, match="out of resource"):
        tuner.tune(problem_size={"n": 4}, device="cpu")
    assert not cache.cache_files()


def test_plain_callables_and_the_default_config(cache_dir):
    x, y = torch.randn(50), torch.empty(50)
    default = {"BLOCK_SIZE": 128, "num_warps": 4}   # outside the space: still timed, as the baseline
    timer = lambda fn, cfg: (fn(), 0.5 if cfg["BLOCK_SIZE"] == 128 else FAKE_MS[cfg["BLOCK_SIZE"]])[1]  # noqa: E731
    tuner = TritonAutoTuner(scale_launch, SCALE_SPACE, 1, 2, name="scale_py", timer=timer, default=default)
    result = tuner.tune(x, y, 3.0, problem_size={"n": 50}, device="cpu")
    assert result.best_config == default and len(result.trials) == 7
    torch.testing.assert_close(y, 3 * x)


def test_force_retunes_and_bucketing_shares_results(cache_dir):
    x, y = torch.randn(100), torch.empty(100)
    tuner = make_tuner(bucket=("n",))
    tuner.tune(x, y, problem_size={"n": 100}, device="cpu", n=100, alpha=1.0)
    hit = tuner.get_cached_config(x, y, problem_size={"n": 120}, device="cpu")  # same bucket: 128
    assert hit is not None and hit.key["problem"] == {"n": 128}
    calls = []
    tuner.timer = lambda fn, cfg: (calls.append(1), fake_timer(fn, cfg))[1]
    tuner.tune(x, y, problem_size={"n": 100}, device="cpu", n=100, alpha=1.0)
    assert calls == []
    tuner.tune(x, y, problem_size={"n": 100}, device="cpu", force=True, n=100, alpha=1.0)
    assert len(calls) >= 6


def test_wall_clock_timing_under_the_interpreter(cache_dir):
    x, y = torch.randn(64), torch.empty(64)
    tuner = TritonAutoTuner(scale_kernel, ConfigSpace({"BLOCK_SIZE": [32, 64]}), 1, 2, name="scale_wall",
                            grid=lambda m: (triton.cdiv(64, m["BLOCK_SIZE"]),))
    result = tuner.tune(x, y, problem_size={"n": 64}, device="cpu", n=64, alpha=1.0)
    assert result.metrics.latency_ms > 0 and all(t.latency_ms > 0 for t in result.trials)


def test_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="grid"):
        TritonAutoTuner(scale_kernel, SCALE_SPACE)
    with pytest.raises(InvalidArgumentError, match="config_space"):
        TritonAutoTuner(scale_launch, {"BLOCK_SIZE": [16]})
    with pytest.raises(InvalidArgumentError, match="problem_size"):
        make_tuner().tune(problem_size="big", device="cpu")


def test_coordinate_search_tries_fewer_configs_and_finds_the_separable_optimum(cache_dir):
    space = ConfigSpace({"A": [1, 2, 3, 4], "B": [1, 2, 3, 4], "C": [1, 2]})
    cost = lambda c: abs(c["A"] - 3) + abs(c["B"] - 2) + (c["C"] - 1) + 1.0  # noqa: E731 - separable, min at (3,2,1)
    tuner = TritonAutoTuner(lambda **cfg: None, space, 0, 1, name="coord", timer=lambda fn, cfg: cost(cfg),
                            strategy="coordinate", default={"A": 1, "B": 4, "C": 2})
    result = tuner.tune(problem_size={"n": 1}, device="cpu")
    assert result.best_config == {"A": 3, "B": 2, "C": 1}
    assert len(result.trials) < space.size() / 2
    assert result.trials[0].config == {"A": 1, "B": 4, "C": 2}  # the default is tried first


def test_max_seconds_stops_the_search_but_keeps_the_best_so_far(cache_dir):
    import time as _time

    space = ConfigSpace({"A": list(range(20))})

    def slow_timer(fn, cfg):
        _time.sleep(0.02)
        return 10.0 - cfg["A"] * 0.1

    tuner = TritonAutoTuner(lambda **cfg: None, space, 0, 1, name="deadline", timer=slow_timer, max_seconds=0.05)
    result = tuner.tune(problem_size={"n": 1}, device="cpu")
    assert 1 <= len(result.trials) < 20
    assert result.best_config == max((t.config for t in result.trials), key=lambda c: c["A"])


def test_coordinate_search_starts_on_the_grid_when_the_default_is_off_it(cache_dir):
    space = ConfigSpace({"A": [16, 32, 64], "B": [2, 4, 8]})
    cost = lambda c: abs(c["A"] - 64) / 16 + abs(c["B"] - 2) + 1.0  # noqa: E731 - min at (64, 2)
    tuner = TritonAutoTuner(lambda **cfg: None, space, 0, 1, name="coord_off", timer=lambda fn, cfg: cost(cfg),
                            strategy="coordinate", default={"A": 24, "B": 6})   # values the grid does not list
    result = tuner.tune(problem_size={"n": 1}, device="cpu")
    assert result.best_config == {"A": 64, "B": 2}
    assert result.trials[0].config == {"A": 24, "B": 6}
    assert result.trials[1].config in ({"A": 16, "B": 4}, {"A": 32, "B": 4}, {"A": 16, "B": 8}, {"A": 32, "B": 8})


def test_tuning_on_a_device_that_cannot_run_kernels_says_why(monkeypatch):
    # the CPU without the interpreter: Triton itself would say "0 active drivers"
    monkeypatch.delenv("TRITON_INTERPRET")
    x = torch.randn(16)
    with pytest.raises(UnsupportedDeviceError, match=r"^device: cannot run a Triton kernel on cpu: .*INTERPRET=1"):
        make_tuner().tune(x, torch.empty_like(x), problem_size={"n": 16}, device="cpu", n=16, alpha=1.0)
