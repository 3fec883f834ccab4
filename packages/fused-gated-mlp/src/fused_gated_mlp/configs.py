"""Launch configurations of the fused gated MLP: the search space, the heuristic, and the choice per call.

A config is a plain dict:

- ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``: the tile (tokens x intermediate x hidden).
- ``SPLIT_K``: decode path only; programs that share one output tile, each summing a slice of ``hidden``.
- ``GROUP_M``: prefill path only; row tiles that sweep the columns together (L2 reuse of weight tiles).
- ``num_warps``, ``num_stages``: Triton launch options (``num_stages`` is the software-pipelining depth).

Which kernel runs follows from the number of tokens ``M``: ``M <= DECODE_MAX_TOKENS`` takes the decode kernel
(weights streamed at copy bandwidth), larger ``M`` the prefill GEMM. The config chosen for a call comes from
``kernel_autotune.select_config``: the user's cache, the shipped ``tuned_configs.json`` entries of this GPU (product
name and compute capability), tuning on first use (by default on a GPU without shipped entries, see
``TRITON_OPS_AUTOTUNE``), else :func:`heuristic_config`: the H100's measured table on the H100 only (matched by name
and capability, never by SM count: the H200 has the same 132 SMs and 1.4x the bandwidth), else rules reading the
device's SM count and shared memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from kernel_autotune import ConfigSpace, select_config
from triton_ops_core.device import device_info, sm_count
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.launch import next_pow2

from .__about__ import __version__

DECODE_MAX_TOKENS = 64
"""Token counts up to this run the decode kernel (one row tile; weights streamed once)."""

KERNEL_NAME = "fused_gated_mlp.fwd"
SHIPPED_CONFIGS = Path(__file__).with_name("tuned_configs.json")

_SPACE_AXES: dict[str, list[int]] = {
    "BLOCK_M": [16, 32, 64, 128],
    "BLOCK_N": [16, 32, 64, 128],
    "BLOCK_K": [32, 64, 128, 256],
    "SPLIT_K": [1, 2, 3, 4, 6, 8],
    "GROUP_M": [1, 8],
    "num_warps": [4, 8],
    "num_stages": [2, 3, 4, 5, 6],
}

# Shared memory of an H100 program (227 KB); the pipeline keeps num_stages copies of the x tile and both
# weight tiles.
_SMEM_LIMIT = 227 * 1024


def decode_block_m(tokens: int) -> int:
    """The row tile of the decode kernel: the smallest of 16, 32, 64 holding ``tokens`` (tl.dot needs 16)."""
    return 16 if tokens <= 16 else 32 if tokens <= 32 else 64


def _pipeline_bytes(cfg: Mapping[str, int], element_size: int = 2) -> int:
    tile = (cfg["BLOCK_M"] + 2 * cfg["BLOCK_N"]) * cfg["BLOCK_K"] * element_size
    return tile * cfg["num_stages"]


def _fits(cfg: Mapping[str, int], problem: Mapping[str, int] | None) -> bool:
    """Prune the cartesian product to configs that make sense for the problem's path (and an H100's shared memory;
    :func:`space_for` uses the device's)."""
    return _pipeline_bytes(cfg) <= _SMEM_LIMIT and _path_fits(cfg, problem)


def _path_fits(cfg: Mapping[str, int], problem: Mapping[str, int] | None) -> bool:
    tokens = None if problem is None else problem.get("tokens")
    decode = tokens is not None and tokens <= DECODE_MAX_TOKENS
    if tokens is None:
        # No problem given: keep every config either path could use.
        return _path_fits(cfg, {"tokens": 1}) or _path_fits(cfg, {"tokens": DECODE_MAX_TOKENS + 1})
    if decode:
        return (cfg["BLOCK_M"] == decode_block_m(tokens) and cfg["GROUP_M"] == 1
                and cfg["BLOCK_N"] <= 64 and cfg["BLOCK_K"] >= 64)
    # Prefill: tensor-core sized tiles; both fp32 accumulators live in registers, so cap their size.
    acc_regs = 2 * cfg["BLOCK_M"] * cfg["BLOCK_N"] // (32 * cfg["num_warps"])
    return (cfg["SPLIT_K"] == 1 and cfg["GROUP_M"] == 8 and cfg["BLOCK_M"] >= 64 and cfg["BLOCK_N"] >= 64
            and cfg["BLOCK_K"] <= 128 and acc_regs <= 128)


