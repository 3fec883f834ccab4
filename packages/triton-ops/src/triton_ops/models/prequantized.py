"""Models whose Linear layers are FP8 already: pre-quantized checkpoints and ``convert_to_fp8``'s output.

A checkpoint quantized to FP8 by its publisher (Qwen3-8B-FP8, DeepSeek-V3-style 128x128 weight blocks, or one
scale per tensor) loads through transformers' fine-grained FP8 integration: each ``nn.Linear`` becomes transformers'
``FP8Linear`` (an ``nn.Linear`` subclass holding an E4M3 ``weight``, its dequantization factor ``weight_scale_inv``
in the weight's ``[out, in]`` orientation, ``block_size`` and ``activation_scheme``). ``patch_model`` takes such a
model as it is:

- :func:`adopt_transformers_fp8` makes each of those layers our ``FP8Linear`` (``FP8Linear.from_quantized``: the
  E4M3 weight used as it is, never dequantized; only the scales are copied into our layout);
- :func:`fp8_gate_up` finds gated MLPs whose gate and up projections are our ``FP8Linear`` (adopted, or made by
  ``convert_to_fp8``) and :func:`adopt_gate_up` hands their weights to the fused gated-MLP kernel as
  ``FP8Projection`` s;
- q, k and v ``FP8Linear`` s pack into one GEMM by concatenation (``layers.pack_fp8_linears``).
"""

from __future__ import annotations

from collections import Counter

import torch
from fp8_gemm import FP8Linear
from fused_gated_mlp import FP8Projection
from torch import nn

from ..layers import ACTIVATION_GRANULARITY_ATTR, FAST_ACCUM_ATTR, LAYER_ATTR
from .layers import _plain

# transformers' block sizes ([rows, columns] of the [out, in] weight) and the granularity FP8Linear gives them
_BLOCK_GRANULARITIES = {(128, 128): "block", (1, 128): "group"}


def is_transformers_fp8_linear(module: object) -> bool:
    """transformers' fine-grained FP8 linear (``transformers.integrations.finegrained_fp8.FP8Linear``, by its
    documented attributes): an ``nn.Linear`` subclass with an FP8 ``weight``, a ``weight_scale_inv`` tensor and a
    ``block_size``."""
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) and type(module) is not nn.Linear and isinstance(weight, torch.Tensor)
            and weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
            and isinstance(getattr(module, "weight_scale_inv", None), torch.Tensor) and hasattr(module, "block_size"))


def _adoption_problem(module: nn.Module) -> str | None:
    """None when :func:`adopt_transformers_fp8` takes this transformers FP8 linear; else why not (for the summary)."""
    if module.weight.dtype != torch.float8_e4m3fn:
        return "E5M2 weights (fp8_gemm's GEMMs read E4M3)"
    block = module.block_size
    if block is not None and tuple(block) not in _BLOCK_GRANULARITIES:
        return (f"weight blocks of {list(block)} (fp8_gemm scales whole tensors, 128x128 blocks or 1x128 groups)")
    if not all(_plain(t) for t in (module.weight, module.weight_scale_inv, module.bias)):
        return "weights that are not plain tensors (sharded or wrapped)"
    if module.weight.device.type == "meta":
        return "weights on the meta device (not loaded)"
    if module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module) or hasattr(module, "_hf_hook"):
        return "forward hooks or a replaced forward (our layer would bypass them)"
    return None


def _adopt(module: nn.Module) -> FP8Linear:
    """Our ``FP8Linear`` holding ``module``'s E4M3 weight (shared) and its scales. Activations: 1x128 blocks for a
    block- or group-scaled weight (the recipe such checkpoints are made for, transformers' dynamic scheme), one
    scale per row for a per-tensor one; a static activation scale is not used (activations are scaled per call)."""
    block = module.block_size
    activation = "row" if block is None else "block"
    scale = module.weight_scale_inv.detach()
    return FP8Linear.from_quantized(module.weight.detach(), scale.reshape(()) if block is None else scale,
                                    None if module.bias is None else module.bias.detach(),
                                    activation_granularity=activation).train(module.training)


def adopt_transformers_fp8(model: nn.Module, notes: list[str]) -> list[FP8Linear]:
    """Replace every transformers fine-grained FP8 linear of ``model`` that fp8_gemm can run by our ``FP8Linear``
    holding its weights (:func:`_adopt`); the others stay, with a note saying why. Returns the new layers."""
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
        block = module.block_size
        static = getattr(module, "activation_scheme", "dynamic") == "static"
        kinds["per-tensor weight scales" if block is None else f"{block[0]}x{block[1]} weight blocks"] += 1
        kinds["static activation scales not used: activations scaled per call"] += static
    if adopted:
        notes.append(f"{len(adopted)} FP8 Linear layers of the checkpoint (transformers' fine-grained FP8: "
                     f"{', '.join(k for k in kinds if kinds[k])}) run as FP8Linear: their E4M3 weights used as they "
                     "are, never dequantized")
    for why, count in sorted(left.items()):
        notes.append(f"{count} FP8 Linear layer(s) of the checkpoint left to transformers: {why}")
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


__all__ = ["GATE_UP_NAMES", "adopt_gate_up", "adopt_transformers_fp8", "fp8_gate_up", "is_transformers_fp8_linear"]
