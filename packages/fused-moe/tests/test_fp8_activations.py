"""FP8 activations with E4M3 experts (W8A8, ``fp8_activations=True``): the per-row quantization of the tokens and of
the intermediate rows against a PyTorch emulation (codes and scales bit for bit), the experts against a float64
reference built from the emulated quantizations, K-major weight storage, non-finite rows, the module and the
converter, errors, the registered op (opcheck, compile). Under the interpreter on CPU, compiled on a GPU."""

from __future__ import annotations

import pytest
import torch
from _moe_helpers import f64, make_moe, to_layout
from fused_moe import (
    FusedMoE,
    convert_experts_to_fp8,
    fused_moe,
    moe_experts,
    moe_experts_reference,
    moe_route,
    quantize_experts_fp8,
    select_config,
    uses_fp8_activations,
)
from fused_moe import ops as moe_ops
from fused_moe.configs import for_layout
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.testing import assert_close_rel, normalized_like_the_prologue, opcheck_op

EXPERTS = torch.ops.triton_ops.moe_experts.default
E4M3 = torch.float8_e4m3fn


def quant_rows_emulated(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's convention in PyTorch: ``(E4M3 codes, fp32 scales)`` per row; NaN scale for non-finite rows."""
    xf = x.float().cpu()
    finite = xf.isfinite()
    amax = torch.where(finite, xf.abs(), torch.zeros_like(xf)).amax(dim=-1)
    scale = torch.where(amax > 0, torch.clamp(amax / 448.0, min=2.0 ** -126), torch.ones_like(amax))
    q = (xf * (1.0 / scale)[:, None]).to(E4M3)
    scale = torch.where(finite.all(dim=-1), scale, torch.full_like(scale, float("nan")))
    return q, scale


def dequant_rows(x: torch.Tensor) -> torch.Tensor:
    q, s = quant_rows_emulated(x)
    return q.double() * s.double()[:, None]


def _act(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu_oai":
        g, u = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
        return g * torch.sigmoid(1.702 * g) * (u + 1)
    return torch.nn.functional.silu(gate) * up


def w8a8_reference(x, ids, wts, q1, s1, b1, q2, s2, b2, activation, layout, transposed):
    """float64 experts of the dequantized weights on the dequantized token rows; each pair's intermediate row
    rounded to ``x``'s dtype (what the kernel writes) and quantized per row, as the kernels do."""
    d1 = q1.double().cpu() * s1.double().cpu().unsqueeze(1 if transposed else 2)
    d2 = q2.double().cpu() * s2.double().cpu().unsqueeze(1 if transposed else 2)
    if not transposed:  # as [E, K, N]
        d1, d2 = d1.transpose(1, 2), d2.transpose(1, 2)
    xd = dequant_rows(x)
    ids64, wts64, b1d, b2d = f64(ids, wts, b1, b2)
    inter = d2.shape[1]
    out = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float64)
    for r in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids64[r, j])
            gu = xd[r] @ d1[e] + (b1d[e] if b1d is not None else 0)
            gate, up = (gu[0::2], gu[1::2]) if layout == "interleaved" else gu.split(inter)
            h = _act(gate, up, activation).to(x.dtype)[None]
            y = dequant_rows(h)[0] @ d2[e] + (b2d[e] if b2d is not None else 0)
            out[r] += wts64[r, j] * y
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantized_rows_match_the_emulation(device, dtype):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(37, 300, generator=gen) * torch.logspace(-3, 3, 37)[:, None]).to(dtype)
    x[4] = 0.0  # all zero: scale 1, codes 0
    x[5, 7] = float("nan")
    x[6, 0] = float("inf")
    x[7, 11] = -float("inf")
    x = x.to(device)
    plan = moe_ops._quant_rows_plan(x.shape[0], x.shape[1], x.stride(0), x.device)
    q, s = moe_ops._quantized_rows(plan, x, x)
    q_ref, s_ref = quant_rows_emulated(x)
    assert q.dtype == E4M3 and s.dtype == torch.float32 and q.shape == x.shape and s.shape == (37,)
    assert torch.equal(s.cpu().nan_to_num(-1.0), s_ref.nan_to_num(-1.0))
    assert s.cpu()[5:8].isnan().all() and not s.cpu()[:5].isnan().any() and not s.cpu()[8:].isnan().any()
    assert s.cpu()[4] == 1.0
    finite_rows = torch.ones(37, dtype=torch.bool)
    finite_rows[5:8] = False
    assert torch.equal(q.cpu()[finite_rows].view(torch.uint8), q_ref[finite_rows].view(torch.uint8))
    # each row's largest finite magnitude lands on E4M3's largest value
    peaks = q.cpu()[finite_rows].float().abs().amax(dim=1)
    assert peaks[4] == 0 and (peaks[[i for i in range(34) if i != 4]] == 448.0).all()


