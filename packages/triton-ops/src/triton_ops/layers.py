"""Forward-only layers that replace a Hugging Face module's ``forward`` and read their state from it.

They follow the layer contract of Hugging Face's ``kernels`` library: no ``__init__``, no state of their own, only
``forward`` and the class attributes ``can_torch_compile`` / ``has_backward``; the attributes they read are declared
by annotation. :func:`triton_ops.patch_model` swaps them into an instantiated model; :mod:`triton_ops.hub` writes a
local ``kernels`` repository whose ``layers`` is this module, for ``kernels.kernelize`` and transformers'
``KernelConfig`` (docs/kernels-hub.md).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from fp8_gemm import WEIGHT_ONLY_MAX_M, FP8Linear, fp8_gated_linear, fp8_gemm, fp8_linear, quantize_fp8
from fused_gated_mlp import FP8Projection, fused_gated_mlp, gated_activation
from fused_moe import fused_moe, moe_experts
from fused_rmsnorm_rope import rmsnorm
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError

# transformers' ``config.hidden_act`` names -> the fused kernel's activation
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}


def kernel_activation(hidden_act: str) -> str:
    """The fused kernel's activation for a transformers ``hidden_act``; InvalidArgumentError if it has none."""
    return _activation(HF_ACTIVATIONS, hidden_act, "the fused gated MLP computes")


def config_hidden_act(config: Any) -> Any:
    """The activation name of a gated MLP's config: ``config.hidden_act``, else ``config.hidden_activation``
    (Gemma 2 and 3 name only that one); None where the config names neither. What the MLP applies is its
    ``act_fn`` (:func:`mlp_activation`): a config may carry both names with different values."""
    name = getattr(config, "hidden_act", None)
    return name if name is not None else getattr(config, "hidden_activation", None)


# transformers' activation modules (the classes its ACT2FN builds) -> the fused kernel's activation
ACT_FN_CLASSES = {
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
}


def mlp_activation(mlp: nn.Module) -> str:
    """The fused kernel's activation for a gated MLP module: what its own activation module computes (``act_fn``,
    Phi-3's ``activation_fn``: the class transformers built from whichever config key that MLP reads), else the
    config's name (:func:`config_hidden_act`). InvalidArgumentError for an activation the kernel lacks."""
    name = config_hidden_act(getattr(mlp, "config", None))
    act_fn = getattr(mlp, "act_fn", None)
    if act_fn is None:
        act_fn = getattr(mlp, "activation_fn", None)
    if not isinstance(act_fn, nn.Module):
        return kernel_activation(name)
    act = ACT_FN_CLASSES.get(type(act_fn).__name__)
    if act is None:
        if isinstance(name, str) and name not in HF_ACTIVATIONS:
            kernel_activation(name)  # the usual message: the config names an activation the kernel lacks
        raise InvalidArgumentError(
            f"hidden_act: the MLP applies {type(act_fn).__name__} (config: {name!r}), which the fused gated MLP "
            f"does not compute (it computes {', '.join(sorted(set(ACT_FN_CLASSES)))})")
    return act


def _activation(table: dict[str, str], hidden_act: str, whose: str) -> str:
    act = table.get(hidden_act)
    if act is None:
        raise InvalidArgumentError(
            f"hidden_act: expected one of {', '.join(map(repr, table))} (those {whose}), got {hidden_act!r}")
    return act


