"""Inputs and float64 references shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Relative error allowed against a float64 reference: the output is rounded to the input dtype once.
# fp32: 1e-4 leaves room for cancellation when a test draws a single output element.
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def make_inputs(m, hidden, inter, dtype, device, *, bias=False, layout="separate", seed=0, lead=None):
    """Random (never zero) operands; weights scaled so projections are O(1) and every activation regime shows."""
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, hidden) if lead is not None else (m, hidden)
    x = torch.randn(shape, generator=gen).to(dtype).to(device)
    scale = 1.5 / hidden**0.5
    wg = (torch.randn(inter, hidden, generator=gen) * scale).to(dtype).to(device)
    wu = (torch.randn(inter, hidden, generator=gen) * scale).to(dtype).to(device)
    bg = torch.randn(inter, generator=gen).to(device) if bias else None
    bu = torch.randn(inter, generator=gen).to(device) if bias else None
    return x, wg, wu, bg, bu


def pack(wg, wu, layout):
    """The packed [2 * I, ...] tensor of gate and up rows (concatenated, or gpt-oss interleaved)."""
    if layout == "concatenated":
        return torch.cat([wg, wu], dim=0)
    return torch.stack([wg, wu], dim=1).reshape(2 * wg.shape[0], *wg.shape[1:])


def reference64(x, wg, wu, activation, bg=None, bu=None, alpha=1.702, limit=7.0, dtype=torch.float64):
    """``act(gate) * up`` in float64 (or ``dtype``) from the (rounded) inputs, written independently of the
    package."""
    x, wg, wu = x.to(dtype).cpu(), wg.to(dtype).cpu(), wu.to(dtype).cpu()
    gate = x @ wg.T
    up = x @ wu.T
    if bg is not None:
        gate = gate + bg.to(dtype).cpu()
    if bu is not None:
        up = up + bu.to(dtype).cpu()
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    g = torch.clamp(gate, max=limit)
    u = torch.clamp(up, -limit, limit)
    return g * torch.sigmoid(alpha * g) * (u + 1)
