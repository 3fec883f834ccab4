"""This package's kernel-autotune family: found by name (entry point, or the tuning module's registration), its
benchmark shapes, and a prepared call that runs the kernel."""

from __future__ import annotations

from kernel_autotune.testing import check_family


def test_the_family_is_found_and_runs(device):
    small = {"batch": 1, "seq": 3, "hidden": 32, "head_dim": 16, "dtype": "float32"}
    check_family("fused_rmsnorm_rope", "fused-rmsnorm-rope", small, device)
