"""update_kv_cache_: the static KV cache's write in one launch, against index_copy_ (transformers' own update),
with positions, with a device length counter (advanced in the same launch), strided new states, errors, the
registered ops (opcheck, compile, export)."""

from __future__ import annotations

import pytest
import torch
from decode_attention import KVCacheGradientError, KVCacheOverflowError, kv_cache, update_kv_cache_
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_ops_core.exceptions import InvalidArgumentError, LayoutError, ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.testing import device_for_tests, opcheck_op

WRITE = torch.ops.triton_ops.kv_cache_write_.default
APPEND = torch.ops.triton_ops.kv_cache_append_.default


def _cache(b, h, s, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype)
    values = torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype)
    return keys, values


def _packed_kv(b, t, h, d, dtype, device, seed, q_heads=None):
    """k, v as [B, Hkv, T, D] transposed views of one packed [B, T, (Hq + 2 Hkv) * D] projection output."""
    g = torch.Generator().manual_seed(seed + 100)
    hq = h if q_heads is None else q_heads
    packed = torch.randn(b, t, (hq + 2 * h) * d, generator=g).to(device=device, dtype=dtype)
    k = packed[..., hq * d:(hq + h) * d].unflatten(-1, (h, d)).transpose(1, 2)
    v = packed[..., (hq + h) * d:].unflatten(-1, (h, d)).transpose(1, 2)
    return k, v


def _expected(keys, values, k, v, pos):
    return keys.clone().index_copy_(2, pos, k), values.clone().index_copy_(2, pos, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,t,s,d", [(1, 8, 1, 40, 128), (3, 2, 5, 17, 64), (2, 1, 16, 16, 80)])
def test_positions_match_index_copy(device, dtype, b, h, t, s, d):
    keys, values = _cache(b, h, s, d, dtype, device, seed=1)
    k, v = _packed_kv(b, t, h, d, dtype, device, seed=1, q_heads=2 * h)
    pos = torch.randperm(s)[:t].to(device)
    want_k, want_v = _expected(keys, values, k, v, pos)
    out = update_kv_cache_(keys, values, k, v, positions=pos)
    assert out[0] is keys and out[1] is values
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)


@pytest.mark.parametrize("shape", [(), (1,)])  # transformers 5.2x-5.2x: 0-d; 5.5-5.17: [1]
@pytest.mark.parametrize("b,h,t", [(1, 8, 1), (4, 2, 3), (2, 2, 40)])
def test_length_counter_advances_like_transformers(device, shape, b, h, t, monkeypatch):
    """rows to length + t, then length += T (StaticLayer.update of transformers 5.2x); beyond ONE_PROGRAM_ROWS the
    copy spreads over programs and a second launch advances the counter."""
    monkeypatch.setattr(kv_cache, "ONE_PROGRAM_ROWS", 64)
    kv_cache.clear_kv_cache_plans()
    s, d = 130, 32
    keys, values = _cache(b, h, s, d, torch.float32, device, seed=2)
    length = torch.full(shape, 7, dtype=torch.int64, device=device)
    for step in range(3):
        k, v = _packed_kv(b, t, h, d, torch.float32, device, seed=10 + step)
        start = int(length.reshape(()))
        want_k, want_v = _expected(keys, values, k, v, torch.arange(start, start + t, device=device))
        update_kv_cache_(keys, values, k, v, length=length)
        assert torch.equal(keys, want_k) and torch.equal(values, want_v)
        assert length.shape == shape and int(length.reshape(())) == start + t


def test_no_positions_writes_from_zero(device):
    keys, values = _cache(2, 3, 9, 16, torch.float32, device, seed=3)
    k, v = _packed_kv(2, 4, 3, 16, torch.float32, device, seed=3)
    want_k, want_v = _expected(keys, values, k, v, torch.arange(4, device=device))
    update_kv_cache_(keys, values, k, v)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)


def test_different_key_and_value_head_dims(device):
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(1, 2, 10, 48, generator=g).to(device)
    values = torch.randn(1, 2, 10, 16, generator=g).to(device)
    k = torch.randn(1, 2, 2, 48, generator=g).to(device)
    v = torch.randn(1, 2, 2, 16, generator=g).to(device)
    pos = torch.tensor([9, 0], device=device, dtype=torch.int32)
    want_k, want_v = keys.clone().index_copy_(2, pos.long(), k), values.clone().index_copy_(2, pos.long(), v)
    update_kv_cache_(keys, values, k, v, positions=pos)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)


def test_strided_cache_slices(device):
    """The cache may be a view (a slice of a bigger buffer); only its rows change."""
    big_k, big_v = _cache(2, 4, 20, 32, torch.float32, device, seed=5)
    keys, values = big_k[:, 1:3], big_v[:, 1:3]
    before_k, before_v = big_k.clone(), big_v.clone()
    k, v = _packed_kv(2, 2, 2, 32, torch.float32, device, seed=5)
    pos = torch.tensor([3, 11], device=device)
    update_kv_cache_(keys, values, k, v, positions=pos)
    want_k, want_v = before_k.clone(), before_v.clone()
    want_k[:, 1:3].index_copy_(2, pos, k)
    want_v[:, 1:3].index_copy_(2, pos, v)
    assert torch.equal(big_k, want_k) and torch.equal(big_v, want_v)


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 4), t=st.integers(1, 6), extra=st.integers(0, 9),
       d=st.sampled_from([8, 24, 64]), seed=st.integers(0, 2**16))
