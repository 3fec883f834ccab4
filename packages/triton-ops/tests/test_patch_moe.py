"""patch_model on small random Qwen3-MoE, Mixtral and Qwen2-MoE models built from transformers' own classes: every
sparse mixture of experts runs as fused_moe with the router's own rule (renormalized or not; Qwen2-MoE's gated shared
expert added inside the combine), the patched model computes
what the unpatched one does (prefill, a cached decode step, greedy generate), FP8 experts stand for their
dequantized weights, router logits are still recorded when asked for, and the decode-step fusions (the
post-attention norm inside the MoE, the residual add in its combine) change nothing but rounding. Runs under the
interpreter on CPU (fp32) and on a GPU (bf16). gpt-oss's mixture of experts: test_patch_model.py."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from _model_checks import cosine, prefill_and_step
from triton_ops import patch_model
from triton_ops.layers import MOE_ROUTING_ATTR, GatedMLP, SparseMoE
from triton_ops.models.decoder_layers import FusedAddNormDecoderLayer, QKNormRopeAttention, RopeAttention
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.testing import device_for_tests

transformers = pytest.importorskip("transformers")

DEVICE = device_for_tests()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOL = 0.999 if DTYPE == torch.bfloat16 else 0.99999
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 128, "max_position_embeddings": 64}
# Qwen2-MoE's block is the same in transformers 5.0 and 5.25: beyond the first test, its cases run in CI beside the
# newest transformers only (the CPU budget)
QWEN2_MOE = pytest.param("qwen2_moe", marks=pytest.mark.newest_only)
KINDS = ("qwen3_moe", "qwen3_moe_unnormalized", "mixtral", "qwen2_moe")
# the kinds whose layer 1 is dense (mlp_only_layers)
WITH_DENSE = ("qwen3_moe", "qwen3_moe_unnormalized", "qwen2_moe")


def _config(kind: str, **extra):
    if kind.startswith("qwen3_moe"):
        # layer 1 dense (mlp_only_layers): a Qwen3MoeMLP, patched as a gated MLP beside the sparse block
        return transformers.Qwen3MoeConfig(**SMALL, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                                           num_experts=8, num_experts_per_tok=3, mlp_only_layers=[1],
                                           norm_topk_prob=kind == "qwen3_moe", **extra)
    if kind == "qwen2_moe":  # Qwen1.5-MoE's layout: q/k/v biases, a shared expert, unnormalized top-k weights
        return transformers.Qwen2MoeConfig(**SMALL, intermediate_size=96, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=3,
                                           mlp_only_layers=[1], norm_topk_prob=False, **extra)
    return transformers.MixtralConfig(**SMALL, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                      **extra)


def _model(kind: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    config = _config(kind, **extra)
    cls = {"mixtral": transformers.MixtralForCausalLM,
           "qwen2_moe": transformers.Qwen2MoeForCausalLM}.get(kind, transformers.Qwen3MoeForCausalLM)
    model = cls(config).to(DEVICE, DTYPE).eval()
    with torch.no_grad():  # weights (experts and routers too) large enough that routing and the logits matter
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model


def _sparse_blocks(model) -> list:
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]


@pytest.mark.parametrize("kind", KINDS)
def test_patched_sparse_moe_models_compute_what_transformers_does(kind):
    model = _model(kind)
    reference = copy.deepcopy(model)
    patch_model(model)
    summary = model.triton_ops_patch
    dense, shared = int(kind in WITH_DENSE), int(kind == "qwen2_moe")  # Qwen2-MoE's shared expert: a gated MLP
    assert summary.moe_blocks == 2 - dense and summary.gated_mlps == dense + shared
    assert summary.fused_residual_adds == 2 and summary.packed_qkv == 2
    attention = QKNormRopeAttention if kind.startswith("qwen3_moe") else RopeAttention
    assert all(type(layer.self_attn).forward is attention.forward for layer in model.model.layers)
    assert all(inspect.unwrap(type(layer).forward) is FusedAddNormDecoderLayer.forward for layer in model.model.layers)
    parameters = dict(model.named_parameters())
    for index, (block, ref_block) in enumerate(zip(_sparse_blocks(model), _sparse_blocks(reference), strict=True)):
        assert type(block).forward is SparseMoE.forward and type(block).__name__ == type(ref_block).__name__
        assert block.__dict__[MOE_ROUTING_ATTR] == ("silu", kind in ("qwen3_moe", "mixtral"))
        if shared:  # its shared expert runs the fused gated MLP, on the model's own weights
            assert type(block.shared_expert).forward is GatedMLP.forward
            assert block.shared_expert.gate_proj.weight is parameters[
                f"model.layers.{index}.mlp.shared_expert.gate_proj.weight"]
        # the model's own expert weights, read in place (layer `index` holds the index-th sparse block here)
        assert block.experts.gate_up_proj is parameters[f"model.layers.{index}.mlp.experts.gate_up_proj"]
        with torch.no_grad():  # what the block returns: one tensor of its input's shape
            x = torch.randn(2, 3, 64, device=DEVICE, dtype=DTYPE)
            out, ref_out = block(x), ref_block(x)
        assert isinstance(out, torch.Tensor) and out.shape == ref_out.shape and cosine(out, ref_out) >= TOL
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)
    ours, ref = prefill_and_step(model, ids), prefill_and_step(reference, ids)
    for a, b in zip(ours, ref, strict=True):
        assert torch.isfinite(a.logits).all() and cosine(a.logits, b.logits) >= TOL
    assert set(model.state_dict()) == set(reference.state_dict())


def test_the_unnormalized_qwen3_router_weights_are_the_softmax_over_all_experts():
    """norm_topk_prob=False: the chosen experts' weights are their share of the softmax over all experts (summing
    to less than one), as Qwen3MoeTopKRouter computes them; renormalizing them would be a different model."""
    model = patch_model(_model("qwen3_moe_unnormalized", seed=2))
    reference = _model("qwen3_moe_unnormalized", seed=2)
    block, ref_block = _sparse_blocks(model)[0], _sparse_blocks(reference)[0]
    x = torch.randn(1, 5, 64, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        _, scores, _ = ref_block.gate(x.reshape(-1, 64))
        assert (scores.float().sum(-1) < 0.99).all()  # the case where renormalizing would change the output
        assert cosine(block(x), ref_block(x)) >= TOL
        block.__dict__[MOE_ROUTING_ATTR] = ("silu", True)  # the other rule: a different output
        assert cosine(block(x), ref_block(x)) < 0.9999


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", QWEN2_MOE])
def test_patched_sparse_moe_generates_the_unpatched_models_tokens(kind):
    model = _model(kind, seed=1)
    reference = copy.deepcopy(model)
    patch_model(model)
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    with torch.no_grad():
        ours = model.generate(ids, max_new_tokens=8, do_sample=False)
        ref = reference.generate(ids, max_new_tokens=8, do_sample=False)
    if DTYPE == torch.float32:  # bf16 rounding may part the two at a near tie
        assert torch.equal(ours, ref)
    assert ours.shape == ref.shape


@pytest.mark.parametrize("kind", ["qwen3_moe", pytest.param("mixtral", marks=pytest.mark.newest_only)])
def test_patched_sparse_moe_with_a_static_cache_and_a_large_batch(kind):
    """transformers' StaticCache (eager) at 3 rows, and 17 rows (beyond the decode kernels' 16: the prefill paths
    of the attention and the MoE): the unpatched model's tokens and logits."""
    model = _model(kind, seed=8)
    reference = copy.deepcopy(model)
    patch_model(model)
    kwargs = {"max_new_tokens": 2, "do_sample": False, "cache_implementation": "static",
              "return_dict_in_generate": True, "output_logits": True}
    for batch in (3, 17):
        ids = torch.randint(0, 128, (batch, 5), device=DEVICE)
        with torch.no_grad():
            ours, ref = model.generate(ids, **kwargs), reference.generate(ids, **kwargs)
        assert ours.sequences.shape == ref.sequences.shape == (batch, 7)
        # bf16 on the GPU: transformers rounds Mixtral's router logits to bf16 and takes its top 2 of 4 from them, ours
        # from fp32, so a near tie in one of the 85 tokens can choose another expert (measured at 17 rows: 0.997)
        tol = 0.995 if kind == "mixtral" and DTYPE == torch.bfloat16 else TOL
        for a, b in zip(ours.logits[:2], ref.logits[:2], strict=True):  # prefill and the first cached step
            assert cosine(a, b) >= tol
        if DTYPE == torch.float32:
            assert torch.equal(ours.sequences, ref.sequences)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", QWEN2_MOE])
