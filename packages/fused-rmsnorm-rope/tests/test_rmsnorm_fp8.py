"""rmsnorm / fused_add_rmsnorm with ``fp8_out``: E4M3 output and per-row (``True`` / ``"row"``) or per 1x128 block
(``"block"``) scales in the norm's launch, bit-identical to quantizing the bf16 output so (torch's own cast as the
reference), one and two passes, in place, NaN and zero rows, errors, the registered ops (opcheck, compile)."""

from __future__ import annotations

import importlib

import pytest
import torch
from _rope_helpers import DEVICE, norm_inputs
from fused_rmsnorm_rope import fused_add_rmsnorm, rmsnorm, rmsnorm_reference
from fused_rmsnorm_rope.ops.rmsnorm import MAX_ONE_PASS
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_ops_core.exceptions import InvalidArgumentError, UnsupportedDtypeError
from triton_ops_core.testing import assert_close_rel, count_compiles, opcheck_op, poison_

E4M3_MAX = 448.0
# the module (the package's ``ops.rmsnorm`` attribute is the function of that name)
rmsnorm_module = importlib.import_module("fused_rmsnorm_rope.ops.rmsnorm")

pytestmark = pytest.mark.skipif(not rmsnorm_module.supports_fp8(torch.device(DEVICE)),
                                reason="FP8 needs compute capability 8.9+ or the interpreter")




