"""Named FP8 recipes: how ``convert_to_fp8`` quantizes each ``nn.Linear`` and which ones stay in high precision.

A recipe is scales for the weights and the activations plus a rule, read from the model's structure alone (no
calibration data), naming the Linears it keeps in their dtype. ``convert_to_fp8(model)`` uses ``"default"``.

- ``default`` (the same as ``group``): weight scales per output feature and 128 input features, 1x128 activation
  blocks; every MLP output projection (``down_proj``) and the first and last decoder layers kept.
- ``block-mlp-out`` (the default before session 15): 128x128 weight blocks, 1x128 activation blocks; every MLP
  output projection kept.
- ``block``: 128x128 weight blocks, 1x128 activation blocks; nothing kept.
- ``channel`` (the default before recipes): per output channel, per row (token); nothing kept.
- ``tensor``: per tensor, per tensor; nothing kept.

Why the default is what it is: ``docs/fp8-gemm.md`` ("Recipes"), measured by ``python -m
benchmarks.bench_accuracy`` on a pretrained decoder (``docs/benchmarks/fp8-accuracy.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.validation import check_choice

WEIGHT_GRANULARITIES = ("tensor", "channel", "block", "group")
ACTIVATION_GRANULARITIES = ("tensor", "row", "block")


@dataclass(frozen=True)
class FP8Recipe:
    """Scales and the high-precision rule of one recipe.

    Args:
        name: the recipe's name.
        weight_granularity, activation_granularity: as ``FP8Linear``'s.
        keep_layers: the decoder layers the rule looks at: ``"all"``, or ``(first, last)``: that many layers at
            each end of the stack (``(0, 0)``: none, every Linear is converted).
        keep_projections: which Linears of those layers stay in high precision: ``"mlp_out"`` (the MLP's output
            projection: ``down_proj``, ``fc2``, ``w2``, ``dense_4h_to_h``, ``c_proj`` under ``mlp``, or failing those,
            in a layer of at least four Linears, the one with the most input features), ``"all"`` (every Linear of
            those layers) or a tuple of child names (``("down_proj", "o_proj")``).
        description: one line for humans.
        keep_edge_layers: ``(first, last)``: that many whole decoder layers at each end of the stack also stay in
            high precision, on top of the rule above (``(0, 0)``: none).
    """

    name: str
    weight_granularity: str = "block"
    activation_granularity: str = "block"
    keep_layers: str | tuple[int, int] = (0, 0)
    keep_projections: str | tuple[str, ...] = "mlp_out"
    description: str = ""
    keep_edge_layers: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        check_choice(self.weight_granularity, "weight_granularity", WEIGHT_GRANULARITIES)
        check_choice(self.activation_granularity, "activation_granularity", ACTIVATION_GRANULARITIES)
        kl = self.keep_layers
        if not (kl == "all" or _first_last(kl)):
            raise InvalidArgumentError(
                f"keep_layers: expected 'all' or (first, last) non-negative integers, got {kl!r}")
        if not _first_last(self.keep_edge_layers):
            raise InvalidArgumentError(
                f"keep_edge_layers: expected (first, last) non-negative integers, got {self.keep_edge_layers!r}")
        kp = self.keep_projections
        if not (kp in ("mlp_out", "all") or (isinstance(kp, tuple) and all(isinstance(k, str) for k in kp))):
            raise InvalidArgumentError(
                f"keep_projections: expected 'mlp_out', 'all' or a tuple of child names, got {kp!r}")


def _first_last(value: object) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


# The default is chosen by measurement (docs/benchmarks/fp8-accuracy.md, SmolLM2-135M, twenty texts, 4,725-4,894
# scored tokens): the previous default (128x128 weight blocks, 1x128 activation blocks, every MLP output projection
# in bf16; now "block-mlp-out") measured +1.88 % perplexity against bf16 in emulation and +1.65 % with the kernels on
# the H200 (six texts). Weight scales per output feature in groups of 128 inputs, with the first and last decoder
# layers also kept, measured +0.58 % (KL 0.0123 nats/token against 0.0180), the first library recipe within the 1 %
# budget (session 15); the kernels compute what that emulation computes (tests/test_real_decoder.py). Its cost:
# group-scaled prefill GEMMs take 1.2-1.5x the blocks' time on the H200 (decode is at or below the blocks' time: the
# weight-only kernel takes every decode M), and a gated MLP's FP8 gate/up run as two GEMMs (the fused MLP kernel
# takes per-channel or block scales only).
_GROUP_DESCRIPTION = ("weights in groups of 128 input features per output feature, 1x128 activation blocks; every MLP "
                      "output projection and the first and last decoder layers in high precision")
# group-row: the default's weights and kept Linears with per-row activations (session 19, emulation, twenty texts:
# +0.61 % perplexity, KL 0.0135 nats/token, against the default's +0.78 % / 0.0124 in the same run). Its prefill
# GEMMs scale each element once per K block instead of twice: 0.65-0.81x of per-channel's speed on the H200 at 2048
# rows, against the default's 0.59-0.68x. Decode is the same (activations are not quantized at 1-16 rows).
_GROUP_ROW_DESCRIPTION = ("weights in groups of 128 input features per output feature, per-row activations; every MLP "
                          "output projection and the first and last decoder layers in high precision")
RECIPES: dict[str, FP8Recipe] = {
    r.name: r
    for r in (
        FP8Recipe("default", "group", "block", "all", "mlp_out", _GROUP_DESCRIPTION, keep_edge_layers=(1, 1)),
        FP8Recipe("group", "group", "block", "all", "mlp_out", _GROUP_DESCRIPTION, keep_edge_layers=(1, 1)),
        FP8Recipe("group-row", "group", "row", "all", "mlp_out", _GROUP_ROW_DESCRIPTION, keep_edge_layers=(1, 1)),
        FP8Recipe("block-mlp-out", "block", "block", "all", "mlp_out",
                  "128x128 weight blocks, 1x128 activation blocks; every MLP output projection in high precision "
                  "(the default before session 15)"),
        FP8Recipe("block", "block", "block",
                  description="128x128 weight blocks, 1x128 activation blocks, every Linear"),
        FP8Recipe("channel", "channel", "row",
                  description="per-channel weights, per-row activations, every Linear (the default before recipes)"),
        FP8Recipe("tensor", "tensor", "tensor", description="per-tensor weights and activations, every Linear"),
    )
}

_MLP_OUT = ("down_proj", "fc2", "w2", "dense_4h_to_h", "c_proj", "out_proj")


def get_recipe(recipe: str | FP8Recipe) -> FP8Recipe:
    """A recipe by name (``RECIPES``), or the given ``FP8Recipe``."""
    if isinstance(recipe, FP8Recipe):
        return recipe
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise InvalidArgumentError(f"recipe: expected one of {sorted(RECIPES)} or an FP8Recipe, got {recipe!r}")
    return RECIPES[recipe]


def resolve_recipe(recipe: str | FP8Recipe | None = None, weight_granularity: str | None = None,
                   activation_granularity: str | None = None) -> FP8Recipe:
    """The recipe ``convert_to_fp8`` applies for these arguments.

    No arguments: ``"default"``. A recipe: it, with the given granularities replacing its scales. Granularities
    without a recipe: every Linear with them (an unnamed one is ``"channel"`` / ``"row"``), as before recipes.
    """
    if recipe is None and (weight_granularity is not None or activation_granularity is not None):
        r = RECIPES["channel"]  # explicit scales alone: every Linear, as convert_to_fp8 did before recipes
    else:
        r = get_recipe("default" if recipe is None else recipe)
    changes = {}
    if weight_granularity is not None:
        changes["weight_granularity"] = weight_granularity
    if activation_granularity is not None:
        changes["activation_granularity"] = activation_granularity
    return replace(r, **changes) if changes else r


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder stack: the ``nn.ModuleList`` holding the most ``nn.Linear`` layers, with its qualified name
    (``model.layers`` for Llama, Qwen, Mistral; ``transformer.h`` for GPT-2-like models); None without one."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1:
            n = sum(isinstance(m, nn.Linear) for m in mod.modules())
            if n > best_n:
                best, best_n = (name, mod), n
    return best


def _mlp_out(layer_prefix: str, layer: nn.Module) -> set[str]:
    lins = [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    if not lins:
        return set()
    named = [n for n, _ in lins if n.rsplit(".", 1)[-1] in _MLP_OUT and
             (n.rsplit(".", 1)[-1] != "c_proj" or ".mlp." in f".{n}") and
             (n.rsplit(".", 1)[-1] != "out_proj" or "attn" not in n)]
    if not named and len(lins) >= 4:
        # a decoder-like layer (attention and MLP projections) with unknown names: by shape, the projection with the
        # most input features (the MLP's wide intermediate); a plain stack of Linears keeps nothing
        named = [max(lins, key=lambda e: e[1].in_features)[0]]
    return {_join(layer_prefix, n) for n in named}


def _join(prefix: str, name: str) -> str:
    return ".".join(p for p in (prefix, name) if p)


def kept_linears(model: nn.Module, recipe: str | FP8Recipe = "default") -> set[str]:
    """Qualified names of the ``nn.Linear`` layers that ``recipe``'s rule keeps in high precision in ``model``."""
    r = get_recipe(recipe)
    if r.keep_layers == (0, 0) and r.keep_edge_layers == (0, 0):
        return set()
    found = decoder_layers(model)
    if found is None:
        return set()
    prefix, layers = found
    n = len(layers)
    keep: set[str] = set()
    for i in _layer_indices(r.keep_layers, n):
        layer_prefix = f"{prefix}.{i}" if prefix else str(i)
        layer = layers[i]
        if r.keep_projections == "mlp_out":
            keep |= _mlp_out(layer_prefix, layer)
        else:
            keep |= _linears_of(layer_prefix, layer, r.keep_projections)
    for i in _layer_indices(r.keep_edge_layers, n):
        keep |= _linears_of(f"{prefix}.{i}" if prefix else str(i), layers[i], "all")
    return keep


