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

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
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
    else:
        config, cls = transformers.Qwen3Config(**cfg, head_dim=16), transformers.Qwen3ForCausalLM
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    with torch.no_grad():  # weights large enough that the logits are not all alike
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
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
    from triton_ops.models.patch import _patched_class
    from triton_ops.parallel import GatedMLPParallel

    rank = mesh.get_local_rank()
    config = LlamaConfig(hidden_size=32, intermediate_size=48, mlp_bias=True)
    torch.manual_seed(2)
    ref, tp = LlamaMLP(config), LlamaMLP(config)
    tp.load_state_dict(ref.state_dict())
    for m in (ref, tp):  # the patched forward: the fused kernel, then down_proj
        m.__class__ = _patched_class(type(m), GatedMLP)
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
    """FP8Linear column- and row-parallel, per-channel / per-tensor / 128x128 block scales, against one process."""
    import copy

    import torch
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops.parallel import ColwiseParallel, RowwiseParallel

    rank = mesh.get_local_rank()
    # block scales need 128 features per rank: 256 x 256; the others run on 64 x 64 (the interpreter is slow)
    for gran, size in (("channel", 64), ("tensor", 64), ("block", 256)):
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
        want_scale = sc if gran == "tensor" else sc[:, s:e] if gran == "channel" else sc[:, rank:rank + 1]
        assert torch.equal(col.weight_scale.to_local(), want_scale), gran
        torch.testing.assert_close(col(x), want, rtol=0, atol=0)  # gathered over the ranks (an LM head's way)
        # row-parallel: each rank quantizes its own slice of the activation per row (its own scales); the
        # partial products are all-reduced and the bias added once
        row = parallelize_module(copy.deepcopy(ref), mesh, RowwiseParallel())
        assert torch.equal(row.weight.to_local().view(torch.uint8), ref.weight[:, s:e].view(torch.uint8))
        want_scale = sc[rank:rank + 1] if gran == "block" else sc
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
def fp8_block_boundary_error(mesh):
    """Block scales whose shard boundary falls inside a 128-block: a named error, the module left untouched."""
    import torch
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops.parallel import ColwiseParallel, RowwiseParallel, ShardingError

    # 192 features per rank: a block would straddle the ranks (out_features for column-, in_features for row-parallel)
    for style, what, layer in ((ColwiseParallel(), "out_features=384", _fp8_layer(128, 384, "block")),
                               (RowwiseParallel(), "in_features=384", _fp8_layer(384, 128, "block"))):
        try:
            parallelize_module(layer, mesh, style)
        except ShardingError as e:
            msg = str(e)
            assert what in msg and "128" in msg and "192" in msg, msg
        else:
            raise AssertionError("expected ShardingError")
        assert type(layer.weight) is torch.Tensor and type(layer.weight_scale) is torch.Tensor
    ok = _fp8_layer(128, 384, "channel")  # per-channel scales shard anywhere
    parallelize_module(ok, mesh, ColwiseParallel())


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
# Model cases
# ----------------------------------------------------------------------------------------------------------------

def _model_case(kind: str, mesh, *, fp8: bool = False, patch: bool = True, reverse: bool = False,
                layers: int = 2, generate: bool = False, helper: bool = False) -> None:
    import torch
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops import patch_model
    from triton_ops.parallel import parallelize_model, tensor_parallel_plan

    ref, tp = _hf_model(kind, num_hidden_layers=layers), _hf_model(kind, num_hidden_layers=layers)
    if fp8:
        plain = _hf_model(kind, num_hidden_layers=layers)  # the fp32 model, unpatched
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
    assert isinstance(tp.lm_head.weight, DTensor)  # 131 rows: 66 and 65, the logits gathered from uneven shards
    assert type(tp.model.embed_tokens.weight) is torch.nn.Parameter  # replicated: left as it is
    want = _logits(ref, IDS, generate)
    got = _logits(tp, IDS, generate, nxt=want[3])  # the same decode token (FP8 may pick another greedy one)
    if fp8:
        plain = _logits(plain, IDS, nxt=want[3])
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
                CASES[name](mesh)
                results[name] = {"ok": True, "s": time.perf_counter() - t0}
            except Exception:  # reported by the parent test
                results[name] = {"ok": False, "s": time.perf_counter() - t0, "error": traceback.format_exc()}
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()
