"""The weight-only (W8A16) decode path with compiled kernels, at Llama-3-8B's projection shapes: against float64,
one launch per call, the hardware's NaN, CUDA graphs (eager capture and torch.compile's), two streams at once,
deterministic split-K sums. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from fp8_gemm import FP8Linear, clear_caches, fp8_linear
from fp8_gemm import linear as linear_mod
from fp8_gemm import weight_only as wo
from fp8_gemm.quantize import expand_scale
from torch import nn
from triton_ops_core import scratch as _scratch
from triton_ops_core.testing import assert_close_rel, count_compiles

pytestmark = pytest.mark.gpu

# (in_features K, out_features N): q/o, k/v, gate/up, down, lm_head
LLAMA = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (4096, 128256)]
RECIPES = {"channel": "row", "block": "block", "tensor": "tensor", "group": "block"}
# bf16 output rounding (~1.1e-3 rms) with margin; the fp32 accumulation adds ~1e-6
BF16_TOL = 4e-3


def _module(k: int, n: int, mode: str, dtype=torch.bfloat16, bias: bool = False, seed: int = 0) -> FP8Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias, device="cuda", dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_(0.0, k**-0.5)
        lin.weight[:, 3] *= 30  # an input channel far larger than the rest, as real layers have
    mod = FP8Linear.from_linear(lin, weight_granularity=mode, activation_granularity=RECIPES[mode])
    # the kernel on every shape (``"auto"`` routes large weights with 128x128 block scales to W8A8:
    # weight_only.use_weight_only)
    mod.path = "weight_only"
    return mod


def _reference(x: torch.Tensor, mod: FP8Linear, chunk: int = 16384) -> torch.Tensor:
    """``x @ dequant(W)^T + b`` in float64 on the GPU, by chunks of output features."""
    n, k = mod.weight.shape
    s_kn = expand_scale(mod.weight_scale, (k, n))
    x64 = x.double().reshape(-1, k)
    outs = [x64 @ (mod.weight[lo:lo + chunk].double() * s_kn[:, lo:lo + chunk].double().t()).t()
            for lo in range(0, n, chunk)]
    out = torch.cat(outs, dim=1)
    if mod.bias is not None:
        out = out + mod.bias.double()
    return out.reshape(*x.shape[:-1], n)


def _is_weight_only(m: int) -> bool:
    return any(p[0] is not None and p[0].m == m for p in linear_mod._PLANS._plans.values())


@pytest.mark.parametrize("mode", ["channel", "block", "tensor", "group"])
@pytest.mark.parametrize(("k", "n"), LLAMA)
def test_llama_shapes_against_float64(k, n, mode):
    mod = _module(k, n, mode, seed=k + n)
    clear_caches()
    for m in (1, 4, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = mod(x)
        assert out.dtype == torch.bfloat16 and _is_weight_only(m)
        err = assert_close_rel(out, _reference(x, mod), BF16_TOL, f"{k} -> {n} {mode} M={m}")
        assert err < 2.5e-3, err  # the output's rounding, nothing else


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["channel", "block", "group"])
def test_other_activation_dtypes_and_bias(dtype, mode):
    mod = _module(4096, 1024, mode, dtype=dtype, bias=True, seed=1)
    for m in (1, 2, 8):  # 2, 4, 16 rows; fp32: the FMA variant up to 4 rows, the IEEE dot beyond
        x = torch.randn(2, m, 4096, device="cuda", dtype=dtype)
        out = mod(x)
        assert out.dtype == dtype and out.shape == (2, m, 1024) and _is_weight_only(2 * m)
        assert_close_rel(out, _reference(x, mod), 2e-5 if dtype == torch.float32 else 1.5e-3, f"{dtype} M={2 * m}")


def test_one_launch_per_decode_call():
    from torch.profiler import ProfilerActivity, profile

    for mode in ("channel", "block"):
        mod = _module(4096, 1024, mode)  # 4 rows: split K, the partial sums meet inside the one launch
        x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
        mod(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            mod(x)
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert kernels == ["fp8_weight_only_kernel"], kernels


def test_forced_paths_agree_within_activation_quantization():
    mod = _module(4096, 14336, "block", seed=2)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    ref = _reference(x, mod)
    err_wo = assert_close_rel(mod(x), ref, BF16_TOL, "weight-only")
    mod.path = "w8a8"
    err_w8a8 = assert_close_rel(mod(x), ref, 0.06, "w8a8")
    assert err_w8a8 > 3 * err_wo, (err_w8a8, err_wo)


def test_nan_from_the_activation_and_from_the_weight():
    mod = _module(4096, 4096, "channel", seed=3)
    mod.weight.view(torch.uint8)[17, 100] = 0x7F  # E4M3 NaN in output feature 17
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    x[2, 9] = float("nan")
    out = mod(x)
    assert out[2].isnan().all() and out[:, 17].isnan().all()
    rest = out[[0, 1, 3]][:, [c for c in range(4096) if c != 17]]
    assert torch.isfinite(rest).all()


def test_split_k_deterministic_and_counters_zero_at_rest():
    mod = _module(14336, 4096, "channel", seed=4)  # split K at 14336 -> 4096
    x = torch.randn(16, 14336, device="cuda", dtype=torch.bfloat16)
    _scratch.clear()
    linear_mod._PLANS.clear()  # this call's plan alone (an xdist worker's earlier tests leave theirs)
    first = mod(x)
    (plan,) = [p[0] for p in linear_mod._PLANS._plans.values() if p[0] is not None]
    assert plan.config["SPLIT_K"] > 1, plan.config
    for _ in range(5):
        assert torch.equal(mod(x), first)
    torch.cuda.synchronize()
    (cnt,) = [b for key, b in _scratch._BUFFERS.items() if key[0] == wo._COUNTERS]
    assert not cnt.any()


def test_two_streams_at_once():
    mod = _module(4096, 1024, "block", seed=5)  # 4 rows: split K, each stream's own counters
    xs = [torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    expected = [mod(x) for x in xs]
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()
    for _ in range(20):
        outs = []
        for s, x in zip(streams, xs):
            with torch.cuda.stream(s):
                outs.append(mod(x))
        torch.cuda.synchronize()
        for out, exp in zip(outs, expected):
            assert torch.equal(out, exp)


def test_cuda_graph_capture_and_replay():
    mod = _module(4096, 1024, "channel", seed=6)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    mod(x)  # validates, compiles and plans outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mod(x)
    for scale in (1e-3, 1.0, 300.0):
        x.copy_(torch.randn_like(x) * scale)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, mod(x))


def test_split_k_graphs_by_hand_keep_their_counters_and_replay_in_any_order():
    # 8 rows split K: the arrival counters are kept on each graph (triton_ops_core.scratch.keep_on), shared by the
    # graph's launches; the second graph's buffers are its own, so it may replay first. The same module through
    # torch.compile's CUDA graphs (registered op: a fresh buffer per launch) gives the same bits.
    mods = [_module(4096, 1024, "block", seed=11), _module(4096, 4096, "block", seed=12),
            _module(14336, 4096, "channel", seed=13)]
    xs = [torch.randn(8, m.in_features, device="cuda", dtype=torch.bfloat16) for m in mods]

    def step():
        return [m(x) for m, x in zip(mods, xs, strict=True)]

    step()  # validates, compiles and plans outside the capture
    graphs, outs = [], []
    for _ in range(2):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), _scratch.keep_on(graph):
            outs.append(step())
        graphs.append(graph)
        kept = graph._triton_ops_scratch  # what the launches share (raises if nothing was kept)
        assert any(key[0] == wo._COUNTERS for key in kept if isinstance(key, tuple)), kept.keys()
    for order in ((1, 0), (0, 1, 1, 0)):
        for x in xs:
            x.copy_(torch.randn_like(x))
        expected = step()
        for i in order:
            graphs[i].replay()
        torch.cuda.synchronize()
        for i in set(order):
            for out, exp in zip(outs[i], expected, strict=True):
                assert torch.equal(out, exp)
    with torch.no_grad():
        graphed = torch.compile(mods[1], mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, recording, replay
            out = graphed(xs[1])
        assert torch.equal(out, mods[1](xs[1]))


def test_torch_compile_reduce_overhead_and_dynamic_rows():
    mod = _module(4096, 1024, "block", seed=7)
    with torch.no_grad():
        graphed = torch.compile(mod, mode="reduce-overhead", fullgraph=True)
        x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):  # warm-up, recording, replay
            out = graphed(x)
        assert torch.equal(out, mod(x))
        fn = torch.compile(mod, fullgraph=True, dynamic=True)
        fn(torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16))
        with count_compiles() as compiles:
            for m in (3, 5, 9, 16):
                x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
                assert torch.equal(fn(x), fp8_linear(x, mod.weight, mod.weight_scale, None, "block"))
        assert compiles["frames"] == 0, compiles
