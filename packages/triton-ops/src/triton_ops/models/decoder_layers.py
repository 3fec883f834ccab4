"""Forward-only layers for a decoder layer and its attention, swapped in by :func:`triton_ops.patch_model`.

Like :mod:`triton_ops.layers` they hold no state: they read the attributes transformers documents on the module they
replace (``self_attn``, ``mlp``, ``input_layernorm``, ``post_attention_layernorm``; ``q_proj`` ... ``o_proj``,
``q_norm``, ``k_norm``, ``head_dim``, ``scaling``, ``layer_idx``, ``config``), plus the packed q/k/v projection
``patch_model`` may attach (:mod:`triton_ops.models.layers`). What differs between transformers releases (the cache
argument's name, ``Cache.update``'s signature, how the attention function is looked up) is found once, from the
objects at hand, not from version numbers.

The attentions: :class:`RopeAttention` (Llama, Mistral, Qwen2: packed QKV GEMM, then RoPE in place on its q/k views
in one launch) and :class:`QKNormRopeAttention` (Qwen3: packed QKV GEMM, then QK-norm + RoPE in place in one
launch); with a static cache, those launches are the cache write's (one launch rotates and writes); then, for both, the
cache update, the attention function ``config._attn_implementation`` names (through
transformers' ``ALL_ATTENTION_FUNCTIONS``, so any registered backend plugs in by name) and ``o_proj``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from fp8_gemm import FP8Linear, decode_linear, fp8_linear_add_
from fp8_gemm.weight_only import use_weight_only
from fused_rmsnorm_rope import apply_rope, fused_add_rmsnorm, fused_qk_norm_rope, rmsnorm_add, rmsnorm_add_rmsnorm
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError

from ..layers import (
    EpsRMSNorm,
    GatedMLP,
    GemmaRMSNorm,
    GptOssMoE,
    NormedFP8,
    PackedGatedMLP,
    RMSNorm,
    SparseMoE,
    gated_hidden,
    has_shared_expert,
    instance_forward,
    jittered,
    mlp_input_scaling,
    moe_hidden,
    moe_router,
    packed_gated_hidden,
    router_hooked,
    runs_forward,
    w8a8_gated_down,
)
from . import layers as model_layers
from .cache_updates import fusable_tables, ring_attention_args, ring_suits, update_cache, write_rotated
from .layers import (
    LOCAL_SHARDS_ATTR,
    NORM_PROLOGUE_MAX_ROWS,
    PACKING_ATTR,
    decode_gemv_rule,
    linear,
    linear_add_,
    norm_module_fusable,
    packed_projections,
)

# The keyword arguments naming the KV cache: transformers 5.2x renamed ``past_key_values`` to ``cache``.
_CACHE_NAMES = ("cache", "past_key_values")


class FusedAddNormDecoderLayer(nn.Module):
    """A pre-norm decoder layer whose second residual add runs inside the post-attention RMSNorm.

    ``h = x + attn(norm1(x)); y = h + mlp(norm2(h))``, with ``x + attn`` and ``norm2`` as one
    :func:`~fused_rmsnorm_rope.fused_add_rmsnorm` launch (the sum is rounded to the activation dtype, as the model's
    own add rounds it, and normalized). For Llama, Mistral, Qwen2, Qwen3, Gemma decoder layers (attributes
    ``self_attn``, ``mlp``, ``input_layernorm``, ``post_attention_layernorm``; the latter a plain RMSNorm with
    ``weight`` and ``variance_epsilon``, or Gemma's, which scales by ``1 + weight``: ``gemma=True``). Every keyword
    argument goes to ``self_attn`` unchanged, as the model's own layer does.

    A decode step's norms can cost no launch of their own: ``norm1`` runs inside the packed q/k/v GEMM's launch
    where that is the weight-only decode kernel (``INPUT_NORM_IN_QKV``, on for one row:
    :func:`_input_norm_in_projection`, a bf16 row on a GPU or FP8 weights); opt-in (off by default: measured
    slower), where ``x + o_proj(...)`` is one launch too, ``norm2`` runs inside the gated MLP's launch
    (``POST_NORM_IN_MLP``) or is written by the output projection's launch (``POST_NORM_IN_O_PROJ``), and the MLP's
    residual add runs inside the down projection's (:func:`_post_norm_in_mlp`; the residual sum rounded once instead
    of twice). Inference only (grad mode off).
    """

    can_torch_compile = True
    has_backward = True

    self_attn: nn.Module
    mlp: nn.Module
    input_layernorm: nn.Module
    post_attention_layernorm: nn.Module

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        _layer_keywords_only(self, args)
        attn, norm = self.self_attn, self.input_layernorm
        if _input_norm_in_projection(attn, norm, hidden_states):  # the norm inside the q/k/v GEMM's launch
            attn_kwargs, attn_in = dict(kwargs, input_norm=norm), hidden_states
        else:
            attn_kwargs, attn_in = kwargs, norm(hidden_states)
        if _post_norm_in_o_proj(self, hidden_states):
            # h = x + o_proj(attn) and the post-attention norm of h in the output projection's launch, the MLP's
            # residual add in the down projection's: no launch of the norm's own, nothing normalized in the MLP
            normed = torch.empty_like(hidden_states)
            h = attn(hidden_states=attn_in, residual=NormAfterResidual(hidden_states, self.post_attention_layernorm,
                                                                       normed), **attn_kwargs)[0]
            return _mlp_with_residual(self.mlp, normed, h)
        how = _post_norm_in_mlp(self, hidden_states)
        if how:
            # h = x + o_proj(attn) in the output projection's launch, the post-attention norm in the gated MLP's,
            # the residual add in the down projection's: no launch of the norm's own
            h = attn(hidden_states=attn_in, residual=hidden_states, **attn_kwargs)[0]
            if how == "moe":  # a mixture of experts: the norm in the router's and gate/up's launches, the add in
                # the combine's
                return moe_hidden(self.mlp, h, residual=h, norm=self.post_attention_layernorm)
            return _down_add_(self.mlp, h, h, how, self.post_attention_layernorm)
        attn_out = attn(hidden_states=attn_in, **attn_kwargs)[0]
        norm = self.post_attention_layernorm
        if attn_out.dtype == hidden_states.dtype:
            out = _quantized_norm_mlp(self.mlp, norm, attn_out, hidden_states)
            if out is not None:
                return out
        # patch_model's RMSNorm, no hooks or forward of someone else's; one dtype (autocast may hand the attention's
        # output in another than the residual stream's: then the model's own promoting add)
        if norm_module_fusable(norm) and attn_out.dtype == hidden_states.dtype:
            normed, residual = fused_add_rmsnorm(attn_out, hidden_states, norm.weight, norm.variance_epsilon)
        elif gemma_norm_fusable(norm) and attn_out.dtype == hidden_states.dtype:  # Gemma's (1 + weight) norms
            normed, residual = fused_add_rmsnorm(attn_out, hidden_states, norm.weight, norm.eps, gemma=True)
        else:
            residual = hidden_states + attn_out
            normed = norm(residual)
        return _mlp_with_residual(self.mlp, normed, residual)


def _quantized_norm_mlp(mlp: nn.Module, norm: nn.Module, attn_out: torch.Tensor,
                        hidden_states: torch.Tensor) -> torch.Tensor | None:
    """``h + mlp(norm(h))`` with ``h = hidden_states + attn_out``, where the MLP's gate/up are W8A8 GEMMs over one
    quantization of their input (a prefill's FP8 gated MLP: :func:`~triton_ops.layers.mlp_input_scaling`) and its
    down projection adds the residual (:func:`_down_adds_residual`): the residual add and the post-attention norm in
    one launch that writes the norm's output quantized as gate/up take it (``fused_add_rmsnorm(...,
    fp8_out=scaling)``: the bits quantizing its 16-bit output would give), so that output is never written in 16
    bits nor read back by a quantization launch. None where that does not apply."""
    if norm_module_fusable(norm):
        eps, gemma = norm.variance_epsilon, False
    elif gemma_norm_fusable(norm):
        eps, gemma = norm.eps, True
    else:
        return None
    scaling = mlp_input_scaling(mlp, hidden_states)  # "" unless grad mode is off, and more
    if not scaling or mlp.__dict__.get(LOCAL_SHARDS_ATTR) is not None:
        return None
    how = _down_adds_residual(mlp, hidden_states)  # (the new residual is a fresh contiguous tensor of its kind)
    if not how:
        return None
    q, scale, residual = fused_add_rmsnorm(attn_out, hidden_states, norm.weight, eps, gemma=gemma, fp8_out=scaling)
    return _down_add_(mlp, NormedFP8(q, scale, hidden_states.dtype), residual, how)


def _mlp_with_residual(mlp: nn.Module, normed: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + mlp(normed)``, the add inside the down projection's GEMM (a patched gated MLP) or the combine's
    launch (a patched mixture of experts) where those can take it."""
    how = _down_adds_residual(mlp, residual, normed)
    if how:
        return _mlp_into_residual(mlp, normed, residual, how)
    if _moe_adds_residual(mlp, residual):  # a mixture of experts: the add inside its combine launch
        return moe_hidden(mlp, normed, residual)
    mlp_out = mlp(normed)
    if isinstance(mlp_out, tuple):  # a mixture of experts returns (output, router scores), as gpt-oss's
        mlp_out = mlp_out[0]
    return residual + mlp_out


class TokenMixer(NamedTuple):
    """How a hybrid decoder layer calls its token mixer, found once from the module (:func:`hybrid_token_mixer`):
    ``linear``: a Gated DeltaNet (``linear_attn``), else the full attention (``self_attn``); for the DeltaNet, the
    name of its cache argument (``cache``; ``cache_params`` up to transformers 5.1x) and the keywords it takes
    (None: any, it has ``**kwargs``; transformers 5.0's takes only its named ones)."""

    linear: bool
    cache_keyword: str | None = None
    keywords: frozenset[str] | None = None


# What a hybrid layer's full attention takes and its Gated DeltaNet does not (transformers passes the DeltaNet the
# cache, the mask and the layer's other keywords)
_FULL_ATTENTION_ONLY = ("position_embeddings", "position_ids")
TOKEN_MIXER_ATTR = "_triton_ops_token_mixer"


