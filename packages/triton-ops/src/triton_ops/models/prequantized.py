"""Models whose Linear layers are FP8 already: pre-quantized checkpoints and ``convert_to_fp8``'s output.

A checkpoint quantized to FP8 by its publisher loads through one of transformers' FP8 integrations, each of which
makes every quantized ``nn.Linear`` an ``nn.Linear`` subclass holding an E4M3 ``weight`` and its dequantization
factor (:data:`CHECKPOINT_FORMATS`):

- fine-grained FP8 (Qwen3-8B-FP8, DeepSeek-V3 style; ``transformers.integrations.finegrained_fp8.FP8Linear``):
  ``weight_scale_inv`` per 128x128 block (``block_size``), per 1x128 group or per tensor, in the weight's ``[out,
  in]`` orientation; dynamic 1x128 activation blocks (or a static per-tensor activation scale);
- FBGEMM FP8 (Meta's Llama 3.1 405B FP8; ``FbgemmFp8Linear``): ``weight_scale [out, 1]``, per-row activations
  clamped to an upper bound (``input_scale_ub``);
- compressed-tensors FP8 on transformers' FP8 kernel path (``use_optimized_inference``, the "FP8-dynamic"
  checkpoints; ``CompressedTensorsFP8Linear``): ``weight_scale`` per output channel (or per tensor), per-row
  activations.

``patch_model`` takes such a model as it is:

- :func:`adopt_transformers_fp8` makes each of those layers our ``FP8Linear`` (``FP8Linear.from_quantized``: the
  E4M3 weight used as it is, never dequantized; only the scales are copied into our layout);
- :func:`fp8_gate_up` finds gated MLPs whose gate and up projections are our ``FP8Linear`` (adopted, or made by
  ``convert_to_fp8``) and :func:`adopt_gate_up` hands their weights to the fused gated-MLP kernel as
  ``FP8Projection`` s;
- q, k and v ``FP8Linear`` s pack into one GEMM by concatenation (``layers.pack_fp8_linears``);
- :func:`adopt_fp8_experts` lets ``fused_moe`` read the experts of a sparse mixture of experts that transformers
  loaded as ``FP8Experts`` (Qwen3-30B-A3B-FP8 and the like: ``gate_up_proj`` / ``down_proj`` in E4M3 with
  ``*_scale_inv`` per 128x128 block), their weights and scales as they are.
"""

from __future__ import annotations

from collections import Counter

import torch
from fp8_gemm import FP8Linear
from fused_gated_mlp import FP8Projection
from torch import nn

from ..layers import ACTIVATION_GRANULARITY_ATTR, FAST_ACCUM_ATTR, LAYER_ATTR, W8A8_FROM_TOKENS_ATTR
from .layers import _plain

# transformers' block sizes ([rows, columns] of the [out, in] weight) and the granularity FP8Linear gives them
_BLOCK_GRANULARITIES = {(128, 128): "block", (1, 128): "group"}
# transformers' FP8 linear classes with one scale per output channel (or per tensor) in ``weight_scale``, by name:
# what they are called in the summary
_CHANNEL_SCALED = {"FbgemmFp8Linear": "FBGEMM FP8", "CompressedTensorsFP8Linear": "compressed-tensors FP8"}
CHECKPOINT_FORMATS = ("fine-grained FP8", *_CHANNEL_SCALED.values())


def checkpoint_format(module: object) -> str | None:
    """Which of transformers' FP8 linear layers ``module`` is (:data:`CHECKPOINT_FORMATS`), by its class and the
    attributes that class documents: an ``nn.Linear`` subclass with an FP8 ``weight`` and either ``weight_scale_inv``
    and ``block_size`` (fine-grained) or a ``weight_scale`` of one element per output channel or one in all (FBGEMM,
    compressed-tensors); None for any other module."""
    weight = getattr(module, "weight", None)
    if not (isinstance(module, nn.Linear) and type(module) is not nn.Linear and isinstance(weight, torch.Tensor)
            and weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)):
        return None
    if isinstance(getattr(module, "weight_scale_inv", None), torch.Tensor) and hasattr(module, "block_size"):
        return "fine-grained FP8"
    scale = getattr(module, "weight_scale", None)
    name = next((cls.__name__ for cls in type(module).__mro__ if cls.__name__ in _CHANNEL_SCALED), None)
    if name is not None and isinstance(scale, torch.Tensor) and scale.numel() in (1, module.out_features):
        return _CHANNEL_SCALED[name]
    return None


