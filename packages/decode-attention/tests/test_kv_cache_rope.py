"""update_kv_cache_ with the rotary embedding in the same launch (q, cos, sin): q and k rotated in place
(``x * cos + rotate_half(x) * sin``, float32, one rounding), optionally after Qwen3's per-head RMSNorm, the rotated k
written into the cache at its positions or at a device length counter, v copied; against a float64 rotation and
index_copy_; errors; the two registered ops."""

from __future__ import annotations

import pytest
import torch
from decode_attention import KVCacheOverflowError, kv_cache, update_kv_cache_
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError
from triton_ops_core.testing import opcheck_op

WRITE_ROPE = torch.ops.triton_ops.kv_cache_write_rope_.default
APPEND_ROPE = torch.ops.triton_ops.kv_cache_append_rope_.default


def _packed(b, t, hq, h, d, dtype, device, seed):
    """q, k, v as [B, H, T, D] transposed views of one packed [B, T, (Hq + 2 Hkv) * D] projection output."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randn(b, t, (hq + 2 * h) * d, generator=g).to(device=device, dtype=dtype)
    q = packed[..., :hq * d].unflatten(-1, (hq, d)).transpose(1, 2)
    k = packed[..., hq * d:(hq + h) * d].unflatten(-1, (h, d)).transpose(1, 2)
    v = packed[..., (hq + h) * d:].unflatten(-1, (h, d)).transpose(1, 2)
    return packed, q, k, v


def _tables(b, t, d, positions, table_dtype, device, form="batch"):
    """transformers' Llama tables: cos/sin of position x inverse frequency, the two halves repeated."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = positions.double().cpu()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(table_dtype), emb.sin().to(table_dtype)
    if form == "batch":
        cos, sin = cos.expand(b, t, d).contiguous(), sin.expand(b, t, d).contiguous()
    elif form == "one":
        cos, sin = cos[None], sin[None]
    return cos.to(device), sin.to(device)


def _rotated(x, cos, sin):
    """float64 ``x * cos + rotate_half(x) * sin`` of [B, H, T, D] with [B', T, D] or [T, D] tables."""
    x = x.double()
    c, s = cos.double(), sin.double()
    if c.dim() == 2:
        c, s = c[None], s[None]
    c, s = c[:, None], s[:, None]  # broadcast over heads
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * c + rot * s


def _normed(x, w, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def _tol(dtype):
    # float32: the kernel's float32 arithmetic; 16-bit: one rounding of the result (the interpreter truncates)
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,hq,h,t,s,d,form", [(1, 8, 2, 1, 24, 64, "batch"), (3, 4, 4, 2, 9, 32, "one"),
                                                (2, 6, 2, 5, 16, 16, "plain")])
def test_positions_rotate_q_and_k_and_write_the_rotated_k(device, dtype, b, hq, h, t, s, d, form):
    g = torch.Generator().manual_seed(b * 100 + t)
    keys = torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype)
    values = torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype)
    packed, q, k, v = _packed(b, t, hq, h, d, dtype, device, seed=t)
    pos = torch.randperm(s, generator=g)[:t].to(device)
    cos, sin = _tables(b, t, d, pos + 3, torch.float32, device, form)
    want_q, want_k = _rotated(q, cos, sin), _rotated(k, cos, sin)
    want_keys, want_values = keys.clone(), values.clone().index_copy_(2, pos, v)
    update_kv_cache_(keys, values, k, v, positions=pos, q=q, cos=cos, sin=sin)
    torch.testing.assert_close(q.double(), want_q, **_tol(dtype))
    torch.testing.assert_close(k.double(), want_k, **_tol(dtype))
    assert torch.equal(keys.index_select(2, pos), k)  # the cache holds the rotated k, bit for bit
    others = torch.ones(s, dtype=torch.bool)
    others[pos.cpu()] = False
    assert torch.equal(keys[:, :, others.to(device)], want_keys[:, :, others.to(device)])  # nothing else written
    assert torch.equal(values, want_values)


