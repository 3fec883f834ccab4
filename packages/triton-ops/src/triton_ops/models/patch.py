"""``patch_model``: put our kernels into an instantiated Hugging Face transformers model, in place.

Patching keys on modules and their documented attributes (``gate_proj`` / ``up_proj`` / ``down_proj`` and
``config.hidden_act`` of a gated MLP, ``nn.Linear`` layers), never on copies of transformers' forward functions, so it
follows transformers from release to release. A patched module keeps its class's name, parameters and state dict:
its class becomes a subclass whose ``forward`` is one of :mod:`triton_ops.layers`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from fp8_gemm import FP8Linear, FP8Recipe, convert_to_fp8
from fp8_gemm.recipes import resolve_recipe, select_linears
from fp8_gemm.smoothing import DEFAULT_ALPHA, smooth_norm_fed_linears
from fused_gated_mlp import FP8Projection, quantize_weight_fp8
from fused_moe import convert_experts_to_fp8, is_fp8_experts
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError

from ..layers import (
    ACT_ATTR,
    ACTIVATION_GRANULARITY_ATTR,
    FAST_ACCUM_ATTR,
    GEMM_SCALE_BUFFER,
    LAYER_ATTR,
    MOE_ACTIVATIONS,
    MOE_ROUTING_ATTR,
    EpsRMSNorm,
    GatedMLP,
    GemmaRMSNorm,
    GptOssMoE,
    PackedGatedMLP,
    RMSNorm,
    SparseMoE,
    config_hidden_act,
    mlp_activation,
    moe_activation,
)
from .attention_backend import ATTENTION_NAME, register_attention_backend
from .cache_updates import prime_sliding_shift, prime_static_write
from .decoder_layers import (
    TOKEN_MIXER_ATTR,
    FullQKNormRopeAttention,
    FusedAddNormDecoderLayer,
    GatedQKNormRopeAttention,
    Gemma4DecoderLayer,
    GemmaQKNormRopeAttention,
    HybridDecoderLayer,
    PackedRopeAttention,
    PostNormDecoderLayer,
    QKNormRopeAttention,
    ResidualDropoutDecoderLayer,
    RopeAttention,
    SandwichNormDecoderLayer,
    SinkRopeAttention,
    forward_defined_by,
    has_full_qk_norm,
    has_gemma_qk_norm,
    has_qk_norm,
    hybrid_token_mixer,
    is_eps_rms_norm,
    is_gated_attention,
    is_gemma4_decoder_layer,
    is_gemma_rms_norm,
    is_packed_rope_attention,
    is_post_norm_decoder_layer,
    is_pre_norm_decoder_layer,
    is_residual_dropout_decoder_layer,
    is_rope_attention,
    is_sandwich_norm_decoder_layer,
    is_sink_attention,
    register_attention_traits,
)
from .experts_backend import ACT_FN_ACTIVATIONS, register_experts_backend
from .experts_backend import unsupported as experts_unsupported
from .layers import (
    PackedQKVLinear,
    QKVPacking,
    fp8_linears_packable,
    fp8_packable,
    pack_fp8,
    pack_fp8_linears,
    packable,
)
from .prequantized import adopt_fp8_experts, adopt_gate_up, adopt_transformers_fp8, fp8_gate_up

# config.model_type of the decoders whose layers we know: a gated MLP with gate_proj/up_proj/down_proj, gpt-oss's
# mixture of experts (router + experts), or Qwen3-MoE's / Mixtral's / Qwen2-MoE's sparse one (gate + experts; Qwen2-MoE
# with a gated shared expert); Gemma 3's text
# decoder (Gemma3ForCausalLM, Gemma3TextModel) with its (1 + weight) norms around each sublayer, Gemma 2's (the same
# norms, softcapped attention logits) and Gemma's (Llama's layer with (1 + weight) norms); Ministral's (Mistral's
# layer, a window per layer) and Ministral 3's (Mistral's, the queries scaled by a position-dependent temperature);
# SmolLM3's (Llama's, without the rotary embedding in some layers); OLMo 2's and 3's (norms after each sublayer, q/k
# norms over all heads).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt_oss", "qwen3_moe", "qwen2_moe", "mixtral",
                         "gemma3_text", "gemma3", "phi3", "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_5",
                         "qwen3_5_moe", "gemma4_text", "gemma4", "gemma", "gemma2", "ministral", "ministral3",
                         "mistral3", "smollm3", "olmo2", "olmo3")
# Multimodal models whose text decoder patch_model patches (the vision tower and the projector stay transformers'):
# config.model_type -> the text decoders' it may hold (Mistral 3's: Mistral Small 3.x a Mistral, Ministral 3 a
# Ministral 3 decoder)
LANGUAGE_MODEL_TYPES = {"gemma3": ("gemma3_text",), "qwen3_5": ("qwen3_5_text",), "qwen3_5_moe": ("qwen3_5_moe_text",),
                        "gemma4": ("gemma4_text",), "mistral3": ("mistral", "ministral3")}
# Hybrid decoders (Gated DeltaNet linear attention in most layers, gated full attention in the others): their norms,
# MLPs and mixtures of experts are ours; both token mixers and the decoder layers stay transformers'
HYBRID_MODEL_TYPES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
# Linears fp8=True keeps in the model's dtype whatever the recipe, by the end of their qualified name: Qwen2-MoE's,
# Qwen3-Next's and Qwen3.5's shared-expert gates (one output: a per-token scalar), Gemma 4's router projection (the
# other models' routers are no nn.Linear and stay in their dtype too: routing decisions), and the Gated DeltaNet's
# projections to its per-head gates (beta and the decay: a few outputs, which Qwen's own FP8 checkpoints, vLLM and
# NVIDIA ModelOpt's recipes for these models keep unquantized)
FP8_KEPT_LINEARS = ("shared_expert_gate", "router.proj", "linear_attn.in_proj_a", "linear_attn.in_proj_b",
                    "linear_attn.in_proj_ba")
# Known, and not yet supported: what the error says about them.
PLANNED: dict[str, str] = {}


class UnsupportedModelError(InvalidArgumentError):
    """``patch_model`` does not know this model's layers (the message lists the supported model types)."""


@dataclass
class PatchSummary:
    """What ``patch_model`` replaced (``model.triton_ops_patch`` after a call)."""

    model_type: str
    gated_mlps: int = 0  # MLPs whose gate/up projections (Phi-3: packed gate_up) and activation run in one kernel
    moe_blocks: int = 0  # mixtures of experts (gpt-oss's, Qwen3-MoE's, Mixtral's) run by fused_moe
    fp8_moe_blocks: int = 0  # of those, the ones whose expert weights are FP8 (weight-only, per-column scales)
    rms_norms: int = 0  # RMSNorm modules computed in one pass
    fused_residual_adds: int = 0  # decoder layers whose post-attention residual add runs inside the RMSNorm
    qk_norm_rope_attentions: int = 0  # attentions whose q/k norms and rotary embedding run as one kernel
    rope_attentions: int = 0  # Llama-style, gpt-oss, Phi-3 attentions whose rotary embedding runs as one kernel
    packed_qkv: int = 0  # attentions whose q, k, v projections patch_model packed into one GEMM (one FP8 GEMM with
    # fp8); Phi-3's are packed by the model itself (qkv_proj) and not counted here
    fp8_linears: int = 0  # nn.Linear layers now FP8Linear, and a pre-quantized checkpoint's FP8 layers adopted as
    # FP8Linear (packed q/k/v count three: each keeps its module; gate/up in the fused kernel count as fp8_gated_mlps)
    fp8_gated_mlps: int = 0  # gated MLPs whose gate/up weights are FP8 inside the fused kernel (weight-only)
    attention: str | None = None  # the attention implementation set on the model (None: left as it was)
    notes: list[str] = field(default_factory=list)  # what was left as it was, and why


_PATCHED_CLASSES: dict[tuple[type, type], type] = {}


