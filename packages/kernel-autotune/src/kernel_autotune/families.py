"""Built-in tunables for the triton-ops kernel families, with their benchmark shapes.

Each factory imports its kernel package only when called (``get_tunable``), so importing kernel-autotune
never imports a kernel package. The shapes are those of each package's issue and benchmark (H100 targets).
A shape's ``dtype`` is a torch dtype name; the CLI's ``--dtypes`` can replace it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .registry import Tunable, _register_builtin


def _shipped(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "tuned_configs.json"


def _dtype(shape: Mapping[str, Any], fallback: str = "bfloat16") -> torch.dtype:
    return getattr(torch, str(shape.get("dtype", fallback)))


def _randn(*size: int, dtype: torch.dtype, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    # Generated in fp32 then cast: random data everywhere, never zeros (zeros can take fast paths).
    return (torch.randn(*size, device=device, dtype=torch.float32) * scale).to(dtype)


# ---- fused_rmsnorm_rope ----------------------------------------------------------------------------

RMSNORM_ROPE_SHAPES: tuple[dict[str, Any], ...] = (
    {"batch": 2, "seq": 1024, "hidden": 4096, "head_dim": 128, "dtype": "bfloat16"},
    {"batch": 1, "seq": 8192, "hidden": 4096, "head_dim": 128, "dtype": "bfloat16"},
    {"batch": 4, "seq": 2048, "hidden": 8192, "head_dim": 128, "dtype": "bfloat16"},
    {"batch": 8, "seq": 4096, "hidden": 2048, "head_dim": 128, "dtype": "bfloat16"},
    {"batch": 16, "seq": 8192, "hidden": 4096, "head_dim": 128, "dtype": "bfloat16"},
    {"batch": 64, "seq": 1, "hidden": 4096, "head_dim": 128, "dtype": "bfloat16", "decode": 1},
)


def _rmsnorm_rope() -> Tunable:
    pkg = importlib.import_module("fused_rmsnorm_rope")
    # The package memoizes configs in its launch plans too: clear_caches() forgets both, so overrides apply.
    reset = getattr(pkg, "clear_caches", None) or getattr(
        importlib.import_module("fused_rmsnorm_rope.config"), "clear_config_cache", None)

    def prepare(shape: Mapping[str, Any], device: torch.device) -> Callable[[], Any]:
        b, s, h, hd = (int(shape[k]) for k in ("batch", "seq", "hidden", "head_dim"))
        dtype = _dtype(shape)
        x = _randn(b, s, h, dtype=dtype, device=device)
        weight = _randn(h, dtype=dtype, device=device, scale=0.1) + 1
        if shape.get("decode"):
            max_pos = 4096
            cos = _randn(max_pos, hd, dtype=dtype, device=device)
            sin = _randn(max_pos, hd, dtype=dtype, device=device)
            pos = torch.randint(0, max_pos, (b, s), device=device)
            return lambda: pkg.fused_rmsnorm_rope(x, weight, cos, sin, position_ids=pos)
        cos = _randn(s, hd, dtype=dtype, device=device)
        sin = _randn(s, hd, dtype=dtype, device=device)
        return lambda: pkg.fused_rmsnorm_rope(x, weight, cos, sin)

    def describe(shape: Mapping[str, Any]) -> str:
        tag = " decode" if shape.get("decode") else ""
        return f"({shape['batch']},{shape['seq']},{shape['hidden']}) hd{shape['head_dim']} {shape.get('dtype')}{tag}"

    return Tunable("fused_rmsnorm_rope", prepare, RMSNORM_ROPE_SHAPES, reset=reset,
                   shipped=_shipped("fused_rmsnorm_rope"), describe=describe)


# ---- fused_gated_mlp -------------------------------------------------------------------------------

GATED_MLP_SHAPES: tuple[dict[str, Any], ...] = tuple(
    [{"tokens": m, "hidden": 4096, "intermediate": 11264, "dtype": "bfloat16"} for m in (1, 8, 32, 64)]
    + [{"tokens": m, "hidden": 4096, "intermediate": 5632, "dtype": "bfloat16"} for m in (1, 64)]
    + [{"tokens": m, "hidden": 6144, "intermediate": 22528, "dtype": "bfloat16"} for m in (1, 64)]
    + [{"tokens": m, "hidden": 4096, "intermediate": 11264, "dtype": "bfloat16"} for m in (2048, 8192)]
)


def _gated_mlp() -> Tunable:
    pkg = importlib.import_module("fused_gated_mlp")

    def prepare(shape: Mapping[str, Any], device: torch.device) -> Callable[[], Any]:
        m, h, i = int(shape["tokens"]), int(shape["hidden"]), int(shape["intermediate"])
        dtype = _dtype(shape)
        x = _randn(m, h, dtype=dtype, device=device)
        wg = _randn(i, h, dtype=dtype, device=device, scale=h ** -0.5)
        wu = _randn(i, h, dtype=dtype, device=device, scale=h ** -0.5)
        return lambda: pkg.fused_gated_mlp(x, wg, wu, "silu")

    def describe(shape: Mapping[str, Any]) -> str:
        return f"M={shape['tokens']} H={shape['hidden']} I={shape['intermediate']} {shape.get('dtype')}"

    return Tunable("fused_gated_mlp", prepare, GATED_MLP_SHAPES, reset=getattr(pkg, "clear_caches", None),
                   shipped=_shipped("fused_gated_mlp"), describe=describe)


# ---- fp8_gemm --------------------------------------------------------------------------------------

# ``scaling``: "tensor" (one scale per operand, the cuBLAS comparison at 4096^3 and 8192^3) or "row" (per-row
# activations and per-channel weights, what FP8Linear and bf16 inputs use). The kernel name includes the
# scaling modes, so each is its own cache entry.
FP8_GEMM_SHAPES: tuple[dict[str, Any], ...] = tuple(
    [{"m": s, "n": s, "k": s, "scaling": "tensor", "out_dtype": "bfloat16"} for s in (4096, 8192)]
    + [{"m": 8192, "n": 8192, "k": 8192, "scaling": "row", "out_dtype": "bfloat16"}]
    + [{"m": m, "n": n, "k": k, "scaling": "row", "out_dtype": "bfloat16"}
       for m in (1, 16, 64) for n, k in ((4096, 4096), (11264, 4096))]
    + [{"m": 16, "n": 4096, "k": 11264, "scaling": "row", "out_dtype": "bfloat16"}]
)


def _fp8_quantize(t: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # E4M3 scaling done with torch: the GEMM is what is tuned, not the quantizer. Per row of ``t`` (an
    # activation's tokens, or an [N, K] weight's output channels) or one scale for the tensor.
    amax = (t.abs().amax(dim=1) if per_row else t.abs().amax()).float().clamp(min=1e-12)
    scale = amax / 448.0
    q = (t.float() / (scale[:, None] if per_row else scale)).to(torch.float8_e4m3fn)
    return q, scale.contiguous()


def _fp8_gemm() -> Tunable:
    pkg = importlib.import_module("fp8_gemm")
    fp8_gemm = getattr(pkg, "fp8_gemm", None) or importlib.import_module("fp8_gemm.gemm").fp8_gemm

    def prepare(shape: Mapping[str, Any], device: torch.device) -> Callable[[], Any]:
        m, n, k = int(shape["m"]), int(shape["n"]), int(shape["k"])
        out_dtype = getattr(torch, str(shape.get("dtype", shape.get("out_dtype", "bfloat16"))))
        per_row = shape.get("scaling", "tensor") == "row"
        a, a_scale = _fp8_quantize(torch.randn(m, k, device=device), per_row)
        w, w_scale = _fp8_quantize(torch.randn(n, k, device=device) * k ** -0.5, per_row)
        b = w.t()  # [K, N] view of an nn.Linear-style [N, K] weight
        fast = bool(shape.get("fast_accum", 0))
        return lambda: fp8_gemm(a, b, a_scale=a_scale, b_scale=w_scale, out_dtype=out_dtype, fast_accum=fast)

    def describe(shape: Mapping[str, Any]) -> str:
        out = shape.get("dtype", shape.get("out_dtype", "bfloat16"))
        extra = " fast-acc" if shape.get("fast_accum") else ""
        return f"M={shape['m']} N={shape['n']} K={shape['k']} e4m3 {shape.get('scaling', 'tensor')}->{out}{extra}"

    def needs(device: torch.device) -> str | None:
        from triton_ops_core.device import supports_fp8

        return None if supports_fp8(device) else "this device has no FP8 tensor cores"

    # fp8_gemm memoizes each shape's launch plan: clear it so each override reaches the kernel.
    reset = getattr(pkg, "clear_caches", None)
    return Tunable("fp8_gemm", prepare, FP8_GEMM_SHAPES, reset=reset, shipped=_shipped("fp8_gemm"),
                   describe=describe, requires_gpu_feature=needs)


_register_builtin("fused_rmsnorm_rope", "fused_rmsnorm_rope", _rmsnorm_rope)
_register_builtin("fused_gated_mlp", "fused_gated_mlp", _gated_mlp)
_register_builtin("fp8_gemm", "fp8_gemm", _fp8_gemm)

__all__ = ["FP8_GEMM_SHAPES", "GATED_MLP_SHAPES", "RMSNORM_ROPE_SHAPES"]
