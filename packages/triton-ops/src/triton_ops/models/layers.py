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
  :func:`pack_fp8_linears` packs projections that are ``FP8Linear`` already (a pre-quantized checkpoint's) the
  same way, by concatenating their E4M3 rows and scales.
- :class:`QKVPacking`: what ``patch_model`` attaches to an attention module: the packed layer, the sizes of the
  split, and the weights the projections held when it was made, to tell whether it still describes them (not after
  the model is moved or cast with ``.to()``, deep-copied, its weights reassigned by
  ``load_state_dict(assign=True)``, or hooked). A packing that no longer holds is rebuilt (``nn.Linear``
  projections, and FP8 column-parallel shards, in eager mode) or dropped: the attention then runs the three
  projections as they are.
- Tensor parallelism (:mod:`triton_ops.parallel`): projections sharded column-wise by its ``ColwiseParallel`` (whole
  heads per rank, their weights ``DTensor`` s) pack per rank: :func:`pack_shards` concatenates the rank's local
  q / k / v rows (and per-channel or 128x128 block scales) into one local ``PackedQKVLinear`` or ``FP8Linear``
  ``[q_local + 2 * kv_local, hidden]``, and re-points each projection's ``DTensor`` at its rows of it (one copy of
  the weights; ``state_dict`` and ``full_tensor()`` still give the global tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fp8_gemm import WEIGHT_BLOCK, FP8Linear, decode_linear, decode_linear_add_, fp8_gemm
from fp8_gemm.weight_only import use_weight_only
from fused_rmsnorm_rope import rmsnorm
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError

from .. import layers as _layers
from ..layers import RMSNorm, runs_forward

# The attribute of an attention module holding its QKVPacking (in its __dict__: not a submodule, so it adds no
# state_dict keys and no parameters, and the attention's lookup of it is a plain dict read).
PACKING_ATTR = "_triton_ops_qkv"
# FP8Linear's block scales are [ceil(K / bk), ceil(N / bn)] over the GEMM's [K, N] weight (WEIGHT_BLOCK = (bk, bn)):
# a block spans ROW_BLOCK output features, i.e. rows of the [out, in] weight.
ROW_BLOCK = WEIGHT_BLOCK[1]
# The attribute triton_ops.parallel's styles set on a module they sharded (the style itself, in its __dict__).
TP_ATTR = "_triton_ops_tp"
# Beside it, the module's LocalShards (triton_ops.parallel): its sharded tensors, swapped for their local shards by
# the style's hooks, and what a decoder layer needs to run the module's row-parallel tail itself (the residual add
# inside a row-parallel down projection).
LOCAL_SHARDS_ATTR = "_triton_ops_local_shards"


def _plain(t: torch.Tensor | None) -> bool:
    """A tensor stored as itself: a plain tensor or parameter (not a DTensor or another tensor subclass)."""
    return t is None or (type(t) in (torch.Tensor, nn.Parameter) and type(t.data) is torch.Tensor)


def _sharded(module: nn.Module) -> bool:
    """Whether a :mod:`triton_ops.parallel` style sharded this module (it marks the modules it hooks)."""
    return TP_ATTR in module.__dict__


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    if name in module._parameters:
        return module._parameters[name]
    return module._buffers.get(name)


def _shards_problem(lins: tuple[nn.Module, ...], names: tuple[str, ...]) -> str | None:
    """None when the three projections are column-parallel shards whose local tensors one local GEMM can compute
    (what ``triton_ops.parallel.ColwiseParallel`` makes with its default layouts); else why not.

    The packed GEMM reads the attention's (replicated) input and returns the rank's columns, which is what each
    sharded projection's hooks do with ``input_layouts=Replicate()``, ``output_layouts=Shard(-1)`` and
    ``use_local_output=True``; other layouts, or hooks besides the style's, would be bypassed.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from ..parallel import ColwiseParallel  # parallel imports this module: imported when a module is sharded

    styles = [m.__dict__.get(TP_ATTR) for m in lins]
    if not all(isinstance(s, ColwiseParallel) for s in styles):
        return "q/k/v projections are not all column-parallel (triton_ops.parallel.ColwiseParallel)"
    if any(s.input_layouts != Replicate() or s.output_layouts != Shard(-1) or not s.use_local_output
           for s in styles):
        return ("a column-parallel q/k/v projection takes a sharded input or returns a gathered or DTensor output "
                "(one local GEMM returns the rank's columns of the replicated input)")
    if any(len(m._forward_hooks) != 1 or len(m._forward_pre_hooks) != 1 or "forward" in vars(m)
           or hasattr(m, "_hf_hook") for m in lins):
        return ("a q/k/v projection has forward hooks besides its tensor-parallel style's, or a replaced forward "
                "(one GEMM would bypass them)")
    mesh = None
    for m in lins:
        for name in names:
            t = _tensor(m, name)
            if t is None:
                continue
            if not isinstance(t, DTensor) or type(t._local_tensor) is not torch.Tensor:
                return "q/k/v weights are not DTensors over plain local tensors"
            if t.device_mesh.ndim != 1 or (mesh is not None and t.device_mesh != mesh):
                return "q/k/v weights are not on one 1-D device mesh"
            mesh = t.device_mesh
            if name in ("weight", "bias") and t.placements != (Shard(0),):
                return f"q/k/v {name}s are not sharded by rows (Shard(0)), got {t.placements}"
    return None


def _alias(t: torch.Tensor) -> torch.Tensor:
    """``t``'s memory as a tensor of its own (storage offset 0; no copy; it keeps ``t``'s storage alive).

    A ``DTensor`` mirrors its local tensor's storage offset, and torch (2.13) can neither ``torch.save`` nor
    deep-copy a ``DTensor`` whose local tensor starts inside its storage (k's and v's rows of a packed weight):
    through DLPack the rows become a tensor of their own that reads and writes the packed weight's memory.
    """
    return torch.from_dlpack(t.detach())


def _repoint(module: nn.Module, name: str, local: torch.Tensor) -> None:
    """Make ``module``'s DTensor ``name`` (a parameter or buffer) hold ``local``'s memory as its local tensor: the
    same mesh, placements, global shape and stride, a new ``DTensor`` (a parameter stays a parameter)."""
    from torch.distributed.tensor import DTensor

    old = _tensor(module, name)
    with torch.no_grad():
        new = DTensor.from_local(_alias(local), old.device_mesh, old.placements, run_check=False, shape=old.shape,
                                 stride=old.stride())
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = new


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    return t._local_tensor if t is not None and not _plain(t) else t


def packable(q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module) -> str | None:
    """None when the three projections can be packed into one ``nn.Linear``; else why not (for the summary).

    Plain ``nn.Linear`` with plain weights and no hooks pack; so do projections sharded column-wise by
    ``triton_ops.parallel.ColwiseParallel`` (default layouts, no other hooks): their rank-local rows pack.
    """
    lins = (q_proj, k_proj, v_proj)
    if not all(type(m) is nn.Linear for m in lins):
        return "q/k/v projections are not all nn.Linear"
    if any(_sharded(m) for m in lins):
        why = _shards_problem(lins, ("weight", "bias"))
        if why is not None:
            return why
    elif any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) or hasattr(m, "_hf_hook")
             for m in lins):
        return "a q/k/v projection has forward hooks or a replaced forward (one GEMM would bypass them)"
    elif not all(_plain(m.weight) and _plain(m.bias) for m in lins):
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

        Projections sharded column-wise by ``triton_ops.parallel.ColwiseParallel`` (``DTensor`` weights): the
        packed layer is this rank's, ``[q_local + 2 * kv_local, in_features]`` from the local rows, and with
        ``share=True`` each projection's ``DTensor`` gets its rows of it as its local tensor (see
        :meth:`share_with`).

        Raises:
            InvalidArgumentError: the projections cannot be packed (the message says why).
        """
        why = packable(q_proj, k_proj, v_proj)
        if why is not None:
            raise InvalidArgumentError(f"q_proj, k_proj, v_proj: expected three packable nn.Linear, but {why}")
        weights = [_local(m.weight) for m in (q_proj, k_proj, v_proj)]
        w = weights[0]
        packed = cls(q_proj.in_features, w.shape[0], weights[1].shape[0], q_proj.bias is not None,
                     device="meta", dtype=w.dtype)
        with torch.no_grad():
            packed.weight = nn.Parameter(torch.cat(weights), requires_grad=q_proj.weight.requires_grad)
            if q_proj.bias is not None:
                packed.bias = nn.Parameter(torch.cat([_local(m.bias) for m in (q_proj, k_proj, v_proj)]),
                                           requires_grad=q_proj.bias.requires_grad)
        if share:
            packed.share_with(q_proj, k_proj, v_proj)
        return packed

    def share_with(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear) -> None:
        """Make the projections' weights and biases views of this layer's (one copy of the weights).

        A projection whose weight is a ``DTensor`` (a rank's shard) keeps a ``DTensor`` parameter (same mesh,
        placements and global shape, so ``state_dict`` and ``full_tensor()`` give the global tensor) whose local
        tensor holds its rows of this layer's weight: the same memory, as a tensor of its own (see ``_alias``).
        """
        for lin, rows, name in zip((q_proj, k_proj, v_proj), self._row_ranges(), ("q_proj", "k_proj", "v_proj")):
            if _local(lin.weight).shape != (rows[1] - rows[0], self.in_features):
                raise ShapeMismatchError(
                    f"{name}: expected a (local) weight of shape [{rows[1] - rows[0]}, {self.in_features}], got "
                    f"{list(_local(lin.weight).shape)}")
            for attr, packed in (("weight", self.weight), ("bias", self.bias)):
                if packed is None:
                    continue
                old = lin._parameters[attr]
                if _plain(old):
                    setattr(lin, attr, nn.Parameter(packed.data[rows[0]:rows[1]], requires_grad=old.requires_grad))
                else:
                    _repoint(lin, attr, packed.data[rows[0]:rows[1]])

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

    Per-tensor, per-channel and group scales always do; 128x128 block scales only when q's and k's rows are multiples of
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
    if packed.weight_granularity in ("channel", "group"):  # [1, N] / [K / 128, N]: scales per output row
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
    if any(_sharded(m) for m in (q_proj, k_proj, v_proj)):
        why = ("they are sharded by tensor parallelism (quantize the full weights: patch_model(fp8=True) before "
               "parallelize_model)")
    else:
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