def _patched_class(cls: type, layer: type) -> type:
    """``cls`` with ``layer``'s forward (made once per pair, so isinstance and the state dict are unchanged).
    Its instances pickle (``torch.save(model)``, ``copy.deepcopy``) as ``(cls, layer, state)``: the class is made
    again where they are loaded, which a lookup by name could not find."""
    key = (cls, layer)
    new = _PATCHED_CLASSES.get(key)
    if new is None:
        attrs = {"forward": layer.forward, "can_torch_compile": layer.can_torch_compile,
                 "has_backward": layer.has_backward, "__doc__": f"{cls.__name__} with triton-ops' {layer.__name__}.",
                 "__reduce_ex__": _reduce_patched}
        new = _PATCHED_CLASSES[key] = type(cls.__name__, (cls,), attrs)
        new._triton_ops_patched_from = key
    return new


def _reduce_patched(module: nn.Module, protocol: int) -> tuple:
    cls, layer = type(module)._triton_ops_patched_from
    return _rebuild_patched, (cls, layer, module.__getstate__())


def _rebuild_patched(cls: type, layer: type, state: dict) -> nn.Module:
    """A patched module from its pickled state (:func:`_patched_class`); the ``"triton_ops"`` attention the
    patched model may name is registered in this process too."""
    register_attention_backend()
    new = _patched_class(cls, layer)
    module = new.__new__(new)
    module.__setstate__(state)
    return module


def patch_forward(module: nn.Module, layer: type) -> None:
    """``module`` runs ``layer``'s forward: its class becomes the subclass with that forward
    (:func:`_patched_class`), and ``LAYER_ATTR`` records the layer's name for
    :func:`triton_ops.layers.runs_forward`."""
    module.__class__ = _patched_class(type(module), layer)
    module.__dict__[LAYER_ATTR] = layer.__name__


def _patch_gated_mlp(mlp: nn.Module) -> None:
    """``mlp`` runs :class:`~triton_ops.layers.GatedMLP`'s forward, its activation resolved once."""
    mlp.__dict__[ACT_ATTR] = mlp_activation(mlp)
    patch_forward(mlp, GatedMLP)


def _quantize_gate_up(mlp: nn.Module, scaling: str, activation_granularity: str, fast_accum: bool,
                      names: tuple[str, ...] = ("gate_proj", "up_proj")) -> None:
    """Quantize a gated MLP's gate and up projections (``names``; Phi-3's packed ``("gate_up_proj",)``) into
    ``FP8Projection`` s (E4M3, ``scaling`` ``"channel"``, ``"block"`` or ``"group"``; the bf16 weights released),
    and record how its W8A8 GEMMs beyond 16 rows run: the recipe's activation scales and ``fast_accum``
    (:func:`triton_ops.layers.gated_hidden`, :func:`~triton_ops.layers.packed_gated_hidden`)."""
    for name in names:
        linear = getattr(mlp, name)
        q, scale = quantize_weight_fp8(linear.weight.detach(), scaling, torch.float8_e4m3fn)
        projection = FP8Projection(q, scale, linear.bias)
        projection.__dict__[LAYER_ATTR] = "FP8Projection"  # what the fused kernel may stand in for (layers.py)
        if scaling in ("block", "group"):
            _store_gemm_scale(projection)
        setattr(mlp, name, projection)
    mlp.__dict__[ACTIVATION_GRANULARITY_ATTR] = activation_granularity
    mlp.__dict__[FAST_ACCUM_ATTR] = bool(fast_accum)


def _store_gemm_scale(projection: FP8Projection) -> None:
    """Keep the block or group scales also in the W8A8 GEMM's layout (``triton_ops.layers.GEMM_SCALE_BUFFER``),
    refreshed whenever a state dict is loaded into the projection (which writes ``weight_scale`` only)."""
    projection.register_buffer(GEMM_SCALE_BUFFER, _gemm_scale(projection.weight_scale), persistent=False)
    projection.register_load_state_dict_post_hook(_refresh_gemm_scale)


def _gemm_scale(weight_scale: torch.Tensor) -> torch.Tensor:
    """``[out / 128, in / 128]`` block (``[out, in / 128]`` group) scales as the GEMM's contiguous ``[in / 128,
    out / 128]`` (``[in / 128, out]``)."""
    return weight_scale.detach().t().contiguous()


def _refresh_gemm_scale(projection: nn.Module, incompatible_keys) -> None:
    """A load_state_dict post-hook (its signature): the copy made again from the ``weight_scale`` just loaded."""
    projection._buffers[GEMM_SCALE_BUFFER] = _gemm_scale(projection.weight_scale)


def _gated_mlps(model: nn.Module) -> list[nn.Module]:
    """Every gated MLP of the model: a module with nn.Linear gate_proj / up_proj, a down_proj and
    config.hidden_act (config.hidden_activation: Gemma 3)."""
    found = []
    for module in model.modules():
        gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
        if (type(gate) is nn.Linear and type(up) is nn.Linear and hasattr(module, "down_proj")
                and _names_activation(module)):
            found.append(module)
    return found


# transformers' MLPs with one packed gate/up projection (gate rows, then up rows) whose forward PackedGatedMLP computes
PACKED_GATED_MLPS = ("Phi3MLP",)


def _packed_gated_mlps(model: nn.Module) -> list[nn.Module]:
    """Every Phi-3 MLP (:data:`PACKED_GATED_MLPS`'s forward): ``gate_up_proj`` an ``nn.Linear`` with an even number
    of outputs, a ``down_proj`` and ``config.hidden_act``."""
    return [m for m in model.modules()
            if forward_defined_by(m, PACKED_GATED_MLPS) and type(getattr(m, "gate_up_proj", None)) is nn.Linear
            and m.gate_up_proj.out_features % 2 == 0 and hasattr(m, "down_proj")
            and _names_activation(m)]


def _fp8_linear_gated_mlps(model: nn.Module) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """``(mlp, names)`` of every gated MLP whose gate and up projections ``names`` are ``FP8Linear`` already (a
    pre-quantized checkpoint's, adopted; or ``convert_to_fp8``'s) and fused-kernel ready
    (:func:`~.prequantized.fp8_gate_up`), with a ``down_proj`` and an activation; Phi-3's packed ``gate_up_proj``
    only in the MLPs whose forward :class:`~triton_ops.layers.PackedGatedMLP` computes."""
    found = []
    for m in model.modules():
        names = fp8_gate_up(m)
        if names is None or not hasattr(m, "down_proj") or not _names_activation(m):
            continue
        if names == ("gate_up_proj",) and not (forward_defined_by(m, PACKED_GATED_MLPS)
                                                and m.gate_up_proj.out_features % 2 == 0):
            continue
        found.append((m, names))
    return found


def _names_activation(mlp: nn.Module) -> bool:
    """A module with an activation module (``act_fn`` / ``activation_fn``) or a config that names one."""
    return (any(isinstance(getattr(mlp, a, None), nn.Module) for a in ("act_fn", "activation_fn"))
            or config_hidden_act(getattr(mlp, "config", None)) is not None)


