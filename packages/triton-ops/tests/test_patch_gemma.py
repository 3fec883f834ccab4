"""patch_model on small random Gemma 3 text models built from transformers' own classes (Gemma3ForCausalLM): norms
that scale by ``1 + weight`` around both sublayers, per-head q/k norms, GELU-tanh gated MLPs, sliding-window layers
beside full ones, ``query_pre_attn_scalar``. The patched model computes what the unpatched one does (prefill, decode
steps past the window, both caches, FP8), gradients flow, the fused add+norm steps aside for a hooked norm, and a
compiled forward keeps one graph. CPU under Triton's interpreter (fp32) and a GPU (bf16)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from _compiled_generate import assert_generates_alike, prefill_and_steps
from _model_checks import attention_keywords
from triton_ops import FP8Linear, patch_model
from triton_ops.layers import GatedMLP, GemmaRMSNorm
from triton_ops.models import UnsupportedModelError, cache_updates, decoder_layers
from triton_ops.models.decoder_layers import GemmaQKNormRopeAttention, SandwichNormDecoderLayer
from triton_ops.models.layers import QKVPacking
from triton_ops_core.testing import device_for_tests

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma3TextConfig"):
    pytest.skip("this transformers has no Gemma 3", allow_module_level=True)

DEVICE = device_for_tests()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOL = 0.999 if DTYPE == torch.bfloat16 else 0.999999
# Two sliding-window layers (window 4) and a full one, as Gemma 3 interleaves them (five to one there); the query
# scale from query_pre_attn_scalar, not from head_dim, so a dropped scaling would show.
SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 64,
         "sliding_window": 4, "query_pre_attn_scalar": 24,
         "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}


def _model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(**{**SMALL, **overrides})
    model = transformers.Gemma3ForCausalLM(config).to(DEVICE, DTYPE).eval()
    with torch.no_grad():  # weights large enough that the logits differ; norm weights away from Gemma's zeros
        for p in model.parameters():
            p.normal_(0.0, 0.08 if p.dim() == 2 else 0.3)
    return model


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def test_patched_gemma3_computes_what_the_model_computes(monkeypatch):
    model = _model()
    reference = copy.deepcopy(model)
    patch_model(model)
    summary = model.triton_ops_patch
    # per layer: four norms and the q/k norms; the final norm
    assert summary.model_type == "gemma3_text" and summary.rms_norms == 3 * 6 + 1
    assert summary.gated_mlps == 3 and summary.fused_residual_adds == 3 and summary.packed_qkv == 3
    assert summary.qk_norm_rope_attentions == 3 and summary.rope_attentions == 0 and summary.fp8_linears == 0
    layer = model.model.layers[1]
    assert inspect.unwrap(type(layer).forward) is SandwichNormDecoderLayer.forward
    assert inspect.unwrap(type(layer.self_attn).forward) is GemmaQKNormRopeAttention.forward
    for norm in (layer.input_layernorm, layer.post_feedforward_layernorm, layer.self_attn.k_norm, model.model.norm):
        assert type(norm).forward is GemmaRMSNorm.forward
    mlp = layer.mlp
    assert type(mlp).forward is GatedMLP.forward and mlp.__dict__["_triton_ops_act"] == "gelu_tanh"
    assert isinstance(layer, type(reference.model.layers[1]))
    assert model.state_dict().keys() == reference.state_dict().keys()
    packed = []
    call = QKVPacking.__call__
    monkeypatch.setattr(QKVPacking, "__call__", lambda self, x, *rest: packed.append(x.shape) or call(self, x, *rest))
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)  # 7 prompt tokens and 4 steps: past the window of 4
    ours, ref = prefill_and_steps(model, ids, 4), prefill_and_steps(reference, ids, 4)
    assert packed == [(2, 7, 64)] * 3 + [(2, 1, 64)] * 12
    for a, b in zip(ours, ref, strict=True):
        assert _cosine(a, b) >= TOL


@pytest.mark.parametrize("ring", [True, False])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_patched_gemma3_follows_the_configured_attention_and_a_static_cache(attn_implementation, ring, monkeypatch):
    # Full layers: transformers' StaticLayer, written in one launch of ours; sliding ones: its rolling layer, full
    # from the 6-token prompt (window 4), written as a ring (the new row over the oldest, the mask reordered for
    # eager / sdpa) or, with the ring switched off, moved on by one launch of ours each decode step. Greedy tokens
    # agree past the window, and so do the logits of every step.
    monkeypatch.setattr(cache_updates, "SLIDING_RING", ring)
    ring = ring and cache_updates.ring_available()  # (transformers 5.0: shifted)
    reference = _model(seed=1)
    reference.config._attn_implementation = attn_implementation
    model = patch_model(copy.deepcopy(reference), attention=False)
    shifts, ring_writes = [], []
    real, write = cache_updates.shift_kv_cache_, cache_updates.update_kv_cache_
    monkeypatch.setattr(cache_updates, "shift_kv_cache_", lambda *a: shifts.append(a[2].shape) or real(*a))
    monkeypatch.setattr(cache_updates, "update_kv_cache_",
                        lambda *a, **kw: kw.get("ring") and ring_writes.append(a[2].shape) or write(*a, **kw))
    ids = torch.randint(0, 128, (2, 6), device=DEVICE)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "cache_implementation": "static",
              "return_dict_in_generate": True, "output_logits": True}
    with torch.no_grad():
        ours = model.generate(ids, **kwargs)
        ref = reference.generate(ids, **kwargs)
    assert model.config._attn_implementation == attn_implementation
    assert torch.equal(ours.sequences, ref.sequences)
    # two sliding layers, four decode steps
    assert (ring_writes, shifts) == (([(2, 2, 1, 16)] * (2 * 4), []) if ring else ([], [(2, 2, 1, 16)] * (2 * 4)))
    for a, b in zip(ours.logits, ref.logits, strict=True):
        assert _cosine(a, b) >= TOL


def test_patched_gemma3_with_our_attention_generates_the_models_tokens():
    reference = _model(seed=2)
    model = patch_model(copy.deepcopy(reference))
    assert model.triton_ops_patch.attention == "triton_ops"
    assert_generates_alike(model, reference, torch.randint(0, 128, (2, 6), device=DEVICE))


def _spy(monkeypatch, name: str) -> list:
    calls = []
    real = getattr(decoder_layers, name)
    monkeypatch.setattr(decoder_layers, name, lambda *a, **k: calls.append(k.get("gemma")) or real(*a, **k))
    return calls


def test_the_sandwich_norms_take_the_residual_adds_unless_hooked(monkeypatch):
    """Each layer: the post-attention norm, the add and the pre-feed-forward norm as one launch, the
    post-feed-forward norm and its add as another; a hooked norm is called as itself (its hook sees its own
    input), the others still fused where they can be."""
    model = patch_model(_model(seed=3))
    reference = _model(seed=3)
    both, after, add_norm = (_spy(monkeypatch, name) for name in
                             ("rmsnorm_add_rmsnorm", "rmsnorm_add", "fused_add_rmsnorm"))
    ids = torch.randint(0, 128, (1, 5), device=DEVICE)
    with torch.no_grad():
        ref = reference(ids).logits
        assert _cosine(model(ids).logits, ref) >= TOL
        assert both == [True] * 3 and after == [True] * 3 and add_norm == []
        seen = []  # a hook on the norm sees the summed residual: the layer then adds and calls the norm itself
        layers = model.model.layers
        layers[0].pre_feedforward_layernorm.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
        layers[1].post_attention_layernorm.register_forward_hook(lambda mod, args, out: seen.append("post"))
        layers[2].post_feedforward_layernorm.register_forward_hook(lambda mod, args, out: seen.append("ff"))
        assert _cosine(model(ids).logits, ref) >= TOL
    assert seen == [(1, 5, 64), "post", "ff"]
    assert both == [True] * 4  # layer 2 alone; layer 1's add goes with its pre-feed-forward norm
    assert add_norm == [True] and after == [True] * 5  # layers 0 and 1


def test_the_fused_sandwich_norms_change_no_bit():
    """The two launches per layer compute what the norm modules and the adds compute, bit for bit (every norm
    hooked: each its own call, each add torch's)."""
    model = patch_model(_model(seed=4))
    ids = torch.randint(0, 128, (2, 5), device=DEVICE)
    with torch.no_grad():
        fused = model(ids).logits
        for layer in model.model.layers:
            for name in ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
                getattr(layer, name).register_forward_hook(lambda *args: None)
        separate = model(ids).logits
    assert torch.isfinite(fused).all() and torch.equal(fused, separate)


def test_gemma_norms_match_transformers_in_every_dtype():
    # (1 + weight) in float32, one rounding: transformers' Gemma3RMSNorm, bit for bit up to the reduction's order
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = Gemma3RMSNorm(48, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.5)
    ours = copy.deepcopy(norm)
    ours.__class__ = type("Patched", (Gemma3RMSNorm,), {"forward": GemmaRMSNorm.forward})
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(3, 5, 48, device=DEVICE, dtype=dtype) * 3
        expected, got = norm(x), ours(x)
        assert got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


def test_patched_gemma3_with_fp8_converts_by_the_recipe():
    model = _model(seed=4)
    reference = copy.deepcopy(model)
    patch_model(model, fp8=True, fp8_recipe="channel")
    summary = model.triton_ops_patch
    assert summary.fp8_linears == 3 * 5 and summary.fp8_gated_mlps == 3
    assert isinstance(model.model.layers[2].mlp.down_proj, FP8Linear)
    assert type(model.lm_head) is torch.nn.Linear  # kept (tied to the embedding in Gemma)
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    for a, b in zip(prefill_and_steps(model, ids, steps=2), prefill_and_steps(reference, ids, steps=2),
                    strict=True):
        assert _cosine(a, b) >= 0.99  # E4M3 weights and activations: the logits point the same way


def test_gradients_flow_through_the_patched_gemma3_layers():
    reference = _model(seed=6)
    model = patch_model(copy.deepcopy(reference))
    model.train()
    reference.train()
    ids = torch.randint(0, 128, (2, 6), device=DEVICE)
    for m in (model, reference):
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
    names = ["model.layers.0.self_attn.q_norm.weight", "model.layers.1.pre_feedforward_layernorm.weight",
             "model.layers.2.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.1.post_attention_layernorm.weight"]
    ours, ref = dict(model.named_parameters()), dict(reference.named_parameters())
    for name in names:
        assert _cosine(ours[name].grad, ref[name].grad) >= (0.99 if DTYPE == torch.bfloat16 else 0.99999), name


def test_a_compiled_gemma3_forward_is_one_graph_with_the_fused_kernels():
    from test_patch_moe import compiled_decode_ops

    ours = compiled_decode_ops(patch_model(_model(seed=7)))
    assert ours.count("rmsnorm_add_rmsnorm") == 3 and ours.count("rmsnorm_add") == 3, ours
    assert "fused_add_rmsnorm" not in ours and ours.count("fused_gated_mlp") == 3, ours


@pytest.mark.parametrize("ring", [True, False])
def test_a_compiled_decode_step_into_full_sliding_windows_writes_them_in_its_graph(ring, monkeypatch):
    """torch.compile(fullgraph=True) of decode steps into a static cache whose sliding windows (4 rows) the
    6-token prompt filled: the ring write (or, switched off, the shift), the sandwich norms and the full layer's
    cache write are ops of the graph, and every step's logits are the unpatched model's."""
    monkeypatch.setattr(cache_updates, "SLIDING_RING", ring)
    ring = ring and cache_updates.ring_available()  # (transformers 5.0: shifted)
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    def steps(model, compiled: bool) -> list:
        ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0)).to(DEVICE)
        cache = transformers.StaticCache(config=model.config, max_cache_len=16)
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.no_grad():
            model(ids, use_cache=True, **{name: cache})
            run = torch.compile(model, backend=backend, fullgraph=True) if compiled else model
            return [run(ids[:, i:i + 1], use_cache=True, cache_position=torch.tensor([6 + i], device=DEVICE),
                        **{name: cache}).logits for i in range(3)]

    torch._dynamo.reset()
    ours, ref = steps(patch_model(_model(seed=1)), True), steps(_model(seed=1), False)
    torch._dynamo.reset()
    for a, b in zip(ours, ref, strict=True):
        assert _cosine(a, b) >= TOL
    ours_ops = {op.split(".")[1] for op in ops if op.startswith("triton_ops.")}
    # the q/k norms and RoPE inside the cache writes (the full layer's, and the rings'); shifted windows rotate first
    assert {"rmsnorm_add_rmsnorm", "rmsnorm_add"} <= ours_ops, ours_ops
    assert ours_ops & {"kv_cache_append_rope_", "kv_cache_write_rope_"}, ours_ops  # (5.0: at cache_position)
    assert ("kv_cache_shift_" in ours_ops) is not ring and ("fused_qk_norm_rope_" in ours_ops) is not ring, ours_ops