class HybridDecoderLayer(nn.Module):
    """Qwen3-Next's and Qwen3.5's decoder layer (:data:`HYBRID_DECODER_LAYERS`): a pre-norm layer whose token mixer
    is a Gated DeltaNet (``linear_attn``) on "linear_attention" layers and a gated full attention (``self_attn``)
    on the others, both transformers' own.

    ``h = x + mixer(norm1(x)); y = h + mlp(norm2(h))`` with ``x + mixer`` and ``norm2`` (zero-centered, as
    :class:`~triton_ops.layers.GemmaRMSNorm` computes it) as one :func:`~fused_rmsnorm_rope.fused_add_rmsnorm`
    launch, and ``h + mlp`` inside the down projection's GEMM (a patched dense MLP) or the combine's launch (a
    patched sparse block, its shared expert's gated output added to ``h`` first): the model's own rounding of each
    sum. The mixer gets what transformers' layer passes it (:class:`TokenMixer`, found at patch time: the cache
    argument's name and the keywords differ between releases).
    """

    can_torch_compile = True
    has_backward = True

    input_layernorm: nn.Module
    post_attention_layernorm: nn.Module
    mlp: nn.Module

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        _layer_keywords_only(self, args)
        mixer: TokenMixer = self.__dict__[TOKEN_MIXER_ATTR]
        normed = self.input_layernorm(hidden_states)
        if mixer.linear:
            mixed = self.linear_attn(hidden_states=normed, **_linear_attention_kwargs(mixer, kwargs))
        else:
            mixed = self.self_attn(hidden_states=normed, **kwargs)[0]
        norm = self.post_attention_layernorm
        if gemma_norm_fusable(norm) and mixed.dtype == hidden_states.dtype:
            normed, residual = fused_add_rmsnorm(mixed, hidden_states, norm.weight, norm.eps, gemma=True)
        else:
            residual = hidden_states + mixed
            normed = norm(residual)
        return _mlp_with_residual(self.mlp, normed, residual)


def _linear_attention_kwargs(mixer: TokenMixer, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The layer's keywords as transformers' hybrid layer hands them to its Gated DeltaNet: the cache under the
    DeltaNet's own name for it, without the rotary embedding and position ids, only the keywords it takes."""
    out: dict[str, Any] = {mixer.cache_keyword: None}
    for key, value in kwargs.items():
        if key in _CACHE_NAMES:
            out[mixer.cache_keyword] = value
        elif key not in _FULL_ATTENTION_ONLY and (mixer.keywords is None or key in mixer.keywords):
            out[key] = value
    return out


def hybrid_token_mixer(layer: nn.Module) -> TokenMixer | None:
    """How :class:`HybridDecoderLayer` calls ``layer``'s token mixer, or None where ``layer`` is not a hybrid
    decoder layer it computes: :data:`HYBRID_DECODER_LAYERS`'s forward, its two norms and MLP, exactly one of
    ``linear_attn`` / ``self_attn``, and a DeltaNet whose forward names its cache argument as some release does."""
    if not (forward_defined_by(layer, HYBRID_DECODER_LAYERS)
            and all(hasattr(layer, a) for a in ("input_layernorm", "post_attention_layernorm", "mlp"))
            and hasattr(layer, "linear_attn") != hasattr(layer, "self_attn")):
        return None
    if hasattr(layer, "self_attn"):
        return TokenMixer(linear=False)
    params = inspect.signature(type(layer.linear_attn).forward).parameters
    cache = next((name for name in ("cache", "cache_params") if name in params), None)
    if cache is None or "hidden_states" not in params:
        return None
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return TokenMixer(True, cache, None if takes_any else frozenset(params) - {"self", "hidden_states", cache})


class ResidualDropoutDecoderLayer(FusedAddNormDecoderLayer):
    """Phi-3's decoder layer (``Phi3DecoderLayer``): Llama's pre-norm layer with a dropout on each sublayer's output
    before its residual add (``resid_attn_dropout``, ``resid_mlp_dropout``). The dropouts are the identity in eval
    mode (or with probability 0): then :class:`FusedAddNormDecoderLayer`'s forward. In training with a nonzero
    probability, or with hooks on a dropout, the layer computes as transformers' does, each norm one launch."""

    resid_attn_dropout: nn.Module
    resid_mlp_dropout: nn.Module

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        _layer_keywords_only(self, args)
        attn_drop, mlp_drop = self.resid_attn_dropout, self.resid_mlp_dropout
        if not (self.training and (attn_drop.p or mlp_drop.p)) and not (_hooked(attn_drop) or _hooked(mlp_drop)):
            return FusedAddNormDecoderLayer.forward(self, hidden_states, **kwargs)
        attn_out = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)[0]
        residual = hidden_states + self.resid_attn_dropout(attn_out)
        return residual + self.resid_mlp_dropout(self.mlp(self.post_attention_layernorm(residual)))


class SandwichNormDecoderLayer(nn.Module):
    """Gemma 3's decoder layer, whose sublayers' outputs are normalized too (``Gemma3DecoderLayer``)::

        h = x + post_attention_layernorm(self_attn(input_layernorm(x)))
        y = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

    with ``post_attention_layernorm``, ``x + ...`` and ``pre_feedforward_layernorm`` as one
    :func:`~fused_rmsnorm_rope.rmsnorm_add_rmsnorm` launch, and ``post_feedforward_layernorm`` with ``h + ...`` as
    one :func:`~fused_rmsnorm_rope.rmsnorm_add` launch (``gemma=True``; each norm's output and each sum rounded to
    the activation dtype, as the model's own ops round them: the same values bit for bit), where those norms are
    patch_model's :class:`~triton_ops.layers.GemmaRMSNorm` without hooks: three launches for the layer's four norms
    and two adds. Otherwise the add and the pre-feed-forward norm alone as one
    :func:`~fused_rmsnorm_rope.fused_add_rmsnorm`, or the modules' own calls. Every keyword argument goes to
    ``self_attn`` unchanged, as the model's own layer does.
    """

    can_torch_compile = True
    has_backward = True

    self_attn: nn.Module
    mlp: nn.Module
    input_layernorm: nn.Module
    post_attention_layernorm: nn.Module
    pre_feedforward_layernorm: nn.Module
    post_feedforward_layernorm: nn.Module

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        _layer_keywords_only(self, args)
        attn_out = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)[0]
        post, norm = self.post_attention_layernorm, self.pre_feedforward_layernorm
        same_dtype = attn_out.dtype == hidden_states.dtype  # autocast may differ: the model's own promoting add
        if same_dtype and gemma_norm_fusable(post) and gemma_norm_fusable(norm):
            normed, residual = rmsnorm_add_rmsnorm(attn_out, hidden_states, post.weight, norm.weight, norm.eps,
                                                   x_eps=post.eps, gemma=True)
        else:
            attn_out = post(attn_out)
            if gemma_norm_fusable(norm) and attn_out.dtype == hidden_states.dtype:
                normed, residual = fused_add_rmsnorm(attn_out, hidden_states, norm.weight, norm.eps, gemma=True)
            else:
                residual = hidden_states + attn_out
                normed = norm(residual)
        mlp_out, post_ff = self.mlp(normed), self.post_feedforward_layernorm
        if mlp_out.dtype == residual.dtype and gemma_norm_fusable(post_ff):
            return rmsnorm_add(mlp_out, residual, post_ff.weight, post_ff.eps, gemma=True)
        return residual + post_ff(mlp_out)


class PostNormDecoderLayer(nn.Module):
    """OLMo 2's and OLMo 3's decoder layer (:data:`POST_NORM_DECODER_LAYERS`), whose norms follow the sublayers::

        h = x + post_attention_layernorm(self_attn(x))
        y = h + post_feedforward_layernorm(mlp(h))

    each norm with the add after it as one :func:`~fused_rmsnorm_rope.rmsnorm_add` launch where the norm is
    patch_model's :class:`~triton_ops.layers.RMSNorm` without hooks (the norm's output and the sum rounded as the
    model's own ops round them), else the modules' own calls. Every keyword argument goes to ``self_attn``
    unchanged, as the model's own layer does.
    """

    can_torch_compile = True
    has_backward = True

    self_attn: nn.Module
    mlp: nn.Module
    post_attention_layernorm: nn.Module
    post_feedforward_layernorm: nn.Module

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        _layer_keywords_only(self, args)
        attn_out = self.self_attn(hidden_states=hidden_states, **kwargs)[0]
        h = _norm_add(attn_out, hidden_states, self.post_attention_layernorm)
        return _norm_add(self.mlp(h), h, self.post_feedforward_layernorm)


class Gemma4DecoderLayer(SandwichNormDecoderLayer):
    """Gemma 4's decoder layer (``Gemma4TextDecoderLayer``): Gemma 3's norms around each sublayer (plain RMSNorms,
    scaled by ``weight``), on some models a mixture of experts beside the MLP (``enable_moe_block``: its router reads
    the residual stream, its experts their own pre-norm, each output its own post-norm, then the shared post-norm),
    on some a per-layer input (``hidden_size_per_layer_input``: a gated projection added with its own norm), and a
    final ``layer_scalar``::

        h = x + post_attention_layernorm(self_attn(input_layernorm(x)))
        m = post_feedforward_layernorm_1(mlp(n)) + post_feedforward_layernorm_2(experts(pre_feedforward_layernorm_2(h)))
        y = h + post_feedforward_layernorm(m)        (m = mlp(n) without the experts; n = pre_feedforward_layernorm(h))
        y = y + post_per_layer_input_norm(per_layer_projection(act(per_layer_input_gate(y)) * per_layer_input))
        y = y * layer_scalar

    Where the norms are patch_model's (:class:`~triton_ops.layers.RMSNorm` / :class:`~triton_ops.layers.EpsRMSNorm`)
    without hooks, each "norm, then add" is one :func:`~fused_rmsnorm_rope.rmsnorm_add` launch and the first add
    with the two norms around it one :func:`~fused_rmsnorm_rope.rmsnorm_add_rmsnorm`: four launches fewer a layer
    (five with the experts), each norm's output and each sum rounded as the model's own ops round them. The
    attention, MLP, router, experts and projections are the modules' own calls, with what transformers' layer
    passes them. (A :class:`SandwichNormDecoderLayer` for its attributes; the forward is its own.)
    """

    def forward(self, hidden_states: torch.Tensor, per_layer_input: torch.Tensor | None = None, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        _layer_keywords_only(self, args)
        attn_out = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)[0]
        normed, residual = _norm_add_norm(attn_out, hidden_states, self.post_attention_layernorm,
                                          self.pre_feedforward_layernorm)
        mlp_out = self.mlp(normed)
        if self.enable_moe_block:
            mlp_out = self.post_feedforward_layernorm_1(mlp_out)
            flat = residual.reshape(-1, residual.shape[-1])
            _, top_k_weights, top_k_index = self.router(flat)
            experts_out = self.experts(self.pre_feedforward_layernorm_2(flat), top_k_index, top_k_weights)
            mlp_out = _norm_add(experts_out.reshape(residual.shape), mlp_out, self.post_feedforward_layernorm_2)
        hidden_states = _norm_add(mlp_out, residual, self.post_feedforward_layernorm)
        if self.hidden_size_per_layer_input:
            gated = self.act_fn(self.per_layer_input_gate(hidden_states)) * per_layer_input
            hidden_states = _norm_add(self.per_layer_projection(gated), hidden_states, self.post_per_layer_input_norm)
        hidden_states *= self.layer_scalar
        return hidden_states


