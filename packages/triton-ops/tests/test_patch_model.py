"""patch_model on small random Llama / Qwen3 / Mistral / Qwen2 models built from transformers' own classes: the
patched model computes what the unpatched one does (prefill and a cached decode step, fp8 off and on; the attention
through one packed q/k/v GEMM and the rotary kernel), generate() runs, and unsupported models get a named error.
Runs under the interpreter on CPU (fp32) and on a GPU (bf16). More on the attention: test_patch_attention.py."""

from __future__ import annotations

import copy
import importlib
import inspect

import pytest
import torch
from fused_gated_mlp import FP8Projection
from triton_ops import FP8Linear, patch_model
from triton_ops.layers import GatedMLP
from triton_ops.layers import RMSNorm as RMSNormLayer
from triton_ops.models import UnsupportedModelError
from triton_ops.models.decoder_layers import FusedAddNormDecoderLayer, QKNormRopeAttention, RopeAttention
from triton_ops.models.layers import PACKING_ATTR, QKVPacking
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.testing import device_for_tests, normalized_like_the_prologue

transformers = pytest.importorskip("transformers")

DEVICE = device_for_tests()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=16),
    "mistral": lambda: transformers.MistralConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),  # q/k/v with biases
}
CLASSES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
           "qwen2": "Qwen2ForCausalLM"}


def _model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[kind])(CONFIGS[kind]()).to(DEVICE, DTYPE).eval()
    with torch.no_grad():  # weights large enough that the logits are not all alike
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def _prefill_and_step(model, ids):
    """Logits of a prefill and of one decode step through transformers' own cache (its argument is ``cache`` from
    transformers 5.2x on, ``past_key_values`` before)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(ids, use_cache=True)
        # The same next token for every model compared: each model's own greedy token would part at a near tie of
        # the prefill's logits (bf16 on a GPU), and the two decode steps would then see different inputs.
        nxt = ids[:, :1]
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        step = model(nxt, use_cache=True, **{name: cache})
    return out.logits, step.logits


def assert_views_of_the_packed_weight(attn) -> None:
    """q_proj / k_proj / v_proj weights (and biases) are views of the packed projection's rows: one copy."""
    packed = attn.__dict__[PACKING_ATTR].linear
    row = 0
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        for name in ("weight", "bias"):
            t, whole = getattr(proj, name), getattr(packed, name)
            if whole is None:
                assert t is None
                continue
            assert t.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
            assert t.data_ptr() == whole.data_ptr() + row * whole.stride(0) * whole.element_size()
        row += proj.weight.shape[0]
    assert row == packed.weight.shape[0]


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_patched_model_computes_what_the_model_computes(kind, monkeypatch):
    model = _model(kind)
    reference = copy.deepcopy(model)
    patch_model(model)
    summary = model.triton_ops_patch
    # two layers' norms and the final norm; Qwen3 also normalizes q and k per head
    assert summary.gated_mlps == 2 and summary.fp8_linears == 0
    assert summary.rms_norms == 2 * 2 + 1 + (2 * 2 if kind == "qwen3" else 0)
    assert summary.fused_residual_adds == 2
    assert summary.qk_norm_rope_attentions == (2 if kind == "qwen3" else 0)
    assert summary.rope_attentions == (0 if kind == "qwen3" else 2) and summary.packed_qkv == 2
    assert type(model.model.norm).forward is RMSNormLayer.forward
    layer = model.model.layers[1]
    # (transformers' decoder-layer base class wraps a subclass's forward: unwrap before comparing)
    assert inspect.unwrap(type(layer).forward) is FusedAddNormDecoderLayer.forward
    attention = QKNormRopeAttention if kind == "qwen3" else RopeAttention
    assert inspect.unwrap(type(layer.self_attn).forward) is attention.forward
    assert isinstance(layer.self_attn, type(reference.model.layers[1].self_attn))
    assert_views_of_the_packed_weight(layer.self_attn)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, type(reference.model.layers[0].mlp)) and type(mlp).forward is GatedMLP.forward
    assert mlp.gate_proj.weight is model.model.layers[0].mlp.gate_proj.weight  # no second copy
    assert model.state_dict().keys() == reference.state_dict().keys()
    packed_calls = []  # the attention's q/k/v ran as one GEMM: once per layer and forward
    call = QKVPacking.__call__
    monkeypatch.setattr(QKVPacking, "__call__",
                        lambda self, x, *rest: packed_calls.append(x.shape) or call(self, x, *rest))
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)
    ours_prefill, ours_step = _prefill_and_step(model, ids)
    ref_prefill, ref_step = _prefill_and_step(reference, ids)
    assert packed_calls == [(2, 7, 64)] * 2 + [(2, 1, 64)] * 2
    tol = 0.999 if DTYPE == torch.bfloat16 else 0.999999
    assert _cosine(ours_prefill, ref_prefill) >= tol and _cosine(ours_step, ref_step) >= tol


def test_fp8_default_recipe_keeps_the_first_and_last_layers_whole():
    # the default (the group recipe) keeps the first and last decoder layers in their dtype: in a two-layer model,
    # every Linear (said in the summary)
    model = patch_model(_model("llama"), fp8=True)
    summary = model.triton_ops_patch
    assert summary.fp8_linears == summary.fp8_gated_mlps == 0
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert any("kept in their dtype by the 'default'" in n for n in summary.notes)


def test_fp8_block_mlp_out_recipe_keeps_the_mlp_output_projections():
    model = patch_model(_model("llama"), fp8=True, fp8_recipe="block-mlp-out")
    summary = model.triton_ops_patch
    assert summary.fp8_linears == 2 * 4  # q, k, v, o per layer; down_proj kept; gate/up in the MLP kernel
    assert summary.fp8_gated_mlps == summary.gated_mlps == 2
    layer = model.model.layers[1]
    assert type(layer.mlp.down_proj) is torch.nn.Linear
    assert isinstance(layer.mlp.up_proj, FP8Projection) and layer.mlp.up_proj.scaling == "block"
    assert layer.mlp.gate_proj.weight.dtype == torch.float8_e4m3fn
    assert any("kept in their dtype by the 'block-mlp-out'" in n for n in model.triton_ops_patch.notes)
    # this model's 64 q and 32 k/v rows would share 128-row weight blocks: its q/k/v stay three FP8 GEMMs
    assert model.triton_ops_patch.packed_qkv == 0 and PACKING_ATTR not in vars(layer.self_attn)
    assert any("not packed: FP8 weight blocks of 128 rows would straddle" in n for n in model.triton_ops_patch.notes)


