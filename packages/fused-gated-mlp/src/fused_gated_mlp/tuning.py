"""This package's kernel as a kernel-autotune family: the operation ``python -m kernel_autotune tune`` times, and the
benchmark shapes it tunes (decode and prefill of the package's issue and benchmark).

kernel-autotune finds it through the ``kernel_autotune.tunables`` entry point in this package's ``pyproject.toml``;
where the package runs from source without installed metadata, ``--module fused_gated_mlp.tuning`` registers it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from kernel_autotune import Tunable, register_tunable

from .ops import clear_caches, fused_gated_mlp

NAME = "fused_gated_mlp"

SHAPES: tuple[dict[str, Any], ...] = tuple(
    [{"tokens": m, "hidden": 4096, "intermediate": 11264, "dtype": "bfloat16"} for m in (1, 8, 32, 64)]
    + [{"tokens": m, "hidden": 4096, "intermediate": 5632, "dtype": "bfloat16"} for m in (1, 64)]
    + [{"tokens": m, "hidden": 6144, "intermediate": 22528, "dtype": "bfloat16"} for m in (1, 64)]
    + [{"tokens": m, "hidden": 4096, "intermediate": 11264, "dtype": "bfloat16"} for m in (2048, 8192)]
)


def prepare(shape: Mapping[str, Any], device: torch.device) -> Callable[[], Any]:
    """Random inputs of one shape (weights scaled so the projections are O(1)); returns a SwiGLU call on them."""
    m, h, i = int(shape["tokens"]), int(shape["hidden"]), int(shape["intermediate"])
    dtype = getattr(torch, str(shape.get("dtype", "bfloat16")))
    x = torch.randn(m, h, device=device).to(dtype)
    wg = (torch.randn(i, h, device=device) * h ** -0.5).to(dtype)
    wu = (torch.randn(i, h, device=device) * h ** -0.5).to(dtype)
    return lambda: fused_gated_mlp(x, wg, wu, "silu")


def describe(shape: Mapping[str, Any]) -> str:
    return f"M={shape['tokens']} H={shape['hidden']} I={shape['intermediate']} {shape.get('dtype')}"


def tunable() -> Tunable:
    """The family (the entry point's target). ``clear_caches`` forgets the launch plans' configs between trials."""
    return Tunable(NAME, prepare, SHAPES, reset=clear_caches, shipped=Path(__file__).with_name("tuned_configs.json"),
                   describe=describe)


register_tunable(NAME, tunable)

__all__ = ["NAME", "SHAPES", "describe", "prepare", "tunable"]