GATED_MLP_CONFIGS = ConfigSpace(_SPACE_AXES, constraints=[_fits])
"""Every launch config worth trying on an H100; ``GATED_MLP_CONFIGS.configs({"tokens": m, ...})`` lists a problem's.
:func:`space_for` gives a device's (its shared memory per block)."""


def _smem_limit(device: torch.device) -> int:
    """Shared memory a program may take on ``device`` (the H100's 227 KB under the interpreter or when unknown)."""
    smem = device_info(device).smem_per_block
    return smem if smem > 0 else _SMEM_LIMIT


@functools.lru_cache(maxsize=16)
def _space_with_limit(limit: int) -> ConfigSpace:
    if limit == _SMEM_LIMIT:
        return GATED_MLP_CONFIGS

    def smem_fits(cfg: Mapping[str, int], problem: Mapping[str, int] | None) -> bool:
        return _pipeline_bytes(cfg) <= limit

    return ConfigSpace(_SPACE_AXES, constraints=[_path_fits, smem_fits])


def space_for(device: torch.device) -> ConfigSpace:
    """The config space on ``device``: :data:`GATED_MLP_CONFIGS` with the device's shared memory per program."""
    return _space_with_limit(_smem_limit(device))


def _decode(bm: int, bn: int, bk: int, split: int, stages: int) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "GROUP_M": 1, "num_warps": 4,
            "num_stages": stages}


def _prefill(stages: int) -> dict:
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1, "GROUP_M": 8, "num_warps": 8,
            "num_stages": stages}


# Winners of the bf16 sweeps on the lent H100 SXM (132 SMs), 2026-11-22: decode from benchmarks/dev/gated_mlp_decode.py
# (grid kernel, plain loads; L2 flushed before every run), prefill from benchmarks/dev/gated_mlp.py sweep.
# (row tile or prefill token bucket, hidden, intermediate) -> config. Decode rows: 16 stands for M <= 16.
_H100_BF16: dict[tuple[int, int, int], dict] = {
    (16, 4096, 5632): _decode(16, 32, 128, 1, 4),
    (32, 4096, 5632): _decode(32, 64, 128, 1, 4),
    (64, 4096, 5632): _decode(64, 32, 128, 1, 3),
    (16, 4096, 11264): _decode(16, 32, 128, 1, 3),
    (32, 4096, 11264): _decode(32, 32, 128, 1, 3),
    (64, 4096, 11264): _decode(64, 32, 128, 1, 4),
    (16, 6144, 22528): _decode(16, 64, 256, 1, 3),
    (32, 6144, 22528): _decode(32, 64, 256, 1, 3),
    (64, 6144, 22528): _decode(64, 64, 128, 1, 4),
    (16, 2880, 2880): _decode(16, 32, 256, 1, 4),
    (32, 2880, 2880): _decode(32, 32, 256, 1, 4),
    (64, 2880, 2880): _decode(64, 32, 128, 1, 4),
    (2048, 4096, 5632): _prefill(4),
    (8192, 4096, 5632): _prefill(3),
    (2048, 4096, 11264): _prefill(4),
    (8192, 4096, 11264): _prefill(3),
    (2048, 6144, 22528): _prefill(3),
    (8192, 6144, 22528): _prefill(4),
    (2048, 2880, 2880): _prefill(4),
    (8192, 2880, 2880): _prefill(4),
}


