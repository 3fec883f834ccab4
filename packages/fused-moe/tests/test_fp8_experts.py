"""Weight-only FP8 experts: ``quantize_experts_fp8`` and ``moe_experts`` / ``fused_moe`` with FP8 weights and
per-column scales, against a float64 reference that uses the dequantized weights; validation of the scales; the
registered op with the new arguments (opcheck, compile). Under the interpreter on CPU, compiled on a GPU."""

from __future__ import annotations

import pytest
import torch
from _moe_helpers import TOL, NotLaunched, counters_at_rest, f64, make_moe, to_layout
from fused_moe import FusedMoE, fused_moe, moe_experts, moe_experts_reference, moe_route, quantize_experts_fp8
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.testing import assert_close_rel, opcheck_op

EXPERTS = torch.ops.triton_ops.moe_experts.default
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _dequant(q: torch.Tensor, scale: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``q * scale`` along the output columns (dimension 2 when transposed, else 1), float64 on the CPU."""
    return q.double().cpu() * scale.double().cpu().unsqueeze(1 if transposed else 2)


@pytest.mark.parametrize("fmt", FP8)
@pytest.mark.parametrize("transposed", [True, False])
def test_quantize_round_trip_and_scales(device, fmt, transposed):
    _, _, _, w1, _, w2, _ = make_moe(1, 64, 24, 3, device=device, seed=11)
    w1, _, w2 = to_layout(w1, None, w2, "interleaved", transposed)
    w2[1].zero_()  # an expert whose down weights are all zero: scale 1, codes 0
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, transposed=transposed, dtype=fmt)
    assert q1.dtype == q2.dtype == fmt and s1.dtype == s2.dtype == torch.float32
    assert q1.shape == w1.shape and q2.shape == w2.shape
    assert s1.shape == (3, 48) and s2.shape == (3, 64)
    assert q1.is_contiguous() and q2.is_contiguous()
    limit = 448.0 if fmt == torch.float8_e4m3fn else 57344.0
    # each column's largest magnitude maps to the format's largest value
    k_dim = 1 if transposed else 2
    assert torch.allclose(q1.float().abs().amax(dim=k_dim), torch.full_like(s1, limit))
    assert torch.equal(s2[1], torch.ones_like(s2[1])) and not q2[1].float().any()
    rel = 2.0 ** -4 if fmt == torch.float8_e4m3fn else 2.0 ** -3  # half an ulp of the format, relative
    for w, q, s in ((w1, q1, s1), (w2, q2, s2)):
        w64, s64 = w.double().cpu(), s.double().cpu().unsqueeze(k_dim)
        err = (_dequant(q, s, transposed) - w64).abs()
        assert (err <= rel * w64.abs() + 1e-12 + s64 * 2.0 ** -9).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout,transposed,bias", [("interleaved", True, True), ("concatenated", False, False)])
@pytest.mark.parametrize("t", [1, 9])
def test_fp8_experts_match_the_dequantized_reference(device, dtype, layout, transposed, bias, t):
    x, rw, rb, w1, b1, w2, b2 = make_moe(t, 64, 40, 6, dtype=dtype, device=device, seed=12 + t, bias=bias)
    w1, b1, w2 = to_layout(w1, b1, w2, layout, transposed)
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, transposed=transposed)
    ids, wts = moe_route(x, rw, rb, 2)
    activation = "swiglu_oai" if layout == "interleaved" else "silu"
    out = moe_experts(x, ids, wts, q1, b1, q2, b2, activation, gate_up_layout=layout, transposed=transposed,
                      gate_up_scale=s1, down_scale=s2)
    assert out.dtype == dtype and out.shape == x.shape
    d1, d2 = _dequant(q1, s1, transposed), _dequant(q2, s2, transposed)
    xd, idd, wtd, b1d, b2d = f64(x, ids, wts, b1, b2)
    ref = moe_experts_reference(xd, idd, wtd, d1, b1d, d2, b2d, activation, gate_up_layout=layout,
                                transposed=transposed, round_intermediate=dtype if dtype != torch.float32 else None)
    assert_close_rel(out, ref, TOL[dtype])
    # and close to the unquantized experts, within FP8's rounding of the weights
    full = moe_experts(x, ids, wts, w1, b1, w2, b2, activation, gate_up_layout=layout, transposed=transposed)
    assert_close_rel(out, full.double().cpu(), 0.08)


def test_fused_moe_and_module_with_fp8_experts(device):
    x, rw, rb, w1, b1, w2, b2 = make_moe(5, 32, 16, 4, dtype=torch.bfloat16, device=device, seed=20)
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2)
    out, scores = fused_moe(x, rw, rb, q1, b1, q2, b2, 2, return_router_scores=True, gate_up_scale=s1,
                            down_scale=s2)
    ids, wts = moe_route(x, rw, rb, 2)
    assert torch.equal(out, moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=s1, down_scale=s2))
    module = FusedMoE(32, 16, 4, 2, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        module.router.weight.copy_(rw)
        module.router.bias.copy_(rb)
        module.experts.gate_up_proj.copy_(w1)
        module.experts.gate_up_proj_bias.copy_(b1)
        module.experts.down_proj.copy_(w2)
        module.experts.down_proj_bias.copy_(b2)
    module.quantize_experts_fp8()
    assert module.experts.gate_up_proj.dtype == torch.float8_e4m3fn and module.experts.down_proj.dtype == q2.dtype
    assert torch.equal(module.experts.gate_up_scale, s1) and torch.equal(module.experts.down_scale, s2)
    with torch.no_grad():
        mout, mscores = module(x)
    assert torch.equal(mout, out) and torch.equal(mscores, scores)
    assert "fp8" in repr(module)


def test_fp8_nan_code_reaches_only_its_tokens(device):
    if device.type == "cpu":
        pytest.skip("the interpreter reads the E4M3 NaN code as 480 (a GPU-only check)")
    x, rw, rb, w1, b1, w2, b2 = make_moe(8, 32, 16, 4, dtype=torch.bfloat16, device=device, seed=21)
    for fmt in FP8:
        q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, dtype=fmt)
        ids, wts = moe_route(x, rw, rb, 2)
        e = int(ids[0, 0])
        q2 = q2.clone()
        q2[e, 3, 5] = float("nan")  # expert e's down projection, output column 5
        out = moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=s1, down_scale=s2)
        hit = (ids == e).any(dim=1)
        assert out[hit, 5].isnan().all() and not out[~hit].isnan().any()
        assert not out[:, [c for c in range(32) if c != 5]].isnan().any()


def test_scale_validation(device):
    x, rw, rb, w1, b1, w2, b2 = make_moe(3, 32, 16, 4, device=device, seed=22)
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2)
    ids, wts = moe_route(x, rw, rb, 2)
    with pytest.raises(InvalidArgumentError, match="gate_up_scale: FP8 expert weights need"):
        moe_experts(x, ids, wts, q1, b1, q2, b2, down_scale=s2)
    with pytest.raises(InvalidArgumentError, match="down_scale: FP8 expert weights need"):
        moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=s1)
    with pytest.raises(InvalidArgumentError, match="scales go with FP8"):
        moe_experts(x, ids, wts, w1, b1, w2, b2, gate_up_scale=s1, down_scale=s2)
    with pytest.raises(ShapeMismatchError, match="down_scale"):
        moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=s1, down_scale=s2[:, :-1])
    with pytest.raises(UnsupportedDtypeError, match="gate_up_scale"):
        moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=s1.double(), down_scale=s2)
    with pytest.raises(UnsupportedDtypeError, match="down_proj"):  # one FP8 weight, one not
        moe_experts(x, ids, wts, q1, b1, w2, b2, gate_up_scale=s1, down_scale=s2)
    with pytest.raises(UnsupportedDtypeError, match="dtype"):
        quantize_experts_fp8(w1, w2, dtype=torch.bfloat16)
    with pytest.raises(UnsupportedDtypeError, match="gate_up_proj"):
        quantize_experts_fp8(q1, w2)
    with pytest.raises(ShapeMismatchError, match="down_proj"):
        quantize_experts_fp8(w1, w2[0])


@pytest.mark.parametrize("one_row", [False, True])
def test_opcheck_and_compile_with_scales(device, monkeypatch, one_row):
    # one_row: the one-row tiles, which take the pairs in their own order (no grouping launch)
    from fused_moe import MoEConfig, ops

    if one_row:
        monkeypatch.setattr(ops, "_config", lambda *a: MoEConfig(1, 8, 16, 16, 16, 4, 1, fma=True))
        ops.clear_caches()
        monkeypatch.setattr(ops, "_align", lambda *a: pytest.fail("one-row tiles launched a grouping"))
    try:
        x, rw, rb, w1, b1, w2, b2 = make_moe(5, 32, 16, 6, device=device, seed=23)
        q1, s1, q2, s2 = quantize_experts_fp8(w1, w2)
        ids, wts = moe_route(x, rw, rb, 2)
        assert "gate_up_scale" in str(EXPERTS._schema) and "down_scale" in str(EXPERTS._schema)
        opcheck_op(EXPERTS, (x, ids, wts, q1, b1, q2, b2, "swiglu_oai", "interleaved", True, 1.702, 7.0, s1, s2))
        eager = moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=s1, down_scale=s2)
        fn = torch.compile(lambda x: moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=s1, down_scale=s2),
                           fullgraph=True, backend="aot_eager")
        assert torch.equal(fn(x), eager)
    finally:
        ops.clear_caches()  # (no plan of the one-row config left for the next test)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_one_row_tiles_take_the_pairs_in_their_own_order(device, monkeypatch, ids_dtype):
    """One-row tiles (``block_m`` 1: FP8 experts at 1 to 8 tokens) need no grouping: tile i is pair i, the routing's
    ids its tile table, and no grouping launch runs before the GEMMs (two-row tiles still group). The result is the
    float64 reference's, and the same bits as with the ids in the other integer dtype. An id outside the experts
    (unchecked input) is skipped: the other tokens' outputs stay exact and nothing is read past the weights."""
    from fused_moe import MoEConfig, ops

    x, rw, rb, w1, b1, w2, b2 = make_moe(6, 40, 24, 5, device=device, seed=41)
    ids, wts = moe_route(x, rw, rb, 2)
    ids = ids.to(ids_dtype)
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2)
    grouped = []
    real_align = ops._align
    monkeypatch.setattr(ops, "_align", lambda *a: grouped.append(1) or real_align(*a))

    def run(block_m, ids=ids):
        monkeypatch.setattr(ops, "_config", lambda *a: MoEConfig(block_m, 8, 16, 16, 16, 4, 1, fma=True))
        ops.clear_caches()
        try:
            return moe_experts(x, ids, wts, q1, b1, q2, b2, "swiglu_oai", gate_up_scale=s1, down_scale=s2)
        finally:
            ops.clear_caches()

    out = run(1)
    assert grouped == []
    assert torch.equal(run(1, ids.to(torch.int64 if ids_dtype == torch.int32 else torch.int32)), out)
    xd, idd, wtd, b1d, b2d = f64(x, ids, wts, b1, b2)
    ref = moe_experts_reference(xd, idd, wtd, _dequant(q1, s1, True), b1d, _dequant(q2, s2, True), b2d, "swiglu_oai")
    assert_close_rel(out, ref, TOL[torch.float32])
    assert_close_rel(run(2), ref, TOL[torch.float32])
    assert grouped == [1]  # two-row tiles group the pairs first
    bad = ids.clone()
    bad[3, 1] = 5  # one past the last expert
    bad[4, 0] = -1
    out_bad = run(1, bad)
    keep = torch.tensor([0, 1, 2, 5], device=device)
    assert torch.equal(out_bad[keep], out[keep])


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_tiles_add_the_terms_in_the_down_gemm(device, monkeypatch, split, dtype):
    """One-row tiles need no combine launch: the last of each (token, column tile)'s down-GEMM programs adds the
    token's k expert rows (times the K splits) and the residual in the combine's fixed order, the same bits as the
    combine launch. An id outside the experts still arrives (zeros), so its token completes. The arrival counters are
    at zero after every call: the kept buffers of plain calls; the registered op's calls get fresh ones."""
    from fused_moe import MoEConfig, ops
    from fused_moe import _kernels as K

    x, rw, rb, w1, b1, w2, b2 = make_moe(5, 40, 24, 6, dtype=dtype, device=device, seed=43 + split)
    residual = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(dtype).to(device)
    ids, wts = moe_route(x, rw, rb, 3)
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2)
    monkeypatch.setattr(ops, "_config",
                        lambda *a: MoEConfig(1, 8, 16, 16, 16, 4, 1, fma=True, down_split_k=split))

    def run(ids=ids, wts=wts, op=False):
        ops.clear_caches()
        try:
            if op:
                return EXPERTS(x, ids, wts, q1, b1, q2, b2, "swiglu_oai", "interleaved", True, 1.702, 7.0, s1, s2,
                               residual)
            return moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=s1, down_scale=s2, residual=residual)
        finally:
            ops.clear_caches()

    with monkeypatch.context() as m:
        m.setattr(K, "_combine_kernel", NotLaunched("the combine"))
        fused = run()
        assert counters_at_rest(ops._DOWN_COUNTERS)
        assert torch.equal(run(), fused)  # the kept counters serve the next call
        assert torch.equal(run(op=True), fused)
        bad = ids.clone()
        bad[2, 1] = 6  # one past the last expert: that pair adds zeros
        out_bad = run(bad)
        assert counters_at_rest(ops._DOWN_COUNTERS)
        wts_zero = wts.clone()
        wts_zero[2, 1] = 0.0  # the same pair's share, gone
        assert torch.equal(out_bad, run(wts=wts_zero))
    with monkeypatch.context() as m:
        m.setattr(ops, "COMBINE_IN_DOWN", False)
        assert torch.equal(run(), fused)
    assert not fused.isnan().any()
    keep = torch.tensor([0, 1, 3, 4], device=device)
    assert torch.equal(out_bad[keep], fused[keep]) and not torch.equal(out_bad[2], fused[2])
    xd, idd, wtd, b1d, b2d = f64(x, ids, wts, b1, b2)
    ref = moe_experts_reference(xd, idd, wtd, _dequant(q1, s1, True), b1d, _dequant(q2, s2, True), b2d, "swiglu_oai")
    assert_close_rel(fused, ref + residual.double().cpu(), TOL[dtype])


