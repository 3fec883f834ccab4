"""The PyTorch twin of ``decode_attention``: plain softmax attention with the KV heads repeated (cast the inputs to
float64 for a reference). Same conventions: the queries are the last ``Sq`` positions of the keys (causal and
window bounds), masked positions contribute nothing, a row with nothing attended gives zeros, sinks join the
denominator."""

from __future__ import annotations

import math

import torch


def attended_positions(q_len: int, kv_len: int, *, attn_mask: torch.Tensor | None = None,
                       sliding_window: int | None = None, is_causal: bool = False,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Which (query row, key position) pairs attend: bool, broadcastable to ``[B, Hq, Sq, S]``."""
    keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    q_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    cols = torch.arange(kv_len, device=device)[None, :]
    if is_causal:
        keep &= cols <= q_pos
    if sliding_window is not None:
        keep &= cols > q_pos - sliding_window
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = keep & attn_mask
        else:
            # additive masks: -inf or the dtype's lowest finite value (what transformers writes) mask the position
            keep = keep & ~(attn_mask <= torch.finfo(attn_mask.dtype).min)
    return keep


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    is_causal: bool = False,
    softcap: float | None = None,
) -> torch.Tensor:
    """``decode_attention``'s result, ``[B, Sq, Hq, D]``, computed in ``q``'s dtype with plain PyTorch.

    ``softmax(q k^T * scale + additive mask)`` over the attended positions (see ``attended_positions``), with the
    sink logit ``sinks[h]`` (if given) in the denominator only, times ``v``; KV heads repeated ``Hq / Hkv`` times.
    ``softcap``: the scaled logits ``x`` become ``softcap * tanh(x / softcap)`` before the mask is added.
    K and V at positions that no query row of their KV head attends count as zeros (the kernel never reads them).
    """
    b, hq, sq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    group = hq // hkv
    keep = attended_positions(sq, s, attn_mask=attn_mask, sliding_window=sliding_window, is_causal=is_causal,
                              device=q.device).expand(b, hq, sq, s)
    # positions no query row of a KV head attends are never read (whatever they hold: an unused cache tail)
    read = keep.reshape(b, hkv, group * sq, s).any(dim=2)[..., None]
    k = torch.where(read, k, torch.zeros((), dtype=k.dtype, device=k.device)).repeat_interleave(group, dim=1)
    v = torch.where(read, v, torch.zeros((), dtype=v.dtype, device=v.device)).repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        logits = logits + attn_mask.to(logits.dtype)
    logits = logits.masked_fill(~keep, float("-inf"))
    # the row max over the attended logits and the sink (a row with neither keeps 0: its terms are all zero)
    row_max = logits.amax(dim=-1, keepdim=True)
    if sinks is not None:
        row_max = torch.maximum(row_max, sinks.to(logits.dtype).view(1, hq, 1, 1))
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(logits - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sinks.to(logits.dtype).view(1, hq, 1, 1) - row_max)
    num = torch.matmul(weights, v)
    out = torch.where(denom == 0, torch.zeros_like(num), num / denom)
    return out.transpose(1, 2).contiguous()


__all__ = ["attended_positions", "decode_attention_reference"]
