"""Compile the gated-MLP kernels' FP8 variants and ``gated_activation``'s kernel for sm_90 (Hopper) with Triton's own
compiler and ptxas, without a GPU.

Run as a script by ``test_compile_sm90.py`` in a process without ``TRITON_INTERPRET`` (the interpreter never lowers a
kernel: the E4M3 up-conversion and the per-K-step scale loads are only checked by compiling). Prints one
``OK``/``FAIL`` line per variant; exit status 3 when this Triton has no ahead-of-time API this script knows.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

from fused_gated_mlp import _kernels as K  # noqa: E402
from triton_ops_core.aot import compile_sm90  # noqa: E402
from triton_ops_core.gated_activation import ACT_SILU  # noqa: E402

INTS = ["M", "N", "K", "stride_xm", "stride_wg", "stride_wu", "stride_om", "stride_bg", "stride_bu", "stride_sg",
        "stride_su", "srow_mul", "srow_off_g", "srow_off_u"]
PTRS = {"x_ptr": "*bf16", "wg_ptr": "*fp8e4nv", "wu_ptr": "*fp8e4nv", "bg_ptr": "*bf16", "bu_ptr": "*bf16",
        "sg_ptr": "*fp32", "su_ptr": "*fp32", "out_ptr": "*bf16", "ws_ptr": "*fp32", "lock_ptr": "*i32",
        "nw_ptr": "*bf16"}
COMMON = dict(ACTIVATION=ACT_SILU, HAS_GATE_BIAS=False, HAS_UP_BIAS=False, DOT_PRECISION="tf32", UPCAST=False)

def decode(block_m: int, block_n: int, block_k: int, split_k: int, stages: int, *, fma: bool = False,
           f16_dot: bool = False, even_k: bool = True, norm: bool = False) -> dict:
    """The decode kernel's constexprs of one variant (plain loads; ``norm``: the deferred RMSNorm)."""
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, EVEN_K=even_k,
                NUM_STAGES=stages, USE_TMA=False, INTERPRET=False, USE_FMA=fma, F16_DOT=f16_dot, NORM=norm)


DECODE = K._gated_mlp_decode_kernel
# (name, kernel, W_SCALING, the variant's own constexprs): decode (16-row tensor-core tiles, split K, as the decode
# configs capped at 128-deep K steps for per-step scales; CUDA-core tiles of one and two rows; fp16 dots) and
# prefill (pointer GEMM), block and group scales
VARIANTS = [
    ("decode, 128x128 block scales, split K", DECODE, K.SCALE_BLOCK, decode(16, 32, 128, 4, 4)),
    ("decode, group scales, split K", DECODE, K.SCALE_GROUP, decode(16, 32, 128, 4, 4)),
    ("decode, group scales, one-row CUDA-core tile", DECODE, K.SCALE_GROUP, decode(1, 8, 512, 1, 4, fma=True)),
    ("decode, 128x128 block scales, one-row CUDA-core tile", DECODE, K.SCALE_BLOCK,
     decode(1, 8, 512, 1, 3, fma=True)),
    ("decode, 128x128 block scales, fp16 tensor-core dots (F16_DOT)", DECODE, K.SCALE_BLOCK,
     decode(16, 64, 128, 1, 3, f16_dot=True)),
    ("decode, group scales, two-row CUDA-core tile", DECODE, K.SCALE_GROUP,
     decode(2, 8, 256, 1, 3, fma=True, even_k=False)),
    # fp16 tensor-core dots (F16_DOT): the tiles configs._fp8_f16_dot picks (64 columns, 256 / 128 deep; 32 columns
    # with split K on narrow shapes)
    ("decode, channel scales, fp16 tensor-core dots (F16_DOT)", DECODE, K.SCALE_CHANNEL,
     decode(16, 64, 256, 1, 3, f16_dot=True)),
    ("decode, group scales, fp16 tensor-core dots (F16_DOT)", DECODE, K.SCALE_GROUP,
     decode(16, 64, 128, 1, 3, f16_dot=True)),
    ("decode, group scales, fp16 tensor-core dots (F16_DOT), split K", DECODE, K.SCALE_GROUP,
     decode(16, 32, 128, 4, 3, f16_dot=True)),
    # the deferred RMSNorm (a decoder layer's post-attention norm in the launch) on the tiles a decode step takes
    ("decode, group scales, one-row CUDA-core tile, deferred RMSNorm", DECODE, K.SCALE_GROUP,
     decode(1, 8, 512, 1, 4, fma=True, norm=True)),
    ("decode, channel scales, one-row CUDA-core tile, deferred RMSNorm", DECODE, K.SCALE_CHANNEL,
     decode(1, 8, 512, 1, 4, fma=True, norm=True)),
    ("decode, group scales, fp16 tensor-core dots (F16_DOT), deferred RMSNorm", DECODE, K.SCALE_GROUP,
     decode(16, 64, 128, 1, 3, f16_dot=True, norm=True)),
    ("decode, group scales, two-row CUDA-core tile, split K, deferred RMSNorm", DECODE, K.SCALE_GROUP,
     decode(2, 8, 256, 2, 3, fma=True, even_k=False, norm=True)),
    # programmatic dependent launch (triton_ops_core.pdl): both weights' first lines prefetched before the wait
    ("decode, group scales, one-row CUDA-core tile, PDL", DECODE, K.SCALE_GROUP,
     {**decode(1, 8, 512, 1, 4, fma=True), "PDL": True, "PREFETCH_LINES": 8}),
    ("decode, group scales, fp16 tensor-core dots (F16_DOT), split K, PDL", DECODE, K.SCALE_GROUP,
     {**decode(16, 32, 128, 4, 3, f16_dot=True), "PDL": True, "PREFETCH_LINES": 2}),
    ("prefill, group scales", K._gated_mlp_prefill_kernel, K.SCALE_GROUP,
     dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, NUM_STAGES=3, USE_TMA=False)),
]


def main() -> int:
    ok = True
    for name, kernel, scaling, own in VARIANTS:
        types = {**PTRS, "alpha": "fp32", "limit": "fp32", "norm_eps": "fp32", **dict.fromkeys(INTS, "i32")}
        consts = {**COMMON, "W_SCALING": scaling, **own}
        ok &= compile_sm90(kernel, types, consts, name, 4, own["NUM_STAGES"])
    # gated_activation's tiles as its plan makes them (4096 products a program, 8 warps): bf16 SwiGLU, fp16 gpt-oss
    for name, dtype, act in (("gated_activation, bf16 silu", "*bf16", 0), ("gated_activation, fp16 swiglu_oai",
                                                                          "*fp16", 3)):
        types = {"gate_ptr": dtype, "up_ptr": dtype, "out_ptr": dtype, "alpha": "fp32", "limit": "fp32",
                 **dict.fromkeys(["R", "C", "stride_gr", "stride_ur", "stride_or"], "i32")}
        ok &= compile_sm90(K._gated_activation_kernel, types, dict(ACTIVATION=act, BLOCK_R=4, BLOCK_C=1024), name, 8,
                           1, no_spills=True, divisible=("gate_ptr", "up_ptr", "out_ptr", "C", "stride_gr",
                                                         "stride_ur", "stride_or"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