def _fp8_mismatch(lins: tuple[FP8Linear, ...]) -> str | None:
    """None when three ``FP8Linear`` q / k / v projections agree in what one packed layer needs (options, input size,
    k's and v's outputs, biases, dtypes and devices); else why not."""
    q, k, v = lins
    if len({(m.weight_granularity, m.activation_granularity, m.fast_accum, m.path, m.in_features)
            for m in lins}) != 1 or k.out_features != v.out_features:
        return ("q/k/v FP8Linear differ in scales, options (fast_accum, path) or input size, or k and v in output "
                "size")
    if len({m.bias is None for m in lins}) != 1:
        return "some q/k/v projections have a bias and some do not"
    tensors = [t for m in lins for t in (m.weight, m.weight_scale, m.bias) if t is not None]
    if (len({m.weight.dtype for m in lins}) != 1 or len({m.bias.dtype for m in lins if m.bias is not None}) > 1
            or len({t.device for t in tensors}) != 1):
        return "q/k/v weights differ in dtype or device"
    return None


def _packed_fp8_linear(q_proj: FP8Linear, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       weight_granularity: str) -> FP8Linear:
    """The ``FP8Linear`` of q/k/v's concatenated rows: ``q_proj``'s options (and the plain ones set on the instance,
    e.g. a forced GEMM path), the given buffers, ``q_proj``'s training mode."""
    packed = FP8Linear(q_proj.in_features, weight.shape[0], bias is not None, weight_granularity=weight_granularity,
                       activation_granularity=q_proj.activation_granularity, fast_accum=q_proj.fast_accum,
                       device="meta", dtype=bias.dtype if bias is not None else None)
    for key, value in vars(q_proj).items():  # plain options set on the instance (e.g. a forced GEMM path)
        if not key.startswith("_") and key not in ("in_features", "out_features", "training", "weight_granularity"):
            setattr(packed, key, value)
    packed.weight, packed.weight_scale = weight, scale
    if bias is not None:
        packed.bias = nn.Parameter(bias, requires_grad=False)
    return packed.train(q_proj.training)