def test_fp8_patch_converts_every_linear_but_the_lm_head():
    model = _model("llama")
    reference = copy.deepcopy(model)
    patch_model(model, fp8=True, fp8_recipe="channel")
    assert model.triton_ops_patch.fp8_linears == 2 * 5  # q, k, v, o, down per layer
    mlp = model.model.layers[0].mlp  # gate/up: FP8 weights inside the fused kernel (weight-only)
    assert model.triton_ops_patch.fp8_gated_mlps == 2 and mlp.gate_proj.scaling == "channel"
    assert mlp.gate_proj.weight.dtype == torch.float8_e4m3fn  # the one copy of the weight, in FP8
    assert not any(p.dim() == 2 for p in mlp.gate_proj.parameters())  # no high-precision weight kept beside it
    assert type(model.lm_head) is torch.nn.Linear and isinstance(model.model.layers[1].mlp.down_proj, FP8Linear)
    # q, k, v quantized together as one FP8Linear; each projection an FP8Linear viewing its rows and scales
    attn = model.model.layers[1].self_attn
    packed = attn.__dict__[PACKING_ATTR].linear
    assert model.triton_ops_patch.packed_qkv == 2 and isinstance(packed, FP8Linear) and packed.out_features == 128
    assert all(isinstance(p, FP8Linear) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert attn.k_proj.weight.data_ptr() == packed.weight.data_ptr() + 64 * 64  # rows 64.. of the FP8 weight
    assert attn.v_proj.weight_scale.data_ptr() == packed.weight_scale.data_ptr() + 96 * 4
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    (ours, ours_step), (ref, ref_step) = _prefill_and_step(model, ids), _prefill_and_step(reference, ids)
    # E4M3 weights and activations: a few percent of error per layer, the logits still point the same way
    assert _cosine(ours, ref) >= 0.99 and _cosine(ours_step, ref_step) >= 0.99


def test_fp8_group_scales_pack_qkv_and_keep_the_fused_gate_up(monkeypatch):
    from fp8_gemm import FP8Recipe
    from triton_ops import layers

    model = _model("llama")
    reference = copy.deepcopy(model)
    recipe = FP8Recipe("groups", "group", "block", keep_layers=(0, 0))  # every Linear (2 layers: no edge kept)
    patch_model(model, fp8=True, fp8_recipe=recipe)
    summary = model.triton_ops_patch
    mlp, attn = model.model.layers[1].mlp, model.model.layers[1].self_attn
    # gate/up: FP8 weights with a scale per row and 128 columns inside the fused MLP kernel; down: an FP8Linear
    assert summary.fp8_gated_mlps == 2 and summary.fp8_linears == 2 * 5
    assert all(isinstance(p, FP8Projection) and p.scaling == "group" for p in (mlp.gate_proj, mlp.up_proj))
    assert mlp.gate_proj.weight_scale.shape == (mlp.gate_proj.out_features, 1)  # [out, ceil(64 / 128)]
    kn = getattr(mlp.gate_proj, layers.GEMM_SCALE_BUFFER)  # the W8A8 GEMM's [in / 128, out] copy
    assert kn.is_contiguous() and torch.equal(kn, mlp.gate_proj.weight_scale.t())
    assert isinstance(mlp.down_proj, FP8Linear) and mlp.down_proj.weight_granularity == "group"
    packed = attn.__dict__[PACKING_ATTR].linear  # group scales split at any row: q/k/v packed
    assert summary.packed_qkv == 2 and packed.weight_granularity == "group"
    assert attn.v_proj.weight_scale.data_ptr() == packed.weight_scale.data_ptr() + 96 * 4
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    (ours, ours_step), (ref, ref_step) = _prefill_and_step(model, ids), _prefill_and_step(reference, ids)
    assert _cosine(ours, ref) >= 0.99 and _cosine(ours_step, ref_step) >= 0.99
    # beyond 16 rows the gate/up run as two W8A8 GEMMs on the group scales
    _, gemms = _w8a8_spy(monkeypatch, layers)
    x = torch.randn(layers.W8A8_MIN_ROWS, mlp.gate_proj.in_features, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        ours_w8a8 = layers.gated_hidden(mlp, x)
        want = torch.nn.functional.silu(mlp.gate_proj(x).float()) * mlp.up_proj(x).float()
    assert len(gemms) == 2 and all(c["b_scale"] is getattr(p, layers.GEMM_SCALE_BUFFER)
                                   for c, p in zip(gemms, (mlp.gate_proj, mlp.up_proj)))
    assert _cosine(ours_w8a8, want) >= 0.99
    # the named recipe keeps the first and last layers whole: on two layers, nothing converts
    assert patch_model(_model("llama"), fp8=True, fp8_recipe="group").triton_ops_patch.fp8_linears == 0


def test_fp8_calibration_folds_smoothing_into_the_norms_before_quantizing():
    model = _model("llama")
    reference = copy.deepcopy(model)
    calibration = torch.randint(0, 128, (2, 16), device=DEVICE)
    patch_model(model, fp8=True, fp8_recipe="channel", fp8_calibration=calibration)
    # q/k/v (FP8Linear) and gate/up (W8A8 GEMMs beyond 16 rows): activations quantized at prefill
    assert any("SmoothQuant (alpha 0.5) folded into the norms feeding 10 Linear layers" in n
               for n in model.triton_ops_patch.notes), model.triton_ops_patch.notes
    for ours, ref in zip(model.model.layers, reference.model.layers, strict=True):
        assert not torch.equal(ours.input_layernorm.weight, ref.input_layernorm.weight)  # divided by the factors
        assert not torch.equal(ours.post_attention_layernorm.weight, ref.post_attention_layernorm.weight)
    assert model.triton_ops_patch.fp8_linears == 2 * 5 and model.triton_ops_patch.fp8_gated_mlps == 2
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    (ours, ours_step), (ref, ref_step) = _prefill_and_step(model, ids), _prefill_and_step(reference, ids)
    assert _cosine(ours, ref) >= 0.99 and _cosine(ours_step, ref_step) >= 0.99
    with pytest.raises(InvalidArgumentError, match="fp8=True"):
        patch_model(_model("llama"), fp8_calibration=calibration)


def test_fp8_down_projection_adds_the_residual_in_its_kernel(monkeypatch):
    """A bias-free FP8 down_proj adds into the layer's residual (fp8_linear_add_: on a decode row, the weight-only
    kernel's epilogue) instead of a separate add: once per layer and forward, the same logits as the separate add
    (float32: the same sum, bit for bit)."""
    from triton_ops.models import decoder_layers

    model = patch_model(_model("llama"), fp8=True, fp8_recipe="channel")
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    calls = []
    fused = decoder_layers.fp8_linear_add_
    monkeypatch.setattr(decoder_layers, "fp8_linear_add_", lambda r, x, *a: calls.append(x.shape) or fused(r, x, *a))
    ours = _prefill_and_step(model, ids)
    assert calls == [(1, 6, 96)] * 2 + [(1, 1, 96)] * 2  # the prefill's two layers, then the step's
    monkeypatch.setattr(decoder_layers, "_down_adds_residual", lambda *args: "")
    separate = _prefill_and_step(model, ids)
    for a, b in zip(ours, separate, strict=True):
        if DTYPE == torch.float32:
            assert torch.equal(a, b)
        else:
            assert _cosine(a, b) >= 0.9999


def _norm_in_qkv_spy(monkeypatch) -> list[bool]:
    """Whether each packed q/k/v GEMM through decode_linear normalized its input itself."""
    from triton_ops.models import layers as model_layers

    calls: list[bool] = []
    real = model_layers.decode_linear
    monkeypatch.setattr(model_layers, "decode_linear",
                        lambda *a, **kw: calls.append(kw.get("norm_weight") is not None) or real(*a, **kw))
    return calls


# (Qwen3's beside the newest transformers only: the fusion is off by default, and CI time)
@pytest.mark.parametrize("kind", ["llama", pytest.param("qwen3", marks=pytest.mark.newest_only)])
def test_fp8_input_norm_runs_inside_the_packed_qkv_launch(kind, monkeypatch, fused_norms):
    """With FP8 weights the packed q/k/v projection of a few rows is the weight-only kernel, which RMS-normalizes its
    input itself: the layer's input norm launch is gone, and the logits are those of the separate norm up to the
    normalized row's rounding to the activation dtype (the kernel scales its fp32 sums by the row's rstd)."""
    from triton_ops.models import decoder_layers

    model = patch_model(_model(kind), fp8=True, fp8_recipe="channel")
    ids = torch.randint(0, 128, (2, 5), device=DEVICE)
    calls = _norm_in_qkv_spy(monkeypatch)
    norms = []
    for layer in model.model.layers:
        layer.input_layernorm.register_forward_hook(lambda *a: norms.append(1))
    hooked = _prefill_and_step(model, ids)
    assert calls == [] and len(norms) == 4  # a hooked norm is its own launch (its hook sees its output)
    model = patch_model(_model(kind), fp8=True, fp8_recipe="channel")
    fused = _prefill_and_step(model, ids)
    assert calls == [True] * 4  # two layers, prefill (10 rows) and step (2 rows)
    monkeypatch.setattr(decoder_layers, "INPUT_NORM_IN_QKV", False)
    separate = _prefill_and_step(model, ids)
    assert calls[4:] == []  # the separate path's FP8Linear runs its own plan
    tol = 0.9999 if DTYPE == torch.bfloat16 else 0.99999
    for a, b, c in zip(fused, separate, hooked, strict=True):
        assert torch.equal(b, c) and _cosine(a, b) >= tol
    # beyond NORM_PROLOGUE_MAX_ROWS rows (a prefill of 17 tokens), the norm is its own launch again
    calls.clear()
    monkeypatch.setattr(decoder_layers, "INPUT_NORM_IN_QKV", True)
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 17), device=DEVICE))
    assert calls == []