def test_random_writes(b, h, t, extra, d, seed):
    device = device_for_tests()
    s = t + extra
    keys, values = _cache(b, h, s, d, torch.float32, device, seed)
    k, v = _packed_kv(b, t, h, d, torch.float32, device, seed)
    start = torch.randint(0, s - t + 1, (), generator=torch.Generator().manual_seed(seed)).item()
    length = torch.tensor(start, device=device)
    want_k, want_v = _expected(keys, values, k, v, torch.arange(start, start + t, device=device))
    update_kv_cache_(keys, values, k, v, length=length)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v) and int(length) == start + t


def test_overflow_is_an_error_and_writes_nothing(device):
    if device.type == "cuda":
        pytest.skip("on a GPU the kernel traps (a failed launch ends the CUDA context): not testable in-process")
    keys, values = _cache(1, 2, 8, 16, torch.float32, device, seed=6)
    before = keys.clone()
    k, v = _packed_kv(1, 3, 2, 16, torch.float32, device, seed=6)
    with pytest.raises(KVCacheOverflowError, match=r"got \[8\]"):
        update_kv_cache_(keys, values, k, v, length=torch.tensor(6))
    with pytest.raises(KVCacheOverflowError):
        update_kv_cache_(keys, values, k, v, positions=torch.tensor([0, -1, 2]))
    assert torch.equal(keys, before)


def test_errors(device):
    keys, values = _cache(1, 2, 8, 16, torch.float32, device, seed=7)
    k, v = _packed_kv(1, 2, 2, 16, torch.float32, device, seed=7)
    with pytest.raises(InvalidArgumentError, match="at most one"):
        update_kv_cache_(keys, values, k, v, positions=torch.tensor([0, 1], device=device),
                         length=torch.tensor(0, device=device))
    with pytest.raises(InvalidArgumentError, match="k: expected the dtype of keys"):
        update_kv_cache_(keys, values, k.half(), v)
    with pytest.raises(ShapeMismatchError, match=r"k: expected \[B, Hkv, T, D\]"):
        update_kv_cache_(keys, values, k[:, :1], v)
    with pytest.raises(ShapeMismatchError, match="v: expected 2 new positions"):
        update_kv_cache_(keys, values, k, v[:, :, :1])
    with pytest.raises(ShapeMismatchError, match=r"positions: expected shape \[2\]"):
        update_kv_cache_(keys, values, k, v, positions=torch.tensor([0], device=device))
    with pytest.raises(UnsupportedDtypeError, match="positions"):
        update_kv_cache_(keys, values, k, v, positions=torch.tensor([0.0, 1.0], device=device))
    with pytest.raises(ShapeMismatchError, match="length: expected one element"):
        update_kv_cache_(keys, values, k, v, length=torch.tensor([0, 1], device=device))
    with pytest.raises(LayoutError, match="keys"):
        update_kv_cache_(keys.transpose(2, 3), values, k, v)
    with pytest.raises(KVCacheGradientError):
        update_kv_cache_(keys, values, k.requires_grad_(), v)


def test_ops_registered_with_mutations():
    assert "Tensor(a0!) keys" in str(WRITE._schema) and "Tensor(a1!) values" in str(WRITE._schema)
    assert "Tensor(a4!) length" in str(APPEND._schema)


def test_opcheck(device):
    keys, values = _cache(1, 2, 8, 16, torch.float32, device, seed=8)
    k, v = _packed_kv(1, 2, 2, 16, torch.float32, device, seed=8)
    opcheck_op(WRITE, (keys, values, k, v, torch.tensor([5, 1], device=device)))
    opcheck_op(WRITE, (keys, values, k, v, None))
    # each run advances the counter: opcheck's repeated calls stay inside the cache from length 0
    opcheck_op(APPEND, (keys, values, k, v, torch.zeros((), dtype=torch.int64, device=device)))


class _Step(torch.nn.Module):
    """A decode step's cache write, as a patched attention layer makes it."""

    def __init__(self, keys, values, length):
        super().__init__()
        self.register_buffer("keys", keys)
        self.register_buffer("values", values)
        self.register_buffer("length", length)

    def forward(self, packed):
        h, d = self.keys.shape[1], self.keys.shape[3]
        k = packed[..., : h * d].unflatten(-1, (h, d)).transpose(1, 2)
        v = packed[..., h * d:].unflatten(-1, (h, d)).transpose(1, 2)
        update_kv_cache_(self.keys, self.values, k, v, length=self.length)
        return self.keys.sum() + self.values.sum()