def test_router_logits_are_recorded_when_asked_for(kind):
    """output_router_logits=True: transformers records the routers' logits through hooks on them; a hooked router
    runs its own forward (the experts and combine stay ours), so the logits and the auxiliary loss are the model's."""
    model = _model(kind, seed=4, output_router_logits=True, router_aux_loss_coef=0.01)
    reference = copy.deepcopy(model)
    patch_model(model)
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)
    with torch.no_grad():
        ours, ref = model(ids, labels=ids), reference(ids, labels=ids)
    assert len(ours.router_logits) == len(ref.router_logits) > 0
    for a, b in zip(ours.router_logits, ref.router_logits, strict=True):  # equal up to the layers' rounding
        assert a.shape == b.shape and cosine(a, b) >= TOL
    assert cosine(ours.logits, ref.logits) >= TOL
    # the router's logits: ours in fp32, transformers' rounded to bf16 on the GPU (measured: 2.5e-4 apart)
    assert torch.allclose(ours.aux_loss.float(), ref.aux_loss.float(), rtol=1e-4 if DTYPE == torch.float32 else 2e-3)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", QWEN2_MOE])
def test_sparse_moe_takes_the_post_attention_norm_and_the_residual_add(kind, monkeypatch, fused_norms):
    """A decode-size forward whose o_proj adds the residual in its launch (FP8 weight-only here): the post-attention
    norm runs inside the MoE's router and gate/up launches and the residual add in its combine (no
    fused_add_rmsnorm in a sparse layer), the logits those of the separate norm up to the residual sum's rounding.
    Qwen2-MoE's shared expert reads the normalized input too: there the norm keeps its launch (fused with the
    attention's residual add) and the combine adds the residual and the shared expert's output."""
    import fused_moe
    from triton_ops.models import decoder_layers

    model = patch_model(_model(kind, seed=5), fp8=True, fp8_recipe="channel")
    norms, moe_calls = [], []
    real_norm, real_experts = decoder_layers.fused_add_rmsnorm, fused_moe.ops.moe_experts
    monkeypatch.setattr(decoder_layers, "fused_add_rmsnorm", lambda *a, **k: norms.append(1) or real_norm(*a, **k))
    monkeypatch.setattr(fused_moe.ops, "moe_experts", lambda *a, **k: moe_calls.append(
        (k.get("norm_weight") is not None, k.get("residual") is not None)) or real_experts(*a, **k))
    ids = torch.randint(0, 128, (2, 5), device=DEVICE)
    sparse = len(_sparse_blocks(model))
    fused = prefill_and_step(model, ids)
    shared = kind == "qwen2_moe"
    assert moe_calls == [(not shared, True)] * (2 * sparse)
    # the dense layer (Qwen3-MoE's, Qwen2-MoE's) takes its norm into its gated MLP's launch
    assert norms == [1] * (2 * sparse * shared)
    monkeypatch.setattr(decoder_layers, "POST_NORM_IN_MLP", False)
    separate = prefill_and_step(model, ids)
    assert moe_calls[2 * sparse:] == [(False, True)] * (2 * sparse)  # the add still in the combine
    for a, b in zip(fused, separate, strict=True):
        assert cosine(a.logits, b.logits) >= (0.999 if DTYPE == torch.bfloat16 else 0.99999)  # H200: 0.9996


