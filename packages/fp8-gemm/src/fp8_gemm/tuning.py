"""This package's GEMM as a kernel-autotune family: the operation ``python -m kernel_autotune tune`` times, and the
benchmark shapes it tunes.

kernel-autotune finds it through the ``kernel_autotune.tunables`` entry point in this package's ``pyproject.toml``;
where the package runs from source without installed metadata, ``--module fp8_gemm.tuning`` registers it.
``scaling``: "tensor" (one scale per operand, the cuBLAS comparison at 4096^3 and 8192^3) or "row" (per-row
activations and per-channel weights, what FP8Linear and bf16 inputs use); the kernel name includes the scaling modes,
so each is its own cache entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from kernel_autotune import Tunable, register_tunable
from triton_ops_core.device import supports_fp8

from .gemm import clear_caches, fp8_gemm
from .quantize import quantize_fp8

NAME = "fp8_gemm"

SHAPES: tuple[dict[str, Any], ...] = tuple(
    [{"m": s, "n": s, "k": s, "scaling": "tensor", "out_dtype": "bfloat16"} for s in (4096, 8192)]
    + [{"m": 8192, "n": 8192, "k": 8192, "scaling": "row", "out_dtype": "bfloat16"}]
    + [{"m": m, "n": n, "k": k, "scaling": "row", "out_dtype": "bfloat16"}
       for m in (1, 16, 64) for n, k in ((4096, 4096), (11264, 4096))]
    + [{"m": 16, "n": 4096, "k": 11264, "scaling": "row", "out_dtype": "bfloat16"}]
)


def prepare(shape: Mapping[str, Any], device: torch.device) -> Callable[[], Any]:
    """E4M3 operands quantized beforehand (the GEMM is what is tuned, not the quantizer); returns the GEMM call."""
    m, n, k = int(shape["m"]), int(shape["n"]), int(shape["k"])
    out_dtype = getattr(torch, str(shape.get("dtype", shape.get("out_dtype", "bfloat16"))))
    per_row = shape.get("scaling", "tensor") == "row"
    a, a_scale = quantize_fp8(torch.randn(m, k, device=device), "e4m3", "row" if per_row else "tensor")
    # the [K, N] view of an nn.Linear-style [N, K] weight, one scale per output channel (or per tensor)
    b, b_scale = quantize_fp8((torch.randn(n, k, device=device) * k ** -0.5).t(), "e4m3",
                              "channel" if per_row else "tensor", role="weight")
    fast = bool(shape.get("fast_accum", 0))
    return lambda: fp8_gemm(a, b, a_scale=a_scale, b_scale=b_scale, out_dtype=out_dtype, fast_accum=fast)


def describe(shape: Mapping[str, Any]) -> str:
    out = shape.get("dtype", shape.get("out_dtype", "bfloat16"))
    extra = " fast-acc" if shape.get("fast_accum") else ""
    return f"M={shape['m']} N={shape['n']} K={shape['k']} e4m3 {shape.get('scaling', 'tensor')}->{out}{extra}"


def _needs(device: torch.device) -> str | None:
    return None if supports_fp8(device) else "this device has no FP8 tensor cores"


def tunable() -> Tunable:
    """The family (the entry point's target). ``clear_caches`` forgets each shape's launch plan between trials."""
    return Tunable(NAME, prepare, SHAPES, reset=clear_caches, shipped=Path(__file__).with_name("tuned_configs.json"),
                   describe=describe, requires_gpu_feature=_needs)


register_tunable(NAME, tunable)

__all__ = ["NAME", "SHAPES", "describe", "prepare", "tunable"]
