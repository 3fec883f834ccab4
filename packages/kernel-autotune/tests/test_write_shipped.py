"""``tune --all --write-shipped``'s plumbing: families found from source (a ``pyproject.toml`` beside ``src``), every
shape tuned on a fake clock, the results merged into the family's shipped file under this GPU's name and compute
capability, beside another GPU's entries, which stay."""

import json
import subprocess
import sys

import autotune_helpers as h
import pytest
import torch
from autotune_env import subprocess_env
from kernel_autotune import cache, make_key, registry
from kernel_autotune.cli import main, write_shipped
from kernel_autotune.keys import key_string
from kernel_autotune.testing import H100_SXM, H200
from triton_ops_core.device import is_interpreter

pytestmark = pytest.mark.skipif(not is_interpreter(), reason="CPU-interpreter test (a simulated GPU)")

H100_CFG = {"BLOCK_SIZE": 16, "num_warps": 2}


def h100_entry(n: int) -> dict:
    key = make_key("toy_scale.fwd", version="1.0", problem={"n": n}, dtypes=(torch.float32,), bucket=("n",),
                   device_name=H100_SXM.name, capability="9.0")
    return {"key": key, "config": H100_CFG, "latency_ms": 1.0}


def test_write_shipped_merges_this_gpus_entries_beside_the_h100s(cache_dir, tmp_path):
    shipped = tmp_path / "pkg" / "tuned_configs.json"
    cache.write_document(shipped, {key_string(e["key"]): e for e in (h100_entry(64), h100_entry(128))})
    proc = subprocess.run(
        [sys.executable, "-m", "kernel_autotune", "tune", "toy_scale", "--module", "autotune_helpers",
         "--warmup", "1", "--runs", "3", "--write-shipped", "--no-cold-start"],
        capture_output=True, text=True, timeout=300,
        env=subprocess_env(cache_dir, TOY_FAKE_CLOCK="1", TOY_SIMULATE="H200", TOY_SHIPPED=str(shipped)))
    assert proc.returncode == 0, proc.stderr
    assert "tuning 2 shapes of toy_scale" in proc.stderr and "within 300 s" in proc.stderr  # the default budget
    assert "[1/2 " in proc.stderr and "[2/2 " in proc.stderr  # progress, one line per shape
    assert "toy_scale.fwd 1100.0 us vs default 3200.0 us" in proc.stderr
    assert "2 entries for NVIDIA H200 (9.0), 4 in all" in proc.stderr
    entries = list(cache.read_entries(shipped).values())
    h100 = [e for e in entries if e["key"]["device"] == H100_SXM.name]
    h200 = [e for e in entries if e["key"]["device"] == H200.name]
    assert len(h100) == 2 and all(e["config"] == H100_CFG for e in h100)  # untouched
    assert sorted(e["key"]["problem"]["n"] for e in h200) == [64, 128]
    assert all(e["key"]["capability"] == "9.0" and e["config"] == {"BLOCK_SIZE": 32, "num_warps": 1}
               and e["default_config"] == {"BLOCK_SIZE": 64, "num_warps": 2} and "trials" not in e for e in h200)


def test_write_shipped_replaces_an_older_entry_of_the_same_problem(tmp_path):
    path = tmp_path / "tuned_configs.json"
    old = h100_entry(64)
    old["key"]["version"], old["key"]["triton"] = "0.0.9", "3.0.0"
    cache.write_document(path, {key_string(old["key"]): old, key_string(h100_entry(256)["key"]): h100_entry(256)})
    new = h100_entry(64)
    new["config"] = {"BLOCK_SIZE": 32, "num_warps": 1}
    assert write_shipped(path, [new]) == (1, 1)
    got = cache.read_entries(path)
    assert len(got) == 2 and got[key_string(new["key"])]["config"] == {"BLOCK_SIZE": 32, "num_warps": 1}


def test_write_shipped_refuses_the_cpu_interpreter(cache_dir, capsys):
    with pytest.raises(SystemExit, match="CPU interpreter"):
        main(["tune", "toy_scale", "--write-shipped"])


PYPROJECT = """
[project]
name = "toy-src"

[project.entry-points."kernel_autotune.tunables"]
toy_src = "toy_src_pkg.tuning:tunable"   # a comment
"""

