"""This package's kernels as a kernel-autotune family: the operation ``python -m kernel_autotune tune`` times, and the
benchmark shapes it tunes (those of the package's issue and benchmark).

kernel-autotune finds it through the ``kernel_autotune.tunables`` entry point in this package's ``pyproject.toml``;
where the package runs from source without installed metadata, ``--module fused_rmsnorm_rope.tuning`` registers it.
A shape's ``dtype`` is a torch dtype name; the CLI's ``--dtypes`` can replace it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from kernel_autotune import Tunable, register_tunable

from . import clear_caches, fused_rmsnorm_rope

NAME = "fused_rmsnorm_rope"

SHAPES: tuple[dict[str, Any], ...] = (
    {"batch": 2, "seq": 1024, "hidden": 4096, "head_dim": 128, "dtype": "bfloat16"},
    {"batch": 1, "seq": 8192, "hidden": 4096, "head_dim": 128, "dtype": "bfloat16"},
    {"batch": 4, "seq": 2048, "hidden": 8192, "head_dim": 128, "dtype": "bfloat16"},
    {"batch": 8, "seq": 4096, "hidden": 2048, "head_dim": 128, "dtype": "bfloat16"},
    {"batch": 16, "seq": 8192, "hidden": 4096, "head_dim": 128, "dtype": "bfloat16"},
    {"batch": 64, "seq": 1, "hidden": 4096, "head_dim": 128, "dtype": "bfloat16", "decode": 1},
)


def _randn(*size: int, dtype: torch.dtype, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    # Generated in fp32 then cast: random data everywhere, never zeros (zeros can take fast paths).
    return (torch.randn(*size, device=device, dtype=torch.float32) * scale).to(dtype)


def prepare(shape: Mapping[str, Any], device: torch.device) -> Callable[[], Any]:
    """Random inputs of one shape; returns a call of ``fused_rmsnorm_rope`` on them."""
    b, s, h, hd = (int(shape[k]) for k in ("batch", "seq", "hidden", "head_dim"))
    dtype = getattr(torch, str(shape.get("dtype", "bfloat16")))
    x = _randn(b, s, h, dtype=dtype, device=device)
    weight = _randn(h, dtype=dtype, device=device, scale=0.1) + 1
    if shape.get("decode"):  # one token per sequence, positions into a cos/sin cache
        max_pos = 4096
        cos, sin = _randn(max_pos, hd, dtype=dtype, device=device), _randn(max_pos, hd, dtype=dtype, device=device)
        pos = torch.randint(0, max_pos, (b, s), device=device)
        return lambda: fused_rmsnorm_rope(x, weight, cos, sin, position_ids=pos)
    cos, sin = _randn(s, hd, dtype=dtype, device=device), _randn(s, hd, dtype=dtype, device=device)
    return lambda: fused_rmsnorm_rope(x, weight, cos, sin)


def describe(shape: Mapping[str, Any]) -> str:
    tag = " decode" if shape.get("decode") else ""
    return f"({shape['batch']},{shape['seq']},{shape['hidden']}) hd{shape['head_dim']} {shape.get('dtype')}{tag}"


def tunable() -> Tunable:
    """The family (the entry point's target). ``clear_caches`` forgets the launch plans' configs between trials."""
    return Tunable(NAME, prepare, SHAPES, reset=clear_caches, shipped=Path(__file__).with_name("tuned_configs.json"),
                   describe=describe)


register_tunable(NAME, tunable)

__all__ = ["NAME", "SHAPES", "describe", "prepare", "tunable"]
