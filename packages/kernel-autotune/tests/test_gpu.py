"""On the device: real CUDA-event timing, L2 flush, metrics against the device's peaks, and the lookup cost."""

import json
import subprocess
import sys

import pytest
import torch
import triton
from autotune_env import subprocess_env
from autotune_helpers import scale_kernel
from kernel_autotune import ConfigSpace, CudaEventTimer, TritonAutoTuner, block_fits

pytestmark = pytest.mark.gpu


def test_tunes_a_real_kernel_with_cuda_events(cache_dir):
    n = 1 << 24
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    space = ConfigSpace({"BLOCK_SIZE": [256, 1024, 4096], "num_warps": [2, 4, 8]},
                        constraints=[block_fits("BLOCK_SIZE", "n")])
    default = {"BLOCK_SIZE": 256, "num_warps": 2}
    tuner = TritonAutoTuner(scale_kernel, space, 5, 30, name="gpu_scale", version="1", bucket=("n",), default=default,
                            grid=lambda m: (triton.cdiv(m["n"], m["BLOCK_SIZE"]),))
    result = tuner.tune(x, y, problem_size={"n": n}, device="cuda:0", n=n, alpha=2.0, bytes_moved=2 * x.nbytes)
    torch.testing.assert_close(y, 2 * x)
    assert all(t.ok for t in result.trials)
    default_ms = next(t.latency_ms for t in result.trials if t.config == default)
    assert result.metrics.latency_ms <= default_ms * 1.05
    assert result.metrics.bandwidth_gbps > 100 and result.metrics.bandwidth_pct_of_peak is not None
    print(f"\nbest {result.best_config}: {result.metrics.latency_ms * 1e3:.1f} us, "
          f"{result.metrics.bandwidth_gbps:.0f} GB/s ({result.metrics.bandwidth_pct_of_peak:.0f} % of peak); "
          f"default {default_ms * 1e3:.1f} us")

    script = """
import json, time, torch, triton
torch.zeros(1, device="cuda")  # a process that runs kernels has CUDA and triton loaded already
from kernel_autotune import select_config
kw = dict(version="1", problem={"n": __N__}, dtypes=("float32", "float32"), device="cuda:0", default={"x": 1},
          bucket=("n",))
s = time.perf_counter(); cfg = select_config("gpu_scale", **kw); first = time.perf_counter() - s
s = time.perf_counter()
for _ in range(10000): select_config("gpu_scale", **kw)
print(json.dumps([cfg, first * 1e6, (time.perf_counter() - s) / 10000 * 1e6]))
""".replace("__N__", str(n))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=subprocess_env(cache_dir, TRITON_INTERPRET="0"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg, first_us, hot_us = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"fresh process: first cached lookup {first_us:.0f} us, memoized {hot_us:.2f} us")
    assert cfg == result.best_config and first_us < 1000 and hot_us < 20


def test_cuda_event_timer_sees_the_size_of_the_work():
    timer = CudaEventTimer("cuda:0")
    small = torch.randn(1 << 16, device="cuda")
    big = torch.randn(1 << 26, device="cuda")
    t_small = sorted(timer(lambda: small.mul_(1.0), {}) for _ in range(10))[5]
    t_big = sorted(timer(lambda: big.mul_(1.0), {}) for _ in range(10))[5]
    assert 0 < t_small < t_big
