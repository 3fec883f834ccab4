"""fused_gated_mlp: ``act(x @ Wg^T + bg) * (x @ Wu^T + bu)`` (SwiGLU, GeGLU, gpt-oss SwiGLU) in one Triton kernel.

The activation applies to the gate projection (LLaMA / Hugging Face convention). See ``fused_gated_mlp`` and
``FusedGatedMLP``.
"""

from .__about__ import __version__
from .configs import DECODE_MAX_TOKENS, GATED_MLP_CONFIGS, heuristic_config, select_gated_mlp_config
from .module import FusedGatedMLP
from .ops import clear_caches, fused_gated_mlp, gated_mlp_reference, split_packed

__all__ = [
    "DECODE_MAX_TOKENS",
    "GATED_MLP_CONFIGS",
    "FusedGatedMLP",
    "__version__",
    "clear_caches",
    "fused_gated_mlp",
    "gated_mlp_reference",
    "heuristic_config",
    "select_gated_mlp_config",
    "split_packed",
]
