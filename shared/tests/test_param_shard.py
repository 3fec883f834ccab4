"""The shared pytest plugin's ``--param-shard K/N``: every test function runs in every shard, every parametrized case
in at least one, the choice the same in every process; bad specs are usage errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from triton_ops_core.pytest_plugin import param_case_in_shard, parse_param_shard

SAMPLE_TESTS = textwrap.dedent("""
    import pytest

    @pytest.mark.parametrize("n", range(12))
    def test_numbers(n):
        pass

    @pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
    @pytest.mark.parametrize("layout", ["row", "column"])
    def test_grid(dtype, layout):
        pass

    class TestGroup:
        @pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
        def test_in_class(self, k):
            pass

    @pytest.mark.every_param
    @pytest.mark.parametrize("m", range(6))
    def test_whole(m):
        pass

    def test_plain():
        pass
""")


def _collected(tmp_path: Path, *args: str) -> set[str]:
    """The test ids a pytest with the shared plugin collects from SAMPLE_TESTS (a separate process: the option is
    read at configuration)."""
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_OPS_PARAM_SHARD"}
    env["TRITON_INTERPRET"] = "1"  # the plugin then never asks torch about a GPU
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "triton_ops_core.pytest_plugin", "-p", "no:cacheprovider",
         "--collect-only", "-q", "-o", "addopts=", "test_sample.py", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return {line.split("::", 1)[1] for line in run.stdout.splitlines() if line.startswith("test_sample.py::")}


def test_the_shards_cover_every_case_and_every_function(tmp_path):
    everything = _collected(tmp_path)
    assert len(everything) == 12 + 6 + 5 + 6 + 1
    halves = [_collected(tmp_path, "--param-shard", f"{k}/2") for k in range(2)]
    assert halves[0] | halves[1] == everything
    # each half is a real cut: about half of the sharded cases, never all of them
    for half in halves:
        assert len(everything) / 3 < len(half) < len(everything)
    for half in halves:
        assert {"test_numbers[0]", "test_grid[row-float16]", "TestGroup::test_in_class[1]", "test_plain"} <= half
        assert {f"test_whole[{m}]" for m in range(6)} <= half  # every_param: whole in each shard
    # outside each function's first case and the every_param tests, the halves do not overlap
    shared = halves[0] & halves[1]
    assert shared == {"test_numbers[0]", "test_grid[row-float16]", "TestGroup::test_in_class[1]", "test_plain",
                      *(f"test_whole[{m}]" for m in range(6))}


def test_the_environment_variable_is_the_default(tmp_path, monkeypatch):
    by_option = _collected(tmp_path, "--param-shard", "1/3")
    monkeypatch.setenv("TRITON_OPS_PARAM_SHARD", "1/3")
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "triton_ops_core.pytest_plugin", "-p", "no:cacheprovider",
         "--collect-only", "-q", "test_sample.py"],
        cwd=tmp_path, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    by_env = {line.split("::", 1)[1] for line in run.stdout.splitlines() if line.startswith("test_sample.py::")}
    assert by_env == by_option


def test_a_case_keeps_its_shard_by_name():
    keys = [f"test_ops.py::test_case[{i}]" for i in range(200)]
    for shards in (2, 3):
        owners = [[k for k in keys if param_case_in_shard(k, s, shards)] for s in range(shards)]
        assert sorted(sum(owners, [])) == sorted(keys)  # each key in exactly one shard
        assert all(len(o) > 200 / shards / 2 for o in owners)  # and the hash spreads them
    assert param_case_in_shard("test_a.py::test_b[x]", 0, 2) == param_case_in_shard("test_a.py::test_b[x]", 0, 2)


@pytest.mark.parametrize("spec", ["2/2", "-1/2", "1", "a/b", "0/0", "1/2/3"])
def test_bad_specs_are_usage_errors(spec):
    with pytest.raises(pytest.UsageError, match="--param-shard"):
        parse_param_shard(spec)


def test_good_specs_parse():
    assert parse_param_shard("0/2") == (0, 2)
    assert parse_param_shard("2/3") == (2, 3)
    assert parse_param_shard("0/1") == (0, 1)