def compiled_decode_ops(model) -> list[str]:
    """Compile a decode-size forward (2 rows, no cache) with ``fullgraph=True`` through a backend that records the
    graph's ops and runs it as traced; checks the eager logits and returns our ops' names in graph order."""
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    ids = torch.randint(0, 128, (2, 1), device=DEVICE)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        compiled = torch.compile(model, backend=backend, fullgraph=True)(ids, use_cache=False).logits
    torch._dynamo.reset()
    assert cosine(compiled, eager) >= 0.999999
    return [op.split(".")[1] for op in ops if op.startswith("triton_ops.")]


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "llama", QWEN2_MOE])
def test_compiled_decode_step_keeps_the_fusions(kind, fused_norms):
    """torch.compile(fullgraph=True) of a decode-size forward (2 rows, FP8 weight-only projections, so o_proj adds
    the residual in its launch): one graph, the eager logits, and the same fusions as eager: no fused_add_rmsnorm
    (the post-attention norm inside the MoE's or gated MLP's launches). The layer's checks of what is patched must
    hold under Dynamo too (a bound method's __func__ does not)."""
    if kind == "llama":
        torch.manual_seed(5)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, intermediate_size=96))
        model = model.to(DEVICE, DTYPE).eval()
    else:
        model = _model(kind, seed=5)
    patch_model(model, fp8=True, fp8_recipe="channel")
    ours = set(compiled_decode_ops(model))
    assert ("fused_add_rmsnorm" in ours) == (kind == "qwen2_moe"), ours  # its shared expert reads the norm's output
    assert ("moe_experts" in ours) == (kind != "llama") and ("fused_gated_mlp" in ours) == (kind != "mixtral"), ours


