"""``fused_rmsnorm_rope``: RMSNorm over the hidden vector, then RoPE on every head, in one launch; and its autograd.

The call path is kept short on purpose (decode calls it with a handful of tokens, where the host is the cost): a
lookup of the call's cached launch plan (validation and config selection happen only on a miss), one ``torch.empty``
and one launch. The dispatcher is entered only when tracing, under a mode, or when autograd must record the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from triton_ops_core.device import sm_count
from triton_ops_core.launch import Plan, PlanCache, call_key, next_pow2
from triton_ops_core.library import capturing, direct_call_ok, op_name

from ..config import FWD_KERNEL, get_config
from ..validation import validate_rmsnorm_rope_inputs
from .kernels import _norm_rope_bwd_kernel, _rmsnorm_rope_fwd_kernel


def _batch_stride(shape: torch.Size, strides: tuple[int, ...], nb: int) -> int | None:
    """The one stride that walks the first ``nb`` dims flattened, or None if none does (0 when they are all 1)."""
    stride, prev = 0, None
    for d in range(nb):
        if shape[d] == 1:
            continue
        if prev is not None and strides[prev] != strides[d] * shape[d]:
            return None
        prev, stride = d, strides[d]
    return stride


def collapse_rows(t: torch.Tensor, n_inner: int) -> tuple[torch.Tensor, int, int, int]:
    """View ``t`` ``[*batch, seq, *inner]`` as ``[B, seq, *inner]`` through strides, without copying when possible.

    Returns ``(t, B, stride_b, stride_s)``; ``t`` is a contiguous copy only when the batch dimensions cannot be
    addressed with one stride (a permuted view).
    """
    nb = t.dim() - n_inner - 1
    batch = 1
    for d in range(nb):
        batch *= t.shape[d]
    stride_b = _batch_stride(t.shape, t.stride(), nb)
    if stride_b is None:
        t = t.contiguous()
        stride_b = _batch_stride(t.shape, t.stride(), nb)
    return t, batch, stride_b, t.stride(nb)


def position_strides(position_ids: torch.Tensor | None) -> tuple[torch.Tensor | None, int, int]:
    """``(ids, stride_b, stride_s)`` addressing ``position_ids`` by (flattened batch, seq); ids copied if needed."""
    if position_ids is None:
        return None, 0, 0
    if position_ids.dim() == 1:
        return position_ids, 0, position_ids.stride(0)
    pos, _, stride_b, stride_s = collapse_rows(position_ids, 0)
    return pos, stride_b, stride_s


def table_strides(cos: torch.Tensor) -> tuple[int, int]:
    """Strides ``(stride_b, stride_pos)`` of a cos/sin table: 2-D tables are shared by every batch row."""
    if cos.dim() == 2:
        return 0, cos.stride(0)
    return (0 if cos.shape[0] == 1 else cos.stride(0)), cos.stride(1)


def backward_programs(n_rows: int, device: torch.device) -> int:
    """Programs of a backward launch: two waves on a GPU (each reduces its rows' dweight), a few on the CPU."""
    return max(1, min(n_rows, 2 * sm_count(device, cpu=2)))


_PLANS = PlanCache()


class RowCopies(NamedTuple):
    """A plan's ``extra``: which inputs must be made contiguous per call to be addressed by (batch, seq) strides
    (rare permuted views). ``y`` is the second tensor of a q/k launch (unused by the single-tensor op)."""

    x: bool
    y: bool
    position_ids: bool


def _fwd_plan(x: torch.Tensor, cos: torch.Tensor, position_ids: torch.Tensor | None, eps: float, head_dim: int,
              rotary_dim: int, interleaved: bool, gemma: bool, store_rstd: bool,
              config: dict[str, int] | None = None, bench=None) -> Plan:
    """Everything but the tensors of a forward launch (x must already be validated)."""
    hidden = x.shape[-1]
    n_rows = x.numel() // hidden if hidden else 0
    xv, _, sxb, sxs = collapse_rows(x, 1)
    seq = x.shape[-2]
    pos, spb, sps = position_strides(position_ids)
    scb, scs = table_strides(cos)
    num_heads = hidden // head_dim
    heads_pad = next_pow2(num_heads)
    half_pad = next_pow2(rotary_dim // 2)
    has_pass = head_dim > rotary_dim
    pass_pad = next_pow2(head_dim - rotary_dim) if has_pass else 1
    if config is None:
        config = get_config(FWD_KERNEL, heads_pad * (2 * half_pad + (pass_pad if has_pass else 0)), n_rows,
                            x.dtype, x.device, bench)
    rows = config["ROWS_PER_PROG"]
    tail = (n_rows, seq, cos.shape[-2],
            sxb, sxs, seq * hidden, hidden, spb, sps, scb, scs,
            eps,
            num_heads, head_dim, rotary_dim, heads_pad, half_pad, pass_pad,
            interleaved, gemma, pos is not None, store_rstd, rows, n_rows % rows == 0)
    extra = RowCopies(xv is not x, False, pos is not None and pos is not position_ids)
    return Plan(_rmsnorm_rope_fwd_kernel, (max(1, (n_rows + rows - 1) // rows),), tail, config["num_warps"], n_rows,
                extra=extra)


def _run_fwd(plan: Plan, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             position_ids: torch.Tensor | None, store_rstd: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(plan.n_rows, dtype=torch.float32, device=x.device) if store_rstd else None
    if plan.n_rows == 0:
        return y, rstd
    copy_x, _, copy_pos = plan.extra
    xv = x.contiguous() if copy_x else x
    if position_ids is not None and copy_pos:
        position_ids = position_ids.contiguous()
    plan.launch(xv, y, weight, cos, sin, xv if position_ids is None else position_ids, xv if rstd is None else rstd)
    return y, rstd


def _launch_fwd(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor | None, eps: float, head_dim: int, rotary_dim: int,
                interleaved: bool, gemma: bool, store_rstd: bool,
                config: dict[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward launch without the plan cache (benchmarks pass an explicit ``config``)."""
    plan = _fwd_plan(x, cos, position_ids, eps, head_dim, rotary_dim, interleaved, gemma, store_rstd, config)
    return _run_fwd(plan, x, weight, cos, sin, position_ids, store_rstd)


def launch_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               position_ids: torch.Tensor | None, rstd: torch.Tensor, num_heads: int, head_dim: int,
               rotary_dim: int, interleaved: bool, gemma: bool, per_head: bool,
               num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (x's shape and dtype, contiguous) and dweight (fp32) of one norm+rope group.

    ``x`` and ``dy`` are ``[*batch, seq, hidden]`` (``per_head=False``) or ``[*batch, seq, heads, head_dim]``.
    """
    n_inner = 2 if per_head else 1
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = x.numel() // (num_heads * head_dim) if x.numel() else 0
    w_len = head_dim if per_head else num_heads * head_dim
    if n_rows == 0:
        return dx, torch.zeros(w_len, dtype=torch.float32, device=x.device)
    xv, _, sxb, sxs = collapse_rows(x, n_inner)
    dyv, _, sdyb, sdys = collapse_rows(dy, n_inner)
    dxv, _, sdxb, sdxs = collapse_rows(dx, n_inner)
    sxh, sdyh, sdxh = (xv.stride(-2), dyv.stride(-2), dxv.stride(-2)) if per_head else (head_dim,) * 3
    seq = x.shape[-1 - n_inner]
    pos, spb, sps = position_strides(position_ids)
    scb, scs = table_strides(cos)
    nprog = backward_programs(n_rows, x.device)
    dw_part = torch.empty((nprog, w_len), dtype=torch.float32, device=x.device)
    _norm_rope_bwd_kernel[(nprog,)](
        dyv, xv, dxv, weight, cos, sin, xv if pos is None else pos, rstd, dw_part,
        n_rows, seq, cos.shape[-2],
        sdyb, sdys, sdyh, sxb, sxs, sxh, sdxb, sdxs, sdxh,
        spb, sps, scb, scs,
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, ROT_DIM=rotary_dim,
        HEADS_PAD=next_pow2(num_heads), HALF_PAD=next_pow2(rotary_dim // 2),
        PASS_PAD=next_pow2(head_dim - rotary_dim) if head_dim > rotary_dim else 1,
        INTERLEAVED=interleaved, GEMMA=gemma, PER_HEAD=per_head, HAS_POS=pos is not None,
        num_warps=num_warps,
    )
    return dx, dw_part.sum(0)


def _plan_for(x, weight, cos, sin, eps, position_ids, rotary_dim, head_dim, layout, gemma) -> Plan:
    """The cached forward plan of a call (validated and configured on the first call of its key)."""
    key = call_key(x, weight, cos, sin, position_ids, eps, rotary_dim, head_dim, layout, gemma)
    plan = _PLANS.get(key)
    if plan is None:
        info = validate_rmsnorm_rope_inputs(x, weight, cos, sin, eps, position_ids=position_ids,
                                            rotary_dim=rotary_dim, head_dim=head_dim, layout=layout, gemma=gemma)
        interleaved = layout == "interleaved"

        def bench(cfg: dict) -> Callable[[], object]:  # for tune-on-first-use (KERNEL_AUTOTUNE=1) only
            return lambda: _launch_fwd(x, weight, cos, sin, position_ids, info.eps, info.head_dim, info.rotary_dim,
                                       interleaved, gemma, False, cfg)

        plan = _fwd_plan(x, cos, position_ids, info.eps, info.head_dim, info.rotary_dim, interleaved, gemma,
                         store_rstd=False, bench=None if capturing(x.device) else bench)
        plan.info = info
        _PLANS.put(key, plan)
    return plan


# ----------------------------------------------------------------------------------------------------------------
# Registration: triton_ops::fused_rmsnorm_rope and its backward
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op(op_name("fused_rmsnorm_rope"), mutates_args=())
def _rmsnorm_rope_op(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                     position_ids: torch.Tensor | None, rotary_dim: int | None, head_dim: int | None, layout: str,
                     gemma: bool) -> torch.Tensor:
    plan = _plan_for(x, weight, cos, sin, eps, position_ids, rotary_dim, head_dim, layout, gemma)
    return _run_fwd(plan, x, weight, cos, sin, position_ids, store_rstd=False)[0]


@_rmsnorm_rope_op.register_fake
def _(x, weight, cos, sin, eps, position_ids, rotary_dim, head_dim, layout, gemma):
    return x.new_empty(x.shape)


def row_rstd(x: torch.Tensor, eps: float, n_inner: int) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) in fp32 per norm group, flattened over the rows: what the forward kernel used
    (recomputed for the backward, so the forward never stores it)."""
    ms = x.float().square().mean(-1)
    return torch.rsqrt(ms + eps).reshape(-1, *ms.shape[ms.dim() - n_inner + 1:]).contiguous()


@torch.library.custom_op(op_name("fused_rmsnorm_rope_backward"), mutates_args=())
def _rmsnorm_rope_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor, eps: float, position_ids: torch.Tensor | None,
                              rotary_dim: int | None, head_dim: int | None, layout: str,
                              gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)``: dx in x's dtype (contiguous), dweight in fp32."""
    plan = _plan_for(x, weight, cos, sin, eps, position_ids, rotary_dim, head_dim, layout, gemma)
    info = plan.info
    rstd = row_rstd(x, info.eps, 1)
    return launch_bwd(dy, x, weight, cos, sin, position_ids, rstd, info.num_heads, info.head_dim, info.rotary_dim,
                      layout == "interleaved", gemma, per_head=False, num_warps=plan.num_warps)


@_rmsnorm_rope_backward_op.register_fake
def _(dy, x, weight, cos, sin, eps, position_ids, rotary_dim, head_dim, layout, gemma):
    return x.new_empty(x.shape), weight.new_empty(weight.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, cos, sin, eps, position_ids, rotary_dim, head_dim, layout, gemma = inputs
    ctx.save_for_backward(x, weight, cos, sin, position_ids)
    ctx.options = (eps, rotary_dim, head_dim, layout, gemma)


def _backward(ctx, dy):
    x, weight, cos, sin, position_ids = ctx.saved_tensors
    eps, rotary_dim, head_dim, layout, gemma = ctx.options
    dx, dw = _rmsnorm_rope_backward_op(dy, x, weight, cos, sin, eps, position_ids, rotary_dim, head_dim, layout,
                                       gemma)
    dweight = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
    return (dx if ctx.needs_input_grad[0] else None), dweight, None, None, None, None, None, None, None, None


_rmsnorm_rope_op.register_autograd(_backward, setup_context=_setup_context)


def fused_rmsnorm_rope(
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
    """RMSNorm over the last dimension, then rotary embedding on every head, in one kernel launch.

    Computes ``y = x * rsqrt(mean(x^2) + eps) * w`` (``w = 1 + weight`` when ``gemma``), views ``y`` as heads of
    ``head_dim`` and returns ``y * cos + rotate(y) * sin`` on the first ``rotary_dim`` elements of every head (the
    rest passes through), with ``x``'s shape and dtype. Math is fp32 whatever the input dtype.

    Args:
        x: ``[..., seq, hidden]`` fp16/bf16/fp32, unit stride in ``hidden`` (other strides free).
        weight: ``[hidden]``, any float dtype.
        cos, sin: ``[seq, rot]`` (position = index in the sequence), a cache ``[max_position, rot]`` indexed by
            ``position_ids``, or per token ``[batch or 1, seq, rot]``. ``rot`` is ``head_dim`` or ``rotary_dim``.
        eps: added to the mean square.
        position_ids: int32/int64 ``[seq]``, ``[batch or 1, seq]`` or ``x.shape[:-1]``. An id outside
            ``[0, max_position)`` makes that token's rotary elements NaN (no out-of-bounds read, no host sync).
        rotary_dim: rotated elements per head (even, default: the width of ``cos``).
        head_dim: elements per head (default: the width of ``cos``); must divide ``hidden``.
        layout: ``"neox"`` (rotate halves, Llama/Qwen) or ``"interleaved"`` (rotate pairs, GPT-J).
        gemma: use ``1 + weight`` (Gemma's RMSNorm).

    Returns:
        A new tensor of ``x``'s shape and dtype. Differentiable in ``x`` and ``weight`` (Triton backward).

    Registered as ``torch.ops.triton_ops.fused_rmsnorm_rope`` (backward: ``fused_rmsnorm_rope_backward``), so
    ``torch.compile(fullgraph=True)``, CUDA graphs and ``torch.export`` take it as one node.
    """
    if direct_call_ok(x, weight, cos, sin, position_ids):  # plain eager: no dispatcher round trip
        plan = _plan_for(x, weight, cos, sin, eps, position_ids, rotary_dim, head_dim, layout, gemma)
        return _run_fwd(plan, x, weight, cos, sin, position_ids, store_rstd=False)[0]
    return _rmsnorm_rope_op(x, weight, cos, sin, eps, position_ids, rotary_dim, head_dim, layout, gemma)


__all__ = ["fused_rmsnorm_rope", "row_rstd"]
