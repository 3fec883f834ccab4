"""Launch configs of the MoE kernels: a small heuristic by token count (no tuned table yet).

Decode (``tokens <= DECODE_MAX_TOKENS``) is bound by the read of the experts' weights: 16-row tiles of each expert's
rows (one tile per expert hit up to 16 tokens), narrow ``BLOCK_N`` while few experts are hit so that many programs
stream them; FP8 experts at 2 to 8 tokens take CUDA-core tiles of one row. Prefill uses fixed ``BLOCK_M``-token
tiles of each expert's sorted rows.

The decode tiles were measured on the H200 (gpt-oss-20b's layer, 1, 8 and 64 tokens, bf16 and FP8 experts, CUDA-graph
timing; see the comments below); the prefill tiles are first guesses for Hopper. Where a GPU differs
from Hopper, the heuristic reads its properties (``triton_ops_core.device.device_info``): its SM count (column tiles
narrow enough for two waves of programs) and its shared memory per block (pipeline stages that fit). fused-moe has no
tuned table (it does not depend on kernel-autotune), so no GPU is favoured by one.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from triton_ops_core.device import device_info
from triton_ops_core.launch import next_pow2

DECODE_MAX_TOKENS = 64


class MoEConfig(NamedTuple):
    """One forward's tiles. ``block_m`` is shared by both grouped GEMMs (one tile table serves both)."""

    block_m: int
    gate_up_block_n: int  # intermediate columns per program (x2 packed columns when interleaved)
    gate_up_block_k: int
    down_block_n: int  # hidden columns per program
    down_block_k: int
    num_warps: int
    num_stages: int
    fma: bool = False  # CUDA-core products instead of tensor-core dots (one or two rows per expert)
    down_split_k: int = 1  # programs per down-projection tile along K (partial sums added by the combine)
    # tensor-core tiles, FP8 experts with bf16 activations: fp16 dots on activation rows scaled by powers of two into
    # fp16's range (one conversion per E4M3 weight instead of two); off until measured on a GPU
    f16_dot: bool = False
    # W8A8: the activations quantized inside the grouped GEMMs (each program reads its tile's real rows once for their
    # scales, then quantizes every tile in registers) instead of by a launch before each GEMM
    quant_in_gemm: bool = False
    # W8A8: the intermediate rows quantized inside the down GEMM with scales from shares the gate/up GEMM writes
    # beside them (each program: its rows' largest |h| over its columns), instead of by a launch between the GEMMs
    quant_h_in_down: bool = False
    # W8A8 at decode (one-program grouping): the tokens' rows quantized by programs of the grouping's launch
    quant_x_with_align: bool = True
    # W8A8 (tensor-core tiles): each product with the weight tile as the 64-row wgmma operand and the tokens as its N
    # (block_m 16 suffices: no 64-row activation tile, mostly padding at decode, in shared memory); what W8A8 takes at
    # decode
    swap_ab: bool = False
    # one-row FMA tiles (fma, block_m 1): the row's products accumulated in the weight tile's own [BLOCK_K, BLOCK_N]
    # layout (sm_90: 3.3-3.7 instructions a weight byte against 5.4-7.0 for the [1, BLOCK_K, BLOCK_N] tile), the row
    # loaded a step ahead (in that layout it is one element a thread, which the pipeline's asynchronous copies do not
    # take; loaded in its own step, as in ae47269, FP8 experts ran 1.75x slower at one token on an H100). Not behind
    # the gate/up GEMM's RMSNorm prologue (that GEMM keeps the default tile there). Off until timed on a GPU.
    row_layout: bool = False