def _plain_norm(norm: nn.Module) -> tuple[torch.Tensor, float] | None:
    """``(weight, eps)`` of a norm that computes exactly ``fused_rmsnorm_rope.rmsnorm(x, weight, eps)``
    (patch_model's :class:`~triton_ops.layers.RMSNorm` or :class:`~triton_ops.layers.EpsRMSNorm` forward, no
    hooks, a contiguous 1-D plain weight), else None."""
    if runs_forward(norm, RMSNorm):
        eps = norm.variance_epsilon
    elif runs_forward(norm, EpsRMSNorm):
        eps = norm.eps
    else:
        return None
    weight = norm.weight
    if (norm._forward_hooks or norm._forward_pre_hooks or type(weight) not in _PLAIN or weight.dim() != 1
            or weight.stride(0) != 1 or not isinstance(eps, (int, float))):
        return None
    return weight, eps


def _norm_add(x: torch.Tensor, residual: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``residual + norm(x)``: one :func:`~fused_rmsnorm_rope.rmsnorm_add` launch where :func:`_plain_norm` allows."""
    plain = _plain_norm(norm)
    if plain is None or x.dtype != residual.dtype:  # (autocast: the model's own promoting add)
        return residual + norm(x)
    return rmsnorm_add(x, residual, plain[0], plain[1])


def _norm_add_norm(x: torch.Tensor, residual: torch.Tensor, x_norm: nn.Module,
                   norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + x_norm(x)``, ``(norm(h), h)``: one :func:`~fused_rmsnorm_rope.rmsnorm_add_rmsnorm` launch
    where :func:`_plain_norm` allows both norms, else what it allows."""
    plain_x, plain = _plain_norm(x_norm), _plain_norm(norm)
    if plain_x is not None and plain is not None and x.dtype == residual.dtype:
        return rmsnorm_add_rmsnorm(x, residual, plain_x[0], plain[0], plain[1], x_eps=plain_x[1])
    h = _norm_add(x, residual, x_norm)
    return norm(h), h


def gemma_norm_fusable(norm: nn.Module) -> bool:
    """Whether ``norm`` computes exactly ``fused_rmsnorm_rope.rmsnorm(x, norm.weight, norm.eps, gemma=True)``:
    ``patch_model``'s :class:`~triton_ops.layers.GemmaRMSNorm` forward, no hooks, a contiguous 1-D plain weight."""
    weight = getattr(norm, "weight", None)
    return (runs_forward(norm, GemmaRMSNorm) and not (norm._forward_hooks or norm._forward_pre_hooks)
            and type(weight) in _PLAIN and weight.dim() == 1 and weight.stride(0) == 1
            and isinstance(norm.eps, (int, float)))


def _layer_keywords_only(layer: nn.Module, args: tuple) -> None:
    """transformers passes a decoder layer everything after its input by keyword, to go on to the attention."""
    if args:
        raise InvalidArgumentError(
            f"{type(layer).__name__}: expected the attention's arguments by keyword (as transformers passes them), "
            f"got {len(args)} positional")


def _mlp_into_residual(mlp: nn.Module, normed: torch.Tensor, residual: torch.Tensor, how: str) -> torch.Tensor:
    """``y = h + down(gated(x))`` as one GEMM that adds into the residual ``h`` (``how``: :func:`_down_adds_residual`'s
    answer): no add launch, and the product is rounded once with the sum instead of before it.

    Tensor parallelism (a GatedMLPParallel MLP): on the local shards, rank 0 adds the residual into its partial
    product, the other ranks compute theirs, and one all-reduce sums them.
    """
    shards = mlp.__dict__.get(LOCAL_SHARDS_ATTR)
    if shards is None:
        return _down_add_(mlp, normed, residual, how)
    frame = shards.swap()
    try:
        if shards.rank == 0:
            out = _down_add_(mlp, normed, residual, how)
        else:  # the same tail as rank 0's (the fused W8A8 one where it applies), without the add
            out = w8a8_gated_down(mlp, normed, packed=runs_forward(mlp, PackedGatedMLP)) if how == "fp8" else None
            if out is None:
                out = mlp.down_proj(gated_hidden(mlp, normed))
    finally:  # the module's DTensors back in place, whatever happened
        shards.restore(frame)
    return shards.all_reduce(out)


def _down_add_(mlp: nn.Module, normed: torch.Tensor, residual: torch.Tensor, how: str,
               norm: nn.Module | None = None) -> torch.Tensor:
    """``residual += down_proj(gated_hidden(normed))`` in place, in the down projection's GEMM (for ``"bf16"``
    :func:`~triton_ops.models.layers.linear_add_`: ``decode_linear``'s kernel at one row, else cuBLAS's beta = 1;
    the FP8 kernel's epilogue for ``"fp8"``); returns the residual. ``norm``: ``normed`` is not normalized yet
    (the gated MLP's launch does it, :func:`~triton_ops.layers.gated_hidden`). FP8 gate/up and down at W8A8 rows
    (prefill): the down GEMM over the product quantized as it is formed
    (:func:`~triton_ops.layers.w8a8_gated_down`), then the add."""
    packed = runs_forward(mlp, PackedGatedMLP)
    if how == "fp8":
        out = w8a8_gated_down(mlp, normed, norm, packed)
        if out is not None:  # (fp8_linear_add_ adds after its GEMM on the W8A8 path too)
            return residual.add_(out)
    if packed:
        hidden = packed_gated_hidden(mlp, normed, norm)
    else:
        hidden = gated_hidden(mlp, normed, norm)
    down = mlp.down_proj
    if how == "fp8":
        return fp8_linear_add_(residual, hidden, down.weight, down.weight_scale, down.activation_granularity,
                               down.fast_accum, down.path)
    return linear_add_(residual, hidden, down.weight)


def _down_adds_residual(mlp: nn.Module, residual: torch.Tensor, normed: torch.Tensor | None = None) -> str:
    """How the layer's residual add can run inside the down projection's GEMM, or ``""``: a patched gated MLP
    (:class:`~triton_ops.layers.GatedMLP`'s forward) whose ``down_proj`` is a plain bias-free ``nn.Linear`` of the
    residual's dtype (``"bf16"``: ``addmm_``) or a bias-free :class:`~fp8_gemm.FP8Linear` (``"fp8"``:
    :func:`~fp8_gemm.fp8_linear_add_`), without hooks or sharded (DTensor) weights, nothing to differentiate (the
    add is in place on the layer's own residual tensor), and a contiguous residual. Sharded by
    :class:`~triton_ops.parallel.GatedMLPParallel` (its hooks alone, a plain ``normed`` input): the same, on the
    local shards, the residual added on rank 0 before the all-reduce (the layer's forward)."""
    if not (runs_forward(mlp, GatedMLP) or runs_forward(mlp, PackedGatedMLP)):
        return ""
    down = getattr(mlp, "down_proj", None)
    # isinstance, not type(down) is ...: under torch.compile, comparing the type of down_proj with the type of
    # o_proj already checked (the same class) installs a Python guard per layer; patch_model's "Linear" mark says
    # it is exactly an nn.Linear (a subclass may compute something else)
    if isinstance(down, FP8Linear) and not instance_forward(down):
        weight, how = down.weight, "fp8"
    elif isinstance(down, nn.Linear) and runs_forward(down, "Linear"):
        weight, how = down.weight, "bf16"
        if weight.dtype != residual.dtype:
            return ""
    else:
        return ""
    if down.bias is not None or down._forward_hooks or down._forward_pre_hooks:
        return ""
    shards = mlp.__dict__.get(LOCAL_SHARDS_ATTR)
    if shards is not None:  # tensor parallelism: only the hooks of a style whose tail the layer can run itself
        if not shards.adds_residual(mlp) or type(normed) is not torch.Tensor:
            return ""
    elif mlp._forward_hooks or mlp._forward_pre_hooks or any(
            type(t) not in _PLAIN for t in (weight, getattr(down, "weight_scale", None)) if t is not None):
        return ""  # hooks of someone else's, or sharded (DTensor) tensors without our style's local shards
    if type(residual) is not torch.Tensor or not residual.is_contiguous():
        return ""
    if torch.is_grad_enabled() and (residual.requires_grad or weight.requires_grad):
        return ""
    if how == "fp8" and torch.is_grad_enabled() and (
            any(p.requires_grad for p in mlp.parameters()) or getattr(normed, "requires_grad", False)):
        return ""  # the FP8 add is inference-only: a gradient to the gated MLP's input takes the module's path
    return how


_PLAIN = (torch.Tensor, nn.Parameter)


def _moe_adds_residual(mlp: nn.Module, residual: torch.Tensor) -> bool:
    """Whether ``residual + mlp(normed)`` can be the fused MoE's own output (:func:`~triton_ops.layers.moe_hidden`
    with ``residual``: the add in its combine launch): a patched mixture of experts (gpt-oss's
    :class:`~triton_ops.layers.GptOssMoE` or Qwen3-MoE's / Mixtral's :class:`~triton_ops.layers.SparseMoE`) without
    hooks, on itself or its router, or sharded (DTensor) experts, a plain contiguous residual of the router's dtype,
    nothing to differentiate (the MoE has no backward either), and the switch on (``RESIDUAL_IN_MOE_COMBINE``)."""
    if not RESIDUAL_IN_MOE_COMBINE or not (runs_forward(mlp, GptOssMoE) or runs_forward(mlp, SparseMoE)) \
            or mlp._forward_hooks or mlp._forward_pre_hooks or mlp.__dict__.get(LOCAL_SHARDS_ATTR) is not None:
        return False
    experts, router = mlp.experts, moe_router(mlp)
    if router_hooked(router) or jittered(mlp):
        return False
    if any(type(t) not in _PLAIN for t in (experts.gate_up_proj, experts.down_proj, router.weight)):
        return False
    return (type(residual) is torch.Tensor and residual.is_contiguous()
            and residual.dtype == router.weight.dtype and not torch.is_grad_enabled())



# Set False to add the residual after a mixture of experts with a launch of its own (benchmarks time the two).
RESIDUAL_IN_MOE_COMBINE = True


class RopeAttention(nn.Module):
    """Llama-style attention (Llama, Mistral, Qwen2) with q, k and v as one GEMM and the rotary embedding in one
    kernel.

    ``q_proj`` / ``k_proj`` / ``v_proj`` run as one packed GEMM when ``patch_model`` packed them (their output's q
    and k are strided views, rotated in place by one :func:`~fused_rmsnorm_rope.apply_rope` launch), else as the
    model's own three modules followed by the same launch; the cache update, the attention function the model's
    config names (``config._attn_implementation``, looked up in transformers' ``ALL_ATTENTION_FUNCTIONS`` as the
    model's own attention does) and ``o_proj`` are the model's own. With a gradient to record (training) the three
    projections run separately and RoPE out of place, so the gradients reach ``q_proj`` / ``k_proj`` / ``v_proj``.
    """

    can_torch_compile = True
    has_backward = True

    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    head_dim: int
    scaling: float
    attention_dropout: float
    layer_idx: int
    config: Any

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, *args: Any, input_norm: nn.Module | None = None,
                residual: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        _keywords_only(self, args)
        q, k, v, grad = _project_qkv(self, hidden_states, (), input_norm)
        cos, sin = position_embeddings
        rotate = _rotates(self)
        if grad and rotate:
            q, k = apply_rope(q, k, cos, sin)
        # else: in place, into the projection's output (the packed buffer's q and k columns), by _attend: in the
        # static cache's write when that is ours (one launch for both), else on its own first
        return _attend(self, q, k, v, cos, sin, attention_mask, hidden_states.shape[:-1], kwargs,
                       rope=rotate and not grad, residual=residual, q_scale=_query_temperature(self, kwargs))


def _rotates(attn: nn.Module) -> bool:
    """Whether the attention rotates q and k: all do but SmolLM3's NoPE layers (``use_rope`` false)."""
    return not attention_traits(attn).nope or bool(attn.use_rope)


class QKNormRopeAttention(nn.Module):
    """Qwen3-style attention with the per-head q/k RMSNorm and the rotary embedding in one kernel.

    ``q_norm`` and ``k_norm`` (weights ``[head_dim]``) then RoPE on q and k run as one
    :func:`~fused_rmsnorm_rope.fused_qk_norm_rope` launch instead of transformers' two norms and the rotation's
    element-wise kernels, in place on the output of the packed q/k/v GEMM when ``patch_model`` packed the
    projections (see :class:`RopeAttention`, whose rules it follows); the cache update, the attention function the
    model's config names and ``o_proj`` are the model's own.
    """

    can_torch_compile = True
    has_backward = True

    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    q_norm: nn.Module
    k_norm: nn.Module
    head_dim: int
    scaling: float
    attention_dropout: float
    layer_idx: int
    config: Any

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, *args: Any, input_norm: nn.Module | None = None,
                residual: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        _keywords_only(self, args)
        return _qk_norm_rope_attention(self, hidden_states, position_embeddings, attention_mask, input_norm,
                                       residual, kwargs, self.q_norm.variance_epsilon, gemma=False)


def _qk_norm_rope_attention(attn: nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple,
                            attention_mask: torch.Tensor | None, input_norm: nn.Module | None,
                            residual: torch.Tensor | None, kwargs: dict, eps: float, gemma: bool,
                            gated: bool = False) -> tuple:
    """The forward of the attentions with per-head q/k norms (Qwen3's, or Gemma 3's ``1 + weight`` ones): the
    projections, then the norms and RoPE in one launch (out of place with a gradient to record; else in place: inside
    the cache's write when that is ours, else a launch of its own before the cache update), then :func:`_attend`.
    ``gated``: each head's ``q_proj`` output is its query and then its output gate (Qwen3-Next, Qwen3.5)."""
    q_norm, k_norm = attn.q_norm, attn.k_norm
    q_weight, k_weight = q_norm.weight, k_norm.weight
    q, k, v, grad = _project_qkv(attn, hidden_states, (q_weight, k_weight), input_norm)
    gate = None
    if gated:  # [..., 2 * heads, head_dim]: head h's query at 2h, its gate at 2h + 1 (strided views, unit stride in
        # head_dim: the fused kernels take them, and normalize and rotate the queries in place)
        q, gate = q[..., 0::2, :], q[..., 1::2, :]
    cos, sin = position_embeddings
    shape = hidden_states.shape[:-1]
    if _hooked(q_norm) or _hooked(k_norm):  # the norms' own calls, which their hooks see; then the rotation
        q, k = apply_rope(q_norm(q), k_norm(k), cos, sin)
        return _attend(attn, q, k, v, cos, sin, attention_mask, shape, kwargs, residual=residual, gate=gate)
    if grad:
        q, k = fused_qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps=eps, gemma=gemma)
    # (else _attend normalizes and rotates in place, in the cache write where it can)
    return _attend(attn, q, k, v, cos, sin, attention_mask, shape, kwargs, rope=not grad,
                   qk_norm=None if grad else (q_weight, k_weight, eps, gemma), residual=residual, gate=gate)


