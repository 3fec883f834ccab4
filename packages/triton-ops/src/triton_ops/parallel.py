"""Tensor parallelism for triton-ops' modules and patched models, through PyTorch's own engine.

The styles here are :class:`torch.distributed.tensor.parallel.ParallelStyle` subclasses for
:func:`torch.distributed.tensor.parallel.parallelize_module`. Like PyTorch's ``ColwiseParallel`` /
``RowwiseParallel`` they store each sharded weight as a ``DTensor`` parameter or buffer (so ``state_dict``,
``torch.distributed.checkpoint`` and ``full_tensor()`` see the global tensor), but the forward runs on the local
shards: the module's ``DTensor`` s are swapped for their local tensors (the same storage, no copy) for the duration
of the call, so our Triton kernels receive plain tensors and every rank launches exactly what one process launches on
its slice. Communication happens only at the boundaries the engine would use: none after a column-parallel layer,
one all-reduce after a row-parallel one (one per attention block and one per gated MLP or mixture of experts).

- :class:`ColwiseParallel` / :class:`RowwiseParallel`: ``nn.Linear`` and ``FP8Linear`` (the FP8 weight and its
  scales sharded together: per-channel scales follow the output rows, a per-tensor scale is replicated, 128x128
  block scales are sharded by blocks where every shard boundary falls on a block boundary, :class:`ShardingError`
  otherwise). ``FP8Linear`` quantizes its activation per row (or per tensor / block) on each rank, from the rank's
  own input.
- :class:`GatedColwiseParallel`: ``FusedGatedMLP`` (and any module with ``gate_proj`` / ``up_proj``) column-parallel;
  each rank holds the same output columns of gate and up, so its gate and up stay together, and computes its slice of
  the intermediate. Pair it with a :class:`RowwiseParallel` (or PyTorch's) down projection.
- :class:`GatedMLPParallel`: a whole gated MLP (transformers' ``LlamaMLP``-like module, patched or not): gate and up
  column-parallel, down row-parallel, one all-reduce.
- :class:`PackedQKVParallel`: an attention whose q/k/v projections are column-parallel (whole heads per rank): the
  packed q/k/v GEMM of ``patch_model`` rebuilt per rank over the rank's heads (one local
  ``[q_local + 2 * kv_local, hidden]`` weight, bf16 or FP8 with its scales, which the projections' ``DTensor`` s
  hold their local rows of), so each rank still runs one GEMM for q, k and v.
- :class:`AttentionSinksParallel`: gpt-oss's per-head attention ``sinks`` sharded with the query heads (the rank's
  local sinks seen by the attention's forward).
- :class:`GptOssMoEParallel`: gpt-oss's mixture of experts (transformers' or ``fused_moe``, bf16 or FP8 experts)
  split by the experts' intermediate dimension (whole gate/up pairs per rank, every expert on every rank), the
  router replicated, one all-reduce.
- :class:`SparseMoEParallel`: Qwen3-MoE's, Mixtral's and Qwen2-MoE's sparse mixture of experts (``gate`` +
  ``experts`` with ``[E, 2I, H]`` / ``[E, H, I]`` weights; transformers' or ``fused_moe``, bf16 or FP8 experts;
  Qwen2-MoE's shared expert) split the same way.
- :func:`tensor_parallel_plan`: the plan for a (patched or unpatched) Llama / Mistral / Qwen2 / Qwen3 / gpt-oss /
  Qwen3-MoE / Mixtral / Qwen2-MoE / Gemma / Gemma 2 / Gemma 3 model; :func:`parallelize_model` applies it.
- :func:`shard_packed_gate_up`: one rank's slice of a packed ``[2 * intermediate, hidden]`` gate/up weight, packed
  again per rank (for ``fused_gated_mlp(..., weight_layout="concatenated" | "interleaved")``).

See docs/tensor-parallel.md.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from fp8_gemm import FP8Linear, TrainableFP8Linear
from fused_gated_mlp import FP8Projection
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module
from torch.distributed.tensor.placement_types import Placement, _StridedShard
from triton_ops_core.exceptions import InvalidArgumentError

from .layers import GEMM_SCALE_BUFFER
from .models.layers import LOCAL_SHARDS_ATTR, PACKING_ATTR, TP_ATTR, pack_shards, shards_packable
from .models.patch import HYBRID_MODEL_TYPES, LANGUAGE_MODEL_TYPES, SUPPORTED_MODEL_TYPES, UnsupportedModelError

FP8_BLOCK = 128  # FP8Linear's 128x128 weight blocks
# patch_model's models whose layers the plan knows (the experts of gpt-oss, Qwen3-MoE and Mixtral split by their
# intermediate dimension); of a multimodal model, plan its language model (Gemma 3's gemma3_text). Not Phi-3: its
# packed qkv_proj / gate_up_proj would need styles that split each part by heads / columns.
_NO_PLAN_YET = ("phi3", "gemma4_text", *HYBRID_MODEL_TYPES)  # patch_model's, without a plan here (_TP_REFUSALS: why)
TP_MODEL_TYPES = tuple(t for t in SUPPORTED_MODEL_TYPES if t not in LANGUAGE_MODEL_TYPES and t not in _NO_PLAN_YET)
_TP_REFUSALS = {
    **{t: f" (plan its language model instead, a {' or '.join(map(repr, inner))} model: "
          "tensor_parallel_plan(model.model.language_model))" for t, inner in LANGUAGE_MODEL_TYPES.items()},
    "phi3": (" (Phi-3's packed qkv_proj and gate_up_proj would each need a style that splits q, k and v by heads and "
             "gate and up by columns; not written yet)"),
    "gemma4_text": (" (Gemma 4's attention shares K/V across layers and may take V from K; its plan is not written "
                    "yet)"),
    **{t: " (a hybrid decoder: its Gated DeltaNet layers (linear attention) and gated attentions have no split yet)"
       for t in HYBRID_MODEL_TYPES},
}
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                    if hasattr(torch, n))


class ShardingError(InvalidArgumentError):
    """A module or model cannot be split the way the plan asks (block scales across a shard boundary, head counts
    not divisible by the tensor-parallel size, a module the style does not know)."""


# ----------------------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------------------

def _mesh_1d(mesh: DeviceMesh) -> None:
    if mesh.ndim != 1:
        raise ShardingError(f"device_mesh: expected a 1-D mesh (the tensor-parallel dimension), got {mesh.ndim}-D; "
                            "slice it first (mesh['tp'])")


def _bounds(size: int, world: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of ``rank``'s chunk of ``size`` under DTensor's ``Shard`` (``torch.chunk``) split."""
    chunk = -(-size // world)
    start = min(rank * chunk, size)
    return start, min(start + chunk, size)


def _rank(mesh: DeviceMesh) -> int:
    return mesh.get_local_rank()


def _shard(tensor: torch.Tensor, mesh: DeviceMesh, placement: Placement, src_data_rank: int | None) -> DTensor:
    """``tensor`` (the full tensor on every rank) as a DTensor with ``placement``.

    ``src_data_rank=None``: each rank keeps its own slice (every rank loaded the same weights). An int: that rank's
    tensor is scattered / broadcast (``distribute_tensor``), FP8 tensors as their bytes (collectives know no FP8).
    The local shard is a fresh contiguous tensor (FP8 expert weights: dense in their own dimension order), so the
    full tensor can be freed.
    """
    tensor = tensor.detach()
    if isinstance(tensor, DTensor):
        raise ShardingError("expected a plain tensor to shard, got a DTensor (is this module parallelized twice?)")
    # FP8 experts keep their dimensions' order in memory: W8A8's are stored K-major for the FP8 tensor cores
    # (fused_moe.quantize_experts_fp8(k_major=True)), which a contiguous shard of a gpt-oss [E, H, 2I] undoes
    keep_order = tensor.dim() == 3 and tensor.dtype in _FP8_DTYPES
    if src_data_rank is not None and mesh.size() > 1:
        if tensor.dtype in _FP8_DTYPES:
            d = distribute_tensor(tensor.view(torch.uint8), mesh, [placement], src_data_rank=src_data_rank)
            local = d.to_local().view(tensor.dtype)
            return DTensor.from_local(_in_order_of(local, tensor) if keep_order else local, mesh, [placement],
                                      run_check=False, shape=tensor.shape, stride=tensor.stride())
        return distribute_tensor(tensor, mesh, [placement], src_data_rank=src_data_rank)
    local = tensor
    if isinstance(placement, _StridedShard):  # the same chunk of each of split_factor equal parts, concatenated
        dim, parts = placement.dim % tensor.dim(), placement.split_factor
        start, end = _bounds(tensor.shape[dim] // parts, mesh.size(), _rank(mesh))
        local = torch.cat([part.narrow(dim, start, end - start) for part in tensor.chunk(parts, dim)], dim)
    elif isinstance(placement, Shard):
        dim = placement.dim % tensor.dim()
        start, end = _bounds(tensor.shape[dim], mesh.size(), _rank(mesh))
        local = tensor.narrow(dim, start, end - start)
    local = _in_order_of(local, tensor) if keep_order else local.clone(memory_format=torch.contiguous_format)
    return DTensor.from_local(local, mesh, [placement], run_check=False, shape=tensor.shape, stride=tensor.stride())


def _in_order_of(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A fresh dense copy of ``local`` whose dimensions lie in memory in the order of ``like``'s strides."""
    order = sorted(range(like.dim()), key=lambda d: like.stride(d), reverse=True)
    inverse = sorted(range(like.dim()), key=order.__getitem__)
    return local.permute(order).clone(memory_format=torch.contiguous_format).permute(inverse)


def _set(owner: nn.Module, name: str, value: DTensor) -> None:
    """Put a DTensor where ``owner.name`` is: a parameter stays a parameter, a buffer a buffer."""
    param = owner._parameters.get(name)
    if param is not None:
        owner._parameters[name] = nn.Parameter(value, requires_grad=param.requires_grad)
    else:
        owner._buffers[name] = value


def _tensor(owner: nn.Module, name: str) -> torch.Tensor | None:
    if name in owner._parameters:
        return owner._parameters[name]
    return owner._buffers.get(name)


def _check_block(size: int, world: int, what: str, scales: str = "128x128 block") -> None:
    """128x128 block scales (and group scales along K) shard only where every rank's boundary falls on a block
    boundary."""
    if world == 1:
        return
    chunk = -(-size // world)
    if chunk % FP8_BLOCK:
        raise ShardingError(
            f"{what}: FP8 {scales} scales cannot be sharded over {world} ranks: each rank would hold {chunk} "
            f"of the {size} features, which is not a multiple of {FP8_BLOCK}, so a block would straddle two ranks. "
            f"Quantize this layer per channel (weight_granularity='channel') or per tensor, or pick a tensor-parallel "
            f"size that divides it into multiples of {FP8_BLOCK}")


def _partition_linear(module: nn.Module, mesh: DeviceMesh, kind: str, src: int | None, what: str) -> list[str]:
    """Shard an ``nn.Linear`` or ``FP8Linear`` column-wise (``kind="col"``) or row-wise (``"row"``) in place;
    returns the names of the module's tensors that became DTensors."""
    world = mesh.size()
    if isinstance(module, TrainableFP8Linear):
        raise ShardingError(f"{what}: TrainableFP8Linear is not supported by tensor parallelism (it quantizes its "
                            "full weight per call); shard the nn.Linear, or convert with to_inference() first")
    if isinstance(module, FP8Linear):
        gran = module.weight_granularity
        if gran == "block" or (gran == "group" and kind == "row"):  # groups of 128 run along K (in_features)
            attr = "out_features" if kind == "col" else "in_features"
            size = getattr(module, attr)
            _check_block(size, world, f"{what} ({attr}={size})", "128x128 block" if gran == "block" else "group")
        # the scale is in the GEMM's [K, N] convention: [1] tensor, [1, N] channel, [K/128, N/128] blocks,
        # [K/128, N] groups
        if kind == "col":
            scale_placement: Placement = Replicate() if gran == "tensor" else Shard(1)
        else:
            scale_placement = Shard(0) if gran in ("block", "group") else Replicate()
        placements = {"weight": Shard(0) if kind == "col" else Shard(1), "weight_scale": scale_placement}
    elif isinstance(module, FP8Projection):  # a gated MLP's FP8 gate/up (patch_model(fp8=True))
        scaling = module.scaling
        along_k = scaling in ("block", "group")  # scales per 128-wide K block
        if scaling == "block" or (scaling == "group" and kind == "row"):
            attr = "out_features" if kind == "col" else "in_features"
            _check_block(getattr(module, attr), world, f"{what} ({attr}={getattr(module, attr)})",
                         "128x128 block" if scaling == "block" else "group")
        # the scale is in the weight's [N, K] convention: [N] per channel, [N/128, K/128] blocks, [N, K/128] groups
        if kind == "col":
            scale_placement = Shard(0)
        else:
            scale_placement = Shard(1) if along_k else Replicate()
        placements = {"weight": Shard(0) if kind == "col" else Shard(1), "weight_scale": scale_placement}
        if _tensor(module, GEMM_SCALE_BUFFER) is not None:  # patch_model's copy of the blocks in [K/128, N/128]
            placements[GEMM_SCALE_BUFFER] = Shard(1) if kind == "col" else Shard(0)
    elif isinstance(module, nn.Linear):
        placements = {"weight": Shard(0) if kind == "col" else Shard(1)}
    else:
        raise ShardingError(f"{what}: expected an nn.Linear, an FP8Linear or an FP8Projection, got "
                            f"{type(module).__name__}")
    if _tensor(module, "bias") is not None:
        placements["bias"] = Shard(0) if kind == "col" else Replicate()
    for name, placement in placements.items():
        _set(module, name, _shard(_tensor(module, name), mesh, placement, src))
    return list(placements)


# ----------------------------------------------------------------------------------------------------------------
# Forward on local shards
# ----------------------------------------------------------------------------------------------------------------

def _local(t: DTensor) -> torch.Tensor:
    # Inference: the DTensor's own local tensor. With a gradient to record: to_local(), a view autograd follows.
    if t.requires_grad and torch.is_grad_enabled():
        return t.to_local()
    return t._local_tensor


def _first_tensor(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple[tuple, dict]]]:
    """The module's input (its first positional argument, else its first tensor keyword) and how to put it back."""
    if args:
        return args[0], lambda x: ((x, *args[1:]), kwargs)
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return value, lambda x, key=key: (args, {**kwargs, key: x})
    raise InvalidArgumentError("expected the module's input tensor as its first argument")


def _norm(placement: Placement, ndim: int) -> Placement:
    if isinstance(placement, Shard) and placement.dim < 0:
        return Shard(placement.dim % ndim)
    return placement


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def _to_replicated(x: torch.Tensor, mesh: DeviceMesh, layout: Placement) -> torch.Tensor:
    """A column-parallel layer's input as this rank's full local tensor; its gradient is summed over ranks."""
    if not isinstance(x, DTensor):
        layout = _norm(layout, x.dim())
        if isinstance(layout, Replicate):
            if not (x.requires_grad and torch.is_grad_enabled()):
                return x  # inference: already the replicated input, nothing to do
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        else:
            x = DTensor.from_local(x, mesh, [layout], run_check=False)
    if x.placements != (Replicate(),):
        x = x.redistribute(placements=[Replicate()])
    return x.to_local(grad_placements=[Partial()])


def _to_last_dim_shard(x: torch.Tensor, mesh: DeviceMesh, layout: Placement, in_features: int) -> torch.Tensor:
    """A row-parallel layer's input as this rank's slice of the last dimension."""
    last = Shard(x.dim() - 1)
    if not isinstance(x, DTensor):
        layout = _norm(layout, x.dim())
        if layout == last:
            return x  # already this rank's slice (a column-parallel layer's local output)
        if isinstance(layout, Replicate) and not (x.requires_grad and torch.is_grad_enabled()):
            start, end = _bounds(in_features, mesh.size(), _rank(mesh))
            return x.narrow(-1, start, end - start)
        x = DTensor.from_local(x, mesh, [layout], run_check=False)
    if _norm(x.placements[0], x.dim()) != last:
        x = x.redistribute(placements=[last])
    return _local(x)


def _from_last_dim_shard(out: torch.Tensor, mesh: DeviceMesh, global_n: int, layout: Placement,
                         use_local_output: bool) -> torch.Tensor:
    """A column-parallel layer's local output: kept as this rank's shard, or redistributed to ``layout``."""
    layout = _norm(layout, out.dim())
    last = Shard(out.dim() - 1)
    if use_local_output and (layout == last or mesh.size() == 1):
        return out  # this rank's slice (or, alone, the whole): no communication, no copy
    shape = (*out.shape[:-1], global_n)
    d = DTensor.from_local(out, mesh, [last], run_check=False, shape=torch.Size(shape),
                           stride=_contiguous_stride(shape))
    if layout != last:
        d = d.redistribute(placements=[layout])
    return d.to_local() if use_local_output else d


def _reduce(out: torch.Tensor, mesh: DeviceMesh, bias: torch.Tensor | None, layout: Placement,
            use_local_output: bool) -> torch.Tensor:
    """A row-parallel layer's partial output summed over ranks (all-reduce, or reduce-scatter to a shard), plus the
    bias once."""
    layout = _norm(layout, out.dim())
    if bias is not None and isinstance(bias, DTensor):
        bias = _local(bias)
    if (isinstance(layout, Replicate) and use_local_output
            and not (out.requires_grad and torch.is_grad_enabled())):
        if mesh.size() > 1:
            dist.all_reduce(out, group=mesh.get_group())  # in place: out is the kernel's fresh result
        return out if bias is None else out + bias
    if bias is not None and not isinstance(layout, Replicate):
        # the bias goes into one rank's partial sum, so the reduction adds it once whatever the output layout
        out = out + bias if _rank(mesh) == 0 else out
        bias = None
    d = DTensor.from_local(out, mesh, [Partial()], run_check=False).redistribute(placements=[layout])
    if use_local_output:
        d = d.to_local()
        return d if bias is None else d + bias
    return d if bias is None else d + DTensor.from_local(bias, mesh, [Replicate()], run_check=False)


class LocalShards:
    """One parallelized module's DTensor parameters and buffers, and their local shards.

    Its style's hooks swap the module tree's DTensors for their local tensors (the same storage) around each
    forward. A patched decoder layer uses the same swap to run a :class:`GatedMLPParallel` MLP's row-parallel down
    projection itself: rank 0 adds the layer's residual inside its partial product (``addmm_`` /
    ``fp8_linear_add_``, as one process does), the other ranks compute theirs, and one all-reduce sums them: the
    unsharded model's launches, with no residual add of its own.
    """

    __slots__ = ("style", "mesh", "entries", "hook_ids")

    def __init__(self, style: _LocalShardStyle, mesh: DeviceMesh, entries: list) -> None:
        self.style, self.mesh, self.entries = style, mesh, entries
        self.hook_ids: tuple[int, int] = (-1, -1)

    def swap(self) -> list:
        """Put each DTensor's local tensor in its place; returns what :meth:`restore` puts back."""
        frame = []
        for owner, name in self.entries:
            table = owner._parameters if name in owner._parameters else owner._buffers
            value = table[name]
            if isinstance(value, DTensor):
                local = self.style._local_value(owner, name, value, self.mesh)
                table[name] = local
                frame.append((table, name, value, local))
        return frame

    @staticmethod
    def restore(frame: list) -> None:
        for table, name, original, current in reversed(frame):
            if table[name] is current:
                table[name] = original

    @property
    def rank(self) -> int:
        return _rank(self.mesh)

    def adds_residual(self, module: nn.Module) -> bool:
        """Whether a decoder layer may run ``module`` (a gated MLP) with the residual added on rank 0 before the
        all-reduce: its style is :class:`GatedMLPParallel` taking a replicated input and giving the all-reduced
        output as a plain tensor, and the module's only forward hooks are the style's."""
        style = self.style
        return (type(style) is GatedMLPParallel and style.use_local_output
                and isinstance(style.input_layouts, Replicate) and isinstance(style.output_layouts, Replicate)
                and tuple(module._forward_pre_hooks) == self.hook_ids[:1]
                and tuple(module._forward_hooks) == self.hook_ids[1:])

    def all_reduce(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` summed over the ranks, in place (nothing to do alone)."""
        if self.mesh.size() > 1:
            dist.all_reduce(out, group=self.mesh.get_group())
        return out


class _LocalShardStyle(ParallelStyle):
    """Shards a module tree's tensors into DTensors at ``_apply``; each forward runs on their local shards.

    Subclasses define ``_partition(module, mesh)`` (shard in place; return ``[(owner, name), ...]`` of the tensors
    that became DTensors and ``[(owner, "bias")]`` of the biases to add after the reduction), ``_input`` and
    ``_output``.
    """

    def __init__(self, *, input_layouts: Placement | None = None, output_layouts: Placement | None = None,
                 use_local_output: bool = True) -> None:
        super().__init__()
        self.input_layouts = input_layouts
        self.output_layouts = output_layouts
        self.use_local_output = use_local_output

    # -- subclass hooks (ParallelStyle is an ABC: a style lacking one cannot be instantiated)
    @abstractmethod
    def _partition(self, module: nn.Module, mesh: DeviceMesh) -> tuple[list, list]:
        """Shard the module's weights in place; returns what ``_output`` needs (names, biases)."""

    @abstractmethod
    def _input(self, module: nn.Module, x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        """The local activation the sharded forward reads."""

    @abstractmethod
    def _output(self, module: nn.Module, out: torch.Tensor, mesh: DeviceMesh,
                biases: list[torch.Tensor]) -> torch.Tensor:
        """The module's output from the local result (the all-reduce of a row-parallel layer, its bias once)."""

    # -- overridable defaults
    def _local_value(self, owner: nn.Module, name: str, value: DTensor, mesh: DeviceMesh) -> torch.Tensor:
        """The plain tensor swapped in for ``owner.name`` during the forward: the DTensor's local tensor."""
        return _local(value)

    def _finish(self, module: nn.Module, out: Any, mesh: DeviceMesh, biases: list[torch.Tensor]) -> Any:
        """The module's output: ``_output`` of a tensor output; anything else (a tuple) as it is."""
        if isinstance(out, torch.Tensor):
            return self._output(module, out, mesh, biases)
        return out

    # -- the engine's entry point
    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _mesh_1d(device_mesh)
        if getattr(module, "_triton_ops_tp", None) is not None:
            raise ShardingError(f"{type(module).__name__}: already parallelized ({module._triton_ops_tp!r})")
        entries, bias_owners = self._partition(module, device_mesh)
        shards = LocalShards(self, device_mesh, entries)
        mesh = device_mesh
        stash: list[list] = []  # one frame per active call (a module is not re-entered, but be safe)

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            x, put = _first_tensor(args, kwargs)
            x = self._input(mod, x, mesh)
            frame = shards.swap()
            biases = []
            for owner, name in bias_owners:
                # A row-parallel layer's bias enters the sum once. Inference: inside rank 0's GEMM (one rounding and
                # no add launch, as one process computes it), none in the other ranks' partial products. With a
                # gradient to record: added by _reduce (after an all-reduce; into rank 0's partial sum before a
                # reduce-scatter, whose bias gradient then reaches rank 0 only: a known gap for trainable biases).
                table = owner._parameters
                value = table.get(name)
                if value is None:
                    continue
                if torch.is_grad_enabled() and value.requires_grad:
                    local = None
                    biases.append(value)
                else:
                    local = (_local(value) if isinstance(value, DTensor) else value) if _rank(mesh) == 0 else None
                table[name] = local
                frame.append((table, name, value, local))
            stash.append((frame, biases))
            return put(x)

        def post_hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            if not stash:  # the pre-hook itself failed: nothing was swapped
                return out
            frame, biases = stash.pop()
            shards.restore(frame)
            return self._finish(mod, out, mesh, biases)

        pre = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        post = module.register_forward_hook(post_hook, with_kwargs=True, always_call=True)
        shards.hook_ids = (pre.id, post.id)
        setattr(module, TP_ATTR, self)  # (a packed q/k/v GEMM checks which style hooked its projections)
        module.__dict__[LOCAL_SHARDS_ATTR] = shards
        return module

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_layouts={self.input_layouts}, output_layouts={self.output_layouts}, "
                f"use_local_output={self.use_local_output})")


# ----------------------------------------------------------------------------------------------------------------
# Styles
# ----------------------------------------------------------------------------------------------------------------

class ColwiseParallel(_LocalShardStyle):
    """Column-parallel ``nn.Linear`` / ``FP8Linear``: weight rows (output features), the bias and the per-channel or
    block scales sharded; the input replicated; the output this rank's slice of the last dimension.

    Keyword Args (as PyTorch's ``ColwiseParallel``):
        input_layouts: layout of a plain-tensor input (default ``Replicate()``); a ``DTensor`` input is
            redistributed to ``Replicate()`` whatever it is.
        output_layouts: ``Shard(-1)`` (default: no communication) or ``Replicate()`` (all-gather, e.g. an LM head).
        use_local_output: return a plain tensor (default) or a ``DTensor``.
    """

    def __init__(self, *, input_layouts: Placement | None = None, output_layouts: Placement | None = None,
                 use_local_output: bool = True) -> None:
        super().__init__(input_layouts=input_layouts or Replicate(), output_layouts=output_layouts or Shard(-1),
                         use_local_output=use_local_output)

    def _partition(self, module, mesh):
        names = _partition_linear(module, mesh, "col", self.src_data_rank, type(module).__name__)
        return [(module, n) for n in names], []

    def _input(self, module, x, mesh):
        return _to_replicated(x, mesh, self.input_layouts)

    def _output(self, module, out, mesh, biases):
        return _from_last_dim_shard(out, mesh, module.out_features, self.output_layouts, self.use_local_output)


class RowwiseParallel(_LocalShardStyle):
    """Row-parallel ``nn.Linear`` / ``FP8Linear``: weight columns (input features) sharded, with FP8 block scales;
    per-tensor and per-channel scales and the bias replicated. The input is this rank's slice of the last
    dimension; the output is all-reduced (``Replicate()``, default) or reduce-scattered (``Shard(d)``), the bias
    added once. ``FP8Linear`` quantizes each rank's slice of the activation with its own scales.
    """

    def __init__(self, *, input_layouts: Placement | None = None, output_layouts: Placement | None = None,
                 use_local_output: bool = True) -> None:
        super().__init__(input_layouts=input_layouts or Shard(-1), output_layouts=output_layouts or Replicate(),
                         use_local_output=use_local_output)

    def _partition(self, module, mesh):
        names = _partition_linear(module, mesh, "row", self.src_data_rank, type(module).__name__)
        return [(module, n) for n in names if n != "bias"], [(module, "bias")]

    def _input(self, module, x, mesh):
        return _to_last_dim_shard(x, mesh, self.input_layouts, module.in_features)

    def _output(self, module, out, mesh, biases):
        return _reduce(out, mesh, biases[0] if biases else None, self.output_layouts, self.use_local_output)


def _gate_up(module: nn.Module, what: str) -> tuple[nn.Module, nn.Module]:
    gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
    if not isinstance(gate, nn.Module) or not isinstance(up, nn.Module):
        raise ShardingError(f"{what}: expected a gated MLP with gate_proj and up_proj layers, got "
                            f"{type(module).__name__}")
    if _tensor(gate, "weight") is None or _tensor(up, "weight") is None or gate.weight.shape != up.weight.shape:
        raise ShardingError(f"{what}: expected gate_proj and up_proj weights of one shape")
    return gate, up


def _intermediate(gate: nn.Module) -> int:
    return getattr(gate, "out_features", None) or gate.weight.shape[0]


class GatedColwiseParallel(_LocalShardStyle):
    """Column-parallel ``FusedGatedMLP`` (or any module with ``gate_proj`` / ``up_proj`` layers, ``nn.Linear`` or
    ``FP8Linear``): each rank holds the same output rows of gate and up, so its gate and up columns stay together
    and the fused kernel computes the rank's slice of ``act(gate) * up`` with no communication. The output is that
    slice (``Shard(-1)``), ready for a row-parallel down projection (:class:`RowwiseParallel` or PyTorch's).
    """

    def __init__(self, *, input_layouts: Placement | None = None, output_layouts: Placement | None = None,
                 use_local_output: bool = True) -> None:
        super().__init__(input_layouts=input_layouts or Replicate(), output_layouts=output_layouts or Shard(-1),
                         use_local_output=use_local_output)

    def _partition(self, module, mesh):
        gate, up = _gate_up(module, type(module).__name__)
        entries = []
        for child, name in ((gate, "gate_proj"), (up, "up_proj")):
            entries += [(child, n) for n in _partition_linear(child, mesh, "col", self.src_data_rank, name)]
        return entries, []

    def _input(self, module, x, mesh):
        return _to_replicated(x, mesh, self.input_layouts)

    def _output(self, module, out, mesh, biases):
        return _from_last_dim_shard(out, mesh, _intermediate(module.gate_proj), self.output_layouts,
                                    self.use_local_output)


def _partition_gated_mlp(module: nn.Module, mesh: DeviceMesh, src: int | None, what: str) -> tuple[list, list]:
    """Shard a gated MLP in place: gate and up column-parallel (the same rows on a rank), down row-parallel; returns
    the tensors that became DTensors and the down projection's bias (added once, after or inside the reduction)."""
    gate, up = _gate_up(module, what)
    down = getattr(module, "down_proj", None)
    if not isinstance(down, nn.Module):
        raise ShardingError(f"{what}: expected a down_proj layer")
    entries = []
    for child, name in ((gate, "gate_proj"), (up, "up_proj")):
        entries += [(child, n) for n in _partition_linear(child, mesh, "col", src, f"{what}.{name}")]
    names = _partition_linear(down, mesh, "row", src, f"{what}.down_proj")
    entries += [(down, n) for n in names if n != "bias"]
    return entries, [(down, "bias")]


class GatedMLPParallel(_LocalShardStyle):
    """A whole gated MLP (``down_proj(act(gate_proj(x)) * up_proj(x))``: transformers' ``LlamaMLP`` / ``Qwen3MLP``
    as they are, or patched by ``patch_model`` with the fused kernel or FP8 layers): gate and up column-parallel
    (per rank together), down row-parallel, one all-reduce of the output; the forward in between is the module's
    own, on local shards. The input is replicated (a ``DTensor`` input is redistributed to ``Replicate()``).
    """

    def __init__(self, *, input_layouts: Placement | None = None, output_layouts: Placement | None = None,
                 use_local_output: bool = True) -> None:
        super().__init__(input_layouts=input_layouts or Replicate(), output_layouts=output_layouts or Replicate(),
                         use_local_output=use_local_output)

    def _partition(self, module, mesh):
        return _partition_gated_mlp(module, mesh, self.src_data_rank, type(module).__name__)

    def _input(self, module, x, mesh):
        return _to_replicated(x, mesh, self.input_layouts)

    def _output(self, module, out, mesh, biases):
        return _reduce(out, mesh, biases[0] if biases else None, self.output_layouts, self.use_local_output)


_QKV = ("q_proj", "k_proj", "v_proj")


class PackedQKVParallel(ParallelStyle):
    """An attention's packed q/k/v projection, per rank: for an attention whose ``q_proj`` / ``k_proj`` /
    ``v_proj`` are already column-parallel (:class:`ColwiseParallel` with its default layouts, applied before this
    style: :func:`tensor_parallel_plan` lists it after them) and which ``patch_model`` packed into one GEMM.

    The rank's local rows of q, k and v (whole heads) are concatenated into one local
    ``[q_local + 2 * kv_local, hidden]`` weight (a ``PackedQKVLinear``; with FP8 one ``FP8Linear`` with the rows'
    per-tensor, per-channel or 128x128 block scales), and each projection's ``DTensor`` weight (bias, FP8 scale)
    is re-pointed at its rows of it: the same ``DTensor`` mesh, placements and global shape (``state_dict`` and
    ``full_tensor()`` unchanged), its local tensor the packed weight's memory (no second copy). The patched
    attention then runs one GEMM per rank for q, k and v, the rank's heads, as one process runs one for all.

    - An attention ``patch_model`` did not pack (``pack_qkv=False``, unpatched, or patched after parallelizing:
      ``patch_model`` then packs the rank's shards itself) is left as it is.
    - :class:`ShardingError`: the projections are not column-parallel yet (plan order), their local rows are not
      whole heads (``attn.head_dim``; the count named), or the shards cannot be packed (other layouts, hooks added,
      FP8 options that differ; the reason named). 128x128 block scales need whole blocks of each of q, k and v on
      every rank, which :class:`ColwiseParallel` already requires of each projection.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _mesh_1d(device_mesh)
        what = type(module).__name__
        projections = [module._modules.get(name) for name in _QKV]
        if any(p is None for p in projections):
            raise ShardingError(f"{what}: expected an attention with q_proj, k_proj and v_proj")
        sharded = [TP_ATTR in vars(p) for p in projections]
        world = device_mesh.size()
        head_dim = getattr(module, "head_dim", None)
        if all(sharded) and isinstance(head_dim, int) and head_dim > 0:
            for name, proj in zip(_QKV, projections):
                rows = getattr(proj, "out_features", None)
                if isinstance(rows, int) and rows % (head_dim * world):
                    raise ShardingError(
                        f"{what}.{name}: {rows} output features ({rows / head_dim:g} heads of head_dim {head_dim}) "
                        f"are not divisible into whole heads over the tensor-parallel size {world}; attention is "
                        "split by whole heads, and uneven head counts are not supported")
        if module.__dict__.get(PACKING_ATTR) is None:
            return module  # not packed by patch_model: nothing to rebuild
        if not all(sharded):
            raise ShardingError(
                f"{what}: PackedQKVParallel packs this rank's shards of q_proj, k_proj and v_proj: parallelize them "
                "with ColwiseParallel first (before this entry in the plan)")
        why = shards_packable(*projections)
        if why is None and _tensor(projections[0], "weight").device_mesh != device_mesh:
            why = "q/k/v were sharded over another device mesh"
        if why is not None:
            raise ShardingError(f"{what}: cannot pack this rank's q/k/v shards into one GEMM: {why}. Leave this "
                                "entry out of the plan to run the three sharded projections")
        pack_shards(module)
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _is_column_parallel(proj: nn.Module | None) -> bool:
    """Whether a projection's weight is sharded by output rows (ours or PyTorch's ``ColwiseParallel``)."""
    w = _tensor(proj, "weight") if isinstance(proj, nn.Module) else None
    return isinstance(w, DTensor) and w.placements == (Shard(0),)


class AttentionSinksParallel(_LocalShardStyle):
    """An attention with attention sinks (gpt-oss's ``sinks``: one logit per query head, ``[num_attention_heads]``,
    joining each head's softmax denominator), for an attention whose ``q_proj`` / ``k_proj`` / ``v_proj`` are
    already column-parallel by whole heads and ``o_proj`` row-parallel (their entries come first in the plan).

    ``sinks`` becomes a ``Shard(0)`` ``DTensor`` (the rank's query heads, the rows ``ColwiseParallel`` gives
    ``q_proj``; ``state_dict`` / ``full_tensor()`` see all heads), and during the forward ``module.sinks`` is its
    local ``[num_attention_heads / N]`` tensor: what transformers' attention functions (``s_aux=self.sinks``, the
    eager one reading ``module.sinks``) and triton-ops' attention backend read. Input and output pass through (the
    projections' styles do the communication). Then, as :class:`PackedQKVParallel`, the q/k/v GEMM ``patch_model``
    packed (its :class:`~triton_ops.models.decoder_layers.SinkRopeAttention`) is rebuilt over the rank's heads.

    :class:`ShardingError`: no ``sinks`` tensor, a head count that does not divide by the tensor-parallel size, or
    ``q_proj`` not column-parallel yet (plan order: the sinks must follow the query heads).
    """

    def __init__(self) -> None:
        super().__init__(input_layouts=None, output_layouts=None, use_local_output=True)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _mesh_1d(device_mesh)
        what = type(module).__name__
        if not _is_column_parallel(module._modules.get("q_proj")):
            raise ShardingError(
                f"{what}: AttentionSinksParallel shards the sinks with the query heads: parallelize q_proj with "
                "ColwiseParallel first (before this entry in the plan)")
        super()._apply(module, device_mesh)
        return PackedQKVParallel()._apply(module, device_mesh)

    def _partition(self, module, mesh):
        what = type(module).__name__
        sinks = _tensor(module, "sinks")
        if sinks is None or sinks.dim() != 1:
            raise ShardingError(f"{what}: expected an attention with a 1-D sinks tensor (one per query head)")
        heads, world = sinks.shape[0], mesh.size()
        if heads % world:
            raise ShardingError(
                f"{what}.sinks: {heads} query heads are not divisible by the tensor-parallel size {world}; "
                "attention is split by whole heads, and uneven head counts are not supported")
        _set(module, "sinks", _shard(sinks, mesh, Shard(0), self.src_data_rank))
        return [(module, "sinks")], []

    def _input(self, module, x, mesh):
        return x

    def _output(self, module, out, mesh, biases):
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# gpt-oss's experts split by their intermediate dimension I: every rank holds every expert, the same pairs j of each
_EXPERT_PLACEMENTS: dict[str, Placement] = {
    "gate_up_proj": Shard(2),  # [E, H, 2I], gate j and up j interleaved (columns 2j, 2j + 1): whole pairs per rank
    "gate_up_proj_bias": Shard(1),  # [E, 2I]: the same columns
    "down_proj": Shard(1),  # [E, I, H]: the same j, as rows
    "down_proj_bias": Replicate(),  # [E, H]: in rank 0's partial sum only (zeros on the others), so added once
    "gate_up_scale": Shard(1),  # FP8 experts: [E, 2I], one scale per output column, with its column
    "down_scale": Replicate(),  # FP8 experts: [E, H], per output column H (over the whole I), the same on every rank
}


_EXPERTS_SHARDED = "_triton_ops_tp_experts"  # on an experts module: the names GptOssMoEParallel sharded


class _ForwardOnly(torch.autograd.Function):
    """Identity whose backward refuses: the split MoE's input gradient would count the router's part once per rank."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise ShardingError("GptOssMoEParallel / SparseMoEParallel is forward-only (inference): the backward of a "
                            "mixture of experts split by its intermediate dimension is not supported")


class GptOssMoEParallel(_LocalShardStyle):
    """gpt-oss's mixture of experts (``GptOssMLP``: ``router`` + ``experts``; as it is, or run by ``fused_moe``
    after ``patch_model``, bf16 or FP8 experts) split by the experts' intermediate dimension, with no expert
    parallelism: every rank holds every expert's ``I / N`` slice and routes every token.

    - ``router``: replicated (left as it is): every rank computes the same router logits from the same input, so
      the same experts and weights.
    - ``experts.gate_up_proj`` ``[E, H, 2I]`` (gate and up interleaved column by column: ``2j`` is gate ``j``,
      ``2j + 1`` up ``j``): ``Shard(2)``, the rank's contiguous ``2I / N`` columns, i.e. the WHOLE gate/up pairs
      ``j`` in ``[r I / N, (r + 1) I / N)``; ``gate_up_proj_bias`` ``[E, 2I]`` the same columns (``Shard(1)``);
      ``down_proj`` ``[E, I, H]`` the same ``j`` (``Shard(1)``). Each rank computes the clamped SwiGLU of its pairs
      and its partial ``down_proj`` product; their sum over ranks is the one-process product.
    - ``experts.down_proj_bias`` ``[E, H]``: a replicated ``DTensor`` (the global bias), swapped during the forward
      for the bias on rank 0 and zeros on the other ranks: each expert's bias, scaled by its routing weight, enters
      the sum over ranks exactly once (not pre-divided: exact at any tensor-parallel size).
    - FP8 experts (``fused_moe.convert_experts_to_fp8``, or ``patch_model(fp8=True, fp8_experts=True)``, BEFORE
      parallelizing: the full weights are quantized, then sharded with their scales): ``gate_up_scale`` ``[E, 2I]``
      (per output column) sharded with its columns, ``down_scale`` ``[E, H]`` (per output column ``H``, computed
      over the whole ``I``) replicated, so every rank dequantizes exactly the one-process FP8 weights. W8A8 experts
      (``fp8_activations=True``, ``fp8_experts="w8a8"``) quantize each rank's half of an intermediate row with a
      scale of its own (finer than one process's, a different rounding of the same values).
    - The output (the MLP returns ``(output, router_scores)``) is all-reduced, one all-reduce per MoE block, in
      place (``output_layouts=Replicate()``); ``router_scores`` (the same on every rank) is returned as it is.

    The input is replicated (a ``DTensor`` input is redistributed to ``Replicate()``). Forward only: a backward
    through the split MoE raises :class:`ShardingError`. :class:`ShardingError` too: an intermediate size that does
    not divide by the tensor-parallel size (named), or a module that is not a gpt-oss-like MoE.
    """

    def __init__(self, *, input_layouts: Placement | None = None, output_layouts: Placement | None = None,
                 use_local_output: bool = True) -> None:
        super().__init__(input_layouts=input_layouts or Replicate(), output_layouts=output_layouts or Replicate(),
                         use_local_output=use_local_output)

    # what differs between the MoE layouts (SparseMoEParallel overrides them)
    _router_name = "router"
    _placements = _EXPERT_PLACEMENTS
    _gate_up_dim, _inter_dim = 2, 1  # gate_up_proj's 2I and down_proj's I
    _expected = "a gpt-oss mixture of experts (router; experts with gate_up_proj [E, H, 2I] and down_proj [E, I, H])"

    def _partition(self, module, mesh):
        what = type(module).__name__
        router, experts = module._modules.get(self._router_name), module._modules.get("experts")
        gate_up = _tensor(experts, "gate_up_proj") if experts is not None else None
        down = _tensor(experts, "down_proj") if experts is not None else None
        if router is None or gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3 \
                or gate_up.shape[self._gate_up_dim] != 2 * down.shape[self._inter_dim]:
            shapes = f", got {list(gate_up.shape)} and {list(down.shape)}" if gate_up is not None and \
                down is not None else ""
            raise ShardingError(f"{what}: expected {self._expected}{shapes}")
        scale = experts._buffers.get("gate_up_scale")
        if isinstance(scale, torch.Tensor) and scale.dim() == 3:
            raise ShardingError(
                f"{what}: FP8 experts with 128x128 block scales (an FP8 checkpoint's) cannot be sharded yet (their "
                "scales are per block of output rows, which the split by gate/up pairs would cut); run them unsharded")
        inter, world = down.shape[self._inter_dim], mesh.size()
        if inter % world:
            raise ShardingError(
                f"{what}: the experts' intermediate size {inter} is not divisible by the tensor-parallel size "
                f"{world}; the experts are split by whole gate/up pairs of the intermediate dimension, evenly")
        names = [n for n in self._placements if _tensor(experts, n) is not None]
        for name in names:
            _set(experts, name, _shard(_tensor(experts, name), mesh, self._placements[name], self.src_data_rank))
        experts.__dict__[_EXPERTS_SHARDED] = tuple(names)  # (not a state: no state_dict key)
        return [(experts, n) for n in names], []

    def _local_value(self, owner, name, value, mesh):
        local = _local(value)
        if name == "down_proj_bias" and _rank(mesh) != 0:
            return torch.zeros_like(local)  # the bias goes into rank 0's partial sum only
        return local

    def _input(self, module, x, mesh):
        experts = module.experts
        sharded = experts.__dict__.get(_EXPERTS_SHARDED, ())
        for name in ("gate_up_scale", "down_scale"):
            if name in experts._buffers and name not in sharded:
                raise ShardingError(
                    f"{type(module).__name__}: FP8 experts converted after parallelizing ({name} is not sharded); "
                    "convert them (fused_moe.convert_experts_to_fp8, patch_model(fp8=True, fp8_experts=True)) "
                    "first, then parallelize")
        x = _to_replicated(x, mesh, self.input_layouts)
        if x.requires_grad and torch.is_grad_enabled():
            x = _ForwardOnly.apply(x)
        return x

    def _output(self, module, out, mesh, biases):
        return _reduce(out, mesh, None, self.output_layouts, self.use_local_output)

    def _finish(self, module, out, mesh, biases):
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):  # (output, router_scores)
            return (self._output(module, out[0], mesh, biases), *out[1:])
        return super()._finish(module, out, mesh, biases)


# Qwen3-MoE's and Mixtral's experts split by I too: gate rows j, then up rows j (the same j on a rank: a strided shard
# of the concatenated rows, as shard_packed_gate_up takes them), and down_proj's columns j
_SPARSE_EXPERT_PLACEMENTS: dict[str, Placement] = {
    "gate_up_proj": _StridedShard(1, split_factor=2),  # [E, 2I, H]: rows j of gate and rows I + j of up
    "down_proj": Shard(2),  # [E, H, I]: the same j, as columns
    "gate_up_scale": _StridedShard(1, split_factor=2),  # FP8 experts: [E, 2I], one scale per output row, with its row
    "down_scale": Replicate(),  # FP8 experts: [E, H], per output row H (over the whole I), the same on every rank
}


class SparseMoEParallel(GptOssMoEParallel):
    """Qwen3-MoE's and Mixtral's sparse mixture of experts (transformers 5's ``Qwen3MoeSparseMoeBlock`` /
    ``MixtralSparseMoeBlock``: ``gate`` + ``experts``; as it is, through any experts implementation, or run by
    ``fused_moe`` after ``patch_model``, bf16 or FP8 experts) split by the experts' intermediate dimension, as
    :class:`GptOssMoEParallel` splits gpt-oss's: every rank holds every expert's ``I / N`` slice and routes every
    token.

    - ``gate`` (the router): replicated (left as it is).
    - ``experts.gate_up_proj`` ``[E, 2I, H]`` (the gate's ``I`` rows, then the up's): the rank's rows ``j`` in
      ``[r I / N, (r + 1) I / N)`` of both halves, concatenated (``_StridedShard(1, split_factor=2)``: the
      ``DTensor``'s global tensor is the model's); ``down_proj`` ``[E, H, I]`` the same ``j`` as columns
      (``Shard(2)``). No biases.
    - FP8 experts (converted BEFORE parallelizing): ``gate_up_scale`` ``[E, 2I]`` sharded with its rows,
      ``down_scale`` ``[E, H]`` replicated.
    - Qwen2-MoE's ``shared_expert`` (a gated MLP): gate and up rows, down columns, as :class:`GatedMLPParallel`
      splits a gated MLP, with no all-reduce of its own: its partial down product, scaled by the replicated
      ``shared_expert_gate``'s sigmoid, joins the rank's partial sum of the routed experts.
    - The output (a tensor) is all-reduced, one all-reduce per MoE block.

    Forward only; :class:`ShardingError` for an intermediate size the ranks do not divide, or another module.
    """

    _router_name = "gate"
    _placements = _SPARSE_EXPERT_PLACEMENTS
    _gate_up_dim, _inter_dim = 1, 2
    _expected = ("a sparse mixture of experts (gate; experts with gate_up_proj [E, 2I, H] and down_proj [E, H, I]: "
                 "Qwen3-MoE's and Mixtral's layout)")

    def _partition(self, module, mesh):
        shared = module._modules.get("shared_expert")
        if shared is None:
            return super()._partition(module, mesh)
        # Qwen2-MoE: the shared expert split as a gated MLP, without an all-reduce of its own: each rank's partial
        # down product, scaled by the (replicated) sigmoid gate, joins its routed experts' partial sum, and the
        # block's one all-reduce adds them all (the gate's scaling is linear, so the sum is the one-process output)
        what = type(module).__name__
        if not isinstance(module._modules.get("shared_expert_gate"), nn.Module):
            raise ShardingError(f"{what}: a shared expert without its shared_expert_gate")
        entries, biases = super()._partition(module, mesh)  # the experts' checks run before anything is sharded
        shared_entries, shared_biases = _partition_gated_mlp(shared, mesh, self.src_data_rank, f"{what}.shared_expert")
        return entries + shared_entries, biases + shared_biases


# ----------------------------------------------------------------------------------------------------------------
# Packed gate/up weights
# ----------------------------------------------------------------------------------------------------------------

def shard_packed_gate_up(weight: torch.Tensor, layout: str, world_size: int, rank: int) -> torch.Tensor:
    """``rank``'s share of a packed ``[2 * intermediate, ...]`` gate/up weight (or bias), packed again in ``layout``.

    A plain ``Shard(0)`` of a ``"concatenated"`` weight would give rank 0 all of the gate and the last rank all of
    the up projection; this gives every rank the same intermediate rows of both, so
    ``fused_gated_mlp(x, shard, weight_layout=layout)`` computes the rank's slice of the intermediate. (The
    ``DTensor`` placement of such a shard is ``_StridedShard(0, split_factor=2)``, as transformers' packed styles
    use.) ``"interleaved"`` rows ``[g0, u0, g1, u1, ...]`` shard contiguously.
    """
    if layout not in ("concatenated", "interleaved"):
        raise InvalidArgumentError(f"layout: expected 'concatenated' or 'interleaved', got {layout!r}")
    if weight.shape[0] % 2:
        raise ShardingError(f"weight: expected an even number of rows (packed gate and up), got {weight.shape[0]}")
    inter = weight.shape[0] // 2
    start, end = _bounds(inter, world_size, rank)
    if layout == "concatenated":
        return torch.cat([weight[start:end], weight[inter + start:inter + end]])
    return weight[2 * start:2 * end].clone()


# ----------------------------------------------------------------------------------------------------------------
# The plan for a model
# ----------------------------------------------------------------------------------------------------------------

def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers" and len(module) > 0:
            return name, module
    raise UnsupportedModelError("model: no decoder layers (an nn.ModuleList named 'layers') found")


def _tp_size(tp: DeviceMesh | int | None) -> int:
    if isinstance(tp, DeviceMesh):
        _mesh_1d(tp)
        return tp.size()
    if tp is None:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise InvalidArgumentError(f"tp: expected a DeviceMesh, a positive int or None, got {tp!r}")
    return tp


_MLP_STYLES: dict[str, Callable[[], ParallelStyle]] = {
    "gated": lambda: GatedMLPParallel(), "gpt_oss": lambda: GptOssMoEParallel(),
    "sparse": lambda: SparseMoEParallel()}


def _mlp_kind(mlp: nn.Module | None) -> str | None:
    """``"gated"`` (gate_proj / up_proj / down_proj), ``"gpt_oss"`` (router + experts) or ``"sparse"`` (gate +
    experts: Qwen3-MoE, Mixtral); None for anything else."""
    if mlp is None:
        return None
    if all(hasattr(mlp, p) for p in ("router", "experts")):
        return "gpt_oss"
    if all(hasattr(mlp, p) for p in ("gate", "experts")):
        return "sparse"
    if all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
        return "gated"
    return None


def tensor_parallel_plan(model: nn.Module, tp: DeviceMesh | int | None = None, *,
                         lm_head: bool = True) -> dict[str, ParallelStyle]:
    """The ``parallelize_module`` plan for a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / gpt-oss / Qwen3-MoE /
    Mixtral / Qwen2-MoE / Gemma / Gemma 2 / Gemma 3 text model (a causal LM or its base model; of a multimodal Gemma
    3, its ``language_model``), patched by ``patch_model`` (bf16 or FP8) or not.

    - ``layers.*.self_attn.q_proj`` / ``k_proj`` / ``v_proj``: :class:`ColwiseParallel`, whole heads per rank
      (transformers' attention reshapes with ``-1`` heads, so it runs on the local heads unchanged);
    - ``layers.*.self_attn.o_proj``: :class:`RowwiseParallel` (one all-reduce);
    - ``layers.*.self_attn``: :class:`PackedQKVParallel`: where ``patch_model`` packed q/k/v into one GEMM, the
      packing is rebuilt over the rank's heads (one local GEMM; the projections' ``DTensor`` s view its weight);
    - ``layers.*.mlp``: :class:`GatedMLPParallel` (gate/up column-, down row-parallel, one all-reduce);
    - gpt-oss: ``layers.*.self_attn``: :class:`AttentionSinksParallel` (the per-head ``sinks`` sharded with the q
      heads) instead; ``layers.*.mlp``: :class:`GptOssMoEParallel` (router replicated, every expert split by its
      intermediate dimension in whole gate/up pairs, one all-reduce);
    - Qwen3-MoE, Mixtral, Qwen2-MoE: ``layers.*.mlp``: :class:`SparseMoEParallel` (the same split of their
      ``[E, 2I, H]`` experts; Qwen2-MoE's shared expert beside them); dense layers (``mlp_only_layers``)
      :class:`GatedMLPParallel`, one entry per layer then;
    - ``lm_head`` (``lm_head=True``, a causal LM): :class:`ColwiseParallel` with the logits gathered
      (``output_layouts=Replicate()``), as transformers' ``"colwise_gather_output"``; ``lm_head=False`` leaves it
      replicated;
    - not in the plan, so replicated (every rank keeps its full copy): the embedding, every RMSNorm (the layers',
      the final one, Qwen3's QK-norms), the rotary embedding.

    ``tp`` (the 1-D mesh, or its size; default the world size) is checked against the head counts: the attention
    heads and the key/value heads must divide by it, and the experts' intermediate size too
    (:class:`ShardingError` otherwise, before anything is sharded). Apply the plan after
    ``patch_model`` (required with ``fp8=True``: the full weights are quantized, then sharded with their scales).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, nn.Module) or model_type not in TP_MODEL_TYPES:
        why = _TP_REFUSALS.get(model_type, "")
        raise UnsupportedModelError(
            f"model: tensor_parallel_plan supports config.model_type in {', '.join(map(repr, TP_MODEL_TYPES))}"
            f", got {model_type!r}{why}")
    world = _tp_size(tp)
    config = model.config
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    kv_heads = kv_heads or heads
    for name, count in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if count % world:
            raise ShardingError(
                f"model: config.{name}={count} is not divisible by the tensor-parallel size {world}; attention is "
                "split by whole heads, and uneven head counts are not supported")
    prefix, layers = _decoder_layers(model)
    sinks, mlps = set(), []  # attention with sinks, of every layer (alike); the kind of each layer's MLP
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or any(not hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise UnsupportedModelError(f"model: {prefix}.{i}.self_attn has no q_proj/k_proj/v_proj/o_proj")
        kind = _mlp_kind(mlp)
        if kind is None:
            raise UnsupportedModelError(f"model: {prefix}.{i}.mlp is neither a gated MLP (gate_proj/up_proj/down_proj) "
                                        "nor a mixture of experts (router/experts or gate/experts)")
        if kind != "gated":
            down = getattr(getattr(mlp.experts, "down_proj", None), "shape", (0, 0, 0))
            inter = down[1] if kind == "gpt_oss" else down[2]
            if inter % world:
                config_name = "intermediate_size" if kind == "gpt_oss" else (
                    "moe_intermediate_size" if hasattr(config, "moe_intermediate_size") else "intermediate_size")
                raise ShardingError(
                    f"model: {prefix}.{i}.mlp.experts: intermediate size {inter} (config.{config_name}="
                    f"{getattr(config, config_name, None)}) is not divisible by the tensor-parallel size "
                    f"{world}; the experts are split by whole gate/up pairs of the intermediate dimension, evenly")
        sinks.add(isinstance(getattr(attn, "sinks", None), torch.Tensor))
        mlps.append(kind)
    if len(sinks) > 1:
        raise UnsupportedModelError(f"model: the layers of {prefix} mix attentions with and without sinks; the "
                                    "plan's entries cover every layer alike")
    sinks_attn = sinks.pop()
    layer = f"{prefix}.*"
    plan: dict[str, ParallelStyle] = {
        f"{layer}.self_attn.q_proj": ColwiseParallel(),
        f"{layer}.self_attn.k_proj": ColwiseParallel(),
        f"{layer}.self_attn.v_proj": ColwiseParallel(),
        f"{layer}.self_attn.o_proj": RowwiseParallel(),
        # after q/k/v: packs their local shards (patched models); with sinks (gpt-oss) shards them with the q heads
        f"{layer}.self_attn": AttentionSinksParallel() if sinks_attn else PackedQKVParallel(),
    }
    if len(set(mlps)) == 1:
        plan[f"{layer}.mlp"] = _MLP_STYLES[mlps[0]]()
    else:  # Qwen3-MoE's dense layers (mlp_only_layers) beside its sparse ones: one entry per layer
        plan.update({f"{prefix}.{i}.mlp": _MLP_STYLES[kind]() for i, kind in enumerate(mlps)})
    head = getattr(model, "lm_head", None)
    if lm_head and isinstance(head, (nn.Linear, FP8Linear)):
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def parallelize_model(model: nn.Module, device_mesh: DeviceMesh | None = None, *, lm_head: bool = True,
                      src_data_rank: int | None = None) -> nn.Module:
    """``parallelize_module(model, mesh, tensor_parallel_plan(model, mesh))``; returns ``model``.

    ``device_mesh`` defaults to a 1-D mesh over the whole world on the current accelerator (or CPU). With
    ``src_data_rank=None`` (default) every rank keeps its own slice of the weights it loaded; an int scatters that
    rank's weights instead (PyTorch's default, at the cost of a collective per tensor).
    """
    if device_mesh is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        device_mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    plan = tensor_parallel_plan(model, device_mesh, lm_head=lm_head)
    parallelize_module(model, device_mesh, plan, src_data_rank=src_data_rank)
    model.triton_ops_tp_plan = plan
    return model


__all__ = ["FP8_BLOCK", "AttentionSinksParallel", "ColwiseParallel", "GatedColwiseParallel", "GatedMLPParallel",
           "GptOssMoEParallel", "PackedQKVParallel", "RowwiseParallel", "ShardingError", "SparseMoEParallel",
           "parallelize_model", "shard_packed_gate_up", "tensor_parallel_plan"]
