"""Packed projections for :func:`triton_ops.patch_model`'s attention layers: q, k and v as one GEMM.

A decode step's k and v projections are small GEMMs whose cost is their launch; packing the three weights into one
``[q + 2 * kv, hidden]`` matrix makes them one GEMM (one FP8 GEMM, and one activation quantization, with FP8), whose
output q / k / v are then strided views, which the RoPE kernels rotate in place.

- :class:`PackedQKVLinear`: the packed ``nn.Linear``, built from the three projections (``from_linear``). With
  ``share=True`` the projections' own weights (and biases) become views of the packed parameter: no second copy,
  and the model's ``state_dict`` keeps its keys (``q_proj.weight`` ...), loading into them writes the packed
  weight.
- :func:`pack_fp8`: the FP8 counterpart: the packed linear quantized once as one ``FP8Linear``, and three
  ``FP8Linear`` that are views of its buffers (rows and scales) to stand where the projections were.
- :class:`QKVPacking`: what ``patch_model`` attaches to an attention module: the packed layer, the sizes of the
  split, and the weights the projections held when it was made, to tell whether it still describes them (not after
  the model is moved or cast with ``.to()``, deep-copied, its weights reassigned by
  ``load_state_dict(assign=True)``, sharded by tensor parallelism, or hooked). A packing that no longer holds is
  rebuilt (``nn.Linear`` projections, in eager mode) or dropped: the attention then runs the three projections as
  they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fp8_gemm import WEIGHT_BLOCK, FP8Linear
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError

# The attribute of an attention module holding its QKVPacking (in its __dict__: not a submodule, so it adds no
# state_dict keys and no parameters, and the attention's lookup of it is a plain dict read).
PACKING_ATTR = "_triton_ops_qkv"
# FP8Linear's block scales are [ceil(K / bk), ceil(N / bn)] over the GEMM's [K, N] weight (WEIGHT_BLOCK = (bk, bn)):
# a block spans ROW_BLOCK output features, i.e. rows of the [out, in] weight.
ROW_BLOCK = WEIGHT_BLOCK[1]


def _plain(t: torch.Tensor | None) -> bool:
    """A tensor stored as itself: a plain tensor or parameter (not a DTensor or another tensor subclass)."""
    return t is None or (type(t) in (torch.Tensor, nn.Parameter) and type(t.data) is torch.Tensor)


def packable(q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module) -> str | None:
    """None when the three projections can be packed into one ``nn.Linear``; else why not (for the summary)."""
    lins = (q_proj, k_proj, v_proj)
    if not all(type(m) is nn.Linear for m in lins):
        return "q/k/v projections are not all nn.Linear"
    if any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) or hasattr(m, "_hf_hook")
           for m in lins):
        return "a q/k/v projection has forward hooks or a replaced forward (one GEMM would bypass them)"
    if not all(_plain(m.weight) and _plain(m.bias) for m in lins):
        return "q/k/v weights are not plain tensors (sharded or wrapped)"
    if len({m.in_features for m in lins}) != 1 or k_proj.out_features != v_proj.out_features:
        return "q/k/v projections differ in input size, or k and v in output size"
    if len({m.bias is None for m in lins}) != 1:
        return "some q/k/v projections have a bias and some do not"
    tensors = [t for m in lins for t in (m.weight, m.bias) if t is not None]
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        return "q/k/v weights differ in dtype or device"
    return None


class PackedQKVLinear(nn.Linear):
    """``[q | k | v] = x @ W^T + b`` with ``W = [Wq; Wk; Wv]`` (``[q_features + 2 * kv_features, in_features]``):
    the three projections of an attention as one GEMM.

    Args:
        in_features: the hidden size.
        q_features: the q projection's outputs (heads times head_dim); kv_features: k's (and v's).
        bias, device, dtype: as ``nn.Linear``.

    ``forward`` is ``nn.Linear``'s (one GEMM, output ``[..., q_features + 2 * kv_features]``); :meth:`split` views
    the output as ``(q, k, v)``. Build one from a model's projections with :meth:`from_linear`.
    """

    def __init__(self, in_features: int, q_features: int, kv_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        for name, value in (("in_features", in_features), ("q_features", q_features),
                            ("kv_features", kv_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name}: expected a positive integer, got {value!r}")
        super().__init__(in_features, q_features + 2 * kv_features, bias, device=device, dtype=dtype)
        self.q_features = q_features
        self.kv_features = kv_features

    @property
    def sizes(self) -> tuple[int, int, int]:
        """The split of the output: ``(q_features, kv_features, kv_features)``."""
        return self.q_features, self.kv_features, self.kv_features

    @classmethod
    def from_linear(cls, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, *,
                    share: bool = False) -> PackedQKVLinear:
        """Pack three ``nn.Linear`` projections (same input size and dtype, k and v of one output size, all with a
        bias or none).

        ``share=False``: the packed weight is a copy. ``share=True``: afterwards each projection's ``weight`` (and
        ``bias``) is a new ``nn.Parameter`` viewing its rows of the packed one (their ``requires_grad`` kept), so the
        model holds one copy of the weights, its ``state_dict`` keeps its keys and values, and
        ``load_state_dict`` into the projections writes the packed weight.

        Raises:
            InvalidArgumentError: the projections cannot be packed (the message says why).
        """
        why = packable(q_proj, k_proj, v_proj)
        if why is not None:
            raise InvalidArgumentError(f"q_proj, k_proj, v_proj: expected three packable nn.Linear, but {why}")
        w = q_proj.weight
        packed = cls(q_proj.in_features, q_proj.out_features, k_proj.out_features, q_proj.bias is not None,
                     device="meta", dtype=w.dtype)
        with torch.no_grad():
            packed.weight = nn.Parameter(torch.cat([q_proj.weight, k_proj.weight, v_proj.weight]),
                                         requires_grad=w.requires_grad)
            if q_proj.bias is not None:
                packed.bias = nn.Parameter(torch.cat([q_proj.bias, k_proj.bias, v_proj.bias]),
                                           requires_grad=q_proj.bias.requires_grad)
        if share:
            packed.share_with(q_proj, k_proj, v_proj)
        return packed

    def share_with(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear) -> None:
        """Make the projections' weights and biases views of this layer's (one copy of the weights)."""
        for lin, rows, name in zip((q_proj, k_proj, v_proj), self._row_ranges(), ("q_proj", "k_proj", "v_proj")):
            if lin.weight.shape != (rows[1] - rows[0], self.in_features):
                raise ShapeMismatchError(
                    f"{name}: expected a weight of shape [{rows[1] - rows[0]}, {self.in_features}], got "
                    f"{list(lin.weight.shape)}")
            lin.weight = nn.Parameter(self.weight.data[rows[0]:rows[1]], requires_grad=lin.weight.requires_grad)
            if self.bias is not None:
                lin.bias = nn.Parameter(self.bias.data[rows[0]:rows[1]], requires_grad=lin.bias.requires_grad)

    def _row_ranges(self) -> list[tuple[int, int]]:
        q, kv = self.q_features, self.kv_features
        return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, k, v)``: views of the packed output's last dimension (no copy)."""
        return out.split(self.sizes, dim=-1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, q_features={self.q_features}, kv_features={self.kv_features}, "
                f"bias={self.bias is not None}")