class GemmaQKNormRopeAttention(QKNormRopeAttention):
    """Gemma 3's attention (``Gemma3Attention``): per-head ``q_norm`` / ``k_norm`` that scale by ``1 + weight``
    (Gemma's RMSNorm, ``eps``) and the rotary embedding in one launch, in place on the packed q/k/v GEMM's output:
    inside a static cache's write (a full layer's, or a full sliding window's ring) where that is ours, else one
    :func:`~fused_rmsnorm_rope.fused_qk_norm_rope` launch (``gemma=True``), as :class:`QKNormRopeAttention` does for
    Qwen3; then the attention function the model's config names (with the layer's ``scaling``, from
    ``query_pre_attn_scalar``, and its ``sliding_window``) and ``o_proj``, as transformers' own.
    """

    sliding_window: int | None  # and QKNormRopeAttention's attributes (q_norm / k_norm: weight, eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, *args: Any, input_norm: nn.Module | None = None,
                residual: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        _keywords_only(self, args)
        return _qk_norm_rope_attention(self, hidden_states, position_embeddings, attention_mask, input_norm,
                                       residual, kwargs, self.q_norm.eps, gemma=True)


class GatedQKNormRopeAttention(QKNormRopeAttention):
    """The gated full attention of Qwen3-Next and Qwen3.5 (:data:`GATED_ATTENTIONS`): ``q_proj`` yields each head's
    query and its output gate; the per-head ``q_norm`` / ``k_norm`` scale by ``1 + weight`` (zero-centered, ``eps``)
    and the rotary embedding covers the first ``cos.shape[-1]`` elements of each head (``partial_rotary_factor``).

    q, k and v come from one GEMM where ``patch_model`` packed the projections (the query-and-gate rows, then k's,
    then v's); the norms and the rotation run as one :func:`~fused_rmsnorm_rope.fused_qk_norm_rope` launch in place on
    the queries (strided views beside their gates) and the keys, instead of transformers' two norms and the rotation's
    element-wise kernels (slices, ``rotate_half``, products, sums, concatenations); then the cache update, the
    attention function the config names, ``attention * sigmoid(gate)`` and ``o_proj``, as transformers' own.
    """

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, *args: Any, input_norm: nn.Module | None = None,
                residual: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        _keywords_only(self, args)
        return _qk_norm_rope_attention(self, hidden_states, position_embeddings, attention_mask, input_norm,
                                       residual, kwargs, self.q_norm.eps, gemma=True, gated=True)


class PackedRopeAttention(nn.Module):
    """Phi-3's attention (``Phi3Attention``, Phi-3 and Phi-4): the model's own packed ``qkv_proj`` (q, k, v as one
    GEMM already), then the rotary embedding of q and k in one kernel in place on that GEMM's output (a partial
    rotary dimension, ``partial_rotary_factor``, rotates the first ``cos.shape[-1]`` elements of each head, as
    transformers does), inside the static cache's one-launch write where the rotation covers the whole head; then the
    cache update, the attention function the config names and ``o_proj``, as transformers' own. ``qkv_proj`` runs
    through :func:`~triton_ops.models.layers.linear` where it is a plain hook-free ``nn.Linear`` (one decode row on a
    GPU: one launch streaming the weight), else as the module it is (``FP8Linear`` with ``fp8=True``). With a
    gradient to record the rotation runs out of place.
    """

    can_torch_compile = True
    has_backward = True

    qkv_proj: nn.Module  # weight [q + 2 * kv, hidden]
    o_proj: nn.Module
    head_dim: int
    num_key_value_heads: int
    scaling: float
    attention_dropout: float
    layer_idx: int
    config: Any  # num_attention_heads, sliding_window

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, *args: Any, input_norm: nn.Module | None = None,
                residual: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        _keywords_only(self, args)
        if input_norm is not None:  # (no packing of ours to take it into the GEMM's launch)
            hidden_states = input_norm(hidden_states)
        qkv_proj, head_dim = self.qkv_proj, self.head_dim
        if type(qkv_proj) is nn.Linear and runs_forward(qkv_proj, "Linear") and not (
                qkv_proj._forward_hooks or qkv_proj._forward_pre_hooks):
            qkv = linear(hidden_states, qkv_proj.weight, qkv_proj.bias)
        else:
            qkv = qkv_proj(hidden_states)
        q_size, kv_size = self.config.num_attention_heads * head_dim, self.num_key_value_heads * head_dim
        q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in qkv.split((q_size, kv_size, kv_size), dim=-1))
        cos, sin = position_embeddings
        grad = torch.is_grad_enabled() and qkv.requires_grad  # (whatever inside qkv_proj needs it: LoRA too)
        if grad:
            q, k = apply_rope(q, k, cos, sin)
        return _attend(self, q, k, v, cos, sin, attention_mask, hidden_states.shape[:-1], kwargs, rope=not grad,
                       residual=residual)


class FullQKNormRopeAttention(RopeAttention):
    """OLMo 2's and OLMo 3's attention (:data:`FULL_QK_NORM_ATTENTIONS`): ``q_norm`` / ``k_norm`` RMSNorms over
    all of q's and k's features (not per head), then the rotary embedding. q, k and v come from one packed GEMM where
    ``patch_model`` packed them; each norm runs as its module's call (patch_model's one-pass RMSNorm) on its slice of
    the packed output, and the rotation as one :func:`~fused_rmsnorm_rope.apply_rope` launch in place on the two
    normalized tensors (inside the static cache's write where that is ours), instead of transformers' three
    projections and the rotation's element-wise kernels; then the cache update, the attention function the config
    names (Olmo 3's sliding window where its layer has one) and ``o_proj``, as transformers' own.
    """

    q_norm: nn.Module  # [num_heads * head_dim]; and RopeAttention's attributes
    k_norm: nn.Module  # [num_kv_heads * head_dim]

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, *args: Any, input_norm: nn.Module | None = None,
                residual: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        _keywords_only(self, args)
        q, k, v, grad = _project_qkv(self, hidden_states, (), input_norm)
        q = self.q_norm(q.flatten(-2)).unflatten(-1, (-1, self.head_dim))
        k = self.k_norm(k.flatten(-2)).unflatten(-1, (-1, self.head_dim))
        cos, sin = position_embeddings
        grad = grad or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
        if grad:
            q, k = apply_rope(q, k, cos, sin)
        # else: rotated in place (the norms' outputs are new tensors), in the static cache's write where it can
        return _attend(self, q, k, v, cos, sin, attention_mask, hidden_states.shape[:-1], kwargs, rope=not grad,
                       residual=residual)


