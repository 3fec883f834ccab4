"""``decode_linear``: ``x @ W^T + b`` for a decode step's few rows, with a 16-bit weight streamed from HBM once.

At one row a linear layer is a matrix-vector product: the weight's bytes are the whole cost. cuBLAS splits K for
such shapes and adds a reduction launch; on the H200 (CUDA graph, weights rotated past L2) its bf16 GEMMs took
16.3 / 12.8 us for Llama-3-8B's packed q/k/v (4096 -> 6144) and o (4096 -> 4096) projections, 74 / 63 % of the
weight-read floor. This runs the weight-only decode kernel (``weight_only_kernels``) with the weight in x's dtype
and no scale: one program per 8 output columns streams their ``8 x K`` weight rows with CUDA-core FMAs into fp32
(15.3 / 11.2 us there), one launch, no split. Rows past one take the same kernel's tensor-core tile (correct for
any M; made for decode). With ``weight_scale`` the weight is ``FP8Linear``'s E4M3 one, up-converted in registers: the
kernel ``FP8Linear`` runs at decode, here with the RMSNorm in the same launch available (``norm_weight``, deferred:
``triton_ops_core.rms_prologue``).

Registered as ``torch.ops.triton_ops.decode_linear``. Inference first: with a gradient to record it is
``torch.nn.functional.linear`` (same result up to accumulation order), so training code may call it freely.

``decode_linear_add_(residual, x, weight)``: ``residual += x @ W^T`` in the same launch (a decoder layer's down
projection with its residual add; the product and the sum rounded once, as cuBLAS's ``addmm_`` with beta = 1);
with ``next_norm_weight=``, ``normed=`` the updated residual's RMSNorm written in that launch too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from triton_ops_core import scratch as _scratch
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.launch import PlanCache, call_key
from triton_ops_core.library import direct_call_ok, op_name
from triton_ops_core.rms_prologue import check_norm, check_norm_eps, rms_normalized
from triton_ops_core.validation import check_ndim, check_no_overlap, check_tensor, memory_span

from .gemm import _CACHE_CLEARERS
from .linear import fp8_linear
from .weight_only import build_plan, check_normed, check_residual

_PLANS = PlanCache()
_ADD_PLANS = PlanCache()
_CACHE_CLEARERS.append(_PLANS.clear)  # fp8_gemm.clear_caches() forgets these plans too
_CACHE_CLEARERS.append(_ADD_PLANS.clear)


def _decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0,
                   weight_scale: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                   next_norm_weight: torch.Tensor | None = None, next_norm_eps: float = 0.0,
                   normed: torch.Tensor | None = None) -> torch.Tensor:
    check_tensor(x, "x")
    check_ndim(x, "x", minimum=1)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    key = call_key("decode_linear", x2, weight, bias, norm_weight, norm_eps, norm_eps.__class__, weight_scale, residual,
                   next_norm_weight, next_norm_eps, next_norm_eps.__class__, normed)
    entry = _PLANS.get(key) if key is not None else None
    if entry is None:
        entry = _plan(x, x2, weight, bias, norm_weight, norm_eps, weight_scale, residual, next_norm_weight,
                      next_norm_eps, normed)
        if key is not None:
            _PLANS.put(key, entry)
    plan, spans = entry
    m = x2.shape[0]
    res2 = None if residual is None else residual.view(m, plan.n)
    if normed is not None:  # the output is new; the norm's buffer must not overlap what the launch reads
        for other, name, span in zip((x, residual), ("x", "residual"), spans[1:]):
            if other is not None:
                check_no_overlap(normed, "normed", spans[0], other, name, span)
        normed = normed.view(m, plan.n)
    out = plan.run(x2, weight, weight_scale, bias, norm_weight=norm_weight, residual=res2, normed=normed,
                   norm_out_weight=next_norm_weight)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], plan.n)


def _plan(x, x2, weight, bias, norm_weight, norm_eps, weight_scale, residual, next_norm_weight, next_norm_eps,
          normed):
    """``_decode_linear``'s plan and, with ``normed``, the byte spans of ``normed``, ``x`` and ``residual``."""
    res2 = None
    if residual is not None:
        check_residual(residual, x, weight)
        res2 = residual.view(x2.shape[0], weight.shape[0])
    if normed is not None:
        check_normed(normed, (*x.shape[:-1], weight.shape[0]), x.dtype, x.device, next_norm_weight, next_norm_eps)
    plan = build_plan(x2, weight, weight_scale, bias, add_out=res2, norm_weight=norm_weight, norm_eps=norm_eps,
                      norm_out_weight=next_norm_weight if normed is not None else None, norm_out_eps=next_norm_eps)
    spans = () if normed is None else (memory_span(normed), memory_span(x),
                                       None if residual is None else memory_span(residual))
    return plan, spans


