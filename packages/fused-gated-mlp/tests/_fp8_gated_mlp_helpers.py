"""FP8 weights and float64 references for the FP8 tests, written independently of the package.

FP8 values are made with torch casts on the host (the interpreter's in-kernel float -> FP8 casts round wrongly;
its FP8 loads up-convert every finite code exactly, which ``test_every_fp8_code_converts_exactly`` checks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 128


def random_fp8(rows, cols, scaling, gen, dtype=torch.float8_e4m3fn, device="cpu"):
    """``(q, scale)``: random FP8 codes over most of the format's range and float32 scales that differ a lot from
    channel to channel (block to block), so a scale read from the wrong row or K block shows. The dequantized
    weight has entries of about ``1.5 / sqrt(cols)``, as ``_gated_mlp_helpers.make_inputs``'s."""
    fmax = torch.finfo(dtype).max
    q = (torch.randn(rows, cols, generator=gen) * fmax / 6).clamp(-fmax, fmax).to(dtype)
    shape = {"channel": (rows,), "block": (-(-rows // BLOCK), -(-cols // BLOCK)),
             "group": (rows, -(-cols // BLOCK))}[scaling]
    spread = 0.25 + 1.75 * torch.rand(shape, generator=gen)  # 0.25 .. 2: a factor of up to 8 between groups
    scale = spread * (1.5 / cols**0.5) / (fmax / 6)
    return q.to(device), scale.float().to(device)


def dequant64(q, scale):
    """``q * scale`` in float64 (per-channel ``[rows]``, 128 x 128 block or per-row 128-column group scales)."""
    w = q.cpu().double()
    s = scale.cpu().double()
    if s.dim() == 1:
        return w * s[:, None]
    rows, cols = w.shape
    if s.shape[0] == rows and rows > 1:  # group scales
        return w * s.repeat_interleave(BLOCK, 1)[:, :cols]
    return w * s.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]


def act_mul64(gate, up, activation, alpha=1.702, limit=7.0):
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    g = gate.clamp(max=limit)
    u = up.clamp(-limit, limit)
    return g * torch.sigmoid(alpha * g) * (u + 1)


def reference_fp8(x, wg64, wu64, activation, bg=None, bu=None):
    """``act(x @ Wg^T + bg) * (x @ Wu^T + bu)`` in float64 from dequantized float64 weights."""
    x64 = x.cpu().double()
    gate = x64 @ wg64.T
    up = x64 @ wu64.T
    if bg is not None:
        gate = gate + bg.cpu().double()
    if bu is not None:
        up = up + bu.cpu().double()
    return act_mul64(gate, up, activation)


def pack_rows(gate, up, layout):
    """The packed ``[2 * I, ...]`` tensor of gate and up rows."""
    if layout == "concatenated":
        return torch.cat([gate, up], dim=0)
    return torch.stack([gate, up], dim=1).reshape(2 * gate.shape[0], *gate.shape[1:])


def unpack_rows(packed, layout):
    if layout == "concatenated":
        half = packed.shape[0] // 2
        return packed[:half], packed[half:]
    return packed[0::2], packed[1::2]


def fp8_operands(inter, hidden, layout, scaling, gen, dtype=torch.float8_e4m3fn, device="cpu"):
    """Weights for ``fused_gated_mlp`` in ``layout`` with their scales, and the float64 dequantized halves.

    Returns ``(args, kwargs, wg64, wu64)``: ``fused_gated_mlp(x, *args, **kwargs)`` is the call. A packed layout
    gets one packed weight and one scale over the packed rows (its 128 x 128 blocks may hold rows of both halves).
    """
    if layout == "separate":
        qg, sg = random_fp8(inter, hidden, scaling, gen, dtype, device)
        qu, su = random_fp8(inter, hidden, scaling, gen, dtype, device)
        return [qg, qu], {"gate_scale": sg, "up_scale": su}, dequant64(qg, sg), dequant64(qu, su)
    q, s = random_fp8(2 * inter, hidden, scaling, gen, dtype, device)
    wg64, wu64 = unpack_rows(dequant64(q, s), layout)
    return [q, None], {"gate_scale": s, "weight_layout": layout}, wg64, wu64
