"""This package's GEMM as a kernel-autotune family: the operation ``python -m kernel_autotune tune`` times, and the
shapes it tunes: the benchmark suite's (4096^3 and 8192^3 with both scalings and both accumulation modes; decode
M = 1, 16, 64 against (N, K) = (4096, 4096), (11264, 4096), (4096, 11264), (11264, 11264)) and ``FP8Linear``'s
(4096 -> 11264, per-row activations and per-channel weights, M = 1, 64, 2048, 8192), and the prefill GEMMs of the
default and group-row FP8 recipes (Llama-3-8B's projections at 2048 rows).

kernel-autotune finds it through the ``kernel_autotune.tunables`` entry point in this package's ``pyproject.toml``
(also when run from source: it reads the file beside ``src``); ``--module fp8_gemm.tuning`` registers it explicitly.
``scaling``: "tensor" (one scale per operand, the cuBLAS comparison), "row" (per-row activations and per-channel
weights, what FP8Linear and bf16 inputs use) or "group" (1x128 activation blocks and group-scaled weights, the default
recipe's prefill: the Gluon kernel on Hopper) or "row-group" (per-row activations and group-scaled weights, the
group-row recipe's prefill); ``fast_accum``: 0 (faithful fp32 accumulation), 1 (fast), or 2 (both:
the operation runs the GEMM once each way, so one shape tunes both kernels). The kernel name includes the scaling
modes and the accumulation, so each is its own cache entry.
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

_BOTH = 2  # fast_accum value: the operation runs both accumulation modes (two kernels tuned by one shape)


def _shape(m: int, n: int, k: int, scaling: str, fast_accum: int) -> dict[str, Any]:
    return {"m": m, "n": n, "k": k, "scaling": scaling, "fast_accum": fast_accum, "out_dtype": "bfloat16"}


SHAPES: tuple[dict[str, Any], ...] = tuple(
    # FP8Linear (4096 -> 11264, row x channel, faithful) at the suite's batch sizes, first: its decode calls decide
    # whether it beats bf16 nn.Linear
    [_shape(m, 11264, 4096, "row", 0) for m in (1, 64, 2048, 8192)]
    # the cuBLAS comparison: 4096^3 and 8192^3, both scalings, both accumulation modes
    + [_shape(s, s, s, "tensor", fast) for s in (4096, 8192) for fast in (0, 1)]
    + [_shape(s, s, s, "row", _BOTH) for s in (4096, 8192)]
    # decode, per-tensor scales, both accumulation modes per shape
    + [_shape(m, n, k, "tensor", _BOTH) for n, k in ((4096, 4096), (11264, 4096), (4096, 11264), (11264, 11264))
       for m in (1, 16, 64)]
    # the default recipe's prefill (1x128 activation blocks, group-scaled weights: the Gluon kernel on Hopper),
    # Llama-3-8B's q/k/v, o, gate and down at 2048 rows
    # and the group-row recipe's (per-row activations, the same group-scaled weights)
    + [_shape(2048, n, k, scaling, 0) for scaling in ("group", "row-group")
       for n, k in ((6144, 4096), (4096, 4096), (14336, 4096), (4096, 14336))]
)

# scaling -> (activation granularity, weight granularity)
_GRANULARITIES = {"tensor": ("tensor", "tensor"), "row": ("row", "channel"), "group": ("block", "group"),
                  "row-group": ("row", "group")}


def prepare(shape: Mapping[str, Any], device: torch.device) -> Callable[[], Any]:
    """E4M3 operands quantized beforehand (the GEMM is what is tuned, not the quantizer); returns the GEMM call (both
    accumulation modes, one after the other, with ``fast_accum`` 2)."""
    m, n, k = int(shape["m"]), int(shape["n"]), int(shape["k"])
    out_dtype = getattr(torch, str(shape.get("dtype", shape.get("out_dtype", "bfloat16"))))
    a_gran, b_gran = _GRANULARITIES[shape.get("scaling", "tensor")]
    a, a_scale = quantize_fp8(torch.randn(m, k, device=device), "e4m3", a_gran)
    # the [K, N] view of an nn.Linear-style [N, K] weight, scaled per tensor, per output channel or in groups
    b, b_scale = quantize_fp8((torch.randn(n, k, device=device) * k ** -0.5).t(), "e4m3", b_gran, role="weight")
    fast = int(shape.get("fast_accum", 0))
    if fast == _BOTH:
        return lambda: (fp8_gemm(a, b, a_scale=a_scale, b_scale=b_scale, out_dtype=out_dtype, fast_accum=False),
                        fp8_gemm(a, b, a_scale=a_scale, b_scale=b_scale, out_dtype=out_dtype, fast_accum=True))
    return lambda: fp8_gemm(a, b, a_scale=a_scale, b_scale=b_scale, out_dtype=out_dtype, fast_accum=bool(fast))


def describe(shape: Mapping[str, Any]) -> str:
    out = shape.get("dtype", shape.get("out_dtype", "bfloat16"))
    fast = int(shape.get("fast_accum", 0))
    extra = " faithful+fast" if fast == _BOTH else " fast-acc" if fast else ""
    return f"M={shape['m']} N={shape['n']} K={shape['k']} e4m3 {shape.get('scaling', 'tensor')}->{out}{extra}"


def _needs(device: torch.device) -> str | None:
    return None if supports_fp8(device) else "this device has no FP8 tensor cores"


def tunable() -> Tunable:
    """The family (the entry point's target). ``clear_caches`` forgets each shape's launch plan between trials."""
    return Tunable(NAME, prepare, SHAPES, reset=clear_caches, shipped=Path(__file__).with_name("tuned_configs.json"),
                   describe=describe, requires_gpu_feature=_needs)


register_tunable(NAME, tunable)

__all__ = ["NAME", "SHAPES", "describe", "prepare", "tunable"]