def test_shipped_input_norm_fusion_takes_one_row(monkeypatch):
    """As shipped (INPUT_NORM_IN_QKV on, INPUT_NORM_MAX_ROWS 1): a one-row FP8 decode step normalizes inside its
    packed q/k/v launch, a two-row one keeps the norm's own launch; the logits match the separate norm's."""
    from triton_ops.models import decoder_layers

    assert decoder_layers.SHIPPED_SWITCHES["INPUT_NORM_IN_QKV"] and decoder_layers.INPUT_NORM_MAX_ROWS == 1
    model = patch_model(_model("llama"), fp8=True, fp8_recipe="channel")
    calls = _norm_in_qkv_spy(monkeypatch)
    one = _prefill_and_step(model, torch.randint(0, 128, (1, 5), device=DEVICE))
    assert calls == [True, True]  # the step's two layers (the 5-row prefill keeps the norm's launch)
    calls.clear()
    _prefill_and_step(model, torch.randint(0, 128, (2, 5), device=DEVICE))
    assert calls == []
    monkeypatch.setattr(decoder_layers, "INPUT_NORM_IN_QKV", False)
    torch.manual_seed(0)
    separate = _prefill_and_step(model, torch.randint(0, 128, (1, 5), device=DEVICE))
    torch.manual_seed(0)
    monkeypatch.setattr(decoder_layers, "INPUT_NORM_IN_QKV", True)
    fused = _prefill_and_step(model, torch.randint(0, 128, (1, 5), device=DEVICE))
    tol = 0.9999 if DTYPE == torch.bfloat16 else 0.99999
    assert torch.equal(fused[0], separate[0]) and _cosine(fused[1], separate[1]) >= tol
    assert one[1].shape == fused[1].shape


def test_post_attention_norm_runs_inside_the_gated_mlp_launch(monkeypatch, fused_norms):
    """A decode-size forward (at most 16 rows) of FP8 projections adds the attention's residual in o_proj's launch
    (the weight-only kernel), normalizes inside the gated MLP's launch and adds the MLP's residual in down_proj's:
    no fused_add_rmsnorm launch. The logits match the separate norm's (the residual sum is rounded once instead of
    twice), and the layers' inputs, which output_hidden_states returns, are left as they were. (bf16 projections:
    one row on a GPU, test_gpu_decode_step_norms_inside_the_gemms_change_no_logit.)"""
    from triton_ops.models import decoder_layers

    model = patch_model(_model("llama"), fp8=True, fp8_recipe="channel")
    ids = torch.randint(0, 128, (2, 5), device=DEVICE)
    norms = []
    real = decoder_layers.fused_add_rmsnorm
    monkeypatch.setattr(decoder_layers, "fused_add_rmsnorm", lambda *a, **k: norms.append(1) or real(*a, **k))
    with torch.no_grad():
        fused = model(ids, output_hidden_states=True)
    assert norms == []
    monkeypatch.setattr(decoder_layers, "POST_NORM_IN_MLP", False)
    with torch.no_grad():
        separate = model(ids, output_hidden_states=True)
    assert len(norms) == 2
    tol = 0.9999 if DTYPE == torch.bfloat16 else 0.99999  # measured on the H200 in bf16: 0.99996-0.99997
    assert _cosine(fused.logits, separate.logits) >= tol
    for a, b in zip(fused.hidden_states, separate.hidden_states, strict=True):
        assert _cosine(a, b) >= tol
    # the embeddings (the first layer's input) came through untouched
    assert torch.equal(fused.hidden_states[0], separate.hidden_states[0])
    # more rows than NORM_PROLOGUE_MAX_ROWS: the norm's own launch again
    monkeypatch.setattr(decoder_layers, "POST_NORM_IN_MLP", True)
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 17), device=DEVICE))
    assert len(norms) == 4
    # a user's hook on an attention sees its input and output as transformers defines them: that layer keeps the
    # norm's own launch (transformers' output-capture hook, installed by output_hidden_states above, does not)
    handle = model.model.layers[0].self_attn.register_forward_pre_hook(lambda *args: None)
    with torch.no_grad():
        model(ids)
    handle.remove()
    assert len(norms) == 5


def _next_norm_spy(monkeypatch) -> list[tuple]:
    """``(output, normed, next_norm_weight, next_norm_eps)`` of each output projection's decode_linear call that
    wrote the post-attention norm (``normed=``), copied when the call returns."""
    from triton_ops.models import decoder_layers

    written: list[tuple] = []
    real = decoder_layers.decode_linear

    def recording_linear(*args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs.get("normed") is not None:
            written.append((out.clone(), kwargs["normed"].clone(), kwargs["next_norm_weight"],
                            kwargs["next_norm_eps"]))
        return out

    monkeypatch.setattr(decoder_layers, "decode_linear", recording_linear)
    return written


def test_post_attention_norm_written_by_the_output_projections_launch(monkeypatch):
    """POST_NORM_IN_O_PROJ: a decode-size forward of FP8 projections adds the attention's residual in o_proj's launch
    and has that launch write the post-attention norm of the sum (decode_linear's normed=), which the gated MLP
    reads as it is: no fused_add_rmsnorm launch, no norm inside the MLP. The norm's output is the RMSNorm of the
    sum bit for bit (the sum rounded once, as POST_NORM_IN_MLP rounds it), so the logits equal the POST_NORM_IN_MLP
    path's up to that path's deferred rounding, and match the separate norm's; the layers' inputs stay as they
    were; more rows than the weight-only path takes keep the norm's own launch."""
    from triton_ops.models import decoder_layers

    monkeypatch.setattr(decoder_layers, "POST_NORM_IN_O_PROJ", True)
    model = patch_model(_model("llama"), fp8=True, fp8_recipe="channel")
    ids = torch.randint(0, 128, (2, 5), device=DEVICE)
    norms = []
    real_norm = decoder_layers.fused_add_rmsnorm
    monkeypatch.setattr(decoder_layers, "fused_add_rmsnorm", lambda *a, **k: norms.append(1) or real_norm(*a, **k))
    written = _next_norm_spy(monkeypatch)
    with torch.no_grad():
        in_o_proj = model(ids, output_hidden_states=True)
    assert norms == []
    assert len(written) == len(model.model.layers)
    for layer, (h, normed, weight, eps) in zip(model.model.layers, written, strict=True):
        norm = layer.post_attention_layernorm
        assert weight is norm.weight and eps == norm.variance_epsilon
        # the RMSNorm kernel's bits, of the sum the launch wrote
        assert torch.equal(normed, normalized_like_the_prologue(h, weight, eps))
    monkeypatch.setattr(decoder_layers, "POST_NORM_IN_O_PROJ", False)
    with torch.no_grad():
        separate = model(ids, output_hidden_states=True)
    assert len(norms) == len(model.model.layers)
    tol = 0.9999 if DTYPE == torch.bfloat16 else 0.99999
    assert _cosine(in_o_proj.logits, separate.logits) >= tol
    for a, b in zip(in_o_proj.hidden_states, separate.hidden_states, strict=True):
        assert _cosine(a, b) >= tol
    assert torch.equal(in_o_proj.hidden_states[0], separate.hidden_states[0])
    monkeypatch.setattr(decoder_layers, "POST_NORM_IN_O_PROJ", True)
    # more rows than the weight-only path's: o_proj is no weight-only launch, the norm's own launch again
    before = len(norms)
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 17), device=DEVICE))
    assert len(norms) == before + len(model.model.layers)


def test_grad_mode_keeps_the_separate_norms_and_the_gradients(monkeypatch):
    """With grad mode on, the layer adds into h in place nowhere: a trainable part of the attention (here Qwen3's
    q_norm, all else frozen, the embeddings too) gets its gradient, the same as with the norms' own launches."""
    from triton_ops.models import decoder_layers

    grads = []
    for post in (True, False):
        monkeypatch.setattr(decoder_layers, "POST_NORM_IN_MLP", post)
        model = patch_model(_model("qwen3"), fp8=True, fp8_recipe="channel")
        for p in model.parameters():
            p.requires_grad_(False)
        weight = model.model.layers[0].self_attn.q_norm.weight.requires_grad_(True)
        model(torch.randint(0, 128, (1, 4), device=DEVICE)).logits.float().sum().backward()
        grads.append(weight.grad.clone())
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])


