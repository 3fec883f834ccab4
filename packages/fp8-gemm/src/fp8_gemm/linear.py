"""``FP8Linear``: an ``nn.Linear`` whose weight lives in E4M3, with activations quantized on every call.

The weight keeps ``nn.Linear``'s ``[out_features, in_features]`` layout (``[N, K]``, row-major) and is handed to
the GEMM as ``weight.t()``: a column-major ``[K, N]`` operand, the layout cuBLAS and our GEMM read along K.
Its scale is in the GEMM's ``[K, N]`` convention: ``[1]`` (tensor), ``[1, N]`` (channel: one per output
feature, i.e. per row of the ``[out, in]`` weight) or ``[ceil(K/128), ceil(N/128)]`` (128x128 blocks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from triton_ops_core.device import supports_fp8
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.launch import PlanCache, call_key
from triton_ops_core.validation import FLOAT_DTYPES, check_choice, check_dtype, check_kernel_device, check_tensor

from .quantize import WEIGHT_BLOCK, _activation_plan, quantize_fp8, scale_shape

WEIGHT_GRANULARITIES = ("tensor", "channel", "block")
ACTIVATION_GRANULARITIES = ("tensor", "row", "block")
# Call plans of FP8Linear.forward, keyed by the input's and the module's buffers' metadata (weights loaded later
# with the same layout reuse them; the plans hold no tensors).
_PLANS = PlanCache()


def _require_fp8(device: torch.device, what: str) -> None:
    if not supports_fp8(device):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        raise UnsupportedDtypeError(
            f"{what}: FP8Linear needs FP8 tensor cores (compute capability 8.9 or higher), got {name}"
        )


def _check_positive_int(value: object, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgumentError(f"{name}: expected a positive integer, got {value!r}")


class FP8Linear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` stored in E4M3 and ``x`` quantized per call; output in ``x``'s dtype.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        weight_granularity: ``"channel"`` (default: one scale per output feature), ``"tensor"`` or ``"block"``
            (128x128).
        activation_granularity: ``"row"`` (default: one scale per token), ``"tensor"`` or ``"block"`` (1x128).
        fast_accum: the GEMM's fast accumulation (see ``fp8_gemm``); faithful fp32 accumulation by default.
        device, dtype: of the bias (and of the zero weight a fresh module starts with); ``dtype`` fp16/bf16/fp32.

    Buffers ``weight`` (``float8_e4m3fn`` ``[out, in]``) and ``weight_scale`` travel with ``state_dict``.
    Build one from a trained layer with :meth:`from_linear`, or set a weight with :meth:`load_weight`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_granularity: str = "channel",
        activation_granularity: str = "row",
        fast_accum: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_positive_int(in_features, "in_features")
        _check_positive_int(out_features, "out_features")
        check_choice(weight_granularity, "weight_granularity", WEIGHT_GRANULARITIES)
        check_choice(activation_granularity, "activation_granularity", ACTIVATION_GRANULARITIES)
        dtype = dtype or torch.get_default_dtype()
        if dtype not in FLOAT_DTYPES:
            raise UnsupportedDtypeError(f"dtype: expected float16, bfloat16 or float32, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight_granularity = weight_granularity
        self.activation_granularity = activation_granularity
        self.fast_accum = bool(fast_accum)
        s_shape = scale_shape((in_features, out_features), weight_granularity, WEIGHT_BLOCK, role="weight")
        self.register_buffer(
            "weight", torch.zeros((out_features, in_features), dtype=torch.float8_e4m3fn, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(s_shape, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, weight_granularity: str = "channel",
                    activation_granularity: str = "row", fast_accum: bool = False) -> FP8Linear:
        """Quantize a trained ``nn.Linear`` once (its weight's device must run the kernels)."""
        if not isinstance(linear, nn.Linear):
            raise InvalidArgumentError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        bias = linear.bias
        mod = cls(linear.in_features, linear.out_features, bias is not None,
                  weight_granularity=weight_granularity, activation_granularity=activation_granularity,
                  fast_accum=fast_accum, device=w.device,
                  dtype=bias.dtype if bias is not None else (w.dtype if w.dtype in FLOAT_DTYPES else None))
        mod.load_weight(w)
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize a high-precision ``[out_features, in_features]`` weight into this module's buffers."""
        check_tensor(weight, "weight")
        check_dtype(weight, "weight", FLOAT_DTYPES)
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ShapeMismatchError(
                f"weight: expected shape [{self.out_features}, {self.in_features}] (out_features, in_features), "
                f"got {list(weight.shape)}"
            )
        _require_fp8(weight.device, "weight")
        # weight.t() is the [K, N] operand in column-major layout; the quantized result keeps that layout, so
        # its transpose is a contiguous [N, K] FP8 tensor.
        block = WEIGHT_BLOCK if self.weight_granularity == "block" else None
        q, s = quantize_fp8(weight.t(), "e4m3", self.weight_granularity, block_size=block, role="weight")
        self.weight = q.t().contiguous()
        self.weight_scale = s.contiguous()

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the GEMM multiplies by, ``[out, in]``, in ``dtype``."""
        from .quantize import expand_scale

        w_kn = self.weight.t().float() * expand_scale(self.weight_scale, (self.in_features, self.out_features))
        return w_kn.t().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Buffers straight from their dicts: nn.Module's attribute lookup costs on a path this short.
        buffers = self._buffers
        weight, weight_scale, bias = buffers["weight"], buffers["weight_scale"], self._parameters["bias"]
        try:
            key = call_key(x, weight, weight_scale, bias, self.activation_granularity, self.fast_accum,
                           self.in_features, self.out_features)
        except (AttributeError, RuntimeError, TypeError):  # x not a tensor: validation says so
            key = None
        plan = _PLANS.get(key) if key is not None else None
        if plan is None:
            plan = self._plan(x, key)
        quant, gemm, flat = plan
        if flat:  # x is already the row-major [M, K] activation
            x2 = x
        else:
            x2 = x.reshape(-1, self.in_features)
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
        if quant is None:  # a few tokens: quantized per row inside the GEMM, one launch
            out = gemm.run(x2, weight.t(), None, weight_scale, bias)
        else:
            a_q, a_s, _ = quant.run(x2, None)
            # The bias keeps its own dtype: the GEMM adds it in fp32 before the one output rounding.
            out = gemm.run(a_q, weight.t(), a_s, weight_scale, bias)
        return out if flat else out.reshape(*x.shape[:-1], self.out_features)

    def _plan(self, x: torch.Tensor, key: tuple | None) -> tuple:
        """Validate a call signature once: the activation's quantization plan and the GEMM's call plan."""
        from .gemm import _new_call

        check_tensor(x, "x")
        check_dtype(x, "x", FLOAT_DTYPES)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ShapeMismatchError(
                f"x: expected last dimension {self.in_features} (in_features), got shape {list(x.shape)}"
            )
        check_kernel_device(x, "x")
        _require_fp8(x.device, "x")
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        quant, gemm = None, None
        if self.activation_granularity == "row":
            # fp8_gemm quantizes a small activation per row inside its decode kernel (same result, one launch)
            call = _new_call(x2, self.weight.t(), None, self.weight_scale, x.dtype, self.bias, self.fast_accum, None)
            gemm = call if call.fused else None
        if gemm is None:
            quant = _activation_plan(x2, self.activation_granularity)
            # the GEMM's plan depends on the quantized activation's metadata only (fresh tensors: a fixed layout)
            a_q = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x.device)
            a_s = torch.empty(quant.scale_shape, dtype=torch.float32, device=x.device)
            gemm = _new_call(a_q, self.weight.t(), a_s, self.weight_scale, x.dtype, self.bias, self.fast_accum,
                             None)
        plan = (quant, gemm, x.dim() == 2 and x.stride(-1) == 1)
        if key is not None:
            _PLANS.put(key, plan)
        return plan

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight_granularity={self.weight_granularity!r}, "
                f"activation_granularity={self.activation_granularity!r}, fast_accum={self.fast_accum}")


def convert_to_fp8(
    model: nn.Module,
    *,
    weight_granularity: str = "channel",
    activation_granularity: str = "row",
    fast_accum: bool = False,
    filter_fn: Callable[[str, nn.Linear], bool] | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (in place) by :meth:`FP8Linear.from_linear`; returns ``model``.

    ``filter_fn(qualified_name, linear)`` returning False keeps that layer in high precision. A bare
    ``nn.Linear`` passed as ``model`` is returned converted.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model: expected an nn.Module, got {type(model).__name__}")
    kwargs = {"weight_granularity": weight_granularity, "activation_granularity": activation_granularity,
              "fast_accum": fast_accum}
    if type(model) is nn.Linear:
        return FP8Linear.from_linear(model, **kwargs) if filter_fn is None or filter_fn("", model) else model
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if filter_fn is not None and not filter_fn(full, child):
                continue
            setattr(module, child_name, FP8Linear.from_linear(child, **kwargs))
    return model


__all__ = ["ACTIVATION_GRANULARITIES", "WEIGHT_GRANULARITIES", "FP8Linear", "convert_to_fp8"]
