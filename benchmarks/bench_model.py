"""Model-level benchmark: whole transformers decoders, unpatched against ``patch_model``, on one GPU.

    python -m benchmarks.bench_model                       # Llama-3-8B and Qwen3-8B shapes, every part
    python -m benchmarks.bench_model --models gpt-oss-20b  # gpt-oss-20b's shape (42 GB of weights)
    python -m benchmarks.bench_model --models qwen3-30b-a3b --variants transformers,patched --parts decode
    python -m benchmarks.bench_model --models llama3-8b --parts decode,generate
    python -m benchmarks.bench_model --tiny                # a 2-layer model: checks the harness (CPU: interpreter)

Each model is built from a transformers config with random bf16 weights on the GPU (nothing is downloaded), in
three variants: transformers as it is, ``patch_model(model)`` and ``patch_model(model, fp8=True, fp8_recipe="channel")``
(``--variants`` adds ``patched-fp8-default``, FP8's default recipe, ``patched-fp8-group-row``, the same with per-row
activations, and ``patched-fp8-block``). Measured, per variant, in one run:

- ``decode``: GPU time of one decode step (the profiler's kernel time, so host time is excluded) and the kernels
  it launches, at each batch size and context length, through a ``StaticCache`` (the cache of the compiled path);
  tokens/s on the GPU = batch / step time.
- ``generate``: ``generate()`` as users call it, ms per new token (prefill excluded: two lengths are timed and
  subtracted): eager with the default cache, and transformers' documented fast path (``cache_implementation=
  "static"``, which compiles the forward with CUDA graphs), batch 1.
- ``prefill``: GPU time of a 2k-token prefill (batch 1, CUDA events), eager and (unless ``--no-compile``) through
  ``torch.compile(model)``, without a cache; with ``--prefill-cache`` also compiled into an empty ``DynamicCache``
  (where a patched model's attention backend keeps SDPA's causal flash path, see :func:`measure_prefill`).
- ``accuracy``: the patched variants' last-token logits against the unpatched model's (cosine) and the greedy
  tokens of ``generate()`` (agreement over the new tokens).

The floor: every weight a decode step reads divided by the copy bandwidth measured in the same run: all parameters
but the input embedding, and of a mixture of experts only the experts the step's tokens are expected to hit
(:func:`floor_bytes`). Writes ``model-<device>.md`` / ``.json`` (and a plot of tokens/s against batch size) to
``--out`` (default ``docs/benchmarks`` on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import ROOT

PARTS = ("decode", "generate", "prefill", "accuracy")
VARIANTS = ("transformers", "patched", "patched-fp8")
# also known: FP8's default recipe (group scales, MLP output projections kept; its first/last-layer rule left out on
# these few-layer stand-ins), the same with per-row activations (group-row), blocks on every Linear, and for a mixture
# of experts the unpatched model with only its experts through fused_moe (transformers' experts interface)
EXTRA_VARIANTS = ("patched-fp8-default", "patched-fp8-group-row", "patched-fp8-block", "experts-triton_ops",
                  "transformers-fp8-checkpoint", "patched-fp8-checkpoint")
# A pre-quantized FP8 checkpoint (Qwen3-8B-FP8's recipe: E4M3 weights in 128x128 blocks, 1x128 dynamic activations)
# as transformers loads it (every Linear but the LM head its fine-grained FP8Linear; the weights quantized here from
# the random bf16 ones), as it is and patched (patch_model adopts its FP8 weights as they are).
FP8_CHECKPOINT_BLOCK = (128, 128)
# Any patched variant + this suffix: the decode step's RMSNorms inside the launches of the GEMMs they feed
# (decoder_layers.INPUT_NORM_IN_QKV and POST_NORM_IN_MLP switched on while it is measured; off by default, measured
# slower), for the before/after of those fusions in one run.
FUSED_NORMS = "-fused-norms"
# Any patched variant + this suffix (instead of FUSED_NORMS): only the input norm inside the packed q/k/v launch
# (INPUT_NORM_IN_QKV on, POST_NORM_IN_MLP as shipped): the two fusions' costs apart (session 39, H100: the
# weight-only kernel took the norm for +0.7 us a launch at one row, the gated MLP for +7.5 us).
INPUT_NORM = "-input-norm"
# Any patched variant + this suffix (after either above): the post-attention norm written by the output projection's
# launch (POST_NORM_IN_O_PROJ on while it is measured; off by default until measured).
O_PROJ_NORM = "-o-proj-norm"
# Any patched variant + one of these suffixes: measured with programmatic dependent launch on / off
# (triton_ops_core.pdl: the decode kernels launch early and prefetch their weights before waiting on the previous
# kernel; opt-in for now), whatever the environment says, for the before/after in one run. Either combines with
# FUSED_NORMS (that suffix last).
PDL_ON, PDL_OFF = "-pdl", "-no-pdl"
# Any patched variant + these suffixes: its CUDA graph captured inside triton_ops_core.scratch.keep_on (the graph keeps
# the split-K counters: one memset per graph instead of one per launch; KEEP_ON_GRAPH while it is measured), and
# measured with triton_ops_core.pdl.RELEASE_SHORT on (one-row attention, cache-write and norm launches let the next
# kernel launch once they run; the attention's mask pass before its wait; on as shipped since session 46).
KEEP_SCRATCH, RELEASE_EARLY, NO_RELEASE = "-keep", "-release", "-no-release"
KEEP_ON_GRAPH = False
# Any patched variant + this suffix: full sliding windows moved on by one shift launch a step
# (triton_ops.models.cache_updates.SLIDING_RING off while it is measured) instead of written as ring buffers.
SHIFT = "-shift"
# A patched FP8 variant + one of these suffixes: its mixtures of experts converted too, weight-only
# (``patch_model(fp8_experts=True)``) or W8A8 (``fp8_experts="w8a8"``: the activations quantized per row as well).
EXPERTS_FP8, EXPERTS_W8A8 = "-experts-fp8", "-experts-w8a8"
# A patched FP8 variant + one of these suffixes, for before/after measurements of a prefill's W8A8 fusions:
# "-unfused-norm-fp8": the norms before W8A8 projections write 16 bits and each projection quantizes them
# (triton_ops.layers.NORM_QUANTIZES_W8A8 off while it is measured, as before session 50); "-unfused-tail": that and
# the gated MLP tails unfused too (FUSED_W8A8_TAIL off: torch's activation and product, the down projection's own
# quantization, as before session 49).
UNFUSED_NORM_FP8, UNFUSED_TAIL = "-unfused-norm-fp8", "-unfused-tail"
# The suffixes a patched variant takes, each group at most once, in this order:
# ``patched-fp8-default-experts-w8a8-unfused-tail-shift-pdl-keep-release-fused-norms``.
SUFFIX_GROUPS = ((EXPERTS_FP8, EXPERTS_W8A8), (UNFUSED_NORM_FP8, UNFUSED_TAIL), (SHIFT,), (PDL_ON, PDL_OFF),
                 (KEEP_SCRATCH,), (RELEASE_EARLY, NO_RELEASE), (FUSED_NORMS, INPUT_NORM), (O_PROJ_NORM,))
# The switches as the library ships them, which every other variant is measured with.
NORM_SWITCHES = ("INPUT_NORM_IN_QKV", "POST_NORM_IN_MLP", "RESIDUAL_IN_MOE_COMBINE", "POST_NORM_IN_O_PROJ")
# Shapes of the published checkpoints (config.json of meta-llama/Meta-Llama-3-8B and Qwen/Qwen3-8B).
MODELS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192 + 256, rms_norm_eps=1e-5),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     rope_theta=1000000.0, max_position_embeddings=8192 + 256, rms_norm_eps=1e-6),
    # openai/gpt-oss-20b: 24 layers alternating sliding (128) and full attention with sinks, 32 experts, top 4.
    # transformers runs its attention eager (the sinks); 42 GB of random bf16 weights.
    "gpt-oss-20b": dict(model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088,
                        num_local_experts=32, num_experts_per_tok=4, sliding_window=128, rope_theta=150000.0,
                        rms_norm_eps=1e-5, attn_implementation="eager"),
    # Qwen/Qwen3-30B-A3B: 48 layers, 128 experts of intermediate 768, top 8 (renormalized), QK-norm; 61 GB.
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936,
                          rope_theta=1000000.0, max_position_embeddings=8192 + 256, rms_norm_eps=1e-6),
    # Qwen/Qwen1.5-MoE-A2.7B: 24 layers, 60 experts of intermediate 1408, top 4 (not renormalized), a shared expert of
    # intermediate 5632 behind a sigmoid gate, q/k/v biases; 29 GB.
    "qwen1.5-moe-a2.7b": dict(model_type="qwen2_moe", hidden_size=2048, intermediate_size=5632,
                              moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
                              num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
                              norm_topk_prob=False, vocab_size=151936, rope_theta=1000000.0,
                              max_position_embeddings=8192 + 256, rms_norm_eps=1e-6),
    # mistralai/Mixtral-8x7B-v0.1: 32 layers, 8 experts of intermediate 14336, top 2; 93 GB (one variant at a time
    # fits the H200).
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         vocab_size=32000, rope_theta=1000000.0, max_position_embeddings=8192 + 256,
                         rms_norm_eps=1e-5),
    # google/gemma-3-12b (its text decoder): 48 layers, five sliding-window (1024) layers to one full, head_dim 256,
    # norms around each sublayer, GELU-tanh MLP, a 262k vocabulary; 24 GB.
    "gemma3-12b": dict(model_type="gemma3_text", hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                       sliding_window=1024, vocab_size=262208, max_position_embeddings=8192 + 256,
                       rms_norm_eps=1e-6),
    # google/gemma-2-9b: 42 layers alternating sliding-window (4096) and full attention, head_dim 256, attention logits
    # capped at 50 (transformers runs it eager: it refuses sdpa with a cap), norms around each sublayer; 18 GB.
    "gemma2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                      sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      vocab_size=256000, max_position_embeddings=8192 + 256, rms_norm_eps=1e-6,
                      attn_implementation="eager"),
    # microsoft/phi-4: 40 layers, q/k/v packed as one qkv_proj and gate/up as one gate_up_proj; 29 GB.
    "phi4": dict(model_type="phi3", hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
                 num_attention_heads=40, num_key_value_heads=10, vocab_size=100352, rope_theta=250000.0,
                 max_position_embeddings=16384, rms_norm_eps=1e-5, pad_token_id=100349, bos_token_id=100257,
                 eos_token_id=100265),
}
DEFAULT_MODELS = ("llama3-8b", "qwen3-8b")
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=512)


@dataclass
class VariantResult:
    variant: str
    decode: list[dict[str, Any]] = field(default_factory=list)  # batch, context, gpu_us, kernels, tokens_per_s
    generate: dict[str, Any] = field(default_factory=dict)  # eager / static-compiled ms per token
    prefill: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)
    weight_bytes: int = 0
    expert_bytes: int = 0  # of weight_bytes, the mixtures of experts' expert weights (and their FP8 scales)
    peak_memory_gib: float | None = None
    patch: str | None = None
    errors: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- the models


def build_config(name: str, tiny: bool):
    from transformers import AutoConfig

    spec = dict(MODELS[name])
    model_type = spec.pop("model_type")
    if tiny:
        spec.update(TINY)
        if "num_local_experts" in spec:  # 8 experts, top 4: routing and grouping still matter, a quarter of the work
            spec["num_local_experts"] = 8
        if "num_experts" in spec:  # Qwen3-MoE: 16 small experts, top 8 (its own k), half of them chosen per token
            spec.update(num_experts=16, moe_intermediate_size=64)
        if "shared_expert_intermediate_size" in spec:  # Qwen2-MoE's shared expert, as small as the dense MLPs
            spec["shared_expert_intermediate_size"] = spec["intermediate_size"]
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids of the real vocabulary: inside the tiny one
            if spec.get(key, 0) >= spec["vocab_size"]:
                spec[key] = 0
    attn = spec.pop("attn_implementation", "sdpa")
    config = AutoConfig.for_model(model_type, **spec)
    config.tie_word_embeddings = False
    config._attn_implementation = attn
    return config


def build_model(config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The causal LM with random weights, built directly on ``device`` (the same weights for the same seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=config._attn_implementation)
    return model.eval()


def library_switches() -> tuple[bool, ...]:
    """The :data:`NORM_SWITCHES` as ``triton_ops`` ships them (whatever a variant or a test set since)."""
    from triton_ops.models import decoder_layers

    return tuple(decoder_layers.SHIPPED_SWITCHES[name] for name in NORM_SWITCHES)


def make_variant(variant: str, config, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model of ``variant``, built and patched. The norm fusions' switches are set for it (a variant is measured
    right after it is made): on for a ``FUSED_NORMS`` variant, the library's defaults for every other."""
    import triton_ops
    from triton_ops import layers as triton_layers
    from triton_ops.models import cache_updates, decoder_layers

    variant, options = split_variant(variant)
    fused = FUSED_NORMS in options
    for name, default in zip(NORM_SWITCHES, library_switches(), strict=True):
        on = ((fused and name != "POST_NORM_IN_O_PROJ") or (INPUT_NORM in options and name == "INPUT_NORM_IN_QKV")
              or (O_PROJ_NORM in options and name == "POST_NORM_IN_O_PROJ"))
        setattr(decoder_layers, name, True if on else default)
    cache_updates.SLIDING_RING = False if SHIFT in options else cache_updates.SHIPPED_SLIDING_RING
    triton_layers.FUSED_W8A8_TAIL = UNFUSED_TAIL not in options
    triton_layers.NORM_QUANTIZES_W8A8 = not (UNFUSED_TAIL in options or UNFUSED_NORM_FP8 in options)
    experts = "w8a8" if EXPERTS_W8A8 in options else EXPERTS_FP8 in options
    if experts and not variant.startswith("patched-fp8"):
        raise ValueError(f"{variant}: the experts' FP8 suffixes go with a patched FP8 variant")
    model = build_model(config, device, dtype)
    if variant.endswith("-fp8-checkpoint"):
        as_fp8_checkpoint(model)
    if variant in ("patched", "patched-fp8-checkpoint"):
        triton_ops.patch_model(model)
    elif variant == "patched-fp8":  # every Linear but the LM head, per-channel weights, per-row activations
        triton_ops.patch_model(model, fp8=True, fp8_recipe="channel", fp8_experts=experts)
    elif variant == "patched-fp8-default":
        # the default recipe's scales and MLP rule on every layer: a few-layer stand-in's first and last layers are
        # half of it, where a real model's are 2 of 24-36 (the edge rule would measure mostly bf16 here)
        from dataclasses import replace

        from fp8_gemm import RECIPES

        interior = replace(RECIPES["default"], name="default (interior layers)", keep_edge_layers=(0, 0))
        triton_ops.patch_model(model, fp8=True, fp8_recipe=interior, fp8_experts=experts)
    elif variant == "patched-fp8-group-row":  # the same, with per-row activations (faster prefill GEMMs)
        from dataclasses import replace

        from fp8_gemm import RECIPES

        interior = replace(RECIPES["group-row"], name="group-row (interior layers)", keep_edge_layers=(0, 0))
        triton_ops.patch_model(model, fp8=True, fp8_recipe=interior, fp8_experts=experts)
    elif variant == "patched-fp8-block":
        triton_ops.patch_model(model, fp8=True, fp8_recipe="block", fp8_experts=experts)
    elif variant == "experts-triton_ops":  # transformers' model, only its experts through fused_moe.moe_experts
        from triton_ops.models import register_experts_backend

        model.set_experts_implementation(register_experts_backend())
    return model