def test_compiled_gemma3_layers_keep_their_guard_subtrees_skippable():
    from test_patch_attention import assert_guard_subtrees_skippable

    model = patch_model(_model(seed=8, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"]))
    assert_guard_subtrees_skippable(model, ("self_attn", "mlp", "input_layernorm", "pre_feedforward_layernorm"))


def test_gemma3_base_model_patches_too():
    base = _model(seed=9).model  # Gemma3TextModel: config.model_type is gemma3_text as well
    reference = copy.deepcopy(base)
    patch_model(base)
    ids = torch.randint(0, 128, (1, 5), device=DEVICE)
    with torch.no_grad():
        assert _cosine(base(ids).last_hidden_state, reference(ids).last_hidden_state) >= TOL


def _multimodal(seed: int = 12):
    """A tiny Gemma3ForConditionalGeneration: the text decoder of SMALL (2 layers), a 1-layer SigLIP tower of 28x28
    images in 14x14 patches, 4 image tokens."""
    torch.manual_seed(seed)
    text = {**SMALL, "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"],
            "vocab_size": 300}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    model = transformers.Gemma3ForConditionalGeneration(config).to(DEVICE, DTYPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08 if p.dim() == 2 else 0.3)
    return model


def test_multimodal_gemma3_patches_its_language_model_only():
    reference = _multimodal()
    model = patch_model(copy.deepcopy(reference))
    summary = model.triton_ops_patch
    assert summary.model_type == "gemma3" and summary.gated_mlps == 2 and summary.packed_qkv == 2
    assert any("vision tower" in note for note in summary.notes)
    assert model.config.text_config._attn_implementation == "triton_ops"
    assert model.config.vision_config._attn_implementation == reference.config.vision_config._attn_implementation
    assert type(model.model.multi_modal_projector.mm_soft_emb_norm) is type(
        reference.model.multi_modal_projector.mm_soft_emb_norm)  # not part of the language model: left as it was
    text = torch.randint(0, 290, (2, 7), device=DEVICE)
    # an image: begin-of-image, its 4 tokens, end-of-image, then text
    image = torch.tensor([[297, 299, 299, 299, 299, 298, 5, 17, 42]], device=DEVICE)
    pixels = torch.randn(1, 3, 28, 28, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        assert _cosine(model(text).logits, reference(text).logits) >= TOL
        for ids, extra in ((text, {}), (image, {"pixel_values": pixels})):
            ours = model.generate(ids, max_new_tokens=4, do_sample=False, **extra)
            ref = reference.generate(ids, max_new_tokens=4, do_sample=False, **extra)
            assert torch.equal(ours, ref)


def test_multimodal_gemma3_fp8_converts_the_lm_head_only_when_asked():
    kept = patch_model(_multimodal(), fp8=True, fp8_recipe="channel")
    assert type(kept.lm_head) is torch.nn.Linear and kept.triton_ops_patch.fp8_linears == 2 * 5
    assert any("LM head kept" in note for note in kept.triton_ops_patch.notes)
    assert not any(isinstance(m, FP8Linear) for m in kept.model.vision_tower.modules())
    converted = patch_model(_multimodal(), fp8=True, fp8_recipe="channel", fp8_lm_head=True)
    assert isinstance(converted.lm_head, FP8Linear) and converted.triton_ops_patch.fp8_linears == 2 * 5 + 1
    from triton_ops.parallel import tensor_parallel_plan

    with pytest.raises(UnsupportedModelError, match=r"model\.model\.language_model"):  # plan the text model instead
        tensor_parallel_plan(converted, 2)
    with torch.no_grad():
        ids = torch.randint(0, 290, (1, 6), device=DEVICE)
        assert _cosine(converted(ids).logits, _multimodal()(ids).logits) >= 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_gemma3_compiled_generate_with_static_cache(fp8):
    """transformers' fast path (static cache with sliding-window layers, torch.compile fullgraph with CUDA graphs)
    over the patched model: a few frames, what eager computes."""
    from _compiled_generate import assert_compiled_generate_matches_eager

    model = patch_model(_model(seed=10), fp8=fp8, fp8_recipe="channel")
    assert_compiled_generate_matches_eager(model, torch.randint(0, 128, (1, 12), device="cuda"))


@pytest.mark.gpu
def test_gpu_gemma3_batch_of_64_decodes_as_the_model_does():
    reference = _model(seed=11)
    model = patch_model(copy.deepcopy(reference))
    ids = torch.randint(0, 128, (64, 9), device=DEVICE)
    for a, b in zip(prefill_and_steps(model, ids, steps=3), prefill_and_steps(reference, ids, steps=3),
                    strict=True):
        assert _cosine(a, b) >= TOL


def test_the_mlp_applies_what_its_act_fn_computes_whatever_else_the_config_names():
    # Gemma 3's MLP builds act_fn from hidden_activation; a config carrying a different hidden_act as well (configs
    # in the wild do) must not make the kernel apply that one
    reference = _model(seed=13, hidden_act="silu")
    assert reference.config.hidden_act == "silu" and reference.config.hidden_activation == "gelu_pytorch_tanh"
    model = patch_model(copy.deepcopy(reference))
    assert model.model.layers[0].mlp.__dict__["_triton_ops_act"] == "gelu_tanh"
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    with torch.no_grad():
        assert _cosine(model(ids).logits, reference(ids).logits) >= TOL


def test_hooks_on_the_q_and_k_norms_see_their_calls():
    reference = _model(seed=14)
    model = patch_model(copy.deepcopy(reference))
    for m in (reference, model):  # a hook that changes the output: the patched model must apply it too
        m.model.layers[0].self_attn.q_norm.register_forward_hook(lambda mod, args, out: out * 2)
    ids = torch.randint(0, 128, (2, 5), device=DEVICE)
    for a, b in zip(prefill_and_steps(model, ids, 2), prefill_and_steps(reference, ids, 2), strict=True):
        assert _cosine(a, b) >= TOL


def test_autocast_runs_the_model_in_its_own_promotion():
    # fp32 weights under autocast: the attention's output in bf16 beside a float32 residual stream
    reference = _model(seed=15).float()
    model = patch_model(copy.deepcopy(reference))
    ids = torch.randint(0, 128, (2, 5), device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE.type, torch.bfloat16):
        assert _cosine(model(ids).logits, reference(ids).logits) >= 0.999


def test_the_attention_function_gets_the_models_own_keywords():
    # scaling from query_pre_attn_scalar, each layer's sliding window, no dropout in eval: what transformers passes
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    expected, seen = attention_keywords(_model(seed=16), lambda m: patch_model(m, attention=False), ids,
                                        ("scaling", "sliding_window", "dropout"))
    assert seen == expected and [s[2] for s in expected] == [4, None, 4] and expected[0][1] == 24 ** -0.5
