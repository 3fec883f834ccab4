"""patch_model's attention: the packed q/k/v projection (one weight, the projections' weights its views, the state
dict unchanged), the rotary kernel in place on its output, the attention function looked up by name as transformers
does, FP8 packing under the recipes, packings that follow a model moved or reloaded after patching, gradients.
Small random models (CPU: fp32 under the interpreter; GPU: bf16, and compiled generate() in the GPU tests)."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from fp8_gemm import FP8Linear, FP8Recipe
from test_patch_model import (
    DEVICE,
    DTYPE,
    SMALL,
    _cosine,
    _prefill_and_step,
    assert_views_of_the_packed_weight,
)
from torch import nn
from triton_ops import patch_model
from triton_ops.models.layers import PACKING_ATTR, PackedQKVLinear, QKVPacking, pack_fp8, packed_projections
from triton_ops_core.exceptions import InvalidArgumentError

transformers = pytest.importorskip("transformers")

TOL = 0.999 if DTYPE == torch.bfloat16 else 0.999999


# gpt-oss: four experts of two per token, head_dim 16, every layer full attention (a sliding layer's static cache is
# transformers' own sliding class, which keeps its own update)
_GPT_OSS = {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4}


def _one_layer(kind: str, seed: int = 0, **config):
    cls = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "mistral": "MistralForCausalLM", "gpt_oss": "GptOssForCausalLM"}[kind]
    cfg_cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig",
               "gpt_oss": "GptOssConfig"}[kind]
    torch.manual_seed(seed)
    settings = {**SMALL, "num_hidden_layers": 1, **config}
    if kind == "gpt_oss":
        settings = {**settings, **_GPT_OSS, "layer_types": ["full_attention"] * settings["num_hidden_layers"]}
    cfg = getattr(transformers, cfg_cls)(**settings)
    if kind == "gpt_oss":
        cfg._attn_implementation = "eager"  # its attention sinks: transformers runs it eager
    model = getattr(transformers, cls)(cfg)
    model = model.to(DEVICE, DTYPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _storage_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers (and its packed projections)."""
    storages = {}
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        packing = vars(m).get(PACKING_ATTR)
        if packing is not None:
            tensors += [t for t in (packing.linear.weight, packing.linear.bias) if t is not None]
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


# ----------------------------------------------------------------------------------------------------------------
# The packed layer
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
def test_packed_qkv_linear_is_one_gemm_over_views_of_one_weight(bias):
    torch.manual_seed(0)
    q, k, v = (nn.Linear(32, n, bias=bias) for n in (48, 16, 16))
    x = torch.randn(3, 5, 32)
    want = [lin(x) for lin in (q, k, v)]
    copied = PackedQKVLinear.from_linear(q, k, v)  # a copy: the projections keep their own weights
    assert copied.weight.shape == (80, 32) and copied.sizes == (48, 16, 16)
    assert q.weight.data_ptr() != copied.weight.data_ptr()
    packed = PackedQKVLinear.from_linear(q, k, v, share=True)
    for got, ref in zip(packed.split(packed(x)), want):
        torch.testing.assert_close(got, ref)
    for lin, start in ((q, 0), (k, 48), (v, 64)):
        assert isinstance(lin.weight, nn.Parameter) and lin.weight.requires_grad
        assert lin.weight.data_ptr() == packed.weight.data_ptr() + start * 32 * 4
        if bias:
            assert lin.bias.data_ptr() == packed.bias.data_ptr() + start * 4
    with torch.no_grad():  # writing a projection's weight writes the packed one
        k.weight.fill_(0.5)
    assert torch.equal(packed.weight[48:64], torch.full((16, 32), 0.5))
    assert "q_features=48, kv_features=16" in repr(packed)


def test_packing_refuses_what_it_cannot_pack():
    q, k, v = nn.Linear(32, 48), nn.Linear(32, 16), nn.Linear(32, 16, bias=False)
    with pytest.raises(InvalidArgumentError, match=r"some q/k/v projections have a bias and some do not"):
        PackedQKVLinear.from_linear(q, k, v)
    with pytest.raises(InvalidArgumentError, match=r"differ in input size"):
        PackedQKVLinear.from_linear(q, k, nn.Linear(16, 16))
    handle = k.register_forward_hook(lambda *a: None)
    with pytest.raises(InvalidArgumentError, match=r"forward hooks"):
        PackedQKVLinear.from_linear(q, k, nn.Linear(32, 16))
    handle.remove()
    with pytest.raises(InvalidArgumentError, match=r"q_features: expected a positive integer"):
        PackedQKVLinear(32, 0, 16)


