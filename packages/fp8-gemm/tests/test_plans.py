"""Launch plans of the hot paths: a call signature validates once, later calls reuse its plan and still compute
with their own data; a change of shape, stride, alignment or option makes a new plan; bad inputs always raise."""

from __future__ import annotations

import fp8_gemm.gemm as gemm_mod
import fp8_gemm.quantize as quant_mod
import fp8_gemm.quantize_kernels as quant_kernels
import pytest
import torch
from _gemm_ref import FP8, gemm_ref, make_operands
from fp8_gemm import DelayedScaler, FP8Linear, clear_caches, fp8_gemm, quantize_fp8
from fp8_gemm.reference import fp8_matmul_reference, quantize_fp8_reference
from torch import nn
from triton_ops_core.exceptions import NumericalOverflowError, ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.testing import assert_close_rel, device_for_tests, poison_

DEV = device_for_tests()
# The interpreter accumulates exactly; Hopper's FP8 wgmma keeps partial sums in reduced precision within a K block
# (about 1e-4 relative even when promoted every block: ../shared/notes/fp8-on-hopper.md), the mma.sync decode path
# does not. test_gemm_gpu.py holds the accuracy contract; these tests are about plans.
GEMM_TOL = 1e-5 if DEV.type == "cpu" else 3e-4


def _count_calls(monkeypatch, module, name: str):
    """Replace ``module.name`` by a wrapper that records each call; fresh plan caches before and after."""
    clear_caches()
    calls = []
    real = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    yield calls
    clear_caches()


@pytest.fixture
def gemm_validations(monkeypatch):
    """Counts the GEMM's validations (the shared validate_fp8_gemm_inputs, as the op calls it)."""
    yield from _count_calls(monkeypatch, gemm_mod, "validate_fp8_gemm_inputs")


@pytest.fixture
def quant_validations(monkeypatch):
    """Counts the quantizer's validations."""
    yield from _count_calls(monkeypatch, quant_mod, "_validate")


def _same_fp8(q: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.equal(q.contiguous().view(torch.uint8), ref.contiguous().view(torch.uint8))


@pytest.mark.parametrize("m, n, k, kmajor", [(4, 40, 96, True), (80, 32, 64, True), (80, 32, 64, False),
                                             (72, 40, 100, True)],
                         ids=["decode-splitk", "tma", "tma-copied-b", "pointer"])
def test_gemm_repeated_calls_reuse_plan_with_new_data(gemm_validations, m, n, k, kmajor):
    a_q, a_s, b_q, b_s = make_operands(m, n, k, "row", "channel", DEV, kmajor_b=kmajor)
    path = gemm_mod._pick_path(a_q, b_q, torch.empty(m, n, device=DEV), m)
    assert path == {4: "decode", 80: "tma", 72: "ptr"}[m] or DEV.type == "cuda"
    first = None
    for seed in range(3):
        a_q, a_s, b_q, b_s = make_operands(m, n, k, "row", "channel", DEV, kmajor_b=kmajor, seed=seed)
        bias = torch.randn(n, device=DEV)
        out = fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, bias=bias, out_dtype=torch.float32)
        assert_close_rel(out, gemm_ref(a_q, a_s, "row", b_q, b_s, "channel", bias), GEMM_TOL, f"seed {seed}")
        if first is None:  # launched through the JIT; the calls after it go through the plan's direct launcher
            first = (a_q, a_s, b_q, b_s, bias, out)
    a_q, a_s, b_q, b_s, bias, out = first
    again = fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, bias=bias, out_dtype=torch.float32)
    assert torch.equal(again, out), "the direct launcher must compute exactly what the JIT launch computed"
    assert len(gemm_validations) == 1
    if DEV.type == "cuda":  # later calls went through Triton's compiled launcher directly
        assert all(call.launch.runner is not None for call in gemm_mod._CALLS._plans.values())


