"""Compile each fused_moe kernel for sm_90 (Hopper) with Triton's own compiler and ptxas, without a GPU.

Run as a script by ``test_compile_sm90.py`` in a process without ``TRITON_INTERPRET`` (the interpreter's CPU runs
never lower a kernel, so errors that only compilation finds, such as layouts of ``tl.split`` or scalar stores,
would otherwise wait for a GPU). Prints one ``OK``/``FAIL`` line per kernel; exit status 3 when this Triton has no
ahead-of-time API this script knows (the test then skips).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

from fused_moe import _kernels as K  # noqa: E402
from fused_moe.configs import (  # noqa: E402
    FP8_FMA_TILE,
    FP8_FMA_TILE_NARROW,
    FP8_ROW_TILE_ONE_TOKEN,
    ONE_TOKEN_K_MAJOR_GATE_UP_K,
)
from triton_ops_core.aot import compile_sm90  # noqa: E402

I32 = "i32"


def with_norm(fn, types: dict, consts: dict, norm: bool = False) -> tuple[dict, dict]:
    """The RMSNorm prologue's arguments of the kernels that have one (off unless ``norm``), and the activation
    scales' pointers of the grouped GEMMs (read only with ``A_SCALED``; ``hamax_ptr`` written only with
    ``H_AMAX``), their block scales' K stride (read only with ``W_BLOCK``) and their expert count (read only with
    ``GROUPED`` off)."""
    later = {"xs_ptr": "*fp32", "hs_ptr": "*fp32", "hamax_ptr": "*fp32", "stride_sk": I32, "NUM_EXPERTS": I32,
             # the one-launch finishes' outputs and arrival counters (written only with FINISH)
             "out_ptr": "*bf16", "res_ptr": "*bf16", "cnt_ptr": "*i32", "stride_ot": I32, "stride_rt": I32,
             "b_ptr": "*bf16", "ids_ptr": "*i32", "wts_ptr": "*fp32", "stride_b": I32}
    types = {**{p: t for p, t in later.items() if p in fn.arg_names}, **types}
    if "NORM" not in fn.arg_names:
        return types, consts
    return ({**types, "nw_ptr": "*bf16", "norm_eps": "fp32"},
            {"NORM": norm, "NORM_BLOCK": 2048 // consts.get("BLOCK_M", consts.get("BLOCK_T", 16)), **consts})


def build(fn, types: dict, consts: dict, name: str, warps: int = 4, norm: bool = False, **checks) -> bool:
    types, consts = with_norm(fn, types, consts, norm)
    return compile_sm90(fn, types, consts, name, warps, consts.get("NUM_STAGES", 3), **checks)


# PDL launches (the library's "end" trigger): the next kernel let launch from the streaming loop's end or, released,
# from the wait; weights asked of L2 before the wait, which comes before any store
LETS_NEXT_LAUNCH = ("griddepcontrol.wait", "griddepcontrol.launch_dependents")
PREFETCHED_BEFORE_WAIT = (("prefetch.global.L2", "griddepcontrol.wait"), ("griddepcontrol.wait", "st.global"))


# The one-row FMA tiles of FP8 experts (configs.FP8_FMA_TILE_NARROW / FP8_FMA_TILE: 1 to 8 tokens), compiled at
# gpt-oss's layouts (gate_up [E, K, 2N] and down [E, K, N], N contiguous) with the alignment the launcher specializes
# at run time (N = 2880: multiples of 16). Their K loops must stream: no global load whose result the same K step
# waits for (aot.loop_sync_global_loads), every operand through the pipeline's asynchronous copies or loaded a step
# ahead. Session 20's one-row layout broke that (its row loaded one scalar a thread and used at once: FP8 experts
# 1.75x slower at one token on an H100, though its loops took fewer instructions); session 30 found it. The row
# layout (MoEConfig.row_layout) now loads its row a step ahead; it is compiled here at 32- and 64-deep K steps within
# an instruction budget (4.5 a weight byte a thread; the [1, BLOCK_K, BLOCK_N] tile takes 5.4-7.0). As a control, the
# shipped tile compiled without the alignment (every load synchronous) must be caught.
GATE_UP_DIVISIBLE = ("x_ptr", "w_ptr", "s_ptr", "h_ptr", "K", "N", "stride_xt", "stride_we", "stride_wk", "stride_hm")
GATE_UP_NORM_DIVISIBLE = GATE_UP_DIVISIBLE + ("nw_ptr",)
DOWN_DIVISIBLE = ("h_ptr", "w_ptr", "s_ptr", "y_ptr", "K", "N", "stride_hm", "stride_we", "stride_wk", "stride_ym")
ROW_LAYOUT_INSTRUCTIONS_PER_BYTE = 4.5
GATE_UP_TYPES = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "b_ptr": "*bf16", "s_ptr": "*fp32", "h_ptr": "*bf16",
                 **dict.fromkeys(["sorted_ptr", "offsets_ptr", "tile_expert_ptr", "tile_start_ptr"], "*i32"),
                 **dict.fromkeys(["N", "K", "MAX_TILES", "stride_xt", "stride_we", "stride_wk", "stride_be",
                                  "stride_bn", "stride_se", "stride_sn", "stride_hm"], I32),
                 "alpha": "fp32", "limit": "fp32"}
DOWN_TYPES = {"h_ptr": "*bf16", "w_ptr": "*fp8e4nv", "b_ptr": "*bf16", "s_ptr": "*fp32", "wts_ptr": "*fp32",
              "y_ptr": "*fp32", **dict.fromkeys(["sorted_ptr", "offsets_ptr", "tile_expert_ptr", "tile_start_ptr"],
                                                "*i32"),
              **dict.fromkeys(["N", "K", "MAX_TILES", "stride_hm", "stride_we", "stride_wk", "stride_be",
                               "stride_bn", "stride_se", "stride_sn", "stride_ym"], I32)}


def one_row_gate_up(tile, name: str, wtype: str = "*fp8e4nv", interleaved: bool = True, norm: bool = False,
                    fma: int = 1, budget: float | None = None, aligned: bool = True, streams: bool = True,
                    k_contiguous: bool = False) -> bool:
    """``k_contiguous``: the weights stored ``[E, 2N, K]`` (``stride_wk`` 1, ``stride_wn`` a multiple of 16)."""
    consts = dict(TOP_K=4, ACTIVATION=0, HAS_BIAS=True, INTERLEAVED=interleaved, W_SCALED=True, BLOCK_M=1,
                  BLOCK_N=tile.gate_up_block_n, BLOCK_K=tile.gate_up_block_k, EVEN_K=True,
                  NUM_STAGES=tile.num_stages, DOT_PRECISION="tf32", UPCAST=False, EMULATE_BF16=False,
                  USE_FMA=fma, INTERPRET=False, F16_DOT=False, GROUPED=False,
                  **({"stride_wk": 1} if k_contiguous else {"stride_wn": 1}))
    types = {**GATE_UP_TYPES, "w_ptr": wtype}
    divisible = GATE_UP_NORM_DIVISIBLE if norm else GATE_UP_DIVISIBLE
    if k_contiguous:
        types = {**{k: v for k, v in types.items() if k != "stride_wk"}, "stride_wn": I32}
        divisible = tuple(a for a in divisible if a != "stride_wk") + ("stride_wn",)
    types, consts = with_norm(K._gate_up_kernel, types, consts, norm)
    return compile_sm90(K._gate_up_kernel, types, consts, name, tile.num_warps, tile.num_stages,
                        divisible=divisible if aligned else (),
                        max_loop_instructions=None if budget is None else int(budget), no_sync_loop_loads=streams)


def one_row_down(tile, name: str, wtype: str = "*fp8e4nv", fma: int = 1, budget: float | None = None) -> bool:
    consts = dict(HAS_BIAS=True, W_SCALED=True, BLOCK_M=1, BLOCK_N=tile.down_block_n, BLOCK_K=tile.down_block_k,
                  EVEN_K=True, NUM_STAGES=tile.num_stages, DOT_PRECISION="tf32", UPCAST=False, USE_FMA=fma,
                  INTERPRET=False, SPLIT_K=3, F16_DOT=False, stride_wn=1, GROUPED=False, FINISH=True, TOP_K=4,
                  HAS_RESIDUAL=True)  # (the combine in the launch, as shipped: fused_moe.ops.COMBINE_IN_DOWN)
    return compile_sm90(K._down_kernel, with_norm(K._down_kernel, {**DOWN_TYPES, "w_ptr": wtype}, {})[0], consts,
                        name, tile.num_warps, tile.num_stages, divisible=DOWN_DIVISIBLE,
                        max_loop_instructions=None if budget is None else int(budget), no_sync_loop_loads=True)


def one_row_fp8_tiles() -> bool:
    ok = True
    # the shipped tiles: E4M3 at both; E5M2 and the concatenated gate/up layout (Qwen3-MoE / Mixtral) at the narrow
    # one; the RMSNorm prologue (the post-attention norm in the launch) with E4M3 interleaved
    for tile, wtype, interleaved in ((FP8_FMA_TILE_NARROW, "*fp8e4nv", True), (FP8_FMA_TILE, "*fp8e4nv", True),
                                     (FP8_FMA_TILE_NARROW, "*fp8e5", True), (FP8_FMA_TILE_NARROW, "*fp8e4nv", False)):
        label = f"{wtype[1:]} {'interleaved' if interleaved else 'concatenated'}"
        for norm in (False, True) if interleaved and wtype == "*fp8e4nv" else (False,):
            ok &= one_row_gate_up(tile, f"gate_up one-row {label} tile {tile.gate_up_block_n}x{tile.gate_up_block_k}"
                                        f"{', RMSNorm prologue' if norm else ''}", wtype, interleaved, norm)
        ok &= one_row_down(tile, f"down one-row {label} tile {tile.down_block_n}x{tile.down_block_k}", wtype)
    # the row layout (MoEConfig.row_layout), within its budget; its loops checked to stream at 64-deep K steps. At
    # 32-deep steps Triton 3.6 issues the row's loads a step ahead at the loop's top, but 3.9 schedules them mid-step,
    # under half a step before the copy that carries them on (read there: the check fails it), so that depth is only
    # compiled; moe_tiles decides on a GPU
    threads = 32 * FP8_FMA_TILE_NARROW.num_warps
    for bk in (32, 64):
        row = FP8_FMA_TILE_NARROW._replace(gate_up_block_k=bk, down_block_k=bk, row_layout=True)
        ok &= one_row_gate_up(row, f"gate_up row layout tile 64x{bk}", fma=2, streams=bk >= 64,
                              budget=ROW_LAYOUT_INSTRUCTIONS_PER_BYTE * bk * 2 * 64 // threads)
        ok &= one_row_down(row, f"down row layout tile 64x{bk}", fma=2,
                           budget=ROW_LAYOUT_INSTRUCTIONS_PER_BYTE * bk * 64 // threads)
    # the one-token tile as shipped (4 warps), at the gate/up widths it takes (gpt-oss-20b: 32, Qwen3-30B-A3B: 16,
    # concatenated) and its down tile. The 16-column tile is held to streaming only: 16 bytes a thread a step leave
    # the loop's fixed instructions (87 in all with Triton 3.6) above the per-byte budget, and it measured fastest
    threads = 32 * FP8_ROW_TILE_ONE_TOKEN.num_warps
    for bn, interleaved in ((32, True), (16, False)):
        row = FP8_ROW_TILE_ONE_TOKEN._replace(gate_up_block_n=bn)
        budget = ROW_LAYOUT_INSTRUCTIONS_PER_BYTE * row.gate_up_block_k * 2 * bn // threads if bn >= 32 else None
        ok &= one_row_gate_up(row, f"gate_up one-token row layout tile {bn}x{row.gate_up_block_k}"
                                   f"{'' if interleaved else ' concatenated'}", interleaved=interleaved, fma=2,
                              budget=budget)
    # over K-contiguous gate/up weights (Qwen3-MoE's [E, 2I, H], configs.for_weights) 128-deep K steps: streaming
    # (no per-byte budget: the 16-column tile's fixed instructions, as above)
    row = FP8_ROW_TILE_ONE_TOKEN._replace(gate_up_block_n=16, gate_up_block_k=ONE_TOKEN_K_MAJOR_GATE_UP_K)
    ok &= one_row_gate_up(row, f"gate_up one-token row layout tile 16x{row.gate_up_block_k} concatenated, K-contiguous",
                          interleaved=False, fma=2, k_contiguous=True)
    row = FP8_ROW_TILE_ONE_TOKEN
    ok &= one_row_down(row, f"down one-token row layout tile {row.down_block_n}x{row.down_block_k}", fma=2,
                       budget=ROW_LAYOUT_INSTRUCTIONS_PER_BYTE * row.down_block_k * row.down_block_n // threads)
    # the control: unaligned, the shipped tile's loads are synchronous, and the check must say so
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        caught = not one_row_gate_up(FP8_FMA_TILE_NARROW, "unaligned one-row tile", aligned=False)
    caught = caught and "synchronous global loads" in out.getvalue()
    print(f"{'OK' if caught else 'FAIL'} the one-row tile unaligned: its synchronous loads are caught"
          f"{'' if caught else ': ' + out.getvalue().strip()}")
    return ok and caught


def main() -> int:
    ok = True
    route_types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "ws_ptr": "*fp32", "ids_ptr": "*i32",
                   "wts_ptr": "*fp32", **dict.fromkeys(["T", "E", "H", "stride_xt", "stride_we", "stride_b"], I32)}
    for split in (0, 12):  # the router GEMM in the route kernel, or its partial sums from _router_split_kernel
        ok &= build(K._route_kernel, route_types,
                    dict(HAS_BIAS=True, TOP_K=4, BLOCK_KP=4, RENORMALIZE=True, ROUND_LOGITS=True, EMULATE_BF16=False,
                         BLOCK_T=16, BLOCK_E=32, BLOCK_K=256, NUM_STAGES=3, DOT_PRECISION="tf32", UPCAST=False,
                         SPLIT=split), f"route SPLIT={split}")
    # the router split alone and (FINISH, shipped) as the whole routing: gpt-oss's 32 experts and Qwen3-MoE's 128
    for norm, finish, experts in ((False, False, 32), (True, False, 32), (False, True, 32), (True, True, 128)):
        select = dict(FINISH=True, HAS_BIAS=experts == 32, TOP_K=4 if experts == 32 else 8,
                      BLOCK_KP=4 if experts == 32 else 8, RENORMALIZE=True, ROUND_LOGITS=True) if finish else {}
        ok &= build(K._router_split_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "ws_ptr": "*fp32",
                                             **dict.fromkeys(["T", "E", "H", "stride_xt", "stride_we"], I32)},
                    dict(BLOCK_T=16, BLOCK_E=experts, BLOCK_K=128 * 64 // max(experts, 64), NUM_STAGES=2,
                         DOT_PRECISION="tf32", UPCAST=False, **select),
                    "router split" + (", RMSNorm prologue" if norm else "") + (f", the whole routing of {experts} "
                                                                                "experts" if finish else ""),
                    warps=4 if experts <= 64 else 8, norm=norm)
    ok &= rows_router()
    align_types = {**dict.fromkeys(["ids_ptr", "offsets_ptr", "sorted_ptr", "tile_expert_ptr", "tile_start_ptr"],
                                   "*i32"), **dict.fromkeys(["P", "E", "MAX_TILES"], I32)}
    ok &= build(K._align_kernel, align_types,
                dict(TILE_M=16, BLOCK_P=256, BLOCK_E=32, BLOCK_TILES=16), "align", warps=8)
    ok &= build(K._align_count_kernel, {"ids_ptr": "*i64", "counts_ptr": "*i32", "P": I32, "E": I32},
                dict(BLOCK_P=512, BLOCK_E=32), "align_count")
    ok &= build(K._align_scan_kernel, {**dict.fromkeys(["counts_ptr", "base_ptr", "offsets_ptr", "tile_expert_ptr",
                                                        "tile_start_ptr"], "*i32"),
                                       **dict.fromkeys(["P", "E", "N_CHUNKS", "MAX_TILES"], I32)},
                dict(TILE_M=64, BLOCK_C=64, BLOCK_E=32, BLOCK_TILES=512), "align_scan", warps=8)
    ok &= build(K._align_scatter_kernel, {"ids_ptr": "*i64", "base_ptr": "*i32", "sorted_ptr": "*i32", "P": I32,
                                          "E": I32}, dict(BLOCK_P=512, BLOCK_E=32), "align_scatter")
    # bf16 weights, then weight-only FP8 experts (E4M3 and E5M2 tiles converted to bf16 in registers, per-column
    # scales): the conversions only lower on a real target, so the interpreter's tests cannot find their errors
    for wtype, scaled in (("*bf16", False), ("*fp8e4nv", True), ("*fp8e5", True)):
        gate_up_types = {"x_ptr": "*bf16", "w_ptr": wtype, "b_ptr": "*bf16", "s_ptr": "*fp32", "h_ptr": "*bf16",
                         **dict.fromkeys(["sorted_ptr", "offsets_ptr", "tile_expert_ptr", "tile_start_ptr"], "*i32"),
                         **dict.fromkeys(["N", "K", "MAX_TILES", "stride_xt", "stride_we", "stride_wk", "stride_wn",
                                          "stride_be", "stride_bn", "stride_se", "stride_sn", "stride_hm"], I32),
                         "alpha": "fp32", "limit": "fp32"}
        # tensor-core dots, and the CUDA-core (FMA) tiles of one or two rows; the concatenated layouts with GELU-tanh
        # (Gemma 4's experts) and exact GELU: every activation's epilogue compiled somewhere
        for interleaved, bm, bn, bk, warps, stages, fma, act in ((True, 16, 32, 64, 4, 4, False, K.ACT_SWIGLU_OAI),
                                                                 (False, 64, 64, 64, 8, 3, False, K.ACT_GELU_TANH),
                                                                 (True, 1, 128, 32, 2, 3, True, K.ACT_SWIGLU_OAI),
                                                                 (False, 2, 64, 16, 4, 3, True, K.ACT_GELU)):
            ok &= build(K._gate_up_kernel, gate_up_types,
                        dict(TOP_K=4, ACTIVATION=act, HAS_BIAS=True, INTERLEAVED=interleaved, W_SCALED=scaled,
                             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=True, NUM_STAGES=stages,
                             DOT_PRECISION="tf32", UPCAST=False, EMULATE_BF16=False, USE_FMA=fma, INTERPRET=False,
                             F16_DOT=False),
                        f"gate_up {wtype} interleaved={interleaved} BLOCK_M={bm} fma={fma} activation={act}",
                        warps=warps)
        down_types = {"h_ptr": "*bf16", "w_ptr": wtype, "b_ptr": "*bf16", "s_ptr": "*fp32", "wts_ptr": "*fp32",
                      "y_ptr": "*fp32",
                      **dict.fromkeys(["sorted_ptr", "offsets_ptr", "tile_expert_ptr", "tile_start_ptr"], "*i32"),
                      **dict.fromkeys(["N", "K", "MAX_TILES", "stride_hm", "stride_we", "stride_wk", "stride_wn",
                                       "stride_be", "stride_bn", "stride_se", "stride_sn", "stride_ym"], I32)}
        for bm, bn, bk, warps, fma in ((16, 32, 64, 4, False), (1, 128, 32, 2, True)):
            ok &= build(K._down_kernel, down_types,
                        dict(HAS_BIAS=True, W_SCALED=scaled, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=False,
                             NUM_STAGES=4, DOT_PRECISION="tf32", UPCAST=False, USE_FMA=fma, INTERPRET=False,
                             SPLIT_K=1 if fma else 4, F16_DOT=False),
                        f"down {wtype} BLOCK_M={bm} fma={fma}", warps=warps)
        if scaled:  # fp16 tensor-core dots on power-of-two-scaled activation rows (config f16_dot)
            ok &= build(K._gate_up_kernel, gate_up_types,
                        dict(TOP_K=4, ACTIVATION=0, HAS_BIAS=True, INTERLEAVED=True, W_SCALED=True, BLOCK_M=16,
                             BLOCK_N=32, BLOCK_K=128, EVEN_K=True, NUM_STAGES=4, DOT_PRECISION="tf32", UPCAST=False,
                             EMULATE_BF16=False, USE_FMA=False, INTERPRET=False, F16_DOT=True),
                        f"gate_up {wtype} fp16 dots", warps=4)
            ok &= build(K._down_kernel, down_types,
                        dict(HAS_BIAS=True, W_SCALED=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, EVEN_K=True,
                             NUM_STAGES=4, DOT_PRECISION="tf32", UPCAST=False, USE_FMA=False, INTERPRET=False,
                             SPLIT_K=2, F16_DOT=True),
                        f"down {wtype} fp16 dots", warps=4)
    ok &= block_scaled_experts()
    ok &= one_row_fp8_tiles()
    ok &= w8a8()
    for residual in (False, True):
        ok &= build(K._combine_kernel, {"y_ptr": "*fp32", "out_ptr": "*bf16", "res_ptr": "*bf16", "T": I32,
                                        "N": I32, "stride_ym": I32, "stride_ot": I32, "stride_rt": I32},
                    dict(TERMS=4, BLOCK_T=16, BLOCK_N=256, EMULATE_BF16=False, HAS_RESIDUAL=residual),
                    "combine" + (" with the residual" if residual else ""))
    ok &= pdl_decode_step(route_types, align_types)
    return 0 if ok else 1


def rows_router() -> bool:
    """The few-token router (``_router_rows_kernel``) at the tiles ``ops._rows_route_plans`` gives: gpt-oss-20b's
    (32 experts, one a program, K 2880 in one 4096-wide step) and Qwen3-30B-A3B's (128 experts, four a program,
    K 2048) at one token, Qwen3-30B-A3B's at eight (256-wide K steps, 3 stages), with the RMSNorm prologue; the logits
    alone and as the whole routing (FINISH), with PDL (the trigger at the K loop's end). No spills."""
    ok = True
    types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "ws_ptr": "*fp32", "nw_ptr": "*bf16", "b_ptr": "*bf16",
             "ids_ptr": "*i32", "wts_ptr": "*fp32", "cnt_ptr": "*i32", "norm_eps": "fp32",
             **dict.fromkeys(["T", "E", "H", "stride_xt", "stride_we", "stride_b"], I32)}
    for label, bt, ep, bk, stages, experts, top_k, bias, norm in (
            ("gpt-oss-20b, 1 token", 1, 1, 4096, 1, 32, 4, True, False),
            ("Qwen3-30B-A3B, 1 token, RMSNorm prologue", 1, 4, 2048, 1, 128, 8, False, True),
            ("Qwen3-30B-A3B, 8 tokens, RMSNorm prologue", 8, 4, 256, 3, 128, 8, False, True)):
        for finish in (False, True):
            consts = dict(BLOCK_T=bt, BLOCK_EP=ep, BLOCK_K=bk, NUM_STAGES=stages, NORM=norm,
                          NORM_BLOCK=2048 // bt if norm else 16, PDL=True, FINISH=finish, HAS_BIAS=bias and finish,
                          TOP_K=top_k if finish else 1, BLOCK_KP=top_k if finish else 1, RENORMALIZE=True,
                          ROUND_LOGITS=finish, EMULATE_BF16=False, BLOCK_E=experts)
            ok &= compile_sm90(K._router_rows_kernel, types, consts,
                               f"router rows, {label}{', the whole routing' if finish else ''}", 4, stages,
                               no_spills=True, ptx_has=LETS_NEXT_LAUNCH)
    return ok