# ----------------------------------------------------------------------------------------------------------------
# In a model: one copy of the weights, the state dict, moves and reloads
# ----------------------------------------------------------------------------------------------------------------

def test_patched_model_holds_one_copy_and_its_state_dict_round_trips(tmp_path):
    model = _one_layer("qwen2")  # q/k/v biases
    reference = copy.deepcopy(model)
    patch_model(model)
    assert _storage_bytes(model) == _storage_bytes(reference)  # the packed weight is the only copy
    assert_views_of_the_packed_weight(model.model.layers[0].self_attn)
    # the patched model's state dict: the unpatched model's keys and values, loaded strictly into a plain model
    state = model.state_dict()
    assert list(state) == list(reference.state_dict())
    plain = _one_layer("qwen2", seed=1)
    plain.load_state_dict(state)
    for (name, a), b in zip(plain.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    # a checkpoint loaded into the patched model lands in the packed weight (nothing re-packed, nothing copied)
    other = _one_layer("qwen2", seed=2)
    attn = model.model.layers[0].self_attn
    packing = vars(attn)[PACKING_ATTR]
    model.load_state_dict(other.state_dict())
    assert vars(attn)[PACKING_ATTR] is packing and packing.valid(attn)
    assert torch.equal(packing.linear.bias[64:96], other.model.layers[0].self_attn.k_proj.bias)
    ids = torch.randint(0, 128, (2, 5), device=DEVICE)
    assert _cosine(_logits(model, ids), _logits(other, ids)) >= TOL
    # save_pretrained writes the views as the projections' own tensors: an unpatched model loads them
    model.save_pretrained(tmp_path)
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path).to(DEVICE, DTYPE)
    for (name, a), b in zip(loaded.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_packing_follows_the_model_moved_or_reloaded_after_patching():
    model = patch_model(_one_layer("llama"))
    attn = model.model.layers[0].self_attn
    first = vars(attn)[PACKING_ATTR]
    model.to(torch.float16)  # each parameter gets its own new storage: the packing no longer describes them
    assert not first.valid(attn)
    second = packed_projections(attn)  # rebuilt (eager), the projections views of it again
    assert second is not first and second.linear.weight.dtype == torch.float16 and second.valid(attn)
    assert_views_of_the_packed_weight(attn)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new Parameter objects
    third = packed_projections(attn)
    assert third is not second and third.valid(attn)
    assert_views_of_the_packed_weight(attn)
    handle = attn.k_proj.register_forward_pre_hook(lambda *a: None)  # a GEMM over the packed weight would skip it
    assert packed_projections(attn) is None and PACKING_ATTR not in vars(attn)
    handle.remove()


def test_a_moved_patched_model_computes_what_the_model_computes():
    model = _one_layer("llama")
    reference = copy.deepcopy(model).to(torch.float16)
    patch_model(model).to(torch.float16)
    ids = torch.randint(0, 128, (1, 4), device=DEVICE)
    assert _cosine(_logits(model, ids), _logits(reference, ids)) >= 0.999
    assert_views_of_the_packed_weight(model.model.layers[0].self_attn)


def test_pack_qkv_false_keeps_three_projections():
    model = _one_layer("llama")
    reference = copy.deepcopy(model)
    patch_model(model, pack_qkv=False)
    summary = model.triton_ops_patch
    assert summary.packed_qkv == 0 and summary.rope_attentions == 1
    assert "q/k/v projections: three GEMMs (pack_qkv=False)" in summary.notes
    attn = model.model.layers[0].self_attn
    w = attn.q_proj.weight
    assert PACKING_ATTR not in vars(attn) and w.untyped_storage().nbytes() == 64 * 64 * w.element_size()
    ids = torch.randint(0, 128, (2, 5), device=DEVICE)
    assert _cosine(_logits(model, ids), _logits(reference, ids)) >= TOL
    with pytest.raises(InvalidArgumentError, match=r"pack_qkv: expected a bool"):
        patch_model(_one_layer("llama"), pack_qkv="yes")


# ----------------------------------------------------------------------------------------------------------------
# The attention function, by name
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_the_attention_function_is_the_one_the_config_names(kind):
    # A backend registered in transformers' attention interface under a new name (as triton_ops' own backend is)
    # gets exactly the calls it gets from the unpatched model: same module, shapes and keyword arguments.
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    calls = []

    def spy(module, q, k, v, mask, **kwargs):
        calls.append((type(module).__name__, q.shape, k.shape, v.shape, sorted(kwargs)))
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)

    AttentionInterface.register("triton_ops_test_spy", spy)
    AttentionMaskInterface.register("triton_ops_test_spy", sdpa_mask)
    config = {"head_dim": 16} if kind == "qwen3" else {}
    reference = _one_layer(kind, **config)
    reference.config._attn_implementation = "triton_ops_test_spy"
    model = patch_model(copy.deepcopy(reference))
    ids = torch.randint(0, 128, (2, 5), device=DEVICE)
    ref_logits = _logits(reference, ids)
    ref_calls, calls[:] = list(calls), []
    ours = _logits(model, ids)
    assert len(calls) == 1 and calls == ref_calls
    assert _cosine(ours, ref_logits) >= TOL