def fp8_linears_packable(q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module) -> str | None:
    """None when three ``FP8Linear`` projections (a pre-quantized checkpoint's, adopted, or ``convert_to_fp8``'s)
    pack into one by concatenation (:func:`pack_fp8_linears`); else why not (for the summary)."""
    lins = (q_proj, k_proj, v_proj)
    if not all(type(m) is FP8Linear for m in lins):
        return "q/k/v projections are not all nn.Linear, or not all FP8Linear"
    if any(_sharded(m) for m in lins):
        return "they are sharded by tensor parallelism (parallelize_model packs them per rank)"
    if any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in lins):
        return "a q/k/v projection has forward hooks or a replaced forward (one GEMM would bypass them)"
    if not all(_plain(t) for m in lins for t in (m.weight, m.weight_scale, m.bias)):
        return "q/k/v weights are not plain tensors (sharded or wrapped)"
    return _fp8_mismatch(lins) or fp8_packable(q_proj.out_features, k_proj.out_features, q_proj.weight_granularity)


def pack_fp8_linears(q_proj: FP8Linear, k_proj: FP8Linear, v_proj: FP8Linear
                     ) -> tuple[FP8Linear, tuple[FP8Linear, FP8Linear, FP8Linear]]:
    """Three ``FP8Linear`` projections as one ``FP8Linear`` of their concatenated E4M3 rows and scales (per-tensor
    scales that differ become per-channel ones: the same factors, one per row), and three ``FP8Linear`` viewing its
    rows to put in their place (one copy of the FP8 weights, the projections' own dropped with them).

    Raises:
        InvalidArgumentError: the projections cannot be packed (:func:`fp8_linears_packable` says why).
    """
    why = fp8_linears_packable(q_proj, k_proj, v_proj)
    if why is not None:
        raise InvalidArgumentError(f"q_proj, k_proj, v_proj: expected FP8Linear projections to pack, but {why}")
    lins = (q_proj, k_proj, v_proj)
    gran = q_proj.weight_granularity
    with torch.no_grad():
        scales = [m.weight_scale for m in lins]
        if gran == "tensor" and not all(torch.equal(s, scales[0]) for s in scales[1:]):
            gran = "channel"
            scales = [s.reshape(1, 1).expand(1, m.out_features) for s, m in zip(scales, lins)]
        scale = scales[0].clone() if gran == "tensor" else torch.cat(scales, dim=1)
        # concatenated as bytes: a plain copy, whatever the FP8 dtype's operator coverage on the device
        weight = torch.cat([m.weight.view(torch.uint8) for m in lins]).view(q_proj.weight.dtype)
        bias = None if q_proj.bias is None else torch.cat([m.bias.detach() for m in lins])
    packed = _packed_fp8_linear(q_proj, weight, scale, bias, gran)
    q, k = q_proj.out_features, k_proj.out_features
    views = tuple(_fp8_rows(packed, a, b) for a, b in ((0, q), (q, q + k), (q + k, q + 2 * k)))
    return packed, views  # type: ignore[return-value]


