"""A gated MLP's hidden state quantized as it is formed (``quantize_gated_fp8``) and the down projection over it
(``fp8_gated_linear``): against float references and the unfused path, layouts, NaN and infinities, errors, the
registered ops (opcheck, torch.compile, autograd)."""

from __future__ import annotations

import pytest
import torch
from fp8_gemm import (
    FP8Linear,
    fp8_gated_linear,
    fp8_gemm,
    gated_reference,
    quantize_fp8,
    quantize_gated_fp8,
)
from fp8_gemm.quantize import expand_scale
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.testing import assert_close_rel, device_for_tests, opcheck_op

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swiglu_oai")
E4M3_MAX = 448.0
E4M3_SUBNORMAL_STEP = 2.0**-9  # the smallest E4M3 step: values below 2**-6 are rounded to multiples of it


def _inputs(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=gen) * 3).to(dtype).to(device)
    up = torch.randn(shape, generator=gen).to(dtype).to(device)
    return gate, up


def _groups(t: torch.Tensor, granularity: str) -> torch.Tensor:
    """``t`` as ``[groups, elements]`` of its scale groups."""
    c = t.shape[-1]
    t2 = t.reshape(-1, c)
    if granularity == "tensor":
        return t2.reshape(1, -1)
    if granularity == "row":
        return t2
    pad = (-c) % 128
    return nn.functional.pad(t2, (0, pad)).reshape(t2.shape[0], -1, 128).reshape(-1, 128)


def _check_quantized(q, s, h, granularity, gate):
    """Each scale is its group's finite absolute maximum / 448 (1 for an all-zero group), and every value
    dequantizes to within half an E4M3 step of ``h``, both up to the fp32 activation's absolute error: a few ulp of
    the gate's magnitude (GeLU's ``1 + erf`` and its tanh form cancel in the negative tail, where torch's and the
    kernel's erf, tanh and sigmoid part)."""
    assert q.dtype == torch.float8_e4m3fn and q.shape == h.shape
    floor = 8 * 2.0**-24 * float(gate.float().abs().max()) if gate.numel() else 0.0
    amax = _groups(h, granularity).abs().amax(dim=1)
    want = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    close = (s.reshape(-1).double() - want.double()).abs() <= 1e-5 * want.double() + floor / E4M3_MAX
    assert bool((close | (amax <= floor)).all()), (s.reshape(-1), want)
    if granularity == "block":
        scale = expand_scale(s, (s.shape[0], q.shape[-1])).reshape(q.shape)
    else:
        scale = expand_scale(s, q.shape)
    deq = q.float() * scale
    # 3 mantissa bits: half a step is 2**-4 of the value; below 2**-6 the subnormals' fixed step
    bound = (h.abs() + floor) * 2.0**-4 + scale * E4M3_SUBNORMAL_STEP + floor
    assert bool(((deq - h).abs() <= bound * 1.0001).all()), ((deq - h).abs() - bound).max()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("granularity", ["row", "block", "tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_gated_against_the_float_product(device, activation, granularity, dtype):
    gate, up = _inputs((37, 300), dtype, device)  # rows past a 32-row tile, columns past two 128-groups
    q, s = quantize_gated_fp8(gate, up, activation, granularity)
    h = gated_reference(gate, up, activation)
    assert s.shape == {"row": (37, 1), "block": (37, 3), "tensor": (1,)}[granularity]
    _check_quantized(q, s, h, granularity, gate)
    # the same E4M3 values as quantize_fp8 of the float product, up to a rounding boundary in a few elements
    ref_q, _ = quantize_fp8(h, "e4m3", granularity)
    differ = (q.view(torch.uint8) != ref_q.view(torch.uint8)).float().mean().item()
    assert differ <= 0.01, differ


@pytest.mark.parametrize("granularity", ["row", "block"])
def test_long_rows_walk_their_columns_twice(device, granularity):
    """Rows longer than one register tile (16384): the per-row kernel's two passes (maximum, then cast)."""
    gate, up = _inputs((3, 16500), torch.bfloat16, device, seed=1)
    gate[1, 16450] = 40.0  # the row's maximum in the last, partial tile
    up[1, 16450] = 2.0
    q, s = quantize_gated_fp8(gate, up, "silu", granularity)
    _check_quantized(q, s, gated_reference(gate, up, "silu"), granularity, gate)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 70), cols=st.integers(1, 400), granularity=st.sampled_from(["row", "block"]),
       activation=st.sampled_from(ACTIVATIONS), seed=st.integers(0, 2**16))