def test_recording_hooks_left_by_an_earlier_call_keep_the_fused_router(monkeypatch):
    """transformers 5.2x keeps its output-capture hooks on the routers after one call asked for hidden states; a
    later call that records no router logits still runs the router in the kernel (eager), one that does records."""
    import fused_moe

    model = patch_model(_model("mixtral", seed=9, output_router_logits=False))
    ids = torch.randint(0, 128, (1, 4), device=DEVICE)
    with torch.no_grad():
        model(ids, output_hidden_states=True)
    routed = []
    real = fused_moe.ops.moe_route
    monkeypatch.setattr(fused_moe.ops, "moe_route", lambda *a, **k: routed.append(1) or real(*a, **k))
    with torch.no_grad():
        model(ids)
        assert len(routed) == 2  # both layers' routers in the kernel
        out = model(ids, output_router_logits=True)
    assert len(routed) == 2 and len(out.router_logits) == 2  # recorded: the routers' own forwards


@pytest.mark.parametrize("fp8", [False, True])
def test_compiled_sparse_moe_keeps_its_guard_subtree_skippable(fp8):
    """Dynamo skips the guards of a module's subtree while no dict in it changed, unless something in the subtree
    is read by an explicit __dict__ / _buffers item (the MoE's routing rule and FP8 scales were: every guard of the
    block then ran on every call). No Python (LAMBDA) guard of the block's either."""
    from test_patch_attention import assert_guard_subtrees_skippable

    model = patch_model(_model("mixtral", seed=2), fp8=fp8, fp8_recipe="channel", fp8_experts=fp8)
    guards = assert_guard_subtrees_skippable(model, ("mlp",))
    assert not [line for line in guards if "LAMBDA_GUARD" in line and "_modules['mlp']" in line]


def test_a_hooked_router_keeps_the_layers_fusions_away():
    from triton_ops.models import decoder_layers

    model = patch_model(_model("mixtral"))
    block = _sparse_blocks(model)[0]
    residual = torch.zeros(1, 64, dtype=DTYPE, device=DEVICE)
    with torch.no_grad():
        assert decoder_layers._moe_adds_residual(block, residual)
        handle = block.gate.register_forward_hook(lambda *args: None)
        assert not decoder_layers._moe_adds_residual(block, residual)
        handle.remove()
        block.gate.forward = block.gate.forward  # transformers 5.0 records outputs by replacing a forward
        assert not decoder_layers._moe_adds_residual(block, residual)
        del block.gate.forward
        block.train()
        block.jitter_noise = 0.1  # Mixtral's router noise, in training mode only
        assert not decoder_layers._moe_adds_residual(block, residual)
        block.eval()
        assert decoder_layers._moe_adds_residual(block, residual)