def test_gemm_new_strides_alignment_or_options_make_new_plans(gemm_validations):
    m, n, k = 4, 40, 96
    a_q, a_s, b_q, b_s = make_operands(m, n, k, "row", "channel", DEV, seed=1)
    ref = gemm_ref(a_q, a_s, "row", b_q, b_s, "channel")
    fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, out_dtype=torch.float32)
    assert len(gemm_validations) == 1
    # the same values in a K-major b (other strides)
    out = fp8_gemm(a_q, b_q.t().contiguous().t(), a_scale=a_s, b_scale=b_s, out_dtype=torch.float32)
    assert len(gemm_validations) == 2
    assert_close_rel(out, ref, 1e-5, "K-major b")
    # a at an odd address (a 1-byte offset into a wider buffer), same shape and strides
    buf = torch.empty(m * k + 1, dtype=FP8, device=DEV)
    a_odd = buf[1:].view(m, k)
    a_odd.copy_(a_q)
    assert a_odd.data_ptr() % 16 != a_q.data_ptr() % 16
    out = fp8_gemm(a_odd, b_q, a_scale=a_s, b_scale=b_s, out_dtype=torch.float32)
    assert len(gemm_validations) == 3
    assert_close_rel(out, ref, 1e-5, "misaligned a")
    # another option: the output dtype
    out = fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, out_dtype=torch.bfloat16)
    assert len(gemm_validations) == 4 and out.dtype == torch.bfloat16
    # and back to the first signature: its plan is still there
    poison_(out)
    out = fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, out_dtype=torch.float32)
    assert len(gemm_validations) == 4
    assert_close_rel(out, ref, 1e-5, "first signature again")


def test_gemm_non_contiguous_scale_is_copied_each_call(gemm_validations):
    m, n, k = 4, 40, 96
    a_q, a_s, b_q, b_s = make_operands(m, n, k, "row", "channel", DEV, seed=2)
    a_s_strided = torch.empty(m, 2, device=DEV)[:, :1]  # [M, 1] with row stride 2
    for scale in (1.0, 0.5):
        a_s_strided.copy_(a_s.reshape(m, 1) * scale)
        out = fp8_gemm(a_q, b_q, a_scale=a_s_strided, b_scale=b_s, out_dtype=torch.float32)
        ref = gemm_ref(a_q, a_s.reshape(m, 1) * scale, "row", b_q, b_s, "channel")
        assert_close_rel(out, ref, 1e-5, f"scale x{scale}")
    assert len(gemm_validations) == 1


def test_gemm_quantizing_operands_reuses_plans(gemm_validations):
    a = torch.randn(4, 96, device=DEV)
    w = torch.randn(40, 96, device=DEV)
    for _ in range(2):
        a = a * 1.5
        out = fp8_gemm(a, w.t(), out_dtype=torch.float32)
        a_q, a_s = quantize_fp8_reference(a, "e4m3", "row")
        b_q, b_s = quantize_fp8_reference(w.t(), "e4m3", "channel", role="weight")
        assert_close_rel(out, fp8_matmul_reference(a_q, b_q, a_s, b_s), 1e-5, "quantized operands")
    assert len(gemm_validations) == 1


def test_gemm_bad_inputs_raise_every_time(gemm_validations):
    a_q, a_s, b_q, b_s = make_operands(4, 40, 96, "row", "channel", DEV, seed=3)
    fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s)
    bad_scale = torch.ones(3, 1, device=DEV)
    for _ in range(2):
        with pytest.raises(ShapeMismatchError, match="a_scale"):
            fp8_gemm(a_q, b_q, a_scale=bad_scale, b_scale=b_s)
        with pytest.raises(UnsupportedDtypeError, match="a_scale"):
            fp8_gemm(a_q, b_q, a_scale=None, b_scale=b_s)
        with pytest.raises(UnsupportedDtypeError, match="out_dtype"):
            fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, out_dtype=torch.int8)


def test_gemm_unsupported_gpu_is_checked_on_a_new_signature(gemm_validations, monkeypatch):
    a_q, a_s, b_q, b_s = make_operands(4, 40, 96, "row", "channel", DEV, seed=4)
    monkeypatch.setattr(gemm_mod, "_device_caps", lambda device, interpreter: (False, False))
    with pytest.raises(UnsupportedDtypeError, match="FP8 tensor cores"):
        fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s)
    with pytest.raises(UnsupportedDtypeError, match="FP8 tensor cores"):
        fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s)


