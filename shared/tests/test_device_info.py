"""Device identity and properties (``device_info``): what tuned-config tables are keyed by (product name and compute
capability) and what launch heuristics read; ``simulate_device`` for tests of GPUs that are not there."""

from __future__ import annotations

import types

import pytest
import torch
from triton_ops_core import device as core_device
from triton_ops_core.device import (
    CPU_INTERPRETER,
    DeviceInfo,
    _estimated_bandwidth,
    device_info,
    lookup_by_device,
    on_device_change,
    simulate_device,
    sm_count,
)
from triton_ops_core.exceptions import InvalidArgumentError

H200 = DeviceInfo("NVIDIA H200", (9, 0), 132, 60 * 2**20, 227 * 1024, 4300.0, True, "simulated")
H100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), 132, 50 * 2**20, 227 * 1024, 3017.0, True, "simulated")


def test_the_cpu_is_the_interpreter_record(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for dev in ("cpu", torch.device("cpu"), None):
        assert device_info(dev) is CPU_INTERPRETER
    assert CPU_INTERPRETER.identity == ("cpu-interpreter", None) and not CPU_INTERPRETER.is_gpu
    assert CPU_INTERPRETER.arch == "cpu" and CPU_INTERPRETER.bandwidth_class == "unknown"
    assert CPU_INTERPRETER.describe() == "cpu-interpreter" and CPU_INTERPRETER.bytes_in_flight_per_sm() == 0.0


def test_simulation_answers_for_every_device_and_is_undone():
    seen = []

    def listener():
        seen.append(device_info("cpu").name)

    on_device_change(listener)
    try:
        _check_simulation(seen)
    finally:
        core_device._simulation_listeners.remove(listener)


def _check_simulation(seen):
    with simulate_device(H200) as info:
        assert info is H200 and device_info("cpu") is H200 and device_info(0) is H200
        assert sm_count(torch.device("cpu"), cpu=4) == 132
        with simulate_device(H100):
            assert device_info() is H100
        assert device_info() is H200
    assert device_info("cpu") is not H200 and sm_count(torch.device("cpu"), cpu=4) == 4
    assert seen[-4:] == ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H200", device_info("cpu").name]
    with pytest.raises(InvalidArgumentError, match="DeviceInfo"):
        with simulate_device(("NVIDIA H200", "9.0")):
            pass


def test_identity_and_derived_properties():
    assert H200.identity == ("NVIDIA H200", "9.0") and H200.capability_str == "9.0" and H200.arch == "sm_90"
    assert (H100.bandwidth_class, H200.bandwidth_class) == ("high", "very high")
    assert H200.bytes_in_flight_per_sm() > H100.bytes_in_flight_per_sm() > 10_000  # Little's law: ~13.7 KB on an H100
    assert H200.describe() == ("NVIDIA H200 (sm_90: 132 SMs, 60 MiB L2, 227 KiB shared memory per block, "
                               "~4300 GB/s)")
    assert H200.to_dict()["capability"] == (9, 0)


def test_tables_are_matched_by_name_and_capability_only():
    table = {("NVIDIA H100 80GB HBM3", "9.0"): "h100", ("NVIDIA H200", "10.0"): "not this one"}
    with simulate_device(H100):
        assert lookup_by_device(table) == "h100"
    with simulate_device(H200):  # same SMs and capability as the H100, another product: nothing
        assert lookup_by_device(table, "cuda:0") is None


def test_bandwidth_estimates():
    props = types.SimpleNamespace(memory_clock_rate=2_619_000, memory_bus_width=5120)  # an H100 SXM's interface
    est, where = _estimated_bandwidth(props, "Some future GPU")
    assert est == pytest.approx(0.9 * 3352, rel=1e-3) and "estimated" in where
    assert _estimated_bandwidth(props, "NVIDIA H200")[0] == 4300.0  # measured figures win
    assert _estimated_bandwidth(types.SimpleNamespace(), "Unknown") == (0.0, "unknown")


@pytest.mark.gpu
def test_a_real_gpu_reports_its_identity_and_properties():
    info = device_info()
    assert info.is_gpu and info.name == torch.cuda.get_device_name()
    assert info.capability == torch.cuda.get_device_capability()
    assert info.sm_count == torch.cuda.get_device_properties(0).multi_processor_count
    assert info.l2_bytes > 0 and info.smem_per_block >= 48 * 1024 and info.memory_bandwidth_gbps > 100
    print(f"\n{info.describe()} [{info.source}]")