def test_quantize_gated_any_shape(rows, cols, granularity, activation, seed):
    gate, up = _inputs((rows, cols), torch.bfloat16, device_for_tests(), seed)
    q, s = quantize_gated_fp8(gate, up, activation, granularity)
    _check_quantized(q, s, gated_reference(gate, up, activation), granularity, gate)


def test_leading_dimensions_and_the_halves_of_a_packed_output(device):
    """3-D inputs keep their shape (row scales ``[..., 1]``, 1x128 blocks over the 2-D view); the two halves of a
    packed ``[rows, 2 * I]`` tensor are read in place and give what their contiguous copies give."""
    packed = torch.randn(2, 5, 2 * 192, device=device, dtype=torch.bfloat16) * 2
    gate, up = packed.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    for granularity, scale_shape in (("row", (2, 5, 1)), ("block", (10, 2))):
        q, s = quantize_gated_fp8(gate, up, "silu", granularity)
        q2, s2 = quantize_gated_fp8(gate.contiguous(), up.contiguous(), "silu", granularity)
        assert q.shape == (2, 5, 192) and s.shape == scale_shape
        assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)


def test_nan_stays_nan_and_infinities_do_not_set_the_scale(device):
    gate, up = _inputs((4, 256), torch.float32, device, seed=2)
    gate[0, 3] = float("nan")
    up[1, 7] = float("inf")  # silu(gate) * inf: +-inf, saturating to +-448 in E4M3
    gate[2] = 0.0  # an all-zero row: scale 1
    for granularity in ("row", "block"):
        q, s = quantize_gated_fp8(gate, up, "silu", granularity)
        qf = q.float()
        assert torch.isnan(qf[0, 3]) and torch.isnan(qf).sum() == 1
        assert qf[1, 7].abs() == E4M3_MAX
        finite = gated_reference(gate, up, "silu")
        finite = torch.where(torch.isfinite(finite), finite, torch.zeros_like(finite))
        _check_quantized(q[3:], s[3:], finite[3:], granularity, gate[3:])  # the untouched row
        assert torch.all(s[2] == 1.0) and torch.all(qf[2] == 0)
        assert torch.isfinite(s).all()


def test_empty_and_one_column(device):
    gate, up = _inputs((0, 64), torch.bfloat16, device)
    q, s = quantize_gated_fp8(gate, up, "silu", "row")
    assert q.shape == (0, 64) and s.shape == (0, 1)
    gate, up = _inputs((2, 3, 0), torch.bfloat16, device)  # no columns, leading dimensions
    for granularity, scale_shape in (("row", (2, 3, 1)), ("block", (6, 0))):
        q, s = quantize_gated_fp8(gate, up, "silu", granularity)
        assert q.shape == (2, 3, 0) and s.shape == scale_shape
    gate, up = _inputs((3, 1), torch.bfloat16, device)
    q, s = quantize_gated_fp8(gate, up, "gelu", "block")
    _check_quantized(q, s, gated_reference(gate, up, "gelu"), "block", gate)


def test_named_errors(device):
    gate, up = _inputs((4, 64), torch.bfloat16, device)
    with pytest.raises(ShapeMismatchError, match="up"):
        quantize_gated_fp8(gate, up[:, :32])
    with pytest.raises(UnsupportedDtypeError, match="up"):
        quantize_gated_fp8(gate, up.float())
    with pytest.raises(InvalidArgumentError, match="activation"):
        quantize_gated_fp8(gate, up, "relu")
    with pytest.raises(InvalidArgumentError, match="granularity"):
        quantize_gated_fp8(gate, up, "silu", "channel")
    with pytest.raises(Exception, match="gate"):
        quantize_gated_fp8(gate.to(torch.int32), up.to(torch.int32))
    lin = _fp8_linear(device, 64, 32, "channel", "row")
    with pytest.raises(ShapeMismatchError, match="in_features"):
        fp8_gated_linear(gate[:, :32], up[:, :32], lin.weight, lin.weight_scale)
    with pytest.raises(InvalidArgumentError, match="float8_e4m3fn"):
        fp8_gated_linear(gate, up, lin.weight.float(), lin.weight_scale)


