"""GPU-only checks at the sizes the package is for (LLaMA-7B/13B-like, 22528x6144, gpt-oss), both paths.

The reference is fp32 on the GPU from the same 16-bit inputs (float64 on CPU would take minutes at these sizes);
its own error is ~1e-6, far under the bf16 output rounding the tolerance allows for.
"""

from __future__ import annotations

import pytest
import torch
from _gated_mlp_helpers import pack
from fused_gated_mlp import fused_gated_mlp, gated_mlp_reference, heuristic_config, ops
from triton_ops_core.testing import assert_close_rel, poison_

pytestmark = pytest.mark.gpu

SIZES = [(4096, 5632), (4096, 11264), (6144, 22528), (2880, 2880)]
TOKENS = [1, 8, 32, 64, 2048, 8192]


def _inputs(m, hidden, inter, dtype=torch.bfloat16, bias=False, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, hidden, device="cuda", generator=gen).to(dtype)
    scale = 1.5 / hidden**0.5
    wg = (torch.randn(inter, hidden, device="cuda", generator=gen) * scale).to(dtype)
    wu = (torch.randn(inter, hidden, device="cuda", generator=gen) * scale).to(dtype)
    bg = torch.randn(inter, device="cuda", generator=gen) if bias else None
    bu = torch.randn(inter, device="cuda", generator=gen) if bias else None
    return x, wg, wu, bg, bu


def _ref32(x, wg, wu, activation="silu", bg=None, bu=None, **kw):
    return gated_mlp_reference(x.float(), wg.float(), wu.float(), activation,
                               gate_bias=None if bg is None else bg.float(),
                               up_bias=None if bu is None else bu.float(), **kw)


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    # Every output starts as NaN on the GPU too: a tile the kernel skips fails the comparison.
    monkeypatch.setattr(ops, "_new_output", lambda m, n, dtype, dev: poison_(torch.empty(m, n, dtype=dtype,
                                                                                           device=dev)))


@pytest.mark.parametrize("hidden,inter", SIZES, ids=[f"H{h}-I{i}" for h, i in SIZES])
@pytest.mark.parametrize("m", TOKENS)
def test_required_sizes_bf16(m, hidden, inter):
    x, wg, wu, _, _ = _inputs(m, hidden, inter, seed=m)
    out = fused_gated_mlp(x, wg, wu)
    assert_close_rel(out, _ref32(x, wg, wu), 1e-2)


@pytest.mark.parametrize("hidden,inter", [(2048, 5632), (8192, 28672)], ids=["H2048-I5632", "H8192-I28672"])
@pytest.mark.parametrize("m", [1, 64, 16400])
def test_hidden_range_and_long_prefill(m, hidden, inter):
    # The ends of the supported hidden range (LLaMA-70B's 8192 x 28672 layer) and a prefill past 16384 tokens.
    x, wg, wu, _, _ = _inputs(m, hidden, inter, seed=m + hidden)
    out = fused_gated_mlp(x, wg, wu)
    assert_close_rel(out, _ref32(x, wg, wu), 1e-2)


@pytest.mark.parametrize("m", [1, 8, 64, 2048])
def test_gpt_oss_interleaved_swiglu(m):
    x, wg, wu, bg, bu = _inputs(m, 2880, 2880, bias=True, seed=7)
    w, b = pack(wg, wu, "interleaved"), pack(bg, bu, "interleaved")
    out = fused_gated_mlp(x, w, activation="swiglu_oai", gate_bias=b, weight_layout="interleaved")
    assert_close_rel(out, _ref32(x, wg, wu, "swiglu_oai", bg, bu), 1e-2)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "swiglu_oai"])
@pytest.mark.parametrize("m", [5, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_activations_dtypes_odd_sizes(activation, m, dtype):
    # Sizes off every block multiple; hidden 1000 keeps TMA's 16-byte rows for 16-bit types only at 8 | hidden.
    x, wg, wu, bg, bu = _inputs(m, 1000, 1500, dtype, bias=True, seed=3)
    out = fused_gated_mlp(x, wg, wu, activation, gate_bias=bg, up_bias=bu)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 2e-3}[dtype]
    assert_close_rel(out, _ref32(x, wg, wu, activation, bg, bu), tol)


@pytest.mark.parametrize("m", [1, 16, 64])
def test_split_k_is_race_free(m):
    # Forced split-K with several slices, repeated: a missing barrier or a stale workspace shows as a moving error.
    x, wg, wu, _, _ = _inputs(m, 4096, 5632, seed=m)
    ref = _ref32(x, wg, wu)
    cfg = {**heuristic_config(m, 4096, 5632, torch.bfloat16, x.device), "SPLIT_K": 4}
    for _ in range(5):
        out = ops.gated_mlp_forward(x, wg, wu, None, None, "silu", 1.702, 7.0, cfg)
        assert_close_rel(out, ref, 1e-2)


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("use_tma", [True, False])
def test_decode_pointer_and_tma_loads(m, use_tma):
    # Pointer loads are the decode default; descriptors stay available through the config.
    x, wg, wu, bg, bu = _inputs(m, 4096, 5632, bias=True, seed=m)
    cfg = {**heuristic_config(m, 4096, 5632, torch.bfloat16, x.device), "USE_TMA": use_tma}
    out = ops.gated_mlp_forward(x, wg, wu, bg, bu, "gelu", 1.702, 7.0, cfg)
    assert_close_rel(out, _ref32(x, wg, wu, "gelu", bg, bu), 1e-2)


@pytest.mark.parametrize("use_tma", [True, False])
def test_prefill_pointer_and_tma_paths(use_tma):
    x, wg, wu, _, _ = _inputs(1000, 4096, 1408, seed=9)
    cfg = {**heuristic_config(1000, 4096, 1408, torch.bfloat16, x.device), "USE_TMA": use_tma}
    out = ops.gated_mlp_forward(x, wg, wu, None, None, "silu", 1.702, 7.0, cfg)
    assert_close_rel(out, _ref32(x, wg, wu), 1e-2)


def test_misaligned_rows_fall_back_from_tma():
    # hidden 4100: bf16 rows of 8200 bytes are not 16-byte multiples, so TMA is off; results must still be right.
    x, wg, wu, _, _ = _inputs(300, 4100, 700, seed=10)
    assert_close_rel(fused_gated_mlp(x, wg, wu), _ref32(x, wg, wu), 1e-2)


@pytest.mark.parametrize("m", [8, 512])
def test_gradients(m):
    x, wg, wu, bg, bu = _inputs(m, 2048, 1408, bias=True, seed=11)
    leaves = [t.clone().requires_grad_(True) for t in (x, wg, wu, bg, bu)]
    out = fused_gated_mlp(leaves[0], leaves[1], leaves[2], gate_bias=leaves[3], up_bias=leaves[4])
    grad = torch.randn_like(out)
    out.backward(grad)
    refs = [t.float().clone().requires_grad_(True) for t in (x, wg, wu, bg, bu)]
    _ref32(*refs[:3], "silu", refs[3], refs[4]).backward(grad.float())
    for leaf, ref in zip(leaves, refs):
        assert_close_rel(leaf.grad, ref.grad, 2e-2)


def test_cuda_graph_capture_of_decode():
    x, wg, wu, _, _ = _inputs(4, 4096, 5632, seed=12)
    out = fused_gated_mlp(x, wg, wu)  # first call outside the graph: compiles, allocates the split-K workspace
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fused_gated_mlp(x, wg, wu)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_gated_mlp(x, wg, wu)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_rel(out, _ref32(x, wg, wu), 1e-2)
