"""The launch-plan cache of fused_gated_mlp: one validation per call signature, a new plan whenever metadata changes."""

from __future__ import annotations

import pytest
import torch
from _gated_mlp_helpers import TOL, make_inputs, pack, reference64
from fused_gated_mlp import DECODE_MAX_TOKENS, clear_caches, fused_gated_mlp, ops
from triton_ops_core.exceptions import InvalidArgumentError, UnsupportedDtypeError
from triton_ops_core.testing import assert_close_rel


@pytest.fixture
def counts(monkeypatch):
    """Counts validations and plan builds of fused_gated_mlp, starting from an empty plan cache."""
    seen = {"validate": 0, "build": 0}
    validate, build = ops.validate_gated_mlp_inputs, ops._build_plan

    def counting_validate(*args, **kwargs):
        seen["validate"] += 1
        return validate(*args, **kwargs)

    def counting_build(*args, **kwargs):
        seen["build"] += 1
        return build(*args, **kwargs)

    monkeypatch.setattr(ops, "validate_gated_mlp_inputs", counting_validate)
    monkeypatch.setattr(ops, "_build_plan", counting_build)
    clear_caches()
    yield seen
    clear_caches()


def test_repeated_calls_reuse_the_plan_with_new_data(device, counts):
    for seed in range(3):
        # Same shapes, strides, dtypes and alignment; new tensors and new values on every call.
        x, wg, wu, bg, bu = make_inputs(5, 32, 20, torch.float32, device, bias=True, seed=seed)
        out = fused_gated_mlp(x, wg, wu, "gelu", gate_bias=bg, up_bias=bu)
        assert_close_rel(out, reference64(x, wg, wu, "gelu", bg, bu), TOL[torch.float32])
    assert counts == {"validate": 1, "build": 1}
    # Leading dimensions and the autograd path reuse their own plans the same way.
    for seed in range(2):
        x, wg, wu, _, _ = make_inputs(0, 32, 20, torch.float32, device, seed=10 + seed, lead=(2, 3))
        assert_close_rel(fused_gated_mlp(x, wg, wu), reference64(x, wg, wu, "silu"), TOL[torch.float32])
        xg = x.clone().requires_grad_(True)
        out = fused_gated_mlp(xg, wg, wu)
        assert out.shape == (2, 3, 20) and out.grad_fn is not None
        out.sum().backward()
        assert xg.grad is not None and torch.isfinite(xg.grad).all()
    assert counts == {"validate": 2, "build": 2}
    clear_caches()
    fused_gated_mlp(x, wg, wu)
    assert counts["validate"] == 3, "clear_caches() must forget the plans"


def test_new_strides_alignment_or_options_get_new_plans(device, counts):
    # Prefill-sized (TMA is the prefill default; decode streams with plain loads), still one program per call.
    m = DECODE_MAX_TOKENS + 1
    x, wg, wu, _, _ = make_inputs(m, 32, 16, torch.float32, device, seed=1)
    fused_gated_mlp(x, wg, wu)
    builds = 1
    # A row-strided view of x: another stride.
    wide = torch.randn(m, 48, device=device)
    xs = wide[:, 8:40]
    assert_close_rel(fused_gated_mlp(xs, wg, wu), reference64(xs, wg, wu, "silu"), TOL[torch.float32])
    builds += 1
    assert counts["build"] == builds
    # A pointer 4 bytes past a 16-byte boundary: same shape and strides, other alignment (TMA must turn off).
    buf = torch.randn(m * 32 + 1, device=device)
    xm = buf[1:].view(m, 32)
    assert xm.data_ptr() % 16 != x.data_ptr() % 16
    assert_close_rel(fused_gated_mlp(xm, wg, wu), reference64(xm, wg, wu, "silu"), TOL[torch.float32])
    builds += 1
    assert counts["build"] == builds
    plans = list(ops._PLANS._plans.values())
    # The prefill tail ends (..., NUM_STAGES, USE_TMA, DOT_PRECISION, UPCAST).
    assert [p.tail[-3] for p in plans] == [True, True, False], "USE_TMA must follow the operands' alignment"
    # Options are part of the key too.
    fused_gated_mlp(x, wg, wu, "swiglu_oai", limit=3.0)
    fused_gated_mlp(x, wg, wu, "swiglu_oai", limit=4.0)
    builds += 2
    assert counts["build"] == builds
    cfg = {"path": "prefill", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 1, "GROUP_M": 1,
           "num_warps": 4, "num_stages": 2}
    for _ in range(2):
        assert_close_rel(fused_gated_mlp(x, wg, wu, config=cfg), reference64(x, wg, wu, "silu"),
                         TOL[torch.float32])
    builds += 1
    assert counts["build"] == builds
    assert counts["validate"] == builds