def quantize_rows_reference(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row E4M3 by the library's convention with torch's cast: ``scale = amax / 448`` over finite values (1.0
    for a row of zeros, at least 2**-126), ``q = fp8(y * (1 / scale))``."""
    y32 = y.float()
    finite = torch.where(torch.isfinite(y32), y32.abs(), torch.zeros_like(y32))
    amax = finite.amax(-1, keepdim=True)
    # a tensor divisor: CUDA torch divides by a Python scalar as a multiply by its reciprocal (an ulp off at times)
    scale = amax / torch.full_like(amax, E4M3_MAX)
    scale = torch.where(amax > 0, torch.clamp(scale, min=2.0**-126), torch.ones_like(amax))
    return (y32 * (1.0 / scale)).to(torch.float8_e4m3fn), scale


def quantize_blocks_reference(y: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 1 x ``group`` block of each row (the last block short where the row is), as ``quantize_rows_reference``
    quantizes a row: scales ``[..., ceil(hidden / group)]``."""
    hidden = y.shape[-1]
    blocks = -(-hidden // group)
    padded = torch.nn.functional.pad(y.float(), (0, blocks * group - hidden))  # zeros never set a scale
    q, scale = quantize_rows_reference(padded.reshape(*y.shape[:-1], blocks, group))
    return q.reshape(*y.shape[:-1], blocks * group)[..., :hidden], scale.squeeze(-1)


def _same_fp8(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.float8_e4m3fn and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@settings(deadline=None, max_examples=25)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), hidden=st.integers(1, 300), gemma=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_bit_identical_to_quantizing_the_norms_output(lead, hidden, gemma, dtype, seed):
    x, w, r = norm_inputs((*lead, hidden), dtype, seed)
    q, s = rmsnorm(x, w, 1e-5, gemma=gemma, fp8_out=True)
    q_ref, s_ref = quantize_rows_reference(rmsnorm(x, w, 1e-5, gemma=gemma))
    assert s.shape == (*lead, 1) and s.dtype == torch.float32
    assert _same_fp8(q, q_ref) and torch.equal(s, s_ref)
    y, res = fused_add_rmsnorm(x, r, w, 1e-5, gemma=gemma)
    q, s, res_fp8 = fused_add_rmsnorm(x, r, w, 1e-5, gemma=gemma, fp8_out=True)
    q_ref, s_ref = quantize_rows_reference(y)
    assert _same_fp8(q, q_ref) and torch.equal(s, s_ref) and torch.equal(res_fp8, res)


@settings(deadline=None, max_examples=25)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), hidden=st.integers(1, 600), gemma=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_block_scales_bit_identical_to_quantizing_the_norms_output(lead, hidden, gemma, dtype, seed):
    """1 x 128 blocks, a short last block wherever hidden is no multiple of 128 (and rows shorter than a block)."""
    x, w, r = norm_inputs((*lead, hidden), dtype, seed)
    q, s = rmsnorm(x, w, 1e-5, gemma=gemma, fp8_out="block")
    q_ref, s_ref = quantize_blocks_reference(rmsnorm(x, w, 1e-5, gemma=gemma))
    assert s.shape == (*lead, -(-hidden // 128)) and s.dtype == torch.float32 and s.is_contiguous()
    assert _same_fp8(q, q_ref) and torch.equal(s, s_ref)
    y, res = fused_add_rmsnorm(x, r, w, 1e-5, gemma=gemma)
    q, s, res_fp8 = fused_add_rmsnorm(x, r, w, 1e-5, gemma=gemma, fp8_out="block")
    q_ref, s_ref = quantize_blocks_reference(y)
    assert _same_fp8(q, q_ref) and torch.equal(s, s_ref) and torch.equal(res_fp8, res)


@pytest.mark.parametrize("scaling", [True, "row", "block"])
@pytest.mark.parametrize("hidden", [2880, MAX_ONE_PASS + 100])
@pytest.mark.parametrize("inplace", [False, True])
def test_one_and_two_passes_in_place_and_not(hidden, inplace, scaling):
    x, w, r = norm_inputs((3, hidden), torch.bfloat16)
    y, res = fused_add_rmsnorm(x, r, w)
    residual = r.clone()
    q, s, new_residual = fused_add_rmsnorm(x, residual, w, fp8_out=scaling, inplace=inplace)
    q_ref, s_ref = (quantize_blocks_reference if scaling == "block" else quantize_rows_reference)(y)
    assert _same_fp8(q, q_ref) and torch.equal(s, s_ref) and torch.equal(new_residual, res)
    assert (new_residual is residual) == inplace and torch.equal(residual, res if inplace else r)


def test_dequantized_output_against_float64():
    x, w, _ = norm_inputs((64, 576), torch.bfloat16)
    q, s = rmsnorm(x, w, 1e-5, fp8_out=True)
    # E4M3 keeps 3 mantissa bits: half an ulp is 2**-4 of a value (bf16's own rounding comes on top)
    assert_close_rel(q.double() * s.double(), rmsnorm_reference(x.double(), w.double(), 1e-5), 0.04)
    assert q.float().abs().amax(-1).eq(E4M3_MAX).all()  # every row uses the format's full range


def test_block_scales_dequantize_to_the_float64_norm_and_each_block_uses_its_range():
    x, w, _ = norm_inputs((16, 640), torch.bfloat16)
    x[:, :128] *= 50.0  # one block of large values: a row scale would crush the others
    q, s = rmsnorm(x, w, 1e-5, fp8_out="block")
    deq = (q.double().reshape(16, 5, 128) * s.double()[..., None]).reshape(16, 640)
    assert_close_rel(deq, rmsnorm_reference(x.double(), w.double(), 1e-5), 0.04)
    assert q.float().abs().reshape(16, 5, 128).amax(-1).eq(E4M3_MAX).all()


def test_block_scales_nan_stays_in_its_block(monkeypatch):
    x, w, _ = norm_inputs((2, 256), torch.float32)
    x[1, 5] = float("nan")  # the row's rstd is NaN: every value of row 1 is NaN, no finite value sets a scale
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(real_empty(*a, **k)))
    q, s = rmsnorm(x, w, fp8_out="block")
    assert q[1].float().isnan().all() and s[1].eq(1.0).all()
    assert torch.isfinite(q[0].float()).all() and torch.isfinite(s[0]).all() and s[0].gt(0).all()


def test_every_byte_written_nan_stays_in_its_row_and_a_zero_row_gets_scale_one(monkeypatch):
    x, w, _ = norm_inputs((4, 96), torch.float32)
    x[1, 5] = float("nan")
    x[2] = 0.0
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(real_empty(*a, **k)))
    q, s = rmsnorm(x, w, fp8_out=True)
    assert q[1].float().isnan().all() and s[1].item() == 1.0  # no finite value sets the NaN row's scale
    assert q[2].float().eq(0).all() and s[2].item() == 1.0
    assert torch.isfinite(q[[0, 3]].float()).all() and torch.isfinite(s).all()


def test_empty_input():
    q, s = rmsnorm(torch.empty(0, 64, device=DEVICE), torch.ones(64, device=DEVICE), fp8_out=True)
    assert q.shape == (0, 64) and s.shape == (0, 1) and q.dtype == torch.float8_e4m3fn
    q, s = rmsnorm(torch.empty(0, 300, device=DEVICE), torch.ones(300, device=DEVICE), fp8_out="block")
    assert q.shape == (0, 300) and s.shape == (0, 3)


def test_errors():
    x, w, r = norm_inputs((2, 16), torch.float32)
    for bad in (1, "tensor", "Row"):
        with pytest.raises(InvalidArgumentError, match=r"^fp8_out: expected False, True, 'row' or 'block'"):
            rmsnorm(x, w, fp8_out=bad)
    with pytest.raises(InvalidArgumentError, match=r"^fp8_out: expected False, True, 'row' or 'block'"):
        fused_add_rmsnorm(x, r, w, fp8_out="channel")
    with pytest.raises(InvalidArgumentError, match=r"^fp8_out: the FP8 output is not differentiable"):
        rmsnorm(x.clone().requires_grad_(True), w, fp8_out=True)
    with pytest.raises(InvalidArgumentError, match=r"^fp8_out: the FP8 output is not differentiable"):
        fused_add_rmsnorm(x, r, w.clone().requires_grad_(True), fp8_out=True)


def test_a_device_without_fp8_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(rmsnorm_module, "supports_fp8", lambda device: False)
    rmsnorm_module._PLANS.clear()
    x, w, _ = norm_inputs((2, 24), torch.float32)
    with pytest.raises(UnsupportedDtypeError, match=r"^fp8_out: an E4M3 output needs FP8 support"):
        rmsnorm(x, w, fp8_out=True)


def test_opcheck():
    x, w, r = norm_inputs((2, 3, 32), torch.float32)
    opcheck_op(torch.ops.triton_ops.rmsnorm_fp8.default, (x, w, 1e-6, False))
    opcheck_op(torch.ops.triton_ops.fused_add_rmsnorm_fp8.default, (x, r, w, 1e-6, True))
    opcheck_op(torch.ops.triton_ops.fused_add_rmsnorm_fp8_.default, (x, r.clone(), w, 1e-6, False))
    x, w, r = norm_inputs((2, 3, 200), torch.float32)
    opcheck_op(torch.ops.triton_ops.rmsnorm_fp8.default, (x, w, 1e-6, False, True))
    opcheck_op(torch.ops.triton_ops.fused_add_rmsnorm_fp8.default, (x, r, w, 1e-6, True, True))
    opcheck_op(torch.ops.triton_ops.fused_add_rmsnorm_fp8_.default, (x, r.clone(), w, 1e-6, False, True))


def test_compiled_equals_eager_and_compiles_once_over_lengths():
    w = torch.randn(32, device=DEVICE)

    def layer(x, residual):
        q, s, residual = fused_add_rmsnorm(x, residual, w, fp8_out=True)
        qb, sb, _ = fused_add_rmsnorm(x, residual, w, fp8_out="block")
        return q, s, qb, sb, rmsnorm(residual, w, fp8_out=True)[1], rmsnorm(residual, w, fp8_out="block")[1], residual

    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.no_grad(), count_compiles() as compiles:
        for m in (1, 2, 5, 17):
            x, _, r = norm_inputs((1, m, 32), torch.float32, seed=m)
            for a, b in zip(compiled(x, r), layer(x, r)):
                assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                                   b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
    assert compiles["frames"] <= 2


@pytest.mark.skipif(DEVICE.type != "cuda", reason="a GPU-sized case (minutes under the interpreter)")
def test_many_rows_bit_identical_on_the_gpu():
    """8192 x 4096: enough values on a bf16 rounding tie that an fp32 ulp of difference in a row's rstd between the
    two outputs shows (it did on the H200 with approximate division and square root: 4 rows of 8192)."""
    x, w, r = norm_inputs((8192, 4096), torch.bfloat16)
    y, res = fused_add_rmsnorm(x, r, w)
    q, s, _ = fused_add_rmsnorm(x, r, w, fp8_out=True)
    q_ref, s_ref = quantize_rows_reference(y)
    assert _same_fp8(q, q_ref) and torch.equal(s, s_ref)
    q, s, _ = fused_add_rmsnorm(x, r, w, fp8_out="block")
    q_ref, s_ref = quantize_blocks_reference(y)
    assert _same_fp8(q, q_ref) and torch.equal(s, s_ref)
