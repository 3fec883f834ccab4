"""Programmatic dependent launch: when launches use it, the switches, the plans it invalidates, the launch option,
and (on a Hopper GPU) a chain of early-launched kernels computing what the serial chain computes."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
import triton_ops_core.pdl as pdl
from triton_ops_core.launch import PlanCache


@pytest.fixture
def hopper(monkeypatch):
    """A compiled-kernel world with a capable device 0, whatever this machine is, PDL switched on."""
    monkeypatch.setattr(pdl, "is_interpreter", lambda: False)
    monkeypatch.setattr(pdl, "_capable", lambda index: True)
    monkeypatch.setattr(pdl, "_HAVE_GDC", True)
    monkeypatch.setenv(pdl.ENV, "1")


CUDA0 = torch.device("cuda", 0)


@pytest.mark.parametrize("name, on", [("NVIDIA H100 80GB HBM3", True), ("NVIDIA H100 PCIe", True),
                                       ("NVIDIA H200", False), ("NVIDIA B200", False)])
def test_the_default_is_per_device_where_measured(hopper, monkeypatch, name, on):
    monkeypatch.delenv(pdl.ENV)
    monkeypatch.setattr(pdl, "_device_name", lambda index: name)
    assert pdl.enabled(CUDA0) is on
    assert pdl.on_by_default(name) is on
    monkeypatch.setattr(pdl, "DEFAULT_ON", True)  # every capable device
    assert pdl.enabled(CUDA0)
    monkeypatch.setattr(pdl, "DEFAULT_ON", False)
    monkeypatch.setattr(pdl, "ON_BY_DEFAULT", ())  # no device measured faster
    assert not pdl.enabled(CUDA0)
    monkeypatch.setenv(pdl.ENV, "1")  # the environment decides wherever it is set
    assert pdl.enabled(CUDA0)
    monkeypatch.setattr(pdl, "ON_BY_DEFAULT", ("H",))
    monkeypatch.setenv(pdl.ENV, "0")
    assert not pdl.enabled(CUDA0)


def test_no_override_turns_it_on_before_hopper(hopper, monkeypatch):
    monkeypatch.setattr(pdl, "_capable", lambda index: False)
    with pdl.override(True):
        assert not pdl.enabled(CUDA0)


def test_off_on_the_cpu_and_under_the_interpreter(hopper, monkeypatch):
    assert not pdl.enabled(torch.device("cpu"))
    with pdl.override(True):  # an override cannot turn it on where the instructions cannot run
        assert not pdl.enabled(torch.device("cpu"))
    monkeypatch.setattr(pdl, "is_interpreter", lambda: True)
    assert not pdl.enabled(CUDA0)


def test_off_before_hopper(hopper, monkeypatch):
    monkeypatch.setattr(pdl, "_capable", lambda index: False)
    assert not pdl.enabled(CUDA0)


@pytest.mark.parametrize("value", ["0", "false", "off", " NO "])
def test_the_environment_turns_it_off(hopper, monkeypatch, value):
    monkeypatch.setenv(pdl.ENV, value)
    assert not pdl.enabled(CUDA0)
    monkeypatch.setenv(pdl.ENV, "1")
    assert pdl.enabled(CUDA0)


def test_override_decides_inside_its_block_and_restores(hopper, monkeypatch):
    with pdl.override(False):
        assert not pdl.enabled(CUDA0)
        with pdl.override(True):
            assert pdl.enabled(CUDA0)
        assert not pdl.enabled(CUDA0)
    assert pdl.enabled(CUDA0)
    monkeypatch.setenv(pdl.ENV, "0")
    assert not pdl.enabled(CUDA0)
    with pdl.override(True):  # the override wins over the environment
        assert pdl.enabled(CUDA0)


def test_override_drops_every_cached_plan_on_entry_and_exit():
    cache = PlanCache()
    cache.put(("key",), "plan")
    assert cache.get(("key",)) == "plan"
    with pdl.override(False):
        assert cache.get(("key",)) is None  # planned before the switch: gone
        cache.put(("key",), "plan without PDL")
        assert cache.get(("key",)) == "plan without PDL"
    assert cache.get(("key",)) is None


def test_launch_options():
    assert pdl.launch_options(True) == {"launch_pdl": True}
    assert pdl.launch_options(False) == {}


@pytest.mark.parametrize("release, trigger, programs, rows, want", [
    (True, "end", 1, 1, True), (True, "end", 132, 1, True), (True, "end", 133, 1, False), (True, "end", 0, 1, False),
    (True, "end", 8, 2, False), (True, "end", 8, 0, False), (False, "end", 8, 1, False), (True, "wait", 8, 1, False),
    (True, "start", 8, 1, False)])
def test_a_short_kernel_releases_the_next_one_early_only_for_one_row_in_one_wave(monkeypatch, release, trigger,
                                                                                 programs, rows, want):
    """``release_early``: with the switch and the "end" trigger, a launch over one row (a one-sequence decode step)
    of at most one program per SM (132 here) lets the next kernel launch once it runs; more rows (measured slower at
    eight), a grid of several waves, another trigger (which places the launch itself) or the switch off never do."""
    monkeypatch.setattr(pdl, "RELEASE_SHORT", release)
    monkeypatch.setattr(pdl, "TRIGGER", trigger)
    monkeypatch.setattr(pdl, "sm_count", lambda device, cpu: 132)
    assert pdl.RELEASE_MAX_ROWS == 1
    assert pdl.release_early(True, programs, CUDA0, rows) is want
    assert pdl.release_early(False, programs, CUDA0, rows) is False  # PDL off for the launch: nothing to release


def test_the_release_switch_is_read_from_the_environment(tmp_path):
    """``TRITON_OPS_PDL_RELEASE`` (read at import): on unless set to a false value."""
    import os
    import subprocess
    import sys

    code = "import triton_ops_core.pdl as p; print(p.RELEASE_SHORT)"
    seen = []
    for value in (None, "1", "0", "off"):
        env = {k: v for k, v in os.environ.items() if k != pdl.RELEASE_ENV}
        if value is not None:
            env[pdl.RELEASE_ENV] = value
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        seen.append(done.stdout.strip().splitlines()[-1])
    assert seen == ["True", "True", "False", "False"]


@triton.jit
def _scale_kernel(w_ptr, x_ptr, y_ptr, n, PDL: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    pdl.pdl_launch_dependents(PDL)
    if PDL:
        pdl.prefetch_rows(w_ptr, offs, n, 1, 0, 1, 1)
    w = tl.load(w_ptr + offs, mask=ok)  # a weight: readable before the wait
    pdl.pdl_wait(PDL)
    x = tl.load(x_ptr + offs, mask=ok)
    pdl.pdl_streamed(PDL)
    tl.store(y_ptr + offs, x * w + 1.0, mask=ok)


_PTX_ORDER = """
import sys

