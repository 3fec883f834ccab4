"""rmsnorm and fused_add_rmsnorm: math against float64, the residual's rounding, in-place, any hidden size (one and two
passes), strided rows, gradients, errors, the registered ops (opcheck, compile), and the modules."""

from __future__ import annotations

import pytest
import torch
from _rope_helpers import DEVICE, norm_inputs
from fused_rmsnorm_rope import FusedAddRMSNorm, RMSNorm, fused_add_rmsnorm, rmsnorm, rmsnorm_reference
from fused_rmsnorm_rope.ops.rmsnorm import MAX_ONE_PASS
from hypothesis import given
from hypothesis import strategies as st
from triton_ops_core.exceptions import (
    InvalidArgumentError,
    LayoutError,
    ShapeMismatchError,
    UnsupportedDtypeError,
)
from triton_ops_core.testing import assert_close_rel, count_compiles, opcheck_op, poison_

# One rounding of the output (the interpreter truncates to bf16: up to 1 ulp).
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6}




def _ref(x, w, eps, gemma=False, residual=None):
    return rmsnorm_reference(x.double(), w.double(), eps, gemma=gemma,
                             residual=None if residual is None else residual.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [1, 7, 64, 2880, MAX_ONE_PASS + 100])
def test_rmsnorm_against_float64(dtype, hidden):
    x, w, _ = norm_inputs((3, hidden), dtype)
    out = rmsnorm(x, w, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_rel(out, _ref(x, w, 1e-5), TOL[dtype])


@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), hidden=st.integers(1, 300), gemma=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_random_shapes(lead, hidden, gemma, dtype):
    x, w, r = norm_inputs((*lead, 2, hidden), dtype, seed=hidden)
    assert_close_rel(rmsnorm(x, w, 1e-6, gemma=gemma), _ref(x, w, 1e-6, gemma), TOL[dtype])
    y, res = fused_add_rmsnorm(x, r, w, 1e-6, gemma=gemma)
    assert torch.equal(res, x + r)  # the model's own add, rounded to the dtype
    assert_close_rel(y, _ref(res, w, 1e-6, gemma), TOL[dtype])


@pytest.mark.parametrize("hidden", [64, MAX_ONE_PASS + 100])
def test_fused_add_in_place_and_out_of_place_agree(hidden):
    x, w, r = norm_inputs((4, hidden), torch.float32)
    y, res = fused_add_rmsnorm(x, r, w)
    r2 = r.clone()
    y2, res2 = fused_add_rmsnorm(x, r2, w, inplace=True)
    assert res2 is r2 and torch.equal(r2, res) and torch.equal(y2, y)
    assert torch.equal(res, x + r) and torch.equal(r, norm_inputs((4, hidden), torch.float32)[2])  # r itself unchanged


def test_strided_rows_and_a_residual_without_one_row_stride():
    x, w, r = norm_inputs((6, 2, 64), torch.float32)
    xs = x[::2]  # every other row: one row stride, no copy
    assert_close_rel(rmsnorm(xs, w), _ref(xs, w, 1e-6), 1e-6)
    rt = r.transpose(0, 1)  # [2, 6, 64] view: its rows cannot be walked with one stride
    xt = x.transpose(0, 1).contiguous()
    rt_copy = rt.clone()
    y, res = fused_add_rmsnorm(xt, rt, w, inplace=True)
    assert res is rt and torch.equal(rt, xt + rt_copy)
    assert_close_rel(y, _ref(xt + rt_copy, w, 1e-6), 1e-6)


def test_output_is_fully_written_and_nan_stays_in_its_row(monkeypatch):
    x, w, _ = norm_inputs((5, 96), torch.float32)
    x[2, 7] = float("nan")
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(real_empty(*a, **k)))
    out = rmsnorm(x, w)
    assert out[2].isnan().all()
    rest = torch.cat([out[:2], out[3:]])
    assert torch.isfinite(rest).all()


def test_empty_input():
    x = torch.empty(0, 64, device=DEVICE)
    assert rmsnorm(x, torch.ones(64, device=DEVICE)).shape == (0, 64)


def test_gradients_against_float64():
    x, w, r = norm_inputs((3, 40), torch.float32)
    for t in (x, w, r):
        t.requires_grad_(True)
    g1, g2 = torch.randn(3, 40, device=DEVICE), torch.randn(3, 40, device=DEVICE)
    y, res = fused_add_rmsnorm(x, r, w, 1e-5, gemma=True)
    (y * g1).sum().backward(retain_graph=True)
    (res * g2).sum().backward()
    refs = [t.detach().double().requires_grad_(True) for t in (x, w, r)]
    s = refs[0] + refs[2]
    yr = rmsnorm_reference(s, refs[1], 1e-5, gemma=True)
    ((yr * g1.double()).sum() + (s * g2.double()).sum()).backward()
    for got, ref in zip((x, w, r), refs):
        assert_close_rel(got.grad, ref.grad, 1e-5)
    x2, w2 = (t.detach().clone().requires_grad_(True) for t in (x, w))
    rmsnorm(x2, w2).square().sum().backward()
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
    rmsnorm_reference(x64, w64, 1e-6).square().sum().backward()
    assert_close_rel(x2.grad, x64.grad, 1e-5) and assert_close_rel(w2.grad, w64.grad, 1e-5)


