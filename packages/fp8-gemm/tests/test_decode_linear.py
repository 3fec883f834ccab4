"""decode_linear: a 16-bit linear through the weight-only decode kernel (unscaled), against a float64 reference;
one row (the CUDA-core FMA variant) and more rows (the tensor-core tile), bias, strided rows, errors, the op
(opcheck, compile, export) and the differentiable fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fp8_gemm import decode_linear
from fp8_gemm import weight_only as wo
from triton_ops_core.exceptions import ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.testing import assert_close_rel, device_for_tests, opcheck_op

DEVICE = device_for_tests()
OP = torch.ops.triton_ops.decode_linear.default
# the interpreter computes in fp32 exactly; on a GPU bf16 inputs, fp32 accumulation, one rounding
TOL = 1e-2


def _inputs(m, n, k, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b


def _reference(x, w, b):
    out = x.double() @ w.double().t()
    return out if b is None else out + b.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (1, 33, 700), (3, 48, 130), (17, 24, 64)])
def test_matches_float64(dtype, m, n, k):
    x, w, b = _inputs(m, n, k, dtype, seed=m + n + k)
    out = decode_linear(x, w, b)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close_rel(out, _reference(x, w, b), TOL)


def test_leading_dimensions_and_strided_rows():
    x, w, _ = _inputs(4, 32, 64, torch.bfloat16, seed=1, bias=False)
    wide = torch.randn(2, 1, 3 * 64, device=DEVICE).to(torch.bfloat16)
    view = wide[..., 64:128]  # rows strided: a slice of a wider buffer
    out = decode_linear(view, w)
    assert out.shape == (2, 1, 32)
    assert_close_rel(out, _reference(view.reshape(2, 64), w, None).reshape(2, 1, 32), TOL)


def test_one_row_takes_the_fma_tile_of_8_columns():
    cfg = wo.weight_only_config(1, 4096, 4096, wo.SCALE_NONE, 2, 132, False)
    assert cfg["USE_DOT"] is False and cfg["BLOCK_N"] == 8 and cfg["BLOCK_K"] == 512 and cfg["SPLIT_K"] == 1


def test_nan_and_inf_propagate():
    x, w, b = _inputs(1, 16, 64, torch.bfloat16, seed=2)
    w[3, 5] = float("nan")
    x[0, 7] = float("inf")
    w[:, 7] = torch.where(torch.arange(16, device=DEVICE) == 9, 0.0, 1.0).to(w.dtype)  # inf * 0 -> NaN at 9
    out = decode_linear(x, w, b).float()
    want = _reference(x, w, b)
    assert torch.isnan(out[0, 3]) and torch.isnan(out[0, 9])
    assert torch.equal(torch.isinf(out), torch.isinf(want)) and torch.equal(torch.isnan(out), torch.isnan(want))


def test_errors():
    x, w, b = _inputs(1, 16, 64, torch.bfloat16, seed=3)
    with pytest.raises(UnsupportedDtypeError, match="weight"):
        decode_linear(x, w.half())
    with pytest.raises(UnsupportedDtypeError, match="x"):
        decode_linear(x.float(), w.float())
    with pytest.raises(ShapeMismatchError, match="x: expected last dimension 64"):
        decode_linear(x[:, :32], w)
    with pytest.raises(ShapeMismatchError, match="bias"):
        decode_linear(x, w, b[:8])


def test_op_opcheck_compile_export():
    x, w, b = _inputs(2, 16, 64, torch.bfloat16, seed=4)
    opcheck_op(OP, (x, w, b))
    opcheck_op(OP, (x[:1], w, None))
    fn = torch.compile(lambda x, w, b: decode_linear(x, w, b) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(x, w, b), decode_linear(x, w, b) * 2)

    class Proj(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(w.clone(), requires_grad=False)

        def forward(self, x):
            return decode_linear(x, self.weight)

    exported = torch.export.export(Proj(), (x,))
    assert "triton_ops.decode_linear.default" in {str(n.target) for n in exported.graph.nodes}


def test_a_gradient_takes_f_linear():
    x, w, b = _inputs(1, 16, 64, torch.float32, seed=5)  # fp32: the kernel would refuse it; F.linear takes it
    w.requires_grad_()
    out = decode_linear(x, w, b)
    out.sum().backward()
    assert torch.equal(out, F.linear(x, w, b)) and w.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (4096, 14336), (2880, 4096), (5120, 2880)])
@pytest.mark.parametrize("m", [1, 2, 16])
def test_gpu_model_shapes(n, k, m):
    x, w, b = _inputs(m, n, k, torch.bfloat16, seed=n + k + m)
    out = decode_linear(x, w, b)
    assert_close_rel(out, _reference(x, w, b), 1e-2)
    assert torch.equal(out, decode_linear(x, w, b))  # deterministic
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode_linear(x, w, b)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(captured, decode_linear(x, w, b))