from triton_ops_core.aot import AOT_UNAVAILABLE

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(AOT_UNAVAILABLE)
import test_pdl

types = {"w_ptr": "*fp32", "x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "PDL": "constexpr", "BLOCK": "constexpr"}
try:
    src = ASTSource(test_pdl._scale_kernel, types, constexprs={"PDL": True, "BLOCK": 1024})
except TypeError:
    sys.exit(AOT_UNAVAILABLE)
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"launch_pdl": True}).asm["ptx"]
# the two PDL instructions and the global loads and stores, in program order (consecutive repeats once)
names = {"griddepcontrol.launch_dependents": "launch", "griddepcontrol.wait": "wait", "ld.global": "load",
         "st.global": "store"}
seq = [next(v for k, v in names.items() if k in line) for line in ptx.splitlines() if any(k in line for k in names)]
print(" ".join(t for i, t in enumerate(seq) if i == 0 or seq[i - 1] != t))
"""


def _launch_placed(trigger: str | None, seq: list[str]) -> bool:
    """Where the setting puts the next kernel's launch among the wait, the loads and the store (PTX program order):
    at the start, before the wait; right after the wait; after the last load (the main loop's end), before the
    store."""
    launch, wait = seq.index("launch"), seq.index("wait")
    if trigger == "start":
        return launch < wait
    if trigger == "wait":
        return launch == wait + 1
    last_load = max(i for i, t in enumerate(seq) if t == "load")  # "end", also the default (None)
    return wait < last_load < launch < seq.index("store")


@pytest.mark.parametrize("trigger", [None, "start", "wait", "end"])
def test_the_trigger_setting_places_the_next_kernels_launch(trigger, tmp_path, monkeypatch):
    """``TRITON_OPS_PDL_TRIGGER`` (read at import, hence a fresh process): the next kernel may launch at this
    kernel's start, once this kernel's wait returned (one kernel ahead at most), or once its main loop is done
    (``pdl_streamed``). Compiled for sm_90 on any machine: the PTX holds each instruction once, in that place."""
    import os
    import sys
    from pathlib import Path

    from triton_ops_core.aot import run_compile_script

    script = tmp_path / "ptx_order.py"
    script.write_text(_PTX_ORDER)
    monkeypatch.delenv(pdl.TRIGGER_ENV, raising=False)
    if trigger is not None:
        monkeypatch.setenv(pdl.TRIGGER_ENV, trigger)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))  # nothing compiled under another setting
    done = run_compile_script(script, timeout=300)
    if done is None:
        pytest.skip("this Triton ships no ptxas, or its ahead-of-time compile API is not the one the script knows")
    assert done.returncode == 0, done.stderr[-2000:]
    seq = done.stdout.strip().splitlines()[-1].split()
    assert seq.count("launch") == 1 and seq.count("wait") == 1, seq
    assert _launch_placed(trigger, seq), seq


def test_an_unknown_trigger_setting_warns_and_keeps_the_default(monkeypatch):
    assert pdl.DEFAULT_TRIGGER == "end"
    monkeypatch.setenv(pdl.TRIGGER_ENV, "later")
    with pytest.warns(UserWarning, match="TRITON_OPS_PDL_TRIGGER='later' is not one of"):
        assert pdl._trigger_setting() == "end"
    monkeypatch.setenv(pdl.TRIGGER_ENV, " Start ")
    assert pdl._trigger_setting() == "start"
    monkeypatch.delenv(pdl.TRIGGER_ENV)
    assert pdl._trigger_setting() == "end"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs a Hopper (or later) GPU")
def test_gpu_an_early_launched_chain_reads_each_result_after_it_is_written():
    """Each kernel reads what the one before wrote; launched early, they must still wait for it. 64 kernels in a
    CUDA graph, replayed: every result equals the serial chain's."""
    n = 1 << 20
    torch.manual_seed(0)
    weights = [torch.rand(n, device="cuda") * 0.5 + 0.75 for _ in range(64)]
    x0 = torch.randn(n, device="cuda")
    bufs = [torch.empty_like(x0), torch.empty_like(x0)]

    def chain(on: bool) -> torch.Tensor:
        src = x0
        for i, w in enumerate(weights):
            dst = bufs[i % 2]
            _scale_kernel[(triton.cdiv(n, 1024),)](w, src, dst, n, PDL=on, BLOCK=1024, **pdl.launch_options(on))
            src = dst
        return src

    want = chain(False).clone()
    got = chain(True).clone()
    assert torch.equal(got, want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(True)
    for _ in range(5):
        bufs[0].fill_(float("nan"))
        bufs[1].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
