"""The cases of test_tensor_parallel.py, run inside each rank of a gloo process group on CPU.

Nothing heavy is imported at module level: a spawned child imports this module to find its entry point, and
``TRITON_INTERPRET=1`` must be set before triton is imported there (:func:`worker` sets it first). Every case builds
the same seeded modules on every rank, computes the one-process result, parallelizes a second copy and compares.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

CASES = {}  # the 2-rank run's cases
CASES_4 = {}  # the 4-rank run's: world-size-generic ones on shapes that 4 ranks divide


def _refused(fn, *fragments) -> None:
    """``fn()`` raises ShardingError whose message holds every fragment."""
    from triton_ops.parallel import ShardingError

    try:
        fn()
    except ShardingError as e:
        assert all(f in str(e) for f in fragments), (fragments, str(e))
    else:
        raise AssertionError(f"expected ShardingError with {fragments}")


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def case4(fn):
    CASES_4[fn.__name__] = fn
    return fn


# ----------------------------------------------------------------------------------------------------------------
# Helpers (imports inside: see the module docstring)
# ----------------------------------------------------------------------------------------------------------------

SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 131, "max_position_embeddings": 64}


def _hf_model(kind: str, seed: int = 0, **overrides):
    import torch
    import transformers

    cfg = dict(SMALL, **overrides)
    if kind == "llama":
        config, cls = transformers.LlamaConfig(**cfg), transformers.LlamaForCausalLM
    elif kind == "gemma3":  # sliding-window layers (window 4) then a full one, Gemma 3's norms around each sublayer
        kinds = ["sliding_attention", "full_attention"] * cfg["num_hidden_layers"]
        config = transformers.Gemma3TextConfig(**cfg, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                               layer_types=kinds[:cfg["num_hidden_layers"]])
        cls = transformers.Gemma3ForCausalLM
    elif kind == "gemma2":  # the same layers and norms as Gemma 3, no q/k norms, logits capped at 0.2
        kinds = ["sliding_attention", "full_attention"] * cfg["num_hidden_layers"]
        config = transformers.Gemma2Config(**cfg, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                           attn_logit_softcapping=0.2, layer_types=kinds[:cfg["num_hidden_layers"]])
        cls = transformers.Gemma2ForCausalLM
    else:
        config, cls = transformers.Qwen3Config(**cfg, head_dim=16), transformers.Qwen3ForCausalLM
    config._attn_implementation = "eager" if kind == "gemma2" else "sdpa"  # (transformers refuses sdpa for Gemma 2)
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    with torch.no_grad():  # weights large enough that the logits are not all alike
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif kind in ("gemma2", "gemma3"):  # Gemma's norm weights start at zero (a scale of 1 + weight)
                p.normal_(0.0, 0.3)
    return model


def _logits(model, ids, generate: bool = False, nxt=None):
    """Prefill logits, one cached decode step's logits and (``generate``) two greedy tokens of generate(). The step
    decodes ``nxt`` (default: the prefill's greedy token), so two models can be compared on the same token."""
    import inspect

    import torch

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1) if nxt is None else nxt
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        step = model(nxt, use_cache=True, **{name: cache})
        gen = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0) if generate else None
    return out.logits, step.logits, gen, nxt


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _fp8_emulated(x, layer, k_bounds):
    """What a row-parallel FP8Linear computes: each rank quantizes its slice of x per row, multiplies by its weight
    columns (dequantized, fp32), the partial sums are added, the bias once."""
    import torch
    from fp8_gemm import quantize_fp8

    w = layer.dequantized_weight(torch.float32)
    out = 0
    for start, end in k_bounds:
        xs = x[:, start:end].contiguous()
        q, s = quantize_fp8(xs, "e4m3", "row")
        out = out + (q.float() * s) @ w[:, start:end].t()
    return out + (layer.bias.float() if layer.bias is not None else 0)


# ----------------------------------------------------------------------------------------------------------------
# Module cases
# ----------------------------------------------------------------------------------------------------------------

@case
def gated_mlp_col_row(mesh):
    """FusedGatedMLP column-parallel + down row-parallel (ours and PyTorch's) = one process; DTensor inputs."""
    import torch
    from fused_gated_mlp import FusedGatedMLP
    from torch import nn
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import RowwiseParallel as TorchRowwise
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops.parallel import GatedColwiseParallel, RowwiseParallel

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = FusedGatedMLP(64, 90, bias=True)  # 90: 45 per rank, not a power of two
            self.down = nn.Linear(90, 64, bias=True)

        def forward(self, x):
            return self.down(self.mlp(x))

    rank, world = mesh.get_local_rank(), mesh.size()
    for down_style in (RowwiseParallel(), TorchRowwise()):
        torch.manual_seed(1)
        ref, tp = Block(), Block()
        tp.load_state_dict(ref.state_dict())
        x = torch.randn(2, 5, 64)
        with torch.no_grad():
            want_h, want = ref.mlp(x), ref(x)
            parallelize_module(tp, mesh, {"mlp": GatedColwiseParallel(), "down": down_style})
            w = tp.mlp.gate_proj.weight
            assert isinstance(w, DTensor) and w.placements == (Shard(0),), w
            start, end = rank * 45, (rank + 1) * 45
            torch.testing.assert_close(w.to_local(), ref.mlp.gate_proj.weight[start:end])
            torch.testing.assert_close(tp.mlp.up_proj.weight.to_local(), ref.mlp.up_proj.weight[start:end])
            h = tp.mlp(x)  # this rank's slice of the intermediate, a plain tensor
            assert type(h) is torch.Tensor and h.shape == (2, 5, 45), (type(h), h.shape)
            torch.testing.assert_close(h, want_h[..., start:end])
            torch.testing.assert_close(tp(x), want, rtol=1e-5, atol=1e-5)
            # the parameters are DTensors again after the call
            assert isinstance(tp.mlp.gate_proj.weight, DTensor) and isinstance(tp.mlp.up_proj.bias, DTensor)
            # DTensor inputs, as the engine passes them: sharded on the batch, or replicated
            for placement in (Shard(0), Replicate()):
                xd = distribute_tensor(x, mesh, [placement])
                torch.testing.assert_close(tp(xd), want, rtol=1e-5, atol=1e-5)
    assert world == 2


@case
def gated_mlp_gradients(mesh):
    """A whole transformers MLP under GatedMLPParallel: input and weight gradients = one process."""
    import torch
    from torch.distributed.tensor.parallel import parallelize_module
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    from triton_ops.layers import GatedMLP
    from triton_ops.models.patch import patch_forward
    from triton_ops.parallel import GatedMLPParallel

    rank = mesh.get_local_rank()
    config = LlamaConfig(hidden_size=32, intermediate_size=48, mlp_bias=True)
    torch.manual_seed(2)
    ref, tp = LlamaMLP(config), LlamaMLP(config)
    tp.load_state_dict(ref.state_dict())
    for m in (ref, tp):  # the patched forward: the fused kernel, then down_proj
        patch_forward(m, GatedMLP)
    parallelize_module(tp, mesh, GatedMLPParallel())
    x = torch.randn(3, 32)
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = ref(xr), tp(xt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-5, atol=1e-5)
    start, end = rank * 24, (rank + 1) * 24
    torch.testing.assert_close(tp.gate_proj.weight.grad.to_local(), ref.gate_proj.weight.grad[start:end],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tp.down_proj.weight.grad.to_local(), ref.down_proj.weight.grad[:, start:end],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tp.down_proj.bias.grad.to_local(), ref.down_proj.bias.grad, rtol=1e-5, atol=1e-5)


