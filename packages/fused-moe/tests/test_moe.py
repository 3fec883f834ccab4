"""fused_moe / moe_experts against the float64 PyTorch twin: every top_k, token counts 1..64 and a prefill tile
walk, experts with no token, all tokens on one expert, both gate/up layouts and orientations, the three
activations, no biases, bf16, strided weights, NaN staying in its token, determinism."""

from __future__ import annotations

import pytest
import torch
from _moe_helpers import TOL, NotLaunched, counters_at_rest, f64, make_moe, to_layout
from fused_moe import MoEConfig, fused_moe, moe_experts, moe_experts_reference, moe_reference, ops, route_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_ops_core.testing import assert_close_rel, device_for_tests

DEVICE = device_for_tests()


def _check(x, rw, rb, w1, b1, w2, b2, top_k, tol=None, **kw):
    out = fused_moe(x, rw, rb, w1, b1, w2, b2, top_k, **kw)
    rt = x.dtype if x.dtype != torch.float32 else None
    ref = moe_reference(*f64(x, rw, rb, w1, b1, w2, b2), top_k, round_to=rt, **kw)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close_rel(out, ref, tol if tol is not None else TOL[x.dtype])
    return out


@pytest.mark.parametrize("t,top_k", [(1, 1), (1, 4), (7, 2), (33, 3), (64, 4)])
def test_tokens_and_top_k(device, t, top_k):
    _check(*make_moe(t, 32, 24, 8, device=device, seed=100 * t + top_k), top_k)


def test_most_experts_get_no_token(device):
    # one token, 32 experts: 28 of them have no row; their weights are poisoned and must never be read
    x, rw, rb, w1, b1, w2, b2 = make_moe(1, 32, 16, 32, device=device, seed=1)
    ids, _ = route_reference(x, rw, rb, 4)
    idle = [e for e in range(32) if e not in ids.flatten().tolist()]
    w1[idle] = float("nan")
    w2[idle] = float("nan")
    b1[idle] = float("nan")
    b2[idle] = float("nan")
    out = _check(x, rw, rb, w1, b1, w2, b2, 4)
    assert torch.isfinite(out).all()


def test_all_tokens_on_one_expert_many_tiles(device, monkeypatch):
    # 48 tokens on experts {2, 5}, tiles of 16 rows: several tiles per expert, the last one partial
    monkeypatch.setattr(ops, "_config", lambda *a: MoEConfig(16, 16, 16, 16, 16, 4, 1))
    x, rw, rb, w1, b1, w2, b2 = make_moe(48, 32, 24, 8, device=device, seed=2)
    rb = torch.full_like(rb, -30.0)
    rb[2], rb[5] = 30.0, 29.0
    _check(x, rw, rb, w1, b1, w2, b2, 2)


def test_prefill_tiles_and_odd_sizes(device, monkeypatch):
    # 70 tokens, tiles of 16 rows and odd hidden / intermediate sizes (masked K and N edges); the grouping in
    # chunks of 64 pairs (the prefill path: count, scan, scatter)
    monkeypatch.setattr(ops, "_config", lambda *a: MoEConfig(16, 16, 16, 32, 16, 4, 1))
    monkeypatch.setattr(ops, "_INTERPRETER_ALIGN_CHUNK", 64)
    _check(*make_moe(70, 40, 20, 5, device=device, seed=3), 2)


@pytest.mark.parametrize("split,fma", [(2, False), (3, False), (5, True)])
def test_down_projection_split_along_k(device, monkeypatch, split, fma):
    # the down GEMM's K (intermediate 40, steps of 16: 3 steps) over 2, 3 and 5 programs per tile (5: two splits
    # get no step and write zeros, or the bias); the combine adds k x split rows per token in a fixed order
    block_m = 1 if fma else 16
    monkeypatch.setattr(ops, "_config",
                        lambda *a: MoEConfig(block_m, 16, 16, 16, 16, 4, 1, fma=fma, down_split_k=split))
    out = _check(*make_moe(9, 24, 40, 6, device=device, seed=10 + split), 3)
    again = _check(*make_moe(9, 24, 40, 6, device=device, seed=10 + split), 3)
    assert torch.equal(out, again)  # deterministic: no atomics, a fixed order of the partial sums


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_needs_no_grouping_or_combine_launch(device, monkeypatch, split, dtype):
    """One token on 16-row tensor-core tiles (bf16 experts at decode): its k pairs go one a tile in pair order
    (ops.UNGROUPED_ONE_TOKEN), so neither the grouping nor the combine launches; the same bits as grouping them
    first, the residual added once, and the reference's result. Ids given by hand that repeat an expert, or fall
    outside the experts (that pair adds nothing), are still right."""
    from fused_moe import _kernels as K

    monkeypatch.setattr(ops, "_config", lambda *a: MoEConfig(16, 16, 16, 16, 16, 4, 1, down_split_k=split))
    x, rw, rb, w1, b1, w2, b2 = make_moe(1, 40, 24, 6, dtype=dtype, device=device, seed=60 + split)
    residual = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(dtype).to(device)
    ids, wts = route_reference(x, rw, rb, 3)
    ids, wts = ids.to(device), wts.to(device)

    def run(ids=ids, wts=wts):
        ops.clear_caches()
        try:
            return moe_experts(x, ids, wts, w1, b1, w2, b2, residual=residual)
        finally:
            ops.clear_caches()

    with monkeypatch.context() as m:
        m.setattr(K, "_align_kernel", NotLaunched("the grouping"))
        m.setattr(K, "_combine_kernel", NotLaunched("the combine"))
        out = run()
        assert counters_at_rest(ops._DOWN_COUNTERS)
        repeated = torch.tensor([[ids[0, 0], ids[0, 0], ids[0, 2]]], dtype=ids.dtype, device=device)
        out_repeated = run(repeated)
        outside = ids.clone()
        outside[0, 1] = 6  # one past the last expert
        out_outside = run(outside)
        assert counters_at_rest(ops._DOWN_COUNTERS)
    with monkeypatch.context() as m:
        m.setattr(ops, "UNGROUPED_ONE_TOKEN", False)
        assert torch.equal(run(), out)
    rt = dtype if dtype != torch.float32 else None
    xd, wd, w1d, b1d, w2d, b2d, rd = f64(x, wts, w1, b1, w2, b2, residual)
    for got, route, weights in ((out, ids, wd), (out_repeated, repeated, wd), (out_outside, ids, wd.clone())):
        if got is out_outside:
            weights[0, 1] = 0.0  # the pair outside the experts (its valid id here, weighted 0): nothing of it
        ref = moe_experts_reference(xd, route.cpu(), weights, w1d, b1d, w2d, b2d, "swiglu_oai",
                                    round_intermediate=rt)
        assert not got.isnan().any()
        assert_close_rel(got, ref + rd, TOL[dtype])