def _layer_indices(rule: str | tuple[int, int], n: int) -> list[int]:
    """The decoder layers a ``keep_layers``-style rule names, of ``n``."""
    if rule == "all":
        return list(range(n))
    first, last = rule
    return sorted(set(range(min(first, n))) | set(range(max(n - last, 0), n)))


def _linears_of(layer_prefix: str, layer: nn.Module, projections: str | tuple[str, ...]) -> set[str]:
    """Qualified names of the layer's Linears that ``projections`` (``"all"`` or child names) picks."""
    return {_join(layer_prefix, name) for name, mod in layer.named_modules()
            if isinstance(mod, nn.Linear) and (projections == "all" or name.rsplit(".", 1)[-1] in projections)}


def select_linears(model: nn.Module, recipe: str | FP8Recipe = "default",
                   filter_fn: Callable[[str, nn.Linear], bool] | None = None) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers that ``convert_to_fp8(model, recipe=recipe, filter_fn=...)``
    converts, in module order (a dry run: nothing is changed)."""
    keep = kept_linears(model, recipe)
    return [name for name, mod in model.named_modules()
            if type(mod) is nn.Linear and name not in keep and (filter_fn is None or filter_fn(name, mod))]


__all__ = ["RECIPES", "FP8Recipe", "decoder_layers", "get_recipe", "kept_linears", "resolve_recipe", "select_linears"]