def test_mixtral_router_noise_applies_in_training_mode_only():
    model = patch_model(_model("mixtral", seed=6, router_jitter_noise=0.5))
    block = _sparse_blocks(model)[0]
    x = torch.randn(1, 4, 64, device=DEVICE, dtype=DTYPE)
    before = x.clone()
    with torch.no_grad():
        quiet = block(x)
        assert torch.equal(block(x), quiet)
        block.train()
        noisy = block(x)
    assert not torch.equal(noisy, quiet) and torch.equal(x, before)  # noise applied out of place


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", QWEN2_MOE])
@pytest.mark.parametrize("fp8_experts", [True, "w8a8"])
def test_sparse_moe_fp8_experts_match_their_dequantized_weights(kind, fp8_experts):
    """Weight-only FP8 experts, or W8A8 (the activations quantized per row too: within their E4M3 rounding)."""
    from fused_moe import is_fp8_experts, uses_fp8_activations

    model = _model(kind, seed=3)
    reference = copy.deepcopy(model)
    patch_model(model, fp8=True, fp8_experts=fp8_experts)
    w8a8 = fp8_experts == "w8a8"
    blocks, ref_blocks = _sparse_blocks(model), _sparse_blocks(reference)
    assert model.triton_ops_patch.moe_blocks == model.triton_ops_patch.fp8_moe_blocks == len(blocks)
    for block, ref_block in zip(blocks, ref_blocks, strict=True):
        experts = block.experts
        assert is_fp8_experts(experts) and experts.gate_up_proj.dtype == torch.float8_e4m3fn
        assert uses_fp8_activations(experts) == w8a8
        assert experts.gate_up_proj.shape == ref_block.experts.gate_up_proj.shape  # [E, 2I, H], as transformers'
        assert experts.gate_up_proj.stride(2) == 1  # (K-major either way: transformers' [E, 2I, H])
        assert block.gate.weight.dtype == DTYPE  # the router keeps the model's dtype
        with torch.no_grad():  # the unpatched block with the weights the FP8 ones stand for (scales per output row)
            ref_block.experts.gate_up_proj.copy_(experts.gate_up_proj.float() * experts.gate_up_scale[:, :, None])
            ref_block.experts.down_proj.copy_(experts.down_proj.float() * experts.down_scale[:, :, None])
            x = torch.randn(2, 3, 64, device=DEVICE, dtype=DTYPE)
            out = block(x)
            assert cosine(out, ref_block(x)) >= (0.99 if w8a8 else TOL)
            if w8a8:  # the activations' E4M3 rounding shows
                assert cosine(out, ref_block(x)) < 0.99999
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)
    assert all(torch.isfinite(out.logits).all() for out in prefill_and_step(model, ids))


def test_an_activation_fused_moe_lacks_is_refused_before_anything_changes():
    model = _model("mixtral")
    model.model.layers[1].mlp.experts.act_fn = torch.nn.ReLU()  # what the experts compute, not only the config
    with pytest.raises(InvalidArgumentError, match="act_fn ReLU"):
        patch_model(model)
    assert getattr(model, "triton_ops_patch", None) is None
    assert all(type(layer.mlp).forward is not SparseMoE.forward for layer in model.model.layers)


def test_only_transformers_own_blocks_and_routers_are_taken():
    """A router of another kind (here a subclass named otherwise: its forward could score differently) keeps its
    block as it is; a block whose experts transformers quantized (FP8 weights, no scales of ours) too, with a
    note; the dense layer is patched either way."""
    for bases in ((torch.nn.Module,), (type(_model("qwen3_moe").model.layers[0].mlp.gate),)):  # unrelated, subclass
        model = _model("qwen3_moe")
        gate = model.model.layers[0].mlp.gate

        def sigmoid_forward(self, hidden_states):  # scores of another kind
            logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
            values, indices = torch.topk(logits.sigmoid(), self.top_k, dim=-1)
            return logits, values, indices

        gate.__class__ = type("SigmoidRouter", bases, {"forward": sigmoid_forward})
        reference = copy.deepcopy(model)
        patch_model(model)
        assert model.triton_ops_patch.moe_blocks == 0 and model.triton_ops_patch.gated_mlps == 1
        assert type(model.model.layers[0].mlp).forward is not SparseMoE.forward
        ids = torch.randint(0, 128, (1, 5), device=DEVICE)
        with torch.no_grad():
            assert cosine(model(ids).logits, reference(ids).logits) >= TOL  # its own router still runs
    model = _model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    experts.down_proj = torch.nn.Parameter(experts.down_proj.detach().to(torch.float8_e4m3fn), requires_grad=False)
    patch_model(model)
    assert model.triton_ops_patch.moe_blocks == 0
    assert any("1 MoE block(s) left as they are" in note for note in model.triton_ops_patch.notes)


