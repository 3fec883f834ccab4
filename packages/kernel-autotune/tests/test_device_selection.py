"""Selection keyed by the device: shipped entries serve only the GPU they were tuned on (product name and compute
capability), a GPU without any is announced once per family, then tuned on first use or served by the heuristic;
never a search inside a CUDA-graph capture or a torch.compile trace; several processes tune one key once.

GPUs are simulated (``triton_ops_core.device.simulate_device``) on the CPU interpreter; tuning runs on a fake clock.
"""

import dataclasses
import json
import subprocess
import sys
import warnings

import kernel_autotune.select as sel
import pytest
import torch
from autotune_env import subprocess_env
from autotune_helpers import FakeClock
from kernel_autotune import (
    ConfigSpace,
    UntunedDeviceWarning,
    cache,
    clear_memo,
    config_source,
    device_identity,
    make_key,
    select_config,
    tuning_mode,
)
from kernel_autotune.keys import key_string
from kernel_autotune.testing import H100_SXM, H200
from triton_ops_core.device import device_info, simulate_device

SPACE = ConfigSpace({"BLOCK_SIZE": [16, 32, 64], "num_warps": [1, 2]})
DEFAULT = {"BLOCK_SIZE": 64, "num_warps": 2}
PROBLEM = {"tokens": 5, "hidden": 64}
COST_MS = {16: 4.0, 32: 1.0, 64: 2.0}  # what one run of each BLOCK_SIZE costs on the fake clock: 32 wins


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.delenv("TRITON_OPS_AUTOTUNE", raising=False)
    monkeypatch.setenv("KERNEL_AUTOTUNE_WARMUP_RUNS", "1")
    monkeypatch.setenv("KERNEL_AUTOTUNE_BENCHMARK_RUNS", "2")
    sel.reset_warnings()
    yield
    sel.reset_warnings()


def bench_on(clock, ran):
    def bench(cfg):
        def run():
            ran.append(cfg["BLOCK_SIZE"])
            clock.advance(COST_MS[cfg["BLOCK_SIZE"]] + 0.1 * cfg["num_warps"])
        return run
    return bench


def call(kernel="toy.fwd", bench=None, shipped=None, problem=PROBLEM):
    return select_config(kernel, version="1.0", problem=problem, dtypes=(torch.float32,), device=torch.device("cpu"),
                         default=DEFAULT, bucket=("tokens",), shipped=shipped, space=SPACE, bench=bench)


def source(kernel="toy.fwd", problem=PROBLEM):
    return config_source(kernel, version="1.0", problem=problem, dtypes=(torch.float32,), device=torch.device("cpu"),
                         bucket=("tokens",))


def shipped_file(path, *devices_and_configs, legacy=False):
    """A shipped tuned_configs.json with one entry per (DeviceInfo, config)."""
    entries = {}
    for info, cfg in devices_and_configs:
        key = make_key("toy.fwd", version="0.9", problem=PROBLEM, dtypes=(torch.float32,), bucket=("tokens",),
                       device_name=info.name, capability=info.capability_str)
        key["triton"] = "0.0.1"  # tuned under another Triton: matched on the relaxed key
        if legacy:
            del key["capability"]
        entries[key_string(key)] = {"key": key, "config": cfg, "latency_ms": 1.0, "tuned_at": "2026-11-22T00:00:00"}
    path.parent.mkdir(parents=True, exist_ok=True)
    cache.write_document(path, entries)
    cache.forget_parsed()
    return path


def untuned_warnings(record):
    return [w for w in record if issubclass(w.category, UntunedDeviceWarning)]


def test_device_identity_is_name_and_capability():
    assert device_identity("cpu") == ("cpu-interpreter", None) == device_info("cpu").identity
    with simulate_device(H200):
        assert device_identity(torch.device("cpu")) == ("NVIDIA H200", "9.0")
        key = make_key("k", version="1", problem={"n": 1}, device="cuda:0")
        assert (key["device"], key["capability"]) == ("NVIDIA H200", "9.0")
    assert device_identity(None) == device_info().identity  # the current GPU, or the interpreter


