"""FP8 (E4M3 / E5M2) gate and up weights with per-channel or 128 x 128 block scales: against a float64 reference
``act(x @ dequant(Wg)^T) * (x @ dequant(Wu)^T)`` for every layout x scaling x activation, on the decode kernel
(M = 1, 3, 17) and the tiled prefill kernel (M = 70), every kernel variant, NaN propagation, exact FP8 loads."""

from __future__ import annotations

import pytest
import torch
from _fp8_gated_mlp_helpers import (
    BLOCK,
    act_mul64,
    dequant64,
    fp8_operands,
    pack_rows,
    random_fp8,
    reference_fp8,
)
from fused_gated_mlp import fused_gated_mlp, ops, quantize_weight_fp8
from fused_gated_mlp.ops import gated_mlp_forward
from triton_ops_core.testing import assert_close_rel, poison_, relative_error

ACTS = ["silu", "gelu", "gelu_tanh", "swiglu_oai"]
LAYOUTS = ["separate", "concatenated", "interleaved"]
TOKENS = [1, 3, 17, 70]  # decode (one row tile of 16 / 32) and prefill (> DECODE_MAX_TOKENS)
# bf16 output rounding (2^-9 per element) and fp32 accumulation: well under this; a scale read from the wrong
# channel or block (scales differ up to 8x) lands far above it.
TOL_BF16 = 1.5e-2

# Forced configs: every kernel variant on small tiles (as test_gated_mlp.py's), so small problems span several
# row, column and K tiles, split-K slices and 128-wide scale blocks.
DECODE_SPLIT3 = {"path": "decode", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 3, "GROUP_M": 1,
                 "num_warps": 4, "num_stages": 2}
DECODE_TMA = {**DECODE_SPLIT3, "SPLIT_K": 1, "BLOCK_K": 64, "USE_TMA": True}
DECODE_K256 = {**DECODE_SPLIT3, "SPLIT_K": 1, "BLOCK_K": 256}  # block scales cap BLOCK_K at 128
PREFILL_TMA = {"path": "prefill", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 2,
               "num_warps": 4, "num_stages": 2}
PREFILL_PTR = {**PREFILL_TMA, "USE_TMA": False, "BLOCK_K": 64}
# CUDA-core products (FMA): row tiles below a tl.dot's 16 (group and block scales on the CUDA cores too: a K tile
# narrower than a group, one group, and two groups, the second partial)
DECODE_FMA = {**DECODE_SPLIT3, "BLOCK_M": 8, "BLOCK_K": 64, "FMA": True}
DECODE_FMA_ROW = {**DECODE_SPLIT3, "BLOCK_M": 1, "BLOCK_K": 128, "SPLIT_K": 1, "FMA": True}
DECODE_FMA_WIDE = {**DECODE_SPLIT3, "BLOCK_M": 2, "BLOCK_K": 256, "SPLIT_K": 1, "FMA": True}
CONFIGS = [DECODE_SPLIT3, DECODE_TMA, DECODE_K256, PREFILL_TMA, PREFILL_PTR, DECODE_FMA, DECODE_FMA_ROW,
           DECODE_FMA_WIDE]
CONFIG_IDS = ["decode-splitk", "decode-tma", "decode-k256", "prefill-tma", "prefill-ptr", "decode-fma-splitk",
              "decode-fma-row", "decode-fma-wide"]


