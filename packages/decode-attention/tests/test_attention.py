"""decode_attention against a float64 reference (plain softmax attention with the KV heads repeated): GQA groups,
query lengths, odd cache lengths, masks (bool, additive, padding, a static cache's masked tail holding NaN), sinks,
softcapped logits, sliding windows, causal rows, strided caches, split KV, fully masked rows, NaN propagation. Small
shapes: every kernel runs under the interpreter on a CPU (and on a GPU with the same tolerances)."""

from __future__ import annotations

import pytest
import torch
from _attention_helpers import make_qkv, reference, tiles, valid_prefix_mask
from decode_attention import decode_attention, ops
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.testing import assert_close_rel, device_for_tests

TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


@pytest.mark.parametrize("b,hq,hkv,sq,s,d,dtype", [
    (1, 2, 2, 1, 1, 32, torch.float32),      # MHA, one position
    (2, 8, 2, 1, 37, 64, torch.float32),     # GQA 4, decode
    (1, 8, 1, 4, 300, 16, torch.float32),    # MQA (group 8), four query rows
    (2, 4, 1, 2, 37, 80, torch.float16),     # head dim 80 (padded to 128)
    (1, 16, 2, 3, 300, 96, torch.bfloat16),  # GQA 8, head dim 96
])
def test_matches_the_reference(device, b, hq, hkv, sq, s, d, dtype):
    q, k, v = make_qkv(b, hq, hkv, sq, s, d, dtype=dtype, device=device, seed=s + d)
    out = decode_attention(q, k, v)
    assert out.shape == (b, sq, hq, d) and out.dtype == dtype and out.is_contiguous()
    assert_close_rel(out, reference(q, k, v), TOL[dtype])


def test_bool_padding_mask_and_per_head_masks(device):
    q, k, v = make_qkv(2, 8, 2, 2, 37, 32, device=device, seed=1)
    # transformers' [B, 1, Sq, S] (left padding on the first sequence)
    mask = torch.ones(2, 1, 2, 37, dtype=torch.bool, device=device)
    mask[0, :, :, :9] = False
    assert_close_rel(decode_attention(q, k, v, mask), reference(q, k, v, mask), TOL[torch.float32])
    # a 2-D [Sq, S] mask, and a random mask of its own per head
    mask2 = torch.rand(2, 37, device=device) > 0.4
    assert_close_rel(decode_attention(q, k, v, mask2), reference(q, k, v, mask2), TOL[torch.float32])
    mask4 = torch.rand(2, 8, 2, 37, device=device) > 0.5
    assert_close_rel(decode_attention(q, k, v, mask4), reference(q, k, v, mask4), TOL[torch.float32])


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bfloat16])
def test_additive_masks(device, mask_dtype):
    q, k, v = make_qkv(1, 4, 2, 3, 37, 32, device=device, seed=2)
    mask = torch.randn(1, 1, 3, 37, device=device).to(mask_dtype)
    mask[..., 30:] = torch.finfo(mask_dtype).min  # transformers' fill value masks
    mask[..., 0, 5] = float("-inf")
    out = decode_attention(q, k, v, mask)
    assert_close_rel(out, reference(q, k, v, mask), TOL[torch.float32])
    # the same positions masked through a bool mask give the same output
    keep = ~(mask <= torch.finfo(mask_dtype).min)
    plain = decode_attention(q, k, v, torch.where(keep, mask, torch.zeros_like(mask)).masked_fill(~keep, float("-inf")))
    assert_close_rel(plain, out, TOL[torch.float32])


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_static_cache_reads_only_the_valid_positions(device, layout):
    # a static cache of 300 positions, 37 and 20 valid (the tails hold NaN): the output is that of the valid
    # prefixes alone, so the masked tail's K/V are never loaded
    lengths, cache_len = [37, 20], 300
    q, k, v = make_qkv(2, 8, 2, 2, 37, 32, device=device, seed=3, cache_len=cache_len, layout=layout)
    k[1, :, 20:] = float("nan")
    v[1, :, 20:] = float("nan")
    mask = valid_prefix_mask(2, 2, cache_len, lengths, device=device)
    out = decode_attention(q, k, v, mask)
    assert torch.isfinite(out).all()
    want = reference(q, torch.nan_to_num(k), torch.nan_to_num(v), mask)
    assert_close_rel(out, want, TOL[torch.float32])
    for i, n in enumerate(lengths):  # and the same as attention over the prefix alone
        part = decode_attention(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n], mask[i:i + 1, ..., :n])
        assert_close_rel(part, out[i:i + 1], TOL[torch.float32])


