"""DelayedScaler: scales from an amax history, overflow raises the scale, strict mode raises."""

from __future__ import annotations

import pytest
import torch
from fp8_gemm import DelayedScaler, ScaleTracker, dequantize_fp8
from fp8_gemm.reference import quantize_fp8_reference
from triton_ops_core.exceptions import InvalidArgumentError, NumericalOverflowError
from triton_ops_core.models import FP8Format


def _assert_same(q, ref):
    assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))


def test_first_call_is_dynamic_then_history_max(device):
    scaler = DelayedScaler("e4m3", history_len=3)
    assert scaler.scale() is None
    xs = [torch.randn(4, 64, device=device) * f for f in (1.0, 4.0, 2.0, 0.5, 0.25)]
    amaxes = []
    for i, x in enumerate(xs):
        expected_given = None if i == 0 else max(amaxes[-3:]) / 448.0
        q, s = scaler.quantize(x)
        amax = float(x.abs().max())
        amaxes.append(amax)
        if expected_given is None:
            q_ref, s_ref = quantize_fp8_reference(x, "e4m3", "tensor")
        else:
            hist = torch.tensor([max(amaxes[-4:-1])], device=device)
            given = torch.div(hist, torch.full_like(hist, 448.0))  # tensor / tensor: IEEE on CUDA too
            q_ref, s_ref = quantize_fp8_reference(x, "e4m3", "tensor", scale=given)
        assert torch.equal(s, s_ref)
        _assert_same(q, q_ref)
    # After five calls the window holds the last three amaxes.
    assert scaler.calls == 5
    assert float(scaler.scale()) == pytest.approx(max(amaxes[-3:]) / 448.0, rel=1e-6)


def test_growth_beyond_history_raises_scale_or_strict_error(device):
    x = torch.randn(8, 32, device=device)
    scaler = DelayedScaler("e5m2", history_len=4)
    scaler(x)
    q, s = scaler(x * 10)  # 10x larger than anything seen: the delayed scale cannot hold it
    q_ref, s_ref = quantize_fp8_reference(x * 10, "e5m2", "tensor")
    assert torch.equal(s, s_ref)  # fell back to the dynamic scale: nothing clips
    assert torch.isfinite(dequantize_fp8(q, s, torch.float32)).all()
    strict = DelayedScaler("e4m3", strict=True)
    strict(x)
    with pytest.raises(NumericalOverflowError):
        strict(x * 10)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("peak", [7.428401947021484, 4.482937812805176, 2.348099946975708])
def test_steady_state_keeps_its_scale_with_margin_zero(device, fmt, peak):
    # The same tensor again, with an amax for which amax * (1 / (amax / max)) rounds to just above the largest
    # value (checked below): that is rounding, not overflow, so the delayed scale holds and strict mode is quiet.
    max_value = FP8Format.from_name(fmt).max_value
    amax = torch.tensor([peak])
    assert float(amax * (torch.ones(1) / torch.div(amax, torch.full_like(amax, max_value)))) > max_value
    x = torch.randn(16, 96, generator=torch.Generator().manual_seed(0)).clamp(-2, 2).to(device)
    x[3, 5] = -peak
    scaler = DelayedScaler(fmt, history_len=4, margin=0, strict=True)
    _, s0 = scaler(x)
    for _ in range(2):
        q, s = scaler(x)
        assert torch.equal(s, s0)
        assert q.float()[3, 5] == -max_value


def test_margin_and_reset(device):
    x = torch.randn(8, 32, device=device)
    scaler = ScaleTracker("e4m3", history_len=2, margin=2)
    scaler(x)
    assert float(scaler.scale()) == pytest.approx(float(x.abs().max()) / 448 * 4, rel=1e-6)
    _, s = scaler(x)
    assert float(s) == pytest.approx(float(x.abs().max()) / 448 * 4, rel=1e-6)
    scaler.reset()
    assert scaler.scale() is None and scaler.calls == 0
    assert "DelayedScaler(fmt='e4m3'" in repr(scaler)


def test_nan_does_not_poison_history(device):
    x = torch.randn(4, 16, device=device)
    x[0, 0] = float("nan")
    scaler = DelayedScaler()
    q, s = scaler(x)
    assert torch.isfinite(scaler.scale()).all() and q.float()[0, 0].isnan()


@pytest.mark.parametrize("kwargs", [{"history_len": 0}, {"history_len": 1.5}, {"margin": -1}, {"fmt": "int8"}])
def test_bad_arguments(kwargs):
    with pytest.raises(InvalidArgumentError):
        DelayedScaler(**kwargs)
