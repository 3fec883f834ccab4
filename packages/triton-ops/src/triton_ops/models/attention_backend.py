"""``decode_attention`` as a transformers attention backend: ``register_attention_backend()``, then
``model.set_attn_implementation("triton_ops")``.

transformers' sdpa path expands the KV cache from ``Hkv`` to ``Hq`` heads (``repeat_kv``) in every layer whenever a
mask is passed or the model is compiled, and reads a static cache's whole length; ``decode_attention`` reads each
K/V element once and skips the masked tail. This module gives it transformers' attention-interface signature
(``AttentionInterface``) and registers transformers' own ``sdpa_mask`` as the mask of the same name
(``AttentionMaskInterface``, through :func:`triton_ops_mask`, which also leaves out a plain causal mask while
``torch.compile`` traces): the backend receives the bool masks sdpa does (or None where sdpa would rely on
``is_causal``).

Which calls run ``decode_attention`` (the rest go to transformers' ``sdpa_attention_forward``, or, for gpt-oss's
sinks, which sdpa cannot take, to the model's own ``eager_attention_forward``):

- at most ``MAX_QUERY_LEN`` (16) query positions (decode, speculative decoding, short prompts), or any length with
  attention sinks (``s_aux``: gpt-oss), since the fallback would be eager attention; with sinks, not several new
  tokens after a cache (a mismatch seen on the H200, under investigation: those go to eager attention);
- no dropout, no position bias, no gradient to record (the op is forward-only), tensors on a device Triton runs on
  here, a bool or float mask (or None). Logit softcapping (Gemma 2's ``softcap``) runs inside the kernel; a call
  with softcapping that falls back goes to the model's own eager attention, as with sinks (transformers' sdpa
  function drops ``softcap``: a model that runs eager attention for it would silently lose the cap).

The ``sliding_window`` argument is not applied by the kernel: transformers' mask already encodes the window, in the
cache's own positions (a sliding-window cache rolls, so an index-based window would be wrong), as sdpa relies on.
A patched model's full sliding windows are ring buffers (``triton_ops.models.cache_updates``): their keys come in slot
order with ``kv_ring_start``, the ring's device counter, and the mask (oldest first, as transformers builds it) is
read in age order by the kernel (``decode_attention``'s ``ring_start``), or reordered to slot order
(:func:`slot_order_mask`) for a fallback.
Without a mask and with more than one query, the call is causal as sdpa makes it (``module.is_causal``, upper-left
aligned: with a longer cache, as in a static cache's prefill, the keys past the queries are dropped first).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
from decode_attention import decode_attention
from triton_ops_core.device import can_run_on
from triton_ops_core.exceptions import InvalidArgumentError

ATTENTION_NAME = "triton_ops"
MAX_QUERY_LEN = 16
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MASK_DTYPES = (torch.bool, *_DTYPES)
_MAX_HEAD_DIM = 256


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _ours(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: object, dropout: float,
          s_aux: torch.Tensor | None, kwargs: dict) -> bool:
    """Whether ``decode_attention`` takes this call (everything else falls back)."""
    if query.shape[2] > MAX_QUERY_LEN and s_aux is None:
        return False
    if s_aux is not None and 1 < query.shape[2] < key.shape[2]:
        # several new tokens after a cache, with sinks (gpt-oss speculative steps): on the H200 the logits of a
        # 3-token step left transformers' eager attention by up to 26 % (not seen on the CPU); eager until fixed
        return False
    if dropout or kwargs.get("position_bias") is not None or not _softcap_ok(kwargs.get("softcap")):
        return False
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.dtype not in _MASK_DTYPES
                                       or attention_mask.shape[-1] != key.shape[2]):
        return False
    if query.dtype not in _DTYPES or query.shape[-1] > _MAX_HEAD_DIM or key.shape[-1] != query.shape[-1]:
        return False
    if value.shape != key.shape or query.shape[1] % key.shape[1]:
        return False
    return can_run_on(query.device) and not _needs_grad(query, key, value, s_aux)


def _softcap_ok(softcap: object) -> bool:
    """A softcap ``decode_attention`` takes: None, or a finite number > 0 (anything else falls back)."""
    return softcap is None or (isinstance(softcap, (int, float)) and not isinstance(softcap, bool)
                               and math.isfinite(softcap) and softcap > 0)


def _model_eager(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float, scaling: float | None, causal: bool,
                 kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own eager attention (gpt-oss's takes the sinks, Gemma 2's the softcap), given the additive mask
    it expects."""
    # along the MRO: patch_model's attention classes subclass the model's own (their modules have none)
    eager: Callable | None = next((f for f in (getattr(sys.modules.get(c.__module__), "eager_attention_forward", None)
                                              for c in type(module).__mro__) if f is not None), None)
    if eager is None:
        raise InvalidArgumentError(
            f"{type(module).__name__}: attention sinks (s_aux) or logit softcapping that decode_attention cannot "
            "take (dropout, a gradient, a long prompt, or a device Triton does not run on) need the model's "
            "eager_attention_forward, and its modeling module has none")
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None and causal:
        rows = torch.arange(q_len, device=query.device)[:, None]
        attention_mask = torch.arange(kv_len, device=query.device)[None, :] <= rows  # sdpa's upper-left causal
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        low = torch.finfo(query.dtype).min
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        attention_mask = torch.where(attention_mask, zero, torch.full((), low, dtype=query.dtype,
                                                                      device=query.device))
        attention_mask = attention_mask.expand(query.shape[0], 1, q_len, kv_len)
    if kwargs.get("softcap") is None:
        kwargs.pop("softcap", None)
    if kwargs.get("s_aux") is None:
        kwargs.pop("s_aux", None)
    return eager(module, query, key, value, attention_mask, dropout=dropout,
                 scaling=module.scaling if scaling is None else scaling, **kwargs)