@pytest.mark.parametrize("block_m,row_layout", [(1, False), (2, False), (1, True)])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("layout,transposed,activation", [("interleaved", True, "swiglu_oai"),
                                                          ("concatenated", False, "silu")])
def test_cuda_core_tiles(device, monkeypatch, block_m, row_layout, fp8, layout, transposed, activation):
    """The FMA tiles (config ``fma``): one or two rows per tile, so an expert with several tokens takes several
    tiles; odd sizes mask the K and N edges (and the row layout's last row load, a step ahead, past K). Against the
    float64 reference of the (dequantized) weights."""
    from fused_moe import MoEConfig, ops

    monkeypatch.setattr(ops, "_config", lambda *a: MoEConfig(block_m, 8, 16, 16, 16, 4, 1, fma=True,
                                                             row_layout=row_layout))
    ops.clear_caches()
    try:
        x, rw, rb, w1, b1, w2, b2 = make_moe(7, 40, 20, 5, device=device, seed=30 + block_m)
        w1, b1, w2 = to_layout(w1, b1, w2, layout, transposed)
        ids, wts = moe_route(x, rw, rb, 3)
        # each token's row followed by NaN: a load past K that is not masked off turns its token's output NaN
        padded = torch.full((x.shape[0], x.shape[1] + 24), float("nan"), device=device, dtype=x.dtype)
        padded[:, :x.shape[1]] = x
        x = padded[:, :x.shape[1]]
        kw = {"gate_up_layout": layout, "transposed": transposed}
        if fp8:
            q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, transposed=transposed, dtype=torch.float8_e5m2)
            out = moe_experts(x, ids, wts, q1, b1, q2, b2, activation, gate_up_scale=s1, down_scale=s2, **kw)
            d1, d2 = _dequant(q1, s1, transposed), _dequant(q2, s2, transposed)
        else:
            out = moe_experts(x, ids, wts, w1, b1, w2, b2, activation, **kw)
            d1, d2 = f64(w1, w2)
        xd, idd, wtd, b1d, b2d = f64(x, ids, wts, b1, b2)
        ref = moe_experts_reference(xd, idd, wtd, d1, b1d, d2, b2d, activation, **kw)
        assert_close_rel(out, ref, TOL[torch.float32])
    finally:
        ops.clear_caches()


