"""The registered ops: torch.ops.triton_ops.moe_route / moe_experts, opcheck, torch.compile(fullgraph=True)
equal to eager (function and module), torch.export, and the named error when a gradient is asked for."""

from __future__ import annotations

import pytest
import torch
from _moe_helpers import make_moe, to_layout
from fused_moe import FusedMoE, MoEBackwardError, fused_moe, moe_experts, moe_route
from triton_ops_core.testing import normalized_like_the_prologue, opcheck_op

ROUTE = torch.ops.triton_ops.moe_route.default
EXPERTS = torch.ops.triton_ops.moe_experts.default


def test_ops_are_registered():
    assert isinstance(ROUTE, torch._ops.OpOverload) and isinstance(EXPERTS, torch._ops.OpOverload)
    assert "renormalize" in str(ROUTE._schema) and "gate_up_layout" in str(EXPERTS._schema)


@pytest.mark.parametrize("dtype,bias,lead", [(torch.float32, True, None), (torch.bfloat16, False, (2, 3))])
def test_opcheck_route(device, dtype, bias, lead):
    x, rw, rb, *_ = make_moe(4, 32, 8, 8, dtype=dtype, device=device, seed=1, bias=bias, lead=lead)
    opcheck_op(ROUTE, (x, rw, rb, 3, True))


@pytest.mark.parametrize("layout,transposed,bias,ids_dtype", [
    ("interleaved", True, True, torch.int32), ("concatenated", False, False, torch.int64)])
def test_opcheck_experts(device, layout, transposed, bias, ids_dtype):
    x, rw, rb, w1, b1, w2, b2 = make_moe(5, 32, 16, 6, device=device, seed=2, bias=bias)
    w1, b1, w2 = to_layout(w1, b1, w2, layout, transposed)
    ids, wts = moe_route(x, rw, rb, 2)
    opcheck_op(EXPERTS, (x, ids.to(ids_dtype), wts, w1, b1, w2, b2, "swiglu_oai", layout, transposed, 1.702, 7.0))


