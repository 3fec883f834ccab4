"""``fused_moe.moe_experts`` as a transformers experts implementation: ``register_experts_backend()``, then
``model.set_experts_implementation("triton_ops")`` (or ``from_pretrained(..., experts_implementation="triton_ops")``).

transformers 5 keeps the experts of its mixtures of experts as 3-D tensors in a module decorated with
``use_experts_implementation`` (Qwen3-MoE, Mixtral, gpt-oss, OLMoE, DeepSeek-V3 and others). Its forward takes the
router's choice (``hidden [T, H]``, ``top_k_index [T, k]``, ``top_k_weights [T, k]``) and dispatches on
``config._experts_implementation`` through ``ALL_EXPERTS_FUNCTIONS``, where transformers 5.7 and later accept any
registered name. This backend runs those calls as ``moe_experts``: the grouped expert GEMMs with the gate in their
epilogue, only the experts hit read, and a deterministic weighted combine, with no host sync (CUDA-graph safe). The
router stays the model's. ``patch_model`` does more for the models it knows (the router in Triton, the
post-attention norm and the residual add inside the MoE's launches); this serves the others, or a user who wants
only the experts.

Which calls run ``moe_experts`` (:func:`unsupported` says why not; the rest go to transformers' ``grouped_mm``
implementation, its default, with a warning once per experts class and reason):

- gated experts (``has_gate``) whose gate is transformers' default (``act(gate) * up`` of the two halves of the
  gate/up output, ``act_fn`` a SiLU, an exact GELU or GELU's tanh approximation) or gpt-oss's clamped SwiGLU of
  interleaved columns (``GptOssExperts._apply_gate``, ``alpha`` and ``limit``), stored transposed or not
  (``is_transposed``), with or without biases (``has_bias``); FP8 experts with their scales
  (``fused_moe.convert_experts_to_fp8(experts, transposed=experts.is_transposed)``) too, which only this backend
  reads (a call it cannot take then raises);
- no post-expert norm, not expert-parallel (its sentinel ids would index past the experts), nothing to
  differentiate (the op is forward-only), tensors on a device Triton runs on.
"""

from __future__ import annotations

import warnings

import torch
from fused_moe import is_fp8_experts, moe_experts
from triton_ops_core.device import can_run_on
from triton_ops_core.exceptions import InvalidArgumentError

EXPERTS_NAME = "triton_ops"
FALLBACK = "grouped_mm"  # transformers' default experts implementation
# transformers' act_fn classes -> moe_experts' activation (GELU's tanh approximation: GELUTanh, named PytorchGELUTanh
# in older releases, and NewGELUActivation compute the same function)
ACT_FN_ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu", "GELUTanh": "gelu_tanh",
                      "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh"}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned: set[tuple[type, str]] = set()
_default_gate = None  # transformers' _default_apply_gate, read once at registration (not inside compiled code)
_gpt_oss_gate = None  # GptOssExperts._apply_gate, likewise


def register_experts_backend() -> str:
    """Register :func:`experts_forward` under :data:`EXPERTS_NAME` in transformers' ``ALL_EXPERTS_FUNCTIONS``;
    returns the name. Idempotent.

    Raises:
        InvalidArgumentError: the installed transformers has no experts interface (before 5.0).
    """
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _default_apply_gate
    except ImportError as exc:  # pragma: no cover - transformers 4, or a release that moved them
        raise InvalidArgumentError(
            "transformers: the installed release has no experts interface as this backend knows it "
            f"(transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS and _default_apply_gate: {exc}); transformers "
            "5.7 to 5.25 have it") from exc
    global _default_gate, _gpt_oss_gate
    _default_gate = _default_apply_gate
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    except ImportError:  # pragma: no cover - a release without gpt-oss
        GptOssExperts = None
    _gpt_oss_gate = getattr(GptOssExperts, "_apply_gate", None)
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_NAME, experts_forward)
    return EXPERTS_NAME