@pytest.mark.parametrize("rows_per_program", [64, 2])  # one program (counter advanced inside), or many
def test_length_counter_with_rope(device, monkeypatch, rows_per_program):
    monkeypatch.setattr(kv_cache, "ONE_PROGRAM_ROWS", rows_per_program)
    kv_cache.clear_kv_cache_plans()
    b, hq, h, t, s, d = 2, 4, 2, 3, 20, 32
    keys = torch.randn(b, h, s, d).to(device)
    values = torch.randn(b, h, s, d).to(device)
    length = torch.tensor([5], device=device)
    for step in range(2):
        _, q, k, v = _packed(b, t, hq, h, d, torch.float32, device, seed=step)
        start = 5 + step * t
        pos = torch.arange(start, start + t)
        cos, sin = _tables(b, t, d, pos, torch.float32, device)
        want_q, want_k = _rotated(q, cos, sin), _rotated(k, cos, sin)
        update_kv_cache_(keys, values, k, v, length=length, q=q, cos=cos, sin=sin)
        torch.testing.assert_close(q.double(), want_q, **_tol(torch.float32))
        torch.testing.assert_close(k.double(), want_k, **_tol(torch.float32))
        assert torch.equal(keys[:, :, start:start + t], k) and torch.equal(values[:, :, start:start + t], v)
        assert int(length) == start + t
    kv_cache.clear_kv_cache_plans()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [False, True])
def test_qk_norm_then_rope_then_write(device, dtype, length):
    """Qwen3's step: each q and k head RMS-normalized with its weight, rotated, k written (one launch)."""
    b, hq, h, t, s, d, eps = 2, 8, 2, 1, 10, 32, 1e-6
    g = torch.Generator().manual_seed(21)
    keys = torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype)
    values = torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype)
    _, q, k, v = _packed(b, t, hq, h, d, dtype, device, seed=22)
    q.mul_(3.0)  # a norm that matters
    qw, kw = (torch.rand(d, generator=g) + 0.5).to(device=device, dtype=dtype), (torch.rand(d, generator=g) + 0.5).to(
        device=device, dtype=dtype)
    cos, sin = _tables(b, t, d, torch.tensor([4]), torch.float32, device)
    want_q = _rotated(_normed(q, qw, eps), cos, sin)
    want_k = _rotated(_normed(k, kw, eps), cos, sin)
    where = {"length": torch.tensor(4, device=device)} if length else {"positions": torch.tensor([4], device=device)}
    update_kv_cache_(keys, values, k, v, q=q, cos=cos, sin=sin, q_norm_weight=qw, k_norm_weight=kw, eps=eps, **where)
    torch.testing.assert_close(q.double(), want_q, **_tol(dtype))
    torch.testing.assert_close(k.double(), want_k, **_tol(dtype))
    assert torch.equal(keys[:, :, 4:5], k) and torch.equal(values[:, :, 4:5], v)
    with pytest.raises(InvalidArgumentError, match="both or neither"):
        update_kv_cache_(keys, values, k, v, q=q, cos=cos, sin=sin, q_norm_weight=qw, positions=where.get("positions"))
    with pytest.raises(InvalidArgumentError, match="with the rotary embedding"):
        update_kv_cache_(keys, values, k, v, q_norm_weight=qw, k_norm_weight=kw)
    with pytest.raises(ShapeMismatchError, match="k_weight: expected a contiguous"):
        update_kv_cache_(keys, values, k, v, q=q, cos=cos, sin=sin, q_norm_weight=qw, k_norm_weight=kw[:-1])
    with pytest.raises(InvalidArgumentError, match="eps"):
        update_kv_cache_(keys, values, k, v, q=q, cos=cos, sin=sin, q_norm_weight=qw, k_norm_weight=kw, eps=0.0)