@case
def packed_gate_up(mesh):
    """A packed gate/up weight re-packed per rank: the fused kernel computes the rank's intermediate slice."""
    import torch
    from fused_gated_mlp import fused_gated_mlp
    from triton_ops.parallel import shard_packed_gate_up

    rank, world = mesh.get_local_rank(), mesh.size()
    torch.manual_seed(3)
    x = torch.randn(4, 32)
    for layout in ("concatenated", "interleaved"):
        w, b = torch.randn(2 * 40, 32) * 0.2, torch.randn(2 * 40)
        want = fused_gated_mlp(x, w, None, "silu", gate_bias=b, weight_layout=layout)
        ws, bs = shard_packed_gate_up(w, layout, world, rank), shard_packed_gate_up(b, layout, world, rank)
        got = fused_gated_mlp(x, ws, None, "silu", gate_bias=bs, weight_layout=layout)
        torch.testing.assert_close(got, want[:, rank * 20:(rank + 1) * 20])


def _fp8_layer(in_f, out_f, granularity, seed=4):
    import torch
    from fp8_gemm import FP8Linear
    from torch import nn

    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=True)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
    layer = FP8Linear.from_linear(lin, weight_granularity=granularity)
    layer.path = "w8a8"  # activations quantized per row even for these few rows: what _fp8_emulated computes
    return layer


@case
def fp8_linear_col_row(mesh):
    """FP8Linear column- and row-parallel, per-channel / per-tensor / 128x128 block / group scales, against one
    process."""
    import copy

    import torch
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops.parallel import ColwiseParallel, RowwiseParallel

    rank = mesh.get_local_rank()
    # block and group scales need 128 features per rank: 256 x 256; the others run on 64 x 64 (the interpreter is
    # slow)
    for gran, size in (("channel", 64), ("tensor", 64), ("block", 256), ("group", 256)):
        x = torch.randn(3, size, generator=torch.Generator().manual_seed(5))
        ref = _fp8_layer(size, size, gran)
        want = ref(x)
        half = size // 2
        s, e = rank * half, (rank + 1) * half
        # column-parallel: the same activation scales on every rank, so this rank's columns are exactly the
        # one-process columns; the weight and its scales are sharded together
        col = parallelize_module(copy.deepcopy(ref), mesh, ColwiseParallel(output_layouts=Replicate()))
        assert col.weight.dtype == torch.float8_e4m3fn and col.weight.placements == (Shard(0),)
        assert torch.equal(col.weight.to_local().view(torch.uint8), ref.weight[s:e].view(torch.uint8))
        sc = ref.weight_scale
        want_scale = (sc if gran == "tensor" else sc[:, s:e] if gran in ("channel", "group")
                      else sc[:, rank:rank + 1])
        assert torch.equal(col.weight_scale.to_local(), want_scale), gran
        torch.testing.assert_close(col(x), want, rtol=0, atol=0)  # gathered over the ranks (an LM head's way)
        # row-parallel: each rank quantizes its own slice of the activation per row (its own scales); the
        # partial products are all-reduced and the bias added once
        row = parallelize_module(copy.deepcopy(ref), mesh, RowwiseParallel())
        assert torch.equal(row.weight.to_local().view(torch.uint8), ref.weight[:, s:e].view(torch.uint8))
        want_scale = sc[rank:rank + 1] if gran in ("block", "group") else sc  # [K/128, ...]: the rank's K groups
        assert torch.equal(row.weight_scale.to_local(), want_scale), gran
        got = row(x[:, s:e].contiguous())  # a plain input is this rank's slice (Shard(-1))
        torch.testing.assert_close(got, _fp8_emulated(x, ref, [(0, half), (half, size)]), rtol=1e-5, atol=1e-5)
        # vs one process: only the activation's FP8 rounding differs, by about what FP8 itself costs
        exact = x @ ref.dequantized_weight().t() + ref.bias
        assert _rel(got, exact) < 1.5 * _rel(want, exact) + 0.01, (gran, _rel(got, exact), _rel(want, exact))
        if gran == "channel":
            plain = parallelize_module(copy.deepcopy(ref), mesh, ColwiseParallel())
            torch.testing.assert_close(plain(x), want[:, s:e], rtol=0, atol=0)  # the local shard
            torch.testing.assert_close(row(distribute_tensor(x, mesh, [Shard(1)])), got)  # a DTensor input
            rep = parallelize_module(copy.deepcopy(ref), mesh, RowwiseParallel(input_layouts=Replicate(),
                                                                                use_local_output=False))
            out = rep(x)
            assert isinstance(out, DTensor) and out.placements == (Replicate(),)
            torch.testing.assert_close(out.to_local(), got)


@case
def fp8_block_gate_up_w8a8(mesh):
    """A patched MLP's FP8 gate/up with 128x128 block scales beyond 16 rows (two W8A8 GEMMs) under
    GatedMLPParallel: the scales and patch_model's copy of them in the GEMM's layout sharded together; = one
    process."""
    import copy

    import torch
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import parallelize_module
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    from triton_ops import layers
    from triton_ops.models.patch import _patch_gated_mlp, _quantize_gate_up
    from triton_ops.parallel import GatedMLPParallel

    rank = mesh.get_local_rank()
    torch.manual_seed(7)
    ref = LlamaMLP(LlamaConfig(hidden_size=128, intermediate_size=256, mlp_bias=True))  # one block column per rank
    _quantize_gate_up(ref, "block", "block", False)  # what patch_model(fp8=True) does to it
    _patch_gated_mlp(ref)
    tp = parallelize_module(copy.deepcopy(ref), mesh, GatedMLPParallel())
    for name in ("gate_proj", "up_proj"):
        kn, ref_kn = (getattr(getattr(m, name), layers.GEMM_SCALE_BUFFER) for m in (tp, ref))
        assert isinstance(kn, DTensor) and kn.placements == (Shard(1),), kn
        assert torch.equal(kn.to_local(), ref_kn[:, rank:rank + 1]), name
    x = torch.randn(layers.W8A8_MIN_ROWS, 128, generator=torch.Generator().manual_seed(8))
    calls, fp8_gemm = [], layers.fp8_gemm
    layers.fp8_gemm = lambda *a, **k: calls.append(k["b_scale"].shape) or fp8_gemm(*a, **k)  # the weight's scale
    try:
        with torch.no_grad():
            want, got = ref(x), tp(x)
    finally:
        layers.fp8_gemm = fp8_gemm
    assert calls == [(1, 2)] * 2 + [(1, 1)] * 2, calls  # one process's [K/128, N/128] scales, then the rank's
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@case
def fp8_block_boundary_error(mesh):
    """Block scales whose shard boundary falls inside a 128-block: a named error, the module left untouched."""
    import torch
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops.parallel import ColwiseParallel, RowwiseParallel, ShardingError

    # 192 features per rank: a block would straddle the ranks (out_features for column-, in_features for row-parallel)
    for style, what, layer in ((ColwiseParallel(), "out_features=384", _fp8_layer(128, 384, "block")),
                               (RowwiseParallel(), "in_features=384", _fp8_layer(384, 128, "block")),
                               (RowwiseParallel(), "in_features=384", _fp8_layer(384, 128, "group"))):
        try:
            parallelize_module(layer, mesh, style)
        except ShardingError as e:
            msg = str(e)
            assert what in msg and "128" in msg and "192" in msg, msg
        else:
            raise AssertionError("expected ShardingError")
        assert type(layer.weight) is torch.Tensor and type(layer.weight_scale) is torch.Tensor
    for gran in ("channel", "group"):  # per-channel scales shard anywhere; group scales along the output features
        parallelize_module(_fp8_layer(128, 384, gran), mesh, ColwiseParallel())


@case
def uneven_heads_error(mesh):
    """Head counts that do not divide by the tensor-parallel size: a named error."""
    from triton_ops.parallel import ShardingError, tensor_parallel_plan

    model = _hf_model("llama", num_key_value_heads=1)
    try:
        tensor_parallel_plan(model, mesh)
    except ShardingError as e:
        assert "num_key_value_heads=1" in str(e) and "2" in str(e), str(e)
    else:
        raise AssertionError("expected ShardingError")


