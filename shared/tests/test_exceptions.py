import pytest
from triton_ops_core import exceptions as exc


@pytest.mark.parametrize(
    "cls, builtin",
    [
        (exc.ShapeMismatchError, ValueError),
        (exc.UnsupportedDtypeError, TypeError),
        (exc.DeviceMismatchError, ValueError),
        (exc.UnsupportedDeviceError, RuntimeError),
        (exc.LayoutError, ValueError),
        (exc.InvalidArgumentError, ValueError),
        (exc.NumericalOverflowError, ArithmeticError),
    ],
)
def test_every_error_is_a_kernel_error_and_its_natural_builtin(cls, builtin):
    err = cls("x: expected 2 dimensions, got 3")
    assert isinstance(err, exc.TritonKernelError)
    assert isinstance(err, builtin)
    with pytest.raises(exc.TritonKernelError, match="x: expected"):
        raise err


def test_all_names_exported():
    import triton_ops_core

    for name in exc.__all__:
        assert getattr(triton_ops_core, name) is getattr(exc, name)
