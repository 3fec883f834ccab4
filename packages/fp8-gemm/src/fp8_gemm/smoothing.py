"""SmoothQuant-style migration folded into the RMSNorms that feed Linears, for FP8 activations with fewer outliers.

A decoder's activations have a few input features (channels) far larger than the rest; a per-row or 1x128 activation
scale is set by them, and the other features lose precision. SmoothQuant (Xiao et al., 2023) moves that range into the
weights: with one factor ``s_j`` per input feature, ``x @ W^T = (x / s) @ (W * s)^T``. Where an RMSNorm feeds the
Linears (a decoder layer's ``input_layernorm`` feeds q/k/v, its ``post_attention_layernorm`` gate/up), ``x / s``
folds into the norm's weight, so the kernels run unchanged and nothing is computed per call:

    norm.weight <- norm.weight / s        W <- W * s   (for every Linear the norm feeds)

with ``s_j = amax(x_j)^alpha / amax(W_j)^(1 - alpha)``: ``amax(x_j)`` the feature's absolute maximum over calibration
inputs, ``amax(W_j)`` the largest absolute weight of input feature j over the group's Linears (one factor serves all
of them, as one norm output does). Exact in real arithmetic; the folded weights are rounded once to their dtype.

Measured on SmolLM2-135M in emulation (docs/benchmarks/fp8-accuracy.md): with the ``default`` recipe and a calibration
text of a few paragraphs, over twenty scored texts, +1.09 % perplexity against bf16 instead of +1.88 %, KL to bf16
0.0168 against 0.0180 (every recipe's KL 6-9 % lower). Calibrating on random token ids helped less. The row folds
below left KL flat or higher there (they move ``down_proj``'s outliers into its weight blocks): off by default.

Two more folds reach the Linears no norm feeds, both exact as well: ``o_proj`` reads the attention's output, which is
linear in v, so ``v_proj``'s output rows absorb ``1 / s`` (under grouped-query attention one factor per key/value
head channel, repeated over the query heads sharing it); ``down_proj`` reads ``act(gate) * up``, so ``up_proj``'s
output rows absorb it.

Folded only where the structure is known: a pre-norm decoder layer (``input_layernorm`` / ``self_attn.q_proj,
k_proj, v_proj``; ``post_attention_layernorm`` / ``mlp.gate_proj, up_proj``) with no other norm between (Gemma 2/3's
``pre_feedforward_layernorm`` layers are left alone), ``*RMSNorm`` modules whose output is ``normalized * weight``
(checked by running each norm once with its weight doubled: zero-centred ``(1 + weight)`` norms, Gemma's and
Qwen3.5's, are left alone), and plain ``nn.Linear`` projections; for ``o_proj`` an attention
with ``head_dim`` whose query heads are a whole multiple of v's, for ``down_proj`` a gated MLP (``gate_proj``,
``up_proj``, ``down_proj``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError

from .recipes import decoder_layers

# (norm attribute of the layer, attribute of the block it feeds, the Linears of that block reading its output)
_FEEDS = (("input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj")),
          ("post_attention_layernorm", "mlp", ("gate_proj", "up_proj")))
# Layers with these attributes place their norms differently (Gemma 2/3 normalize the attention output with
# post_attention_layernorm and the MLP input with pre_feedforward_layernorm).
_OTHER_LAYOUTS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
DEFAULT_ALPHA = 0.5


@dataclass(frozen=True)
class NormGroup:
    """An RMSNorm and the Linears reading its output, by qualified name."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class RowGroup:
    """A Linear (``producer``) whose output rows, rescaled, leave the result of ``consumer`` unchanged: ``v_proj`` /
    ``o_proj`` (``head_dim``: the channels of one head; ``repeat``: query heads per key/value head) or ``up_proj`` /
    ``down_proj`` (``head_dim`` 0: channel for channel)."""

    producer: str
    consumer: str
    head_dim: int = 0
    repeat: int = 1

    @property
    def linears(self) -> tuple[str, ...]:
        return (self.consumer,)