@pytest.mark.parametrize("ring", [False, True])
def test_gemma_qk_norm_scales_by_one_plus_weight(device, ring):
    """Gemma 3's step: q/k norms that scale by ``1 + weight`` (weights near zero, as Gemma's are), rotated, k
    written at a position or, for a full sliding window, over the ring's oldest row (against a float64 norm and
    rotation)."""
    b, hq, h, t, s, d, eps = 2, 4, 1, 1, 6, 32, 1e-6
    g = torch.Generator().manual_seed(31)
    keys = torch.randn(b, h, s, d, generator=g).to(device)
    values = torch.randn(b, h, s, d, generator=g).to(device)
    _, q, k, v = _packed(b, t, hq, h, d, torch.float32, device, seed=32)
    qw, kw = (0.3 * torch.randn(d, generator=g)).to(device), (0.3 * torch.randn(d, generator=g)).to(device)
    cos, sin = _tables(b, t, d, torch.tensor([9]), torch.float32, device)
    want_q = _rotated(_normed(q, qw + 1.0, eps), cos, sin)
    want_k = _rotated(_normed(k, kw + 1.0, eps), cos, sin)
    length = torch.tensor(9, device=device)
    where = {"length": length, "ring": True} if ring else {"positions": torch.tensor([3], device=device)}
    update_kv_cache_(keys, values, k, v, q=q, cos=cos, sin=sin, q_norm_weight=qw, k_norm_weight=kw, eps=eps,
                     gemma=True, **where)
    torch.testing.assert_close(q.double(), want_q, **_tol(torch.float32))
    torch.testing.assert_close(k.double(), want_k, **_tol(torch.float32))
    slot = 9 % s if ring else 3
    assert torch.equal(keys[:, :, slot:slot + 1], k) and torch.equal(values[:, :, slot:slot + 1], v)
    with pytest.raises(InvalidArgumentError, match="gemma"):
        update_kv_cache_(keys, values, k, v, q=q, cos=cos, sin=sin, gemma=True,
                         positions=torch.tensor([3], device=device))
    with pytest.raises(InvalidArgumentError, match="gemma: expected a bool"):
        update_kv_cache_(keys, values, k, v, q=q, cos=cos, sin=sin, q_norm_weight=qw, k_norm_weight=kw, gemma=1,
                         positions=torch.tensor([3], device=device))


def test_bf16_tables_and_an_overflow_rotates_nothing(device):
    b, hq, h, t, s, d = 1, 2, 1, 2, 4, 16
    keys, values = torch.zeros(b, h, s, d, device=device), torch.zeros(b, h, s, d, device=device)
    _, q, k, v = _packed(b, t, hq, h, d, torch.float32, device, seed=3)
    cos, sin = _tables(b, t, d, torch.tensor([1, 2]), torch.bfloat16, device)
    update_kv_cache_(keys, values, k, v, positions=torch.tensor([1, 2], device=device), q=q, cos=cos, sin=sin)
    torch.testing.assert_close(keys[:, :, 1:3], k)
    if device == "cpu":  # under the interpreter the host checks positions before the launch
        q0, k0 = q.clone(), k.clone()
        with pytest.raises(KVCacheOverflowError):
            update_kv_cache_(keys, values, k, v, positions=torch.tensor([3, 4]), q=q, cos=cos, sin=sin)
        assert torch.equal(q, q0) and torch.equal(k, k0)


def test_rope_errors(device):
    b, hq, h, t, s, d = 1, 4, 2, 1, 8, 16
    keys, values = torch.randn(b, h, s, d, device=device), torch.randn(b, h, s, d, device=device)
    _, q, k, v = _packed(b, t, hq, h, d, torch.float32, device, seed=4)
    cos, sin = _tables(b, t, d, torch.tensor([0]), torch.float32, device)
    pos = torch.tensor([0], device=device)
    with pytest.raises(InvalidArgumentError, match="no sin"):
        update_kv_cache_(keys, values, k, v, positions=pos, q=q, cos=cos)
    with pytest.raises(ShapeMismatchError, match="whole number of query heads"):
        update_kv_cache_(keys, values, k, v, positions=pos, q=q[:, :3], cos=cos, sin=sin)
    with pytest.raises(InvalidArgumentError, match="q: expected k's dtype"):
        update_kv_cache_(keys, values, k, v, positions=pos, q=q.half(), cos=cos, sin=sin)
    with pytest.raises(ShapeMismatchError, match="cos: expected"):
        update_kv_cache_(keys, values, k, v, positions=pos, q=q, cos=cos[..., :8], sin=sin[..., :8])
    with pytest.raises(ShapeMismatchError, match="sin: expected cos's shape"):
        update_kv_cache_(keys, values, k, v, positions=pos, q=q, cos=cos, sin=sin[0])
    odd_keys = torch.randn(b, h, s, 15, device=device)
    odd = torch.randn(b, h, 1, 15, device=device)
    with pytest.raises(ShapeMismatchError, match="even head dim"):
        update_kv_cache_(odd_keys, odd_keys.clone(), odd, odd.clone(), positions=pos,
                         q=torch.randn(b, hq, 1, 15, device=device), cos=cos[..., :15], sin=sin[..., :15])


