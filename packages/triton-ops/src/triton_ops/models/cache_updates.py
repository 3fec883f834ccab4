"""How a patched attention updates transformers' KV cache: one launch of ours where the cache is a static one.

- ``StaticLayer`` (full attention): the step's rows written, and rotated with their queries where the rotary tables
  allow, in one :func:`~decode_attention.update_kv_cache_` launch (:func:`static_layer_update`).
- ``StaticSlidingWindowLayer`` once its window is full, one new row per step: a **ring buffer**
  (:func:`ring_layer_update`). The row overwrites the window's oldest row in place (one launch, with the rotation
  where the tables allow) and nothing else moves, where transformers' update rolls the whole window (six launches,
  each over all of it) and :func:`~decode_attention.shift_kv_cache_` moves it in one launch (still every byte of
  it, read and written, per layer and step: 358 us of Gemma 3 12B's 8.2 ms batch-1 step on the H200, 2.9 ms of
  its 11.8 ms at batch 8, session 25). The rows then sit in slot order, not in age order; softmax attention does
  not depend on the order of its positions, only the mask does, which transformers builds oldest first. The ring's
  start (the layer's ``cumulative_length`` tensor, which transformers leaves unused once the window is full, read
  on the device) goes to the attention with it: ``decode_attention`` reads the mask in age order
  (``ring_start``); sdpa and eager attention get the mask reordered to slot order (one gather). transformers 5.0's
  sliding layer keeps no device counter: there the window moves on by the shift (:func:`ring_available`).
- Anything else (several new rows into a full window, a gradient to record, another attention function, offloaded
  or other cache classes): the window is put back in age order first if it was a ring (:func:`settle_ring`), then
  transformers' own update, or the shift where that takes it.

transformers' classes are recognised once, in eager code, by reading their update's source (``prime_*``): a
release whose update reads otherwise keeps its own.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch
from decode_attention import shift_kv_cache_, update_kv_cache_
from triton_ops_core.device import can_run_on

from .attention_backend import slot_order_mask, triton_ops_attention_forward

# On: a full sliding window takes each decode step's row as a ring buffer (:func:`ring_layer_update`). Set False to
# move the window on by one row each step instead (shift_kv_cache_), which ``benchmarks.bench_model``'s ``-shift``
# variants time.
SLIDING_RING = True
SHIPPED_SLIDING_RING = SLIDING_RING  # as shipped, read at import: whoever sets it for a measurement puts it back
# The attention implementations a ring suits: they apply the mask they are given, and nothing else of theirs
# depends on the order of the positions (ours reads the mask in age order, sdpa and eager get it reordered).
# Flash and flex attention take no such mask: their windows stay in age order.
RING_ATTENTIONS = ("triton_ops", "sdpa", "eager")
# Set on a StaticSlidingWindowLayer while its window is a ring (slot order), cleared when put back in age order.
RING_ATTR = "_triton_ops_ring"


def update_cache(cache, k, v, layer_idx: int, cos, sin, cache_position, kwargs: dict,
                 ring_ok: bool = False) -> tuple:
    """``Cache.update`` as the installed transformers defines it (5.0: a ``cache_kwargs`` dict; later: keywords),
    or, for an initialized ``StaticLayer``, the same write in one launch (:func:`static_layer_update`), and for a
    full ``StaticSlidingWindowLayer`` taking one row, a ring write (:func:`ring_layer_update`, where ``ring_ok``:
    the attention function suits it, :func:`ring_suits`) or its shift (:func:`_sliding_layer_update`), each one
    launch. Returns ``(keys, values, ring_start)``: ``ring_start`` the ring's device counter where the keys are in
    slot order (:func:`ring_attention_args`), else None."""
    written = static_layer_update(cache, k, v, layer_idx, cache_position)
    if written is not None:
        return (*written, None)
    if ring_ok:
        written = ring_layer_update(cache, k, v, layer_idx)
        if written is not None:
            return written
    settle_ring(cache, layer_idx)  # what writes next expects the window in age order
    written = _sliding_layer_update(cache, k, v, layer_idx)
    if written is not None:
        return (*written, None)
    if _takes_cache_kwargs(type(cache)):
        return (*cache.update(k, v, layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position}), None)
    return (*cache.update(k, v, layer_idx, kwargs=kwargs), None)


def write_rotated(cache, k, v, layer_idx: int, cache_position, rope: tuple, qk_norm: tuple | None,
                  ring_ok: bool) -> tuple | None:
    """The cache write that also rotates q and k (``rope``: ``(q, cos, sin)``, after ``qk_norm`` if given), in one
    launch: a ``StaticLayer``'s (:func:`static_layer_update`) or a full sliding window's ring
    (:func:`ring_layer_update`, where ``ring_ok``). ``(keys, values, ring_start or None)``, or None (nothing
    written or rotated)."""
    written = static_layer_update(cache, k, v, layer_idx, cache_position, rope=rope, qk_norm=qk_norm)
    if written is not None:
        return (*written, None)
    if ring_ok:
        return ring_layer_update(cache, k, v, layer_idx, rope=rope, qk_norm=qk_norm)
    return None


def ring_available() -> bool:
    """Whether the installed transformers' ``StaticSlidingWindowLayer`` can be a ring: its update counts with a
    python int (``cumulative_length_int``, transformers 5.1x on) and leaves its device counter ``cumulative_length``
    unused once the window is full, which then holds the ring's start. transformers 5.0's layer has no device
    counter: its full windows move on by the shift instead. Eager code (it may read transformers' source)."""
    return prime_sliding_shift() == "cumulative_length_int"


def ring_suits(implementation: str | None, attention_mask: object) -> bool:
    """Whether a sliding window may be a ring for this call: on (``SLIDING_RING``), an attention implementation of
    ``RING_ATTENTIONS`` (None: eager), a tensor mask or none."""
    return SLIDING_RING and (implementation is None or implementation in RING_ATTENTIONS) \
        and (attention_mask is None or isinstance(attention_mask, torch.Tensor))


def ring_attention_args(attention: Callable, attention_mask: torch.Tensor | None, ring_start: torch.Tensor,
                        kwargs: dict) -> tuple[torch.Tensor | None, dict]:
    """The mask and keywords for ``attention`` over a ring's keys (slot order): ours takes the ring's start
    (``kv_ring_start``) and reads the mask in age order itself; any other gets the mask reordered to slot order."""
    if attention is triton_ops_attention_forward:
        return attention_mask, {**kwargs, "kv_ring_start": ring_start}
    if attention_mask is None:
        return None, kwargs
    return slot_order_mask(attention_mask, ring_start), kwargs


# Per-class answers, in plain dicts: torch.compile traces a dict lookup, and warns about functools.cache wrappers.
_CACHE_KWARGS: dict[type, bool] = {}
_STATIC_WRITE: dict[type, str] = {}  # "length", "positions" or "" (not a layer we write ourselves)


def static_write_kind(layer_cls: type) -> str:
    """How transformers' own ``StaticLayer.update`` places new rows: ``"length"`` (5.2x: at its device counter
    ``cumulative_length``, then advanced), ``"positions"`` (5.0: at ``cache_position``), or ``""``: any other class
    (subclasses included: sliding windows roll, offloaded or quantized layers move their tensors), or an ``update``
    whose source names neither (a release we do not know keeps its own update).

    Read from the class once, in eager code (:func:`prime_static_write` runs from ``patch_model``): under
    torch.compile the class is recognised by name alone, without an import (Dynamo refuses transformers' lazy module,
    a graph break) or ``inspect``; a StaticLayer not read yet then keeps transformers' own update."""
    return _layer_answer(_STATIC_WRITE, "StaticLayer", _static_write_from, layer_cls)


def prime_static_write(layer_cls: type | None = None) -> str:
    """Read (once) how ``layer_cls`` (default: transformers' ``StaticLayer``) writes new rows; see
    :func:`static_write_kind`. Eager code only: it imports and reads source."""
    return _prime_layer_answer(_STATIC_WRITE, "StaticLayer", _static_write_from, layer_cls)


def _static_write_from(layer_cls: type, source: str) -> str:
    if "cache_kwargs" in inspect.signature(layer_cls.update).parameters:
        return "positions" if "cache_position" in source else ""
    return "length" if "cumulative_length.add_(" in source else ""


_SLIDING_SHIFT: dict[type, str] = {}  # the layer's python-int length counter's name, or "" (not ours to write)


def _sliding_counter(layer_cls: type) -> str:
    """The name of the python-int length counter by which transformers' own ``StaticSlidingWindowLayer.update``
    decides that its window is full (``"cumulative_length_int"`` from 5.2x, ``"cumulative_length"`` in 5.0), where
    that update rolls the full window by one for one new row (``roll(-1``); ``""`` for any other class, subclasses
    included, or a release whose update reads otherwise. Read once in eager code (:func:`prime_sliding_shift` runs
    from ``patch_model``); under torch.compile a class not read yet keeps transformers' own update."""
    return _layer_answer(_SLIDING_SHIFT, "StaticSlidingWindowLayer", _sliding_counter_from, layer_cls)


def prime_sliding_shift(layer_cls: type | None = None) -> str:
    """Read (once) ``layer_cls``'s update (default: transformers' ``StaticSlidingWindowLayer``); see
    :func:`_sliding_counter`. Eager code only: it imports and reads source."""
    return _prime_layer_answer(_SLIDING_SHIFT, "StaticSlidingWindowLayer", _sliding_counter_from, layer_cls)


def _sliding_counter_from(layer_cls: type, source: str) -> str:
    if "roll(-1" in source and "key_states.shape[-2] == 1" in source and ">= self.max_cache_len" in source:
        return next((c for c in ("cumulative_length_int", "cumulative_length") if f"self.{c} += " in source), "")
    return ""


def _layer_answer(table: dict, class_name: str, read: Callable[[type, str], str], layer_cls: type) -> str:
    """``table``'s answer for ``layer_cls``, read from its source the first time (:func:`_prime_layer_answer`) if it
    is transformers' ``class_name`` itself and this is eager code: under torch.compile the class is recognised by
    name alone, without an import (Dynamo refuses transformers' lazy module, a graph break) or ``inspect``; a class
    not read yet then keeps transformers' own update (``""``)."""
    answer = table.get(layer_cls)
    if answer is not None:
        return answer
    if layer_cls.__name__ != class_name or layer_cls.__module__ != "transformers.cache_utils" \
            or torch.compiler.is_compiling():
        return ""
    return _prime_layer_answer(table, class_name, read, layer_cls)


def _prime_layer_answer(table: dict, class_name: str, read: Callable[[type, str], str],
                        layer_cls: type | None) -> str:
    """Read (once) ``read(layer_cls, source of its update)`` into ``table``; ``layer_cls`` defaults to
    transformers' ``class_name`` (``""`` for a release without it)."""
    if layer_cls is None:
        layer_cls = getattr(importlib.import_module("transformers.cache_utils"), class_name, None)
        if layer_cls is None:
            return ""
    answer = table.get(layer_cls)
    if answer is not None:
        return answer
    try:
        source = inspect.getsource(layer_cls.update)
    except (OSError, TypeError):
        source = ""
    table[layer_cls] = answer = read(layer_cls, source)
    return answer


def _full_window_taking_a_row(cache, k, v, layer_idx: int):
    """``(layer, counter, length)`` for a full ``StaticSlidingWindowLayer`` (as transformers' own, read by
    :func:`_sliding_counter`) taking one new row that a launch of ours can write: no offloading, no gradient to
    record, a device Triton runs on, the cache's dtypes, unit last strides. None otherwise (transformers' own update
    runs: a window not full yet, several new rows, another layer class)."""
    layers = getattr(cache, "layers", None)
    if layers is None or getattr(cache, "offloading", False) or not 0 <= layer_idx < len(layers) or k.shape[-2] != 1:
        return None
    layer = layers[layer_idx]
    counter = _sliding_counter(type(layer))
    if not counter or not getattr(layer, "is_initialized", False):
        return None
    length = getattr(layer, counter, None)
    if type(length) is not int or length < layer.max_cache_len:
        return None
    keys, values = layer.keys, layer.values
    if (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)) or not can_run_on(keys.device) \
            or keys.dtype != k.dtype or values.dtype != v.dtype or keys.shape[-2] != layer.max_cache_len \
            or k.stride(-1) != 1 or v.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        return None
    return layer, counter, length