class SinkRopeAttention(RopeAttention):
    """gpt-oss attention (per-head attention sinks, a sliding window on every other layer, q/k/v with biases):
    q, k and v as one GEMM, the rotary embedding in one kernel (inside the static cache's write at decode), as
    :class:`RopeAttention` does; the sinks go to the attention function as transformers' own attention passes them
    (``s_aux``).

    gpt-oss's rotary tables hold ``head_dim / 2`` frequencies and rotate the two halves of a head
    (``first * cos - second * sin``, ``second * cos + first * sin``): the same rotation as transformers'
    ``rotate_half`` form with each table repeated twice, which is what the kernels take (two small concatenations
    per layer instead of the model's chunk, four multiplications, two subtractions/additions and a concatenation on
    each of q and k). The rotation runs in float32 with one rounding, where the model's rounds after each step.
    """

    sinks: nn.Parameter  # and RopeAttention's attributes
    sliding_window: int | None

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, *args: Any, input_norm: nn.Module | None = None,
                residual: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        _keywords_only(self, args)
        q, k, v, grad = _project_qkv(self, hidden_states, (self.sinks,), input_norm)
        cos, sin = (_whole_head_table(t, self.head_dim) for t in position_embeddings)
        if grad:
            q, k = apply_rope(q, k, cos, sin)
        kwargs["s_aux"] = self.sinks
        return _attend(self, q, k, v, cos, sin, attention_mask, hidden_states.shape[:-1], kwargs, rope=not grad,
                       residual=residual)


def _ours_unhooked(attn: nn.Module) -> bool:
    """One of the attentions here, whose hooks would not see a difference when the layer hands it its input
    un-normalized and takes ``x + attn(...)`` back: no pre-hooks, and no forward hooks but transformers' own
    output capture (5.2x installs it on the attention once any call asks for ``output_attentions`` and keeps it; it
    records the attention weights, the output's second item, which stay what they were)."""
    if not (runs_forward(attn, RopeAttention) or runs_forward(attn, QKNormRopeAttention)
            or runs_forward(attn, SinkRopeAttention) or runs_forward(attn, GemmaQKNormRopeAttention)
            or runs_forward(attn, PackedRopeAttention)) \
            or attn._forward_pre_hooks:
        return False
    return all("output_capturing_hook" in getattr(hook, "__qualname__", "") for hook in attn._forward_hooks.values())


# Off: every decoder layer's input RMSNorm runs as its own launch. Measured on the H200 (Llama-3-8B, 32 layers, 1k
# context, session 24), the norms inside the GEMMs' launches cost more than the launches they save: a decode step
# took 4,665 / 4,862 us with them against 4,210 / 4,872 us without (bf16, batch 1 / 8) and 3,656 / 5,880 us against
# 3,185 / 4,155 us (FP8 default recipe): every program of the GEMM sums its row's squares again before its first
# tile. Set True to run them inside (``benchmarks.bench_model``'s ``-fused-norms`` variants time the two).
# On since session 40 for a single row (one sequence's decode step): measured on the H200 (Llama-3-8B's FP8 checkpoint,
# 1k context, bench_model's -input-norm variant), the deferred norm inside the q/k/v launch costs less than the
# launch it saves: 2,785 -> 2,751 us of GPU time a step at batch 1 (CUDA graph 2,899 -> 2,833; the weight-only
# kernel 1,027 -> 1,051 us, the norms' launches 114 -> 60 us). At 8 rows the multi-row tile's norm multiply cost
# more (3,814 -> 4,087 us): more rows than INPUT_NORM_MAX_ROWS keep the norm's own launch. bf16 weights too (session
# 41, H100, Llama-3-8B bf16, batch 1: 5,997 -> 5,950 us, CUDA graph 6,104 -> 6,006 us).
# (At prefill the input norm quantizing for a W8A8 q/k/v GEMM is triton_ops.layers.NORM_QUANTIZES_W8A8's, not this.)
INPUT_NORM_IN_QKV = True
INPUT_NORM_MAX_ROWS = 1


