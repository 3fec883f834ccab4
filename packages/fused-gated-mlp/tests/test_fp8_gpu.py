"""GPU-only checks of FP8 weights at the sizes they are for: Llama-3-8B's MLP (4096 -> 14336) and a gpt-oss expert
(2880 -> 2880, interleaved packed weight, clamped SwiGLU), decode and prefill, per-channel and 128 x 128 block
scales, bf16 activations; every kernel variant on odd sizes; an FP8 NaN code in a weight (the interpreter reads it
as 480, so this is checked here only).

The reference is fp32 on the GPU (TF32 off) from the same bf16 activations and the dequantized weights; its own
error (~1e-6) is far under the bf16 output rounding the tolerance allows for.
"""

from __future__ import annotations

import pytest
import torch
from fused_gated_mlp import dequantize_weight_fp8, fused_gated_mlp, ops, quantize_weight_fp8, split_packed
from fused_gated_mlp.ops import gated_mlp_forward
from triton_ops_core.testing import assert_close_rel, poison_

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = 1e-2  # bf16 output rounding (relative Frobenius), as test_gpu.py


@pytest.fixture(autouse=True)
def _exact_reference_and_poisoned_outputs(monkeypatch):
    # Every output starts as NaN: a tile the kernel skips fails the comparison. fp32 reference GEMMs without TF32.
    monkeypatch.setattr(ops, "_new_output", lambda m, n, dtype, dev: poison_(torch.empty(m, n, dtype=dtype,
                                                                                           device=dev)))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _weights(rows, hidden, scaling, seed, dtype=torch.float8_e4m3fn):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(rows, hidden, device="cuda", generator=gen) * (1.5 / hidden**0.5)
    w *= 0.25 + 1.75 * torch.rand(rows, 1, device="cuda", generator=gen)  # channels of different ranges
    return quantize_weight_fp8(w.bfloat16(), scaling, dtype)


def _x(m, hidden, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    return torch.randn(m, hidden, device="cuda", generator=gen).bfloat16()


def _ref32(x, wg, wu, activation="silu", bg=None, bu=None):
    gate, up = x.float() @ wg.T, x.float() @ wu.T
    if bg is not None:
        gate, up = gate + bg.float(), up + bu.float()
    if activation == "silu":
        return torch.nn.functional.silu(gate) * up
    g, u = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
    return g * torch.sigmoid(1.702 * g) * (u + 1)


@pytest.mark.parametrize("scaling", ["channel", "block", "group"])
@pytest.mark.parametrize("m", [1, 16, 64, 512])
def test_llama3_8b_mlp(m, scaling):
    qg, sg = _weights(14336, 4096, scaling, seed=m)
    qu, su = _weights(14336, 4096, scaling, seed=m + 100)
    x = _x(m, 4096, m)
    out = fused_gated_mlp(x, qg, qu, gate_scale=sg, up_scale=su)
    ref = _ref32(x, dequantize_weight_fp8(qg, sg), dequantize_weight_fp8(qu, su))
    assert_close_rel(out, ref, TOL)


@pytest.mark.parametrize("scaling", ["channel", "block", "group"])
@pytest.mark.parametrize("m", [1, 64, 512])
def test_gpt_oss_expert_interleaved(m, scaling):
    q, s = _weights(2 * 2880, 2880, scaling, seed=m + 7)
    gen = torch.Generator(device="cuda").manual_seed(m)
    b = (torch.randn(2 * 2880, device="cuda", generator=gen) * 0.1).bfloat16()
    x = _x(m, 2880, m) * 2
    out = fused_gated_mlp(x, q, None, "swiglu_oai", gate_bias=b, weight_layout="interleaved", gate_scale=s)
    wg, wu = split_packed(dequantize_weight_fp8(q, s), "interleaved")
    bg, bu = split_packed(b, "interleaved")
    assert_close_rel(out, _ref32(x, wg, wu, "swiglu_oai", bg, bu), TOL)


CONFIGS = {
    "decode-splitk": {"path": "decode", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 4, "GROUP_M": 1,
                      "num_warps": 4, "num_stages": 3},
    "decode-tma": {"path": "decode", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1, "GROUP_M": 1,
                   "num_warps": 4, "num_stages": 4, "USE_TMA": True},
    "decode-k256": {"path": "decode", "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 1, "GROUP_M": 1,
                    "num_warps": 4, "num_stages": 3},
    "prefill-tma": {"path": "prefill", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1, "GROUP_M": 8,
                    "num_warps": 8, "num_stages": 4},
    "prefill-ptr": {"path": "prefill", "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 8,
                    "num_warps": 8, "num_stages": 3, "USE_TMA": False},
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("scaling", ["channel", "block", "group"])
def test_every_kernel_variant_on_odd_sizes(name, scaling):
    # hidden 1040 (a multiple of 16, TMA allowed; 8 full K blocks and a partial one), intermediate 700 (ragged
    # column tiles and scale rows); 37 tokens: three decode row tiles. Twice: the split-K workspace stays clean.
    for seed in range(2):
        qg, sg = _weights(700, 1040, scaling, seed=seed)
        qu, su = _weights(700, 1040, scaling, seed=seed + 50)
        x = _x(37, 1040, seed)
        gen = torch.Generator(device="cuda").manual_seed(seed)
        bg, bu = torch.randn(700, device="cuda", generator=gen), torch.randn(700, device="cuda", generator=gen)
        out = gated_mlp_forward(x, qg, qu, bg, bu, "silu", 1.702, 7.0, CONFIGS[name], gate_scale=sg, up_scale=su)
        ref = _ref32(x, dequantize_weight_fp8(qg, sg), dequantize_weight_fp8(qu, su), "silu", bg, bu)
        assert_close_rel(out, ref, TOL)


@pytest.mark.parametrize("m", [1, 8, 512])  # 8: the default fp16 tensor-core dots (F16_DOT)
def test_nan_weight_code_and_e5m2(m):
    qg, sg = _weights(14336, 4096, "channel", seed=3, dtype=torch.float8_e5m2)
    qu, su = _weights(14336, 4096, "channel", seed=4, dtype=torch.float8_e5m2)
    x = _x(m, 4096, 5)
    out = fused_gated_mlp(x, qg, qu, gate_scale=sg, up_scale=su)
    assert_close_rel(out, _ref32(x, dequantize_weight_fp8(qg, sg), dequantize_weight_fp8(qu, su)), TOL)
    qg = qg.clone()
    qg[123, 45] = float("nan")  # an FP8 NaN code: gate column 123 is NaN for every token, nothing else is
    out = fused_gated_mlp(x, qg, qu, gate_scale=sg, up_scale=su)
    nan = torch.isnan(out)
    assert nan[:, 123].all() and nan.sum() == m


def test_fp8_call_makes_no_weight_copy():
    # The kernels read the FP8 weights themselves: a call allocates its output (and at most the split-K workspace),
    # never a dequantized copy of the weights.
    qg, sg = _weights(14336, 4096, "channel", seed=9)
    qu, su = _weights(14336, 4096, "channel", seed=10)
    x = _x(4, 4096, 9)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused_gated_mlp(x, qg, qu, gate_scale=sg, up_scale=su)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 1 << 20  # the [4, 14336] output and the workspace at most