def test_quantized_rows_of_a_strided_view(device):
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(9, 200, generator=gen).to(device)
    x = base[:, 40:190]  # rows 200 apart, 150 columns
    plan = moe_ops._quant_rows_plan(x.shape[0], x.shape[1], x.stride(0), x.device)
    q, s = moe_ops._quantized_rows(plan, x, x)
    q_ref, s_ref = quant_rows_emulated(x)
    assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout,transposed,bias", [("interleaved", True, True), ("concatenated", False, False)])
@pytest.mark.parametrize("t", [1, 9])
def test_w8a8_experts_match_the_emulated_reference(device, dtype, layout, transposed, bias, t):
    # (hidden 96 and intermediate 40: the last K step of both GEMMs masked, under the interpreter and on a GPU)
    x, rw, rb, w1, b1, w2, b2 = make_moe(t, 96, 40, 6, dtype=dtype, device=device, seed=30 + t, bias=bias)
    w1, b1, w2 = to_layout(w1, b1, w2, layout, transposed)
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, transposed=transposed, k_major=True)
    ids, wts = moe_route(x, rw, rb, 2)
    activation = "swiglu_oai" if layout == "interleaved" else "silu"
    kw = dict(gate_up_layout=layout, transposed=transposed, gate_up_scale=s1, down_scale=s2)
    out = moe_experts(x, ids, wts, q1, b1, q2, b2, activation, fp8_activations=True, **kw)
    assert out.dtype == dtype and out.shape == x.shape and out.isfinite().all()
    ref = w8a8_reference(x, ids, wts, q1, s1, b1, q2, s2, b2, activation, layout, transposed)
    # (the package's PyTorch twin agrees with this test's own loop)
    d1 = q1.double().cpu() * s1.double().cpu().unsqueeze(1 if transposed else 2)
    d2 = q2.double().cpu() * s2.double().cpu().unsqueeze(1 if transposed else 2)
    xd, idd, wtd, b1d, b2d = f64(x, ids, wts, b1, b2)
    twin = moe_experts_reference(xd, idd, wtd, d1, b1d, d2, b2d, activation, gate_up_layout=layout,
                                 transposed=transposed, round_intermediate=dtype, fp8_activations=True)
    assert_close_rel(twin, ref, 1e-6)
    # the reference rounds and quantizes the intermediate rows as the kernel does, up to accumulation order (which
    # may move an element across an E4M3 rounding boundary) and the output's rounding. On Hopper the FP8 dot also
    # accumulates in the tensor core's reduced precision (../notes: cuBLAS's fast mode), enough to move one or two
    # of these 720 intermediate elements across a boundary (an E4M3 step is 6-12 %): 2.0e-3 and 4.5e-3 measured
    # on the H200 in fp32 (session 28), where the interpreter's exact sums stay under 1e-3
    tol = 2e-3 if dtype == torch.float32 else 8e-3
    assert_close_rel(out, ref, 1.5e-2 if device.type == "cuda" else tol)
    # the same numbers from weights stored N-major (only slower on a GPU)
    n1, _, n2, _ = quantize_experts_fp8(w1, w2, transposed=transposed)
    assert torch.equal(moe_experts(x, ids, wts, n1, b1, n2, b2, activation, fp8_activations=True, **kw), out)
    # and within FP8's roundings of the weights and of the activations of the unquantized experts
    full = moe_experts(x, ids, wts, w1, b1, w2, b2, activation, gate_up_layout=layout, transposed=transposed)
    assert_close_rel(out, full.double().cpu(), 0.12)
    weight_only = moe_experts(x, ids, wts, q1, b1, q2, b2, activation, **kw)
    assert not torch.equal(out, weight_only)  # the activations were quantized


