"""Compile the Gluon block/group-scaled GEMM (``gemm_wgmma``) for Hopper (sm_90) without a GPU, and check that its
three fp32 tiles (accumulator, partial in flight, partial being scaled) fit in registers: a spill would undo the
kernel's point. Gluon kernels never run under the interpreter, so this is their only CPU check.

Run as a script by ``test_compile_sm90.py``; one ``OK``/``FAIL`` line per variant, exit status 3 without the
ahead-of-time API (or without Gluon's Hopper module).
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

from fp8_gemm import gemm_wgmma as W  # noqa: E402
from triton_ops_core.aot import AOT_UNAVAILABLE, compile_sm90  # noqa: E402

INTS = ["M", "N", "K", "stride_am", "stride_bn", "stride_cm", "SA_M", "SA_K", "NB"]

# (name, A_MODE, B_MODE, output type, bias, BLOCK_M, BLOCK_N, STAGES, warps): the default tile for the default
# recipe's scales (1x128 activations, group weights) and every other mode the TMA path routes here, and the
# 64-row, 4-warp tile
VARIANTS = [
    ("1x128 activations, group weights, bf16 out (the default recipe)", 2, 3, "*bf16", False, 128, 128, 4, 8),
    ("1x128 activations, 128x128 weight blocks, bf16 out, bias", 2, 2, "*bf16", True, 128, 128, 4, 8),
    ("per-row activations, group weights, fp32 out", 1, 3, "*fp32", False, 128, 128, 4, 8),
    ("per-tensor activations, 128x128 weight blocks, fp16 out", 0, 2, "*fp16", False, 128, 128, 4, 8),
    ("1x128 activations, group weights, 64 x 128, 4 warps", 2, 3, "*bf16", False, 64, 128, 6, 4),
]


def main() -> int:
    if W.fp8_scaled_gemm_wgmma_kernel is None:
        return AOT_UNAVAILABLE
    ok = True
    for name, a_mode, b_mode, out, bias, bm, bn, stages, warps in VARIANTS:
        types = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": out, "as_ptr": "*fp32", "bs_ptr": "*fp32",
                 "bias_ptr": "*bf16", **dict.fromkeys(INTS, "i32")}
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "STAGES": stages, "num_warps": warps}
        bm_, bn_, group_m, stages_, warps_m, instr_n = W.launch_args(cfg)
        consts = dict(A_MODE=a_mode, B_MODE=b_mode, HAS_BIAS=bias, BLOCK_M=bm_, BLOCK_N=bn_, GROUP_M=group_m,
                      STAGES=stages_, WARPS_M=warps_m, INSTR_N=instr_n, num_warps=warps)
        ok &= compile_sm90(W.fp8_scaled_gemm_wgmma_kernel, types, consts, name, warps, stages, no_spills=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