def test_clear_caches_forgets_plans(gemm_validations):
    a_q, a_s, b_q, b_s = make_operands(4, 40, 96, "tensor", "tensor", DEV, seed=5)
    fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s)
    fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s)
    clear_caches()
    fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s)
    assert len(gemm_validations) == 2


@pytest.mark.parametrize("granularity, block", [("row", None), ("tensor", None), ("block", (1, 128)),
                                                ("channel", None)])
@pytest.mark.parametrize("given", [False, True], ids=["dynamic", "given"])
def test_quantize_repeated_calls_reuse_plan_with_new_data(quant_validations, granularity, block, given):
    shape = (6, 136)
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(shape, device=DEV) * (seed + 1)
        scale = None
        if given:  # a scale too small for seed 2's data: that call must raise the scale, not clip
            _, dyn = quantize_fp8_reference(torch.randn(shape, device=DEV), "e4m3", granularity, block_size=block)
            scale = dyn * 2
        q, s = quantize_fp8(x, "e4m3", granularity, scale=scale, block_size=block)
        q_ref, s_ref = quantize_fp8_reference(x, "e4m3", granularity, scale=scale, block_size=block)
        assert torch.equal(s, s_ref) and _same_fp8(q, q_ref), f"seed {seed}"
    assert len(quant_validations) == 1
    if DEV.type == "cuda":  # later calls went through Triton's compiled launcher directly
        assert all(p.runner is not None for plan in quant_mod._PLANS._plans.values() for p in plan.launches)


def test_quantize_new_layouts_make_new_plans(quant_validations):
    torch.manual_seed(6)
    w = torch.randn(40, 72, device=DEV)
    results = []
    for t in (w, w.t(), w.t().contiguous(), w[:, :64], w.reshape(2, 20, 72)):
        q, s = quantize_fp8(t, "e4m3", "row")
        q_ref, s_ref = quantize_fp8_reference(t, "e4m3", "row")
        assert q.shape == t.shape and torch.equal(s, s_ref) and _same_fp8(q, q_ref)
        results.append(q)
    assert len(quant_validations) == 5
    quantize_fp8(w[:, :64], "e4m3", "row")
    quantize_fp8(w, "e4m3", "row")
    assert len(quant_validations) == 5


def test_quantize_unhashable_block_size_still_works(quant_validations):
    x = torch.randn(4, 130, device=DEV)
    for _ in range(2):
        q, s = quantize_fp8(x, "e4m3", "block", block_size=[1, 128])
        q_ref, s_ref = quantize_fp8_reference(x, "e4m3", "block", block_size=(1, 128))
        assert torch.equal(s, s_ref) and _same_fp8(q, q_ref)


def test_quantize_strict_and_bad_inputs_raise_on_repeated_calls(quant_validations):
    x = torch.randn(4, 64, device=DEV)
    small = torch.full((1,), 1e-4, device=DEV)
    for _ in range(2):
        with pytest.raises(NumericalOverflowError, match="scale group"):
            quantize_fp8(x, "e4m3", "tensor", scale=small, strict=True)
        q, s = quantize_fp8(x, "e4m3", "tensor", scale=small)  # the same plan, non-strict: raised scale
        assert s.item() > 1e-4
        with pytest.raises(ShapeMismatchError, match="scale"):
            quantize_fp8(x, "e4m3", "row", scale=torch.ones(3, 1, device=DEV))
    assert len(quant_validations) == 3  # the bad call validates (and raises) every time