def is_transformers_fp8_linear(module: object) -> bool:
    """One of transformers' FP8 linear layers (:func:`checkpoint_format`)."""
    return checkpoint_format(module) is not None


def _scale(module: nn.Module) -> torch.Tensor:
    """The checkpoint layer's dequantization factor in ``FP8Linear.from_quantized``'s ``[out, in]`` orientation."""
    if checkpoint_format(module) == "fine-grained FP8":
        scale = module.weight_scale_inv.detach()
        return scale.reshape(()) if module.block_size is None else scale
    scale = module.weight_scale.detach()  # [out, 1], [1, out] or one element
    return scale.reshape(()) if scale.numel() == 1 else scale.reshape(module.out_features)


def _adoption_problem(module: nn.Module) -> str | None:
    """None when :func:`adopt_transformers_fp8` takes this transformers FP8 linear; else why not (for the summary)."""
    if module.weight.dtype != torch.float8_e4m3fn:
        return "E5M2 weights (fp8_gemm's GEMMs read E4M3)"
    block = getattr(module, "block_size", None) if checkpoint_format(module) == "fine-grained FP8" else None
    if block is not None and tuple(block) not in _BLOCK_GRANULARITIES:
        return (f"weight blocks of {list(block)} (fp8_gemm scales whole tensors, 128x128 blocks or 1x128 groups)")
    scale = module.weight_scale_inv if checkpoint_format(module) == "fine-grained FP8" else module.weight_scale
    if not all(_plain(t) for t in (module.weight, scale, module.bias)):
        return "weights that are not plain tensors (sharded or wrapped)"
    if module.weight.device.type == "meta":
        return "weights on the meta device (not loaded)"
    if module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module) or hasattr(module, "_hf_hook"):
        return "forward hooks or a replaced forward (our layer would bypass them)"
    return None


def _adopt(module: nn.Module) -> FP8Linear:
    """Our ``FP8Linear`` holding ``module``'s E4M3 weight (shared) and its scales. Activations: 1x128 blocks for a
    block- or group-scaled weight (the recipe such checkpoints are made for, transformers' dynamic scheme), one
    scale per row otherwise (as FBGEMM's and compressed-tensors' kernels scale them); a static activation scale or
    an activation upper bound is not used (activations are scaled per call by their own values)."""
    blocked = getattr(module, "block_size", None) is not None and checkpoint_format(module) == "fine-grained FP8"
    return FP8Linear.from_quantized(module.weight.detach(), _scale(module),
                                    None if module.bias is None else module.bias.detach(),
                                    activation_granularity="block" if blocked else "row").train(module.training)


def _kinds(module: nn.Module) -> list[str]:
    """What the summary says of an adopted layer: its format and scales, and what of the checkpoint is not used."""
    fmt = checkpoint_format(module)
    if fmt == "fine-grained FP8":
        block = module.block_size
        kinds = [f"{fmt}, " + ("per-tensor weight scales" if block is None else f"{block[0]}x{block[1]} weight blocks")]
        if getattr(module, "activation_scheme", "dynamic") == "static":
            kinds.append("static activation scales not used: activations scaled per call")
        return kinds
    kinds = [f"{fmt}, " + ("per-tensor" if module.weight_scale.numel() == 1 else "per-channel") + " weight scales"]
    if fmt == "FBGEMM FP8":
        kinds.append("FBGEMM's activation upper bound (input_scale_ub) not applied: each row scaled by its own "
                     "largest value")
    return kinds


def adopt_transformers_fp8(model: nn.Module, notes: list[str]) -> list[FP8Linear]:
    """Replace every transformers FP8 linear of ``model`` (:data:`CHECKPOINT_FORMATS`) that fp8_gemm can run by our
    ``FP8Linear`` holding its weights (:func:`_adopt`); the others stay, with a note saying why. Returns the new
    layers."""
    adopted, left, kinds = [], Counter(), Counter()
    for name, module in list(model.named_modules()):
        if not is_transformers_fp8_linear(module):
            continue
        why = _adoption_problem(module)
        if why is not None:
            left[why] += 1
            continue
        parent_name, _, attr = name.rpartition(".")
        adopted.append(_adopt(module))
        setattr(model.get_submodule(parent_name), attr, adopted[-1])
        kinds.update(_kinds(module))
    if adopted:
        notes.append(f"{len(adopted)} FP8 Linear layers of the checkpoint ({'; '.join(kinds)}) run as FP8Linear: "
                     "their E4M3 weights used as they are, never dequantized")
    for why, count in sorted(left.items()):
        notes.append(f"{count} FP8 Linear layer(s) of the checkpoint left to transformers: {why}")
    return adopted


