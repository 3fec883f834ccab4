"""``FusedGatedMLP``: the gated part of a LLaMA-style feed-forward block as an ``nn.Module``, with bf16/fp16/fp32
or FP8 (E4M3 / E5M2, weight-only) gate and up weights."""

from __future__ import annotations

import torch
from torch import nn
from triton_ops_core.exceptions import (
    InvalidArgumentError,
    ShapeMismatchError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
)

from .ops import FP8_SCALINGS, FP8_WEIGHT_DTYPES, dequantize_weight_fp8, fused_gated_mlp, quantize_weight_fp8
from .validation import ACTIVATIONS

# transformers' ``config.hidden_act`` -> the kernel's activation (the gated MLPs' activations it computes).
HF_HIDDEN_ACTS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}


class FP8Projection(nn.Module):
    """An FP8 gate or up projection: buffers ``weight`` (``[out_features, in_features]``, ``float8_e4m3fn`` or
    ``float8_e5m2``) and ``weight_scale`` (float32, ``[out_features]`` per channel or
    ``[ceil(out / 128), ceil(in / 128)]`` per 128 x 128 block; ``weight ~= weight_fp8 * weight_scale``), and an
    optional ``bias`` parameter kept in its own dtype.

    ``FusedGatedMLP`` reads these tensors and never calls this module. Its own ``forward`` is the plain-PyTorch
    projection on the dequantized weight (``F.linear(x, dequant(weight), bias)``, a transient dequantized copy per
    call), so a model whose ``gate_proj`` / ``up_proj`` were replaced by it (see ``FusedGatedMLP.from_module``)
    still runs its own forward, with the quantized weights.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        if weight.dtype not in FP8_WEIGHT_DTYPES:
            raise UnsupportedDtypeError(
                f"weight: expected float8_e4m3fn or float8_e5m2, got {str(weight.dtype).removeprefix('torch.')}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_parameter("bias", bias)

    @property
    def scaling(self) -> str:
        """``"channel"``, ``"block"`` (``[ceil(out / 128), ceil(in / 128)]``) or ``"group"`` (``[out, ceil(in /
        128)]``; for one output row the two are the same scale, called ``"block"``)."""
        if self.weight_scale.dim() == 1:
            return "channel"
        return "block" if self.weight_scale.shape[0] == -(-self.out_features // 128) else "group"

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``weight * weight_scale`` in ``dtype`` (a new tensor)."""
        return dequantize_weight_fp8(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ dequant(weight)^T + bias`` in ``x``'s dtype (the reference path; the fused module is faster)."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"dtype={str(self.weight.dtype).removeprefix('torch.')}, scaling={self.scaling!r}, "
                f"bias={self.bias is not None}")


def _check_activation(activation: object) -> None:
    if activation not in ACTIVATIONS:
        raise InvalidArgumentError(
            f"activation: expected one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")


def _fp8_projection(layer: nn.Linear, weight_dtype: torch.dtype, scaling: str) -> FP8Projection:
    if layer.weight.device.type == "meta":
        raise UnsupportedDeviceError(
            "weight: on the meta device (no values to quantize); load or materialize the weights first")
    q, scale = quantize_weight_fp8(layer.weight.detach(), scaling, weight_dtype)
    return FP8Projection(q, scale, layer.bias)  # the bias Parameter is shared, not copied


