"""patch_model on small random OLMo 2 and OLMo 3 models built from transformers' own classes: norms after each
sublayer (no pre-norms), q/k norms over all heads before the rotation, OLMo 3's sliding-window layers beside a full
one. The patched model computes what the unpatched one does (prefill, decode steps past the window, both caches,
FP8, gradients), each norm and its add run as one launch, and a hooked norm is called as itself. CPU under Triton's
interpreter (fp32) and a GPU (bf16)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from _compiled_generate import assert_generates_alike, prefill_and_steps
from _model_checks import assert_gradients_match, attention_keywords, cosine
from triton_ops import FP8Linear, patch_model
from triton_ops.layers import GatedMLP, RMSNorm
from triton_ops.models import decoder_layers
from triton_ops.models.decoder_layers import FullQKNormRopeAttention, PostNormDecoderLayer
from triton_ops_core.testing import device_for_tests

transformers = pytest.importorskip("transformers")

DEVICE = device_for_tests()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOL = 0.999 if DTYPE == torch.bfloat16 else 0.999999
SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 128, "max_position_embeddings": 64, "pad_token_id": 0, "eos_token_id": 2}


def _model(kind: str = "olmo3", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if kind == "olmo3":  # three sliding-window layers (window 4), then a full one
        config = transformers.Olmo3Config(**{**SMALL, "num_hidden_layers": 4, "sliding_window": 4, **overrides})
        model = transformers.Olmo3ForCausalLM(config)
    else:
        config = transformers.Olmo2Config(**{**SMALL, "num_hidden_layers": 2, **overrides})
        model = transformers.Olmo2ForCausalLM(config)
    model = model.to(DEVICE, DTYPE).eval()
    with torch.no_grad():  # weights large enough that the logits differ; norm weights away from 1
        for p in model.parameters():
            p.normal_(0.0, 0.08) if p.dim() == 2 else p.normal_(1.0, 0.3)
    return model


@pytest.mark.parametrize("kind,layers", [("olmo3", 4), ("olmo2", 2)])
def test_patched_olmo_computes_what_the_model_computes(kind, layers):
    reference = _model(kind)
    model = patch_model(copy.deepcopy(reference))
    summary = model.triton_ops_patch
    assert summary.model_type == kind and summary.fused_residual_adds == layers and summary.gated_mlps == layers
    assert summary.rope_attentions == layers and summary.packed_qkv == layers
    assert summary.rms_norms == layers * 4 + 1  # two layer norms and the q/k norms per layer; the final norm
    layer = model.model.layers[0]
    assert inspect.unwrap(type(layer).forward) is PostNormDecoderLayer.forward
    assert inspect.unwrap(type(layer.self_attn).forward) is FullQKNormRopeAttention.forward
    assert type(layer.self_attn.q_norm).forward is RMSNorm.forward and type(layer.mlp).forward is GatedMLP.forward
    ids = torch.randint(0, 128, (1, 7), device=DEVICE)  # 7 prompt tokens and 2 steps: past OLMo 3's window of 4
    for a, b in zip(prefill_and_steps(model, ids, 2), prefill_and_steps(reference, ids, 2), strict=True):
        assert cosine(a, b) >= TOL
    if kind == "olmo3":  # (the layers are OLMo 2's as well)
        assert_generates_alike(model, reference, ids[:, :6], new_tokens=3)


def test_each_norm_takes_the_add_after_it_unless_hooked(monkeypatch):
    reference = _model(seed=1)
    model = patch_model(copy.deepcopy(reference))
    calls = []
    real = decoder_layers.rmsnorm_add
    monkeypatch.setattr(decoder_layers, "rmsnorm_add", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    ids = torch.randint(0, 128, (1, 5), device=DEVICE)
    with torch.no_grad():
        ref = reference(ids).logits
        assert cosine(model(ids).logits, ref) >= TOL
        assert calls == [(1, 5, 64)] * 2 * 4
        calls.clear()
        seen = []  # a hook on a norm sees its own input: the layer calls it, then adds
        model.model.layers[2].post_feedforward_layernorm.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
        assert cosine(model(ids).logits, ref) >= TOL
    assert seen == [(1, 5, 64)] and len(calls) == 2 * 4 - 1


def test_olmo3_layers_pass_their_own_windows():
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    expected, seen = attention_keywords(_model(seed=2), lambda m: patch_model(m, attention=False), ids,
                                        ("sliding_window", "scaling"))
    assert seen == expected and [s[1] for s in expected] == [4, 4, 4, None]


def test_static_cache_and_fp8():
    reference = _model(seed=3)
    model = patch_model(copy.deepcopy(reference))
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "cache_implementation": "static",
              "return_dict_in_generate": True, "output_logits": True}
    with torch.no_grad():
        ours, ref = model.generate(ids, **kwargs), reference.generate(ids, **kwargs)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.logits, ref.logits, strict=True):
        assert cosine(a, b) >= TOL
    fp8 = patch_model(copy.deepcopy(reference), fp8=True, fp8_recipe="channel")
    assert fp8.triton_ops_patch.fp8_linears == 4 * 5 and isinstance(fp8.model.layers[3].self_attn.o_proj, FP8Linear)
    for a, b in zip(prefill_and_steps(fp8, ids, 1), prefill_and_steps(reference, ids, 1), strict=True):
        assert cosine(a, b) >= 0.99  # E4M3 weights and activations: the logits point the same way


def test_gradients_flow_through_the_patched_olmo_layers():
    reference = _model(seed=4)
    model = patch_model(copy.deepcopy(reference), attention=False)
    ids = torch.randint(0, 128, (2, 6), device=DEVICE)
    names = ("model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_proj.weight",
             "model.layers.2.post_attention_layernorm.weight", "model.layers.3.mlp.up_proj.weight")
    assert_gradients_match(model, reference, ids, names, 0.99 if DTYPE == torch.bfloat16 else 0.99999)
