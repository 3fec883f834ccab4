"""A norm before a residual add, and the norm after it, in one launch: ``rmsnorm_add_rmsnorm`` and ``rmsnorm_add``.

Gemma 2/3 normalize each sublayer's output before adding it to the residual stream (the "sandwich" norms)::

    h = residual + norm_a(attn_out)      y = norm_b(h)      # after the attention
    out = h + norm_c(mlp_out)                               # after the feed-forward

transformers runs each norm and each add as launches of their own (each norm five in eager); ``patch_model`` ran
``norm_a`` and then ``fused_add_rmsnorm`` for the add and ``norm_b``, then ``norm_c`` and an add: four launches a
layer. Here they are two: ``rmsnorm_add_rmsnorm(attn_out, h, w_a, w_b, eps)`` returns ``(y, h)`` and
``rmsnorm_add(mlp_out, h, w_c, eps)`` returns ``out``.

Every value is rounded where the unfused ops round it: ``norm_a(x)`` to x's dtype, the sum to x's dtype, ``y`` to
x's dtype; fp32 arithmetic on fp64 sums of squares (``rmsnorm``'s ``_rstd``), so the results are bit for bit those of
``rmsnorm`` then ``fused_add_rmsnorm`` (or ``rmsnorm`` then ``+``). One pass keeps the row in registers: rows up to
``MAX_ONE_PASS`` (8192) elements; a longer row, and any call with a gradient to record, runs that composition of the
registered ops instead (differentiable; the launches of its own). Registered as
``torch.ops.triton_ops.rmsnorm_add_rmsnorm`` and ``rmsnorm_add`` (no autograd of their own: the public functions
route a differentiable call to the composition).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton_ops_core import pdl
from triton_ops_core.launch import Plan, PlanCache, call_key
from triton_ops_core.library import direct_call_ok, op_name
from triton_ops_core.pdl import pdl_launch_dependents, pdl_wait

from ..config import norm_heuristic
from .rmsnorm import MAX_ONE_PASS, _rstd, _square64, _validate, fused_add_rmsnorm, rmsnorm


@triton.jit
def _weight(W, cols, mask, GEMMA: tl.constexpr):
    """A norm's weight in fp32 (``1 + w`` with ``GEMMA``)."""
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:
        w = w + 1.0
    return w


