"""Every kernel compiles for Hopper (sm_90) with Triton's compiler and ptxas, on a machine without a GPU: the CPU
tests run the kernels under the interpreter, which never lowers them (see ``_aot_compile.py``)."""

from __future__ import annotations

from pathlib import Path

from triton_ops_core.aot import check_compile_script


def test_every_kernel_compiles_for_sm90():
    # route (the router split also as the whole routing), align, combine; bf16, E4M3 and E5M2 grouped GEMMs; the
    # one-row FP8 tiles at gpt-oss's layouts (their K loops streaming, the row layout's within its instruction budget,
    # and the check's control; the down GEMM with the combine in it); W8A8; the PDL launches of a decode step (the
    # route released, the triggers at the loops' ends, prefetches before the wait), bf16 one token ungrouped; the
    # few-token router (experts split over programs); the one-token row tile over K-contiguous weights
    check_compile_script(Path(__file__).with_name("_aot_compile.py"), 98)
