"""Forward-only layers for a decoder layer and its attention, swapped in by :func:`triton_ops.patch_model`.

Like :mod:`triton_ops.layers` they hold no state: they read the attributes transformers documents on the module they
replace (``self_attn``, ``mlp``, ``input_layernorm``, ``post_attention_layernorm``; ``q_proj`` ... ``o_proj``,
``q_norm``, ``k_norm``, ``head_dim``, ``scaling``, ``layer_idx``, ``config``). What differs between transformers
releases (the cache argument's name, ``Cache.update``'s signature, how the attention function is looked up) is found
once, from the objects at hand, not from version numbers.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from fused_rmsnorm_rope import fused_add_rmsnorm, fused_qk_norm_rope
from torch import nn
from triton_ops_core.exceptions import InvalidArgumentError

# The keyword arguments naming the KV cache: transformers 5.2x renamed ``past_key_values`` to ``cache``.
_CACHE_NAMES = ("cache", "past_key_values")


class FusedAddNormDecoderLayer(nn.Module):
    """A pre-norm decoder layer whose second residual add runs inside the post-attention RMSNorm.

    ``h = x + attn(norm1(x)); y = h + mlp(norm2(h))``, with ``x + attn`` and ``norm2`` as one
    :func:`~fused_rmsnorm_rope.fused_add_rmsnorm` launch (the sum is rounded to the activation dtype, as the model's
    own add rounds it, and normalized). For Llama, Mistral, Qwen2, Qwen3 decoder layers (attributes ``self_attn``,
    ``mlp``, ``input_layernorm``, ``post_attention_layernorm``; the latter a plain RMSNorm with ``weight`` and
    ``variance_epsilon``). Every keyword argument goes to ``self_attn`` unchanged, as the model's own layer does.
    """

    can_torch_compile = True
    has_backward = True

    self_attn: nn.Module
    mlp: nn.Module
    input_layernorm: nn.Module
    post_attention_layernorm: nn.Module

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise InvalidArgumentError(
                f"{type(self).__name__}: expected the attention's arguments by keyword (as transformers passes "
                f"them), got {len(args)} positional")
        attn_out = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)[0]
        norm = self.post_attention_layernorm
        normed, residual = fused_add_rmsnorm(attn_out, hidden_states, norm.weight, norm.variance_epsilon)
        mlp_out = self.mlp(normed)
        if isinstance(mlp_out, tuple):  # a mixture of experts returns (output, router scores), as gpt-oss's
            mlp_out = mlp_out[0]
        return residual + mlp_out


class QKNormRopeAttention(nn.Module):
    """Qwen3-style attention with the per-head q/k RMSNorm and the rotary embedding in one kernel.

    ``q_norm`` and ``k_norm`` (weights ``[head_dim]``) then RoPE on q and k run as one
    :func:`~fused_rmsnorm_rope.fused_qk_norm_rope` launch instead of transformers' two norms and the rotation's
    element-wise kernels; the projections, the cache update, the attention function the model's config names and
    ``o_proj`` are the model's own.
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
                attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if args:
            raise InvalidArgumentError(
                f"{type(self).__name__}: expected the cache and the rest by keyword, got {len(args)} positional")
        cache = next((kwargs.pop(name) for name in _CACHE_NAMES if name in kwargs), None)
        for name in _CACHE_NAMES:  # both names given (one None): neither goes on to the attention function
            kwargs.pop(name, None)
        cache_position = kwargs.pop("cache_position", None)
        shape = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*shape, -1, self.head_dim)
        k = self.k_proj(hidden_states).view(*shape, -1, self.head_dim)
        v = self.v_proj(hidden_states).view(*shape, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = fused_qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin,
                                  eps=self.q_norm.variance_epsilon)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if cache is not None:
            k, v = _update_cache(cache, k, v, self.layer_idx, cos, sin, cache_position, kwargs)
        attention = _attention_function(type(self), self.config._attn_implementation)
        out, weights = attention(self, q, k, v, attention_mask,
                                 dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling,
                                 sliding_window=getattr(self, "sliding_window", None), **kwargs)
        return self.o_proj(out.reshape(*shape, -1).contiguous()), weights


def _update_cache(cache, k, v, layer_idx: int, cos, sin, cache_position, kwargs: dict) -> tuple:
    """``Cache.update`` as the installed transformers defines it (5.0: a ``cache_kwargs`` dict; later: keywords)."""
    if _takes_cache_kwargs(type(cache)):
        return cache.update(k, v, layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})
    return cache.update(k, v, layer_idx, kwargs=kwargs)


@cache
def _takes_cache_kwargs(cache_cls: type) -> bool:
    return "cache_kwargs" in inspect.signature(cache_cls.update).parameters


def _attention_function(layer_cls: type, implementation: str | None) -> Callable:
    """The attention function transformers would call for this layer: the registered one the config names, else
    the eager function of the layer's own modeling module."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = _eager_attention(layer_cls)
    if implementation in (None, "eager"):
        return eager
    get_interface = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    return get_interface(implementation, eager) if get_interface else ALL_ATTENTION_FUNCTIONS[implementation]


@cache
def _eager_attention(layer_cls: type) -> Callable:
    # The patched class subclasses the model's own attention class: its module has eager_attention_forward.
    for cls in layer_cls.__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    raise InvalidArgumentError(f"{layer_cls.__name__}: its modeling module has no eager_attention_forward")


def has_qk_norm(attn: nn.Module) -> bool:
    """An attention module with per-head ``q_norm`` / ``k_norm`` RMSNorms of one epsilon (Qwen3's)."""
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    head_dim = getattr(attn, "head_dim", None)
    return (all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "scaling", "config"))
            and all(isinstance(getattr(n, "weight", None), torch.Tensor) and n.weight.shape == (head_dim,)
                    and isinstance(getattr(n, "variance_epsilon", None), (int, float)) for n in (q_norm, k_norm))
            and q_norm.variance_epsilon == k_norm.variance_epsilon)


def is_pre_norm_decoder_layer(layer: nn.Module) -> bool:
    """A decoder layer with exactly the pre-norm residual structure this fusion assumes (no extra norms)."""
    norm = getattr(layer, "post_attention_layernorm", None)
    extra = ("pre_feedforward_layernorm", "post_feedforward_layernorm", "residual_multiplier")
    return (type(layer).__name__.endswith("DecoderLayer")
            and all(hasattr(layer, a) for a in ("self_attn", "mlp", "input_layernorm"))
            and not any(hasattr(layer, a) for a in extra)
            and isinstance(getattr(norm, "weight", None), torch.Tensor) and norm.weight.dim() == 1
            and isinstance(getattr(norm, "variance_epsilon", None), (int, float)))


__all__ = ["FusedAddNormDecoderLayer", "QKNormRopeAttention", "has_qk_norm", "is_pre_norm_decoder_layer"]