def test_w8a8_one_token_needs_no_grouping_or_combine_launch(device, monkeypatch):
    """W8A8 at one token: its pairs one a tile in pair order (ops.UNGROUPED_ONE_TOKEN), the row quantized by a launch
    of its own, the combine in the down GEMM; the same bits as grouping them first (the grouping launch quantizing
    the row)."""
    from _moe_helpers import NotLaunched, counters_at_rest
    from fused_moe import _kernels as K

    x, rw, rb, w1, b1, w2, b2 = make_moe(1, 96, 40, 6, dtype=torch.bfloat16, device=device, seed=39)
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, k_major=True)
    ids, wts = moe_route(x, rw, rb, 3)

    def run():
        moe_ops.clear_caches()
        try:
            return moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=s1, down_scale=s2, fp8_activations=True)
        finally:
            moe_ops.clear_caches()

    with monkeypatch.context() as m:
        for name in ("_align_kernel", "_align_quant_kernel", "_combine_kernel"):
            m.setattr(K, name, NotLaunched(name))
        out = run()
        assert counters_at_rest(moe_ops._DOWN_COUNTERS)
    with monkeypatch.context() as m:
        m.setattr(moe_ops, "UNGROUPED_ONE_TOKEN", False)
        assert torch.equal(run(), out)
    ref = w8a8_reference(x, ids, wts, q1, s1, b1, q2, s2, b2, "swiglu_oai", "interleaved", True)
    assert_close_rel(out, ref, 1.5e-2 if device.type == "cuda" else 8e-3)


def test_k_major_storage(device):
    _, _, _, w1, _, w2, _ = make_moe(1, 64, 24, 3, device=device, seed=31)
    for transposed in (True, False):
        a1, b1_, a2, b2_ = quantize_experts_fp8(*to_layout(w1, None, w2, "interleaved", transposed)[::2],
                                                transposed=transposed, k_major=True)
        n1, c1, n2, c2 = quantize_experts_fp8(*to_layout(w1, None, w2, "interleaved", transposed)[::2],
                                              transposed=transposed)
        k_dim = 1 if transposed else 2
        for a, n in ((a1, n1), (a2, n2)):
            assert a.shape == n.shape and a.stride(k_dim) == 1 and torch.equal(a.view(torch.uint8),
                                                                                 n.view(torch.uint8))
        assert torch.equal(b1_, c1) and torch.equal(b2_, c2)


def test_non_finite_token_rows_come_out_nan(device):
    x, rw, rb, w1, b1, w2, b2 = make_moe(6, 64, 40, 4, dtype=torch.bfloat16, device=device, seed=32)
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, k_major=True)
    ids, wts = moe_route(x, rw, rb, 2)
    clean = moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=s1, down_scale=s2, fp8_activations=True)
    x = x.clone()
    x[2, 10] = float("nan")
    x[4, 3] = float("inf")
    out = moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=s1, down_scale=s2, fp8_activations=True)
    assert out[2].isnan().all() and out[4].isnan().all()
    others = [0, 1, 3, 5]
    assert torch.equal(out[others], clean[others])  # rows are quantized on their own


@pytest.mark.parametrize("t", [1, 9])
def test_norm_and_residual_equal_the_moe_of_the_normalized_input(device, t):
    """norm_weight=: the rows normalized inside the quantization launch, bit for bit as normalized outside by the
    prologue's arithmetic (fp16: the interpreter's fp32 -> bf16 cast truncates, which would differ from torch's)."""
    x, rw, rb, w1, b1, w2, b2 = make_moe(t, 64, 40, 4, dtype=torch.float16, device=device, seed=33 + t)
    x = x * 3 + 0.5
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, k_major=True)
    nw = (torch.rand(64, generator=torch.Generator().manual_seed(t)) + 0.5).to(device, torch.float16)
    kw = dict(gate_up_scale=s1, down_scale=s2, fp8_activations=True)
    fused = fused_moe(x, rw, rb, q1, b1, q2, b2, 2, norm_weight=nw, norm_eps=1e-5, residual=x, **kw)
    outside = fused_moe(normalized_like_the_prologue(x, nw, 1e-5), rw, rb, q1, b1, q2, b2, 2, residual=x, **kw)
    assert torch.equal(fused, outside)
    assert not torch.equal(fused, fused_moe(x, rw, rb, q1, b1, q2, b2, 2, residual=x, **kw))


