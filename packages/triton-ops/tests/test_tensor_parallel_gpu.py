"""Tensor parallelism on one GPU: a single-rank NCCL group (world size 1) runs the documented plan on a patched
Llama, bf16 and FP8. With one rank every shard is the whole tensor, so the parallelized model must give the
unsharded model's logits exactly, and one decode step must launch the same kernels (NCCL's aside): the plan adds
no copy and no launch of its own. The runs on two GPUs are their own issue (machines of several GPUs are not lent
here); the CPU tests run two gloo ranks (test_tensor_parallel.py)."""

from __future__ import annotations

import inspect
import socket
from collections import Counter
from datetime import timedelta

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.gpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60), device_id=torch.device("cuda", 0))
    try:
        yield init_device_mesh("cuda", (1,))
    finally:
        dist.destroy_process_group()


def _llama(seed: int = 0) -> torch.nn.Module:
    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                                      max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.04)
    return model


def _decode_kernels(model, ids) -> tuple[torch.Tensor, Counter]:
    """One cached decode step's logits and the CUDA kernels it launched, by name (NCCL's left out)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
        nxt = ids[:, -1:]
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model(nxt, use_cache=True, **{name: cache})  # warm-up: plans and configs chosen
        out = model(ids, use_cache=True)
        cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step = model(nxt, use_cache=True, **{name: cache}).logits
            torch.cuda.synchronize()
    kernels = Counter(e.name for e in prof.events() if e.device_type.name == "CUDA" and "nccl" not in e.name.lower())
    return step, kernels


def _kinds(kernels: Counter) -> Counter:
    # cuBLAS and torch.cat may pick other variants for the (contiguous, cloned) local shards than for the unsharded
    # weights, so kernels are compared by count and kind, not by full name
    out = Counter()
    for name, n in kernels.items():
        kind = "gemm" if ("nvjet" in name or "gemm" in name.lower()) else "cat" if "CatArray" in name else name
        out[kind] += n
    return out


def _same_logits_and_launches(ref: torch.nn.Module, tp: torch.nn.Module) -> None:
    """The parallelized model's prefill and decode-step logits are the unsharded model's bit for bit, and its decode
    step launches the same kernels (NCCL's aside)."""
    ids = torch.randint(0, 1000, (2, 17), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    with torch.no_grad():
        want, got = ref(ids).logits, tp(ids).logits
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    want_step, want_kernels = _decode_kernels(ref, ids)
    got_step, got_kernels = _decode_kernels(tp, ids)
    torch.testing.assert_close(got_step, want_step, rtol=0, atol=0)
    assert sum(got_kernels.values()) == sum(want_kernels.values()), (dict(got_kernels), dict(want_kernels))
    extra, missing = _kinds(got_kernels) - _kinds(want_kernels), _kinds(want_kernels) - _kinds(got_kernels)
    assert not extra and not missing, f"extra kernels {dict(extra)}; missing {dict(missing)}"


@pytest.mark.parametrize("pack_qkv", [True, False], ids=["packed_qkv", "three_projections"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_single_rank_plan_matches_the_unsharded_model_and_adds_no_kernel(mesh, fp8, pack_qkv):
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops import patch_model
    from triton_ops.models.layers import PACKING_ATTR
    from triton_ops.parallel import tensor_parallel_plan

    if fp8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    # The unsharded patched layer adds the residual inside its down GEMM (addmm_ / fp8_linear_add_); the split one
    # adds it on rank 0 inside its partial product before the all-reduce: the same launches, no add of its own.
    ref, tp = _llama(), _llama()
    # packed (patch_model's default): the plan keeps one q/k/v GEMM per rank over its heads (PackedQKVParallel),
    # so the kernels must be the unsharded model's; three projections: each sharded on its own
    recipe = {"fp8_recipe": "channel", "pack_qkv": pack_qkv} if fp8 else {"pack_qkv": pack_qkv}
    patch_model(ref, fp8=fp8, **recipe)
    patch_model(tp, fp8=fp8, **recipe)
    parallelize_module(tp, mesh, tensor_parallel_plan(tp, mesh))
    assert any(isinstance(p, DTensor) for p in tp.parameters())
    packed = [PACKING_ATTR in layer.self_attn.__dict__ for layer in tp.model.layers]
    assert packed == [pack_qkv] * len(packed), packed
    _same_logits_and_launches(ref, tp)


def _gpt_oss(seed: int = 0) -> torch.nn.Module:
    config = transformers.GptOssConfig(hidden_size=512, intermediate_size=512, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=1000,
                                       num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
                                       sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(config).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.04 if p.dim() >= 2 else 0.2)
    return model


def test_single_rank_gpt_oss_plan_matches_the_unsharded_model_and_adds_no_kernel(mesh, monkeypatch):
    """gpt-oss's plan (heads with their sinks and biases, the experts by their intermediate dimension, the router
    replicated) on one rank: the patched unsharded model's logits bit for bit and the same kernels per decode step.
    Sharded experts add the residual after their all-reduce, so the unsharded model is compared with its residual
    add out of the MoE's combine as well (inside it, the sum is rounded once: not the same bits)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module
    from triton_ops import patch_model
    from triton_ops.models import decoder_layers

    monkeypatch.setattr(decoder_layers, "RESIDUAL_IN_MOE_COMBINE", False)
    from triton_ops.parallel import tensor_parallel_plan

    ref, tp = patch_model(_gpt_oss()), patch_model(_gpt_oss())
    parallelize_module(tp, mesh, tensor_parallel_plan(tp, mesh))
    assert isinstance(tp.model.layers[0].mlp.experts.gate_up_proj, DTensor)
    _same_logits_and_launches(ref, tp)
