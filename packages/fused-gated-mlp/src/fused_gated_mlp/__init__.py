"""fused_gated_mlp: ``act(x @ Wg^T + bg) * (x @ Wu^T + bu)`` (SwiGLU, GeGLU, gpt-oss SwiGLU) in one Triton kernel.

The activation applies to the gate projection (LLaMA / Hugging Face convention). Weights in the activations' dtype
or FP8 (E4M3 / E5M2, weight-only, per-channel or 128 x 128 block scales). See ``fused_gated_mlp`` and
``FusedGatedMLP``.
"""

from .__about__ import __version__
from .activation import gated_activation
from .configs import DECODE_MAX_TOKENS, GATED_MLP_CONFIGS, heuristic_config, select_gated_mlp_config
from .module import FP8Projection, FusedGatedMLP
from .ops import (
    FP8_WEIGHT_DTYPES,
    clear_caches,
    dequantize_weight_fp8,
    fused_gated_mlp,
    gated_mlp_reference,
    quantize_weight_fp8,
    split_packed,
)

__all__ = [
    "DECODE_MAX_TOKENS",
    "FP8_WEIGHT_DTYPES",
    "GATED_MLP_CONFIGS",
    "FP8Projection",
    "FusedGatedMLP",
    "__version__",
    "clear_caches",
    "dequantize_weight_fp8",
    "fused_gated_mlp",
    "gated_activation",
    "gated_mlp_reference",
    "heuristic_config",
    "quantize_weight_fp8",
    "select_gated_mlp_config",
    "split_packed",
]