@pytest.mark.parametrize("fp8", [False, True])
def test_compiled_attention_is_one_gemm_and_one_rope_launch(fp8):
    # torch.compile(fullgraph=True) through the packed attention: no graph break, the q/k/v GEMM once, RoPE in place
    model = patch_model(_one_layer("llama"), fp8=fp8, fp8_recipe="channel")
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 3, 64, device=DEVICE, dtype=DTYPE)
    cos, sin = model.model.rotary_emb(x, torch.arange(3, device=DEVICE)[None].expand(2, -1))
    graphs = []

    def backend(gm, inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    with torch.no_grad():
        eager = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
        torch._dynamo.reset()
        compiled = torch.compile(attn, fullgraph=True, backend=backend)
        got = compiled(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
    assert torch.equal(got, eager)
    gemm = "triton_ops.fp8_linear.default" if fp8 else "<built-in function linear>"
    assert len(graphs) == 1 and graphs[0].count(gemm) == 2  # q/k/v packed, and o_proj
    assert graphs[0].count("triton_ops.rope_.default") == 1


def _guard_lines(fn, *args) -> list[str]:
    """The guards torch.compile installs for ``fn(*args)`` (backend "eager"), one line each, as its log prints them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("torch._dynamo.guards")
    logger.addHandler(handler)
    torch._logging.set_logs(guards=True)
    try:
        torch._dynamo.reset()
        out = torch.compile(fn, fullgraph=True, backend="eager")(*args)
    finally:
        torch._logging.set_logs()
        logger.removeHandler(handler)
    return out, stream.getvalue().splitlines()


@pytest.mark.parametrize("fp8", [False, True])
def test_compiled_patched_layers_guard_without_python_lambdas_of_their_own(fp8):
    # Dynamo evaluates every guard on every call; a "LAMBDA_GUARD" runs Python. The packing's identity checks, the
    # decoder layer's MLP check and the MLP's read of the config once made five per layer: about a millisecond per
    # decode step of a 32-layer model under transformers' compiled generate() (H200 host). ids, the bound method's
    # function and the activation name kept on the module guard in C++. FP8: the decode-size forward whose norms run
    # inside the GEMMs (the layer's checks of its modules for that are guarded too).
    model = patch_model(_one_layer("llama", num_hidden_layers=2), fp8=fp8, fp8_recipe="channel")
    ids = torch.randint(0, 128, (1, 5), device=DEVICE)
    with torch.no_grad():
        eager = model(ids).logits
        got, guards = _guard_lines(lambda i: model(i).logits, ids)
    assert torch.equal(got, eager)
    lambdas = [line for line in guards if "LAMBDA_GUARD" in line]
    ours = [line for line in lambdas if "_triton_ops_qkv" in line or "_modules['mlp']" in line]
    assert not ours, ours
    assert any("ID_MATCH" in line and "q_proj" in line for line in guards)  # the packing's check is still guarded


@pytest.mark.parametrize("fp8", [False, True])
def test_compiled_patched_layers_keep_their_guard_subtrees_skippable(fp8):
    # With recursive dict tags (on by default in torch 2.9 to 2.12), Dynamo skips the guards of a submodule's
    # whole subtree while no dict in it changed, but only for subtrees of modules, dicts and immutable values. The
    # packing was a plain object in the attention's __dict__ and the MLP's activation an explicit __dict__ read: both
    # made their module's guards run in full on every call (about 15 us per layer and decode step, H200 host).
    model = patch_model(_one_layer("llama", num_hidden_layers=2), fp8=fp8, fp8_recipe="channel")
    assert_guard_subtrees_skippable(model, ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"))


def assert_guard_subtrees_skippable(model, children: tuple[str, ...]) -> list[str]:
    """Compile a 5-token forward of ``model`` (2 layers) with recursive dict tags: the eager logits, and each
    layer's ``children`` guard subtrees tag safe (a root itself, or inside a tag-safe layer that is the root).
    Returns the guard lines."""
    ids = torch.randint(0, 128, (1, 5), device=DEVICE)
    with torch.no_grad(), torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=True):
        eager = model(ids).logits
        got, guards = _guard_lines(lambda i: model(i).logits, ids)
    assert torch.equal(got, eager)
    for layer in range(2):
        for child in children:
            source = f"_modules['{layer}']._modules['{child}'], accessed_by="
            nodes = [line for line in guards if source in line]
            assert nodes and all("tag_safe=(True, " in line for line in nodes), (layer, child, nodes)
    return guards


def test_a_compiled_patched_model_follows_a_replaced_projection_weight():
    # the ids the packing compares are guarded: a new Parameter recompiles and unpacks, never a stale packed weight
    model = patch_model(_one_layer("llama"))
    reference = _one_layer("llama")
    ids = torch.randint(0, 128, (1, 5), device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        first = compiled(ids).logits
        assert _cosine(first, _logits(reference, ids)) >= TOL
        new_v = torch.randn_like(reference.model.layers[0].self_attn.v_proj.weight) * 0.08
        for m in (model, reference):
            m.model.layers[0].self_attn.v_proj.weight = nn.Parameter(new_v.clone(), requires_grad=False)
        again = compiled(ids).logits
    assert _cosine(again, _logits(reference, ids)) >= TOL
    assert _cosine(again, first) < 0.99  # the new weight took effect


# ----------------------------------------------------------------------------------------------------------------
# FP8
# ----------------------------------------------------------------------------------------------------------------

# 8 query heads and 4 key/value heads of 32: q 256 and k/v 128 rows, so 128x128 weight blocks split at q/k/v
_BLOCK_ALIGNED = {"hidden_size": 128, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32}


def test_fp8_block_scales_pack_when_aligned_and_the_views_compute_their_rows():
    # (two layers: the recipes' rules look for a stack of decoder layers)
    model = _one_layer("llama", num_hidden_layers=2, **_BLOCK_ALIGNED)
    reference = copy.deepcopy(model)
    patch_model(model, fp8=True, fp8_recipe="block-mlp-out")  # 128x128 blocks, down_proj kept
    summary = model.triton_ops_patch
    assert summary.packed_qkv == 2 and summary.fp8_linears == 2 * 4  # q, k, v (views), o
    assert summary.fp8_gated_mlps == 2  # gate/up: FP8 weights in the fused MLP kernel
    attn = model.model.layers[0].self_attn
    packed = vars(attn)[PACKING_ATTR].linear
    assert isinstance(packed, FP8Linear) and packed.weight_granularity == "block"
    assert packed.weight_scale.shape == (1, 4) and attn.k_proj.weight_scale.shape == (1, 1)
    assert attn.k_proj.weight_scale.data_ptr() == packed.weight_scale.data_ptr() + 2 * 4
    x = torch.randn(1, 3, 128, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():  # a view module alone computes its rows of the packed GEMM
        torch.testing.assert_close(attn.v_proj(x), packed(x)[..., 384:])
    ids = torch.randint(0, 128, (1, 4), device=DEVICE)
    assert _cosine(_logits(model, ids), _logits(reference, ids)) >= 0.99


def test_fp8_packed_biases_are_views_too():
    model = _one_layer("qwen2")
    reference = copy.deepcopy(model)
    patch_model(model, fp8=True, fp8_recipe="channel")
    attn = model.model.layers[0].self_attn
    packed = vars(attn)[PACKING_ATTR].linear
    assert model.triton_ops_patch.packed_qkv == 1 and packed.bias.shape == (128,)
    assert attn.v_proj.bias.data_ptr() == packed.bias.data_ptr() + 96 * packed.bias.element_size()
    assert list(model.state_dict()) == list(patch_model(copy.deepcopy(reference), fp8=True, fp8_recipe="channel",
                                                        pack_qkv=False).state_dict())
    ids = torch.randint(0, 128, (1, 4), device=DEVICE)
    assert _cosine(_logits(model, ids), _logits(reference, ids)) >= 0.99


def test_fp8_recipes_decide_what_is_packed_and_how():
    # a recipe keeping q/k/v in high precision: they are packed as they are, the rest is FP8
    keep_qkv = FP8Recipe("keep_qkv", "channel", "row", "all", ("q_proj", "k_proj", "v_proj"))
    model = patch_model(_one_layer("llama", num_hidden_layers=2), fp8=True, fp8_recipe=keep_qkv)
    attn = model.model.layers[0].self_attn
    assert model.triton_ops_patch.packed_qkv == 2 and isinstance(attn.o_proj, FP8Linear)
    assert type(attn.q_proj) is nn.Linear and isinstance(vars(attn)[PACKING_ATTR].linear, PackedQKVLinear)
    assert_views_of_the_packed_weight(attn)
    # a recipe converting only some of them: three projections, as the recipe says
    keep_k = FP8Recipe("keep_k", "channel", "row", "all", ("k_proj",))
    model = patch_model(_one_layer("llama", num_hidden_layers=2), fp8=True, fp8_recipe=keep_k)
    attn = model.model.layers[0].self_attn
    assert model.triton_ops_patch.packed_qkv == 0 and PACKING_ATTR not in vars(attn)
    assert type(attn.k_proj) is nn.Linear and isinstance(attn.q_proj, FP8Linear)
    assert any("'keep_k' FP8 recipe converts only some of q/k/v" in n for n in model.triton_ops_patch.notes)
    with pytest.raises(InvalidArgumentError, match=r"straddle"):
        pack_fp8(nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(64, 32), weight_granularity="block",
                 activation_granularity="block")


# ----------------------------------------------------------------------------------------------------------------
# Gradients (the projections' own weights; RoPE out of place)
# ----------------------------------------------------------------------------------------------------------------

def test_gradients_reach_the_projections_of_a_packed_llama_attention(monkeypatch):
    model = patch_model(_one_layer("llama"))
    reference = _one_layer("llama")
    calls = []
    call = QKVPacking.__call__
    monkeypatch.setattr(QKVPacking, "__call__", lambda self, x, *rest: calls.append(1) or call(self, x, *rest))
    ids = torch.randint(0, 128, (1, 5), device=DEVICE)
    model.train()
    reference.train()
    model(ids, labels=ids).loss.backward()
    reference(ids, labels=ids).loss.backward()
    assert not calls  # with a gradient to record, the three projections run (their weights are the parameters)
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        ours = model.model.layers[0].get_parameter(name).grad
        ref = reference.model.layers[0].get_parameter(name).grad
        assert ours is not None and torch.isfinite(ours).all()
        assert _cosine(ours, ref) >= (0.99 if DTYPE == torch.bfloat16 else 0.9999)


def test_generate_runs_on_a_packed_llama():
    model = patch_model(_one_layer("llama"))
    reference = _one_layer("llama")
    ids = torch.randint(0, 128, (2, 4), device=DEVICE)
    with torch.no_grad():
        ours = model.generate(ids, max_new_tokens=3, do_sample=False)
        ref = reference.generate(ids, max_new_tokens=3, do_sample=False)
    assert ours.shape == ref.shape == (2, 7)
    assert torch.equal(ours[:, 4], ref[:, 4])  # the prefill's greedy token; later ones may part at a near tie


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt_oss"])
def test_static_cache_steps_write_the_cache_in_one_launch_like_transformers(kind, monkeypatch):
    """Decode steps against transformers' StaticCache: after the prefill (transformers' own update allocates the
    layer), each step's cache write is one update_kv_cache_ call per layer with the rotary embedding in it (Qwen3's
    QK norm too);
    the cache tensors, the layer's length counter (5.2x) and the logits are those of the unpatched model's own
    update."""
    from decode_attention import kv_cache
    from triton_ops.models import cache_updates, decoder_layers

    model = patch_model(_one_layer(kind, num_hidden_layers=2))
    reference = _one_layer(kind, num_hidden_layers=2)
    calls = []
    original = cache_updates.update_kv_cache_
    monkeypatch.setattr(cache_updates, "update_kv_cache_",
                        lambda *a, **kw: calls.append(sorted(kw)) or original(*a, **kw))
    rope_calls = []  # the separate RoPE launches (Llama: apply_rope; Qwen3: fused_qk_norm_rope)
    rope_fn = "fused_qk_norm_rope" if kind == "qwen3" else "apply_rope"
    original_rope = getattr(decoder_layers, rope_fn)
    monkeypatch.setattr(decoder_layers, rope_fn, lambda *a, **kw: rope_calls.append(1) or original_rope(*a, **kw))
    name = "cache" if "cache" in __import__("inspect").signature(model.forward).parameters else "past_key_values"
    ids = torch.randint(0, 128, (2, 5), device=DEVICE)
    caches, logits = [], []
    with torch.no_grad():
        for m in (model, reference):
            cache = transformers.StaticCache(config=m.config, max_cache_len=12)
            steps = [m(ids, use_cache=True, **{name: cache}).logits]
            for t in range(2):
                pos = torch.full((2, 1), 5 + t, device=DEVICE)
                steps.append(m(ids[:, t:t + 1], use_cache=True, position_ids=pos,
                               cache_position=torch.tensor([5 + t], device=DEVICE), **{name: cache}).logits)
            caches.append(cache)
            logits.append(steps)
    assert len(calls) == 2 * 2  # two steps, two layers; the prefill allocated the layers through transformers
    counter = hasattr(caches[1].layers[0], "cumulative_length") and "cache_kwargs" not in __import__(
        "inspect").signature(type(caches[1].layers[0]).update).parameters
    # the rotary embedding (Qwen3: with its QK norm) runs inside the same launch; its own launch only in the
    # prefill's two layers
    rope = ["cos", "q", "sin"] + (["eps", "gemma", "k_norm_weight", "q_norm_weight"] if kind == "qwen3" else [])
    assert calls[0] == sorted(["length" if counter else "positions", *rope])
    assert len(rope_calls) == 2
    close = 0.9999 if DTYPE == torch.bfloat16 else 0.9999999  # bf16: the packed GEMM rounds its own way
    for ours, ref in zip(caches[0].layers, caches[1].layers):
        for mine, theirs in ((ours.keys, ref.keys), (ours.values, ref.values)):
            assert _cosine(mine[:, :, :7], theirs[:, :, :7]) >= close
            assert not mine[:, :, 7:].any() and not theirs[:, :, 7:].any()  # past the 7 tokens: never written
        if counter:
            assert torch.equal(ours.cumulative_length, ref.cumulative_length)
            assert int(ours.cumulative_length.reshape(-1)[0]) == 7
    for a, b in zip(*logits):
        assert _cosine(a, b) >= TOL
    assert kv_cache.ONE_PROGRAM_ROWS >= 2 * 2  # a decode step here (batch 2, 2 KV heads) is the one-program launch


def test_static_writes_are_read_in_eager_code_and_recognised_by_name_under_compile(monkeypatch):
    """patch_model reads transformers' StaticLayer.update (source, signature) in eager code; a compiled call neither
    imports (transformers 5.17's lazy module is a graph break on torch 2.11) nor reads source: a StaticLayer not read
    yet keeps transformers' own update, and no other class (subclasses included) is ever written by us."""
    from transformers.cache_utils import DynamicLayer, StaticLayer
    from triton_ops.models import cache_updates

    monkeypatch.setattr(cache_updates, "_STATIC_WRITE", {})
    patch_model(_one_layer("llama"))
    assert cache_updates._STATIC_WRITE[StaticLayer] in ("length", "positions")

    class OffloadedStaticLayer(StaticLayer):
        pass

    assert cache_updates.static_write_kind(OffloadedStaticLayer) == ""
    assert cache_updates.static_write_kind(DynamicLayer) == ""
    monkeypatch.setattr(cache_updates, "_STATIC_WRITE", {})
    torch._dynamo.reset()
    kinds = torch.compile(lambda t: t + len(cache_updates.static_write_kind(StaticLayer))
                          + 10 * len(cache_updates.static_write_kind(DynamicLayer)), fullgraph=True,
                          backend="eager")(torch.zeros(1))
    assert kinds.item() == 0 and cache_updates._STATIC_WRITE == {}
    assert cache_updates.static_write_kind(StaticLayer) in ("length", "positions")  # eager: read now


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 decode against the unpatched model, compiled generate()
# ----------------------------------------------------------------------------------------------------------------

def _gpu_model(kind: str):
    config = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 8,
              "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1024, "max_position_embeddings": 256}
    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[kind]
    torch.manual_seed(0)
    model = getattr(transformers, cls[1])(getattr(transformers, cls[0])(**config)).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.05)
    return model.eval()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_packed_attention_decodes_like_the_model(kind, fp8):
    model = _gpu_model(kind)
    if fp8:
        _round_to_the_block_recipes_fp8(model)
    reference = copy.deepcopy(model)
    # q 512 and k/v 128 rows: 128x128 blocks pack too (two layers: the default would keep both, the edge layers)
    patch_model(model, fp8=fp8, **({"fp8_recipe": "block-mlp-out"} if fp8 else {}))
    assert model.triton_ops_patch.packed_qkv == 2
    ids = torch.randint(0, 1024, (2, 33), device="cuda")
    ours, ref = _prefill_and_step(model, ids), _prefill_and_step(reference, ids)
    # FP8: what is left is the prefill's activation quantization (1x128 E4M3 blocks, W8A8) and bf16 roundings; the
    # decode step's rows take the weight-only path, which quantizes nothing
    for a, b in zip(ours, ref):
        assert _cosine(a, b) >= (0.99 if fp8 else 0.999)  # FP8, measured on the H200: 0.9948


