import json
import subprocess
import sys

import autotune_helpers as h
import pytest
import torch
from autotune_env import subprocess_env
from kernel_autotune import cache, clear_memo, config_source, get_tunable, tune_operation
from kernel_autotune.cli import main
from triton_ops_core.device import is_interpreter

# These tests drive a real kernel on CPU tensors with injected or wall-clock timers: the interpreter's world.
# test_gpu.py covers the same tuner with CUDA events on a GPU.
pytestmark = pytest.mark.skipif(not is_interpreter(), reason="CPU-interpreter test (GPU variant: test_gpu.py)")


def test_tune_operation_finds_the_kernel_and_caches_the_fastest(cache_dir):
    x = torch.randn(40)
    h.RESETS.clear()
    # Timed on the fake clock that scale_op advances by its config's cost: the verdict cannot flip under load.
    results = tune_operation(lambda: h.scale_op(x), reset=lambda: h.RESETS.append(1), warmup_runs=1,
                             benchmark_runs=2, device="cpu", timer=h.CLOCK.timer)
    assert [r.kernel for r in results] == ["toy_scale.fwd"]
    entry = results[0].entry
    assert entry["config"] == {"BLOCK_SIZE": 32, "num_warps": 1}
    assert entry["latency_ms"] == pytest.approx(1.1) and entry["default_latency_ms"] == pytest.approx(3.2)
    assert entry["default_config"] == {"BLOCK_SIZE": 64, "num_warps": 2}
    assert entry["key"]["problem"] == {"n": 64}
    assert entry["trials_total"] == 5  # 2 block sizes x 2 warps, plus the default
    assert len(h.RESETS) >= 6
    clear_memo()
    assert h.scale_op(x).allclose(2 * x)
    assert config_source("toy_scale.fwd", version="1.0", problem={"n": 40}, dtypes=(torch.float32,),
                         device=x.device, bucket=("n",)) == "cache"


def run_cli(cache_dir, *args, **env):
    proc = subprocess.run([sys.executable, "-m", "kernel_autotune", *args], capture_output=True, text=True,
                          env=subprocess_env(cache_dir, **env), timeout=180)
    return proc


def test_cli_tune_show_export_import_clear_ship(cache_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    # TOY_FAKE_CLOCK: the CLI process times scale_op on autotune_helpers' fake clock (see there), not the wall clock
    p = run_cli(cache_dir, "tune", "toy_scale", "--module", "autotune_helpers", "--warmup", "1", "--runs", "3",
                "--out", str(out), TOY_FAKE_CLOCK="1")
    assert p.returncode == 0, p.stderr
    assert "toy_scale.fwd" in p.stdout and "BLOCK_SIZE=32" in p.stdout
    assert "cached lookup in a fresh process" in p.stdout
    report = json.loads((out / "report.json").read_text())
    rows = [r for r in report["rows"] if "config" in r]
    assert len(rows) == 2 and all(r["config"] == {"BLOCK_SIZE": 32, "num_warps": 1} for r in rows), p.stdout
    assert all(r["latency_ms"] == pytest.approx(1.1) and r["default_latency_ms"] == pytest.approx(3.2) for r in rows)
    assert report["cold_start"]["hits"] == 2 and report["cold_start"]["hot_lookup_us"] < 100
    assert "| toy_scale |" in (out / "report.md").read_text()
    shipped = cache.read_entries(out / "toy_scale" / "tuned_configs.json")
    assert len(shipped) == 2 and all("trials" not in e for e in shipped.values())

    # The other commands in this process (each subprocess pays ~3 s of torch import on the CI machine); the cache
    # the subprocess wrote is read back here, and tune's cold-start report above already read it in a fresh process.
    capsys.readouterr()
    assert main(["show", "--kernel", "toy_scale"]) == 0
    shown = capsys.readouterr().out
    assert "2 tuned configs" in shown and "n=64" in shown and "n=128" in shown

    exported = tmp_path / "exported.json"
    assert main(["export", str(exported), "--kernel", "toy_scale.fwd"]) == 0
    assert len(cache.read_entries(exported)) == 2
    assert "exported 2" in capsys.readouterr().out

    other = tmp_path / "other-cache"
    assert main(["--cache-dir", str(other), "import", str(exported)]) == 0
    assert "imported 2" in capsys.readouterr().out
    assert len(cache.read_entries(other / "toy_scale.fwd.json")) == 2

    target = tmp_path / "pkg" / "tuned_configs.json"
    monkeypatch.setenv("TOY_SHIPPED", str(target))
    assert main(["ship", str(out)]) == 0
    assert cache.read_entries(target) == shipped

    assert main(["clear", "--kernel", "toy_scale"]) == 0
    assert "cleared 2" in capsys.readouterr().out
    assert cache.read_entries(cache_dir / "toy_scale.fwd.json") == {}
    assert main(["--cache-dir", str(other), "clear"]) == 0
    assert not list(other.glob("*.json"))


def test_cli_errors_are_clean(cache_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    # SystemExit with a message: `python -m kernel_autotune` prints it to stderr and exits 1, no traceback
    with pytest.raises(SystemExit, match="not a kernel-autotune file") as e:
        main(["import", str(bad)])
    assert isinstance(e.value.code, str)
    assert not cache_dir.exists() or not list(cache_dir.glob("*.json"))


def test_cli_in_process_errors_and_list(capsys):
    assert main(["tune", "no_such_family"]) == 2
    assert "not registered" in capsys.readouterr().err
    assert main(["list"]) == 0
    assert "toy_scale\tregistered" in capsys.readouterr().out


def test_registry_resolves_registered_families():
    t = get_tunable("toy_scale")
    assert t.owns("toy_scale.fwd") and not t.owns("toy_scaleX.fwd") and t.label({"n": 3}) == "n=3"


def test_a_zero_time_budget_still_times_the_default(cache_dir):
    x = torch.randn(40)
    results = tune_operation(lambda: h.scale_op(x), warmup_runs=0, benchmark_runs=1, device="cpu", total_seconds=0.0)
    entry = results[0].entry
    assert entry["trials_total"] == 1 and entry["config"] == entry["default_config"]


def test_cli_show_json_file_and_export_with_trials(cache_dir, tmp_path, capsys):
    x = torch.randn(40)
    tune_operation(lambda: h.scale_op(x), warmup_runs=0, benchmark_runs=1, device="cpu")
    assert main(["show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown) == 1 and shown[0]["key"]["kernel"] == "toy_scale.fwd"

    full = tmp_path / "full.json"
    assert main(["export", str(full), "--trials"]) == 0
    (entry,) = cache.read_entries(full).values()
    assert len(entry["trials"]) == entry["trials_total"] >= 2

    other = {"key": dict(entry["key"], kernel="toy_scale.bwd"), "config": {"BLOCK_SIZE": 16, "num_warps": 1}}
    cache.write_document(full, {"x": other})
    assert main(["export", str(full), "--merge"]) == 0
    merged = cache.read_entries(full)
    assert {e["key"]["kernel"] for e in merged.values()} == {"toy_scale.fwd", "toy_scale.bwd"}
    capsys.readouterr()
    assert main(["show", "--file", str(full), "--kernel", "toy_scale.bwd"]) == 0
    out = capsys.readouterr().out
    assert "1 tuned configs" in out and "BLOCK_SIZE=16" in out
    assert main(["show", "--device", "some other GPU"]) == 0
    assert "no tuned configs" in capsys.readouterr().out
