"""``gated_activation``: ``act(gate) * up`` in one pass, against a float64 reference, over layouts, with NaN and
infinities, errors, the registered op (opcheck, torch.compile) and its gradient."""

from __future__ import annotations

import pytest
import torch
from fused_gated_mlp import gated_activation
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.gated_activation import gated_product
from triton_ops_core.testing import assert_close_rel, device_for_tests, opcheck_op, poison_

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swiglu_oai")
# One rounding of an fp32 value to the output's dtype, relative: half an ulp on a GPU, a whole one under the
# interpreter (it truncates fp32 to bf16), plus the fp32 arithmetic's few ulp.
ROUNDING = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-20}


def _inputs(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ((torch.randn(shape, generator=gen) * 3).to(dtype).to(device),
            torch.randn(shape, generator=gen).to(dtype).to(device))


def _check(out, gate, up, activation):
    """Each element within one rounding of the float64 product (plus fp32's error on the activation's cancelling
    tail, scaled by the gate's magnitude)."""
    ref = gated_product(gate.double(), up.double(), activation)
    assert out.shape == gate.shape and out.dtype == gate.dtype and out.is_contiguous()
    floor = 0.0
    if gate.numel():
        floor = 8 * 2.0**-24 * float(gate.double().abs().max() * up.double().abs().max().clamp(min=1))
    bound = ref.abs() * ROUNDING[gate.dtype] + floor + 1e-30
    assert bool(((out.double() - ref).abs() <= bound).all()), ((out.double() - ref).abs() - bound).max()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_against_float64(device, activation, dtype):
    gate, up = _inputs((37, 1100), dtype, device)  # rows and columns past one tile
    _check(gated_activation(gate, up, activation), gate, up, activation)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 2100), activation=st.sampled_from(ACTIVATIONS),
       seed=st.integers(0, 2**16))
def test_any_shape(rows, cols, activation, seed):
    gate, up = _inputs((rows, cols), torch.bfloat16, device_for_tests(), seed)
    _check(gated_activation(gate, up, activation), gate, up, activation)


def test_packed_halves_leading_dimensions_and_no_stale_output(device):
    """The halves of a packed output read in place (as their contiguous copies give), 3-D shapes kept, every
    element written (a poisoned buffer in the allocator's pool is not left behind)."""
    packed = torch.randn(2, 9, 2 * 300, device=device, dtype=torch.bfloat16)
    gate, up = packed.chunk(2, dim=-1)
    poison_(torch.empty(2 * 9 * 300, device=device, dtype=torch.bfloat16))  # freed: its memory may come back
    out = gated_activation(gate, up, "silu")
    assert out.shape == (2, 9, 300) and torch.isfinite(out).all()
    assert torch.equal(out, gated_activation(gate.contiguous(), up.contiguous(), "silu"))
    _check(out, gate, up, "silu")


def test_nan_and_infinity_propagate_as_in_torch(device):
    gate, up = _inputs((4, 64), torch.float32, device, seed=1)
    gate[0, 1] = float("nan")
    up[1, 2] = float("inf")
    gate[2, 3] = float("-inf")  # silu(-inf) * up: -inf * sigmoid(-inf) = -inf * 0: NaN in torch and here
    for activation in ("silu", "gelu"):
        out = gated_activation(gate, up, activation)
        ref = gated_product(gate, up, activation)
        assert torch.equal(torch.isnan(out), torch.isnan(ref)), activation
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isinf(out), torch.isinf(ref)) and torch.equal(out[~finite & ~torch.isnan(ref)],
                                                                              ref[~finite & ~torch.isnan(ref)])


def test_empty(device):
    gate, up = _inputs((0, 16), torch.bfloat16, device)
    assert gated_activation(gate, up).shape == (0, 16)
    gate, up = _inputs((2, 3, 0), torch.bfloat16, device)
    assert gated_activation(gate, up).shape == (2, 3, 0)


def test_clear_caches_forgets_the_plans(device):
    import fused_gated_mlp
    from fused_gated_mlp import activation

    gated_activation(*_inputs((3, 40), torch.bfloat16, device))
    assert activation._PLANS._plans
    fused_gated_mlp.clear_caches()
    assert not activation._PLANS._plans


def test_named_errors(device):
    gate, up = _inputs((4, 64), torch.bfloat16, device)
    with pytest.raises(ShapeMismatchError, match="up"):
        gated_activation(gate, up[:, :32])
    with pytest.raises(UnsupportedDtypeError, match="up"):
        gated_activation(gate, up.float())
    with pytest.raises(InvalidArgumentError, match="activation"):
        gated_activation(gate, up, "relu")
    with pytest.raises(Exception, match="gate"):
        gated_activation(gate.to(torch.int32), up.to(torch.int32))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradient_against_float64(device, activation):
    gate, up = _inputs((6, 96), torch.float32, device, seed=2)
    if activation == "swiglu_oai":  # both sides of the clamps
        gate[0, :4] = torch.tensor([8.0, 6.5, -9.0, 7.5])
        up[0, :4] = torch.tensor([-8.0, 7.5, 6.0, -6.5])
    gate.requires_grad_(True)
    up.requires_grad_(True)
    grad = torch.randn(6, 96, device=device)
    gated_activation(gate, up, activation).backward(grad)
    g64, u64 = gate.detach().double().requires_grad_(True), up.detach().double().requires_grad_(True)
    gated_product(g64, u64, activation).backward(grad.double())
    assert_close_rel(gate.grad, g64.grad, 1e-5, "d gate")
    assert_close_rel(up.grad, u64.grad, 1e-5, "d up")


def test_registered_op(device):
    gate, up = _inputs((5, 200), torch.bfloat16, device, seed=3)
    opcheck_op(torch.ops.triton_ops.gated_activation.default, (gate, up, "silu", 1.702, 7.0))
    g, u = gate.float().requires_grad_(True), up.float().requires_grad_(True)
    opcheck_op(torch.ops.triton_ops.gated_activation.default, (g, u, "gelu_tanh", 1.702, 7.0))
    fn = lambda a, b: gated_activation(a, b, "swiglu_oai")  # noqa: E731
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(gate, up), fn(gate, up))