def _moe_blocks(model: nn.Module, foreign: list[nn.Module]) -> list[nn.Module]:
    """Every gpt-oss mixture of experts: ``router`` (weight, bias, top_k) and ``experts`` (gate_up_proj, its bias,
    down_proj, its bias, alpha, limit), gate and up interleaved as ``GptOssExperts`` holds them, the weights in a
    float dtype (or FP8 with our scales). Blocks whose experts are held otherwise (transformers' MXFP4 experts:
    packed ``uint8`` bytes, or triton_kernels' swizzled tensors) go to ``foreign``: they keep their own forward."""
    found = []
    for module in model.modules():
        router, experts = getattr(module, "router", None), getattr(module, "experts", None)
        if not (all(isinstance(getattr(router, a, None), torch.Tensor) for a in ("weight", "bias"))
                and hasattr(router, "top_k") and all(hasattr(experts, a) for a in ("alpha", "limit"))
                and all(hasattr(experts, a)
                        for a in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"))):
            continue
        tensors = [getattr(experts, a) for a in ("gate_up_proj", "down_proj")]
        if (all(isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[0] == router.weight.shape[0]
                for t in tensors)
                and (all(t.dtype in _FLOAT_DTYPES for t in tensors) or is_fp8_experts(experts))):
            found.append(module)
        else:
            foreign.append(module)
    return found


# transformers' sparse MoE blocks and routers whose forward SparseMoE computes (by class name along the MRO, as the
# attentions are matched): a block or router of another kind (sigmoid scores, a score-correction bias, DeepSeek's
# shared experts)
# would be computed wrongly without a word; Qwen2-MoE's shared expert and its sigmoid gate are SparseMoE's too)
# the blocks whose forward adds sigmoid(shared_expert_gate(x)) * shared_expert(x) to the routed experts' output
SHARED_EXPERT_BLOCKS = ("Qwen2MoeSparseMoeBlock", "Qwen3NextSparseMoeBlock", "Qwen3_5MoeSparseMoeBlock")
SPARSE_MOE_BLOCKS = ("Qwen3MoeSparseMoeBlock", "MixtralSparseMoeBlock", *SHARED_EXPERT_BLOCKS)
SPARSE_MOE_ROUTERS = ("Qwen3MoeTopKRouter", "MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3NextTopKRouter",
                      "Qwen3_5MoeTopKRouter")  # (Qwen3.5's always renormalizes: no norm_topk_prob)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _sparse_moe_blocks(model: nn.Module, foreign: list[nn.Module]) -> list[nn.Module]:
    """Every Qwen3-MoE / Mixtral / Qwen2-MoE sparse mixture of experts (transformers 5): a block of
    :data:`SPARSE_MOE_BLOCKS` whose ``gate`` is a router of :data:`SPARSE_MOE_ROUTERS` (``weight [E, H]``,
    ``top_k``) and whose ``experts`` hold ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` in a float dtype
    (or FP8 with our scales); Qwen2-MoE's (:data:`SHARED_EXPERT_BLOCKS`) with its ``shared_expert`` and
    ``shared_expert_gate`` modules. Blocks whose experts transformers quantized (its FP8 checkpoints'
    ``*_scale_inv`` blocks) go to ``foreign``: they keep their own forward."""
    found = []
    for module in model.modules():
        if not forward_defined_by(module, SPARSE_MOE_BLOCKS):
            continue
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        weight = getattr(gate, "weight", None)
        gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        if not (forward_defined_by(gate, SPARSE_MOE_ROUTERS) and isinstance(weight, torch.Tensor)
                and weight.dim() == 2 and isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
                and gate_up.dim() == 3 and down.dim() == 3):
            continue
        if forward_defined_by(module, SHARED_EXPERT_BLOCKS) and not all(
                isinstance(getattr(module, a, None), nn.Module) for a in ("shared_expert", "shared_expert_gate")):
            continue
        experts_n, hidden = weight.shape
        if not (gate_up.shape == (experts_n, 2 * down.shape[2], hidden) and down.shape[:2] == (experts_n, hidden)):
            continue
        if not (gate_up.dtype in _FLOAT_DTYPES and down.dtype in _FLOAT_DTYPES or is_fp8_experts(experts)):
            foreign.append(module)
            continue
        found.append(module)
    return found


def _experts_activation(experts: nn.Module, hidden_act: object) -> str:
    """fused_moe's activation for a sparse block's experts: from their ``act_fn`` (transformers builds it from
    ``config.hidden_act``: SiLU, exact or tanh GELU), else from ``hidden_act``; InvalidArgumentError for another."""
    act = getattr(experts, "act_fn", None)
    by_class = ACT_FN_ACTIVATIONS.get(type(act).__name__)
    if act is not None and by_class is None:
        raise InvalidArgumentError(
            f"hidden_act: the experts' act_fn {type(act).__name__} ({hidden_act!r}) is none of those fused_moe's "
            f"experts compute ({', '.join(map(repr, MOE_ACTIVATIONS))})")
    return by_class or moe_activation(hidden_act)


def _patch_sparse_moe(block: nn.Module, activation: str) -> None:
    """``block`` runs :class:`~triton_ops.layers.SparseMoE`'s forward, its activation and routing rule resolved
    once: renormalized top-k weights where the router renormalizes (Mixtral's always does and has no
    ``norm_topk_prob``; Qwen3-MoE's when ``norm_topk_prob``)."""
    block.__dict__[MOE_ROUTING_ATTR] = (activation, bool(getattr(block.gate, "norm_topk_prob", True)))
    patch_forward(block, SparseMoE)


def _rms_norms(model: nn.Module) -> list[tuple[nn.Module, type]]:
    """Every transformers RMSNorm of the model and the layer that computes it: a ``*RMSNorm`` module with a 1-D
    ``weight`` and ``variance_epsilon`` (:class:`~triton_ops.layers.RMSNorm`), or Gemma's, which scales by
    ``1 + weight`` (``eps``; :class:`~triton_ops.layers.GemmaRMSNorm`), or one that scales by ``weight`` and names
    its epsilon ``eps`` (Gemma 4's in transformers up to 5.17; :class:`~triton_ops.layers.EpsRMSNorm`)."""
    found = []
    for m in model.modules():
        if is_gemma_rms_norm(m):
            found.append((m, GemmaRMSNorm))
        elif is_eps_rms_norm(m):
            found.append((m, EpsRMSNorm))
        elif (type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor)
              and m.weight.dim() == 1 and isinstance(getattr(m, "variance_epsilon", None), (int, float))):
            found.append((m, RMSNorm))
    return found


def _model_type(model: object) -> str:
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model: expected a transformers model (an nn.Module), got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in SUPPORTED_MODEL_TYPES:
        return model_type
    why = f" ({PLANNED[model_type]})" if model_type in PLANNED else ""
    raise UnsupportedModelError(
        f"model: patch_model supports config.model_type in {', '.join(map(repr, SUPPORTED_MODEL_TYPES))}, got "
        f"{model_type!r}{why}")


def patch_model(model: nn.Module, *, fp8: bool = False, fp8_recipe: str | FP8Recipe = "default",
                fp8_lm_head: bool = False, weight_granularity: str | None = None,
                activation_granularity: str | None = None, fast_accum: bool = False,
                pack_qkv: bool = True, attention: bool = True, fp8_experts: bool | str = False,
                fp8_calibration: torch.Tensor | Sequence[torch.Tensor] | None = None,
                fp8_smooth_alpha: float = DEFAULT_ALPHA) -> nn.Module:
    """Patch a Hugging Face causal LM (or its base model) in place with triton-ops kernels; returns ``model``.

    Supported: ``config.model_type`` in :data:`SUPPORTED_MODEL_TYPES` (Llama, Mistral, Qwen2, Qwen3, gpt-oss,
    Qwen3-MoE, Mixtral, Qwen2-MoE, Gemma, Gemma 2, Gemma 3, Phi-3 / Phi-4, Gemma 4, Qwen3-Next, Qwen3.5, Ministral,
    Ministral 3, Mistral 3's language model, SmolLM3, OLMo 2, OLMo 3 and the models that share their layers). What
    is replaced:

    - Every RMSNorm (``variance_epsilon``, 1-D ``weight``: the layers' norms, the final norm, Qwen3's QK-norms) runs
      in one pass (:class:`triton_ops.layers.RMSNorm`).
    - ``fp8=False``: every gated MLP runs its gate and up projections and the activation in one kernel
      (:class:`triton_ops.layers.GatedMLP`; ``down_proj`` unchanged). Weights are shared, not copied.
    - A pre-quantized FP8 checkpoint (whatever ``fp8`` says): transformers' fine-grained FP8 layers (128x128 weight
      blocks, 1x128 groups or per tensor), FBGEMM FP8 and compressed-tensors FP8 layers (per channel) become
      ``FP8Linear`` holding their E4M3 weights as they are (``FP8Linear.from_quantized``: never dequantized; 1x128
      activation blocks for block and group weights, per row otherwise; a static activation scale or an activation
      bound is not used); gated MLPs whose gate and up are FP8Linear
      (adopted, or ``convert_to_fp8``'s) run them in the fused kernel with those weights, and FP8Linear q/k/v pack
      by concatenation (:mod:`triton_ops.models.prequantized`). Layers fp8_gemm cannot run (another block size,
      E5M2) stay transformers', with a note.
    - ``fp8=True``: the ``nn.Linear`` layers ``fp8_recipe`` selects become ``FP8Linear`` (weights quantized once,
      E4M3), the LM head excepted (``fp8_lm_head=True`` converts it too). The ``"default"`` recipe (the ``"group"``
      one: on a real pretrained decoder +0.58 % perplexity against bf16 in emulation over twenty texts, where the
      previous default measured +1.88 %: docs/fp8-gemm.md "Recipes", docs/benchmarks/fp8-accuracy.md) uses one
      weight scale per output feature and 128 input features and 1x128 activation blocks, and keeps every MLP output
      projection (``down_proj``) and the first and last decoder layers in the model's dtype. ``"block-mlp-out"``
      is the previous default (128x128 weight blocks, ``down_proj`` kept: faster prefill GEMMs, +1.88 %);
      ``fp8_recipe="channel"`` converts every Linear with per-channel weights and per-row activations (faster at
      decode, +2.8 % perplexity on that model), ``"block"`` every Linear with blocks. ``weight_granularity`` /
      ``activation_granularity`` override the recipe's scales, ``fast_accum`` is ``FP8Linear``'s. A gated MLP whose
      gate and up projections the recipe converts keeps its fused kernel with FP8 weights
      (``fused_gated_mlp.FP8Projection``: E4M3 with the recipe's weight scales, groups, 128x128 blocks or per
      channel;
      up to 16 rows (decode) the activations stay in the model's dtype, weight-only FP8, which reads half the bytes
      and skips the activation's quantization; beyond, gate and up run as two W8A8 FP8 GEMMs with the recipe's
      activation scales and ``fast_accum``, 1.5-4.4x faster at prefill on the H200:
      :data:`triton_ops.layers.W8A8_MIN_ROWS`). ``FP8Linear`` itself runs weight-only for up to 16 rows.
      ``fp8_calibration``: token ids (a tensor, or a sequence of them) of representative text; the unpatched model
      runs on them once, and SmoothQuant factors (strength ``fp8_smooth_alpha``) are folded into the RMSNorms that
      feed converted projections (q/k/v, gate/up) before anything is quantized (``fp8_gemm.smoothing``): fewer
      activation outliers where activations are quantized (W8A8, beyond 16 rows: prefill), the same kernels.
      Measured only as
      ``convert_to_fp8(calibration=)`` in emulation, W8A8 on every converted Linear (SmolLM2-135M, default recipe,
      twenty texts: +1.09 % perplexity against bf16 instead of +1.88 %, KL -7 %; docs/benchmarks/fp8-accuracy.md).

    - gpt-oss: every mixture of experts (``router`` + ``experts``) runs as ``fused_moe`` (routing, grouped expert
      GEMMs with the clamped SwiGLU, weighted combine; :class:`triton_ops.layers.GptOssMoE`). ``fp8=True``
      converts the attention's Linears by the recipe; the experts stay in their dtype unless ``fp8_experts=True``
      (E4M3, one scale per expert and output column, weight-only: the activations stay in the model's dtype, the
      tiles are converted in registers; :func:`fused_moe.convert_experts_to_fp8`, the bf16 weights released: half
      the experts' memory). Not the default: on the H200 (gpt-oss-20b's layer, session 28) weight-only FP8
      experts took 0.78-0.80x of bf16's time at 8-64 tokens but 1.45x at one token and 1.25-1.40x from 512
      tokens (the weight tiles' conversion in registers bounds them). The router stays in
      the model's dtype. ``fp8_experts="w8a8"``: the same E4M3 experts stored K-major, the activations quantized
      per row as well (``fused_moe``'s ``fp8_activations=True``: FP8 tensor-core products on both sides, no
      conversion of the weights in registers; the activations' E4M3 rounding added). On the H200 (gpt-oss-20b's
      layer) W8A8 experts take 0.64x of bf16's time in prefill and 0.76-0.81x at 1-64 tokens, where weight-only
      FP8 experts are 1.33-1.40x slower than bf16 in prefill; opt-in while its accuracy on a real MoE checkpoint is
      unmeasured.
    - Qwen3-MoE and Mixtral: every sparse mixture of experts (``gate`` + ``experts``, transformers 5's
      ``Qwen3MoeSparseMoeBlock`` / ``MixtralSparseMoeBlock``) runs as ``fused_moe`` with the router's own rule (a
      softmax over all experts, the top k, renormalized where the router does) and the SwiGLU of
      ``config.hidden_act`` (:class:`triton_ops.layers.SparseMoE`); Qwen3-MoE's dense layers (``mlp_only_layers``)
      are gated MLPs as above. ``fp8_experts=True`` converts these experts as gpt-oss's.
    - Qwen2-MoE (``Qwen2MoeSparseMoeBlock``): the same, and its shared expert (a gated MLP, fused as above) scaled by
      the sigmoid of its one-output ``shared_expert_gate`` (kept in the model's dtype with ``fp8``, as the routers)
      and added inside ``fused_moe``'s combine launch. Its attention runs as Qwen2's.
    - Gemma 4 (the multimodal model's language model too): its RMSNorms and gated MLPs; the experts its decoder
      layers call beside the MLP run ``fused_moe.moe_experts`` through transformers' experts interface (the model
      switched to ``"triton_ops"``, :mod:`~triton_ops.models.experts_backend`; ``fp8_experts`` converts them); its
      decoder layers as :class:`~triton_ops.models.decoder_layers.Gemma4DecoderLayer` (each norm with the residual
      add after it in one launch); its attention (shared K/V, V from K), per-layer input projections and router are
      transformers' own. With
      ``fp8`` its router projection stays in the model's dtype (:data:`FP8_KEPT_LINEARS`).
    - Qwen3-Next and Qwen3.5 (dense, MoE; the multimodal Qwen3.5 models' language model), hybrid decoders: their
      zero-centered RMSNorms (``1 + weight``) as Gemma's, their dense MLPs and shared experts as gated MLPs, their
      sparse blocks as Qwen2-MoE's, their gated full attentions as
      :class:`~triton_ops.models.decoder_layers.GatedQKNormRopeAttention` (one packed q/k/v GEMM, the q/k norms
      and the partial rotary embedding in one kernel), their decoder layers as
      :class:`~triton_ops.models.decoder_layers.HybridDecoderLayer` (each residual add in a neighbouring launch);
      the Gated DeltaNet layers are transformers' own. With ``fp8`` the Linears of :data:`FP8_KEPT_LINEARS`
      (shared-expert gates, the DeltaNet's per-head gate projections) stay in the model's dtype whatever the
      recipe.
    - Every pre-norm decoder layer adds the attention's output to the residual inside the post-attention RMSNorm
      (:class:`~triton_ops.models.decoder_layers.FusedAddNormDecoderLayer`: one launch for the add and the norm).
    - Attentions: Llama / Mistral / Qwen2 attentions apply the rotary embedding to q and k in one kernel
      (:class:`~triton_ops.models.decoder_layers.RopeAttention`, :func:`fused_rmsnorm_rope.apply_rope`); attentions
      with per-head ``q_norm`` / ``k_norm`` (Qwen3) normalize q and k and apply the rotary embedding in one kernel
      (:class:`~triton_ops.models.decoder_layers.QKNormRopeAttention`); gpt-oss attentions (sinks, half-head
      rotary tables) apply it in one kernel too (:class:`~triton_ops.models.decoder_layers.SinkRopeAttention`,
      the sinks passed to the attention function as transformers does). All then update the cache and call the
      attention function ``config._attn_implementation`` names, through transformers' ``ALL_ATTENTION_FUNCTIONS``
      (sdpa, flash, eager, or any backend registered there by name), and ``o_proj``, as transformers does.
    - ``pack_qkv=True`` (default): those attentions' ``q_proj``, ``k_proj``, ``v_proj`` run as one GEMM over a
      packed ``[q + 2 * kv, hidden]`` weight (:class:`~triton_ops.models.layers.PackedQKVLinear`), whose output's q
      and k are rotated in place (one launch): a decode step's three projections (two of them small, launch-bound)
      become one. The projections' weights (and biases: Qwen2) become views of the packed weight, so there is one
      copy and ``state_dict`` keeps its keys (loading into it writes the packed weight). With ``fp8``, projections
      the recipe converts become one ``FP8Linear`` of the packed weight (one activation quantization), and
      ``q_proj`` / ``k_proj`` / ``v_proj`` ``FP8Linear`` views of its rows and scales; projections the recipe
      keeps stay packed in their dtype; a recipe converting only some of the three, or 128x128 weight blocks that
      would straddle the q/k/v boundaries, leaves them unpacked (a note says so). Packing is skipped for
      projections that are not plain ``nn.Linear`` with plain weights, or that carry forward hooks (they would be
      bypassed), e.g. sharded by tensor parallelism first. Where a gradient is recorded (training), the three
      projections run separately (their weights are the parameters that get the gradients). Move or cast the model
      before patching: a packed bf16 weight is rebuilt on the first forward after a ``.to()``, and an FP8 one falls
      back to the three projections. ``pack_qkv=False``: the model's three projections, then the same rotation
      kernel.

    - Gemma 3 (``gemma3_text``): its RMSNorms, which scale by ``1 + weight`` (``eps``), run in one pass
      (:class:`triton_ops.layers.GemmaRMSNorm`); its attentions normalize q and k per head and rotate them in one
      kernel (:class:`~triton_ops.models.decoder_layers.GemmaQKNormRopeAttention`, packed q/k/v as above); its
      decoder layers, with norms before and after both sublayers, add the attention's normalized output to the
      residual inside the pre-feed-forward norm
      (:class:`~triton_ops.models.decoder_layers.SandwichNormDecoderLayer`); its GELU-tanh gated MLPs
      (``config.hidden_activation``) run in one kernel. A multimodal ``Gemma3ForConditionalGeneration`` /
      ``Gemma3Model`` (``gemma3``): its ``language_model`` is patched so, the vision tower and the projector are
      left as they are (``fp8_lm_head=True`` converts the outer LM head).
    - Gemma 2 (``gemma2``): Gemma 3's decoder layer and norms (as above), its attention as Llama's (packed q/k/v, the
      rotary embedding in one kernel; :class:`~triton_ops.models.decoder_layers.RopeAttention`) with its logit
      softcapping (``attn_logit_softcapping``) passed to the attention function as transformers' does: ours caps
      the logits inside ``decode_attention``, and a call it does not take goes to the model's own eager attention
      (transformers' sdpa function ignores the cap). The final logit softcapping is the model's own. Gemma
      (``gemma``): Llama's layers with Gemma's norms, the add and the post-attention norm in one launch.
    - Ministral (``ministral``): Mistral's layers with a sliding window per layer (``layer_types``), each layer's
      window passed as transformers' attention passes it. Ministral 3 (``ministral3``): Mistral's layers whose
      rotated queries are scaled by Llama 4's position temperature (``rope_parameters``'
      ``llama_4_scaling_beta``, ``original_max_position_embeddings``), computed from the positions the release's
      own attention reads (``position_ids``, or ``cache_position`` in 5.0: found from its signature at patch time).
      Mistral 3 (``mistral3``, ``Mistral3ForConditionalGeneration``): its language model (a Mistral or a Ministral
      3 decoder) patched so, the Pixtral tower and the projector left as they are. SmolLM3 (``smollm3``): Llama's
      layers; its NoPE layers (``use_rope`` false: ``config.no_rope_layers``) rotate nothing, as its own attention.
    - OLMo 2 and OLMo 3 (``olmo2``, ``olmo3``): their decoder layers, whose norms follow the sublayers, as
      :class:`~triton_ops.models.decoder_layers.PostNormDecoderLayer` (each norm with the add after it in one
      launch); their attentions as :class:`~triton_ops.models.decoder_layers.FullQKNormRopeAttention` (packed
      q/k/v, the q and k norms over all heads as one launch each, the rotation as one; OLMo 3's sliding windows
      passed on); their norms (which round once, as ours) and gated MLPs as Llama's.
    - Phi-3 / Phi-4 (``phi3``): the attention's own packed ``qkv_proj`` then the rotary embedding in one kernel in
      place (:class:`~triton_ops.models.decoder_layers.PackedRopeAttention`; a partial rotary dimension as
      transformers applies it); the MLP's packed ``gate_up_proj`` through the fused kernel over its two halves
      (:class:`triton_ops.layers.PackedGatedMLP`; with ``fp8``, FP8 weights of the packed projection with the
      recipe's scales, read by the same kernel); the decoder layer as
      Llama's, its residual dropouts applied in training
      (:class:`~triton_ops.models.decoder_layers.ResidualDropoutDecoderLayer`).

    - ``attention=True`` (default): the model's attention implementation becomes ``"triton_ops"``
      (:mod:`triton_ops.models.attention_backend`): up to 16 query positions (decode) run
      ``decode_attention.decode_attention``, which reads each K/V element once for all the query heads that share
      it (no ``repeat_kv`` of the cache) and skips a static cache's masked tail; longer prompts run transformers'
      sdpa (gpt-oss, whose attention sinks sdpa cannot take: our kernel at every length). Only a model on
      ``"sdpa"`` or ``"eager"`` is switched (a flash-attention choice is left alone, with a note).

    The rest of the model (the projection o, and q, k, v unless packed or ``fp8``; the attention function the
    config names; the rotary embedding's tables; the MLP's residual add where neither the down projection's GEMM
    nor the MoE combine takes it; the LM head) is transformers' own. The
    patched model works with ``generate()``, its caches and ``torch.compile`` (the kernels are registered custom
    ops). ``model.triton_ops_patch`` says what was replaced (:class:`PatchSummary`).

    Raises:
        UnsupportedModelError: a model type not listed above.
        InvalidArgumentError: the model is already patched, or an MLP's activation has no fused kernel.
        UnsupportedDeviceError, UnsupportedDtypeError: from ``FP8Linear`` with ``fp8=True`` (weights on a device
            without FP8 tensor cores, or on the meta device).
    """
    model_type = _model_type(model)
    if getattr(model, "triton_ops_patch", None) is not None:
        raise InvalidArgumentError("model: already patched by patch_model (see model.triton_ops_patch)")
    if model_type in LANGUAGE_MODEL_TYPES:
        return _patch_language_model(
            model, model_type, fp8=fp8, fp8_recipe=fp8_recipe, fp8_lm_head=fp8_lm_head,
            weight_granularity=weight_granularity, activation_granularity=activation_granularity,
            fast_accum=fast_accum, pack_qkv=pack_qkv, attention=attention, fp8_experts=fp8_experts,
            fp8_calibration=fp8_calibration, fp8_smooth_alpha=fp8_smooth_alpha)
    for flag, value in (("pack_qkv", pack_qkv), ("attention", attention)):
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"{flag}: expected a bool, got {value!r}")
    if not (isinstance(fp8_experts, bool) or fp8_experts == "w8a8"):
        raise InvalidArgumentError(f"fp8_experts: expected a bool or 'w8a8', got {fp8_experts!r}")
    if fp8_calibration is not None and not fp8:
        raise InvalidArgumentError("fp8_calibration: smoothing is for FP8 conversion; pass fp8=True with it")
    summary = PatchSummary(model_type)
    # a pre-quantized FP8 checkpoint's layers (transformers' fine-grained, FBGEMM or compressed-tensors FP8) become
    # FP8Linear holding its weights
    adopted = adopt_transformers_fp8(model, summary.notes)
    # and its FP8 experts (128x128 blocks), read by fused_moe as they are
    adopted_experts = adopt_fp8_experts(model, summary.notes)
    foreign_moes: list[nn.Module] = []  # mixtures of experts whose experts fused_moe cannot read: left as they are
    mlps, moes = _gated_mlps(model), _moe_blocks(model, foreign_moes)
    sparse_moes = _sparse_moe_blocks(model, foreign_moes)
    packed_mlps, fp8_mlps = _packed_gated_mlps(model), _fp8_linear_gated_mlps(model)
    if foreign_moes:
        summary.notes.append(
            f"{len(foreign_moes)} MoE block(s) left as they are (their own forward, transformers' kernels): their "
            "experts are quantized in a format fused_moe does not read (transformers' MXFP4 experts, or FP8 experts "
            "of another block size or gate); the rest of each layer is patched")
    if not mlps and not moes and not sparse_moes and not packed_mlps and not fp8_mlps and not foreign_moes:
        raise UnsupportedModelError(
            f"model: no gated MLP (gate_proj / up_proj or a packed gate_up_proj nn.Linear, down_proj, an activation) "
            f"and no mixture of "
            f"experts (gpt-oss's router and experts, or a sparse block's gate and experts) found in this "
            f"{model_type!r} model; its layers are not the ones patch_model knows")
    # checked before anything is changed
    activations = [_experts_activation(b.experts, getattr(model.config, "hidden_act", None)) for b in sparse_moes]
    for mlp in [*packed_mlps, *(m for m, _ in fp8_mlps)]:
        mlp_activation(mlp)
    attentions = _attentions(model)
    unpacked: Counter[str] = Counter()  # why some attentions' q/k/v stay three GEMMs
    packs: dict[str, str] = {}  # attention name -> "fp8" (one FP8Linear) or "linear" (one PackedQKVLinear)
    if pack_qkv:
        for name, attn, layer in attentions:
            if layer is PackedRopeAttention:  # packed by the model itself (qkv_proj)
                continue
            why = packable(attn.q_proj, attn.k_proj, attn.v_proj)
            if why is None:
                packs[name] = "linear"
                continue
            if all(isinstance(getattr(attn, p), FP8Linear) for p in _QKV):  # FP8 already: a checkpoint's
                why = fp8_linears_packable(attn.q_proj, attn.k_proj, attn.v_proj)
                if why is None:
                    packs[name] = "fp8_linears"
                    continue
            unpacked[why] += 1
    if fp8:
        lm_head = getattr(model, "lm_head", None)
        # the shared-expert gates and the DeltaNet's gate projections: FP8_KEPT_LINEARS
        always_kept = {name for name, m in model.named_modules()
                       if type(m) is nn.Linear and name.endswith(FP8_KEPT_LINEARS)}

        def keep(name: str, linear: nn.Linear) -> bool:
            return (fp8_lm_head or linear is not lm_head) and name not in always_kept

        recipe = resolve_recipe(fp8_recipe, weight_granularity, activation_granularity)
        _fp8_packs(model, packs, recipe, keep, unpacked)
        fp8_packed = {f"{n}.{p}" for n, mode in packs.items() if mode == "fp8" for p in _QKV}
        fused_fp8, split_fp8 = _fp8_gated_mlps(model, mlps, recipe, keep)
        in_mlp_kernel = {f"{n}.{p}" for n in fused_fp8 for p in ("gate_proj", "up_proj")}
        packed_fp8 = _fp8_packed_gated_mlps(model, packed_mlps, recipe, keep)  # Phi-3's gate_up_proj
        in_mlp_kernel |= {f"{n}.gate_up_proj" for n in packed_fp8}
        if fp8_calibration is not None:  # before any weight is quantized (the choices above read no values)
            # Every converted Linear quantizes its activation beyond 16 rows (FP8Linear, and the FP8 gate/up, which
            # run as W8A8 GEMMs there: triton_ops.layers.gated_hidden), where the migration pays
            smoothed = smooth_norm_fed_linears(model, fp8_calibration, alpha=fp8_smooth_alpha,
                                               linears=select_linears(model, recipe, keep))
            summary.notes.append(f"SmoothQuant (alpha {fp8_smooth_alpha}) folded into the norms feeding "
                                 f"{len(smoothed)} Linear layers" if smoothed else
                                 "fp8_calibration given, but no norm feeds a converted projection in a layout "
                                 "fp8_gemm.smoothing knows: nothing smoothed")

        def convert(name: str, linear: nn.Linear) -> bool:  # packed q/k/v and fused gate/up are quantized below
            return keep(name, linear) and name not in fp8_packed and name not in in_mlp_kernel

        before = sum(isinstance(m, FP8Linear) for m in model.modules())
        convert_to_fp8(model, recipe=fp8_recipe, weight_granularity=weight_granularity,
                       activation_granularity=activation_granularity, fast_accum=fast_accum, filter_fn=convert)
        modules = dict(model.named_modules())
        for name, mode in packs.items():
            if mode == "fp8":
                attn = modules[name]
                linear, views = pack_fp8(attn.q_proj, attn.k_proj, attn.v_proj,
                                         weight_granularity=recipe.weight_granularity,
                                         activation_granularity=recipe.activation_granularity, fast_accum=fast_accum)
                sizes = (views[0].out_features, views[1].out_features, views[2].out_features)
                for proj, view in zip(_QKV, views):
                    setattr(attn, proj, view)
                QKVPacking.attach(attn, linear, sizes)
        summary.fp8_linears = sum(isinstance(m, FP8Linear) for m in model.modules()) - before
        scaling = recipe.weight_granularity if recipe.weight_granularity in ("block", "group") else "channel"
        for mlp in fused_fp8.values():
            _quantize_gate_up(mlp, scaling, recipe.activation_granularity, fast_accum)
        for mlp in packed_fp8.values():
            _quantize_gate_up(mlp, scaling, recipe.activation_granularity, fast_accum, names=("gate_up_proj",))
        bf16_fused = [m for m in mlps if all(m is not o for o in (*split_fp8, *fused_fp8.values()))]
        for mlp in [*fused_fp8.values(), *bf16_fused]:
            _patch_gated_mlp(mlp)
        summary.fp8_gated_mlps = len(fused_fp8) + len(packed_fp8)
        summary.gated_mlps = len(mlps) - len(split_fp8)
        kept = sum(type(m) is nn.Linear and m is not lm_head and n not in always_kept
                   for n, m in model.named_modules())
        recipe_name = fp8_recipe if isinstance(fp8_recipe, str) else fp8_recipe.name
        if kept:
            summary.notes.append(f"{kept} Linear layers kept in their dtype by the {recipe_name!r} FP8 recipe")
        if always_kept:
            summary.notes.append(f"{len(always_kept)} gate projection(s) with a few outputs (shared-expert gates, "
                                 "routers, Gated DeltaNet's beta / decay projections) kept in their dtype")
        if fused_fp8 or packed_fp8:
            summary.notes.append(f"gate/up of {len(fused_fp8) + len(packed_fp8)} gated MLP(s): FP8 weights "
                                 f"({scaling} scales) in the fused kernel, activations in the model's dtype "
                                 "(weight-only FP8)")
        if split_fp8:
            summary.notes.append(f"gate/up of {len(split_fp8)} gated MLP(s): two GEMMs (the {recipe_name!r} recipe "
                                 "converts only one of them)")
        if lm_head is not None and not fp8_lm_head:
            summary.notes.append("LM head kept in its dtype (fp8_lm_head=True converts it)")
    else:
        for mlp in mlps:
            mlp_activation(mlp)  # every MLP is checked before any is changed
        for mlp in mlps:
            _patch_gated_mlp(mlp)
        summary.gated_mlps = len(mlps)
    adopted_ids = {id(m) for m in adopted}
    # adopted layers that stay FP8Linear (gate/up go into the fused kernel: counted as fp8_gated_mlps)
    summary.fp8_linears += len(adopted) - sum(id(getattr(m, n)) in adopted_ids for m, names in fp8_mlps for n in names)
    for mlp, names in fp8_mlps:  # gate and up FP8Linear already (a pre-quantized checkpoint, or convert_to_fp8's)
        adopt_gate_up(mlp, names, _store_gemm_scale)
        if names == ("gate_up_proj",):
            mlp.__dict__[ACT_ATTR] = mlp_activation(mlp)
            patch_forward(mlp, PackedGatedMLP)
        else:
            _patch_gated_mlp(mlp)
    summary.gated_mlps += len(fp8_mlps)
    summary.fp8_gated_mlps += len(fp8_mlps)
    if fp8_mlps:
        summary.notes.append(f"gate/up of {len(fp8_mlps)} gated MLP(s) FP8Linear already: their E4M3 weights and "
                             "scales in the fused kernel as they are")
    for mlp in packed_mlps:  # in its dtype, or FP8 (an FP8Projection) where the recipe converts it
        mlp.__dict__[ACT_ATTR] = mlp_activation(mlp)
        patch_forward(mlp, PackedGatedMLP)
    summary.gated_mlps += len(packed_mlps)
    for moe in moes:
        patch_forward(moe, GptOssMoE)
    for block, activation in zip(sparse_moes, activations, strict=True):
        _patch_sparse_moe(block, activation)
    for moe, transposed in [*((m, True) for m in moes), *((b, False) for b in sparse_moes)]:
        if fp8 and fp8_experts and not is_fp8_experts(moe.experts):
            # gpt-oss's [E, H, 2I] or [E, 2I, H]; W8A8 stores them K-major
            convert_experts_to_fp8(moe.experts, transposed=transposed, fp8_activations=fp8_experts == "w8a8")
            summary.fp8_moe_blocks += 1
    summary.moe_blocks = len(moes) + len(sparse_moes)
    loose = _loose_experts(model, [*moes, *sparse_moes, *foreign_moes])
    if loose:
        _run_loose_experts(model, loose, summary, fp8 and fp8_experts)
    if summary.moe_blocks:
        summary.notes.append("routers run inside the MoE kernels; a router with hooks (transformers' router-logit "
                             "recording, once any call asks for recorded outputs) runs its own forward instead")
        if summary.fp8_moe_blocks and fp8_experts == "w8a8":
            summary.notes.append(f"experts of {summary.fp8_moe_blocks} MoE block(s): FP8 weights (E4M3, per-column "
                                 "scales, K-major) and FP8 activations (E4M3, per row: W8A8); routers kept")
        elif summary.fp8_moe_blocks:
            summary.notes.append(f"experts of {summary.fp8_moe_blocks} MoE block(s): FP8 weights (E4M3, per-column "
                                 "scales), activations in the model's dtype (weight-only FP8); routers kept")
        elif fp8 and len(adopted_experts) < summary.moe_blocks:  # (a checkpoint's FP8 experts are said above)
            summary.notes.append("experts kept in their dtype (fp8_experts=True converts them)")
    norms = _rms_norms(model)
    for norm, layer in norms:
        patch_forward(norm, layer)
    summary.rms_norms = len(norms)
    modules = dict(model.named_modules())
    for name, mode in packs.items():
        attn = modules[name]
        if mode == "linear":
            linear = PackedQKVLinear.from_linear(attn.q_proj, attn.k_proj, attn.v_proj, share=True)
            QKVPacking.attach(attn, linear, linear.sizes)
        elif mode == "fp8_linears":  # FP8Linear projections: their E4M3 rows concatenated
            linear, views = pack_fp8_linears(attn.q_proj, attn.k_proj, attn.v_proj)
            for proj, view in zip(_QKV, views):
                setattr(attn, proj, view)
            QKVPacking.attach(attn, linear, tuple(v.out_features for v in views))
    summary.packed_qkv = len(packs)
    if not pack_qkv and attentions:
        summary.notes.append("q/k/v projections: three GEMMs (pack_qkv=False)")
    for why, count in sorted(unpacked.items()):
        summary.notes.append(f"q/k/v of {count} attention(s) not packed: {why}")
    _patch_layers(model, attentions, summary)
    for module in model.modules():  # exact nn.Linear projections may run inside the layer's fused launches
        if type(module) is nn.Linear:
            module.__dict__[LAYER_ATTR] = "Linear"
    prime_static_write()  # read transformers' StaticLayer here, in eager code: a compiled first call cannot
    prime_sliding_shift()  # and its StaticSlidingWindowLayer
    if attention:
        _set_attention(model, summary)
    model.triton_ops_patch = summary
    return model


