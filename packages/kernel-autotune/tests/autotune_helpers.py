"""Kernels and a fake kernel family for the tests (importable by subprocesses through PYTHONPATH)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import triton
import triton.language as tl
from kernel_autotune import ConfigSpace, Tunable, register_tunable, select_config


@triton.jit
def scale_kernel(x_ptr, y_ptr, n, alpha, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * alpha, mask=mask)


SCALE_SPACE = ConfigSpace({"BLOCK_SIZE": [16, 32, 64], "num_warps": [1, 2]})
# Deterministic "latencies" for the injected timer: BLOCK_SIZE 32 with 1 warp is the fastest.
FAKE_MS = {16: 3.0, 32: 1.0, 64: 2.0}


def fake_timer(fn, config):
    fn()  # the kernel really runs: the tuner's launch path is exercised, only the clock is fake
    return FAKE_MS[config["BLOCK_SIZE"]] + 0.1 * config["num_warps"]


def scale_grid(meta):
    return (triton.cdiv(meta["n"], meta["BLOCK_SIZE"]),)


def scale_launch(x, y, alpha, *, BLOCK_SIZE, num_warps):
    n = x.numel()
    scale_kernel[(triton.cdiv(n, BLOCK_SIZE),)](x, y, n, alpha, BLOCK_SIZE=BLOCK_SIZE, num_warps=num_warps)


# ---- a fake clock: timings that do not depend on the machine's speed or load ---------------------


class FakeClock:
    """A clock that only moves when told to: code under test calls ``advance(ms)`` where a real kernel would spend
    time (the toy operation below advances it by its config's cost), and ``timer`` (a kernel_autotune ``Timer``)
    reads it around one run. The tuner's verdict then follows the costs exactly, on any machine under any load (a
    wall-clock test flipped under pytest-xdist on a 2-core machine), while the kernel itself still really runs.

    Unlike ``fake_timer`` above, ``timer`` ignores the config it is handed: it times what the run did, so a config
    override that never reached the launch shows up as a wrong winner.
    """

    def __init__(self) -> None:
        self.now_ms = 0.0
        self.runs = 0

    def advance(self, ms: float) -> None:
        self.now_ms += ms

    def timer(self, fn, config):
        self.runs += 1
        start = self.now_ms
        fn()
        return self.now_ms - start

    def default_timer(self, device=None, flush_l2=True):
        """A stand-in for ``kernel_autotune.measure.default_timer`` (patched into the module that calls it)."""
        return self.timer


CLOCK = FakeClock()

# ---- a fake family for the CLI: one operation, one kernel, configs whose time is known --------------

OP_SPACE = ConfigSpace({"BLOCK_SIZE": [16, 32, 64], "num_warps": [1, 2]},
                       constraints=[lambda c, p: p is None or c["BLOCK_SIZE"] <= max(16, p["n"])])
# What one call of scale_op costs on CLOCK, in ms: BLOCK_SIZE 32 with 1 warp is the fastest, the default
# (64, 2 warps) is 3.2 ms.
OP_MS = {16: 5.0, 32: 1.0, 64: 3.0}
RESETS = []


def op_ms(cfg) -> float:
    return OP_MS[cfg["BLOCK_SIZE"]] + 0.1 * cfg["num_warps"]


def scale_op(x, alpha=2.0):
    """A public operation taking its config from select_config, as the kernel packages do."""
    cfg = select_config("toy_scale.fwd", version="1.0", problem={"n": x.numel()}, dtypes=(x.dtype,), device=x.device,
                        default={"BLOCK_SIZE": 64, "num_warps": 2}, bucket=("n",), space=OP_SPACE)
    y = torch.empty_like(x)
    CLOCK.advance(op_ms(cfg))
    scale_launch(x, y, alpha, **cfg)
    return y


def toy_tunable() -> Tunable:
    def prepare(shape, device):
        x = torch.randn(int(shape["n"]), device=device)
        return lambda: scale_op(x)

    shipped = os.environ.get("TOY_SHIPPED")
    return Tunable("toy_scale", prepare, shapes=({"n": 40}, {"n": 100}), reset=lambda: RESETS.append(1),
                   shipped=Path(shipped) if shipped else None)


register_tunable("toy_scale", toy_tunable)

if os.environ.get("TOY_FAKE_CLOCK") == "1":
    # `python -m kernel_autotune tune toy_scale --module autotune_helpers` in a test's subprocess: this module is
    # imported before anything is tuned, so the CLI's tuning times scale_op on CLOCK instead of the wall clock.
    import kernel_autotune.session

    kernel_autotune.session.default_timer = CLOCK.default_timer

if os.environ.get("TOY_SIMULATE") == "H200":
    # the CLI subprocess acts as if on an H200 (the CPU interpreter runs the kernel): for --write-shipped
    from kernel_autotune.testing import H200
    from triton_ops_core.device import simulate_device

    SIMULATION = simulate_device(H200)  # kept: the context manager's exit would run when it is collected
    SIMULATION.__enter__()
