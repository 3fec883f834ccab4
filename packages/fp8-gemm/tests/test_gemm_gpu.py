"""fp8_gemm on the GPU at the sizes real models use: the kernel's own error (faithful fp32 accumulation),
fast accumulation's error, every granularity, bias and output dtypes. Hopper's FP8 tensor cores keep partial
sums in reduced precision, so only these tests (large K) can catch an accumulation that is not promoted.
"""

from __future__ import annotations

import pytest
import torch
from _gemm_ref import gemm_ref, make_operands
from fp8_gemm import gemm, gemm_wgmma
from fp8_gemm.gemm import _pick_path, fp8_gemm
from triton_ops_core.testing import assert_close_rel, relative_error

pytestmark = pytest.mark.gpu

A_GRANS = ("tensor", "row", "block")
B_GRANS = ("tensor", "channel", "block", "group")
KERNEL_TOL = 2e-3  # the requirement; faithful accumulation measures ~1.3e-4 on the H100 at any K


def _ref_gpu(a_q, a_s, a_gran, b_q, b_s, b_gran, bias=None):
    # float64 on the GPU: the CPU would take minutes at these sizes
    return gemm_ref(a_q, a_s, a_gran, b_q, b_s, b_gran, bias)


@pytest.mark.parametrize("a_gran", A_GRANS)
@pytest.mark.parametrize("b_gran", B_GRANS)
@pytest.mark.parametrize("m, n, k", [(1024, 1024, 16384), (64, 4096, 11264), (33, 2880, 4096), (4, 2880, 2880)])
def test_every_granularity_at_size(m, n, k, a_gran, b_gran):
    a_q, a_s, b_q, b_s = make_operands(m, n, k, a_gran, b_gran, "cuda", kmajor_b=True, seed=m + n)
    out = fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, out_dtype=torch.float32)
    err = assert_close_rel(out, _ref_gpu(a_q, a_s, a_gran, b_q, b_s, b_gran), KERNEL_TOL)
    assert err < 5e-4, f"faithful accumulation should stay near 1.3e-4, got {err:.2e}"


@pytest.mark.parametrize(
    "m, n, k",
    [(1, 4096, 4096), (16, 11264, 4096), (2048, 14336, 4096), (1024, 4096, 11264), (333, 2880, 1000),
     (4096, 4096, 4096), (16400, 2880, 2880)],
)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_required_sizes_bias_dtypes(m, n, k, out_dtype):
    a_q, a_s, b_q, b_s = make_operands(m, n, k, "row", "channel", "cuda", kmajor_b=True, seed=k)
    bias = (torch.randn(n, device="cuda") * 4).to(out_dtype)
    out = fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, out_dtype=out_dtype, bias=bias)
    assert out.dtype == out_dtype
    ref = _ref_gpu(a_q, a_s, "row", b_q, b_s, "channel", bias)
    # output rounding (bf16: ~1.1e-3 rms, fp16: ~1.4e-4) plus the kernel's own error
    assert_close_rel(out, ref, (4e-3 if out_dtype == torch.bfloat16 else 5e-4) + KERNEL_TOL / 4)


@pytest.mark.parametrize("kmajor", [True, False])
@pytest.mark.parametrize("grans", [("tensor", "tensor"), ("block", "block"), ("row", "group")])
def test_both_layouts_of_b(kmajor, grans):
    a_q, a_s, b_q, b_s = make_operands(512, 1024, 2048, *grans, "cuda", kmajor_b=kmajor, seed=7)
    out = fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, out_dtype=torch.float32)
    assert_close_rel(out, _ref_gpu(a_q, a_s, grans[0], b_q, b_s, grans[1]), KERNEL_TOL)


_MODES = {"tensor": gemm.A_TENSOR, "row": gemm.A_ROW, "block": gemm.A_BLOCK}


_B_MODES = {"group": gemm.B_GROUP, "block": gemm.B_BLOCK}


@pytest.mark.parametrize("grans", [("block", "group"), ("row", "group"), ("tensor", "group"), ("block", "block"),
                                   ("row", "block")])
@pytest.mark.parametrize("m, n, k", [(333, 2880, 1040), (2048, 4096, 4096), (129, 200, 4224), (64 + 1, 128, 128)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile", [None, {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 16, "STAGES": 3, "num_warps": 4},
                                  {"BLOCK_M": 256, "BLOCK_N": 128, "GROUP_M": 8, "STAGES": 4, "num_warps": 8},
                                  {"BLOCK_M": 256, "BLOCK_N": 128, "GROUP_M": 8, "STAGES": 4, "num_warps": 8,
                                   "A_REGS": True},
                                  {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "STAGES": 4, "num_warps": 4,
                                   "PINGPONG": True},
                                  {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "STAGES": 4, "num_warps": 4,
                                   "PINGPONG": True, "PERSISTENT": True}])
