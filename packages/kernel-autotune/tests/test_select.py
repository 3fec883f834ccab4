import json
import time

import kernel_autotune.select
import pytest
import torch
from autotune_helpers import FakeClock
from kernel_autotune import ConfigSpace, cache, clear_memo, config_source, make_key, select_config
from kernel_autotune.keys import key_string

SPACE = ConfigSpace({"BLOCK_SIZE": [16, 32, 64], "num_warps": [1, 2]},
                    constraints=[lambda c, p: p is None or c["BLOCK_SIZE"] <= max(16, p["hidden"])])
DEFAULT = {"BLOCK_SIZE": 64, "num_warps": 2}
PROBLEM = {"tokens": 5, "hidden": 64}


def call(**over):
    kw = dict(version="1.0", problem=PROBLEM, dtypes=(torch.float32,), device=torch.device("cpu"),
              default=DEFAULT, bucket=("tokens",), space=SPACE)
    kw.update(over)
    return select_config("toy.fwd", **kw)


def write_entry(path, config, problem=PROBLEM, version="1.0", triton=None):
    key = make_key("toy.fwd", version=version, problem=problem, dtypes=(torch.float32,), device="cpu",
                   bucket=("tokens",))
    if triton:
        key["triton"] = triton
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = cache.read_entries(path) if path.exists() else {}
    existing[key_string(key)] = {"key": key, "config": config, "latency_ms": 1.0}
    cache.write_document(path, existing)
    cache.forget_parsed()


def source():
    return config_source("toy.fwd", version="1.0", problem=PROBLEM, dtypes=(torch.float32,),
                         device=torch.device("cpu"), bucket=("tokens",))


def test_default_when_nothing_is_cached_and_callable_defaults_are_lazy(cache_dir):
    calls = []
    cfg = call(default=lambda: calls.append(1) or dict(DEFAULT))
    assert cfg == DEFAULT and calls == [1] and source() == "default"
    call(default=lambda: calls.append(1) or dict(DEFAULT))
    assert calls == [1]  # memoized: the heuristic is not re-run
    assert not cache_dir.exists() or not list(cache_dir.glob("*.json"))  # nothing tuned, nothing written


def test_shipped_beats_default_and_matches_across_versions(cache_dir, tmp_path):
    shipped = tmp_path / "pkg" / "tuned_configs.json"
    write_entry(shipped, {"BLOCK_SIZE": 32, "num_warps": 1}, version="0.9", triton="0.0.1")
    assert call(shipped=shipped) == {"BLOCK_SIZE": 32, "num_warps": 1}
    assert source() == "shipped"


def test_missing_shipped_file_is_fine(tmp_path):
    assert call(shipped=tmp_path / "nope.json") == DEFAULT


def test_cache_beats_shipped(cache_dir, tmp_path):
    shipped = tmp_path / "pkg" / "tuned_configs.json"
    write_entry(shipped, {"BLOCK_SIZE": 32, "num_warps": 1})
    write_entry(cache.cache_file("toy.fwd"), {"BLOCK_SIZE": 16, "num_warps": 2})
    assert call(shipped=shipped) == {"BLOCK_SIZE": 16, "num_warps": 2} and source() == "cache"


def test_memo_beats_disk_until_cleared(cache_dir):
    assert call() == DEFAULT
    write_entry(cache.cache_file("toy.fwd"), {"BLOCK_SIZE": 16, "num_warps": 1})
    assert call() == DEFAULT  # hot path: the disk is not consulted again
    clear_memo()
    assert call() == {"BLOCK_SIZE": 16, "num_warps": 1}


def test_bucketing_shares_entries_between_token_counts(cache_dir):
    write_entry(cache.cache_file("toy.fwd"), {"BLOCK_SIZE": 16, "num_warps": 1}, problem={"tokens": 8, "hidden": 64})
    for tokens in (5, 6, 7, 8):
        assert call(problem={"tokens": tokens, "hidden": 64}) == {"BLOCK_SIZE": 16, "num_warps": 1}
    assert call(problem={"tokens": 9, "hidden": 64}) == DEFAULT  # next bucket (16)
    assert call(problem={"tokens": 8, "hidden": 32}) == DEFAULT  # hidden is exact, not bucketed


