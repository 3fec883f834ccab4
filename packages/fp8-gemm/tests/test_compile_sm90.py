"""The weight-only decode kernel compiles for Hopper (sm_90) with Triton's compiler and ptxas, on a machine without
a GPU: the CPU tests run it under the interpreter, which never lowers it (see ``_aot_compile.py``)."""

from __future__ import annotations

from pathlib import Path

from triton_ops_core.aot import check_compile_script


def test_weight_only_kernel_variants_compile_for_sm90():
    check_compile_script(Path(__file__).with_name("_aot_compile.py"), 8)