def _patch_language_model(model: nn.Module, model_type: str, *, fp8: bool, fp8_lm_head: bool, **options) -> nn.Module:
    """A multimodal model (Gemma 3's ``Gemma3ForConditionalGeneration`` or ``Gemma3Model``, Mistral 3's, Qwen3.5's,
    Gemma 4's): its text decoder
    (``language_model``) patched as a model of its own, the attention implementation switched on its config only;
    with ``fp8_lm_head`` the outer model's LM head converted by the recipe too. The summary is the decoder's, under
    the model's type."""
    inner = getattr(getattr(model, "model", None), "language_model", None) or getattr(model, "language_model", None)
    want = LANGUAGE_MODEL_TYPES[model_type]
    if not isinstance(inner, nn.Module) or getattr(getattr(inner, "config", None), "model_type", None) not in want:
        raise UnsupportedModelError(
            f"model: a {model_type!r} model whose language_model is a {' or '.join(map(repr, want))} decoder was "
            "expected; none found")
    patch_model(inner, fp8=fp8, fp8_lm_head=False, **options)
    summary = inner.triton_ops_patch
    summary.model_type = model_type
    summary.notes.append("only the language model is patched: the vision tower and the multimodal projector are "
                         "transformers' own")
    lm_head = getattr(model, "lm_head", None)
    if fp8 and isinstance(lm_head, nn.Linear):
        if fp8_lm_head:
            convert_to_fp8(model, recipe=options["fp8_recipe"], weight_granularity=options["weight_granularity"],
                           activation_granularity=options["activation_granularity"],
                           fast_accum=options["fast_accum"], filter_fn=lambda name, linear: linear is lm_head)
            if isinstance(getattr(model, "lm_head", None), FP8Linear):
                summary.fp8_linears += 1
            else:
                recipe = options["fp8_recipe"]
                recipe_name = recipe if isinstance(recipe, str) else recipe.name
                summary.notes.append(f"LM head kept in its dtype (the {recipe_name!r} FP8 recipe keeps it)")
        else:
            summary.notes.append("LM head kept in its dtype (fp8_lm_head=True converts it)")
    model.triton_ops_patch = summary
    return model


