"""The ``"triton_ops"`` experts implementation (fused_moe.moe_experts behind transformers' experts interface) on
small random Qwen3-MoE, Mixtral and gpt-oss models: it computes what transformers' eager experts do, runs every
sparse layer's experts, FP8 experts stand for their dequantized weights, and what it cannot take (a gradient,
expert parallelism, a gate of another kind) runs transformers' grouped_mm with a warning, never a wrong answer.
CPU under the interpreter (fp32) and a GPU (bf16)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from triton_ops.models import EXPERTS_NAME, experts_backend, register_experts_backend
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.testing import device_for_tests

transformers = pytest.importorskip("transformers")
from transformers.integrations import moe as hf_moe  # noqa: E402

DEVICE = device_for_tests()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOL = 0.999 if DTYPE == torch.bfloat16 else 0.99999
# transformers 5.7 accepts a registered name in set_experts_implementation (5.0-5.6 know only their own three)
NAMED = "is_concatenated" in hf_moe.use_experts_implementation.__code__.co_varnames
needs_named = pytest.mark.skipif(not NAMED, reason="transformers < 5.7 refuses experts implementations it lacks")
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 128, "max_position_embeddings": 64}


def _model(kind: str, seed: int = 0):
    if kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**SMALL, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                                             num_experts=8, num_experts_per_tok=3, norm_topk_prob=True)
        cls = transformers.Qwen3MoeForCausalLM
    elif kind == "mixtral":
        config = transformers.MixtralConfig(**SMALL, intermediate_size=32, num_local_experts=4,
                                            num_experts_per_tok=2)
        cls = transformers.MixtralForCausalLM
    else:
        config = transformers.GptOssConfig(**SMALL, intermediate_size=48, head_dim=16, num_local_experts=4,
                                           num_experts_per_tok=2, sliding_window=4,
                                           layer_types=["sliding_attention", "full_attention"])
        cls = transformers.GptOssForCausalLM
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).to(DEVICE, DTYPE).eval()
    with torch.no_grad():  # experts, routers and biases large enough that routing and gating matter
        for p in model.parameters():
            p.normal_(0.0, 0.08 if p.dim() >= 2 else 0.5)
    return model


def _experts(model) -> list:
    return [layer.mlp.experts for layer in model.model.layers]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def _counting(monkeypatch) -> list:
    calls = []
    real = experts_backend.moe_experts
    monkeypatch.setattr(experts_backend, "moe_experts", lambda *a, **k: calls.append(a[7]) or real(*a, **k))
    return calls


@needs_named
@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_the_experts_implementation_computes_what_eager_does(kind, monkeypatch):
    model = _model(kind)
    reference = copy.deepcopy(model)
    assert register_experts_backend() == EXPERTS_NAME
    model.set_experts_implementation(EXPERTS_NAME)
    calls = _counting(monkeypatch)
    ids = torch.randint(0, 128, (2, 7), device=DEVICE)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours, ref = model(ids).logits, reference(ids).logits
    assert not [w for w in caught if EXPERTS_NAME in str(w.message)]  # no fallback
    assert calls == ["swiglu_oai" if kind == "gpt_oss" else "silu"] * 2  # both layers' experts, their gate
    assert torch.isfinite(ours).all() and _cosine(ours, ref) >= TOL


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_one_experts_call_against_the_eager_forward(kind):
    """experts_forward on one experts module, called as the interface calls it (any transformers 5)."""
    experts = _experts(_model(kind, seed=1))[0]
    tokens, top_k = 9, 2
    x = torch.randn(tokens, 64, device=DEVICE, dtype=DTYPE)
    ids = torch.stack([torch.randperm(experts.num_experts, device=DEVICE)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, device=DEVICE).softmax(-1)
    with torch.no_grad():
        ours = experts_backend.experts_forward(experts, x, ids, weights)
        experts.config._experts_implementation = "eager"
        ref = experts(x, ids, weights)
    assert ours.shape == ref.shape and ours.dtype == x.dtype and _cosine(ours, ref) >= TOL


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_dynamo_recognizes_the_gate_as_eager_does(kind, monkeypatch):
    """experts_forward traced by Dynamo (fullgraph; the CPU's eager backend): the same gate found as in eager, so
    the experts run moe_experts, never the fallback (Dynamo read gpt-oss's gate function's name wrong once)."""
    experts = _experts(_model(kind, seed=2))[0]
    x = torch.randn(5, 64, device=DEVICE, dtype=DTYPE)
    ids = torch.stack([torch.randperm(experts.num_experts, device=DEVICE)[:2] for _ in range(5)])
    weights = torch.rand(5, 2, device=DEVICE).softmax(-1)
    with torch.no_grad():
        want = experts_backend.experts_forward(experts, x, ids, weights)
        calls = _counting(monkeypatch)
        torch._dynamo.reset()
        got = torch.compile(experts_backend.experts_forward, fullgraph=True, backend="eager")(experts, x, ids, weights)
    assert calls == ["swiglu_oai" if kind == "gpt_oss" else "silu"]
    assert torch.equal(got, want)


@pytest.mark.parametrize("w8a8", [False, True])
def test_fp8_experts_stand_for_their_dequantized_weights(w8a8):
    """Weight-only FP8 experts, or W8A8 ones (the activations quantized per row: within their E4M3 rounding, and
    bit for bit what fused_moe's moe_experts computes with fp8_activations=True)."""
    from fused_moe import convert_experts_to_fp8, moe_experts

    model = _model("qwen3_moe", seed=2)
    experts = _experts(model)[0]
    reference = copy.deepcopy(experts)
    convert_experts_to_fp8(experts, transposed=False, fp8_activations=w8a8)
    with torch.no_grad():
        reference.gate_up_proj.copy_(experts.gate_up_proj.float() * experts.gate_up_scale[:, :, None])
        reference.down_proj.copy_(experts.down_proj.float() * experts.down_scale[:, :, None])
        x = torch.randn(5, 64, device=DEVICE, dtype=DTYPE)
        ids = torch.tensor([[0, 3, 7]] * 5, device=DEVICE)
        weights = torch.full((5, 3), 1 / 3, device=DEVICE)
        ours = experts_backend.experts_forward(experts, x, ids, weights)
        reference.config._experts_implementation = "eager"
        assert _cosine(ours, reference(x, ids, weights)) >= (0.99 if w8a8 else TOL)
        direct = moe_experts(x, ids, weights, experts.gate_up_proj, None, experts.down_proj, None, "silu",
                             gate_up_layout="concatenated", transposed=False, gate_up_scale=experts.gate_up_scale,
                             down_scale=experts.down_scale, fp8_activations=w8a8)
        assert torch.equal(ours, direct)


def test_what_it_cannot_take_runs_grouped_mm_with_a_warning(monkeypatch):
    experts = _experts(_model("mixtral", seed=3))[0]
    x = torch.randn(4, 64, device=DEVICE, dtype=DTYPE, requires_grad=True)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]], device=DEVICE)
    weights = torch.full((4, 2), 0.5, device=DEVICE)
    calls = _counting(monkeypatch)
    experts_backend._warned.clear()
    with pytest.warns(UserWarning, match="grouped_mm.*a gradient to record"):
        out = experts_backend.experts_forward(experts, x, ids, weights)
    out.sum().backward()  # transformers' implementation records the gradient
    assert calls == [] and x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():  # and computes what the eager experts do
        experts.config._experts_implementation = "eager"
        assert _cosine(out.detach(), experts(x, ids, weights)) >= TOL
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        experts_backend.experts_forward(experts, x, ids, weights)
    assert not [w for w in caught if EXPERTS_NAME in str(w.message)]  # once per class and reason
    with torch.no_grad():
        assert experts_backend.unsupported(experts, x, weights) == ""
        experts._is_expert_parallel = True
        assert "expert parallelism" in experts_backend.unsupported(experts, x, weights)
        experts._is_expert_parallel = False
        experts.has_post_expert_norm = True
        assert "norm after each expert" in experts_backend.unsupported(experts, x, weights)
        experts.has_post_expert_norm = False
        assert experts_backend.unsupported(experts, x.double(), weights) == "torch.float64 on " + DEVICE.type
        experts.has_gate = False
        assert "without a gate" in experts_backend.unsupported(experts, x, weights)
        experts.has_gate = True
        experts._apply_gate = lambda gate_up: gate_up[..., :32]  # on the instance: not the default gate
        assert "custom _apply_gate" in experts_backend.unsupported(experts, x, weights)
        del experts._apply_gate
        experts.act_fn = torch.nn.ReLU()
        assert "its gate (ReLU" in experts_backend.unsupported(experts, x, weights)


