"""``FusedRMSNormRoPE``: an ``nn.Module`` holding the RMSNorm weight, applying norm + RoPE in one launch."""

from __future__ import annotations

import torch
from torch import nn
from triton_ops_core.exceptions import ShapeMismatchError
from triton_ops_core.validation.common import check_choice, check_positive

from .ops.rmsnorm_rope import fused_rmsnorm_rope


class FusedRMSNormRoPE(nn.Module):
    """RMSNorm over ``hidden_dim`` with a learned ``weight`` ``[hidden_dim]``, then RoPE on heads of ``head_dim``.

    ``weight`` starts at ones (zeros with ``gemma=True``, whose norm scales by ``1 + weight``), like the models'
    own RMSNorm modules, so checkpoints load into it unchanged.
    """

    def __init__(self, hidden_dim: int, head_dim: int, eps: float = 1e-6, *, rotary_dim: int | None = None,
                 layout: str = "neox", gemma: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, value in (("hidden_dim", hidden_dim), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ShapeMismatchError(f"{name}: expected a positive integer, got {value!r}")
        if hidden_dim % head_dim:
            raise ShapeMismatchError(f"hidden_dim: expected a multiple of head_dim {head_dim}, got {hidden_dim}")
        check_positive(eps, "eps")
        check_choice(layout, "layout", ("neox", "interleaved"))
        self.hidden_dim, self.head_dim, self.eps = hidden_dim, head_dim, float(eps)
        self.rotary_dim, self.layout, self.gemma = rotary_dim, layout, bool(gemma)
        init = torch.zeros if gemma else torch.ones
        self.weight = nn.Parameter(init(hidden_dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[..., seq, hidden_dim]``; cos/sin and position_ids as in ``fused_rmsnorm_rope``."""
        return fused_rmsnorm_rope(x, self.weight, cos, sin, self.eps, position_ids=position_ids,
                                  rotary_dim=self.rotary_dim, head_dim=self.head_dim, layout=self.layout,
                                  gemma=self.gemma)

    def extra_repr(self) -> str:
        extra = f", rotary_dim={self.rotary_dim}" if self.rotary_dim is not None else ""
        return (f"hidden_dim={self.hidden_dim}, head_dim={self.head_dim}, eps={self.eps}, layout={self.layout!r}"
                f"{extra}, gemma={self.gemma}")


__all__ = ["FusedRMSNormRoPE"]
