"""patch_model on models whose Linear layers are FP8 already: a pre-quantized checkpoint as transformers loads it
(its fine-grained FP8 ``FP8Linear``: E4M3 weights, ``weight_scale_inv`` per 128x128 block, per 1x128 group or per
tensor; FBGEMM's and compressed-tensors' per-channel FP8 layers) and a model ``convert_to_fp8`` converted. The
weights are adopted as they are (never dequantized), q/k/v packed by concatenation, gate/up handed to the fused
kernel; the patched model computes what the checkpoint means: its dequantized weights in a float model. CPU under
Triton's interpreter (fp32) and a GPU (bf16)."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from _model_checks import cosine
from fp8_gemm import FP8Linear
from fused_gated_mlp import FP8Projection, quantize_weight_fp8
from torch import nn
from triton_ops import convert_to_fp8, patch_model
from triton_ops import layers as triton_ops_layers
from triton_ops.models.layers import PACKING_ATTR, QKVPacking
from triton_ops.models.prequantized import is_transformers_fp8_linear
from triton_ops_core.testing import device_for_tests

transformers = pytest.importorskip("transformers")
finegrained_fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")

DEVICE = device_for_tests()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
# q 4 heads x 64 = 256 rows and k/v 2 x 64 = 128: whole 128-row blocks, so block-scaled q/k/v pack
SMALL = {"hidden_size": 256, "intermediate_size": 384, "num_hidden_layers": 1, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 128, "max_position_embeddings": 64}
# Decode-sized calls (at most 16 rows) read the FP8 weights with the activations as they are: the dequantized
# model up to accumulation order. Longer ones quantize the activations too (W8A8).
TOL = 0.999 if DTYPE == torch.bfloat16 else 0.99999
W8A8_TOL = 0.99


def _float_model(kind: str = "qwen3", seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    config_cls, model_cls = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                             "llama": ("LlamaConfig", "LlamaForCausalLM")}[kind]
    config = getattr(transformers, config_cls)(**{**SMALL, **overrides})
    model = getattr(transformers, model_cls)(config).to(DEVICE, DTYPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model


def _quantize(weight: torch.Tensor, block_size) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 weight and its ``[out, in]``-oriented dequantization scale, as a checkpoint stores them
    (``"channel"``: one per output row)."""
    if block_size is None:
        scale = weight.float().abs().amax().clamp(min=1e-12) / 448.0
        return (weight.float() / scale).to(torch.float8_e4m3fn), scale
    scaling = "channel" if block_size == "channel" else {(128, 128): "block", (1, 128): "group"}[tuple(block_size)]
    return quantize_weight_fp8(weight.detach(), scaling)


def _dequantized(q: torch.Tensor, scale: torch.Tensor, block_size) -> torch.Tensor:
    if block_size is None:
        return q.float() * scale
    if block_size == "channel":
        return q.float() * scale[:, None]
    rows, cols = block_size
    full = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    return q.float() * full[:q.shape[0], :q.shape[1]]


def _fine_grained(linear: nn.Linear, block_size, activation_scheme: str) -> tuple[nn.Linear, torch.Tensor]:
    fp8 = finegrained_fp8.FP8Linear(linear.in_features, linear.out_features, block_size=block_size,
                                    activation_scheme=activation_scheme).to(DEVICE)
    q, scale = _quantize(linear.weight, block_size)
    fp8.weight = nn.Parameter(q, requires_grad=False)
    fp8.weight_scale_inv = nn.Parameter(scale.reshape(fp8.weight_scale_inv.shape).float(), requires_grad=False)
    return fp8, _dequantized(q, scale, block_size)


def _channel_scaled(linear: nn.Linear, cls: type) -> tuple[nn.Linear, torch.Tensor]:
    """FBGEMM's ([out, 1] scales) or compressed-tensors' ([1, out]) per-channel FP8 linear."""
    fp8 = cls(linear.in_features, linear.out_features, linear.bias is not None).to(DEVICE)
    q, scale = _quantize(linear.weight, "channel")
    fp8.weight = nn.Parameter(q, requires_grad=False)
    fp8.weight_scale = nn.Parameter(scale.reshape(fp8.weight_scale.shape).float(), requires_grad=False)
    return fp8, _dequantized(q, scale, "channel")


