import pytest
import torch
from triton_ops_core import (
    UnsupportedDeviceError,
    can_run_on,
    device_name,
    device_peaks,
    has_gpu,
    is_interpreter,
    kernel_device,
    supports_fp8,
)
from triton_ops_core.testing import assert_close_rel, device_for_tests, poison_, relative_error


def test_interpreter_flag_follows_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert is_interpreter()
    assert kernel_device().type == "cpu"
    assert can_run_on(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not is_interpreter()
    assert not can_run_on(torch.device("cpu"))


def test_kernel_device_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if has_gpu():
        assert kernel_device().type == "cuda"
    else:
        with pytest.raises(UnsupportedDeviceError, match="TRITON_INTERPRET=1"):
            kernel_device()


def test_peaks_without_gpu_say_so(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    device_peaks.cache_clear()
    peaks = device_peaks()
    assert peaks.memory_bandwidth_gbps == 0.0 and "no GPU" in peaks.source
    assert "interpreter" in device_name()
    assert supports_fp8("cpu")
    device_peaks.cache_clear()


@pytest.mark.gpu
def test_peaks_on_gpu_are_positive_and_sourced():
    device_peaks.cache_clear()
    peaks = device_peaks()
    assert peaks.memory_bandwidth_gbps > 100 and peaks.source
    measured = device_peaks(measure=True)
    assert 0.5 * peaks.memory_bandwidth_gbps < measured.memory_bandwidth_gbps < 2 * peaks.memory_bandwidth_gbps


def test_relative_error_never_passes_nan():
    ref = torch.randn(16, dtype=torch.float64)
    out = ref.clone()
    assert relative_error(out, ref) == 0.0
    out[3] = float("nan")
    assert relative_error(out, ref) != relative_error(out, ref)  # NaN
    with pytest.raises(AssertionError, match="relative error nan"):
        assert_close_rel(out, ref, 1.0)


def test_relative_error_requires_matching_specials():
    ref = torch.randn(8, dtype=torch.float64)
    ref[0] = float("inf")
    out = ref.clone()
    assert relative_error(out, ref) == 0.0
    out[0] = -float("inf")
    assert relative_error(out, ref) != relative_error(out, ref)
    with pytest.raises(AssertionError, match="shape"):
        relative_error(torch.zeros(3), torch.zeros(4))


def test_relative_error_value():
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert relative_error(ref + torch.tensor([0.0, 0.5]), ref) == pytest.approx(0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.int32])
def test_poison_fills_with_nan_or_extreme(dtype):
    t = poison_(torch.empty(5, dtype=dtype))
    if dtype.is_floating_point:
        assert torch.isnan(t.float()).all()
    else:
        assert (t == torch.iinfo(dtype).max).all()


def test_test_device_is_cpu_under_interpreter():
    if is_interpreter():
        assert device_for_tests().type == "cpu"