@pytest.mark.parametrize("t", [1, 6, 9])  # on a GPU: the tensor-core tile, the one-row FMA tile, the dot again
@pytest.mark.parametrize("layout,transposed,activation", [("interleaved", True, "swiglu_oai"),
                                                          ("concatenated", False, "silu")])
def test_fp8_experts_with_bf16_rows_beyond_fp16s_range(device, layout, transposed, activation, t):
    """FP8 weights beside bf16 activations of any size: rows of 1e6 (past fp16's 65504) and 1e-7 (below fp16's
    normal range) come out as accurate as rows of 1, so no path may pass the activations through fp16 unscaled.
    Checked row by row: one large row would hide the others' errors."""
    x, rw, rb, w1, b1, w2, b2 = make_moe(t, 64, 40, 6, dtype=torch.bfloat16, device=device, seed=40)
    sizes = torch.tensor([1e6, 1e-7, 1.0, 3e4, 1e-3, 5e5], device=device).repeat(2)[:t]
    x = (x.float() * sizes[:, None]).to(torch.bfloat16)
    w1, b1, w2 = to_layout(w1, b1, w2, layout, transposed)
    if activation == "silu":  # no biases: a row's output scales with it, so every row is measured at its own size
        b1 = b2 = None
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, transposed=transposed)
    ids, wts = moe_route(x, rw, rb, 2)
    kw = {"gate_up_layout": layout, "transposed": transposed}
    out = moe_experts(x, ids, wts, q1, b1, q2, b2, activation, gate_up_scale=s1, down_scale=s2, **kw)
    xd, idd, wtd, b1d, b2d = f64(x, ids, wts, b1, b2)
    ref = moe_experts_reference(xd, idd, wtd, _dequant(q1, s1, transposed), b1d, _dequant(q2, s2, transposed), b2d,
                                activation, round_intermediate=torch.bfloat16, **kw)
    assert torch.isfinite(out).all()
    for row in range(t):
        assert_close_rel(out[row], ref[row], TOL[torch.bfloat16])