# ----------------------------------------------------------------------------------------------------------------
# Packed q/k/v under tensor parallelism
# ----------------------------------------------------------------------------------------------------------------

class _Spy:
    """Counts, while active, the packed q/k/v GEMMs run (QKVPacking calls), the modules whose ColwiseParallel
    hooks ran (a packed attention's q/k/v projections must not: their one GEMM stands in for them) and the split
    MLPs whose down projection a decoder layer ran with the residual added before the all-reduce."""

    def __enter__(self):
        from triton_ops.models.layers import QKVPacking
        from triton_ops.parallel import ColwiseParallel, LocalShards

        self.packed_calls, self.colwise_modules, self.residual_tails = 0, set(), 0
        self._saved = [(QKVPacking, "__call__", QKVPacking.__call__), (ColwiseParallel, "_input",
                                                                      ColwiseParallel._input),
                       (LocalShards, "all_reduce", LocalShards.all_reduce)]
        call, inp, reduce = QKVPacking.__call__, ColwiseParallel._input, LocalShards.all_reduce

        def counted_reduce(shards, out):  # a decoder layer ran a split MLP's tail with the residual in it
            self.residual_tails += 1
            return reduce(shards, out)

        def counted_call(packing, x, *rest):
            self.packed_calls += 1
            return call(packing, x, *rest)

        def recorded_input(style, module, x, mesh):
            self.colwise_modules.add(id(module))
            return inp(style, module, x, mesh)

        QKVPacking.__call__, ColwiseParallel._input = counted_call, recorded_input
        LocalShards.all_reduce = counted_reduce
        return self

    def __exit__(self, *exc):
        for owner, name, value in self._saved:
            setattr(owner, name, value)


def _local_rows(t, rank, n):
    return t[rank * n:(rank + 1) * n]


