"""decode_attention: attention of a few query positions over a KV cache in Triton (decode and speculative
decoding), for grouped-query models (Llama-3, Qwen3, gpt-oss with its attention sinks and sliding windows).

One program per KV head serves all its query heads, so each K/V element is read once per step (no ``repeat_kv``);
the KV length is split over programs when the batch and heads cannot fill the GPU (flash-decoding, with a
deterministic reduce); masked blocks of the cache (a static cache's unused tail, positions outside a sliding window)
are never loaded. See ``decode_attention``; ``decode_attention_reference`` is its PyTorch twin.

``update_kv_cache_`` writes a step's new K and V rows into a static cache in one launch (transformers'
``StaticLayer.update`` makes five); ``shift_kv_cache_`` moves a full sliding-window cache on by one new row in one
launch (transformers' ``StaticSlidingWindowLayer.update`` makes six).
"""

from .__about__ import __version__
from .kv_cache import (
    KVCacheGradientError,
    KVCacheOverflowError,
    shift_kv_cache_,
    update_kv_cache_,
    validate_kv_cache_write,
)
from .ops import DecodeAttentionBackwardError, Tiles, clear_caches, decode_attention
from .reference import attended_positions, decode_attention_reference
from .validation import AttentionInput, validate_decode_attention

__all__ = [
    "AttentionInput",
    "DecodeAttentionBackwardError",
    "KVCacheGradientError",
    "KVCacheOverflowError",
    "Tiles",
    "__version__",
    "attended_positions",
    "clear_caches",
    "decode_attention",
    "decode_attention_reference",
    "shift_kv_cache_",
    "update_kv_cache_",
    "validate_decode_attention",
    "validate_kv_cache_write",
]
