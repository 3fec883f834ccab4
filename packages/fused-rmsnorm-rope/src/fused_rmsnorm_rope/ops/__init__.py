"""One module per op: kernels' launchers, the op's registration under ``torch.ops.triton_ops``, its fake and its
autograd, side by side (the Triton kernels themselves live in ``kernels``)."""

from .qk_norm_rope import fused_qk_norm_rope
from .rmsnorm import fused_add_rmsnorm, rmsnorm, rmsnorm_reference
from .rmsnorm_rope import fused_rmsnorm_rope
from .rope import apply_rope, rope_reference
from .sandwich import rmsnorm_add, rmsnorm_add_rmsnorm

__all__ = ["apply_rope", "fused_add_rmsnorm", "fused_qk_norm_rope", "fused_rmsnorm_rope", "rmsnorm",
           "rmsnorm_add", "rmsnorm_add_rmsnorm", "rmsnorm_reference", "rope_reference"]