def test_compiled_function_and_module_equal_eager(device):
    x, rw, rb, w1, b1, w2, b2 = make_moe(0, 32, 16, 8, device=device, seed=3, lead=(2, 3))
    eager = fused_moe(x, rw, rb, w1, b1, w2, b2, 4)
    compiled = torch.compile(lambda x: fused_moe(x, rw, rb, w1, b1, w2, b2, 4), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), eager)
    module = FusedMoE(32, 16, 8, 4, device=device)
    with torch.no_grad():
        for p, v in zip((module.router.weight, module.router.bias, module.experts.gate_up_proj,
                         module.experts.gate_up_proj_bias, module.experts.down_proj, module.experts.down_proj_bias),
                        (rw, rb, w1, b1, w2, b2)):
            p.copy_(v)
        out, scores = module(x)
        cout, cscores = torch.compile(module, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(out, eager) and torch.equal(cout, out) and torch.equal(cscores, scores)
    assert scores.shape == (6, 4) and scores.dtype == x.dtype


def test_export_of_module(device):
    module = FusedMoE(32, 16, 4, 2, device=device)
    x = torch.randn(2, 3, 32, device=device)
    exported = torch.export.export(module, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"triton_ops.moe_route.default", "triton_ops.moe_experts.default"} <= targets
    with torch.no_grad():
        got, want = exported.module()(x), module(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_backward_raises_a_named_error(device):
    x, rw, rb, w1, b1, w2, b2 = make_moe(3, 32, 16, 4, device=device, seed=4)
    x.requires_grad_(True)
    out = fused_moe(x, rw, rb, w1, b1, w2, b2, 2)  # the forward works with grad enabled (model(x) outside no_grad)
    with pytest.raises(MoEBackwardError, match="moe_experts"):
        out.sum().backward()
    x2 = x.detach()
    rw.requires_grad_(True)
    _, wts = moe_route(x2, rw, rb, 2)
    with pytest.raises(MoEBackwardError, match="moe_route"):
        wts.sum().backward()
    assert issubclass(MoEBackwardError, NotImplementedError)


def test_experts_under_compile_with_external_routing(device):
    x, rw, rb, w1, b1, w2, b2 = make_moe(7, 32, 16, 8, device=device, seed=5)
    w1c, b1c, w2c = to_layout(w1, b1, w2, "concatenated", False)

    def block(x):  # Qwen3-MoE style: the router is plain PyTorch, the experts the op
        probs = torch.softmax(torch.nn.functional.linear(x, rw), dim=-1)
        wts, ids = torch.topk(probs, 2, dim=-1)
        return moe_experts(x, ids, wts / wts.sum(-1, keepdim=True), w1c, b1c, w2c, b2, "silu",
                           gate_up_layout="concatenated", transposed=False)

    assert torch.equal(torch.compile(block, fullgraph=True, backend="aot_eager")(x), block(x))


@pytest.mark.parametrize("lead", [None, (2, 3)])
def test_residual_joins_the_combine(device, lead):
    """``residual=``: the decoder layer's add after its MoE inside the combine's one rounding: within fp32 rounding
    of ``residual + fused_moe(...)`` and of float64, the residual itself untouched; wrong residuals are named."""
    x, rw, rb, w1, b1, w2, b2 = make_moe(6, 32, 16, 6, device=device, seed=9, lead=lead)
    residual = torch.randn(x.shape, generator=torch.Generator().manual_seed(10)).to(device) * 3
    kept = residual.clone()
    plain = fused_moe(x, rw, rb, w1, b1, w2, b2, 2)
    fused = fused_moe(x, rw, rb, w1, b1, w2, b2, 2, residual=residual)
    assert torch.equal(residual, kept) and fused.shape == x.shape
    want = residual.double() + plain.double()
    assert ((fused.double() - want).norm() / want.norm()).item() < 1e-6
    assert not torch.equal(fused, plain)
    ids, wts = moe_route(x, rw, rb, 2)
    opcheck_op(EXPERTS, (x, ids, wts, w1, b1, w2, b2, "swiglu_oai", "interleaved", True, 1.702, 7.0, None, None,
                         residual))
    compiled = torch.compile(lambda x, r: fused_moe(x, rw, rb, w1, b1, w2, b2, 2, residual=r), fullgraph=True,
                             backend="aot_eager")
    assert torch.equal(compiled(x, residual), fused)


def test_residual_errors(device):
    from triton_ops_core.exceptions import LayoutError, ShapeMismatchError, UnsupportedDtypeError

    x, rw, rb, w1, b1, w2, b2 = make_moe(4, 32, 16, 6, device=device, seed=11)
    with pytest.raises(ShapeMismatchError, match="residual"):
        fused_moe(x, rw, rb, w1, b1, w2, b2, 2, residual=x[:2])
    with pytest.raises(UnsupportedDtypeError, match="residual"):
        fused_moe(x, rw, rb, w1, b1, w2, b2, 2, residual=x.double())
    with pytest.raises(LayoutError, match="residual"):
        fused_moe(x, rw, rb, w1, b1, w2, b2, 2, residual=torch.randn(32, 4, device=device).t())
    # a residual with a row stride of its own (a 2-D view) is read as it is
    wide = torch.randn(4, 64, device=device)
    got = fused_moe(x, rw, rb, w1, b1, w2, b2, 2, residual=wide[:, :32])
    assert torch.allclose(got, fused_moe(x, rw, rb, w1, b1, w2, b2, 2, residual=wide[:, :32].contiguous()))


@pytest.mark.parametrize("t", [1, 3, 17])
@pytest.mark.parametrize("fp8,dtype", [(False, torch.float16), (True, torch.float16), (True, torch.bfloat16)])
def test_norm_prologue_equals_the_moe_of_the_normalized_input(device, t, fp8, dtype):
    """norm_weight=: the post-attention norm inside the router's and the gate/up GEMM's launches; the same routing
    and outputs, bit for bit, as the MoE of the input normalized by the same arithmetic outside (fp16: the
    interpreter's fp32 -> bf16 cast truncates); the residual on top; the tiles of 1 token (split router, one-row
    FMA tiles for FP8 experts) to 17."""
    from fused_moe import quantize_experts_fp8

    # (bf16: the interpreter's fp32 -> bf16 cast truncates, in the prologue and in the outside launch alike)
    x, rw, rb, w1, b1, w2, b2 = make_moe(t, 64, 24, 6, dtype=dtype, device=device, seed=20 + t)
    x = x * 3 + 0.5
    kw = {}
    if fp8:
        w1, s1, w2, s2 = quantize_experts_fp8(w1, w2)
        kw = dict(gate_up_scale=s1, down_scale=s2)
    norm_w = (torch.rand(64, generator=torch.Generator().manual_seed(t)) + 0.5).to(device, dtype)
    xn = normalized_like_the_prologue(x, norm_w, 1e-5)
    fused = fused_moe(x, rw, rb, w1, b1, w2, b2, 2, norm_weight=norm_w, norm_eps=1e-5, residual=x, **kw)
    outside = fused_moe(xn, rw, rb, w1, b1, w2, b2, 2, residual=x, **kw)
    assert torch.equal(fused, outside)
    ids_f, wts_f = moe_route(x, rw, rb, 2, norm_weight=norm_w, norm_eps=1e-5)
    ids_o, wts_o = moe_route(xn, rw, rb, 2)
    assert torch.equal(ids_f, ids_o) and torch.equal(wts_f, wts_o)
    assert not torch.equal(fused, fused_moe(x, rw, rb, w1, b1, w2, b2, 2, residual=x, **kw))


def test_row_layout_behind_the_norm_prologue_keeps_its_result(device, monkeypatch):
    """MoEConfig.row_layout with the RMSNorm prologue: the gate/up GEMM keeps the [1, BLOCK_K, BLOCK_N] tile (the
    row layout would load the norm weight synchronously every K step), the down GEMM takes the row layout; FP8
    experts at one and three tokens give the MoE of the input normalized outside, bit for bit."""
    from fused_moe import MoEConfig, ops, quantize_experts_fp8

    monkeypatch.setattr(ops, "_config", lambda *a: MoEConfig(1, 8, 16, 16, 16, 4, 1, fma=True, row_layout=True))
    planned = []
    make_plan = ops._experts_plan
    monkeypatch.setattr(ops, "_experts_plan", lambda *a, **k: planned.append(make_plan(*a, **k)) or planned[-1])

    def fma_mode(plan):  # the launch's USE_FMA (the tail holds the kernel's trailing arguments, USE_FMA among them)
        names = plan.kernel.arg_names
        return plan.tail[names.index("USE_FMA") - (len(names) - len(plan.tail))]

    ops.clear_caches()
    try:
        for t in (1, 3):
            x, rw, rb, w1, b1, w2, b2 = make_moe(t, 64, 24, 6, dtype=torch.float16, device=device, seed=60 + t)
            w1, s1, w2, s2 = quantize_experts_fp8(w1, w2)
            kw = dict(gate_up_scale=s1, down_scale=s2)
            norm_w = (torch.rand(64, generator=torch.Generator().manual_seed(t)) + 0.5).to(device, x.dtype)
            xn = normalized_like_the_prologue(x, norm_w, 1e-5)
            fused = fused_moe(x, rw, rb, w1, b1, w2, b2, 2, norm_weight=norm_w, norm_eps=1e-5, **kw)
            assert torch.isfinite(fused).all()
            assert torch.equal(fused, fused_moe(xn, rw, rb, w1, b1, w2, b2, 2, **kw))
        # the prologue's plans keep the 3-D tile in the gate/up GEMM; the outside calls take the row layout in both
        assert {(fma_mode(p.gate_up), fma_mode(p.down)) for p in planned} == {(1, 2), (2, 2)}
    finally:
        ops.clear_caches()


def test_norm_prologue_errors_and_op(device):
    from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError

    x, rw, rb, w1, b1, w2, b2 = make_moe(3, 32, 16, 6, device=device, seed=30)
    ones = torch.ones(32, device=device)
    with pytest.raises(ShapeMismatchError, match="norm_weight"):
        fused_moe(x, rw, rb, w1, b1, w2, b2, 2, norm_weight=ones[:16])
    with pytest.raises(InvalidArgumentError, match="norm_eps"):
        fused_moe(x, rw, rb, w1, b1, w2, b2, 2, norm_weight=ones, norm_eps=0.0)
    fused_moe(x, rw, rb, w1, b1, w2, b2, 2, norm_weight=ones, norm_eps=1)
    with pytest.raises(InvalidArgumentError, match="norm_eps"):  # a bool after the int 1's plan
        fused_moe(x, rw, rb, w1, b1, w2, b2, 2, norm_weight=ones, norm_eps=True)
    opcheck_op(ROUTE, (x, rw, rb, 2, True, ones, 1e-5))
    eager = fused_moe(x, rw, rb, w1, b1, w2, b2, 2, norm_weight=ones * 1.5, norm_eps=1e-5, residual=x)
    compiled = torch.compile(lambda x, w: fused_moe(x, rw, rb, w1, b1, w2, b2, 2, norm_weight=w, norm_eps=1e-5,
                                                    residual=x), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, ones * 1.5), eager)
    ids, wts = moe_route(x, rw, rb, 2)
    opcheck_op(EXPERTS, (x, ids, wts, w1, b1, w2, b2, "swiglu_oai", "interleaved", True, 1.702, 7.0, None, None,
                         x, ones, 1e-5))


@pytest.mark.parametrize("path", ["split", "rows"])
def test_norm_prologue_in_the_split_router(device, monkeypatch, path):
    """The decode router's split GEMM (each program a K range) and its few-token kernel (each program some experts
    over all of K) normalize with the whole row's RMS: the same ids and weights as routing the normalized rows."""
    from fused_moe import ops

    x, rw, rb, *_ = make_moe(2, 256, 16, 6, dtype=torch.float16, device=device, seed=31)
    norm_w = (torch.rand(256, generator=torch.Generator().manual_seed(3)) + 0.5).to(device, torch.float16)
    if path == "split":
        monkeypatch.setattr(ops, "_route_split", lambda *args: 2)
    else:
        monkeypatch.setattr(ops, "_route_rows", lambda *args: True)
        monkeypatch.setattr(ops, "ROUTE_ROWS_PROGRAMS", 2)
        monkeypatch.setattr(ops, "ROUTE_ROWS_TILE", 256)
    ops.clear_caches()
    ids_f, wts_f = moe_route(x, rw, rb, 2, norm_weight=norm_w, norm_eps=1e-5)
    ids_o, wts_o = moe_route(normalized_like_the_prologue(x, norm_w, 1e-5), rw, rb, 2)
    assert torch.equal(ids_f, ids_o) and torch.equal(wts_f, wts_o)
    ops.clear_caches()