def _same(a, b) -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.itemsize == 1:  # FP8: compare the bytes
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def _check_packed_qkv(tp, ref, mesh, *, fp8: bool = False) -> None:
    """Every attention of the parallelized model keeps ONE packed q/k/v GEMM over this rank's heads: a local
    ``[q_local + 2 * kv_local, hidden]`` weight whose rows the projections' DTensor weights (and FP8 scales) hold as
    their local tensors (the same memory), the global tensors unchanged (``ref``: the same model patched in one
    process), the rank's q/k/v equal to what the three sharded projections give, and ``torch.save`` of the state
    dict working."""
    import io

    import torch
    from torch.distributed.tensor import DTensor, Shard
    from triton_ops.models.layers import PACKING_ATTR

    rank, world = mesh.get_local_rank(), mesh.size()
    cfg = tp.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q_local, kv_local = cfg.num_attention_heads * head_dim // world, cfg.num_key_value_heads * head_dim // world
    x = torch.randn(2, 3, cfg.hidden_size, generator=torch.Generator().manual_seed(7))
    for layer, ref_layer in zip(tp.model.layers, ref.model.layers, strict=True):
        attn, ref_attn = layer.self_attn, ref_layer.self_attn
        packing = attn.__dict__.get(PACKING_ATTR)
        assert packing is not None, "the attention lost its packed q/k/v projection"
        assert packing.sharded and packing.fp8 == fp8 and packing.valid(attn), (packing.sharded, packing.fp8)
        assert packing.sizes == (q_local, kv_local, kv_local), packing.sizes
        packed = packing.packed_weight
        assert type(packed) in (torch.Tensor, torch.nn.Parameter) and not isinstance(packed, DTensor)
        assert packed.shape == (q_local + 2 * kv_local, cfg.hidden_size), packed.shape
        start = 0
        for name, n in zip(("q_proj", "k_proj", "v_proj"), packing.sizes, strict=True):
            proj, ref_proj = getattr(attn, name), getattr(ref_attn, name)
            w = proj.weight
            assert isinstance(w, DTensor) and w.placements == (Shard(0),), (name, type(w))
            assert w.shape == ref_proj.weight.shape, (name, w.shape)  # the global shape
            local = w._local_tensor
            # no second copy: the local shard IS rows [start, start + n) of the packed weight's memory
            row_bytes = packed.stride(0) * packed.element_size()
            assert local.data_ptr() == packed.data_ptr() + start * row_bytes, name
            assert local.shape == (n, cfg.hidden_size) and local.stride() == packed.stride(), name
            assert _same(local, _local_rows(ref_proj.weight, rank, n)), name
            if fp8:
                s_local, s_packed = proj.weight_scale._local_tensor, packing.linear.weight_scale
                assert s_local.data_ptr() == s_packed[:, start:].data_ptr(), name  # per channel: [1, N]
                assert torch.equal(s_local, ref_proj.weight_scale[:, rank * n:(rank + 1) * n]), name
            else:
                assert torch.equal(w.full_tensor(), ref_proj.weight), name  # the global tensor, all-gathered
            start += n
        with torch.no_grad():  # the one GEMM = the three sharded projections (their hooks, on local shards)
            for got, proj in zip(packing(x), (attn.q_proj, attn.k_proj, attn.v_proj), strict=True):
                torch.testing.assert_close(got, proj(x), rtol=1e-5, atol=1e-5)
        assert attn.__dict__.get(PACKING_ATTR) is packing and packing.valid(attn)
    # writes through: the projection's local shard and the packed weight are one memory
    attn = tp.model.layers[0].self_attn
    packing, local = attn.__dict__[PACKING_ATTR], attn.k_proj.weight._local_tensor
    if not fp8:
        before = packing.packed_weight[q_local, 0].item()
        with torch.no_grad():
            packing.packed_weight[q_local, 0] = before + 1.0
            assert local[0, 0].item() == packing.packed_weight[q_local, 0].item() != before
            packing.packed_weight[q_local, 0] = before
    # torch.save of the state dict (DTensors over rows of one packed weight) and back
    buf = io.BytesIO()
    torch.save(tp.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    key = "model.layers.0.self_attn.v_proj.weight"
    assert isinstance(state[key], DTensor) and _same(state[key].to_local(), attn.v_proj.weight._local_tensor)


def _qkv_block(q_out: int, kv_out: int, hidden: int, seed: int = 8):
    """A bare attention-like module: q_proj / k_proj / v_proj nn.Linear with biases (no head_dim)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    block = nn.Module()
    for name, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
        lin = nn.Linear(hidden, out, bias=True)
        with torch.no_grad():
            lin.weight.normal_(0, 0.05)
        setattr(block, name, lin)
    return block


def _pack_fp8_block(block, granularity):
    """What patch_model(fp8=True) does to an attention: one FP8Linear, q/k/v FP8Linear views of it, the packing."""
    from triton_ops.models.layers import QKVPacking, pack_fp8

    linear, views = pack_fp8(block.q_proj, block.k_proj, block.v_proj, weight_granularity=granularity,
                             activation_granularity="row")
    for name, view in zip(("q_proj", "k_proj", "v_proj"), views, strict=True):
        setattr(block, name, view)
    return QKVPacking.attach(block, linear, tuple(v.out_features for v in views))


@case
def packed_qkv_bias_and_fp8_scales(mesh):
    """Packed q/k/v sharded by heads, module level: nn.Linear with biases (Qwen2-like) packs into one local
    PackedQKVLinear, biases included; FP8 with per-tensor scales, and 128x128 block scales with whole blocks of each
    of q, k and v per rank, into one local FP8Linear; blocks that would straddle two ranks: ShardingError."""
    import copy

    import torch
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops.models.layers import PACKING_ATTR, PackedQKVLinear, QKVPacking
    from triton_ops.parallel import ColwiseParallel, PackedQKVParallel, ShardingError

    def plan():
        return {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
                "": PackedQKVParallel()}

    rank = mesh.get_local_rank()
    # nn.Linear with biases: q 64, k/v 32 rows (32 / 16 per rank)
    block = _qkv_block(64, 32, 64)
    linear = PackedQKVLinear.from_linear(block.q_proj, block.k_proj, block.v_proj, share=True)
    ref_packing = QKVPacking.attach(block, linear, linear.sizes)
    ref = copy.deepcopy(block)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = ref_packing(x)
        parallelize_module(block, mesh, plan())
        packing = block.__dict__[PACKING_ATTR]
        assert packing.sharded and not packing.fp8 and packing.valid(block) and packing.sizes == (32, 16, 16)
        assert packing.packed_bias.shape == (64,) and type(packing.packed_bias) is torch.nn.Parameter
        start = 0
        for name, n in zip(("q_proj", "k_proj", "v_proj"), packing.sizes, strict=True):
            proj, ref_proj = getattr(block, name), getattr(ref, name)
            b = proj.bias
            assert isinstance(b, DTensor) and b.placements == (Shard(0),) and b.shape == ref_proj.bias.shape
            assert b._local_tensor.data_ptr() == packing.packed_bias[start:].data_ptr(), name
            assert proj.weight._local_tensor.data_ptr() == packing.packed_weight[start:].data_ptr(), name
            assert torch.equal(b.full_tensor(), ref_proj.bias) and torch.equal(b._local_tensor,
                                                                                _local_rows(ref_proj.bias, rank, n))
            start += n
        for g, w_all, proj, n in zip(packing(x), want, (block.q_proj, block.k_proj, block.v_proj), packing.sizes,
                                     strict=True):
            torch.testing.assert_close(g, proj(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g, w_all[:, rank * n:(rank + 1) * n], rtol=1e-5, atol=1e-5)
    # FP8: q 256, k/v 256 rows over 2 ranks: 128 rows (one block) of each per rank; per tensor: 64 / 32 rows
    for gran, q_out, kv_out, hidden in (("block", 256, 256, 128), ("tensor", 64, 32, 64)):
        block = _qkv_block(q_out, kv_out, hidden)
        ref_packing = _pack_fp8_block(block, gran)
        ref = copy.deepcopy(block)
        x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            want = ref_packing(x)  # one process: the packed FP8 GEMM over every head
            parallelize_module(block, mesh, plan())
            packing = block.__dict__[PACKING_ATTR]
            q_l, kv_l = q_out // 2, kv_out // 2
            assert packing is not ref_packing and packing.fp8 and packing.sharded and packing.valid(block)
            assert packing.sizes == (q_l, kv_l, kv_l) and packing.linear.weight.shape == (q_l + 2 * kv_l, hidden)
            scale = packing.linear.weight_scale
            assert scale.shape == ((1, (q_l + 2 * kv_l) // 128) if gran == "block" else (1,)), scale.shape
            start = 0
            for name, n in zip(("q_proj", "k_proj", "v_proj"), packing.sizes, strict=True):
                proj, ref_proj = getattr(block, name), getattr(ref, name)
                w, s = proj.weight, proj.weight_scale
                assert isinstance(w, DTensor) and w.placements == (Shard(0),) and w.shape == ref_proj.weight.shape
                assert w._local_tensor.data_ptr() == packing.linear.weight[start:].data_ptr(), name
                assert _same(w._local_tensor, _local_rows(ref_proj.weight, rank, n)), name
                if gran == "block":  # this rank's one block column of the projection's scales, in the packed ones
                    assert s.placements == (Shard(1),) and s._local_tensor.shape == (1, 1), s
                    assert s._local_tensor.data_ptr() == scale[:, start // 128:].data_ptr(), name
                    assert torch.equal(s._local_tensor, ref_proj.weight_scale[:, rank:rank + 1]), name
                else:  # the one scale
                    assert s.placements == (Replicate(),) and s._local_tensor.data_ptr() == scale.data_ptr()
                    assert torch.equal(s._local_tensor, ref_proj.weight_scale)
                assert torch.equal(proj.bias._local_tensor, _local_rows(ref_proj.bias, rank, n))
                start += n
            got = packing(x)
            for g, w_all, proj, n in zip(got, want, (block.q_proj, block.k_proj, block.v_proj), packing.sizes,
                                         strict=True):
                # = the sharded projection on this rank, and this rank's columns of the one-process GEMM
                torch.testing.assert_close(g, proj(x), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(g, w_all[:, rank * n:(rank + 1) * n], rtol=1e-5, atol=1e-5)
    # k/v of 128 rows: 64 per rank, half a block: refused by k_proj's ColwiseParallel, named, before packing
    block = _qkv_block(256, 128, 128)
    _pack_fp8_block(block, "block")
    try:
        parallelize_module(block, mesh, plan())
    except ShardingError as e:
        assert "out_features=128" in str(e) and "64" in str(e) and "128" in str(e), str(e)
    else:
        raise AssertionError("expected ShardingError")


@case
def packed_qkv_refusals_and_custom_plans(mesh):
    """Uneven heads (the plan, and PackedQKVParallel in a custom plan), a plan in the wrong order: ShardingError
    naming the counts / the order; a custom plan without PackedQKVParallel: the packing is rebuilt per rank at the
    first forward."""
    import torch
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops import patch_model
    from triton_ops.models.layers import PACKING_ATTR
    from triton_ops.parallel import ColwiseParallel, PackedQKVParallel, tensor_parallel_plan

    # 3 heads (and 3 kv heads) of 16 over 2 ranks
    model = patch_model(_hf_model("llama", hidden_size=48, num_attention_heads=3, num_key_value_heads=3,
                                  num_hidden_layers=1))
    attn = model.model.layers[0].self_attn
    assert attn.__dict__.get(PACKING_ATTR) is not None
    _refused(lambda: tensor_parallel_plan(model, mesh), "num_attention_heads=3", "tensor-parallel size 2")
    assert type(attn.q_proj.weight) is torch.nn.Parameter  # refused before anything was sharded
    # a custom plan that shards q/k/v anyway: the packing style names the heads that do not divide
    qkv = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel()}
    _refused(lambda: parallelize_module(attn, mesh, {**qkv, "": PackedQKVParallel()}),
           "q_proj: 48 output features (3 heads of head_dim 16)", "tensor-parallel size 2")
    # the packing style before the projections are sharded
    model = patch_model(_hf_model("llama", num_hidden_layers=1))
    attn = model.model.layers[0].self_attn
    _refused(lambda: parallelize_module(attn, mesh, {"": PackedQKVParallel(), **qkv}), "ColwiseParallel first")
    # a plan without PackedQKVParallel (bf16): the stale packing is rebuilt over the rank's heads at the first forward
    ref = patch_model(_hf_model("llama", num_hidden_layers=1))
    model = patch_model(_hf_model("llama", num_hidden_layers=1))
    plan = {k: v for k, v in tensor_parallel_plan(model, mesh).items() if not isinstance(v, PackedQKVParallel)}
    parallelize_module(model, mesh, plan)
    attn = model.model.layers[0].self_attn
    stale = attn.__dict__[PACKING_ATTR]
    assert not stale.sharded and not stale.valid(attn)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)
    _check_packed_qkv(model, ref, mesh)


# ----------------------------------------------------------------------------------------------------------------
# Model cases
# ----------------------------------------------------------------------------------------------------------------

def _model_case(kind: str, mesh, *, fp8: bool = False, patch: bool = True, reverse: bool = False,
                layers: int = 2, generate: bool = False, helper: bool = False, ids=None, **overrides) -> None:
    import torch
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops import patch_model
    from triton_ops.parallel import parallelize_model, tensor_parallel_plan

    ref, tp = (_hf_model(kind, num_hidden_layers=layers, **overrides),
               _hf_model(kind, num_hidden_layers=layers, **overrides))
    if fp8:
        plain = _hf_model(kind, num_hidden_layers=layers, **overrides)  # the fp32 model, unpatched
    # the tiny model's 64-wide projections cannot split 128x128 blocks over 2 ranks: per-channel FP8 (every Linear)
    recipe = {"fp8_recipe": "channel"} if fp8 else {}
    if patch:
        patch_model(ref, fp8=fp8, **recipe)
    if patch and not reverse:
        patch_model(tp, fp8=fp8, **recipe)
    if helper:  # every rank keeps its own slice (src_data_rank=None)
        parallelize_model(tp, mesh)
    else:  # PyTorch's default: rank 0's weights scattered
        parallelize_module(tp, mesh, tensor_parallel_plan(tp, mesh))
    if patch and reverse:
        patch_model(tp, fp8=fp8, **recipe)
    assert isinstance(tp.model.layers[0].self_attn.q_proj.weight, DTensor)
    assert isinstance(tp.lm_head.weight, DTensor)  # 131 rows: uneven shards (66 + 65 or 33 x 3 + 32), gathered
    assert type(tp.model.embed_tokens.weight) is torch.nn.Parameter  # replicated: left as it is
    if patch:  # one packed q/k/v GEMM per attention and rank, over the rank's heads
        _check_packed_qkv(tp, ref, mesh, fp8=fp8)
    ids = IDS if ids is None else ids
    want = _logits(ref, ids, generate)
    with _Spy() as spy:
        got = _logits(tp, ids, generate, nxt=want[3])  # the same decode token (FP8 may pick another greedy one)
    if patch:  # every attention call ran the packed GEMM, none ran its three projections
        qkv = {id(getattr(layer.self_attn, p)) for layer in tp.model.layers for p in ("q_proj", "k_proj", "v_proj")}
        assert spy.packed_calls >= 2 * layers and not qkv & spy.colwise_modules, (spy.packed_calls, layers)
        assert id(tp.lm_head) in spy.colwise_modules  # (the spy sees the styles that did run)
        # no gradient is recorded (_logits): every layer's MLP added the residual inside its row-parallel down GEMM
        # (Gemma 3 normalizes the MLP's output before the add: no such tail)
        want_tails = 0 if kind in ("gemma2", "gemma3") else spy.packed_calls
        assert spy.residual_tails == want_tails, (spy.residual_tails, spy.packed_calls)
    if fp8:
        plain = _logits(plain, ids, nxt=want[3])
        # Row-parallel FP8 layers quantize each rank's activation slice with its own scales, so the split model
        # rounds differently from the one-process FP8 model, by about as much as FP8 itself (vs the fp32 model).
        for g, w, p in zip(got[:2], want[:2], plain[:2], strict=True):
            assert _rel(g, w) < 0.1, _rel(g, w)
            assert _rel(g, p) < 1.5 * _rel(w, p) + 0.01, (_rel(g, p), _rel(w, p))
    else:
        for g, w in zip(got[:2], want[:2], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        if generate:
            assert torch.equal(got[2], want[2]), (got[2], want[2])


IDS = None  # set by the worker: the same token ids on every rank


@case
def llama_patched(mesh):
    _model_case("llama", mesh, generate=True)


@case
def qwen3_patched(mesh):
    _model_case("qwen3", mesh, layers=1)


@case
def llama_unpatched(mesh):
    _model_case("llama", mesh, patch=False, layers=1, helper=True)


@case
def llama_parallelize_then_patch(mesh):
    _model_case("llama", mesh, reverse=True, layers=1)


@case
def qwen3_fp8(mesh):
    _model_case("qwen3", mesh, fp8=True, layers=1)


@case
def llama_fp8_prefill_rows(mesh):
    """A 20-token FP8 prefill (W8A8 rows): each rank's MLP tail is the fused one (fp8_gated_linear over its shard of
    the product), rank 0's with the residual added before the all-reduce; the decode step (one row) is not."""
    import math

    import torch
    from triton_ops import layers

    tails, real = [], layers.fp8_gated_linear
    layers.fp8_gated_linear = lambda gate, *a, **k: tails.append(gate.shape[:-1]) or real(gate, *a, **k)
    try:
        ids = torch.randint(0, SMALL["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(8))
        _model_case("llama", mesh, fp8=True, layers=1, ids=ids)
    finally:
        layers.fp8_gated_linear = real
    # the reference model (one process) and the split one each run one fused tail at the prefill
    assert len(tails) == 2 and all(math.prod(t) == 20 for t in tails), tails


@case
def gemma3_patched(mesh):
    """Gemma 3: the generic plan (its q/k norms replicated, per head) on the sandwich-norm layers, a sliding-window
    layer and a full one, generate() past the window."""
    _model_case("gemma3", mesh, generate=True)


@case
def gemma3_fp8(mesh):
    _model_case("gemma3", mesh, fp8=True, layers=1)


@case
def gemma2_patched(mesh):
    """Gemma 2: the generic plan on Gemma 3's layers, each rank's heads' logits capped (in decode_attention, and in
    the model's eager attention for the prompt), a prefill and a cached step (Gemma 3's case runs generate())."""
    _model_case("gemma2", mesh)


# ----------------------------------------------------------------------------------------------------------------
# Four ranks: shards of a quarter (the same plans; every head, column and row split four ways)
# ----------------------------------------------------------------------------------------------------------------

# 8 q heads and 4 kv heads of 16 (Llama: hidden 128; Qwen3's head_dim is 16 already): one kv head per rank
FOUR_RANK_HEADS = {"llama": {"hidden_size": 128, "num_attention_heads": 8, "num_key_value_heads": 4},
                   "qwen3": {"num_attention_heads": 8, "num_key_value_heads": 4}}


@case4
def four_ranks_gated_mlp_and_fp8_linear(mesh):
    """FusedGatedMLP column-parallel + down row-parallel, FP8Linear (per-channel) column- and row-parallel: each
    rank a quarter of the intermediate / the features, against one process."""
    import copy

    import torch
    from fused_gated_mlp import FusedGatedMLP
    from torch import nn
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops.parallel import ColwiseParallel, GatedColwiseParallel, RowwiseParallel

    rank, world = mesh.get_local_rank(), mesh.size()
    assert world == 4
    torch.manual_seed(1)
    mlp, down = FusedGatedMLP(64, 4 * 23, bias=True), nn.Linear(4 * 23, 64, bias=True)  # 23 per rank
    tp_mlp, tp_down = copy.deepcopy(mlp), copy.deepcopy(down)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        want_h = mlp(x)
        want = down(want_h)
        parallelize_module(tp_mlp, mesh, GatedColwiseParallel())
        parallelize_module(tp_down, mesh, RowwiseParallel())
        h = tp_mlp(x)
        torch.testing.assert_close(h, want_h[..., rank * 23:(rank + 1) * 23])
        torch.testing.assert_close(tp_down(h), want, rtol=1e-5, atol=1e-5)
        size, quarter = 64, 16
        x = torch.randn(3, size, generator=torch.Generator().manual_seed(5))
        ref = _fp8_layer(size, size, "channel")
        want = ref(x)
        s, e = rank * quarter, (rank + 1) * quarter
        col = parallelize_module(copy.deepcopy(ref), mesh, ColwiseParallel(output_layouts=Replicate()))
        assert torch.equal(col.weight.to_local().view(torch.uint8), ref.weight[s:e].view(torch.uint8))
        assert torch.equal(col.weight_scale.to_local(), ref.weight_scale[:, s:e])
        torch.testing.assert_close(col(x), want, rtol=0, atol=0)
        row = parallelize_module(copy.deepcopy(ref), mesh, RowwiseParallel())
        got = row(x[:, s:e].contiguous())
        bounds = [(r * quarter, (r + 1) * quarter) for r in range(world)]
        torch.testing.assert_close(got, _fp8_emulated(x, ref, bounds), rtol=1e-5, atol=1e-5)


@case4
def four_ranks_llama_patched(mesh):
    _model_case("llama", mesh, layers=1, **FOUR_RANK_HEADS["llama"])


@case4
def four_ranks_qwen3_fp8(mesh):
    _model_case("qwen3", mesh, fp8=True, layers=1, **FOUR_RANK_HEADS["qwen3"])


@case4
def four_ranks_uneven_heads_error(mesh):
    """2 kv heads over 4 ranks: refused, naming the count and the size."""
    from triton_ops.parallel import tensor_parallel_plan

    _refused(lambda: tensor_parallel_plan(_hf_model("llama"), mesh), "num_key_value_heads=2", "4")


# ----------------------------------------------------------------------------------------------------------------
# gpt-oss: attention sinks sharded with the q heads, experts split by their intermediate dimension
# ----------------------------------------------------------------------------------------------------------------

def _gpt_oss(seed: int = 0, **overrides):
    """A tiny random gpt-oss (transformers' own classes, fp32): 2 layers (sliding window 4, then full), 4 heads of
    16 (2 kv heads), 4 experts of intermediate 48 (top 2); experts, router, biases (the attention's too) and sinks
    large enough that the routing and the SwiGLU clamp (limit 7) matter."""
    import torch
    import transformers

    cfg = {"hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "vocab_size": SMALL["vocab_size"], "num_local_experts": 4,
           "num_experts_per_tok": 2, "max_position_embeddings": 64, "sliding_window": 4,
           "layer_types": ["sliding_attention", "full_attention"], **overrides}
    config = transformers.GptOssConfig(**cfg)
    config._attn_implementation = "eager"  # the sinks: transformers runs gpt-oss's attention eager
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name:
                p.normal_(0.0, 0.3 if p.dim() >= 2 else 1.0)
            elif "router" in name or "sinks" in name or p.dim() == 2:
                p.normal_(0.0, 0.08 if p.dim() >= 2 else 0.5)
            elif name.endswith("bias"):  # q/k/v (sharded with their rows) and o (added once after the reduction)
                p.normal_(0.0, 0.1)
    return model


def _gate_up_pairs_clamped(model, ids) -> None:
    """The test model's experts must reach the SwiGLU clamp (gate > limit or |up| > limit) for some token and
    expert, or the case would not check that each rank clamps its whole gate/up pairs."""
    import torch

    hits = []

    def hook(mod, args, out):
        x = args[0].reshape(-1, args[0].shape[-1])
        e = mod.experts
        gu = torch.einsum("th,ehn->etn", x, e.gate_up_proj) + e.gate_up_proj_bias[:, None]
        hits.append(bool((gu[..., ::2] > e.limit).any() or (gu[..., 1::2].abs() > e.limit).any()))

    handles = [layer.mlp.register_forward_hook(hook) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    assert any(hits), "the test experts never reach the SwiGLU clamp"


class _MoESpy:
    """Records, while active, the width of the experts' gate_up_proj that every fused_moe call of a patched MoE
    reads (the rank's 2 * I / N columns, not all 2 * I)."""

    def __enter__(self):
        import triton_ops.layers as layers

        self.widths, self.shapes, self._layers, self._saved = [], [], layers, layers.fused_moe

        def spy(hidden, router_w, router_b, gate_up, *args, **kwargs):
            self.widths.append(gate_up.shape[-1])
            self.shapes.append(tuple(gate_up.shape))
            return self._saved(hidden, router_w, router_b, gate_up, *args, **kwargs)

        layers.fused_moe = spy
        return self

    def __exit__(self, *exc):
        self._layers.fused_moe = self._saved


def _full(t):
    """``t.full_tensor()``; an FP8 DTensor gathered as its bytes (gloo has no FP8 collectives)."""
    import torch
    from torch.distributed.tensor import DTensor

    if t.dtype.itemsize != 1:
        return t.full_tensor()
    local = t._local_tensor.view(torch.uint8)
    full = DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
    return full.full_tensor().view(t.dtype)


def _check_expert_shards(experts, ref_experts, want: dict) -> None:
    """Each named tensor of ``experts`` is a DTensor with the given placement and local shard, whose global tensor
    is the one-process module's."""
    from torch.distributed.tensor import DTensor

    for name, (placement, local) in want.items():
        t = getattr(experts, name)
        assert isinstance(t, DTensor) and t.placements == (placement,), (name, type(t), getattr(t, "placements", 0))
        assert _same(t._local_tensor, local) and t.shape == getattr(ref_experts, name).shape, name
        assert _same(_full(t), getattr(ref_experts, name)), name


def _check_experts(mlp, ref_mlp, mesh) -> None:
    """The MoE's experts are DTensors over the rank's WHOLE gate/up pairs (FP8: with their scales), the router is
    left replicated; the global tensors are the one-process ones."""
    import torch
    from torch.distributed.tensor import Replicate, Shard

    rank, world = mesh.get_local_rank(), mesh.size()
    e, ref_e = mlp.experts, ref_mlp.experts
    inter = ref_e.down_proj.shape[1] // world
    j0, j1 = rank * inter, (rank + 1) * inter  # this rank's gate/up pairs j: columns 2j (gate) and 2j + 1 (up)
    want = {"gate_up_proj": (Shard(2), ref_e.gate_up_proj[..., 2 * j0:2 * j1]),
            "gate_up_proj_bias": (Shard(1), ref_e.gate_up_proj_bias[:, 2 * j0:2 * j1]),
            "down_proj": (Shard(1), ref_e.down_proj[:, j0:j1]),
            "down_proj_bias": (Replicate(), ref_e.down_proj_bias)}
    if "gate_up_scale" in ref_e._buffers:
        want.update(gate_up_scale=(Shard(1), ref_e.gate_up_scale[:, 2 * j0:2 * j1]),
                    down_scale=(Replicate(), ref_e.down_scale))
    _check_expert_shards(e, ref_e, want)
    # the shard's even columns are gates j0..j1 and its odd ones their ups: no pair is split between ranks
    gu = e.gate_up_proj._local_tensor
    assert _same(gu[..., 0::2], ref_e.gate_up_proj[..., 0::2][..., j0:j1])
    assert _same(gu[..., 1::2], ref_e.gate_up_proj[..., 1::2][..., j0:j1])
    assert type(mlp.router.weight) is torch.nn.Parameter and torch.equal(mlp.router.weight, ref_mlp.router.weight)


def _check_gpt_oss_shards(tp, ref, mesh) -> None:
    """Every layer's sinks are a DTensor over the rank's query heads, its experts over the rank's gate/up pairs;
    state_dict holds the global tensors."""
    import torch
    from torch.distributed.tensor import DTensor, Shard

    rank, world = mesh.get_local_rank(), mesh.size()
    for layer, ref_layer in zip(tp.model.layers, ref.model.layers, strict=True):
        sinks, ref_sinks = layer.self_attn.sinks, ref_layer.self_attn.sinks
        assert isinstance(sinks, DTensor) and sinks.placements == (Shard(0),), sinks
        assert torch.equal(sinks._local_tensor, _local_rows(ref_sinks, rank, ref_sinks.shape[0] // world))
        assert torch.equal(sinks.full_tensor(), ref_sinks)
        _check_experts(layer.mlp, ref_layer.mlp, mesh)
    key = "model.layers.1.mlp.experts.gate_up_proj"
    state = tp.state_dict()
    assert isinstance(state[key], DTensor) and torch.equal(state[key].full_tensor(), ref.state_dict()[key])


def _gpt_oss_case(mesh, *, patch: bool, generate: bool = False) -> None:
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops import patch_model
    from triton_ops.parallel import AttentionSinksParallel, GptOssMoEParallel, parallelize_model, tensor_parallel_plan

    ref, tp = _gpt_oss(), _gpt_oss()
    _gate_up_pairs_clamped(ref, IDS)
    if patch:
        patch_model(ref)
        patch_model(tp)
        assert tp.config._attn_implementation == "triton_ops"  # the sinks reach decode_attention
        plan = tensor_parallel_plan(tp, mesh)
        parallelize_module(tp, mesh, plan)  # rank 0's weights scattered
    else:
        plan = parallelize_model(tp, mesh).triton_ops_tp_plan  # every rank keeps its own slice
    assert isinstance(plan["model.layers.*.self_attn"], AttentionSinksParallel)
    assert isinstance(plan["model.layers.*.mlp"], GptOssMoEParallel)
    _check_gpt_oss_shards(tp, ref, mesh)
    spy = _moe_model_matches(ref, tp, generate)
    if patch:  # every MoE call ran fused_moe on the rank's gate/up pairs
        assert spy.widths and set(spy.widths) == {2 * 48 // mesh.size()}, spy.widths


def _moe_model_matches(ref, tp, generate: bool) -> _MoESpy:
    """The split model's prefill and cached-step logits (and greedy tokens) are the one-process model's; returns
    what the fused_moe calls of the split model read."""
    import torch

    want = _logits(ref, IDS, generate)
    with _MoESpy() as spy:
        got = _logits(tp, IDS, generate, nxt=want[3])
    for g, w in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)
    if generate:
        assert torch.equal(got[2], want[2]), (got[2], want[2])
    return spy


@case
def gpt_oss_patched(mesh):
    _gpt_oss_case(mesh, patch=True, generate=True)


@case
def gpt_oss_unpatched(mesh):
    _gpt_oss_case(mesh, patch=False)


@case
def gpt_oss_moe_bf16_and_fp8_experts(mesh):
    """The MoE alone, patched (fused_moe): bf16 experts against one process in bf16 (and as close to fp32 as it);
    FP8 experts (convert_experts_to_fp8 before parallelizing) against one process with the same FP8 weights, the
    scales sharded with their columns; W8A8 experts (fp8_activations=True) likewise, each rank quantizing its own
    half of an intermediate row (a scale per rank: within FP8's rounding of one process, as close to fp32); a
    DTensor input; the unpatched MoE's backward refused."""
    import copy

    import torch
    from fused_moe import convert_experts_to_fp8, uses_fp8_activations
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops.layers import GptOssMoE
    from triton_ops.models.patch import patch_forward
    from triton_ops.parallel import GptOssMoEParallel, ShardingError

    model = _gpt_oss(num_hidden_layers=1, layer_types=["full_attention"])
    plain = model.model.layers[0].mlp  # transformers' GptOssMLP, fp32
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        exact = plain(x)[0]
    for fp8 in (False, True, "w8a8"):
        ref = copy.deepcopy(plain)
        patch_forward(ref, GptOssMoE)
        if fp8:
            convert_experts_to_fp8(ref.experts, fp8_activations=fp8 == "w8a8")
            xin = x
        else:
            ref = ref.to(torch.bfloat16)
            xin = x.to(torch.bfloat16)
        tp = copy.deepcopy(ref)
        with torch.no_grad():
            want, want_scores = ref(xin)
            parallelize_module(tp, mesh, GptOssMoEParallel())
            _check_experts(tp, ref, mesh)
            got, scores = tp(xin)
            assert torch.equal(scores, want_scores)  # the same routing on every rank, not reduced
            if fp8 == "w8a8":  # the ranks' own row scales of the intermediate: FP8's rounding, a different draw
                assert uses_fp8_activations(tp.experts)
                # the shards stay K-major (FP8 wgmma's operand order), as the one-process weights
                assert tp.experts.gate_up_proj._local_tensor.stride(1) == 1
                assert tp.experts.down_proj._local_tensor.stride(1) == 1
                assert 0 < _rel(got, want) < 0.05, _rel(got, want)
                assert _rel(got, exact) < 1.5 * _rel(want, exact) + 1e-2, (_rel(got, exact), _rel(want, exact))
            elif fp8:  # the same FP8 weights and scales: the one-process result up to the sum's order
                torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
            else:  # bf16: two partial sums rounded to bf16, then added
                assert _rel(got, want) < 1e-2, _rel(got, want)
                assert _rel(got, exact) < 1.5 * _rel(want, exact) + 1e-3, (_rel(got, exact), _rel(want, exact))
            # a DTensor input (sharded on the batch) is gathered first
            torch.testing.assert_close(tp(distribute_tensor(xin, mesh, [Shard(0)]))[0], got, rtol=0, atol=0)
    # transformers' own MoE (no kernel) split the same way: exact; a gradient to record is refused at backward
    tp = copy.deepcopy(plain)
    parallelize_module(tp, mesh, GptOssMoEParallel())
    with torch.no_grad():
        torch.testing.assert_close(tp(x)[0], exact, rtol=2e-5, atol=2e-5)
    xg = x.clone().requires_grad_()
    out = tp(xg)[0]
    torch.testing.assert_close(out.detach(), exact, rtol=2e-5, atol=2e-5)
    try:
        out.sum().backward()
    except ShardingError as e:
        assert "forward-only" in str(e), str(e)
    else:
        raise AssertionError("expected ShardingError at backward")


@case
def gpt_oss_refusals(mesh):
    """An intermediate size that does not divide by the tensor-parallel size: the plan and the MoE style refuse it,
    naming the sizes, before anything is sharded; the sinks style before q_proj's; FP8 experts converted after
    parallelizing."""
    import torch
    from fused_moe import convert_experts_to_fp8
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops.parallel import AttentionSinksParallel, GptOssMoEParallel, tensor_parallel_plan

    model = _gpt_oss(intermediate_size=45, num_hidden_layers=1, layer_types=["full_attention"])
    mlp = model.model.layers[0].mlp
    _refused(lambda: tensor_parallel_plan(model, mesh), "intermediate size 45", "intermediate_size=45",
           "tensor-parallel size 2")
    _refused(lambda: parallelize_module(mlp, mesh, GptOssMoEParallel()), "intermediate size 45",
           "tensor-parallel size 2")
    assert type(mlp.experts.gate_up_proj) is torch.nn.Parameter  # refused before anything was sharded
    attn = _gpt_oss(num_hidden_layers=1, layer_types=["full_attention"]).model.layers[0].self_attn
    _refused(lambda: parallelize_module(attn, mesh, AttentionSinksParallel()), "ColwiseParallel first")
    assert type(attn.sinks) is torch.nn.Parameter
    # FP8 experts converted after the split (their scales never sharded): named at the first forward
    mlp = _gpt_oss(num_hidden_layers=1, layer_types=["full_attention"]).model.layers[0].mlp
    parallelize_module(mlp, mesh, GptOssMoEParallel())
    convert_experts_to_fp8(mlp.experts)
    with torch.no_grad():
        _refused(lambda: mlp(torch.randn(1, 2, 64)), "converted after parallelizing", "first, then parallelize")


def _sparse_moe(kind: str, seed: int = 0, **overrides):
    """A tiny random Qwen3-MoE (layer 0 sparse: 8 experts of intermediate 32, top 3; layer 1 dense:
    mlp_only_layers), Qwen2-MoE (the same, with a shared expert of intermediate 48 behind its sigmoid gate, q/k/v
    biases, unnormalized top-k weights) or Mixtral (4 experts of intermediate 32, top 2), transformers' own classes,
    fp32."""
    import torch
    import transformers

    if kind == "qwen2_moe":
        cfg = {**SMALL, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "num_experts": 8,
               "num_experts_per_tok": 3, "norm_topk_prob": False, "mlp_only_layers": [1], **overrides}
        config, cls = transformers.Qwen2MoeConfig(**cfg), transformers.Qwen2MoeForCausalLM
    elif kind == "qwen3_moe":
        cfg = {**SMALL, "head_dim": 16, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 3,
               "norm_topk_prob": True, "mlp_only_layers": [1], **overrides}
        config, cls = transformers.Qwen3MoeConfig(**cfg), transformers.Qwen3MoeForCausalLM
    else:
        cfg = {**SMALL, "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2, **overrides}
        config, cls = transformers.MixtralConfig(**cfg), transformers.MixtralForCausalLM
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model


def _check_sparse_experts(mlp, ref_mlp, mesh) -> None:
    """A sparse MoE's experts are DTensors over the rank's rows j of the gate AND of the up half (a strided shard
    whose global tensor is the model's), down_proj over the same columns j (FP8: the scales with their rows); the
    router (gate) is left replicated."""
    import torch
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    rank, world = mesh.get_local_rank(), mesh.size()
    e, ref_e = mlp.experts, ref_mlp.experts
    inter = ref_e.down_proj.shape[2]
    j0, j1 = rank * inter // world, (rank + 1) * inter // world

    def rows(t):  # gate rows j0..j1, then up rows I + j0..I + j1
        return torch.cat([t[:, j0:j1], t[:, inter + j0:inter + j1]], dim=1)

    want = {"gate_up_proj": (_StridedShard(1, split_factor=2), rows(ref_e.gate_up_proj)),
            "down_proj": (Shard(2), ref_e.down_proj[..., j0:j1])}
    if "gate_up_scale" in ref_e._buffers:
        want.update(gate_up_scale=(_StridedShard(1, split_factor=2), rows(ref_e.gate_up_scale)),
                    down_scale=(Replicate(), ref_e.down_scale))
    _check_expert_shards(e, ref_e, want)
    assert type(mlp.gate.weight) is torch.nn.Parameter and torch.equal(mlp.gate.weight, ref_mlp.gate.weight)


def _check_shared_expert(mlp, ref_mlp, mesh) -> None:
    """Qwen2-MoE's shared expert: gate and up rows j, down columns j of the rank (DTensors over the model's
    weights); its one-output gate replicated (left as it is)."""
    import torch
    from torch.distributed.tensor import Shard

    rank, world = mesh.get_local_rank(), mesh.size()
    shared, ref_shared = mlp.shared_expert, ref_mlp.shared_expert
    inter = ref_shared.gate_proj.weight.shape[0]
    j0, j1 = rank * inter // world, (rank + 1) * inter // world
    for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        weight, ref_weight = getattr(shared, name).weight, getattr(ref_shared, name).weight
        assert weight.placements == (Shard(dim),), (name, weight.placements)
        torch.testing.assert_close(weight.to_local(), ref_weight.narrow(dim, j0, j1 - j0), rtol=0, atol=0)
    gate, ref_gate = mlp.shared_expert_gate.weight, ref_mlp.shared_expert_gate.weight
    assert type(gate) is torch.nn.Parameter and torch.equal(gate, ref_gate)


def _sparse_moe_case(kind: str, mesh, *, patch: bool, generate: bool = False) -> None:
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops import patch_model
    from triton_ops.parallel import GatedMLPParallel, SparseMoEParallel, parallelize_model, tensor_parallel_plan

    ref, tp = _sparse_moe(kind), _sparse_moe(kind)
    if patch:
        patch_model(ref)
        patch_model(tp)
        plan = tensor_parallel_plan(tp, mesh)
        parallelize_module(tp, mesh, plan)  # rank 0's weights scattered
    else:
        plan = parallelize_model(tp, mesh).triton_ops_tp_plan  # every rank keeps its own slice
    if kind in ("qwen3_moe", "qwen2_moe"):  # a sparse layer and a dense one: an entry per layer
        assert isinstance(plan["model.layers.0.mlp"], SparseMoEParallel), plan
        assert isinstance(plan["model.layers.1.mlp"], GatedMLPParallel), plan
    else:
        assert isinstance(plan["model.layers.*.mlp"], SparseMoEParallel), plan
    _check_sparse_experts(tp.model.layers[0].mlp, ref.model.layers[0].mlp, mesh)
    if kind == "qwen2_moe":
        _check_shared_expert(tp.model.layers[0].mlp, ref.model.layers[0].mlp, mesh)
    spy = _moe_model_matches(ref, tp, generate)
    if patch:  # every sparse MoE call ran fused_moe on the rank's rows: [E, 2I / N, H]
        assert spy.shapes and {shape[1:] for shape in spy.shapes} == {(2 * 32 // mesh.size(), 64)}, spy.shapes


@case
def qwen3_moe_patched(mesh):
    _sparse_moe_case("qwen3_moe", mesh, patch=True, generate=True)


@case
def mixtral_unpatched(mesh):
    _sparse_moe_case("mixtral", mesh, patch=False)


@case
def qwen2_moe_patched(mesh):  # (no generate(): qwen3_moe_patched runs the same path through it)
    _sparse_moe_case("qwen2_moe", mesh, patch=True)


@case
def qwen2_moe_unpatched(mesh):
    _sparse_moe_case("qwen2_moe", mesh, patch=False)


@case
def sparse_moe_fp8_experts_and_refusals(mesh):
    """Mixtral's MoE alone, patched, with FP8 experts converted before parallelizing: the one-process result with
    the same FP8 weights, the scales sharded with their rows; an intermediate size the ranks do not divide is
    refused before anything is sharded."""
    import copy

    import torch
    from fused_moe import convert_experts_to_fp8
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops import patch_model
    from triton_ops.parallel import SparseMoEParallel, tensor_parallel_plan

    model = patch_model(_sparse_moe("mixtral", num_hidden_layers=1))
    ref = model.model.layers[0].mlp
    convert_experts_to_fp8(ref.experts, transposed=False)
    tp = copy.deepcopy(ref)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        want = ref(x)
        parallelize_module(tp, mesh, SparseMoEParallel())
        _check_sparse_experts(tp, ref, mesh)
        torch.testing.assert_close(tp(x), want, rtol=2e-5, atol=2e-5)
    odd = _sparse_moe("mixtral", intermediate_size=45, num_hidden_layers=1)
    _refused(lambda: tensor_parallel_plan(odd, mesh), "intermediate size 45", "intermediate_size=45",
             "tensor-parallel size 2")
    mlp = odd.model.layers[0].mlp
    _refused(lambda: parallelize_module(mlp, mesh, SparseMoEParallel()), "intermediate size 45")
    assert type(mlp.experts.gate_up_proj) is torch.nn.Parameter  # refused before anything was sharded


# ----------------------------------------------------------------------------------------------------------------
# Entry point of each rank
# ----------------------------------------------------------------------------------------------------------------

def worker(rank: int, world: int, port: int, out_dir: str, names: list[str]) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors need the interpreter
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))
    results = {"_env": {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}}
    try:
        import triton
        from triton_ops_core.pytest_plugin import install_interpreter_shortcuts

        install_interpreter_shortcuts()  # as in the pytest session that spawned this rank
        results["_env"]["interpreter"] = triton.knobs.runtime.interpret if hasattr(triton, "knobs") else None
        mesh = init_device_mesh("cpu", (world,))
        global IDS
        IDS = torch.randint(0, SMALL["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(6))
        for name in names:
            if os.environ.get("TP_CASES_DEBUG"):  # a hang: where each rank is, after the given seconds
                import faulthandler

                faulthandler.dump_traceback_later(float(os.environ["TP_CASES_DEBUG"]))
                print(f"rank {rank}: {name}", flush=True)
            t0 = time.perf_counter()
            try:
                (CASES.get(name) or CASES_4[name])(mesh)
                results[name] = {"ok": True, "s": time.perf_counter() - t0}
            except Exception:  # reported by the parent test
                results[name] = {"ok": False, "s": time.perf_counter() - t0, "error": traceback.format_exc()}
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()