@pytest.mark.parametrize("layout,transposed,activation", [
    ("interleaved", True, "swiglu_oai"), ("interleaved", False, "silu"), ("concatenated", True, "gelu"),
    ("concatenated", False, "swiglu_oai"), ("concatenated", False, "silu"), ("concatenated", False, "gelu_tanh"),
    ("interleaved", True, "gelu_tanh")])
def test_layouts_and_activations(device, layout, transposed, activation):
    x, rw, rb, w1, b1, w2, b2 = make_moe(9, 32, 24, 8, device=device, seed=4)
    w1, b1, w2 = to_layout(w1, b1, w2, layout, transposed)
    _check(x, rw, rb, w1, b1, w2, b2, 3, activation=activation, gate_up_layout=layout, transposed=transposed)


def test_qwen3_style_no_bias_full_softmax(device):
    x, rw, _, w1, _, w2, _ = make_moe(13, 32, 16, 16, device=device, seed=5, bias=False)
    w1, _, w2 = to_layout(w1, None, w2, "concatenated", False)
    _check(x, rw, None, w1, None, w2, None, 4, activation="silu", gate_up_layout="concatenated", transposed=False,
           renormalize=False)


@pytest.mark.parametrize("dtype,t", [(torch.bfloat16, 1), (torch.bfloat16, 24), (torch.float16, 5)])
def test_half_precision(device, dtype, t):
    _check(*make_moe(t, 64, 32, 8, dtype=dtype, device=device, seed=6 + t), 4)


def test_leading_dims_and_non_contiguous_weights(device):
    x, rw, rb, w1, b1, w2, b2 = make_moe(0, 32, 24, 8, device=device, seed=7, lead=(2, 5))
    # the same values, stored expert-last / transposed: read through their strides, never copied
    w1 = w1.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    w2 = w2.transpose(1, 2).contiguous().transpose(1, 2)
    b1 = b1.t().contiguous().t()
    assert not w1.is_contiguous() and not w2.is_contiguous()
    _check(x, rw, rb, w1, b1, w2, b2, 2)


def test_experts_alone_with_int64_ids_and_bf16_weights(device):
    x, rw, rb, w1, b1, w2, b2 = make_moe(11, 32, 24, 8, device=device, seed=8)
    ids = torch.stack([torch.randperm(8)[:3] for _ in range(11)]).to(device)  # int64, like transformers'
    wts = torch.rand(11, 3, device=device).to(torch.bfloat16)
    out = moe_experts(x, ids, wts, w1, b1, w2, b2)
    ref = moe_experts_reference(*f64(x), ids.cpu(), wts.double().cpu(), *f64(w1, b1, w2, b2))
    assert_close_rel(out, ref, TOL[torch.float32])


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
def test_nan_stays_in_its_token(device):
    x, rw, rb, w1, b1, w2, b2 = make_moe(6, 32, 24, 8, device=device, seed=9)
    x[3, 7] = float("nan")
    out = fused_moe(x, rw, rb, w1, b1, w2, b2, 4)
    assert torch.isnan(out[3]).all()
    keep = [0, 1, 2, 4, 5]
    ref = moe_reference(*f64(x[keep], rw, rb, w1, b1, w2, b2), 4)
    assert_close_rel(out[keep], ref, TOL[torch.float32])


def test_deterministic(device):
    args = make_moe(40, 32, 24, 4, device=device, seed=10)
    a, b = fused_moe(*args, 4), fused_moe(*args, 4)
    assert torch.equal(a, b)


def test_no_tokens(device):
    x, *rest = make_moe(0, 32, 24, 8, device=device, seed=11)
    assert fused_moe(x, *rest, 2).shape == (0, 32)
    out, scores = fused_moe(x, *rest, 2, return_router_scores=True)
    assert scores.shape == (0, 2)


@settings(max_examples=3)
@given(t=st.integers(1, 64), e=st.integers(4, 16), k=st.integers(1, 4), hidden=st.sampled_from([16, 24, 48]),
       inter=st.sampled_from([8, 16, 20]), seed=st.integers(0, 2**16))
def test_property_matches_reference(t, e, k, hidden, inter, seed):
    _check(*make_moe(t, hidden, inter, e, device=DEVICE, seed=seed), min(k, e))
