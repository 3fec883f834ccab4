"""Compile the decode-attention kernels for sm_90 (Hopper) with Triton's own compiler and ptxas, without a GPU.

Run as a script by ``test_compile_sm90.py`` in a process without ``TRITON_INTERPRET`` (the interpreter never lowers
a kernel, so errors that only compilation finds would otherwise wait for a GPU). Prints one ``OK``/``FAIL`` line per
variant; exit status 3 when this Triton has no ahead-of-time API this script knows (the test then skips).
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

from decode_attention import _cache_kernels as CK  # noqa: E402
from decode_attention import _kernels as K  # noqa: E402
from triton_ops_core.aot import compile_sm90 as build  # noqa: E402

I32 = "i32"
# a PDL launch that lets the next kernel launch once it runs (RELEASE, triton_ops_core.pdl.release_early)
RELEASED = ("griddepcontrol.wait", "griddepcontrol.launch_dependents")
# EARLY: the K/V tiles' L2 requests and the mask's loads issued before the wait; the wait before any store
MASK_PASS_EARLY = (("prefetch.global.L2", "griddepcontrol.wait"), ("ld.global", "griddepcontrol.wait"),
                   ("griddepcontrol.wait", "st.global"))

# (name, dtype, mask pointer type, MASK_KIND, HAS_SINKS, CAUSAL, HAS_WINDOW, RING, SOFTCAP, SPLIT, HEAD_DIM,
#  BLOCK_M, BLOCK_N, BLOCK_D, warps): the Llama decode step with transformers' bool mask (its splits interleaved),
# Gemma 3's sliding window as a ring (the mask read in age order), Gemma 2's softcapped logits, every other option at
# once (sinks, a window, causal, an additive mask, a padded head dim, fp16), and a split without a mask (contiguous
# chunks). fp32 (IEEE dots: ~10 s of compile on the CPU machine) is left to the GPU tests.
VARIANTS = [
    ("llama decode bool mask split", "bf16", "*i1", K.MASK_BOOL, False, False, False, False, False, True, 128, 16, 64,
     128, 4),
    ("gemma ring bool mask split d=256", "bf16", "*i1", K.MASK_BOOL, False, False, False, True, False, True, 256, 16,
     32, 256, 4),
    ("gemma2 softcap bool mask d=256", "bf16", "*i1", K.MASK_BOOL, False, False, False, False, True, False, 256, 16,
     32, 256, 4),
    ("sinks window causal additive mask d=80", "fp16", "*bf16", K.MASK_ADD, True, True, True, False, False, False, 80,
     64, 64, 128, 4),
    ("no mask split (contiguous chunks)", "bf16", "*i1", K.MASK_NONE, False, False, False, False, False, True, 128,
     16, 64, 128, 4),
]


def main() -> int:
    ok = True
    ints = ["H_KV", "GROUP", "SQ", "S", "CHUNK", "N_SPLITS", "ROWS_PAD", "stride_qb", "stride_qh", "stride_qs",
            "stride_kb", "stride_kh", "stride_kn", "stride_vb", "stride_vh", "stride_vn", "stride_mb", "stride_mh",
            "stride_mq", "stride_mn", "WINDOW"]
    for name, dt, mask_t, kind, sinks, causal, window, ring, softcap, split, hd, bm, bn, bd, warps in VARIANTS:
        types = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "mask_ptr": mask_t, "ring_ptr": "*i64",
                 "sink_ptr": "*bf16",
                 "out_ptr": f"*{dt}", "part_acc_ptr": "*fp32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32",
                 "cnt_ptr": "*i32",
                 "qk_scale": "fp32", "cap_log2": "fp32", "mask_floor": "fp32", **dict.fromkeys(ints, I32)}
        # a split over a mask or a window takes the KV blocks in turn (ops.INTERLEAVE_SPLITS)
        consts = dict(MASK_KIND=kind, MASK_1D=kind == K.MASK_BOOL, HAS_SINKS=sinks, CAUSAL=causal,
                      HAS_WINDOW=window, RING=ring, SOFTCAP=softcap, SPLIT=split,
                      INTERLEAVE=split and (kind != K.MASK_NONE or window), HEAD_DIM=hd,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, TRIM_N=max(bn, 8192 // bm),
                      DOT_PRECISION="ieee" if dt == "fp32" else "tf32",
                      UPCAST=False, P_LOW=dt != "fp32")
        ok &= build(K._attention_kernel, types, consts, name, warps)
        if split and not ring:  # the decode step's launch with programmatic dependent launch (triton_ops_core.pdl)
            # with a mask, its pass and the first K/V tiles' L2 requests before the wait (EARLY)
            early = {"EARLY": True, "PREFETCH_TILES": 2, "KV_LINES": 2} if kind != K.MASK_NONE else {}
            ok &= build(K._attention_kernel, types, {**consts, "PDL": True, "RELEASE": True, **early},
                        f"{name}, PDL{', mask pass before the wait' if early else ''}", warps, ptx_has=RELEASED,
                        ptx_before=MASK_PASS_EARLY if early else ())
        if kind != K.MASK_NONE:  # the first K/V tiles asked of L2 before the mask pass (ops.PREFETCH_TILES)
            lines = 1 << max(0, (hd * (4 if dt == "fp32" else 2) - 1) // 128).bit_length()
            ok &= build(K._attention_kernel, types, {**consts, "PREFETCH_TILES": 2, "KV_LINES": lines},
                        f"{name}, K/V prefetch", warps)
        if split:  # as plain eager calls take it: the splits merged by the last to arrive (FINISH)
            ok &= build(K._attention_kernel, types, {**consts, "FINISH": True, "MERGE_R": min(16, bm),
                                                     "MERGE_S": 4}, f"{name}, merged in the launch", warps)
    combine_types = {"part_acc_ptr": "*fp32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "sink_ptr": "*fp32",
                     "out_ptr": "*bf16", **dict.fromkeys(["H_KV", "GROUP", "SQ", "N_SPLITS", "ROWS_PAD"], I32)}
    ok &= build(K._combine_kernel, combine_types,
                dict(HAS_SINKS=True, HEAD_DIM=64, BLOCK_R=8, BLOCK_D=64, BLOCK_S=16), "combine", 4)
    ok &= build(K._combine_kernel, combine_types,
                dict(HAS_SINKS=False, HEAD_DIM=128, BLOCK_R=16, BLOCK_D=128, BLOCK_S=4, PDL=True, RELEASE=True),
                "combine, PDL", 4, ptx_has=RELEASED)
    # the KV-cache write with its device length counter, the trap (inline PTX) compiled in
    cache_types = {"keys_ptr": "*bf16", "values_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16",
                   "pos_ptr": "*i64", "len_ptr": "*i64", "q_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16",
                   "qw_ptr": "*bf16", "kw_ptr": "*bf16", "eps": "fp32",
                   **dict.fromkeys(["H", "T", "ROWS", "ROWS_PER_PROGRAM", "S_MAX", "HQ", "QROWS", "KV_PROGRAMS",
                                    "s_keys_b", "s_keys_h", "s_keys_s",
                                    "s_vals_b", "s_vals_h", "s_vals_s", "s_k_b", "s_k_h", "s_k_t", "s_v_b", "s_v_h",
                                    "s_v_t", "s_q_b", "s_q_h", "s_q_t", "s_cs_b", "s_cs_t"], I32)}
    ok &= build(CK._kv_cache_write_kernel, cache_types,
                dict(POSITIONS=CK.POS_LENGTH, ADVANCE=True, TRAP=True, ROPE=False, NORM=False, GEMMA=False,
                     K_DIM=128, V_DIM=128, BLOCK_D=128, BLOCK_R=64, BLOCK_Q=32), "kv cache write", 4)
    # with Qwen3's QK norm and RoPE of q (its own programs) and k (before the write)
    ok &= build(CK._kv_cache_write_kernel, cache_types,
                dict(POSITIONS=CK.POS_LENGTH, ADVANCE=True, TRAP=True, ROPE=True, NORM=True, GEMMA=False,
                     K_DIM=128, V_DIM=128, BLOCK_D=128, BLOCK_R=64, BLOCK_Q=32),
                "kv cache write with QK norm and RoPE", 4)
    ok &= build(CK._kv_cache_write_kernel, cache_types,
                dict(POSITIONS=CK.POS_LENGTH, ADVANCE=True, TRAP=True, ROPE=True, NORM=False, GEMMA=False,
                     K_DIM=128, V_DIM=128, BLOCK_D=128, BLOCK_R=64, BLOCK_Q=32, PDL=True, RELEASE=True),
                "kv cache write with RoPE, PDL", 4, ptx_has=RELEASED)
    # a full sliding window's ring write: Gemma 3's q/k norms (1 + w) and RoPE, the row over the oldest, the
    # counter advanced, early-launched
    ok &= build(CK._kv_cache_write_kernel, cache_types,
                dict(POSITIONS=CK.POS_RING, ADVANCE=True, TRAP=True, ROPE=True, NORM=True, GEMMA=True, K_DIM=256,
                     V_DIM=256, BLOCK_D=256, BLOCK_R=32, BLOCK_Q=16, PDL=True, RELEASE=True),
                "kv cache ring write with Gemma's QK norm and RoPE, PDL", 4)
    # a full sliding window moved on by one row (Gemma 3's 1024, bf16 K and V of head dim 256), early-launched
    shift_types = {"keys": "*bf16", "values": "*bf16", "k": "*bf16", "v": "*bf16",
                   **dict.fromkeys(["H", "W", "DK", "DV", "skb", "skh", "sks", "svb", "svh", "svs", "nkb", "nkh",
                                    "nvb", "nvh", "K_BLOCKS"], I32)}
    ok &= build(CK._kv_cache_shift_kernel, shift_types, dict(BLOCK_W=256, BLOCK_D=16, PDL=True),
                "kv cache shift, PDL", 4, 1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