def test_bf16_o_proj_adds_the_residual_only_where_it_is_one_launch():
    """x + o_proj(attn) goes into the projection's launch for one bf16 row on a GPU (decode_linear) and FP8
    weight-only rows; several bf16 rows (cuBLAS) would need an add launch of their own: the layer then keeps the
    fused add + norm launch instead of moving its norm into the gated MLP."""
    from torch import nn
    from triton_ops.layers import LAYER_ATTR
    from triton_ops.models.decoder_layers import _o_proj_adds

    lin = nn.Linear(512, 512, bias=False).to(torch.bfloat16).requires_grad_(False)
    assert not _o_proj_adds(lin, 1, torch.bfloat16, True, False)  # not marked by patch_model as an exact nn.Linear
    lin.__dict__[LAYER_ATTR] = "Linear"
    assert _o_proj_adds(lin, 1, torch.bfloat16, True, False)
    assert not _o_proj_adds(lin, 8, torch.bfloat16, True, False)  # cuBLAS rows ...
    from triton_ops.models import layers as model_layers

    saved = model_layers.BF16_FUSED_MAX_ROWS
    model_layers.BF16_FUSED_MAX_ROWS = 8  # ... unless the fusions' 16-bit row limit says otherwise
    try:
        assert _o_proj_adds(lin, 8, torch.bfloat16, True, False)
        assert not _o_proj_adds(lin, 9, torch.bfloat16, True, False)
    finally:
        model_layers.BF16_FUSED_MAX_ROWS = saved
    assert not _o_proj_adds(lin, 1, torch.bfloat16, False, False)  # not on a GPU
    assert not _o_proj_adds(lin, 1, torch.float32, True, False)  # not the weight's dtype
    assert not _o_proj_adds(nn.Linear(500, 512, bias=False).to(torch.bfloat16), 1, torch.bfloat16, True, False)
    handle = lin.register_forward_hook(lambda *args: None)
    assert not _o_proj_adds(lin, 1, torch.bfloat16, True, False)  # a hook would not see the projection alone
    handle.remove()
    # the packed q/k/v with the input norm in its launch takes the kernel at any K (gpt-oss's 2880: the launch saved)
    from triton_ops.models.layers import decode_gemv_rule

    w2880 = torch.zeros(5120, 2880, dtype=torch.bfloat16)
    assert decode_gemv_rule(True, torch.bfloat16, True, w2880, any_k=True)
    assert not decode_gemv_rule(True, torch.bfloat16, True, w2880)
    assert not decode_gemv_rule(False, torch.bfloat16, True, w2880, any_k=True)
    fp8 = FP8Linear.from_linear(nn.Linear(256, 128).to(DEVICE))
    assert _o_proj_adds(fp8, 8, torch.bfloat16, DEVICE.type == "cuda", False)
    assert not _o_proj_adds(fp8, 17, torch.bfloat16, DEVICE.type == "cuda", False)  # W8A8 rows


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_decode_step_norms_inside_the_gemms_change_no_logit(fp8, monkeypatch, fused_norms):
    """At a K the one-row bf16 kernel takes (512), the decode step's q/k/v GEMMs normalize their input: the logits
    of the norm's own launch up to the normalized row's rounding; with the post-attention norm inside the gated MLP's
    launch too (no fused_add_rmsnorm launch in the step), up to the residual sum's single rounding as well."""
    from triton_ops.models import decoder_layers

    torch.manual_seed(3)
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    model = transformers.LlamaForCausalLM(config).to(DEVICE, DTYPE).eval()
    patch_model(model, fp8=fp8, fp8_recipe="channel")
    ids = torch.randint(0, 256, (1, 7), device=DEVICE)
    calls = _norm_in_qkv_spy(monkeypatch)
    fused = _prefill_and_step(model, ids)
    assert calls[-2:] == [True, True]  # the decode step's two layers
    monkeypatch.setattr(decoder_layers, "POST_NORM_IN_MLP", False)
    input_only = _prefill_and_step(model, ids)
    monkeypatch.setattr(decoder_layers, "INPUT_NORM_IN_QKV", False)
    separate = _prefill_and_step(model, ids)
    assert _cosine(input_only[1], separate[1]) >= 0.9999
    assert _cosine(fused[1], separate[1]) >= 0.9999
    norms = []
    real = decoder_layers.fused_add_rmsnorm
    monkeypatch.setattr(decoder_layers, "fused_add_rmsnorm", lambda *a, **k: norms.append(1) or real(*a, **k))
    monkeypatch.setattr(decoder_layers, "POST_NORM_IN_MLP", True)
    _prefill_and_step(model, ids)
    assert len(norms) == (0 if fp8 else 2)  # bf16: the prefill's 7 rows take cuBLAS (the norm's own launch)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_decode_step_with_the_post_norm_written_by_o_proj(fp8, monkeypatch):
    """POST_NORM_IN_O_PROJ on a GPU, at a K the one-row bf16 kernel takes (512): the decode step's output
    projections write the post-attention norm (no fused_add_rmsnorm launch in the step); the logits are the norm's
    own launch's up to the residual sum's single rounding, and the norm the RMSNorm kernel's bits on that sum."""
    from triton_ops.models import decoder_layers

    torch.manual_seed(4)
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    model = transformers.LlamaForCausalLM(config).to(DEVICE, DTYPE).eval()
    patch_model(model, fp8=fp8, fp8_recipe="channel")
    ids = torch.randint(0, 256, (1, 7), device=DEVICE)
    separate = _prefill_and_step(model, ids)
    monkeypatch.setattr(decoder_layers, "POST_NORM_IN_O_PROJ", True)
    written = _next_norm_spy(monkeypatch)
    in_o_proj = _prefill_and_step(model, ids)
    assert len(written) >= 2  # the decode step's two layers (and the prefill's, with FP8 weight-only rows)
    for h, normed, weight, eps in written:
        assert torch.equal(normed, normalized_like_the_prologue(h, weight, eps))
    assert _cosine(in_o_proj[1], separate[1]) >= 0.9999


def test_bf16_down_projection_rule_for_the_one_launch_residual_add():
    """``linear_add_`` sends one decode row on a GPU to ``decode_linear_add_`` (the rule checked with ``on_gpu``, the
    add on this machine through ``addmm_``): 16-bit weights in x's dtype, K a multiple of 512, nothing to
    differentiate."""
    from triton_ops.models.layers import linear_add_, linear_add_takes_kernel

    w = torch.randn(8, 1024, dtype=torch.bfloat16)
    x = torch.randn(1, 1, 1024, dtype=torch.bfloat16)
    with torch.no_grad():
        assert linear_add_takes_kernel(x, w, on_gpu=True)
        assert not linear_add_takes_kernel(x, w, on_gpu=False)
        assert not linear_add_takes_kernel(torch.randn(2, 1, 1024, dtype=torch.bfloat16), w, on_gpu=True)
        assert not linear_add_takes_kernel(x[..., :1000], w[:, :1000], on_gpu=True)  # K not a multiple of 512
        assert not linear_add_takes_kernel(x.float(), w.float(), on_gpu=True)
        assert not linear_add_takes_kernel(x, w.half(), on_gpu=True)
    xg = x.clone().requires_grad_()
    assert not linear_add_takes_kernel(xg, w, on_gpu=True)  # a gradient to record: addmm_
    with torch.no_grad():
        assert linear_add_takes_kernel(xg, w, on_gpu=True)
    residual = torch.randn(1, 1, 8, dtype=torch.bfloat16)
    want = residual.double() + x.double() @ w.double().t()
    with torch.no_grad():
        out = linear_add_(residual, x, w)
    assert out is residual
    torch.testing.assert_close(residual.double(), want, rtol=2e-2, atol=2e-2)


def test_fp8_down_projection_add_is_skipped_when_its_input_needs_a_gradient():
    from triton_ops.models.decoder_layers import _down_adds_residual

    model = patch_model(_model("llama"), fp8=True, fp8_recipe="channel")
    for p in model.parameters():
        p.requires_grad_(False)
    mlp = model.model.layers[0].mlp
    residual = torch.randn(1, 1, 64, device=DEVICE, dtype=DTYPE)
    normed = torch.randn(1, 1, 64, device=DEVICE, dtype=DTYPE)
    assert _down_adds_residual(mlp, residual, normed) == "fp8"
    assert _down_adds_residual(mlp, residual, normed.requires_grad_()) == ""  # the inference-only add would raise


def test_generate_runs_on_a_patched_model():
    model = patch_model(_model("qwen3"))
    reference = _model("qwen3")
    ids = torch.randint(0, 128, (1, 5), device=DEVICE)
    with torch.no_grad():
        ours = model.generate(ids, max_new_tokens=4, do_sample=False)
        ref = reference.generate(ids, max_new_tokens=4, do_sample=False)
    assert ours.shape == ref.shape == (1, 9)
    assert torch.equal(ours[0, 5], ref[0, 5])  # the prefill's greedy token; later ones may part at a near tie