def _checkpoint_layer(fmt: str) -> object:
    """A function making a Linear into ``fmt``'s transformers FP8 layer and its dequantized weight."""
    if fmt == "fbgemm":
        from transformers.integrations.fbgemm_fp8 import FbgemmFp8Linear

        return lambda linear, block_size, scheme: _channel_scaled(linear, FbgemmFp8Linear)
    if fmt == "compressed-tensors":
        ct = pytest.importorskip("transformers.integrations.compressed_tensors")
        if not hasattr(ct, "CompressedTensorsFP8Linear"):
            pytest.skip("this transformers has no CompressedTensorsFP8Linear")
        return lambda linear, block_size, scheme: _channel_scaled(linear, ct.CompressedTensorsFP8Linear)
    return _fine_grained


def _checkpoint(reference: nn.Module, block_size, activation_scheme: str = "dynamic", fmt: str = "fine-grained"
                ) -> nn.Module:
    """``reference`` as transformers loads its pre-quantized FP8 checkpoint of format ``fmt``: every Linear but the
    LM head transformers' FP8 linear; ``reference`` itself gets the dequantized weights (what the checkpoint
    means)."""
    make = _checkpoint_layer(fmt)
    model = copy.deepcopy(reference)
    for name, linear in list(model.named_modules()):
        if type(linear) is not nn.Linear or name == "lm_head":
            continue
        with torch.no_grad():
            fp8, dequantized = make(linear, block_size, activation_scheme)
            reference.get_submodule(name).weight.copy_(dequantized)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, fp8.eval())
    return model


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(("fmt", "block_size"), [("fine-grained", (128, 128)), ("fine-grained", (1, 128)),
                                                 ("fine-grained", None), ("fbgemm", None),
                                                 ("compressed-tensors", None)],
                         ids=["block", "group", "tensor", "fbgemm", "compressed-tensors"])
def test_a_prequantized_checkpoint_runs_its_own_fp8_weights(fmt, block_size):
    reference = _float_model()
    checkpoint = _checkpoint(reference, block_size, fmt=fmt)
    assert is_transformers_fp8_linear(checkpoint.model.layers[0].mlp.down_proj)
    down_weight = checkpoint.model.layers[0].mlp.down_proj.weight
    model = patch_model(checkpoint)
    summary = model.triton_ops_patch
    assert summary.fp8_linears == 5 and summary.fp8_gated_mlps == summary.gated_mlps == 1
    assert summary.packed_qkv == 1 and summary.qk_norm_rope_attentions == 1
    assert any("run as FP8Linear" in n and "never dequantized" in n for n in summary.notes), summary.notes
    assert any("FBGEMM's activation upper bound" in n for n in summary.notes) == (fmt == "fbgemm")
    layer = model.model.layers[0]
    assert type(layer.mlp.down_proj) is FP8Linear
    assert layer.mlp.down_proj.weight.data_ptr() == down_weight.data_ptr()  # adopted, not copied
    assert isinstance(layer.mlp.gate_proj, FP8Projection) and isinstance(layer.mlp.up_proj, FP8Projection)
    packing = layer.self_attn.__dict__[PACKING_ATTR]
    assert isinstance(packing, QKVPacking) and packing.fp8 and packing.sizes == (256, 128, 128)
    assert not any(is_transformers_fp8_linear(m) for m in model.modules())
    ids = torch.randint(0, 128, (2, 9), device=DEVICE)
    assert cosine(_logits(model, ids[:, :4]), _logits(reference, ids[:, :4])) >= TOL  # 8 rows: weight-only
    # 18 rows: W8A8 (1x128 activation blocks for block and group weights, per row for per-tensor ones)
    assert cosine(_logits(model, ids), _logits(reference, ids)) >= W8A8_TOL