@torch.no_grad()
def _experts_as_fp8_checkpoint(model: torch.nn.Module) -> None:
    """Every gated experts module in transformers' ``[E, 2I, H]`` layout (not gpt-oss's transposed one, which its
    FP8 checkpoints do not use) replaced by an ``FP8Experts`` holding its weights per 128x128 block, one layer at a
    time. A transformers without ``FP8Experts`` keeps them."""
    from fused_moe import quantize_experts_fp8
    from transformers.integrations import finegrained_fp8

    cls = getattr(finegrained_fp8, "FP8Experts", None)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    # names, not modules: a list of the modules would keep every replaced layer's weights alive to the end
    for name in [n for n, _ in model.named_modules() if n.rpartition(".")[2] == "experts"]:
        experts = model.get_submodule(name)
        gate_up = getattr(experts, "gate_up_proj", None)
        if (cls is None or not isinstance(gate_up, torch.Tensor) or gate_up.dim() != 3
                or not gate_up.is_floating_point() or getattr(experts, "is_transposed", False)
                or not getattr(experts, "has_gate", True)):
            continue
        with torch.device("meta"):
            fp8 = cls(config, block_size=FP8_CHECKPOINT_BLOCK)
        q1, s1, q2, s2 = quantize_experts_fp8(gate_up, experts.down_proj, transposed=False, granularity="block")
        for attr, value in (("gate_up_proj", q1), ("gate_up_proj_scale_inv", s1), ("down_proj", q2),
                            ("down_proj_scale_inv", s2)):
            setattr(fp8, attr, torch.nn.Parameter(value, requires_grad=False))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, fp8.eval())
        del q1, q2, experts, gate_up