@torch.library.custom_op(op_name("decode_linear"), mutates_args=())
def _decode_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0,
                      weight_scale: torch.Tensor | None = None, residual: torch.Tensor | None = None
                      ) -> torch.Tensor:
    with _scratch.per_call():  # no buffer outlives the call (torch.compile's CUDA graphs; see _scratch)
        return _decode_linear(x, weight, bias, norm_weight, norm_eps, weight_scale, residual)


@_decode_linear_op.register_fake
def _(x, weight, bias, norm_weight=None, norm_eps=0.0, weight_scale=None, residual=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# The same with the output's next norm written to ``normed``: an op of its own, whose mutated tensor is never None
# (torch 2.11's functionalization fails on an optional mutated argument passed as None: IndexError)
@torch.library.custom_op(op_name("decode_linear_norm_out"), mutates_args=("normed",))
def _decode_linear_norm_out_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               norm_weight: torch.Tensor | None, norm_eps: float, weight_scale: torch.Tensor | None,
                               residual: torch.Tensor | None, next_norm_weight: torch.Tensor, next_norm_eps: float,
                               normed: torch.Tensor) -> torch.Tensor:
    with _scratch.per_call():
        return _decode_linear(x, weight, bias, norm_weight, norm_eps, weight_scale, residual, next_norm_weight,
                              next_norm_eps, normed)


