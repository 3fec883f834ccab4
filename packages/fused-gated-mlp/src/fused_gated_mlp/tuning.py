"""This package's kernel as a kernel-autotune family: the operation ``python -m kernel_autotune tune`` times, and the
shapes it tunes: decode (M = 1, 8, 32, 64) and prefill (M = 2048, 8192) of the benchmark suite's (hidden,
intermediate) pairs, of Llama-3-8B (4096 -> 14336) and Qwen3-8B (4096 -> 12288), and one gpt-oss-20b expert (2880 ->
2880 as the checkpoint stores it: interleaved packed weight and bias, clamped SwiGLU; ``"gpt_oss": 1`` in a shape).

kernel-autotune finds it through the ``kernel_autotune.tunables`` entry point in this package's ``pyproject.toml``
(also when run from source: it reads the file beside ``src``); ``--module fused_gated_mlp.tuning`` registers it
explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from kernel_autotune import Tunable, register_tunable

from .ops import clear_caches, fused_gated_mlp

NAME = "fused_gated_mlp"

_DECODE = (1, 8, 32, 64)


def _shape(m: int, h: int, i: int, **extra: Any) -> dict[str, Any]:
    return {"tokens": m, "hidden": h, "intermediate": i, "dtype": "bfloat16", **extra}


SHAPES: tuple[dict[str, Any], ...] = tuple(
    # decode first (the weight-streaming kernel whose tiles matter most per device), then prefill
    [_shape(m, 4096, 11264) for m in _DECODE]
    + [_shape(m, 4096, 14336) for m in (1, 8, 64)]       # Llama-3-8B (the model benchmark's decode batches)
    + [_shape(m, 4096, 12288) for m in (1, 8, 64)]       # Qwen3-8B
    + [_shape(m, 2880, 2880, gpt_oss=1) for m in _DECODE]  # one gpt-oss-20b expert
    + [_shape(m, 4096, 5632) for m in (1, 64)]
    + [_shape(m, 6144, 22528) for m in (1, 64)]
    + [_shape(m, 4096, 11264) for m in (2048, 8192)]
    + [_shape(2048, 4096, 14336), _shape(2048, 4096, 12288), _shape(2048, 2880, 2880, gpt_oss=1)]
)


def prepare(shape: Mapping[str, Any], device: torch.device) -> Callable[[], Any]:
    """Random inputs of one shape (weights scaled so the projections are O(1)); returns a SwiGLU call on them, or the
    gpt-oss expert's (interleaved packed weight and bias, ``swiglu_oai``) with ``gpt_oss``."""
    m, h, i = int(shape["tokens"]), int(shape["hidden"]), int(shape["intermediate"])
    dtype = getattr(torch, str(shape.get("dtype", "bfloat16")))
    x = torch.randn(m, h, device=device).to(dtype)
    if shape.get("gpt_oss"):
        w = (torch.randn(2 * i, h, device=device) * h ** -0.5).to(dtype)
        b = (torch.randn(2 * i, device=device) * 0.1).to(dtype)
        return lambda: fused_gated_mlp(x, w, activation="swiglu_oai", weight_layout="interleaved", gate_bias=b)
    wg = (torch.randn(i, h, device=device) * h ** -0.5).to(dtype)
    wu = (torch.randn(i, h, device=device) * h ** -0.5).to(dtype)
    return lambda: fused_gated_mlp(x, wg, wu, "silu")


def describe(shape: Mapping[str, Any]) -> str:
    tag = " gpt-oss expert" if shape.get("gpt_oss") else ""
    return f"M={shape['tokens']} H={shape['hidden']} I={shape['intermediate']} {shape.get('dtype')}{tag}"


def tunable() -> Tunable:
    """The family (the entry point's target). ``clear_caches`` forgets the launch plans' configs between trials."""
    return Tunable(NAME, prepare, SHAPES, reset=clear_caches, shipped=Path(__file__).with_name("tuned_configs.json"),
                   describe=describe)


register_tunable(NAME, tunable)

__all__ = ["NAME", "SHAPES", "describe", "prepare", "tunable"]
