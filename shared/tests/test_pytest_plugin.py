"""The shared pytest plugin's interpreter shortcut: a @triton.jit helper called inside a kernel does not patch
triton.language again where the launch (or an earlier helper call) has; kernels compute what they computed."""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl
from triton_ops_core import pytest_plugin
from triton_ops_core.device import is_interpreter

pytestmark = pytest.mark.skipif(not is_interpreter(), reason="the shortcut is for Triton's interpreter")


@triton.jit
def _row_stats(x):
    # tl.sum and tl.max are triton.language.standard's jit functions: helpers whose globals hold
    # triton.language.core, which this module's kernel does not patch itself
    return tl.sum(x, axis=0), tl.max(x, axis=0)


@triton.jit
def _scaled(x, scale):
    total, largest = _row_stats(x)
    return (x - largest) * scale + total


@triton.jit
def _helpers_kernel(x_ptr, out_ptr, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * BLOCK + offs)
    tl.store(out_ptr + row * BLOCK + offs, _scaled(x, scale))


@triton.jit
def _failing_helper(x):
    tl.static_assert(x.shape[0] == 3, "a helper's own error")
    return x


@triton.jit
def _failing_kernel(x_ptr, BLOCK: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, BLOCK))
    tl.store(x_ptr + tl.arange(0, BLOCK), _failing_helper(x))


@pytest.mark.skipif(os.environ.get("TRITON_OPS_INTERPRETER_AS_IS") == "1", reason="the shortcut switched off")
def test_the_shortcut_is_installed_under_the_interpreter():
    from triton.runtime import interpreter

    assert getattr(interpreter.InterpretedFunction.__call__, "_triton_ops_skip_repatch", False)
    assert pytest_plugin._skip_repatching_in_device_calls()  # a second call changes nothing and says so


def test_nested_helpers_compute_the_reference_on_every_call():
    torch.manual_seed(0)
    for rows in (1, 3):  # more than one launch: the first helper call patches core, later ones do not
        x = torch.randn(rows, 32)
        out = torch.full_like(x, float("nan"))
        _helpers_kernel[(rows,)](x, out, 0.5, BLOCK=32)
        expected = (x - x.max(dim=1, keepdim=True).values) * 0.5 + x.sum(dim=1, keepdim=True)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    # after the launches, triton.language's builtins are Triton's own again (the launch's patching undone)
    assert getattr(tl.load, "__triton_builtin__", False) and getattr(tl.arange, "__triton_builtin__", False)


def test_an_error_inside_a_helper_still_raises():
    from triton.runtime.interpreter import InterpreterError

    with pytest.raises(InterpreterError, match="helper.*own error"):
        _failing_kernel[(1,)](torch.zeros(4), BLOCK=4)


def test_another_tritons_helper_call_is_left_as_it_is(monkeypatch):
    from triton.runtime import interpreter

    def other_call(self, *args, **kwargs):  # not the body the shortcut was written for
        return self.rewrite()(*args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "__call__", other_call)
    assert not pytest_plugin._skip_repatching_in_device_calls()
    assert interpreter.InterpretedFunction.__call__ is other_call


@pytest.mark.skipif(os.environ.get("TRITON_OPS_INTERPRETER_AS_IS") == "1", reason="the shortcut switched off")
def test_the_numpy_dtype_lookup_answers_as_tritons_own_function():
    from triton.runtime import interpreter

    lookup = interpreter._get_np_dtype
    assert getattr(lookup, "_triton_ops_table", False)
    assert pytest_plugin._np_dtype_lookup()  # a second call changes nothing and says so
    import numpy as np

    expected = [(tl.float32, np.float32), (tl.bfloat16, np.uint16), (tl.float8e4nv, np.uint8), (tl.int1, bool),
                (tl.int64, np.int64), (tl.pointer_type(tl.float16), np.uint64)]
    for t, want in expected:
        assert lookup(t) == np.dtype(want) and lookup(tl.block_type(t, [4, 2])) == np.dtype(want)
    with pytest.raises(KeyError):  # as Triton's: a type without a numpy form
        lookup(tl.void)


def test_a_numpy_dtype_function_that_answers_otherwise_is_left_as_it_is(monkeypatch):
    import numpy as np
    from triton.runtime import interpreter

    def other(tt_dtype):  # answers that a table by element type cannot give: a block's shape decides
        return np.dtype(np.float64 if isinstance(tt_dtype, tl.block_type) and tt_dtype.shape == (2, 8) else np.float32)

    monkeypatch.setattr(interpreter, "_get_np_dtype", other)
    assert not pytest_plugin._np_dtype_lookup()
    assert interpreter._get_np_dtype is other


def test_tuple_types_are_named_as_triton_names_them():
    from triton.language import core

    t = core.tuple_type([tl.float32, tl.pointer_type(tl.int8)], ["a", "b"])
    assert t.name == str(t) == "[a:fp32,b:pointer<int8>]"
    assert core.tuple_type([tl.int32]).name == core.tuple_type([tl.int32]).name
    assert t == core.tuple_type([tl.float32, tl.pointer_type(tl.int8)], ["a", "b"])
    assert t != core.tuple_type([tl.float32, tl.pointer_type(tl.int16)], ["a", "b"])


def test_another_tritons_tuple_type_is_left_as_it_is(monkeypatch):
    from triton.language import core

    class other_tuple_type:  # a constructor the shortcut was not written for
        def __init__(self, types, fields=None):
            self.types, self.fields, self.name = types, fields, "other"

    monkeypatch.setattr(core, "tuple_type", other_tuple_type)
    assert not pytest_plugin._tuple_type_named_when_asked()
    assert other_tuple_type([tl.int32]).name == "other"