def _round_to_the_block_recipes_fp8(model: nn.Module) -> None:
    """Round, in place, the weights that ``patch_model(fp8=True, fp8_recipe="block-mlp-out")`` converts to the E4M3
    values of its 128x128 blocks: the unpatched model then computes with the patched model's weights (up to the bf16
    storage of the rounded values), and a comparison measures the kernels and activation quantization, not the
    weights' FP8 rounding."""
    from fp8_gemm.recipes import select_linears
    from fused_gated_mlp import dequantize_weight_fp8, quantize_weight_fp8

    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in select_linears(model, "block-mlp-out"):
            if name.endswith("lm_head"):
                continue
            weight = modules[name].weight
            weight.copy_(dequantize_weight_fp8(*quantize_weight_fp8(weight, "block")).to(weight.dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_gpu_packed_attention_compiled_generate_with_static_cache(kind):
    from _compiled_generate import assert_compiled_generate_matches_eager

    model = patch_model(_gpu_model(kind))
    assert_compiled_generate_matches_eager(model, torch.randint(0, 1024, (1, 12), device="cuda"))


def test_rope_is_exported_and_registered():
    import fused_rmsnorm_rope
    import triton_ops
    from triton_ops.models import PackedQKVLinear as exported

    assert triton_ops.apply_rope is fused_rmsnorm_rope.apply_rope and "apply_rope" in triton_ops.__all__
    assert exported is PackedQKVLinear
    for name in ("rope", "rope_", "rope_backward"):
        assert name in triton_ops.REGISTERED_OPS
        assert isinstance(getattr(torch.ops.triton_ops, name).default, torch._ops.OpOverload)
