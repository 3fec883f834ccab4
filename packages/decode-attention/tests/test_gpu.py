"""GPU-only checks at real models' head shapes (Llama-3-8B / Qwen3-8B: 32 query heads, 8 KV heads, head dim 128;
gpt-oss: 64 / 8 / 64 with sinks and a sliding window), 1k-8k contexts in a static cache twice as long (the tail
holding NaN, masked): bf16 against an fp32 reference from the same inputs and against torch's
scaled_dot_product_attention; CUDA-graph capture; determinism; long queries; other dtypes and head dims."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _attention_helpers import make_qkv, reference, valid_prefix_mask
from decode_attention import decode_attention, decode_attention_reference
from triton_ops_core.testing import assert_close_rel

pytestmark = pytest.mark.gpu

LLAMA = (32, 8, 128)
GPT_OSS = (64, 8, 64)
TOL_BF16 = 1e-2


def _ref32(q, k, v, mask=None, **kw):
    if kw.get("sinks") is not None:
        kw["sinks"] = kw["sinks"].float()
    return decode_attention_reference(q.float(), k.float(), v.float(), mask, **kw)


@pytest.mark.parametrize("heads", [LLAMA, GPT_OSS], ids=["llama", "gpt-oss"])
@pytest.mark.parametrize("b,sq,context", [(1, 1, 1024), (1, 1, 8192), (4, 1, 4096), (2, 4, 2048), (8, 1, 1000)])
def test_model_shapes_over_a_static_cache(heads, b, sq, context):
    hq, hkv, d = heads
    q, k, v = make_qkv(b, hq, hkv, sq, context, d, dtype=torch.bfloat16, device="cuda", seed=context + b,
                       cache_len=2 * context)
    lengths = [context - 17 * i for i in range(b)]
    mask = valid_prefix_mask(b, sq, 2 * context, lengths, device="cuda")
    sinks = torch.randn(hq, device="cuda", dtype=torch.bfloat16) if heads == GPT_OSS else None
    out = decode_attention(q, k, v, mask, sinks=sinks)
    assert torch.isfinite(out).all()  # the NaN tail is never read
    assert_close_rel(out, _ref32(q, k, v, mask, sinks=sinks), TOL_BF16)
    if sinks is None:  # torch's sdpa on the valid part (it would read the NaN tail)
        n = min(lengths)
        want = F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], attn_mask=mask[..., :n],
                                              enable_gqa=True).transpose(1, 2)
        got = decode_attention(q, k[:, :, :n], v[:, :, :n], mask[..., :n])
        assert_close_rel(got, want, TOL_BF16)


def test_gpt_oss_sliding_window_and_sinks():
    hq, hkv, d = GPT_OSS
    q, k, v = make_qkv(2, hq, hkv, 3, 4096, d, dtype=torch.bfloat16, device="cuda", seed=1)
    sinks = torch.randn(hq, device="cuda")
    out = decode_attention(q, k, v, sinks=sinks, sliding_window=128, is_causal=True)
    assert_close_rel(out, _ref32(q, k, v, sinks=sinks, sliding_window=128, is_causal=True), TOL_BF16)


@pytest.mark.parametrize("splits", [None, 1, 5, 64])
def test_splits_agree_and_are_deterministic(splits):
    q, k, v = make_qkv(1, *LLAMA[:2], 1, 6000, 128, dtype=torch.bfloat16, device="cuda", seed=2)
    out = decode_attention(q, k, v, num_splits=splits)
    assert torch.equal(out, decode_attention(q, k, v, num_splits=splits))
    assert_close_rel(out, _ref32(q, k, v), TOL_BF16)


@pytest.mark.parametrize("heads,b,sq,context", [(LLAMA, 1, 1, 1024), (GPT_OSS, 1, 1, 4096), (LLAMA, 4, 1, 2048),
                                                 ((64, 4, 256), 1, 1, 2048), (LLAMA, 2, 4, 1500)],
                         ids=["llama-1k", "gpt-oss-4k", "llama-b4", "d256", "llama-sq4"])
def test_the_splits_merged_in_the_launch_give_the_combines_bits(heads, b, sq, context, monkeypatch):
    # plain eager calls merge the splits in the attention launch (its last split to arrive); the registered op, as
    # torch.compile and CUDA graphs call it, launches the combine: the same bits, so a graph replays what eager gave;
    # the arrival counters are zero again after each call (a stale one would skip or repeat a merge)
    from decode_attention import ops
    from triton_ops_core import scratch

    hq, hkv, d = heads
    q, k, v = make_qkv(b, hq, hkv, sq, context, d, dtype=torch.bfloat16, device="cuda", seed=context + d,
                       cache_len=2 * context)
    mask = valid_prefix_mask(b, sq, 2 * context, [context - 5 * i for i in range(b)], device="cuda")
    sinks = torch.randn(hq, device="cuda", dtype=torch.bfloat16) if heads == GPT_OSS else None
    monkeypatch.setattr(ops, "COMBINE_IN_LAUNCH", True)
    ops.clear_caches()
    merged = [decode_attention(q, k, v, mask, sinks=sinks) for _ in range(3)]
    assert all(torch.equal(m, merged[0]) for m in merged)
    combined = torch.ops.triton_ops.decode_attention(q, k, v, mask, None, sinks, None, False, None)
    assert torch.equal(combined, merged[0])
    counters = [buf for key, buf in scratch._BUFFERS.items() if key[0] == ops._COUNTERS]
    assert counters and not any(buf.any() for buf in counters)
    assert_close_rel(merged[0], _ref32(q, k, v, mask, sinks=sinks), TOL_BF16)
    ops.clear_caches()


@pytest.mark.parametrize("merged,prefetch", [(False, 0), (True, 0), (False, 2), (True, 2)])
def test_cuda_graph_capture_and_replay(monkeypatch, merged, prefetch):
    # Two layers' calls in one graph: the splits merged by a combine launch or in the attention launch (its counters
    # kept on the graph, shared by both calls: triton_ops_core.scratch.keep_on), with or without the first K/V tiles
    # prefetched; each replay gives what eager gives on the new contents.
    from decode_attention import ops
    from triton_ops_core import scratch

    monkeypatch.setattr(ops, "COMBINE_IN_GRAPHS", merged)
    monkeypatch.setattr(ops, "PREFETCH_TILES", prefetch)
    ops.clear_caches()
    q, k, v = make_qkv(1, *LLAMA[:2], 1, 2048, 128, dtype=torch.bfloat16, device="cuda", seed=3)
    k2, v2 = torch.randn_like(k), torch.randn_like(v)
    mask = valid_prefix_mask(1, 1, 2048, [1500], device="cuda")
    decode_attention(q, k, v, mask)  # compile and plan outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), scratch.keep_on(graph):
        out = decode_attention(q, k, v, mask)
        out2 = decode_attention(q, k2, v2, mask)
    kept = getattr(graph, "_triton_ops_scratch", {})
    assert any(key[0] == ops._COUNTERS for key in kept if isinstance(key, tuple)) is merged
    for step in range(3):  # the next steps: more valid positions, new values in place
        lo, hi = 1500 + 100 * step, 1600 + 100 * step
        mask[..., lo:hi] = True
        for cache in (k, v, k2, v2):
            cache[:, :, lo:hi] = torch.randn_like(cache[:, :, lo:hi])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, decode_attention(q, k, v, mask))
        assert torch.equal(out2, decode_attention(q, k2, v2, mask))
        assert_close_rel(out, _ref32(q, k, v, mask), TOL_BF16)
    ops.clear_caches()


def test_large_batch_and_long_queries():
    q, k, v = make_qkv(64, 32, 8, 1, 1024, 128, dtype=torch.bfloat16, device="cuda", seed=4)
    assert_close_rel(decode_attention(q, k, v), _ref32(q, k, v), TOL_BF16)
    # a prefill: 512 causal queries over themselves
    q, k, v = make_qkv(1, *GPT_OSS[:2], 512, 512, 64, dtype=torch.bfloat16, device="cuda", seed=5)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    assert_close_rel(decode_attention(q, k, v, is_causal=True), want, TOL_BF16)


@pytest.mark.parametrize("dtype,d", [(torch.float16, 128), (torch.float32, 128), (torch.bfloat16, 80),
                                     (torch.bfloat16, 96), (torch.bfloat16, 256)])
def test_dtypes_and_head_dims(dtype, d):
    q, k, v = make_qkv(2, 16, 4, 2, 3000, d, dtype=dtype, device="cuda", seed=d)
    mask = torch.rand(2, 1, 2, 3000, device="cuda") > 0.1
    tol = {torch.float16: 2e-3, torch.float32: 1e-5, torch.bfloat16: TOL_BF16}[dtype]
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        assert_close_rel(decode_attention(q, k, v, mask), reference(q, k, v, mask), tol)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
