"""The weight-only (W8A16) decode path of fp8_linear / FP8Linear (fp8_gemm.weight_only), under the interpreter.

Against a float64 reference ``x @ dequant(W)^T + b`` for every weight scale mode (tensor, channel, 128x128 blocks),
M in 1..16, N and K that are neither multiples of the tiles nor of 128, with and without bias, fp16/bf16/fp32
activations; NaN propagation; routing and the forced paths; parity with the W8A8 path within FP8's activation
quantization error; the registered op (opcheck, torch.compile aot_eager equal to eager, no recompilation per M);
split-K scratch buffers (zero at rest, per-call buffers); validation errors.

The E4M3 weights are cast with torch on the host (the interpreter's in-kernel FP8 casts are wrong; loading FP8 and
converting it up is right, apart from the NaN pattern, which the kernel restores under the interpreter).
"""

from __future__ import annotations

import pytest
import torch
from fp8_gemm import FP8Linear, clear_caches, fp8_linear
from fp8_gemm import linear as linear_mod
from fp8_gemm import weight_only as wo
from fp8_gemm.quantize import expand_scale
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from triton_ops_core import scratch as _scratch
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.testing import (
    TENSOR_MUTATIONS,
    assert_close_rel,
    count_compiles,
    device_for_tests,
    mutate,
    named_error_or_result,
    opcheck_op,
)

FP8 = torch.float8_e4m3fn
DEV = device_for_tests()


# The output's rounding only (the interpreter truncates fp32 -> bf16: up to 2**-8 per element), with margin. fp32:
# the product with the dequantized weight up to fp32 accumulation; the W8A8 path's activation quantization would
# cost ~3e-2 on this data.
TOL = {torch.float32: 2e-6, torch.float16: 1.5e-3, torch.bfloat16: 8e-3}
MODES = ("tensor", "channel", "block", "group")


