"""Launch configs of the MoE kernels: a small heuristic by token count (no tuned table yet).

Decode (``tokens <= DECODE_MAX_TOKENS``) is bound by the read of the experts' weights: ``BLOCK_M`` is at least the
token count, so every expert hit gets exactly one row tile and each (expert, N-tile) program reads its slice of
the expert's weights once for all the expert's tokens; narrow ``BLOCK_N`` gives many programs to stream them.
Prefill uses fixed ``BLOCK_M``-token tiles of each expert's sorted rows.

The numbers are first guesses for Hopper (H100/H200), not yet measured: see the package README.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

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


@functools.lru_cache(maxsize=1024)
def select_config(num_tokens: int, top_k: int, hidden: int, intermediate: int, num_experts: int,
                  on_gpu: bool) -> MoEConfig:
    """The heuristic. Under the interpreter (``on_gpu=False``) the tiles are as large as the problem allows:
    each interpreted program instance costs about a millisecond, whatever its size."""
    if not on_gpu:
        block_m = min(64, max(16, next_pow2(num_tokens)))
        bn = min(64, max(16, next_pow2(intermediate)))
        bk = min(64, max(16, next_pow2(hidden)))
        dn = min(64, max(16, next_pow2(hidden)))
        dk = min(64, max(16, next_pow2(intermediate)))
        return MoEConfig(block_m, bn, bk, dn, dk, 4, 1)
    if num_tokens <= DECODE_MAX_TOKENS:
        # one tile per expert hit (an expert gets at most num_tokens rows): weights read once per call
        block_m = max(16, next_pow2(num_tokens))
        # K steps of 128 where they divide K exactly (no K mask in the weight loads), else 64 (2880 = 45 * 64)
        bk, dk = (128 if hidden % 128 == 0 else 64), (128 if intermediate % 128 == 0 else 64)
        # narrow N tiles at a few tokens: 4 experts hit x 2880 / 32 = 360 programs per GEMM (~2.7 waves on 132 SMs)
        bn = 32 if num_tokens <= 16 else 64
        return MoEConfig(block_m, bn, bk, bn, dk, 4, 4)
    return MoEConfig(64, 64, 64, 128, 64, 8, 3)


__all__ = ["DECODE_MAX_TOKENS", "MoEConfig", "select_config"]