def test_rope_ops_registered_with_mutations_and_opcheck(device):
    schema = str(WRITE_ROPE._schema)
    assert all(f"!) {name}" in schema for name in ("keys", "values", "q", "k")) and "Tensor v," in schema
    assert "!) length" in str(APPEND_ROPE._schema)
    b, hq, h, t, s, d = 1, 4, 2, 2, 8, 16
    keys, values = torch.randn(b, h, s, d, device=device), torch.randn(b, h, s, d, device=device)
    _, q, k, v = _packed(b, t, hq, h, d, torch.float32, device, seed=5)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # opcheck clones its arguments
    cos, sin = _tables(b, t, d, torch.tensor([1, 2]), torch.float32, device)
    w = torch.randn(d, device=device)
    opcheck_op(WRITE_ROPE, (keys, values, q, k, v, cos, sin, torch.tensor([5, 1], device=device), None, None, 1e-6))
    opcheck_op(WRITE_ROPE, (keys, values, q, k, v, cos, sin, None, w, w.flip(0).contiguous(), 1e-5))
    opcheck_op(APPEND_ROPE, (keys, values, q, k, v, cos, sin, torch.zeros((), dtype=torch.int64, device=device),
                             None, None, 1e-6))


class _Step(torch.nn.Module):
    """A Llama decode step's RoPE and cache write on a packed q/k/v output, as a patched attention makes it."""

    def __init__(self, keys, values, length, hq):
        super().__init__()
        self.register_buffer("keys", keys)
        self.register_buffer("values", values)
        self.register_buffer("length", length)
        self.hq = hq

    def forward(self, packed, cos, sin):
        h, d = self.keys.shape[1], self.keys.shape[3]
        q = packed[..., :self.hq * d].unflatten(-1, (self.hq, d)).transpose(1, 2)
        k = packed[..., self.hq * d:(self.hq + h) * d].unflatten(-1, (h, d)).transpose(1, 2)
        v = packed[..., (self.hq + h) * d:].unflatten(-1, (h, d)).transpose(1, 2)
        update_kv_cache_(self.keys, self.values, k, v, length=self.length, q=q, cos=cos, sin=sin)
        return q.sum(dim=-1) + self.keys.sum()


def test_compiled_matches_eager_and_exports(device):
    b, hq, h, s, d = 1, 4, 2, 12, 16
    keys, values = torch.randn(b, h, s, d, device=device), torch.randn(b, h, s, d, device=device)
    eager = _Step(keys.clone(), values.clone(), torch.tensor(2, device=device), hq)
    compiled_mod = _Step(keys.clone(), values.clone(), torch.tensor(2, device=device), hq)
    compiled = torch.compile(compiled_mod, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for step in range(3):
            packed = torch.randn(b, 1, (hq + 2 * h) * d, generator=g).to(device)
            cos, sin = _tables(b, 1, d, torch.tensor([2 + step]), torch.float32, device)
            assert torch.equal(compiled(packed.clone(), cos, sin), eager(packed.clone(), cos, sin))
    assert torch.equal(compiled_mod.keys, eager.keys) and int(compiled_mod.length) == int(eager.length) == 5
    exported = torch.export.export(eager.eval(), (packed, cos, sin))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "triton_ops.kv_cache_append_rope_.default" in targets


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 8, 64])
def test_gpu_llama_shapes_in_a_graph(b):
    """Llama-3-8B's 32 / 8 heads of 128, bf16, positions from the counter, captured in a CUDA graph and replayed."""
    hq, h, d, s = 32, 8, 128, 64
    dev = "cuda"
    keys = torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16)
    values = torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16)
    length = torch.tensor([7], device=dev)
    packed, q, k, v = _packed(b, 1, hq, h, d, torch.bfloat16, dev, seed=b)
    cos, sin = (torch.empty(b, 1, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
    source = packed.clone()

    def step():
        update_kv_cache_(keys, values, k, v, length=length, q=q, cos=cos, sin=sin)

    step()  # plans chosen before the capture
    length.fill_(7)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for i in range(3):
        new = torch.randn(source.shape, device=dev, dtype=torch.bfloat16)
        packed.copy_(new)
        c, s_ = _tables(b, 1, d, torch.tensor([7 + i]), torch.bfloat16, dev)
        cos.copy_(c)
        sin.copy_(s_)
        q0, k0, v0 = q.clone(), k.clone(), v.clone()
        graph.replay()
        torch.testing.assert_close(q.double(), _rotated(q0, cos, sin), rtol=8e-3, atol=8e-3)
        torch.testing.assert_close(k.double(), _rotated(k0, cos, sin), rtol=8e-3, atol=8e-3)
        assert torch.equal(keys[:, :, 7 + i], k[:, :, 0]) and torch.equal(values[:, :, 7 + i], v0[:, :, 0])
    assert int(length) == 10