@triton.jit
def _norm_add_norm_kernel(X, R, XW, W, Y, H, N, stride_x, stride_r, stride_y, stride_h, x_eps, eps,
                          GEMMA: tl.constexpr, SECOND: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """Row ``r``: ``h = R[r] + round(norm(X[r], XW))`` rounded to H's dtype and stored; with ``SECOND`` also
    ``Y[r] = round(norm(h, W))``. ``PDL`` (``triton_ops_core.pdl``): launched early, it waits for the previous
    kernel first."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    # every load first: a decode step's one row is a chain of latencies, and neither the residual nor a weight
    # depends on a reduction (issued after one, each waited for its own round trip through the caches)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    xw = _weight(XW, cols, mask, GEMMA)
    if SECOND:
        w = _weight(W, cols, mask, GEMMA)
    x_rstd = _rstd(tl.sum(_square64(x), axis=0), N, x_eps)
    normed = (x * x_rstd * xw).to(H.dtype.element_ty).to(tl.float32)  # rmsnorm's order of operations
    h = (normed + r).to(H.dtype.element_ty)
    tl.store(H + row * stride_h + cols, h, mask=mask)
    if SECOND:
        s = h.to(tl.float32)
        rstd = _rstd(tl.sum(_square64(s), axis=0), N, eps)
        tl.store(Y + row * stride_y + cols, (s * rstd * w).to(Y.dtype.element_ty), mask=mask)


def _validate_sandwich(x: torch.Tensor, residual: torch.Tensor, x_weight: torch.Tensor, x_eps: float,
                       weight: torch.Tensor | None, eps: float, gemma: bool) -> None:
    """rmsnorm's named errors for both norms: x with its weight and the residual, the residual with the second."""
    _validate(x, x_weight, x_eps, residual, gemma)  # the residual: x's shape and dtype, unit last stride
    if weight is not None:
        _validate(residual, weight, eps, None, gemma)


_PLANS = PlanCache()


def _plan(x: torch.Tensor, residual: torch.Tensor, x_weight: torch.Tensor, x_eps: float,
          weight: torch.Tensor | None, eps: float, gemma: bool) -> Plan:
    """The cached launch of a call signature (validated on its first call): the kernel's scalar tail, one program
    per row (``n_rows`` 0: nothing to launch)."""
    key = call_key("rmsnorm_add_rmsnorm", x, residual, x_weight, weight, x_eps, eps, gemma)
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:
        return plan
    _validate_sandwich(x, residual, x_weight, x_eps, weight, eps, gemma)
    n = x.shape[-1]
    x2, r2 = x.reshape(-1, n), residual.reshape(-1, n)
    rows = x2.shape[0] if n else 0
    block = triton.next_power_of_2(max(1, n))
    on = pdl.enabled(x.device)
    # Y and H are fresh contiguous [rows, n] tensors: row stride n
    tail = (n, x2.stride(0), r2.stride(0), n, n, float(x_eps), float(eps), bool(gemma), weight is not None, block, on)
    plan = Plan(_norm_add_norm_kernel, (max(1, rows),), tail, norm_heuristic(block, x.element_size())["num_warps"],
                rows, **pdl.launch_options(on))
    if key is not None:
        _PLANS.put(key, plan)
    return plan


def _forward(x: torch.Tensor, residual: torch.Tensor, x_weight: torch.Tensor, x_eps: float,
             weight: torch.Tensor | None, eps: float, gemma: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One launch: ``(y, h)`` (``y`` None without ``weight``)."""
    plan = _plan(x, residual, x_weight, x_eps, weight, eps, gemma)
    n = x.shape[-1]
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = torch.empty_like(h) if weight is not None else None
    if plan.n_rows:
        x2, r2 = x.reshape(-1, n), residual.reshape(-1, n)
        second = weight is not None
        plan.launch(x2, r2, x_weight, weight if second else x_weight, y if second else h, h)
    return y, h


def _one_launch(x: torch.Tensor) -> bool:
    """A row the kernel keeps in registers (longer rows take the composition of the two-pass ops)."""
    return 0 < x.shape[-1] <= MAX_ONE_PASS if x.dim() else False


# ----------------------------------------------------------------------------------------------------------------
# Registration: triton_ops::rmsnorm_add_rmsnorm, rmsnorm_add (forward only: the public functions send a call with a
# gradient to record to the composition of the differentiable ops)
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op(op_name("rmsnorm_add_rmsnorm"), mutates_args=())
def _norm_add_norm_op(x: torch.Tensor, residual: torch.Tensor, x_weight: torch.Tensor, weight: torch.Tensor,
                      x_eps: float, eps: float, gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    y, h = _forward(x, residual, x_weight, x_eps, weight, eps, gemma)
    return y, h


@_norm_add_norm_op.register_fake
def _(x, residual, x_weight, weight, x_eps, eps, gemma):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op(op_name("rmsnorm_add"), mutates_args=())
def _norm_add_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 gemma: bool) -> torch.Tensor:
    return _forward(x, residual, weight, eps, None, eps, gemma)[1]


@_norm_add_op.register_fake
def _(x, residual, weight, eps, gemma):
    return x.new_empty(x.shape)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def _composed(*tensors: torch.Tensor) -> bool:
    """Whether the call runs as the composition of the differentiable ops: a gradient to record, or a row longer
    than one pass."""
    if not isinstance(tensors[0], torch.Tensor):
        return False  # the launch's validation names what it got
    grad = torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)
    return grad or not _one_launch(tensors[0])


def rmsnorm_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, x_weight: torch.Tensor, weight: torch.Tensor,
                        eps: float = 1e-6, *, x_eps: float | None = None,
                        gemma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + rmsnorm(x, x_weight, x_eps)``, ``y = rmsnorm(h, weight, eps)`` in one launch: ``(y, h)``.

    Gemma's post-attention norm, the residual add and its pre-feed-forward norm. Bit for bit
    ``fused_add_rmsnorm(rmsnorm(x, x_weight, x_eps, gemma=gemma), residual, weight, eps, gemma=gemma)``: the first
    norm's output and the sum are rounded to x's dtype as those ops round them.

    Args:
        x, residual: ``[..., hidden]`` of one fp16/bf16/fp32 dtype and one shape, unit stride in ``hidden``.
        x_weight, weight: ``[hidden]`` each, any float dtype: the norm of ``x``'s and the norm of the sum's.
        eps: the second norm's epsilon; ``x_eps`` the first's (default: ``eps``).
        gemma: both norms scale by ``1 + weight``.

    Returns new tensors of x's shape and dtype. Differentiable (a call with a gradient to record runs the
    composition above); rows longer than 8192 take that composition too. Registered as
    ``torch.ops.triton_ops.rmsnorm_add_rmsnorm``.
    """
    x_eps = eps if x_eps is None else x_eps
    if _composed(x, residual, x_weight, weight):
        return fused_add_rmsnorm(rmsnorm(x, x_weight, x_eps, gemma=gemma), residual, weight, eps, gemma=gemma)
    if direct_call_ok(x, residual, x_weight, weight):
        return _forward(x, residual, x_weight, x_eps, weight, eps, gemma)
    return _norm_add_norm_op(x, residual, x_weight, weight, x_eps, eps, gemma)


def rmsnorm_add(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                gemma: bool = False) -> torch.Tensor:
    """``residual + rmsnorm(x, weight, eps)`` in one launch (Gemma's post-feed-forward norm and the residual add).

    Bit for bit ``residual + rmsnorm(x, weight, eps, gemma=gemma)``: the norm's output rounded to x's dtype, then the
    sum. ``x`` and ``residual``: one shape and fp16/bf16/fp32 dtype, unit stride in the last dimension. Returns a
    new tensor. Differentiable (through that composition); registered as ``torch.ops.triton_ops.rmsnorm_add``.
    """
    if _composed(x, residual, weight):
        return residual + rmsnorm(x, weight, eps, gemma=gemma)
    if direct_call_ok(x, residual, weight):
        return _forward(x, residual, weight, eps, None, eps, gemma)[1]
    return _norm_add_op(x, residual, weight, eps, gemma)


__all__ = ["rmsnorm_add", "rmsnorm_add_rmsnorm"]
