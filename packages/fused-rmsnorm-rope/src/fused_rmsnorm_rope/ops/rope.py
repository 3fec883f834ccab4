"""``apply_rope``: the rotary embedding alone on q and k (Llama, Mistral, Qwen2 attention) in one launch.

It is the QK-norm + RoPE kernel with its norm compiled out (``NORM=False``): every q head then every k head of a
token in one program, q and k possibly strided views of a packed QKV projection output, rotated out of place (new
contiguous tensors) or in place (the packed buffer is updated). Its backward is the same kernel with the transposed
rotation (``TRANSPOSE=True``; with transformers' tables, whose two halves repeat the same frequencies, that is RoPE
with ``-sin``), one launch for dq and dk.

Registered as ``torch.ops.triton_ops.rope`` (out of place), ``rope_`` (in place: mutates q and k, as its schema
says) and ``rope_backward``.
"""

from __future__ import annotations

import torch
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.launch import Plan, call_key
from triton_ops_core.library import direct_call_ok, op_name

from ..reference import apply_rope as _rotate_reference
from ..reference import gather_tables
from ..validation import validate_rope_inputs
from .qk_norm_rope import _PLANS, _qk_plan, _run_qk

_EPS = 1e-6  # the kernel's eps argument: unused without the norm, fixed so plans do not vary with it


def _rope_plan_for(q, k, cos, sin, position_ids, rotary_dim, layout, inplace, transpose) -> Plan:
    """The cached plan of a call (validated and configured on the first call of its key)."""
    key = call_key("rope", q, k, cos, sin, position_ids, rotary_dim, layout, inplace, transpose)
    plan = _PLANS.get(key)
    if plan is None:
        info = validate_rope_inputs(q, k, cos, sin, position_ids, rotary_dim=rotary_dim, layout=layout)
        # The QK-norm kernel's config lookup as it is (no tuning on first use: the timings would be stored under
        # the QK-norm kernel's key).
        plan = _qk_plan(q, k, cos, position_ids, _EPS, info.rotary_dim, layout == "interleaved", False,
                        store_rstd=False, inplace=inplace, bench=None, norm=False, transpose=transpose)
        plan.info = info
        _PLANS.put(key, plan)
    return plan


def _rope(q, k, cos, sin, position_ids, rotary_dim, layout, inplace, transpose=False):
    plan = _rope_plan_for(q, k, cos, sin, position_ids, rotary_dim, layout, inplace, transpose)
    qo, ko, _, _ = _run_qk(plan, q, k, None, None, cos, sin, position_ids, False, inplace)
    return qo, ko


# ----------------------------------------------------------------------------------------------------------------
# Registration: triton_ops::rope, its in-place variant and its backward
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op(op_name("rope"), mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             position_ids: torch.Tensor | None, rotary_dim: int | None,
             layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope(q, k, cos, sin, position_ids, rotary_dim, layout, False)


@_rope_op.register_fake
def _(q, k, cos, sin, position_ids, rotary_dim, layout):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op(op_name("rope_"), mutates_args=("q", "k"))
def _rope_inplace_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     position_ids: torch.Tensor | None, rotary_dim: int | None, layout: str) -> None:
    _rope(q, k, cos, sin, position_ids, rotary_dim, layout, True)


@_rope_inplace_op.register_fake
def _(q, k, cos, sin, position_ids, rotary_dim, layout):
    return None


def _unit_last(g: torch.Tensor) -> torch.Tensor:
    # a gradient from autograd may have any strides (an expanded or transposed one); the kernel needs unit stride in
    # head_dim
    return g if g.stride(-1) == 1 else g.contiguous()