@pytest.mark.parametrize("splits", [1, 4])
def test_a_band_of_valid_positions(device, splits):
    # left padding and a masked tail: only positions 50..89 of 150 attend; some splits attend nothing, the others
    # part of their range (NaN outside the band: never loaded)
    q, k, v = make_qkv(2, 4, 2, 2, 150, 16, device=device, seed=16)
    mask = torch.zeros(2, 1, 2, 150, dtype=torch.bool, device=device)
    mask[..., 50:90] = True
    mask[1, :, 1, 60:70] = False
    for t in (k, v):
        t[:, :, :50] = float("nan")
        t[:, :, 90:] = float("nan")
    with tiles(16, 16):
        out = decode_attention(q, k, v, mask, num_splits=splits)
    assert torch.isfinite(out).all()
    assert_close_rel(out, reference(q, torch.nan_to_num(k), torch.nan_to_num(v), mask), TOL[torch.float32])


def _main_arg(plan, name: str):
    # one of the main kernel's arguments in the plan's scalar tail (the arguments from H_KV on)
    from decode_attention import _kernels as K

    names = K._attention_kernel.arg_names
    return plan.main.tail[names.index(name) - names.index("H_KV")]


def _interleaved(plan) -> bool:
    return _main_arg(plan, "INTERLEAVE")


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("case", ["static prefix", "window over a mask", "window, causal rows", "holes and padding"])
def test_splits_taking_the_kv_blocks_in_turn(device, monkeypatch, interleave, case):
    """Split j reads KV blocks j, j + splits, ... (``INTERLEAVE``, every split gets part of whatever is attended) or
    one contiguous chunk: the same attention either way. The static cache's tails, the band outside a window and the
    masked holes hold NaN and Inf (never loaded, or loaded and cleaned); blocks of 16 positions, 3 or 4 splits, tails
    that end mid-block, windows that start mid-block."""
    monkeypatch.setattr(ops, "INTERLEAVE_SPLITS", interleave)
    kwargs: dict = {}
    if case == "static prefix":  # 37 and 150 of 203 positions valid, two query rows (causal among themselves)
        q, k, v = make_qkv(2, 8, 2, 2, 150, 16, device=device, seed=21, cache_len=203)
        mask = valid_prefix_mask(2, 2, 203, [37, 150], device=device)
        splits = 4
        for t in (k, v):
            t[0, :, 37:] = float("nan")
    elif case == "window over a mask":  # a 29-position window (174..202) and a padding mask, one decode row
        q, k, v = make_qkv(2, 4, 1, 1, 203, 16, device=device, seed=22)
        mask = valid_prefix_mask(2, 1, 203, [203, 190], device=device)
        splits, kwargs = 3, {"sliding_window": 29}
        for t in (k, v):
            t[:, :, :174] = float("nan")
            t[1, :, 190:] = float("inf")
    elif case == "window, causal rows":  # no mask: the window's first tile starts mid-block, what lies before is NaN
        q, k, v = make_qkv(1, 4, 2, 3, 100, 16, device=device, seed=23)
        mask = None
        splits, kwargs = 4, {"sliding_window": 21, "is_causal": True}
        k[:, :, :100 - 3 - 21 + 1] = float("nan")
        v[:, :, :100 - 3 - 21 + 1] = float("inf")
    else:  # left padding, holes, a masked tail, an additive mask
        q, k, v = make_qkv(2, 8, 2, 1, 160, 16, device=device, seed=24)
        keep = torch.zeros(2, 1, 1, 160, dtype=torch.bool, device=device)
        keep[0, ..., 10:130] = True
        keep[0, ..., 40:75] = False
        keep[1, ..., 3:60] = True
        mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
        splits = 3
        for t in (k, v):
            t[0, :, 40:75] = float("nan")
            t[0, :, :10] = float("inf")
            t[1, :, 60:] = float("nan")
    with tiles(16, 16):
        out = decode_attention(q, k, v, mask, num_splits=splits, **kwargs)
        (plan,) = ops._PLANS._plans.values()
    assert _interleaved(plan) is interleave and plan.main.grid[1] == splits
    assert torch.isfinite(out).all()
    clean_k, clean_v = (torch.nan_to_num(t, nan=0.0, posinf=0.0) for t in (k, v))
    assert_close_rel(out, reference(q, clean_k, clean_v, mask, **kwargs), TOL[torch.float32])


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_masked_holes_inside_the_attended_range_never_count(device, mask_dtype):
    # one decode row per sequence, its mask broadcast over heads (transformers' [B, 1, 1, S]: one mask row serves
    # the whole program): positions masked between attended ones hold NaN and Inf; K/V rows of a step load before
    # the mask is read, so those values reach the kernel and must not reach the output
    q, k, v = make_qkv(2, 8, 2, 1, 96, 16, device=device, seed=17)
    keep = torch.ones(2, 1, 1, 96, dtype=torch.bool, device=device)
    keep[0, ..., 5:9] = False
    keep[1, ..., 40:41] = False
    keep[1, ..., 70:90] = False
    for t in (k, v):
        t[0, :, 5:9] = float("nan")
        t[1, :, 40] = float("inf")
        t[1, :, 70:90] = float("nan")
    mask = keep if mask_dtype == torch.bool else torch.where(keep, 0.0, torch.finfo(mask_dtype).min).to(mask_dtype)
    for splits in (1, 3):
        with tiles(16, 16):
            out = decode_attention(q, k, v, mask, num_splits=splits)
        assert torch.isfinite(out).all()
        want = reference(q, torch.nan_to_num(k, posinf=0.0), torch.nan_to_num(v, posinf=0.0), keep)
        assert_close_rel(out, want, TOL[torch.float32])