@torch.no_grad()
def as_fp8_checkpoint(model: torch.nn.Module) -> None:
    """``model`` as transformers loads its pre-quantized FP8 checkpoint (:data:`FP8_CHECKPOINT_BLOCK`): every
    ``nn.Linear`` but the LM head replaced by transformers' fine-grained ``FP8Linear`` holding the weight quantized
    per 128x128 block (``weight_scale_inv`` its dequantization factor), one layer at a time; the experts of a sparse
    mixture of experts (Qwen3-MoE's, Mixtral's) by transformers' ``FP8Experts`` likewise (``*_scale_inv``)."""
    from fused_gated_mlp import quantize_weight_fp8
    from transformers.integrations.finegrained_fp8 import FP8Linear

    _experts_as_fp8_checkpoint(model)
    lm_head = model.get_output_embeddings()
    for name in [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not lm_head]:
        linear = model.get_submodule(name)
        with torch.device("meta"):
            fp8 = FP8Linear(linear.in_features, linear.out_features, block_size=FP8_CHECKPOINT_BLOCK)
        q, scale = quantize_weight_fp8(linear.weight, "block")
        fp8.weight = torch.nn.Parameter(q, requires_grad=False)
        fp8.weight_scale_inv = torch.nn.Parameter(scale, requires_grad=False)
        fp8.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, fp8.eval())