def test_packed_layouts_get_their_own_plans(device, counts):
    x, wg, wu, bg, bu = make_inputs(3, 32, 12, torch.float32, device, bias=True, seed=2)
    for layout in ("concatenated", "interleaved"):
        w, b = pack(wg, wu, layout), pack(bg, bu, layout)
        for _ in range(2):
            out = fused_gated_mlp(x, w, activation="swiglu_oai", gate_bias=b, weight_layout=layout)
            assert_close_rel(out, reference64(x, wg, wu, "swiglu_oai", bg, bu), TOL[torch.float32])
    assert counts == {"validate": 2, "build": 2}
    concatenated, interleaved = ops._PLANS._plans.values()
    # The interleaved views have row stride 2 * hidden, and the kernel reads their biases with stride 2 (no copy).
    assert concatenated.tail[4] == 32 and interleaved.tail[4] == 64
    assert concatenated.tail[7:9] == (1, 1) and interleaved.tail[7:9] == (2, 2)


def test_bad_inputs_raise_on_every_call(device, counts):
    x, wg, wu, _, _ = make_inputs(4, 16, 8, torch.float16, device, seed=3)
    fused_gated_mlp(x, wg, wu, "swiglu_oai", alpha=1)
    for _ in range(2):  # a failed validation caches nothing
        with pytest.raises(UnsupportedDtypeError, match="up_weight"):
            fused_gated_mlp(x, wg, wu.float())
        with pytest.raises(InvalidArgumentError, match="alpha"):  # True == 1: the key keeps the type apart
            fused_gated_mlp(x, wg, wu, "swiglu_oai", alpha=True)
        with pytest.raises(InvalidArgumentError, match="activation"):
            fused_gated_mlp(x, wg, wu, "relu")
    assert counts["build"] == 1 and counts["validate"] == 7


def test_tf32_switch_is_part_of_the_key(device, counts):
    x, wg, wu, _, _ = make_inputs(2, 16, 8, torch.float32, device, seed=4)
    matmul = torch.backends.cuda.matmul  # its flags are properties of the module object: set and restore by hand
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        fused_gated_mlp(x, wg, wu)
        matmul.allow_tf32 = True
        fused_gated_mlp(x, wg, wu)
    finally:
        matmul.allow_tf32 = before
    assert counts["build"] == 2
    precisions = sorted(next(v for v in p.tail if v in ("ieee", "tf32")) for p in ops._PLANS._plans.values())
    assert precisions == ["ieee", "tf32"]


def test_gated_mlp_forward_caches_plans_per_config(device, counts):
    # The benchmark and tuning entry point: no validation, plans cached per (metadata, config).
    split = {"path": "decode", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3, "GROUP_M": 1,
             "num_warps": 4, "num_stages": 2}
    for cfg in (split, {**split, "SPLIT_K": 1}):
        for seed in range(2):
            x, wg, wu, _, _ = make_inputs(3, 96, 20, torch.float32, device, seed=20 + seed)
            out = ops.gated_mlp_forward(x, wg, wu, None, None, "silu", 1.702, 7.0, cfg)
            assert_close_rel(out, reference64(x, wg, wu, "silu"), TOL[torch.float32])
    assert counts == {"validate": 0, "build": 2}


@pytest.mark.parametrize("on", [False, True])
def test_pdl_decode_plans_launch_early_and_prefetch_both_weights(device, monkeypatch, on):
    """With programmatic dependent launch on for the device (triton_ops_core.pdl), a decode plan launches early and
    its programs prefetch the first two K tiles of their rows of both weights (a power of two of 128-byte lines, at
    least those bytes); the prefill GEMM launches as before. Plans only (the interpreter runs no grid-dependency
    PTX)."""
    from triton_ops_core import pdl

    monkeypatch.setattr(pdl, "enabled", lambda dev: on)
    x, wg, wu, _, _ = make_inputs(1, 512, 256, torch.bfloat16, device)
    plan = ops._build_plan(x, wg, wu, None, None, "silu", 1.702, 7.0)
    names = ops.K._gated_mlp_decode_kernel.arg_names
    consts = dict(zip(names[11:], plan.tail, strict=True))  # the tail follows the 11 tensors
    assert consts["PDL"] is on and plan.options.get("launch_pdl", False) is on
    lines = consts["PREFETCH_LINES"]
    if on:
        tiles = min(ops.PREFETCH_TILES, -(-512 // (consts["BLOCK_K"] * consts["SPLIT_K"])))
        want = tiles * consts["BLOCK_K"] * wg.element_size()
        assert lines & (lines - 1) == 0 and lines * 128 >= want and (lines == 1 or lines * 128 < 2 * want)
    else:
        assert lines == 0
    x, wg, wu, _, _ = make_inputs(200, 512, 256, torch.bfloat16, device)  # past DECODE_MAX_TOKENS: prefill
    prefill = ops._build_plan(x, wg, wu, None, None, "silu", 1.702, 7.0)
    assert prefill.kernel is ops.K._gated_mlp_prefill_kernel and "launch_pdl" not in prefill.options