@pytest.mark.parametrize("path", ["grid", "cooperative"])
def test_quantize_given_per_tensor_scale_host_path(quant_validations, monkeypatch, path):
    """A given per-tensor scale (the benchmark's "static" case), repeated with new values in the same scale
    tensor: one validation, no host synchronization unless strict, the launches of the path every call, the
    kernels' device words zero at rest after every call (a scale that holds, one that overflows, invalid ones),
    results bit-exact. ``grid``: a large tensor (more than 4 tiles per program of the cooperative grid; under
    the interpreter that grid is one program), the casting grid and its fix-up launch; ``cooperative``: one
    launch with a grid barrier."""
    from triton_ops_core import scratch as _scratch
    from triton_ops_core.launch import Plan

    if path == "grid":
        shape = (40, 1000) if DEV.type == "cpu" else (8192, 8192)  # 5 tiles / 8192 tiles (H100: 528 programs)
        kernels = [quant_kernels._quant_tensor_given_kernel, quant_kernels._quant_tensor_given_fixup_kernel]
        words = ("quantize.over", 2)
    else:
        shape = (4, 1000)
        kernels = [quant_kernels._quant_tensor_coop_kernel]
        words = ("quantize.sync", 4)
    torch.manual_seed(8)
    x = torch.randn(shape, device=DEV) * 3
    dyn = quantize_fp8_reference(x, "e4m3", "tensor")[1]
    launches = []
    real_launch = Plan.launch

    def counting(self, *tensors):
        launches.append(self.kernel)
        return real_launch(self, *tensors)

    def no_sync(*args, **kwargs):
        raise AssertionError("a non-strict quantize_fp8 call must not synchronize")

    monkeypatch.setattr(Plan, "launch", counting)
    given = torch.empty(1, device=DEV)
    for value in (dyn * 2, dyn / 4, torch.zeros(1, device=DEV), torch.full((1,), float("nan"), device=DEV), dyn):
        given.copy_(value)
        ref = quantize_fp8_reference(x, "e4m3", "tensor", scale=given)
        launches.clear()
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", no_sync)
            m.setattr(torch.cuda, "synchronize", no_sync)
            q, s = quantize_fp8(x, "e4m3", "tensor", scale=given)
        assert launches == kernels
        assert torch.equal(s, ref[1]) and _same_fp8(q, ref[0]), f"given {value.item()}"
        state = _scratch.scratch(words[0], x.device, words[1], torch.int32, zeroed=True)
        assert state[: words[1]].tolist() == [0] * words[1], "the kernels' device words must be zero at rest"
    assert len(quant_validations) == 1
    with pytest.raises(NumericalOverflowError, match="1 scale group"):
        quantize_fp8(x, "e4m3", "tensor", scale=dyn / 4, strict=True)


def test_delayed_scaler_uses_cached_plans(quant_validations):
    scaler = DelayedScaler(history_len=2)
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(5, 48, device=DEV)
        q, s = scaler.quantize(x)
        assert torch.isfinite(s).all() and _same_fp8(q, quantize_fp8_reference(x, "e4m3", "tensor", scale=s)[0])
    assert len(quant_validations) == 1  # one plan: the kernel itself scales the first call dynamically


def test_linear_forward_reuses_plans_and_follows_new_weights(gemm_validations, quant_validations):
    torch.manual_seed(7)
    mod = FP8Linear.from_linear(nn.Linear(72, 40, device=DEV))
    mod.path = "w8a8"  # the W8A8 plans (3 and 6 rows would take the weight-only decode kernel)
    quant_validations.clear()
    for seed in range(3):
        torch.manual_seed(seed)
        if seed == 2:  # same layout, new values: the plan stays valid
            mod.load_weight(torch.randn(40, 72, device=DEV))
            quant_validations.clear()
        x = torch.randn(3, 72, device=DEV)
        out = mod(x)
        a_q, a_s = quantize_fp8_reference(x, "e4m3", "row")
        ref = fp8_matmul_reference(a_q, mod.weight.t(), a_s, mod.weight_scale, mod.bias)
        assert_close_rel(out, ref, 1e-5, f"seed {seed}")
    assert len(gemm_validations) == 1  # the GEMM's validation runs once for the signature
    assert not quant_validations  # forward never re-validates the activation's quantization
    x3 = torch.randn(2, 3, 72, device=DEV)
    out = mod(x3)
    assert out.shape == (2, 3, 40) and len(gemm_validations) == 2
    with pytest.raises(ShapeMismatchError, match="in_features"):
        mod(torch.randn(3, 71, device=DEV))
