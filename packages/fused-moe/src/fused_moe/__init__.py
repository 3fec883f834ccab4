"""fused_moe: a mixture-of-experts feed-forward block in Triton (gpt-oss-20b's ``GptOssMLP``; Qwen3-MoE /
Mixtral-style experts too).

Routing (router GEMM, top-k, softmax over the chosen), grouping of the tokens by expert on the device, a grouped
GEMM for gate/up with the bias and the (clamped) SwiGLU in its epilogue, a grouped GEMM for down with the bias and
the routing weight, and a deterministic combine; expert weights in bf16/fp16/fp32 or, weight-only, in FP8 with
per-column scales (``quantize_experts_fp8``), or W8A8 with the activations quantized per row
(``fp8_activations=True``). See ``fused_moe``, ``moe_route``, ``moe_experts`` and ``FusedMoE``.
"""

from .__about__ import __version__
from .configs import DECODE_MAX_TOKENS, MoEConfig, select_config
from .module import FusedMoE, convert_experts_to_fp8, is_fp8_experts, uses_fp8_activations
from .ops import (
    ExpertGroups,
    MoEBackwardError,
    clear_caches,
    fused_moe,
    max_tiles,
    moe_align,
    moe_experts,
    moe_route,
    quantize_experts_fp8,
)
from .reference import (
    align_reference,
    moe_experts_reference,
    moe_reference,
    quantize_rows_reference,
    route_reference,
)

__all__ = [
    "DECODE_MAX_TOKENS",
    "ExpertGroups",
    "FusedMoE",
    "MoEBackwardError",
    "MoEConfig",
    "__version__",
    "align_reference",
    "clear_caches",
    "convert_experts_to_fp8",
    "fused_moe",
    "is_fp8_experts",
    "max_tiles",
    "moe_align",
    "moe_experts",
    "moe_experts_reference",
    "moe_reference",
    "moe_route",
    "quantize_experts_fp8",
    "quantize_rows_reference",
    "route_reference",
    "select_config",
    "uses_fp8_activations",
]
