"""A full sliding window as a ring buffer: ``update_kv_cache_(..., length=, ring=True)`` writes each new row over the
oldest (slot ``length % S``), and ``decode_attention(..., ring_start=length)`` reads a mask laid out oldest first
against the slot order. Against the rolled window (transformers' age order) and the reference attention over it:
many steps, rows over several programs (the counter advanced by a second launch), the rotation in the write, every
mask kind, splits, sinks; errors; the ops (opcheck, compile); on the GPU, steps replayed from a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from _attention_helpers import make_qkv, reference, tiles
from decode_attention import decode_attention, kv_cache, update_kv_cache_
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.testing import device_for_tests, opcheck_op

APPEND = torch.ops.triton_ops.kv_cache_append_.default
APPEND_ROPE = torch.ops.triton_ops.kv_cache_append_rope_.default
ATTENTION = torch.ops.triton_ops.decode_attention.default
DEVICE = device_for_tests()


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def _age_order(window: torch.Tensor, start: int) -> torch.Tensor:
    """A ring's rows oldest first: slot ``(start + c) % S`` is age ``c``."""
    size = window.shape[-2]
    return window.index_select(-2, torch.remainder(torch.arange(size, device=window.device) + start, size))


def _rolled(window: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """transformers' full sliding window taking new rows: the oldest dropped, the new ones last."""
    return torch.cat((window, new), dim=-2)[:, :, new.shape[-2]:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,w,d,new", [(1, 8, 16, 64, 1), (2, 3, 5, 16, 1), (2, 2, 7, 32, 3), (1, 1, 1, 16, 1)])
def test_ring_writes_hold_the_rolled_window_in_slot_order(dtype, b, h, w, d, new):
    keys, values = _rand(b, h, w, d, dtype=dtype, seed=1), _rand(b, h, w, d, dtype=dtype, seed=2)
    want_k, want_v = keys.clone(), values.clone()  # age order, as transformers keeps it
    length = torch.tensor(0, device=DEVICE)
    for step in range(2 * w + 3):
        k, v = _rand(b, h, new, d, dtype=dtype, seed=10 + step), _rand(b, h, new, d, dtype=dtype, seed=50 + step)
        want_k, want_v = _rolled(want_k, k), _rolled(want_v, v)
        with torch.no_grad():
            got = update_kv_cache_(keys, values, k, v, length=length, ring=True)
        assert got[0] is keys and got[1] is values
        assert int(length) == (step + 1) * new
        assert torch.equal(_age_order(keys, int(length)), want_k), step
        assert torch.equal(_age_order(values, int(length)), want_v), step


def test_rows_over_several_programs_advance_the_counter_once():
    # more rows than one program takes (batch x heads > ONE_PROGRAM_ROWS): a second launch advances the counter
    b, h, w, d = 3, kv_cache.ONE_PROGRAM_ROWS // 2, 4, 16
    keys, values = _rand(b, h, w, d, seed=3), _rand(b, h, w, d, seed=4)
    length = torch.tensor([6], device=DEVICE)  # a [1] counter; its oldest row at slot 6 % 4 = 2
    want = _age_order(keys, 6)
    for step in range(3):
        k, v = _rand(b, h, 1, d, seed=20 + step), _rand(b, h, 1, d, seed=30 + step)
        want = _rolled(want, k)
        with torch.no_grad():
            update_kv_cache_(keys, values, k, v, length=length, ring=True)
        assert length.shape == (1,) and int(length) == 7 + step
    assert torch.equal(_age_order(keys, int(length)), want)


def test_the_rotation_and_qk_norm_run_inside_the_ring_write():
    b, hq, h, w, d = 2, 4, 2, 6, 16
    keys, values = _rand(b, h, w, d, seed=5), _rand(b, h, w, d, seed=6)
    q, k, v = _rand(b, hq, 1, d, seed=7), _rand(b, h, 1, d, seed=8), _rand(b, h, 1, d, seed=9)
    cos, sin = _rand(1, 1, d, seed=10), _rand(1, 1, d, seed=11)
    qw, kw = _rand(d, seed=12), _rand(d, seed=13)
    q_ref, k_ref = q.clone(), k.clone()
    want_keys = keys.clone()
    length = torch.tensor(9, device=DEVICE)
    with torch.no_grad():
        update_kv_cache_(keys, values, k, v, length=length, ring=True, q=q, cos=cos, sin=sin, q_norm_weight=qw,
                         k_norm_weight=kw, eps=1e-5)
        # the same launch without the ring, into a copy: the rotation is the static write's
        plain = torch.tensor(9 % w, device=DEVICE)
        update_kv_cache_(want_keys, values.clone(), k_ref, v, length=plain, q=q_ref, cos=cos, sin=sin,
                         q_norm_weight=qw, k_norm_weight=kw, eps=1e-5)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref) and torch.equal(keys, want_keys)
    assert int(length) == 10


@pytest.mark.parametrize("kind", ["bool", "additive", "none"])
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("start", [0, 5, 12, 31])
def test_attention_reads_an_age_ordered_mask_against_the_slots(kind, splits, start):
    b, hq, hkv, w, d = 2, 4, 2, 12, 16
    q, k, v = make_qkv(b, hq, hkv, 1, w, d, device=DEVICE, seed=start)
    g = torch.Generator().manual_seed(start)
    if kind == "bool":  # transformers' [B, 1, 1, S]: one row for every head
        mask = (torch.rand(b, 1, 1, w, generator=g) > 0.3).to(DEVICE)
    elif kind == "additive":  # a per-head additive mask, -inf and finite entries
        mask = torch.where(torch.rand(b, hq, 1, w, generator=g) > 0.3, torch.randn(b, hq, 1, w, generator=g),
                           torch.tensor(float("-inf"))).to(DEVICE)
    else:
        mask = None
    sinks = torch.randn(hq, generator=g).to(DEVICE)
    want = reference(q, _age_order(k, start), _age_order(v, start), mask, sinks=sinks)
    got = decode_attention(q, k, v, mask, sinks=sinks, num_splits=splits,
                           ring_start=torch.tensor(start, device=DEVICE))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("start", [0, 17, 39])
def test_interleaved_splits_read_a_ring_through_its_age_ordered_mask(kind, start):
    # a 40-slot ring, blocks of 16 slots taken in turn by 3 splits (the last one partial); the mask masks a run of the
    # oldest entries (a window not yet full) and some holes, whose slots hold NaN
    b, hq, hkv, w, d = 2, 4, 2, 40, 16
    q, k, v = make_qkv(b, hq, hkv, 1, w, d, device=DEVICE, seed=start + 1)
    g = torch.Generator().manual_seed(start)
    keep = torch.rand(b, 1, 1, w, generator=g) > 0.2
    keep[..., :9] = False  # in age order: the 9 oldest entries were never written
    slots = (torch.arange(w) + start) % w  # slot of the entry of age i
    for t in (k, v):
        for i in range(b):
            t[i, :, slots[~keep[i, 0, 0]]] = float("nan")
    mask = keep if kind == "bool" else torch.where(keep, 0.0, float("-inf"))
    mask = mask.to(DEVICE)
    clean_k, clean_v = torch.nan_to_num(k), torch.nan_to_num(v)
    want = reference(q, _age_order(clean_k, start), _age_order(clean_v, start), keep.to(DEVICE))
    with tiles(16, 16):
        got = decode_attention(q, k, v, mask, num_splits=3, ring_start=torch.tensor(start, device=DEVICE))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_a_ring_start_moves_the_mask_not_the_keys():
    # every position but one masked: the output is that position's V row, at whichever slot the ring puts it
    b, hq, hkv, w, d = 1, 2, 1, 8, 16
    q, k, v = make_qkv(b, hq, hkv, 1, w, d, device=DEVICE, seed=3)
    mask = torch.zeros(1, 1, 1, w, dtype=torch.bool, device=DEVICE)
    mask[..., 2] = True  # age 2
    for start in range(w):
        got = decode_attention(q, k, v, mask, ring_start=torch.tensor([start], device=DEVICE))
        slot = (start + 2) % w
        torch.testing.assert_close(got[0, 0], v[0, :, slot].expand(hq, d), rtol=0, atol=0)


def test_errors():
    keys, values = _rand(1, 2, 4, 16), _rand(1, 2, 4, 16)
    k, v = _rand(1, 2, 5, 16), _rand(1, 2, 5, 16)
    with pytest.raises(ShapeMismatchError, match="at most 4 new rows"):
        update_kv_cache_(keys, values, k, v, length=torch.tensor(0, device=DEVICE), ring=True)
    with pytest.raises(InvalidArgumentError, match="needs length"):
        update_kv_cache_(keys, values, k[:, :, :1], v[:, :, :1], ring=True)
    with pytest.raises(InvalidArgumentError, match="ring: expected a bool"):
        update_kv_cache_(keys, values, k[:, :, :1], v[:, :, :1], length=torch.tensor(0, device=DEVICE), ring=1)
    q, kk, vv = make_qkv(1, 2, 2, 1, 8, 16, device=DEVICE, seed=0)
    for bad in (torch.tensor(1.0, device=DEVICE), torch.tensor([1, 2], device=DEVICE)):
        with pytest.raises((UnsupportedDtypeError, ShapeMismatchError), match="ring_start"):
            decode_attention(q, kk, vv, ring_start=bad)
    with pytest.raises(InvalidArgumentError, match="ring_start"):
        decode_attention(q, kk, vv, ring_start=torch.tensor(1, device=DEVICE), is_causal=True)
    with pytest.raises(InvalidArgumentError, match="ring_start"):
        decode_attention(q, kk, vv, ring_start=torch.tensor(1, device=DEVICE), sliding_window=4)


def test_opcheck():
    keys, values = _rand(2, 2, 6, 16, seed=1), _rand(2, 2, 6, 16, seed=2)
    k, v = _rand(2, 2, 1, 16, seed=3), _rand(2, 2, 1, 16, seed=4)
    opcheck_op(APPEND, (keys, values, k, v, torch.zeros((), dtype=torch.int64, device=DEVICE), True))
    q = _rand(2, 4, 1, 16, seed=5)
    cos, sin = _rand(1, 1, 16, seed=6), _rand(1, 1, 16, seed=7)
    opcheck_op(APPEND_ROPE, (keys, values, q, k, v, cos, sin, torch.tensor(3, device=DEVICE), None, None, 1e-6,
                             True))
    qw, kw = _rand(16, seed=8), _rand(16, seed=9)  # Gemma 3's q/k norms (1 + weight) in the ring write
    opcheck_op(APPEND_ROPE, (keys, values, q, k, v, cos, sin, torch.tensor(3, device=DEVICE), qw, kw, 1e-6, True,
                             True))
    mask = torch.rand(2, 1, 1, 6, device=DEVICE) > 0.3
    opcheck_op(ATTENTION, (q, keys, values, mask, None, None, None, False, None, torch.tensor(4, device=DEVICE)))


def test_a_compiled_ring_step_equals_eager():
    def step(keys, values, q, k, v, mask, length):
        update_kv_cache_(keys, values, k, v, length=length, ring=True)
        return decode_attention(q, keys, values, mask, ring_start=length)

    outs = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        keys, values = _rand(1, 2, 6, 16, seed=1), _rand(1, 2, 6, 16, seed=2)
        length = torch.tensor(4, device=DEVICE)
        mask = torch.rand(1, 1, 1, 6, generator=torch.Generator().manual_seed(0)).to(DEVICE) > 0.3
        with torch.no_grad():
            outs.append([fn(keys, values, _rand(1, 4, 1, 16, seed=10 + i), _rand(1, 2, 1, 16, seed=20 + i),
                            _rand(1, 2, 1, 16, seed=30 + i), mask, length) for i in range(3)])
        assert int(length) == 7
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 8, 64])
def test_gpu_ring_steps_replayed_from_a_cuda_graph(b):
    # Gemma 3's sliding window (1024 rows of 8 KV heads of 256, bf16): each replay writes one row over the oldest
    # and attends with the mask in age order, as the rolled window and the reference do
    h, hq, w, d = 8, 16, 1024, 256
    dtype = torch.bfloat16
    keys, values = _rand(b, h, w, d, dtype=dtype, seed=1), _rand(b, h, w, d, dtype=dtype, seed=2)
    rolled_k, rolled_v = keys.clone(), values.clone()
    q = torch.empty(b, hq, 1, d, device=DEVICE, dtype=dtype)
    k, v = torch.empty(b, h, 1, d, device=DEVICE, dtype=dtype), torch.empty(b, h, 1, d, device=DEVICE, dtype=dtype)
    mask = torch.ones(b, 1, 1, w, dtype=torch.bool, device=DEVICE)
    mask[0, ..., :3] = False  # the oldest three of row 0 masked (left padding still inside the window)
    length = torch.tensor(w, device=DEVICE)
    out = None

    def step():
        update_kv_cache_(keys, values, k, v, length=length, ring=True)
        return decode_attention(q, keys, values, mask, ring_start=length)

    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (compiles) on a side stream, then undo the warm-up's write
            q.copy_(_rand(b, hq, 1, d, dtype=dtype, seed=3))
            k.copy_(_rand(b, h, 1, d, dtype=dtype, seed=4))
            v.copy_(_rand(b, h, 1, d, dtype=dtype, seed=5))
            step()
        torch.cuda.current_stream().wait_stream(stream)
        keys.copy_(rolled_k)
        values.copy_(rolled_v)
        length.fill_(w)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        keys.copy_(rolled_k)  # capture does not run the kernels, but put the window back all the same
        values.copy_(rolled_v)
        length.fill_(w)
        for i in range(5):
            q.copy_(_rand(b, hq, 1, d, dtype=dtype, seed=40 + i))
            k.copy_(_rand(b, h, 1, d, dtype=dtype, seed=50 + i))
            v.copy_(_rand(b, h, 1, d, dtype=dtype, seed=60 + i))
            graph.replay()
            rolled_k, rolled_v = _rolled(rolled_k, k), _rolled(rolled_v, v)
            start = int(length)
            assert start == w + i + 1
            assert torch.equal(_age_order(keys, start), rolled_k) and torch.equal(_age_order(values, start), rolled_v)
            want = reference(q, rolled_k, rolled_v, mask)
            torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