def test_a_static_activation_checkpoint_with_unaligned_heads_is_said_and_runs():
    # k/v of one 64-row head: 128-row weight blocks would straddle the q/k/v boundaries, so they stay three GEMMs;
    # the checkpoint's static activation scales are not used (activations are scaled per call) and it says so
    reference = _float_model("llama", seed=1, num_key_value_heads=1, num_hidden_layers=2)
    model = patch_model(_checkpoint(reference, (128, 128), activation_scheme="static"))
    summary = model.triton_ops_patch
    assert summary.packed_qkv == 0 and summary.fp8_linears == 2 * 5
    assert any("static activation scales not used" in n for n in summary.notes), summary.notes
    assert any("straddle" in n for n in summary.notes), summary.notes
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    assert cosine(_logits(model, ids), _logits(reference, ids)) >= TOL


def test_layers_fp8_gemm_cannot_run_stay_transformers_with_a_note():
    reference = _float_model(seed=2)
    checkpoint = _checkpoint(reference, (128, 128))
    odd = checkpoint.model.layers[0].self_attn.o_proj
    odd.block_size = (64, 64)  # a block size fp8_gemm has no kernel for (its scales are not redone: never run)
    model = patch_model(checkpoint)
    assert model.model.layers[0].self_attn.o_proj is odd
    assert any("1 FP8 Linear layer(s) of the checkpoint left to transformers: weight blocks of [64, 64]" in n
               for n in model.triton_ops_patch.notes), model.triton_ops_patch.notes


def test_a_model_convert_to_fp8_converted_is_patched_with_its_weights():
    reference = convert_to_fp8(_float_model("llama", seed=3), recipe="channel")
    model = patch_model(copy.deepcopy(reference))
    summary = model.triton_ops_patch
    assert summary.fp8_gated_mlps == 1 and summary.packed_qkv == 1 and summary.fp8_linears == 0
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    assert cosine(_logits(model, ids), _logits(reference, ids)) >= TOL


