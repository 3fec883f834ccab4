"""Inputs and references shared by the decode-attention tests."""

from __future__ import annotations

import contextlib

import torch
from decode_attention import decode_attention_reference, ops


def make_qkv(b: int, hq: int, hkv: int, sq: int, s: int, d: int, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", seed: int = 0, cache_len: int | None = None,
             layout: str = "bhsd") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``q [B, Hq, Sq, D]`` (a transposed ``[B, Sq, Hq, D]``, as transformers makes it) and ``k``/``v
    [B, Hkv, L, D]`` with ``L = cache_len`` (default ``s``) whose positions ``s..`` hold NaN (a static cache's unused
    tail: it must never be read when masked), stored ``[B, H, L, D]`` (``bhsd``, transformers' caches) or
    ``[B, L, H, D]`` (``bshd``) and viewed as ``[B, H, L, D]``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    total = s if cache_len is None else cache_len

    def cache() -> torch.Tensor:
        full = torch.randn(b, hkv, total, d, generator=g)
        full[:, :, s:] = float("nan")
        full = full.to(device=device, dtype=dtype)
        if layout == "bshd":
            full = full.transpose(1, 2).contiguous().transpose(1, 2)
        return full

    k, v = cache(), cache()
    return q, k, v


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              **kwargs) -> torch.Tensor:
    """``decode_attention_reference`` on float64 copies (sinks too)."""
    if kwargs.get("sinks") is not None:
        kwargs["sinks"] = kwargs["sinks"].double()
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()
    return decode_attention_reference(q.double(), k.double(), v.double(), mask, **kwargs)


def valid_prefix_mask(b: int, sq: int, cache_len: int, lengths: list[int],
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """transformers' decode mask over a static cache: ``[B, 1, Sq, L]``, True on each row's first ``lengths[b]``
    positions (the last ``Sq`` of which are the queries' own, causal among themselves)."""
    mask = torch.zeros(b, 1, sq, cache_len, dtype=torch.bool, device=device)
    for i, n in enumerate(lengths):
        for r in range(sq):
            mask[i, 0, r, : n - sq + r + 1] = True
    return mask


@contextlib.contextmanager
def tiles(block_m: int = 16, block_n: int = 16):
    """Force small tiles (several row blocks and KV steps, splits of a few blocks) on the interpreter."""
    saved = ops._tiles

    def small(rows, head_dim, device):
        return ops.Tiles(block_m, block_n, max(16, 1 << (head_dim - 1).bit_length()), 4, 1)

    ops._tiles = small
    ops.clear_caches()
    try:
        yield
    finally:
        ops._tiles = saved
        ops.clear_caches()
