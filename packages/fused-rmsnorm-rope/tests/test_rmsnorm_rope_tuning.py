"""This package's kernel-autotune family: found by name (entry point, or the tuning module's registration), its
benchmark shapes, and a prepared call that runs the kernel."""

from __future__ import annotations

import importlib.metadata

import torch
from fused_rmsnorm_rope import tuning
from kernel_autotune import Tunable, available_tunables, get_tunable


def test_family_is_found_by_name():
    tunable = get_tunable("fused_rmsnorm_rope")
    assert isinstance(tunable, Tunable) and tunable.name == "fused_rmsnorm_rope"
    assert tunable.shapes == tuning.SHAPES and tunable.shipped.name == "tuned_configs.json"
    assert tunable.label(tuning.SHAPES[0])  # every shape has a readable label


def test_installed_package_declares_the_entry_point():
    try:
        importlib.metadata.distribution("fused-rmsnorm-rope")
    except importlib.metadata.PackageNotFoundError:  # run from source: the tuning module registered it instead
        assert available_tunables()["fused_rmsnorm_rope"] == "registered"
        return
    points = importlib.metadata.entry_points(group="kernel_autotune.tunables")
    assert any(p.name == "fused_rmsnorm_rope" and p.value == "fused_rmsnorm_rope.tuning:tunable" for p in points)


def test_prepared_call_runs_the_kernel(device):
    out = tuning.prepare({"batch": 1, "seq": 3, "hidden": 32, "head_dim": 16, "dtype": "float32"}, device)()
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out.float()).all()
