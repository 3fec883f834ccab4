"""The decode step's norm kernels compile for Hopper (sm_90) as launched with programmatic dependent launch, on a
machine without a GPU (see ``_aot_compile.py``)."""

from __future__ import annotations

from pathlib import Path

from triton_ops_core.aot import check_compile_script


def test_norm_kernels_compile_for_sm90_with_pdl():
    check_compile_script(Path(__file__).with_name("_aot_compile.py"), 5)