def triton_ops_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface function (``ALL_ATTENTION_FUNCTIONS["triton_ops"]``).

    Args:
        module: the attention module (its ``is_causal`` is read, and its modeling module's
            ``eager_attention_forward`` for a fallback with sinks).
        query: ``[B, Hq, Sq, D]``; key, value: ``[B, Hkv, S, D]`` (the cache's tensors as they are).
        attention_mask: what ``sdpa_mask`` makes (registered under the same name): a bool ``[B, 1, Sq, S]``
            mask, or None where no mask is needed (then causal when ``Sq > 1``).
        dropout, scaling: as transformers passes them; ``scaling`` None is ``1 / sqrt(D)``.
        sliding_window: ignored (the mask encodes the window, see the module's docstring).
        s_aux: gpt-oss's attention sinks ``[Hq]``, joining the softmax denominator.
        softcap (keyword): Gemma 2's logit softcapping (``c * tanh(logit / c)`` before the mask).
        kv_ring_start (keyword): where ``key`` / ``value`` are a ring buffer (a patched model's full sliding window),
            its device counter: the oldest entry sits at slot ``kv_ring_start % S`` while the mask is oldest first.

    Returns:
        ``(attn_output [B, Sq, Hq, D] contiguous, None)``, as transformers' sdpa function returns.
    """
    ring_start = kwargs.pop("kv_ring_start", None)
    is_causal = kwargs.pop("is_causal", None)
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    q_len = query.shape[2]
    causal = bool(is_causal) and attention_mask is None and q_len > 1
    if _ours(query, key, value, attention_mask, dropout, s_aux, kwargs):
        if causal and key.shape[2] > q_len:
            # sdpa's is_causal is upper-left aligned: the keys past the queries are never attended (a static
            # cache's prefill); dropping them makes it decode_attention's bottom-right causal
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        out = decode_attention(query, key, value, attention_mask, scale=scaling, sinks=s_aux, is_causal=causal,
                               ring_start=ring_start if attention_mask is not None else None,
                               softcap=kwargs.get("softcap"))
        return out, None
    if ring_start is not None and attention_mask is not None:
        attention_mask = slot_order_mask(attention_mask, ring_start)
    if s_aux is not None or kwargs.get("softcap") is not None:
        out, _ = _model_eager(module, query, key, value, attention_mask, dropout, scaling, causal,
                              {**kwargs, "s_aux": s_aux, "sliding_window": sliding_window})
        return out, None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, sliding_window=sliding_window, **kwargs)


def slot_order_mask(attention_mask: torch.Tensor, ring_start: torch.Tensor) -> torch.Tensor:
    """A mask whose last dimension is in age order (oldest first, as transformers builds a sliding window's),
    reordered for keys that sit in a ring buffer's slot order, the oldest at slot ``ring_start % S``: column ``j``
    of the result is column ``(j - ring_start) % S`` of ``attention_mask``. One gather, on the device."""
    size = attention_mask.shape[-1]
    order = torch.remainder(torch.arange(size, device=attention_mask.device) - ring_start.reshape(()), size)
    return attention_mask.index_select(-1, order)


def triton_ops_mask(*args, **kwargs) -> torch.Tensor | None:
    """The mask function registered beside the backend: transformers' ``sdpa_mask``, except that a plain causal
    call (as many keys as queries, no padding mask, no window, the causal skip allowed) returns None also while
    ``torch.compile`` traces.

    transformers before 5.25 never skips the mask while tracing (``_ignore_causal_mask_sdpa`` guards against
    ``torch.export`` hard-coding ``is_causal``; 5.25 relaxes it), so a compiled prefill into an empty
    ``DynamicCache`` gets a ``[B, 1, S, S]`` mask, and sdpa leaves its causal flash kernel for a masked one that
    reads the mask and skips no block. The conditions read only shapes and Python values, which dynamo guards
    (and ``torch.export`` specializes or constrains; there is no test of ``torch.compiler.is_exporting()``, which
    dynamo answers True while compiling before torch 2.14, as transformers 5.25 notes). With ``q_length ==
    kv_length`` and nothing padded or windowed, the mask is exactly the causal one, upper-left and lower-right
    alike, so dropping it computes what it computes, for every input the traced graph accepts. A symbolic length
    (dynamic shapes) is not an int: such a call keeps its mask. Everything else goes to ``sdpa_mask`` unchanged.
    """
    from transformers.masking_utils import sdpa_mask

    if args or not _plain_causal(kwargs):
        return sdpa_mask(*args, **kwargs)
    return None


def _plain_causal(kwargs: dict) -> bool:
    """Whether a mask call (transformers' keywords) is the plain causal mask of as many keys as queries."""
    from transformers.masking_utils import causal_mask_function

    kv_offset = kwargs.get("kv_offset", 0)
    q_length, kv_length = kwargs.get("q_length"), kwargs.get("kv_length")
    cache_position = kwargs.get("cache_position")
    if q_length is None and isinstance(cache_position, torch.Tensor):  # transformers before 5.1x: the queries' slots
        q_length = cache_position.shape[0]
    return (kwargs.get("allow_is_causal_skip", True) and kwargs.get("attention_mask") is None
            and kwargs.get("local_size") is None and kwargs.get("mask_function", causal_mask_function)
            is causal_mask_function and isinstance(kv_offset, int) and kv_offset == 0
            and isinstance(q_length, int) and q_length > 1 and q_length == kv_length)


def register_attention_backend(name: str = ATTENTION_NAME) -> str:
    """Register ``triton_ops_attention_forward`` with transformers under ``name`` (default ``"triton_ops"``), and
    :func:`triton_ops_mask` (transformers' ``sdpa_mask``, which also skips a plain causal mask under
    ``torch.compile``) as that name's mask function. Returns ``name``.

    Then ``model.set_attn_implementation("triton_ops")`` (transformers 5.0 to 5.25 at least; also at load time,
    ``from_pretrained(..., attn_implementation="triton_ops")``) routes every attention layer through it. Setting
    ``model.config._attn_implementation = "triton_ops"`` works too, without transformers' checks. Idempotent.
    """
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"name: expected a non-empty str, got {name!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, triton_ops_attention_forward)
    AttentionMaskInterface.register(name, triton_ops_mask)
    return name


__all__ = ["ATTENTION_NAME", "MAX_QUERY_LEN", "register_attention_backend", "slot_order_mask",
           "triton_ops_attention_forward", "triton_ops_mask"]