def _fp8_shards_problem(lins: tuple[nn.Module, ...]) -> str | None:
    """None when three column-parallel ``FP8Linear`` shards pack into one local ``FP8Linear``; else why not."""
    from torch.distributed.tensor import Replicate, Shard

    if not all(type(m) is FP8Linear for m in lins):
        return "q/k/v projections are not all FP8Linear"
    why = _shards_problem(lins, ("weight", "bias", "weight_scale"))
    if why is not None:
        return why
    why = _fp8_mismatch(lins)
    if why is not None:
        return why
    q = lins[0]
    gran = q.weight_granularity
    want = Replicate() if gran == "tensor" else Shard(1)
    scales = [m.weight_scale for m in lins]
    if any(s.placements != (want,) for s in scales):
        return f"q/k/v {gran} weight scales are not placed {want} (as ColwiseParallel places them)"
    rows = [_local(m.weight).shape[0] for m in lins]
    if gran == "block":
        why = fp8_packable(rows[0], rows[1], gran)
        if why is not None:
            return f"{why} on this rank"
    if gran == "tensor" and not all(torch.equal(_local(s), _local(scales[0])) for s in scales[1:]):
        return "q/k/v per-tensor FP8 scales differ (one packed weight has one scale)"
    return None


def _pack_fp8_shards(q_proj: FP8Linear, k_proj: FP8Linear, v_proj: FP8Linear) -> tuple[FP8Linear, tuple[int, ...]]:
    """One local ``FP8Linear`` of the rank's q / k / v rows (weights, scales, biases concatenated), each
    projection's ``DTensor`` s re-pointed at their rows of it; and the local split."""
    lins = (q_proj, k_proj, v_proj)
    why = _fp8_shards_problem(lins)
    if why is not None:
        raise InvalidArgumentError(f"q_proj, k_proj, v_proj: expected column-parallel FP8Linear shards to pack, but "
                                   f"{why}")
    weights = [_local(m.weight) for m in lins]
    rows = tuple(w.shape[0] for w in weights)
    gran = q_proj.weight_granularity
    bias = q_proj.bias
    with torch.no_grad():
        # concatenated as bytes: a plain copy, whatever the FP8 dtype's operator coverage on the device
        weight = torch.cat([w.view(torch.uint8) for w in weights]).view(weights[0].dtype)
        scales = [_local(m.weight_scale) for m in lins]
        scale = scales[0].clone() if gran == "tensor" else torch.cat(scales, dim=1)
        if bias is not None:
            bias = torch.cat([_local(m.bias) for m in lins])
    packed = _packed_fp8_linear(q_proj, weight, scale, bias, gran)
    start = 0
    for m, n in zip(lins, rows):
        _repoint(m, "weight", weight[start:start + n])
        if gran in ("channel", "group"):  # [1, N] / [K / 128, N]: scales per row
            _repoint(m, "weight_scale", scale[:, start:start + n])
        elif gran == "block":  # [K / 128, N / 128]: the rows' blocks (whole blocks: checked above)
            _repoint(m, "weight_scale", scale[:, start // ROW_BLOCK:(start + n) // ROW_BLOCK])
        else:  # the one scale, shared
            _repoint(m, "weight_scale", scale)
        if bias is not None:
            _repoint(m, "bias", bias[start:start + n])
        start += n
    return packed, rows


def shards_packable(q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module) -> str | None:
    """None when the three projections are column-parallel shards (``triton_ops.parallel.ColwiseParallel``,
    default layouts) that :func:`pack_shards` packs per rank: ``nn.Linear``, or ``FP8Linear`` with per-tensor,
    per-channel or (whole 128-row blocks of each of q, k and v on this rank) block scales; else why not."""
    lins = (q_proj, k_proj, v_proj)
    if not all(_sharded(m) for m in lins):
        return "q/k/v projections are not all sharded by tensor parallelism"
    if all(type(m) is nn.Linear for m in lins):
        return packable(q_proj, k_proj, v_proj)
    return _fp8_shards_problem(lins)


def pack_shards(attn: nn.Module) -> QKVPacking:
    """Pack ``attn``'s column-parallel q / k / v shards into one GEMM on this rank, and attach it (replacing any
    packing it had): a :class:`PackedQKVLinear` (``nn.Linear`` projections) or an ``FP8Linear`` of the rank's
    ``[q_local + 2 * kv_local, hidden]`` rows; each projection's ``DTensor`` weight (bias, FP8 scale) keeps its
    mesh, placements and global shape, its local tensor now its rows of the packed one (one copy of the weights).

    Raises:
        InvalidArgumentError: the projections cannot be packed (:func:`shards_packable` says why).
    """
    q, k, v = (attn._modules.get(name) for name in _QKV)
    why = shards_packable(q, k, v)
    if why is not None:
        raise InvalidArgumentError(f"{type(attn).__name__}: expected column-parallel q/k/v shards to pack, but {why}")
    if type(q) is nn.Linear:
        linear = PackedQKVLinear.from_linear(q, k, v, share=True)
        return QKVPacking.attach(attn, linear, linear.sizes)
    linear, sizes = _pack_fp8_shards(q, k, v)
    return QKVPacking.attach(attn, linear, sizes)


_QKV = ("q_proj", "k_proj", "v_proj")


class QKVPacking(nn.Module):
    """One attention's packed projection: ``linear`` (a :class:`PackedQKVLinear` or an ``FP8Linear``), the split
    ``sizes``, and the weight tensors its projections held when it was made.

    :meth:`valid` tells whether the packing still computes what the projections do: the same weight objects, still
    sharing the packed storage, and no hooks added since. The projections are read from the attention on each
    check (cheap dict reads: this runs once per layer and decode step), so one replaced or sharded after
    ``patch_model`` is noticed.

    Under tensor parallelism (projections sharded column-wise, their weights ``DTensor`` s whose local tensors are
    the rank's rows of ``linear``'s weight: :func:`pack_shards`) ``linear`` is the rank's own packed layer, the
    sizes are the rank's, and each projection carries exactly its style's two hooks (which the one GEMM stands in
    for: the input as it is, the rank's columns out).

    An ``nn.Module`` only for ``torch.compile``'s sake: it holds nothing as a parameter, buffer or submodule (every
    attribute sits in its ``__dict__``; it is no submodule of the attention either, see :meth:`attach`). Dynamo
    (torch 2.9 to 2.12 by default) skips the guards of an attention module's whole subtree when no dict in it
    changed, but only for subtrees of modules, dicts and immutable values: a plain object here made the attention's
    guards run in full on every call, about 15 us per layer and decode step on the lent H200 host (2026-12-03).
    """

    def __init__(self, linear: nn.Module, sizes: tuple[int, int, int], projections: tuple[nn.Module, ...]) -> None:
        super().__init__()
        fp8 = isinstance(linear, FP8Linear)
        # where a projection keeps its weight: an nn.Linear a parameter, an FP8Linear a buffer
        store = "_buffers" if fp8 else "_parameters"
        weights = tuple(getattr(p, store)["weight"] for p in projections)
        sharded = _sharded(projections[0]) and not _plain(weights[0])  # DTensors (checked when packed)
        # straight into __dict__: nn.Module's __setattr__ would register the modules and parameters
        self.__dict__.update(
            linear=linear, sizes=tuple(sizes), fp8=fp8, store=store, weights=weights,
            # Their ids, which ``valid`` compares: kept alive by ``weights``, so never reused. ``torch.compile``
            # guards an ``id()`` with one C++ identity check, where ``a is b`` of two objects it reached by
            # different paths became a Python lambda guard, evaluated on every call: three per layer, about a
            # millisecond per decode step of a 32-layer model (H200 host, 2026-12-03).
            weight_ids=tuple(id(w) for w in weights),
            # and the projections' own ids: a module swapped in that holds the same weight (a LoRA wrapper keeps
            # the frozen Parameter) computes something else than the packed GEMM
            module_ids=tuple(id(p) for p in projections),
            packed_weight=getattr(linear, store)["weight"], packed_bias=linear._parameters.get("bias"),
            sharded=sharded,
            # the forward hooks and pre-hooks each projection has: none, or its tensor-parallel style's one of each
            hooks=1 if sharded else 0)

    @classmethod
    def attach(cls, attn: nn.Module, linear: nn.Module, sizes: tuple[int, int, int]) -> QKVPacking:
        """Make the packing of ``attn`` (whose ``q_proj`` / ``k_proj`` / ``v_proj`` now view ``linear``'s weight)."""
        packing = cls(linear, sizes, tuple(attn._modules[name] for name in _QKV))
        attn.__dict__[PACKING_ATTR] = packing
        return packing

    def __call__(self, x: torch.Tensor, input_norm: nn.Module | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, k, v)``: views of one GEMM's output ``[..., q + 2 * kv]``. With ``input_norm`` (an RMSNorm module
        that :func:`norm_module_fusable` accepts), of ``input_norm(x)``: inside the GEMM's launch where
        :meth:`takes_norm` says so, quantized for a W8A8 GEMM by the norm's launch where :meth:`norm_quantizes`
        does, else by the module first."""
        if input_norm is not None:
            if self.takes_norm(x):
                return self._normed_gemm(x, input_norm).split(self.sizes, dim=-1)
            scaling = self.norm_quantizes(x)
            if scaling:
                return self._quantized_norm_gemm(x, input_norm, scaling).split(self.sizes, dim=-1)
            x = input_norm(x)
        if self.sharded and type(x) is not torch.Tensor:  # e.g. a DTensor input: replicated, as the style does
            x = _replicated(x, self.weights[0])
        # straight to the GEMM: the packed layer is private to this packing (no hooks), and nn.Module's call and
        # attribute machinery cost microseconds per layer and decode step
        out = self.linear.forward(x) if self.fp8 else linear(x, self.packed_weight, self.packed_bias)
        return out.split(self.sizes, dim=-1)

    def takes_norm(self, x: torch.Tensor) -> bool:
        """Whether the GEMM of ``x`` runs the weight-only decode kernel, which can RMS-normalize ``x`` in its own
        launch (``decode_linear``'s deferred norm: the RMSNorm kernel's output up to the normalized row's rounding,
        which it skips): one 16-bit row on a GPU
        (:func:`decode_gemv_rule`, any K: the launch saved pays for a K off the kernel's tile), or an FP8 layer's
        weight-only path (at most ``NORM_PROLOGUE_MAX_ROWS`` rows); never sharded, and nothing to differentiate."""
        if self.sharded or type(x) is not torch.Tensor or (torch.is_grad_enabled() and x.requires_grad):
            return False
        if not self.fp8:
            rows = x.numel() // max(1, x.shape[-1])
            return decode_gemv_rule(0 < rows <= BF16_FUSED_MAX_ROWS, x.dtype, x.is_cuda, self.packed_weight,
                                    any_k=True) and not (torch.is_grad_enabled() and self.packed_weight.requires_grad)
        lin = self.linear
        rows = x.numel() // max(1, x.shape[-1])
        return (0 < rows <= NORM_PROLOGUE_MAX_ROWS
                and use_weight_only(lin.path, rows, lin._buffers["weight"], lin._buffers["weight_scale"],
                                    x.element_size()))

    def norm_quantizes(self, x: torch.Tensor) -> str:
        """The activation scaling (``"row"`` or ``"block"``) under which an FP8 packed layer's call on ``x`` is a
        W8A8 GEMM whose input the RMSNorm's own launch can quantize (``rmsnorm(..., fp8_out=scaling)``: bit for
        bit what quantizing the norm's output gives, without writing and reading it in 16 bits), else ``""``:
        more rows than the weight-only path takes (a prefill), per-row or 1x128 activation scales (per-tensor
        ones need the whole tensor's maximum first), never sharded, nothing to differentiate, and the switch
        :data:`triton_ops.layers.NORM_QUANTIZES_W8A8` on."""
        if not (self.fp8 and _layers.NORM_QUANTIZES_W8A8) or self.sharded or type(x) is not torch.Tensor:
            return ""
        if torch.is_grad_enabled() and x.requires_grad:
            return ""
        lin = self.linear
        scaling = lin.activation_granularity
        if scaling not in ("row", "block") or lin.path == "weight_only" or not x.is_floating_point():
            return ""
        rows = x.numel() // max(1, x.shape[-1])
        if rows == 0 or use_weight_only(lin.path, rows, lin._buffers["weight"], lin._buffers["weight_scale"],
                                        x.element_size()):
            return ""
        return scaling

    def _quantized_norm_gemm(self, x: torch.Tensor, norm: nn.Module, scaling: str) -> torch.Tensor:
        """``linear(norm(x))`` as ``FP8Linear``'s W8A8 GEMM over the norm's FP8 output (:meth:`norm_quantizes`)."""
        lin = self.linear
        a_q, a_s = rmsnorm(x, norm.weight, norm.variance_epsilon, fp8_out=scaling)
        k = x.shape[-1]
        weight = lin._buffers["weight"]
        out = fp8_gemm(a_q.view(-1, k), weight.t(), a_scale=a_s.view(-1, a_s.shape[-1]),
                       b_scale=lin._buffers["weight_scale"], out_dtype=x.dtype, bias=lin._parameters.get("bias"),
                       fast_accum=lin.fast_accum)
        return out.view(*x.shape[:-1], weight.shape[0])

    def _normed_gemm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        eps = norm.variance_epsilon
        if not self.fp8:
            return decode_linear(x, self.packed_weight, self.packed_bias, norm_weight=norm.weight, norm_eps=eps)
        lin = self.linear
        return decode_linear(x, lin._buffers["weight"], lin._parameters["bias"],
                             weight_scale=lin._buffers["weight_scale"], norm_weight=norm.weight, norm_eps=eps)

    # nn.Module's own call path (Dynamo with inline_inbuilt_nn_modules off traces _call_impl) calls forward
    forward = __call__

    def valid(self, attn: nn.Module) -> bool:
        modules, store, hooks = attn._modules, self.store, self.hooks
        for name, weight_id, module_id in zip(_QKV, self.weight_ids, self.module_ids):
            module = modules.get(name)
            if module is None or id(module) != module_id or id(getattr(module, store).get("weight")) != weight_id:
                return False
            if hooks:  # sharded: exactly the style's hook of each kind
                if len(module._forward_hooks) != hooks or len(module._forward_pre_hooks) != hooks:
                    return False
            elif module._forward_hooks or module._forward_pre_hooks:
                return False
        if torch.compiler.is_compiling():  # no data pointers of traced tensors; the ids above are guarded
            return True
        # A model moved or cast with .to() keeps its Parameter objects but gives each its own new storage (and
        # moves nothing outside the module tree, such as this packing); so does a deep copy. A DTensor's own
        # data_ptr is not its local tensor's: compare the local one.
        first = self.weights[0]._local_tensor if self.sharded else self.weights[0]
        return first.data_ptr() == self.packed_weight.data_ptr()


def _replicated(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A column-parallel projection's input as the rank's full local tensor (a DTensor input redistributed)."""
    from torch.distributed.tensor import Replicate

    from ..parallel import _to_replicated

    return _to_replicated(x, weight.device_mesh, Replicate())


# The most rows whose input RMSNorm an FP8 packed projection computes inside its weight-only launch (the deferred
# norm: each x tile times the norm weight, its squares summed, the rows' rstd on the sums), the weight-only path's.
NORM_PROLOGUE_MAX_ROWS = 16
# The most rows a 16-bit projection (the packed q/k/v with the input norm, o_proj with the residual add) takes
# decode_linear's kernel for, to save the norm's or the add's launch. One: from 2 rows cuBLAS measured a little
# faster than decode_linear alone (q/k/v at 4 / 8 rows 15.5 / 15.7 us against 15.9 / 16.4, H200, session 18), and
# whether the launch saved outweighs that at 2-8 rows is not measured yet (benchmarks.dev.norm_prologue
# --bf16-rows sets it for a run).
BF16_FUSED_MAX_ROWS = 1


def norm_module_fusable(norm: nn.Module) -> bool:
    """Whether ``norm`` computes exactly ``fused_rmsnorm_rope.rmsnorm(x, norm.weight, norm.variance_epsilon)``, so
    a GEMM's prologue may stand in for it: ``patch_model``'s RMSNorm forward, no hooks, a contiguous 1-D weight."""
    weight = getattr(norm, "weight", None)
    return (runs_forward(norm, RMSNorm)
            and not (norm._forward_hooks or norm._forward_pre_hooks)
            and type(weight) in _PLAIN and weight.dim() == 1 and weight.stride(0) == 1
            and isinstance(norm.variance_epsilon, (int, float)))


# The depth of decode_linear's one-row tile: K a multiple of it streams without masked tiles. Measured on the H200
# (bf16, CUDA graph): Llama-3-8B's packed q/k/v and o 15.3 / 11.2 us against cuBLAS's 16.3 / 12.8, gpt-oss's o
# (K = 4096) 8.7 against 11.3, but its packed q/k/v (K = 2880) 10.4 against 10.2: those stay with cuBLAS, unless
# the call also takes the layer's input norm into its launch (decode_gemv_rule's any_k: the launch saved pays).
_DECODE_LINEAR_K = 512
_HALF = (torch.float16, torch.bfloat16)


def decode_gemv(x: torch.Tensor, weight: torch.Tensor, on_gpu: bool | None = None) -> bool:
    """Whether :func:`fp8_gemm.decode_linear`'s kernel takes ``x @ weight^T``: a single row on a GPU (``on_gpu``
    overrides ``x.is_cuda``, for tests), a plain 16-bit weight in x's dtype whose K is a multiple of 512, where
    it measured faster than cuBLAS."""
    return decode_gemv_rule(x.numel() == x.shape[-1], x.dtype, x.is_cuda if on_gpu is None else on_gpu, weight)


def decode_gemv_rule(one_row: bool, dtype: torch.dtype, on_gpu: bool, weight: torch.Tensor,
                     any_k: bool = False) -> bool:
    """:func:`decode_gemv`'s rule from an input's description (a layer deciding before the input exists).
    ``any_k``: also K off the tile's depth, where the call saves a launch besides (an RMSNorm in its prologue:
    gpt-oss's packed q/k/v, K = 2880, measured 10.4 us against cuBLAS's 10.2 alone, before the norm's own ~2 us)."""
    return (on_gpu and one_row and weight.dtype in _HALF and dtype == weight.dtype
            and (any_k or weight.shape[-1] % _DECODE_LINEAR_K == 0) and type(weight) in _PLAIN)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, or :func:`fp8_gemm.decode_linear` (one launch, the weight streamed once) where
    :func:`decode_gemv` says it pays."""
    if decode_gemv(x, weight):
        return decode_linear(x, weight, bias)
    return F.linear(x, weight, bias)


_PLAIN = (torch.Tensor, nn.Parameter)


def linear_add_takes_kernel(x: torch.Tensor, weight: torch.Tensor, on_gpu: bool | None = None) -> bool:
    """:func:`linear_add_`'s rule: :func:`decode_gemv`'s, and nothing to differentiate (the in-place kernel records
    no gradient; an activation that needs one takes ``addmm_``)."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return decode_gemv(x, weight, on_gpu) and not grad


def linear_add_(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``residual += x @ weight^T`` in place for a bias-free 16-bit projection: :func:`fp8_gemm.decode_linear_add_`
    (one launch, the weight streamed once) where :func:`linear_add_takes_kernel` says so, else cuBLAS's ``addmm_``
    with beta = 1.
    Measured on the H200 (bf16, CUDA graph): Llama-3-8B's down projection (K = 14336) 29.8 us in
    ``decode_linear``'s kernel against 32.1 us for cuBLAS's split-K GEMM and its reduction."""
    if linear_add_takes_kernel(x, weight):
        return decode_linear_add_(residual, x, weight)
    residual.view(-1, residual.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
    return residual


def _still_views(packing: QKVPacking, projections: tuple[nn.Module, ...]) -> bool:
    """Whether FP8 projections still view their packing's rows (:func:`_fp8_rows`): plain ``FP8Linear`` s without
    hooks whose weights lie in the packed weight's storage at their rows' offsets. A deep copy or a pickle keeps
    that sharing (one storage, copied once) while giving every object a new identity; ``.to()`` does not."""
    packed = packing.packed_weight
    if not _plain(packed):
        return False
    row, start = packed.stride(0), 0
    for module, size in zip(projections, packing.sizes, strict=True):
        weight = module._buffers.get("weight") if type(module) is FP8Linear else None
        if (weight is None or not _plain(weight) or module._forward_hooks or module._forward_pre_hooks
                or "forward" in vars(module) or weight.shape != (size, packed.shape[1])
                or weight.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr()
                or weight.storage_offset() != packed.storage_offset() + start * row):
            return False
        start += size
    return True


def packed_projections(attn: nn.Module) -> QKVPacking | None:
    """The attention's packing if it still holds (rebuilt once if the projections were moved or cast since, or
    sharded by tensor parallelism, in eager mode; dropped if they can no longer be packed); None to run the three
    projections."""
    # getattr, not attn.__dict__.get: Dynamo reads an attribute through the module's __dict__ with guards that
    # keep the attention's subtree skippable (see QKVPacking), an explicit __dict__ read with ones that do not
    packing = getattr(attn, PACKING_ATTR, None)
    if packing is None or packing.valid(attn):
        return packing
    if torch.compiler.is_compiling():  # no module changes while tracing: the projections, as they are
        return None
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    if packing.fp8:
        # FP8 views sharded since by a plan without PackedQKVParallel: packed again per rank
        if all(_sharded(m) for m in (q, k, v)) and _fp8_shards_problem((q, k, v)) is None:
            return pack_shards(attn)
        # a deep copy or a model loaded whole (torch.save): new objects, the views still of the packed rows
        if _still_views(packing, (q, k, v)):
            return QKVPacking.attach(attn, packing.linear, packing.sizes)
        del attn.__dict__[PACKING_ATTR]
        return None
    if packable(q, k, v) is not None:
        del attn.__dict__[PACKING_ATTR]
        return None
    linear = PackedQKVLinear.from_linear(q, k, v, share=True)
    return QKVPacking.attach(attn, linear, linear.sizes)


__all__ = ["BF16_FUSED_MAX_ROWS", "NORM_PROLOGUE_MAX_ROWS", "PACKING_ATTR", "PackedQKVLinear", "QKVPacking",
           "decode_gemv", "decode_gemv_rule", "fp8_linears_packable", "fp8_packable", "linear", "norm_module_fusable",
           "pack_fp8", "pack_fp8_linears", "pack_shards", "packable", "packed_projections", "shards_packable"]
