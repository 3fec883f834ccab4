"""Compiled-kernel tests on a CUDA GPU: the required sizes, gradients, NaN rows, and one launch per call."""

from __future__ import annotations

import pytest
import torch
from fused_rmsnorm_rope import fused_qk_norm_rope, fused_rmsnorm_rope
from fused_rmsnorm_rope.reference import qk_norm_rope_reference, rmsnorm_rope_reference
from triton_ops_core.testing import assert_close_rel, poison_

pytestmark = pytest.mark.gpu

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 2e-5}


def _tables(n, width, dtype=torch.float32, device="cuda"):
    # real RoPE tables (cos^2 + sin^2 = 1) make errors representative of models
    inv = 1.0 / (10000 ** (torch.arange(0, width, 2, device=device, dtype=torch.float64) / width))
    ang = torch.arange(n, device=device, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _check(x, w, cos, sin, **kw):
    out = fused_rmsnorm_rope(x, w, cos, sin, **kw)
    ref = rmsnorm_rope_reference(x.double(), w.double(), cos.double(), sin.double(), **kw)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close_rel(out, ref, TOL[x.dtype])
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("batch", "seq", "hidden", "head_dim"),
    [(1, 8192, 4096, 128), (2, 1024, 8192, 128), (1, 257, 2880, 64), (2, 300, 4096, 64), (2, 300, 4096, 256),
     (8, 512, 2048, 128), (3, 1, 4096, 128)],
)
def test_required_sizes(batch, seq, hidden, head_dim, dtype):
    x = torch.randn(batch, seq, hidden, device="cuda", dtype=dtype)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    cos, sin = _tables(seq, head_dim)
    _check(x, w, cos, sin)


@pytest.mark.parametrize("layout", ["neox", "interleaved"])
def test_long_sequence_options(layout):
    seq, hidden = 8192, 8192
    x = torch.randn(1, seq, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    cos, sin = _tables(16384, 128)
    pos = torch.randint(0, 16384, (1, seq), device="cuda")
    _check(x, w, cos, sin, position_ids=pos, layout=layout, rotary_dim=64, gemma=True)


def test_fp32_and_strided_view():
    base = torch.randn(4, 200, 2 * 4096, device="cuda")
    x = base[..., 4096:]
    w = torch.randn(4096, device="cuda")
    cos, sin = _tables(200, 128)
    _check(x, w, cos, sin)


def test_nan_inf_rows_stay_in_their_row():
    x = torch.randn(2, 64, 4096, device="cuda", dtype=torch.float16)
    x[0, 3, 17] = float("nan")
    x[1, 9, 5] = float("inf")
    w = torch.randn(4096, device="cuda", dtype=torch.float16)
    cos, sin = _tables(64, 128)
    out = _check(x, w, cos, sin)  # NaN positions must equal the reference's (relative_error checks them)
    assert out[0, 3].isnan().all()  # NaN poisons the whole row through the mean square
    assert not torch.isfinite(out[1, 9]).all()  # Inf: x * rsqrt(inf) is NaN where x is Inf, as in PyTorch
    bad = torch.zeros(2, 64, dtype=torch.bool, device="cuda")
    bad[0, 3] = bad[1, 9] = True
    assert torch.isfinite(out[~bad]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "decode"), [(4096, False), (64, True)])