def block_scaled_experts() -> bool:
    """E4M3 experts with 128x128 block scales (FP8 checkpoints'; W_BLOCK): the gate/up GEMM (concatenated) and the
    down GEMM on the tensor-core tile (each step's partial product scaled), the one-row CUDA-core tile and the row
    layout (the row's values scaled), and split K in the down GEMM."""
    ok = True
    gate_up_types = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "b_ptr": "*bf16", "s_ptr": "*fp32", "h_ptr": "*bf16",
                     **dict.fromkeys(["sorted_ptr", "offsets_ptr", "tile_expert_ptr", "tile_start_ptr"], "*i32"),
                     **dict.fromkeys(["N", "K", "MAX_TILES", "stride_xt", "stride_we", "stride_wk", "stride_wn",
                                      "stride_be", "stride_bn", "stride_se", "stride_sn", "stride_hm"], I32),
                     "alpha": "fp32", "limit": "fp32"}
    down_types = {"h_ptr": "*bf16", "w_ptr": "*fp8e4nv", "b_ptr": "*bf16", "s_ptr": "*fp32", "wts_ptr": "*fp32",
                  "y_ptr": "*fp32", **dict.fromkeys(["sorted_ptr", "offsets_ptr", "tile_expert_ptr", "tile_start_ptr"],
                                                    "*i32"),
                  **dict.fromkeys(["N", "K", "MAX_TILES", "stride_hm", "stride_we", "stride_wk", "stride_wn",
                                   "stride_be", "stride_bn", "stride_se", "stride_sn", "stride_ym"], I32)}
    for bm, bn, bk, warps, fma in ((16, 64, 128, 4, 0), (1, 16, 64, 4, 1), (1, 64, 64, 4, 2)):
        ok &= build(K._gate_up_kernel, gate_up_types,
                    dict(TOP_K=8, ACTIVATION=K.ACT_SILU, HAS_BIAS=False, INTERLEAVED=False, W_SCALED=False,
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=True, NUM_STAGES=3, DOT_PRECISION="tf32",
                         UPCAST=False, EMULATE_BF16=False, USE_FMA=fma, INTERPRET=False, F16_DOT=False,
                         W_BLOCK=True, GROUPED=bm > 1),
                    f"gate_up E4M3 128x128 block scales BLOCK_M={bm} fma={fma}", warps=warps)
        ok &= build(K._down_kernel, down_types,
                    dict(HAS_BIAS=False, W_SCALED=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=True,
                         NUM_STAGES=3, DOT_PRECISION="tf32", UPCAST=False, USE_FMA=fma, INTERPRET=False,
                         SPLIT_K=1 if fma else 4, F16_DOT=False, W_BLOCK=True, GROUPED=bm > 1),
                    f"down E4M3 128x128 block scales BLOCK_M={bm} fma={fma}", warps=warps)
    return ok


