"""The modules: ``FusedRMSNormRoPE`` (norm + RoPE in one launch), ``RMSNorm`` and ``FusedAddRMSNorm``."""

from __future__ import annotations

import torch
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError
from triton_ops_core.validation.common import check_choice, check_positive

from .ops.rmsnorm import fused_add_rmsnorm, rmsnorm
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




def _hf_norm_state(norm: nn.Module) -> tuple[torch.Tensor, float]:
    """``(weight, eps)`` of a transformers RMSNorm (``variance_epsilon`` in Llama/Qwen/Mistral, ``eps`` in others)."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, (int, float)):
        raise InvalidArgumentError(
            f"norm: expected an RMSNorm module with a 1-D weight and variance_epsilon (or eps), got "
            f"{type(norm).__name__}")
    return weight, float(eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension in one pass (``rmsnorm``): ``weight`` ``[hidden]`` (ones; zeros with
    ``gemma=True``, whose norm scales by ``1 + weight``). :meth:`from_module` adopts a transformers norm's weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, gemma: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ShapeMismatchError(f"hidden_size: expected a positive integer, got {hidden_size!r}")
        check_positive(eps, "eps")
        self.eps, self.gemma = float(eps), bool(gemma)
        self.weight = nn.Parameter((torch.zeros if gemma else torch.ones)(hidden_size, device=device, dtype=dtype))

    @classmethod
    def from_module(cls, norm: nn.Module, *, gemma: bool = False) -> RMSNorm:
        """A module sharing ``norm``'s weight (``LlamaRMSNorm``, ``Qwen3RMSNorm``, ...): no copy."""
        weight, eps = _hf_norm_state(norm)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.eps, module.gemma = eps, bool(gemma)
        module.weight = weight
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps, gemma=self.gemma)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, gemma={self.gemma}"


class FusedAddRMSNorm(RMSNorm):
    """``residual = x + residual; y = RMSNorm(residual)`` in one pass: ``forward(x, residual) -> (y, residual)``."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_add_rmsnorm(x, residual, self.weight, self.eps, gemma=self.gemma)


__all__ = ["FusedAddRMSNorm", "FusedRMSNormRoPE", "RMSNorm"]
