"""The registered ops: torch.ops.triton_ops.*, opcheck, torch.compile(fullgraph=True) equal to eager, autograd
through the op, the in-place variant's mutation under compile, and no recompilation per sequence length."""

from __future__ import annotations

import pytest
import torch
from _rope_helpers import DEVICE, check_qk, check_rmsnorm_rope, rope_tables
from fused_rmsnorm_rope import FusedRMSNormRoPE, fused_qk_norm_rope, fused_rmsnorm_rope
from triton_ops_core.testing import count_compiles, opcheck_op

OPS = ("fused_rmsnorm_rope", "fused_rmsnorm_rope_backward", "fused_qk_norm_rope", "fused_qk_norm_rope_",
       "fused_qk_norm_rope_backward")


def _rope_inputs(lead, seq, heads, head_dim, dtype, positions, requires_grad=False, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(*lead, seq, heads * head_dim, device=DEVICE).to(dtype)
    w = torch.randn(heads * head_dim, device=DEVICE).to(dtype)
    cos, sin = rope_tables(seq + 5 if positions else seq, head_dim, dtype, DEVICE)
    pos = torch.randint(0, seq + 5, (*lead, seq), device=DEVICE) if positions else None
    return x.requires_grad_(requires_grad), w.requires_grad_(requires_grad), cos, sin, pos


def _qk_inputs(seq, hq, hk, d, dtype, packed, seed=0):
    torch.manual_seed(seed)
    if packed:  # views of one packed QKV projection output, as attention layers split it
        qkv = torch.randn(2, seq, (hq + 2 * hk) * d, device=DEVICE).to(dtype)
        q = qkv[..., : hq * d].unflatten(-1, (hq, d))
        k = qkv[..., hq * d: (hq + hk) * d].unflatten(-1, (hk, d))
    else:
        q = torch.randn(2, seq, hq, d, device=DEVICE).to(dtype)
        k = torch.randn(2, seq, hk, d, device=DEVICE).to(dtype)
    qw, kw = torch.randn(d, device=DEVICE).to(dtype), torch.randn(d, device=DEVICE).to(dtype)
    cos, sin = rope_tables(seq, d, dtype, DEVICE)
    return q, k, qw, kw, cos, sin


def test_every_op_is_registered():
    for name in OPS:
        assert isinstance(getattr(torch.ops.triton_ops, name).default, torch._ops.OpOverload), name
    schema = str(torch.ops.triton_ops.fused_qk_norm_rope_.default._schema)
    assert "Tensor(a0!) q" in schema and "Tensor(a1!) k" in schema  # the mutation is in the schema


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("lead,positions", [((), False), ((2,), True)])
def test_opcheck_rmsnorm_rope(dtype, requires_grad, lead, positions):
    x, w, cos, sin, pos = _rope_inputs(lead, 3, 2, 8, dtype, positions, requires_grad)
    opcheck_op(torch.ops.triton_ops.fused_rmsnorm_rope.default, (x, w, cos, sin, 1e-6, pos, None, 8, "neox", False))


@pytest.mark.parametrize("layout,gemma,rotary_dim", [("neox", False, None), ("interleaved", True, 4)])
def test_opcheck_rmsnorm_rope_options(layout, gemma, rotary_dim):
    x, w, cos, sin, pos = _rope_inputs((2,), 2, 2, 8, torch.float32, True, requires_grad=True)
    cos, sin = cos[:, : rotary_dim or 8], sin[:, : rotary_dim or 8]
    opcheck_op(torch.ops.triton_ops.fused_rmsnorm_rope.default,
               (x, w, cos, sin, 1e-5, pos, rotary_dim, 8, layout, gemma))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_opcheck_qk_norm_rope(requires_grad, packed):
    q, k, qw, kw, cos, sin = _qk_inputs(2, 4, 2, 8, torch.float32, packed)
    if requires_grad:  # a leaf each: the packed views become leaves of their own
        q, k, qw, kw = (t.detach().clone().requires_grad_() for t in (q, k, qw, kw))
    opcheck_op(torch.ops.triton_ops.fused_qk_norm_rope.default,
               (q, k, qw, kw, cos, sin, None, 1e-6, None, "neox", False))


def test_opcheck_qk_norm_rope_inplace():
    q, k, qw, kw, cos, sin = _qk_inputs(2, 4, 2, 8, torch.float32, packed=False)
    opcheck_op(torch.ops.triton_ops.fused_qk_norm_rope_.default,
               (q, k, qw, kw, cos, sin, None, 1e-6, None, "neox", False))


def test_opcheck_backward_ops():
    x, w, cos, sin, _ = _rope_inputs((2,), 3, 2, 8, torch.float32, False)
    dy = torch.randn_like(x)
    opcheck_op(torch.ops.triton_ops.fused_rmsnorm_rope_backward.default,
               (dy, x, w, cos, sin, 1e-6, None, None, 8, "neox", False))
    q, k, qw, kw, cos, sin = _qk_inputs(2, 4, 2, 8, torch.float32, packed=False)
    opcheck_op(torch.ops.triton_ops.fused_qk_norm_rope_backward.default,
               (torch.randn_like(q), torch.randn_like(k), q, k, qw, kw, cos, sin, None, 1e-6, None, "neox", False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compiled_function_and_module_equal_eager(dtype):
    x, w, cos, sin, pos = _rope_inputs((2,), 3, 2, 8, dtype, True)
    eager = fused_rmsnorm_rope(x, w, cos, sin, 1e-6, position_ids=pos, head_dim=8)
    check_rmsnorm_rope(eager, x, w, cos, sin, eps=1e-6, position_ids=pos, head_dim=8)

    def fn(x, w, cos, sin, pos):
        return fused_rmsnorm_rope(x, w, cos, sin, 1e-6, position_ids=pos, head_dim=8)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w, cos, sin, pos)
    assert torch.equal(compiled, eager)
    module = FusedRMSNormRoPE(16, 8, 1e-6, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(w)
        expect = module(x, cos, sin, pos)
        got = torch.compile(module, fullgraph=True, backend="aot_eager")(x, cos, sin, pos)
    assert torch.equal(got, expect) and torch.equal(expect, eager)


def test_compiled_gradients_equal_eager():
    x, w, cos, sin, _ = _rope_inputs((2,), 3, 2, 8, torch.float32, False, requires_grad=True)

    def loss(fn):
        x.grad = w.grad = None
        fn(x, w).square().sum().backward()
        return x.grad.clone(), w.grad.clone()

    eager = loss(lambda x, w: fused_rmsnorm_rope(x, w, cos, sin, head_dim=8))
    compiled = loss(torch.compile(lambda x, w: fused_rmsnorm_rope(x, w, cos, sin, head_dim=8), fullgraph=True,
                                  backend="aot_eager"))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    # and the gradients are right (float64 autograd through the reference)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    from fused_rmsnorm_rope import rmsnorm_rope_reference

    rmsnorm_rope_reference(x64, w64, cos.double(), sin.double(), head_dim=8).square().sum().backward()
    torch.testing.assert_close(eager[0].double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eager[1].double(), w64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_compiled_qk_equals_eager_out_of_place_and_in_place(packed):
    q, k, qw, kw, cos, sin = _qk_inputs(3, 4, 2, 8, torch.float32, packed)
    eq, ek = fused_qk_norm_rope(q, k, qw, kw, cos, sin)
    check_qk(eq, ek, q, k, qw, kw, cos, sin)

    def out_of_place(q, k):
        return fused_qk_norm_rope(q, k, qw, kw, cos, sin)

    cq, ck = torch.compile(out_of_place, fullgraph=True, backend="aot_eager")(q, k)
    assert torch.equal(cq, eq) and torch.equal(ck, ek)

    def in_place(q, k):
        fused_qk_norm_rope(q, k, qw, kw, cos, sin, inplace=True)
        return q.sum() + k.sum()

    q2, k2 = q.clone(), k.clone()
    torch.compile(in_place, fullgraph=True, backend="aot_eager")(q2, k2)  # the mutation survives compilation
    assert torch.equal(q2, eq) and torch.equal(k2, ek)


def test_compiled_qk_gradients_equal_eager():
    q, k, qw, kw, cos, sin = (t.requires_grad_() if i < 4 else t
                              for i, t in enumerate(_qk_inputs(2, 4, 2, 8, torch.float32, packed=False)))
    grads = []
    for fn in (fused_qk_norm_rope, torch.compile(fused_qk_norm_rope, fullgraph=True, backend="aot_eager")):
        for t in (q, k, qw, kw):
            t.grad = None
        qo, ko = fn(q, k, qw, kw, cos, sin)
        (qo.square().sum() + 2 * ko.sum()).backward()
        grads.append([t.grad.clone() for t in (q, k, qw, kw)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_dynamic_shapes_compile_once_over_lengths():
    """A decode loop and a prefill of several lengths: one compiled graph (dynamic=True), eager results."""
    w = torch.randn(16, device=DEVICE)
    cos, sin = rope_tables(64, 8, torch.float32, DEVICE)
    fn = torch.compile(lambda x, pos: fused_rmsnorm_rope(x, w, cos, sin, position_ids=pos, head_dim=8),
                       fullgraph=True, dynamic=True, backend="aot_eager")
    with count_compiles() as compiles:
        for seq in (1, 2, 3, 5, 9, 17, 33):
            x = torch.randn(1, seq, 16, device=DEVICE)
            pos = torch.arange(seq, device=DEVICE)[None]
            out = fn(x, pos)
            assert torch.equal(out, fused_rmsnorm_rope(x, w, cos, sin, position_ids=pos, head_dim=8))
    assert compiles["frames"] <= 2, compiles  # at most one recompilation (the first static guess)


def test_export_of_module():
    x, w, cos, sin, pos = _rope_inputs((1,), 3, 2, 8, torch.float32, True)
    module = FusedRMSNormRoPE(16, 8, device=DEVICE)
    exported = torch.export.export(module, (x, cos, sin, pos))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "triton_ops.fused_rmsnorm_rope.default" in targets
    with torch.no_grad():
        assert torch.equal(exported.module()(x, cos, sin, pos), module(x, cos, sin, pos))