def test_gradients_flow_through_the_patched_mlp():
    model = patch_model(_model("llama"))
    ids = torch.randint(0, 128, (1, 4), device=DEVICE)
    model.train()
    model(ids, labels=ids).loss.backward()
    grad = model.model.layers[0].mlp.gate_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_unsupported_and_repeated_patching_are_named_errors():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match=r"supports config.model_type in 'llama', .* got 'gpt2'"):
        patch_model(gpt2)
    with pytest.raises(InvalidArgumentError, match=r"expected a transformers model"):
        patch_model("llama")
    model = patch_model(_model("llama"))
    with pytest.raises(InvalidArgumentError, match=r"already patched"):
        patch_model(model)


def test_an_activation_without_a_kernel_changes_nothing():
    config = CONFIGS["llama"]()
    config.hidden_act = "relu"
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(InvalidArgumentError, match=r"hidden_act: expected one of .* got 'relu'"):
        patch_model(model)
    assert type(model.model.layers[0].mlp) is transformers.models.llama.modeling_llama.LlamaMLP


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_patched_qwen3_attention_follows_the_configured_attention_and_a_static_cache(attn_implementation):
    # The fused q/k-norm + RoPE attention calls the attention function the config names, and updates a StaticCache
    # (the compiled path's cache) as transformers' own attention does: the greedy tokens agree.
    reference = _model("qwen3")
    reference.config._attn_implementation = attn_implementation
    model = patch_model(copy.deepcopy(reference))
    ids = torch.randint(0, 128, (2, 6), device=DEVICE)
    with torch.no_grad():
        ref_logits = reference(ids).logits
        ours_logits = model(ids).logits
        ours = model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
        ref = reference.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert _cosine(ours_logits, ref_logits) >= (0.999 if DTYPE == torch.bfloat16 else 0.999999)
    assert torch.equal(ours[:, 6], ref[:, 6])


def test_gradients_flow_through_the_patched_qwen3_attention_and_layers():
    model = patch_model(_model("qwen3"))
    reference = _model("qwen3")
    ids = torch.randint(0, 128, (1, 5), device=DEVICE)
    model.train()
    reference.train()
    model(ids, labels=ids).loss.backward()
    reference(ids, labels=ids).loss.backward()
    for name in ("self_attn.q_norm.weight", "self_attn.k_proj.weight", "post_attention_layernorm.weight"):
        ours = model.model.layers[0].get_parameter(name).grad
        ref = reference.model.layers[0].get_parameter(name).grad
        assert ours is not None and torch.isfinite(ours).all()
        assert _cosine(ours, ref) >= (0.99 if DTYPE == torch.bfloat16 else 0.9999)


def test_a_patched_decoder_layer_takes_the_attention_arguments_by_keyword_only():
    model = patch_model(_model("llama"))
    hidden = torch.randn(1, 3, 64, device=DEVICE, dtype=DTYPE)
    with pytest.raises(InvalidArgumentError, match=r"by keyword .* got 1 positional"):
        model.model.layers[0](hidden, None)


def _gpt_oss(seed: int = 0):
    config = transformers.GptOssConfig(hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                       num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                       sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    config._attn_implementation = "eager"  # gpt-oss's attention sinks: transformers runs it eager
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(config).to(DEVICE, DTYPE).eval()
    with torch.no_grad():  # random experts and biases large enough that routing and clamping matter
        for name, p in model.named_parameters():
            if "experts" in name or "router" in name or p.dim() == 2:
                p.normal_(0.0, 0.08 if p.dim() >= 2 else 0.5)
    return model


def test_patched_gpt_oss_runs_its_experts_in_the_fused_moe():
    from triton_ops.layers import GptOssMoE
    from triton_ops.models.decoder_layers import SinkRopeAttention

    model = _gpt_oss()
    reference = copy.deepcopy(model)
    patch_model(model)
    summary = model.triton_ops_patch
    assert summary.moe_blocks == 2 and summary.gated_mlps == 0 and summary.fused_residual_adds == 2
    # its attention (sinks, half-head rotary tables, q/k/v biases): packed q/k/v and the rotation in one kernel
    assert summary.rope_attentions == 2 and summary.packed_qkv == 2
    assert type(model.model.layers[1].self_attn).forward is SinkRopeAttention.forward
    mlp = model.model.layers[0].mlp
    assert type(mlp).forward is GptOssMoE.forward
    assert mlp.experts.gate_up_proj is model.model.layers[0].mlp.experts.gate_up_proj  # shared, not copied
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)
    ours_prefill, ours_step = _prefill_and_step(model, ids)
    ref_prefill, ref_step = _prefill_and_step(reference, ids)
    tol = 0.999 if DTYPE == torch.bfloat16 else 0.99999
    assert _cosine(ours_prefill, ref_prefill) >= tol and _cosine(ours_step, ref_step) >= tol
    with torch.no_grad():  # what GptOssMLP returns: (output, router scores)
        x = torch.randn(2, 3, 64, device=DEVICE, dtype=DTYPE)
        out, scores = mlp(x)
        ref_out, ref_scores = reference.model.layers[0].mlp(x)
    assert out.shape == ref_out.shape and scores.shape == ref_scores.shape
    assert _cosine(out, ref_out) >= tol


def test_patched_gpt_oss_adds_the_residual_in_the_moe_combine(monkeypatch):
    """The residual add after gpt-oss's MoE runs in the fused MoE's combine launch (residual=): once per layer and
    forward, the same logits as the separate add up to its one rounding; with grad mode on, the separate add."""
    import fused_moe
    from triton_ops.models import decoder_layers

    model = patch_model(_gpt_oss())
    residuals = []
    real = fused_moe.ops.moe_experts
    monkeypatch.setattr(fused_moe.ops, "moe_experts",
                        lambda *a, **k: residuals.append(k.get("residual") is not None) or real(*a, **k))
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)
    fused = _prefill_and_step(model, ids)
    assert residuals == [True] * 4  # two layers, prefill and step
    monkeypatch.setattr(decoder_layers, "_moe_adds_residual", lambda *args: False)
    separate = _prefill_and_step(model, ids)
    assert residuals[4:] == [False] * 4
    for a, b in zip(fused, separate, strict=True):
        assert _cosine(a, b) >= (0.9999 if DTYPE == torch.bfloat16 else 0.999999)
    monkeypatch.undo()
    mlp, residual = model.model.layers[0].mlp, torch.zeros(1, dtype=DTYPE, device=DEVICE)
    assert not decoder_layers._moe_adds_residual(mlp, residual)  # grad mode is on
    with torch.no_grad():
        assert decoder_layers._moe_adds_residual(mlp, residual)
        assert not decoder_layers._moe_adds_residual(mlp, residual.double())  # not the router's dtype
        handle = mlp.register_forward_hook(lambda *args: None)
        assert not decoder_layers._moe_adds_residual(mlp, residual)
        handle.remove()


def test_patched_gpt_oss_normalizes_inside_the_moe(monkeypatch, fused_norms):
    """gpt-oss in a decode-size forward whose o_proj adds the residual in its launch (FP8 weight-only here): the
    post-attention norm runs inside the MoE's router and gate/up launches, the residual add in its combine: no
    fused_add_rmsnorm launch, the logits those of the separate norm up to the residual sum's one rounding."""
    import fused_moe
    from triton_ops.models import decoder_layers

    model = patch_model(_gpt_oss(), fp8=True, fp8_recipe="channel")
    norms, normed_moe = [], []
    real_norm, real_experts = decoder_layers.fused_add_rmsnorm, fused_moe.ops.moe_experts
    monkeypatch.setattr(decoder_layers, "fused_add_rmsnorm", lambda *a, **k: norms.append(1) or real_norm(*a, **k))
    monkeypatch.setattr(fused_moe.ops, "moe_experts",
                        lambda *a, **k: normed_moe.append(k.get("norm_weight") is not None) or real_experts(*a, **k))
    ids = torch.randint(0, 128, (2, 5), device=DEVICE)
    fused = _prefill_and_step(model, ids)
    assert norms == [] and normed_moe == [True] * 4
    monkeypatch.setattr(decoder_layers, "POST_NORM_IN_MLP", False)
    separate = _prefill_and_step(model, ids)
    assert len(norms) == 4 and normed_moe[4:] == [False] * 4
    for a, b in zip(fused, separate, strict=True):
        assert _cosine(a, b) >= (0.9999 if DTYPE == torch.bfloat16 else 0.99999)


