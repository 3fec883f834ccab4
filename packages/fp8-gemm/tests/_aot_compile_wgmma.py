"""Compile the Gluon group-scaled GEMM (``gemm_wgmma``) for Hopper (sm_90) without a GPU, and check that its
three fp32 tiles (the accumulator and two partials: one in flight, one being scaled) fit in registers and that
ptxas inserts no wait for the MMA in flight before the kernel's own (either would undo the kernel's point: the
scaling overlapping the MMA). Gluon kernels never run under the interpreter, so this is their only CPU check.

Run as a script by ``test_compile_sm90.py``; one ``OK``/``FAIL`` line per variant, exit status 3 without the
ahead-of-time API, without Gluon's Hopper module, or on a Triton outside ``gemm_wgmma.VALIDATED_TRITON`` (Gluon's
API moves between releases: Triton 3.9 rejects this kernel's source).
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from fp8_gemm import gemm_wgmma as W  # noqa: E402
from triton_ops_core.aot import AOT_UNAVAILABLE, compile_sm90  # noqa: E402

INTS = ["M", "N", "K", "stride_am", "stride_bn", "stride_cm", "SA_M", "SA_K", "stride_bs"]

# (name, A_MODE, 128x128 weight blocks, output type, bias, BLOCK_M, BLOCK_N, STAGES, warps): group weights with the
# default tile (64 x 128, 4 warps) for the default recipe's activations (1x128 blocks) and the other activation
# scales the TMA path routes here, output dtypes and bias, and the 128 x 128 tile with 8 warps; block weights (the
# FP8 checkpoints' 1x128 x 128x128) on both tiles and with per-row activations
VARIANTS = [
    ("1x128 activations, bf16 out (the default recipe)", 2, False, "*bf16", False, 64, 128, 4, 4),
    ("per-row activations, fp32 out, bias", 1, False, "*fp32", True, 64, 128, 4, 4),
    ("per-tensor activations, fp16 out", 0, False, "*fp16", False, 64, 128, 3, 4),
    ("1x128 activations, 128 x 128, 8 warps, bias", 2, False, "*bf16", True, 128, 128, 4, 8),
    ("block weights, 1x128 activations, bf16 out", 2, True, "*bf16", False, 64, 128, 4, 4),
    ("block weights, 1x128 activations, 128 x 128, 8 warps, bias", 2, True, "*bf16", True, 128, 128, 4, 8),
    ("block weights, per-row activations, fp32 out", 1, True, "*fp32", False, 64, 128, 4, 4),
    ("256 x 128 tiles, block weights, 1x128 activations, bf16 out", 2, True, "*bf16", False, 256, 128, 4, 8),
    ("256 x 128 tiles, group weights, 1x128 activations, bias", 2, False, "*bf16", True, 256, 128, 4, 8),
    ("256 x 128 tiles, block weights, per-row activations, fp32 out, bias", 1, True, "*fp32", True, 256, 128, 4, 8),
]
# The 256 x 128 kernel with a in registers (A_REGS, explicit configs only): checked for ptxas-injected waits (its
# register operand must stay untouched while the MMA reads it) but not for spills: the block-weight variant reloads a
# few 64-bit scale pointers from local memory (L1) each K block (17 operations in sm_90 SASS, session 48).
REGISTER_A_VARIANTS = [
    ("256 x 128 tiles, a in registers, block weights, 1x128 activations, bf16 out", 2, True, "*bf16", False, 256,
     128, 4, 8),
    ("256 x 128 tiles, a in registers, group weights, per-row activations, bias", 1, False, "*bf16", True, 256, 128,
     3, 8),
]


# The warp-specialized 128 x 128 kernel (PINGPONG configs: a TMA partition and two consumer warp groups, one
# partial each), at its launch's register cap: no spills, no injected waits.
# B_MODE: gemm_kernels' weight-scale modes (0 tensor, 1 channel, 2 block, 3 group).
PINGPONG_VARIANTS = [
    ("ping-pong 128 x 128, block weights, 1x128 activations, bf16 out", 2, 2, "*bf16", False),
    ("ping-pong 128 x 128, group weights, 1x128 activations, bias", 2, 3, "*bf16", True),
    ("ping-pong 128 x 128, block weights, per-row activations, fp32 out, bias", 1, 2, "*fp32", True),
    ("ping-pong 128 x 128, channel weights, per-row activations, bf16 out", 1, 1, "*bf16", False),
    ("ping-pong 128 x 128, channel weights, 1x128 activations, bias", 2, 1, "*bf16", True),
    ("ping-pong 128 x 128, per-tensor weights and activations, fp16 out", 0, 0, "*fp16", False),
]


def main() -> int:
    if W.fp8_group_gemm_wgmma_kernel is None or not triton.__version__.startswith(W.VALIDATED_TRITON):
        return AOT_UNAVAILABLE  # no Gluon here, or a Triton the package never sends these calls to the kernel on
    ok = True
    variants = [(v, False) for v in VARIANTS] + [(v, True) for v in REGISTER_A_VARIANTS]
    for (name, a_mode, b_blocks, out, bias, bm, bn, stages, warps), a_regs in variants:
        types = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": out, "as_ptr": "*fp32", "bs_ptr": "*fp32",
                 "bias_ptr": "*bf16", **dict.fromkeys(INTS, "i32")}
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "STAGES": stages, "num_warps": warps, "A_REGS": a_regs}
        consts = dict(A_MODE=a_mode, B_BLOCKS=b_blocks, HAS_BIAS=bias, num_warps=warps)
        if bm == W.TALL_BLOCK_M:
            consts.update(zip(("GROUP_M", "STAGES", "A_REGS"), W.launch_args(cfg)))
        else:
            consts.update(zip(("BLOCK_M", "BLOCK_N", "GROUP_M", "STAGES", "WARPS_M", "INSTR_N"), W.launch_args(cfg)))
        ok &= compile_sm90(W.kernel_for(cfg), types, consts, name, warps, stages, no_spills=not a_regs,
                           no_injected_waits=True)
    for name, a_mode, b_mode, out, bias in PINGPONG_VARIANTS:
        types = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": out, "as_ptr": "*fp32", "bs_ptr": "*fp32",
                 "bias_ptr": "*bf16", **dict.fromkeys(INTS, "i32")}
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "STAGES": 4, "num_warps": 4, "PINGPONG": True}
        consts = dict(A_MODE=a_mode, B_MODE=b_mode, HAS_BIAS=bias, num_warps=4,
                      **dict(zip(("GROUP_M", "STAGES", "CONSUMER_REGS"), W.launch_args(cfg))))
        ok &= compile_sm90(W.kernel_for(cfg), types, consts, name, 4, 4, no_spills=True, no_injected_waits=True,
                           options=W.launch_options(cfg))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