def _sliding_layer_update(cache, k, v, layer_idx: int) -> tuple | None:
    """A full ``StaticSlidingWindowLayer`` taking one new row, as one :func:`~decode_attention.shift_kv_cache_`
    launch: the window moves on by the row (transformers' update rolls it with six launches, each over the whole
    window), and the layer's length counter advances as transformers' advances it. None where transformers' own
    update must run (:func:`_full_window_taking_a_row`). The window must be in age order (:func:`settle_ring`)."""
    full = _full_window_taking_a_row(cache, k, v, layer_idx)
    if full is None:
        return None
    layer, counter, length = full
    shift_kv_cache_(layer.keys, layer.values, k, v)
    setattr(layer, counter, length + 1)
    return layer.keys, layer.values


def ring_layer_update(cache, k, v, layer_idx: int, rope: tuple | None = None,
                      qk_norm: tuple | None = None) -> tuple | None:
    """A full ``StaticSlidingWindowLayer`` taking one new row as a ring buffer: one
    :func:`~decode_attention.update_kv_cache_` launch (``ring=True``, rotating q and k first with ``rope`` /
    ``qk_norm`` as :func:`static_layer_update` does) writes the row over the window's oldest, in place, and advances
    the ring's start; the layer's python length counter advances as transformers' does. The start is the layer's
    ``cumulative_length`` tensor, which transformers reads only while the window fills (transformers 5.1x-5.2x),
    set to 0 when a window in age order becomes a ring. Returns ``(keys, values, ring_start)``, or None where a
    ring cannot take the row (:func:`_full_window_taking_a_row`, no such counter): then nothing was written or
    rotated."""
    full = _full_window_taking_a_row(cache, k, v, layer_idx)
    if full is None:
        return None
    layer, counter, length = full
    start = getattr(layer, "cumulative_length", None)
    if counter != "cumulative_length_int" or not isinstance(start, torch.Tensor) or start.numel() != 1 \
            or start.device != layer.keys.device or start.dtype not in (torch.int32, torch.int64):
        return None
    if not getattr(layer, RING_ATTR, False):
        start.zero_()  # the window is in age order, its oldest row at slot 0: the ring starts there
        setattr(layer, RING_ATTR, True)
    update_kv_cache_(layer.keys, layer.values, k, v, length=start, ring=True, **_rope_kwargs(rope, qk_norm))
    setattr(layer, counter, length + 1)
    return layer.keys, layer.values, start