def _input_norm_in_projection(attn: nn.Module, norm: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether a decoder layer may hand ``attn`` its input un-normalized with ``input_norm=norm``: one of the
    attentions here (:func:`_ours_unhooked`: no hook that would see the un-normalized input), ``norm`` exactly an
    RMSNorm kernel (:func:`~triton_ops.models.layers.norm_module_fusable`), and a packed q/k/v GEMM whose launch
    normalizes
    (:meth:`~triton_ops.models.layers.QKVPacking.takes_norm`: the norm's own output up to its rounding, one launch less
    per layer and decode step), or a W8A8 GEMM whose input the norm's launch quantizes
    (:meth:`~triton_ops.models.layers.QKVPacking.norm_quantizes`: the same bits, one pass over the activation less
    per layer at prefill)."""
    if not _ours_unhooked(attn):
        return False
    packing = getattr(attn, PACKING_ATTR, None)
    if packing is None or not norm_module_fusable(norm) or (torch.is_grad_enabled() and norm.weight.requires_grad):
        return False
    if packing.norm_quantizes(hidden_states):  # a prefill's W8A8 GEMM: the norm's launch quantizes its output
        return True
    return (INPUT_NORM_IN_QKV and hidden_states.numel() <= INPUT_NORM_MAX_ROWS * max(1, hidden_states.shape[-1])
            and packing.takes_norm(hidden_states))


# Off, for the measurement above: every decoder layer's post-attention RMSNorm (with the residual add) runs as its
# own launch. Set True to normalize inside the gated MLP's (or the mixture of experts' router and gate/up) launch.
POST_NORM_IN_MLP = False
# Off until measured on a GPU (session 40: written and tested under the interpreter only): set True to have the
# output projection's launch, which adds the residual, also write the post-attention norm of the sum (the last
# program to finish a row tile's columns normalizes its rows, the RMSNorm kernel's bits), so the gated MLP reads a
# normalized input and the norm costs no launch and nothing inside the MLP's loop. Takes precedence over
# POST_NORM_IN_MLP where both are on.
POST_NORM_IN_O_PROJ = False
# The fusion switches as shipped, read at import: whoever sets them for a measurement puts them back from here.
SHIPPED_SWITCHES = {"INPUT_NORM_IN_QKV": INPUT_NORM_IN_QKV, "POST_NORM_IN_MLP": POST_NORM_IN_MLP,
                    "POST_NORM_IN_O_PROJ": POST_NORM_IN_O_PROJ,
                    "RESIDUAL_IN_MOE_COMBINE": RESIDUAL_IN_MOE_COMBINE}


def _post_norm_in_o_proj(layer: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether the layer's output projection can add the residual and write the post-attention norm of the sum in
    one launch (:class:`NormAfterResidual`): the switch on (``POST_NORM_IN_O_PROJ``), one of the attentions here
    without hooks, a plain RMSNorm (:func:`~triton_ops.models.layers.norm_module_fusable`), an output projection
    that adds the residual in its own launch (:func:`_o_proj_adds`), grad mode off, and an MLP that is not sharded
    (its input is the normalized tensor, whatever it is). The layer's input is left as it is (the sum is a new
    tensor)."""
    if not POST_NORM_IN_O_PROJ or torch.is_grad_enabled():
        return False
    attn, norm = layer.self_attn, layer.post_attention_layernorm
    if not _ours_unhooked(attn) or not norm_module_fusable(norm) or layer.mlp.__dict__.get(LOCAL_SHARDS_ATTR):
        return False
    rows = hidden_states.numel() // max(1, hidden_states.shape[-1])
    return (type(hidden_states) is torch.Tensor and hidden_states.is_contiguous()
            and _o_proj_adds(attn.o_proj, rows, hidden_states.dtype, hidden_states.is_cuda, False))


def _post_norm_in_mlp(layer: nn.Module, hidden_states: torch.Tensor) -> str:
    """How the layer's MLP can take its post-attention norm into the gated MLP's launch (the residual add going
    into the output projection's launch and the MLP's into the down projection's), or ``""``: one of the
    attentions here without hooks, a plain RMSNorm (:func:`~triton_ops.models.layers.norm_module_fusable`), a
    patched gated MLP whose down projection adds the residual (:func:`_down_adds_residual`, not sharded) and whose
    gate/up run the fused kernel (a decode step's few rows: at most ``NORM_PROLOGUE_MAX_ROWS``), or a patched
    mixture of experts (``"moe"``: :func:`_moe_adds_residual`; its router and gate/up GEMM normalize), an output
    projection that adds the residual in its own launch (:func:`_o_proj_adds`: one bf16 row on a GPU, or FP8
    weight-only rows), and grad mode off (the layer adds into ``h`` in place; anything of the attention may need a
    gradient). The layer's input is left as it is (``h = x + o_proj(...)`` is a new tensor)."""
    if not POST_NORM_IN_MLP:
        return ""
    attn, norm, mlp = layer.self_attn, layer.post_attention_layernorm, layer.mlp
    if not _ours_unhooked(attn):
        return ""
    rows = hidden_states.numel() // max(1, hidden_states.shape[-1])
    if not 0 < rows <= NORM_PROLOGUE_MAX_ROWS or not norm_module_fusable(norm) \
            or mlp.__dict__.get(LOCAL_SHARDS_ATTR) is not None:
        return ""
    if torch.is_grad_enabled():  # inference only: h would be added into in place while autograd may need it
        return ""
    # only where x + o_proj(...) is one launch: elsewhere (cuBLAS at several bf16 rows) its add would be a launch of
    # its own, as many as the norm's, and the MLP would pay its prologue for nothing
    if not _o_proj_adds(attn.o_proj, rows, hidden_states.dtype, hidden_states.is_cuda, hidden_states.requires_grad):
        return ""
    if _moe_adds_residual(mlp, hidden_states):
        # Qwen2-MoE's shared expert reads the normalized input too: the norm keeps its launch there
        return "" if has_shared_expert(mlp) else "moe"
    return _down_adds_residual(mlp, hidden_states)


def _hooked(module: nn.Module) -> bool:
    """A module with hooks, or a forward set on the instance: a kernel standing in for its call would bypass them."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or instance_forward(module)


def _keywords_only(attn: nn.Module, args: tuple) -> None:
    """transformers passes an attention everything after the mask by keyword; a positional one would be misread."""
    if args:
        raise InvalidArgumentError(
            f"{type(attn).__name__}: expected the cache and the rest by keyword, got {len(args)} positional")


def _whole_head_table(table: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A half-head rotary table (gpt-oss's ``[..., head_dim / 2]``) as the ``rotate_half`` form's, the halves
    repeated; a table already ``head_dim`` wide as it is."""
    return torch.cat((table, table), dim=-1) if table.shape[-1] * 2 == head_dim else table


def _project_qkv(attn: nn.Module, hidden_states: torch.Tensor, more: tuple[torch.Tensor, ...],
                 input_norm: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """q, k, v as ``[..., seq, heads, head_dim]`` and whether a gradient is to be recorded.

    Without a gradient: one GEMM when the projections are packed (q, k, v are views of its output), else the three
    projections; either way q and k may be rotated in place. With one (``more``: further parameters the caller's
    kernel differentiates): the three projections, whose weights are the model's parameters. ``input_norm``: the
    decoder layer's input RMSNorm, not yet applied to ``hidden_states`` (:func:`_input_norm_in_projection`): inside
    the packed GEMM's launch where it can, else by the module first.
    """
    if input_norm is not None:
        more = (*more, input_norm.weight)
    grad = torch.is_grad_enabled() and _records_grad(attn, hidden_states, more)
    packing = None if grad else packed_projections(attn)
    if packing is not None:
        q, k, v = packing(hidden_states) if input_norm is None else packing(hidden_states, input_norm)
    else:
        if input_norm is not None:
            hidden_states = input_norm(hidden_states)
        q, k, v = attn.q_proj(hidden_states), attn.k_proj(hidden_states), attn.v_proj(hidden_states)
        # a projection whose output needs a gradient through parameters of its own (a LoRA adapter beside a frozen
        # weight): q and k are rotated out of place, as with any gradient
        grad = grad or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
    head_dim = attn.head_dim
    return q.unflatten(-1, (-1, head_dim)), k.unflatten(-1, (-1, head_dim)), v.unflatten(-1, (-1, head_dim)), grad


def _records_grad(attn: nn.Module, hidden_states: torch.Tensor, more: tuple[torch.Tensor, ...]) -> bool:
    """Whether autograd records this call (grad mode on): the input, a projection's weight or bias, or one of
    ``more`` requires a gradient."""
    return (hidden_states.requires_grad or any(t.requires_grad for t in more)
            or any(getattr(t, "requires_grad", False) for m in (attn.q_proj, attn.k_proj, attn.v_proj)
                   for t in (getattr(m, "weight", None), getattr(m, "bias", None))))


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor, attention_mask: torch.Tensor | None, shape: torch.Size, kwargs: dict,
            rope: bool = False, qk_norm: tuple | None = None, residual: torch.Tensor | None = None,
            gate: torch.Tensor | None = None, q_scale: torch.Tensor | None = None) -> tuple:
    """The rest of transformers' attention forward, from ``[..., seq, heads, head_dim]`` q, k and v: the cache
    update, the configured attention function, ``o_proj`` (with ``residual``: ``residual + o_proj(...)``, the add in
    the projection's launch where it can). q and k come rotated, or (``rope``) are rotated here in
    place, after the per-head RMSNorm of ``qk_norm`` (``(q_weight, k_weight, eps, gemma)``: Qwen3's, or with
    ``gemma`` Gemma 3's ``1 + weight``) where given: inside the
    static cache's one-launch write where that runs (:func:`~triton_ops.models.cache_updates.write_rotated`: a
    ``StaticLayer``'s, or a full sliding window's ring), else by one :func:`~fused_rmsnorm_rope.apply_rope` /
    :func:`~fused_rmsnorm_rope.fused_qk_norm_rope` launch before the cache update. A ring's keys come in slot order:
    the attention function gets the ring's start or a reordered mask
    (:func:`~triton_ops.models.cache_updates.ring_attention_args`). ``gate``: the attention's output is multiplied
    by its sigmoid before ``o_proj`` (the gated attentions of Qwen3-Next and Qwen3.5), as transformers' does.
    ``q_scale``: the rotated queries (``[B, H, S, D]``) are multiplied by it, in their dtype, before the attention
    (Ministral 3's temperature: :func:`_query_temperature`)."""
    cache = next((kwargs.pop(name) for name in _CACHE_NAMES if name in kwargs), None)
    for name in _CACHE_NAMES:  # both names given (one None): neither goes on to the attention function
        kwargs.pop(name, None)
    cache_position = kwargs.pop("cache_position", None)
    implementation = attn.config._attn_implementation
    ring_ok = cache is not None and ring_suits(implementation, attention_mask)
    written = None
    if rope and cache is not None and fusable_tables(k, cos, sin, qk_norm):
        written = write_rotated(cache, k.transpose(1, 2), v.transpose(1, 2), attn.layer_idx, cache_position,
                                (q.transpose(1, 2), cos, sin), qk_norm, ring_ok)
    if rope and written is None and qk_norm is not None:
        fused_qk_norm_rope(q, k, qk_norm[0], qk_norm[1], cos, sin, eps=qk_norm[2], gemma=qk_norm[3], inplace=True)
    elif rope and written is None:
        apply_rope(q, k, cos, sin, inplace=True)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q_scale is not None:
        q = q * q_scale.to(q.dtype)
    ring = None
    if written is not None:
        k, v, ring = written
    elif cache is not None:
        k, v, ring = update_cache(cache, k, v, attn.layer_idx, cos, sin, cache_position, kwargs, ring_ok)
    attention = _attention_function(type(attn), implementation)
    if ring is not None:
        attention_mask, kwargs = ring_attention_args(attention, attention_mask, ring, kwargs)
    out, weights = attention(attn, q, k, v, attention_mask,
                             dropout=attn.attention_dropout if attn.training else 0.0, scaling=attn.scaling,
                             **_sliding_window(attn), **_softcap(attn), **kwargs)
    out = out.reshape(*shape, -1).contiguous()
    if gate is not None:
        out = out * torch.sigmoid(gate.reshape(*shape, -1))
    return _o_proj(attn.o_proj, out, residual), weights


class NormAfterResidual(NamedTuple):
    """A decoder layer's ``residual=`` for its attention when the output projection's launch also writes the
    post-attention norm: the residual stream, the norm (a plain RMSNorm, :func:`norm_module_fusable`) and the
    tensor its output goes to (``residual``'s shape and dtype)."""

    residual: torch.Tensor
    norm: nn.Module
    normed: torch.Tensor


def _o_proj(o_proj: nn.Module, x: torch.Tensor, residual: torch.Tensor | NormAfterResidual | None = None
            ) -> torch.Tensor:
    """The output projection: a plain, hook-free ``nn.Linear`` through :func:`~triton_ops.models.layers.linear`
    (one decode row: one launch streaming the weight), anything else (FP8Linear, a sharded or hooked module)
    called as it is. With ``residual``: ``residual + o_proj(x)``, in the projection's own launch where that is
    :func:`fp8_gemm.decode_linear` (:func:`_o_proj_adds`), else by an add after it. A :class:`NormAfterResidual`
    also has the sum's norm written to its ``normed``: in the same launch (``decode_linear``'s ``normed=``, the
    RMSNorm kernel's bits) where the add is in it, else by the norm's call after the add."""
    after = None
    if isinstance(residual, NormAfterResidual):
        residual, after = residual.residual, residual
    rows = x.numel() // max(1, x.shape[-1])
    if residual is not None and type(x) is torch.Tensor and _o_proj_adds(o_proj, rows, x.dtype, x.is_cuda,
                                                                         x.requires_grad):
        bufs = o_proj._buffers
        weight, scale = bufs.get("weight", o_proj.weight), bufs.get("weight_scale")
        if after is None:
            return decode_linear(x, weight, o_proj.bias, weight_scale=scale, residual=residual)
        return decode_linear(x, weight, o_proj.bias, weight_scale=scale, residual=residual,
                             next_norm_weight=after.norm.weight, next_norm_eps=after.norm.variance_epsilon,
                             normed=after.normed)
    if type(o_proj) is nn.Linear and not (o_proj._forward_hooks or o_proj._forward_pre_hooks
                                          or instance_forward(o_proj)):
        out = linear(x, o_proj.weight, o_proj.bias)
    else:
        out = o_proj(x)
    out = out if residual is None else residual + out
    if after is not None:
        after.normed.copy_(after.norm(out))
    return out


def _o_proj_adds(o_proj: nn.Module, rows: int, dtype: torch.dtype, on_gpu: bool, requires_grad: bool) -> bool:
    """Whether ``residual + o_proj(x)`` for an input of ``rows`` rows of ``dtype`` can be one
    :func:`fp8_gemm.decode_linear` launch: a hook-free plain ``nn.Linear`` where
    :func:`~triton_ops.models.layers.decode_gemv` takes it (one row on a GPU), or an ``FP8Linear`` whose call runs
    the weight-only kernel anyway (``use_weight_only``); nothing to differentiate."""
    if o_proj._forward_hooks or o_proj._forward_pre_hooks or rows < 1:
        return False
    if torch.is_grad_enabled() and (requires_grad or any(p.requires_grad for p in o_proj.parameters())):
        return False
    if instance_forward(o_proj):  # accelerate's hooks, a user's forward: not the GEMM a fusion would run
        return False
    if isinstance(o_proj, FP8Linear):  # (isinstance and the mark: see _down_adds_residual)
        bufs = o_proj._buffers
        return use_weight_only(o_proj.path, rows, bufs["weight"], bufs["weight_scale"], dtype.itemsize)
    if isinstance(o_proj, nn.Linear) and runs_forward(o_proj, "Linear") and type(o_proj.weight) in _PLAIN:
        return decode_gemv_rule(rows <= model_layers.BF16_FUSED_MAX_ROWS, dtype, on_gpu, o_proj.weight)
    return False


def _sliding_window(attn: nn.Module) -> dict:
    """The ``sliding_window`` argument the model's own attention passes: Qwen2/Qwen3 their layer's
    ``self.sliding_window``, Mistral its config's, Llama and Qwen2-MoE none."""
    window = attention_traits(attn).window
    if window == "attn":
        return {"sliding_window": attn.sliding_window}
    if window == "config":
        return {"sliding_window": attn.config.sliding_window}
    return {}


def _softcap(attn: nn.Module) -> dict:
    """The ``softcap`` argument the model's own attention passes: Gemma 2's ``attn_logit_softcapping`` (its
    attention function then caps the logits: the model's eager one, or ours), the others none."""
    if attention_traits(attn).softcap:
        return {"softcap": attn.attn_logit_softcapping}
    return {}


class AttentionTraits(NamedTuple):
    """What a patched attention's forward passes on or computes besides Llama's, by the model's own class:
    ``window`` where its ``sliding_window`` argument comes from (``"attn"``, ``"config"``, or ``""``: none),
    ``softcap`` whether it passes ``attn_logit_softcapping`` (:data:`SOFTCAP_ATTENTIONS`), ``nope`` whether
    ``use_rope`` decides its rotation (:data:`NOPE_ATTENTIONS`), ``temperature`` the positions its query temperature
    reads (:data:`TEMPERATURE_ATTENTIONS`; None: no temperature)."""

    window: str
    softcap: bool
    nope: bool
    temperature: str | None


# Per class, in a plain dict filled at patch time: under torch.compile each call traces one dict lookup, not a scan
# of the class's MRO or an instance-dict read, either of which put guards in the attention's guard subtree that
# Dynamo's recursive dict tags cannot skip (every layer's guards then ran in full on every call)
_TRAITS: dict[type, AttentionTraits] = {}


def attention_traits(attn: nn.Module) -> AttentionTraits:
    """The :class:`AttentionTraits` of ``attn``'s class, found once per class (:func:`register_attention_traits`
    runs at patch time; a class met first here, e.g. unpickled, is registered on its first eager call)."""
    traits = _TRAITS.get(type(attn))
    if traits is None:
        traits = register_attention_traits(attn)
    return traits


def register_attention_traits(attn: nn.Module) -> AttentionTraits:
    """Find and keep the :class:`AttentionTraits` of ``attn``'s class (the temperature's positions from the
    model's own forward: call this before the forward is replaced, or on a patched class, whose MRO holds the
    model's)."""
    names = {cls.__name__ for cls in type(attn).__mro__}
    if names & set(NO_WINDOW_ARGUMENT_ATTENTIONS):
        window = ""
    elif hasattr(attn, "sliding_window"):
        window = "attn"
    else:
        window = "config" if hasattr(attn.config, "sliding_window") else ""
    temperature = None
    # the model's own class (patch_model's subclass of it has its name and our forward)
    own = next((cls for cls in type(attn).__mro__
                if cls.__name__ in TEMPERATURE_ATTENTIONS and "_triton_ops_patched_from" not in cls.__dict__), None)
    if own is not None:
        params = inspect.signature(own.forward).parameters
        temperature = "position_ids" if "position_ids" in params else "cache_position"
    traits = AttentionTraits(window, bool(names & set(SOFTCAP_ATTENTIONS)), bool(names & set(NOPE_ATTENTIONS)),
                             temperature)
    _TRAITS[type(attn)] = traits
    return traits


_EAGER: dict[type, Callable] = {}  # per class, in a plain dict: torch.compile traces a dict lookup


def _attention_function(layer_cls: type, implementation: str | None) -> Callable:
    """The attention function transformers would call for this layer: the registered one the config names, else
    the eager function of the layer's own modeling module."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = _eager_attention(layer_cls)
    if implementation in (None, "eager"):
        return eager
    get_interface = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    # `is not None`, not truthiness: Dynamo cannot branch on a bound method's truth value (a graph break on the H200)
    if get_interface is not None:
        return get_interface(implementation, eager)
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _eager_attention(layer_cls: type) -> Callable:
    fn = _EAGER.get(layer_cls)
    if fn is not None:
        return fn
    # The patched class subclasses the model's own attention class: its module has eager_attention_forward.
    for cls in layer_cls.__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is not None:
            _EAGER[layer_cls] = fn
            return fn
    raise InvalidArgumentError(f"{layer_cls.__name__}: its modeling module has no eager_attention_forward")


# Attentions whose forward QKNormRopeAttention computes: matched by class name along the MRO (an attention of another
# model with q_norm / k_norm of the same shapes may compute otherwise: Gemma 4's also normalizes v and shares K/V)
QK_NORM_ATTENTIONS = ("Qwen3Attention", "Qwen3MoeAttention")


def has_qk_norm(attn: nn.Module) -> bool:
    """A Qwen3 / Qwen3-MoE attention (:data:`QK_NORM_ATTENTIONS`) with per-head ``q_norm`` / ``k_norm`` RMSNorms of
    one epsilon."""
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    head_dim = getattr(attn, "head_dim", None)
    return (any(cls.__name__ in QK_NORM_ATTENTIONS for cls in type(attn).__mro__)
            and all(hasattr(attn, a)
                    for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "scaling", "config"))
            and all(isinstance(getattr(n, "weight", None), torch.Tensor) and n.weight.shape == (head_dim,)
                    and isinstance(getattr(n, "variance_epsilon", None), (int, float)) for n in (q_norm, k_norm))
            and q_norm.variance_epsilon == k_norm.variance_epsilon)


# Attention modules whose forward is transformers' Llama attention (up to the sliding window and softcap arguments):
# what RopeAttention replaces. Matched by class name (subclasses of the model's own class keep it).
ROPE_ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "MixtralAttention", "Qwen2MoeAttention",
                   "GemmaAttention", "Gemma2Attention", "MinistralAttention", "Ministral3Attention", "SmolLM3Attention")
# The gated full attentions of the hybrid decoders (GatedQKNormRopeAttention)
GATED_ATTENTIONS = ("Qwen3NextAttention", "Qwen3_5Attention", "Qwen3_5MoeAttention")
# The attentions whose own forward passes no sliding_window to the attention function: of ROPE_ATTENTIONS Qwen2-MoE's
# (it sets config.sliding_window to 0 when the window is off, which flash attention would take for a window of 0
# tokens), Gemma's and OLMo 2's, and the gated ones
NO_WINDOW_ARGUMENT_ATTENTIONS = ("Qwen2MoeAttention", "GemmaAttention", "Olmo2Attention", *GATED_ATTENTIONS)
# The attentions whose forward passes their attn_logit_softcapping to the attention function as ``softcap``
SOFTCAP_ATTENTIONS = ("Gemma2Attention",)
# The attentions whose forward rotates q and k only where their ``use_rope`` says so (SmolLM3's NoPE layers)
NOPE_ATTENTIONS = ("SmolLM3Attention",)
# Attentions with RMSNorms over all of q's and k's features before the rotation (FullQKNormRopeAttention), and the
# decoder layers whose norms follow each sublayer (PostNormDecoderLayer): OLMo 2's and OLMo 3's
FULL_QK_NORM_ATTENTIONS = ("Olmo2Attention", "Olmo3Attention")
POST_NORM_DECODER_LAYERS = ("Olmo2DecoderLayer", "Olmo3DecoderLayer")


def has_full_qk_norm(attn: nn.Module) -> bool:
    """An OLMo 2 / OLMo 3 attention (:data:`FULL_QK_NORM_ATTENTIONS`' forward), its projections, the attributes its
    forward reads, and ``q_norm`` / ``k_norm`` RMSNorms (``weight``, ``variance_epsilon``) as wide as q and k."""
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    q_proj, k_proj = getattr(attn, "q_proj", None), getattr(attn, "k_proj", None)
    return (forward_defined_by(attn, FULL_QK_NORM_ATTENTIONS)
            and all(hasattr(attn, a) for a in ("v_proj", "o_proj", "layer_idx", "scaling", "config", "head_dim",
                                               "attention_dropout"))
            and all(isinstance(getattr(n, "weight", None), torch.Tensor) and n.weight.dim() == 1
                    and isinstance(getattr(n, "variance_epsilon", None), (int, float)) for n in (q_norm, k_norm))
            and q_norm.weight.shape[0] == getattr(q_proj, "out_features", None)
            and k_norm.weight.shape[0] == getattr(k_proj, "out_features", None))


def is_post_norm_decoder_layer(layer: nn.Module) -> bool:
    """An OLMo 2 / OLMo 3 decoder layer (:data:`POST_NORM_DECODER_LAYERS`' forward) with its attention, MLP and two
    norms."""
    return (forward_defined_by(layer, POST_NORM_DECODER_LAYERS)
            and all(hasattr(layer, a) for a in ("self_attn", "mlp", "post_attention_layernorm",
                                                "post_feedforward_layernorm")))
# The attentions whose forward scales the rotated queries by Llama 4's attention temperature,
# ``1 + beta * log(1 + floor(position / original_max_position_embeddings))`` (``config.rope_parameters``'
# ``llama_4_scaling_beta`` and ``original_max_position_embeddings``): 1 up to the original context, more beyond
TEMPERATURE_ATTENTIONS = ("Ministral3Attention",)
def _query_temperature(attn: nn.Module, kwargs: dict) -> torch.Tensor | None:
    """The factor transformers' attention multiplies the rotated queries ``[B, H, S, D]`` by (Ministral 3's), as its
    release shapes it, or None where the attention has none."""
    source = attention_traits(attn).temperature
    if source is None:
        return None
    positions = kwargs.get(source)
    if positions is None:
        raise InvalidArgumentError(f"{type(attn).__name__}: its queries are scaled by their positions, and no "
                                   f"{source} was passed (transformers' decoder layer passes it)")
    rope = attn.config.rope_parameters
    beta, original = rope.get("llama_4_scaling_beta"), rope.get("original_max_position_embeddings")
    scale = 1 + beta * torch.log(1 + torch.floor(positions / original))
    # position_ids [B, S] -> [B, 1, S, 1] (transformers 5.2x, per sequence); cache_position [S] -> [S, 1] (5.0):
    # each release's own positions and broadcast, read from its forward's signature (AttentionTraits)
    return scale[:, None, :, None] if source == "position_ids" else scale.unsqueeze(-1)


def is_rope_attention(attn: nn.Module) -> bool:
    """A Llama / Mistral / Qwen2 / Mixtral / Gemma / Gemma 2 / Ministral / SmolLM3 attention: transformers' class, its
    projections and the attributes its forward reads (Gemma 2's ``attn_logit_softcapping``, SmolLM3's ``use_rope``
    too), and no q/k norms (those are Qwen3's and Qwen3-MoE's)."""
    softcap = any(cls.__name__ in SOFTCAP_ATTENTIONS for cls in type(attn).__mro__)
    nope = any(cls.__name__ in NOPE_ATTENTIONS for cls in type(attn).__mro__)
    return (any(cls.__name__ in ROPE_ATTENTIONS for cls in type(attn).__mro__)
            and all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "scaling",
                                               "config", "head_dim", "attention_dropout"))
            and (not softcap or hasattr(attn, "attn_logit_softcapping")) and (not nope or hasattr(attn, "use_rope"))
            and not hasattr(attn, "q_norm") and not hasattr(attn, "k_norm"))


def is_sink_attention(attn: nn.Module) -> bool:
    """A gpt-oss attention: transformers' ``GptOssAttention`` (or a subclass), its projections, per-head ``sinks``
    and the attributes its forward reads."""
    sinks = getattr(attn, "sinks", None)
    return (any(cls.__name__ == "GptOssAttention" for cls in type(attn).__mro__)
            and all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "scaling",
                                               "config", "head_dim", "attention_dropout", "sliding_window"))
            and isinstance(sinks, torch.Tensor) and sinks.dim() == 1)


def forward_defined_by(module: object, names: tuple[str, ...]) -> bool:
    """A module whose forward is the one a class of ``names`` defines (a subclass may compute something else)."""
    forward = getattr(type(module), "forward", None) if module is not None else None
    return getattr(forward, "__qualname__", "").split(".")[0] in names


# transformers' RMSNorm classes that scale by ``1 + weight`` (attribute ``eps``): what GemmaRMSNorm computes
GEMMA_RMS_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm",
                   # Qwen3-Next's and Qwen3.5's zero-centered norms compute the same (weights initialized at 0)
                   "Qwen3NextRMSNorm", "Qwen3_5RMSNorm", "Qwen3_5MoeRMSNorm")
# RMSNorms that scale by weight (not 1 + weight) but name their epsilon eps: Gemma 4's before transformers renamed it
# to variance_epsilon (5.17 has eps, 5.25 variance_epsilon)
EPS_RMS_NORMS = ("Gemma4RMSNorm",)
# Gemma 4's decoder layer (Gemma4DecoderLayer), with the attributes its forward reads (the experts' and the
# per-layer input's where the layer has them)
GEMMA4_DECODER_LAYERS = ("Gemma4TextDecoderLayer",)
_GEMMA4_LAYER_ATTRS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                       "post_feedforward_layernorm", "layer_scalar", "enable_moe_block", "hidden_size_per_layer_input")
_GEMMA4_MOE_ATTRS = ("router", "experts", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                     "pre_feedforward_layernorm_2")
_GEMMA4_PER_LAYER_ATTRS = ("per_layer_input_gate", "per_layer_projection", "post_per_layer_input_norm", "act_fn")
# Hybrid decoder layers (HybridDecoderLayer): a Gated DeltaNet or a gated full attention, zero-centered norms
HYBRID_DECODER_LAYERS = ("Qwen3NextDecoderLayer", "Qwen3_5DecoderLayer", "Qwen3_5MoeDecoderLayer")
# Decoder layers with norms before and after each sublayer (SandwichNormDecoderLayer), and the attentions with
# Gemma's per-head q/k norms (GemmaQKNormRopeAttention): by the class defining forward, as the MoE blocks are matched
GEMMA_DECODER_LAYERS = ("Gemma2DecoderLayer", "Gemma3DecoderLayer")
GEMMA_ATTENTIONS = ("Gemma3Attention",)


def is_gemma_rms_norm(norm: nn.Module) -> bool:
    """transformers' Gemma RMSNorm (:data:`GEMMA_RMS_NORMS`'s forward) with a 1-D ``weight`` and a number ``eps``."""
    return (forward_defined_by(norm, GEMMA_RMS_NORMS) and isinstance(getattr(norm, "weight", None), torch.Tensor)
            and norm.weight.dim() == 1 and isinstance(getattr(norm, "eps", None), (int, float)))


def is_eps_rms_norm(norm: nn.Module) -> bool:
    """An RMSNorm of :data:`EPS_RMS_NORMS` (plain ``weight`` scale, epsilon ``eps``) with a 1-D ``weight``."""
    return (forward_defined_by(norm, EPS_RMS_NORMS) and isinstance(getattr(norm, "weight", None), torch.Tensor)
            and norm.weight.dim() == 1 and isinstance(getattr(norm, "eps", None), (int, float)))


def is_gated_attention(attn: nn.Module) -> bool:
    """A gated full attention (:data:`GATED_ATTENTIONS`' forward): its projections (``q_proj`` of twice the
    queries' width: query and gate per head), the attributes its forward reads, and zero-centered per-head
    ``q_norm`` / ``k_norm`` (``[head_dim]`` weights) of one epsilon."""
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return (forward_defined_by(attn, GATED_ATTENTIONS)
            and all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "scaling",
                                               "config", "head_dim", "attention_dropout"))
            and getattr(attn.q_proj, "out_features", None)
            == 2 * getattr(attn.config, "num_attention_heads", -1) * attn.head_dim
            and all(is_gemma_rms_norm(n) and n.weight.shape == (attn.head_dim,) for n in (q_norm, k_norm))
            and q_norm.eps == k_norm.eps)


def has_gemma_qk_norm(attn: nn.Module) -> bool:
    """A Gemma 3 attention: transformers' forward (:data:`GEMMA_ATTENTIONS`), its projections, the attributes its
    forward reads, and per-head Gemma ``q_norm`` / ``k_norm`` (``[head_dim]`` weights) of one epsilon."""
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return (forward_defined_by(attn, GEMMA_ATTENTIONS)
            and all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "scaling",
                                               "config", "head_dim", "attention_dropout", "sliding_window"))
            and all(is_gemma_rms_norm(n) and n.weight.shape == (attn.head_dim,) for n in (q_norm, k_norm))
            and q_norm.eps == k_norm.eps)


# Attentions whose q, k, v are one packed projection of the model's own (``qkv_proj``), matched by the class that
# defines forward: PackedRopeAttention
PACKED_ROPE_ATTENTIONS = ("Phi3Attention",)
# Pre-norm decoder layers with a dropout on each sublayer's output: ResidualDropoutDecoderLayer
RESIDUAL_DROPOUT_DECODER_LAYERS = ("Phi3DecoderLayer",)


def is_packed_rope_attention(attn: nn.Module) -> bool:
    """A Phi-3 attention (:data:`PACKED_ROPE_ATTENTIONS`'s forward) with its ``qkv_proj`` and the attributes its
    forward reads."""
    return (forward_defined_by(attn, PACKED_ROPE_ATTENTIONS)
            and all(hasattr(attn, a) for a in ("qkv_proj", "o_proj", "layer_idx", "scaling", "config", "head_dim",
                                               "num_key_value_heads", "attention_dropout")))


def is_residual_dropout_decoder_layer(layer: nn.Module) -> bool:
    """A Phi-3 decoder layer (:data:`RESIDUAL_DROPOUT_DECODER_LAYERS`'s forward): a pre-norm layer
    (:func:`is_pre_norm_decoder_layer`) with ``nn.Dropout`` s ``resid_attn_dropout`` and ``resid_mlp_dropout``."""
    return (forward_defined_by(layer, RESIDUAL_DROPOUT_DECODER_LAYERS)
            and all(isinstance(getattr(layer, a, None), nn.Dropout) for a in ("resid_attn_dropout",
                                                                              "resid_mlp_dropout"))
            and is_pre_norm_decoder_layer(layer, dropouts=True))


def is_gemma4_decoder_layer(layer: nn.Module) -> bool:
    """A Gemma 4 decoder layer (:data:`GEMMA4_DECODER_LAYERS`'s forward) with every attribute
    :class:`Gemma4DecoderLayer` reads: its experts' where ``enable_moe_block``, its per-layer input's where
    ``hidden_size_per_layer_input``."""
    if not (forward_defined_by(layer, GEMMA4_DECODER_LAYERS) and all(hasattr(layer, a) for a in _GEMMA4_LAYER_ATTRS)):
        return False
    return (all(hasattr(layer, a) for a in _GEMMA4_MOE_ATTRS) or not layer.enable_moe_block) and (
        all(hasattr(layer, a) for a in _GEMMA4_PER_LAYER_ATTRS) or not layer.hidden_size_per_layer_input)


def is_sandwich_norm_decoder_layer(layer: nn.Module) -> bool:
    """A Gemma 3 decoder layer (:data:`GEMMA_DECODER_LAYERS`'s forward) with its attention, MLP and four norms."""
    return (forward_defined_by(layer, GEMMA_DECODER_LAYERS)
            and all(hasattr(layer, a) for a in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm",
                                                "pre_feedforward_layernorm", "post_feedforward_layernorm")))


def is_pre_norm_decoder_layer(layer: nn.Module, dropouts: bool = False) -> bool:
    """A decoder layer with exactly the pre-norm residual structure this fusion assumes (no extra norms; no dropout
    on the sublayers' outputs unless ``dropouts``: :class:`ResidualDropoutDecoderLayer` applies them)."""
    norm = getattr(layer, "post_attention_layernorm", None)
    extra = ("pre_feedforward_layernorm", "post_feedforward_layernorm", "residual_multiplier",
             *(() if dropouts else ("resid_attn_dropout", "resid_mlp_dropout")))
    return (type(layer).__name__.endswith("DecoderLayer")
            and all(hasattr(layer, a) for a in ("self_attn", "mlp", "input_layernorm"))
            and not any(hasattr(layer, a) for a in extra)
            and isinstance(getattr(norm, "weight", None), torch.Tensor) and norm.weight.dim() == 1
            and (isinstance(getattr(norm, "variance_epsilon", None), (int, float)) or is_gemma_rms_norm(norm)))


__all__ = ["EPS_RMS_NORMS", "FULL_QK_NORM_ATTENTIONS", "GATED_ATTENTIONS", "GEMMA4_DECODER_LAYERS", "GEMMA_ATTENTIONS",
           "GEMMA_DECODER_LAYERS", "GEMMA_RMS_NORMS", "HYBRID_DECODER_LAYERS", "NOPE_ATTENTIONS",
           "NO_WINDOW_ARGUMENT_ATTENTIONS", "PACKED_ROPE_ATTENTIONS", "POST_NORM_DECODER_LAYERS", "QK_NORM_ATTENTIONS",
           "RESIDUAL_DROPOUT_DECODER_LAYERS", "ROPE_ATTENTIONS", "SOFTCAP_ATTENTIONS", "TEMPERATURE_ATTENTIONS",
           "TOKEN_MIXER_ATTR", "AttentionTraits", "FullQKNormRopeAttention", "FusedAddNormDecoderLayer",
           "GatedQKNormRopeAttention", "Gemma4DecoderLayer", "GemmaQKNormRopeAttention", "HybridDecoderLayer",
           "PackedRopeAttention", "PostNormDecoderLayer", "QKNormRopeAttention", "ResidualDropoutDecoderLayer",
           "RopeAttention", "SandwichNormDecoderLayer", "SinkRopeAttention", "TokenMixer", "attention_traits",
           "forward_defined_by", "gemma_norm_fusable", "has_full_qk_norm", "has_gemma_qk_norm", "has_qk_norm",
           "hybrid_token_mixer", "is_eps_rms_norm", "is_gated_attention", "is_gemma4_decoder_layer",
           "is_gemma_rms_norm", "is_packed_rope_attention", "is_post_norm_decoder_layer", "is_pre_norm_decoder_layer",
           "is_residual_dropout_decoder_layer", "is_rope_attention", "is_sandwich_norm_decoder_layer",
           "is_sink_attention", "register_attention_traits"]