@pytest.mark.parametrize("fp8_experts", [True, "w8a8"])
def test_patched_gpt_oss_with_fp8_experts_matches_their_dequantized_weights(fp8_experts):
    """Weight-only FP8 experts, or W8A8 (K-major weights, the activations quantized per row too: within their
    E4M3 rounding)."""
    from fused_moe import is_fp8_experts, uses_fp8_activations

    model = _gpt_oss(seed=3)
    reference = copy.deepcopy(model)
    patch_model(model, fp8=True, fp8_experts=fp8_experts)
    w8a8 = fp8_experts == "w8a8"
    summary = model.triton_ops_patch
    assert summary.moe_blocks == summary.fp8_moe_blocks == 2
    assert any("experts of 2 MoE block(s): FP8 weights" in note and ("W8A8" in note) == w8a8
               for note in summary.notes)
    for layer, ref_layer in zip(model.model.layers, reference.model.layers):
        experts = layer.mlp.experts
        assert is_fp8_experts(experts)
        assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.float8_e4m3fn
        assert not experts.gate_up_proj.requires_grad
        assert uses_fp8_activations(experts) == w8a8
        assert (experts.gate_up_proj.stride(1) == 1) == w8a8  # gpt-oss's [E, H, 2I]: K-major for W8A8 only
        assert layer.mlp.router.weight.dtype == DTYPE  # the router keeps the model's dtype
        # the unpatched experts with the weights the FP8 ones stand for
        with torch.no_grad():
            ref_experts = ref_layer.mlp.experts
            ref_experts.gate_up_proj.copy_(experts.gate_up_proj.float() * experts.gate_up_scale[:, None, :])
            ref_experts.down_proj.copy_(experts.down_proj.float() * experts.down_scale[:, None, :])
            x = torch.randn(2, 3, 64, device=DEVICE, dtype=DTYPE)
            out, scores = layer.mlp(x)
            ref_out, ref_scores = ref_layer.mlp(x)
        assert _cosine(out, ref_out) >= (0.99 if w8a8 else 0.999 if DTYPE == torch.bfloat16 else 0.99999)
        if w8a8:  # the activations' E4M3 rounding shows
            assert _cosine(out, ref_out) < 0.99999
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)
    assert all(torch.isfinite(t).all() for t in _prefill_and_step(model, ids))
    assert model.state_dict()["model.layers.0.mlp.experts.gate_up_scale"].shape == (4, 96)  # saved with the model


def test_patched_gpt_oss_records_router_logits_when_asked_for():
    """output_router_logits=True: the routers' logits and the auxiliary loss are the unpatched model's (a hooked
    router runs its own forward; the experts and the combine stay fused_moe's)."""
    model = _gpt_oss(seed=2)
    model.config.output_router_logits = True
    reference = copy.deepcopy(model)
    patch_model(model)
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)
    with torch.no_grad():
        ours, ref = model(ids, labels=ids), reference(ids, labels=ids)
    assert len(ours.router_logits) == len(ref.router_logits) == 2
    tol = 0.999 if DTYPE == torch.bfloat16 else 0.99999
    for a, b in zip(ours.router_logits, ref.router_logits, strict=True):
        assert a.shape == b.shape and _cosine(a, b) >= tol
    assert _cosine(ours.logits, ref.logits) >= tol
    assert torch.allclose(ours.aux_loss.float(), ref.aux_loss.float(), rtol=1e-4)


def test_patched_gpt_oss_with_fp8_keeps_its_experts_by_default():
    model = patch_model(_gpt_oss(), fp8=True)
    assert model.triton_ops_patch.fp8_moe_blocks == 0
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == DTYPE
    assert any("experts kept in their dtype" in note for note in model.triton_ops_patch.notes)
    with pytest.raises(InvalidArgumentError, match="fp8_experts"):
        patch_model(_gpt_oss(), fp8=True, fp8_experts="yes")


@pytest.mark.parametrize("recipe", ["channel", "block-mlp-out"])  # per-channel and 128x128-block gate/up scales
def test_fp8_gate_up_run_weight_only_at_decode_and_as_w8a8_gemms_beyond_16_rows(recipe, monkeypatch):
    from triton_ops import layers

    model = patch_model(_model("llama"), fp8=True, fp8_recipe=recipe)
    mlp = model.model.layers[0].mlp
    fused, fused_fn = [], layers.fused_gated_mlp
    monkeypatch.setattr(layers, "fused_gated_mlp",
                        lambda x, *a, **k: fused.append(x.shape[:-1]) or fused_fn(x, *a, **k))
    quantized, gemms = _w8a8_spy(monkeypatch, layers)
    for rows in (layers.W8A8_MIN_ROWS - 1, layers.W8A8_MIN_ROWS):
        x = torch.randn(1, rows, mlp.gate_proj.in_features, device=DEVICE, dtype=DTYPE)
        with torch.no_grad():
            ours = layers.gated_hidden(mlp, x)
            # FP8Projection's own forward: the dequantized weights, activations unquantized
            ref = torch.nn.functional.silu(mlp.gate_proj(x).float()) * mlp.up_proj(x).float()
        assert ours.shape == ref.shape and ours.dtype == DTYPE and torch.isfinite(ours).all()
        assert _cosine(ours, ref) >= 0.99  # W8A8: the activation's E4M3 rounding on top
    assert fused == [(1, layers.W8A8_MIN_ROWS - 1)]  # 16 rows: the fused kernel, weight-only
    # 17: x quantized once, gate and up as two W8A8 GEMMs over it
    assert [tuple(c["t"].shape[:-1]) for c in quantized] == [(layers.W8A8_MIN_ROWS,)]
    assert [tuple(c["a"].shape[:-1]) for c in gemms] == [(layers.W8A8_MIN_ROWS,)] * 2
    assert all(c["a"].dtype == torch.float8_e4m3fn for c in gemms)


@pytest.mark.parametrize("recipe", ["channel", "block"])  # every Linear: per-row / 1x128 activation scales
def test_fp8_mlp_beyond_16_rows_quantizes_the_product_for_the_down_gemm_in_one_pass(recipe, monkeypatch):
    """FP8 gate/up and an FP8Linear down at W8A8 rows: ``act(gate) * up`` is quantized as it is formed and the
    down GEMM reads it (``fp8_gated_linear``, the down projection's own activation scales), in the module's
    forward and in the decoder layer's residual add; at 16 rows the fused kernel and the weight-only down run as
    before. Within the FP8 activations' error of the dequantized weights' float product."""
    from triton_ops import layers

    model = patch_model(_model("llama"), fp8=True, fp8_recipe=recipe)
    reference = patch_model(_model("llama"), fp8=True, fp8_recipe=recipe)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.down_proj, FP8Linear)
    calls = _spy(monkeypatch, layers, "fp8_gated_linear")
    for rows in (layers.W8A8_MIN_ROWS - 1, layers.W8A8_MIN_ROWS):
        x = torch.randn(1, rows, mlp.gate_proj.in_features, device=DEVICE, dtype=DTYPE)
        with torch.no_grad():
            ours = mlp(x)
            h = torch.nn.functional.silu(mlp.gate_proj(x).float()) * mlp.up_proj(x).float()
            ref = h @ mlp.down_proj.dequantized_weight().t()
        assert ours.shape == ref.shape and ours.dtype == DTYPE
        assert _cosine(ours, ref) >= 0.99
    assert len(calls) == 1  # 17 rows only
    assert calls[0]["activation_granularity"] == mlp.down_proj.activation_granularity
    assert calls[0]["weight"] is mlp.down_proj.weight and calls[0]["activation"] == "silu"
    # a prefill through the decoder layers (the down GEMM's residual add): one call per layer, the logits those of
    # the unfused path (the same FP8 model, every MLP's forward given back its hidden state in the model's dtype)
    ids = torch.randint(0, 128, (1, layers.W8A8_MIN_ROWS + 3), device=DEVICE)
    calls.clear()
    with monkeypatch.context() as unfused_path, torch.no_grad():
        unfused_path.setattr(layers, "FUSED_W8A8_TAIL", False)  # the switch: the tail as it ran before
        unfused = reference(ids).logits
    assert not calls
    with torch.no_grad():
        fused = model(ids).logits
    assert len(calls) == len(model.model.layers)
    assert _cosine(fused, unfused) >= 0.999


# 128x128 weight blocks pack q/k/v only where each projection's rows are whole blocks: heads of 64, 2 + 2 of them
_BLOCK_PACKABLE = {**SMALL, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
                   "num_key_value_heads": 2, "head_dim": 64}


