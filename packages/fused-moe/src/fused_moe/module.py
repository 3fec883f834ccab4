"""``FusedMoE``: a mixture-of-experts block (router + experts) as an ``nn.Module``, built from gpt-oss's
``GptOssMLP`` by ``from_module`` with its parameters shared."""

from __future__ import annotations

import torch
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError

from .ops import fused_moe
from .validation import ACTIVATIONS


class FusedMoE(nn.Module):
    """gpt-oss's mixture of experts in Triton: ``forward(hidden) -> (output, router_scores)`` like ``GptOssMLP``.

    Holds ``router`` (``weight [E, H]``, ``bias [E]``) and ``experts`` (``gate_up_proj [E, H, 2I]``,
    ``gate_up_proj_bias [E, 2I]``, ``down_proj [E, I, H]``, ``down_proj_bias [E, H]``, gate and up interleaved),
    the attribute names of ``GptOssMLP``. ``from_module`` adopts a ``GptOssMLP``'s own ``router`` and ``experts``
    submodules, so the parameters are the model's (no copy; a later ``load_state_dict`` on either shows in
    both). Forward only: a backward raises ``MoEBackwardError``.
    """

    def __init__(self, hidden_dim: int, intermediate_dim: int, num_experts: int, top_k: int = 4, *,
                 activation: str = "swiglu_oai", alpha: float = 1.702, limit: float = 7.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, value in (("hidden_dim", hidden_dim), ("intermediate_dim", intermediate_dim),
                            ("num_experts", num_experts), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgumentError(f"{name}: expected a positive int, got {value!r}")
        if top_k > num_experts:
            raise InvalidArgumentError(f"top_k: expected at most num_experts ({num_experts}), got {top_k}")
        if activation not in ACTIVATIONS:
            raise InvalidArgumentError(
                f"activation: expected one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
        kw = {"device": device, "dtype": dtype}
        self.router = nn.Module()
        self.router.weight = nn.Parameter(torch.empty(num_experts, hidden_dim, **kw))
        self.router.bias = nn.Parameter(torch.zeros(num_experts, **kw))
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, 2 * intermediate_dim, **kw))
        self.experts.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_dim, **kw))
        self.experts.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_dim, hidden_dim, **kw))
        self.experts.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_dim, **kw))
        for p, fan_in in ((self.router.weight, hidden_dim), (self.experts.gate_up_proj, hidden_dim),
                          (self.experts.down_proj, intermediate_dim)):
            nn.init.normal_(p, std=fan_in ** -0.5)
        self.hidden_dim, self.intermediate_dim, self.num_experts, self.top_k = (
            hidden_dim, intermediate_dim, num_experts, top_k)
        self.activation, self.alpha, self.limit = activation, alpha, limit

    @classmethod
    def from_module(cls, mlp: nn.Module) -> FusedMoE:
        """Adopt a transformers ``GptOssMLP`` (``mlp.router``: ``GptOssTopKRouter``, ``mlp.experts``:
        ``GptOssExperts``); the new module shares its submodules and parameters."""
        router, experts = getattr(mlp, "router", None), getattr(mlp, "experts", None)
        needed = {"router": (router, ("weight", "bias")),
                  "experts": (experts, ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"))}
        for name, (sub, attrs) in needed.items():
            missing = [a for a in attrs if not isinstance(getattr(sub, a, None), torch.Tensor)]
            if sub is None or missing:
                raise InvalidArgumentError(
                    f"mlp: expected a GptOssMLP-like module with {name}.{', '.join(attrs)}, got "
                    f"{type(mlp).__name__} lacking {name}" + (f".{', '.join(missing)}" if sub is not None else ""))
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.router, module.experts = router, experts
        num_experts, hidden_dim = router.weight.shape
        module.hidden_dim, module.num_experts = hidden_dim, num_experts
        module.intermediate_dim = experts.down_proj.shape[1]
        module.top_k = int(getattr(router, "top_k", 4))
        module.activation = "swiglu_oai"
        module.alpha = float(getattr(experts, "alpha", 1.702))
        module.limit = float(getattr(experts, "limit", 7.0))
        return module

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[..., hidden_dim]`` to ``(output [..., hidden_dim], router_scores [tokens, top_k])``: the routing
        weights of the chosen experts, in ``hidden_states``' dtype, as ``GptOssMLP.forward`` returns them."""
        e = self.experts
        return fused_moe(hidden_states, self.router.weight, self.router.bias, e.gate_up_proj, e.gate_up_proj_bias,
                         e.down_proj, e.down_proj_bias, self.top_k, self.activation, self.alpha, self.limit,
                         return_router_scores=True)

    def extra_repr(self) -> str:
        return (f"hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation!r}, "
                f"alpha={self.alpha}, limit={self.limit}")


__all__ = ["FusedMoE"]
