"""The building blocks: each rejects bad input with the right exception and a message naming the argument."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from triton_ops_core import (
    DeviceMismatchError,
    InvalidArgumentError,
    LayoutError,
    ShapeMismatchError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
)
from triton_ops_core.validation import common as v

ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64,
              torch.float8_e4m3fn, torch.float8_e5m2, torch.bool]
shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4)


def test_check_tensor_rejects_non_tensors():
    for bad in (None, 3, [1.0], "x"):
        with pytest.raises(InvalidArgumentError, match=r"^weight: expected a torch.Tensor"):
            v.check_tensor(bad, "weight")
    t = torch.ones(2)
    assert v.check_tensor(t, "weight") is t


@given(st.sampled_from(ALL_DTYPES), st.lists(st.sampled_from(ALL_DTYPES), min_size=1, max_size=4, unique=True))
def test_check_dtype(dtype, allowed):
    t = torch.empty(2, dtype=dtype)
    if dtype in allowed:
        v.check_dtype(t, "x", allowed)
    else:
        with pytest.raises(UnsupportedDtypeError, match=r"^x: expected dtype in .* got " + str(dtype)[6:]):
            v.check_dtype(t, "x", allowed)


@given(st.sampled_from(ALL_DTYPES), st.sampled_from(ALL_DTYPES))
def test_check_same_dtype_names_the_odd_one(d1, d2):
    a, b = torch.empty(1, dtype=d1), torch.empty(1, dtype=d2)
    if d1 == d2:
        v.check_same_dtype(a=a, b=b, c=None)
    else:
        with pytest.raises(UnsupportedDtypeError, match=r"^b: expected the dtype of a"):
            v.check_same_dtype(a=a, b=b, c=None)


@given(shapes, st.integers(1, 5))
def test_check_ndim(shape, want):
    t = torch.empty(shape)
    if len(shape) == want:
        v.check_ndim(t, "q", exact=want)
    else:
        with pytest.raises(ShapeMismatchError, match=rf"^q: expected {want} dimensions, got {len(shape)}"):
            v.check_ndim(t, "q", exact=want)
    if len(shape) >= want:
        v.check_ndim(t, "q", minimum=want)
    else:
        with pytest.raises(ShapeMismatchError, match=rf"^q: expected at least {want} dimensions"):
            v.check_ndim(t, "q", minimum=want)


@given(shapes, st.data())
def test_check_shape_with_wildcards(shape, data):
    t = torch.empty(shape)
    expected = [data.draw(st.one_of(st.none(), st.just(s))) for s in shape]
    v.check_shape(t, "cos", expected)
    i = data.draw(st.integers(0, len(shape) - 1))
    wrong = list(shape)
    wrong[i] = shape[i] + 1
    with pytest.raises(ShapeMismatchError, match=r"^cos: expected shape \["):
        v.check_shape(t, "cos", wrong)
    with pytest.raises(ShapeMismatchError, match=r"^cos: expected shape"):
        v.check_shape(t, "cos", list(shape) + [1])


@given(st.integers(0, 1000), st.integers(1, 64))
def test_check_divisible(value, divisor):
    if value % divisor == 0:
        v.check_divisible(value, divisor, "hidden")
    else:
        with pytest.raises(ShapeMismatchError, match=rf"^hidden: expected a multiple of {divisor}.* got {value}"):
            v.check_divisible(value, divisor, "hidden")


def test_check_dim_size():
    t = torch.empty(3, 5)
    v.check_dim_size(t, "w", 1, 5)
    with pytest.raises(ShapeMismatchError, match=r"^w: expected size 4 in dimension 1 to match x's hidden size, got 5"):
        v.check_dim_size(t, "w", 1, 4, "x's hidden size")


def test_check_same_device():
    a = torch.empty(1)
    v.check_same_device(a=a, b=torch.empty(1), c=None)
    meta = torch.empty(1, device="meta")
    with pytest.raises(DeviceMismatchError, match=r"^b: expected device cpu \(that of a\), got meta"):
        v.check_same_device(a=a, b=meta)


def test_check_kernel_device(monkeypatch):
    t = torch.empty(2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    v.check_kernel_device(t, "x")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UnsupportedDeviceError, match=r"^x: expected a CUDA tensor, got a CPU tensor.*TRITON_INTERPRET"):
        v.check_kernel_device(t, "x")
    with pytest.raises(UnsupportedDeviceError, match=r"^x: expected a CUDA tensor, got a tensor on meta"):
        v.check_kernel_device(torch.empty(1, device="meta"), "x")


def test_layout_checks():
    t = torch.empty(4, 6)
    v.check_contiguous(t, "a")
    v.check_last_dim_contiguous(t[:, :3], "a")
    with pytest.raises(LayoutError, match=r"^a: expected unit stride in the last dimension"):
        v.check_last_dim_contiguous(t.t(), "a")
    with pytest.raises(LayoutError, match=r"^a: expected a contiguous tensor"):
        v.check_contiguous(t[:, :3], "a")


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.text(max_size=2)))
def test_check_positive(value):
    good = isinstance(value, (int, float)) and value > 0 and value != float("inf")
    if good:
        v.check_positive(value, "eps")
    else:
        with pytest.raises(InvalidArgumentError, match=r"^eps: expected a positive finite number"):
            v.check_positive(value, "eps")


def test_check_choice():
    v.check_choice("silu", "activation", ("silu", "gelu"))
    with pytest.raises(InvalidArgumentError, match=r"^activation: expected one of 'silu', 'gelu', got 'relu'"):
        v.check_choice("relu", "activation", ("silu", "gelu"))


def test_memory_span_and_overlap():
    x = torch.zeros(4, 6, dtype=torch.bfloat16)
    assert v.memory_span(x) == 24 * 2
    assert v.memory_span(x[:, :3]) == (3 * 6 + 2 + 1) * 2  # strided rows: first to last element
    assert v.memory_span(x[:0]) == 0
    out = torch.zeros(4, 6, dtype=torch.bfloat16)
    v.check_no_overlap(out, "residual", v.memory_span(out), x, "x", v.memory_span(x))  # separate tensors pass
    # adjacent halves pass
    v.check_no_overlap(x[2:], "residual", v.memory_span(x[2:]), x[:2], "x", v.memory_span(x[:2]))
    for a, b in ((x, x), (x[1:], x), (x[:, 1:], x[:, :2]), (x.t(), x)):
        with pytest.raises(InvalidArgumentError, match=r"^residual: shares memory with x"):
            v.check_no_overlap(a, "residual", v.memory_span(a), b, "x", v.memory_span(b))
    v.check_no_overlap(x[:0], "residual", 0, x, "x", v.memory_span(x))  # nothing written: nothing shared
