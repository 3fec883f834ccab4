"""Launch configurations of the FP8 GEMM kernels: the config spaces and the analytical defaults.

Four kernels, four spaces (the fourth, the Gluon kernel for group scales, ``gemm_wgmma``, defaults to its
``default_config``). The defaults come from measurements on the lent H100 (docs/fp8-gemm-kernel.md), with
their grid rules reading the device's SM count; ``select_config`` (kernel-autotune) may replace them with cached,
shipped (the entries of this GPU's product name and compute capability) or tuned configs, keyed by the M bucket, N,
K, the scale granularities and the accumulation mode (in the kernel name).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from kernel_autotune import ConfigSpace, select_config
from triton_ops_core.device import sm_count
from triton_ops_core.launch import next_pow2

from .__about__ import __version__

TUNED = Path(__file__).with_name("tuned_configs.json")

_SMEM_BYTES = 227 * 1024  # Hopper's opt-in shared memory per block


def _tma_fits(cfg: dict[str, Any], problem: Any) -> bool:
    stage = cfg["BLOCK_M"] * cfg["BLOCK_K"] + cfg["BLOCK_N"] * cfg["BLOCK_K"]  # FP8: one byte each
    epilogue = cfg["BLOCK_M"] * cfg["BLOCK_N"] * 2 // (2 if cfg["EPI_SUBTILE"] else 1)  # 16-bit output
    fits = stage * cfg["num_stages"] + epilogue <= _SMEM_BYTES
    # the fp32 accumulator: at most 128 registers a thread
    return fits and cfg["BLOCK_M"] * cfg["BLOCK_N"] <= 128 * 32 * cfg["num_warps"]


def _decode_fits(cfg: dict[str, Any], problem: Any) -> bool:
    return problem is None or cfg["BLOCK_M"] >= min(64, problem.get("m", 1))


_TMA_PARAMS = {
    "BLOCK_M": [64, 128, 256],
    "BLOCK_N": [64, 128, 256],
    "BLOCK_K": [64, 128],
    "GROUP_M": [8, 16],
    "num_warps": [4, 8],
    "num_stages": [2, 3, 4, 5],
    "PERSISTENT": [True, False],
    "FLATTEN": [True, False],
    "EPI_SUBTILE": [False, True],
    "FAITHFUL_ACC": [1, 2],
}
_PTR_PARAMS = {
    "BLOCK_M": [32, 64, 128],
    "BLOCK_N": [32, 64, 128],
    "BLOCK_K": [64, 128],
    "GROUP_M": [8],
    "num_warps": [4, 8],
    "num_stages": [2, 3, 4],
}
_DECODE_PARAMS = {
    "BLOCK_M": [16, 32, 64],
    "BLOCK_N": [32, 64, 128],
    "BLOCK_K": [128, 256, 512],
    "SPLIT_K": [1, 2, 4, 8],
    "num_warps": [4, 8],
    "num_stages": [2, 3, 4, 5],
}

# The Gluon kernels for group and block scales (gemm_wgmma): 64-row tiles on one warp group, 128-row tiles on two,
# 256 x 128 tiles (the tall kernel) on two
_WGMMA_PARAMS = {
    "BLOCK_M": [64, 128, 256],
    "BLOCK_N": [128],
    "GROUP_M": [8, 16],
    "STAGES": [3, 4, 5],
    "num_warps": [4, 8],
}


def _wgmma_fits(cfg: dict[str, Any], problem: Any) -> bool:
    # each warp group owns 64 rows (three fp32 tiles of 64 x 128 a warp group fit its registers, 128 rows do not;
    # the tall kernel's two warp groups hold 256 x 128 as four 128 x 64 sub-tiles and two partials); the ring (a,
    # b, a row of column scales) and a 32-bit output tile (the tall kernel's: one 128 x 64 sub-tile) in shared memory
    tall = cfg["BLOCK_M"] == 256
    ring = cfg["STAGES"] * ((cfg["BLOCK_M"] + cfg["BLOCK_N"]) * 128 + cfg["BLOCK_N"] * 4)
    out_tile = 128 * 64 * 4 if tall else cfg["BLOCK_M"] * cfg["BLOCK_N"] * 4
    warps_ok = cfg["num_warps"] == 8 if tall else cfg["num_warps"] == cfg["BLOCK_M"] // 16
    return warps_ok and cfg["STAGES"] >= 2 and ring + out_tile <= _SMEM_BYTES


# The warp-specialized ping-pong kernel (gemm_wgmma's PINGPONG configs: 128 x 128 tiles on a TMA partition and two
# consumer warp groups), one program a tile or persistent: the space of per-tensor and per-channel weights, which only
# it takes (group and block weights search the one-partition and tall kernels' space, beside the ping-pong default)
_PINGPONG_PARAMS = {
    "BLOCK_M": [128],
    "BLOCK_N": [128],
    "GROUP_M": [8, 16],
    "STAGES": [3, 4, 5],
    "num_warps": [4],
    "PINGPONG": [True],
    "PERSISTENT": [True, False],
}

FP8_GEMM_CONFIGS = ConfigSpace(_TMA_PARAMS, constraints=[_tma_fits])
FP8_GEMM_WGMMA_CONFIGS = ConfigSpace(_WGMMA_PARAMS, constraints=[_wgmma_fits])
FP8_GEMM_PINGPONG_CONFIGS = ConfigSpace(_PINGPONG_PARAMS)
FP8_GEMM_PTR_CONFIGS = ConfigSpace(_PTR_PARAMS)
FP8_GEMM_DECODE_CONFIGS = ConfigSpace(_DECODE_PARAMS, constraints=[_decode_fits])


def persistent_programs(tiles: int, slots: int) -> int:
    """Programs of a persistent grid: as many waves as ``slots`` resident programs need, with the tiles spread
    evenly over the fewest programs that keep that number of waves.

    512 tiles (4096^3 in 128x256) on 132 SMs take 4 waves either way; 128 programs of exactly 4 tiles each ran
    1.5 % faster than 132 programs of 3 or 4 tiles (H100, fast accumulation: 98.1-98.4 against 99.6-99.8 us;
    8192^3, 2048 tiles: 16 each, equal or better). Fewer programs than that cost a whole wave (124: 119 us).
    """
    if tiles <= slots:
        return max(tiles, 1)
    waves = -(-tiles // slots)
    return -(-tiles // waves)


def tma_heuristic(m: int, n: int, k: int, blocked: bool, fast: bool, device: torch.device,
                  interpreter: bool) -> dict[str, Any]:
    """Tiles for the tensor-descriptor kernel, from the H100 measurements (docs/fp8-gemm-kernel.md).

    Fast accumulation: 128x256x128, 4 stages with a split epilogue store, persistent (0.98-0.99x of cuBLAS
    ``use_fast_accum`` at 4096^3 and 8192^3, against 0.95x with 3 stages and a whole-tile store, measured in the
    same run). Faithful: 256x128x128 with promotion through
    ``max_num_imprecise_acc`` (each warpgroup then holds two 64-row partial sums, and the promotion of one
    overlaps the tensor-core work of the other), 4 stages with a split epilogue store.
    """
    if interpreter:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4, "num_warps": 4, "num_stages": 2,
                "PERSISTENT": True, "FLATTEN": False, "EPI_SUBTILE": False, "FAITHFUL_ACC": 1}
    if blocked:
        cfg = (128, 128, 4, True, 1)
    elif fast:
        cfg = (128, 256, 4, True, 1)
    else:
        cfg = (256, 128, 4, True, 2)
    bm, bn, stages, sub, acc = cfg
    if -(-m // bm) * -(-n // bn) < 2 * sm_count(device, cpu=4) // 3:  # too few tiles for the SMs: smaller tiles
        bm, bn, stages, sub = 128, 128, 4, False
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": stages,
            "PERSISTENT": True, "FLATTEN": True, "EPI_SUBTILE": sub, "FAITHFUL_ACC": acc}


def ptr_heuristic(m: int, n: int, k: int, interpreter: bool) -> dict[str, Any]:
    if interpreter:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


# Shared memory the fused decode kernel's pipeline may take (of the H100's 227 KB a program; the rest is the
# compiler's scratch for layout conversions).
_FUSED_SMEM = 160 * 1024


def fused_decode_config(cfg: dict[str, Any], n: int, a_element_size: int, interpreter: bool) -> dict[str, Any]:
    """The decode config when the kernel also quantizes the activation per row: wider column blocks, and a
    pipeline that fits the unquantized (2- or 4-byte) activation tiles in shared memory.

    Every program reads the whole activation for its row maxima, so fewer, wider programs repeat less of it.
    Only ``BLOCK_N`` and the stages change (the K tiles and splits, hence the sums, stay those of the two-launch
    path). On the H100 (M = 1 and 4, bf16): 128 columns took 11264^2 from 71 to 63 us (the GEMM alone: 58),
    11264 x 4096 from 31 to 29 (27), 4096 x 11264 from 32 to 31; with 512-deep K tiles (weights <= 16 MB) 32
    stays best.
    """
    if interpreter:
        return cfg
    cfg = dict(cfg)
    if cfg["BLOCK_K"] <= 256 and n >= 4096:
        cfg["BLOCK_N"] = 128
    stage_bytes = cfg["BLOCK_K"] * (cfg["BLOCK_M"] * a_element_size + cfg["BLOCK_N"])
    cfg["num_stages"] = max(1, min(cfg["num_stages"], _FUSED_SMEM // stage_bytes))
    return cfg


def decode_heuristic(m: int, n: int, k: int, blocked: bool, device: torch.device, interpreter: bool) -> dict[str, Any]:
    """Small M: the whole of M in one tile, narrow column blocks, split-K where the columns alone give too few
    programs. Measured on the H100 (M = 1, 16, 64; N, K in {4096, 11264}; L2 flushed before every run; two
    sweeps of 150 configs per shape, docs/fp8-gemm-kernel.md); every rule below lands within 2 % of the best
    config of its shape, where configs differ by up to 50 % (block scales cap the K tile at 128 later):

    - a small weight (<= 16 MB): 32 columns, 512-deep K tiles, 4 stages;
    - M > 16 with N >= 64 columns per SM: 128 columns a program, so each program re-reads the [M, K]
      activation for 4x more weight (the re-reads, not the weight, limited 32-wide tiles at M = 64);
    - K >= 8192 with fewer than 2 column blocks per SM: K split in 4 for M <= 16 (6 stages without a split
      for M > 16, where every split re-reads the activation);
    - else 32 columns, 256-deep K tiles, 4 stages.

    Block or group scales (their K tiles are 128 deep) with 17 to 64 rows: ``_blocked_rows_config``.
    """
    block_m = max(16, next_pow2(m))
    if interpreter:
        return {"BLOCK_M": block_m, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "num_warps": 4, "num_stages": 1}
    sms = sm_count(device, cpu=4)
    if blocked and m > 16:
        return _blocked_rows_config(block_m, n, k, sms)
    block_n, block_k, split, stages = 32, 256, 1, 4
    if n * k <= 2**24:
        block_k = 512
    elif m > 16 and n >= 64 * sms:
        block_n = 128
    elif k >= 8192 and -(-n // 32) < 2 * sms:
        split, stages = (4, 3) if m <= 16 else (1, 6)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": 4,
            "num_stages": stages}


def _blocked_rows_config(block_m: int, n: int, k: int, sms: int) -> dict[str, Any]:
    """17 to 64 rows with block or group scales: 64 columns a program, K split until there are about two programs
    per SM (at least ``15 / 8`` of the SM count), at most 8 ways (4 past 32 rows, where each split re-reads more
    activation and partials); unsplit past 32 rows when the column blocks alone are 1.5 a SM.

    Measured on the H200 (``python -m benchmarks.dev.w8a8_rows``: 1x128 activation blocks, group-scaled weights,
    four different weights back to back in a CUDA graph; 64 tiles per shape): within 5 % of the best tile on average
    over Llama-3-8B's, Qwen3-8B's and gpt-oss-20b's projections at M = 32 and 64. The previous rule (the per-channel
    one: 32 columns, unsplit) took 1.3-2.6x the best: at 64 rows, down_proj 76.9 us against 29.8 (bf16 cuBLAS 35.5),
    q/k/v 25.6 against 17.7, o 24.0 against 14.2.
    """
    block_n = 64
    cols = -(-n // block_n)
    k_tiles = -(-k // 128)
    split = 1
    if block_m <= 32 or 2 * cols < 3 * sms:
        cap = 8 if block_m <= 32 else 4
        while 8 * cols * split < 15 * sms and split < cap and 2 * split <= k_tiles // 2:
            split *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 128, "SPLIT_K": split, "num_warps": 4,
            "num_stages": 4}


def choose(kernel: str, problem: dict[str, int], dtypes: tuple, device: torch.device, default: Any,
           space: Any, bench: Callable[[dict[str, Any]], Callable[[], Any]] | None = None) -> dict[str, Any]:
    """The launch config: kernel-autotune's cached one, the shipped one of this GPU (product name and compute
    capability), one tuned on first use, else ``default()`` (the heuristics above, which read the device's SM count).

    ``bench(config)`` returns a zero-argument callable running the GEMM once with ``config`` on the caller's
    operands; given one, a problem with nothing cached or shipped is tuned on first use when ``TRITON_OPS_AUTOTUNE``
    says so (by default on a GPU this package ships no configs for; never in a CUDA-graph capture or a
    ``torch.compile`` trace) and the result cached on disk. Without it (the plan cache's memoized path) the
    heuristic answers, and the family is tuned by ``python -m kernel_autotune tune fp8_gemm``.
    """
    return select_config(kernel, version=__version__, problem=problem, dtypes=dtypes, device=device,
                         default=default, bucket=("m",), shipped=TUNED, space=space, bench=bench)


__all__ = [
    "FP8_GEMM_CONFIGS",
    "FP8_GEMM_DECODE_CONFIGS",
    "FP8_GEMM_PINGPONG_CONFIGS",
    "FP8_GEMM_WGMMA_CONFIGS",
    "FP8_GEMM_PTR_CONFIGS",
    "choose",
    "decode_heuristic",
    "fused_decode_config",
    "persistent_programs",
    "ptr_heuristic",
    "tma_heuristic",
]
