"""rmsnorm_add_rmsnorm and rmsnorm_add (Gemma's sandwich norms around the residual add): bit for bit the composition
of rmsnorm and fused_add_rmsnorm, against float64, NaN kept in its row, the composition for gradients and long rows,
errors, the registered ops (opcheck, compile)."""

from __future__ import annotations

import pytest
import torch
from _rope_helpers import DEVICE, norm_inputs
from fused_rmsnorm_rope import fused_add_rmsnorm, rmsnorm, rmsnorm_add, rmsnorm_add_rmsnorm
from fused_rmsnorm_rope.ops import sandwich
from fused_rmsnorm_rope.ops.rmsnorm import MAX_ONE_PASS
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.testing import assert_close_rel, count_compiles, opcheck_op

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 1e-6}  # a few roundings to the dtype


def _inputs(shape, dtype, seed=0):
    x, w_a, r = norm_inputs(shape, dtype, seed)
    w_b = (0.5 + torch.rand(shape[-1], device=DEVICE)).to(torch.float32)  # another dtype than x's: any float
    return x, r, w_a, w_b


def _rms64(x, w, eps, gemma):
    x = x.double()
    w = w.double() + 1 if gemma else w.double()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def _same_as_torch_add(got: torch.Tensor, want: torch.Tensor) -> None:
    """The kernel's rounding of a bf16 sum against torch's: equal, except under the interpreter, whose fp32 -> bf16
    cast truncates (one ulp)."""
    if got.dtype == torch.bfloat16 and not got.is_cuda:
        assert_close_rel(got, want, 1e-2)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 100), (1, 2880), (4, 1)])
@pytest.mark.parametrize("gemma", [False, True])
def test_bit_for_bit_the_composition_of_the_norms(dtype, shape, gemma):
    x, r, w_a, w_b = _inputs(shape, dtype)
    with torch.no_grad():
        y, h = rmsnorm_add_rmsnorm(x, r, w_a, w_b, 1e-6, x_eps=1e-5, gemma=gemma)
        want_y, want_h = fused_add_rmsnorm(rmsnorm(x, w_a, 1e-5, gemma=gemma), r, w_b, 1e-6, gemma=gemma)
        out = rmsnorm_add(x, r, w_a, 1e-5, gemma=gemma)
        want_out = r + rmsnorm(x, w_a, 1e-5, gemma=gemma)
    assert y.shape == h.shape == out.shape == x.shape and y.dtype == h.dtype == out.dtype == dtype
    if dtype == torch.float32 and y.is_cuda:
        # float32 keeps the intermediate unrounded, so the two launches' own reduction trees and FMA contractions
        # show in the last bits (measured on the H200); the half dtypes round them away: bit for bit there
        torch.testing.assert_close(y, want_y, rtol=4e-6, atol=1e-6)
        torch.testing.assert_close(h, want_h, rtol=4e-6, atol=1e-6)
        torch.testing.assert_close(out, want_out, rtol=4e-6, atol=1e-6)
    else:
        assert torch.equal(y, want_y) and torch.equal(h, want_h)
        _same_as_torch_add(out, want_out)
    # and the math, against float64
    h64 = r.double() + _rms64(x, w_a, 1e-5, gemma)
    assert_close_rel(h, h64, TOL[dtype])
    assert_close_rel(y, _rms64(h64, w_b, 1e-6, gemma), TOL[dtype])
    assert_close_rel(out, h64, TOL[dtype])


def test_eps_of_each_norm_is_its_own():
    x, r, w_a, w_b = _inputs((3, 32), torch.float32, seed=1)
    x = x * 1e-3  # a small row, where eps moves the norm
    with torch.no_grad():
        y, h = rmsnorm_add_rmsnorm(x, r, w_a, w_b, 1e-6, x_eps=0.5)
        y_same, h_same = rmsnorm_add_rmsnorm(x, r, w_a, w_b, 1e-6)
    assert not torch.equal(h, h_same)
    assert_close_rel(h, r.double() + _rms64(x, w_a, 0.5, False), 1e-6)


def test_nan_in_a_row_stays_in_that_row():
    x, r, w_a, w_b = _inputs((4, 48), torch.float32, seed=2)
    x[1, 5] = float("nan")
    with torch.no_grad():
        y, h = rmsnorm_add_rmsnorm(x, r, w_a, w_b)
        out = rmsnorm_add(x, r, w_a)
    for t in (y, h, out):
        assert torch.isnan(t[1]).all() and torch.isfinite(t[[0, 2, 3]]).all()