class FusedGatedMLP(nn.Module):
    """``act(gate_proj(x)) * up_proj(x)`` with both projections and the activation in one Triton kernel.

    The activation applies to the gate projection (LLaMA / Hugging Face convention). The module is the gated
    intermediate only: the down projection stays an ordinary module of the model (an ``nn.Linear``, or
    ``fp8_gemm.FP8Linear`` when the model is converted to FP8: this package does not touch it), so
    ``mlp.down_proj(FusedGatedMLP.from_linear(mlp.gate_proj, mlp.up_proj)(x))`` reproduces a LLaMA MLP.

    Parameters ``gate_proj.weight`` / ``up_proj.weight`` (``[intermediate_dim, hidden_dim]``) and, with
    ``bias=True``, ``gate_proj.bias`` / ``up_proj.bias``, initialised as ``nn.Linear`` does. A module built with
    FP8 weights (``from_module`` / ``from_linear`` with ``weight_dtype``) holds :class:`FP8Projection` layers
    instead, whose ``weight`` / ``weight_scale`` buffers travel with ``state_dict``.
    """

    def __init__(self, hidden_dim: int, intermediate_dim: int, activation: str = "silu", bias: bool = False, *,
                 alpha: float = 1.702, limit: float = 7.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, value in (("hidden_dim", hidden_dim), ("intermediate_dim", intermediate_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgumentError(f"{name}: expected a positive int, got {value!r}")
        _check_activation(activation)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.activation = activation
        self.alpha = alpha
        self.limit = limit
        self.gate_proj = nn.Linear(hidden_dim, intermediate_dim, bias=bias, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden_dim, intermediate_dim, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, gate_proj: nn.Linear, up_proj: nn.Linear, activation: str = "silu", *,
                    alpha: float = 1.702, limit: float = 7.0, weight_dtype: torch.dtype | None = None,
                    fp8_scaling: str = "channel") -> FusedGatedMLP:
        """Adopt existing ``gate_proj`` / ``up_proj`` layers.

        With ``weight_dtype=None`` the new module shares their parameters. With ``weight_dtype`` FP8
        (``torch.float8_e4m3fn``, or ``torch.float8_e5m2``) their weights are quantized once with PyTorch
        operations (:func:`fused_gated_mlp.quantize_weight_fp8`; ``fp8_scaling`` ``"channel"`` or ``"block"``)
        into :class:`FP8Projection` layers; the module keeps no high-precision copy (biases are shared).
        """
        for name, layer in (("gate_proj", gate_proj), ("up_proj", up_proj)):
            if not isinstance(layer, nn.Linear):
                raise InvalidArgumentError(f"{name}: expected an nn.Linear, got {type(layer).__name__}")
        if gate_proj.weight.shape != up_proj.weight.shape:
            raise ShapeMismatchError(
                f"up_proj: expected weight shape {list(gate_proj.weight.shape)} (that of gate_proj), "
                f"got {list(up_proj.weight.shape)}")
        if (gate_proj.bias is None) != (up_proj.bias is None):
            raise InvalidArgumentError("up_proj: expected a bias exactly when gate_proj has one")
        _check_activation(activation)
        if weight_dtype is not None:
            if weight_dtype not in FP8_WEIGHT_DTYPES:
                raise UnsupportedDtypeError(
                    f"weight_dtype: expected None, torch.float8_e4m3fn or torch.float8_e5m2, got {weight_dtype}")
            if fp8_scaling not in FP8_SCALINGS:
                raise InvalidArgumentError(
                    f"fp8_scaling: expected one of {', '.join(map(repr, FP8_SCALINGS))}, got {fp8_scaling!r}")
            gate_proj = _fp8_projection(gate_proj, weight_dtype, fp8_scaling)
            up_proj = _fp8_projection(up_proj, weight_dtype, fp8_scaling)
        return cls._assemble(gate_proj, up_proj, activation, alpha, limit)

    @classmethod
    def from_module(cls, mlp: nn.Module, activation: str | None = None, *, weight_dtype: torch.dtype | None = None,
                    fp8_scaling: str = "channel", alpha: float = 1.702, limit: float = 7.0) -> FusedGatedMLP:
        """The gated part of a transformers gated MLP (``LlamaMLP``, ``MistralMLP``, ``Qwen2MLP``, ``Qwen3MLP``, ...:
        a module with ``gate_proj`` / ``up_proj`` ``nn.Linear`` layers).

        Args:
            mlp: the MLP module. Its ``down_proj`` is not part of the result: the caller keeps applying
                ``mlp.down_proj`` (an ``nn.Linear``; an FP8 model converts it separately, e.g. with
                ``fp8_gemm.FP8Linear`` through the ``triton-ops`` umbrella).
            activation: the kernel's activation; None reads ``mlp.config.hidden_act`` (``"silu"``/``"swish"``,
                ``"gelu"``, ``"gelu_pytorch_tanh"``/``"gelu_new"``).
            weight_dtype: None keeps the weights (shared, as :meth:`from_linear`); ``torch.float8_e4m3fn`` (or
                ``torch.float8_e5m2``) quantizes gate and up once with PyTorch operations.
            fp8_scaling: ``"channel"`` (one scale per output channel), ``"block"`` (128 x 128 blocks) or ``"group"``
                (one per output channel and 128 inputs).
            alpha, limit: ``"swiglu_oai"``'s parameters.

        With FP8 weights the quantized projections also **replace** ``mlp.gate_proj`` and ``mlp.up_proj``, so the
        model holds one copy of these weights, in FP8: the high-precision tensors are freed once nothing else
        references them (the biases are shared). ``mlp`` keeps working on its own (its projections then dequantize
        per call) and is what ``mlp.down_proj(fused(x))`` matches.
        """
        for name in ("gate_proj", "up_proj"):
            if not isinstance(getattr(mlp, name, None), nn.Linear):
                raise InvalidArgumentError(
                    f"mlp: expected a gated MLP with nn.Linear gate_proj and up_proj, got {type(mlp).__name__} "
                    f"whose {name} is {type(getattr(mlp, name, None)).__name__}")
        if activation is None:
            hidden_act = getattr(getattr(mlp, "config", None), "hidden_act", None)
            if hidden_act not in HF_HIDDEN_ACTS:
                raise InvalidArgumentError(
                    f"activation: expected one of {', '.join(map(repr, ACTIVATIONS))}, or a module whose "
                    f"config.hidden_act is one of {', '.join(map(repr, HF_HIDDEN_ACTS))}; got None and "
                    f"hidden_act {hidden_act!r}")
            activation = HF_HIDDEN_ACTS[hidden_act]
        fused = cls.from_linear(mlp.gate_proj, mlp.up_proj, activation, alpha=alpha, limit=limit,
                                weight_dtype=weight_dtype, fp8_scaling=fp8_scaling)
        if weight_dtype is not None:
            mlp.gate_proj, mlp.up_proj = fused.gate_proj, fused.up_proj
        return fused

    @classmethod
    def _assemble(cls, gate_proj: nn.Module, up_proj: nn.Module, activation: str, alpha: float,
                  limit: float) -> FusedGatedMLP:
        inter, hidden = gate_proj.weight.shape
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.hidden_dim, module.intermediate_dim = hidden, inter
        module.activation, module.alpha, module.limit = activation, alpha, limit
        module.gate_proj, module.up_proj = gate_proj, up_proj
        return module

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the gate and up weights (an FP8 dtype for a quantized module)."""
        return self.gate_proj.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., hidden_dim]`` to ``[..., intermediate_dim]``."""
        gate, up = self.gate_proj, self.up_proj
        fp8 = isinstance(gate, FP8Projection)
        return fused_gated_mlp(
            x, gate.weight, up.weight, self.activation,
            gate_bias=gate.bias, up_bias=up.bias, alpha=self.alpha, limit=self.limit,
            gate_scale=gate.weight_scale if fp8 else None, up_scale=up.weight_scale if fp8 else None,
        )

    def extra_repr(self) -> str:
        bias = self.gate_proj.bias is not None
        extra = f", alpha={self.alpha}, limit={self.limit}" if self.activation == "swiglu_oai" else ""
        if isinstance(self.gate_proj, FP8Projection):
            extra += (f", weight_dtype={str(self.weight_dtype).removeprefix('torch.')}, "
                      f"fp8_scaling={self.gate_proj.scaling!r}")
        return (f"hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, "
                f"activation={self.activation!r}, bias={bias}{extra}")


__all__ = ["HF_HIDDEN_ACTS", "FP8Projection", "FusedGatedMLP"]
