"""Launch configs of the MoE kernels: a small heuristic by token count (no tuned table yet).

Decode (``tokens <= DECODE_MAX_TOKENS``) is bound by the read of the experts' weights: ``BLOCK_M`` is at least the
token count, so every expert hit gets exactly one row tile and each (expert, N-tile) program reads its slice of
the expert's weights once for all the expert's tokens; narrow ``BLOCK_N`` gives many programs to stream them.
Prefill uses fixed ``BLOCK_M``-token tiles of each expert's sorted rows.

The numbers are first guesses for Hopper (H100/H200), not yet measured: see the package README. Where a GPU differs
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


_HOPPER_SMEM = 227 * 1024  # what the stage counts below were chosen for


def _stages_that_fit(stages: int, stage_bytes: int, smem: int) -> int:
    """``stages``, lowered until that many copies of a stage's tiles fit ``smem`` bytes (at least 2)."""
    while stages > 2 and stages * stage_bytes > smem:
        stages -= 1
    return stages


@functools.lru_cache(maxsize=1024)
def select_config(num_tokens: int, top_k: int, hidden: int, intermediate: int, num_experts: int,
                  on_gpu: bool | torch.device) -> MoEConfig:
    """The heuristic. Under the interpreter (``on_gpu=False``) the tiles are as large as the problem allows:
    each interpreted program instance costs about a millisecond, whatever its size. ``on_gpu`` may be the CUDA device
    itself (``True``: the current one), whose SM count and shared memory the GPU rules read."""
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
    if num_tokens <= DECODE_MAX_TOKENS:
        # one tile per expert hit (an expert gets at most num_tokens rows): weights read once per call
        block_m = max(16, next_pow2(num_tokens))
        # K steps of 128 where they divide K exactly (no K mask in the weight loads), else 64 (2880 = 45 * 64)
        bk, dk = (128 if hidden % 128 == 0 else 64), (128 if intermediate % 128 == 0 else 64)
        # narrow N tiles at a few tokens: 4 experts hit x 2880 / 32 = 360 programs per GEMM (~2.7 waves on 132 SMs);
        # wider ones once the experts hit fill two waves of the device's SMs with them
        hit = min(num_tokens * top_k, num_experts)
        bn = 32 if num_tokens <= 16 or hit * -(-intermediate // 64) < 2 * sms else 64
        # a stage holds the token tile and a (2 x bn)-column weight tile of the gate/up GEMM, 2-byte elements
        stages = _stages_that_fit(4, (block_m + 2 * bn) * max(bk, dk) * 2, smem)
        return MoEConfig(block_m, bn, bk, bn, dk, 4, stages)
    return MoEConfig(64, 64, 64, 128, 64, 8, _stages_that_fit(3, (64 + 128) * 64 * 2, smem))


__all__ = ["DECODE_MAX_TOKENS", "MoEConfig", "select_config"]