def test_module_and_converter(device):
    x, rw, rb, w1, b1, w2, b2 = make_moe(5, 32, 16, 4, dtype=torch.bfloat16, device=device, seed=34)
    module = FusedMoE(32, 16, 4, 2, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        for p, v in ((module.router.weight, rw), (module.router.bias, rb), (module.experts.gate_up_proj, w1),
                     (module.experts.gate_up_proj_bias, b1), (module.experts.down_proj, w2),
                     (module.experts.down_proj_bias, b2)):
            p.copy_(v)
    assert not uses_fp8_activations(module.experts)
    module.quantize_experts_fp8(fp8_activations=True)
    e = module.experts
    assert uses_fp8_activations(e) and e.gate_up_proj.stride(1) == 1 and e.down_proj.stride(1) == 1
    with torch.no_grad():
        out, scores = module(x)
    ref, ref_scores = fused_moe(x, rw, rb, e.gate_up_proj, b1, e.down_proj, b2, 2, return_router_scores=True,
                                gate_up_scale=e.gate_up_scale, down_scale=e.down_scale, fp8_activations=True)
    assert torch.equal(out, ref) and torch.equal(scores, ref_scores)
    assert "fp8 activations per row" in repr(module)
    other = FusedMoE(32, 16, 4, 2, device=device)
    with pytest.raises(InvalidArgumentError, match="fp8_activations: E4M3"):
        convert_experts_to_fp8(other.experts, torch.float8_e5m2, fp8_activations=True)
    with pytest.raises(InvalidArgumentError, match="fp8_activations: expected a bool"):
        convert_experts_to_fp8(other.experts, fp8_activations=1)
    convert_experts_to_fp8(other.experts)
    assert not uses_fp8_activations(other.experts)


def test_errors(device):
    x, rw, rb, w1, b1, w2, b2 = make_moe(3, 32, 16, 4, device=device, seed=35)
    ids, wts = moe_route(x, rw, rb, 2)
    with pytest.raises(InvalidArgumentError, match="fp8_activations: E4M3 activations go with float8_e4m3fn"):
        moe_experts(x, ids, wts, w1, b1, w2, b2, fp8_activations=True)
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, dtype=torch.float8_e5m2)
    with pytest.raises(InvalidArgumentError, match="float8_e5m2"):
        moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=s1, down_scale=s2, fp8_activations=True)
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2)
    with pytest.raises(InvalidArgumentError, match="fp8_activations: expected a bool"):
        moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=s1, down_scale=s2, fp8_activations="yes")


def test_opcheck_and_compile(device):
    x, rw, rb, w1, b1, w2, b2 = make_moe(5, 32, 16, 6, device=device, seed=36)
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, k_major=True)
    ids, wts = moe_route(x, rw, rb, 2)
    assert "fp8_activations" in str(EXPERTS._schema)
    opcheck_op(EXPERTS, (x, ids, wts, q1, b1, q2, b2, "swiglu_oai", "interleaved", True, 1.702, 7.0, s1, s2, None,
                         None, 0.0, True))
    kw = dict(gate_up_scale=s1, down_scale=s2, fp8_activations=True)
    eager = moe_experts(x, ids, wts, q1, b1, q2, b2, **kw)
    fn = torch.compile(lambda x: moe_experts(x, ids, wts, q1, b1, q2, b2, **kw), fullgraph=True,
                       backend="aot_eager")
    assert torch.equal(fn(x), eager)


@pytest.mark.parametrize("tokens", [1, 8, 64, 2048])
def test_w8a8_configs_on_a_gpu(tokens):
    # (a pure-Python rule: the GPU branch of the heuristic, no GPU needed)
    cfg = select_config(tokens, 4, 2880, 2880, 32, True, 1, True)
    assert not cfg.fma and not cfg.f16_dot
    assert not cfg.quant_in_gemm  # measured slower than the two row-quantization launches (configs)
    if tokens <= 64:  # decode: the weights as the 64-row wgmma operand, 16-token tiles (measured on an H100)
        assert cfg.swap_ab and cfg.block_m == 16
        assert (cfg.gate_up_block_n, cfg.down_block_n, cfg.num_stages) == (32, 64, 6)
        # interleaved gate/up: one tile of 64 weight rows; concatenated: two, each of 64 rows
        assert for_layout(cfg, True) == cfg
        assert for_layout(cfg, False) == cfg._replace(gate_up_block_n=64)
    else:  # prefill: 64-token tiles, the tokens the 64-row operand
        assert not cfg.swap_ab and cfg.block_m == 64
        assert cfg.down_block_n == 128 and cfg.num_stages == 3
    assert cfg.gate_up_block_k == cfg.down_block_k == 128  # (2880 = 22.5 * 128: the last K step masked)
    assert cfg.down_split_k == (2 if tokens == 1 else 1)
    # K steps no longer than K, and no shorter than Hopper's FP8 dot takes
    small = select_config(tokens, 4, 64, 16, 8, True, 1, True)
    assert (small.gate_up_block_k, small.down_block_k) == (64, 32)