def settle_ring(cache, layer_idx: int) -> None:
    """Put a ring's window back in age order (one gather of it), for an update that expects it so (transformers'
    own, the shift); a layer that is not a ring is left alone. A ring whose layer was reset (not full any more)
    holds nothing to keep."""
    layers = getattr(cache, "layers", None)
    if layers is None or not 0 <= layer_idx < len(layers):
        return
    layer = layers[layer_idx]
    if not getattr(layer, RING_ATTR, False):
        return
    setattr(layer, RING_ATTR, False)
    counter = _sliding_counter(type(layer))
    if not counter or getattr(layer, counter, 0) < layer.max_cache_len:
        return
    for name in ("keys", "values"):
        window = getattr(layer, name)
        size = window.shape[-2]
        order = torch.remainder(torch.arange(size, device=window.device) + layer.cumulative_length.reshape(()), size)
        window.copy_(window.index_select(-2, order))


def fusable_tables(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qk_norm: tuple | None) -> bool:
    """Whether the cache write can rotate (and normalize) q and k itself: transformers' ``[B or 1, T, head_dim]``
    tables (the rotation over the whole head dim), ``[head_dim]`` norm weights of k's dtype family. A partial rotary
    dim, other tables or other weights take the separate launch."""
    b, t, _, d = k.shape
    tables = (cos.dim() == 3 and cos.shape[0] in (1, b) and tuple(cos.shape[1:]) == (t, d)
              and cos.shape == sin.shape and cos.stride() == sin.stride() and cos.stride(-1) == 1 and d % 2 == 0)
    if not tables or qk_norm is None:
        return tables
    return all(isinstance(w, torch.Tensor) and tuple(w.shape) == (d,) and w.stride() == (1,)
               and w.device == k.device for w in qk_norm[:2])


