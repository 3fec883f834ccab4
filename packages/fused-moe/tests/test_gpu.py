"""GPU-only checks at gpt-oss-20b's shape (hidden 2880, 32 experts, top 4, intermediate 2880), decode and prefill,
against an fp32 reference on the GPU from the same bf16 inputs and against transformers' GptOssMLP; CUDA-graph
capture and replay without a host sync; determinism.

(The fp32 GPU reference's own error is ~1e-6, far under the bf16 output rounding the tolerance allows for.)
"""

from __future__ import annotations

import pytest
import torch
from fused_moe import FusedMoE, MoEConfig, fused_moe, moe_align, moe_reference, ops, quantize_experts_fp8
from fused_moe.reference import align_reference
from triton_ops_core.testing import assert_close_rel, relative_error

pytestmark = pytest.mark.gpu

H, INTER, E, K = 2880, 2880, 32, 4


def _gpt_oss(t, seed=0, dtype=torch.bfloat16, h=H, i=INTER, e=E):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*s, scale):
        return (torch.randn(*s, device="cuda", generator=g) * scale).to(dtype)

    return (rnd(t, h, scale=1.0), rnd(e, h, scale=h ** -0.5 * 3), rnd(e, scale=0.5),
            rnd(e, h, 2 * i, scale=3 * h ** -0.5), rnd(e, 2 * i, scale=0.5), rnd(e, i, h, scale=i ** -0.5),
            rnd(e, h, scale=0.5))


def _ref32(args, top_k=K, **kw):
    x = args[0]
    return moe_reference(*(a.float() for a in args), top_k, round_to=x.dtype, **kw)


@pytest.mark.parametrize("t", [1, 2, 8, 33, 64, 65, 512, 2048, 8192])
def test_gpt_oss_20b_shape(t):
    args = _gpt_oss(t, seed=t)
    out = fused_moe(*args, K)
    assert_close_rel(out, _ref32(args), 1e-2)


def test_long_prefill_past_16k_tokens():
    args = _gpt_oss(16400, seed=1)
    out = fused_moe(*args, K)
    assert_close_rel(out, _ref32(args), 1e-2)


@pytest.mark.parametrize("t", [1, 64, 1000])
def test_align_on_gpu(t):
    ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(t)]).int()
    for block_m in (16, 64, 128):
        want = align_reference(ids, E, block_m)
        for chunk in (None, 64):
            got = moe_align(ids, E, block_m, chunk=chunk)
            for name, a, b in zip(want._fields, got, want):
                assert torch.equal(a.cpu(), b), (name, chunk)


@pytest.mark.parametrize("t", [1, 64, 2048])
def test_qwen3_layout_on_gpu(t):
    x, rw, _, w1, _, w2, _ = _gpt_oss(t, seed=2, h=2048, i=768, e=128)
    w1c = torch.cat([w1[..., 0::2], w1[..., 1::2]], -1).transpose(1, 2).contiguous()
    w2c = w2.transpose(1, 2).contiguous()
    kw = dict(activation="silu", gate_up_layout="concatenated", transposed=False)
    out = fused_moe(x, rw, None, w1c, None, w2c, None, 8, **kw)
    ref = moe_reference(*(a.float() for a in (x, rw)), None, w1c.float(), None, w2c.float(), None, 8,
                        round_to=x.dtype, **kw)
    assert_close_rel(out, ref, 1e-2)


def test_matches_transformers_gpt_oss_mlp_full_shape():
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    from transformers import GptOssConfig

    cfg = GptOssConfig(experts_implementation="eager", num_local_experts=E, num_experts_per_tok=K)
    mlp = gpt_oss.GptOssMLP(cfg).to("cuda", torch.bfloat16)
    x, rw, rb, w1, b1, w2, b2 = _gpt_oss(64, seed=3)
    with torch.no_grad():
        for p, v in ((mlp.router.weight, rw), (mlp.router.bias, rb), (mlp.experts.gate_up_proj, w1),
                     (mlp.experts.gate_up_proj_bias, b1), (mlp.experts.down_proj, w2),
                     (mlp.experts.down_proj_bias, b2)):
            p.copy_(v)
        want, want_scores = mlp(x[None])
        got, got_scores = FusedMoE.from_module(mlp)(x[None])
    assert_close_rel(got, want, 2e-2)
    assert_close_rel(got_scores, want_scores, 2e-2)


