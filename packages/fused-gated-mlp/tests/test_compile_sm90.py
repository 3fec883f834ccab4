"""The gated-MLP kernels' FP8 block- and group-scaled variants compile for Hopper (sm_90) with Triton's compiler and
ptxas, on a machine without a GPU: the CPU tests run them under the interpreter, which never lowers them (see
``_aot_compile.py``)."""

from __future__ import annotations

from pathlib import Path

from triton_ops_core.aot import check_compile_script


def test_fp8_scaled_and_gated_activation_kernels_compile_for_sm90():
    check_compile_script(Path(__file__).with_name("_aot_compile.py"), 18)