def test_errors_name_the_argument():
    x, w, r = norm_inputs((2, 16), torch.float32)
    with pytest.raises(ShapeMismatchError, match=r"^weight: expected shape \[16\]"):
        rmsnorm(x, w[:8])
    with pytest.raises(UnsupportedDtypeError, match=r"^x"):
        rmsnorm(x.double(), w)
    with pytest.raises(ShapeMismatchError, match=r"^residual: expected x's shape"):
        fused_add_rmsnorm(x, r[:1], w)
    with pytest.raises(UnsupportedDtypeError, match=r"^residual"):
        fused_add_rmsnorm(x, r.half(), w)
    with pytest.raises(LayoutError, match=r"^x: expected unit stride"):
        rmsnorm(torch.randn(16, 2, device=DEVICE).t(), w)
    with pytest.raises(InvalidArgumentError, match=r"^eps"):
        rmsnorm(x, w, -1.0)
    with pytest.raises(InvalidArgumentError, match=r"^inplace: expected False when a gradient is wanted"):
        fused_add_rmsnorm(x, r, w.clone().requires_grad_(True), inplace=True)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    x, w, r = norm_inputs((2, 3, 32), torch.float32)
    x, w, r = (t.requires_grad_(requires_grad) for t in (x, w, r))
    opcheck_op(torch.ops.triton_ops.rmsnorm.default, (x, w, 1e-6, False))
    opcheck_op(torch.ops.triton_ops.fused_add_rmsnorm.default, (x, r, w, 1e-6, True))
    if not requires_grad:
        opcheck_op(torch.ops.triton_ops.fused_add_rmsnorm_.default, (x, r.clone(), w, 1e-6, False))


def test_compiled_equals_eager_and_compiles_once_over_lengths():
    w = torch.randn(32, device=DEVICE)

    def layer(x, residual):
        y, residual = fused_add_rmsnorm(x, residual, w)
        return rmsnorm(y, w), residual

    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    with count_compiles() as compiles:
        for m in (1, 2, 5, 17):
            x, _, r = norm_inputs((1, m, 32), torch.float32, seed=m)
            for a, b in zip(compiled(x, r), layer(x, r)):
                assert torch.equal(a, b)
    assert compiles["frames"] <= 2


def test_modules_adopt_a_transformers_norm():
    transformers = pytest.importorskip("transformers")
    hf = transformers.models.llama.modeling_llama.LlamaRMSNorm(48, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        hf.weight.normal_(1.0, 0.2)
    ours = RMSNorm.from_module(hf)
    assert ours.weight is hf.weight and ours.eps == 1e-5
    x = torch.randn(2, 5, 48, device=DEVICE)
    with torch.no_grad():
        assert_close_rel(ours(x), hf(x), 1e-6)
        r = torch.randn_like(x)
        y, res = FusedAddRMSNorm.from_module(hf)(x, r)
        assert torch.equal(res, x + r) and torch.allclose(y, hf(x + r), rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match=r"^norm: expected an RMSNorm module"):
        RMSNorm.from_module(torch.nn.Linear(4, 4))
    assert RMSNorm(8, gemma=True).weight.abs().sum() == 0 and RMSNorm(8).weight.sum() == 8


@pytest.mark.parametrize("on", [False, True])
def test_pdl_plans_launch_early(monkeypatch, on):
    """With programmatic dependent launch on for the device (triton_ops_core.pdl), the norm's plan carries ``PDL``
    (and EMULATE, RELEASE beside it, found by name) and ``launch_pdl``; off, neither. With the release
    switch, a one-row norm (a one-sequence decode step) lets the next kernel launch once it runs; two rows do not.
    Plans only."""
    import importlib

    from triton_ops_core import pdl

    rms = importlib.import_module("fused_rmsnorm_rope.ops.rmsnorm")
    monkeypatch.setattr(pdl, "enabled", lambda device: on)
    monkeypatch.setattr(pdl, "RELEASE_SHORT", False)
    x, w, r = norm_inputs((2, 64), torch.bfloat16, 0)
    rms._PLANS.clear()
    names = rms._rmsnorm_kernel.arg_names
    emulate_at, pdl_at, release_at = (names.index(n) - names.index("n_rows") for n in ("EMULATE", "PDL", "RELEASE"))
    plan = rms._plan(x, w, 1e-6, r, False, False)
    assert plan.tail[pdl_at] is on and plan.options.get("launch_pdl", False) is on
    assert plan.tail[emulate_at] is False  # EMULATE: an FP8 output under the interpreter only
    assert plan.tail[release_at] is False  # RELEASE: the switch is off
    monkeypatch.setattr(pdl, "RELEASE_SHORT", True)
    monkeypatch.setattr(pdl, "TRIGGER", "end")
    monkeypatch.setattr(pdl, "sm_count", lambda device, cpu: 132)
    rms._PLANS.clear()
    assert rms._plan(x, w, 1e-6, r, False, False).tail[release_at] is False  # two rows
    x1, w1, r1 = norm_inputs((1, 64), torch.bfloat16, 0)
    assert rms._plan(x1, w1, 1e-6, r1, False, False).tail[release_at] is on
    rms._PLANS.clear()