def test_an_h200_does_not_get_the_h100_table(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_OPS_AUTOTUNE", "0")
    shipped = shipped_file(tmp_path / "tuned_configs.json", (H100_SXM, {"BLOCK_SIZE": 16, "num_warps": 1}))
    with simulate_device(H100_SXM):
        assert call(shipped=shipped) == {"BLOCK_SIZE": 16, "num_warps": 1} and source() == "shipped"
    # same 132 SMs, same capability, another product: the H100's entry is not for it
    with simulate_device(H200), pytest.warns(UntunedDeviceWarning):
        assert call(shipped=shipped) == DEFAULT and source() == "default"


def test_exact_name_and_capability_match_wins(tmp_path):
    other_cc = dataclasses.replace(H200, capability=(10, 0))
    shipped = shipped_file(tmp_path / "a.json", (other_cc, {"BLOCK_SIZE": 64, "num_warps": 1}),
                           (H200, {"BLOCK_SIZE": 32, "num_warps": 2}),
                           (H100_SXM, {"BLOCK_SIZE": 16, "num_warps": 1}))
    with simulate_device(H200):
        assert call(shipped=shipped) == {"BLOCK_SIZE": 32, "num_warps": 2}
    with simulate_device(other_cc):
        assert call(shipped=shipped) == {"BLOCK_SIZE": 64, "num_warps": 1}
    # an entry written before keys named the capability (kernel-autotune 0.1) still serves its product name, but an
    # entry with the exact capability beats it
    legacy = shipped_file(tmp_path / "legacy.json", (H200, {"BLOCK_SIZE": 16, "num_warps": 2}), legacy=True)
    with simulate_device(H200):
        assert call(shipped=legacy) == {"BLOCK_SIZE": 16, "num_warps": 2}
        both = cache.read_entries(legacy) | cache.read_entries(shipped)
        cache.write_document(tmp_path / "both.json", both)
        clear_memo()
        assert call(shipped=tmp_path / "both.json") == {"BLOCK_SIZE": 32, "num_warps": 2}
        assert cache.has_device(legacy, H200.identity) and not cache.has_device(legacy, H100_SXM.identity)


def test_one_warning_per_family_naming_the_device_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_OPS_AUTOTUNE", "0")
    shipped = shipped_file(tmp_path / "tuned_configs.json", (H100_SXM, {"BLOCK_SIZE": 16, "num_warps": 1}))
    with simulate_device(H200), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for tokens in (1, 5, 100, 3000):  # four problems of one kernel
            call(shipped=shipped, problem={"tokens": tokens, "hidden": 64})
        call(kernel="toy.bwd", shipped=shipped)  # another kernel of the same family
        call(kernel="other_family.fwd", shipped=shipped)
    got = untuned_warnings(record)
    assert len(got) == 2, [str(w.message) for w in got]
    text = str(got[0].message)
    assert "toy has no tuned configs for NVIDIA H200 (compute capability 9.0; it ships configs for NVIDIA H100 80GB " \
        "HBM3 (sm_90) only)" in text
    assert "`python -m kernel_autotune tune toy`" in text
    assert "heuristics reading its properties (NVIDIA H200 (sm_90: 132 SMs, 60 MiB L2" in text
    assert "other_family has no tuned configs" in str(got[1].message)


def test_no_warning_on_a_gpu_with_shipped_entries_nor_on_the_cpu(tmp_path):
    shipped = shipped_file(tmp_path / "tuned_configs.json", (H100_SXM, {"BLOCK_SIZE": 16, "num_warps": 1}))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with simulate_device(H100_SXM):
            call(shipped=shipped, problem={"tokens": 3000, "hidden": 64})  # not shipped: heuristic, silently
        ran = []
        assert call(shipped=shipped, bench=bench_on(FakeClock(), ran)) == DEFAULT and ran == []  # the interpreter
    assert untuned_warnings(record) == []
    assert tuning_mode() == "auto"


def test_auto_tunes_on_first_use_on_an_untuned_gpu_and_caches_it(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(sel, "default_timer", clock.default_timer)
    shipped = shipped_file(tmp_path / "tuned_configs.json", (H100_SXM, {"BLOCK_SIZE": 16, "num_warps": 1}))
    ran = []
    with simulate_device(H200), pytest.warns(UntunedDeviceWarning, match="tuned on first use"):
        assert call(shipped=shipped, bench=bench_on(clock, ran)) == {"BLOCK_SIZE": 32, "num_warps": 1}
        assert source() == "tuned" and {16, 32, 64} <= set(ran)
        key = make_key("toy.fwd", version="1.0", problem=PROBLEM, dtypes=(torch.float32,), bucket=("tokens",))
        entry = cache.lookup(cache.cache_file("toy.fwd"), key)
        assert entry["config"] == {"BLOCK_SIZE": 32, "num_warps": 1} and entry["key"]["device"] == "NVIDIA H200"
        assert entry["key"]["capability"] == "9.0" and entry["default_config"] == DEFAULT
        ran.clear()
        clear_memo()
        assert call(shipped=shipped, bench=bench_on(clock, ran)) == {"BLOCK_SIZE": 32, "num_warps": 1}
        assert ran == [] and source() == "cache"  # once per machine
    with simulate_device(H100_SXM):  # a GPU with shipped entries: a missing problem takes the heuristic
        assert call(shipped=shipped, bench=bench_on(clock, ran), problem={"tokens": 900, "hidden": 64}) == DEFAULT
        assert ran == []


@pytest.mark.parametrize("env", [{"TRITON_OPS_AUTOTUNE": "0"}, {"KERNEL_AUTOTUNE": "0"},
                                 {"TRITON_OPS_AUTOTUNE": "off", "KERNEL_AUTOTUNE": "1"}])
def test_the_environment_turns_first_use_tuning_off(tmp_path, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tuning_mode() == "off"
    shipped = shipped_file(tmp_path / "tuned_configs.json", (H100_SXM, {"BLOCK_SIZE": 16, "num_warps": 1}))
    ran = []
    with simulate_device(H200), pytest.warns(UntunedDeviceWarning, match="heuristics"):
        assert call(shipped=shipped, bench=bench_on(FakeClock(), ran)) == DEFAULT
        assert ran == [] and source() == "default"
    assert not cache.cache_file("toy.fwd").exists()


@pytest.mark.parametrize("inside", ["compile", "capture"])
def test_never_tunes_while_compiling_or_capturing(monkeypatch, inside):
    monkeypatch.setenv("TRITON_OPS_AUTOTUNE", "1")
    monkeypatch.setattr(sel, "_compiling" if inside == "compile" else "_capturing", lambda *a: True)
    assert not sel.may_tune_now(torch.device("cpu"))
    ran = []
    with simulate_device(H200):
        assert call(bench=bench_on(FakeClock(), ran)) == DEFAULT
        assert ran == [] and source() == "default"
    # outside: the same call tunes (the heuristic answer above was not cached on disk)
    monkeypatch.setattr(sel, "_compiling", lambda: False)
    monkeypatch.setattr(sel, "_capturing", lambda *a: False)
    clock = FakeClock()
    monkeypatch.setattr(sel, "default_timer", clock.default_timer)
    clear_memo()
    with simulate_device(H200):
        assert call(bench=bench_on(clock, ran)) == {"BLOCK_SIZE": 32, "num_warps": 1} and source() == "tuned"


_CONCURRENT = r"""
import json, os, sys, time
from pathlib import Path
import torch
from kernel_autotune import ConfigSpace, config_source, select_config
ready = Path(sys.argv[1])
(ready / f"ready-{sys.argv[2]}").touch()
deadline = time.monotonic() + 120
while len(list(ready.glob("ready-*"))) < 3 and time.monotonic() < deadline:  # start together
    time.sleep(0.01)
space = ConfigSpace({"BLOCK_SIZE": [16, 32, 64]})
def bench(cfg):
    return lambda: time.sleep(0.02)  # long enough that the processes overlap; which config wins does not matter
kw = dict(version="1", problem={"n": 100}, dtypes=(torch.float32,), device=torch.device("cpu"),
          default={"BLOCK_SIZE": 64}, bucket=("n",))
cfg = select_config("race.fwd", space=space, bench=bench, **kw)
print(json.dumps([config_source("race.fwd", **{k: v for k, v in kw.items() if k != "default"}), cfg]))
"""


def test_concurrent_processes_tune_a_key_once(cache_dir, tmp_path):
    env = subprocess_env(cache_dir, TRITON_OPS_AUTOTUNE="1", KERNEL_AUTOTUNE_WARMUP_RUNS="1",
                         KERNEL_AUTOTUNE_BENCHMARK_RUNS="2")
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(tmp_path), str(i)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sorted(r[0] for r in results) == ["cache", "cache", "tuned"], results
    assert len({json.dumps(r[1]) for r in results}) == 1  # all three use the one tuned config
    (entry,) = cache.read_entries(cache.cache_file("race.fwd", cache_dir)).values()
    assert entry["source"] == "select_config" and entry["config"] == results[0][1]
