"""decode_linear: a 16-bit linear through the weight-only decode kernel (unscaled), against a float64 reference;
one row (the CUDA-core FMA variant) and more rows (the tensor-core tile), bias, strided rows, errors, the op
(opcheck, compile, export) and the differentiable fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fp8_gemm import decode_linear, decode_linear_add_, fp8_linear
from fp8_gemm import weight_only as wo
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.testing import assert_close_rel, assert_compiled_in_place_add, device_for_tests, opcheck_op

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


def _normalized_reference(x, norm_weight, eps):
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (1, 33, 700), (3, 48, 130), (17, 24, 64)])
def test_rms_norm_prologue_matches_float64(dtype, m, n, k):
    # one row: the FMA tile; 3 and 17 rows: the tensor-core tile; K = 700: a partial last K tile; the interpreter
    # splits K past 64, so the split-K path normalizes too
    x, w, b = _inputs(m, n, k, dtype, seed=m * n + k)
    x = x * 3.0 + 0.5  # rows far from unit RMS: the normalization matters
    g = torch.Generator().manual_seed(k)
    norm_w = (torch.rand(k, generator=g) + 0.5).to(DEVICE, torch.float32 if m == 3 else dtype)
    out = decode_linear(x, w, b, norm_weight=norm_w, norm_eps=1e-5)
    assert out.dtype == dtype and out.shape == (m, n)
    want = _normalized_reference(x, norm_w, 1e-5) @ w.double().t() + b.double()
    assert_close_rel(out, want, TOL)
    assert not torch.equal(out, decode_linear(x, w, b))  # the prologue did something


def test_rms_norm_prologue_equals_the_normalized_input_within_one_rounding():
    # the fused product against decode_linear of the input normalized (and rounded once) outside
    x, w, _ = _inputs(1, 64, 256, torch.float16, seed=11, bias=False)
    norm_w = torch.rand(256, device=DEVICE).to(torch.float16) + 0.5
    fused = decode_linear(x, w, norm_weight=norm_w, norm_eps=1e-6)
    outside = decode_linear(_normalized_reference(x, norm_w, 1e-6).to(torch.float16), w)
    assert_close_rel(fused, outside, 2e-3)


def test_rms_norm_prologue_errors_and_gradient():
    x, w, b = _inputs(1, 16, 64, torch.bfloat16, seed=12)
    norm_w = torch.ones(64, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ShapeMismatchError, match="norm_weight"):
        decode_linear(x, w, b, norm_weight=norm_w[:32])
    with pytest.raises(InvalidArgumentError, match="norm_eps"):
        decode_linear(x, w, b, norm_weight=norm_w, norm_eps=-1.0)
    with pytest.raises(InvalidArgumentError, match="norm_eps"):
        decode_linear(x, w, b, norm_weight=norm_w, norm_eps=float("nan"))
    with pytest.raises(InvalidArgumentError, match="norm_eps"):  # rmsnorm's rule: positive
        decode_linear(x, w, b, norm_weight=norm_w, norm_eps=0.0)
    decode_linear(x, w, b, norm_weight=norm_w, norm_eps=1)
    with pytest.raises(InvalidArgumentError, match="norm_eps"):  # a bool, after the int 1's plan
        decode_linear(x, w, b, norm_weight=norm_w, norm_eps=True)
    with pytest.raises(ShapeMismatchError, match="norm_weight"):
        decode_linear(x, w, b, norm_weight=torch.ones(64, 2, device=DEVICE)[:, 0])  # strided
    # a gradient to record: torch's fp32 RMSNorm, then F.linear
    xg = x.float().requires_grad_()
    out = decode_linear(xg, w.float(), b.float(), norm_weight=norm_w.float(), norm_eps=1e-6)
    out.sum().backward()
    want = _normalized_reference(x.float(), norm_w, 1e-6) @ w.double().t() + b.double()
    assert_close_rel(out.detach(), want, 1e-5) and xg.grad is not None


@pytest.mark.parametrize("m", [1, 4])
def test_rms_norm_prologue_on_fp8_weights(m):
    # the weight-only kernel's other weights: E4M3 with per-channel scales, through its plan
    x, w, _ = _inputs(m, 48, 192, torch.bfloat16, seed=14 + m, bias=False)
    g = torch.Generator().manual_seed(15)
    w8 = (torch.randn(48, 192, generator=g) * 8).to(torch.float8_e4m3fn).to(DEVICE)
    scale = (torch.rand(1, 48, generator=g) / 16 + 1e-3).to(DEVICE)
    norm_w = (torch.rand(192, generator=g) + 0.5).to(DEVICE, torch.bfloat16)
    plan = wo.build_plan(x, w8, scale, None, norm_weight=norm_w, norm_eps=1e-5)
    out = plan.run(x, w8, scale, None, norm_weight=norm_w)
    want = _normalized_reference(x, norm_w, 1e-5) @ (w8.double() * scale.double().reshape(48, 1)).t()
    assert_close_rel(out, want, TOL)


def _fp8_weight(n, k, seed, granularity="channel"):
    g = torch.Generator().manual_seed(seed)
    w8 = (torch.randn(n, k, generator=g) * 8).to(torch.float8_e4m3fn).to(DEVICE)
    rows = 1 if granularity == "channel" else -(-k // 128)
    return w8, (torch.rand(rows, n, generator=g) / 16 + 1e-3).to(DEVICE)


@pytest.mark.parametrize("granularity", ["channel", "group"])
@pytest.mark.parametrize("m", [1, 3])
def test_fp8_weight_is_fp8_linears_weight_only_path(granularity, m):
    # decode_linear with weight_scale: the kernel FP8Linear runs at decode, the same bits; with the norm prologue,
    # the float64 reference of the normalized input times the dequantized weight
    x, _, b = _inputs(m, 40, 256, torch.bfloat16, seed=20 + m)
    w8, scale = _fp8_weight(40, 256, 21 + m, granularity)
    out = decode_linear(x, w8, b, weight_scale=scale)
    assert torch.equal(out, fp8_linear(x, w8, scale, b, path="weight_only"))
    norm_w = (torch.rand(256, device=DEVICE) + 0.5).to(torch.bfloat16)
    fused = decode_linear(x * 3 + 0.5, w8, b, weight_scale=scale, norm_weight=norm_w, norm_eps=1e-5)
    deq = w8.double() * scale.double().repeat_interleave(128, dim=0)[:256].t() if granularity == "group" \
        else w8.double() * scale.double().reshape(40, 1)
    want = _normalized_reference(x * 3 + 0.5, norm_w, 1e-5) @ deq.t() + b.double()
    assert_close_rel(fused, want, TOL)
    assert torch.equal(fused, decode_linear(x * 3 + 0.5, w8, b, weight_scale=scale, norm_weight=norm_w,
                                            norm_eps=1e-5))  # deterministic


def test_fp8_weight_op_opcheck_errors_and_gradient():
    x, _, b = _inputs(2, 16, 128, torch.bfloat16, seed=30)
    w8, scale = _fp8_weight(16, 128, 31)
    norm_w = (torch.rand(128, device=DEVICE) + 0.5).to(torch.bfloat16)
    opcheck_op(OP, (x, w8, b, norm_w, 1e-5, scale))
    with pytest.raises(UnsupportedDtypeError, match="weight"):
        decode_linear(x, w8.to(torch.bfloat16), b, weight_scale=scale)  # a 16-bit weight with a scale
    with pytest.raises(UnsupportedDtypeError, match="weight"):
        decode_linear(x, w8, b)  # an FP8 weight without its scale
    with pytest.raises(ShapeMismatchError):
        decode_linear(x, w8, b, weight_scale=scale[:, :8])
    # a gradient to record: FP8Linear's differentiable weight-only path, the input gradient through it
    xg = x.float().requires_grad_()
    out = decode_linear(xg, w8, b, weight_scale=scale)
    out.sum().backward()
    assert torch.equal(out.detach(), fp8_linear(x.float(), w8, scale, b, path="weight_only"))
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("m", [1, 3])
def test_residual_is_added_into_a_new_tensor(fp8, m):
    # residual + x @ W^T: one rounding of the sum, the residual left as it was (the layer's input), bias too
    x, w, b = _inputs(m, 40, 128, torch.bfloat16, seed=40 + m)
    scale = None
    if fp8:
        w, scale = _fp8_weight(40, 128, 41 + m)
    residual = (torch.randn(m, 40) * 4).to(DEVICE, torch.bfloat16)
    kept = residual.clone()
    out = decode_linear(x, w, b, weight_scale=scale, residual=residual)
    assert torch.equal(residual, kept) and out.data_ptr() != residual.data_ptr()
    product = decode_linear(x, w, b, weight_scale=scale)
    want = residual.double() + (x.double() @ (w.double() if scale is None else
                                              w.double() * scale.double().reshape(40, 1)).t() + b.double())
    assert_close_rel(out, want, TOL)
    assert not torch.equal(out, product)
    # the in-place add computes the same sum
    in_place = residual.clone()
    if scale is None:
        decode_linear_add_(in_place, x, w)
        assert torch.equal(in_place, decode_linear(x, w, residual=residual))
    # with the norm prologue too, and a 3-D call
    norm_w = (torch.rand(128, device=DEVICE) + 0.5).to(torch.bfloat16)
    out3 = decode_linear(x[None], w, b, weight_scale=scale, residual=residual[None], norm_weight=norm_w)
    assert out3.shape == (1, m, 40)
    want3 = residual.double() + decode_linear(x, w, b, weight_scale=scale, norm_weight=norm_w).double()
    assert_close_rel(out3[0], want3, TOL)


def test_residual_errors_op_and_gradient():
    x, w, b = _inputs(2, 16, 64, torch.bfloat16, seed=42)
    residual = torch.randn(2, 16, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ShapeMismatchError, match="residual"):
        decode_linear(x, w, residual=residual[:, :8])
    with pytest.raises(UnsupportedDtypeError, match="residual"):
        decode_linear(x, w, residual=residual.float())
    with pytest.raises(ShapeMismatchError, match="residual"):
        decode_linear(x, w, residual=torch.randn(16, 2, device=DEVICE, dtype=torch.bfloat16).t())
    opcheck_op(OP, (x, w, b, None, 1e-6, None, residual))
    fn = torch.compile(lambda x: decode_linear(x, w, b, residual=residual), fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(x), decode_linear(x, w, b, residual=residual))
    xg = x.float().requires_grad_()
    with pytest.raises(ShapeMismatchError, match="residual"):  # the differentiable path checks it too
        decode_linear(xg, w.float(), b.float(), residual=residual.float()[0])
    with pytest.raises(ShapeMismatchError, match="norm_weight"):
        decode_linear(xg, w.float(), b.float(), norm_weight=torch.ones(1, device=DEVICE))
    out = decode_linear(xg, w.float(), b.float(), residual=residual.float())
    out.sum().backward()
    assert torch.equal(out.detach(), residual.float() + F.linear(x.float(), w.float(), b.float()))
    assert xg.grad is not None


def test_rms_norm_prologue_op_opcheck_and_compile():
    x, w, b = _inputs(2, 16, 64, torch.bfloat16, seed=13)
    norm_w = (torch.rand(64, device=DEVICE) + 0.5).to(torch.bfloat16)
    opcheck_op(OP, (x, w, b, norm_w, 1e-5))
    fn = torch.compile(lambda x: decode_linear(x, w, b, norm_weight=norm_w, norm_eps=1e-5), fullgraph=True,
                       backend="aot_eager")
    assert torch.equal(fn(x), decode_linear(x, w, b, norm_weight=norm_w, norm_eps=1e-5))


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


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(6144, 4096), (5120, 2880)])
@pytest.mark.parametrize("m", [1, 2, 16])
def test_gpu_rms_norm_prologue_model_shapes(n, k, m):
    x, w, b = _inputs(m, n, k, torch.bfloat16, seed=n + k + m)
    norm_w = (torch.rand(k, device=DEVICE) + 0.5).to(torch.bfloat16)
    out = decode_linear(x, w, b, norm_weight=norm_w, norm_eps=1e-5)
    assert_close_rel(out, _normalized_reference(x, norm_w, 1e-5) @ w.double().t() + b.double(), 1e-2)
    assert torch.equal(out, decode_linear(x, w, b, norm_weight=norm_w, norm_eps=1e-5))  # deterministic


ADD_OP = torch.ops.triton_ops.decode_linear_add_.default


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (1, 33, 700), (3, 48, 130)])
def test_add_into_the_residual(dtype, m, n, k):
    x, w, _ = _inputs(m, n, k, dtype, seed=21 + m + n)
    residual = (torch.randn(m, n) * 4).to(DEVICE, dtype)
    want = residual.double() + _reference(x, w, None)
    with torch.no_grad():
        out = decode_linear_add_(residual, x, w)
    assert out is residual
    assert_close_rel(residual, want, TOL)


def test_add_leading_dims():
    x, w, _ = _inputs(2, 24, 1024, torch.bfloat16, seed=22, bias=False)
    residual = torch.randn(2, 1, 24, device=DEVICE).to(torch.bfloat16)
    want = residual.double() + _reference(x, w, None).reshape(2, 1, 24)
    decode_linear_add_(residual, x.reshape(2, 1, 1024), w)
    assert_close_rel(residual, want, TOL)


def test_add_errors():
    x, w, _ = _inputs(2, 48, 64, torch.bfloat16, seed=23, bias=False)
    with pytest.raises(ShapeMismatchError, match=r"residual: expected shape \[2, 48\]"):
        decode_linear_add_(torch.zeros(2, 40, device=DEVICE, dtype=torch.bfloat16), x, w)
    with pytest.raises(ShapeMismatchError, match="contiguous"):
        decode_linear_add_(torch.zeros(48, 2, device=DEVICE, dtype=torch.bfloat16).t(), x, w)
    with pytest.raises(UnsupportedDtypeError, match="residual"):
        decode_linear_add_(torch.zeros(2, 48, device=DEVICE), x, w)
    with pytest.raises(UnsupportedDtypeError, match="weight"):
        decode_linear_add_(torch.zeros(2, 48, device=DEVICE, dtype=torch.bfloat16), x, w.half())
    with pytest.raises(InvalidArgumentError, match="inference-only"):
        decode_linear_add_(torch.zeros(2, 48, device=DEVICE, dtype=torch.bfloat16), x.float().requires_grad_(),
                           w.float())


def test_add_refuses_a_residual_sharing_memory_with_x():
    # the kernel's programs write residual columns while others still read x: a silent wrong sum otherwise
    x, w, _ = _inputs(1, 64, 64, torch.bfloat16, seed=25, bias=False)
    buf = torch.randn(2, 64, device=DEVICE).to(torch.bfloat16)
    decode_linear_add_(buf[1:], buf[:1], w)  # adjacent rows of one buffer: fine
    for residual, xs in ((x, x), (buf[0:1], buf[0:1])):
        with pytest.raises(InvalidArgumentError, match="^residual: shares memory with x"):
            decode_linear_add_(residual, xs, w)
    # a cached plan does not skip the check (the cache keys on layouts, not addresses)
    r = torch.zeros(1, 64, device=DEVICE, dtype=torch.bfloat16)
    decode_linear_add_(r, x, w)
    with pytest.raises(InvalidArgumentError, match="shares memory"):
        decode_linear_add_(x, x, w)


@pytest.mark.parametrize("m,n,k", [(0, 8, 64), (2, 0, 64), (2, 8, 0)])
def test_add_empty_shapes(m, n, k):
    x, w, _ = _inputs(m, n, k, torch.bfloat16, seed=26, bias=False)
    residual = torch.randn(m, n, device=DEVICE).to(torch.bfloat16)
    before = residual.clone()
    assert decode_linear_add_(residual, x, w) is residual
    assert torch.equal(residual, before)  # K = 0 adds zeros; no rows or columns: nothing to add


def test_add_opcheck_and_compile():
    x, w, _ = _inputs(1, 16, 64, torch.bfloat16, seed=24, bias=False)
    residual = torch.randn(1, 16, device=DEVICE).to(torch.bfloat16)
    opcheck_op(ADD_OP, (residual, x, w))
    assert_compiled_in_place_add(lambda r, x: decode_linear_add_(r, x, w), residual, x)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 14336), (4096, 12288), (4096, 4096)])
@pytest.mark.parametrize("m", [1, 4])
def test_gpu_add_model_shapes(n, k, m):
    """Llama-3-8B's and Qwen3-8B's down projections with the residual add, bf16: within the sum's rounding of the
    float64 reference, deterministic, and captured in a CUDA graph."""
    x, w, _ = _inputs(m, n, k, torch.bfloat16, seed=n + k + m, bias=False)
    residual = (torch.randn(m, n, device=DEVICE) * 4).to(torch.bfloat16)
    start = residual.clone()
    want = residual.double() + _reference(x, w, None)
    decode_linear_add_(residual, x, w)
    assert_close_rel(residual, want, 1e-2)
    again = start.clone()
    decode_linear_add_(again, x, w)
    assert torch.equal(again, residual)
    graph = torch.cuda.CUDAGraph()
    captured = start.clone()
    with torch.cuda.graph(graph):
        decode_linear_add_(captured, x, w)
    captured.copy_(start)
    graph.replay()
    assert torch.equal(captured, residual)
