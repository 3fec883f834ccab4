"""shift_kv_cache_ (torch.ops.triton_ops.kv_cache_shift_): a full sliding-window cache moves on by one new row in
place, as transformers' StaticSlidingWindowLayer rolls it: against roll + write, strided caches and new rows, head
dims that differ between K and V, windows of one row and of more rows than a chunk, errors, the op (opcheck, compile),
and on the GPU model shapes and CUDA-graph replays."""

from __future__ import annotations

import pytest
import torch
from decode_attention import KVCacheGradientError, shift_kv_cache_
from decode_attention.kv_cache import SHIFT_BLOCK_W
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError
from triton_ops_core.testing import device_for_tests, opcheck_op

SHIFT = torch.ops.triton_ops.kv_cache_shift_.default
DEVICE = device_for_tests()


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def _rolled(cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """transformers' update of a full window: roll by -1, the new row last."""
    out = cache.roll(-1, dims=-2)
    out[:, :, -1:] = new
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,w,dk,dv", [(1, 8, 16, 64, 64), (2, 3, 5, 16, 40), (1, 2, 1, 32, 32),
                                         (2, 1, SHIFT_BLOCK_W + 9, 24, 24)])
def test_shift_matches_roll_and_write(dtype, b, h, w, dk, dv):
    keys, values = _rand(b, h, w, dk, dtype=dtype, seed=1), _rand(b, h, w, dv, dtype=dtype, seed=2)
    k, v = _rand(b, h, 1, dk, dtype=dtype, seed=3), _rand(b, h, 1, dv, dtype=dtype, seed=4)
    want_k, want_v = _rolled(keys, k), _rolled(values, v)
    with torch.no_grad():
        got = shift_kv_cache_(keys, values, k, v)
    assert got[0] is keys and got[1] is values
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)


def test_key_and_value_caches_of_different_dtypes():
    # each branch of the kernel its own pointer type (a merged one did not compile for the GPU)
    keys, values = _rand(2, 2, 9, 16, dtype=torch.bfloat16, seed=20), _rand(2, 2, 9, 8, dtype=torch.float16, seed=21)
    k, v = _rand(2, 2, 1, 16, dtype=torch.bfloat16, seed=22), _rand(2, 2, 1, 8, dtype=torch.float16, seed=23)
    want_k, want_v = _rolled(keys, k), _rolled(values, v)
    with torch.no_grad():
        shift_kv_cache_(keys, values, k, v)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)


def test_strided_caches_and_transposed_new_rows():
    # a cache sliced from a longer buffer, the new rows as transposed views of a packed projection output
    buf_k, buf_v = _rand(2, 3, 12, 32, seed=5), _rand(2, 3, 12, 32, seed=6)
    keys, values = buf_k[:, :, 2:9], buf_v[:, :, 2:9]
    packed = _rand(2, 1, 3 * 32 * 2, seed=7)
    k = packed[..., : 3 * 32].unflatten(-1, (3, 32)).transpose(1, 2)
    v = packed[..., 3 * 32:].unflatten(-1, (3, 32)).transpose(1, 2)
    untouched_k = buf_k[:, :, 9:].clone()
    want_k, want_v = _rolled(keys, k), _rolled(values, v)
    with torch.no_grad():
        shift_kv_cache_(keys, values, k, v)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    assert torch.equal(buf_k[:, :, 9:], untouched_k)  # nothing past the slice written


def test_repeated_shifts_keep_the_last_window_in_order():
    keys, values = torch.zeros(1, 1, 4, 8, device=DEVICE), torch.zeros(1, 1, 4, 8, device=DEVICE)
    with torch.no_grad():
        for step in range(7):
            row = torch.full((1, 1, 1, 8), float(step), device=DEVICE)
            shift_kv_cache_(keys, values, row, -row)
    assert keys[0, 0, :, 0].tolist() == [3.0, 4.0, 5.0, 6.0]
    assert values[0, 0, :, 0].tolist() == [-3.0, -4.0, -5.0, -6.0]