def _plain_rms_norm(norm: object, features: int) -> bool:
    """An RMSNorm computing ``normalized * weight`` with a ``[features]`` weight: a ``*RMSNorm`` module whose output
    doubles when its weight does (checked by running it: Gemma's, Qwen3.5's and other zero-centred norms scale by
    ``1 + weight`` under the same class-name pattern, and a fold would change what they compute)."""
    weight = getattr(norm, "weight", None)
    if not (isinstance(norm, nn.Module) and type(norm).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor)
            and weight.shape == (features,) and weight.is_floating_point() and weight.device.type != "meta"):
        return False
    probe = torch.randn(2, features, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    with torch.no_grad():
        saved = weight.detach().clone()
        try:
            once = norm(probe)
            weight.mul_(2.0)  # exact in any float dtype (short of overflow)
            twice = norm(probe)
        except (RuntimeError, TypeError, ValueError):  # a norm that cannot run on a plain probe (sharded, hooked)
            return False
        finally:
            weight.copy_(saved)
    return (isinstance(once, torch.Tensor) and isinstance(twice, torch.Tensor)
            and bool(torch.allclose(twice.float(), 2.0 * once.float(), rtol=1e-3, atol=1e-6)))


def _named_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of the model's decoder stack (``recipes.decoder_layers``); none without one."""
    found = decoder_layers(model)
    if found is None:
        return []
    prefix, layers = found
    return [(f"{prefix}.{i}" if prefix else str(i), layer) for i, layer in enumerate(layers)]


def norm_fed_groups(model: nn.Module) -> list[NormGroup]:
    """Every RMSNorm of the model's decoder layers whose output feeds only known Linears, with those Linears (q/k/v
    of the attention, gate/up of a gated MLP), in layer order. Empty for a model whose layers are laid out otherwise."""
    groups = []
    for base, layer in _named_layers(model):
        if any(hasattr(layer, a) for a in _OTHER_LAYOUTS):
            continue
        for norm_attr, block_attr, children in _FEEDS:
            block = getattr(layer, block_attr, None)
            linears = [getattr(block, c, None) for c in children]
            if not all(type(lin) is nn.Linear for lin in linears):
                continue
            features = linears[0].in_features
            if any(lin.in_features != features for lin in linears):
                continue
            if _plain_rms_norm(getattr(layer, norm_attr, None), features):
                groups.append(NormGroup(f"{base}.{norm_attr}", tuple(f"{base}.{block_attr}.{c}" for c in children)))
    return groups


def row_groups(model: nn.Module) -> list[RowGroup]:
    """Every ``v_proj`` -> ``o_proj`` and ``up_proj`` -> ``down_proj`` pair of the model's decoder layers whose fold
    is exact (see the module's description), in layer order."""
    groups = []
    for base, layer in _named_layers(model):
        attn = getattr(layer, "self_attn", None)
        v, o = getattr(attn, "v_proj", None), getattr(attn, "o_proj", None)
        head_dim = getattr(attn, "head_dim", None)
        if (type(v) is nn.Linear and type(o) is nn.Linear and isinstance(head_dim, int) and head_dim > 0
                and v.out_features % head_dim == 0 and o.in_features % v.out_features == 0):
            groups.append(RowGroup(f"{base}.self_attn.v_proj", f"{base}.self_attn.o_proj", head_dim,
                                   o.in_features // v.out_features))
        mlp = getattr(layer, "mlp", None)
        gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
        if (all(type(m) is nn.Linear for m in (gate, up, down)) and up.out_features == down.in_features
                and gate.out_features == up.out_features):
            groups.append(RowGroup(f"{base}.mlp.up_proj", f"{base}.mlp.down_proj"))
    return groups


def calibrate_input_amax(model: nn.Module, calibration: torch.Tensor | Sequence[torch.Tensor],
                         names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The absolute maximum of each input feature of the named Linears over ``model(t)`` for each calibration
    tensor ``t`` (token ids for a transformers model), float32 ``[in_features]`` each. Runs under ``torch.no_grad``."""
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    if not batches or not all(isinstance(t, torch.Tensor) for t in batches):
        raise InvalidArgumentError("calibration: expected a tensor of model inputs (token ids) or a non-empty "
                                   f"sequence of them, got {type(calibration).__name__}")
    modules = dict(model.named_modules())
    amax: dict[str, torch.Tensor] = {}
    hooks = []

    def record(name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, module.in_features).abs().amax(0).float()
            amax[name] = torch.maximum(amax[name], x) if name in amax else x
        return hook

    for name in names:
        hooks.append(modules[name].register_forward_pre_hook(record(name)))
    try:
        with torch.no_grad():
            for t in batches:
                model(t)
    finally:
        for h in hooks:
            h.remove()
    return amax


def smooth_factors(activation_amax: torch.Tensor, weights: Sequence[torch.Tensor],
                   alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """``s = amax(x)^alpha / amax(W)^(1 - alpha)`` per input feature (float32), the weight maximum over every
    ``[out, in]`` weight given; both maxima clamped below at 1e-5, as is ``s``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise InvalidArgumentError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    w = torch.stack([wt.detach().abs().amax(0).float() for wt in weights]).amax(0)
    a = activation_amax.float().to(w.device)
    return (a.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1.0 - alpha)).clamp_min(1e-5)


@torch.no_grad()
def fold_smoothing(model: nn.Module, group: NormGroup, factors: torch.Tensor) -> None:
    """``norm.weight /= s`` and every fed Linear's ``weight[:, j] *= s_j``, in float32 (or the weight's wider
    dtype), rounded once to their dtype, in place (the same parameter objects)."""
    modules = dict(model.named_modules())
    norm = modules[group.norm]
    if not bool(torch.isfinite(factors).all()) or not bool((factors > 0).all()):
        raise InvalidArgumentError(f"{group.norm}: smoothing factors must be finite and positive")
    for t, apply in [(norm.weight, torch.div)] + [(modules[n].weight, torch.mul) for n in group.linears]:
        compute = torch.promote_types(t.dtype, torch.float32)  # float32, or the weight's own wider dtype
        t.copy_(apply(t.to(compute), factors.to(t.device, compute)).to(t.dtype))


def row_factors(group: RowGroup, activation_amax: torch.Tensor, consumer_weight: torch.Tensor,
                alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """The producer's per-row factors of a :class:`RowGroup`: :func:`smooth_factors` of the consumer's input
    channels, each statistic first reduced (max) over the query heads that read one key/value head's channel."""
    a, w = activation_amax.float(), consumer_weight.detach().abs().amax(0).float().to(activation_amax.device)
    if group.repeat > 1:  # consumer channel h * D + d reads producer row (h // repeat) * D + d
        shape = (-1, group.repeat, group.head_dim)
        a, w = a.reshape(shape).amax(1).reshape(-1), w.reshape(shape).amax(1).reshape(-1)
    return smooth_factors(a, [w[None, :]], alpha)


@torch.no_grad()
def fold_row_smoothing(model: nn.Module, group: RowGroup, factors: torch.Tensor) -> None:
    """The producer's output rows (and bias) divided by ``factors``, the consumer's matching input columns
    multiplied, in float32 (or wider), rounded once, in place."""
    if not bool(torch.isfinite(factors).all()) or not bool((factors > 0).all()):
        raise InvalidArgumentError(f"{group.producer}: smoothing factors must be finite and positive")
    modules = dict(model.named_modules())
    producer, consumer = modules[group.producer], modules[group.consumer]
    columns = factors
    if group.repeat > 1:  # every query head of a key/value head's group reads its rows
        columns = factors.reshape(-1, 1, group.head_dim).expand(-1, group.repeat, -1).reshape(-1)
    for t, apply, f in ((producer.weight, torch.div, factors[:, None]), (producer.bias, torch.div, factors),
                        (consumer.weight, torch.mul, columns[None, :])):
        if t is None:
            continue
        compute = torch.promote_types(t.dtype, torch.float32)
        t.copy_(apply(t.to(compute), f.to(t.device, compute)).to(t.dtype))


def smooth_norm_fed_linears(model: nn.Module, calibration: torch.Tensor | Sequence[torch.Tensor], *,
                            alpha: float = DEFAULT_ALPHA, linears: Iterable[str] | None = None,
                            rows: bool = False) -> list[str]:
    """Calibrate and fold SmoothQuant factors into every foldable norm group of ``model`` (:func:`norm_fed_groups`),
    in place, before its Linears are quantized; returns the smoothed Linears' names.

    Args:
        model: a high-precision model (its Linears still ``nn.Linear``).
        calibration: inputs ``model`` is called on to measure activations (token ids of representative text for a
            transformers model: a few hundred tokens measured enough on a 135M model).
        alpha: the migration strength (0: none; 0.5, SmoothQuant's default, measured best of those tried).
        linears: only groups with at least one of these Linears (the ones about to be converted); default all.
        rows: also fold into producers' output rows (:func:`row_groups`: ``o_proj`` through ``v_proj``,
            ``down_proj`` through ``up_proj``).
    """
    groups: list[NormGroup | RowGroup] = [*norm_fed_groups(model), *(row_groups(model) if rows else [])]
    if linears is not None:
        wanted = set(linears)
        groups = [g for g in groups if wanted.intersection(g.linears)]
    if not groups:
        return []
    # one calibration run before any fold (each fold is exact, so the statistics stay valid); one input per group:
    # its first Linear's (a norm group's Linears read the same tensor)
    amax = calibrate_input_amax(model, calibration, [g.linears[0] for g in groups])
    modules = dict(model.named_modules())
    done = []
    for g in groups:
        if g.linears[0] not in amax:  # the calibration run never reached this layer
            raise InvalidArgumentError(f"calibration: the model's forward never called {g.linears[0]}")
        if isinstance(g, RowGroup):
            fold_row_smoothing(model, g, row_factors(g, amax[g.consumer], modules[g.consumer].weight, alpha))
        else:
            fold_smoothing(model, g, smooth_factors(amax[g.linears[0]], [modules[n].weight for n in g.linears],
                                                    alpha))
        done += g.linears
    return done


__all__ = ["DEFAULT_ALPHA", "NormGroup", "RowGroup", "calibrate_input_amax", "fold_row_smoothing", "fold_smoothing",
           "norm_fed_groups", "row_factors", "row_groups", "smooth_factors", "smooth_norm_fed_linears"]
