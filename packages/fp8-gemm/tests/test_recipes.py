"""Named FP8 recipes (fp8_gemm.recipes) and convert_to_fp8's recipe argument, on small stand-in models."""

from __future__ import annotations

import pytest
import torch
from fp8_gemm import FP8Linear, TrainableFP8Linear, convert_to_fp8
from fp8_gemm.recipes import (
    RECIPES,
    FP8Recipe,
    decoder_layers,
    get_recipe,
    kept_linears,
    resolve_recipe,
    select_linears,
)
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError


class _Attn(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(h, h, bias=False) for _ in range(4))


class _MLP(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)


class _Layer(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.self_attn, self.mlp = _Attn(h), _MLP(h, i)


class _Decoder(nn.Module):
    """Llama's module names: model.layers.{i}.self_attn.q_proj ..., lm_head."""

    def __init__(self, n=4, h=32, i=64, device=None):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(_Layer(h, i) for _ in range(n))
        self.lm_head = nn.Linear(h, 50, bias=False)
        if device is not None:
            self.to(device)


class _Unnamed(nn.Module):
    """No known MLP names: in a decoder-like layer (4+ Linears) the rule falls back to the widest input (the MLP's
    intermediate); a plain stack of 2-Linear blocks keeps nothing."""

    def __init__(self, n=3, per_block=4):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(*[nn.Linear(16, 16) for _ in range(per_block - 2)], nn.Linear(16, 48), nn.GELU(),
                          nn.Linear(48, 16)) for _ in range(n))


class _GPT2Like(nn.Module):
    """GPT-2's names: transformer.h.{i}.attn.c_proj (attention output) and .mlp.c_proj (MLP output)."""

    def __init__(self, n=3):
        super().__init__()
        self.transformer = nn.Module()
        layers = []
        for _ in range(n):
            blk = nn.Module()
            blk.attn, blk.mlp = nn.Module(), nn.Module()
            blk.attn.c_attn, blk.attn.c_proj = nn.Linear(16, 48), nn.Linear(16, 16)
            blk.mlp.c_fc, blk.mlp.c_proj = nn.Linear(16, 64), nn.Linear(64, 16)
            layers.append(blk)
        self.transformer.h = nn.ModuleList(layers)


EDGES = FP8Recipe("edges-mlp-out", keep_layers=(1, 1))  # the MLP output of the first and last layers


def test_rule_keeps_the_mlp_output_of_the_first_and_last_layers():
    model = _Decoder(n=4)
    assert decoder_layers(model)[0] == "model.layers"
    assert kept_linears(model, EDGES) == {"model.layers.0.mlp.down_proj", "model.layers.3.mlp.down_proj"}
    names = select_linears(model, EDGES)
    assert len(names) == 4 * 7 + 1 - 2 and "lm_head" in names
    assert select_linears(model, EDGES, lambda n, _: n != "lm_head") == [n for n in names if n != "lm_head"]
    for name in ("block", "channel", "tensor"):
        assert kept_linears(model, name) == set() and len(select_linears(model, name)) == 29
    assert kept_linears(model, "block-mlp-out") == {f"model.layers.{i}.mlp.down_proj" for i in range(4)}
    assert kept_linears(model, "default") == kept_linears(model, "group")  # the default is the group recipe


def test_group_row_recipe_is_the_group_recipe_with_per_row_activations():
    model = _Decoder(n=4)
    g, gr = get_recipe("group"), get_recipe("group-row")
    assert (gr.weight_granularity, gr.activation_granularity) == ("group", "row")
    assert (gr.keep_layers, gr.keep_projections, gr.keep_edge_layers) == (g.keep_layers, g.keep_projections,
                                                                          g.keep_edge_layers)
    assert kept_linears(model, "group-row") == kept_linears(model, "group")


def test_group_recipe_keeps_every_mlp_output_and_the_edge_layers_whole():
    model = _Decoder(n=4)
    r = get_recipe("group")
    assert (r.weight_granularity, r.activation_granularity, r.keep_edge_layers) == ("group", "block", (1, 1))
    edge = {f"model.layers.{i}.{p}" for i in (0, 3) for p in ("self_attn.q_proj", "self_attn.k_proj",
                                                              "self_attn.v_proj", "self_attn.o_proj",
                                                              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert kept_linears(model, "group") == edge | {f"model.layers.{i}.mlp.down_proj" for i in range(4)}
    assert len(select_linears(model, "group")) == 29 - 16
    only_edges = FP8Recipe("edges", keep_edge_layers=(0, 2))
    assert kept_linears(model, only_edges) == {n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                                               and n.startswith(("model.layers.2.", "model.layers.3."))}
    with pytest.raises(InvalidArgumentError, match="keep_edge_layers"):
        FP8Recipe("bad", keep_edge_layers=(1, -1))
    with pytest.raises(InvalidArgumentError, match="keep_edge_layers"):
        FP8Recipe("bad", keep_edge_layers="all")


def test_rule_finds_mlp_outputs_by_name_or_by_shape():
    assert kept_linears(_Unnamed(), EDGES) == {"blocks.0.4", "blocks.2.4"}
    assert kept_linears(_Unnamed(per_block=2), EDGES) == set()
    stack = nn.Module()
    stack.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))  # a stack of bare Linears: nothing kept
    assert kept_linears(stack, "block-mlp-out") == set()
    assert kept_linears(stack, "default") == {"layers.0", "layers.2"}  # the first and last layers stay whole
    assert kept_linears(stack, FP8Recipe("x", keep_layers=(1, 0), keep_projections="all")) == {"layers.0"}
    assert kept_linears(_GPT2Like(), EDGES) == {"transformer.h.0.mlp.c_proj", "transformer.h.2.mlp.c_proj"}
    assert kept_linears(nn.Sequential(nn.Linear(4, 4)), EDGES) == set()  # no decoder stack: nothing kept
    one = _Decoder(n=1)  # a one-layer ModuleList is not taken for a stack: every Linear converts
    assert len(select_linears(one, EDGES)) == 8