def test_errors():
    keys, values = _rand(1, 2, 6, 16), _rand(1, 2, 6, 16)
    k, v = _rand(1, 2, 1, 16), _rand(1, 2, 1, 16)
    with torch.no_grad():
        with pytest.raises(ShapeMismatchError, match="one new row"):
            shift_kv_cache_(keys, values, _rand(1, 2, 2, 16), _rand(1, 2, 2, 16))
        with pytest.raises(ShapeMismatchError):
            shift_kv_cache_(keys, values, _rand(1, 3, 1, 16), v)
        with pytest.raises(InvalidArgumentError, match="dtype"):
            shift_kv_cache_(keys, values, k.half(), v)
        with pytest.raises(InvalidArgumentError, match="one tensor's memory"):
            shift_kv_cache_(keys, keys, k, k)
    with pytest.raises(KVCacheGradientError):
        shift_kv_cache_(keys, values, k.requires_grad_(True), v)


def test_a_signature_is_planned_once_and_aliased_caches_are_refused_after_it(monkeypatch):
    """A decode step shifts every sliding layer's caches with the same shapes: validated and planned once. The
    plan's key holds no addresses, so keys and values sharing memory are still refused on a later call."""
    from decode_attention import kv_cache

    seen = []
    real = kv_cache.validate_kv_cache_shift
    monkeypatch.setattr(kv_cache, "validate_kv_cache_shift", lambda *a: seen.append(1) or real(*a))
    kv_cache.clear_kv_cache_plans()
    keys, values = _rand(1, 2, 6, 16), _rand(1, 2, 6, 16)
    k, v = _rand(1, 2, 1, 16), _rand(1, 2, 1, 16)
    with torch.no_grad():
        for _ in range(3):
            want_k = torch.cat([keys[:, :, 1:], k], dim=2)
            shift_kv_cache_(keys, values, k, v)
            assert torch.equal(keys, want_k)
        assert len(seen) == 1
        with pytest.raises(InvalidArgumentError, match="one tensor's memory"):
            shift_kv_cache_(keys, keys, k, k)


def test_op_registered_with_mutations_opcheck_and_compile():
    assert "Tensor(a0!) keys" in str(SHIFT._schema) and "Tensor(a1!) values" in str(SHIFT._schema)
    keys, values = _rand(1, 2, 6, 16, seed=8), _rand(1, 2, 6, 16, seed=9)
    k, v = _rand(1, 2, 1, 16, seed=10), _rand(1, 2, 1, 16, seed=11)
    opcheck_op(SHIFT, (keys, values, k, v))

    def step(keys, values, k, v):
        shift_kv_cache_(keys, values, k, v)
        return keys.sum() + values.sum()

    eager_k, eager_v = keys.clone(), values.clone()
    with torch.no_grad():
        want = step(eager_k, eager_v, k, v)
        torch._dynamo.reset()
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(keys, values, k, v)
    assert torch.equal(got, want) and torch.equal(keys, eager_k) and torch.equal(values, eager_v)


@pytest.mark.gpu
@pytest.mark.parametrize("b,h,w,d", [(1, 8, 1024, 256), (8, 8, 128, 64), (64, 8, 128, 64)])
def test_gpu_model_shapes_and_graph_replays(b, h, w, d):
    """Gemma 3's window (1,024 rows of 256), gpt-oss's (128 of 64) at batch 8 and 64; in a CUDA graph, replayed."""
    keys, values = _rand(b, h, w, d, dtype=torch.bfloat16, seed=12), _rand(b, h, w, d, dtype=torch.bfloat16, seed=13)
    k, v = _rand(b, h, 1, d, dtype=torch.bfloat16, seed=14), _rand(b, h, 1, d, dtype=torch.bfloat16, seed=15)
    want_k, want_v = keys.clone(), values.clone()
    with torch.no_grad():
        shift_kv_cache_(keys, values, k, v)  # compiles before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            shift_kv_cache_(keys, values, k, v)
        for _ in range(3):
            graph.replay()
    torch.cuda.synchronize()
    for _ in range(4):  # the warm-up call and three replays (a capture records, it does not run)
        want_k, want_v = _rolled(want_k, k), _rolled(want_v, v)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
