"""Pure-PyTorch references of the ops, with the same arguments and semantics: used by tests and benchmarks.

They compute in fp32 (in float64 when given float64 tensors, which is what the tests do) and return the input's
dtype. They are differentiable by autograd, which the gradient tests compare the Triton backward against.
"""

from __future__ import annotations

import torch


def rotate(v: torch.Tensor, layout: str = "neox") -> torch.Tensor:
    """``rotate_half`` of the last dim: neox ``(-v2, v1)`` on halves, interleaved ``(-v_odd, v_even)`` on pairs."""
    if layout == "interleaved":
        return torch.stack((-v[..., 1::2], v[..., 0::2]), dim=-1).flatten(-2)
    half = v.shape[-1] // 2
    return torch.cat((-v[..., half:], v[..., :half]), dim=-1)


def gather_tables(cos: torch.Tensor, sin: torch.Tensor, lead: tuple[int, ...],
                  position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin per token, broadcastable to ``[*lead, rot]`` (``lead`` ends in seq)."""
    if cos.dim() == 3:
        batch = 1
        for d in lead[:-1]:
            batch *= d
        if cos.shape[0] == batch and len(lead) > 1:
            return cos.reshape(*lead, cos.shape[-1]), sin.reshape(*lead, sin.shape[-1])
        return cos[0], sin[0]
    if position_ids is None:
        return cos, sin
    return cos[position_ids.long()], sin[position_ids.long()]


def apply_rope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
               layout: str = "neox") -> torch.Tensor:
    """``y * cos + rotate(y) * sin`` on the first ``rotary_dim`` elements of the last dimension; the rest passes."""
    c, s = cos[..., :rotary_dim], sin[..., :rotary_dim]
    yr = y[..., :rotary_dim]
    out = yr * c + rotate(yr, layout) * s
    if rotary_dim == y.shape[-1]:
        return out
    return torch.cat((out, y[..., rotary_dim:]), dim=-1)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rmsnorm_rope_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float = 1e-6,
    *,
    position_ids: torch.Tensor | None = None,
    rotary_dim: int | None = None,
    head_dim: int | None = None,
    layout: str = "neox",
    gemma: bool = False,
) -> torch.Tensor:
    """Reference of ``fused_rmsnorm_rope`` (same arguments)."""
    ct = _compute_dtype(x)
    head_dim = cos.shape[-1] if head_dim is None else head_dim
    rotary_dim = cos.shape[-1] if rotary_dim is None else rotary_dim
    xf = x.to(ct)
    w = weight.to(ct) + 1.0 if gemma else weight.to(ct)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w
    c, s = gather_tables(cos.to(ct), sin.to(ct), tuple(x.shape[:-1]), position_ids)
    heads = y.view(*y.shape[:-1], y.shape[-1] // head_dim, head_dim)
    out = apply_rope(heads, c.unsqueeze(-2), s.unsqueeze(-2), rotary_dim, layout)
    return out.reshape(x.shape).to(x.dtype)


def qk_norm_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    rotary_dim: int | None = None,
    layout: str = "neox",
    gemma: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``fused_qk_norm_rope``: RMSNorm over each head's ``head_dim``, then RoPE."""
    rotary_dim = cos.shape[-1] if rotary_dim is None else rotary_dim
    ct = _compute_dtype(q)
    c, s = gather_tables(cos.to(ct), sin.to(ct), tuple(q.shape[:-2]), position_ids)
    outs = []
    for t, w in ((q, q_weight), (k, k_weight)):
        tf = t.to(ct)
        wf = w.to(ct) + 1.0 if gemma else w.to(ct)
        y = tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + eps) * wf
        outs.append(apply_rope(y, c.unsqueeze(-2), s.unsqueeze(-2), rotary_dim, layout).to(t.dtype))
    return outs[0], outs[1]


__all__ = ["apply_rope", "gather_tables", "qk_norm_rope_reference", "rmsnorm_rope_reference", "rotate"]
