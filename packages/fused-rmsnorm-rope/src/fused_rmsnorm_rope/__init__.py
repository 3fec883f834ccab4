"""fused_rmsnorm_rope: RMSNorm + rotary position embedding in one Triton kernel, at the memory-bandwidth limit.

- ``fused_rmsnorm_rope(x, weight, cos, sin, eps, *, position_ids, rotary_dim, head_dim, layout, gemma)``
- ``fused_qk_norm_rope(q, k, q_weight, k_weight, cos, sin, position_ids, eps, *, rotary_dim, layout, gemma, inplace)``
- ``apply_rope(q, k, cos, sin, position_ids, *, rotary_dim, layout, inplace)``: RoPE alone on q and k (op ``rope``)
- ``rmsnorm(x, weight, eps, *, gemma)``, ``fused_add_rmsnorm(x, residual, weight, eps, *, gemma, inplace)``
- ``rmsnorm_add_rmsnorm(x, residual, x_weight, weight, eps, *, x_eps, gemma)``, ``rmsnorm_add(x, residual, weight,
  eps, *, gemma)``: Gemma's sandwich norms around the residual add, one launch each
- ``FusedRMSNormRoPE(hidden_dim, head_dim, eps)``, ``RMSNorm``, ``FusedAddRMSNorm``: the modules.
- ``reference``: the pure-PyTorch references; ``RMSNORM_ROPE_CONFIGS``: the tunable launch configs.
"""

from . import reference
from .__about__ import __version__
from .config import RMSNORM_ROPE_CONFIGS, heuristic_config
from .module import FusedAddRMSNorm, FusedRMSNormRoPE, RMSNorm
from .ops import (
    apply_rope,
    fused_add_rmsnorm,
    fused_qk_norm_rope,
    fused_rmsnorm_rope,
    rmsnorm,
    rmsnorm_add,
    rmsnorm_add_rmsnorm,
    rmsnorm_reference,
    rope_reference,
)
from .reference import qk_norm_rope_reference, rmsnorm_rope_reference


def clear_caches() -> None:
    """Forget cached launch plans and config lookups, e.g. after tuning, so the next calls pick the new configs."""
    from .config import clear_config_cache
    from .ops import qk_norm_rope, rmsnorm_rope
    from .ops.rmsnorm import _PLANS as norm_plans
    from .ops.rope import _PLANS as rope_plans
    from .ops.sandwich import _PLANS as sandwich_plans

    clear_config_cache()
    rmsnorm_rope._PLANS.clear()
    norm_plans.clear()
    qk_norm_rope._PLANS.clear()
    rope_plans.clear()
    sandwich_plans.clear()


__all__ = [
    "RMSNORM_ROPE_CONFIGS",
    "FusedAddRMSNorm",
    "FusedRMSNormRoPE",
    "RMSNorm",
    "__version__",
    "apply_rope",
    "clear_caches",
    "fused_add_rmsnorm",
    "fused_qk_norm_rope",
    "fused_rmsnorm_rope",
    "heuristic_config",
    "qk_norm_rope_reference",
    "reference",
    "rmsnorm",
    "rmsnorm_add",
    "rmsnorm_add_rmsnorm",
    "rmsnorm_reference",
    "rmsnorm_rope_reference",
    "rope_reference",
]