def test_strided_views_of_a_bigger_cache(device):
    # k/v every other KV head of a bigger cache, 45 of its 64 positions; q a slice of a wider batch
    q, k, v = make_qkv(3, 8, 4, 1, 64, 32, device=device, seed=4)
    q, k, v = q[1:], k[1:, ::2, :45], v[1:, ::2, :45]
    assert not k.is_contiguous()
    assert_close_rel(decode_attention(q, k, v), reference(q, k, v), TOL[torch.float32])


@pytest.mark.parametrize("splits", [3])
def test_split_kv_and_row_blocks(device, splits):
    # small tiles: 16 KV positions a step, 16 query rows a program (group 8 x Sq 3 = two row blocks); 40 positions
    # in 2 splits (32 + 8) or 3 (16 + 16 + 8)
    q, k, v = make_qkv(1, 16, 2, 3, 40, 16, device=device, seed=5)
    mask = torch.rand(1, 1, 3, 40, device=device) > 0.3
    sinks = torch.randn(16, device=device)
    with tiles(16, 16):
        out = decode_attention(q, k, v, mask, sinks=sinks, num_splits=splits)
        again = decode_attention(q, k, v, mask, sinks=sinks, num_splits=splits)
        (plan,) = ops._PLANS._plans.values()
    assert plan.combine is not None and plan.main.grid == (2, splits, 2)
    assert torch.equal(out, again)  # deterministic: the splits are merged in a fixed order
    assert_close_rel(out, reference(q, k, v, mask, sinks=sinks), TOL[torch.float32])


