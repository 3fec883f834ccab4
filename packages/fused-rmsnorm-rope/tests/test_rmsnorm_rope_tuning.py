"""This package's kernel-autotune family (found by name, its shapes, a prepared call of each operation that runs the
kernel), and config selection keyed by the device: the shipped H100 entries serve the H100 only, the heuristics read
the device's SM count, the norm kernels take their configs from kernel-autotune too (GPUs simulated on the CPU)."""

from __future__ import annotations

import dataclasses

import kernel_autotune
import kernel_autotune.select as sel
import pytest
import torch
from fused_rmsnorm_rope import config, heuristic_config
from kernel_autotune import UntunedDeviceWarning
from kernel_autotune.testing import H100_SXM, SMALL_GPU, UNTUNED_HOPPER, check_family
from triton_ops_core.device import simulate_device
from triton_ops_core.exceptions import InvalidArgumentError

CPU = torch.device("cpu")
SMALL = {"batch": 1, "seq": 3, "hidden": 32, "head_dim": 16, "dtype": "float32"}


class FakeClock:
    """kernel-autotune's test clock (its tests' ``autotune_helpers.FakeClock``): moves only when a run advances it."""

    def __init__(self) -> None:
        self.now_ms = 0.0

    def advance(self, ms: float) -> None:
        self.now_ms += ms

    def timer(self, fn, config):
        start = self.now_ms
        fn()
        return self.now_ms - start

    def default_timer(self, device=None, flush_l2=True):
        return self.timer


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("KERNEL_AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TRITON_OPS_AUTOTUNE", raising=False)
    monkeypatch.delenv("KERNEL_AUTOTUNE", raising=False)
    sel.reset_warnings()
    kernel_autotune.clear_memo()
    config.clear_config_cache()
    yield
    sel.reset_warnings()
    kernel_autotune.clear_memo()
    config.clear_config_cache()


def test_the_family_is_found_and_runs(device):
    tunable = check_family("fused_rmsnorm_rope", "fused-rmsnorm-rope", SMALL, device)
    ops = {s.get("op", "rmsnorm_rope") for s in tunable.shapes}
    assert ops == {"rmsnorm_rope", "qk_norm_rope", "rmsnorm", "add_rmsnorm"}
    small = [
        {**SMALL, "seq": 1, "decode": 1},
        {"op": "qk_norm_rope", "batch": 1, "seq": 3, "q_heads": 4, "kv_heads": 2, "head_dim": 16, "packed": 1,
         "dtype": "float32"},
        {"op": "qk_norm_rope", "batch": 2, "seq": 1, "q_heads": 2, "kv_heads": 1, "head_dim": 16, "decode": 1,
         "dtype": "float32"},
        {"op": "rmsnorm", "tokens": 3, "hidden": 40, "dtype": "float32"},
        {"op": "add_rmsnorm", "tokens": 3, "hidden": 40, "dtype": "float32"},
    ]
    for shape in small:
        out = tunable.prepare(shape, device)()
        for t in out if isinstance(out, tuple) else (out,):
            assert torch.isfinite(t.float()).all(), shape
        assert tunable.label(shape)
    with pytest.raises(InvalidArgumentError, match="shape op"):
        tunable.prepare({**SMALL, "op": "layernorm"}, device)


def test_the_heuristic_scales_its_token_threshold_with_the_sm_count():
    # 8 warps while few programs per SM (<= 4096 rows on the H100's 132 SMs), else 4
    assert heuristic_config(4096, 2048) == heuristic_config(4096, 2048, device=CPU) == {"num_warps": 8,
                                                                                        "ROWS_PER_PROG": 1}
    big = dataclasses.replace(UNTUNED_HOPPER, name="Simulated 264-SM GPU", sm_count=264)
    with simulate_device(UNTUNED_HOPPER):
        assert heuristic_config(4096, 8192, device=CPU)["num_warps"] == 4
    with simulate_device(big):
        assert heuristic_config(4096, 8192, device=CPU)["num_warps"] == 8
    with simulate_device(SMALL_GPU):
        assert heuristic_config(4096, 2048, device=CPU)["num_warps"] == 4