def test_a_cached_config_the_space_forbids_is_ignored(cache_dir):
    write_entry(cache.cache_file("toy.fwd"), {"BLOCK_SIZE": 64, "num_warps": 1}, problem={"tokens": 5, "hidden": 16})
    assert call(problem={"tokens": 5, "hidden": 16}) == DEFAULT  # BLOCK_SIZE 64 > hidden 16: pruned now
    write_entry(cache.cache_file("toy.fwd"), {"BLOCK_SIZE": 16}, problem={"tokens": 5, "hidden": 32})
    assert call(problem={"tokens": 5, "hidden": 32}) == DEFAULT  # a parameter missing


def test_returned_configs_are_copies():
    cfg = call()
    cfg["BLOCK_SIZE"] = 1
    assert call()["BLOCK_SIZE"] == 64


def clocked_bench(ran, clock=None):
    """``bench(config)`` for select_config: each run records its BLOCK_SIZE and costs ``clock`` (a fake clock, see
    autotune_helpers.FakeClock) a known time, 32 being the fastest: no wall clock, so no verdict flips under load."""
    cost_ms = {16: 4.0, 32: 1.0, 64: 2.0}

    def bench(cfg):
        def run():
            ran.append(cfg["BLOCK_SIZE"])
            if clock is not None:
                clock.advance(cost_ms[cfg["BLOCK_SIZE"]] + 0.1 * cfg["num_warps"])
        return run
    return bench


def test_no_tuning_without_the_environment_variable(cache_dir):
    ran = []
    assert call(bench=clocked_bench(ran)) == DEFAULT and ran == []


def test_tune_on_first_use_with_kernel_autotune_1(cache_dir, monkeypatch):
    monkeypatch.delenv("TRITON_OPS_AUTOTUNE", raising=False)  # the old variable counts only when the new is unset
    monkeypatch.setenv("KERNEL_AUTOTUNE", "1")
    monkeypatch.setenv("KERNEL_AUTOTUNE_WARMUP_RUNS", "1")
    monkeypatch.setenv("KERNEL_AUTOTUNE_BENCHMARK_RUNS", "3")
    clock = FakeClock()  # what tuning on first use times with: the clock the bench's runs advance
    monkeypatch.setattr(kernel_autotune.select, "default_timer", clock.default_timer)
    ran = []
    cfg = call(bench=clocked_bench(ran, clock))
    assert cfg == {"BLOCK_SIZE": 32, "num_warps": 1} and source() == "tuned"
    assert set(ran) == {16, 32, 64} and clock.runs > 0
    entry = cache.lookup(cache.cache_file("toy.fwd"), make_key("toy.fwd", version="1.0", problem=PROBLEM,
                         dtypes=(torch.float32,), device="cpu", bucket=("tokens",)))
    assert entry["config"] == cfg and entry["default_config"] == DEFAULT
    assert entry["latency_ms"] == pytest.approx(1.1) and entry["default_latency_ms"] == pytest.approx(2.2)
    ran.clear()
    clear_memo()
    assert call(bench=clocked_bench(ran)) == cfg and ran == []  # now served from the cache
    assert source() == "cache"


def test_shipped_entry_wins_over_tune_on_first_use(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KERNEL_AUTOTUNE", "1")
    shipped = tmp_path / "tuned_configs.json"
    write_entry(shipped, {"BLOCK_SIZE": 16, "num_warps": 2})
    ran = []
    assert call(bench=clocked_bench(ran), shipped=shipped) == {"BLOCK_SIZE": 16, "num_warps": 2} and ran == []


def test_hot_path_is_microseconds():
    kw = dict(version="1.0", problem=PROBLEM, dtypes=(torch.float32,), device=torch.device("cpu"),
              default=DEFAULT, bucket=("tokens",), space=SPACE)
    select_config("toy.fwd", **kw)
    n = 5000
    best = float("inf")
    for _ in range(3):
        # this thread's CPU time, not the wall clock: time spent descheduled on a loaded machine (pytest-xdist's
        # other workers) is not the lookup's cost
        start = time.thread_time()
        for _ in range(n):
            select_config("toy.fwd", **kw)
        best = min(best, (time.thread_time() - start) / n)
    assert best < 50e-6, f"{best * 1e6:.1f} us per memoized call"


def test_corrupt_cache_file_falls_back_to_default_with_one_warning(cache_dir):
    cache_dir.mkdir(parents=True)
    cache.cache_file("toy.fwd").write_text("{{{")
    with pytest.warns(cache.CacheFileWarning):
        assert call() == DEFAULT
    json.loads(json.dumps(call()))
