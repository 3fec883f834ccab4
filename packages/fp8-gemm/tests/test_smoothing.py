"""SmoothQuant folding (fp8_gemm.smoothing): which norms fold, exactness of the fold, the factors, calibration, and
convert_to_fp8(calibration=...). A small decoder built here (no transformers in this package's test environment)
with the attribute names of transformers' Llama layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fp8_gemm import FP8Linear, convert_to_fp8
from fp8_gemm.smoothing import (
    NormGroup,
    RowGroup,
    calibrate_input_amax,
    fold_smoothing,
    norm_fed_groups,
    row_groups,
    smooth_factors,
    smooth_norm_fed_linears,
)
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.testing import assert_close_rel

HIDDEN, INTER, VOCAB = 64, 96, 50


class TinyRMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight


class ZeroCenteredRMSNorm(TinyRMSNorm):  # Qwen3.5's / Gemma's norms scale by (1 + weight): no plain division
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)


class ShardedLikeRMSNorm(TinyRMSNorm):  # a norm that cannot run on a plain probe (e.g. a DTensor weight)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("mixed torch.Tensor and DTensor")


class Attention(nn.Module):
    """Grouped-query attention: 4 query heads, 2 key/value heads of 16 (v has a bias, as Qwen2's)."""

    head_dim = 16

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(HIDDEN, HIDDEN, bias=False), nn.Linear(HIDDEN, 32, bias=False)
        self.v_proj, self.o_proj = nn.Linear(HIDDEN, 32, bias=True), nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, 4, 16).transpose(1, 2)
        k, v = (p(x).view(b, t, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1) for p in (self.k_proj, self.v_proj))
        out = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, HIDDEN))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(HIDDEN, INTER, bias=False), nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, norm=TinyRMSNorm) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = norm(HIDDEN), norm(HIDDEN)
        self.self_attn, self.mlp = Attention(), MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x))
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    def __init__(self, layers: int = 2, norm=TinyRMSNorm, outlier: float = 30.0) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        with torch.no_grad():
            self.embed_tokens.weight[:, 3] *= outlier  # one large channel, as real decoders have
        self.layers = nn.ModuleList([DecoderLayer(norm) for _ in range(layers)])
        with torch.no_grad():  # and norm weights that make it larger still
            for layer in self.layers:
                layer.input_layernorm.weight[3] *= outlier / 3
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def _ids(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def test_groups_are_each_layers_norms_and_the_linears_they_feed():
    torch.manual_seed(0)
    model = Decoder(layers=3)
    groups = norm_fed_groups(model)
    assert groups == [
        NormGroup(f"layers.{i}.{norm}", tuple(f"layers.{i}.{block}.{p}" for p in projs))
        for i in range(3)
        for norm, block, projs in (("input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj")),
                                   ("post_attention_layernorm", "mlp", ("gate_proj", "up_proj")))
    ]


def test_layouts_it_does_not_know_are_left_alone():
    torch.manual_seed(0)
    assert norm_fed_groups(Decoder(norm=ZeroCenteredRMSNorm)) == []  # (1 + weight) norms, whatever their name
    assert norm_fed_groups(Decoder(norm=ShardedLikeRMSNorm)) == []  # norms the probe cannot run
    plain = Decoder()
    weights = [layer.input_layernorm.weight.detach().clone() for layer in plain.layers]
    assert len(norm_fed_groups(plain)) == 4  # the probe run leaves the norms' weights as they were
    assert all(torch.equal(w, layer.input_layernorm.weight) for w, layer in zip(weights, plain.layers))
    other = Decoder()
    other.layers[0].pre_feedforward_layernorm = TinyRMSNorm(HIDDEN)  # Gemma 2/3's layout: norms elsewhere
    other.layers[1].mlp.up_proj = nn.Identity()  # a projection that is no nn.Linear
    names = {g.norm for g in norm_fed_groups(other)}
    assert names == {"layers.1.input_layernorm"}


def test_the_fold_leaves_the_model_computing_the_same_in_float64():
    torch.manual_seed(0)
    model = Decoder().double()
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
    smoothed = smooth_norm_fed_linears(model, [ids, _ids(seed=2)], alpha=0.5)
    assert len(smoothed) == 2 * 5
    with torch.no_grad():
        after = model(ids)
    assert_close_rel(after, before, 1e-12, "folded model")


def test_row_groups_fold_o_proj_into_v_and_down_proj_into_up_exactly_in_float64():
    torch.manual_seed(0)
    model = Decoder().double()
    assert row_groups(model) == [
        g for i in range(2)
        for g in (RowGroup(f"layers.{i}.self_attn.v_proj", f"layers.{i}.self_attn.o_proj", 16, 2),
                  RowGroup(f"layers.{i}.mlp.up_proj", f"layers.{i}.mlp.down_proj"))
    ]
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
        v_before = model.layers[0].self_attn.v_proj.weight.clone()
    smoothed = smooth_norm_fed_linears(model, ids, rows=True)
    assert len(smoothed) == 2 * 7  # q, k, v, gate, up through the norms; o and down through v and up
    with torch.no_grad():
        after = model(ids)
    assert_close_rel(after, before, 1e-12, "model with every fold")
    assert not torch.allclose(model.layers[0].self_attn.v_proj.weight, v_before)  # the folds did change weights


