"""``FusedGatedMLP``: the gated part of a LLaMA-style feed-forward block as an ``nn.Module``."""

from __future__ import annotations

import torch
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError

from .ops import fused_gated_mlp
from .validation import ACTIVATIONS


class FusedGatedMLP(nn.Module):
    """``act(gate_proj(x)) * up_proj(x)`` with both projections and the activation in one Triton kernel.

    The activation applies to the gate projection (LLaMA / Hugging Face convention). The module is the gated
    intermediate only: the down projection stays an ordinary ``nn.Linear`` of the model, so
    ``mlp.down_proj(FusedGatedMLP.from_linear(mlp.gate_proj, mlp.up_proj)(x))`` reproduces a LLaMA MLP.

    Parameters ``gate_proj.weight`` / ``up_proj.weight`` (``[intermediate_dim, hidden_dim]``) and, with
    ``bias=True``, ``gate_proj.bias`` / ``up_proj.bias``, initialised as ``nn.Linear`` does.
    """

    def __init__(self, hidden_dim: int, intermediate_dim: int, activation: str = "silu", bias: bool = False, *,
                 alpha: float = 1.702, limit: float = 7.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, value in (("hidden_dim", hidden_dim), ("intermediate_dim", intermediate_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgumentError(f"{name}: expected a positive int, got {value!r}")
        if activation not in ACTIVATIONS:
            raise InvalidArgumentError(
                f"activation: expected one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.activation = activation
        self.alpha = alpha
        self.limit = limit
        self.gate_proj = nn.Linear(hidden_dim, intermediate_dim, bias=bias, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden_dim, intermediate_dim, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, gate_proj: nn.Linear, up_proj: nn.Linear, activation: str = "silu", *,
                    alpha: float = 1.702, limit: float = 7.0) -> FusedGatedMLP:
        """Adopt existing ``gate_proj`` / ``up_proj`` layers; the new module shares their parameters."""
        for name, layer in (("gate_proj", gate_proj), ("up_proj", up_proj)):
            if not isinstance(layer, nn.Linear):
                raise InvalidArgumentError(f"{name}: expected an nn.Linear, got {type(layer).__name__}")
        if gate_proj.weight.shape != up_proj.weight.shape:
            raise ShapeMismatchError(
                f"up_proj: expected weight shape {list(gate_proj.weight.shape)} (that of gate_proj), "
                f"got {list(up_proj.weight.shape)}")
        if (gate_proj.bias is None) != (up_proj.bias is None):
            raise InvalidArgumentError("up_proj: expected a bias exactly when gate_proj has one")
        inter, hidden = gate_proj.weight.shape
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.hidden_dim, module.intermediate_dim = hidden, inter
        if activation not in ACTIVATIONS:
            raise InvalidArgumentError(
                f"activation: expected one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
        module.activation, module.alpha, module.limit = activation, alpha, limit
        module.gate_proj, module.up_proj = gate_proj, up_proj
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., hidden_dim]`` to ``[..., intermediate_dim]``."""
        return fused_gated_mlp(
            x, self.gate_proj.weight, self.up_proj.weight, self.activation,
            gate_bias=self.gate_proj.bias, up_bias=self.up_proj.bias, alpha=self.alpha, limit=self.limit,
        )

    def extra_repr(self) -> str:
        bias = self.gate_proj.bias is not None
        extra = f", alpha={self.alpha}, limit={self.limit}" if self.activation == "swiglu_oai" else ""
        return (f"hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, "
                f"activation={self.activation!r}, bias={bias}{extra}")


__all__ = ["FusedGatedMLP"]
