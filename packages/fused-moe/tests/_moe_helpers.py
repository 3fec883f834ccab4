"""Inputs, layouts and tolerances shared by the MoE tests."""

from __future__ import annotations

import pytest
import torch
from triton_ops_core.testing import device_for_tests

# Relative (Frobenius) error allowed against a float64 reference. fp32: accumulation order only. bf16: the output
# rounding plus the rounding of the intermediate activation (which the reference reproduces) leaves ~4e-3.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 3e-3}


def make_moe(t, hidden, inter, experts, dtype=torch.float32, device=None, *, seed=0, bias=True, lead=None,
             router_scale=1.0):
    """Random gpt-oss-layout operands: (x, router_weight, router_bias, gate_up_proj [E, H, 2I] interleaved,
    gate_up_proj_bias, down_proj [E, I, H], down_proj_bias). Scaled so the projections are O(1) and the
    clamp of the gpt-oss SwiGLU (limit 7) is reached by some values."""
    if device is None:  # where the kernels run here: the GPU when there is one, else the interpreter's CPU
        device = device_for_tests()
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, hidden) if lead is not None else (t, hidden)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(dtype).to(device)

    x = rnd(*shape, scale=1.0)
    rw = rnd(experts, hidden, scale=router_scale * hidden ** -0.5)
    rb = rnd(experts, scale=0.5) if bias else None
    w1 = rnd(experts, hidden, 2 * inter, scale=3.0 * hidden ** -0.5)
    b1 = rnd(experts, 2 * inter, scale=0.5) if bias else None
    w2 = rnd(experts, inter, hidden, scale=inter ** -0.5)
    b2 = rnd(experts, hidden, scale=0.5) if bias else None
    return x, rw, rb, w1, b1, w2, b2


def to_layout(w1, b1, w2, layout, transposed):
    """gpt-oss operands (interleaved, [E, H, 2I] / [E, I, H]) rewritten in another layout (same function)."""
    if layout == "concatenated":
        w1 = torch.cat([w1[..., 0::2], w1[..., 1::2]], dim=-1)
        if b1 is not None:
            b1 = torch.cat([b1[..., 0::2], b1[..., 1::2]], dim=-1)
    if not transposed:
        w1 = w1.transpose(1, 2).contiguous()
        w2 = w2.transpose(1, 2).contiguous()
    return w1, b1, w2


def f64(*ts):
    return tuple(None if t is None else t.detach().double().cpu() for t in ts)


class NotLaunched:
    """A kernel that fails the test if a plan launches it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getitem__(self, grid):
        pytest.fail(f"{self.name} was launched")


def counters_at_rest(name: str) -> bool:
    """Whether the kept scratch buffers called ``name`` (arrival counters) exist and are all zero."""
    from triton_ops_core import scratch

    kept = [buf for key, buf in scratch._BUFFERS.items() if key[0] == name]
    return bool(kept) and all(not buf.any() for buf in kept)