def static_layer_update(cache, k, v, layer_idx: int, cache_position, rope: tuple | None = None,
                         qk_norm: tuple | None = None) -> tuple | None:
    """``StaticLayer.update`` of an initialized layer as one :func:`~decode_attention.update_kv_cache_` launch
    (transformers' makes five: ``arange``, two counter adds, two ``index_copy_``), the same rows at the same
    positions and the counter advanced alike; with ``rope`` (``(q, cos, sin)``) the same launch first rotates q and
    k in place (the cache receives the rotated k), after normalizing each head with ``qk_norm``'s weights if given.
    None where transformers' own update must run (another layer
    class, a first call that allocates the cache, offloading, a gradient to record, a device Triton does not run
    on): then nothing was rotated either."""
    layers = getattr(cache, "layers", None)
    if layers is None or getattr(cache, "offloading", False) or not 0 <= layer_idx < len(layers):
        return None
    layer = layers[layer_idx]
    kind = static_write_kind(type(layer))
    if not kind or not getattr(layer, "is_initialized", False):
        return None
    keys, values = layer.keys, layer.values
    if (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)) or not can_run_on(keys.device) \
            or keys.dtype != k.dtype or values.dtype != v.dtype:
        return None
    if kind == "length":
        length = getattr(layer, "cumulative_length", None)
        if not isinstance(length, torch.Tensor) or length.device != keys.device:
            return None
        return update_kv_cache_(keys, values, k, v, length=length, **_rope_kwargs(rope, qk_norm))
    if cache_position is None:
        return None
    return update_kv_cache_(keys, values, k, v, positions=cache_position, **_rope_kwargs(rope, qk_norm))


def _rope_kwargs(rope: tuple | None, qk_norm: tuple | None) -> dict:
    kwargs = {} if rope is None else dict(zip(("q", "cos", "sin"), rope, strict=True))
    if qk_norm is not None:
        kwargs.update(zip(("q_norm_weight", "k_norm_weight", "eps", "gemma"), qk_norm, strict=True))
    return kwargs


def _takes_cache_kwargs(cache_cls: type) -> bool:
    takes = _CACHE_KWARGS.get(cache_cls)
    if takes is None:
        takes = _CACHE_KWARGS[cache_cls] = "cache_kwargs" in inspect.signature(cache_cls.update).parameters
    return takes
