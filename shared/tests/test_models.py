import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from triton_ops_core import FP8Format, InvalidArgumentError, KernelMetrics, TensorSpec, TrialResult, TuningResult


@pytest.mark.parametrize("fmt", [FP8Format.E4M3, FP8Format.E5M2])
def test_fp8_format_constants_match_torch(fmt):
    info = torch.finfo(fmt.torch_dtype)
    assert fmt.max_value == info.max
    assert fmt.min_normal == info.smallest_normal
    assert fmt.bits == info.bits == 8
    assert 1 + fmt.exponent_bits + fmt.mantissa_bits == 8
    # the smallest subnormal is representable and half of it rounds to zero
    assert torch.tensor(fmt.min_subnormal).to(fmt.torch_dtype).float().item() == fmt.min_subnormal
    assert torch.tensor(fmt.min_subnormal / 4).to(fmt.torch_dtype).float().item() == 0.0


def test_fp8_format_lookup_and_triton_dtype():
    import triton.language as tl

    assert FP8Format.from_name("E4M3") is FP8Format.E4M3
    assert FP8Format.from_name(torch.float8_e5m2) is FP8Format.E5M2
    assert FP8Format.from_dtype(torch.float16) is None
    assert FP8Format.E4M3.triton_dtype == tl.float8e4nv
    assert FP8Format.E5M2.triton_dtype == tl.float8e5
    with pytest.raises(InvalidArgumentError, match="fmt: expected 'e4m3' or 'e5m2'"):
        FP8Format.from_name("e3m4")


@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.sampled_from([torch.float16, torch.float32, torch.int8]))
def test_tensor_spec_matches_tensor(shape, dtype):
    t = torch.empty(shape, dtype=dtype)
    spec = TensorSpec.from_tensor(t)
    assert spec.numel == t.numel()
    assert spec.nbytes == t.numel() * t.element_size()
    assert spec.is_contiguous
    assert TensorSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_tensor_spec_detects_non_contiguous():
    t = torch.empty(4, 6).t()
    assert not TensorSpec.from_tensor(t).is_contiguous


@given(
    st.floats(1e-4, 1e3),
    st.integers(1, 10**12),
    st.integers(1, 10**15),
    st.floats(100, 5000),
)
def test_kernel_metrics_derivations(latency_ms, nbytes, flops, peak):
    m = KernelMetrics.from_timing(latency_ms, bytes_moved=nbytes, flops=flops, work_items=7, peak_bandwidth_gbps=peak)
    seconds = latency_ms / 1e3
    assert math.isclose(m.bandwidth_gbps, nbytes / seconds / 1e9, rel_tol=1e-12)
    assert math.isclose(m.bandwidth_pct_of_peak, 100 * m.bandwidth_gbps / peak, rel_tol=1e-12)
    assert math.isclose(m.tflops, flops / seconds / 1e12, rel_tol=1e-12)
    assert math.isclose(m.throughput, 7 / seconds, rel_tol=1e-12)
    assert KernelMetrics.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_kernel_metrics_rejects_nonpositive_latency():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(InvalidArgumentError, match="latency_ms"):
            KernelMetrics.from_timing(bad)


def test_kernel_metrics_without_peak_or_flops():
    m = KernelMetrics.from_timing(2.0, bytes_moved=2 * 10**9)
    assert m.bandwidth_gbps == pytest.approx(1000.0)
    assert m.bandwidth_pct_of_peak is None and m.tflops is None


def test_tuning_result_json_round_trip():
    trials = (
        TrialResult({"BLOCK_SIZE": 64, "num_warps": 4}, 0.5, 0.01),
        TrialResult({"BLOCK_SIZE": 1024, "num_warps": 8}, error="OutOfResources: shared memory"),
    )
    best = {"BLOCK_SIZE": 64, "num_warps": 4}
    result = TuningResult(best, KernelMetrics.from_timing(0.5), trials, "k", {"tokens": 64})
    assert trials[0].ok and not trials[1].ok
    assert TuningResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