@pytest.mark.parametrize("fmt", FP8)
@pytest.mark.parametrize("layout,transposed,activation", [("interleaved", True, "swiglu_oai"),
                                                          ("concatenated", False, "silu")])
@pytest.mark.parametrize("block_m", [16, 32])
def test_fp16_dots_on_scaled_activation_rows(device, monkeypatch, fmt, layout, transposed, activation, block_m):
    """Config ``f16_dot``: FP8 weights on fp16 tensor-core dots, each bf16 activation row of a K step scaled by a
    power of two into fp16's range and the products scaled back. Rows from 2^-20 to 2^20 (outside fp16's range at
    both ends unless scaled), one all-zero token; against the float64 reference of the dequantized weights."""
    from fused_moe import MoEConfig, ops

    monkeypatch.setattr(ops, "_config", lambda *a: MoEConfig(block_m, 16, 32, 16, 16, 4, 1, f16_dot=True))
    ops.clear_caches()
    try:
        x, rw, rb, w1, b1, w2, b2 = make_moe(9, 64, 40, 5, dtype=torch.bfloat16, device=device, seed=41)
        x = (x.float() * torch.logspace(-20, 20, 9, base=2.0, device=x.device)[:, None]).to(torch.bfloat16)
        x[4] = 0
        w1, b1, w2 = to_layout(w1, b1, w2, layout, transposed)
        ids, wts = moe_route(x, rw, rb, 2)
        q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, transposed=transposed, dtype=fmt)
        kw = {"gate_up_layout": layout, "transposed": transposed}
        out = moe_experts(x, ids, wts, q1, b1, q2, b2, activation, gate_up_scale=s1, down_scale=s2, **kw)
        d1, d2 = _dequant(q1, s1, transposed), _dequant(q2, s2, transposed)
        xd, idd, wtd, b1d, b2d = f64(x, ids, wts, b1, b2)
        ref = moe_experts_reference(xd, idd, wtd, d1, b1d, d2, b2d, activation, **kw)
        for t in range(9):  # per token: the rows differ by 2^40 in scale
            assert_close_rel(out[t], ref[t], TOL[torch.bfloat16])
    finally:
        ops.clear_caches()


def test_fp16_dots_keep_nan_in_its_token(device, monkeypatch):
    from fused_moe import MoEConfig, ops

    monkeypatch.setattr(ops, "_config", lambda *a: MoEConfig(16, 16, 32, 16, 16, 4, 1, f16_dot=True))
    ops.clear_caches()
    try:
        x, rw, rb, w1, b1, w2, b2 = make_moe(6, 64, 40, 4, dtype=torch.bfloat16, device=device, seed=42)
        ids, wts = moe_route(x, rw, rb, 2)
        x[3, 10] = float("nan")
        q1, s1, q2, s2 = quantize_experts_fp8(w1, w2)
        out = moe_experts(x, ids, wts, q1, b1, q2, b2, "swiglu_oai", gate_up_scale=s1, down_scale=s2)
        assert out[3].isnan().all()
        assert torch.cat([out[:3], out[4:]]).isfinite().all()
    finally:
        ops.clear_caches()
