"""The registered ops: quantize_fp8, dequantize_fp8, fp8_gemm and fp8_linear under torch.ops.triton_ops, opcheck,
torch.compile(fullgraph=True) equal to eager, FP8Linear's gradient, no recompilation per token count, export."""

from __future__ import annotations

import pytest
import torch
from fp8_gemm import FP8Linear, dequantize_fp8, fp8_gemm, fp8_linear, quantize_fp8
from fp8_gemm.quantize import expand_scale
from torch import nn
from triton_ops_core.testing import assert_close_rel, count_compiles, opcheck_op

OPS = ("quantize_fp8", "dequantize_fp8", "fp8_gemm", "fp8_linear")


def _fp8_linear(device, in_f=64, out_f=32, bias=True, dtype=torch.bfloat16, **kw):
    torch.manual_seed(0)
    return FP8Linear.from_linear(nn.Linear(in_f, out_f, bias=bias, device=device, dtype=dtype), **kw)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)


def test_every_op_is_registered():
    for name in OPS:
        assert isinstance(getattr(torch.ops.triton_ops, name).default, torch._ops.OpOverload), name


@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_quantize_activation(device, granularity, dtype):
    t = torch.randn(4, 256, device=device).to(dtype)
    opcheck_op(torch.ops.triton_ops.quantize_fp8.default, (t, "e4m3", granularity, None, None, False, "activation"))


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_opcheck_quantize_column_major_weight(device, granularity):
    w = torch.randn(48, 256, device=device)  # weight.t(): the result keeps the column-major layout
    opcheck_op(torch.ops.triton_ops.quantize_fp8.default, (w.t(), "e4m3", granularity, None, None, False, "weight"))


def test_opcheck_quantize_given_scale_and_3d(device):
    t = torch.randn(2, 3, 64, device=device)
    opcheck_op(torch.ops.triton_ops.quantize_fp8.default,
               (t, "e5m2", "tensor", torch.tensor([0.01], device=device), None, False, "activation"))
    opcheck_op(torch.ops.triton_ops.quantize_fp8.default, (t, "e4m3", "row", None, None, False, "activation"))


def test_opcheck_dequantize_and_gemm(device):
    a = torch.randn(5, 256, device=device)
    w = torch.randn(48, 256, device=device)
    a_q, a_s = quantize_fp8(a, "e4m3", "row")
    w_q, w_s = quantize_fp8(w.t(), "e4m3", "channel", role="weight")
    opcheck_op(torch.ops.triton_ops.dequantize_fp8.default, (a_q, a_s, torch.bfloat16))
    opcheck_op(torch.ops.triton_ops.fp8_gemm.default, (a_q, w_q, a_s, w_s, torch.float32, None, False))
    bias = torch.randn(48, device=device)
    opcheck_op(torch.ops.triton_ops.fp8_gemm.default, (a.bfloat16(), w.t().bfloat16(), None, None, None, bias, False))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_opcheck_fp8_linear(device, requires_grad, granularity):
    mod = _fp8_linear(device, activation_granularity=granularity)
    x = torch.randn(2, 3, 64, device=device, dtype=torch.bfloat16, requires_grad=requires_grad)
    opcheck_op(torch.ops.triton_ops.fp8_linear.default,
               (x, mod.weight, mod.weight_scale, mod.bias, granularity, False))


def test_compiled_quantize_and_dequantize_equal_eager(device):
    t = torch.randn(6, 256, device=device)
    w = torch.randn(32, 256, device=device)
    for fn, args in (
        (lambda t: quantize_fp8(t, "e4m3", "row"), (t,)),
        (lambda t: quantize_fp8(t, torch.float8_e4m3fn, "block"), (t,)),
        (lambda w: quantize_fp8(w.t(), "e4m3", "channel", role="weight"), (w,)),
        (lambda t: dequantize_fp8(*quantize_fp8(t, "e4m3", "tensor"), torch.bfloat16), (t,)),
    ):
        eager = fn(*args)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
        for a, b in zip(eager if isinstance(eager, tuple) else (eager,),
                        compiled if isinstance(compiled, tuple) else (compiled,)):
            assert _equal(a, b)


def test_compiled_gemm_equals_eager(device):
    a = torch.randn(3, 256, device=device, dtype=torch.bfloat16)
    w = torch.randn(32, 256, device=device, dtype=torch.bfloat16)
    bias = torch.randn(32, device=device)
    fn = lambda a, w: fp8_gemm(a, w.t(), bias=bias)  # noqa: E731
    assert _equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(a, w), fn(a, w))


def test_compiled_fp8_linear_module_equals_eager(device):
    mod = _fp8_linear(device)
    x = torch.randn(2, 3, 64, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        assert _equal(torch.compile(mod, fullgraph=True, backend="aot_eager")(x), mod(x))


def test_fp8_linear_gradient_against_float64(device):
    """The input gradient is grad @ dequant(W) (straight through the activation's quantization), bias: sum."""
    mod = _fp8_linear(device, dtype=torch.float32)
    mod.bias.requires_grad_(True)
    x = torch.randn(2, 5, 64, device=device, requires_grad=True)
    g = torch.randn(2, 5, 32, device=device)
    out = mod(x)
    assert out.grad_fn is not None
    out.backward(g)
    w64 = mod.weight.t().double() * expand_scale(mod.weight_scale, (64, 32)).double()  # [K, N]
    assert_close_rel(x.grad, g.double() @ w64.t(), 1e-5, "dx")
    assert_close_rel(mod.bias.grad, g.double().sum((0, 1)), 1e-5, "dbias")
    x.grad = mod.bias.grad = None
    torch.compile(mod, fullgraph=True, backend="aot_eager")(x).backward(g)
    assert_close_rel(x.grad, g.double() @ w64.t(), 1e-5, "compiled dx")


def test_fp8_linear_function_matches_module(device):
    mod = _fp8_linear(device)
    x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
    assert _equal(fp8_linear(x, mod.weight, mod.weight_scale, mod.bias), mod(x))


def test_dynamic_shapes_compile_once_over_token_counts(device):
    mod = _fp8_linear(device)
    fn = torch.compile(mod, fullgraph=True, dynamic=True, backend="aot_eager")
    with count_compiles() as compiles, torch.no_grad():
        for m in (1, 2, 3, 5, 9, 17, 33, 70):
            x = torch.randn(1, m, 64, device=device, dtype=torch.bfloat16)
            assert _equal(fn(x), mod(x))
    assert compiles["frames"] <= 2, compiles


def test_export_of_module(device):
    mod = _fp8_linear(device)
    x = torch.randn(2, 64, device=device, dtype=torch.bfloat16)
    exported = torch.export.export(mod, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "triton_ops.fp8_linear.default" in targets
    with torch.no_grad():
        assert _equal(exported.module()(x), mod(x))


def test_ops_without_a_backward_say_so_when_a_gradient_is_requested(device):
    x = torch.randn(4, 128, device=device, requires_grad=True)
    _, s = quantize_fp8(x, "e4m3", "row")
    with pytest.raises(RuntimeError, match=r"backward through triton_ops\.quantize_fp8"):
        s.sum().backward()
    out = fp8_gemm(x.bfloat16(), torch.randn(32, 128, device=device).t().bfloat16())
    with pytest.raises(RuntimeError, match=r"backward through triton_ops\.fp8_gemm"):
        out.float().sum().backward()