@pytest.mark.parametrize("t", [1, 64])
def test_cuda_graph_without_host_sync(t):
    args = _gpt_oss(t, seed=4)
    x = args[0]
    fused_moe(*args, K)  # compile outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused_moe(*args, K)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x.copy_(torch.randn_like(x))  # new tokens, new routing: the replay must follow them
    graph.replay()
    assert_close_rel(out, _ref32(args), 1e-2)


def test_deterministic_and_forced_small_tiles(monkeypatch):
    args = _gpt_oss(300, seed=5)
    a, b = fused_moe(*args, K), fused_moe(*args, K)
    assert torch.equal(a, b)
    monkeypatch.setattr(ops, "_config", lambda *a: MoEConfig(16, 32, 64, 64, 64, 4, 2))
    ops.clear_caches()
    try:
        assert_close_rel(fused_moe(*args, K), _ref32(args), 1e-2)
    finally:
        ops.clear_caches()


def test_nan_token_on_gpu():
    args = _gpt_oss(8, seed=6)
    args[0][2, 100] = float("nan")
    out = fused_moe(*args, K)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3, 4, 5, 6, 7]]).all()


def _fp8_experts(args):
    """``args`` with FP8 experts (per-column scales) and, as a reference's arguments, their dequantized weights."""
    x, rw, rb, w1, b1, w2, b2 = args
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2)
    dq1, dq2 = q1.float() * s1.unsqueeze(1), q2.float() * s2.unsqueeze(1)
    return (x, rw, rb, q1, b1, q2, b2), dict(gate_up_scale=s1, down_scale=s2), (x, rw, rb, dq1, b1, dq2, b2)


@pytest.mark.parametrize("granularity", ["channel", "block"])
@pytest.mark.parametrize("t", [1, 2, 8])
def test_fp8_experts_in_the_qwen3_layout(t, granularity):
    """Qwen3-30B-A3B's experts stored as its checkpoints store them ([E, 2I, H] and [E, H, I], K contiguous) in
    E4M3, per-column scales or 128x128 blocks: the tiles the configs pick (at one token the row tile 128 deep along
    K, configs.for_weights) against the fp32 reference over the dequantized weights."""
    x, rw, _, w1, _, w2, _ = _gpt_oss(t, seed=80 + t, h=2048, i=768, e=128)
    w1c = torch.cat([w1[..., 0::2], w1[..., 1::2]], -1).transpose(1, 2).contiguous()
    w2c = w2.transpose(1, 2).contiguous()
    q1, s1, q2, s2 = quantize_experts_fp8(w1c, w2c, transposed=False, granularity=granularity)
    kw = dict(activation="silu", gate_up_layout="concatenated", transposed=False)
    out = fused_moe(x, rw, None, q1, None, q2, None, 8, gate_up_scale=s1, down_scale=s2, **kw)
    d1, d2 = (_dequantized(q, s, granularity) for q, s in ((q1, s1), (q2, s2)))
    ref = moe_reference(x.float(), rw.float(), None, d1, None, d2, None, 8, round_to=x.dtype, **kw)
    assert_close_rel(out, ref, 1e-2)


def _dequantized(q: torch.Tensor, scale: torch.Tensor, granularity: str) -> torch.Tensor:
    """fp32 ``[E, N, K]`` weights of E4M3 ``q`` and their per-row (``[E, N]``) or 128x128 block scales."""
    if granularity == "channel":
        return q.float() * scale.unsqueeze(2)
    rows = scale.repeat_interleave(128, 1)[:, :q.shape[1]]
    return q.float() * rows.repeat_interleave(128, 2)[:, :, :q.shape[2]]


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 8, 9, 64, 2048])
def test_fp8_experts_at_gpt_oss_20b_shape(t):
    """Every FP8 tile family the configs pick (CUDA-core one-row tiles at 1-8 tokens, their down GEMM split along K
    at 1, 2, 7 and 8; tensor-core tiles beyond) against the fp32 reference over the dequantized weights."""
    args, scales, deq = _fp8_experts(_gpt_oss(t, seed=40 + t))
    out = fused_moe(*args, K, **scales)
    assert_close_rel(out, _ref32(deq), 1e-2)


