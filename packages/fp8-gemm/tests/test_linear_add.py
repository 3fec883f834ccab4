"""fp8_linear_add_: ``residual += x @ dequant(W)^T`` in place, the residual added inside the weight-only kernel
(one launch, one rounding of the sum) on decode rows, fp8_linear + add elsewhere; against a float64 reference, the
out-of-place path, the registered op (opcheck, compile), errors."""

from __future__ import annotations

import pytest
import torch
from fp8_gemm import FP8Linear, fp8_linear, fp8_linear_add_
from fp8_gemm import weight_only as wo
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.testing import assert_compiled_in_place_add, device_for_tests, opcheck_op

DEV = device_for_tests()
OP = torch.ops.triton_ops.fp8_linear_add_.default


def _layer(k, n, granularity, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=False, device=DEV)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.05)
    return FP8Linear.from_linear(lin, weight_granularity=granularity)


def _reference(residual, x, layer):
    return residual.double() + x.double() @ layer.dequantized_weight(torch.float64).t()


@pytest.mark.parametrize("granularity", ["channel", "tensor", "block"])
@pytest.mark.parametrize("m,k,n", [(1, 96, 40), (3, 160, 72), (1, 1024, 24)])  # the last splits K on 4 "SMs"
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_adds_into_the_residual(granularity, m, k, n, dtype):
    layer = _layer(k, n, granularity)
    x = torch.randn(m, k, device=DEV).to(dtype)
    residual = torch.randn(m, n, device=DEV).to(dtype)
    want = _reference(residual, x, layer)
    before = residual.clone()
    with torch.no_grad():
        out = fp8_linear_add_(residual, x, layer.weight, layer.weight_scale, path="weight_only")
    assert out is residual
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2  # bf16: the sum's one rounding (truncation: interpreter)
    torch.testing.assert_close(residual.double(), want, rtol=tol, atol=tol)
    separate = before + fp8_linear(x, layer.weight, layer.weight_scale, path="weight_only")
    torch.testing.assert_close(residual, separate, rtol=tol, atol=tol)


def test_split_k_adds_once():
    layer = _layer(2048, 16, "channel", seed=3)
    x = torch.randn(1, 2048, device=DEV)
    residual = torch.randn(1, 16, device=DEV)
    want = _reference(residual, x, layer)
    plan = wo.build_plan(x, layer.weight, layer.weight_scale, None, config={
        "BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 256, "SPLIT_K": 4, "USE_DOT": False, "num_warps": 4,
        "num_stages": 1}, add_out=residual)
    assert plan.config["SPLIT_K"] == 4
    plan.run(x, layer.weight, layer.weight_scale, None, out=residual)
    torch.testing.assert_close(residual.double(), want, rtol=1e-5, atol=1e-5)  # the residual added once, not 4x


@pytest.mark.parametrize("shape", [(2, 3), (5,)])
def test_other_paths_and_leading_dims(shape):
    layer = _layer(64, 48, "channel", seed=1)
    x = torch.randn(*shape, 64, device=DEV)
    residual = torch.randn(*shape, 48, device=DEV)
    want = _reference(residual, x, layer)
    with torch.no_grad():
        for path in ("auto", "w8a8"):
            r = residual.clone()
            fp8_linear_add_(r, x, layer.weight, layer.weight_scale, path=path)
            tol = 1e-5 if path != "w8a8" else 6e-2  # W8A8 also quantizes x
            torch.testing.assert_close(r.double(), want, rtol=tol, atol=tol)


def test_errors():
    layer = _layer(64, 48, "channel")
    x = torch.randn(2, 64, device=DEV)
    with pytest.raises(ShapeMismatchError, match=r"residual: expected shape \[2, 48\]"):
        fp8_linear_add_(torch.zeros(2, 40, device=DEV), x, layer.weight, layer.weight_scale)
    with pytest.raises(ShapeMismatchError, match="contiguous"):
        fp8_linear_add_(torch.zeros(48, 2, device=DEV).t(), x, layer.weight, layer.weight_scale)
    with pytest.raises(UnsupportedDtypeError, match="residual"):
        fp8_linear_add_(torch.zeros(2, 48, device=DEV, dtype=torch.bfloat16), x, layer.weight, layer.weight_scale)
    with pytest.raises(InvalidArgumentError, match="inference-only"):
        fp8_linear_add_(torch.zeros(2, 48, device=DEV), x.requires_grad_(), layer.weight, layer.weight_scale)


def test_refuses_a_residual_sharing_memory_with_x():
    layer = _layer(64, 64, "channel")
    x = torch.randn(1, 64, device=DEV)
    with torch.no_grad(), pytest.raises(InvalidArgumentError, match="^residual: shares memory with x"):
        fp8_linear_add_(x, x, layer.weight, layer.weight_scale, path="weight_only")
    with torch.no_grad():  # the W8A8 path computes the product first: in place on x is fine there
        want = x.double() + x.double() @ layer.dequantized_weight(torch.float64).t()
        y = x.clone()
        fp8_linear_add_(y, y, layer.weight, layer.weight_scale, path="w8a8")
        torch.testing.assert_close(y.double(), want, rtol=6e-2, atol=6e-2)


def test_opcheck_and_compile():
    layer = _layer(64, 48, "channel")
    x = torch.randn(1, 64, device=DEV)
    residual = torch.randn(1, 48, device=DEV)
    opcheck_op(OP, (residual, x, layer.weight, layer.weight_scale, "row", False, "auto"))
    opcheck_op(OP, (residual.expand(2, 48).contiguous(), x.expand(2, 64).contiguous(), layer.weight,
                    layer.weight_scale, "row", False, "w8a8"))
    assert_compiled_in_place_add(lambda r, x: fp8_linear_add_(r, x, layer.weight, layer.weight_scale), residual, x)


@pytest.mark.gpu
# where fp8_linear's path="auto" takes the weight-only kernel (weight_only.use_weight_only)
@pytest.mark.parametrize("m,k,n", [(1, 14336, 4096), (1, 4096, 4096), (4, 4096, 4096), (1, 2880, 2880),
                                   (4, 2880, 2880)])
def test_gpu_decode_shapes_one_launch(m, k, n):
    """Llama-3-8B's down and o projections and gpt-oss's width on the GPU, bf16: the residual updated in one
    launch, within the sum's rounding of the float64 reference."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    torch.manual_seed(m)
    lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = FP8Linear.from_linear(lin, weight_granularity="channel")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) * 4
    want = _reference(residual, x, layer)
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fp8_linear_add_(residual.clone(), x, layer.weight, layer.weight_scale)  # plans and configs chosen
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fp8_linear_add_(residual, x, layer.weight, layer.weight_scale)
            torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert kernels == ["fp8_weight_only_kernel"], kernels
    torch.testing.assert_close(residual.double(), want, rtol=1e-2, atol=3e-2)
