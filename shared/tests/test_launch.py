"""The launch plan's direct launcher, against a stand-in with the calling convention of Triton's CompiledKernel
(the interpreter returns no CompiledKernel, so this is how the CPU suite covers that path)."""

from __future__ import annotations

import os

import torch
import triton_ops_core.launch as launch


class FakeCompiled:
    """Mimics ``CompiledKernel.__getitem__``: its runner reads grid[0], grid[1] and grid[2]."""

    def __init__(self, log, fail=False):
        self.log, self.fail = log, fail

    def __getitem__(self, grid):
        def runner(*args, stream=None):
            if self.fail:
                raise TypeError("launcher signature changed")
            self.log.append(("direct", (grid[0], grid[1], grid[2]), args))

        return runner


class FakeJit:
    def __init__(self, fail_direct=False):
        self.log, self.fail_direct = [], fail_direct

    def __getitem__(self, grid):
        def run(*args, num_warps, **options):
            self.log.append(("jit", grid, args, num_warps, options))
            return FakeCompiled(self.log, self.fail_direct)

        return run


def test_direct_launcher_after_first_launch(monkeypatch):
    monkeypatch.setattr(launch, "CompiledKernel", FakeCompiled)
    jit = FakeJit()
    plan = launch.Plan(jit, (7,), (1, 2.0, True), 4, 7)
    assert plan.grid == (7, 1, 1)
    plan.launch("a", "b")
    plan.launch("c", "d")
    plan.launch("e", "f")
    assert [e[0] for e in jit.log] == ["jit", "direct", "direct"]
    assert jit.log[1] == ("direct", (7, 1, 1), ("c", "d", 1, 2.0, True))
    assert jit.log[0][3] == 4


def test_failing_direct_launcher_falls_back_to_jit_for_good(monkeypatch):
    monkeypatch.setattr(launch, "CompiledKernel", FakeCompiled)
    jit = FakeJit(fail_direct=True)
    plan = launch.Plan(jit, (3, 2), (5,), 8, 6)
    for i in range(4):
        plan.launch(i)
    assert [e[0] for e in jit.log] == ["jit"] * 4
    assert plan.runner is None and not plan.direct


class FakeCompiledWithRun(FakeCompiled):
    """Also has what Triton's runner passes on: ``run``, ``function``, ``packed_metadata``."""

    function, packed_metadata = "function-handle", "packed"

    def run(self, gx, gy, gz, stream, function, packed, launch_metadata, enter_hook, exit_hook, *args):
        if self.fail:
            raise TypeError("launcher signature changed")
        self.log.append(("run", (gx, gy, gz), stream, function, packed, launch_metadata, enter_hook, exit_hook, args))


class FakeJitWithRun(FakeJit):
    def __getitem__(self, grid):
        def run(*args, num_warps, **options):
            self.log.append(("jit", grid, args, num_warps, options))
            return FakeCompiledWithRun(self.log, self.fail_direct)

        return run


class FakeKnobs:
    launch_enter_hook = None
    launch_exit_hook = None


def _with_run(monkeypatch):
    monkeypatch.setattr(launch, "CompiledKernel", FakeCompiledWithRun)
    monkeypatch.setattr(launch, "_current_device", lambda: 3)
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 1000 + device)
    knobs = FakeKnobs()
    monkeypatch.setattr(launch, "_RUNTIME_KNOBS", knobs)
    return knobs


def test_compiled_launcher_called_with_the_current_stream_and_no_hooks(monkeypatch):
    _with_run(monkeypatch)
    jit = FakeJitWithRun()
    plan = launch.Plan(jit, (5, 2), (7, True), 4)
    plan.launch("a")
    plan.launch("b")
    assert [e[0] for e in jit.log] == ["jit", "run"]
    assert jit.log[1] == ("run", (5, 2, 1), 1003, "function-handle", "packed", None, None, None, ("b", 7, True))


def test_compiled_launcher_gets_tensors_as_their_addresses(monkeypatch):
    # Triton's launcher validates each tensor's address with a driver call on every launch; an int it takes as is
    _with_run(monkeypatch)
    jit = FakeJitWithRun()
    plan = launch.Plan(jit, (1,), (3,), 4)
    a, b = torch.randn(4), torch.nn.Parameter(torch.randn(2))
    plan.launch(a, b, "descriptor")
    plan.launch(a, b, "descriptor")
    assert jit.log[0][2] == (a, b, "descriptor", 3)  # the first launch (the JIT's) gets the tensors themselves
    assert jit.log[1][-1] == (a.data_ptr(), b.data_ptr(), "descriptor", 3)


def test_launch_hooks_take_tritons_runner(monkeypatch):
    knobs = _with_run(monkeypatch)
    jit = FakeJitWithRun()
    plan = launch.Plan(jit, (1,), (), 4)
    plan.launch("a")
    knobs.launch_enter_hook = print  # a profiler's hook: Triton's own runner builds the metadata and calls it
    plan.launch("b")
    knobs.launch_enter_hook = None
    plan.launch("c")
    assert [e[0] for e in jit.log] == ["jit", "direct", "run"]


def test_failing_compiled_launcher_falls_back_to_jit_for_good(monkeypatch):
    _with_run(monkeypatch)
    jit = FakeJitWithRun(fail_direct=True)
    plan = launch.Plan(jit, (2,), (), 4)
    for i in range(3):
        plan.launch(i)
    assert [e[0] for e in jit.log] == ["jit"] * 3
    assert plan.run is None and plan.runner is None and not plan.direct


def test_call_key_is_none_safe_and_distinguishes_alignment():
    import torch

    a = torch.zeros(33)
    k1 = launch.call_key(a[:32], 1e-6, "neox")
    k2 = launch.call_key(a[1:], 1e-6, "neox")
    assert k1 != k2 and hash(k1) is not None
    cache = launch.PlanCache()
    assert cache.get(launch.call_key([1, 2])) is None  # unhashable argument: no plan, no error


def test_launch_options_reach_the_jit_call(monkeypatch):
    monkeypatch.setattr(launch, "CompiledKernel", FakeCompiled)
    jit = FakeJit()
    launch.Plan(jit, (2,), (), 4, num_stages=3).launch("t")
    assert jit.log[0][4] == {"num_stages": 3}


def test_call_key_follows_triton_interpret_as_os_environ_changes(monkeypatch):
    # the key reads TRITON_INTERPRET on every call (CPU tensors validate only under it), through os.environ's own
    # mapping: every way of changing os.environ must show
    a = torch.zeros(8)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    on = launch.call_key(a, "x")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    off = launch.call_key(a, "x")
    monkeypatch.delenv("TRITON_INTERPRET")
    unset = launch.call_key(a, "x")
    assert len({on, off, unset}) == 3
    os.environ["TRITON_INTERPRET"] = "1"
    assert launch.call_key(a, "x") == on and launch.interpret_setting() is not None
    os.environ.pop("TRITON_INTERPRET")
    assert launch.call_key(a, "x") == unset and launch.interpret_setting() is None