# W8A8 (E4M3 activations and K-major E4M3 weights) on 64-row tiles: Hopper's FP8 wgmma reads both tiles from shared
# memory as they were loaded, so the K loop has no per-byte work: the PTX must hold FP8 wgmmas and no byte permutation
# (``prmt``: an N-major FP8 weight tile goes through registers and is permuted on its way to shared memory) and no
# conversion to 16 bits for mma.sync (what Triton does below 64 rows). At gpt-oss's sizes (K = 2880).
W8A8_PTX_HAS = ("wgmma.mma_async.sync.aligned.m64n", ".f32.e4m3.e4m3", "cp.async")
W8A8_PTX_LACKS = ("prmt", "mma.sync")
W8A8_PTX_SWAP_HAS = ("wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3", "cp.async")


def w8a8() -> bool:
    from fused_moe.configs import select_config

    ok = build(K._quant_rows_kernel, {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "R": I32, "C": I32,
                                      "stride_xr": I32},
               dict(BLOCK_R=1, BLOCK_C=2048, EMULATE=False), "quant rows")
    ok &= build(K._quant_rows_kernel, {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "R": I32, "C": I32,
                                       "stride_xr": I32},
                dict(BLOCK_R=1, BLOCK_C=2048, EMULATE=False, PDL=True), "quant rows, RMSNorm prologue, PDL",
                norm=True)
    # W8A8 at decode (MoEConfig.quant_x_with_align): the grouping's program and the tokens' quantization in one
    # launch, as gpt-oss's 1-64 token steps launch it (8 warps, with the RMSNorm prologue and PDL)
    align_quant = {**dict.fromkeys(["ids_ptr", "offsets_ptr", "sorted_ptr", "tile_expert_ptr", "tile_start_ptr"],
                                   "*i32"),
                   "x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                   **dict.fromkeys(["P", "E", "MAX_TILES", "R", "C", "stride_xr"], I32)}
    for norm in (False, True):
        ok &= build(K._align_quant_kernel, align_quant,
                    dict(TILE_M=64, BLOCK_P=256, BLOCK_E=32, BLOCK_TILES=64, BLOCK_R=1, BLOCK_C=2048, EMULATE=False,
                         PDL=True), "align + quant rows" + (", RMSNorm prologue" if norm else "") + ", PDL", warps=8,
                    norm=norm)
    groups = dict.fromkeys(["sorted_ptr", "offsets_ptr", "tile_expert_ptr", "tile_start_ptr"], "*i32")
    gate_up_types = {"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "b_ptr": "*bf16", "s_ptr": "*fp32", "h_ptr": "*bf16",
                     **groups, **dict.fromkeys(["N", "K", "MAX_TILES", "stride_xt", "stride_we", "stride_wn",
                                                "stride_be", "stride_bn", "stride_se", "stride_sn", "stride_hm"], I32),
                     "alpha": "fp32", "limit": "fp32"}
    down_types = {"h_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "b_ptr": "*bf16", "s_ptr": "*fp32", "wts_ptr": "*fp32",
                  "y_ptr": "*fp32", **groups,
                  **dict.fromkeys(["N", "K", "MAX_TILES", "stride_hm", "stride_we", "stride_wn", "stride_be",
                                   "stride_bn", "stride_se", "stride_sn", "stride_ym"], I32)}
    # The chosen tiles at 1, 64 and 2048 tokens (at decode MoEConfig.swap_ab: the weight tile as wgmma's 64-row
    # operand, 16 tokens as its N, the activation tile transposed in shared memory; 128-byte K steps, the last one of
    # 2880 masked), and the unswapped 64-token tiles at decode
    decode = select_config(64, 4, 2880, 2880, 32, True, 1, True)
    tiles = [(f"{t} tokens", select_config(t, 4, 2880, 2880, 32, True, 1, True)) for t in (1, 64, 2048)]
    tiles.append(("64 tokens unswapped", decode._replace(swap_ab=False, block_m=64, down_block_n=32)))
    for label, cfg in tiles:
        ok &= w8a8_gemms(cfg, label, gate_up_types, down_types)
    # MoEConfig.quant_h_in_down: the gate/up GEMM also writes its rows' shares of their scales, the down GEMM reads
    # the bf16 intermediate and quantizes it in registers with the scales of those shares; both still FP8 wgmma
    for label, cfg in tiles[::2]:
        ok &= w8a8_gemms(cfg, label + ", h quantized in the down GEMM", gate_up_types, down_types, h_in_down=True)
    # MoEConfig.quant_in_gemm (off by default, measured slower): the 16-bit activations quantized in registers inside
    # both GEMMs (the gate/up one with and without the RMSNorm prologue); still FP8 wgmma on the weights as loaded
    cfg = select_config(1, 4, 2880, 2880, 32, True, 1, True)._replace(quant_in_gemm=True, swap_ab=False, block_m=64)
    in_gemm = dict(A_SCALED=True, QUANT_A=True, QUANT_BLOCK=4096, EMULATE_FP8=False, stride_wk=1, UPCAST=False,
                   DOT_PRECISION="tf32", USE_FMA=False, INTERPRET=False, F16_DOT=False,
                   EVEN_K=2880 % cfg.gate_up_block_k == 0, BLOCK_M=cfg.block_m, NUM_STAGES=cfg.num_stages,
                   W_SCALED=True, HAS_BIAS=True)
    for norm in (False, True):
        types, consts = with_norm(K._gate_up_kernel, {**gate_up_types, "x_ptr": "*bf16"}, dict(
            TOP_K=4, ACTIVATION=0, INTERLEAVED=True, BLOCK_N=cfg.gate_up_block_n, BLOCK_K=cfg.gate_up_block_k,
            EMULATE_BF16=False, **in_gemm), norm)
        if norm:
            consts["NORM_BLOCK"] = 2048
        ok &= compile_sm90(K._gate_up_kernel, types, consts,
                           "gate_up W8A8 1 token, quantized in registers" + (", RMSNorm prologue" if norm else ""),
                           cfg.num_warps, cfg.num_stages,
                           divisible=tuple(p for p in GATE_UP_DIVISIBLE if p != "stride_wk") + ("stride_wn",),
                           ptx_has=W8A8_PTX_HAS + (".e4m3x2.f32",), ptx_lacks=("mma.sync",))
    types, consts = with_norm(K._down_kernel, {**down_types, "h_ptr": "*bf16"}, dict(
        BLOCK_N=cfg.down_block_n, BLOCK_K=cfg.down_block_k, SPLIT_K=cfg.down_split_k, **in_gemm))
    ok &= compile_sm90(K._down_kernel, types, consts, "down W8A8 1 token, quantized in registers", cfg.num_warps,
                       cfg.num_stages, divisible=tuple(p for p in DOWN_DIVISIBLE if p != "stride_wk") + ("stride_wn",),
                       ptx_has=W8A8_PTX_HAS + (".e4m3x2.f32",), ptx_lacks=("mma.sync",))
    return ok



def w8a8_gemms(cfg, label: str, gate_up_types: dict, down_types: dict, h_in_down: bool = False) -> bool:
    """Both W8A8 GEMMs of gpt-oss-20b's layer (K = 2880) with ``cfg``'s tiles; ``h_in_down``: the gate/up GEMM writes
    the shares of h's scales (interleaved layout only), the down GEMM quantizes the bf16 intermediate in registers."""
    from fused_moe.configs import for_layout

    divisible_gu = tuple(p for p in GATE_UP_DIVISIBLE if p != "stride_wk") + ("stride_wn",)
    divisible_down = tuple(p for p in DOWN_DIVISIBLE if p != "stride_wk") + ("stride_wn",)
    swap = dict(SWAP_AB=True) if cfg.swap_ab else {}
    has = W8A8_PTX_SWAP_HAS if cfg.swap_ab else W8A8_PTX_HAS
    name = f"{label}{', swap_ab' if cfg.swap_ab else ''}, FP8 wgmma"
    common = dict(W_SCALED=True, BLOCK_M=cfg.block_m, NUM_STAGES=cfg.num_stages, DOT_PRECISION="tf32", UPCAST=False,
                  USE_FMA=False, INTERPRET=False, F16_DOT=False, A_SCALED=True, stride_wk=1, **swap)
    ok = True
    for interleaved in (True,) if h_in_down else (True, False):
        block_n = for_layout(cfg, interleaved).gate_up_block_n  # (as the ops take it)
        types, consts = with_norm(K._gate_up_kernel, gate_up_types, dict(
            TOP_K=4, ACTIVATION=0 if interleaved else 1, HAS_BIAS=interleaved, INTERLEAVED=interleaved,
            BLOCK_N=block_n, BLOCK_K=cfg.gate_up_block_k, EVEN_K=2880 % cfg.gate_up_block_k == 0,
            EMULATE_BF16=False, **({"H_AMAX": True} if h_in_down else {}), **common))
        ok &= compile_sm90(K._gate_up_kernel, types, consts,
                           f"gate_up W8A8 {'interleaved' if interleaved else 'concatenated'} {name}",
                           cfg.num_warps, cfg.num_stages, divisible=divisible_gu, ptx_has=has,
                           ptx_lacks=W8A8_PTX_LACKS, no_spills=cfg.swap_ab)
    quant_a = {}
    if h_in_down:
        parts = -(-2880 // cfg.gate_up_block_n)
        quant_a = dict(QUANT_A=True, QUANT_BLOCK=min(128, 1 << (parts - 1).bit_length()), EMULATE_FP8=False,
                       A_AMAX=True, AMAX_PARTS=parts)
    types, consts = with_norm(K._down_kernel, {**down_types, "h_ptr": "*bf16"} if h_in_down else down_types, dict(
        HAS_BIAS=True, BLOCK_N=cfg.down_block_n, BLOCK_K=cfg.down_block_k, EVEN_K=2880 % cfg.down_block_k == 0,
        SPLIT_K=cfg.down_split_k, **quant_a, **common))
    ok &= compile_sm90(K._down_kernel, types, consts, f"down W8A8 {name}", cfg.num_warps, cfg.num_stages,
                       divisible=divisible_down, ptx_has=has + ((".e4m3x2.f32",) if h_in_down else ()),
                       ptx_lacks=("mma.sync",) if h_in_down else W8A8_PTX_LACKS, no_spills=cfg.swap_ab)
    return ok


def pdl_decode_step(route_types: dict, align_types: dict) -> bool:
    """gpt-oss's decode launches as programmatic dependent launch starts them (``PDL``: each waits for the one
    before it before reading anything): router split, route, align, bf16 one-row gate/up and down, combine."""
    ok = build(K._router_split_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "ws_ptr": "*fp32",
                                        **dict.fromkeys(["T", "E", "H", "stride_xt", "stride_we"], I32)},
               dict(BLOCK_T=16, BLOCK_E=32, BLOCK_K=128, NUM_STAGES=2, DOT_PRECISION="tf32", UPCAST=False, PDL=True,
                    PREFETCH_LINES=2),
               "router split, PDL, its slice prefetched", ptx_has=LETS_NEXT_LAUNCH, ptx_before=PREFETCHED_BEFORE_WAIT)
    for release in (False, True):
        ok &= build(K._route_kernel, route_types,
                    dict(HAS_BIAS=True, TOP_K=4, BLOCK_KP=4, RENORMALIZE=True, ROUND_LOGITS=True, EMULATE_BF16=False,
                         BLOCK_T=16, BLOCK_E=32, BLOCK_K=256, NUM_STAGES=3, DOT_PRECISION="tf32", UPCAST=False,
                         SPLIT=12, PDL=True, RELEASE=release), f"route SPLIT=12, PDL{', released' if release else ''}",
                    ptx_has=LETS_NEXT_LAUNCH if release else (),
                    ptx_lacks=() if release else ("griddepcontrol.launch_dependents",))
    ok &= build(K._align_kernel, align_types, dict(TILE_M=1, BLOCK_P=16, BLOCK_E=32, BLOCK_TILES=16, PDL=True),
                "align, PDL", warps=8)
    groups = dict.fromkeys(["sorted_ptr", "offsets_ptr", "tile_expert_ptr", "tile_start_ptr"], "*i32")
    ok &= build(K._gate_up_kernel,
                {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "s_ptr": "*fp32", "h_ptr": "*bf16", **groups,
                 **dict.fromkeys(["N", "K", "MAX_TILES", "stride_xt", "stride_we", "stride_wk", "stride_wn",
                                  "stride_be", "stride_bn", "stride_se", "stride_sn", "stride_hm"], I32),
                 "alpha": "fp32", "limit": "fp32"},
                dict(TOP_K=4, ACTIVATION=0, HAS_BIAS=True, INTERLEAVED=True, W_SCALED=False, BLOCK_M=1, BLOCK_N=128,
                     BLOCK_K=32, EVEN_K=True, NUM_STAGES=3, DOT_PRECISION="tf32", UPCAST=False, EMULATE_BF16=False,
                     USE_FMA=True, INTERPRET=False, F16_DOT=False, PDL=True), "gate_up bf16 one row, PDL", warps=2)
    ok &= build(K._down_kernel,
                {"h_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "s_ptr": "*fp32", "wts_ptr": "*fp32",
                 "y_ptr": "*fp32", **groups,
                 **dict.fromkeys(["N", "K", "MAX_TILES", "stride_hm", "stride_we", "stride_wk", "stride_wn",
                                  "stride_be", "stride_bn", "stride_se", "stride_sn", "stride_ym"], I32)},
                dict(HAS_BIAS=True, W_SCALED=False, BLOCK_M=1, BLOCK_N=128, BLOCK_K=32, EVEN_K=False, NUM_STAGES=4,
                     DOT_PRECISION="tf32", UPCAST=False, USE_FMA=True, INTERPRET=False, SPLIT_K=3, F16_DOT=False,
                     PDL=True), "down bf16 one row, PDL", warps=2)
    ok &= build(K._combine_kernel, {"y_ptr": "*fp32", "out_ptr": "*bf16", "res_ptr": "*bf16", "T": I32, "N": I32,
                                    "stride_ym": I32, "stride_ot": I32, "stride_rt": I32},
                dict(TERMS=12, BLOCK_T=16, BLOCK_N=256, EMULATE_BF16=False, HAS_RESIDUAL=True, PDL=True),
                "combine with the residual, PDL")
    ok &= one_token_bf16_pdl(groups)
    return ok


def one_token_bf16_pdl(groups: dict) -> bool:
    """bf16 experts at one token as shipped (configs.select_config: 16-row tensor-core tiles, the down GEMM in
    64-column tiles split in two; ops.UNGROUPED_ONE_TOKEN: the pairs ungrouped, the combine in the down GEMM) with
    PDL: both GEMMs let the next kernel launch from their K loop's end; the down GEMM asks L2 for its first weight
    tiles before its wait (gpt-oss's N-contiguous ``[E, I, H]``: 128 rows of one line; Qwen3-MoE's K-contiguous
    ``[E, H, I]``: 64 rows of two lines)."""
    ints = ["N", "K", "MAX_TILES", "stride_we", "stride_wk", "stride_be", "stride_bn", "stride_se", "stride_sn"]
    ok = build(K._gate_up_kernel,
               {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "s_ptr": "*fp32", "h_ptr": "*bf16", **groups,
                **dict.fromkeys(ints + ["stride_xt", "stride_hm"], I32), "alpha": "fp32", "limit": "fp32"},
               dict(TOP_K=4, ACTIVATION=0, HAS_BIAS=True, INTERLEAVED=True, W_SCALED=False, BLOCK_M=16, BLOCK_N=32,
                    BLOCK_K=64, EVEN_K=True, NUM_STAGES=4, DOT_PRECISION="tf32", UPCAST=False, EMULATE_BF16=False,
                    USE_FMA=0, INTERPRET=False, F16_DOT=False, PDL=True, GROUPED=False, stride_wn=1),
               "gate_up bf16 one token ungrouped, PDL", ptx_has=LETS_NEXT_LAUNCH)
    for mode, rows, lines, label in ((1, 128, 1, "N-contiguous"), (2, 64, 2, "K-contiguous")):
        ok &= build(K._down_kernel,
                    {"h_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "s_ptr": "*fp32", "wts_ptr": "*fp32",
                     "y_ptr": "*fp32", **groups,
                     **dict.fromkeys(ints + ["stride_hm", "stride_ym"] + (["stride_wn"] if mode == 2 else []), I32)},
                    dict(HAS_BIAS=True, W_SCALED=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, EVEN_K=True,
                         NUM_STAGES=4, DOT_PRECISION="tf32", UPCAST=False, USE_FMA=0, INTERPRET=False, SPLIT_K=2,
                         F16_DOT=False, PDL=True, GROUPED=False, FINISH=True, TOP_K=4, HAS_RESIDUAL=True,
                         PREFETCH=mode, PREFETCH_ROWS=rows, PREFETCH_LINES=lines,
                         **({"stride_wn": 1} if mode == 1 else {"stride_wk": 1})),
                    f"down bf16 one token ungrouped, the combine in it, PDL, {label} weights prefetched",
                    ptx_has=LETS_NEXT_LAUNCH, ptx_before=PREFETCHED_BEFORE_WAIT)
    return ok


if __name__ == "__main__":
    sys.exit(main())
