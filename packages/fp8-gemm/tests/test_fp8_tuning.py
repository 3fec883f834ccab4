"""This package's kernel-autotune family: found by name (entry point, or the tuning module's registration), its
benchmark shapes, and a prepared call that runs the kernel."""

from __future__ import annotations

from kernel_autotune.testing import check_family


def test_the_family_is_found_and_runs(device):
    small = {"m": 2, "n": 32, "k": 64, "scaling": "row", "out_dtype": "float32"}
    check_family("fp8_gemm", "fp8-gemm", small, device)