def test_the_wgmma_kernel_computes_what_the_triton_kernel_does(m, n, k, grans, out_dtype, tile):
    # Hopper: the Gluon kernel (scaling block i - 1 while block i's MMA runs, two K blocks an iteration) computes
    # what the Triton TMA kernel computes, at sizes no tile divides (K past a multiple of 128: an odd block count;
    # N = 200 < two 128-column tiles; one K block), with a bias; group weights and (asked for) 128x128 blocks
    if not gemm_wgmma.AVAILABLE or not torch.cuda.get_device_capability()[0] == 9:
        pytest.skip("the Gluon kernel is Hopper-only")
    a_q, a_s, b_q, b_s = make_operands(m, n, k, *grans, "cuda", kmajor_b=True, seed=m + k)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=out_dtype)
    a_mode, b_mode = _MODES[grans[0]], _B_MODES[grans[1]]
    info = gemm._launch(a_q, b_q, out, a_s, b_s, bias, a_mode, b_mode, False, "wgmma" if grans[1] == "block" else None,
                        tile)
    assert info["path"] == "wgmma"
    triton_out = torch.full_like(out, float("nan"))
    gemm._launch(a_q, b_q, triton_out, a_s, b_s, bias, a_mode, b_mode, False, "tma")
    ref = _ref_gpu(a_q, a_s, grans[0], b_q, b_s, grans[1], bias)
    assert_close_rel(out, ref, KERNEL_TOL if out_dtype == torch.float32 else 4e-3 + KERNEL_TOL / 4)
    # the same partial products, scaled and added in the same order: equal up to fp32 contraction
    assert relative_error(out, triton_out) < (1e-6 if out_dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("grans", [("row", "channel"), ("block", "channel"), ("tensor", "tensor")])
@pytest.mark.parametrize("m, n, k", [(333, 2880, 1040), (2048, 4096, 4096), (129, 200, 4224)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile", [None, {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 16, "STAGES": 4, "num_warps": 4,
                                         "PINGPONG": True}])
def test_the_ping_pong_kernel_takes_per_channel_and_per_tensor_weights(m, n, k, grans, out_dtype, tile):
    # Hopper: per-channel and per-tensor weights (path="wgmma": the ping-pong kernel, persistent by default) compute
    # what the Triton TMA kernel's faithful accumulation computes: the same fresh partial per 128-deep K block,
    # added in fp32, the weight scales in the epilogue; with a bias, at sizes no tile divides
    if not gemm_wgmma.AVAILABLE or not torch.cuda.get_device_capability()[0] == 9:
        pytest.skip("the Gluon kernel is Hopper-only")
    a_q, a_s, b_q, b_s = make_operands(m, n, k, *grans, "cuda", kmajor_b=True, seed=m + k + 1)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=out_dtype)
    a_mode, b_mode = _MODES[grans[0]], {"channel": gemm.B_CHANNEL, "tensor": gemm.B_TENSOR}[grans[1]]
    info = gemm._launch(a_q, b_q, out, a_s, b_s, bias, a_mode, b_mode, False, "wgmma", tile)
    assert info["path"] == "wgmma" and info["PINGPONG"]
    triton_out = torch.full_like(out, float("nan"))
    gemm._launch(a_q, b_q, triton_out, a_s, b_s, bias, a_mode, b_mode, False, "tma")
    ref = _ref_gpu(a_q, a_s, grans[0], b_q, b_s, grans[1], bias)
    assert_close_rel(out, ref, KERNEL_TOL if out_dtype == torch.float32 else 4e-3 + KERNEL_TOL / 4)
    # (the Triton kernel promotes through max_num_imprecise_acc: the same 128-deep partials, another fp32 order)
    assert relative_error(out, triton_out) < (1e-4 if out_dtype == torch.float32 else 4e-3)


def test_block_scales_take_the_gluon_kernel_only_when_routed_there(monkeypatch):
    if not gemm_wgmma.AVAILABLE or not torch.cuda.get_device_capability()[0] == 9:
        pytest.skip("the Gluon kernel is Hopper-only")
    a_q, a_s, b_q, b_s = make_operands(256, 512, 1024, "block", "block", "cuda", kmajor_b=True, seed=5)
    out = torch.empty(256, 512, device="cuda", dtype=torch.float32)
    monkeypatch.setattr(gemm, "WGMMA_BLOCK_SCALES", False)
    gemm.clear_caches()
    assert gemm._launch(a_q, b_q, out, a_s, b_s, None, gemm.A_BLOCK, gemm.B_BLOCK, False)["path"] == "tma"
    monkeypatch.setattr(gemm, "WGMMA_BLOCK_SCALES", True)
    gemm.clear_caches()
    assert gemm._launch(a_q, b_q, out, a_s, b_s, None, gemm.A_BLOCK, gemm.B_BLOCK, False)["path"] == "wgmma"
    with pytest.raises(ValueError, match="divide 128"):
        gemm._launch(a_q, b_q, out, a_s, b_s, None, gemm.A_BLOCK, gemm.B_BLOCK, False, "wgmma",
                     {"BLOCK_M": 64, "BLOCK_N": 256, "GROUP_M": 8, "STAGES": 3, "num_warps": 4})
    gemm.clear_caches()