def test_a_patched_checkpoint_compiles_whole():
    # torch.compile(fullgraph=True) through the adopted layers: no graph break, the same logits as eager
    model = patch_model(_checkpoint(_float_model(seed=4), (128, 128)))
    ids = torch.randint(0, 128, (1, 5), device=DEVICE)
    eager = _logits(model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert torch.equal(_logits(compiled, ids), eager)


@pytest.mark.gpu
def test_gpu_a_patched_checkpoint_generates_compiled_with_cuda_graphs():
    from _compiled_generate import assert_compiled_generate_matches_eager

    model = patch_model(_checkpoint(_float_model(seed=5, num_hidden_layers=2), (128, 128)))
    assert_compiled_generate_matches_eager(model, torch.randint(0, 128, (1, 12), device="cuda"))


def _stub_mxfp4_forward(self, hidden_states):
    """A stand-in for transformers' MXFP4 MoE forward (its kernels come from the Hub): the router's logits and a
    function of the input the test can compute on any device."""
    logits = nn.functional.linear(hidden_states, self.router.weight, self.router.bias)
    return torch.tanh(hidden_states) * 0.5, logits


def test_gpt_oss_with_mxfp4_experts_patches_the_rest_and_leaves_the_experts(monkeypatch):
    # transformers' MXFP4 experts (packed uint8 bytes, read by triton_kernels' kernels): fused_moe cannot read them,
    # so they keep their own forward, said in the summary; attention, norms and the residual adds are ours. Before,
    # patch_model took them for bf16 experts and the first forward failed.
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    config = transformers.GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                       num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                       layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(6)
    reference = transformers.GptOssForCausalLM(config).to(DEVICE, DTYPE).eval()
    # transformers 5.2x wraps router and experts in its Mxfp4GptOssMLP; 5.0 swaps the experts and sets the MLP's
    # forward on the instance
    wrapper = getattr(mxfp4, "Mxfp4GptOssMLP", None)
    for layer in reference.model.layers:
        experts = mxfp4.Mxfp4GptOssExperts(config).to(DEVICE)
        with torch.no_grad():
            experts.gate_up_proj.random_(0, 256)
            experts.down_proj.random_(0, 256)
        if wrapper is not None:
            layer.mlp = wrapper(layer.mlp.router, experts)
        else:
            layer.mlp.experts = experts
            layer.mlp.forward = types.MethodType(_stub_mxfp4_forward, layer.mlp)
    if wrapper is not None:
        monkeypatch.setattr(wrapper, "forward", _stub_mxfp4_forward)
    mlp_class = type(reference.model.layers[0].mlp)
    model = patch_model(copy.deepcopy(reference))
    summary = model.triton_ops_patch
    assert summary.moe_blocks == 0 and summary.rope_attentions == 2 and summary.fused_residual_adds == 2
    assert any("2 MoE block(s) left as they are" in n and "MXFP4" in n for n in summary.notes), summary.notes
    assert not any("beside the MoE blocks" in n for n in summary.notes), summary.notes  # not loose experts either
    assert type(model.model.layers[0].mlp) is mlp_class
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    assert cosine(_logits(model, ids), _logits(reference, ids)) >= TOL


def test_packing_fp8_linears_keeps_their_weights_options_and_per_tensor_scales():
    from triton_ops.models.layers import pack_fp8_linears

    torch.manual_seed(7)
    lins = []
    for rows in (256, 128, 128):
        weight = (torch.randn(rows, 64, device=DEVICE) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        lin = FP8Linear.from_quantized(weight, torch.rand((), device=DEVICE) + 0.5)  # its own per-tensor scale
        lin.path = "w8a8"  # an option set on the instance
        lins.append(lin)
    packed, views = pack_fp8_linears(*lins)
    # different per-tensor scales: one per row of the packed weight, the same factors
    assert packed.weight_granularity == "channel" and packed.weight.shape == (512, 64)
    assert packed.path == "w8a8" and all(v.path == "w8a8" for v in views)
    for lin, view in zip(lins, views, strict=True):
        assert torch.equal(view.dequantized_weight(), lin.dequantized_weight())
        assert view.weight.untyped_storage().data_ptr() == packed.weight.untyped_storage().data_ptr()
    x = torch.randn(3, 64, device=DEVICE)
    torch.testing.assert_close(packed(x), torch.cat([lin(x) for lin in lins], dim=-1), rtol=1e-4, atol=1e-4)


def test_a_copied_or_loaded_fp8_model_keeps_its_packed_qkv():
    # a deep copy (as torch.save / torch.load of the whole model) gives every object a new identity but keeps the
    # q/k/v views inside the packed weight's one storage: the copy packs again (one GEMM, the same bits), where it
    # used to drop the packing and run three GEMMs (a model loaded in a fresh process computed other bits)
    from triton_ops.models.layers import packed_projections

    model = patch_model(_checkpoint(_float_model(seed=8), (128, 128)))
    ids = torch.randint(0, 128, (1, 5), device=DEVICE)
    want = _logits(model, ids)
    copied = copy.deepcopy(model)
    attn = copied.model.layers[0].self_attn
    packing = packed_projections(attn)
    assert packing is not None and packing.linear is not model.model.layers[0].self_attn.__dict__[PACKING_ATTR].linear
    assert packing.valid(attn) and torch.equal(_logits(copied, ids), want)
    # projections no longer viewing the packed rows (their own storage, as .to() gives each tensor): unpacked
    attn.q_proj.weight = attn.q_proj.weight.clone()
    assert packed_projections(attn) is None and PACKING_ATTR not in attn.__dict__


FP8_EXPERTS = getattr(finegrained_fp8, "FP8Experts", None)


def _stacked_blocks(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's ``[out, in]`` weight in E4M3 with 128x128 block scales, stacked: what an FP8 checkpoint's
    ``gate_up_proj`` / ``down_proj`` and their ``*_scale_inv`` hold, and the dequantized weights."""
    pairs = [quantize_weight_fp8(w.detach(), "block") for w in weights]
    q, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]).float()
    return q, s, torch.stack([_dequantized(a, b, (128, 128)) for a, b in pairs])


@pytest.mark.skipif(FP8_EXPERTS is None, reason="this transformers has no FP8Experts")
def test_a_checkpoints_fp8_experts_run_in_fused_moe_with_their_weights(monkeypatch):
    # Qwen3-MoE loaded from an FP8 checkpoint: transformers' FP8Experts (E4M3 gate_up_proj [E, 2I, H] and down_proj,
    # *_scale_inv per 128x128 block). fused_moe reads them as they are; the model computes what the dequantized
    # weights do. Hidden 192 and intermediate 80: partial blocks, the up half starting inside a block.
    torch.manual_seed(6)
    config = transformers.Qwen3MoeConfig(hidden_size=192, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=48, vocab_size=128,
                                         max_position_embeddings=64, intermediate_size=96, moe_intermediate_size=80,
                                         num_experts=4, num_experts_per_tok=2)
    reference = transformers.Qwen3MoeForCausalLM(config).to(DEVICE, DTYPE).eval()
    with torch.no_grad():
        for p in reference.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    checkpoint = copy.deepcopy(reference)
    experts = reference.model.layers[0].mlp.experts
    fp8 = FP8_EXPERTS(config, block_size=(128, 128)).to(DEVICE)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            q, s, dequantized = _stacked_blocks(getattr(experts, name).float())
            setattr(fp8, name, nn.Parameter(q, requires_grad=False))
            setattr(fp8, f"{name}_scale_inv", nn.Parameter(s, requires_grad=False))
            getattr(experts, name).copy_(dequantized.to(DTYPE))  # the reference: the checkpoint's meaning
    checkpoint.model.layers[0].mlp.experts = fp8
    keys = set(checkpoint.state_dict())
    # with fp8=True (the float Linears converted too) the experts are said to be the checkpoint's, not "kept"
    notes = patch_model(copy.deepcopy(checkpoint), fp8=True).triton_ops_patch.notes
    assert any("checkpoint's FP8 experts" in n for n in notes) and not any("kept in their dtype" in n for n in notes)
    model = patch_model(checkpoint)
    summary = model.triton_ops_patch
    assert summary.moe_blocks == 1 and summary.fp8_moe_blocks == 0, summary
    assert any("checkpoint's FP8 experts" in n for n in summary.notes), summary.notes
    assert not any("left as they are" in n for n in summary.notes), summary.notes
    assert fp8.gate_up_scale.data_ptr() == fp8.gate_up_proj_scale_inv.data_ptr()  # the checkpoint's, not a copy
    assert set(model.state_dict()) == keys  # the scales' second names are not states
    ids = torch.randint(0, 128, (2, 5), device=DEVICE)
    calls = []
    original = triton_ops_layers.fused_moe
    monkeypatch.setattr(triton_ops_layers, "fused_moe", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    assert cosine(_logits(model, ids), _logits(reference, ids)) >= TOL  # 10 tokens: weight-only
    # a prefill of 64 tokens: the activations quantized per row too (W8A8)
    long_ids = torch.randint(0, 128, (2, 32), device=DEVICE)
    assert cosine(_logits(model, long_ids), _logits(reference, long_ids)) >= W8A8_TOL
    assert [kw["fp8_activations"] for kw in calls] == [False, True]
    assert all(kw["gate_up_scale"].dim() == 3 for kw in calls)


@pytest.mark.skipif(FP8_EXPERTS is None, reason="this transformers has no FP8Experts")
def test_fp8_experts_fused_moe_cannot_read_stay_transformers_with_a_note():
    from triton_ops.models.prequantized import adopt_fp8_experts, fp8_experts_problem

    config = transformers.Qwen3MoeConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, vocab_size=128,
                                         moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    holder = nn.Module()
    holder.block64 = FP8_EXPERTS(config, block_size=(64, 64))
    holder.clamped = FP8_EXPERTS(config, block_size=(128, 128))
    holder.clamped.limit = 7.0
    holder.ok = FP8_EXPERTS(config, block_size=(128, 128))
    assert "weight blocks of (64, 64)" in fp8_experts_problem(holder.block64)
    assert "a gate other than act(gate) * up" in fp8_experts_problem(holder.clamped)
    notes: list[str] = []
    assert adopt_fp8_experts(holder, notes) == [holder.ok]
    assert "gate_up_scale" not in holder.block64._buffers and "gate_up_scale" in holder.ok._buffers
    assert sum("left to transformers" in n for n in notes) == 2, notes