def test_fp8_experts_it_cannot_take_are_refused_by_name():
    from fused_moe import convert_experts_to_fp8

    experts = _experts(_model("mixtral", seed=6))[0]
    convert_experts_to_fp8(experts, transposed=False)
    experts._is_expert_parallel = True
    x = torch.randn(2, 64, device=DEVICE, dtype=DTYPE)
    with torch.no_grad(), pytest.raises(InvalidArgumentError, match="FP8 experts .* expert parallelism"):
        experts_backend.experts_forward(experts, x, torch.tensor([[0, 1], [2, 3]], device=DEVICE), x[:, :2])


def test_a_custom_gate_is_not_taken_for_the_default_one():
    experts = _experts(_model("qwen3_moe", seed=4))[0]
    custom = type("CustomGateExperts", (type(experts),), {"_apply_gate": lambda self, gate_up: gate_up[..., :32]})
    experts.__class__ = custom
    x = torch.randn(2, 64, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        assert "custom _apply_gate" in experts_backend.unsupported(experts, x, x[:, :3])


@pytest.mark.gpu
@needs_named
@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_gpu_compiled_generate_with_the_experts_implementation(kind):
    """Only the experts swapped (the model otherwise transformers' own): transformers' static-cache fast path
    compiles it with CUDA graphs (no host sync in moe_experts) and computes what eager does."""
    from _compiled_generate import assert_compiled_generate_matches_eager

    model = _model(kind, seed=5)
    register_experts_backend()
    model.set_experts_implementation(EXPERTS_NAME)
    assert_compiled_generate_matches_eager(model, torch.randint(0, 128, (1, 12), device="cuda"))
