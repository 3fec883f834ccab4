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
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    return F.gelu(gate) * up


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The W8A8 activation quantization of ``moe_experts(..., fp8_activations=True)``: ``(E4M3 rows, fp32 scales)``
    of a ``[R, C]`` tensor, ``scale = amax / 448`` over the row's finite values (1 for an all-zero row), ``q =
    e4m3(x * (1 / scale))``; a row holding NaN or an infinity gets a NaN scale."""
    xf = x.float()
    finite = xf.isfinite()
    amax = torch.where(finite, xf.abs(), torch.zeros_like(xf)).amax(dim=-1)
    scale = torch.where(amax > 0, torch.clamp(amax / 448.0, min=2.0 ** -126), torch.ones_like(amax))
    q = (xf * (1.0 / scale)[:, None]).to(torch.float8_e4m3fn)
    return q, torch.where(finite.all(dim=-1), scale, torch.full_like(scale, float("nan")))


def _through_fp8_rows(x: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_rows_reference(x)
    return q.to(x.dtype) * scale.to(x.dtype)[:, None]


def moe_experts_reference(hidden, topk_ids, topk_weights, gate_up_proj, gate_up_proj_bias, down_proj,
                          down_proj_bias, activation="swiglu_oai", *, gate_up_layout="interleaved", transposed=True,
                          alpha=1.702, limit=7.0, round_intermediate: torch.dtype | None = None,
                          fp8_activations: bool = False) -> torch.Tensor:
    """``moe_experts`` as a loop over the (token, slot) pairs of each expert, in the inputs' dtype.
    ``round_intermediate``: round the activation to this dtype before the down projection (the kernel rounds it
    to a 16-bit input's dtype). ``fp8_activations``: the token rows and the (rounded) intermediate rows go through
    :func:`quantize_rows_reference` and back first, as W8A8 quantizes them (pass the dequantized FP8 weights)."""
    shape = hidden.shape
    x = hidden.reshape(-1, shape[-1])
    if fp8_activations:
        x = _through_fp8_rows(x)
    ids = topk_ids.reshape(x.shape[0], -1).long()
    w = topk_weights.reshape(x.shape[0], -1).to(x.dtype)
    out = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
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
        if fp8_activations:
            act = _through_fp8_rows(act)
        y = act @ w2.to(x.dtype)
        if down_proj_bias is not None:
            y = y + down_proj_bias[e].to(x.dtype)
        out.index_add_(0, tok, y * w[tok, slot, None])
    return out.reshape(shape)


def moe_reference(hidden, router_weight, router_bias, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                  top_k=4, activation="swiglu_oai", alpha=1.702, limit=7.0, *, gate_up_layout="interleaved",
                  transposed=True, renormalize=True, round_to: torch.dtype | None = None,
                  fp8_activations: bool = False) -> torch.Tensor:
    """``fused_moe`` in PyTorch: ``route_reference`` then ``moe_experts_reference`` (``round_to``: the 16-bit dtype
    whose roundings of the logits and of the activation the kernel reproduces; ``fp8_activations``: W8A8's
    quantization of the activations, see ``moe_experts_reference``)."""
    ids, wts = route_reference(hidden, router_weight, router_bias, top_k, renormalize=renormalize, round_to=round_to)
    return moe_experts_reference(hidden, ids, wts, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                                 activation, gate_up_layout=gate_up_layout, transposed=transposed, alpha=alpha,
                                 limit=limit, round_intermediate=round_to, fp8_activations=fp8_activations)


__all__ = ["align_reference", "moe_experts_reference", "moe_reference", "quantize_rows_reference", "route_reference"]