@pytest.mark.parametrize("t", [1, 2, 8])
@pytest.mark.parametrize("block_k", [32, 64])
def test_fp8_experts_in_the_row_layout(t, block_k, monkeypatch):
    """MoEConfig.row_layout (one-row FMA tiles in the weight tile's layout, the row loaded a step ahead; the default
    at one token) at gpt-oss-20b's shape, 32- and 64-deep K steps, 2 warps, against the other layout: the fp32
    reference over the dequantized weights, and the two layouts' results to fp32 rounding (the same products, fused
    multiply-adds)."""
    args, scales, deq = _fp8_experts(_gpt_oss(t, seed=70 + t))
    default = fused_moe(*args, K, **scales)
    chosen = ops._config(t, K, H, INTER, E, args[0].device, 1)
    assert chosen.fma and chosen.block_m == 1 and chosen.row_layout == (t == 1)
    other = chosen._replace(gate_up_block_k=block_k, down_block_k=block_k, num_warps=2, row_layout=t != 1)
    monkeypatch.setattr(ops, "_config", lambda *a: other)
    ops.clear_caches()
    try:
        out = fused_moe(*args, K, **scales)
    finally:
        ops.clear_caches()
    assert_close_rel(out, _ref32(deq), 1e-2)
    assert_close_rel(out.float(), default.float(), 1e-2)


@pytest.mark.parametrize("t", [1, 4, 64])
def test_fp8_experts_in_a_cuda_graph(t):
    args, scales, deq = _fp8_experts(_gpt_oss(t, seed=50 + t))
    x = args[0]
    fused_moe(*args, K, **scales)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(*args, K, **scales)
    x.copy_(torch.randn_like(x))
    out.fill_(float("nan"))
    graph.replay()
    assert_close_rel(out, _ref32(deq), 1e-2)