@pytest.mark.parametrize(("kind", "config", "recipe", "scaling", "packs"), [
    ("llama", SMALL, "channel", "row", True),  # FP8 down: the fused tail after gate/up
    ("llama", _BLOCK_PACKABLE, "block", "block", True),
    ("llama", SMALL, "block", "block", False),  # q/k/v not packed (rows of 64 and 32): only the MLP's norm quantizes
    ("qwen3", _BLOCK_PACKABLE, "block-mlp-out", "block", True),  # bf16 down; Qwen3's QK norm after q/k/v
])
def test_fp8_prefill_norms_write_their_output_quantized_for_the_w8a8_gemms(kind, config, recipe, scaling, packs,
                                                                            monkeypatch):
    """At W8A8 rows (a prefill) the input norm's launch quantizes for the packed q/k/v GEMM, the post-attention
    norm's (with the residual add) for gate/up, as those GEMMs take it (per row or per 1x128 block): no
    quantization launch of their own, and the logits bit for bit those of the norms' 16-bit outputs quantized by the
    projections (the switch off). At 16 rows (weight-only FP8) nothing changes."""
    from triton_ops import layers
    from triton_ops.models import layers as model_layers

    norm_ops = importlib.import_module("fused_rmsnorm_rope.ops.rmsnorm")  # (ops.rmsnorm is the function)
    decoder_layers = importlib.import_module("triton_ops.models.decoder_layers")
    torch.manual_seed(0)
    model = getattr(transformers, CLASSES[kind])(getattr(transformers, f"{CLASSES[kind][:-11]}Config")(**config))
    model = model.to(DEVICE, DTYPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model = patch_model(model, fp8=True, fp8_recipe=recipe)
    n_layers = len(model.model.layers)
    quantized = _spy(monkeypatch, layers, "quantize_fp8")
    fused_norms = []
    for module, name in ((model_layers, "rmsnorm"), (decoder_layers, "fused_add_rmsnorm")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _fn=fn, **k: fused_norms.append(k.get("fp8_out")) or _fn(*a, **k))
    quantizations = _spy(monkeypatch, norm_ops, "_forward_fp8")
    ids = torch.randint(0, 128, (1, layers.W8A8_MIN_ROWS + 5), device=DEVICE)
    with torch.no_grad():
        ours = model(ids).logits
    packed = sum(PACKING_ATTR in layer.self_attn.__dict__ for layer in model.model.layers)
    assert packed == (n_layers if packs else 0)
    # each layer's post-attention norm, and its input norm where q/k/v are one GEMM
    assert fused_norms.count(scaling) == n_layers + packed
    assert [c["fp8_out"] for c in quantizations] == [scaling] * (n_layers + packed)
    assert not quantized  # gate/up: no quantization launch of their own
    with monkeypatch.context() as off, torch.no_grad():
        off.setattr(layers, "NORM_QUANTIZES_W8A8", False)
        fused_norms.clear()
        unfused = model(ids).logits
    assert not any(fused_norms) and len(quantized) == n_layers  # gate/up's own quantization, once a layer
    assert torch.equal(ours, unfused)
    fused_norms.clear()
    with torch.no_grad():
        model(ids[:, :layers.W8A8_MIN_ROWS - 1])  # weight-only FP8: the 16-bit norms
    assert not any(fused_norms)


def test_fp8_mlp_with_per_tensor_activation_scales_keeps_the_product_in_16_bits(monkeypatch):
    """Per-tensor activation scales have no one-pass quantization of the product: the MLP's tail is the product in
    one pass (``gated_activation``, in the model's dtype), then ``down_proj``'s own call."""
    from triton_ops import layers

    model = patch_model(_model("llama"), fp8=True, fp8_recipe="tensor")
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.down_proj, FP8Linear) and mlp.down_proj.activation_granularity == "tensor"
    fused, products = _spy(monkeypatch, layers, "fp8_gated_linear"), _spy(monkeypatch, layers, "gated_activation")
    x = torch.randn(1, layers.W8A8_MIN_ROWS, mlp.gate_proj.in_features, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        ours = mlp(x)
        h = torch.nn.functional.silu(mlp.gate_proj(x).float()) * mlp.up_proj(x).float()
        ref = h @ mlp.down_proj.dequantized_weight().t()
    assert not fused and len(products) == 1
    assert _cosine(ours, ref) >= 0.99


@pytest.mark.parametrize("recipe", ["channel", "block-mlp-out"])  # FP8 down (fused tail) / bf16 down (the product)
def test_fp8_mlp_beyond_16_rows_is_differentiable_in_its_input(recipe):
    """A gradient to the input of an FP8 MLP at W8A8 rows: gate and up take ``fp8_linear`` (differentiable, straight
    through the activation's quantization) instead of the shared quantization, the tail its differentiable op; the
    input gradient points where the dequantized weights' float MLP's does."""
    from triton_ops import layers

    model = patch_model(_model("llama"), fp8=True, fp8_recipe=recipe)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, layers.W8A8_MIN_ROWS + 2, mlp.gate_proj.in_features, device=DEVICE, dtype=torch.float32)
    grad = torch.randn(1, x.shape[1], mlp.down_proj.out_features, device=DEVICE, dtype=torch.float32)
    ours_x = x.to(DTYPE).clone().requires_grad_(True)
    mlp(ours_x).float().backward(grad)
    ref_x = x.clone().requires_grad_(True)
    h = torch.nn.functional.silu(mlp.gate_proj(ref_x.to(DTYPE)).float()) * mlp.up_proj(ref_x.to(DTYPE)).float()
    down = mlp.down_proj
    w_down = down.dequantized_weight() if isinstance(down, FP8Linear) else down.weight.float()
    (h @ w_down.t()).backward(grad)
    assert ours_x.grad is not None and torch.isfinite(ours_x.grad).all()
    assert _cosine(ours_x.grad, ref_x.grad) >= 0.99


def _spy(monkeypatch, module, name: str) -> list[dict]:
    """Each ``module.<name>`` call's arguments by name, the call itself unchanged."""
    calls, fn = [], getattr(module, name)
    signature = inspect.signature(fn)

    def spy(*args, **kwargs):
        calls.append(signature.bind(*args, **kwargs).arguments)
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def _w8a8_spy(monkeypatch, layers) -> tuple[list[dict], list[dict]]:
    """The W8A8 gate/up's calls: the activation's quantizations (``layers.quantize_fp8``) and the GEMMs
    (``layers.fp8_gemm``), by argument name."""
    return _spy(monkeypatch, layers, "quantize_fp8"), _spy(monkeypatch, layers, "fp8_gemm")


