"""Kernels and a fake kernel family for the tests (importable by subprocesses through PYTHONPATH)."""

from __future__ import annotations

import os
import time
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


# ---- a fake family for the CLI: one operation, one kernel, configs whose time is known --------------

OP_SPACE = ConfigSpace({"BLOCK_SIZE": [16, 32, 64], "num_warps": [1, 2]},
                       constraints=[lambda c, p: p is None or c["BLOCK_SIZE"] <= max(16, p["n"])])
# BLOCK_SIZE 32 wins by 30 ms or more: far above the interpreter's own cost, even on a loaded 2-core machine.
SLEEP_S = {16: 0.05, 32: 0.0, 64: 0.03}
RESETS = []


def scale_op(x, alpha=2.0):
    """A public operation taking its config from select_config, as the kernel packages do."""
    cfg = select_config("toy_scale.fwd", version="1.0", problem={"n": x.numel()}, dtypes=(x.dtype,), device=x.device,
                        default={"BLOCK_SIZE": 64, "num_warps": 2}, bucket=("n",), space=OP_SPACE)
    y = torch.empty_like(x)
    time.sleep(SLEEP_S[cfg["BLOCK_SIZE"]])
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