class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` with gate, up and the activation in one kernel, except for FP8
    gate/up beyond 16 rows (below).

    Replaces the ``forward`` of transformers' ``LlamaMLP``, ``MistralMLP``, ``Qwen2MLP``, ``Qwen3MLP`` and the other
    gated MLPs with the same attributes. ``down_proj`` stays the model's own module (an ``nn.Linear`` or an
    ``FP8Linear``). Differentiable (the fused op has a backward). ``gate_proj`` / ``up_proj`` may be
    ``fused_gated_mlp.FP8Projection`` modules (FP8 weights and their scales, what ``patch_model(fp8=True)`` makes):
    up to 16 rows (``W8A8_MIN_ROWS - 1``: decode) the kernel then reads the FP8 weights and keeps the activations in
    their dtype (weight-only FP8); from :data:`W8A8_MIN_ROWS` rows (prefill) gate and up run as two W8A8 FP8 GEMMs
    over one quantization of the input, the activation and the product in one pass (see :func:`gated_hidden`), or,
    with an ``FP8Linear`` ``down_proj``, quantized for it as they are formed (:func:`w8a8_gated_down`).
    """

    can_torch_compile = True
    has_backward = True

    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Module
    act_fn: nn.Module  # its class names the activation (mlp_activation; without one: config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = w8a8_gated_down(self, x)
        return out if out is not None else self.down_proj(gated_hidden(self, x))


class PackedGatedMLP(nn.Module):
    """``down_proj(act(gate) * up)`` where gate and up are the two halves of one ``gate_up_proj`` (Phi-3, Phi-4:
    ``Phi3MLP``), with the two GEMMs and the activation in one kernel: the halves are row views of the packed
    weight, nothing is copied; an ``FP8Projection`` of the packed weight (``patch_model(fp8=True)``) is read packed
    (see :func:`packed_gated_hidden`). A ``gate_up_proj`` of another kind (an ``FP8Linear``, a wrapper, one with a
    bias or hooks) runs as the model's own MLP does: the projection, then the activation and the product.
    ``down_proj`` stays the model's own module. Differentiable in its dtype (the fused op has a backward; the views
    pass the gradients to ``gate_up_proj.weight``).
    """

    can_torch_compile = True
    has_backward = True

    gate_up_proj: nn.Module  # weight [2 * intermediate, hidden]: gate rows, then up rows
    down_proj: nn.Module
    activation_fn: nn.Module  # its class names the activation (mlp_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = w8a8_gated_down(self, x, packed=True)
        return out if out is not None else self.down_proj(packed_gated_hidden(self, x))


def packed_gated_hidden(mlp: nn.Module, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
    """``act(gate) * up`` of a :class:`PackedGatedMLP` module: one fused kernel over the halves of a plain
    ``gate_up_proj`` weight (bf16: row views; FP8, an ``FP8Projection`` of ``patch_model(fp8=True)``: the packed
    weight and scale, ``weight_layout="concatenated"``), except FP8 at :data:`W8A8_MIN_ROWS` rows or more (one
    W8A8 GEMM of the packed weight, then the activation, as :func:`gated_hidden` runs two); any other projection
    (an ``FP8Linear``, a wrapper, one with hooks) as the model computes it. ``norm``: as :func:`gated_hidden`'s
    (inside the fused kernel's launch, else by the module first)."""
    act = getattr(mlp, ACT_ATTR, None)  # (see gated_hidden)
    if act is None:
        act = mlp_activation(mlp)
    if type(x) is NormedFP8:  # quantized by the norm's launch for the W8A8 GEMM (mlp_input_scaling said so)
        gate, up = _w8a8_packed_gate_up(mlp, x)
        return gated_activation(gate, up, act) if FUSED_W8A8_TAIL else up * _TORCH_ACTIVATIONS[act](gate)
    packed = mlp.gate_up_proj
    weight = getattr(packed, "weight", None)
    if not (_kernel_projection(packed) and packed.bias is None and type(weight) in (torch.Tensor, nn.Parameter)):
        if norm is not None:
            x = norm(x)
        gate, up = packed(x).chunk(2, dim=-1)
        return up * _TORCH_ACTIVATIONS[act](gate)
    scale = getattr(packed, "weight_scale", None)  # FP8 weights carry their scale
    if scale is not None and x.numel() >= W8A8_MIN_ROWS * x.shape[-1] and act in _TORCH_ACTIVATIONS:
        gate, up = _w8a8_packed_gate_up(mlp, x if norm is None else norm(x))
        if not FUSED_W8A8_TAIL:
            return up * _TORCH_ACTIVATIONS[act](gate)
        return gated_activation(gate, up, act)  # the halves read in place
    norm_args = {} if norm is None else {"norm_weight": norm.weight, "norm_eps": norm.variance_epsilon}
    if scale is not None:
        return fused_gated_mlp(x, weight, None, act, weight_layout="concatenated", gate_scale=scale, **norm_args)
    inter = weight.shape[0] // 2
    return fused_gated_mlp(x, weight[:inter], weight[inter:], act, **norm_args)


# The triton-ops layer whose forward a module runs, set by ``patch_model`` beside the class it swaps in. The decoder
# layer's fusions ask :func:`runs_forward`. Under torch.compile a module's ``forward.__func__`` is not the function
# (that test was always False in compiled code, so no fusion ran there); ``type(module).forward`` or an attribute
# holding the class cost a Python guard per layer and call, an attribute holding the layer's name (a str) one C++
# check. ``patch_model`` also marks exact ``nn.Linear`` projections ``"Linear"``: a subclass (fake quantization,
# ``Float8Linear``) computes something else than the GEMM a fusion would run for it.
LAYER_ATTR = "_triton_ops_layer"


def runs_forward(module: nn.Module, layer: type | str) -> bool:
    """Whether ``patch_model`` gave ``module`` ``layer``'s forward (or, with a name, marked it so: ``"Linear"`` for
    an exact ``nn.Linear``) and nothing replaced its forward on the instance since (transformers 5.0 records
    outputs that way for a call; accelerate's hooks, ``kernels.kernelize`` and users too)."""
    name = layer if isinstance(layer, str) else layer.__name__
    return getattr(module, LAYER_ATTR, None) == name and not instance_forward(module)


def instance_forward(module: nn.Module) -> bool:
    """Whether ``module.forward`` was set on the instance (a key test of its ``__dict__``: no Python guard under
    torch.compile)."""
    return "forward" in module.__dict__


# The kernel's activation name, set on each MLP by ``patch_model`` (the model's own MLP builds its ``act_fn`` from
# ``config.hidden_act`` once, at construction, too). Read from the module's ``__dict__``: torch.compile guards a
# string there with one C++ check, where reading ``mlp.config`` (the model's config, reached by a second path)
# installs a Python lambda guard per layer, evaluated on every call. A layer installed by other means (the
# ``kernels`` hub) reads the config.
ACT_ATTR = "_triton_ops_act"


# Beyond FP8Linear's weight-only rows (16: decode), FP8 gate/up run as two W8A8 FP8 GEMMs (fp8_gemm's: the input
# quantized once as the FP8 recipe says, ACTIVATION_GRANULARITY_ATTR), then the activation and the product in one pass
# (fused_gated_mlp.gated_activation) or, for an FP8Linear down_proj, its quantization too (w8a8_gated_down). The fused
# kernel reads FP8 weights weight-only
# (converted to bf16 in registers for bf16 tensor-core dots), which pays where the weights' bytes are the cost.
# Measured on the H200 (session 13, Llama-3-8B's gate/up, GPU time per call, fused against W8A8): per-channel scales
# 171 / 43 us at 32 rows, 69 / 45 at 64, 220 / 89 at 256, 1522 / 518 at 2048; 128x128 blocks 184 / 64 at 32 rows,
# 3329 / 749 at 2048. An 8-layer 2048-token prefill: 19.4 -> 11.6 ms.
W8A8_MIN_ROWS = WEIGHT_ONLY_MAX_M + 1
# The FP8 recipe's activation scales (``"row"``, ``"block"``, ``"tensor"``) and ``fast_accum`` for those GEMMs, set on
# each FP8 MLP by ``patch_model`` as plain attributes, as ACT_ATTR is and for its reason (one C++ guard each under
# torch.compile). Missing (a layer installed by the kernels hub): per row beside per-channel weight scales, 1x128
# blocks beside 128x128 ones (FP8Linear's pairing), no fast accumulation.
ACTIVATION_GRANULARITY_ATTR = "_triton_ops_activation_granularity"
FAST_ACCUM_ATTR = "_triton_ops_fast_accum"
# A block- or group-scaled FP8Projection's scale in the GEMM's ``[K / 128, N / 128]`` (``[K / 128, N]``) layout,
# contiguous: a non-persistent buffer
# ``patch_model`` registers once (so it moves, casts and shards with the module, and stays out of the state dict).
# The transposed view of ``weight_scale`` would cost the GEMM a copy, one small launch per projection and call.
GEMM_SCALE_BUFFER = "weight_scale_kn"
_TORCH_ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
}


def gated_hidden(mlp: nn.Module, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
    """``act(gate_proj(x)) * up_proj(x)`` of a gated MLP module in one kernel: :class:`GatedMLP`'s forward before
    its ``down_proj``. FP8 gate/up (E4M3 ``FP8Projection``) at :data:`W8A8_MIN_ROWS` rows or more: two W8A8 FP8
    GEMMs and the activation (see there). ``norm``: an RMSNorm module (``weight``, ``variance_epsilon``: what
    ``triton_ops.models.layers.norm_module_fusable`` accepts) not yet applied to ``x``: inside the fused kernel's
    launch (its prologue), or by the module first on the W8A8 path."""
    act = getattr(mlp, ACT_ATTR, None)  # not mlp.__dict__.get: see models.layers.packed_projections
    if act is None:
        act = mlp_activation(mlp)  # InvalidArgumentError for one the kernel lacks
    if type(x) is NormedFP8:  # quantized by the norm's launch for the W8A8 GEMMs (mlp_input_scaling said so)
        return _gated_w8a8(mlp, x, act)
    gate, up = mlp.gate_proj, mlp.up_proj
    if not (_kernel_projection(gate) and _kernel_projection(up)):  # e.g. a LoRA wrapper: the modules' own calls
        if norm is not None:
            x = norm(x)
        act_fn = getattr(mlp, "act_fn", None)
        return (act_fn if isinstance(act_fn, nn.Module) else _TORCH_ACTIVATIONS[act])(gate(x)) * up(x)
    # FP8 gate/up (fused_gated_mlp.FP8Projection, patch_model(fp8=True)) carry their scales; bf16 ones none
    gate_scale, up_scale = getattr(gate, "weight_scale", None), getattr(up, "weight_scale", None)
    if gate_scale is not None and x.numel() >= W8A8_MIN_ROWS * x.shape[-1] and act in _TORCH_ACTIVATIONS \
            and gate.weight.dtype == up.weight.dtype == torch.float8_e4m3fn:
        return _gated_w8a8(mlp, x if norm is None else norm(x), act)
    if norm is not None:
        return fused_gated_mlp(x, gate.weight, up.weight, act, gate_bias=gate.bias, up_bias=up.bias,
                               gate_scale=gate_scale, up_scale=up_scale, norm_weight=norm.weight,
                               norm_eps=norm.variance_epsilon)
    return fused_gated_mlp(x, gate.weight, up.weight, act, gate_bias=gate.bias, up_bias=up.bias,
                           gate_scale=gate_scale, up_scale=up_scale)


def _kernel_projection(module: nn.Module) -> bool:
    """A gate or up projection the fused kernel may stand in for (it reads the weight, never calls the module): an
    exact ``nn.Linear`` or an ``FP8Projection`` (``patch_model``'s ``"Linear"`` / ``"FP8Projection"`` marks;
    unmarked, by type: a layer the kernels hub installed), without hooks or a forward set on the instance.
    Anything else (a LoRA wrapper that keeps the frozen weight, fake quantization) computes something else than its
    weight's GEMM."""
    mark = getattr(module, LAYER_ATTR, None)
    if mark is not None:  # (string compares: one C++ guard each under torch.compile, where a type test is Python)
        plain = mark == "Linear" or mark == "FP8Projection"
    else:
        plain = type(module) is nn.Linear or isinstance(module, FP8Projection)
    return plain and not (module._forward_hooks or module._forward_pre_hooks) and not instance_forward(module)


def _gated_w8a8(mlp: nn.Module, x: torch.Tensor, act: str) -> torch.Tensor:
    """``act(gate_proj(x)) * up_proj(x)`` from two W8A8 FP8 GEMMs, with the activation scales and accumulation
    ``patch_model`` recorded from the FP8 recipe, and the product in one pass (``gated_activation``: computed in
    fp32 and rounded once, where torch's ``act(gate) * up`` rounds the activation first)."""
    gate, up = _w8a8_gate_up(mlp, x)
    return gated_activation(gate, up, act) if FUSED_W8A8_TAIL else _TORCH_ACTIVATIONS[act](gate) * up


def _w8a8_gate_up(mlp: nn.Module, x: torch.Tensor | NormedFP8) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate_proj(x)``, ``up_proj(x)`` of FP8Projection gate/up as two W8A8 FP8 GEMMs over one quantization of
    ``x`` (the activation scales and accumulation ``patch_model`` recorded from the FP8 recipe; without a record
    as FP8Linear pairs them with gate's weight scales), or over ``x`` as the norm's launch quantized it
    (:class:`NormedFP8`). Bit for bit two ``fp8_linear(..., path="w8a8")`` calls, one quantization launch fewer;
    those two calls themselves where a gradient is recorded (``fp8_linear`` is differentiable in ``x`` and the
    biases, the quantization and ``fp8_gemm`` are not)."""
    granularity = getattr(mlp, ACTIVATION_GRANULARITY_ATTR, None)  # getattr: as ACT_ATTR is read
    fast_accum = getattr(mlp, FAST_ACCUM_ATTR, False)
    gate, up = mlp.gate_proj, mlp.up_proj
    gate_kn, default = _gemm_scale(gate)
    up_kn, up_default = _gemm_scale(up)
    if type(x) is NormedFP8:
        (a_q, a_s), lead, dtype = x.rows(), x.q.shape[:-1], x.dtype
    else:
        grad = torch.is_grad_enabled() and (x.requires_grad or any(
            b is not None and b.requires_grad for b in (gate.bias, up.bias)))
        if grad or (granularity is None and up_default != default):  # (mixed weight scalings: each its own pairing)
            return (_w8a8(x, gate, granularity, fast_accum), _w8a8(x, up, granularity, fast_accum))
        a_q, a_s = quantize_fp8(x.reshape(-1, x.shape[-1]), "e4m3", granularity or default)
        lead, dtype = x.shape[:-1], x.dtype
    g = fp8_gemm(a_q, gate.weight.t(), a_scale=a_s, b_scale=gate_kn, out_dtype=dtype, bias=gate.bias,
                 fast_accum=fast_accum)
    u = fp8_gemm(a_q, up.weight.t(), a_scale=a_s, b_scale=up_kn, out_dtype=dtype, bias=up.bias,
                 fast_accum=fast_accum)
    return g.view(*lead, g.shape[-1]), u.view(*lead, u.shape[-1])


def _w8a8_packed_gate_up(mlp: nn.Module, x: torch.Tensor | NormedFP8) -> tuple[torch.Tensor, torch.Tensor]:
    """The halves of a packed FP8 ``gate_up_proj(x)`` (one W8A8 GEMM; over ``x`` as the norm's launch quantized
    it for a :class:`NormedFP8`): row-strided views, read in place by :func:`fp8_gemm.fp8_gated_linear`."""
    granularity, fast_accum = getattr(mlp, ACTIVATION_GRANULARITY_ATTR, None), getattr(mlp, FAST_ACCUM_ATTR, False)
    projection = mlp.gate_up_proj
    if type(x) is NormedFP8:
        a_q, a_s = x.rows()
        out = fp8_gemm(a_q, projection.weight.t(), a_scale=a_s, b_scale=_gemm_scale(projection)[0],
                       out_dtype=x.dtype, bias=projection.bias, fast_accum=fast_accum)
        return out.view(*x.q.shape[:-1], out.shape[-1]).chunk(2, dim=-1)
    return _w8a8(x, projection, granularity, fast_accum).chunk(2, dim=-1)


def _gemm_scale(projection: nn.Module) -> tuple[torch.Tensor, str]:
    """An FP8Projection's weight scale in the GEMM's ``[K, N]`` convention and the activation scales FP8Linear
    pairs with it: per channel ``[out]`` -> ``[1, out]`` (a view) and per row; 128x128 blocks
    ``[out / 128, in / 128]`` and groups ``[out, in / 128]`` transposed (the stored contiguous copy,
    :data:`GEMM_SCALE_BUFFER`; without one the GEMM copies the view) and 1x128 blocks."""
    scale = projection.weight_scale
    if scale.dim() == 1:
        return scale.view(1, -1), "row"
    scale_kn = getattr(projection, GEMM_SCALE_BUFFER, None)
    return (scale.t() if scale_kn is None else scale_kn), "block"  # None: an FP8Projection patch_model did not make


def _w8a8(x: torch.Tensor, projection: nn.Module, granularity: str | None, fast_accum: bool) -> torch.Tensor:
    """An FP8Projection's ``x @ dequant(weight)^T + bias`` as a W8A8 FP8 GEMM, the activation quantized per
    ``granularity`` (None: as FP8Linear pairs it with the weight's scales, :func:`_gemm_scale`)."""
    scale_kn, default = _gemm_scale(projection)
    return fp8_linear(x, projection.weight, scale_kn, projection.bias, activation_granularity=granularity or default,
                      fast_accum=fast_accum, path="w8a8")


class NormedFP8(NamedTuple):
    """A gated MLP's input as the RMSNorm's launch before it wrote it for the MLP's W8A8 gate/up GEMMs
    (``fused_rmsnorm_rope``'s ``fp8_out``; :func:`mlp_input_scaling` tells when): E4M3 values ``[..., hidden]``,
    their scales (``[..., 1]`` per row or ``[..., ceil(hidden / 128)]`` per 1x128 block) and the model's activation
    dtype (the GEMMs' output). The same bits as quantizing the norm's 16-bit output, without writing and reading
    it."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The values and scales as the GEMM's 2-D ``[rows, hidden]`` activation."""
        return self.q.view(-1, self.q.shape[-1]), self.scale.view(-1, self.scale.shape[-1])


# On: a prefill's RMSNorm before W8A8 FP8 projections (the packed q/k/v, a gated MLP's gate/up) writes its output
# quantized as those GEMMs take it (per row or per 1x128 block, fused_rmsnorm_rope's fp8_out), so the activation is
# not written in 16 bits and read back by a quantization launch. Off: the norm's 16-bit output, then the projection's
# own quantization (the same bits), for before/after measurements (benchmarks.bench_model's "-unfused-norm-fp8"
# variants). Read on every call.
NORM_QUANTIZES_W8A8 = True


def mlp_input_scaling(mlp: nn.Module, x: torch.Tensor) -> str:
    """The activation scaling (``"row"`` or ``"block"``) under which a patched gated MLP (:class:`GatedMLP`,
    :class:`PackedGatedMLP`) runs its gate/up as W8A8 GEMMs over one quantization of its input ``x`` (its norm's
    output), which the norm's launch can write (:class:`NormedFP8`), else ``""``: :data:`W8A8_MIN_ROWS` rows or more,
    FP8 projections the GEMMs read (plain tensors, no hooks; the packed one without bias), per-row or 1x128
    activation scales (the recipe's, or FP8Linear's pairing with the weights' scales), an activation of ours,
    nothing to differentiate, and :data:`NORM_QUANTIZES_W8A8` on."""
    if not NORM_QUANTIZES_W8A8 or torch.is_grad_enabled() or type(x) is not torch.Tensor:
        return ""
    if x.dim() == 0 or x.numel() < W8A8_MIN_ROWS * x.shape[-1] or mlp._forward_hooks or mlp._forward_pre_hooks:
        return ""
    if runs_forward(mlp, PackedGatedMLP):
        projections = (mlp.gate_up_proj,)
        if projections[0].bias is not None:
            return ""
    elif runs_forward(mlp, GatedMLP):
        projections = (mlp.gate_proj, mlp.up_proj)
    else:
        return ""
    if getattr(mlp, ACT_ATTR, None) not in _TORCH_ACTIVATIONS:
        return ""
    if not all(_kernel_projection(p) and _fp8_weight(p) for p in projections):
        return ""
    granularity = getattr(mlp, ACTIVATION_GRANULARITY_ATTR, None)
    if granularity is None:  # FP8Linear's pairing, one for both projections
        pairings = {_gemm_scale(p)[1] for p in projections}
        granularity = pairings.pop() if len(pairings) == 1 else None
    return granularity if granularity in ("row", "block") else ""


# On: a W8A8 gated MLP's tail is fused: act(gate) * up in one pass (gated_activation), or, for an FP8Linear down_proj,
# quantized for it as it is formed (fp8_gated_linear: w8a8_gated_down). Off: as before session 49 (torch's activation
# and product, the down projection's own quantization), for before/after measurements (benchmarks.bench_model's
# "-unfused-tail" variants). Read on every call.
FUSED_W8A8_TAIL = True


def w8a8_gated_down(mlp: nn.Module, x: torch.Tensor | NormedFP8, norm: nn.Module | None = None,
                    packed: bool = False) -> torch.Tensor | None:
    """``down_proj(act(gate) * up)`` of a gated MLP (:class:`GatedMLP`, or :class:`PackedGatedMLP` with ``packed``)
    whose FP8 gate/up run W8A8 (:data:`W8A8_MIN_ROWS` rows or more, see :func:`gated_hidden`) and whose
    ``down_proj`` is a plain :class:`~fp8_gemm.FP8Linear` on its W8A8 path: the product quantized in the pass that
    forms it and the down GEMM over it (:func:`fp8_gemm.fp8_gated_linear`), never written in 16 bits. None where
    that does not apply (the caller runs the hidden state, then ``down_proj``). ``norm``: as :func:`gated_hidden`'s.
    ``x`` may be a :class:`NormedFP8` (the input as its norm's launch quantized it for gate/up).

    The product is formed in fp32 and not rounded to the model's dtype before its FP8 cast (the unfused path rounds
    it first: :func:`gated_activation` once, torch's composition twice), a difference far below the cast's."""
    down = mlp.down_proj
    rows = x.q if type(x) is NormedFP8 else x
    if not FUSED_W8A8_TAIL or rows.numel() < W8A8_MIN_ROWS * rows.shape[-1]:
        return None
    # per-tensor activation scales: no one-pass kernel (the product's maximum comes first); the bf16 product of
    # gated_activation, then down_proj's own quantization, moves fewer bytes than the fp32 product would
    if not (isinstance(down, FP8Linear) and _fp8_down_plain(down)) or down.activation_granularity == "tensor":
        return None
    act = getattr(mlp, ACT_ATTR, None)
    if act is None:
        act = mlp_activation(mlp)
    if act not in _TORCH_ACTIVATIONS:
        return None
    if packed:
        projection = mlp.gate_up_proj
        if not (_kernel_projection(projection) and projection.bias is None and _fp8_weight(projection)):
            return None
        gate, up = _w8a8_packed_gate_up(mlp, x if norm is None else norm(x))
    else:
        gate_proj, up_proj = mlp.gate_proj, mlp.up_proj
        if not (_kernel_projection(gate_proj) and _kernel_projection(up_proj) and _fp8_weight(gate_proj)
                and _fp8_weight(up_proj)):
            return None
        gate, up = _w8a8_gate_up(mlp, x if norm is None else norm(x))
    return fp8_gated_linear(gate, up, down.weight, down.weight_scale, down.bias, act, down.activation_granularity,
                            down.fast_accum)


def _fp8_weight(projection: nn.Module) -> bool:
    """An FP8Projection's E4M3 weight (with its scale) as a plain tensor: what the W8A8 GEMMs read."""
    weight = getattr(projection, "weight", None)
    return (getattr(projection, "weight_scale", None) is not None and type(weight) in (torch.Tensor, nn.Parameter)
            and weight.dtype == torch.float8_e4m3fn)


def _fp8_down_plain(down: FP8Linear) -> bool:
    """An FP8Linear down projection whose call is its W8A8 GEMM (path ``"auto"`` beyond the weight-only rows, or
    ``"w8a8"``): no hooks or forward of someone else's, plain (not sharded) tensors."""
    bufs = down._buffers
    return (down.path in ("auto", "w8a8") and not (down._forward_hooks or down._forward_pre_hooks)
            and not instance_forward(down)
            and all(type(bufs.get(n)) in (torch.Tensor, nn.Parameter) for n in ("weight", "weight_scale"))
            and (down.bias is None or type(down.bias) in (torch.Tensor, nn.Parameter)))


class RMSNorm(nn.Module):
    """RMSNorm in one pass (``fused_rmsnorm_rope.rmsnorm``), for transformers' ``LlamaRMSNorm``, ``Qwen3RMSNorm``,
    ``MistralRMSNorm`` and the like (``weight`` and ``variance_epsilon``). The output has the input's dtype (the
    models' own forward returns ``weight.dtype`` when the weight is wider than the activation)."""

    can_torch_compile = True
    has_backward = True

    weight: torch.Tensor
    variance_epsilon: float

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class EpsRMSNorm(nn.Module):
    """RMSNorm in one pass for norms that scale by ``weight`` but name their epsilon ``eps``: transformers'
    ``Gemma4RMSNorm`` before its rename to ``variance_epsilon`` (5.17 and earlier), whose forward computes what
    :class:`RMSNorm`'s does. patch_model matches it by the class defining the forward (``weight``, ``eps``)."""

    can_torch_compile = True
    has_backward = True

    weight: torch.Tensor
    eps: float

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rmsnorm(hidden_states, self.weight, self.eps)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm in one pass: ``x * rsqrt(mean(x^2) + eps) * (1 + weight)`` computed in float32 and rounded
    once to the input's dtype (``fused_rmsnorm_rope.rmsnorm(..., gemma=True)``), as transformers'
    ``Gemma3RMSNorm`` / ``GemmaRMSNorm`` compute it (``weight``, ``eps``)."""

    can_torch_compile = True
    has_backward = True

    weight: torch.Tensor
    eps: float

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rmsnorm(hidden_states, self.weight, self.eps, gemma=True)


class GptOssMoE(nn.Module):
    """gpt-oss's mixture of experts (``GptOssMLP``: ``router`` + ``experts``) as :func:`fused_moe.fused_moe`:
    routing, the grouped expert GEMMs with the clamped SwiGLU and the weighted combine in five launches, only the
    experts the tokens chose read. Returns ``(output, router_scores)`` as ``GptOssMLP`` does. Forward only (the
    fused op has no backward). A router with forward hooks (transformers records ``router_logits`` through one once
    any call asks for recorded outputs) runs its own forward, so the hooks see what they would; only the experts and
    the combine are then ours. Forward hooks on the ``experts`` module never fire.
    """

    can_torch_compile = True
    has_backward = False

    router: nn.Module  # weight [E, H], bias [E], top_k
    experts: nn.Module  # gate_up_proj [E, H, 2I] (gate/up interleaved), gate_up_proj_bias, down_proj, alpha, limit

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return moe_hidden(self, hidden_states, return_router_scores=True)


class SparseMoE(nn.Module):
    """A top-k sparse mixture of experts with bias-free experts stored ``gate_up_proj [E, 2I, H]`` (gate rows, then
    up rows) and ``down_proj [E, H, I]``, and a bias-free linear router (``gate``: ``weight [E, H]``, ``top_k``):
    transformers 5's ``Qwen3MoeSparseMoeBlock``, ``MixtralSparseMoeBlock`` and ``Qwen2MoeSparseMoeBlock``, as
    :func:`fused_moe.fused_moe` (routing, grouped expert GEMMs with the activation, the weighted combine; only the
    experts hit are read).

    Qwen2-MoE's block also has a shared expert that every token goes through (``shared_expert``, a gated MLP:
    ``patch_model`` runs it as :class:`GatedMLP`) scaled by a sigmoid gate (``shared_expert_gate``, a bias-free
    ``nn.Linear`` with one output): ``moe(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x)``. Both modules
    are called as the model's own block calls them; the sum with the routed experts' output happens inside
    fused_moe's combine launch (the residual the combine adds), rounded once.

    The routing is the router's: a softmax over all experts, the ``top_k`` largest, renormalized to sum to one where
    the router does (Mixtral always; Qwen3-MoE when ``norm_topk_prob``). ``patch_model`` records that and the
    kernel's activation (from the experts' ``act_fn``) on the module once (:data:`MOE_ROUTING_ATTR`): a plain
    attribute is one guard under torch.compile. Returns the output tensor, as those blocks do. Forward only. A
    router with forward hooks (transformers records ``router_logits`` through one) runs its own forward, the
    experts and the combine ours; forward hooks on the ``experts`` module never fire.
    """

    can_torch_compile = True
    has_backward = False

    gate: nn.Module  # weight [E, H], top_k (Qwen3-MoE, Qwen2-MoE: norm_topk_prob)
    experts: nn.Module  # gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj [E, H, I]
    # Qwen2-MoE's block also has shared_expert and shared_expert_gate (read with getattr: the others have none)
    # Mixtral's block also has jitter_noise (read with getattr: Qwen3-MoE's has none)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if jittered(self):  # Mixtral's router noise in training mode, as its block applies it (here out of place)
            jitter = self.jitter_noise
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - jitter, 1.0 + jitter)
        return moe_hidden(self, hidden_states)


def has_shared_expert(block: nn.Module) -> bool:
    """Whether a sparse MoE block has Qwen2-MoE's gated shared expert (``shared_expert``, ``shared_expert_gate``)."""
    return getattr(block, "shared_expert", None) is not None


def shared_expert_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``sigmoid(shared_expert_gate(x)) * shared_expert(x)`` of a Qwen2-MoE block, as its own forward computes it
    (each module called, so its hooks and patches apply); None for a block without a shared expert."""
    if not has_shared_expert(block):
        return None
    return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)


def jittered(block: nn.Module) -> bool:
    """Whether a sparse MoE block multiplies its input by router noise (Mixtral's ``jitter_noise``, training mode)."""
    return bool(block.training and getattr(block, "jitter_noise", 0))


# ``(activation, renormalize)`` of a SparseMoE block, set by ``patch_model`` as ACT_ATTR is (and for its reason).
MOE_ROUTING_ATTR = "_triton_ops_moe_routing"
# FP8 experts whose calls of at least this many tokens quantize the activations per row too (W8A8), fewer taking the
# weight-only path: an attribute of the experts module (patch_model sets it on an FP8 checkpoint's block-scaled
# experts, models.prequantized). Experts converted with fp8_activations=True run W8A8 at every size.
W8A8_FROM_TOKENS_ATTR = "_triton_ops_w8a8_from_tokens"
# transformers' ``config.hidden_act`` -> fused_moe's activation, for the experts of a SparseMoE block
MOE_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_new": "gelu_tanh"}


def moe_activation(hidden_act: str) -> str:
    """fused_moe's activation for a sparse MoE block's ``config.hidden_act``; InvalidArgumentError if it has none."""
    return _activation(MOE_ACTIVATIONS, hidden_act, "fused_moe's experts compute")


def moe_router(mlp: nn.Module) -> nn.Module:
    """The router module of a patched mixture of experts: gpt-oss's ``router``, a SparseMoE block's ``gate``."""
    return mlp.gate if _is_sparse(mlp) else mlp.router


def _is_sparse(mlp: nn.Module) -> bool:
    # by patch_model's mark (forward.__func__ is not the function under torch.compile; type(mlp).forward costs a
    # Python guard per layer)
    return getattr(mlp, LAYER_ATTR, None) == "SparseMoE"


def router_hooked(router: nn.Module) -> bool:
    """Whether a router's own forward must run because something watches it: transformers' router-logit recording
    (5.2x: forward hooks, installed once any call asks for recorded outputs and kept; in eager code they count only
    in a call that records router logits; 5.0: the instance's ``forward`` replaced for the call) or anyone's
    hooks."""
    if router._forward_pre_hooks or instance_forward(router):
        return True
    hooks = router._forward_hooks
    if hooks and all("output_capturing_hook" in getattr(h, "__qualname__", "") for h in hooks.values()):
        return _recording("router_logits")  # transformers' own, installed once and kept: active only when asked
    return bool(hooks)


def _recording(key: str) -> bool:
    """Whether transformers' output capture is collecting ``key`` in this call (5.2x: its active collector).
    Under torch.compile (or without that collector) assumed so: the router's own forward, always right."""
    if torch.compiler.is_compiling():
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return True
    collected = _active_collector.get()  # None outside a model's call: the hook records nothing then
    return collected is not None and key in collected


def moe_hidden(mlp: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None,
               return_router_scores: bool = False, norm: nn.Module | None = None
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The forward of a :class:`GptOssMoE` (``router``, ``experts``) or :class:`SparseMoE` (``gate``, ``experts``)
    module; with ``residual``, the decoder layer's add after the MoE inside its combine launch (``residual +
    moe(x)``, rounded once); with ``norm`` (an RMSNorm module not yet applied to ``x``), the norm inside the
    router's and the gate/up GEMM's launches (not with a hooked router: the caller checks
    :func:`router_hooked`)."""
    e = mlp.experts
    # FP8 experts (patch_model(fp8=True), fused_moe.convert_experts_to_fp8): their scales. getattr, not explicit
    # _buffers / __dict__ reads: those keep torch.compile from skipping the module's guards while nothing changed
    kw: dict[str, Any] = dict(gate_up_scale=getattr(e, "gate_up_scale", None),
                              down_scale=getattr(e, "down_scale", None), residual=residual)
    # W8A8 experts (fused_moe.convert_experts_to_fp8(..., fp8_activations=True)): the activations quantized too;
    # or from a number of tokens on (W8A8_FROM_TOKENS_ATTR)
    from_tokens = getattr(e, W8A8_FROM_TOKENS_ATTR, None)
    kw["fp8_activations"] = kw["gate_up_scale"] is not None and (
        getattr(e, "fp8_activations", False) is True
        or (from_tokens is not None and x.numel() >= from_tokens * x.shape[-1]))
    if norm is not None:
        kw.update(norm_weight=norm.weight, norm_eps=norm.variance_epsilon)
    shared = shared_expert_output(mlp, x)
    if shared is not None:  # Qwen2-MoE: the shared expert's gated output joins the combine as (part of) its residual
        if norm is not None:
            raise InvalidArgumentError("norm: a block with a shared expert takes normalized input (the shared expert "
                                       "reads it too)")
        kw["residual"] = shared if residual is None else residual + shared
    if _is_sparse(mlp):
        router, biases = mlp.gate, (None, None)
        act, renormalize = getattr(mlp, MOE_ROUTING_ATTR)
        kw.update(activation=act, gate_up_layout="concatenated", transposed=False)
    else:
        router, biases, renormalize = mlp.router, (e.gate_up_proj_bias, e.down_proj_bias), True
        kw.update(activation="swiglu_oai", alpha=float(e.alpha), limit=float(e.limit))
    if router_hooked(router):  # the router's own forward, its hooks seeing it: (logits, scores [T, k], ids [T, k])
        if norm is not None:
            raise InvalidArgumentError("norm: a hooked router runs its own forward, on normalized input only")
        _, scores, ids = router(x.reshape(-1, x.shape[-1]))
        out = moe_experts(x, ids.reshape(*x.shape[:-1], -1), scores.reshape(*x.shape[:-1], -1), e.gate_up_proj,
                          biases[0], e.down_proj, biases[1], **kw)
        return (out, scores) if return_router_scores else out
    return fused_moe(x, router.weight, getattr(router, "bias", None), e.gate_up_proj, biases[0], e.down_proj,
                     biases[1], int(router.top_k), renormalize=renormalize,
                     return_router_scores=return_router_scores, **kw)


__all__ = ["HF_ACTIVATIONS", "LAYER_ATTR", "MOE_ACTIVATIONS", "MOE_ROUTING_ATTR", "W8A8_FROM_TOKENS_ATTR", "EpsRMSNorm",
           "GatedMLP", "GemmaRMSNorm",
           "GptOssMoE", "PackedGatedMLP", "RMSNorm", "SparseMoE", "packed_gated_hidden", "config_hidden_act",
           "has_shared_expert", "mlp_activation", "gated_hidden", "jittered", "kernel_activation", "moe_activation",
           "moe_hidden", "moe_router", "instance_forward", "router_hooked", "runs_forward", "shared_expert_output",
           "w8a8_gated_down"]