def _fp8_gated_mlps(model: nn.Module, mlps: list[nn.Module], recipe: FP8Recipe,
                    keep) -> tuple[dict[str, nn.Module], list[nn.Module]]:
    """With fp8: the gated MLPs whose gate and up projections the recipe converts (by name: their fused kernel
    takes FP8 weights), and those where it converts only one of the two (two GEMMs, as the recipe says)."""
    selected = set(select_linears(model, recipe, keep))
    names = {id(m): n for n, m in model.named_modules()}
    fused, split = {}, []
    for mlp in mlps:
        name = names[id(mlp)]
        chosen = {f"{name}.gate_proj", f"{name}.up_proj"} & selected
        if len(chosen) == 1:
            split.append(mlp)
            continue
        mlp_activation(mlp)  # fused (FP8 or kept in its dtype): checked before any change
        if chosen:
            fused[name] = mlp
    return fused, split


def _fp8_packed_gated_mlps(model: nn.Module, mlps: list[nn.Module], recipe: FP8Recipe, keep) -> dict[str, nn.Module]:
    """With fp8: the packed gated MLPs (Phi-3) whose ``gate_up_proj`` the recipe converts, by name: their fused
    kernel takes the packed weight in FP8 (the projection is quantized with the recipe's scales, not made an
    FP8Linear)."""
    selected = set(select_linears(model, recipe, keep))
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(m)]: m for m in mlps if f"{names[id(m)]}.gate_up_proj" in selected}


