"""Correctness of fused_gated_mlp on the device of the session (CPU tensors under the interpreter, else CUDA)."""

from __future__ import annotations

import pytest
import torch
from _gated_mlp_helpers import TOL, make_inputs, pack, reference64
from fused_gated_mlp import DECODE_MAX_TOKENS, fused_gated_mlp, ops
from fused_gated_mlp.ops import gated_mlp_forward
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from triton_ops_core.testing import assert_close_rel, device_for_tests, poison_, relative_error

ACTS = ["silu", "gelu", "gelu_tanh", "swiglu_oai"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# Forced configs: every kernel variant on tiny tiles, so small problems still span several tiles.
DECODE_SPLIT3 = {"path": "decode", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3, "GROUP_M": 1,
                 "num_warps": 4, "num_stages": 2}
DECODE_PLAIN = {**DECODE_SPLIT3, "SPLIT_K": 1, "BLOCK_K": 32}
PREFILL_TMA = {"path": "prefill", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 1, "GROUP_M": 2,
               "num_warps": 4, "num_stages": 2}
PREFILL_PTR = {**PREFILL_TMA, "USE_TMA": False, "BLOCK_K": 32}
DECODE_TMA = {**DECODE_PLAIN, "USE_TMA": True}


@given(
    m=st.integers(1, 80),
    hidden=st.sampled_from([16, 24, 40, 56, 72, 20, 36]),
    inter=st.integers(1, 48),
    activation=st.sampled_from(ACTS),
    bias=st.booleans(),
    layout=st.sampled_from(["separate", "concatenated", "interleaved"]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_matches_float64_reference(m, hidden, inter, activation, bias, layout, dtype, seed):
    x, wg, wu, bg, bu = make_inputs(m, hidden, inter, dtype, device_for_tests(), bias=bias, seed=seed)
    ref = reference64(x, wg, wu, activation, bg, bu)
    if layout == "separate":
        out = fused_gated_mlp(x, wg, wu, activation, gate_bias=bg, up_bias=bu)
    else:
        packed_b = pack(bg, bu, layout) if bias else None
        out = fused_gated_mlp(x, pack(wg, wu, layout), None, activation, gate_bias=packed_b, weight_layout=layout)
    assert out.shape == (m, inter) and out.dtype == dtype and out.device == x.device
    # A tiny result (fp16 subnormals) cannot be closer to the float64 reference than its own rounding allows, nor
    # than fp32 arithmetic allows (exact GELU of a very negative gate cancels in 1 + erf, in torch's fp32 too).
    output_rounding = relative_error(ref.to(dtype), ref)
    fp32_floor = relative_error(reference64(x, wg, wu, activation, bg, bu, dtype=torch.float32), ref)
    assert_close_rel(out, ref, TOL[dtype] + 2 * output_rounding + 4 * fp32_floor)


@pytest.mark.parametrize("cfg", [DECODE_SPLIT3, DECODE_PLAIN, DECODE_TMA, PREFILL_TMA, PREFILL_PTR],
                         ids=["decode-splitk", "decode", "decode-tma", "prefill-tma", "prefill-ptr"])
@pytest.mark.parametrize("activation", ACTS)
def test_every_kernel_variant(device, cfg, activation):
    # Sizes that are no multiple of any block: ragged M, N and K tiles, several split-K slices.
    x, wg, wu, bg, bu = make_inputs(37, 88, 45, torch.bfloat16, device, bias=True, seed=3)
    out = gated_mlp_forward(x, wg, wu, bg, bu, activation, 1.702, 7.0, cfg)
    assert_close_rel(out, reference64(x, wg, wu, activation, bg, bu), TOL[torch.bfloat16])


def test_split_k_workspace_is_left_clean(device):
    # The split-K workspace is reused across calls: a second call on other data must not see the first's sums.
    for seed in range(3):
        x, wg, wu, _, _ = make_inputs(5, 96, 40, torch.float32, device, seed=seed)
        out = gated_mlp_forward(x, wg, wu, None, None, "silu", 1.702, 7.0, DECODE_SPLIT3)
        assert_close_rel(out, reference64(x, wg, wu, "silu"), TOL[torch.float32])


def test_decode_and_prefill_agree_at_the_boundary(device):
    x, wg, wu, _, _ = make_inputs(DECODE_MAX_TOKENS + 1, 64, 40, torch.float32, device, seed=1)
    ref = reference64(x, wg, wu, "silu")
    assert_close_rel(fused_gated_mlp(x, wg, wu), ref, TOL[torch.float32])
    assert_close_rel(fused_gated_mlp(x[:DECODE_MAX_TOKENS], wg, wu), ref[:DECODE_MAX_TOKENS], TOL[torch.float32])


@pytest.mark.parametrize("cfg", [None, DECODE_SPLIT3, DECODE_TMA, PREFILL_TMA, PREFILL_PTR],
                         ids=["auto", "decode-splitk", "decode-tma", "prefill-tma", "prefill-ptr"])
def test_every_output_element_written(device, monkeypatch, cfg):
    # The output buffer starts as NaN: any element the kernel skips stays NaN and fails the comparison.
    monkeypatch.setattr(ops, "_new_output", lambda m, n, dtype, dev: poison_(torch.empty(m, n, dtype=dtype,
                                                                                           device=dev)))
    x, wg, wu, _, _ = make_inputs(19, 40, 33, torch.float16, device, seed=2)
    out = gated_mlp_forward(x, wg, wu, None, None, "gelu", 1.702, 7.0, cfg)
    assert torch.isfinite(out).all()
    assert_close_rel(out, reference64(x, wg, wu, "gelu"), TOL[torch.float16])


def test_leading_dims_and_row_strides(device):
    x, wg, wu, bg, bu = make_inputs(0, 48, 24, torch.bfloat16, device, bias=True, seed=4, lead=(2, 3))
    out = fused_gated_mlp(x, wg, wu, "gelu_tanh", gate_bias=bg, up_bias=bu)
    assert out.shape == (2, 3, 24)
    assert_close_rel(out, reference64(x, wg, wu, "gelu_tanh", bg, bu), TOL[torch.bfloat16])
    # Row-strided views of x and of the weights (unit stride in the last dimension only).
    big_x = torch.randn(7, 80, device=device).to(torch.bfloat16)
    big_w = (torch.randn(2, 24, 80, device=device) / 8).to(torch.bfloat16)
    xs, wgs, wus = big_x[:, 8:56], big_w[0, :, 16:64], big_w[1, :, 16:64]
    out = fused_gated_mlp(xs, wgs, wus)
    assert_close_rel(out, reference64(xs, wgs, wus, "silu"), TOL[torch.bfloat16])


def test_empty_inputs(device):
    x, wg, wu, _, _ = make_inputs(0, 32, 16, torch.float16, device)
    assert fused_gated_mlp(x, wg, wu).shape == (0, 16)


def test_interleaved_follows_gpt_oss(device):
    # gpt-oss: mlp1 output h = x @ W^T + b, gate = h[..., ::2], linear = h[..., 1::2].
    x, wg, wu, bg, bu = make_inputs(6, 32, 20, torch.float32, device, bias=True, seed=5)
    w, b = pack(wg, wu, "interleaved"), pack(bg, bu, "interleaved")
    h = x.double() @ w.double().T + b.double()
    glu, lin = h[..., ::2].clamp(max=7.0), h[..., 1::2].clamp(-7.0, 7.0)
    expected = glu * torch.sigmoid(1.702 * glu) * (lin + 1)
    out = fused_gated_mlp(x, w, activation="swiglu_oai", gate_bias=b, weight_layout="interleaved")
    assert_close_rel(out, expected, TOL[torch.float32])


@pytest.mark.parametrize("cfg", [None, DECODE_SPLIT3, PREFILL_PTR], ids=["auto", "decode-splitk", "prefill"])
def test_strided_biases_are_read_in_place(device, cfg):
    # Bias views with strides 3 and 2 (as the halves of an interleaved packed bias are): read where they lie.
    x, wg, wu, _, _ = make_inputs(5, 48, 40, torch.float32, device, seed=9)
    gen = torch.Generator().manual_seed(9)
    bg = torch.randn(3 * 40, generator=gen).to(device)[::3]
    bu = torch.randn(2 * 40, generator=gen).to(device)[1::2]
    expected = reference64(x, wg, wu, "gelu", bg, bu)
    for _ in range(2):  # the second call takes the cached plan
        out = fused_gated_mlp(x, wg, wu, "gelu", gate_bias=bg, up_bias=bu, config=cfg)
        assert_close_rel(out, expected, TOL[torch.float32])


@pytest.mark.parametrize("cfg", [None, DECODE_SPLIT3, DECODE_TMA, PREFILL_TMA],
                         ids=["auto", "decode-splitk", "decode-tma", "prefill"])
def test_nan_and_inf_propagate(device, cfg):
    x, wg, wu, _, _ = make_inputs(9, 48, 20, torch.float32, device, seed=6)
    x[2, 5] = float("nan")
    wg[7, 3] = float("inf")
    out = gated_mlp_forward(x, wg, wu, None, None, "silu", 1.702, 7.0, cfg)
    ref = reference64(x, wg, wu, "silu")
    assert torch.isnan(out[2]).all()
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(ref)), "NaN pattern differs from the reference"
    finite = torch.isfinite(ref)
    assert relative_error(out.cpu()[finite], ref[finite]) <= TOL[torch.float32]


def test_swiglu_oai_clamps(device):
    # Large projections: the clamps decide the result; NaN must survive the clamps as in torch.clamp.
    x, wg, wu, bg, bu = make_inputs(4, 32, 16, torch.float32, device, bias=True, seed=7)
    wg, wu = wg * 20, wu * 20
    x[1, 0] = float("nan")
    out = fused_gated_mlp(x, wg, wu, "swiglu_oai", gate_bias=bg, up_bias=bu, alpha=1.3, limit=3.0)
    ref = reference64(x, wg, wu, "swiglu_oai", bg, bu, alpha=1.3, limit=3.0)
    assert torch.isnan(out[1]).all()
    assert_close_rel(out, ref, TOL[torch.float32])
