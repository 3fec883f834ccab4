"""Launch configurations of the fused gated MLP: the search space, the heuristic, and the choice per call.

A config is a plain dict:

- ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``: the tile (tokens x intermediate x hidden).
- ``SPLIT_K``: decode path only; programs that share one output tile, each summing a slice of ``hidden``.
- ``GROUP_M``: prefill path only; row tiles that sweep the columns together (L2 reuse of weight tiles).
- ``num_warps``, ``num_stages``: Triton launch options (``num_stages`` is the software-pipelining depth).

Which kernel runs follows from the number of tokens ``M``: ``M <= DECODE_MAX_TOKENS`` takes the decode kernel
(weights streamed at copy bandwidth), larger ``M`` the prefill GEMM. The config chosen for a call comes from
``kernel_autotune.select_config`` (tuned caches, shipped H100 results, opt-in tune-on-first-use) with
:func:`heuristic_config` as the default when nothing is cached.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from kernel_autotune import ConfigSpace, select_config
from triton_ops_core.device import sm_count
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
    """Prune the cartesian product to configs that make sense for the problem's path."""
    if _pipeline_bytes(cfg) > _SMEM_LIMIT:
        return False
    tokens = None if problem is None else problem.get("tokens")
    decode = tokens is not None and tokens <= DECODE_MAX_TOKENS
    if tokens is None:
        # No problem given: keep every config either path could use.
        return _fits(cfg, {"tokens": 1}) or _fits(cfg, {"tokens": DECODE_MAX_TOKENS + 1})
    if decode:
        return (cfg["BLOCK_M"] == decode_block_m(tokens) and cfg["GROUP_M"] == 1
                and cfg["BLOCK_N"] <= 64 and cfg["BLOCK_K"] >= 64)
    # Prefill: tensor-core sized tiles; both fp32 accumulators live in registers, so cap their size.
    acc_regs = 2 * cfg["BLOCK_M"] * cfg["BLOCK_N"] // (32 * cfg["num_warps"])
    return (cfg["SPLIT_K"] == 1 and cfg["GROUP_M"] == 8 and cfg["BLOCK_M"] >= 64 and cfg["BLOCK_N"] >= 64
            and cfg["BLOCK_K"] <= 128 and acc_regs <= 128)


GATED_MLP_CONFIGS = ConfigSpace(_SPACE_AXES, constraints=[_fits])
"""Every launch config worth trying; ``GATED_MLP_CONFIGS.configs({"tokens": m, ...})`` lists a problem's."""


def _decode(bm: int, bn: int, bk: int, split: int, stages: int) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "GROUP_M": 1, "num_warps": 4,
            "num_stages": stages}


def _prefill(stages: int) -> dict:
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1, "GROUP_M": 8, "num_warps": 8,
            "num_stages": stages}


# Winners of the bf16 sweeps on the lent H100 SXM (132 SMs), 2026-11-22: decode from benchmarks/dev/gated_mlp_decode.py
# (grid kernel, plain loads; L2 flushed before every run), prefill from benchmarks/dev/gated_mlp.py sweep.
# (row tile or prefill token bucket, hidden, intermediate) -> config. Decode rows: 16 stands for M <= 16.
_H100_SMS = 132
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


@functools.lru_cache(maxsize=4096)
def _heuristic(tokens: int, hidden: int, intermediate: int, element_size: int, sms: int) -> tuple:
    decode = tokens <= DECODE_MAX_TOKENS
    if element_size == 2 and sms == _H100_SMS:
        row = decode_block_m(tokens) if decode else min(max(next_pow2(tokens), 2048), 8192)
        tuned = _H100_BF16.get((row, hidden, intermediate))
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
    return tuple(sorted(cfg.items()))


def heuristic_config(tokens: int, hidden: int, intermediate: int, dtype: torch.dtype,
                     device: torch.device) -> dict:
    """The analytical choice, used when no tuned config is cached or shipped."""
    # the interpreter takes an H100's SM count, so the CPU picks the configs the GPU would
    return dict(_heuristic(tokens, hidden, intermediate, dtype.itemsize, sm_count(device, cpu=132)))


def select_gated_mlp_config(tokens: int, hidden: int, intermediate: int, dtype: torch.dtype,
                            device: torch.device, bench: Callable[[dict], Callable[[], object]] | None = None
                            ) -> dict:
    """The config a call uses: ``kernel_autotune.select_config`` (tuned cache, shipped table, else the heuristic).

    ``bench(config)`` returns a zero-argument callable running the kernel once with ``config``: with
    ``KERNEL_AUTOTUNE=1`` a problem with no cached or shipped entry is tuned on first use with it.
    """
    cfg = select_config(
        KERNEL_NAME,
        version=__version__,
        problem={"tokens": tokens, "hidden": hidden, "intermediate": intermediate},
        dtypes=(dtype,),
        device=device,
        default=lambda: heuristic_config(tokens, hidden, intermediate, dtype, device),
        bucket=("tokens",),
        shipped=SHIPPED_CONFIGS,
        space=GATED_MLP_CONFIGS,
        bench=bench,
    )
    # A cached config from another token bucket may belong to the other path: keep only what fits this one.
    if not _fits(cfg, {"tokens": tokens}):
        return heuristic_config(tokens, hidden, intermediate, dtype, device)
    return cfg


__all__ = [
    "DECODE_MAX_TOKENS",
    "GATED_MLP_CONFIGS",
    "decode_block_m",
    "heuristic_config",
    "select_gated_mlp_config",
]
