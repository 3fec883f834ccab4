"""quantize_fp8 / dequantize_fp8: bit-exact against torch's own cast of the same scaled values.

Runs under the interpreter on CPU (its own FP8 cast is wrong: the kernels round in integer arithmetic there) and
compiled on a GPU. Shapes stay small: every program instance costs about a millisecond under the interpreter.
"""

from __future__ import annotations

import pytest
import torch
from fp8_gemm import dequantize_fp8, expand_scale, quantize_fp8, scale_shape
from fp8_gemm.reference import group_amax, overflow_groups, quantize_fp8_reference
from hypothesis import given
from hypothesis import strategies as st
from triton_ops_core.exceptions import (
    DeviceMismatchError,
    InvalidArgumentError,
    NumericalOverflowError,
    ShapeMismatchError,
    UnsupportedDtypeError,
)
from triton_ops_core.models import FP8Format

CASES = [("tensor", None), ("row", None), ("channel", None), ("block", (1, 128)), ("block", (128, 128)),
         ("group", None)]
CASE_IDS = ["tensor", "row", "channel", "block1x128", "block128x128", "group"]
FMTS = ["e4m3", "e5m2"]


def assert_same_fp8(q: torch.Tensor, ref: torch.Tensor) -> None:
    """Same bits everywhere, except that a NaN may carry either sign (the GPU's conversion makes every NaN
    0x7F; torch keeps the input's sign)."""
    assert q.dtype == ref.dtype and q.shape == ref.shape
    qn, rn = torch.isnan(q.float()), torch.isnan(ref.float())
    assert torch.equal(qn, rn), "NaN positions differ"
    qb, rb = q.view(torch.uint8)[~qn], ref.view(torch.uint8)[~rn]
    bad = (qb != rb).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} of {qb.numel()} values differ"