def test_o_proj_factors_are_shared_by_the_query_heads_of_a_key_value_head():
    torch.manual_seed(0)
    model = Decoder().double()
    reference = Decoder().double()
    reference.load_state_dict(model.state_dict())
    smooth_norm_fed_linears(model, _ids(), linears=["layers.0.self_attn.o_proj"], rows=True)
    ratio = (model.layers[0].self_attn.o_proj.weight / reference.layers[0].self_attn.o_proj.weight)[0]
    heads = ratio.reshape(2, 2, 16)  # [kv head, query head of its group, channel]
    assert torch.allclose(heads[:, 0], heads[:, 1]) and not torch.allclose(heads[0, 0], heads[1, 0])
    v_ratio = (reference.layers[0].self_attn.v_proj.weight / model.layers[0].self_attn.v_proj.weight)[:, 0]
    assert torch.allclose(v_ratio.reshape(2, 16), heads[:, 0])  # v's rows divided by what o's columns gained
    assert torch.equal(model.layers[0].input_layernorm.weight, reference.layers[0].input_layernorm.weight)


def test_factors_follow_the_formula_and_flatten_the_norm_outputs():
    torch.manual_seed(0)
    model = Decoder().double()
    ids = _ids()
    group = norm_fed_groups(model)[0]
    modules = dict(model.named_modules())
    amax = calibrate_input_amax(model, ids, [group.linears[0]])[group.linears[0]]
    with torch.no_grad():  # the norm's output, directly: what q/k/v read
        x = modules[group.norm](model.embed_tokens(ids))
    assert torch.equal(amax, x.abs().reshape(-1, HIDDEN).amax(0).float())
    weights = [modules[n].weight for n in group.linears]
    w = torch.cat([wt.detach().abs() for wt in weights]).amax(0).float()
    s = smooth_factors(amax, weights, alpha=0.5)
    assert_close_rel(s, (amax.clamp_min(1e-5).sqrt() / w.clamp_min(1e-5).sqrt()).clamp_min(1e-5), 1e-6, "factors")
    fold_smoothing(model, group, s)
    with torch.no_grad():
        y = modules[group.norm](model.embed_tokens(ids)).abs().reshape(-1, HIDDEN).amax(0)
    # the outlier channel dominated the row's range before; after the fold the ranges are far closer
    spread_before = (amax.max() / amax.median()).item()
    spread_after = (y.max() / y.median()).item()
    assert spread_before > 10 and spread_after < spread_before / 3, (spread_before, spread_after)


def test_only_groups_with_a_converted_linear_are_smoothed():
    torch.manual_seed(0)
    model = Decoder()
    norm_weight = model.layers[1].post_attention_layernorm.weight.detach().clone()
    done = smooth_norm_fed_linears(model, _ids(), linears=["layers.0.self_attn.k_proj"])
    assert done == ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj"]
    assert torch.equal(model.layers[1].post_attention_layernorm.weight, norm_weight)


def test_bad_arguments_are_named():
    torch.manual_seed(0)
    model = Decoder()
    with pytest.raises(InvalidArgumentError, match="calibration"):
        smooth_norm_fed_linears(model, "some text")
    with pytest.raises(InvalidArgumentError, match="calibration"):
        smooth_norm_fed_linears(model, [])
    with pytest.raises(InvalidArgumentError, match="alpha"):
        smooth_norm_fed_linears(model, _ids(), alpha=1.5)
    with pytest.raises(InvalidArgumentError, match="finite"):
        fold_smoothing(model, norm_fed_groups(model)[0], torch.full((HIDDEN,), float("nan")))


def test_convert_to_fp8_with_calibration_smooths_then_converts(device):
    torch.manual_seed(0)
    model = Decoder().to(device)
    reference = Decoder().to(device)
    reference.load_state_dict(model.state_dict())
    ids = _ids().to(device)
    convert_to_fp8(model, recipe="channel", calibration=ids)
    assert isinstance(model.layers[0].self_attn.q_proj, FP8Linear)
    with torch.no_grad():
        want = reference(ids)
        got = model(ids)
        # the norms now divide by the factors: a changed weight, and the FP8 model still computes the same model
        assert not torch.equal(model.layers[0].input_layernorm.weight, reference.layers[0].input_layernorm.weight)
    assert torch.isfinite(got).all()
    assert_close_rel(got, want, 0.1, "smoothed FP8 decoder")


def test_convert_to_fp8_says_when_calibration_found_nothing_to_smooth(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN)).to(device)
    with pytest.warns(UserWarning, match="nothing was smoothed"):
        convert_to_fp8(model, recipe="channel", calibration=torch.randn(4, HIDDEN, device=device))
    with pytest.raises(InvalidArgumentError, match="trainable"):
        convert_to_fp8(Decoder().to(device), calibration=_ids().to(device), trainable=True)
    with pytest.warns(UserWarning, match="bare nn.Linear"):
        convert_to_fp8(nn.Linear(HIDDEN, HIDDEN).to(device), recipe="channel", calibration=_ids().to(device))