def test_custom_recipes():
    model = _Decoder(n=5)
    r = FP8Recipe("edges", "channel", "row", keep_layers=(2, 1), keep_projections="all")
    kept = kept_linears(model, r)
    assert len(kept) == 3 * 7 and all(k.split(".")[2] in ("0", "1", "4") for k in kept)
    r2 = FP8Recipe("o", keep_layers=(1, 0), keep_projections=("o_proj", "down_proj"))
    assert kept_linears(model, r2) == {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"}
    assert len(kept_linears(model, FP8Recipe("all", keep_layers="all", keep_projections="all"))) == 35
    assert get_recipe(r2) is r2 and get_recipe("default") is RECIPES["default"]
    assert resolve_recipe() is RECIPES["default"] and resolve_recipe("channel") is RECIPES["channel"]
    legacy = resolve_recipe(None, "block")
    assert (legacy.weight_granularity, legacy.activation_granularity, legacy.keep_layers) == ("block", "row", (0, 0))
    with pytest.raises(InvalidArgumentError, match="recipe"):
        get_recipe("fastest")
    with pytest.raises(InvalidArgumentError, match="weight_granularity"):
        FP8Recipe("bad", weight_granularity="row")
    with pytest.raises(InvalidArgumentError, match="keep_layers"):
        FP8Recipe("bad", keep_layers=(-1, 0))
    with pytest.raises(InvalidArgumentError, match="keep_projections"):
        FP8Recipe("bad", keep_projections=["down_proj"])


def test_convert_to_fp8_default_is_the_default_recipe(device):
    torch.manual_seed(0)
    model = _Decoder(n=3, device=device)
    kept = kept_linears(model, "default")
    convert_to_fp8(model, filter_fn=lambda n, _: n != "lm_head")
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert len(fp8) == 3 * 7 - len(kept) and type(model.lm_head) is nn.Linear
    assert all(type(model.get_submodule(k)) is nn.Linear for k in kept)
    d = RECIPES["default"]
    assert all(m.weight_granularity == d.weight_granularity and m.activation_granularity == d.activation_granularity
               for m in fp8.values())
    x = torch.randn(2, 32, device=device)
    assert model.model.layers[1].self_attn.q_proj(x).shape == (2, 32)
    # a recipe with a rule: its layers stay nn.Linear
    model = convert_to_fp8(_Decoder(n=3, device=device), recipe=EDGES)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert type(model.model.layers[2].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.down_proj, FP8Linear)


def test_convert_to_fp8_recipe_and_explicit_scales(device):
    model = convert_to_fp8(_Decoder(n=3, device=device), recipe="channel")
    fp8 = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(fp8) == 22 and all(m.weight_granularity == "channel" and m.activation_granularity == "row"
                                  for m in fp8)
    # explicit scales without a recipe: every Linear, as before recipes existed (unnamed: channel / row)
    model = convert_to_fp8(_Decoder(n=3, device=device), weight_granularity="block")
    fp8 = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(fp8) == 22 and all(m.weight_granularity == "block" and m.activation_granularity == "row" for m in fp8)
    # with a recipe they override its scales, its rule of kept layers stays
    model = convert_to_fp8(_Decoder(n=3, device=device), recipe=EDGES, weight_granularity="channel")
    fp8 = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(fp8) == 20 and all(m.weight_granularity == "channel" and m.activation_granularity == "block"
                                  for m in fp8)
    with pytest.raises(InvalidArgumentError, match="activation_granularity"):
        convert_to_fp8(_Decoder(n=2, device=device), activation_granularity="channel")
    # a bare Linear converts with the recipe's scales
    lin = convert_to_fp8(nn.Linear(32, 16, device=device))
    assert isinstance(lin, FP8Linear) and lin.weight_granularity == RECIPES["default"].weight_granularity
    # trainable conversion follows the same rule
    model = convert_to_fp8(_Decoder(n=3, device=device), recipe=EDGES, trainable=True)
    assert sum(isinstance(m, TrainableFP8Linear) for m in model.modules()) == 20


def test_a_linear_shared_by_two_parents_is_converted_in_both(device):
    shared = nn.Linear(32, 32, device=device)
    model = nn.Module()
    model.a, model.b = nn.Sequential(shared), nn.Sequential(shared)
    convert_to_fp8(model)
    assert isinstance(model.a[0], FP8Linear) and model.a[0] is model.b[0]