@pytest.mark.parametrize("scaling", ["channel", "block", "group"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ACTS)
def test_matches_float64_reference(device, layout, scaling, activation):
    # Odd sizes: hidden 131 (two 128-wide K blocks, the second partial), intermediate 45 (packed: 90 rows).
    hidden, inter = 131, 45
    gen = torch.Generator().manual_seed(sum(map(ord, layout + scaling + activation)))
    args, kwargs, wg64, wu64 = fp8_operands(inter, hidden, layout, scaling, gen, device=device)
    for m in TOKENS:
        x = torch.randn(m, hidden, generator=gen).to(torch.bfloat16).to(device)
        out = fused_gated_mlp(x, *args, activation, **kwargs)
        assert out.shape == (m, inter) and out.dtype == torch.bfloat16
        assert_close_rel(out, reference_fp8(x, wg64, wu64, activation), TOL_BF16, what=f"M={m}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("scaling", ["channel", "block", "group"])
def test_every_kernel_variant(device, monkeypatch, cfg, scaling):
    # fp32 activations: exact products in the interpreter, so the check is tight (1e-5) and any scale or tile
    # misread shows. hidden 144 = a full K block + a partial one (a multiple of 16: TMA descriptors allowed);
    # intermediate 45: ragged column tiles; 20 tokens: two row tiles. Outputs start as NaN: an element the kernel
    # skips fails. Split-K runs twice on new data: its workspace must be left clean.
    monkeypatch.setattr(ops, "_new_output", lambda m, n, dtype, dev: poison_(torch.empty(m, n, dtype=dtype,
                                                                                           device=dev)))
    gen = torch.Generator().manual_seed(7)
    for seed in range(2 if cfg["SPLIT_K"] > 1 else 1):
        args, kwargs, wg64, wu64 = fp8_operands(45, 144, "separate", scaling, gen, device=device)
        x = torch.randn(20, 144, generator=gen).to(device)
        bg, bu = torch.randn(45, generator=gen).to(device), torch.randn(45, generator=gen).to(device)
        out = gated_mlp_forward(x, *args, bg, bu, "gelu", 1.702, 7.0, cfg, **kwargs)
        assert_close_rel(out, reference_fp8(x, wg64, wu64, "gelu", bg, bu), 1e-5, what=f"call {seed}")


F16_DOT = {**DECODE_SPLIT3, "F16_DOT": True}  # fp16 tensor-core dots, rows scaled by powers of two


@pytest.mark.parametrize("scaling", ["channel", "block", "group"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_f16_dot_matches_the_reference(device, monkeypatch, scaling, dtype):
    # bf16 activations whose rows span 2^-20 .. 2^20 (a row's own power of two keeps each inside fp16's range), NaN
    # output poison, split K (a second call on new data: the workspace left clean)
    monkeypatch.setattr(ops, "_new_output", lambda m, n, dt, dev: poison_(torch.empty(m, n, dtype=dt, device=dev)))
    gen = torch.Generator().manual_seed(21)
    for seed in range(2):
        args, kwargs, wg64, wu64 = fp8_operands(45, 144, "separate", scaling, gen, dtype, device=device)
        rows = 2.0 ** torch.linspace(-20, 20, 20)[:, None]
        x = (torch.randn(20, 144, generator=gen) * rows).to(device, torch.bfloat16)
        out = gated_mlp_forward(x, *args, None, None, "silu", 1.702, 7.0, F16_DOT, **kwargs)
        ref = reference_fp8(x, wg64, wu64, "silu")
        for r in range(20):  # row by row: the rows' magnitudes differ by up to 2^40
            assert_close_rel(out[r], ref[r], TOL_BF16, what=f"call {seed}, row {r}")


def test_f16_dot_scales_rows_far_below_one(device):
    # rows whose largest magnitude lies below 2^-112 (the power of two is clamped at 2^126, or its exponent bits
    # would overflow), an all-zero row and an ordinary one; swiglu_oai keeps the output linear in tiny inputs
    gen = torch.Generator().manual_seed(25)
    args, kwargs, wg64, wu64 = fp8_operands(40, 144, "separate", "channel", gen, device=device)
    x = torch.randn(4, 144, generator=gen) * torch.tensor([2.0**-116, 2.0**-113, 0.0, 1.0])[:, None]
    x = x.to(device, torch.bfloat16)
    out = gated_mlp_forward(x, *args, None, None, "swiglu_oai", 1.702, 7.0, F16_DOT, **kwargs)
    ref = reference_fp8(x, wg64, wu64, "swiglu_oai", torch.zeros(40), torch.zeros(40))
    assert torch.equal(out[2].cpu(), ref[2].to(out.dtype))  # the zero row: exactly zero
    for r in (0, 1, 3):
        assert_close_rel(out[r], ref[r], TOL_BF16, what=f"row {r}")


def test_f16_dot_keeps_inf_and_nan_in_their_row(device):
    gen = torch.Generator().manual_seed(22)
    args, kwargs, wg64, wu64 = fp8_operands(40, 144, "separate", "channel", gen, device=device)
    x = torch.randn(4, 144, generator=gen).to(device, torch.bfloat16)
    x[1, 7] = float("nan")
    x[2, 9] = float("inf")
    out = gated_mlp_forward(x, *args, None, None, "silu", 1.702, 7.0, F16_DOT, **kwargs)
    assert out[1].isnan().all() and not out[2].isfinite().any()
    ref = reference_fp8(x[[0, 3]], wg64, wu64, "silu")
    assert_close_rel(out[[0, 3]], ref, TOL_BF16, what="finite rows")


@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
def test_packed_block_scales_straddle_the_halves(device, layout):
    # intermediate 160: the packed weight has 320 rows in 3 scale rows; concatenated, packed row 128..255 holds
    # gate rows 128..159 and up rows 0..95 under one scale row (intermediate is no multiple of 128).
    gen = torch.Generator().manual_seed(11)
    args, kwargs, wg64, wu64 = fp8_operands(160, 144, layout, "block", gen, device=device)
    assert kwargs["gate_scale"].shape == (3, 2)
    for m in (2, 70):
        x = torch.randn(m, 144, generator=gen).to(device)
        out = fused_gated_mlp(x, *args, "swiglu_oai", **kwargs)
        assert_close_rel(out, reference_fp8(x, wg64, wu64, "swiglu_oai"), 1e-5, what=f"M={m}")


@pytest.mark.parametrize("scaling", ["channel", "block", "group"])
def test_fp16_activations_e5m2_bias_and_leading_dims(device, scaling):
    gen = torch.Generator().manual_seed(3)
    args, kwargs, wg64, wu64 = fp8_operands(40, 136, "interleaved", scaling, gen, dtype=torch.float8_e5m2,
                                            device=device)
    b = torch.randn(80, generator=gen).to(device)
    for lead in ((2, 3), (5, 14)):  # 6 tokens (decode), 70 tokens (prefill)
        x = torch.randn(*lead, 136, generator=gen).to(torch.float16).to(device)
        out = fused_gated_mlp(x, *args, "gelu_tanh", gate_bias=b, **kwargs)
        assert out.shape == (*lead, 40) and out.dtype == torch.float16
        ref = reference_fp8(x.reshape(-1, 136), wg64, wu64, "gelu_tanh", b[0::2], b[1::2])
        assert_close_rel(out.reshape(-1, 40), ref, 2e-3)


def test_per_tensor_scale_as_expanded_channel_scale(device):
    gen = torch.Generator().manual_seed(4)
    (qg, sg), (qu, su) = random_fp8(24, 64, "channel", gen), random_fp8(24, 64, "channel", gen)
    sg1, su1 = sg[:1].to(device), su[:1].to(device)
    x = torch.randn(5, 64, generator=gen).to(device)
    out = fused_gated_mlp(x, qg.to(device), qu.to(device), gate_scale=sg1.expand(24), up_scale=su1.expand(24))
    ref = reference_fp8(x, dequant64(qg, sg[:1].expand(24)), dequant64(qu, su[:1].expand(24)), "silu")
    assert_close_rel(out, ref, 1e-5)


@pytest.mark.parametrize("cfg", [None, DECODE_FMA_ROW], ids=["chosen", "fma"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_fp8_code_converts_exactly(device, dtype, cfg):
    # All finite codes of the format as a 16 x 16 up weight with scale 1; x = identity, gate = ones: output[m, n] is
    # silu(1) * code[n, m], with silu(1) the same fp32 number for every element (the kernel's own, read from a code
    # of 1.0) and one fp32 rounding of the product (fp32 activations and output). A code converted wrongly (a
    # subnormal flushed, an exponent off) is off by far more than that rounding.
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    finite = torch.isfinite(codes.float())
    codes = torch.where(finite, codes.float(), torch.zeros(())).to(dtype)  # NaN/inf codes -> 0 (GPU-only check)
    wu = codes.reshape(16, 16).to(device)
    wg = torch.ones(16, 16).to(dtype).to(device)
    ones = torch.ones(16, device=device)
    x = torch.eye(16, device=device)
    out = fused_gated_mlp(x, wg, wu, gate_scale=ones, up_scale=ones, config=cfg).cpu().double()
    one = (codes.reshape(16, 16).float().T == 1.0).nonzero()[0]
    silu_one = out[one[0], one[1]]
    assert abs(silu_one - 0.7310585786300049) < 1e-6  # silu(1), within the GPU's fast exp
    expected = silu_one * wu.cpu().double().T
    err = (out - expected).abs()
    assert (err <= 2.0**-23 * expected.abs()).all(), err.max()


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("scaling", ["channel", "group", "block"])
def test_nan_propagates_on_the_one_and_two_row_tiles(device, scaling, m):
    # the default tiles at one or two rows (CUDA-core): a NaN input stays in its row, a NaN scale in its column
    # (a 128x128 block's scale: in the block's columns, here the second block row's 22)
    gen = torch.Generator().manual_seed(23)
    args, kwargs, wg64, wu64 = fp8_operands(150, 136, "separate", scaling, gen, device=device)
    x = torch.randn(m, 136, generator=gen).to(device, torch.bfloat16)
    x[m - 1, 7] = float("nan")
    kwargs["gate_scale"] = kwargs["gate_scale"].clone()
    kwargs["gate_scale"][{"channel": (30,), "group": (30, 1), "block": (1, 1)}[scaling]] = float("nan")
    out = fused_gated_mlp(x, *args, "silu", **kwargs).cpu()
    expected_nan = torch.zeros(m, 150, dtype=torch.bool)
    expected_nan[m - 1] = True
    expected_nan[:, slice(128, 150) if scaling == "block" else 30] = True
    assert torch.equal(torch.isnan(out), expected_nan)
    ref = reference_fp8(x, wg64, wu64, "silu")
    assert relative_error(out[~expected_nan], ref[~expected_nan]) <= TOL_BF16


@pytest.mark.parametrize("cfg", [{**DECODE_FMA_ROW, "BLOCK_K": 512}, {**DECODE_FMA_WIDE, "BLOCK_K": 512},
                                 {**DECODE_FMA_ROW, "BLOCK_K": 64, "SPLIT_K": 2}], ids=["row", "two-rows", "row-split"])
@pytest.mark.parametrize("scaling", ["group", "block"])
def test_group_scales_past_k_are_never_read(device, cfg, scaling):
    # K = 131: the last group holds 3 columns and K tiles of 512 span groups past it; the scales are views into
    # buffers whose next column is NaN, so a scale read past a row's last group would poison the output
    gen = torch.Generator().manual_seed(24)
    qg, sg = random_fp8(19, 131, scaling, gen, device=device)
    qu, su = random_fp8(19, 131, scaling, gen, device=device)

    def padded(s):
        buf = torch.full((s.shape[0], s.shape[1] + 1), float("nan"), device=device)
        buf[:, :-1] = s
        return buf[:, :-1]

    x = torch.randn(cfg["BLOCK_M"], 131, generator=gen).to(device)
    out = gated_mlp_forward(x, qg, qu, None, None, "silu", 1.702, 7.0, cfg, gate_scale=padded(sg),
                            up_scale=padded(su))
    assert_close_rel(out, reference_fp8(x, dequant64(qg, sg), dequant64(qu, su), "silu"), 1e-5)


@pytest.mark.parametrize("scaling", ["channel", "block", "group"])
@pytest.mark.parametrize("m", [9, 70])
def test_nan_propagates(device, scaling, m):
    gen = torch.Generator().manual_seed(5)
    args, kwargs, wg64, wu64 = fp8_operands(150, 136, "separate", scaling, gen, device=device)
    x = torch.randn(m, 136, generator=gen).to(device)
    x[2, 7] = float("nan")
    kwargs["gate_scale"] = kwargs["gate_scale"].clone()
    if scaling == "channel":
        kwargs["gate_scale"][30] = float("nan")  # column 30
        nan_cols = torch.tensor([30])
    elif scaling == "group":
        kwargs["gate_scale"][40, 1] = float("nan")  # row 40's K group 1: column 40
        nan_cols = torch.tensor([40])
    else:
        kwargs["gate_scale"][1, 1] = float("nan")  # rows 128..149, K block 1: columns 128..149
        nan_cols = torch.arange(128, 150)
    out = fused_gated_mlp(x, *args, "gelu", **kwargs).cpu()
    expected_nan = torch.zeros(m, 150, dtype=torch.bool)
    expected_nan[2] = True
    expected_nan[:, nan_cols] = True
    assert torch.equal(torch.isnan(out), expected_nan)
    ref = reference_fp8(x, wg64, wu64, "gelu")
    assert relative_error(out[~expected_nan], ref[~expected_nan]) <= 1e-5


@pytest.mark.parametrize("scaling", ["channel", "block", "group"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_quantize_weight_fp8(scaling, dtype):
    # amax / fmax per group, the FP8 cast of weight / scale, an all-zero group scaled by 1; against a direct
    # computation here (not the package's).
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(150, 200, generator=gen) * torch.rand(150, 1, generator=gen) * 3
    w[:, 130:] *= 5  # a K block of its own range
    w[7] = 0.0
    q, s = quantize_weight_fp8(w.bfloat16(), scaling, dtype)
    fmax = torch.finfo(dtype).max
    wb = w.bfloat16().float()
    if scaling == "channel":
        amax = wb.abs().amax(1)
        assert s.shape == (150,)
    elif scaling == "group":
        amax = torch.stack([wb[:, c:c + BLOCK].abs().amax(1) for c in (0, 128)], dim=1)
        assert s.shape == (150, 2)
    else:
        amax = torch.stack([torch.stack([wb[r:r + BLOCK, c:c + BLOCK].abs().amax() for c in (0, 128)])
                            for r in (0, 128)])
        assert s.shape == (2, 2)
    expect = torch.where(amax > 0, amax / fmax, torch.ones(()))
    assert s.dtype == torch.float32 and torch.allclose(s, expect, rtol=1e-6, atol=0)
    assert q.dtype == dtype and q.shape == w.shape and q.is_contiguous()
    assert torch.equal(q[7].float(), torch.zeros(200))
    if scaling == "channel":
        full = s[:, None]
    elif scaling == "group":
        full = s.repeat_interleave(BLOCK, 1)[:, :200]
    else:
        full = s.repeat_interleave(BLOCK, 0)[:150].repeat_interleave(BLOCK, 1)[:, :200]
    assert torch.equal(q.float(), (wb / full).clamp(-fmax, fmax).to(dtype).float())
    # the largest magnitude of every group is the format's largest value
    assert (q.float().abs() <= fmax).all() and q.float().abs().max() == fmax
    # round trip: E4M3's 3 mantissa bits give ~2-3 % relative error on normal data, E5M2's 2 bits twice that
    assert relative_error(dequant64(q, s), wb.double()) < (0.04 if dtype == torch.float8_e4m3fn else 0.08)


def test_packed_quantization_matches_the_kernel_convention(device):
    # quantize_weight_fp8 of a packed weight gives the packed scale fused_gated_mlp takes; reference from halves.
    gen = torch.Generator().manual_seed(8)
    wg = torch.randn(70, 136, generator=gen) / 12
    wu = torch.randn(70, 136, generator=gen) / 12
    x = torch.randn(4, 136, generator=gen).to(device)
    for layout, scaling in (("concatenated", "block"), ("interleaved", "block"), ("concatenated", "group"),
                            ("interleaved", "group")):
        q, s = quantize_weight_fp8(pack_rows(wg, wu, layout), scaling)
        assert s.shape == ((2, 2) if scaling == "block" else (140, 2))
        out = fused_gated_mlp(x, q.to(device), None, "silu", weight_layout=layout, gate_scale=s.to(device))
        full = dequant64(q, s)
        g64, u64 = (full[:70], full[70:]) if layout == "concatenated" else (full[0::2], full[1::2])
        ref = act_mul64(x.cpu().double() @ g64.T, x.cpu().double() @ u64.T, "silu")
        assert_close_rel(out, ref, 1e-5, what=f"{layout} {scaling}")