TUNING = """
from kernel_autotune import Tunable
def tunable():
    return Tunable("toy_src", lambda shape, device: (lambda: None), shapes=({"n": 1},))
"""


@pytest.mark.parametrize("tomllib", [True, False])
def test_families_run_from_source_are_found_by_their_pyproject(tmp_path, monkeypatch, tomllib):
    if not tomllib:  # Python 3.10 has no tomllib: the fallback reads the section's plain lines
        monkeypatch.setitem(sys.modules, "tomllib", None)
    dist = tmp_path / "toy-src"
    (dist / "src" / "toy_src_pkg").mkdir(parents=True)
    (dist / "pyproject.toml").write_text(PYPROJECT)
    (dist / "src" / "toy_src_pkg" / "__init__.py").write_text("")
    (dist / "src" / "toy_src_pkg" / "tuning.py").write_text(TUNING)
    monkeypatch.syspath_prepend(str(dist / "src"))
    assert registry.available_tunables()["toy_src"] == "source"
    tunable = registry.get_tunable("toy_src")
    assert tunable.name == "toy_src" and tunable.shapes == ({"n": 1},)
    assert json.dumps(registry._pyproject_entry_points(PYPROJECT)) == '{"toy_src": "toy_src_pkg.tuning:tunable"}'
    assert h.toy_tunable().name == "toy_scale"


def test_check_shipped_served_finds_every_shipped_entry_in_use(tmp_path, monkeypatch):
    from kernel_autotune import (
        ConfigSpace,
        Tunable,
        UntunedDeviceWarning,
        register_tunable,
        select_config,
        unregister_tunable,
    )
    from kernel_autotune.testing import check_shipped_served
    from triton_ops_core.device import simulate_device

    monkeypatch.setenv("TRITON_OPS_AUTOTUNE", "0")
    shipped = tmp_path / "tuned_configs.json"
    key = make_key("toy_ship.fwd", version="1", problem={"n": 8}, dtypes=(torch.float32,), bucket=("n",),
                   device_name=H200.name, capability="9.0")
    cache.write_document(shipped, {key_string(key): {"key": key, "config": {"B": 32}}})
    space = ConfigSpace({"B": [16, 32, 64]})

    def prepare(shape, device):
        return lambda: select_config("toy_ship.fwd", version="1", problem={"n": shape["n"]}, dtypes=(torch.float32,),
                                     device=device, default={"B": 16}, bucket=("n",), shipped=shipped, space=space)

    register_tunable("toy_ship", Tunable("toy_ship", prepare, shapes=({"n": 5}, {"n": 100}), shipped=shipped))
    try:
        with simulate_device(H200):
            assert check_shipped_served("toy_ship", torch.device("cpu")) == (1, 1)  # n=5 (bucket 8) shipped
        with simulate_device(H100_SXM), pytest.warns(UntunedDeviceWarning, match="toy_ship has no tuned configs"):
            assert check_shipped_served("toy_ship", torch.device("cpu")) == (0, 0)
    finally:
        unregister_tunable("toy_ship")


def test_families_take_turns_and_a_spent_budget_skips_the_rest(capsys):
    from kernel_autotune import Tunable, register_tunable, unregister_tunable
    from kernel_autotune.cli import _tune_jobs, build_parser

    for name, n in (("toy_a", 3), ("toy_b", 1)):
        register_tunable(name, Tunable(name, lambda shape, device: (lambda: None),
                                       shapes=tuple({"i": i} for i in range(n))))
    try:
        args = build_parser().parse_args(["tune", "toy_a", "toy_b"])
        order = [(t.name, s["i"]) for t, s in _tune_jobs(args)]
        assert order == [("toy_a", 0), ("toy_b", 0), ("toy_a", 1), ("toy_a", 2)]
        assert main(["tune", "toy_a", "toy_b", "--total-seconds", "1e-9", "--no-cold-start"]) == 1
        err = capsys.readouterr().err
        assert err.count("skipped, out of time") == 4 and "[4/4 " in err
    finally:
        unregister_tunable("toy_a")
        unregister_tunable("toy_b")