# transformers' FP8Experts attributes that select another gate than act(gate) * up (gpt-oss's clamped SwiGLU, softcaps,
# a clamp): experts with any of them set stay transformers'
_FP8_EXPERTS_GATE_OPTIONS = ("swiglu_alpha", "limit", "gate_softcap", "up_softcap")
_SCALE_DTYPES = (torch.float32, getattr(torch, "float8_e8m0fnu", torch.float32))
# Tokens from which an FP8 checkpoint's E4M3 experts run W8A8 (activations per row), fewer weight-only: H100, session
# 35, Qwen3-30B-A3B's layer with 128x128 blocks (benchmarks.dev.moe_block_scales --w8a8): 64 tokens 251.9 us W8A8
# against 262.1 weight-only, 512: 289.8 / 452.4, 2048: 542.0 / 1,071.8 (bf16 experts 806.8); decode sizes keep the
# weight-only path (the activations unquantized, 1-8 tokens within 1.08x of per-column FP8 experts).
CHECKPOINT_EXPERTS_W8A8_FROM_TOKENS = 64


def is_transformers_fp8_experts(experts: object) -> bool:
    """transformers' ``FP8Experts`` (``transformers.integrations.finegrained_fp8``), by class name along the MRO and
    the attributes it documents: FP8 ``gate_up_proj`` / ``down_proj`` with ``*_scale_inv`` beside them."""
    return (isinstance(experts, nn.Module) and any(c.__name__ == "FP8Experts" for c in type(experts).__mro__)
            and all(isinstance(getattr(experts, a, None), torch.Tensor)
                    for a in ("down_proj", "down_proj_scale_inv")) and hasattr(experts, "block_size"))


def fp8_experts_problem(experts: nn.Module) -> str | None:
    """None when ``fused_moe`` can read these transformers ``FP8Experts`` (:func:`adopt_fp8_experts`); else why not."""
    if not getattr(experts, "has_gate", False) or not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
        return "experts without a gate (up_proj only)"
    if getattr(experts, "has_bias", False):
        return "expert biases"
    if experts.block_size is None or tuple(experts.block_size) != (128, 128):
        return f"weight blocks of {experts.block_size} (fused_moe reads 128x128 blocks)"
    if any(getattr(experts, a, None) is not None for a in _FP8_EXPERTS_GATE_OPTIONS) or \
            getattr(experts, "limit_after_act", False):
        return "a gate other than act(gate) * up (a clamp, a softcap or gpt-oss's SwiGLU)"
    tensors = (experts.gate_up_proj, experts.gate_up_proj_scale_inv, experts.down_proj, experts.down_proj_scale_inv)
    if not all(_plain(t) for t in tensors):
        return "weights that are not plain tensors (sharded or wrapped)"
    if any(t.device.type == "meta" for t in tensors):
        return "weights on the meta device (not loaded)"
    if experts.gate_up_proj.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) or \
            experts.down_proj.dtype != experts.gate_up_proj.dtype:
        return f"expert weights in {experts.gate_up_proj.dtype} (not FP8)"
    if any(t.dtype not in _SCALE_DTYPES for t in tensors[1::2]):
        return f"scales in {experts.gate_up_proj_scale_inv.dtype}"
    if getattr(experts, "_is_expert_parallel", False):
        return "expert parallelism (sentinel expert ids)"
    if experts.gate_up_proj.shape[1] % 32:
        return "an intermediate size that is not a multiple of 16"
    return None