# FP8 experts at 1 to 8 tokens: CUDA-core tiles of one row (each expert hit has one or two rows; a tensor-core dot
# would pad them to 16 and convert every FP8 weight to bf16 first). H200, gpt-oss-20b layer, gate/up + down GEMMs in
# CUDA graphs (benchmarks/dev/moe_tiles.py), against the 16-row tensor-core tiles: 1 token 52.0 -> 45.7 us (down
# split in three along K), 2 tokens 99.5 -> 68.2 us (split in two), 4 tokens 174.6 -> 107.7 us with 64-column tiles
# 6 stages deep; 5 tokens 127.0 us with 128-column tiles 6 deep (144.2 at 3 deep, split in three), 8 tokens 248 ->
# 184.5 us with 128-column tiles 3 deep, the down GEMM split in three (200.2 unsplit; 6 deep: 205, its gate/up slower).
# 6 and 7 tokens were not measured: they take their neighbours' tiles. The 128-column tile spills registers with 2
# warps (ptxas: ~5 KB of spill stores for gate/up) and still measured best; 4 warps measured no faster.
# Qwen3-30B-A3B's layer (128 experts, top 8, hidden 2048, inter 768; H100, session 36, `moe_tiles --model
# qwen3-30b-a3b --fma-only`, logs in docs/benchmarks/dev/moe/): one token's 8 experts give the 64-column gate/up tile
# only 96 programs, yet it measured best (per-column scales 18.1 us, 128x128 blocks 20.4 us); 32 columns took 52-54
# us, 16 columns 31-34 us, 4 warps or 128 columns no faster; at 4 and 8 tokens every alternative within 5 % (noise).
FMA_MIN_TOKENS = 1
FMA_MAX_TOKENS = 8
FP8_FMA_TILE_NARROW = MoEConfig(1, 64, 32, 64, 32, 2, 6, fma=True)  # 2 to 4 tokens
# One token: the row's products in the weight tile's layout (MoEConfig.row_layout), 64-deep K steps, 4 warps, 3
# stages, the gate/up columns narrowed (_one_token_gate_up_n) until the experts hit give two waves of programs. H100,
# session 38, CUDA graphs (benchmarks/dev/moe_tiles.py --fma-only --row-layout, each GEMM's tiles swept apart; logs in
# docs/benchmarks/dev/moe/): Qwen3-30B-A3B (8 experts hit, inter 768) gate/up 18.0 -> 16.4 us with 16 columns (32:
# 17.4, 64: 18.6), down 10.9 -> 9.3 us with 64x64 tiles split in three (128 columns, split in two: 9.1); gpt-oss-20b
# (4 experts hit, inter 2880) gate/up 29.4 -> 28.7 us with 32 columns (16: 33.9, 64: 31.7), down 19.2 -> 17.5. In the
# row layout 64-deep K steps beat 32 and 16 at every column width; 128 was not tried.
FP8_ROW_TILE_ONE_TOKEN = MoEConfig(1, 64, 64, 64, 64, 4, 3, fma=True, row_layout=True)
FP8_FMA_TILE = MoEConfig(1, 128, 32, 128, 32, 2, 3, fma=True)  # 7 and 8 tokens (6 stages at 5 and 6)
# The one-token row tile over gate/up weights stored K-contiguous ([E, 2I, H]: Qwen3-MoE, Mixtral): 128-deep K steps
# (a whole 128-byte line of each FP8 weight row a step). H100, session 47, CUDA graphs (the two GEMMs timed apart as
# benchmarks.dev.moe_tiles does; logs in docs/benchmarks/dev/moe/): Qwen3-30B-A3B's gate/up 16.6-17.0 -> 12.8-13.1 us
# (256-deep: 11.8-13.1), 128x128 block scales alike; its down GEMM stays at 64 (128: 9.4 -> 11.4 us, three K splits
# of 256); gpt-oss-20b's N-contiguous gate/up no faster (28.8 -> 28.1 at 128, 32.2 at 256). Not behind the RMSNorm
# prologue, whose gate/up keeps the [1, BLOCK_K, BLOCK_N] tile (Qwen3-30B-A3B's experts with it 51.0 -> 69.1 us).
ONE_TOKEN_K_MAJOR_GATE_UP_K = 128
_FP8_FMA_DOWN_SPLIT = {1: 3, 2: 2, 7: 3, 8: 3}  # tokens -> K split of the down GEMM (else none)

_HOPPER_SMEM = 227 * 1024  # what the stage counts below were chosen for


def _stages_that_fit(stages: int, stage_bytes: int, smem: int) -> int:
    """``stages``, lowered until that many copies of a stage's tiles fit ``smem`` bytes (at least 2)."""
    while stages > 2 and stages * stage_bytes > smem:
        stages -= 1
    return stages