def test_compiled_matches_eager(device):
    keys, values = _cache(1, 2, 12, 16, torch.float32, device, seed=9)
    eager = _Step(keys.clone(), values.clone(), torch.tensor(2, device=device))
    compiled_mod = _Step(keys.clone(), values.clone(), torch.tensor(2, device=device))
    compiled = torch.compile(compiled_mod, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for _ in range(3):
            packed = torch.randn(1, 1, 64, generator=g).to(device)
            assert torch.equal(compiled(packed), eager(packed))
    assert torch.equal(compiled_mod.keys, eager.keys) and torch.equal(compiled_mod.values, eager.values)
    assert int(compiled_mod.length) == int(eager.length) == 5


def test_export(device):
    keys, values = _cache(1, 2, 12, 16, torch.float32, device, seed=10)
    step = _Step(keys, values, torch.tensor(0, device=device)).eval()
    exported = torch.export.export(step, (torch.randn(1, 1, 64, device=device),))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "triton_ops.kv_cache_append_.default" in targets


# ----------------------------------------------------------------------------------------------------------------
# GPU: model shapes, CUDA graphs, and the trap on a position past the cache
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("b,t", [(1, 1), (64, 1), (2, 700)])  # decode, a batch of 64, a prefill over programs
def test_gpu_model_shapes_and_graph_replays(b, t):
    h, d = 8, 128
    s = 3 + 3 * t + 5  # the warm-up call and two replays, each writing t rows
    keys, values = _cache(b, h, s, d, torch.bfloat16, "cuda", seed=11)
    k, v = _packed_kv(b, t, h, d, torch.bfloat16, "cuda", seed=11, q_heads=32)
    length = torch.tensor(3, device="cuda")
    want_k, want_v = keys.clone(), values.clone()
    graph = torch.cuda.CUDAGraph()
    update_kv_cache_(keys, values, k, v, length=length)  # warm-up (compiles) before the capture
    want_k.index_copy_(2, torch.arange(3, 3 + t, device="cuda"), k)
    want_v.index_copy_(2, torch.arange(3, 3 + t, device="cuda"), v)
    with torch.cuda.graph(graph):
        update_kv_cache_(keys, values, k, v, length=length)
    for step in range(2):  # each replay writes at the advanced length
        graph.replay()
        at = torch.arange(3 + (step + 1) * t, 3 + (step + 2) * t, device="cuda")
        want_k.index_copy_(2, at, k)
        want_v.index_copy_(2, at, v)
    torch.cuda.synchronize()
    assert int(length) == 3 + 3 * t
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)


_TRAP = """
import torch
from decode_attention import update_kv_cache_
keys = torch.zeros(1, 2, 8, 16, device="cuda"); values = torch.zeros_like(keys)
k = torch.ones(1, 2, 3, 16, device="cuda")
update_kv_cache_(keys, values, k, k, length=torch.tensor(6, device="cuda"))
torch.cuda.synchronize()
print("NO ERROR")
"""


@pytest.mark.gpu
def test_gpu_a_position_past_the_cache_fails_the_launch():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _TRAP], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "NO ERROR" not in done.stdout, (done.stdout, done.stderr[-2000:])


def test_one_row(device):
    """Multi-query attention at batch 1: one KV head, one new row."""
    keys, values = _cache(1, 1, 6, 32, torch.float32, device, seed=12)
    k, v = _packed_kv(1, 1, 1, 32, torch.float32, device, seed=12)
    length = torch.tensor([2], device=device)
    want_k, want_v = _expected(keys, values, k, v, torch.tensor([2], device=device))
    update_kv_cache_(keys, values, k, v, length=length)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v) and int(length) == 3


@pytest.mark.parametrize("batch, release", [(1, True), (8, True), (1, False)])
def test_pdl_plan_releases_the_attention_early_only_for_one_row(monkeypatch, batch, release):
    """With PDL and ``triton_ops_core.pdl.RELEASE_SHORT``, a one-sequence decode step's cache write lets the
    attention launch once it runs (``RELEASE``, the last constexpr); eight sequences' does not (measured slower)."""
    from decode_attention import _cache_kernels as K
    from triton_ops_core import pdl

    monkeypatch.setattr(pdl, "enabled", lambda device: True)
    monkeypatch.setattr(pdl, "RELEASE_SHORT", release)
    monkeypatch.setattr(pdl, "TRIGGER", "end")
    monkeypatch.setattr(pdl, "sm_count", lambda device, cpu: 132)
    dev = device_for_tests()
    keys = torch.zeros(batch, 8, 64, 128, device=dev)
    k = torch.randn(batch, 8, 1, 128, device=dev)
    positions = torch.tensor([5], device=dev)
    info = kv_cache.validate_kv_cache_write(keys, keys.clone(), k, k.clone(), positions, None, False)
    plan = kv_cache._plan(keys, keys.clone(), k, k.clone(), None, None, K.POS_TENSOR, info)
    assert plan.tail[-2] is True and plan.options.get("launch_pdl") is True
    assert plan.tail[-1] is (release and batch == 1)
