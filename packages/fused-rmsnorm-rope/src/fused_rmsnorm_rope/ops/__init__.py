"""Triton kernels and their autograd Functions, side by side (one module per op)."""

from .qk_norm_rope import QKNormRoPEFunction, fused_qk_norm_rope
from .rmsnorm_rope import RMSNormRoPEFunction, fused_rmsnorm_rope

__all__ = ["QKNormRoPEFunction", "RMSNormRoPEFunction", "fused_qk_norm_rope", "fused_rmsnorm_rope"]