@_decode_linear_norm_out_op.register_fake
def _(x, weight, bias, norm_weight, norm_eps, weight_scale, residual, next_norm_weight, next_norm_eps, normed):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  weight_scale: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                  norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
                  next_norm_weight: torch.Tensor | None = None, next_norm_eps: float = 1e-6,
                  normed: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for the few rows of a decode step, the weight read once in one launch.

    Args:
        x: ``[..., K]`` float16 or bfloat16 (any strides along the rows); with an FP8 weight, float32 too. Made for
            one to a few rows (one token per sequence); any number of rows is computed correctly.
        weight: ``[N, K]`` in x's dtype (``nn.Linear``'s layout and its ``weight`` as it is), or ``float8_e4m3fn``
            with ``weight_scale`` (``FP8Linear``'s ``weight``: the weight-only kernel of its decode path, x
            unquantized).
        bias: ``[N]`` (any float dtype) or None.
        weight_scale: the FP8 weight's fp32 scale as ``FP8Linear`` stores it (per tensor, per channel, 128x128
            blocks or groups of 128 inputs), or None for a 16-bit weight.
        residual: ``[..., N]`` in x's dtype, contiguous, x's leading shape, or None: then the result is
            ``residual + x @ weight^T + bias``, the sum rounded once, in a new tensor (a decoder layer's output
            projection with its residual add, the layer's input left as it is; ``decode_linear_add_`` adds in
            place).
        norm_weight: ``[K]`` (any float dtype), or None: then x is first RMS-normalized over K with this weight and
            ``norm_eps`` inside the same launch, deferred (x times the weight feeds the products, the rows' rstd
            multiplies the sums): ``fused_rmsnorm_rope.rmsnorm(x, norm_weight, norm_eps)`` followed by the GEMM up to
            the normalized row's rounding to x's dtype, which is skipped (a decoder layer's input norm and its q/k/v
            projection in one launch, for the few rows of decode).
        norm_eps: the norm's epsilon (> 0, as ``rmsnorm``'s).
        next_norm_weight, next_norm_eps, normed: the output's RMSNorm written to ``normed`` in the same launch
            (``[N]`` weight of any float dtype, ``eps`` > 0; ``normed`` a contiguous tensor of the output's shape
            and x's dtype, sharing no memory with ``x`` or ``residual``), bit for bit
            ``fused_rmsnorm_rope.rmsnorm(out, next_norm_weight, next_norm_eps)``: a decoder layer's output
            projection, its residual add and the post-attention norm in one launch (the last program to finish a
            row tile's columns normalizes its rows). Inference only.

    Returns:
        ``[..., N]`` in x's dtype: ``x @ weight^T + bias`` (the FP8 weight times its scale) accumulated in fp32,
        rounded once: with an FP8 weight, what ``fp8_linear(x, weight, weight_scale, bias, path="weight_only")``
        returns.

    Registered as ``torch.ops.triton_ops.decode_linear`` (``torch.compile``, CUDA graphs, ``torch.export`` see one
    node). When autograd must record the call it is ``F.linear`` instead (differentiable; with ``norm_weight``,
    of the RMSNorm computed in fp32 by torch).

    Raises:
        UnsupportedDtypeError, ShapeMismatchError, DeviceMismatchError, UnsupportedDeviceError,
        InvalidArgumentError (a bad ``norm_eps``).
    """
    _check_norm_pair(next_norm_weight, normed)
    if normed is not None:
        check_norm_eps(next_norm_eps, "next_norm_eps")
        next_norm_eps = float(next_norm_eps)
    if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False)
                                       for t in (x, weight, bias, norm_weight, residual)):
        if normed is not None:
            raise InvalidArgumentError("decode_linear: normed= (the output's norm written in the launch) is "
                                       "inference-only; run it under torch.no_grad()")
        # the differentiable path: the same arguments refused as the kernel's path refuses them
        if residual is not None:
            check_residual(residual, x, weight)
        if norm_weight is not None:
            check_tensor(x, "x")
            check_norm(x, norm_weight, norm_eps)
            x = rms_normalized(x, norm_weight, norm_eps)
        if weight_scale is not None:  # FP8Linear's own differentiable path (the input gradient)
            out = fp8_linear(x, weight, weight_scale, bias, path="weight_only")
        else:
            out = F.linear(x, weight, bias)
        return out if residual is None else residual + out
    if direct_call_ok(x, weight, bias, norm_weight, weight_scale, residual, next_norm_weight, normed):
        return _decode_linear(x, weight, bias, norm_weight, norm_eps, weight_scale, residual, next_norm_weight,
                              next_norm_eps, normed)
    if normed is None:
        return _decode_linear_op(x, weight, bias, norm_weight, norm_eps, weight_scale, residual)
    return _decode_linear_norm_out_op(x, weight, bias, norm_weight, norm_eps, weight_scale, residual,
                                      next_norm_weight, next_norm_eps, normed)


def _add_plan(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, next_norm_weight: torch.Tensor | None,
              next_norm_eps: float, normed: torch.Tensor | None):
    """The weight-only plan adding into ``residual`` (and writing its norm to ``normed``), and the byte spans of
    ``residual``, ``x`` and ``normed`` (their overlaps are checked on every call: the plan cache keys on layouts,
    not addresses)."""
    check_residual(residual, x, weight)
    if normed is not None:
        check_normed(normed, residual.shape, residual.dtype, residual.device, next_norm_weight, next_norm_eps)
    n = weight.shape[0]
    m = math.prod(x.shape[:-1])
    plan = build_plan(x.reshape(m, x.shape[-1]), weight, None, None, add_out=residual.view(m, n),
                      norm_out_weight=next_norm_weight if normed is not None else None, norm_out_eps=next_norm_eps)
    return plan, m, memory_span(residual), memory_span(x), None if normed is None else memory_span(normed)


def _decode_linear_add(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       next_norm_weight: torch.Tensor | None = None, next_norm_eps: float = 0.0,
                       normed: torch.Tensor | None = None) -> None:
    key = call_key("decode_linear_add", residual, x, weight, next_norm_weight, next_norm_eps,
                   next_norm_eps.__class__, normed)
    entry = _ADD_PLANS.get(key) if key is not None else None
    if entry is None:
        entry = _add_plan(residual, x, weight, next_norm_weight, next_norm_eps, normed)
        if key is not None:
            _ADD_PLANS.put(key, entry)
    plan, m, residual_span, x_span, normed_span = entry
    check_no_overlap(residual, "residual", residual_span, x, "x", x_span)
    if normed is not None:
        check_no_overlap(normed, "normed", normed_span, residual, "residual", residual_span)
        check_no_overlap(normed, "normed", normed_span, x, "x", x_span)
    plan.run(x.reshape(m, x.shape[-1]), weight, None, None, out=residual.view(m, plan.n),
             normed=None if normed is None else normed.view(m, plan.n), norm_out_weight=next_norm_weight)


@torch.library.custom_op(op_name("decode_linear_add_"), mutates_args=("residual",))
def _decode_linear_add_op(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    with _scratch.per_call():  # no buffer outlives the call (torch.compile's CUDA graphs; see _scratch)
        _decode_linear_add(residual, x, weight)


@_decode_linear_add_op.register_fake
def _(residual, x, weight):
    return None


@torch.library.custom_op(op_name("decode_linear_add_norm_"), mutates_args=("residual", "normed"))
def _decode_linear_add_norm_op(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               next_norm_weight: torch.Tensor, next_norm_eps: float, normed: torch.Tensor) -> None:
    with _scratch.per_call():
        _decode_linear_add(residual, x, weight, next_norm_weight, next_norm_eps, normed)


@_decode_linear_add_norm_op.register_fake
def _(residual, x, weight, next_norm_weight, next_norm_eps, normed):
    return None


def decode_linear_add_(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, *,
                       next_norm_weight: torch.Tensor | None = None, next_norm_eps: float = 1e-6,
                       normed: torch.Tensor | None = None) -> torch.Tensor:
    """``residual += x @ weight^T`` in place, one launch: a decoder layer's bias-free down projection with its
    residual add, for the few rows of a decode step (the weight streamed once, as :func:`decode_linear`).

    The fp32 product is added to the residual and the sum rounded once (what cuBLAS's ``addmm_`` with beta = 1
    computes, up to accumulation order). With ``normed`` the same launch also writes the updated residual's
    RMSNorm there: ``normed = rmsnorm(residual, next_norm_weight, next_norm_eps)``, bit for bit
    ``fused_rmsnorm_rope.rmsnorm``'s output (a decoder layer's output projection and its post-attention norm: the
    last program to finish a row tile's columns normalizes its rows; no launch of the norm's own).

    Args:
        residual: ``[..., N]`` in x's dtype, contiguous, x's leading shape, sharing no memory with ``x``; updated
            and returned.
        x: ``[..., K]`` float16 or bfloat16 (any strides along the rows).
        weight: ``[N, K]`` in x's dtype.
        next_norm_weight, next_norm_eps: the norm written to ``normed`` (``[N]``, any float dtype, contiguous;
            ``eps`` > 0).
        normed: a contiguous tensor of the residual's shape and dtype, sharing no memory with ``residual`` or
            ``x``: overwritten with the norm; or None (no norm).

    Inference only: nothing is differentiated (``InvalidArgumentError`` if grad mode is on and an argument
    requires a gradient). Registered as ``torch.ops.triton_ops.decode_linear_add_`` (``residual`` mutated) and,
    with ``normed``, ``decode_linear_add_norm_`` (``residual`` and ``normed`` mutated).

    Raises:
        UnsupportedDtypeError, ShapeMismatchError, DeviceMismatchError, UnsupportedDeviceError,
        InvalidArgumentError.
    """
    _check_norm_pair(next_norm_weight, normed)
    if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False)
                                       for t in (residual, x, weight, next_norm_weight, normed)):
        raise InvalidArgumentError("decode_linear_add_: an in-place, inference-only residual add; run it under "
                                   "torch.no_grad() (or use residual + decode_linear(...) to differentiate)")
    eps = float(next_norm_eps) if normed is not None else 0.0
    if normed is not None:
        check_norm_eps(next_norm_eps, "next_norm_eps")
    if direct_call_ok(residual, x, weight, next_norm_weight, normed):
        _decode_linear_add(residual, x, weight, next_norm_weight, eps, normed)
    else:
        if normed is None:
            _decode_linear_add_op(residual, x, weight)
        else:
            _decode_linear_add_norm_op(residual, x, weight, next_norm_weight, eps, normed)
    return residual


def _check_norm_pair(next_norm_weight: torch.Tensor | None, normed: torch.Tensor | None) -> None:
    """``next_norm_weight`` and ``normed`` come together (the add ops' output norm)."""
    if (next_norm_weight is None) != (normed is None):
        raise InvalidArgumentError("next_norm_weight and normed go together: the norm's weight and the tensor it is "
                                   "written to")


__all__ = ["decode_linear", "decode_linear_add_"]