# Measured tables by device: (product name, compute capability) -> the table above's kind. Matched exactly
# (triton_ops_core.device.lookup_by_device's rule): any other GPU, the H200 included, takes the rules below.
_DEVICE_TABLES: dict[tuple[str, str | None], dict[tuple[int, int, int], dict]] = {
    ("NVIDIA H100 80GB HBM3", "9.0"): _H100_BF16,
}


def _fit_stages(cfg: dict, smem: int) -> dict:
    """Fewer pipeline stages until the tiles fit ``smem`` bytes (GPUs with less shared memory than Hopper's)."""
    while cfg["num_stages"] > 2 and _pipeline_bytes(cfg) > smem:
        cfg["num_stages"] -= 1
    return cfg


# FP8 weights with channel (or tensor) scales at one or two rows: CUDA-core products of wide K tiles (config
# ``FMA``). The H200 sweep (2026-12-03; Llama-3-8B, Qwen3-8B and gpt-oss-20b expert shapes, CUDA-graph timing, 44
# FMA tiles against the tensor-core dot's) found one tile best at one row on all three: 8 columns x 512 of K, no
# split, 4 warps, 4 stages (Llama-3-8B 51.8 -> 35.4 us, Qwen3-8B 38.8 -> 31.1 us, gpt-oss 14.6 -> 7.3 us); at two
# rows 8 x 256 (48.2 -> 42.4 us on Llama-3-8B); from four rows on the dot wins. Block scales keep the dot (they
# scale each K step's partial product). Group scales (one per row and 128 of K): see ``_fp8_group_fma``.
FMA_MAX_TOKENS = 2


# Tensor-core tiles for FP8 channel-scaled weights beyond two rows, from the same H200 sweep (54 tiles at M = 8, 26 at
# M = 64; kept where the winner beat the bf16-derived choice by more than 5 %): (row tile, hidden, intermediate).
_H200_FP8_CHANNEL: dict[tuple[int, int, int], dict] = {
    (64, 4096, 14336): _decode(64, 64, 128, 1, 3),  # M = 64: 76.6 -> 70.0 us
    (64, 4096, 12288): _decode(64, 64, 128, 1, 3),  # M = 64: 90.9 -> 69.9 us
}
_FP8_DEVICE_TABLES: dict[tuple[str, str | None], dict[tuple[int, int, int], dict]] = {
    ("NVIDIA H200", "9.0"): _H200_FP8_CHANNEL,
}