def fp8_packable(q_features: int, kv_features: int, weight_granularity: str) -> str | None:
    """None when an FP8 packed weight's scales split exactly at the q / k / v boundaries; else why not.

    Per-tensor and per-channel scales always do; 128x128 block scales only when q's and k's rows are multiples of
    the block (otherwise one block, and its scale, would hold rows of two projections).
    """
    if weight_granularity == "block" and (q_features % ROW_BLOCK or kv_features % ROW_BLOCK):
        return (f"FP8 weight blocks of {ROW_BLOCK} rows would straddle the q/k/v boundaries "
                f"(q {q_features}, k/v {kv_features} rows)")
    return None


def _fp8_rows(packed: FP8Linear, start: int, end: int) -> FP8Linear:
    """An ``FP8Linear`` whose buffers (weight rows, their scales, bias) are views of ``packed``'s."""
    bias = packed.bias
    view = FP8Linear(packed.in_features, end - start, bias is not None,
                     weight_granularity=packed.weight_granularity,
                     activation_granularity=packed.activation_granularity, fast_accum=packed.fast_accum,
                     device="meta", dtype=bias.dtype if bias is not None else None)
    for key, value in vars(packed).items():  # plain options set on the instance (e.g. a forced GEMM path)
        if not key.startswith("_") and key not in ("in_features", "out_features", "training"):
            setattr(view, key, value)
    view.weight = packed.weight[start:end]
    scale = packed.weight_scale
    if packed.weight_granularity == "channel":  # [1, N]: one scale per output row
        scale = scale[:, start:end]
    elif packed.weight_granularity == "block":  # [K / 128, N / 128]: the rows' blocks (fp8_packable checked)
        scale = scale[:, start // ROW_BLOCK:end // ROW_BLOCK]
    view.weight_scale = scale  # "tensor": the one scale, shared
    if bias is not None:
        view.bias = nn.Parameter(bias.data[start:end], requires_grad=False)
    return view.train(packed.training)


def pack_fp8(q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, *, weight_granularity: str,
             activation_granularity: str, fast_accum: bool = False
             ) -> tuple[FP8Linear, tuple[FP8Linear, FP8Linear, FP8Linear]]:
    """The three projections quantized as one ``FP8Linear`` (``FP8Linear.from_linear`` of their packed
    ``nn.Linear``), and three ``FP8Linear`` viewing its rows to put in their place (one copy of the FP8 weights;
    their state_dict entries are the packed weight's rows and scales).

    Raises:
        InvalidArgumentError: the projections cannot be packed, or block scales would straddle their boundaries.
    """
    why = packable(q_proj, k_proj, v_proj) or fp8_packable(q_proj.out_features, k_proj.out_features,
                                                         weight_granularity)
    if why is not None:
        raise InvalidArgumentError(f"q_proj, k_proj, v_proj: expected projections packable in FP8, but {why}")
    packed = PackedQKVLinear.from_linear(q_proj, k_proj, v_proj)
    fp8 = FP8Linear.from_linear(packed, weight_granularity=weight_granularity,
                                activation_granularity=activation_granularity, fast_accum=fast_accum)
    del packed  # the high-precision copy: the caller drops the projections' own weights with the modules
    views = tuple(_fp8_rows(fp8, a, b) for a, b in ((0, q_proj.out_features),
                                                    (q_proj.out_features, q_proj.out_features + k_proj.out_features),
                                                    (q_proj.out_features + k_proj.out_features,
                                                     q_proj.out_features + 2 * k_proj.out_features)))
    return fp8, views  # type: ignore[return-value]


_QKV = ("q_proj", "k_proj", "v_proj")


class QKVPacking:
    """One attention's packed projection: ``linear`` (a :class:`PackedQKVLinear` or an ``FP8Linear``), the split
    ``sizes``, and the weight tensors its projections held when it was made.

    :meth:`valid` tells whether the packing still computes what the projections do: the same weight objects, still
    sharing the packed storage, and no hooks added since. The projections are read from the attention on each
    check (cheap dict reads: this runs once per layer and decode step), so one replaced or sharded after
    ``patch_model`` is noticed.
    """

    __slots__ = ("linear", "sizes", "fp8", "store", "weights", "packed_weight", "packed_bias")

    def __init__(self, linear: nn.Module, sizes: tuple[int, int, int], projections: tuple[nn.Module, ...]) -> None:
        self.linear = linear
        self.sizes = sizes
        self.fp8 = isinstance(linear, FP8Linear)
        # where a projection keeps its weight: an nn.Linear a parameter, an FP8Linear a buffer
        self.store = "_buffers" if self.fp8 else "_parameters"
        self.weights = tuple(getattr(p, self.store)["weight"] for p in projections)
        self.packed_weight = getattr(linear, self.store)["weight"]
        self.packed_bias = linear._parameters.get("bias")

    @classmethod
    def attach(cls, attn: nn.Module, linear: nn.Module, sizes: tuple[int, int, int]) -> QKVPacking:
        """Make the packing of ``attn`` (whose ``q_proj`` / ``k_proj`` / ``v_proj`` now view ``linear``'s weight)."""
        packing = cls(linear, sizes, tuple(attn._modules[name] for name in _QKV))
        attn.__dict__[PACKING_ATTR] = packing
        return packing

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, k, v)``: views of one GEMM's output ``[..., q + 2 * kv]``."""
        # straight to the GEMM: the packed layer is private to this packing (no hooks), and nn.Module's call and
        # attribute machinery cost microseconds per layer and decode step
        out = self.linear.forward(x) if self.fp8 else F.linear(x, self.packed_weight, self.packed_bias)
        return out.split(self.sizes, dim=-1)

    def valid(self, attn: nn.Module) -> bool:
        modules, store = attn._modules, self.store
        for name, weight in zip(_QKV, self.weights):
            module = modules.get(name)
            if (module is None or module._forward_hooks or module._forward_pre_hooks
                    or getattr(module, store).get("weight") is not weight):
                return False
        if torch.compiler.is_compiling():  # no data pointers of traced tensors; the identities above are guarded
            return True
        # A model moved or cast with .to() keeps its Parameter objects but gives each its own new storage (and
        # moves nothing outside the module tree, such as this packing); so does a deep copy.
        return self.weights[0].data_ptr() == self.packed_weight.data_ptr()


def packed_projections(attn: nn.Module) -> QKVPacking | None:
    """The attention's packing if it still holds (rebuilt once if the projections were moved or cast since, in
    eager mode; dropped if they can no longer be packed, e.g. sharded); None to run the three projections."""
    packing = attn.__dict__.get(PACKING_ATTR)
    if packing is None or packing.valid(attn):
        return packing
    if torch.compiler.is_compiling():  # no module changes while tracing: the projections, as they are
        return None
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    if packing.fp8 or packable(q, k, v) is not None:
        del attn.__dict__[PACKING_ATTR]
        return None
    linear = PackedQKVLinear.from_linear(q, k, v, share=True)
    return QKVPacking.attach(attn, linear, linear.sizes)


__all__ = ["PACKING_ATTR", "PackedQKVLinear", "QKVPacking", "fp8_packable", "pack_fp8", "packable",
           "packed_projections"]
