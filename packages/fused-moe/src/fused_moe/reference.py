"""The PyTorch twins of the ops: the same functions in plain PyTorch (cast the inputs to float64 for a reference).

``route_reference`` breaks ties as the kernel does (lowest expert id first, a stable sort), so tests can match
indices exactly; ``align_reference`` gives ``moe_align``'s outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import ExpertGroups, max_tiles


def route_reference(hidden: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None = None,
                    top_k: int = 4, *, renormalize: bool = True,
                    round_to: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_ids int64, topk_weights)`` of ``moe_route``, computed in the inputs' dtype (after rounding the
    logits to ``round_to`` when given, as the kernel rounds them to a 16-bit input's dtype)."""
    logits = F.linear(hidden, router_weight, router_bias)
    if round_to is not None:
        logits = logits.to(round_to).to(hidden.dtype)
    key = torch.where(torch.isnan(logits), torch.full_like(logits, float("-inf")), logits)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :top_k]
    vals = logits.gather(-1, order)
    if renormalize:
        wts = torch.softmax(vals, dim=-1)
    else:
        wts = torch.softmax(logits, dim=-1).gather(-1, order)
    return order, wts


def align_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertGroups:
    """``moe_align``'s outputs, computed with PyTorch on the host's terms (a stable sort of the pairs)."""
    ids = topk_ids.reshape(-1).long().cpu()
    p = ids.numel()
    counts = torch.bincount(ids, minlength=num_experts)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    sorted_pairs = torch.sort(ids, stable=True).indices
    n = max_tiles(p, num_experts, block_m)
    tile_expert = torch.full((n,), -1, dtype=torch.int64)
    tile_start = torch.zeros(n, dtype=torch.int64)
    i = 0
    for e in range(num_experts):
        for start in range(int(offsets[e]), int(offsets[e + 1]), block_m):
            tile_expert[i], tile_start[i] = e, start
            i += 1
    return ExpertGroups(offsets.int(), sorted_pairs.int(), tile_expert.int(), tile_start.int())


def _split(gate_up: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    if layout == "interleaved":
        return gate_up[..., 0::2], gate_up[..., 1::2]
    half = gate_up.shape[-1] // 2
    return gate_up[..., :half], gate_up[..., half:]


def _act(gate: torch.Tensor, up: torch.Tensor, activation: str, alpha: float, limit: float) -> torch.Tensor:
    if activation == "swiglu_oai":
        g = gate.clamp(max=limit)
        u = up.clamp(-limit, limit)
        return g * torch.sigmoid(alpha * g) * (u + 1)
    if activation == "silu":
        return F.silu(gate) * up
    return F.gelu(gate) * up


def moe_experts_reference(hidden, topk_ids, topk_weights, gate_up_proj, gate_up_proj_bias, down_proj,
                          down_proj_bias, activation="swiglu_oai", *, gate_up_layout="interleaved", transposed=True,
                          alpha=1.702, limit=7.0, round_intermediate: torch.dtype | None = None) -> torch.Tensor:
    """``moe_experts`` as a loop over the (token, slot) pairs of each expert, in the inputs' dtype.
    ``round_intermediate``: round the activation to this dtype before the down projection (the kernel rounds it
    to a 16-bit input's dtype)."""
    shape = hidden.shape
    x = hidden.reshape(-1, shape[-1])
    ids = topk_ids.reshape(x.shape[0], -1).long()
    w = topk_weights.reshape(x.shape[0], -1).to(x.dtype)
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        tok, slot = torch.where(ids == e)
        w1 = gate_up_proj[e] if transposed else gate_up_proj[e].t()
        w2 = down_proj[e] if transposed else down_proj[e].t()
        gu = x[tok] @ w1.to(x.dtype)
        if gate_up_proj_bias is not None:
            gu = gu + gate_up_proj_bias[e].to(x.dtype)
        act = _act(*_split(gu, gate_up_layout), activation, alpha, limit)
        if round_intermediate is not None:
            act = act.to(round_intermediate).to(x.dtype)
        y = act @ w2.to(x.dtype)
        if down_proj_bias is not None:
            y = y + down_proj_bias[e].to(x.dtype)
        out.index_add_(0, tok, y * w[tok, slot, None])
    return out.reshape(shape)


def moe_reference(hidden, router_weight, router_bias, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                  top_k=4, activation="swiglu_oai", alpha=1.702, limit=7.0, *, gate_up_layout="interleaved",
                  transposed=True, renormalize=True, round_to: torch.dtype | None = None) -> torch.Tensor:
    """``fused_moe`` in PyTorch: ``route_reference`` then ``moe_experts_reference`` (``round_to``: the 16-bit dtype
    whose roundings of the logits and of the activation the kernel reproduces)."""
    ids, wts = route_reference(hidden, router_weight, router_bias, top_k, renormalize=renormalize, round_to=round_to)
    return moe_experts_reference(hidden, ids, wts, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                                 activation, gate_up_layout=gate_up_layout, transposed=transposed, alpha=alpha,
                                 limit=limit, round_intermediate=round_to)


__all__ = ["align_reference", "moe_experts_reference", "moe_reference", "route_reference"]