def _fp8_f16_dot(intermediate: int, group: bool, sms: int) -> dict:
    """The tensor-core tile for FP8 channel- or group-scaled weights on the 16-row tile (3 to 16 rows; with group
    scales also 2 rows where ``_fp8_group_fma`` keeps the tensor cores, not measured with fp16 dots): fp16 dots
    (``F16_DOT``: each row of the activation tile scaled by a power of two into fp16's range, exact; with bf16
    activations each E4M3 weight then costs one conversion instead of two).

    H200, session 18 (``python -m benchmarks.dev.gated_mlp_f16_dot --rows 8,16``, four weight pairs back to back in
    a CUDA graph; 36 tiles with and without fp16 dots), M = 8: Llama-3-8B channel 46.4 -> 34.2 us (64 columns,
    256-deep K, no split), group 52.8 -> 41.4 us (64 x 128); gpt-oss-20b (2880 columns: 64-column tiles leave SMs
    idle) channel 15.2 -> 10.7 us, group 16.9 -> 11.8 us (32 columns x 128, split-K 4). M = 16 the same within 3 %.
    Group scales keep 128-deep K steps (one scale group a step).
    """
    block_k = 128 if group else 256
    if -(-intermediate // 64) >= sms:
        return {**_decode(16, 64, block_k, 1, 3), "F16_DOT": True}
    return {**_decode(16, 32, 128, 4, 3), "F16_DOT": True}


def _fp8_fma(tokens: int) -> dict:
    return {"BLOCK_M": tokens, "BLOCK_N": 8, "BLOCK_K": 512 if tokens == 1 else 256, "SPLIT_K": 1, "GROUP_M": 1,
            "num_warps": 4, "num_stages": 4, "FMA": True}


def _fp8_group_fma(tokens: int, intermediate: int, sms: int) -> dict | None:
    """The CUDA-core tile for group-scaled FP8 weights at one or two rows, where it pays; else None (the tensor-core
    tile of the block-scale rules, which scales each 128-deep K step's partial product).

    One row (``_fma_group_row_loop``: products in the weight tile's own layout, each thread's 16 products of a row
    summed before the group's scale): 8 columns, 512-deep K tiles, 3 stages, 4 warps, on every shape. H200, session
    17 (``python -m benchmarks.dev.gated_mlp_group_fma``, four weight pairs back to back in a CUDA graph):
    Llama-3-8B 32.7-33.5 us (the tensor-core tile 52.5; channel scales 32.2), gpt-oss-20b 8.1 us (16.9; channel
    7.7). Two rows (``_fma_group_k_loop``): only where the tensor-core tile's 32-column blocks leave SMs idle
    (gpt-oss-20b's 2880 columns, 90 blocks on 132 SMs: 14.0 against 16.9 us), 256-deep K tiles; on Llama-3-8B and
    Qwen3-8B the tensor-core tile measured faster (52.4 against 53.2, 41.4 against 46.8).
    """
    if tokens == 1:
        return {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 512, "SPLIT_K": 1, "GROUP_M": 1, "num_warps": 4,
                "num_stages": 3, "FMA": True}
    if -(-intermediate // 32) >= sms:
        return None
    return {"BLOCK_M": tokens, "BLOCK_N": 8, "BLOCK_K": 256, "SPLIT_K": 1, "GROUP_M": 1, "num_warps": 4,
            "num_stages": 3, "FMA": True}


@functools.lru_cache(maxsize=4096)
def _heuristic(tokens: int, hidden: int, intermediate: int, element_size: int,
               device: tuple[str, str | None], sms: int, smem: int, weights: str = "same") -> tuple:
    decode = tokens <= DECODE_MAX_TOKENS
    if weights == "fp8_channel" and 0 < tokens <= FMA_MAX_TOKENS:
        return tuple(sorted(_fp8_fma(tokens).items()))
    # 128x128 block scales are group scales shared by 128 rows: the group rules' tiles serve them (the kernels read
    # a row's scale at row // 128)
    if weights in ("fp8_group", "fp8_block") and 0 < tokens <= FMA_MAX_TOKENS:
        fma = _fp8_group_fma(tokens, intermediate, sms)
        if fma is not None:
            return tuple(sorted(fma.items()))
    if weights in ("fp8_channel", "fp8_group", "fp8_block") and element_size == 2 and decode_block_m(tokens) == 16:
        return tuple(sorted(_fp8_f16_dot(intermediate, weights != "fp8_channel", sms).items()))
    if weights == "fp8_channel" and decode:
        tuned = _FP8_DEVICE_TABLES.get(device, {}).get((decode_block_m(tokens), hidden, intermediate))
        if tuned is not None:
            return tuple(sorted(tuned.items()))
    table = _DEVICE_TABLES.get(device)
    if element_size == 2 and table is not None:
        row = decode_block_m(tokens) if decode else min(max(next_pow2(tokens), 2048), 8192)
        tuned = table.get((row, hidden, intermediate))
        if tuned is not None:
            return tuple(sorted(tuned.items()))
    if decode:
        # The rule most of the sweep's winners follow: 32 columns per program and 128-wide K steps (within 1-4 %
        # of the best tile at every measured shape), 4 stages but 3 for 64-row tiles; split-K only when the column
        # tiles alone leave most SMs idle.
        block_m = decode_block_m(tokens)
        block_n = 32
        block_k = 128
        if element_size == 4:
            # fp32 (ieee dot on FMA units): smaller tiles, or ptxas spills (seen in its resource report).
            block_n, block_k = 32, 64 if block_m == 16 else 32
        n_tiles = -(-intermediate // block_n)
        split_k = 1
        if n_tiles < 0.6 * sms:
            split_k = min(4, max(2, round(sms / n_tiles / 1.5)))
            while split_k > 1 and hidden < 4 * split_k * block_k:  # keep several K steps per slice
                split_k -= 1
        cfg = _decode(block_m, block_n, block_k, split_k, 3 if block_m == 64 else 4)
    elif element_size == 4:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 8,
               "num_warps": 8, "num_stages": 3}
    else:
        # 128 x (2 x 128) x 64, 8 warps: the best prefill tile at every measured size; 4 stages won at 2048 tokens
        # more often, 3 at 8192.
        cfg = _prefill(4 if tokens <= 4096 else 3)
    return tuple(sorted(_fit_stages(cfg, smem).items()))


WEIGHT_KINDS = ("same", "fp8_channel", "fp8_block", "fp8_group")
"""``weights`` of the config functions: the activations' dtype, or FP8 with channel (or tensor) / 128x128 block /
group (one per row and 128 of K) scales."""


def heuristic_config(tokens: int, hidden: int, intermediate: int, dtype: torch.dtype,
                     device: torch.device, weights: str = "same") -> dict:
    """The analytical choice, used when no tuned config is cached or shipped: for FP8 weights with channel scales
    at one or two rows the CUDA-core tile the H200 measured best (``FMA_MAX_TOKENS``; group scales where
    their tensor-core tiles would leave SMs idle, ``_fp8_group_fma``); for channel- or group-scaled FP8 weights on
    the 16-row tile, fp16 tensor-core dots (``_fp8_f16_dot``); else the device's measured
    table (the H100's, matched by product name and compute capability), else rules reading its SM count and
    shared memory. ``dtype``: the activations'; ``weights``: one of :data:`WEIGHT_KINDS`."""
    if weights not in WEIGHT_KINDS:
        raise InvalidArgumentError(f"weights: expected one of {', '.join(WEIGHT_KINDS)}, got {weights!r}")
    # the interpreter takes an H100's SM count, so the CPU picks the configs the rules would pick on one
    info = device_info(device)
    return dict(_heuristic(tokens, hidden, intermediate, dtype.itemsize, info.identity,
                           sm_count(device, cpu=132), _smem_limit(device), weights))


def select_gated_mlp_config(tokens: int, hidden: int, intermediate: int, dtype: torch.dtype,
                            device: torch.device, bench: Callable[[dict], Callable[[], object]] | None = None,
                            weights: str = "same") -> dict:
    """The config a call uses: ``kernel_autotune.select_config`` (tuned cache, shipped table, else the heuristic).

    ``bench(config)`` returns a zero-argument callable running the kernel once with ``config``: a problem with no
    cached or shipped entry is tuned on first use with it when ``TRITON_OPS_AUTOTUNE`` says so (by default on a GPU
    this package ships no configs for; never in a CUDA-graph capture or a ``torch.compile`` trace).
    """
    space = space_for(device)
    cfg = select_config(
        KERNEL_NAME,
        version=__version__,
        problem={"tokens": tokens, "hidden": hidden, "intermediate": intermediate},
        # FP8 weights are their own entries: a config tuned for bf16 weights never serves them
        dtypes=(dtype,) if weights == "same" else (dtype, weights),
        device=device,
        default=lambda: heuristic_config(tokens, hidden, intermediate, dtype, device, weights),
        bucket=("tokens",),
        shipped=SHIPPED_CONFIGS,
        space=space,
        bench=bench,
    )
    # A cached config from another token bucket may belong to the other path: keep only what fits this one.
    if not cfg.get("FMA") and not space.allows(cfg, {"tokens": tokens}):
        return heuristic_config(tokens, hidden, intermediate, dtype, device, weights)
    return cfg


__all__ = [
    "DECODE_MAX_TOKENS",
    "FMA_MAX_TOKENS",
    "WEIGHT_KINDS",
    "GATED_MLP_CONFIGS",
    "decode_block_m",
    "heuristic_config",
    "select_gated_mlp_config",
    "space_for",
]