def test_no_tokens_and_leading_dimensions(device):
    x, rw, rb, w1, b1, w2, b2 = make_moe(6, 32, 16, 4, dtype=torch.bfloat16, device=device, seed=37)
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, k_major=True)
    kw = dict(gate_up_scale=s1, down_scale=s2, fp8_activations=True)
    assert fused_moe(x[:0], rw, rb, q1, b1, q2, b2, 2, **kw).shape == (0, 32)
    flat = fused_moe(x, rw, rb, q1, b1, q2, b2, 2, **kw)
    batched = fused_moe(x.view(2, 3, 32), rw, rb, q1, b1, q2, b2, 2, **kw)
    assert batched.shape == (2, 3, 32) and torch.equal(batched.view(6, 32), flat)


@pytest.mark.parametrize("layout,transposed", [("interleaved", True), ("concatenated", False)])
@pytest.mark.parametrize("t,block_m", [(1, 64), (5, 16), (40, 16)])
def test_quantized_inside_the_gemms_equals_the_launches_before_them(device, monkeypatch, layout, transposed, t,
                                                                    block_m):
    """The W8A8 activations quantized elsewhere give the same bits as the two row-quantization launches: the tokens'
    rows by programs of the grouping's launch (MoEConfig.quant_x_with_align, on by default), MoEConfig.quant_in_gemm
    (each GEMM finds its tile's row scales and quantizes its tiles in registers) and MoEConfig.quant_h_in_down (the
    down GEMM quantizes the intermediate with scales from the shares the gate/up GEMM writes: 3 column tiles of 16
    over 40 intermediate columns, the last one partial). With the norm prologue and the residual, a NaN token, the
    down GEMM split along K, experts of several tiles (40 tokens in 16-row tiles)."""
    from fused_moe import MoEConfig

    x, rw, rb, w1, b1, w2, b2 = make_moe(t, 64, 40, 6, dtype=torch.bfloat16, device=device, seed=40 + t)
    w1, b1, w2 = to_layout(w1, b1, w2, layout, transposed)
    if t > 1:
        x[1, 3] = float("nan")
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, transposed=transposed, k_major=True)
    nw = (torch.rand(64, generator=torch.Generator().manual_seed(t)) + 0.5).to(device, torch.bfloat16)
    ids, wts = moe_route(x, rw, rb, 2)
    activation = "swiglu_oai" if layout == "interleaved" else "silu"
    kw = dict(gate_up_layout=layout, transposed=transposed, gate_up_scale=s1, down_scale=s2, fp8_activations=True)
    outs = []
    modes = [{"quant_x_with_align": False}, {}, {"swap_ab": True}, {"swap_ab": True, "quant_h_in_down": True}]
    if t < 40:  # (the many-tile case once per kernel path: CI time)
        modes += [{"quant_in_gemm": True}, {"quant_h_in_down": True}]
    for mode in modes:
        # (K steps of 32: Hopper's FP8 dot takes no fewer)
        cfg = MoEConfig(block_m, 16, 32, 16, 32, 4, 1, down_split_k=2, **mode)
        monkeypatch.setattr(moe_ops, "_config", lambda *a, cfg=cfg: cfg)
        moe_ops.clear_caches()
        plain = moe_experts(x, ids, wts, q1, b1, q2, b2, activation, **kw)
        normed = moe_experts(x, ids, wts, q1, b1, q2, b2, activation, norm_weight=nw, norm_eps=1e-5, residual=x, **kw)
        outs.append((plain, normed))
    moe_ops.clear_caches()
    for mode, other in zip(modes, outs, strict=True):
        # On Hopper the FP8 wgmma accumulates in reduced precision, in an order that depends on which operand is the
        # 64-row one: swapped products agree bit for bit with each other, and with the unswapped ones to a rounding
        # (the interpreter's exact sums: bit for bit)
        same = outs[2] if mode.get("swap_ab") else outs[0]
        for a, b, c in zip(same, other, outs[0], strict=True):
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
            if device.type == "cuda":  # (an E4M3 step is 6-12 %: a few elements move by one, the whole by little)
                assert_close_rel(b.nan_to_num(7.0).float(), c.nan_to_num(7.0).float(), 2.5e-2)
            else:
                assert torch.equal(b.nan_to_num(7.0), c.nan_to_num(7.0))
            if t > 1:
                assert b[1].isnan().all() and torch.cat([b[:1], b[2:]]).isfinite().all()
    assert not torch.equal(outs[0][0], outs[0][1])  # (the norm and the residual change the result)
    assert not torch.equal(outs[0][0], outs[0][1])