def _quant_rows_dequantized(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` through the W8A8 quantization (``fused_moe.quantize_rows_reference``), back in fp32."""
    from fused_moe import quantize_rows_reference

    q, scale = quantize_rows_reference(x)
    return q.float() * scale[:, None]


def _w8a8_reference(args, scales, ids, wts, quantize=True):
    """fp32 experts of the dequantized weights on the quantized token rows, each intermediate row rounded to bf16
    and quantized per row as the kernels do; ``quantize=False``: the token and intermediate rows as they are
    (the unquantized result the recipe approximates)."""
    x, _, _, q1, b1, q2, b2 = args
    d1 = q1.float() * scales["gate_up_scale"].unsqueeze(1)
    d2 = q2.float() * scales["down_scale"].unsqueeze(1)
    rows = _quant_rows_dequantized if quantize else torch.Tensor.float
    xq = rows(x)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        tok, slot = torch.where(ids == e)
        gu = xq[tok] @ d1[e] + b1[e].float()
        g, u = gu[:, 0::2].clamp(max=7.0), gu[:, 1::2].clamp(-7.0, 7.0)
        h = g * torch.sigmoid(1.702 * g) * (u + 1)
        y = rows(h.to(x.dtype) if quantize else h) @ d2[e] + b2[e].float()
        out.index_add_(0, tok, y * wts[tok, slot, None])
    return out


@pytest.mark.parametrize("t", [1, 4, 9, 64, 65, 2048, 8192])
def test_w8a8_experts_at_gpt_oss_20b_shape(t):
    """FP8 activations with K-major E4M3 experts (FP8 wgmma tiles at every token count) against the fp32
    emulation of both per-row quantizations, and near the bf16 experts."""
    from fused_moe import moe_experts, moe_route

    x, rw, rb, w1, b1, w2, b2 = _gpt_oss(t, seed=60 + t)
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, k_major=True)
    assert q1.stride(1) == 1 and q2.stride(1) == 1
    scales = dict(gate_up_scale=s1, down_scale=s2)
    ids, wts = moe_route(x, rw, rb, K)
    out = moe_experts(x, ids, wts, q1, b1, q2, b2, **scales, fp8_activations=True)
    emulated = _w8a8_reference((x, rw, rb, q1, b1, q2, b2), scales, ids, wts)
    # Hopper's FP8 wgmma accumulates in reduced precision (cuBLAS's fast mode), which moves some intermediate
    # elements across an E4M3 rounding boundary that the fp32 emulation rounds the other way: 1.2-1.5e-2 measured
    # on the H200 (session 28). A lost or misplaced scale is off by far more.
    assert_close_rel(out, emulated, 2.5e-2)
    # ... and the kernel is as accurate as the recipe it implements: its error to the unquantized experts (fp32
    # products of the same weights, dequantized) is the emulation's own, not more
    exact = _w8a8_reference((x, rw, rb, q1, b1, q2, b2), scales, ids, wts, quantize=False)
    assert relative_error(out, exact) <= 1.15 * relative_error(emulated, exact)
    assert_close_rel(out, moe_experts(x, ids, wts, w1, b1, w2, b2).float(), 0.1)
    # N-major weights: the same numbers
    n1, _, n2, _ = quantize_experts_fp8(w1, w2)
    assert torch.equal(out, moe_experts(x, ids, wts, n1, b1, n2, b2, **scales, fp8_activations=True))


@pytest.mark.parametrize("t", [1, 8, 64])
def test_w8a8_decode_tiles_swapped_and_not(t, monkeypatch):
    """At decode W8A8 takes MoEConfig.swap_ab (the weights as wgmma's 64-row operand, 16-token tiles); the 64-token
    tiles with the tokens as that operand give the recipe's result too, as the default tiles give it (the tensor
    cores' reduced-precision sums may differ in order), NaN kept to its token."""
    from fused_moe import moe_experts, moe_route, select_config

    x, rw, rb, w1, b1, w2, b2 = _gpt_oss(t, seed=90 + t)
    if t > 1:
        x[1, 11] = float("nan")
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, k_major=True)
    scales = dict(gate_up_scale=s1, down_scale=s2)
    ids, wts = moe_route(x, rw, rb, K)
    default = moe_experts(x, ids, wts, q1, b1, q2, b2, **scales, fp8_activations=True)
    chosen = select_config(t, K, H, INTER, E, x.device, 1, True)
    assert chosen.swap_ab and chosen.block_m == 16
    unswapped = chosen._replace(swap_ab=False, block_m=64, gate_up_block_n=32, down_block_n=32)
    monkeypatch.setattr(ops, "_config", lambda *a: unswapped)
    ops.clear_caches()
    try:
        out = moe_experts(x, ids, wts, q1, b1, q2, b2, **scales, fp8_activations=True)
    finally:
        ops.clear_caches()
    ok = torch.ones(t, dtype=torch.bool, device=x.device)
    if t > 1:
        ok[1] = False
        assert out[1].isnan().all()
    assert out[ok].isfinite().all()
    assert_close_rel(out[ok], _w8a8_reference((x[ok], rw, rb, q1, b1, q2, b2), scales, ids[ok], wts[ok]), 2.5e-2)
    assert_close_rel(out[ok].float(), default[ok].float(), 2e-2)


@pytest.mark.parametrize("t", [1, 64])
def test_w8a8_in_a_cuda_graph_and_nan_token(t):
    x, rw, rb, w1, b1, w2, b2 = _gpt_oss(t, seed=70 + t)
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, k_major=True)
    kw = dict(gate_up_scale=s1, down_scale=s2, fp8_activations=True)
    fused_moe(x, rw, rb, q1, b1, q2, b2, K, **kw)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, rw, rb, q1, b1, q2, b2, K, **kw)
    x.copy_(torch.randn_like(x))
    x[0, 5] = float("nan")
    out.fill_(float("nan"))
    graph.replay()
    expected = fused_moe(x, rw, rb, q1, b1, q2, b2, K, **kw)
    assert out[0].isnan().all() and torch.equal(out[1:], expected[1:]) and out[1:].isfinite().all()


@pytest.mark.parametrize("mode,t", [("quant_x_with_align", 1), ("quant_x_with_align", 64),
                                    ("quant_in_gemm", 1), ("quant_in_gemm", 4), ("quant_in_gemm", 8),
                                    ("quant_h_in_down", 1), ("quant_h_in_down", 9), ("quant_h_in_down", 64),
                                    ("quant_h_in_down", 2048)])
def test_w8a8_quantized_inside_the_gemms_equals_the_launches(mode, t, monkeypatch):
    """W8A8 with the activations quantized elsewhere (MoEConfig.quant_x_with_align: the tokens' rows by programs of
    the grouping's launch; quant_in_gemm, off by default: measured slower; quant_h_in_down: the intermediate inside
    the down GEMM, its scales from the gate/up GEMM's shares): the same bits as the two row-quantization launches
    with the same tiles, at gpt-oss-20b's shape."""
    from fused_moe import moe_experts, moe_route, select_config

    x, rw, rb, w1, b1, w2, b2 = _gpt_oss(t, seed=80 + t)
    if t > 1:
        x[1, 7] = float("nan")
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, k_major=True)
    ids, wts = moe_route(x, rw, rb, K)
    chosen = select_config(t, K, H, INTER, E, x.device, 1, True)
    outs = []
    launches = chosen._replace(quant_in_gemm=False, quant_h_in_down=False, quant_x_with_align=False)
    if mode == "quant_in_gemm":  # (which takes the tokens as the 64-row operand: compared with the launches so)
        launches = launches._replace(swap_ab=False, block_m=64, gate_up_block_n=32, down_block_n=32)
    for cfg in (launches._replace(**{mode: True}), launches):
        monkeypatch.setattr(ops, "_config", lambda *a, cfg=cfg: cfg)
        ops.clear_caches()
        outs.append(moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=s1, down_scale=s2, fp8_activations=True))
    ops.clear_caches()
    assert torch.equal(outs[0].nan_to_num(7.0), outs[1].nan_to_num(7.0))
    if t > 1:
        assert outs[0][1].isnan().all() and torch.cat([outs[0][:1], outs[0][2:]]).isfinite().all()


@pytest.mark.parametrize("h,inter,experts,top_k", [(H, INTER, E, K), (2048, 768, 128, 8)],
                         ids=["gpt-oss", "qwen3-30b-a3b-sizes"])
@pytest.mark.parametrize("t", [1, 8, 64])
def test_reductions_in_the_launch_before_give_the_same_bits(h, inter, experts, top_k, t):
    # Plain eager calls route in one launch (the split router GEMM's last program selects) and, with FP8 experts at
    # 1 to 8 tokens, add each token's expert rows in the down GEMM; the registered op's calls (torch.compile, CUDA
    # graphs) route in two launches; with both switches off, the combine launch returns too. All the same bits (the
    # chosen experts' weights are summed in selection order in both routing kernels), counters back at zero.
    from triton_ops_core import scratch

    args, scales, _ = _fp8_experts(_gpt_oss(t, seed=70 + t, h=h, i=inter, e=experts))
    x, rw, rb, q1, b1, q2, b2 = args
    residual = torch.randn_like(x)

    def both(op=False):
        route = torch.ops.triton_ops.moe_route if op else ops.moe_route
        ids, wts = route(x, rw, rb, top_k, True) if op else route(x, rw, rb, top_k)
        out = ops.moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=scales["gate_up_scale"],
                              down_scale=scales["down_scale"], residual=residual)
        return ids, wts, out

    eager = both()
    assert all(torch.equal(a, b) for a, b in zip(both(), eager))
    assert all(torch.equal(a, b) for a, b in zip(both(op=True), eager))
    for name in (ops._ROUTE_COUNTERS, ops._DOWN_COUNTERS):
        kept = [buf for key, buf in scratch._BUFFERS.items() if key[0] == name]
        assert not any(buf.any() for buf in kept)
    try:
        ops.ROUTE_IN_ONE_LAUNCH = ops.COMBINE_IN_DOWN = False
        ops.clear_caches()
        assert all(torch.equal(a, b) for a, b in zip(both(), eager))
    finally:
        ops.ROUTE_IN_ONE_LAUNCH = ops.COMBINE_IN_DOWN = True
        ops.clear_caches()


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("t", [1, 8])
def test_pdl_launches_and_prefetches_give_the_same_bits(transposed, fp8, t, monkeypatch):
    # With PDL (the triggers at the GEMMs' loop ends, one token's route released), with and without the router's
    # and the down GEMM's weights asked of L2 before their wait (N-contiguous gpt-oss weights and K-contiguous ones),
    # eager and replayed from a CUDA graph: the bits of the launches without PDL. Where the hardware has no PDL the
    # switch changes nothing and the test still holds.
    from triton_ops_core import pdl

    args = list(_gpt_oss(t, seed=90 + t))
    if not transposed:
        args[3], args[5] = args[3].transpose(1, 2).contiguous(), args[5].transpose(1, 2).contiguous()
    kw = {"transposed": transposed}
    if fp8:
        args[3], s1, args[5], s2 = quantize_experts_fp8(args[3], args[5], transposed=transposed)
        kw.update(gate_up_scale=s1, down_scale=s2)
    x = args[0]
    residual = torch.randn_like(x)

    def layer():
        return fused_moe(*args, K, residual=residual, **kw)

    with pdl.override(False):
        expected = layer()
    for tiles in (0, 2):
        monkeypatch.setattr(ops, "PREFETCH_TILES", tiles)
        with pdl.override(True):
            assert torch.equal(layer(), expected)
            graph = torch.cuda.CUDAGraph()
            out = layer()  # (planned and compiled before the capture)
            with torch.cuda.graph(graph):
                out = layer()
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, expected)