def test_qk_norm_rope_qwen3_packed(tokens, decode, dtype):
    hq, hk, d = 32, 8, 128
    qkv = torch.randn(tokens, 1, (hq + 2 * hk) * d, device="cuda", dtype=dtype) if decode else \
        torch.randn(1, tokens, (hq + 2 * hk) * d, device="cuda", dtype=dtype)
    q = qkv[..., : hq * d].unflatten(-1, (hq, d))
    k = qkv[..., hq * d: (hq + hk) * d].unflatten(-1, (hk, d))
    qw, kw = torch.randn(d, device="cuda", dtype=dtype), torch.randn(d, device="cuda", dtype=dtype)
    cos, sin = _tables(8192, d)
    pos = torch.randint(0, 8192, q.shape[:-2], device="cuda")
    qo, ko = fused_qk_norm_rope(q, k, qw, kw, cos, sin, pos)
    rq, rk = qk_norm_rope_reference(q.double(), k.double(), qw.double(), kw.double(), cos.double(), sin.double(), pos)
    assert_close_rel(qo, rq, TOL[dtype], "q")
    assert_close_rel(ko, rk, TOL[dtype], "k")
    before = qkv.clone()
    fused_qk_norm_rope(q, k, qw, kw, cos, sin, pos, inplace=True)
    assert torch.equal(q, qo) and torch.equal(k, ko)
    assert torch.equal(qkv[..., (hq + hk) * d:], before[..., (hq + hk) * d:])  # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["neox", "interleaved"])
def test_gradients(dtype, layout):
    x = torch.randn(2, 512, 4096, device="cuda", dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(4096, device="cuda")).to(dtype).requires_grad_()
    cos, sin = _tables(512, 128)
    y = fused_rmsnorm_rope(x, w, cos, sin, layout=layout)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = rmsnorm_rope_reference(x64, w64, cos.double(), sin.double(), layout=layout)
    rdx, rdw = torch.autograd.grad(ref, (x64, w64), g.double())
    tol = 2e-5 if dtype == torch.float32 else 1.2e-2
    assert_close_rel(dx, rdx, tol, "dx")
    assert_close_rel(dw, rdw, tol * 5, "dweight")


def test_qk_gradients():
    q = torch.randn(2, 256, 32, 128, device="cuda", requires_grad=True)
    k = torch.randn(2, 256, 8, 128, device="cuda", requires_grad=True)
    qw = torch.randn(128, device="cuda", requires_grad=True)
    kw = torch.randn(128, device="cuda", requires_grad=True)
    cos, sin = _tables(256, 128)
    qo, ko = fused_qk_norm_rope(q, k, qw, kw, cos, sin)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    grads = torch.autograd.grad((qo, ko), (q, k, qw, kw), (gq, gk))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, qw, kw)]
    rq, rk = qk_norm_rope_reference(*leaves, cos.double(), sin.double())
    refs = torch.autograd.grad((rq, rk), leaves, (gq.double(), gk.double()))
    for got, want, name in zip(grads, refs, ("dq", "dk", "dq_weight", "dk_weight")):
        assert_close_rel(got, want, 1e-4, name)


def _kernel_launches(fn) -> int:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.parametrize("with_pos", [False, True])
def test_one_launch_per_forward(with_pos):
    x = torch.randn(2, 1024, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    cos, sin = _tables(4096, 128)
    pos = torch.randint(0, 4096, (2, 1024), device="cuda") if with_pos else None
    if not with_pos:
        cos, sin = cos[:1024], sin[:1024]
    assert _kernel_launches(lambda: fused_rmsnorm_rope(x, w, cos, sin, position_ids=pos)) == 1


def test_one_launch_per_qk_call():
    qkv = torch.randn(1, 512, 48 * 128, device="cuda", dtype=torch.bfloat16)
    q = qkv[..., : 32 * 128].unflatten(-1, (32, 128))
    k = qkv[..., 32 * 128: 40 * 128].unflatten(-1, (8, 128))
    w = torch.randn(128, device="cuda", dtype=torch.bfloat16)
    cos, sin = _tables(512, 128)
    assert _kernel_launches(lambda: fused_qk_norm_rope(q, k, w, w, cos, sin)) == 1


def test_poisoned_output_is_fully_written():
    x = torch.randn(3, 77, 2880, device="cuda", dtype=torch.float16)
    w = torch.randn(2880, device="cuda", dtype=torch.float16)
    cos, sin = _tables(77, 64)
    poison_(torch.empty(3 * 77 * 2880 * 4, device="cuda", dtype=torch.float16))  # dirty the allocator's blocks
    out = fused_rmsnorm_rope(x, w, cos, sin)
    assert torch.isfinite(out).all()
