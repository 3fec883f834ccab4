"""patch_model on small random Ministral, Ministral 3 and Mistral 3 models built from transformers' own classes:
Ministral's sliding window per layer; Ministral 3's queries scaled by Llama 4's position temperature (an original
context of 4 positions, so the prompt and the decode steps cross it and the factor changes); the multimodal Mistral 3
(a Mistral or a Ministral 3 language model beside a Pixtral tower). The patched model computes what the unpatched
one does (prefill, decode steps, left padding, both caches). CPU under Triton's interpreter (fp32) and a GPU (bf16)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from _compiled_generate import assert_generates_alike, prefill_and_steps
from _model_checks import attention_keywords
from triton_ops import patch_model
from triton_ops.models import UnsupportedModelError
from triton_ops.models.decoder_layers import FusedAddNormDecoderLayer, RopeAttention, attention_traits
from triton_ops_core.testing import device_for_tests

transformers = pytest.importorskip("transformers")

DEVICE = device_for_tests()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOL = 0.999 if DTYPE == torch.bfloat16 else 0.999999
SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 64}
# Ministral 3's YaRN tables with an original context of 4 positions: from position 4 on, the queries are scaled by
# 1 + 0.5 * log(1 + floor(position / 4))
ROPE3 = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 4,
         "max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
         "llama_4_scaling_beta": 0.5}


def _init(model):
    model = model.to(DEVICE, DTYPE).eval()
    with torch.no_grad():  # weights large enough that the logits differ
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model


def _ministral(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = transformers.MinistralConfig(**{**SMALL, "sliding_window": 4, "num_hidden_layers": 3,
                                             "layer_types": ["sliding_attention", "full_attention",
                                                             "sliding_attention"], **overrides})
    return _init(transformers.MinistralForCausalLM(config))


def _ministral3(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = transformers.Ministral3Config(**{**SMALL, "rope_parameters": dict(ROPE3), **overrides})
    return _init(transformers.Ministral3ForCausalLM(config))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def test_patched_ministral_computes_what_the_model_computes():
    # (with attention=False the configured function gets each layer's window: test_ministral_layers_pass_their_own...)
    reference = _ministral(attn_implementation="sdpa")
    model = patch_model(copy.deepcopy(reference))
    summary = model.triton_ops_patch
    assert summary.model_type == "ministral" and summary.rope_attentions == 3 and summary.packed_qkv == 3
    assert summary.fused_residual_adds == 3 and summary.gated_mlps == 3 and summary.rms_norms == 3 * 2 + 1
    layer = model.model.layers[0]
    assert inspect.unwrap(type(layer).forward) is FusedAddNormDecoderLayer.forward
    assert inspect.unwrap(type(layer.self_attn).forward) is RopeAttention.forward
    ids = torch.randint(0, 128, (1, 7), device=DEVICE)  # 7 prompt tokens and 2 steps: past the window of 4
    for a, b in zip(prefill_and_steps(model, ids, 2), prefill_and_steps(reference, ids, 2), strict=True):
        assert _cosine(a, b) >= TOL
    assert_generates_alike(model, reference, ids[:, :6], new_tokens=3)


def test_ministral_layers_pass_their_own_windows():
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    expected, seen = attention_keywords(_ministral(seed=1), lambda m: patch_model(m, attention=False), ids,
                                        ("sliding_window",))
    assert seen == expected == [(0, 4), (1, None), (2, 4)]


def test_patched_ministral3_scales_its_queries_as_the_model_does():
    reference = _ministral3(seed=2)
    model = patch_model(copy.deepcopy(reference))
    summary = model.triton_ops_patch
    assert summary.model_type == "ministral3" and summary.rope_attentions == 2 and summary.packed_qkv == 2
    assert summary.fused_residual_adds == 2 and summary.gated_mlps == 2
    attn = model.model.layers[1].self_attn
    want = "position_ids" if "position_ids" in inspect.signature(
        type(reference.model.layers[1].self_attn).forward).parameters else "cache_position"  # (5.0: cache_position)
    assert attention_traits(attn).temperature == want
    assert attention_traits(patch_model(_ministral(seed=0)).model.layers[0].self_attn).temperature is None
    ids = torch.randint(0, 128, (2, 6), device=DEVICE)  # positions 0..5, then steps at 6..8: factors 1, 1.35, 1.55
    ours, ref = prefill_and_steps(model, ids, 3), prefill_and_steps(reference, ids, 3)
    for a, b in zip(ours, ref, strict=True):
        assert _cosine(a, b) >= TOL
    # the factor is not a rounding: without it (beta 0) the same weights compute something else
    flat = _ministral3(seed=2, rope_parameters={**ROPE3, "llama_4_scaling_beta": 0.0})
    assert _cosine(prefill_and_steps(flat, ids, 1)[1], ref[1]) < 0.9999


def test_patched_ministral3_generates_the_models_tokens_with_left_padding():
    # left padding: position_ids (per sequence, 5.2x) and cache positions (5.0) differ; each release's own choice
    reference = _ministral3(seed=3)
    model = patch_model(copy.deepcopy(reference))
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    for cache in ("dynamic", "static"):
        with torch.no_grad():
            kwargs = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "cache_implementation": cache,
                      "return_dict_in_generate": True, "output_logits": True}
            ours, ref = model.generate(ids, **kwargs), reference.generate(ids, **kwargs)
        assert torch.equal(ours.sequences, ref.sequences), cache
        for a, b in zip(ours.logits, ref.logits, strict=True):
            assert _cosine(a, b) >= TOL


def _mistral3(text: str, seed: int = 4):
    """A tiny Mistral3ForConditionalGeneration: a 2-layer Mistral or Ministral 3 language model, a 1-layer Pixtral
    tower."""
    torch.manual_seed(seed)
    text_config = {**SMALL, "model_type": text, "vocab_size": 300}
    if text == "ministral3":
        text_config["rope_parameters"] = dict(ROPE3)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14, "head_dim": 16}
    config = transformers.Mistral3Config(text_config=text_config, vision_config=vision, image_token_index=299)
    return _init(transformers.Mistral3ForConditionalGeneration(config))


@pytest.mark.parametrize("text", ["mistral", "ministral3"])
def test_multimodal_mistral3_patches_its_language_model_only(text):
    reference = _mistral3(text)
    model = patch_model(copy.deepcopy(reference))
    summary = model.triton_ops_patch
    assert summary.model_type == "mistral3" and summary.gated_mlps == 2 and summary.packed_qkv == 2
    assert any("vision tower" in note for note in summary.notes)
    assert model.config.text_config._attn_implementation == "triton_ops"
    assert model.config.vision_config._attn_implementation == reference.config.vision_config._attn_implementation
    ids = torch.randint(0, 290, (2, 7), device=DEVICE)
    with torch.no_grad():
        assert _cosine(model(ids).logits, reference(ids).logits) >= TOL
        ours = model.generate(ids, max_new_tokens=4, do_sample=False)
        ref = reference.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(ours, ref)


def test_a_mistral3_with_another_language_model_is_refused_by_name():
    model = _mistral3("mistral")
    model.model.language_model.config.model_type = "llava"  # not a decoder patch_model reads inside Mistral 3
    with pytest.raises(UnsupportedModelError, match="'mistral' or 'ministral3'"):
        patch_model(model)
    from triton_ops.parallel import tensor_parallel_plan

    with pytest.raises(UnsupportedModelError, match="'mistral' or 'ministral3'"):
        tensor_parallel_plan(_mistral3("ministral3"), 2)