def _weight(n: int, k: int, mode: str, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An E4M3 ``[N, K]`` weight (torch's cast, values from subnormals to 448) and a random positive scale of
    ``mode`` in the GEMM's ``[K, N]`` convention."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 64
    w[:, ::7] *= 2.0**-9  # some subnormal E4M3 values
    q = w.clamp(-448, 448).to(FP8)
    shape = {"tensor": (1,), "channel": (1, n), "block": (-(-k // 128), -(-n // 128)), "group": (-(-k // 128), n)}[mode]
    scale = torch.rand(shape, generator=g) * 0.02 + 0.001
    return q.to(device), scale.to(device)


def _activation(m: int, k: int, dtype, device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # rows of different magnitudes (each row's own scale in the W8A8 path; here they must not interact)
    return (torch.randn(m, k, generator=g) * torch.logspace(-1, 1, m)[:, None]).to(device=device, dtype=dtype)


def _reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = q.shape
    w = q.double() * expand_scale(scale, (k, n)).double().t()  # the dequantized [N, K] weight
    out = x.double().reshape(-1, k) @ w.t()
    if bias is not None:
        out = out + bias.double()
    return out.reshape(*x.shape[:-1], n)


def _plans() -> list[tuple]:
    return list(linear_mod._PLANS._plans.values())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 16])
def test_matches_float64_reference(mode, dtype, m):
    # N = 150: two 128-wide scale blocks, the second partial; K = 200: the same along K; neither is a multiple of
    # the interpreter's 16 x 32 tiles
    q, s = _weight(150, 200, mode, DEV, seed=m)
    bias = (torch.randn(150) * 3).to(device=DEV, dtype=dtype)
    x = _activation(m, 200, dtype, DEV, seed=m + 1)
    clear_caches()
    out = fp8_linear(x, q, s, bias)
    assert out.dtype == dtype and out.shape == (m, 150)
    assert [p[0] is not None for p in _plans()] == [True]  # the weight-only plan served the call
    assert_close_rel(out, _reference(x, q, s, bias), TOL[dtype], f"{mode} {dtype} M={m}")


@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 16), n=st.integers(1, 70), k=st.integers(1, 300), mode=st.sampled_from(MODES),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_any_decode_shape(m, n, k, mode, dtype, bias, seed):
    q, s = _weight(n, k, mode, DEV, seed)
    b = torch.randn(n, device=DEV).to(dtype) if bias else None
    x = _activation(m, k, dtype, DEV, seed + 1)
    out = fp8_linear(x, q, s, b)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close_rel(out, _reference(x, q, s, b), TOL[dtype], f"M={m} N={n} K={k} {mode} {dtype} bias={bias}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("config", "m", "dtype"),
    [
        ({"USE_DOT": True, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1}, 3, torch.float16),
        ({"USE_DOT": True, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 3}, 2, torch.bfloat16),  # uneven
        # FMA: a K tile across two scale blocks; two row tiles with split K
        ({"USE_DOT": False, "BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 1}, 1, torch.bfloat16),
        ({"USE_DOT": False, "BLOCK_M": 4, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2}, 5, torch.float32),
        # FMA: a K tile of four scale groups (the decode tile's 512), the last partial
        ({"USE_DOT": False, "BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 512, "SPLIT_K": 1}, 1, torch.bfloat16),
    ],
)
def test_kernel_variants(mode, config, m, dtype):
    cfg = {**config, "num_warps": 4, "num_stages": 1}
    q, s = _weight(40, 300, mode, DEV, seed=3)
    bias = torch.randn(40, device=DEV).to(dtype)
    x = _activation(m, 300, dtype, DEV, seed=4)
    out = wo.weight_only_linear(x, q, s, bias, config=cfg)
    assert_close_rel(out, _reference(x, q, s, bias), TOL[dtype], f"{config} {dtype}")


F16_DOT = {"USE_DOT": True, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 4,
           "num_stages": 1, "F16_DOT": True}


@pytest.mark.parametrize("mode", MODES)
def test_f16_dot_matches_the_reference_row_by_row(mode):
    # fp16 tensor-core dots: bf16 rows spanning 2^-20 .. 2^20 (each scaled into fp16's range by its own power of
    # two), split K, a bias; a row far below one, an all-zero row
    q, s = _weight(40, 300, mode, DEV, seed=5)
    bias = torch.randn(40, device=DEV).to(torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    rows = torch.cat([2.0 ** torch.linspace(-20, 20, 10), torch.tensor([2.0**-115, 0.0])])[:, None]
    x = (torch.randn(12, 300, generator=g) * rows).to(DEV, torch.bfloat16)
    out = wo.weight_only_linear(x, q, s, bias, config=F16_DOT)
    want = _reference(x, q, s, bias)
    for r in range(12):
        assert_close_rel(out[r], want[r], TOL[torch.bfloat16], f"{mode} row {r}")


def test_f16_dot_keeps_nan_and_inf_in_their_rows_and_is_for_bf16_only():
    q, s = _weight(40, 300, "channel", DEV, seed=7)
    x = _activation(4, 300, torch.bfloat16, DEV, seed=8)
    x[1, 7] = float("nan")
    x[2, 9] = float("inf")
    out = wo.weight_only_linear(x, q, s, None, config=F16_DOT)
    assert out[1].isnan().all() and not out[2].isfinite().any()
    assert_close_rel(out[[0, 3]], _reference(x[[0, 3]], q, s, None), TOL[torch.bfloat16], "finite rows")
    # fp16 / fp32 activations, 16-bit weights: the flag is not passed to the kernel
    for dtype in (torch.float16, torch.float32):
        plan = wo.build_plan(x.to(dtype), q, s, None, config=F16_DOT)
        assert _constexpr(plan, "F16_DOT") is False
    plan = wo.build_plan(x, q, s, None, config=F16_DOT)
    assert _constexpr(plan, "F16_DOT") is True


def _constexpr(plan, name: str):
    """A scalar argument of a weight-only plan's launch, by the kernel's parameter name (the tail follows the twelve
    tensors)."""
    names = wo.fp8_weight_only_kernel.arg_names
    return plan.launch.tail[names.index(name) - 12]


@pytest.mark.parametrize("mode", ["channel", "group"])
def test_norm_prologue_in_front_of_fp8_weights(mode):
    # the deferred RMSNorm before E4M3 weights on the FMA variant, split K and a partial last group
    q, s = _weight(40, 300, mode, DEV, seed=12)
    x = _activation(1, 300, torch.float32, DEV, seed=13) * 3.0 + 0.5
    nw = (torch.rand(300, generator=torch.Generator().manual_seed(14)) + 0.5).to(DEV)
    cfg = {"USE_DOT": False, "BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 2, "num_warps": 4,
           "num_stages": 1}
    plan = wo.build_plan(x, q, s, None, config=cfg, norm_weight=nw, norm_eps=1e-5)
    out = plan.run(x, q, s, None, norm_weight=nw)
    xn = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
    assert_close_rel(out, _reference(xn, q, s, None), TOL[torch.float32], mode)


def test_group_scales_past_k_are_never_read():
    # K = 300: the FMA tile of 512 spans groups 0-3 of which 3 lies past K; the scale is a view into a buffer whose
    # next row is NaN, so reading it would poison the output (0 * NaN)
    q, s = _weight(40, 300, "group", DEV, seed=9)
    padded = torch.full((s.shape[0] + 2, s.shape[1]), float("nan"), device=DEV)
    padded[: s.shape[0]] = s
    s_view = padded[: s.shape[0]]
    x = _activation(1, 300, torch.bfloat16, DEV, seed=10)
    for cfg in ({"USE_DOT": False, "BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 512, "SPLIT_K": 1},
                {"USE_DOT": False, "BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 1}):
        out = wo.weight_only_linear(x, q, s_view, config={**cfg, "num_warps": 4, "num_stages": 1})
        assert_close_rel(out, _reference(x, q, s, None), TOL[torch.bfloat16], f"{cfg}")


def test_k_and_n_multiples_of_the_tiles_and_strided_inputs():
    # EVEN_K and EVEN_N (no weight masks); then x with a non-unit K stride, a weight view with a row stride
    q, s = _weight(64, 256, "block", DEV, seed=5)
    x = _activation(3, 256, torch.float32, DEV)
    assert_close_rel(wo.weight_only_linear(x, q, s), _reference(x, q, s, None), TOL[torch.float32], "even")
    x_t = x.t().contiguous().t()  # strides (1, 3)
    assert x_t.stride(1) != 1
    assert_close_rel(wo.weight_only_linear(x_t, q, s), _reference(x, q, s, None), TOL[torch.float32], "x strided")
    big = torch.zeros(64, 300, dtype=torch.uint8, device=DEV).view(FP8)
    big[:, :256] = q
    q_view = big[:, :256]  # row stride 300
    assert_close_rel(wo.weight_only_linear(x, q_view, s), _reference(x, q, s, None), TOL[torch.float32], "w view")
    s_t = s.t().contiguous().t()  # a column-major block scale
    assert_close_rel(wo.weight_only_linear(x, q, s_t), _reference(x, q, s, None), TOL[torch.float32], "scale view")


def test_nan_propagates_to_its_row_and_column_only():
    q, s = _weight(40, 96, "channel", DEV, seed=6)
    q.view(torch.uint8)[7, 11] = 0x7F  # an E4M3 NaN in output feature 7
    x = _activation(4, 96, torch.bfloat16, DEV, seed=7)
    x[2, 5] = float("nan")
    out = fp8_linear(x, q, s, None)
    assert out[2].isnan().all() and out[:, 7].isnan().all()
    keep_rows, keep_cols = [0, 1, 3], [c for c in range(40) if c != 7]
    assert torch.isfinite(out[keep_rows][:, keep_cols]).all()
    # a NaN at the negative pattern 0xFF, on the FMA variant too
    q.view(torch.uint8)[7, 11] = 0xFF
    cfg = {"USE_DOT": False, "BLOCK_M": 4, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2, "num_warps": 4, "num_stages": 1}
    out = wo.weight_only_linear(x, q, s, config=cfg)
    assert out[2].isnan().all() and out[:, 7].isnan().all()
    assert torch.isfinite(out[keep_rows][:, keep_cols]).all()


@pytest.mark.parametrize("mode", MODES)
def test_forced_paths_agree_within_activation_quantization(mode):
    torch.manual_seed(0)
    lin = nn.Linear(200, 72, device=DEV)
    mod = FP8Linear.from_linear(lin, weight_granularity=mode, activation_granularity="row")
    x = torch.randn(2, 3, 200, device=DEV)
    ref = _reference(x, mod.weight, mod.weight_scale, mod.bias)
    out_auto = mod(x)
    mod.path = "w8a8"
    out_w8a8 = mod(x)
    mod.path = "weight_only"
    out_forced = mod(x)
    assert torch.equal(out_auto, out_forced)
    err_wo = assert_close_rel(out_auto, ref, TOL[torch.float32], "weight-only")
    # E4M3 rounds each activation by up to 2**-4 relative: the W8A8 result is a few percent off, not more
    err_w8a8 = assert_close_rel(out_w8a8, ref, 0.06, "w8a8")
    assert err_w8a8 > 100 * err_wo, (err_w8a8, err_wo)
    assert_close_rel(out_auto, out_w8a8, 0.06, "weight-only vs w8a8")
    assert "path='weight_only'" in repr(mod)


def test_routing_by_row_count_and_the_path_argument():
    torch.manual_seed(1)
    mod = FP8Linear.from_linear(nn.Linear(64, 40, device=DEV), weight_granularity="block",
                                activation_granularity="block")
    clear_caches()
    for m in (1, wo.WEIGHT_ONLY_MAX_M, wo.WEIGHT_ONLY_MAX_M + 1):
        mod(torch.randn(m, 64, device=DEV))
    assert [p[0] is not None for p in _plans()] == [True, True, False]
    x = torch.randn(wo.WEIGHT_ONLY_MAX_M + 5, 64, device=DEV)
    forced = fp8_linear(x, mod.weight, mod.weight_scale, mod.bias, "block", False, "weight_only")
    assert _plans()[-1][0] is not None
    assert_close_rel(forced, _reference(x, mod.weight, mod.weight_scale, mod.bias), TOL[torch.float32], "forced")
    fp8_linear(x[:2], mod.weight, mod.weight_scale, mod.bias, "block", False, "w8a8")
    assert _plans()[-1][0] is None
    with pytest.raises(InvalidArgumentError, match="path"):
        fp8_linear(x, mod.weight, mod.weight_scale, mod.bias, "block", False, "fast")
    clear_caches()


def test_plan_is_reused_and_follows_new_weights(monkeypatch):
    calls = []
    real = linear_mod.build_plan
    monkeypatch.setattr(linear_mod, "build_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(2)
    mod = FP8Linear.from_linear(nn.Linear(96, 48, device=DEV))
    clear_caches()
    x = torch.randn(1, 96, device=DEV)
    for _ in range(3):
        assert_close_rel(mod(x), _reference(x, mod.weight, mod.weight_scale, mod.bias), TOL[torch.float32])
    mod.load_weight(torch.randn(48, 96, device=DEV))  # new values, same layout: the plan stays valid
    assert_close_rel(mod(x), _reference(x, mod.weight, mod.weight_scale, mod.bias), TOL[torch.float32], "new w")
    assert len(calls) == 1
    mod(torch.randn(1, 1, 96, device=DEV))  # a new signature (3-D): one more plan
    assert len(calls) == 2


def test_split_k_is_deterministic_and_leaves_counters_at_zero():
    q, s = _weight(48, 256, "channel", DEV, seed=8)
    x = _activation(3, 256, torch.float32, DEV)
    cfg = {"USE_DOT": True, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 4, "num_warps": 4,
           "num_stages": 1}
    _scratch.clear()
    first = wo.weight_only_linear(x, q, s, config=cfg)
    assert torch.equal(first, wo.weight_only_linear(x, q, s, config=cfg))
    (cnt,) = [b for key, b in _scratch._BUFFERS.items() if key[0] == wo._COUNTERS]
    (ws,) = [b for key, b in _scratch._BUFFERS.items() if key[0] == wo._PARTIALS]
    # the counters (one per column block) are zero at rest: the next call and graph replays need it
    assert not cnt.any()
    # the [split, M, N] partials were written and sum to the output (the rest of the buffer is uninitialized)
    partials = ws[: 4 * 3 * 48].view(4, 3, 48)
    assert torch.isfinite(partials).all()
    assert_close_rel(partials.sum(0) * s.reshape(1, -1).float(), first, TOL[torch.float32], "partials")
    with _scratch.per_call():  # registered-op calls and graph captures: a buffer of their own
        assert torch.equal(first, wo.weight_only_linear(x, q, s, config=cfg))
    assert len([key for key in _scratch._BUFFERS if key[0] in (wo._COUNTERS, wo._PARTIALS)]) == 2


def test_split_k_after_a_call_with_fewer_column_blocks():
    """A split-K call with more column blocks than the one before: its counters must be zero, not the earlier
    call's partial sums (one shared counters-and-partials buffer gave wrong outputs on the H200 this way)."""
    cfg = {"USE_DOT": True, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}
    _scratch.clear()
    # 1 column block with 8 K slices of 16 rows (many partials), then 20 column blocks with 2 slices of 2 rows
    for m, n, split in ((16, 32, 8), (2, 640, 2)):
        q, s = _weight(n, 512, "channel", DEV, seed=n)
        x = _activation(m, 512, torch.float32, DEV)
        out = wo.weight_only_linear(x, q, s, config={**cfg, "SPLIT_K": split})
        assert_close_rel(out, _reference(x, q, s, None), TOL[torch.float32], f"M={m} N={n}")


def test_empty_and_zero_k():
    q, s = _weight(24, 64, "channel", DEV)
    bias = torch.randn(24, device=DEV)
    assert fp8_linear(torch.randn(0, 64, device=DEV), q, s, bias).shape == (0, 24)
    assert fp8_linear(torch.randn(2, 0, 64, device=DEV), q, s, bias).shape == (2, 0, 24)
    q0 = torch.zeros(24, 0, dtype=torch.uint8, device=DEV).view(FP8)
    out = wo.weight_only_linear(torch.randn(3, 0, device=DEV), q0, torch.ones(1, device=DEV), bias)
    assert torch.equal(out, bias.expand(3, 24))
    assert not wo.weight_only_linear(torch.randn(3, 0, device=DEV), q0, torch.ones(1, device=DEV)).any()


def test_validation_errors():
    q, s = _weight(24, 200, "block", DEV)  # block scale [2, 1]
    x = torch.randn(2, 200, device=DEV)
    with pytest.raises(UnsupportedDtypeError, match="weight"):
        wo.weight_only_linear(x, q.float(), s)
    with pytest.raises(ShapeMismatchError, match="weight_scale"):
        wo.weight_only_linear(x, q, torch.ones(2, 2, device=DEV))
    with pytest.raises(ShapeMismatchError, match="bias"):
        wo.weight_only_linear(x, q, s, torch.zeros(23, device=DEV))
    with pytest.raises(ShapeMismatchError, match="x: expected last dimension 200"):
        wo.weight_only_linear(torch.randn(2, 63, device=DEV), q, s)
    with pytest.raises(UnsupportedDtypeError, match="x"):
        wo.weight_only_linear(x.to(torch.int32), q, s)
    bad = {"USE_DOT": True, "BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4,
           "num_stages": 1}
    with pytest.raises(InvalidArgumentError, match="scale block"):
        wo.weight_only_linear(x, q, s, config=bad)
    with pytest.raises(InvalidArgumentError, match="BLOCK_K must be a power of two"):
        wo.weight_only_linear(x, q, s, config={**bad, "BLOCK_N": 16, "BLOCK_K": 48})
    with pytest.raises(InvalidArgumentError, match="missing"):
        wo.weight_only_linear(x, q, s, config={"USE_DOT": True})


@pytest.mark.parametrize(("mode", "requires_grad"), [("channel", True), ("block", False), ("tensor", False)])
def test_opcheck(mode, requires_grad):
    q, s = _weight(40, 160, mode, DEV, seed=9)
    bias = torch.randn(40, device=DEV, dtype=torch.bfloat16)
    x = _activation(3, 160, torch.bfloat16, DEV).reshape(1, 3, 160).requires_grad_(requires_grad)
    opcheck_op(torch.ops.triton_ops.fp8_linear.default, (x, q, s, bias, "row", False, "auto"))
    if not requires_grad:
        opcheck_op(torch.ops.triton_ops.fp8_linear.default, (x, q, s, None, "block", False, "weight_only"))


def test_compiled_equals_eager_without_recompiling_per_row_count():
    torch.manual_seed(3)
    mod = FP8Linear.from_linear(nn.Linear(64, 40, device=DEV, dtype=torch.bfloat16), weight_granularity="block",
                                activation_granularity="block")
    with torch.no_grad():
        x = torch.randn(2, 1, 64, device=DEV, dtype=torch.bfloat16)
        assert torch.equal(torch.compile(mod, fullgraph=True, backend="aot_eager")(x), mod(x))
        fn = torch.compile(mod, fullgraph=True, dynamic=True, backend="aot_eager")
        x = torch.randn(2, 1, 64, device=DEV, dtype=torch.bfloat16)
        assert torch.equal(fn(x), mod(x))  # the one dynamic graph (Dynamo specializes a size of 1 on its own)
        with count_compiles() as compiles:
            for m in (3, 7, 16, 17):  # the row count is decided inside the op: no recompilation
                x = torch.randn(m, 1, 64, device=DEV, dtype=torch.bfloat16)
                assert torch.equal(fn(x), mod(x))
        assert compiles["frames"] == 0, compiles


def test_gradient_of_a_decode_call():
    torch.manual_seed(4)
    mod = FP8Linear.from_linear(nn.Linear(64, 24, device=DEV), weight_granularity="tensor")
    mod.bias.requires_grad_(True)
    x = torch.randn(1, 64, device=DEV, requires_grad=True)
    g = torch.randn(1, 24, device=DEV)
    out = mod(x)
    assert_close_rel(out.detach(), _reference(x.detach(), mod.weight, mod.weight_scale, mod.bias), 2e-6)
    out.backward(g)
    w = mod.dequantized_weight(torch.float64)
    assert_close_rel(x.grad, g.double() @ w, 1e-6, "dx")
    assert_close_rel(mod.bias.grad, g.double().sum(0), 1e-6, "dbias")


@settings(max_examples=30, deadline=None)
@given(which=st.integers(0, 3), how=st.sampled_from(TENSOR_MUTATIONS), mode=st.sampled_from(MODES))
def test_spoiled_arguments_give_named_errors(which, how, mode):
    q, s = _weight(40, 160, mode, DEV, seed=10)
    args = [_activation(2, 160, torch.bfloat16, DEV), q, s, torch.randn(40, device=DEV)]
    args[which] = mutate(args[which], how)
    named_error_or_result(fp8_linear, *args)


def test_auto_takes_the_weight_only_kernel_unless_it_is_switched_off(monkeypatch):
    assert wo.AUTO_WEIGHT_ONLY and wo.use_weight_only("auto", 16) and not wo.use_weight_only("auto", 17)
    monkeypatch.setattr(wo, "AUTO_WEIGHT_ONLY", False)
    assert not wo.use_weight_only("auto", 1) and wo.use_weight_only("weight_only", 1)
    assert not wo.use_weight_only("w8a8", 1)


def test_gpu_heuristic_one_16_bit_row_takes_the_fma_tiles_the_h200_measured():
    from fp8_gemm.weight_only_kernels import SCALE_BLOCK, SCALE_CHANNEL

    for mode in (SCALE_CHANNEL, SCALE_BLOCK):
        for n, k in ((4096, 4096), (1024, 4096), (4096, 14336), (128256, 4096)):
            cfg = wo.weight_only_config(1, n, k, mode, 2, 132, False)
            assert cfg["USE_DOT"] is False and (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) == (1, 16, 512)
            assert cfg["SPLIT_K"] == 1 and cfg["num_stages"] == 4
            wo._check_config(dict(cfg), mode)
            # two rows and more: the tensor cores, one 16-row tile
            two = wo.weight_only_config(2, n, k, mode, 2, 132, False)
            assert two["USE_DOT"] is True and two["BLOCK_M"] == 16
    # fp32 activations keep the FMA variant up to 4 rows
    assert wo.weight_only_config(4, 4096, 4096, SCALE_CHANNEL, 4, 132, False)["USE_DOT"] is False


def test_gpu_heuristic_2_to_16_rows_of_e4m3_take_fp16_dots():
    from fp8_gemm.weight_only_kernels import SCALE_BLOCK, SCALE_CHANNEL, SCALE_GROUP, SCALE_NONE

    def tile(m, n, k, mode, x_bytes=2):
        cfg = wo.weight_only_config(m, n, k, mode, x_bytes, 132, False)
        wo._check_config(dict(cfg), mode)
        return cfg.get("F16_DOT", False), cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"], cfg["num_warps"]

    for m in (2, 8, 16):
        # Llama-3-8B's q/k/v and o: 64 x 128, K split in 4; down with channel scales 128 x 256, 8 warps
        assert tile(m, 6144, 4096, SCALE_CHANNEL) == (True, 64, 128, 4, 4)
        assert tile(m, 4096, 4096, SCALE_GROUP) == (True, 64, 128, 4, 4)
        assert tile(m, 4096, 14336, SCALE_CHANNEL) == (True, 128, 256, 4, 8)
        assert tile(m, 4096, 14336, SCALE_GROUP) == (True, 64, 128, 4, 4)
        assert tile(m, 4096, 14336, SCALE_BLOCK)[:3] == (True, 64, 128)
        # enough column blocks: no split (an FP8 lm_head)
        assert tile(m, 128256, 4096, SCALE_CHANNEL)[3] == 1
        # fp32 activations and 16-bit weights keep their rules
        assert not tile(m, 6144, 4096, SCALE_NONE)[0]
    assert not tile(8, 6144, 4096, SCALE_CHANNEL, x_bytes=4)[0]


def test_auto_routes_decode_rows_by_the_measured_rule():
    from fp8_gemm.weight_only_kernels import SCALE_GROUP

    small = torch.empty(1024, 4096, dtype=FP8, device="meta")  # 2**22 elements
    big = torch.empty(14336, 4096, dtype=FP8, device="meta")
    channel, blocks = torch.ones(1, 14336, device="meta"), torch.ones(32, 112, device="meta")
    assert wo.use_weight_only("auto", 16, small, torch.ones(1, 1024, device="meta"))
    assert all(wo.use_weight_only("auto", m, big, channel) for m in (1, 2, 16))
    # fp32 activations (an IEEE dot of CUDA-core work): several rows of a large weight keep the W8A8 path
    assert wo.use_weight_only("auto", 1, big, channel, 4) and not wo.use_weight_only("auto", 2, big, channel, 4)
    # 128x128 block scales: every 16-bit decode row on the weight-only kernel, the MLP's 58.7M-element weights
    # included (session 44: faster on the H100, a tie on the H200, and no activation quantization)
    qkv, qkv_blocks = torch.empty(6144, 4096, dtype=FP8, device="meta"), torch.ones(32, 48, device="meta")
    assert all(wo.use_weight_only("auto", m, big, blocks) for m in (1, 2, 8, 16))
    assert not wo.use_weight_only("auto", 17, big, blocks)
    assert all(wo.use_weight_only("auto", m, qkv, qkv_blocks) for m in (1, 4, 16))
    # fp32 activations: several rows of a weight past 2**24 elements stay W8A8, one row or a small weight do not
    assert not wo.use_weight_only("auto", 4, big, blocks, 4) and wo.use_weight_only("auto", 1, big, blocks, 4)
    assert not wo.use_weight_only("auto", 4, qkv, qkv_blocks, 4)
    assert wo.use_weight_only("auto", 4, small, torch.ones(32, 8, device="meta"), 4)
    assert wo.use_weight_only("weight_only", 64, big, blocks) and not wo.use_weight_only("w8a8", 1, small, None)
    groups = torch.ones(32, 14336, device="meta")  # group scales: weight-only at every decode M
    assert all(wo.use_weight_only("auto", m, big, groups) for m in (1, 2, 16)) and not wo.use_weight_only("auto", 17,
                                                                                                        big, groups)
    one_row = wo.weight_only_config(1, 14336, 4096, SCALE_GROUP, 2, 132, False)
    assert one_row["USE_DOT"] is False and (one_row["BLOCK_N"], one_row["BLOCK_K"]) == (16, 512)
    assert wo.weight_only_config(8, 14336, 4096, SCALE_GROUP, 2, 132, False)["BLOCK_K"] == 128  # a dot per group


@pytest.mark.parametrize("on", [False, True])
def test_pdl_plans_launch_early_and_prefetch_two_k_tiles(monkeypatch, on):
    """With programmatic dependent launch on for the device (triton_ops_core.pdl), a plan launches early and its
    programs prefetch two K tiles of their weight rows (a power of two of 128-byte lines); a weight whose K is not
    contiguous prefetches nothing; off, nothing changes. Plans only: the interpreter runs no grid-dependency PTX."""
    from triton_ops_core import pdl

    monkeypatch.setattr(pdl, "enabled", lambda device: on)
    x = _activation(1, 1024, torch.bfloat16, DEV)
    w = torch.randn(64, 1024, dtype=torch.bfloat16, device=DEV)
    plan = wo.build_plan(x, w, None, None)
    assert _constexpr(plan, "PDL") is on
    assert plan.launch.options.get("launch_pdl", False) is on
    _check_prefetch(plan, 2, on)
    q, s = _weight(64, 1024, "channel", DEV)
    _check_prefetch(wo.build_plan(x, q, s, None), 1, on)
    transposed = torch.randn(1024, 64, dtype=torch.bfloat16, device=DEV).t()  # K strided
    plan = wo.build_plan(x, transposed, None, None)
    assert _constexpr(plan, "PDL") is on and _constexpr(plan, "PREFETCH_LINES") == 0


def _check_prefetch(plan, weight_bytes: int, on: bool) -> None:
    """PREFETCH_LINES: 0 without PDL; else a power of two of 128-byte lines that covers the program's first two K
    tiles (or its whole K range, if shorter) of a weight row, and less than twice that."""
    lines = _constexpr(plan, "PREFETCH_LINES")
    if not on:
        assert lines == 0
        return
    want = min(wo.PREFETCH_TILES, _constexpr(plan, "tiles_per_split")) * plan.config["BLOCK_K"] * weight_bytes
    assert lines & (lines - 1) == 0 and lines * 128 >= want and (lines == 1 or lines * 128 < 2 * want)