def _one_token_gate_up_n(top_k: int, intermediate: int, sms: int) -> int:
    """The gate/up column tile at one token: 64 columns halved (down to 16) while the ``top_k`` experts' column
    tiles number fewer than two waves of ``sms`` programs (Qwen3-30B-A3B: 16, 384 programs; gpt-oss-20b: 32, 360)."""
    bn = FP8_ROW_TILE_ONE_TOKEN.gate_up_block_n
    while bn > 16 and top_k * -(-intermediate // bn) < 2 * sms:
        bn //= 2
    return bn


def _split(split: int, k: int, block_k: int) -> int:
    """At most ``split`` programs along a K of ``k``, and no more than its ``block_k`` steps (an idle split would
    write zeros)."""
    return max(1, min(split, -(-k // block_k)))


# FP8 activations with E4M3 experts (W8A8): tiles for Hopper's FP8 wgmma (m64, operands read from shared memory as
# loaded; below 64 rows of its A operand Triton converts both operands to fp16 for mma.sync), and the weight bytes need
# no instruction of their own. In prefill, 64-token tiles. At decode, the weights are the 64-row operand and the tokens
# its N (MoEConfig.swap_ab): 16-token tiles, so that no 64-row activation tile, mostly padding, sits in shared memory.
# K steps of 128 bytes even where they do not divide K (2880 = 22.5 * 128: the last step masked): fewer, larger steps
# outweigh the masked tail. Measured on an H100 (session 29, gpt-oss-20b's layer in CUDA graphs,
# benchmarks/dev/moe_w8a8.py --sweep; docs/benchmarks/dev/moe/moe_w8a8-sweep-h100-session29.log): 64-token tiles with
# 32 columns and 6 stages (the session 28 choice on the H200, where 128-byte K steps were not tried) took 58.9 / 247.3
# / 369.3 us at 1 / 8 / 64 tokens with 64-byte K steps, 58.8 / 208.6 / 318.3 with 128-byte ones, and the swapped
# 16-token tiles (gate/up 32 columns, down 64) 53.4 / 204.7 / 313.5 (256-byte steps: 56.6 / 203.1 / 307.7, within
# noise at 8 and 64 tokens, slower at 1). Prefill, 2048 tokens: 926 us with 64-byte K steps and 4 stages, 843 us with
# 128-byte steps and 3 stages (838 with 8 warps).
W8A8_BLOCK_M = 64
W8A8_DECODE_BLOCK_M = 16
W8A8_BLOCK_K = 128
W8A8_STAGES = 6
W8A8_PREFILL_STAGES = 3
# Up to this many tokens W8A8 quantizes the activations inside the grouped GEMMs (MoEConfig.quant_in_gemm) instead of
# in two row-quantization launches. Measured slower on the H200 (session 28): 1 token 64.2 us inside against 49.3 us
# with the launches, 8 tokens 233.1 against 211.7 us: every program first walks all of K for its rows' scales before
# its first weight load, which costs more than the launches it saves. Off (0) until a faster in-GEMM scheme measures.
W8A8_QUANT_IN_GEMM_MAX_TOKENS = 0


def _w8a8_config(num_tokens: int, top_k: int, hidden: int, intermediate: int, num_experts: int, sms: int,
                 smem: int) -> MoEConfig:
    # (K steps of at least 32: Hopper's FP8 dot takes no fewer)
    bk, dk = (min(W8A8_BLOCK_K, max(32, next_pow2(k))) for k in (hidden, intermediate))
    if num_tokens <= DECODE_MAX_TOKENS:
        block_m, bn, dn, stages, swap = W8A8_DECODE_BLOCK_M, 32, 64, W8A8_STAGES, True
    else:
        hit = min(num_tokens * top_k, num_experts)
        # narrow column tiles while the experts hit give fewer than two waves of programs (as the bf16 tiles)
        bn = 32 if hit * -(-intermediate // 64) < 2 * sms else 64
        block_m, dn, stages, swap = W8A8_BLOCK_M, 128, W8A8_PREFILL_STAGES, False
    stages = _stages_that_fit(stages, (block_m + 2 * max(bn, dn)) * max(bk, dk), smem)
    split = _split(2, intermediate, dk) if num_tokens == 1 else 1
    return MoEConfig(block_m, bn, bk, dn, dk, 4, stages, down_split_k=split,
                     quant_in_gemm=num_tokens <= W8A8_QUANT_IN_GEMM_MAX_TOKENS, swap_ab=swap)


def for_weights(cfg: MoEConfig, num_tokens: int, gate_up_k_contiguous: bool, norm_prologue: bool) -> MoEConfig:
    """``cfg`` for how the gate/up weights are stored: at one token the row tile (``row_layout``, one row) over
    K-contiguous weights steps :data:`ONE_TOKEN_K_MAJOR_GATE_UP_K` deep along K, except behind the RMSNorm prologue."""
    if num_tokens == 1 and cfg.row_layout and cfg.block_m == 1 and gate_up_k_contiguous and not norm_prologue:
        return cfg._replace(gate_up_block_k=max(cfg.gate_up_block_k, ONE_TOKEN_K_MAJOR_GATE_UP_K))
    return cfg


def for_layout(cfg: MoEConfig, interleaved: bool) -> MoEConfig:
    """``cfg`` for the gate/up weights' layout. Swapped W8A8 products (``swap_ab``) take the weight tile as wgmma's
    64-row operand: interleaved gate/up columns are one tile of ``2 * gate_up_block_n`` rows, concatenated ones two
    tiles of ``gate_up_block_n`` rows, which must then be 64 each."""
    if cfg.swap_ab and not interleaved and cfg.gate_up_block_n < 64:
        return cfg._replace(gate_up_block_n=64)
    return cfg


@functools.lru_cache(maxsize=1024)
def select_config(num_tokens: int, top_k: int, hidden: int, intermediate: int, num_experts: int,
                  on_gpu: bool | torch.device, weight_bytes: int = 2, fp8_activations: bool = False) -> MoEConfig:
    """The heuristic. Under the interpreter (``on_gpu=False``) the tiles are as large as the problem allows:
    each interpreted program instance costs about a millisecond, whatever its size. ``on_gpu`` may be the CUDA device
    itself (``True``: the current one), whose SM count and shared memory the GPU rules read. ``weight_bytes``: the
    expert weights' element size (1: FP8 experts, which get tiles of their own at a few tokens);
    ``fp8_activations``: E4M3 activations too (W8A8), FP8 tensor-core tiles of 64 rows."""
    if isinstance(on_gpu, torch.device):
        device, on_gpu = on_gpu, on_gpu.type == "cuda"
    else:
        device = None
    if not on_gpu:
        block_m = min(64, max(16, next_pow2(num_tokens)))
        bn = min(64, max(16, next_pow2(intermediate)))
        bk = min(64, max(16, next_pow2(hidden)))
        dn = min(64, max(16, next_pow2(hidden)))
        dk = min(64, max(16, next_pow2(intermediate)))
        return MoEConfig(block_m, bn, bk, dn, dk, 4, 1)
    info = device_info(device)
    sms = info.sm_count or 132
    smem = info.smem_per_block or _HOPPER_SMEM
    if fp8_activations:
        return _w8a8_config(num_tokens, top_k, hidden, intermediate, num_experts, sms, smem)
    if num_tokens <= DECODE_MAX_TOKENS:
        # one-row tiles read an expert's weights once per row: only while the experts hit get one or two rows each
        # (gpt-oss, 32 experts, top 4, where they were measured; not Mixtral's 8 experts, top 2, at 8 tokens)
        few_rows = num_tokens * top_k <= 2 * num_experts
        if weight_bytes == 1 and FMA_MIN_TOKENS <= num_tokens <= FMA_MAX_TOKENS and few_rows:
            if num_tokens == 1:
                return FP8_ROW_TILE_ONE_TOKEN._replace(
                    gate_up_block_n=_one_token_gate_up_n(top_k, intermediate, sms),
                    down_split_k=_split(_FP8_FMA_DOWN_SPLIT[1], intermediate, FP8_ROW_TILE_ONE_TOKEN.down_block_k))
            tile = FP8_FMA_TILE_NARROW if num_tokens <= 4 else FP8_FMA_TILE
            if num_tokens in (5, 6):
                tile = tile._replace(num_stages=6)
            split = _split(_FP8_FMA_DOWN_SPLIT.get(num_tokens, 1), intermediate, tile.down_block_k)
            return tile._replace(down_split_k=split)
        # 16-row tiles (an expert with more rows takes several; at 64 tokens that measured faster than 64-row
        # tiles, bf16 385 vs 389 us, FP8 306 vs 367 us: less padding in each dot)
        block_m = 16
        # K steps of 128 where they divide K exactly (no K mask in the weight loads), else 64 (2880 = 45 * 64)
        bk, dk = (128 if hidden % 128 == 0 else 64), (128 if intermediate % 128 == 0 else 64)
        # narrow N tiles while few experts are hit: 4 experts x 2880 / 32 = 360 programs per GEMM; wider ones once
        # the experts hit fill two waves of the device's SMs with them (8 tokens: 140 -> 92 us for the down GEMM)
        hit = min(num_tokens * top_k, num_experts)
        bn = 32 if hit * -(-intermediate // 64) < 2 * sms else 64
        # a stage holds the token tile and a (2 x bn)-column weight tile of the gate/up GEMM, 2-byte elements
        stages = _stages_that_fit(4, (block_m + 2 * bn) * max(bk, dk) * 2, smem)
        if num_tokens == 1:
            # 4 experts hit: the down GEMM in 64-column tiles, each split in two along K (partial sums added by the
            # combine), 360 programs that read 128 bytes a row: bf16 20.7 -> 18.5 us, FP8 23.6 -> 18.8 us
            return MoEConfig(block_m, bn, bk, 64, dk, 4, stages, down_split_k=_split(2, intermediate, dk))
        return MoEConfig(block_m, bn, bk, bn, dk, 4, stages)
    return MoEConfig(64, 64, 64, 128, 64, 8, _stages_that_fit(3, (64 + 128) * 64 * 2, smem))


__all__ = ["DECODE_MAX_TOKENS", "W8A8_BLOCK_M", "MoEConfig", "for_layout", "for_weights", "select_config"]