def _loose_experts(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """Experts modules of transformers' experts interface (3-D ``gate_up_proj [E, 2I, H]`` and ``down_proj``) that
    no mixture of experts patched here runs: Gemma 4's, which its decoder layer calls beside the MLP with its own
    router's choice."""
    ours = {id(b.experts) for b in blocks}
    return [m for m in model.modules()
            if id(m) not in ours and type(m).__name__.endswith("Experts")
            and all(isinstance(getattr(m, a, None), torch.Tensor) and getattr(m, a).dim() == 3
                    for a in ("gate_up_proj", "down_proj"))]


def _run_loose_experts(model: nn.Module, experts: list[nn.Module], summary: PatchSummary,
                       fp8_experts: bool | str) -> None:
    """Run loose experts (:func:`_loose_experts`) as ``fused_moe.moe_experts`` through transformers' experts
    interface (``set_experts_implementation``: :mod:`~triton_ops.models.experts_backend`), where every one of them
    is something the backend takes and the model is on one of transformers' own implementations; with
    ``fp8_experts`` their weights converted to FP8 first (the backend reads our scales). Otherwise a note says
    why they stay as they are."""
    config = model.config
    current = getattr(config, "_experts_implementation", None)
    probe = torch.empty(0, dtype=experts[0].gate_up_proj.dtype, device=experts[0].gate_up_proj.device)
    with torch.no_grad():  # what inference calls meet (training ones fall back to transformers' own, per call)
        why = next((w for w in (experts_unsupported(e, probe, probe) for e in experts) if w), "")
    if not why and any(e.gate_up_proj.dtype not in _FLOAT_DTYPES for e in experts):
        why = "weights in a format fused_moe does not read"
    if not why and current not in (None, "eager", "grouped_mm", "batched_mm"):
        why = f"the model's experts implementation {current!r} (patch_model switches only transformers' own)"
    if not why:
        try:
            model.set_experts_implementation(register_experts_backend())
        except (AttributeError, ValueError, TypeError, KeyError) as exc:  # a release without named implementations
            why = f"this transformers refuses a registered experts implementation ({exc})"
    if why:
        summary.notes.append(f"experts of {len(experts)} module(s) beside the MoE blocks patch_model knows left as "
                             f"they are: {why}")
        return
    if fp8_experts:
        for e in experts:
            if not is_fp8_experts(e):
                convert_experts_to_fp8(e, transposed=bool(getattr(e, "is_transposed", False)),
                                       fp8_activations=fp8_experts == "w8a8")
        summary.fp8_moe_blocks += len(experts)
    summary.notes.append(f"experts of {len(experts)} module(s) called by their decoder layers (Gemma 4's) run "
                         "fused_moe's grouped GEMMs through transformers' experts interface (experts_implementation "
                         f"{config._experts_implementation!r}); their routers stay the model's")


def _set_attention(model: nn.Module, summary: PatchSummary) -> None:
    """Route the model's attention through ``decode_attention`` (transformers' attention interface, by name)."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current not in ("sdpa", "eager", None):
        summary.notes.append(f"attention implementation {current!r} left as it is (attention=True switches only "
                             "'sdpa' and 'eager')")
        return
    register_attention_backend()
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if setter is None:
            raise AttributeError
        setter(ATTENTION_NAME)
    except (AttributeError, ValueError, TypeError):  # older or stricter transformers: the config, as documented
        config._attn_implementation = ATTENTION_NAME
    summary.attention = ATTENTION_NAME


_QKV = ("q_proj", "k_proj", "v_proj")


def _attentions(model: nn.Module) -> list[tuple[str, nn.Module, type]]:
    """``(name, module, layer)`` of every attention patch_model replaces: Qwen3's (q/k norms), Llama-style and
    gpt-oss's (sinks)."""
    found = []
    for name, module in model.named_modules():
        if has_qk_norm(module):
            found.append((name, module, QKNormRopeAttention))
        elif has_gemma_qk_norm(module):
            found.append((name, module, GemmaQKNormRopeAttention))
        elif is_gated_attention(module):
            found.append((name, module, GatedQKNormRopeAttention))
        elif is_packed_rope_attention(module):
            found.append((name, module, PackedRopeAttention))
        elif has_full_qk_norm(module):
            found.append((name, module, FullQKNormRopeAttention))
        elif is_rope_attention(module):
            found.append((name, module, RopeAttention))
        elif is_sink_attention(module):
            found.append((name, module, SinkRopeAttention))
    return found


def _fp8_packs(model: nn.Module, packs: dict[str, str], recipe: FP8Recipe, keep, unpacked: Counter) -> None:
    """With fp8: which packable attentions become one FP8Linear (the recipe converts all three projections and its
    scales split at their boundaries), stay packed in their dtype (the recipe keeps all three), or stay unpacked."""
    selected = set(select_linears(model, recipe, keep))
    modules = dict(model.named_modules())
    for name in list(packs):
        projs = {f"{name}.{p}" for p in _QKV}
        if projs <= selected:
            attn = modules[name]
            why = fp8_packable(attn.q_proj.out_features, attn.k_proj.out_features, recipe.weight_granularity)
            if why is None:
                packs[name] = "fp8"
                continue
        elif not projs & selected:
            continue  # all three kept in their dtype by the recipe: packed as they are
        else:
            why = f"the {recipe.name!r} FP8 recipe converts only some of q/k/v"
        del packs[name]
        unpacked[why] += 1


def _patch_layers(model: nn.Module, attentions: list[tuple[str, nn.Module, type]], summary: PatchSummary) -> None:
    """The decoder layers' residual add into the post-attention norm; the attentions' rotary embedding (with
    Qwen3's q/k norms) in one kernel."""
    for module in list(model.modules()):
        mixer = hybrid_token_mixer(module)
        if mixer is not None:
            module.__dict__[TOKEN_MIXER_ATTR] = mixer
            patch_forward(module, HybridDecoderLayer)
            summary.fused_residual_adds += 1
        elif is_residual_dropout_decoder_layer(module):
            patch_forward(module, ResidualDropoutDecoderLayer)
            summary.fused_residual_adds += 1
        elif is_pre_norm_decoder_layer(module):
            patch_forward(module, FusedAddNormDecoderLayer)
            summary.fused_residual_adds += 1
        elif is_sandwich_norm_decoder_layer(module):
            patch_forward(module, SandwichNormDecoderLayer)
            summary.fused_residual_adds += 1
        elif is_gemma4_decoder_layer(module):
            patch_forward(module, Gemma4DecoderLayer)
            summary.fused_residual_adds += 1
        elif is_post_norm_decoder_layer(module):
            patch_forward(module, PostNormDecoderLayer)
            summary.fused_residual_adds += 1
    for _, attn, layer in attentions:
        patch_forward(attn, layer)
        register_attention_traits(attn)  # per class, once: what its forward passes on (a dict lookup per call)
        if layer in (QKNormRopeAttention, GemmaQKNormRopeAttention, GatedQKNormRopeAttention):
            summary.qk_norm_rope_attentions += 1
        else:
            summary.rope_attentions += 1
    summary.notes.append("the MLP's residual add, where the decoder layer is ours: inside the down projection's "
                         "GEMM (a patched gated MLP, bias-free down projection), the MoE combine's launch or (Gemma "
                         "3 and 4, OLMo) the post-feed-forward norm's; else one add")
    if not attentions:
        summary.notes.append("rotary embedding and the attention itself: transformers' own")
    if summary.model_type in HYBRID_MODEL_TYPES:
        summary.notes.append("the Gated DeltaNet (linear attention) layers: transformers' own")
    else:
        summary.notes.append("the attention core: the function config._attn_implementation names")


__all__ = ["FP8_KEPT_LINEARS", "HYBRID_MODEL_TYPES", "LANGUAGE_MODEL_TYPES", "SUPPORTED_MODEL_TYPES", "PatchSummary",
           "UnsupportedModelError", "patch_model"]