@torch.library.custom_op(op_name("rope_backward"), mutates_args=())
def _rope_backward_op(dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      position_ids: torch.Tensor | None, rotary_dim: int | None,
                      layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dq, dk)``: the transposed rotation of the output gradients, contiguous, in their dtype."""
    return _rope(_unit_last(dq_out), _unit_last(dk_out), cos, sin, position_ids, rotary_dim, layout, False,
                 transpose=True)


@_rope_backward_op.register_fake
def _(dq_out, dk_out, cos, sin, position_ids, rotary_dim, layout):
    return dq_out.new_empty(dq_out.shape), dk_out.new_empty(dk_out.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, cos, sin, position_ids, rotary_dim, layout = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.options = (rotary_dim, layout)
    # what a missing gradient's zeros need (an output that took no part in the loss gets none from autograd)
    ctx.like = tuple((t.shape, t.dtype, t.device) for t in (q, k))


def _grads(ctx, dq_out, dk_out):
    (q_shape, q_dtype, dev), (k_shape, k_dtype, _) = ctx.like
    dq_out = torch.zeros(q_shape, dtype=q_dtype, device=dev) if dq_out is None else dq_out
    dk_out = torch.zeros(k_shape, dtype=k_dtype, device=dev) if dk_out is None else dk_out
    return dq_out, dk_out


def _backward(ctx, dq_out, dk_out):
    cos, sin, position_ids = ctx.saved_tensors
    dq_out, dk_out = _grads(ctx, dq_out, dk_out)
    dq, dk = _rope_backward_op(dq_out, dk_out, cos, sin, position_ids, *ctx.options)
    need = ctx.needs_input_grad
    return dq if need[0] else None, dk if need[1] else None, None, None, None, None, None


def _backward_of_backward(ctx, dq, dk):
    # rope_backward is the transposed rotation, a linear map: its backward is the rotation itself
    cos, sin, position_ids = ctx.saved_tensors
    dq, dk = _grads(ctx, dq, dk)
    q, k = _rope_op(_unit_last(dq), _unit_last(dk), cos, sin, position_ids, *ctx.options)
    need = ctx.needs_input_grad
    return q if need[0] else None, k if need[1] else None, None, None, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)
_rope_backward_op.register_autograd(_backward_of_backward, setup_context=_setup_context)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    rotary_dim: int | None = None,
    layout: str = "neox",
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k, both in one kernel launch: ``y = x * cos + rotate_half(x) * sin`` on every head.

    What transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` computes (there on ``[batch, heads, seq, head_dim]``
    tensors, here on ``[..., seq, heads, head_dim]`` ones: the layout of a projection's output before the heads are
    transposed), in fp32 with one rounding to q's dtype, on the first ``rotary_dim`` elements of each head (the
    rest passes through unchanged).

    Args:
        q: ``[..., seq, q_heads, head_dim]``; k: ``[..., seq, kv_heads, head_dim]`` (GQA: any head counts), same
            leading dimensions and dtype (fp16/bf16/fp32), unit stride in head_dim, any other strides (views of a
            packed QKV output: nothing is copied).
        cos, sin: ``[seq, rot]`` (position = index in the sequence), a cache ``[max_position, rot]`` indexed by
            ``position_ids``, or per token ``[batch or 1, seq, rot]`` (what transformers' rotary embedding
            returns). ``rot`` is between ``rotary_dim`` and ``head_dim``.
        position_ids: int32/int64 ``[seq]``, ``[batch or 1, seq]`` or q's leading dimensions; an id outside the
            table makes that token's rotary elements NaN (no out-of-bounds read, no host sync).
        rotary_dim: rotated elements per head (even; default: the width of ``cos``).
        layout: ``"neox"`` (rotate halves: Llama, Mistral, Qwen) or ``"interleaved"`` (rotate pairs: GPT-J).
        inplace: write the results into q and k (e.g. into the packed QKV buffer) instead of new tensors; not
            differentiable (InvalidArgumentError when a gradient is wanted).

    Returns:
        ``(q_out, k_out)`` with q's and k's shapes and dtype (new contiguous tensors, or q and k themselves with
        ``inplace``). Differentiable in q and k (the backward is one launch of the transposed rotation, itself
        differentiable).

    Registered as ``torch.ops.triton_ops.rope``, ``rope_`` (in place: mutates q and k, as its schema says) and
    ``rope_backward``. (``fused_rmsnorm_rope.reference.apply_rope`` is a different thing: the single-tensor
    reference helper; :func:`rope_reference` is this function's reference.)
    """
    if not isinstance(inplace, bool):
        raise InvalidArgumentError(f"inplace: expected a bool, got {inplace!r}")
    if inplace:
        if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in (q, k)):
            raise InvalidArgumentError("inplace: expected False when a gradient is wanted (q or k requires grad), "
                                       "got True; run in-place under torch.no_grad()")
        if direct_call_ok(q, k, cos, sin, position_ids):
            _rope(q, k, cos, sin, position_ids, rotary_dim, layout, True)
        else:
            _rope_inplace_op(q, k, cos, sin, position_ids, rotary_dim, layout)
        return q, k
    if direct_call_ok(q, k, cos, sin, position_ids):  # plain eager: no dispatcher round trip
        return _rope(q, k, cos, sin, position_ids, rotary_dim, layout, False)
    return _rope_op(q, k, cos, sin, position_ids, rotary_dim, layout)


def rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    rotary_dim: int | None = None,
    layout: str = "neox",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference of :func:`apply_rope` (same arguments; fp32 math, float64 for float64 inputs;
    differentiable by autograd)."""
    rotary_dim = cos.shape[-1] if rotary_dim is None else rotary_dim
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    c, s = gather_tables(cos.to(ct), sin.to(ct), tuple(q.shape[:-2]), position_ids)
    outs = [_rotate_reference(t.to(ct), c.unsqueeze(-2), s.unsqueeze(-2), rotary_dim, layout).to(t.dtype)
            for t in (q, k)]
    return outs[0], outs[1]


__all__ = ["apply_rope", "rope_reference"]
