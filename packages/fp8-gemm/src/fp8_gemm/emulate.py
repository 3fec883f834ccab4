"""A plain-PyTorch emulation of ``FP8Linear``, for measuring a recipe's accuracy where the kernels are slow.

``EmulatedFP8Linear`` computes what ``FP8Linear`` computes, in PyTorch: the weight quantized once and the activation
quantized per call with :func:`fp8_gemm.reference.quantize_fp8_reference` (torch's own float32 -> E4M3 cast, which is
correct on the CPU, unlike Triton's interpreter's), the two dequantized and multiplied in float32, the bias added in
float32 and the result rounded once to the input's dtype. Only the order of the float32 sum differs from the GEMM's,
so outputs agree to float32 rounding before the one output rounding (tested against ``FP8Linear`` under the
interpreter). It runs anywhere (no FP8 tensor cores needed) at the speed of a float32 ``nn.Linear``.

Two levers that ``FP8Linear`` does not have are emulated for measurement only:

- ``activation_scale``: a static (calibrated) per-tensor activation scale, as ``quantize_fp8(..., scale=...)`` uses it
  (a group that would overflow it is raised to the dynamic scale, as the kernels do);
- ``smooth``: SmoothQuant-style migration, one factor per input feature: the activation is divided by it and the
  weight's columns multiplied by it before quantization (a deployment folds the division into the previous layer).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.validation import check_choice

from .linear import ACTIVATION_GRANULARITIES, WEIGHT_GRANULARITIES, FP8Linear
from .quantize import ACTIVATION_BLOCK, WEIGHT_BLOCK, expand_scale
from .recipes import FP8Recipe, resolve_recipe, select_linears
from .reference import quantize_fp8_reference


def fake_quantize(t: torch.Tensor, granularity: str, *, role: str = "activation",
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize(quantize_fp8(t))`` in float32, with torch's cast: the values an FP8 GEMM multiplies.

    ``t`` is 2-D ``[M, K]`` for activations (``row``: per row, ``block``: 1x128) and ``[K, N]`` for weights
    (``channel``: per column, ``block``: 128x128, ``group``: per column and 128 rows); ``tensor`` takes any shape.
    ``scale``: a given scale.
    """
    block = None
    if granularity == "block":
        block = ACTIVATION_BLOCK if role == "activation" else WEIGHT_BLOCK
    q, s = quantize_fp8_reference(t, "e4m3", granularity, scale=scale, block_size=block, role=role)
    return q.float() * expand_scale(s, tuple(t.shape))


class EmulatedFP8Linear(nn.Module):
    """``FP8Linear``'s arithmetic in plain PyTorch (see the module's docstring); same arguments as
    :meth:`FP8Linear.from_linear`, plus the emulation-only ``activation_scale`` and ``smooth``."""

    def __init__(self, linear: nn.Linear, *, weight_granularity: str = "channel", activation_granularity: str = "row",
                 activation_scale: float | torch.Tensor | None = None, smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise InvalidArgumentError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        check_choice(weight_granularity, "weight_granularity", WEIGHT_GRANULARITIES)
        check_choice(activation_granularity, "activation_granularity", ACTIVATION_GRANULARITIES)
        if activation_scale is not None and activation_granularity != "tensor":
            raise InvalidArgumentError("activation_scale: a static scale is per tensor (activation_granularity "
                                       f"'tensor'), got activation_granularity {activation_granularity!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_granularity, self.activation_granularity = weight_granularity, activation_granularity
        w = linear.weight.detach().float()
        if smooth is not None:
            smooth = smooth.detach().float().to(w.device).reshape(-1)
            if smooth.numel() != self.in_features or not bool((smooth > 0).all()):
                raise InvalidArgumentError(f"smooth: expected {self.in_features} positive factors")
            w = w * smooth
        self.register_buffer("smooth", smooth)
        # [out, in] float32: the dequantized E4M3 weight the GEMM multiplies by
        self.register_buffer("weight", fake_quantize(w.t(), weight_granularity, role="weight").t().contiguous())
        self.register_buffer("activation_scale", None if activation_scale is None else
                             torch.as_tensor(activation_scale, dtype=torch.float32, device=w.device).reshape(1))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_fp8_linear(cls, mod: FP8Linear) -> EmulatedFP8Linear:
        """The emulation of an existing ``FP8Linear`` (its quantized weight, bit for bit)."""
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight_granularity, new.activation_granularity = mod.weight_granularity, mod.activation_granularity
        new.register_buffer("smooth", None)
        new.register_buffer("weight", mod.dequantized_weight(torch.float32).contiguous())
        new.register_buffer("activation_scale", None)
        new.bias = None if mod.bias is None else nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if self.smooth is not None:
            x2 = x2 / self.smooth
        xq = fake_quantize(x2, self.activation_granularity, scale=self.activation_scale)
        out = xq @ self.weight.t()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight_granularity={self.weight_granularity!r}, "
                f"activation_granularity={self.activation_granularity!r}, "
                f"static_scale={self.activation_scale is not None}, smooth={self.smooth is not None}, emulated")


class EmulatedLinear(nn.Module):
    """An ``nn.Linear`` of a bf16/fp16 model, computed as a GPU GEMM of that dtype computes it: float32 products
    and sums of the operands, one rounding to the dtype at the end (CPUs without native bf16 matmul are several
    times slower on the real thing). The high-precision layers of an emulated recipe use it."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise InvalidArgumentError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().float())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.float(), self.weight, self.bias).to(x.dtype)


def convert_to_emulated_fp8(model: nn.Module, *, recipe: str | FP8Recipe | None = None,
                            weight_granularity: str | None = None, activation_granularity: str | None = None,
                            filter_fn: Callable[[str, nn.Linear], bool] | None = None,
                            emulate_rest: bool = False) -> nn.Module:
    """``convert_to_fp8``'s choice of layers and scales, with :class:`EmulatedFP8Linear` in place of ``FP8Linear``
    (in place; returns ``model``). ``emulate_rest=True`` also turns every other ``nn.Linear`` into an
    :class:`EmulatedLinear` (fast bf16 GEMMs on a CPU). Runs anywhere: for measuring a recipe's accuracy."""
    r = resolve_recipe(recipe, weight_granularity, activation_granularity)
    targets = set(select_linears(model, r, filter_fn))
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is not nn.Linear:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if full in targets:
                setattr(mod, child_name, EmulatedFP8Linear(child, weight_granularity=r.weight_granularity,
                                                           activation_granularity=r.activation_granularity))
            elif emulate_rest:
                setattr(mod, child_name, EmulatedLinear(child))
    return model


__all__ = ["EmulatedFP8Linear", "EmulatedLinear", "convert_to_emulated_fp8", "fake_quantize"]
