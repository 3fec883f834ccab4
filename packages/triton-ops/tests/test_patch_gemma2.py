"""patch_model on small random Gemma 2 and Gemma (1) models built from transformers' own classes: Gemma 2's norms
around both sublayers, softcapped attention logits (a cap small enough to change every logit), sliding-window layers
beside full ones; Gemma's Llama-shaped layers with ``1 + weight`` norms. The patched model computes what the
unpatched one does (prefill, decode steps past the window, both caches, our attention and the configured one, FP8),
and the cap reaches every attention function that computes it. CPU under Triton's interpreter (fp32) and a GPU
(bf16)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from _compiled_generate import assert_generates_alike, prefill_and_steps
from _model_checks import assert_gradients_match, attention_keywords
from triton_ops import FP8Linear, patch_model
from triton_ops.layers import GatedMLP, GemmaRMSNorm
from triton_ops.models import attention_backend, cache_updates, decoder_layers
from triton_ops.models.decoder_layers import FusedAddNormDecoderLayer, RopeAttention, SandwichNormDecoderLayer
from triton_ops_core.testing import device_for_tests

transformers = pytest.importorskip("transformers")

DEVICE = device_for_tests()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOL = 0.999 if DTYPE == torch.bfloat16 else 0.999999
# Gemma 2: two sliding-window layers (window 4) around a full one; a logit cap of 0.2 (the models ship 50: their
# logits are larger), so that the attention logits of these small random weights are bent by it and a dropped cap
# shows; the query scale from query_pre_attn_scalar
GEMMA2 = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 64,
          "sliding_window": 4, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 0.2,
          "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
GEMMA = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 64}


def _model(kind: str = "gemma2", seed: int = 0, attn: str | None = None, **overrides):
    torch.manual_seed(seed)
    if kind == "gemma2":
        config, cls = transformers.Gemma2Config(**{**GEMMA2, **overrides}), transformers.Gemma2ForCausalLM
    else:
        config, cls = transformers.GemmaConfig(**{**GEMMA, **overrides}), transformers.GemmaForCausalLM
    model = cls(config).to(DEVICE, DTYPE).eval()
    if attn is not None:
        model.config._attn_implementation = attn
    with torch.no_grad():  # weights large enough that the logits differ; norm weights away from Gemma's zeros
        for p in model.parameters():
            p.normal_(0.0, 0.08 if p.dim() == 2 else 0.3)
    return model


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def test_patched_gemma2_computes_what_the_model_computes_with_our_attention():
    reference = _model(attn="eager")  # transformers' eager attention: the one that applies the cap
    model = patch_model(copy.deepcopy(reference))
    summary = model.triton_ops_patch
    assert summary.model_type == "gemma2" and summary.rms_norms == 3 * 4 + 1 and summary.gated_mlps == 3
    assert summary.fused_residual_adds == 3 and summary.packed_qkv == 3 and summary.rope_attentions == 3
    assert summary.attention == "triton_ops" and model.config._attn_implementation == "triton_ops"
    layer = model.model.layers[1]
    assert inspect.unwrap(type(layer).forward) is SandwichNormDecoderLayer.forward
    assert inspect.unwrap(type(layer.self_attn).forward) is RopeAttention.forward
    assert type(layer.pre_feedforward_layernorm).forward is GemmaRMSNorm.forward
    assert type(layer.mlp).forward is GatedMLP.forward and layer.mlp.__dict__["_triton_ops_act"] == "gelu_tanh"
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)  # 7 prompt tokens and 4 steps: past the window of 4
    ours, ref = prefill_and_steps(model, ids, 4), prefill_and_steps(reference, ids, 4)
    for a, b in zip(ours, ref, strict=True):
        assert _cosine(a, b) >= TOL


def test_the_cap_matters_and_our_attention_applies_it_in_decode_and_prefill(monkeypatch):
    # Without the cap the same weights compute something else. Patched, a model configured for sdpa (which
    # transformers refuses, or on older releases ignores, with a cap) runs our attention: decode steps and this short
    # prompt cap inside decode_attention, and the logits are the eager model's.
    eager = _model(seed=1, attn="eager")
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    ref = prefill_and_steps(eager, ids, 2)
    uncapped = _model(seed=1, attn="eager", attn_logit_softcapping=None)
    assert _cosine(prefill_and_steps(uncapped, ids, 2)[0], ref[0]) < 0.99  # the cap is not a rounding
    caps: list = []
    real = attention_backend.decode_attention
    monkeypatch.setattr(attention_backend, "decode_attention",
                        lambda *a, **kw: caps.append(kw.get("softcap")) or real(*a, **kw))
    model = patch_model(_model(seed=1, attn="sdpa"))
    assert model.config._attn_implementation == "triton_ops"
    for a, b in zip(prefill_and_steps(model, ids, 2), ref, strict=True):
        assert _cosine(a, b) >= TOL
    assert caps == [0.2] * (3 * 3)  # three layers: the prompt and two steps


def test_a_long_prompt_goes_to_the_models_eager_attention_with_the_cap(monkeypatch):
    monkeypatch.setattr(attention_backend, "MAX_QUERY_LEN", 2)  # the 6-token prompt: too long for our kernel
    reference = _model(seed=2, attn="eager")
    model = patch_model(copy.deepcopy(reference))
    from transformers.models.gemma2 import modeling_gemma2

    caps: list = []
    real = modeling_gemma2.eager_attention_forward
    monkeypatch.setattr(modeling_gemma2, "eager_attention_forward",
                        lambda *a, **kw: caps.append(kw.get("softcap")) or real(*a, **kw))
    ids = torch.randint(0, 128, (2, 6), device=DEVICE)
    with torch.no_grad():
        assert _cosine(model(ids).logits, reference(ids).logits) >= TOL
    assert caps == [0.2] * 3 * 2  # our three layers, then the reference's own three


def test_patched_gemma2_follows_the_configured_attention_and_a_static_cache(monkeypatch):
    # attention=False: the configured function (eager: the one that caps) gets what transformers' attention passes
    # it; the sliding layers' static cache is written as a ring past the window (shifted, with the ring off)
    attn_implementation = "eager"
    reference = _model(seed=3, attn=attn_implementation)
    model = patch_model(copy.deepcopy(reference), attention=False)
    ring = cache_updates.SLIDING_RING and cache_updates.ring_available()  # (transformers 5.0: shifted)
    writes: list = []
    real, write = cache_updates.shift_kv_cache_, cache_updates.update_kv_cache_
    monkeypatch.setattr(cache_updates, "shift_kv_cache_", lambda *a: writes.append("shift") or real(*a))
    monkeypatch.setattr(cache_updates, "update_kv_cache_",
                        lambda *a, **kw: kw.get("ring") and writes.append("ring") or write(*a, **kw))
    ids = torch.randint(0, 128, (2, 6), device=DEVICE)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "cache_implementation": "static",
              "return_dict_in_generate": True, "output_logits": True}
    with torch.no_grad():
        ours = model.generate(ids, **kwargs)
        ref = reference.generate(ids, **kwargs)
    assert model.config._attn_implementation == attn_implementation
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.logits, ref.logits, strict=True):
        assert _cosine(a, b) >= TOL
    assert writes == ["ring" if ring else "shift"] * (2 * 4)  # two sliding layers, four decode steps


def test_the_attention_function_gets_the_models_own_keywords():
    # scaling from query_pre_attn_scalar, each layer's sliding window and the cap: what transformers' passes
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    expected, seen = attention_keywords(_model(seed=4), lambda m: patch_model(m, attention=False), ids,
                                        ("scaling", "sliding_window", "softcap"), eager_attention_forward)
    assert seen == expected and [s[2] for s in expected] == [4, None, 4] and expected[0][3] == 0.2
    assert expected[0][1] == 24 ** -0.5


def test_patched_gemma2_with_our_attention_generates_the_models_tokens():
    reference = _model(seed=5, attn="eager")
    model = patch_model(copy.deepcopy(reference))
    assert_generates_alike(model, reference, torch.randint(0, 128, (1, 6), device=DEVICE), new_tokens=3)


def test_patched_gemma2_with_fp8_converts_by_the_recipe():
    reference = _model(seed=6, attn="eager")
    model = patch_model(copy.deepcopy(reference), fp8=True, fp8_recipe="channel")
    summary = model.triton_ops_patch
    assert summary.fp8_linears == 3 * 5 and summary.fp8_gated_mlps == 3
    assert isinstance(model.model.layers[2].mlp.down_proj, FP8Linear) and type(model.lm_head) is torch.nn.Linear
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    for a, b in zip(prefill_and_steps(model, ids, steps=2), prefill_and_steps(reference, ids, steps=2),
                    strict=True):
        assert _cosine(a, b) >= 0.99  # E4M3 weights and activations: the logits point the same way


def test_gradients_flow_through_the_patched_gemma2_layers():
    reference = _model(seed=7, attn="eager")
    model = patch_model(copy.deepcopy(reference), attention=False)
    ids = torch.randint(0, 128, (2, 6), device=DEVICE)
    names = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.pre_feedforward_layernorm.weight",
             "model.layers.2.mlp.up_proj.weight", "model.layers.1.post_attention_layernorm.weight")
    assert_gradients_match(model, reference, ids, names, 0.99 if DTYPE == torch.bfloat16 else 0.99999)


def _spy(monkeypatch, name: str) -> list:
    calls = []
    real = getattr(decoder_layers, name)
    monkeypatch.setattr(decoder_layers, name, lambda *a, **k: calls.append(k.get("gemma")) or real(*a, **k))
    return calls


def test_patched_gemma_adds_into_its_post_attention_norm(monkeypatch):
    reference = _model("gemma", seed=8)
    model = patch_model(copy.deepcopy(reference))
    summary = model.triton_ops_patch
    assert summary.model_type == "gemma" and summary.rms_norms == 2 * 2 + 1 and summary.gated_mlps == 2
    assert summary.fused_residual_adds == 2 and summary.rope_attentions == 2 and summary.packed_qkv == 2
    layer = model.model.layers[0]
    assert inspect.unwrap(type(layer).forward) is FusedAddNormDecoderLayer.forward
    assert type(layer.post_attention_layernorm).forward is GemmaRMSNorm.forward
    adds = _spy(monkeypatch, "fused_add_rmsnorm")
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)
    for a, b in zip(prefill_and_steps(model, ids, 2), prefill_and_steps(reference, ids, 2), strict=True):
        assert _cosine(a, b) >= TOL
    assert adds == [True] * 2 * 3  # each layer, the prompt and two steps: Gemma's (1 + weight) norm
    # a hooked post-attention norm is called as itself (its hook sees the summed residual)
    seen = []
    model.model.layers[1].post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    with torch.no_grad():
        assert _cosine(model(ids).logits, reference(ids).logits) >= TOL
    assert seen == [(2, 7, 64)]
