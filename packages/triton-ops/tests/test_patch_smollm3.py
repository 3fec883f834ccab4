"""patch_model on a small random SmolLM3 built from transformers' own classes: Llama's layers, every fourth without
the rotary embedding (``no_rope_layers``). The patched model computes what the unpatched one does (prefill, decode
steps, both caches), and its NoPE layers rotate nothing. CPU under Triton's interpreter (fp32) and a GPU (bf16)."""

from __future__ import annotations

import copy

import pytest
import torch
from _compiled_generate import assert_generates_alike, prefill_and_steps
from _model_checks import cosine
from triton_ops import patch_model
from triton_ops.models import decoder_layers
from triton_ops_core.testing import device_for_tests

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "SmolLM3Config"):
    pytest.skip("this transformers has no SmolLM3", allow_module_level=True)

DEVICE = device_for_tests()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOL = 0.999 if DTYPE == torch.bfloat16 else 0.999999
SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64, "pad_token_id": 0,
         "bos_token_id": 1, "eos_token_id": 2}


def _model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = transformers.SmolLM3Config(**{**SMALL, **overrides})
    model = transformers.SmolLM3ForCausalLM(config).to(DEVICE, DTYPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model


def test_patched_smollm3_rotates_only_where_the_model_does(monkeypatch):
    reference = _model()
    assert reference.config.no_rope_layers == [1, 1, 1, 0]  # the fourth layer has no rotary embedding
    model = patch_model(copy.deepcopy(reference))
    summary = model.triton_ops_patch
    assert summary.model_type == "smollm3" and summary.rope_attentions == 4 and summary.packed_qkv == 4
    assert summary.fused_residual_adds == 4 and summary.gated_mlps == 4
    rotations = []
    real = decoder_layers.apply_rope
    monkeypatch.setattr(decoder_layers, "apply_rope",
                        lambda q, *a, **kw: rotations.append(q.shape) or real(q, *a, **kw))
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    for a, b in zip(prefill_and_steps(model, ids, 1), prefill_and_steps(reference, ids, 1), strict=True):
        assert cosine(a, b) >= TOL
    assert len(rotations) == 3 * 2  # three rotating layers, the prompt and a step (dynamic cache: no fused write)
    assert_generates_alike(model, reference, ids[:, :5], new_tokens=3)


def test_without_rope_the_position_is_not_a_rotation():
    # a model whose layers all skip the rotary embedding: the patched model must not rotate either (a rotation
    # would change every logit)
    reference = _model(seed=1, no_rope_layers=[0, 0, 0, 0])
    rotated = _model(seed=1, no_rope_layers=[1, 1, 1, 1])
    model = patch_model(copy.deepcopy(reference))
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    with torch.no_grad():
        ours, ref = model(ids).logits, reference(ids).logits
        assert cosine(ours, ref) >= TOL and cosine(rotated(ids).logits, ref) < 0.9999
