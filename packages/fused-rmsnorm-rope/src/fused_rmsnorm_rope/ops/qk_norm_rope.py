"""``fused_qk_norm_rope``: per-head RMSNorm then RoPE on q and k (Qwen3, OLMo2, Gemma3 attention) in one launch.

q and k may be views into a packed QKV projection output (``qkv.split(...)`` then ``.view(..., heads, head_dim)``):
every stride but head_dim's is passed to the kernel, so nothing is copied on the way in. Outputs are new
contiguous tensors, or q and k themselves with ``inplace=True`` (then the packed buffer is updated in place).
"""

from __future__ import annotations

import torch
from triton_ops_core import pdl
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.launch import Plan, PlanCache, call_key, next_pow2
from triton_ops_core.library import capturing, direct_call_ok, op_name

from ..config import QK_FWD_KERNEL, get_config
from ..validation import validate_qk_norm_rope_inputs
from .kernels import _qk_norm_rope_fwd_kernel
from .rmsnorm_rope import RowCopies, collapse_rows, launch_bwd, position_strides, row_rstd, table_strides

_PLANS = PlanCache()


def _qk_plan(q, k, cos, position_ids, eps, rotary_dim, interleaved, gemma, store_rstd, inplace, config=None,
             bench=None, norm=True, transpose=False) -> Plan:
    """Everything but the tensors of a q/k launch (inputs already validated).

    ``norm=False``: RoPE alone (``apply_rope``), ``transpose=True``: its backward; both take the QK-norm kernel's
    config (the same kernel and row sizes, minus the norm's reduction).
    """
    head_dim = q.shape[-1]
    hq, hk = q.shape[-2], k.shape[-2]
    n_rows = q.numel() // (hq * head_dim) if q.numel() else 0
    qv, _, sqb, sqs = collapse_rows(q, 2)
    kv, _, skb, sks = collapse_rows(k, 2)
    # outputs: q/k themselves (in place; their contiguous copies when not addressable), else new contiguous tensors
    if inplace:
        qo_strides = (sqb, sqs, qv.stride(-2))
        ko_strides = (skb, sks, kv.stride(-2))
    else:
        seq = q.shape[-3]
        qo_strides = (seq * hq * head_dim, hq * head_dim, head_dim)
        ko_strides = (seq * hk * head_dim, hk * head_dim, head_dim)
    seq = q.shape[-3]
    pos, spb, sps = position_strides(position_ids)
    scb, scs = table_strides(cos)
    hq_pad, hk_pad = next_pow2(hq), next_pow2(hk)
    half_pad = next_pow2(rotary_dim // 2)
    has_pass = head_dim > rotary_dim
    pass_pad = next_pow2(head_dim - rotary_dim) if has_pass else 1
    if config is None:
        config = get_config(QK_FWD_KERNEL, (hq_pad + hk_pad) * (2 * half_pad + (pass_pad if has_pass else 0)),
                            n_rows, q.dtype, q.device, bench)
    rows = config["ROWS_PER_PROG"]
    pdl_on = pdl.enabled(q.device) and not transpose  # the backward keeps its plain launch
    tail = (n_rows, seq, cos.shape[-2],
            sqb, sqs, qv.stride(-2), skb, sks, kv.stride(-2), *qo_strides, *ko_strides,
            spb, sps, scb, scs,
            eps,
            hq, hk, head_dim, rotary_dim, hq_pad, hk_pad, half_pad, pass_pad,
            interleaved, gemma, pos is not None, store_rstd, rows, n_rows % rows == 0, norm, transpose, pdl_on)
    extra = RowCopies(qv is not q, kv is not k, pos is not None and pos is not position_ids)
    return Plan(_qk_norm_rope_fwd_kernel, (max(1, (n_rows + rows - 1) // rows),), tail, config["num_warps"], n_rows,
                extra=extra, **pdl.launch_options(pdl_on))


def _run_qk(plan: Plan, q, k, q_weight, k_weight, cos, sin, position_ids, store_rstd: bool, inplace: bool):
    n_rows = plan.n_rows
    copy_q, copy_k, copy_pos = plan.extra
    qv = q.contiguous() if copy_q else q
    kv = k.contiguous() if copy_k else k
    if inplace:
        qo, ko = qv, kv
    else:
        qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if store_rstd:
        q_rstd = torch.empty((n_rows, q.shape[-2]), dtype=torch.float32, device=q.device)
        k_rstd = torch.empty((n_rows, k.shape[-2]), dtype=torch.float32, device=q.device)
    else:
        q_rstd = k_rstd = None
    if n_rows == 0:
        return qo, ko, q_rstd, k_rstd
    if position_ids is not None and copy_pos:
        position_ids = position_ids.contiguous()
    plan.launch(qv, kv, qo, ko, qv if q_weight is None else q_weight, qv if k_weight is None else k_weight, cos, sin,
                qv if position_ids is None else position_ids, qv if q_rstd is None else q_rstd,
                qv if k_rstd is None else k_rstd)
    if inplace and copy_q:
        q.copy_(qo)
    if inplace and copy_k:
        k.copy_(ko)
    return (q, k, None, None) if inplace else (qo, ko, q_rstd, k_rstd)


def _launch_qk_fwd(q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim, interleaved, gemma,
                   store_rstd, inplace, config=None):
    """One q/k launch without the plan cache (benchmarks pass an explicit ``config``)."""
    plan = _qk_plan(q, k, cos, position_ids, eps, rotary_dim, interleaved, gemma, store_rstd, inplace, config)
    return _run_qk(plan, q, k, q_weight, k_weight, cos, sin, position_ids, store_rstd, inplace)


def _plan_for(q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim, layout, gemma, inplace) -> Plan:
    """The cached plan of a call (validated and configured on the first call of its key)."""
    key = call_key(q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim, layout, gemma, inplace)
    plan = _PLANS.get(key)
    if plan is None:
        info = validate_qk_norm_rope_inputs(q, k, q_weight, k_weight, cos, sin, position_ids, eps,
                                            rotary_dim=rotary_dim, layout=layout, gemma=gemma)
        interleaved = layout == "interleaved"

        def bench(cfg):  # for tune-on-first-use (KERNEL_AUTOTUNE=1) only; never in place
            return lambda: _launch_qk_fwd(q, k, q_weight, k_weight, cos, sin, position_ids, info.eps, info.rotary_dim,
                                          interleaved, gemma, False, False, cfg)

        plan = _qk_plan(q, k, cos, position_ids, info.eps, info.rotary_dim, interleaved, gemma,
                        store_rstd=False, inplace=inplace, bench=None if capturing(q.device) else bench)
        plan.info = info
        _PLANS.put(key, plan)
    return plan


# ----------------------------------------------------------------------------------------------------------------
# Registration: triton_ops::fused_qk_norm_rope, its in-place variant and its backward
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op(op_name("fused_qk_norm_rope"), mutates_args=())
def _qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None, eps: float,
                     rotary_dim: int | None, layout: str, gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    plan = _plan_for(q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim, layout, gemma, False)
    qo, ko, _, _ = _run_qk(plan, q, k, q_weight, k_weight, cos, sin, position_ids, False, False)
    return qo, ko


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim, layout, gemma):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op(op_name("fused_qk_norm_rope_"), mutates_args=("q", "k"))
def _qk_norm_rope_inplace_op(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                             cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None, eps: float,
                             rotary_dim: int | None, layout: str, gemma: bool) -> None:
    plan = _plan_for(q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim, layout, gemma, True)
    _run_qk(plan, q, k, q_weight, k_weight, cos, sin, position_ids, False, True)


@_qk_norm_rope_inplace_op.register_fake
def _(q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim, layout, gemma):
    return None


@torch.library.custom_op(op_name("fused_qk_norm_rope_backward"), mutates_args=())
def _qk_norm_rope_backward_op(dq_out: torch.Tensor, dk_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                              position_ids: torch.Tensor | None, eps: float, rotary_dim: int | None, layout: str,
                              gemma: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dq_weight, dk_weight)``: dq/dk in q's dtype (contiguous), the weight gradients in fp32."""
    plan = _plan_for(q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim, layout, gemma, False)
    info = plan.info
    grads = []
    for t, w, g in ((q, q_weight, dq_out), (k, k_weight, dk_out)):
        grads += launch_bwd(g, t, w, cos, sin, position_ids, row_rstd(t, info.eps, 2), t.shape[-2], t.shape[-1],
                            info.rotary_dim, layout == "interleaved", gemma, per_head=True,
                            num_warps=plan.num_warps)
    dq, dqw, dk, dkw = grads
    return dq, dk, dqw, dkw


@_qk_norm_rope_backward_op.register_fake
def _(dq_out, dk_out, q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim, layout, gemma):
    return (q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty(q.shape[-1:], dtype=torch.float32),
            k.new_empty(k.shape[-1:], dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim, layout, gemma = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin, position_ids)
    ctx.options = (eps, rotary_dim, layout, gemma)


def _backward(ctx, dq_out, dk_out):
    q, k, q_weight, k_weight, cos, sin, position_ids = ctx.saved_tensors
    # an output that took no part in the loss gets no gradient from autograd
    dq_out = torch.zeros_like(q) if dq_out is None else dq_out
    dk_out = torch.zeros_like(k) if dk_out is None else dk_out
    dq, dk, dqw, dkw = _qk_norm_rope_backward_op(dq_out, dk_out, q, k, q_weight, k_weight, cos, sin, position_ids,
                                                 *ctx.options)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dqw.to(q_weight.dtype) if need[2] else None,
            dkw.to(k_weight.dtype) if need[3] else None, None, None, None, None, None, None, None)


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)


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
        ``(q_out, k_out)`` with q's and k's shapes and dtype (contiguous unless ``inplace``). Differentiable in q, k
        and both weights (Triton backward) unless ``inplace``.

    Registered as ``torch.ops.triton_ops.fused_qk_norm_rope``, ``fused_qk_norm_rope_`` (in place: mutates q and k,
    as its schema says) and ``fused_qk_norm_rope_backward``.
    """
    if not isinstance(inplace, bool):
        raise InvalidArgumentError(f"inplace: expected a bool, got {inplace!r}")
    if inplace:
        if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in (q, k, q_weight, k_weight)):
            raise InvalidArgumentError("inplace: expected False when a gradient is wanted (q, k or a weight "
                                       "requires grad), got True; run in-place under torch.no_grad()")
        if direct_call_ok(q, k, q_weight, k_weight, cos, sin, position_ids):
            plan = _plan_for(q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim, layout, gemma, True)
            _run_qk(plan, q, k, q_weight, k_weight, cos, sin, position_ids, False, True)
        else:
            _qk_norm_rope_inplace_op(q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim, layout, gemma)
        return q, k
    if direct_call_ok(q, k, q_weight, k_weight, cos, sin, position_ids):  # plain eager: no dispatcher round trip
        plan = _plan_for(q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim, layout, gemma, False)
        qo, ko, _, _ = _run_qk(plan, q, k, q_weight, k_weight, cos, sin, position_ids, False, False)
        return qo, ko
    return _qk_norm_rope_op(q, k, q_weight, k_weight, cos, sin, position_ids, eps, rotary_dim, layout, gemma)


__all__ = ["fused_qk_norm_rope"]
