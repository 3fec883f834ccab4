"""The PyTorch emulation of FP8Linear (fp8_gemm.emulate) computes what the kernels compute.

benchmarks/bench_accuracy.py measures recipes with it on CPU; these tests are what lets its numbers stand for the
kernels': the same quantized weight and activation bit for bit, the same output up to float32 summation order.
"""

from __future__ import annotations

import pytest
import torch
from fp8_gemm import FP8Linear, quantize_fp8
from fp8_gemm.emulate import EmulatedFP8Linear, fake_quantize
from fp8_gemm.quantize import ACTIVATION_BLOCK, WEIGHT_BLOCK, expand_scale
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.testing import assert_close_rel

# One output rounding apart at most (float32 sums in another order): the output dtype's rounding, with margin.
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}
CASES = [("channel", "row"), ("block", "block"), ("tensor", "tensor"), ("channel", "block"), ("block", "row")]


def _layer(in_f, out_f, device, dtype, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=True, device=device).to(dtype)
    with torch.no_grad():
        lin.weight[5] *= 40  # an output row and an input column far larger than the rest, as real layers have
        lin.weight[:, 7] *= 25
    return lin


def _activation(shape, device, dtype, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(shape, device=device)
    x[..., 3] *= 300  # a massive-activation channel
    return x.to(dtype)


@pytest.mark.parametrize(("w_gran", "a_gran"), CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_emulation_matches_fp8linear(device, w_gran, a_gran, dtype):
    lin = _layer(200, 136, device, dtype)
    real = FP8Linear.from_linear(lin, weight_granularity=w_gran, activation_granularity=a_gran)
    real.path = "w8a8"  # what the emulation emulates (15 rows would take the weight-only decode kernel)
    emu = EmulatedFP8Linear(lin, weight_granularity=w_gran, activation_granularity=a_gran)
    # the same E4M3 weight, bit for bit
    assert torch.equal(emu.weight, real.dequantized_weight(torch.float32))
    x = _activation((3, 5, 200), device, dtype)
    out_real, out_emu = real(x), emu(x)
    assert out_emu.dtype == out_real.dtype == dtype and out_emu.shape == out_real.shape == (3, 5, 136)
    assert_close_rel(out_emu.float(), out_real.float(), TOL[dtype], f"emulated vs FP8Linear {w_gran}/{a_gran}")
    # from an existing FP8Linear: the same again
    assert_close_rel(EmulatedFP8Linear.from_fp8_linear(real)(x).float(), out_real.float(), TOL[dtype], "from_fp8")


@pytest.mark.parametrize(("granularity", "role"), [("row", "activation"), ("block", "activation"),
                                                   ("tensor", "activation"), ("channel", "weight"),
                                                   ("block", "weight")])
def test_fake_quantize_is_the_kernels_quantization(device, granularity, role):
    t = _activation((40, 256), device, torch.bfloat16)
    if role == "weight":
        t = _activation((136, 256), device, torch.bfloat16).t()  # nn.Linear's W.t(): a column-major [K, N] operand
    block = None if granularity != "block" else (ACTIVATION_BLOCK if role == "activation" else WEIGHT_BLOCK)
    q, s = quantize_fp8(t, "e4m3", granularity, block_size=block, role=role)
    expected = q.float() * expand_scale(s, tuple(t.shape))
    assert torch.equal(fake_quantize(t, granularity, role=role), expected)


def test_static_scale_and_smoothing_are_exact_transforms(device):
    lin = _layer(256, 64, device, torch.float32)
    x = _activation((4, 256), device, torch.float32)
    # a static scale at the activation's own amax gives the dynamic per-tensor result
    amax = float(x.abs().max())
    dyn = EmulatedFP8Linear(lin, weight_granularity="channel", activation_granularity="tensor")
    static = EmulatedFP8Linear(lin, weight_granularity="channel", activation_granularity="tensor",
                               activation_scale=torch.tensor(amax) / 448.0)
    assert_close_rel(static(x), dyn(x), 1e-6, "static at amax")
    # smoothing by ones changes nothing; other factors move error between the operands, the product stays close
    plain = EmulatedFP8Linear(lin)
    assert torch.equal(EmulatedFP8Linear(lin, smooth=torch.ones(256, device=device))(x), plain(x))
    s = 2.0 ** torch.randint(-3, 4, (256,), device=device).float()
    smooth = EmulatedFP8Linear(lin, smooth=s)
    assert_close_rel(smooth(x), lin(x).detach(), 0.08, "smoothed, close to the float layer")
    with pytest.raises(InvalidArgumentError, match="smooth"):
        EmulatedFP8Linear(lin, smooth=-s)
    with pytest.raises(InvalidArgumentError, match="activation_scale"):
        EmulatedFP8Linear(lin, activation_granularity="row", activation_scale=1.0)