class _Launches:
    """Stands for the combine kernel: counts its launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


@pytest.mark.parametrize("splits,sq", [(2, 1), (3, 3)])
def test_plain_calls_merge_the_splits_in_the_attention_launch(device, monkeypatch, splits, sq):
    """A plain eager call with the KV length split merges the splits in the attention launch (its last split of each
    row block to arrive), with the combine launch's result; calls through the registered op (torch.compile, its CUDA
    graphs) launch the combine. The arrival counters are back at zero after each call."""
    from decode_attention import _kernels as K
    from triton_ops_core import scratch

    q, k, v = make_qkv(2, 16, 2, sq, 40, 16, device=device, seed=7 + sq)
    mask = torch.rand(2, 1, sq, 40, device=device) > 0.3
    sinks = torch.randn(16, device=device)
    spy = _Launches(K._combine_kernel)
    monkeypatch.setattr(K, "_combine_kernel", spy)
    monkeypatch.setattr(ops, "COMBINE_IN_LAUNCH", True)

    def run(op=False):
        ops.clear_caches()
        with tiles(16, 16):
            if op:
                return torch.ops.triton_ops.decode_attention(q, k, v, mask, None, sinks, None, False, splits)
            return decode_attention(q, k, v, mask, sinks=sinks, num_splits=splits)

    merged = run()
    assert spy.count == 0
    kept = [buf for key, buf in scratch._BUFFERS.items() if key[0] == ops._COUNTERS]
    assert kept and not any(buf.any() for buf in kept)
    assert torch.equal(run(), merged)
    combined = run(op=True)
    assert spy.count == 1
    assert torch.equal(combined, merged)
    monkeypatch.setattr(ops, "COMBINE_IN_LAUNCH", False)
    assert torch.equal(run(), merged) and spy.count == 2
    ops.clear_caches()
    assert_close_rel(merged, reference(q, k, v, mask, sinks=sinks), TOL[torch.float32])


def test_default_splits_follow_the_programs(device):
    # one (batch, KV head): the default splits the KV length (on the interpreter too, which counts as one SM)
    q, k, v = make_qkv(1, 4, 1, 1, 150, 16, device=device, seed=6)
    with tiles(16, 16):
        out = decode_attention(q, k, v)
        (plan,) = ops._PLANS._plans.values()
    assert plan.combine is not None
    assert_close_rel(out, reference(q, k, v), TOL[torch.float32])


def test_sinks_join_the_denominator_only(device):
    q, k, v = make_qkv(2, 8, 2, 2, 37, 32, device=device, seed=7)
    sinks = torch.randn(8, device=device) * 2
    out = decode_attention(q, k, v, sinks=sinks)
    assert_close_rel(out, reference(q, k, v, sinks=sinks), TOL[torch.float32])
    # gpt-oss's eager attention: softmax over [logits, sink], the sink's column dropped
    kk, vv = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    logits = q @ kk.transpose(-1, -2) / 32 ** 0.5
    combined = torch.cat([logits, sinks.view(1, 8, 1, 1).expand(2, 8, 2, 1)], dim=-1).softmax(-1)[..., :-1]
    assert_close_rel(out, (combined @ vv).transpose(1, 2), 1e-5)
    half = decode_attention(q.half(), k.half(), v.half(), sinks=sinks.bfloat16())  # sinks of another dtype
    assert_close_rel(half, out, 2e-3)


def test_softcapped_logits(device):
    # Gemma 2's attn_logit_softcapping (50) over logits large enough that the cap bends them (scale 1: logits of
    # tens), with an additive mask added after the cap, split KV, a ring and fp16
    q, k, v = make_qkv(2, 8, 2, 2, 37, 32, device=device, seed=30)
    q = q * 4
    mask = torch.randn(2, 1, 2, 37, device=device)
    mask[..., 30:] = torch.finfo(torch.float32).min
    for kwargs in ({"softcap": 50.0, "scale": 1.0}, {"softcap": 5.0}, {"softcap": 20.0, "num_splits": 3}):
        out = decode_attention(q, k, v, mask, **kwargs)
        want = reference(q, k, v, mask, **{k: v for k, v in kwargs.items() if k != "num_splits"})
        assert_close_rel(out, want, TOL[torch.float32])
        # the cap changes the result: an uncapped call differs by far more than the tolerance
        uncapped = reference(q, k, v, mask, scale=kwargs.get("scale"))
        assert (want - uncapped).norm() > 100 * TOL[torch.float32] * want.norm()
    # transformers' eager attention (Gemma 2's): logits * scaling, / cap, tanh, * cap, + mask, softmax in fp32
    kk, vv = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    logits = torch.tanh(q @ kk.transpose(-1, -2) * 0.25 / 10.0) * 10.0 + mask
    eager = (logits.softmax(-1) @ vv).transpose(1, 2)
    assert_close_rel(decode_attention(q, k, v, mask, scale=0.25, softcap=10.0), eager, 1e-5)
    ring = torch.tensor([5], device=device)
    assert_close_rel(decode_attention(q, k, v, mask, softcap=10.0, ring_start=ring),
                     decode_attention(q, k, v, ops_slot_order(mask, 5), softcap=10.0), TOL[torch.float32])
    half = decode_attention(q.half(), k.half(), v.half(), mask.half(), softcap=10.0)
    assert_close_rel(half, reference(q, k, v, mask, softcap=10.0), TOL[torch.float16])
    # NaN in a query stays in its head; a huge logit saturates at the cap instead of overflowing
    q2 = q.clone()
    q2[0, 0, 0, 0] = float("nan")
    q2[1, 3, 1] = 1e30
    out = decode_attention(q2, k, v, softcap=10.0)
    assert torch.isnan(out[0, 0, 0]).all() and torch.isfinite(out[0, 0, 1:]).all()
    assert torch.isfinite(out[1]).all()


def ops_slot_order(mask: torch.Tensor, start: int) -> torch.Tensor:
    """``mask`` (oldest first) in a ring's slot order, the oldest at slot ``start``: slot j holds column
    ``(j - start) % S``."""
    size = mask.shape[-1]
    return mask[..., (torch.arange(size) - start) % size]


def test_softcap_must_be_a_positive_number(device):
    q, k, v = make_qkv(1, 2, 1, 1, 5, 16, device=device, seed=31)
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, "50"):
        with pytest.raises(InvalidArgumentError, match="softcap"):
            decode_attention(q, k, v, softcap=bad)


def test_sliding_window_and_causal(device):
    # the window's older positions hold NaN: they are neither attended nor loaded
    q, k, v = make_qkv(1, 4, 2, 3, 40, 32, device=device, seed=8)
    k[:, :, :30] = float("nan")
    v[:, :, :30] = float("nan")
    out = decode_attention(q, k, v, sliding_window=8, is_causal=True)
    assert torch.isfinite(out).all()
    assert_close_rel(out, reference(q, k, v, sliding_window=8, is_causal=True), TOL[torch.float32])
    # causal alone: query row i sees positions up to S - Sq + i; with a bool mask and sinks on top
    q, k, v = make_qkv(2, 4, 1, 4, 37, 32, device=device, seed=9)
    mask = torch.rand(2, 1, 4, 37, device=device) > 0.2
    sinks = torch.randn(4, device=device)
    for kwargs in ({"is_causal": True}, {"is_causal": True, "sinks": sinks}, {"sliding_window": 5}):
        assert_close_rel(decode_attention(q, k, v, mask, **kwargs), reference(q, k, v, mask, **kwargs),
                         TOL[torch.float32])
    # Sq == S with is_causal is torch's causal attention
    q, k, v = make_qkv(1, 4, 2, 6, 6, 16, device=device, seed=10)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True).transpose(1, 2)
    assert_close_rel(decode_attention(q, k, v, is_causal=True), want, 1e-5)


def test_a_long_query_is_correct(device):
    # more rows than one program holds (group 4 x Sq 40 = 160 > 128): several row blocks, causal
    q, k, v = make_qkv(1, 4, 1, 40, 64, 16, device=device, seed=11)
    out = decode_attention(q, k, v, is_causal=True, scale=0.3)
    assert_close_rel(out, reference(q, k, v, is_causal=True, scale=0.3), TOL[torch.float32])
    # small tiles, 4 splits and a mask: row blocks whose causal bound ends before a split begins
    mask = torch.rand(1, 1, 40, 64, device=device) > 0.2
    with tiles(16, 16):
        out = decode_attention(q, k, v, mask, is_causal=True, num_splits=4)
    assert_close_rel(out, reference(q, k, v, mask, is_causal=True), TOL[torch.float32])


def test_fully_masked_rows_give_zeros(device):
    q, k, v = make_qkv(2, 4, 2, 2, 37, 32, device=device, seed=12)
    mask = torch.rand(2, 1, 2, 37, device=device) > 0.5
    mask[1, :, 0] = False  # batch 1, query row 0: nothing to attend
    sinks = torch.randn(4, device=device)
    for kw in ({}, {"sinks": sinks}):
        out = decode_attention(q, k, v, mask, **kw)
        assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0]))
        assert_close_rel(out, reference(q, k, v, mask, **kw), TOL[torch.float32])
    # torch's scaled_dot_product_attention (2.5 on) gives zeros there too
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            attn_mask=mask)
    assert torch.equal(sdpa[1, :, 0], torch.zeros_like(sdpa[1, :, 0]))
    # an empty cache: every row is fully masked
    empty = decode_attention(q, k[:, :, :0], v[:, :, :0], sinks=sinks)
    assert empty.shape == (2, 2, 4, 32) and torch.equal(empty, torch.zeros_like(empty))


def test_empty_batch_and_query(device):
    q, k, v = make_qkv(2, 4, 2, 1, 5, 16, device=device, seed=13)
    assert decode_attention(q[:0], k[:0], v[:0]).shape == (0, 1, 4, 16)
    assert decode_attention(q[:, :, :0], k, v).shape == (2, 0, 4, 16)


def test_nan_propagates(device):
    q, k, v = make_qkv(1, 8, 2, 1, 37, 32, device=device, seed=14)
    q[0, 0, 0, 3] = float("nan")  # query head 0
    v[0, 1, 10, 0] = float("nan")  # KV head 1 (query heads 4..7) at an attended position
    out = decode_attention(q, k, v)
    assert torch.isnan(out[0, 0, 0]).all()
    assert torch.isnan(out[0, 0, 4:, 0]).all()
    assert torch.isfinite(out[0, 0, 1:4]).all()
    # a NaN in an additive mask's entry and in a sink
    q, k, v = make_qkv(1, 4, 1, 1, 37, 32, device=device, seed=15)
    mask = torch.zeros(1, 4, 1, 37, device=device)
    mask[0, 2, 0, 7] = float("nan")
    sinks = torch.zeros(4, device=device)
    sinks[1] = float("nan")
    out = decode_attention(q, k, v, mask, sinks=sinks)
    assert torch.isnan(out[0, 0, 2]).all() and torch.isnan(out[0, 0, 1]).all()
    assert torch.isfinite(out[0, 0, 0]).all() and torch.isfinite(out[0, 0, 3]).all()


# ----------------------------------------------------------------------------------------------------------------
# The GPU's planning rules, checked on the CPU (a simulated H200: nothing is launched)
# ----------------------------------------------------------------------------------------------------------------

def _gpu_plan(monkeypatch, b, hq, hkv, d, s, valid, masked=True):
    from triton_ops_core.device import DeviceInfo, simulate_device

    h200 = DeviceInfo("NVIDIA H200", (9, 0), 132, 60 * 2**20, 227 * 1024, 4300.0, True, "simulated")
    monkeypatch.setattr(ops, "_on_gpu", lambda device: True)
    # the test's device: CPU tensors under the interpreter, CUDA ones on a GPU machine (where CPU tensors are refused)
    dev = device_for_tests()
    q, k, v = make_qkv(b, hq, hkv, 1, s, d, dtype=torch.bfloat16, seed=0, device=dev)
    mask = valid_prefix_mask(b, 1, s, [valid] * b, device=dev) if masked else None
    info = ops.validate_decode_attention(q, k, v, mask)
    with simulate_device(h200):
        return ops._plan(q, k, v, mask, None, None, None, False, None, info)


def test_gpu_plan_interleaves_the_splits_of_masked_and_windowed_calls(monkeypatch):
    from triton_ops_core.device import DeviceInfo, simulate_device

    h200 = DeviceInfo("NVIDIA H200", (9, 0), 132, 60 * 2**20, 227 * 1024, 4300.0, True, "simulated")
    monkeypatch.setattr(ops, "_on_gpu", lambda device: True)
    dev = device_for_tests()
    q, k, v = make_qkv(1, 32, 8, 1, 4096, 128, dtype=torch.bfloat16, device=dev)
    mask = valid_prefix_mask(1, 1, 4096, [1000], device=dev)
    info = ops.validate_decode_attention(q, k, v, mask)
    with simulate_device(h200):
        for attn_mask, window, want in ((mask, None, True), (None, 128, True), (None, None, False)):
            plan = ops._plan(q, k, v, attn_mask, None, None, window, False, None, info)
            assert plan.main.grid[1] > 1 and _interleaved(plan) is want
        monkeypatch.setattr(ops, "INTERLEAVE_SPLITS", False)
        assert not _interleaved(ops._plan(q, k, v, mask, None, None, None, False, None, info))


def test_gpu_plan_splits_a_single_sequence_and_reads_one_mask_row(monkeypatch):
    plan = _gpu_plan(monkeypatch, 1, 32, 8, 128, 2048, 1024)  # Llama-3-8B heads, batch 1, 2k static cache
    grid, tail = plan.main.grid, plan.main.tail
    assert grid[0] == 8 and grid[1] > 1 and plan.combine is not None  # 8 KV heads cannot fill 132 SMs: split
    mask_kind, mask_1d = tail[24], tail[25]  # after 24 sizes, strides and numbers: MASK_KIND, then MASK_1D
    assert mask_kind == 1 and mask_1d is True  # a bool mask [B, 1, 1, S]: one vector per program
    assert plan.main.num_warps == 4


@pytest.mark.parametrize("on", [False, True])
def test_gpu_plan_launches_both_kernels_early_with_pdl(monkeypatch, on):
    """With programmatic dependent launch on for the device (triton_ops_core.pdl), the attention kernel and the
    split combine are planned with ``PDL`` and ``launch_pdl``; off, neither. ``RELEASE`` (the next kernel launched
    once this one runs) only with PDL and the release switch on."""
    from triton_ops_core import pdl

    monkeypatch.setattr(pdl, "enabled", lambda device: on)
    monkeypatch.setattr(pdl, "RELEASE_SHORT", False)
    plan = _gpu_plan(monkeypatch, 1, 32, 8, 128, 2048, 1024)
    assert _main_arg(plan, "PDL") is on and plan.combine.tail[-2] is on  # the combine's PDL, then its RELEASE
    assert _main_arg(plan, "RELEASE") is False and plan.combine.tail[-1] is False
    for launch in (plan.main, plan.combine):
        assert launch.options.get("launch_pdl", False) is on
    monkeypatch.setattr(pdl, "RELEASE_SHORT", True)
    monkeypatch.setattr(pdl, "TRIGGER", "end")
    assert _main_arg(plan, "EARLY") is False  # the kernel before would not release this one early: no overlap
    plan = _gpu_plan(monkeypatch, 1, 32, 8, 128, 2048, 1024)  # 8 KV heads x a few splits: one wave on 132 SMs
    assert _main_arg(plan, "RELEASE") is on and plan.combine.tail[-1] is on
    # launched early, the mask pass runs before the wait (a mask and no ring); without a mask nothing to move
    assert _main_arg(plan, "EARLY") is on
    assert _main_arg(_gpu_plan(monkeypatch, 1, 32, 8, 128, 2048, 2048, masked=False), "EARLY") is False
    monkeypatch.setattr(ops, "EARLY_MASK_PASS", False)
    assert _main_arg(_gpu_plan(monkeypatch, 1, 32, 8, 128, 2048, 1024), "EARLY") is False


@pytest.mark.parametrize("batch", [2, 8, 64])
def test_gpu_plan_of_several_rows_keeps_the_exit_trigger(monkeypatch, batch):
    """Several sequences' attention does not release the next kernel early (measured slower at eight; a full batch,
    64 sequences x 8 KV heads, would also be 512 programs on 132 SMs, whose later waves the early programs would
    take the slots of), and so runs its mask pass after its wait."""
    from triton_ops_core import pdl

    monkeypatch.setattr(pdl, "enabled", lambda device: True)
    monkeypatch.setattr(pdl, "RELEASE_SHORT", True)
    monkeypatch.setattr(pdl, "TRIGGER", "end")
    plan = _gpu_plan(monkeypatch, batch, 32, 8, 128, 2048, 1024)
    assert _main_arg(plan, "PDL") is True and _main_arg(plan, "RELEASE") is False
    assert _main_arg(plan, "EARLY") is False


@pytest.mark.parametrize("tiles", [0, 2])
def test_gpu_plan_prefetches_the_first_kv_tiles_only_before_a_mask_pass(monkeypatch, tiles):
    """``ops.PREFETCH_TILES`` of each split's first K and V tiles are asked of L2 before the mask pass (a GPU plan
    with a mask); without a mask there is no pass to overlap."""
    monkeypatch.setattr(ops, "PREFETCH_TILES", tiles)
    plan = _gpu_plan(monkeypatch, 1, 32, 8, 128, 2048, 1024)
    assert _main_arg(plan, "PREFETCH_TILES") == tiles and _main_arg(plan, "KV_LINES") == 2  # 128 bf16: 256 bytes
    unmasked = _gpu_plan(monkeypatch, 1, 32, 8, 128, 2048, 2048, masked=False)
    assert _main_arg(unmasked, "PREFETCH_TILES") == 0


def test_gpu_plan_does_not_split_a_full_batch_and_takes_two_warps(monkeypatch):
    plan = _gpu_plan(monkeypatch, 64, 32, 8, 128, 2048, 1024)  # 512 programs on 132 SMs
    assert plan.main.grid[1] == 1 and plan.combine is None and plan.main.num_warps == 2


@pytest.mark.parametrize(("programs", "kv_len", "splits"), [
    (512, 8192, 2),  # 64 sequences x 8 KV heads: under 4 programs per SM, a long cache: two splits
    (512, 33000, 2),
    (512, 8191, 1),
    (1024, 32768, 1),  # 7.8 programs per SM: enough waves already
    (132, 65536, 2),
])
def test_gpu_plan_splits_a_full_batchs_long_cache_in_two(monkeypatch, programs, kv_len, splits):
    from triton_ops_core.device import DeviceInfo, simulate_device

    h200 = DeviceInfo("NVIDIA H200", (9, 0), 132, 60 * 2**20, 227 * 1024, 4300.0, True, "simulated")
    monkeypatch.setattr(ops, "_on_gpu", lambda device: True)
    with simulate_device(h200):
        assert ops._splits(programs, kv_len, 64, device_for_tests(), None) == splits


@pytest.mark.parametrize(("b", "hkv", "s", "splits"), [
    (1, 8, 8192, 32),  # 32 splits x 8 KV heads: the 256 programs the H200 measured best
    (1, 2, 8192, 64),  # 128 splits would be 2 programs per SM, but at least 128 positions per split: 64
    (4, 8, 8192, 8),
    (8, 8, 8192, 4),  # a power of two (9 or 5 splits measured 15-45 % slower there)
    (1, 8, 1088, 9),  # at least 128 positions per split: 9 splits of a 1088-position cache
])
def test_gpu_plan_splits_into_a_power_of_two_up_to_two_programs_per_sm(monkeypatch, b, hkv, s, splits):
    plan = _gpu_plan(monkeypatch, b, 4 * hkv, hkv, 128, s, s - 64)
    assert plan.main.grid[1] == splits and plan.main.grid[0] == b * hkv
