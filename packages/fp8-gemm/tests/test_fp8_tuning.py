"""This package's kernel-autotune family: found by name (entry point, or the tuning module's registration), its
benchmark shapes, and a prepared call that runs the kernel."""

from __future__ import annotations

import importlib.metadata

import torch
from fp8_gemm import tuning
from kernel_autotune import Tunable, available_tunables, get_tunable


def test_family_is_found_by_name():
    tunable = get_tunable("fp8_gemm")
    assert isinstance(tunable, Tunable) and tunable.name == "fp8_gemm"
    assert tunable.shapes == tuning.SHAPES and tunable.shipped.name == "tuned_configs.json"
    assert tunable.label(tuning.SHAPES[0])  # every shape has a readable label


def test_installed_package_declares_the_entry_point():
    try:
        importlib.metadata.distribution("fp8-gemm")
    except importlib.metadata.PackageNotFoundError:  # run from source: the tuning module registered it instead
        assert available_tunables()["fp8_gemm"] == "registered"
        return
    points = importlib.metadata.entry_points(group="kernel_autotune.tunables")
    assert any(p.name == "fp8_gemm" and p.value == "fp8_gemm.tuning:tunable" for p in points)


def test_prepared_call_runs_the_kernel(device):
    out = tuning.prepare({"m": 2, "n": 32, "k": 64, "scaling": "row", "out_dtype": "float32"}, device)()
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out.float()).all()
