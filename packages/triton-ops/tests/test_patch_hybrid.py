"""patch_model on the hybrid decoders of Qwen3-Next and Qwen3.5 (dense and MoE, text models and the multimodal
Qwen3.5-MoE's language model), built small and random from transformers' own classes: Gated DeltaNet (linear
attention) layers and gated full attentions stay transformers'; the zero-centered RMSNorms, the gated MLPs and the
sparse mixtures of experts with their gated shared expert are ours. The patched model computes what the unpatched
one does (prefill, a cached decode step through the hybrid cache, greedy generate), FP8 keeps the few-output gate
projections, and tensor parallelism refuses these models by name. CPU under the interpreter (fp32) and GPU (bf16).
Qwen3.5's classes are newer than the oldest transformers we support (5.0 has Qwen3-Next): skipped where missing."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from _model_checks import assert_greedy_tokens_match, cosine, prefill_and_step
from triton_ops import patch_model
from triton_ops.layers import GatedMLP, GemmaRMSNorm, SparseMoE
from triton_ops.models import decoder_layers
from triton_ops.models.decoder_layers import GatedQKNormRopeAttention, HybridDecoderLayer
from triton_ops.models.patch import FP8_KEPT_LINEARS, UnsupportedModelError
from triton_ops_core.testing import device_for_tests

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3NextForCausalLM"):
    pytest.skip("this transformers has no Qwen3-Next model", allow_module_level=True)
HAS_QWEN3_5 = all(hasattr(transformers, c) for c in ("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM"))
needs_qwen3_5 = pytest.mark.skipif(not HAS_QWEN3_5, reason="this transformers has no Qwen3.5 models")

DEVICE = device_for_tests()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOL = 0.999 if DTYPE == torch.bfloat16 else 0.99999
# 2 layers: a Gated DeltaNet and a full attention (the models interleave them 3 to 1); 8 experts, top 3
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"],
         "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 64, "linear_num_value_heads": 4,
         "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16}
MOE = {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "num_experts": 8, "num_experts_per_tok": 3}
KINDS = ("qwen3_next", pytest.param("qwen3_5", marks=needs_qwen3_5), pytest.param("qwen3_5_moe", marks=needs_qwen3_5))


def _model(kind: str, seed: int = 0):
    if kind == "qwen3_next":
        config, cls = transformers.Qwen3NextConfig(**SMALL, **MOE, intermediate_size=96), \
            transformers.Qwen3NextForCausalLM
    elif kind == "qwen3_5":
        config, cls = transformers.Qwen3_5TextConfig(**SMALL, intermediate_size=96), transformers.Qwen3_5ForCausalLM
    else:
        config, cls = transformers.Qwen3_5MoeTextConfig(**SMALL, **MOE), transformers.Qwen3_5MoeForCausalLM
    torch.manual_seed(seed)
    model = cls(config).to(DEVICE, DTYPE).eval()
    with torch.no_grad():  # weights (the zero-centered norms' too) large enough that every part matters
        for p in model.parameters():
            p.normal_(0.0, 0.08 if p.dim() >= 2 else 0.1)
    return model

@pytest.mark.parametrize("kind", KINDS)
def test_patched_hybrid_models_compute_what_transformers_does(kind, monkeypatch):
    model = _model(kind)
    reference = copy.deepcopy(model)
    token_mixers = [type(getattr(layer, "linear_attn", None) or layer.self_attn) for layer in model.model.layers]
    patch_model(model)
    summary = model.triton_ops_patch
    moe = kind != "qwen3_5"
    # every layer's two norms, the final norm, the full attention's q/k norms; not the DeltaNet's gated norms
    assert summary.rms_norms == 2 * 2 + 1 + 2
    assert summary.moe_blocks == (2 if moe else 0) and summary.gated_mlps == 2  # shared experts or dense MLPs
    # the full attention's q/k norms and partial rotary embedding in one kernel, q (with its gate), k, v one GEMM
    assert summary.fused_residual_adds == 2 and summary.qk_norm_rope_attentions == summary.packed_qkv == 1
    assert summary.rope_attentions == 0
    assert any("Gated DeltaNet" in note for note in summary.notes)
    for layer, mixer in zip(model.model.layers, token_mixers, strict=True):
        assert isinstance(getattr(layer, "linear_attn", None) or layer.self_attn, mixer)
        assert inspect.unwrap(type(layer).forward) is HybridDecoderLayer.forward
        assert type(layer.input_layernorm).forward is GemmaRMSNorm.forward
        if moe:
            assert type(layer.mlp).forward is SparseMoE.forward
            assert type(layer.mlp.shared_expert).forward is GatedMLP.forward
        else:
            assert type(layer.mlp).forward is GatedMLP.forward
    assert type(model.model.layers[0].linear_attn) is token_mixers[0]  # the DeltaNet: transformers' own
    assert inspect.unwrap(type(model.model.layers[1].self_attn).forward) is GatedQKNormRopeAttention.forward
    assert type(model.model.layers[1].self_attn.q_norm).forward is GemmaRMSNorm.forward  # per head, on a view
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)
    adds = _count_fused_adds(monkeypatch)
    rotations = []
    real_rotation = decoder_layers.fused_qk_norm_rope
    monkeypatch.setattr(decoder_layers, "fused_qk_norm_rope",
                        lambda q, k, *a, **kw: rotations.append(q.shape[-1] - a[2].shape[-1]) or real_rotation(
                            q, k, *a, **kw))
    for a, b in zip(prefill_and_step(model, ids), prefill_and_step(reference, ids), strict=True):
        assert torch.isfinite(a.logits).all() and cosine(a.logits, b.logits) >= TOL
    assert rotations == [16 - 4, 16 - 4]  # prefill and step: the first quarter of each head rotated (partial)
    # each layer's x + mixer in the post-attention norm's launch; h + mlp in the down GEMM's (dense) or the
    # combine's (sparse) launch: prefill and step
    assert adds == {"add_norm": 4, "mlp": 0 if moe else 4, "moe": 4 if moe else 0}
    assert set(model.state_dict()) == set(reference.state_dict())


def _count_fused_adds(monkeypatch) -> dict[str, int]:
    """Counts, from now on, the hybrid layers' fused residual adds: into the post-attention norm, into the dense
    MLP's down projection, into the mixture of experts' combine."""
    adds = {"add_norm": 0, "mlp": 0, "moe": 0}

    def counted(name, real):
        def call(*a, **k):
            adds[name] += 1
            return real(*a, **k)
        return call

    monkeypatch.setattr(decoder_layers, "fused_add_rmsnorm", counted("add_norm", decoder_layers.fused_add_rmsnorm))
    monkeypatch.setattr(decoder_layers, "_mlp_into_residual", counted("mlp", decoder_layers._mlp_into_residual))
    real_moe = decoder_layers.moe_hidden
    monkeypatch.setattr(decoder_layers, "moe_hidden",
                        lambda *a, **k: adds.__setitem__("moe", adds["moe"] + (len(a) > 2 or "residual" in k))
                        or real_moe(*a, **k))
    return adds


@pytest.mark.parametrize("kind", [pytest.param("qwen3_next", marks=pytest.mark.newest_only),
                                  pytest.param("qwen3_5_moe", marks=needs_qwen3_5)])
def test_patched_hybrid_moe_generates_the_unpatched_models_tokens(kind):
    model = _model(kind, seed=1)
    reference = copy.deepcopy(model)
    assert_greedy_tokens_match(patch_model(model), reference)


@needs_qwen3_5
def test_qwen3_5_moe_router_always_renormalizes():
    """Qwen3.5's router has no norm_topk_prob: it always renormalizes its top-k weights, and the patched block
    does the same (a block made to take the softmax's share instead computes something else)."""
    from triton_ops.layers import MOE_ROUTING_ATTR

    model = patch_model(_model("qwen3_5_moe", seed=2))
    reference = _model("qwen3_5_moe", seed=2)
    block, ref_block = model.model.layers[0].mlp, reference.model.layers[0].mlp
    assert not hasattr(block.gate, "norm_topk_prob") and block.__dict__[MOE_ROUTING_ATTR] == ("silu", True)
    x = torch.randn(1, 5, 64, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        assert cosine(block(x), ref_block(x)) >= TOL
        block.__dict__[MOE_ROUTING_ATTR] = ("silu", False)
        assert cosine(block(x), ref_block(x)) < 0.9999


@needs_qwen3_5
def test_fp8_keeps_the_few_output_gate_projections():
    """fp8=True: the DeltaNet's beta / decay projections and the shared-expert gates stay nn.Linear in the model's
    dtype (FP8_KEPT_LINEARS), the other projections become FP8; the model stays close to the unpatched one."""
    from fp8_gemm import FP8Linear

    model = _model("qwen3_5_moe", seed=3)
    reference = copy.deepcopy(model)
    patch_model(model, fp8=True, fp8_recipe="channel")
    kept = {n: m for n, m in model.named_modules() if n.endswith(FP8_KEPT_LINEARS)}
    assert len(kept) == 2 + 2  # the DeltaNet layer's in_proj_a and in_proj_b, two shared-expert gates
    assert all(type(m) is torch.nn.Linear and m.weight.dtype == DTYPE for m in kept.values())
    deltanet = model.model.layers[0].linear_attn
    assert isinstance(deltanet.in_proj_qkv, FP8Linear) and isinstance(deltanet.out_proj, FP8Linear)
    assert any(note.startswith("4 gate projection(s)") for note in model.triton_ops_patch.notes)
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)
    with torch.no_grad():
        ours, ref = model(ids).logits, reference(ids).logits
    assert torch.isfinite(ours).all() and cosine(ours, ref) >= 0.95


@needs_qwen3_5
def test_multimodal_qwen3_5_moe_patches_its_language_model_only():
    text = {**SMALL, **MOE}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64}
    torch.manual_seed(4)
    model = transformers.Qwen3_5MoeForConditionalGeneration(
        transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision)).to(DEVICE, DTYPE).eval()
    reference = copy.deepcopy(model)
    vision_types = [type(m) for m in model.model.visual.modules()]
    patch_model(model)
    assert model.triton_ops_patch.model_type == "qwen3_5_moe" and model.triton_ops_patch.moe_blocks == 2
    assert [type(m) for m in model.model.visual.modules()] == vision_types
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)
    with torch.no_grad():
        assert cosine(model(input_ids=ids).logits, reference(input_ids=ids).logits) >= TOL


@needs_qwen3_5
def test_tensor_parallel_plan_refuses_hybrid_decoders_by_name():
    from triton_ops import parallel

    with pytest.raises(UnsupportedModelError, match="'qwen3_5_moe_text' .*Gated DeltaNet"):
        parallel.tensor_parallel_plan(_model("qwen3_5_moe"), 2)