def _fp8_linear(device, in_f, out_f, weight_granularity, activation_granularity, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias, device=device, dtype=torch.bfloat16)
    return FP8Linear.from_linear(lin, weight_granularity=weight_granularity,
                                 activation_granularity=activation_granularity)


@pytest.mark.parametrize(("weight_granularity", "granularity"), [
    ("channel", "row"), ("block", "block"), ("group", "block"), ("tensor", "tensor"), ("block", "row"),
])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_linear_is_the_gemm_over_the_quantized_product(device, weight_granularity, granularity, bias):
    """``fp8_gated_linear`` is exactly ``fp8_gemm`` over ``quantize_gated_fp8``'s output, within the FP8
    activation's error of the float64 product, and as close to it as the unfused FP8Linear of the bf16 product."""
    lin = _fp8_linear(device, 256, 160, weight_granularity, granularity, bias=bias)
    gate, up = _inputs((2, 17, 256), torch.bfloat16, device, seed=3)
    out = fp8_gated_linear(gate, up, lin.weight, lin.weight_scale, lin.bias, "silu", granularity)
    assert out.shape == (2, 17, 160) and out.dtype == torch.bfloat16
    q, s = quantize_gated_fp8(gate, up, "silu", granularity)
    want = fp8_gemm(q.reshape(-1, 256), lin.weight.t(), a_scale=s.reshape(-1, s.shape[-1]) if granularity != "tensor"
                    else s, b_scale=lin.weight_scale, out_dtype=torch.bfloat16, bias=lin.bias)
    assert torch.equal(out.reshape(-1, 160), want)
    h = gated_reference(gate, up, "silu").double()
    ref = h @ lin.dequantized_weight(torch.float64).t() + (0 if lin.bias is None else lin.bias.double())
    err = assert_close_rel(out, ref, 0.06, "fp8_gated_linear")
    with torch.no_grad():
        unfused = lin(h.to(torch.bfloat16))
    assert err <= 1.2 * assert_close_rel(unfused, ref, 0.06, "unfused") + 1e-3


@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
def test_gated_linear_gradients_against_float64(device, activation):
    """Straight through the product's quantization: dh = grad @ dequant(W), then through act(gate) * up."""
    lin = _fp8_linear(device, 128, 48, "channel", "row")
    gate, up = _inputs((9, 128), torch.float32, device, seed=4)
    gate.requires_grad_(True)
    up.requires_grad_(True)
    bias = lin.bias.detach().float().clone().requires_grad_(True)
    grad = torch.randn(9, 48, device=device)
    out = fp8_gated_linear(gate, up, lin.weight, lin.weight_scale, bias, activation, "row")
    out.backward(grad)
    g64, u64 = gate.detach().double().requires_grad_(True), up.detach().double().requires_grad_(True)
    h = gated_reference(g64, u64, activation).double()
    dh = grad.double() @ lin.dequantized_weight(torch.float64)
    h.backward(dh)
    assert_close_rel(gate.grad, g64.grad, 1e-5, "dgate")
    assert_close_rel(up.grad, u64.grad, 1e-5, "dup")
    assert_close_rel(bias.grad, grad.double().sum(0), 1e-6, "dbias")


def test_registered_ops_opcheck_and_compile(device):
    lin = _fp8_linear(device, 256, 32, "block", "block")
    gate, up = _inputs((5, 256), torch.bfloat16, device, seed=5)
    opcheck_op(torch.ops.triton_ops.quantize_gated_fp8.default, (gate, up, "silu", "row", 1.702, 7.0))
    opcheck_op(torch.ops.triton_ops.quantize_gated_fp8.default, (gate, up, "gelu_tanh", "block", 1.702, 7.0))
    opcheck_op(torch.ops.triton_ops.fp8_gated_linear.default,
               (gate, up, lin.weight, lin.weight_scale, lin.bias, "silu", "block", False, 1.702, 7.0))
    fn = lambda g, u: fp8_gated_linear(g, u, lin.weight, lin.weight_scale, lin.bias, "silu", "block")  # noqa: E731
    with torch.no_grad():
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(gate, up)
    assert torch.equal(compiled, fn(gate, up))
    g = gate.float().requires_grad_(True)
    u = up.float().requires_grad_(True)
    opcheck_op(torch.ops.triton_ops.fp8_gated_linear.default,
               (g, u, lin.weight, lin.weight_scale, None, "silu", "row", False, 1.702, 7.0))