def wide_range(shape, dtype, device, seed=0):
    """Values over many binades (subnormal FP8 results, ties, carries), never all zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-7, 3, shape[-1])
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize(("granularity", "block"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bit_exact_against_torch(device, fmt, granularity, block, dtype):
    x = wide_range((133, 260), dtype, device)
    q, s = quantize_fp8(x, fmt, granularity, block_size=block)
    q_ref, s_ref = quantize_fp8_reference(x, fmt, granularity, block_size=block)
    assert s.dtype == torch.float32 and tuple(s.shape) == scale_shape(tuple(x.shape), granularity, block)
    assert torch.equal(s, s_ref)
    assert_same_fp8(q, q_ref)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize(("granularity", "block"), CASES, ids=CASE_IDS)
def test_column_major_input_keeps_layout(device, fmt, granularity, block):
    # A [K, N] weight handed over as w.t() (nn.Linear / cuBLAS layout): read along K, result in the same layout.
    w = wide_range((200, 136), torch.bfloat16, device, seed=1)
    x = w.t()
    q, s = quantize_fp8(x, fmt, granularity, block_size=block)
    q_ref, s_ref = quantize_fp8_reference(x, fmt, granularity, block_size=block)
    assert torch.equal(s, s_ref)
    assert_same_fp8(q, q_ref)
    if block != (1, 128):
        assert q.stride() == x.stride()


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_strided_rows_and_higher_rank(device, granularity):
    base = wide_range((6, 40, 3 * 64), torch.float16, device, seed=2)
    x = base[:, :, 64:128]  # row stride 192, unit column stride
    q, s = quantize_fp8(x, "e4m3", granularity)
    q_ref, s_ref = quantize_fp8_reference(x, "e4m3", granularity)
    assert q.shape == x.shape and s.shape == ((1,) if granularity == "tensor" else (6, 40, 1))
    assert torch.equal(s, s_ref)
    assert_same_fp8(q, q_ref)


@pytest.mark.parametrize("fmt", FMTS)
def test_long_rows_take_the_looping_path(device, fmt):
    # Rows longer than one tile (8192) are read twice; columns longer than 64 rows loop too.
    x = wide_range((2, 8200), torch.bfloat16, device, seed=3)
    for gran in ("row", "channel"):
        q, s = quantize_fp8(x if gran == "row" else x[:, :200].t(), fmt, gran)
        q_ref, s_ref = quantize_fp8_reference(x if gran == "row" else x[:, :200].t(), fmt, gran)
        assert torch.equal(s, s_ref)
        assert_same_fp8(q, q_ref)


@given(
    m=st.integers(1, 70), k=st.integers(1, 300), fmt=st.sampled_from(FMTS), case=st.sampled_from(CASES),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(m, k, fmt, case, seed):
    from triton_ops_core.testing import device_for_tests

    granularity, block = case
    x = wide_range((m, k), torch.float32, device_for_tests(), seed=seed)
    q, s = quantize_fp8(x, fmt, granularity, block_size=block)
    q_ref, s_ref = quantize_fp8_reference(x, fmt, granularity, block_size=block)
    assert torch.equal(s, s_ref)
    assert_same_fp8(q, q_ref)


@pytest.mark.parametrize("fmt", FMTS)
def test_exact_fp8_values_round_trip_and_ties_round_to_even(device, fmt):
    # Every finite FP8 value, and every midpoint between neighbours, scaled by a power of two: quantization must
    # reproduce the grid exactly and send each midpoint to the even neighbour, as torch does.
    dtype = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, -grid, -mids]).reshape(1, -1).to(device)
    scale = torch.ones(1, device=device)
    q, s = quantize_fp8(x, fmt, "tensor", scale=scale)
    assert s.item() == 1.0
    q_ref, _ = quantize_fp8_reference(x, fmt, "tensor", scale=scale)
    assert_same_fp8(q, q_ref)
    assert torch.equal(q.float()[0, : grid.numel()], grid.to(device))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize(("granularity", "block"), CASES, ids=CASE_IDS)
def test_nan_stays_nan_and_infinities(device, fmt, granularity, block):
    x = wide_range((130, 150), torch.float32, device, seed=4)
    x[0, 3] = float("nan")
    x[5, 7] = float("inf")
    x[9, 140] = -float("inf")
    x[129, 0] = float("nan")
    q, s = quantize_fp8(x, fmt, granularity, block_size=block)
    q_ref, s_ref = quantize_fp8_reference(x, fmt, granularity, block_size=block)
    assert torch.isfinite(s).all(), "non-finite values must not set a scale"
    assert torch.equal(s, s_ref)
    assert_same_fp8(q, q_ref)
    qf = q.float()
    assert qf[0, 3].isnan() and qf[129, 0].isnan()
    if fmt == "e5m2":
        assert qf[5, 7] == float("inf") and qf[9, 140] == -float("inf")
    else:  # E4M3 has no infinity: saturate
        assert qf[5, 7] == 448 and qf[9, 140] == -448


@pytest.mark.parametrize(("granularity", "block"), CASES, ids=CASE_IDS)
def test_all_zero_groups_get_scale_one(device, granularity, block):
    x = torch.zeros(130, 260, device=device)
    x[:, 200:] = torch.randn(130, 60, device=device)  # some groups non-zero
    q, s = quantize_fp8(x, "e4m3", granularity, block_size=block)
    q_ref, s_ref = quantize_fp8_reference(x, "e4m3", granularity, block_size=block)
    assert torch.equal(s, s_ref)
    assert_same_fp8(q, q_ref)
    zero_groups = group_amax(x, granularity, block) == 0
    assert (s[zero_groups] == 1).all()
    assert (q.float()[:, :200] == 0).all()


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize(("granularity", "block"), CASES, ids=CASE_IDS)
def test_given_scale_used_as_is_or_raised_on_overflow(device, fmt, granularity, block):
    x = wide_range((130, 260), torch.float32, device, seed=5)
    _, dyn = quantize_fp8_reference(x, fmt, granularity, block_size=block)
    g = torch.Generator().manual_seed(0)
    factor = torch.where(torch.rand(dyn.shape, generator=g) < 0.5, 0.25, 3.0).to(device)
    if factor.numel() == 1:
        factor.fill_(0.25)
    given = dyn * factor
    q, s = quantize_fp8(x, fmt, granularity, scale=given, block_size=block)
    q_ref, s_ref = quantize_fp8_reference(x, fmt, granularity, scale=given, block_size=block)
    assert torch.equal(s, s_ref)
    assert_same_fp8(q, q_ref)
    over = factor < 1
    assert torch.equal(s[over], dyn[over]), "overflowing groups fall back to the dynamic scale"
    assert torch.equal(s[~over], given[~over]), "other groups keep the given scale exactly"
    # Nothing clipped: every finite value is within the format's range after dequantization.
    deq = dequantize_fp8(q, s, torch.float32)
    assert torch.isfinite(deq).all()
    n_over = overflow_groups(x, given, fmt, granularity, block)
    assert n_over == int(over.sum()) > 0
    with pytest.raises(NumericalOverflowError, match=f"{n_over} scale group"):
        quantize_fp8(x, fmt, granularity, scale=given, block_size=block, strict=True)
    # A scale that covers the data passes strict mode untouched.
    q2, s2 = quantize_fp8(x, fmt, granularity, scale=dyn * 2, block_size=block, strict=True)
    assert torch.equal(s2, dyn * 2)


@pytest.mark.parametrize(
    ("fmt", "kept", "raised"),
    [("e4m3", (448.0, 452.0, 464.0), (464.0625, 470.0, 479.0)),
     ("e5m2", (57344.0, 60000.0, 61439.99609375), (61440.0, 61500.0))],
)
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_overflow_means_rounding_past_the_largest_value(device, fmt, kept, raised, granularity):
    # With scale 1 the scaled values are the data. Up to the threshold they only round to the largest value
    # (E4M3: the tie at 464 rounds to 448, mantissa even; E5M2: 61440 is a tie that rounds to infinity).
    limit = FP8Format.from_name(fmt).overflow_threshold
    for peak, expect_over in [(v, False) for v in kept] + [(v, True) for v in raised]:
        assert (peak > limit) == expect_over
        x = torch.randn(3, 40, device=device).clamp(-1, 1)
        x[1, 7] = -peak
        ones = torch.ones((1,) if granularity == "tensor" else (3, 1), device=device)
        q, s = quantize_fp8(x, fmt, granularity, scale=ones)
        q_ref, s_ref = quantize_fp8_reference(x, fmt, granularity, scale=ones)
        assert torch.equal(s, s_ref)
        assert_same_fp8(q, q_ref)
        group = 0 if granularity == "tensor" else 1
        assert bool(s.reshape(-1)[group] != 1) == expect_over, (fmt, peak)
        assert overflow_groups(x, ones, fmt, granularity) == int(expect_over)
        if not expect_over:
            assert q.float()[1, 7] == -FP8Format.from_name(fmt).max_value


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_given_scale_counts_as_overflow(device, bad):
    x = torch.randn(4, 32, device=device)
    given = torch.full((4, 1), 0.01, device=device)
    given[2, 0] = bad
    q, s = quantize_fp8(x, "e4m3", "row", scale=given)
    q_ref, s_ref = quantize_fp8_reference(x, "e4m3", "row", scale=given)
    assert torch.equal(s, s_ref) and torch.isfinite(s).all() and s[2, 0] > 0
    assert_same_fp8(q, q_ref)
    # strict mode names the bad scale (not an overflow of the data)
    with pytest.raises(InvalidArgumentError, match=r"^scale: expected positive finite values, got (0|-1|nan|inf) "):
        quantize_fp8(x, "e4m3", "row", scale=given, strict=True)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), float("-inf")])
def test_strict_rejects_an_invalid_per_tensor_scale(device, bad):
    x = torch.randn(8, 256, device=device)
    with pytest.raises(InvalidArgumentError, match=r"^scale: expected positive finite values"):
        quantize_fp8(x, scale=torch.tensor([bad], device=device), strict=True)


def test_per_tensor_given_scale_accepts_any_single_value_shape(device):
    x = torch.randn(8, 16, device=device)
    for one in (torch.tensor(0.05, device=device), torch.tensor([0.05], device=device),
                torch.tensor([[0.05]], device=device)):
        _, s = quantize_fp8(x, "e4m3", "tensor", scale=one)
        assert s.shape == (1,) and s.item() == pytest.approx(0.05)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize(("granularity", "block"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize_is_the_exact_inverse_of_the_scaling(device, fmt, granularity, block, dtype):
    x = wide_range((130, 200), torch.float32, device, seed=6)
    q, s = quantize_fp8(x, fmt, granularity, block_size=block)
    out = dequantize_fp8(q, s, dtype)
    assert out.dtype == dtype and out.shape == x.shape
    expected = (q.float() * expand_scale(s, tuple(q.shape))).to(dtype)
    assert torch.equal(out, expected)
    # And it is close to the input: E4M3 rounds to 2**-4 relative at worst, E5M2 to 2**-3 (normal range).
    bound = 2.0**-4 if fmt == "e4m3" else 2.0**-3
    big = x.abs() >= expand_scale(s, tuple(x.shape)) * (2.0**-6 if fmt == "e4m3" else 2.0**-14)
    rel = ((dequantize_fp8(q, s, torch.float32) - x).abs() / x.abs())[big]
    assert rel.max() <= bound * 1.01


def test_dequantize_default_dtype_and_nan(device):
    x = torch.randn(4, 8, device=device)
    x[1, 1] = float("nan")
    q, s = quantize_fp8(x, "e4m3", "row")
    out = dequantize_fp8(q, s)
    assert out.dtype == torch.float16 and out[1, 1].isnan() and torch.isfinite(out[~x.isnan()]).all()


def test_empty_dimension_is_rejected_cleanly_or_handled(device):
    x = torch.randn(0, 16, device=device)
    q, s = quantize_fp8(x, "e4m3", "row")
    assert q.shape == (0, 16) and s.shape == (0, 1)


# ------------------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs(device):
    x = torch.randn(8, 16, device=device)
    with pytest.raises(InvalidArgumentError, match="t: expected a torch.Tensor"):
        quantize_fp8([[1.0]])
    with pytest.raises(InvalidArgumentError, match="fmt"):
        quantize_fp8(x, "e3m4")
    with pytest.raises(InvalidArgumentError, match="granularity"):
        quantize_fp8(x, "e4m3", "column")
    with pytest.raises(InvalidArgumentError, match="role"):
        quantize_fp8(x, "e4m3", "block", role="bias")
    with pytest.raises(UnsupportedDtypeError, match="t: expected dtype"):
        quantize_fp8(x.to(torch.int32))
    with pytest.raises(UnsupportedDtypeError, match="t: expected dtype"):
        quantize_fp8(x.to(torch.float8_e4m3fn))
    with pytest.raises(ShapeMismatchError, match="t: expected 2 dimensions"):
        quantize_fp8(x.reshape(2, 4, 16), "e4m3", "channel")
    with pytest.raises(ShapeMismatchError, match="t: expected 2 dimensions"):
        quantize_fp8(x.reshape(-1), "e4m3", "block")
    with pytest.raises(ShapeMismatchError, match="at least 1"):
        quantize_fp8(torch.tensor(1.0, device=device))
    with pytest.raises(InvalidArgumentError, match="block_size"):
        quantize_fp8(x, "e4m3", "block", block_size=(64, 64))
    with pytest.raises(InvalidArgumentError, match="block_size: only applies"):
        quantize_fp8(x, "e4m3", "row", block_size=(1, 128))
    with pytest.raises(InvalidArgumentError, match="block_size: granularity 'group' has fixed"):
        quantize_fp8(x, "e4m3", "group", block_size=(128, 128))
    with pytest.raises(ShapeMismatchError, match="t: expected 2 dimensions"):
        quantize_fp8(x.reshape(-1), "e4m3", "group")
    with pytest.raises(ShapeMismatchError, match=r"scale: expected shape \[8, 1\]"):
        quantize_fp8(x, "e4m3", "row", scale=torch.ones(8, device=device))
    with pytest.raises(ShapeMismatchError, match="scale: expected shape"):
        quantize_fp8(x, "e4m3", "tensor", scale=torch.ones(2, device=device))
    with pytest.raises(ShapeMismatchError, match=r"scale: expected shape \[1, 1\] for granularity 'block'"):
        quantize_fp8(x, "e4m3", "block", scale=torch.ones(8, 2, device=device), block_size=(128, 128))
    with pytest.raises(UnsupportedDtypeError, match="scale: expected dtype"):
        quantize_fp8(x, "e4m3", "row", scale=torch.ones(8, 1, device=device, dtype=torch.float16))
    with pytest.raises(InvalidArgumentError, match="scale: expected a torch.Tensor"):
        quantize_fp8(x, "e4m3", "row", scale=0.5)


def test_device_errors():
    from triton_ops_core.device import has_gpu, is_interpreter
    from triton_ops_core.exceptions import UnsupportedDeviceError

    if is_interpreter():
        with pytest.raises(UnsupportedDeviceError, match="t: expected a CUDA tensor, got a tensor on meta"):
            quantize_fp8(torch.randn(2, 2, device="meta"))
    elif has_gpu():
        x = torch.randn(4, 4, device="cuda")
        with pytest.raises(DeviceMismatchError, match="scale"):
            quantize_fp8(x, "e4m3", "tensor", scale=torch.ones(1))
        with pytest.raises(UnsupportedDeviceError):
            quantize_fp8(torch.randn(4, 4))


def test_dequantize_bad_inputs(device):
    q, s = quantize_fp8(torch.randn(8, 256, device=device), "e4m3", "row")
    with pytest.raises(UnsupportedDtypeError, match="quantized: expected dtype"):
        dequantize_fp8(q.float(), s)
    with pytest.raises(UnsupportedDtypeError, match="scale: expected dtype"):
        dequantize_fp8(q, s.half())
    with pytest.raises(UnsupportedDtypeError, match="dtype: expected"):
        dequantize_fp8(q, s, torch.int8)
    with pytest.raises(ShapeMismatchError, match="scale: size 3 in dimension 0"):
        dequantize_fp8(q, torch.ones(3, 1, device=device))
    with pytest.raises(ShapeMismatchError, match="scale: expected 2 dimensions"):
        dequantize_fp8(q, torch.ones(8, device=device))
    with pytest.raises(InvalidArgumentError, match="scale: expected a torch.Tensor"):
        dequantize_fp8(q, 1.0)


def test_scale_shapes_match_the_gemm_validation():
    from fp8_gemm.validation import a_scale_granularity, b_scale_granularity

    m, k, n = 70, 300, 260
    assert a_scale_granularity(torch.ones(scale_shape((m, k), "tensor")), m, k) == "tensor"
    assert a_scale_granularity(torch.ones(scale_shape((m, k), "row")), m, k) == "row"
    assert a_scale_granularity(torch.ones(scale_shape((m, k), "block")), m, k) == "block"
    assert b_scale_granularity(torch.ones(scale_shape((k, n), "tensor")), k, n) == "tensor"
    assert b_scale_granularity(torch.ones(scale_shape((k, n), "channel")), k, n) == "channel"
    assert b_scale_granularity(torch.ones(scale_shape((k, n), "block", role="weight")), k, n) == "block"
    assert b_scale_granularity(torch.ones(scale_shape((k, n), "group")), k, n) == "group"
    assert scale_shape((k, n), "group") == scale_shape((k, n), "block", (128, 1)) == (3, n)
    with pytest.raises(ShapeMismatchError, match=r"\[3, 260\] \(groups of 128 along K"):
        b_scale_granularity(torch.ones(3, 259), k, n)