def test_what_replaces_a_projection_or_its_forward_keeps_it_out_of_the_fused_launches():
    """An nn.Linear subclass swapped in for down_proj / o_proj after patching (here fake quantization, whose own
    forward computes something else than the plain GEMM), or a forward set on a module's instance: the model
    computes what those modules compute, eager and compiled."""
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, intermediate_size=96))
    model = patch_model(model.to(DEVICE, DTYPE).eval())

    class Halved(torch.nn.Linear):  # a subclass with a forward of its own
        def forward(self, x):
            return super().forward(x) * 0.5

    untouched = copy.deepcopy(model)
    layer = model.model.layers[0]
    for owner, name in ((layer.mlp, "down_proj"), (layer.self_attn, "o_proj")):
        old = getattr(owner, name)
        new = Halved(old.in_features, old.out_features, bias=False).to(DEVICE, DTYPE)
        new.load_state_dict(old.state_dict())
        setattr(owner, name, new)
    layer.post_attention_layernorm.forward = lambda x: torch.zeros_like(x)  # the MLP sees zeros
    reference = copy.deepcopy(model)
    for module in reference.modules():  # the plain path: every fusion off
        module.__dict__.pop("_triton_ops_layer", None)
    ids = torch.randint(0, 128, (1, 1), device=DEVICE)
    torch._dynamo.reset()
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits
        eager = model(ids, use_cache=False).logits
        compiled = torch.compile(model, backend="eager", fullgraph=True)(ids, use_cache=False).logits
        ignored = untouched(ids, use_cache=False).logits  # what the fused launches would give, ignoring them
    torch._dynamo.reset()
    # fp32: the same sums to rounding; bf16 (GPU): the fused and plain paths round in different orders (H100:
    # 0.99998). Either way far closer than the model that ignores the replacements.
    tol = 0.999999 if DTYPE == torch.float32 else 0.9999
    assert cosine(want, ignored) < tol
    assert cosine(eager, want) >= tol and cosine(compiled, want) >= tol


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", QWEN2_MOE])
def test_gpu_sparse_moe_compiled_generate_with_static_cache(kind):
    """transformers' fast path (static cache, torch.compile fullgraph with CUDA graphs) over the patched model: the
    fused MoE's routing has no host sync, so it compiles in a few frames and computes what eager does."""
    from _compiled_generate import assert_compiled_generate_matches_eager

    model = patch_model(_model(kind, seed=7))
    assert_compiled_generate_matches_eager(model, torch.randint(0, 128, (1, 12), device="cuda"))


@pytest.mark.newest_only
def test_qwen2_moe_shared_expert_is_computed_as_its_block_does():
    """The shared expert's output, scaled by the sigmoid of its gate, is part of the block's output: a gate pushed
    towards 0 or 1 moves the patched block exactly as it moves the unpatched one; the shared expert's own hooks
    fire (it is called as a module)."""
    model = patch_model(_model("qwen2_moe", seed=11))
    reference = _model("qwen2_moe", seed=11)
    block, ref_block = _sparse_blocks(model)[0], _sparse_blocks(reference)[0]
    seen = []
    block.shared_expert.register_forward_hook(lambda *args: seen.append(1))
    x = torch.randn(1, 5, 64, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        for scale in (1.0, 50.0, -50.0):  # as it is, the shared expert fully on, fully off
            for b in (block, ref_block):
                b.shared_expert_gate.weight.mul_(scale)
            assert cosine(block(x), ref_block(x)) >= TOL
            for b in (block, ref_block):
                b.shared_expert_gate.weight.div_(scale)
        block.shared_expert.down_proj.weight.zero_()  # without the shared expert: a different output
        assert cosine(block(x), ref_block(x)) < 0.999
    assert len(seen) == 4


@pytest.mark.newest_only
def test_qwen2_moe_with_fp8_keeps_the_shared_expert_gate_and_passes_no_sliding_window():
    """fp8=True converts the shared expert's projections with the rest, never its one-output gate (a per-token
    scalar, as the routers); Qwen2-MoE's attention passes no sliding_window to the attention function (its config
    holds 0 when the window is off, which flash attention would take for a window)."""
    from fp8_gemm import FP8Linear
    from triton_ops.models.decoder_layers import _sliding_window

    model = patch_model(_model("qwen2_moe", seed=12), fp8=True, fp8_recipe="channel")
    block = _sparse_blocks(model)[0]
    assert type(block.shared_expert_gate) is torch.nn.Linear and block.shared_expert_gate.weight.dtype == DTYPE
    assert isinstance(block.shared_expert.down_proj, FP8Linear)
    assert any(note.startswith("1 gate projection(s)") for note in model.triton_ops_patch.notes)
    assert model.config.sliding_window == 0 and _sliding_window(model.model.layers[0].self_attn) == {}
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)
    assert all(torch.isfinite(out.logits).all() for out in prefill_and_step(model, ids))