def test_rows_longer_than_one_pass_and_gradients_take_the_composition(monkeypatch):
    calls = []
    real = sandwich._forward
    monkeypatch.setattr(sandwich, "_forward", lambda *a: calls.append(1) or real(*a))
    x, r, w_a, w_b = _inputs((2, MAX_ONE_PASS + 8), torch.float32, seed=3)
    with torch.no_grad():
        y, h = rmsnorm_add_rmsnorm(x, r, w_a, w_b)
    assert calls == []
    assert_close_rel(y, _rms64(r.double() + _rms64(x, w_a, 1e-6, False), w_b, 1e-6, False), 1e-6)
    # a gradient to record: the differentiable ops, the gradients of the float64 formula
    x, r, w_a, w_b = _inputs((3, 40), torch.float32, seed=4)
    leaves = [t.clone().requires_grad_(True) for t in (x, r, w_a, w_b)]
    y, h = rmsnorm_add_rmsnorm(*leaves, 1e-6, gemma=True)
    (y.sum() * 2 + (h * h).sum()).backward()
    assert calls == []
    ref = [t.double().clone().requires_grad_(True) for t in (x, r, w_a, w_b)]
    h64 = ref[1] + _rms64(ref[0], ref[2], 1e-6, True)
    (_rms64(h64, ref[3], 1e-6, True).sum() * 2 + (h64 * h64).sum()).backward()
    for got, want in zip(leaves, ref, strict=True):
        assert_close_rel(got.grad, want.grad, 1e-5)
    out = rmsnorm_add(*(t.detach().requires_grad_(True) for t in (x, r)), w_a)
    assert out.requires_grad and calls == []


def test_bad_arguments_are_named():
    x, r, w_a, w_b = _inputs((2, 16), torch.float32)
    with torch.no_grad():
        with pytest.raises(ShapeMismatchError, match="residual"):
            rmsnorm_add_rmsnorm(x, r[:, :8], w_a, w_b)
        with pytest.raises(ShapeMismatchError, match="weight"):
            rmsnorm_add_rmsnorm(x, r, w_a, w_b[:8])
        with pytest.raises(ShapeMismatchError, match="weight"):
            rmsnorm_add(x, r, w_a[:8])
        with pytest.raises(UnsupportedDtypeError):
            rmsnorm_add_rmsnorm(x, r.double(), w_a, w_b)
        with pytest.raises(InvalidArgumentError, match="eps"):
            rmsnorm_add_rmsnorm(x, r, w_a, w_b, x_eps=0.0)
        with pytest.raises(InvalidArgumentError, match="eps"):
            rmsnorm_add(x, r, w_a, -1.0)
        with pytest.raises(InvalidArgumentError, match="x"):
            rmsnorm_add_rmsnorm(None, r, w_a, w_b)


def test_registered_ops_opcheck_and_compile():
    x, r, w_a, w_b = _inputs((3, 64), torch.float16, seed=5)
    opcheck_op(torch.ops.triton_ops.rmsnorm_add_rmsnorm.default, (x, r, w_a, w_b, 1e-5, 1e-6, True))
    opcheck_op(torch.ops.triton_ops.rmsnorm_add.default, (x, r, w_a, 1e-6, False))

    def layer_end(x, r):
        y, h = rmsnorm_add_rmsnorm(x, r, w_a, w_b, 1e-6, gemma=True)
        return rmsnorm_add(y, h, w_b, 1e-6, gemma=True)

    with torch.no_grad():
        eager = layer_end(x, r)
        torch._dynamo.reset()
        with count_compiles() as compiles:
            compiled = torch.compile(layer_end, fullgraph=True, backend="eager")(x, r)
    assert compiles["frames"] == 1 and torch.equal(compiled, eager)


def test_a_call_signature_is_validated_and_planned_once(monkeypatch):
    """Decode calls the sandwich norms twice a layer with the same shapes: the first call of a signature validates
    and plans, later ones launch (new data, same result as a fresh plan); another shape plans anew."""
    seen = []
    real = sandwich._validate_sandwich
    monkeypatch.setattr(sandwich, "_validate_sandwich", lambda *a, **k: seen.append(1) or real(*a, **k))
    sandwich._PLANS.clear()
    x, r, w_a, w_b = _inputs((3, 48), torch.float32, seed=4)
    with torch.no_grad():
        rmsnorm_add_rmsnorm(x, r, w_a, w_b)
        x2, r2, _, _ = _inputs((3, 48), torch.float32, seed=5)
        y, h = rmsnorm_add_rmsnorm(x2, r2, w_a, w_b)
        assert len(seen) == 1
        sandwich._PLANS.clear()
        y_new, h_new = rmsnorm_add_rmsnorm(x2, r2, w_a, w_b)
        assert len(seen) == 2 and torch.equal(y, y_new) and torch.equal(h, h_new)
        rmsnorm_add_rmsnorm(*_inputs((5, 48), torch.float32, seed=6))
        assert len(seen) == 3
        with pytest.raises(ShapeMismatchError):  # a bad call is validated, whatever was planned before
            rmsnorm_add_rmsnorm(x2, r2[:, :40], w_a, w_b)