def decode_weight_bytes(model: torch.nn.Module, experts_only: bool = False) -> int:
    """Bytes of the weights a decode step may read: every parameter and FP8 buffer but the input embedding (with
    ``experts_only``, of those the ones inside a mixture of experts' ``experts`` module)."""
    embed = model.get_input_embeddings().weight
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    # (0-d buffers are constants, not weights: Gemma's embedding scale)
    tensors = {id(t): t for name, t in named if t is not embed and t.is_floating_point() and t.dim() > 0
               and "rotary" not in name and "inv_freq" not in name and (not experts_only or ".experts." in name)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def moe_shape(config) -> tuple[int, int] | None:
    """``(experts, top_k)`` of a mixture-of-experts config (gpt-oss, Mixtral: ``num_local_experts``; Qwen3-MoE:
    ``num_experts``), or None for a dense model."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    return (int(experts), int(top_k)) if experts and top_k else None


def floor_bytes(weight_bytes: int, expert_bytes: int, moe: tuple[int, int] | list | None, batch: int) -> float:
    """The weight bytes one decode step of ``batch`` tokens reads: everything but the experts, and the expected
    share of the experts that ``batch`` tokens hit when each picks ``top_k`` of ``experts`` uniformly (random
    weights route about uniformly): ``1 - (1 - top_k / experts) ** batch``."""
    if not moe or not expert_bytes:
        return float(weight_bytes)
    experts, top_k = moe
    hit = 1.0 - (1.0 - top_k / experts) ** batch
    return weight_bytes - expert_bytes + expert_bytes * hit


# ------------------------------------------------------------------------------------------------------- timing


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5.2x renamed the forward's ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def static_cache(model: torch.nn.Module, max_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


@torch.inference_mode()
def fill_cache(model, cache, batch: int, context: int, chunk: int = 2048) -> None:
    """Prefill ``context`` random tokens into ``cache``, a chunk at a time (bounded activation memory)."""
    kw = cache_kwarg(model)
    vocab = model.config.vocab_size
    for start in range(0, context, chunk):
        n = min(chunk, context - start)
        ids = torch.randint(0, vocab, (batch, n), device=model.device)
        model(input_ids=ids, **{kw: cache}, use_cache=True, logits_to_keep=1)


def profiled_gpu_us(fn: Callable[[], Any], steps: int, top: int = 10) -> tuple[float, float, list[dict[str, Any]]]:
    """Kernel time per call on the GPU (sum of the profiler's CUDA kernel durations), kernels per call, and the
    ``top`` kernels by time (name, us and launches per call)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name, [0.0, 0])
        entry[0] += e.device_time
        entry[1] += 1
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    breakdown = [{"kernel": name[:90], "us": t / steps, "launches": n / steps}
                 for name, (t, n) in ranked]
    total_us = sum(e.device_time for e in kernels)
    return total_us / steps, len(kernels) / steps, breakdown


# Eager steps timed per decode point, wall clock with a sync each (the median is reported): a step's host time as a
# user's eager loop pays it.
EAGER_WALL_STEPS = 5


@torch.inference_mode()
def measure_decode(model, batch: int, context: int, steps: int) -> dict[str, Any]:
    kw = cache_kwarg(model)
    cache = static_cache(model, context + 3 + 2 * steps + EAGER_WALL_STEPS + GRAPH_CALLS)
    fill_cache(model, cache, batch, context)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=model.device)

    def step():
        return model(input_ids=ids, **{kw: cache}, use_cache=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    walls = []
    for _ in range(EAGER_WALL_STEPS):  # one step alone swung 20-105 ms on the lent H200's host (session 24)
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    wall_ms = sorted(walls)[len(walls) // 2]
    gpu_us, kernels, breakdown = profiled_gpu_us(step, steps)
    return {"batch": batch, "context": context, "gpu_us": gpu_us, "kernels": kernels,
            "tokens_per_s": batch / (gpu_us * 1e-6), "eager_wall_ms": wall_ms, "top_kernels": breakdown,
            "graph_us": graph_step_us(model, cache, ids, context)}


GRAPH_TIMINGS, GRAPH_REPLAYS_PER_TIMING = 20, 5
# Every call of a step, CUDA-graph replays included, writes one more token into the cache (transformers 5.1x's
# StaticLayer advances a device-side length counter inside the graph, whatever cache_position says): room for the
# warm-up, the profiled steps and every replay, or the cache's index_copy_ runs out of bounds.
GRAPH_CALLS = 3 + GRAPH_TIMINGS * GRAPH_REPLAYS_PER_TIMING


def graph_us(step) -> float | str:
    """Median time of the step replayed from a CUDA graph (a few replays per timing), or why it could not be
    captured. With :data:`KEEP_ON_GRAPH` (a :data:`KEEP_SCRATCH` variant), the capture keeps the split-K scratch
    buffers on the graph (``triton_ops_core.scratch.keep_on``)."""
    from triton_ops_core import scratch

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), (scratch.keep_on(graph) if KEEP_ON_GRAPH else contextlib.nullcontext()):
            step()
    except Exception as exc:  # noqa: BLE001 - reported in the table
        torch.cuda.synchronize()
        print(f"  CUDA-graph capture failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return f"n/a ({type(exc).__name__})"
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(GRAPH_TIMINGS):
        start.record()
        for _ in range(GRAPH_REPLAYS_PER_TIMING):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / GRAPH_REPLAYS_PER_TIMING)
    return sorted(times)[len(times) // 2]


def graph_step_us(model, cache, ids: torch.Tensor, position: int) -> float | None:
    """GPU time of one decode step replayed from a CUDA graph (:func:`graph_us`): the kernels and the gaps between
    them, no host time; what a compiled ``reduce-overhead`` decode pays per step, and the time that shows what PDL
    overlaps (the profiler's sum of kernel durations counts an early-launched kernel's wait as its own). The step
    attends as the token at ``position`` (a fixed ``cache_position``: a graph holds no host-side counter); the
    cache needs room for :data:`GRAPH_CALLS` more tokens. None when it cannot be captured (the reason is printed)."""
    kw = cache_kwarg(model)
    position_t = torch.tensor([position], device=ids.device)

    def step():
        return model(input_ids=ids, cache_position=position_t, **{kw: cache}, use_cache=True)

    us = graph_us(step)
    return None if isinstance(us, str) else us


@torch.inference_mode()
def generate_ms_per_token(model, batch: int, prompt: int, new: int, static: bool) -> dict[str, Any]:
    """ms per new token of ``generate()``: (time for ``new + 1`` tokens - time for 1) / ``new``."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=model.device)
    extra = {"cache_implementation": "static"} if static else {}

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **extra)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    run(new + 1)  # warm-up; with the static cache this compiles (twice: prefill shape and decode shape)
    first_s = time.perf_counter() - t0
    # a second warm-up of each length: the host's first replays (CUDA-graph trees' checks, allocator growth) would
    # otherwise land in the timed runs, which then differ by 30 % and more between runs of the same model
    run(1)
    run(new + 1)
    long, short = min(run(new + 1) for _ in range(3)), min(run(1) for _ in range(3))
    ms = (long - short) / new * 1e3
    return {"ms_per_token": ms, "tokens_per_s": batch * 1e3 / ms, "first_call_s": first_s, "batch": batch}


PREFILL_TOP_KERNELS = 12  # kernels listed in a prefill's breakdown


@torch.inference_mode()
def measure_prefill(model, tokens: int, compiled: bool = True, with_cache: bool = False) -> dict[str, Any]:
    """Wall time (CUDA events) of one ``tokens``-token prefill, batch 1, no cache, the last position's logits:
    eager, and with ``compiled`` through ``torch.compile(model)`` (Inductor's default mode: a prefill is GEMM-bound,
    CUDA graphs would gain little; the targets compare with transformers compiled). The eager prefill is also
    profiled once: its kernel time, launches and largest kernels (``top_kernels``). ``with_cache``: the compiled
    prefill is also timed into an empty ``DynamicCache`` (``compiled_cache_ms``, as ``generate()`` prefills by
    default). Without a cache transformers cannot rule out packed sequences while tracing, so a compiled
    cacheless prefill always gets an explicit causal mask (sdpa's masked kernel); with a cache, a patched model's
    attention backend drops it (``triton_ops_mask``) where transformers before 5.25 keeps it."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=model.device)
    out = {"tokens": tokens, "ms": _median_ms(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1))}
    # where the eager prefill's GPU time goes: kernel time (host gaps excluded), launches, the largest kernels (a
    # profiler that cannot run leaves the timings standing and says why)
    try:
        gpu_us, kernels, top = profiled_gpu_us(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), 1,
                                               top=PREFILL_TOP_KERNELS)
        out.update(gpu_ms=gpu_us / 1e3, kernels=kernels, top_kernels=top)
    except RuntimeError as exc:
        out["profile_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if compiled:
        torch._dynamo.reset()
        fast = torch.compile(model)
        out["compiled_ms"] = _median_ms(lambda: fast(input_ids=ids, use_cache=False, logits_to_keep=1), warmup=2)
        if with_cache:
            from transformers import DynamicCache

            kw = cache_kwarg(model)
            try:  # (a failure here leaves the cacheless timings standing, and says why)
                out["compiled_cache_ms"] = _median_ms(
                    lambda: fast(input_ids=ids, logits_to_keep=1, **{kw: DynamicCache(config=model.config)}),
                    warmup=2)
            except Exception as exc:  # noqa: BLE001 - any compile or runtime failure is reported, not raised
                out["compiled_cache_error"] = f"{type(exc).__name__}: {exc}"[:300]
                print(f"  compiled prefill into a DynamicCache failed: {out['compiled_cache_error']}", flush=True)
        torch._dynamo.reset()
    return out


def _median_ms(run: Callable[[], Any], runs: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(runs):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def reference_outputs(model, prompt_ids: torch.Tensor, new: int,
                      sequence: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The last prompt token's logits, ``new`` greedy tokens, and the logits of every new position when the model
    reads ``sequence`` (default: the prompt and its own greedy tokens; pass the reference's to teacher-force)."""
    logits = model(input_ids=prompt_ids, use_cache=False).logits[:, -1].float()
    tokens = model.generate(prompt_ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if sequence is None:
        sequence = tokens
    forced = model(input_ids=sequence, use_cache=False).logits[:, prompt_ids.shape[1] - 1:-1].float()
    return {"logits": logits, "tokens": tokens[:, prompt_ids.shape[1]:], "sequence": sequence, "forced": forced}


def compare_outputs(ref: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, Any]:
    cos = torch.nn.functional.cosine_similarity(ref["logits"].double(), out["logits"].double(), dim=-1)
    same = (ref["tokens"] == out["tokens"]).float()
    # agreement up to the first difference: after one greedy token differs, the continuations are unrelated
    first_diff = [int(row.argmin()) if not bool(row.all()) else row.numel() for row in same]
    # teacher-forced: both models read the reference's tokens, so every position compares like with like
    forced_cos = torch.nn.functional.cosine_similarity(ref["forced"].double(), out["forced"].double(), dim=-1)
    forced_top1 = (ref["forced"].argmax(-1) == out["forced"].argmax(-1)).float().mean()
    return {"logits_cosine_min": float(cos.min()), "greedy_agreement": float(same.mean()),
            "greedy_steps_before_first_difference": min(first_diff),
            "forced_cosine_min": float(forced_cos.min()), "forced_top1_agreement": float(forced_top1),
            "finite": bool(torch.isfinite(out["logits"]).all())}


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 2**30) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = sorted(times)[len(times) // 2]
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------------ the run


def run_variant(name: str, variant: str, config, args, device, ref: dict | None) -> tuple[VariantResult, dict]:
    from triton_ops_core import pdl

    with launch_switches(variant):
        setting = pdl_setting(variant)
        if setting is not None:  # planned and measured so; plans made under it are dropped when it ends
            with pdl.override(setting):
                return _run_variant(name, variant, config, args, device, ref)
        return _run_variant(name, variant, config, args, device, ref)


@contextlib.contextmanager
def launch_switches(variant: str):
    """:data:`KEEP_ON_GRAPH` (:data:`KEEP_SCRATCH`) and ``pdl.RELEASE_SHORT`` (:data:`RELEASE_EARLY` on,
    :data:`NO_RELEASE` off) as ``variant``
    asks, the shipped values otherwise; restored, and the launch plans made under them dropped, after."""
    global KEEP_ON_GRAPH
    from triton_ops_core import pdl
    from triton_ops_core.launch import invalidate_plans

    options = split_variant(variant)[1]
    shipped = KEEP_ON_GRAPH, pdl.RELEASE_SHORT
    KEEP_ON_GRAPH = shipped[0] or KEEP_SCRATCH in options
    pdl.RELEASE_SHORT = (shipped[1] or RELEASE_EARLY in options) and NO_RELEASE not in options
    invalidate_plans()
    try:
        yield
    finally:
        KEEP_ON_GRAPH, pdl.RELEASE_SHORT = shipped
        invalidate_plans()


def pdl_setting(variant: str) -> bool | None:
    """PDL on (:data:`PDL_ON`), off (:data:`PDL_OFF`) or as the environment says (None) for ``variant``."""
    options = split_variant(variant)[1]
    if PDL_OFF in options:
        return False
    return True if PDL_ON in options else None


def split_variant(variant: str) -> tuple[str, frozenset[str]]:
    """``variant``'s base name and its suffixes (:data:`SUFFIX_GROUPS`, read from the end)."""
    found = []
    for group in reversed(SUFFIX_GROUPS):
        suffix = next((x for x in sorted(group, key=len, reverse=True) if variant.endswith(x)), None)  # -no-pdl
        if suffix is not None:
            found.append(suffix)
            variant = variant.removesuffix(suffix)
    return variant, frozenset(found)


def _run_variant(name: str, variant: str, config, args, device, ref: dict | None) -> tuple[VariantResult, dict]:
    res = VariantResult(variant)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = make_variant(variant, config, device, torch.bfloat16)
    res.weight_bytes = decode_weight_bytes(model)
    res.expert_bytes = decode_weight_bytes(model, experts_only=True)
    summary = getattr(model, "triton_ops_patch", None)
    res.patch = None if summary is None else str(asdict(summary))
    outputs: dict = {}

    def attempt(part: str, fn: Callable[..., Any], *fn_args: Any) -> Any:
        try:
            return fn(*fn_args)
        except Exception as exc:  # a failing part is reported, and the other parts still run
            res.errors.append(f"{part}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            print(f"  {name}/{variant} {part} failed: {res.errors[-1]}", flush=True)
            return None

    if "accuracy" in args.parts:
        prompt = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1)).to(device)
        outputs = attempt("accuracy", reference_outputs, model, prompt, args.accuracy_tokens,
                          None if ref is None else ref["sequence"]) or {}
        if ref is not None and outputs:
            res.accuracy = compare_outputs(ref, outputs)
    if "decode" in args.parts:
        for batch, context in args.decode_points:
            point = attempt(f"decode b{batch} c{context}", measure_decode, model, batch, context, args.steps)
            if point:
                res.decode.append(point)
                graph = point.get("graph_us")
                print(f"  {name}/{variant} decode b={batch} ctx={context}: {point['gpu_us']:.0f} us GPU, "
                      f"{point['kernels']:.0f} kernels, CUDA graph {'-' if graph is None else f'{graph:.0f} us'}, "
                      f"eager wall {point['eager_wall_ms']:.1f} ms", flush=True)
    if "prefill" in args.parts:
        res.prefill = attempt("prefill", measure_prefill, model, args.prefill_tokens, not args.no_compile,
                              args.prefill_cache) or {}
        print(f"  {name}/{variant} prefill: " + ", ".join(f"{key} {res.prefill[key]:.2f}" for key in
                                                         ("ms", "gpu_ms", "compiled_ms", "compiled_cache_ms")
                                                         if res.prefill.get(key) is not None), flush=True)
    if "generate" in args.parts:
        for mode, static in (("eager", False), ("static-compiled", True)):
            if static and args.no_compile:
                continue
            g = attempt(f"generate {mode}", generate_ms_per_token, model, 1, 128, args.new_tokens, static)
            if g:
                res.generate[mode] = g
                print(f"  {name}/{variant} generate {mode}: {g['ms_per_token']:.2f} ms/token "
                      f"(first call {g['first_call_s']:.0f} s)", flush=True)
        torch._dynamo.reset()
    res.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30
    return res, outputs  # the model goes with this frame: the next variant's weights fit


def run_model(name: str, args, device, bandwidth: float, entry: dict[str, Any], save: Callable[[], None]) -> None:
    """Fill ``entry`` (a model's section of the report) variant by variant, calling ``save`` after each."""
    config = build_config(name, args.tiny)
    entry.update(model=name, layers=config.num_hidden_layers, hidden=config.hidden_size, floor_us={}, variants=[],
                 bandwidth_gbps=bandwidth, moe=moe_shape(config))
    ref = None
    for variant in args.variants:
        if variant == "experts-triton_ops" and entry["moe"] is None:
            print(f"{name}: {variant} left out (a dense model has no experts)", flush=True)
            continue
        print(f"{name}: {variant}", flush=True)
        res, outputs = run_variant(name, variant, config, args, device, ref)
        if variant == "transformers":
            ref = outputs or None
        entry["floor_us"][variant] = res.weight_bytes / (bandwidth * 1e9) * 1e6  # every weight
        for point in res.decode:  # the step's own floor (a mixture of experts: the experts it is expected to hit)
            point["floor_us"] = floor_bytes(res.weight_bytes, res.expert_bytes, entry["moe"],
                                            point["batch"]) / (bandwidth * 1e9) * 1e6
        entry["variants"].append(asdict(res))
        save()


# ----------------------------------------------------------------------------------------------------- reports


def _fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# Whole models on the {env['device']}", "",
             f"Command: `{env['command']}`; torch {env['torch']}, triton {env['triton']}, transformers "
             f"{env['transformers']}, CUDA {env['cuda']}; {env['date_utc']}. Copy bandwidth measured in this run: "
             f"{report['copy_gbps']:,.0f} GB/s (1 GiB device-to-device, bytes read + written).", "",
             "Random bf16 weights built on the GPU from each model's published config; sdpa attention; a "
             "`StaticCache`. GPU time = the profiler's kernel time of one decode step (no host time); floor = the "
             "weights a step reads (every parameter but the input embedding; of a mixture of experts, the expected "
             "share of the experts a step's B tokens hit, each choosing k of E uniformly: 1 - (1 - k/E)^B) / the "
             "measured copy bandwidth.", ""]
    for model in report["models"]:
        lines += _model_section(model)
    return "\n".join(lines) + "\n"


def _floor_us(model: dict[str, Any], variant: dict[str, Any], batch: int) -> float:
    """A variant's floor at ``batch`` tokens (:func:`floor_bytes`); a report without the MoE fields (written before
    them): every weight."""
    if "bandwidth_gbps" not in model:
        return model["floor_us"][variant["variant"]]
    nbytes = floor_bytes(variant["weight_bytes"], variant.get("expert_bytes", 0), model.get("moe"), batch)
    return nbytes / (model["bandwidth_gbps"] * 1e9) * 1e6


def _kernel_breakdown(variant: dict[str, Any], top: int = 10) -> list[str]:
    """Where a variant's decode steps spend their GPU time: one column per decode point (us per step, launches), one
    row per kernel among the largest ``top`` over all points (a kernel past a point's own top list: "-")."""
    points = [p for p in variant["decode"] if p.get("top_kernels")]
    if not points:
        return []
    total: dict[str, float] = {}
    for p in points:
        for k in p["top_kernels"]:
            total[k["kernel"]] = total.get(k["kernel"], 0.0) + k["us"]
    names = sorted(total, key=total.get, reverse=True)[:top]
    lines = ["", f"Where a decode step's GPU time goes, {variant['variant']} (top kernels; us per step, launches):",
             "", "| kernel | " + " | ".join(f"{p['batch']} x {p['context']}" for p in points) + " |",
             "| --- |" + " --- |" * len(points)]
    for name in names:
        cells = []
        for p in points:
            k = next((k for k in p["top_kernels"] if k["kernel"] == name), None)
            cells.append(f"{k['us']:,.0f} ({k['launches']:.0f})" if k else "-")
        lines.append(f"| `{name.replace('|', '/')}` | " + " | ".join(cells) + " |")
    return lines


def _prefill_breakdown(variant: dict[str, Any]) -> list[str]:
    """Where a variant's eager prefill spends its GPU time: its largest kernels (us, launches, share of the kernel
    time)."""
    pf = variant["prefill"]
    if pf.get("profile_error"):
        return ["", f"The {variant['variant']} prefill could not be profiled: {pf['profile_error']}"]
    if not pf.get("top_kernels"):
        return []
    total_us = pf["gpu_ms"] * 1e3
    lines = ["", f"Where a {pf['tokens']}-token prefill's GPU time goes, {variant['variant']} (eager: "
             f"{pf['gpu_ms']:.2f} ms of kernels in {pf['kernels']:.0f} launches; the largest):", "",
             "| kernel | us | launches | share |", "| --- | --- | --- | --- |"]
    for k in pf["top_kernels"]:
        lines.append(f"| `{k['kernel'].replace('|', '/')}` | {k['us']:,.0f} | {k['launches']:.0f} | "
                     f"{k['us'] / total_us:.1%} |")
    return lines


def _model_section(model: dict[str, Any]) -> list[str]:
    variants = model["variants"]
    base = {(p["batch"], p["context"]): p["gpu_us"] for p in variants[0]["decode"]} if variants else {}
    moe = model.get("moe")
    experts = f"; {moe[0]} experts, top {moe[1]}" if moe else ""
    lines = [f"## {model['model']} ({model['layers']} layers, hidden {model['hidden']}{experts})", "",
             "### Decode step, GPU time", "",
             "| variant | batch | context | GPU time | kernels | tokens/s (GPU) | vs transformers | floor | x floor | "
             "CUDA graph | x floor (graph) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v in variants:
        for p in v["decode"]:
            floor = _floor_us(model, v, p["batch"])
            b = base.get((p["batch"], p["context"]))
            graph = p.get("graph_us")
            graph_cells = f"{graph:,.0f} us | {graph / floor:.2f}x" if graph else "- | -"
            lines.append(f"| {v['variant']} | {p['batch']} | {p['context']} | {p['gpu_us']:,.0f} us | "
                         f"{p['kernels']:.0f} | {p['tokens_per_s']:,.0f} | {_fmt(b and b / p['gpu_us'], '.2f')}x | "
                         f"{floor:,.0f} us | {p['gpu_us'] / floor:.2f}x | {graph_cells} |")
    lines += ["", "### generate(), batch 1, as users see it (ms per new token; prefill excluded)", "",
              "| variant | eager | tokens/s | static cache + torch.compile (transformers' fast path) | tokens/s | "
              "first call (compiles) | floor | x floor |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v in variants:
        e, s = v["generate"].get("eager", {}), v["generate"].get("static-compiled", {})
        floor_ms = _floor_us(model, v, 1) / 1e3
        lines.append(f"| {v['variant']} | {_fmt(e.get('ms_per_token'), '.2f')} ms | {_fmt(e.get('tokens_per_s'))} | "
                     f"{_fmt(s.get('ms_per_token'), '.2f')} ms | {_fmt(s.get('tokens_per_s'))} | "
                     f"{_fmt(s.get('first_call_s'))} s | {floor_ms:.2f} ms | "
                     f"{_fmt(s.get('ms_per_token') and s['ms_per_token'] / floor_ms, '.2f')}x |")
    lines += ["", "### Prefill, accuracy, memory", "",
              "| variant | prefill (eager / compiled) | logits cosine (min) | greedy agreement | "
              "steps before first difference | teacher-forced top-1 agreement | teacher-forced cosine (min) | "
              "peak memory | weight bytes |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v in variants:
        pf, acc = v["prefill"], v["accuracy"]
        compiled = f" / {pf['compiled_ms']:.2f} ms compiled" if pf.get("compiled_ms") is not None else ""
        if pf.get("compiled_cache_ms") is not None:
            compiled += f" / {pf['compiled_cache_ms']:.2f} ms compiled into a DynamicCache"
        lines.append(f"| {v['variant']} | {_fmt(pf.get('ms'), '.2f')} ms{compiled} ({pf.get('tokens', '-')} tokens) | "
                     f"{_fmt(acc.get('logits_cosine_min'), '.5f')} | {_fmt(acc.get('greedy_agreement'), '.2f')} | "
                     f"{acc.get('greedy_steps_before_first_difference', '-')} | "
                     f"{_fmt(acc.get('forced_top1_agreement'), '.3f')} | {_fmt(acc.get('forced_cosine_min'), '.5f')} | "
                     f"{_fmt(v['peak_memory_gib'], '.1f')} GiB | "
                     f"{v['weight_bytes'] / 1e9:.2f} GB |")
    for v in variants:
        lines += _kernel_breakdown(v)
    for v in variants:
        lines += _prefill_breakdown(v)
    errors = [f"- {v['variant']}: {e}" for v in variants for e in v["errors"]]
    if errors:
        lines += ["", "Failed parts:", "", *errors]
    return lines + [""]


def plot(report: dict[str, Any], path: Path) -> bool:
    from triton_ops.benchmark._plots import pyplot

    plt = pyplot()
    if plt is None:
        return False
    models = report["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for v in model["variants"]:
            pts = sorted((p["batch"], p["tokens_per_s"]) for p in v["decode"] if p["context"] == min(
                q["context"] for q in v["decode"]))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=v["variant"])
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens/s (GPU time)", title=model["model"])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_model", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS + EXTRA_VARIANTS)}; a patched one with the suffix "
                        f"{FUSED_NORMS}: its decode step's norms inside the GEMMs' launches ({INPUT_NORM}: the "
                        f"input norm only, inside the q/k/v launch; {O_PROJ_NORM}: the post-attention norm "
                        f"written by the output projection's launch); with {PDL_ON} / "
                        f"{PDL_OFF}: measured with / without programmatic dependent launch; with {KEEP_SCRATCH}: "
                        f"split-K counters kept on the graph it captures; with {RELEASE_EARLY} / {NO_RELEASE}: one-row "
                        f"short kernels release the next launch once they run, or not; with {SHIFT}: full sliding "
                        f"windows shifted, not rings (in this order: "
                        f"patched{SHIFT}{PDL_ON}{KEEP_SCRATCH}{RELEASE_EARLY}{FUSED_NORMS})")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--decode", default="1x1024,8x1024,64x1024,1x8192,8x8192",
                   help="decode points, BATCHxCONTEXT, comma-separated")
    p.add_argument("--steps", type=int, default=5, help="profiled decode steps per point")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per timed generate()")
    p.add_argument("--accuracy-tokens", type=int, default=32, help="greedy tokens compared")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--no-compile", action="store_true",
                   help="leave out torch.compile: the compiled prefill and the static-cache compiled generate()")
    p.add_argument("--prefill-cache", action="store_true",
                   help="also time the compiled prefill into an empty DynamicCache (one more compilation a variant)")
    p.add_argument("--tiny", action="store_true", help="2 small layers: checks the harness")
    p.add_argument("--out", type=Path, default=None, help="report folder (default docs/benchmarks on a GPU)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    args.parts = [x for x in args.parts.split(",") if x]
    args.decode_points = [tuple(int(v) for v in pt.split("x")) for pt in args.decode.split(",") if pt]
    check_known(p, (("model", args.models, MODELS),
                    ("variant", args.variants, known_variants(VARIANTS + EXTRA_VARIANTS)), ("part", args.parts, PARTS)))
    return args


def known_variants(names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` and each patched one with any of :data:`SUFFIX_GROUPS` (at most one of each group, in order)."""
    patched = [n for n in names if n.startswith("patched")]
    suffixes = [""]
    for group in SUFFIX_GROUPS:
        suffixes = [s + x for s in suffixes for x in ("", *group)]
    return names + tuple(n + suffix for n in patched for suffix in suffixes if suffix)


def check_known(parser: argparse.ArgumentParser, checks) -> None:
    """``parser.error`` for any chosen name not in its known list: ``checks`` is ``(what, chosen, known)`` triples."""
    for what, got, known in checks:
        bad = [g for g in got if g not in known]
        if bad:
            parser.error(f"unknown {what}(s) {bad}; known: {', '.join(known)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_model needs a GPU: it times whole models (the kernels' correctness under the interpreter is "
              "covered by the tests, e.g. packages/triton-ops/tests/test_patch_model.py)", file=sys.stderr)
        return 2
    import transformers
    from triton_ops.benchmark._env import collect_environment, device_tag

    device = torch.device("cuda")
    env = collect_environment(measured=True)
    env["transformers"] = transformers.__version__
    bandwidth = copy_bandwidth_gbps(device)
    report = {"environment": env, "copy_gbps": bandwidth, "models": []}
    out = args.out or ROOT / "docs" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"model-{device_tag(env['device'])}" + ("-tiny" if args.tiny else "")
    for name in args.models:
        entry: dict[str, Any] = {}
        report["models"].append(entry)
        # saved after each variant: a run cut short keeps what it measured
        run_model(name, args, device, bandwidth, entry, lambda: write_reports(report, out, stem))
    print((out / f"{stem}.md").read_text())
    return 1 if any(v["errors"] for m in report["models"] for v in m["variants"]) else 0


def write_reports(report: dict[str, Any], out: Path, stem: str) -> None:
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    report_md = render(report)
    if plot(report, out / f"{stem}.png"):
        report_md += f"\n![tokens/s against batch size]({stem}.png)\n"
    (out / f"{stem}.md").write_text(report_md)


if __name__ == "__main__":
    sys.exit(main())
