"""The weight-only decode kernel and the Gluon group-scaled GEMM compile for Hopper (sm_90) with Triton's
compiler and ptxas, on a machine without a GPU: the CPU tests run the first under the interpreter, which never lowers
it, and cannot run the second at all (see ``_aot_compile.py`` and ``_aot_compile_wgmma.py``)."""

from __future__ import annotations

from pathlib import Path

from triton_ops_core.aot import check_compile_script


def test_weight_only_and_gated_quantization_kernels_compile_for_sm90():
    check_compile_script(Path(__file__).with_name("_aot_compile.py"), 20)


def test_gluon_scaled_gemm_variants_compile_for_sm90_without_spills():
    check_compile_script(Path(__file__).with_name("_aot_compile_wgmma.py"), 18)
