"""patch_model on small random Phi-3 models (Phi-3, Phi-4: transformers' Phi3ForCausalLM): q, k, v from the model's
own packed ``qkv_proj``, gate and up from one packed ``gate_up_proj`` (the fused kernel over its halves), full and
partial rotary embeddings, dropouts on the sublayers' outputs. The patched model computes what the unpatched one
does (prefill, decode steps, both caches, FP8, training with dropout), the down projection adds the residual in its
GEMM, and a compiled forward keeps one graph. CPU under Triton's interpreter (fp32) and a GPU (bf16)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from _compiled_generate import assert_generates_alike, prefill_and_steps
from fused_gated_mlp import FP8Projection
from triton_ops import FP8Linear, patch_model
from triton_ops.layers import PackedGatedMLP
from triton_ops.models import UnsupportedModelError, decoder_layers
from triton_ops.models.decoder_layers import PackedRopeAttention, ResidualDropoutDecoderLayer
from triton_ops_core.testing import device_for_tests

transformers = pytest.importorskip("transformers")

DEVICE = device_for_tests()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOL = 0.999 if DTYPE == torch.bfloat16 else 0.999999
SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64, "pad_token_id": 0,
         "bos_token_id": 1, "eos_token_id": 2}


def _config(partial_rotary_factor: float = 1.0, **overrides):
    """A Phi-3 config; the rotary fraction where the installed transformers reads it (5.0: an attribute, later:
    ``rope_parameters``)."""
    config = transformers.Phi3Config(**{**SMALL, **overrides})
    if isinstance(getattr(config, "rope_parameters", None), dict):
        config.rope_parameters["partial_rotary_factor"] = partial_rotary_factor
    config.partial_rotary_factor = partial_rotary_factor
    return config


def _model(seed: int = 0, partial_rotary_factor: float = 1.0, **overrides):
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(_config(partial_rotary_factor, **overrides)).to(DEVICE, DTYPE).eval()
    with torch.no_grad():  # weights large enough that the logits differ
        for p in model.parameters():
            p.normal_(0.0, 0.08) if p.dim() == 2 else p.normal_(1.0, 0.2)
    return model


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.parametrize("partial_rotary_factor", [1.0, 0.5])
def test_patched_phi3_computes_what_the_model_computes(partial_rotary_factor):
    model = _model(partial_rotary_factor=partial_rotary_factor)
    reference = copy.deepcopy(model)
    weight = model.model.layers[1].mlp.gate_up_proj.weight
    head_dim = 16
    cos, _ = reference.model.rotary_emb(torch.zeros(1, device=DEVICE), torch.arange(3, device=DEVICE)[None])
    assert cos.shape[-1] == int(head_dim * partial_rotary_factor)  # the config took the fraction
    patch_model(model)
    summary = model.triton_ops_patch
    assert summary.model_type == "phi3" and summary.gated_mlps == 2 and summary.rms_norms == 2 * 2 + 1
    assert summary.rope_attentions == 2 and summary.fused_residual_adds == 2 and summary.packed_qkv == 0
    layer = model.model.layers[1]
    assert inspect.unwrap(type(layer).forward) is ResidualDropoutDecoderLayer.forward
    assert inspect.unwrap(type(layer.self_attn).forward) is PackedRopeAttention.forward
    assert type(layer.mlp).forward is PackedGatedMLP.forward
    assert layer.mlp.gate_up_proj.weight is weight  # the model's own weight, not a copy
    assert model.state_dict().keys() == reference.state_dict().keys()
    ids = torch.randint(3, 128, (2, 7), device=DEVICE)
    for a, b in zip(prefill_and_steps(model, ids), prefill_and_steps(reference, ids), strict=True):
        assert _cosine(a, b) >= TOL


def test_the_packed_gate_up_runs_as_one_fused_kernel_over_its_halves(monkeypatch):
    import fused_gated_mlp
    from triton_ops import layers

    model = _model(seed=1)
    weight = model.model.layers[0].mlp.gate_up_proj.weight
    patch_model(model)
    calls = []
    real = fused_gated_mlp.fused_gated_mlp
    monkeypatch.setattr(layers, "fused_gated_mlp", lambda x, gate, up, act, **k: calls.append(
        (gate.data_ptr(), up.data_ptr(), act)) or real(x, gate, up, act, **k))
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 5), device=DEVICE))
    # views of the packed weight's rows (gate first, then up), Phi-3's SiLU
    first = (weight.data_ptr(), weight.data_ptr() + 96 * 64 * weight.element_size(), "silu")
    assert calls[0] == first and len(calls) == 2


@pytest.mark.parametrize("attention", [False, True])
def test_patched_phi3_generates_the_models_tokens_with_both_caches(attention):
    reference = _model(seed=2, partial_rotary_factor=0.5)
    model = patch_model(copy.deepcopy(reference), attention=attention)
    assert_generates_alike(model, reference, torch.randint(3, 128, (2, 6), device=DEVICE))


def test_the_down_projection_adds_the_residual_in_its_gemm(monkeypatch):
    model = patch_model(_model(seed=3))
    reference = _model(seed=3)
    adds = []
    real = decoder_layers._down_add_
    monkeypatch.setattr(decoder_layers, "_down_add_", lambda *a, **k: adds.append(1) or real(*a, **k))
    ids = torch.randint(3, 128, (1, 5), device=DEVICE)
    with torch.no_grad():
        assert _cosine(model(ids).logits, reference(ids).logits) >= TOL
    assert len(adds) == 2


# block and default beside the newest transformers only in CI (the CPU budget; channel covers the oldest's layers)
@pytest.mark.parametrize("recipe", ["channel", pytest.param("block", marks=pytest.mark.newest_only),
                                    pytest.param("default", marks=pytest.mark.newest_only)])
def test_patched_phi3_with_fp8_quantizes_the_packed_projections(recipe, monkeypatch):
    # 4 layers: the default recipe keeps the first and last (and every down_proj) in the model's dtype
    model = _model(seed=4, num_hidden_layers=4)
    reference = copy.deepcopy(model)
    patch_model(model, fp8=True, fp8_recipe=recipe)
    summary = model.triton_ops_patch
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.qkv_proj, FP8Linear) and isinstance(layer.self_attn.o_proj, FP8Linear)
    # gate/up: the packed weight in FP8 with the recipe's scales, read by the fused kernel
    assert type(layer.mlp.gate_up_proj) is FP8Projection and layer.mlp.gate_up_proj.weight.shape == (192, 64)
    assert layer.mlp.gate_up_proj.scaling == {"channel": "channel", "block": "block", "default": "group"}[recipe]
    converted = 2 if recipe == "default" else 4
    assert summary.fp8_gated_mlps == converted and summary.gated_mlps == 4
    assert summary.fp8_linears == converted * (2 if recipe == "default" else 3)
    assert (type(model.model.layers[0].mlp.gate_up_proj) is torch.nn.Linear) == (recipe == "default")
    import fused_gated_mlp
    from triton_ops import layers

    layouts = []
    real = fused_gated_mlp.fused_gated_mlp
    monkeypatch.setattr(layers, "fused_gated_mlp", lambda *a, **k: layouts.append(
        k.get("weight_layout", "separate")) or real(*a, **k))
    tails, real_tail = [], layers.fp8_gated_linear  # the W8A8 tail over the packed output's halves (FP8 down only)
    monkeypatch.setattr(layers, "fp8_gated_linear", lambda g, u, *a, **k: tails.append(g.is_contiguous())
                        or real_tail(g, u, *a, **k))
    short, long = torch.randint(3, 128, (1, 6), device=DEVICE), torch.randint(3, 128, (1, 20), device=DEVICE)
    for ids in (short, long):  # 6 rows: the fused kernel (weight-only FP8); 20: one W8A8 GEMM of the packed weight
        layouts.clear()
        tails.clear()
        for a, b in zip(prefill_and_steps(model, ids, steps=2), prefill_and_steps(reference, ids, steps=2),
                        strict=True):
            # E4M3 weights: the logits point the same way (a 64-wide random model; on the H200 in bf16: 0.989-0.990)
            assert _cosine(a, b) >= 0.98
        fp8_calls = layouts.count("concatenated")
        assert fp8_calls == converted * (3 if ids is short else 2), layouts  # (the decode steps are fused)
        # the 20-row prefill's tails: the packed GEMM's halves (row-strided views) quantized as they are read
        assert tails == ([False] * converted if ids is long and recipe != "default" else []), tails


def test_training_with_residual_dropout_matches_the_model():
    # the dropouts on the sublayers' outputs draw as transformers' layer draws them: same seed, same masks
    reference = _model(seed=5, resid_pdrop=0.3)
    model = patch_model(copy.deepcopy(reference))
    model.train()
    reference.train()
    ids = torch.randint(3, 128, (2, 6), device=DEVICE)
    losses = []
    for m in (model, reference):
        m.zero_grad()
        torch.manual_seed(11)
        loss = m(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4 if DTYPE == torch.float32 else 2e-2, atol=1e-5)
    ours, ref = dict(model.named_parameters()), dict(reference.named_parameters())
    for name in ("model.layers.0.mlp.gate_up_proj.weight", "model.layers.1.self_attn.qkv_proj.weight",
                 "model.layers.0.post_attention_layernorm.weight"):
        assert _cosine(ours[name].grad, ref[name].grad) >= (0.99 if DTYPE == torch.bfloat16 else 0.99999), name


def test_a_compiled_phi3_forward_is_one_graph_with_the_fused_kernels():
    from test_patch_moe import compiled_decode_ops

    ours = compiled_decode_ops(patch_model(_model(seed=7, partial_rotary_factor=0.5)))
    assert ours.count("fused_gated_mlp") == 2, ours


def test_tensor_parallel_plan_refuses_phi3_by_name():
    from triton_ops.parallel import tensor_parallel_plan

    with pytest.raises(UnsupportedModelError, match="'phi3' .*packed qkv_proj and gate_up_proj"):
        tensor_parallel_plan(patch_model(_model(seed=8)), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_phi3_compiled_generate_with_static_cache(fp8):
    from _compiled_generate import assert_compiled_generate_matches_eager

    model = patch_model(_model(seed=9, partial_rotary_factor=0.75), fp8=fp8, fp8_recipe="channel")
    assert_compiled_generate_matches_eager(model, torch.randint(3, 128, (1, 12), device="cuda"))


def test_hooks_on_the_residual_dropouts_are_called_in_eval():
    reference = _model(seed=10)
    model = patch_model(copy.deepcopy(reference))
    for m in (reference, model):
        m.model.layers[1].resid_mlp_dropout.register_forward_hook(lambda mod, args, out: out * 0.5)
    ids = torch.randint(3, 128, (1, 5), device=DEVICE)
    with torch.no_grad():
        assert _cosine(model(ids).logits, reference(ids).logits) >= TOL


class _LoRA(torch.nn.Module):
    """A frozen linear plus a trainable low-rank update (what PEFT's LoRA layers compute)."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.a = torch.nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=DTYPE)
        self.b = torch.nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=DTYPE)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) + self.b(self.a(x))