def test_shipped_h100_entries_serve_the_h100_only(monkeypatch):
    monkeypatch.setenv("TRITON_OPS_AUTOTUNE", "0")
    args = (config.FWD_KERNEL, 4096, 8192, torch.bfloat16, CPU)
    with simulate_device(H100_SXM):
        assert config.get_config(*args) == {"num_warps": 4, "ROWS_PER_PROG": 1}
        assert kernel_autotune.config_source(config.FWD_KERNEL, version=config.__version__,
                                             problem={"tokens": 8192, "row_elems": 4096}, dtypes=(torch.bfloat16,),
                                             device=CPU, bucket=("tokens",)) == "shipped"
    config.clear_config_cache()
    warns = pytest.warns(UntunedDeviceWarning, match="fused_rmsnorm_rope has no tuned configs")
    with simulate_device(UNTUNED_HOPPER), warns:
        assert config.get_config(*args) == heuristic_config(4096, 8192, device=CPU)
        assert kernel_autotune.config_source(config.FWD_KERNEL, version=config.__version__,
                                             problem={"tokens": 8192, "row_elems": 4096}, dtypes=(torch.bfloat16,),
                                             device=CPU, bucket=("tokens",)) == "default"


def test_norm_kernels_take_tuned_configs_on_first_use(monkeypatch):
    # rmsnorm's num_warps through kernel-autotune: on an untuned GPU, tuned on first use (a fake clock: 8 warps cost
    # least), cached, and served from the cache afterwards
    clock = FakeClock()
    monkeypatch.setattr(sel, "default_timer", clock.default_timer)
    monkeypatch.setenv("KERNEL_AUTOTUNE_WARMUP_RUNS", "1")
    monkeypatch.setenv("KERNEL_AUTOTUNE_BENCHMARK_RUNS", "2")
    cost = {1: 9.0, 2: 5.0, 4: 3.0, 8: 1.0, 16: 2.0}
    ran = []

    def bench(cfg):
        def run():
            ran.append(cfg["num_warps"])
            clock.advance(cost[cfg["num_warps"]])
        return run

    assert config.get_norm_config(4096, 4096, 64, torch.bfloat16, CPU) == config.norm_heuristic(4096, 2)
    config.clear_config_cache()
    with simulate_device(UNTUNED_HOPPER), pytest.warns(UntunedDeviceWarning, match="tuned on first use"):
        assert config.get_norm_config(4096, 4096, 64, torch.bfloat16, CPU, bench=bench) == {"num_warps": 8}
        assert set(ran) >= {4, 8, 16}
        ran.clear()
        config.clear_config_cache()
        kernel_autotune.clear_memo()
        assert config.get_norm_config(4096, 4096, 64, torch.bfloat16, CPU, bench=bench) == {"num_warps": 8}
        assert ran == []
        # the residual variant is its own kernel (two rows read, two written)
        monkeypatch.setenv("TRITON_OPS_AUTOTUNE", "0")
        assert config.get_norm_config(4096, 4096, 64, torch.bfloat16, CPU, residual=True) == \
            config.norm_heuristic(4096, 2)
    assert config.NORM_CONFIGS.configs({"block": 128, "tokens": 1, "hidden": 100}) == [{"num_warps": 1},
                                                                                       {"num_warps": 2}]


@pytest.mark.gpu
def test_the_shipped_configs_of_this_gpu_are_the_ones_used(tmp_path, monkeypatch):
    # every benchmark shape once, with an empty cache and no tuning: each kernel call whose problem has a shipped
    # entry for this GPU (name and compute capability) must have been served exactly that entry
    from kernel_autotune.testing import check_shipped_served
    from triton_ops_core.device import device_info

    monkeypatch.setenv("KERNEL_AUTOTUNE_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TRITON_OPS_AUTOTUNE", "0")
    served, shipped = check_shipped_served("fused_rmsnorm_rope", torch.device("cuda"))
    print(f"\nfused_rmsnorm_rope on {device_info().describe()}: {served} calls served from {shipped} shipped entries")
    if shipped == 0:
        pytest.skip(f"no shipped fused_rmsnorm_rope entries for {device_info().name} yet "
                    "(python -m kernel_autotune tune --all --write-shipped writes them)")
    assert served > 0