def experts_forward(experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """An experts module's forward (transformers' experts-interface signature) as ``fused_moe.moe_experts``; see
    the module's docstring for which calls fall back to transformers' ``grouped_mm``."""
    why = unsupported(experts, hidden_states, top_k_weights)
    if why:
        return _fallback(experts, why)(experts, hidden_states, top_k_index, top_k_weights)
    bias = bool(getattr(experts, "has_bias", False))
    scales = experts._buffers  # FP8 experts: their scales beside the FP8 weights
    activation = _activation(experts)
    # the default gate splits gate_up's output with chunk(2) (concatenated); gpt-oss's takes columns ::2 and 1::2
    layout = "interleaved" if activation == "swiglu_oai" else "concatenated"
    return moe_experts(
        hidden_states, top_k_index, top_k_weights, experts.gate_up_proj,
        experts.gate_up_proj_bias if bias else None, experts.down_proj, experts.down_proj_bias if bias else None,
        activation, gate_up_layout=layout,
        transposed=bool(getattr(experts, "is_transposed", False)), alpha=float(getattr(experts, "alpha", 1.702)),
        limit=float(getattr(experts, "limit", 7.0)), gate_up_scale=scales.get("gate_up_scale"),
        down_scale=scales.get("down_scale"),
        fp8_activations="gate_up_scale" in scales and getattr(experts, "fp8_activations", False) is True)


def unsupported(experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_weights: torch.Tensor) -> str:
    """Why ``moe_experts`` cannot run this call (``""``: it can)."""
    if _default_gate is None:  # called before registration: read transformers' default gate now
        register_experts_backend()
    if not getattr(experts, "has_gate", True):
        return "experts without a gate (up_proj only)"
    if getattr(experts, "has_post_expert_norm", False):
        return "a norm after each expert"
    if getattr(experts, "_is_expert_parallel", False):
        return "expert parallelism (sentinel expert ids)"
    if _activation(experts) is None:
        return f"its gate ({type(getattr(experts, 'act_fn', None)).__name__} or a custom _apply_gate)"
    if not all(isinstance(getattr(experts, a, None), torch.Tensor) and getattr(experts, a).dim() == 3
               for a in ("gate_up_proj", "down_proj")):
        return "expert weights that are not 3-D tensors"
    if hidden_states.dtype not in _DTYPES or not can_run_on(hidden_states.device):
        return f"{hidden_states.dtype} on {hidden_states.device.type}"
    if torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad or any(
            p.requires_grad for p in experts.parameters())):
        return "a gradient to record (training)"
    return ""


def _activation(experts: torch.nn.Module) -> str | None:
    """moe_experts' activation for the experts' gate: transformers' default gate with a SiLU, exact GELU or tanh-GELU
    ``act_fn``, or gpt-oss's clamped SwiGLU (``GptOssExperts._apply_gate`` itself, with ``alpha`` and ``limit``);
    None otherwise. By identity of the gate functions, which Dynamo traces as eager runs it (it read a function's
    ``__qualname__`` wrong: gpt-oss's gate looked unknown inside a compiled ``generate()``)."""
    if "_apply_gate" in experts.__dict__:  # a gate set on the instance: not one of those known
        return None
    gate = getattr(type(experts), "_apply_gate", _default_gate)
    if gate is not _default_gate:
        gpt_oss = gate is _gpt_oss_gate and hasattr(experts, "alpha") and hasattr(experts, "limit")
        return "swiglu_oai" if gpt_oss else None
    return ACT_FN_ACTIVATIONS.get(type(getattr(experts, "act_fn", None)).__name__)


def _fallback(experts: torch.nn.Module, why: str):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if is_fp8_experts(experts):  # transformers' implementations know no FP8 experts of ours
        raise InvalidArgumentError(
            f"experts_implementation={EXPERTS_NAME!r}: {type(experts).__name__} holds FP8 experts "
            f"(fused_moe.convert_experts_to_fp8), which only fused_moe reads, and fused_moe does not take {why}")
    key = (type(experts), why)
    if key not in _warned and not torch.compiler.is_compiling():  # said by the eager call (Dynamo traces no warn)
        _warned.add(key)
        warnings.warn(f"experts_implementation={EXPERTS_NAME!r}: {type(experts).__name__} runs transformers' "
                      f"{FALLBACK!r} implementation here: fused_moe does not take {why}", stacklevel=3)
    return ALL_EXPERTS_FUNCTIONS[FALLBACK]


__all__ = ["ACT_FN_ACTIVATIONS", "EXPERTS_NAME", "FALLBACK", "experts_forward", "register_experts_backend",
           "unsupported"]