def test_wgmma_kernel_keeps_nan_in_its_row():
    if not gemm_wgmma.AVAILABLE or not torch.cuda.get_device_capability()[0] == 9:
        pytest.skip("the Gluon kernel is Hopper-only")
    a_q, a_s, b_q, b_s = make_operands(256, 512, 1024, "block", "group", "cuda", kmajor_b=True, seed=3)
    a_q[17, 300] = float("nan")
    out = fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, out_dtype=torch.float32)
    assert out[17].isnan().all()
    rest = torch.cat([out[:17], out[18:]])
    assert rest.isfinite().all()
    ref = _ref_gpu(a_q, a_s, "block", b_q, b_s, "group")
    assert_close_rel(rest, torch.cat([ref[:17], ref[18:]]), KERNEL_TOL)


def test_faithful_vs_fast_accumulation_error():
    # At K = 16384 the tensor core's running sum drifts (~3e-3 on the H100); faithful stays at ~1.3e-4.
    a_q, a_s, b_q, b_s = make_operands(1024, 1024, 16384, "tensor", "tensor", "cuda", kmajor_b=True, seed=1)
    ref = _ref_gpu(a_q, a_s, "tensor", b_q, b_s, "tensor")
    faithful = relative_error(fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, out_dtype=torch.float32), ref)
    fast = relative_error(fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, out_dtype=torch.float32,
                                   fast_accum=True), ref)
    assert faithful < 3e-4
    assert faithful < fast < 1e-2


@pytest.mark.parametrize("m", [1, 16, 64])
def test_decode_faithful_at_long_k(m):
    a_q, a_s, b_q, b_s = make_operands(m, 4096, 11264, "row", "channel", "cuda", kmajor_b=True, seed=m)
    out = torch.empty(m, 4096, device="cuda", dtype=torch.float32)
    assert _pick_path(a_q, b_q, out, m) == "decode"
    out = fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, out_dtype=torch.float32)
    assert_close_rel(out, _ref_gpu(a_q, a_s, "row", b_q, b_s, "channel"), 3e-4)


def test_readme_example_auto_quantized():
    torch.manual_seed(0)
    a = torch.randn(1024, 4096, device="cuda")
    b = torch.randn(4096, 4096, device="cuda")
    out = fp8_gemm(a, b)
    assert out.shape == (1024, 4096) and out.dtype == torch.bfloat16
    # E4M3 with per-row / per-channel scales: a few percent from the exact product, never more
    assert relative_error(out, a.double() @ b.double()) < 0.06


def test_decode_split_k_on_two_streams_at_once():
    # Split-K partials and arrival counters are per (device, stream): two streams running the same decode
    # GEMM at the same time must not mix their partial sums.
    from fp8_gemm.gemm import _launch

    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 4, "num_warps": 4, "num_stages": 3}
    ops = [make_operands(8, 4096, 8192, "tensor", "channel", "cuda", kmajor_b=True, seed=s) for s in (1, 2)]
    refs = [_ref_gpu(a_q, a_s, "tensor", b_q, b_s, "channel") for a_q, a_s, b_q, b_s in ops]
    outs = [torch.empty(8, 4096, device="cuda") for _ in ops]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(20):
        for (a_q, a_s, b_q, b_s), out, stream in zip(ops, outs, streams):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                _launch(a_q, b_q, out, a_s.reshape(-1), b_s.reshape(-1), None, 0, 1, False, "decode", cfg)
        torch.cuda.synchronize()
        for out, ref in zip(outs, refs):
            assert_close_rel(out, ref, 3e-4)


def test_decode_cuda_graph_replay():
    a_q, a_s, b_q, b_s = make_operands(16, 11264, 4096, "row", "channel", "cuda", kmajor_b=True, seed=5)
    fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, out_dtype=torch.float32)  # validates and compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, out_dtype=torch.float32)
    for seed in range(3):
        a_new, a_s_new, _, _ = make_operands(16, 11264, 4096, "row", "channel", "cuda", kmajor_b=True, seed=seed)
        a_q.copy_(a_new)
        a_s.copy_(a_s_new)
        graph.replay()
        torch.cuda.synchronize()
        assert_close_rel(out, _ref_gpu(a_q, a_s, "row", b_q, b_s, "channel"), 3e-4)
