"""``FusedMoE``: a mixture-of-experts block (router + experts) as an ``nn.Module``, built from gpt-oss's
``GptOssMLP`` by ``from_module`` with its parameters shared."""

from __future__ import annotations

import torch
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError

from .ops import fused_moe, quantize_experts_fp8
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

    @torch.no_grad()
    def quantize_experts_fp8(self, dtype: torch.dtype = torch.float8_e4m3fn, *,
                             fp8_activations: bool = False) -> FusedMoE:
        """Convert the experts' weights to FP8 in place (weight-only; :func:`fused_moe.quantize_experts_fp8`: one
        scale per expert and output column), for half the weight bytes per decode step. ``experts.gate_up_proj``
        and ``experts.down_proj`` become FP8 parameters (no gradient) and ``experts.gate_up_scale`` /
        ``experts.down_scale`` fp32 buffers; the high-precision weights are released (no second copy), so this is
        one-way. The router and the biases keep their dtype. ``fp8_activations=True`` (E4M3 only): W8A8, the
        activations quantized per row too and the weights stored K-major (see
        :func:`convert_experts_to_fp8`). Returns ``self``."""
        convert_experts_to_fp8(self.experts, dtype, fp8_activations=fp8_activations)
        return self

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[..., hidden_dim]`` to ``(output [..., hidden_dim], router_scores [tokens, top_k])``: the routing
        weights of the chosen experts, in ``hidden_states``' dtype, as ``GptOssMLP.forward`` returns them."""
        e = self.experts
        scales = e._buffers
        return fused_moe(hidden_states, self.router.weight, self.router.bias, e.gate_up_proj, e.gate_up_proj_bias,
                         e.down_proj, e.down_proj_bias, self.top_k, self.activation, self.alpha, self.limit,
                         return_router_scores=True, gate_up_scale=scales.get("gate_up_scale"),
                         down_scale=scales.get("down_scale"), fp8_activations=uses_fp8_activations(e))

    def extra_repr(self) -> str:
        return (f"hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation!r}, "
                f"alpha={self.alpha}, limit={self.limit}"
                + (f", experts={str(self.experts.gate_up_proj.dtype).removeprefix('torch.')} (fp8, "
                   + ("128x128 block" if self.experts.gate_up_scale.dim() == 3 else "per-column") + " scales"
                   + (", fp8 activations per row" if uses_fp8_activations(self.experts) else "") + ")"
                   if is_fp8_experts(self.experts) else ""))


@torch.no_grad()
def convert_experts_to_fp8(experts: nn.Module, dtype: torch.dtype = torch.float8_e4m3fn,
                           transposed: bool = True, *, fp8_activations: bool = False) -> nn.Module:
    """Convert an experts module (``gate_up_proj``, ``down_proj``: gpt-oss's ``GptOssExperts`` or
    ``FusedMoE.experts``) to weight-only FP8 in place: the two weights become FP8 parameters (no gradient) in the
    same layout, ``gate_up_scale`` / ``down_scale`` fp32 buffers are registered beside them
    (:func:`fused_moe.quantize_experts_fp8`), and the high-precision weights are released. Returns ``experts``.

    ``fp8_activations=True`` (``dtype`` E4M3 only): W8A8. The weights are stored K-major (same shapes; what FP8
    tensor cores read) and ``experts.fp8_activations`` is set, which tells ``FusedMoE`` and triton-ops' layers to
    quantize the activations per row (``moe_experts(..., fp8_activations=True)``).

    Raises:
        InvalidArgumentError: already converted, or ``fp8_activations`` with E5M2. UnsupportedDtypeError,
        ShapeMismatchError: from the quantizer.
    """
    if is_fp8_experts(experts):
        raise InvalidArgumentError("experts: already FP8 (converted before)")
    if not isinstance(fp8_activations, bool):
        raise InvalidArgumentError(f"fp8_activations: expected a bool, got {fp8_activations!r}")
    if fp8_activations and dtype != torch.float8_e4m3fn:
        raise InvalidArgumentError(f"fp8_activations: E4M3 activations go with float8_e4m3fn weights, got {dtype}")
    q1, s1, q2, s2 = quantize_experts_fp8(experts.gate_up_proj, experts.down_proj, transposed=transposed, dtype=dtype,
                                          k_major=fp8_activations)
    experts.gate_up_proj = nn.Parameter(q1, requires_grad=False)
    experts.down_proj = nn.Parameter(q2, requires_grad=False)
    experts.register_buffer("gate_up_scale", s1)
    experts.register_buffer("down_scale", s2)
    experts.fp8_activations = fp8_activations
    return experts


def is_fp8_experts(experts: nn.Module) -> bool:
    """Whether an experts module holds FP8 weights with their scales (``FusedMoE.quantize_experts_fp8``; or an FP8
    checkpoint's block scales registered under those names, as ``triton_ops.patch_model`` does)."""
    return "gate_up_scale" in experts._buffers and "down_scale" in experts._buffers


def uses_fp8_activations(experts: nn.Module) -> bool:
    """Whether FP8 experts were converted for E4M3 activations too (W8A8: ``convert_experts_to_fp8(...,
    fp8_activations=True)``)."""
    return is_fp8_experts(experts) and getattr(experts, "fp8_activations", False) is True


__all__ = ["FusedMoE", "convert_experts_to_fp8", "is_fp8_experts", "uses_fp8_activations"]