@torch.no_grad()
def adopt_fp8_experts(model: nn.Module, notes: list[str]) -> list[nn.Module]:
    """Let ``fused_moe`` read every transformers ``FP8Experts`` of ``model`` that it can (:func:`fp8_experts_problem`):
    their ``*_scale_inv`` registered as the ``gate_up_scale`` / ``down_scale`` buffers that ``fused_moe``'s FP8
    experts carry (non-persistent, so ``state_dict`` keeps the checkpoint's keys only; the tensors themselves when
    float32, an fp32 copy of UE8M0 scales). The E4M3 weights are used as they are; calls of at least
    :data:`CHECKPOINT_EXPERTS_W8A8_FROM_TOKENS` tokens quantize the activations per row (W8A8, E4M3 experts). Returns
    the experts adopted; the others stay transformers' (a note says why) and their MoE blocks keep their own
    forward."""
    adopted, left, static = [], Counter(), 0
    for module in model.modules():
        if not is_transformers_fp8_experts(module) or "gate_up_scale" in module._buffers:
            continue
        why = fp8_experts_problem(module)
        if why is not None:
            left[why] += 1
            continue
        for name, scale in (("gate_up_scale", module.gate_up_proj_scale_inv),
                            ("down_scale", module.down_proj_scale_inv)):
            module.register_buffer(name, scale.detach().float(), persistent=False)  # (no copy when float32)
        if module.gate_up_proj.dtype == torch.float8_e4m3fn:  # W8A8 for prefill-sized calls (E4M3 activations)
            setattr(module, W8A8_FROM_TOKENS_ATTR, CHECKPOINT_EXPERTS_W8A8_FROM_TOKENS)
        static += getattr(module, "activation_scheme", "dynamic") == "static"
        adopted.append(module)
    if adopted:
        notes.append(f"experts of {len(adopted)} MoE block(s) are the checkpoint's FP8 experts (E4M3, 128x128 weight "
                     "blocks): fused_moe reads their weights and scales as they are; calls of fewer than "
                     f"{CHECKPOINT_EXPERTS_W8A8_FROM_TOKENS} tokens keep the activations in the model's dtype "
                     "(weight-only), longer ones quantize them to E4M3 per row (W8A8)"
                     + (f"; the static activation scales of {static} not used" if static else ""))
    for why, count in sorted(left.items()):
        notes.append(f"FP8 experts of {count} MoE block(s) left to transformers: {why}")
    return adopted


GATE_UP_NAMES = (("gate_proj", "up_proj"), ("gate_up_proj",))  # separate, or packed (Phi-3's)


def fp8_gate_up(mlp: nn.Module) -> tuple[str, ...] | None:
    """The names of ``mlp``'s gate and up projections (:data:`GATE_UP_NAMES`) when they are our ``FP8Linear``
    (adopted or ``convert_to_fp8``'s) with the same scales and options, plain tensors and no hooks: what
    :func:`adopt_gate_up` hands to the fused kernel; else None."""
    for names in GATE_UP_NAMES:
        lins = [getattr(mlp, n, None) for n in names]
        if not all(type(m) is FP8Linear for m in lins):
            continue
        options = {(m.weight_granularity, m.activation_granularity, m.fast_accum, m.path, m.in_features,
                    m.weight.device) for m in lins}
        if (len(options) == 1 and lins[0].path == "auto"
                and not any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in lins)
                and all(_plain(t) for m in lins for t in (m.weight, m.weight_scale, m.bias))):
            return names
    return None


def _projection(linear: FP8Linear) -> FP8Projection:
    """The fused kernel's view of an ``FP8Linear``: the same E4M3 weight, its scale in the ``[out, in]``
    orientation (a per-tensor scale repeated per output channel: the kernel reads channel, block or group scales)."""
    scale = linear.weight_scale
    gran = linear.weight_granularity
    if gran == "tensor":
        scale = scale.reshape(1).expand(linear.out_features).contiguous()
    elif gran == "channel":
        scale = scale.reshape(linear.out_features)
    else:  # [K / 128, N / 128] blocks, [K / 128, N] groups
        scale = scale.t().contiguous()
    bias = linear.bias
    projection = FP8Projection(linear.weight, scale, None if bias is None else nn.Parameter(bias.detach(),
                                                                                          requires_grad=False))
    projection.__dict__[LAYER_ATTR] = "FP8Projection"  # what the fused kernel may stand in for (layers.py)
    return projection


def adopt_gate_up(mlp: nn.Module, names: tuple[str, ...], store_gemm_scale) -> None:
    """``mlp``'s FP8Linear gate and up projections ``names`` (:func:`fp8_gate_up`) replaced by ``FP8Projection`` s
    of the same weights, and the W8A8 GEMMs beyond 16 rows told the layers' activation scales and ``fast_accum``
    (``store_gemm_scale``: patch_model's keeping of a block or group scale in the GEMM's layout)."""
    first = getattr(mlp, names[0])
    for name in names:
        projection = _projection(getattr(mlp, name))
        if projection.scaling in ("block", "group"):
            store_gemm_scale(projection)
        setattr(mlp, name, projection)
    mlp.__dict__[ACTIVATION_GRANULARITY_ATTR] = first.activation_granularity
    mlp.__dict__[FAST_ACCUM_ATTR] = first.fast_accum


__all__ = ["CHECKPOINT_FORMATS", "GATE_UP_NAMES", "adopt_fp8_experts", "adopt_gate_up", "adopt_transformers_fp8",
           "checkpoint_format", "fp8_experts_problem", "fp8_gate_up", "is_transformers_fp8_experts",
           "is_transformers_fp8_linear"]
