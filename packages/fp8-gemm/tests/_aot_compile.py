"""Compile the weight-only decode kernel's variants and the gated quantization kernels for sm_90 (Hopper) with
Triton's own compiler and ptxas, without a GPU.

Run as a script by ``test_compile_sm90.py`` in a process without ``TRITON_INTERPRET`` (the interpreter never lowers a
kernel: the E4M3 up-conversion, the deferred RMSNorm and register use are only checked by compiling). Prints one
``OK``/``FAIL`` line per variant; exit status 3 when this Triton has no ahead-of-time API this script knows.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

from fp8_gemm import quantize_kernels as Q  # noqa: E402
from fp8_gemm import weight_only_kernels as W  # noqa: E402
from triton_ops_core.aot import compile_sm90  # noqa: E402


def _norm_out_block(rows: int) -> int:  # (the plan's NORM_OUT_BLOCK for a 4096-wide output)
    from fp8_gemm.weight_only import norm_out_block

    return norm_out_block(4096, rows, False)


INTS = ["M", "N", "K", "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_om", "stride_sk", "stride_sn",
        "stride_bias", "tiles_per_split"]

# (name, weight type, SCALE_MODE, NORM, ADD_OUT, USE_DOT, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K[, F16_DOT[, warps]]):
# the decode configs weight_only_config picks at one row (FMA tiles, bf16 and E4M3 weights) and at 16 rows
# (tensor-core tile, split K), with the deferred RMSNorm and the residual epilogue
VARIANTS = [
    ("bf16 weight, one row, deferred norm", "*bf16", W.SCALE_NONE, True, False, False, 1, 8, 512, 1),
    ("E4M3 channel scales, one row, deferred norm, residual add", "*fp8e4nv", W.SCALE_CHANNEL, True, True, False, 1,
     16, 512, 1),
    ("E4M3 block scales, 16 rows, split K, deferred norm", "*fp8e4nv", W.SCALE_BLOCK, True, False, True, 16, 32, 128,
     4),
    # group scales: the one-row FMA tile (16-element partial sums, a scale per row and 128 columns of its 512-deep
    # K step; the default's 16 columns, and 32) and 16 rows
    ("E4M3 group scales, one row, residual add", "*fp8e4nv", W.SCALE_GROUP, False, True, False, 1, 16, 512, 1),
    ("E4M3 group scales, one row, 32 columns, deferred norm", "*fp8e4nv", W.SCALE_GROUP, True, False, False, 1, 32,
     512, 1),
    ("E4M3 group scales, 16 rows, split K", "*fp8e4nv", W.SCALE_GROUP, False, False, True, 16, 32, 128, 4),
    # 128x128 block scales on the one-row FMA tile: a block scale per 16-element partial sum, like the groups
    ("E4M3 block scales, one row, residual add", "*fp8e4nv", W.SCALE_BLOCK, False, True, False, 1, 16, 512, 1),
    # fp16 tensor-core dots for bf16 activations (F16_DOT), the tiles _f16_dot_tile picks: 64 x 128 (4 warps) with
    # split K; channel scales at K >= 8192: 128 x 256, 8 warps; the deferred RMSNorm and residual add on one
    ("E4M3 group scales, 16 rows, split K, fp16 dots", "*fp8e4nv", W.SCALE_GROUP, False, False, True, 16, 64, 128, 4,
     True),
    ("E4M3 channel scales, 16 rows, split K, fp16 dots, 8 warps, deferred norm, residual add", "*fp8e4nv",
     W.SCALE_CHANNEL, True, True, True, 16, 128, 256, 4, True, 8),
    # with programmatic dependent launch (triton_ops_core.pdl): each program's first weight lines prefetched into
    # L2 before it waits on the previous kernel; one-row FMA tiles (bf16, E4M3 group scales) and a split-K dot tile
    ("PDL: bf16 weight, one row, residual add", "*bf16", W.SCALE_NONE, False, True, False, 1, 8, 512, 1, False, 4,
     8),
    ("PDL: E4M3 group scales, one row", "*fp8e4nv", W.SCALE_GROUP, False, False, False, 1, 16, 512, 1, False, 4, 8),
    ("PDL: E4M3 group scales, 16 rows, split K, fp16 dots", "*fp8e4nv", W.SCALE_GROUP, False, False, True, 16, 64,
     128, 4, True, 4, 2),
    # the output's RMSNorm in the launch (NORM_OUT: an output projection's residual stream and the post-attention
    # norm): bf16 and E4M3 channel weights at one row, with and without split K, and the 16-row dot tile
    ("bf16 weight, one row, residual add, output norm", "*bf16", W.SCALE_NONE, False, True, False, 1, 8, 512, 1,
     False, 4, 0, True),
    ("E4M3 channel scales, one row, split K, residual add, output norm", "*fp8e4nv", W.SCALE_CHANNEL, False, True,
     False, 1, 16, 512, 2, False, 4, 0, True),
    ("E4M3 channel scales, 16 rows, split K, fp16 dots, residual add, output norm", "*fp8e4nv", W.SCALE_CHANNEL,
     False, True, True, 16, 64, 128, 4, True, 4, 0, True),
]


def main() -> int:
    ok = True
    for name, wtype, mode, norm, add_out, dot, bm, bn, bk, split, *extra in VARIANTS:
        f16 = extra[0] if extra else False
        warps = extra[1] if len(extra) > 1 else 4
        prefetch = extra[2] if len(extra) > 2 else 0  # PDL with that many prefetched lines a row
        norm_out = extra[3] if len(extra) > 3 else False
        types = {"x_ptr": "*bf16", "w_ptr": wtype, "out_ptr": "*bf16", "s_ptr": "*fp32", "bias_ptr": "*bf16",
                 "cnt_ptr": "*i32", "ws_ptr": "*fp32", "nw_ptr": "*bf16", "res_ptr": "*bf16", "normed_ptr": "*bf16",
                 "nwo_ptr": "*bf16", "sq_ptr": "*fp64", "norm_eps": "fp32", "norm_out_eps": "fp32",
                 **dict.fromkeys(INTS, "i32")}
        consts = dict(SCALE_MODE=mode, HAS_BIAS=False, ADD_OUT=add_out, NORM=norm,
                      USE_DOT=dot, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, EVEN_K=True, EVEN_N=True,
                      NUM_STAGES=4, EMULATE=False, F16_DOT=bool(f16), PDL=bool(prefetch), PREFETCH_LINES=prefetch,
                      NORM_OUT=norm_out, NORM_OUT_BLOCK=_norm_out_block(bm) if norm_out else 1,
                      NORM_OUT_N_BLOCKS=256 if norm_out else 1)
        ok &= compile_sm90(W.fp8_weight_only_kernel, types, consts, name, warps, 4)
    ok &= _gated_quantization()
    return 0 if ok else 1


# quantize_gated_fp8's kernels as fp8_gemm.gated plans them: rows in registers (SINGLE, up to 16384 columns:
# Llama-3-8B's 14336), a row walked twice (longer ones), 1x128 blocks; SwiGLU, gpt-oss's and GeGLU (tanh); the E4M3
# cast must lower to the hardware's saturating conversion
GATED = [
    ("gated rows, bf16 silu, one row of 16384 in registers", Q._quant_gated_rows_kernel, "*bf16", 0, 16,
     dict(BLOCK_R=1, BLOCK_C=16384, SINGLE=True)),
    ("gated rows, fp16 swiglu_oai, four rows of 1024 in registers", Q._quant_gated_rows_kernel, "*fp16", 3, 4,
     dict(BLOCK_R=4, BLOCK_C=1024, SINGLE=True)),
    ("gated rows, bf16 silu, two passes", Q._quant_gated_rows_kernel, "*bf16", 0, 4,
     dict(BLOCK_R=1, BLOCK_C=4096, SINGLE=False)),
    ("gated 1x128 blocks, bf16 silu", Q._quant_gated_groups_kernel, "*bf16", 0, 4, dict(BLOCK_R=32, GROUP=128)),
    ("gated 1x128 blocks, fp16 gelu_tanh", Q._quant_gated_groups_kernel, "*fp16", 2, 4, dict(BLOCK_R=32, GROUP=128)),
]


def _gated_quantization() -> bool:
    ok = True
    for name, kernel, dtype, act, warps, tiles in GATED:
        ints = ["R", "C", "stride_gr", "stride_ur", "stride_qr"] + (["stride_sr"] if "GROUP" in tiles else [])
        types = {"gate_ptr": dtype, "up_ptr": dtype, "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "alpha": "fp32",
                 "limit": "fp32", **dict.fromkeys(ints, "i32")}
        consts = dict(ACTIVATION=act, MAX_VALUE=448.0, IS_E4M3=True, EMULATE=False, **tiles)
        ok &= compile_sm90(kernel, types, consts, name, warps, 1, no_spills=True, ptx_has=("satfinite.e4m3x2",),
                           divisible=("gate_ptr", "up_ptr", "q_ptr", "C", "stride_gr", "stride_ur", "stride_qr"))
    return ok


if __name__ == "__main__":
    sys.exit(main())
