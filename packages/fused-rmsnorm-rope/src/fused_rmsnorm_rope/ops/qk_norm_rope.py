"""``fused_qk_norm_rope``: per-head RMSNorm then RoPE on q and k (Qwen3, OLMo2, Gemma3 attention) in one launch.

q and k may be views into a packed QKV projection output (``qkv.split(...)`` then ``.view(..., heads, head_dim)``):
every stride but head_dim's is passed to the kernel, so nothing is copied on the way in. Outputs are new
contiguous tensors, or q and k themselves with ``inplace=True`` (then the packed buffer is updated in place).
"""

from __future__ import annotations

import torch
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.validation.rmsnorm_rope import validate_qk_norm_rope_inputs

from ..config import FWD_KERNEL, QK_FWD_KERNEL, get_config
from .kernels import _qk_norm_rope_fwd_kernel, next_pow2
from .rmsnorm_rope import collapse_rows, launch_bwd, position_strides, table_strides


def _launch_qk_fwd(q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim, interleaved, gemma,
                   store_rstd, inplace, config=None):
    head_dim = q.shape[-1]
    hq, hk = q.shape[-2], k.shape[-2]
    n_rows = q.numel() // (hq * head_dim) if q.numel() else 0
    if inplace:
        qo, ko = q, k
    else:
        qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if store_rstd:
        q_rstd = torch.empty((n_rows, hq), dtype=torch.float32, device=q.device)
        k_rstd = torch.empty((n_rows, hk), dtype=torch.float32, device=q.device)
    else:
        q_rstd = k_rstd = None
    if n_rows == 0:
        return qo, ko, q_rstd, k_rstd
    qv, _, sqb, sqs = collapse_rows(q, 2)
    kv, _, skb, sks = collapse_rows(k, 2)
    if inplace and (qv is not q or kv is not k):
        # a permuted batch layout was copied: write back through the copies, then into the caller's views
        qo_v, ko_v = qv, kv
    else:
        qo_v, ko_v = qo, ko
    _, _, sqob, sqos = collapse_rows(qo_v, 2)
    _, _, skob, skos = collapse_rows(ko_v, 2)
    seq = q.shape[-3]
    pos, spb, sps = position_strides(position_ids, q.dim() - 2)
    scb, scs = table_strides(cos)
    hq_pad, hk_pad = next_pow2(hq), next_pow2(hk)
    half_pad = next_pow2(rotary_dim // 2)
    has_pass = head_dim > rotary_dim
    pass_pad = next_pow2(head_dim - rotary_dim) if has_pass else 1
    if config is None:
        config = get_config(QK_FWD_KERNEL, (hq_pad + hk_pad) * (2 * half_pad + (pass_pad if has_pass else 0)),
                            n_rows, q.dtype, q.device)
    rows = config["ROWS_PER_PROG"]
    grid = ((n_rows + rows - 1) // rows,)
    _qk_norm_rope_fwd_kernel[grid](
        qv, kv, qo_v, ko_v, q_weight, k_weight, cos, sin, qv if pos is None else pos,
        qv if q_rstd is None else q_rstd, qv if k_rstd is None else k_rstd,
        n_rows, seq, cos.shape[-2],
        sqb, sqs, qv.stride(-2), skb, sks, kv.stride(-2),
        sqob, sqos, qo_v.stride(-2), skob, skos, ko_v.stride(-2),
        spb, sps, scb, scs,
        eps,
        NUM_Q_HEADS=hq, NUM_K_HEADS=hk, HEAD_DIM=head_dim, ROT_DIM=rotary_dim,
        Q_HEADS_PAD=hq_pad, K_HEADS_PAD=hk_pad, HALF_PAD=half_pad, PASS_PAD=pass_pad,
        INTERLEAVED=interleaved, GEMMA=gemma, HAS_POS=pos is not None, STORE_RSTD=store_rstd,
        ROWS_PER_PROG=rows, EVEN_ROWS=n_rows % rows == 0,
        num_warps=config["num_warps"],
    )
    if qo_v is not qo:
        qo.copy_(qo_v)
    if ko_v is not ko:
        ko.copy_(ko_v)
    return qo, ko, q_rstd, k_rstd


class QKNormRoPEFunction(torch.autograd.Function):
    """Autograd of ``fused_qk_norm_rope`` (out of place): gradients for q, k, q_weight and k_weight."""

    @staticmethod
    def forward(ctx, q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim, interleaved, gemma):
        qo, ko, q_rstd, k_rstd = _launch_qk_fwd(q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim,
                                                interleaved, gemma, store_rstd=True, inplace=False)
        ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin, position_ids, q_rstd, k_rstd)
        ctx.cfg = (rotary_dim, interleaved, gemma)
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        q, k, q_weight, k_weight, cos, sin, position_ids, q_rstd, k_rstd = ctx.saved_tensors
        rotary_dim, interleaved, gemma = ctx.cfg
        head_dim = q.shape[-1]
        grads = []
        for t, w, rstd, g in ((q, q_weight, q_rstd, dqo), (k, k_weight, k_rstd, dko)):
            if g is None:
                g = torch.zeros_like(t)
            heads = t.shape[-2]
            warps = get_config(FWD_KERNEL, next_pow2(heads) * next_pow2(head_dim), rstd.shape[0], t.dtype,
                               t.device)["num_warps"]
            dx, dw = launch_bwd(g, t, w, cos, sin, position_ids, rstd, heads, head_dim, rotary_dim, interleaved,
                                gemma, per_head=True, num_warps=warps)
            grads.append((dx, dw.to(w.dtype)))
        (dq, dqw), (dk, dkw) = grads
        return dq, dk, dqw, dkw, None, None, None, None, None, None, None


def fused_qk_norm_rope(
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
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm (weights ``[head_dim]``) then RoPE on q and k, both in one kernel launch.

    Args:
        q: ``[..., seq, q_heads, head_dim]``; k: ``[..., seq, kv_heads, head_dim]`` (GQA: any head counts), same
            dtype (fp16/bf16/fp32), unit stride in head_dim, any other strides (views of a packed QKV output).
        q_weight, k_weight: ``[head_dim]``.
        cos, sin, position_ids, rotary_dim, layout, gemma: as in ``fused_rmsnorm_rope`` (head_dim is q's).
        eps: added to each head's mean square.
        inplace: write the results into q and k (e.g. into the packed QKV buffer) instead of new tensors; not
            differentiable.

    Returns:
        ``(q_out, k_out)`` with q's and k's shapes and dtype (contiguous unless ``inplace``).
    """
    info = validate_qk_norm_rope_inputs(q, k, q_weight, k_weight, cos, sin, position_ids, eps,
                                        rotary_dim=rotary_dim, layout=layout, gemma=gemma)
    interleaved = layout == "interleaved"
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, q_weight, k_weight))
    if wants_grad and inplace:
        raise InvalidArgumentError("inplace: expected False when a gradient is wanted (q, k or a weight requires "
                                   "grad), got True; run in-place under torch.no_grad()")
    if wants_grad:
        return QKNormRoPEFunction.apply(q, k, q_weight, k_weight, cos, sin, position_ids, info.eps,
                                        info.rotary_dim, interleaved, gemma)
    qo, ko, _, _ = _launch_qk_fwd(q, k, q_weight, k_weight, cos, sin, position_ids, info.eps, info.rotary_dim,
                                  interleaved, gemma, store_rstd=False, inplace=inplace)
    return qo, ko


__all__ = ["QKNormRoPEFunction", "fused_qk_norm_rope"]
