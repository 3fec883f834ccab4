"""Against transformers' own modules built from tiny configs with random weights and non-zero biases:
gpt-oss's GptOssMLP (fp32 and bf16, router ties inside the chosen set, all tokens on one expert, weight sharing)
and Qwen3-MoE's sparse block through moe_route + moe_experts."""

from __future__ import annotations

import pytest
import torch
from _moe_helpers import TOL
from fused_moe import FusedMoE, moe_experts, moe_route
from triton_ops_core.testing import assert_close_rel

pytest.importorskip("transformers")
gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
from transformers import GptOssConfig  # noqa: E402


def _gpt_oss_mlp(device, dtype=torch.float32, experts=8, top_k=4, seed=0):
    cfg = GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=experts, num_experts_per_tok=top_k,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       vocab_size=64, experts_implementation="eager")
    torch.manual_seed(seed)
    mlp = gpt_oss.GptOssMLP(cfg)
    with torch.no_grad():
        mlp.router.weight.normal_(0, 0.5)
        mlp.router.bias.normal_(0, 0.5)
        mlp.experts.gate_up_proj.normal_(0, 0.5)  # gate/up ~ N(0, 8): the clamp at 7 is reached
        mlp.experts.gate_up_proj_bias.normal_(0, 0.5)
        mlp.experts.down_proj.normal_(0, 0.2)
        mlp.experts.down_proj_bias.normal_(0, 0.5)
    return mlp.to(device=device, dtype=dtype).eval()


def _compare(mlp, x, tol):
    with torch.no_grad():
        want_out, want_scores = mlp(x)
        fused = FusedMoE.from_module(mlp)
        got_out, got_scores = fused(x)
    assert got_out.shape == want_out.shape and got_scores.shape == want_scores.shape
    assert got_out.dtype == want_out.dtype and got_scores.dtype == want_scores.dtype
    assert_close_rel(got_out, want_out, tol)
    assert_close_rel(got_scores, want_scores, tol, what="router_scores")
    return got_out


@pytest.mark.parametrize("shape,top_k", [((1, 1, 32), 4), ((2, 7, 32), 4), ((1, 5, 32), 1), ((3, 4, 32), 2)])
def test_matches_gpt_oss_mlp_fp32(device, shape, top_k):
    mlp = _gpt_oss_mlp(device, top_k=top_k, seed=shape[1])
    _compare(mlp, torch.randn(shape, device=device), 1e-5)


def test_matches_gpt_oss_mlp_bf16(device):
    # transformers rounds to bf16 after every step; we round the activation and the output only
    mlp = _gpt_oss_mlp(device, torch.bfloat16, seed=3)
    _compare(mlp, torch.randn(2, 9, 32, device=device, dtype=torch.bfloat16), TOL[torch.bfloat16])


def test_router_ties_within_the_chosen_and_one_expert_for_all(device):
    mlp = _gpt_oss_mlp(device, seed=4)
    with torch.no_grad():
        mlp.router.weight.zero_()  # logits = bias: experts 1, 3, 5, 6 tie and are chosen by every token
        mlp.router.bias.copy_(torch.tensor([0.0, 2.0, -1.0, 2.0, 0.5, 2.0, 2.0, 1.0]))
    out = _compare(mlp, torch.randn(1, 6, 32, device=device), 1e-5)
    assert torch.isfinite(out).all()


def test_from_module_shares_the_weights(device):
    mlp = _gpt_oss_mlp(device, seed=5)
    fused = FusedMoE.from_module(mlp)
    assert fused.experts.gate_up_proj is mlp.experts.gate_up_proj
    assert fused.router.weight.data_ptr() == mlp.router.weight.data_ptr()
    assert fused.top_k == 4 and fused.alpha == mlp.experts.alpha and fused.limit == mlp.experts.limit
    x = torch.randn(1, 3, 32, device=device)
    with torch.no_grad():
        mlp.experts.down_proj_bias.add_(1.0)  # a change to the model shows in the fused module
        assert_close_rel(fused(x)[0], mlp(x)[0], 1e-5)
    assert "num_experts=8" in repr(fused)


def test_qwen3_moe_block(device):
    qwen = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    from transformers import Qwen3MoeConfig

    for norm in (True, False):
        cfg = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                             norm_topk_prob=norm, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=16, vocab_size=64, experts_implementation="eager")
        torch.manual_seed(6)
        block = qwen.Qwen3MoeSparseMoeBlock(cfg)
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, 0.4)
        block = block.to(device).eval()
        x = torch.randn(1, 5, 32, device=device)
        with torch.no_grad():
            want = block(x)
            ids, wts = moe_route(x, block.gate.weight, None, 3, renormalize=norm)
            got = moe_experts(x, ids, wts, block.experts.gate_up_proj, None, block.experts.down_proj, None, "silu",
                              gate_up_layout="concatenated", transposed=False)
        assert_close_rel(got, want, 1e-5)