def test_training_a_lora_adapter_on_the_frozen_projections():
    # q, k and v need gradients through the adapter though the projection's own weight is frozen: the rotation
    # runs out of place (in place it would raise), and the adapter's gradients are the unpatched model's
    reference = _model(seed=12)
    model = patch_model(copy.deepcopy(reference))
    for m in (reference, model):
        m.requires_grad_(False)  # the base model frozen, as LoRA training does: only the adapters learn
        torch.manual_seed(3)
        attn = m.model.layers[0].self_attn
        attn.qkv_proj = _LoRA(attn.qkv_proj)
        m.train()
    ids = torch.randint(3, 128, (2, 6), device=DEVICE)
    grads = []
    for m in (model, reference):
        m(ids, labels=ids).loss.backward()
        grads.append(m.model.layers[0].self_attn.qkv_proj.a.weight.grad)
    assert _cosine(grads[0], grads[1]) >= (0.99 if DTYPE == torch.bfloat16 else 0.99999)


def test_a_model_converted_to_fp8_first_runs_its_packed_fp8_gate_up_in_the_fused_kernel():
    from fused_gated_mlp import FP8Projection
    from triton_ops import convert_to_fp8

    reference = convert_to_fp8(_model(seed=13), recipe="channel")
    model = patch_model(copy.deepcopy(reference))
    assert model.triton_ops_patch.fp8_gated_mlps == model.triton_ops_patch.gated_mlps == 2
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, FP8Projection)
    ids = torch.randint(3, 128, (1, 6), device=DEVICE)
    with torch.no_grad():
        assert _cosine(model(ids).logits, reference(ids).logits) >= (0.999 if DTYPE == torch.bfloat16 else 0.99999)


def test_autocast_runs_the_model_in_its_own_promotion():
    reference = _model(seed=14).float()
    model = patch_model(copy.deepcopy(reference))
    ids = torch.randint(3, 128, (2, 5), device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE.type, torch.bfloat16):
        assert _cosine(model(ids).logits, reference(ids).logits) >= 0.999
