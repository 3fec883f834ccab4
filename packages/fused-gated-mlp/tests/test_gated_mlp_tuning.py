"""This package's kernel-autotune family: found by name (entry point, or the tuning module's registration), its
benchmark shapes, and a prepared call that runs the kernel."""

from __future__ import annotations

from kernel_autotune.testing import check_family


def test_the_family_is_found_and_runs(device):
    small = {"tokens": 2, "hidden": 32, "intermediate": 16, "dtype": "float32"}
    check_family("fused_gated_mlp", "fused-gated-mlp", small, device)