@pytest.mark.parametrize(("options", "granularity", "fast_accum"), [
    ({"fp8_recipe": "channel"}, "row", False),
    ({"fp8_recipe": "block-mlp-out"}, "block", False),
    ({"fp8_recipe": "tensor", "fast_accum": True}, "tensor", True),  # per-channel gate/up weights, as before
    ({"fp8_recipe": "block-mlp-out", "activation_granularity": "row"}, "row", False),  # an override reaches them
    # the group-row recipe on every layer (two layers here: its edge rule would keep both whole)
    ({"fp8_recipe": ("group-row", {"keep_edge_layers": (0, 0)})}, "row", False),
])
def test_fp8_gate_up_w8a8_gemms_take_the_recipes_activation_scales_and_fast_accum(options, granularity, fast_accum,
                                                                                  monkeypatch):
    from dataclasses import replace

    from fp8_gemm import RECIPES
    from triton_ops import layers

    if isinstance(options["fp8_recipe"], tuple):  # (a library recipe, fields changed)
        name, changes = options["fp8_recipe"]
        options = {**options, "fp8_recipe": replace(RECIPES[name], **changes)}
    model = patch_model(_model("llama"), fp8=True, **options)
    mlp = model.model.layers[0].mlp
    quantized, gemms = _w8a8_spy(monkeypatch, layers)
    x = torch.randn(1, layers.W8A8_MIN_ROWS, mlp.gate_proj.in_features, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        ours = layers.gated_hidden(mlp, x)
        ref = torch.nn.functional.silu(mlp.gate_proj(x).float()) * mlp.up_proj(x).float()
    assert [c["granularity"] for c in quantized] == [granularity]  # x quantized once for both GEMMs
    assert [c.get("fast_accum", False) for c in gemms] == [fast_accum] * 2
    assert _cosine(ours, ref) >= 0.99


def test_fp8_block_gate_up_keep_their_scales_in_the_gemms_layout(monkeypatch):
    """128x128 block scales are kept once more as the W8A8 GEMM reads them (``[in / 128, out / 128]``, contiguous):
    the GEMM gets that tensor, so no call copies a transposed view. Not saved with the model; a loaded state dict
    (which writes ``weight_scale``) refreshes it."""
    from triton_ops import layers

    model = patch_model(_model("llama"), fp8=True, fp8_recipe="block-mlp-out")  # 128x128 blocks
    mlp = model.model.layers[0].mlp
    stored = [getattr(p, layers.GEMM_SCALE_BUFFER) for p in (mlp.gate_proj, mlp.up_proj)]
    for proj, kn in zip((mlp.gate_proj, mlp.up_proj), stored):
        assert kn.is_contiguous() and torch.equal(kn, proj.weight_scale.t())
    _, gemms = _w8a8_spy(monkeypatch, layers)
    x = torch.randn(layers.W8A8_MIN_ROWS, mlp.gate_proj.in_features, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        layers.gated_hidden(mlp, x)
    assert len(gemms) == 2 and all(c["b_scale"] is s for c, s in zip(gemms, stored))  # no copy of them
    assert not any(key.endswith(layers.GEMM_SCALE_BUFFER) for key in model.state_dict())
    other = patch_model(_model("llama", seed=1), fp8=True, fp8_recipe="block-mlp-out")
    assert not torch.equal(other.model.layers[0].mlp.gate_proj.weight_scale, mlp.gate_proj.weight_scale)
    model.load_state_dict(other.state_dict())
    for proj, src in zip((mlp.gate_proj, mlp.up_proj), (other.model.layers[0].mlp.gate_proj,
                                                        other.model.layers[0].mlp.up_proj)):
        assert torch.equal(proj.weight_scale, src.weight_scale)
        assert torch.equal(getattr(proj, layers.GEMM_SCALE_BUFFER), src.weight_scale.t())
    channel = patch_model(_model("llama"), fp8=True, fp8_recipe="channel").model.layers[0].mlp
    assert not hasattr(channel.gate_proj, layers.GEMM_SCALE_BUFFER)  # [1, out]: a view, nothing to keep


# Magnitudes of the 2 x 3 weight blocks of 128 x 128 (gate's; up's flipped): a scale read from another block is off
# by 2x or more.
_BLOCK_MAGNITUDES = ((1.0, 4.0, 0.5), (0.25, 2.0, 8.0))


@pytest.mark.parametrize("w8a8", [False, True], ids=["fused_16_rows", "w8a8_17_rows"])
def test_fp8_block_gate_up_on_a_non_square_block_grid_with_biases(w8a8):
    """gate/up weights ``[256, 384]`` with biases: a 2 x 3 grid of block scales (3 x 2 in the W8A8 GEMM's ``[K, N]``
    layout, where a wrong transpose no longer matches a 1 x 1 grid by accident), against float64 on the
    dequantized weights, output block by output block."""
    from triton_ops import layers

    config = transformers.LlamaConfig(hidden_size=384, intermediate_size=256, num_hidden_layers=1,
                                      num_attention_heads=3, num_key_value_heads=1, vocab_size=128,
                                      max_position_embeddings=64, mlp_bias=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(DEVICE, DTYPE).eval()
    mlp = model.model.layers[0].mlp
    magnitudes = torch.tensor(_BLOCK_MAGNITUDES, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        for proj, m in ((mlp.gate_proj, magnitudes), (mlp.up_proj, magnitudes.flip(0, 1))):
            proj.weight.normal_(0.0, 0.02).mul_(m.repeat_interleave(128, 0).repeat_interleave(128, 1))
            proj.bias.normal_(0.0, 0.5)
    patch_model(model, fp8=True, fp8_recipe="block")  # 128x128 blocks (one layer: no edge layer rule)
    assert mlp.gate_proj.weight_scale.shape == (2, 3) and mlp.gate_proj.bias is not None
    rows = layers.W8A8_MIN_ROWS if w8a8 else layers.W8A8_MIN_ROWS - 1
    x = torch.randn(rows, 384, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        ours = layers.gated_hidden(mlp, x).double()
        gate, up = (x.double() @ p.dequantized_weight(torch.float32).double().t() + p.bias.double()
                    for p in (mlp.gate_proj, mlp.up_proj))
        ref = torch.nn.functional.silu(gate) * up
    for block in range(2):  # every 128 outputs: the scales of one row of blocks
        cols = slice(block * 128, (block + 1) * 128)
        err = (ours[:, cols] - ref[:, cols]).norm() / ref[:, cols].norm()
        assert err < 0.1, (block, err.item())  # W8A8 (E4M3 activations): about 0.035; a misplaced scale: 0.8


def test_a_patched_model_saved_whole_loads_in_a_fresh_process(tmp_path):
    """torch.save(model) of a patched model (its classes are made at patch time) loads in another process, which
    makes them again and registers the attention backend: the same logits (bf16 kernels and FP8 weights)."""
    import subprocess
    import sys

    ids = torch.randint(0, 128, (1, 5), device=DEVICE)
    for name, kwargs in (("bf16", {}), ("fp8", {"fp8": True, "fp8_recipe": "channel"})):
        model = patch_model(_model("qwen3"), **kwargs)
        with torch.no_grad():
            torch.save({"model": model, "ids": ids, "want": model(ids).logits}, tmp_path / f"{name}.pt")
        assert torch.equal(copy.deepcopy(model)(ids).logits, model(ids).logits)
    script = ("import sys, torch\n"
              "for path in sys.argv[1:]:\n"
              "    saved = torch.load(path, weights_only=False)\n"
              "    with torch.no_grad():\n"
              "        got = saved['model'](saved['ids']).logits\n"
              "    assert torch.equal(got, saved['want']), path\n"
              "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "bf16.pt"), str(tmp_path / "fp8.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_lora_adapters_and_hooked_qk_norms_keep_the_models_results():
    # LoRA-style q/k projections (frozen weight, trainable adapter): q and k need gradients the projections' own
    # weights do not; a hook on a q/k norm changes its output: the patched model must run it
    from test_patch_phi3 import _LoRA

    reference = _model("qwen3", seed=4)
    model = patch_model(copy.deepcopy(reference))
    for m in (reference, model):
        m.requires_grad_(False)  # the base model frozen, as LoRA training does: only the adapters learn
        torch.manual_seed(3)
        attn = m.model.layers[0].self_attn
        attn.q_proj, attn.k_proj = _LoRA(attn.q_proj), _LoRA(attn.k_proj)
        m.model.layers[1].self_attn.k_norm.register_forward_hook(lambda mod, args, out: out * 2)
    ids = torch.randint(0, 128, (2, 6), device=DEVICE)
    with torch.no_grad():  # the adapters hold the packed weight's own Parameter: the packing must step aside
        assert _cosine(model(ids).logits, reference(ids).logits) >= (0.999 if DTYPE == torch.bfloat16 else 0.999999)
    model.train()
    reference.train()
    losses, grads = [], []
    for m in (model, reference):
        loss = m(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(m.model.layers[0].self_attn.k_proj.b.weight.grad)
    tol = 0.99 if DTYPE == torch.bfloat16 else 0.99999
    assert _cosine(grads[0], grads[1]) >= tol and abs(losses[0].item() - losses[1].item()) < 1e-2


@pytest.mark.parametrize("fp8", [False, True])
def test_gate_and_up_swapped_or_hooked_after_patching_run_their_own_calls(fp8):
    # a LoRA wrapper keeps the frozen weight: the fused kernel, which reads weights, must not stand in for it
    from test_patch_phi3 import _LoRA

    reference = _model("llama", seed=6)
    model = patch_model(copy.deepcopy(reference), fp8=fp8, fp8_recipe="channel")
    if fp8:  # the one-process FP8 model as the reference: only the wrapped projections differ from it
        reference = patch_model(copy.deepcopy(reference), fp8=True, fp8_recipe="channel")
    for m in (reference, model):
        torch.manual_seed(3)
        mlp = m.model.layers[0].mlp
        if not fp8:
            mlp.gate_proj = _LoRA(mlp.gate_proj)
        m.model.layers[1].mlp.up_proj.register_forward_hook(lambda mod, args, out: out * 2)
    if fp8:  # the reference runs every projection's own call: the model's MLP forward, not the fused one
        for layer in reference.model.layers:
            layer.mlp.forward = type(layer.mlp).__mro__[1].forward.__get__(layer.mlp)
    ids = torch.randint(0, 128, (1, 5), device=DEVICE)
    with torch.no_grad():
        assert _cosine(model(ids).logits, reference(ids).logits) >= (0.999 if DTYPE == torch.bfloat16 else 0.99999)
