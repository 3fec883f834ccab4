"""``rmsnorm`` and ``fused_add_rmsnorm``: the decoder layer's RMSNorm, alone or with the residual add before it.

A decoder layer computes ``residual = x + residual`` then ``norm(residual)``: in eager that is an add kernel, then
five more (``pow``, ``mean``, ``add``, ``rsqrt``, ``mul``) that each read and write the activation. Here one program
normalizes one row (token): it reads ``x`` (and the residual), writes the new residual and the normalized row, and
computes in fp32 whatever the input dtype. The registered ops (``torch.ops.triton_ops.rmsnorm``,
``fused_add_rmsnorm``, the in-place ``fused_add_rmsnorm_``) have composite PyTorch backwards.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, overload

import torch
import triton
import triton.language as tl
from triton_ops_core import pdl
from triton_ops_core.device import is_interpreter, supports_fp8
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.fp8_cast import finite_abs, group_scale, store_fp8
from triton_ops_core.launch import Plan, PlanCache, call_key, next_pow2
from triton_ops_core.library import capturing, direct_call_ok, op_name
from triton_ops_core.pdl import pdl_launch_dependents, pdl_release, pdl_wait
from triton_ops_core.validation import (
    FLOAT_DTYPES,
    check_dtype,
    check_kernel_device,
    check_last_dim_contiguous,
    check_ndim,
    check_positive,
    check_same_device,
    check_same_dtype,
    check_tensor,
)

from ..config import get_norm_config

# One pass keeps the row in registers up to this many elements (Llama-70B's 8192 included); longer rows loop twice
# over the row (sum of squares, then normalize) in tiles of this size.
MAX_ONE_PASS = 8192
# The FP8 output's scalings: one scale per row, or per 1 x 128 block of a row (DeepSeek-V3's activation blocks,
# fp8_gemm's A_BLOCK: what block- and group-scaled FP8 weights pair with)
FP8_OUT_GROUP = {"row": 0, "block": 128}


@triton.jit
def _fp8_row_out(y, mask, y_ptrs, s_ptr, EMULATE: tl.constexpr):
    """One row's FP8 output: the scale of its (already rounded) values and their E4M3 cast, stored."""
    scale, inv, _ = group_scale(tl.max(finite_abs(y), axis=0), 0.0, False, 448.0)
    store_fp8(y_ptrs, y * inv, mask, True, EMULATE)
    tl.store(s_ptr, scale)


@triton.jit
def _fp8_groups_out(y, c0, N, y_row, s_row, BLOCK: tl.constexpr, GROUP: tl.constexpr, EMULATE: tl.constexpr):
    """Columns ``c0 .. c0 + BLOCK`` of a row's FP8 output in 1 x ``GROUP`` blocks (``c0`` a multiple of ``GROUP``):
    each block's scale from its own (already rounded) values, as ``quantize_fp8(..., "block")`` computes it."""
    groups = tl.reshape(finite_abs(y), [BLOCK // GROUP, GROUP])
    scale, inv, _ = group_scale(tl.max(groups, axis=1), 0.0, False, 448.0)
    q = tl.reshape(tl.reshape(y, [BLOCK // GROUP, GROUP]) * inv[:, None], [BLOCK])
    c = c0 + tl.arange(0, BLOCK)
    store_fp8(y_row + c, q, c < N, True, EMULATE)
    g = c0 // GROUP + tl.arange(0, BLOCK // GROUP)
    tl.store(s_row + g, scale, mask=g * GROUP < N)


@triton.jit
def _square64(x):
    """Squares in fp64: exact for fp16/bf16/fp32 values, and so is (nearly always) their fp64 sum, in any order."""
    x64 = x.to(tl.float64)
    return x64 * x64


@triton.jit
def _rstd(sum_sq, N, eps):
    """``1 / sqrt(sum_sq / N + eps)`` from an fp64 sum of squares, then correctly rounded fp32 division and square
    root: the same bits whatever order the compiler sums in. The order follows the register layout, which the
    output's store width sets: with an fp32 sum the bf16 and the FP8-output variants differed by an fp32 ulp on a
    few rows of 8192 (H200), which flips the bf16 rounding of a value sitting on a tie and broke the FP8 output's
    equality with quantizing the bf16 output."""
    one = tl.full(sum_sq.shape, 1.0, tl.float32)  # tensors: N may arrive as a constexpr (Triton specializes 1)
    mean_sq = tl.math.div_rn(sum_sq.to(tl.float32), one * N)
    return tl.math.div_rn(one, tl.sqrt_rn(mean_sq + eps))


@triton.jit
def _normalized(src, W, c, N, rstd, GEMMA: tl.constexpr):
    """Columns ``c`` of a row (at ``src``) normalized and scaled, in fp32 (0 past ``N``)."""
    mask = c < N
    w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:
        w = w + 1.0
    return tl.load(src + c, mask=mask, other=0.0).to(tl.float32) * rstd * w


@triton.jit
def _rmsnorm_kernel(X, R, Y, R_OUT, W, S, n_rows, N, stride_x, stride_r, stride_y, stride_ro, stride_s, eps,
                    HAS_RESIDUAL: tl.constexpr, GEMMA: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                    FP8_OUT: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr = False,
                    RELEASE: tl.constexpr = False, FP8_GROUP: tl.constexpr = 0):
    """``FP8_OUT``: the normalized row is rounded to the activation dtype (what ``rmsnorm`` returns), then
    quantized to E4M3 into ``Y``, per row with its scale in ``S[row * stride_s]``, or with ``FP8_GROUP`` in blocks of
    1 x ``FP8_GROUP`` columns with their scales in ``S[row * stride_s + block]``: bit-identical to ``quantize_fp8``
    of ``rmsnorm``'s output, without writing and reading that output. ``Y`` is a uint8 view under ``EMULATE``.
    ``PDL`` (``triton_ops_core.pdl``): launched early, the program waits for the previous kernel first; with
    ``RELEASE`` (a grid of one wave: ``pdl.release_early``) the next kernel may launch once this one runs."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)
    pdl_release(PDL, RELEASE)
    row = tl.program_id(0).to(tl.int64)
    x_row, y_row, s_row = X + row * stride_x, Y + row * stride_y, S + row * stride_s
    r_row, ro_row = R + row * stride_r, R_OUT + row * stride_ro
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        # the weight is loaded with the row, not after the reduction: a decode step's one row is a chain of cache
        # round trips, and the weight depends on nothing
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            # the new residual is rounded to the activation dtype, as the model's own add rounds it; the norm reads
            # that rounded sum, as the model's next norm does
            s = x + tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
            s = s.to(R_OUT.dtype.element_ty)
            tl.store(ro_row + cols, s, mask=mask)
            x = s.to(tl.float32)
        rstd = _rstd(tl.sum(_square64(x), axis=0), N, eps)
        if GEMMA:
            w = w + 1.0
        if FP8_OUT:
            y = tl.where(mask, (x * rstd * w).to(X.dtype.element_ty).to(tl.float32), 0.0)
            if FP8_GROUP > 0:
                _fp8_groups_out(y, 0, N, y_row, s_row, BLOCK, FP8_GROUP, EMULATE)
            else:
                _fp8_row_out(y, mask, y_row + cols, s_row, EMULATE)
        else:
            tl.store(y_row + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = c < N
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                s = x + tl.load(r_row + c, mask=mask, other=0.0).to(tl.float32)
                s = s.to(R_OUT.dtype.element_ty)
                tl.store(ro_row + c, s, mask=mask)
                x = s.to(tl.float32)
            acc += _square64(x)
        rstd = _rstd(tl.sum(acc, axis=0), N, eps)
        # the source of the normalized values: the program's own residual stores above (read back in the rounded
        # dtype), else x
        src = ro_row if HAS_RESIDUAL else x_row
        if FP8_OUT and FP8_GROUP == 0:  # a pass for the row's absolute maximum before anything is cast
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, N, BLOCK):
                y = _normalized(src, W, start + cols, N, rstd, GEMMA).to(X.dtype.element_ty)
                amax = tl.maximum(amax, finite_abs(y.to(tl.float32)))
            scale, inv, _ = group_scale(tl.max(amax, axis=0), 0.0, False, 448.0)
            tl.store(s_row, scale)
        for start in range(0, N, BLOCK):
            c = start + cols
            y = _normalized(src, W, c, N, rstd, GEMMA)
            if FP8_OUT:
                y = y.to(X.dtype.element_ty).to(tl.float32)
                if FP8_GROUP > 0:  # a tile holds whole blocks (BLOCK is a multiple of the group): no extra pass
                    _fp8_groups_out(y, start, N, y_row, s_row, BLOCK, FP8_GROUP, EMULATE)
                else:
                    store_fp8(y_row + c, y * inv, c < N, True, EMULATE)
            else:
                tl.store(y_row + c, y.to(Y.dtype.element_ty), mask=c < N)


class NormNeeds(NamedTuple):
    """A plan's ``extra``: the hidden size, and whether x / the residual must be copied to be walked by one row
    stride (views that have none; rare)."""

    n: int
    copy_x: bool
    copy_residual: bool


def _validate(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, gemma: bool) -> None:
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    check_dtype(x, "x", FLOAT_DTYPES)
    check_dtype(weight, "weight", FLOAT_DTYPES)
    check_ndim(x, "x", minimum=1)
    check_ndim(weight, "weight", exact=1)
    if weight.shape[0] != x.shape[-1]:
        raise ShapeMismatchError(
            f"weight: expected shape [{x.shape[-1]}] (x's last dimension), got {list(weight.shape)}")
    check_positive(eps, "eps")
    if not isinstance(gemma, bool):
        raise InvalidArgumentError(f"gemma: expected a bool, got {gemma!r}")
    check_last_dim_contiguous(x, "x")
    check_last_dim_contiguous(weight, "weight")
    if residual is not None:
        check_tensor(residual, "residual")
        check_same_dtype(x=x, residual=residual)
        if residual.shape != x.shape:
            raise ShapeMismatchError(f"residual: expected x's shape {list(x.shape)}, got {list(residual.shape)}")
        check_last_dim_contiguous(residual, "residual")
    check_same_device(x=x, weight=weight, residual=residual)
    check_kernel_device(x, "x")


def _rows(t: torch.Tensor) -> torch.Tensor:
    # the [n_rows, N] view the kernel walks with one row stride (a copy only for views that have none)
    return t.reshape(-1, t.shape[-1])


_PLANS = PlanCache()


def _check_fp8_out(x: torch.Tensor) -> None:
    if not supports_fp8(x.device):
        raise UnsupportedDtypeError(
            f"fp8_out: an E4M3 output needs FP8 support (compute capability 8.9 or higher), got "
            f"{torch.cuda.get_device_name(x.device) if x.device.type == 'cuda' else x.device}")


def _plan(x, weight, eps, residual, gemma, inplace: bool, config: dict | None = None, fp8_out: str = "") -> Plan:
    """The cached launch of a call signature (validated on its first call). ``inplace``: the new residual is
    written into ``residual`` itself, else into a fresh contiguous tensor. ``config`` (``{"num_warps": w}``, tuning
    candidates): that launch config, and the plan is not cached. ``fp8_out``: ``""`` (the activation dtype's
    output), or an E4M3 output with ``"row"`` or ``"block"`` scales (:data:`FP8_OUT_GROUP`)."""
    key = call_key(x, weight, eps, residual, gemma, inplace, fp8_out)
    plan = _PLANS.get(key) if config is None else None
    if plan is not None:
        return plan
    _validate(x, weight, eps, residual, gemma)
    if fp8_out:
        _check_fp8_out(x)
    n = x.shape[-1]
    n_rows = x.numel() // n if n else 0
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    copy_x, copy_r = x2.data_ptr() != x.data_ptr(), residual is not None and r2.data_ptr() != residual.data_ptr()
    stride_ro = (r2.stride(0) if not copy_r else n) if inplace else n
    block = min(next_pow2(n), MAX_ONE_PASS)
    group = FP8_OUT_GROUP[fp8_out] if fp8_out else 0
    block = max(block, group)  # a tile holds whole blocks of the FP8 output
    if config is None:
        def bench(cfg: dict):  # tune-on-first-use candidates: never in place (a fresh residual output each run)
            return lambda: _forward(x, weight, eps, residual, gemma, False, config=cfg)

        # kernel-autotune: cached, shipped for this GPU, tuned on first use, else config.norm_heuristic (rows of
        # 16+ KB stream best with 8 warps; a short row needs few); no search inside a CUDA-graph capture. The FP8
        # output takes the config of the same norm with the activation dtype's output (the same row walk).
        config = get_norm_config(n, block, n_rows, x.dtype, x.device, residual=residual is not None,
                                 bench=None if capturing(x.device) else bench)
        cache = True
    else:
        cache = False
    pdl_on = pdl.enabled(x.device)
    tail = (n_rows, n, x2.stride(0) if not copy_x else n, r2.stride(0) if not copy_r else n, n, stride_ro,
            fp8_scale_shape(x.shape, fp8_out)[-1] if fp8_out else 1, float(eps), residual is not None, bool(gemma),
            block, n <= MAX_ONE_PASS, bool(fp8_out), bool(fp8_out) and is_interpreter(), pdl_on,
            pdl.release_early(pdl_on, max(1, n_rows), x.device, n_rows), group)
    plan = Plan(_rmsnorm_kernel, (max(1, n_rows),), tail, int(config["num_warps"]), n_rows,
                extra=NormNeeds(n, copy_x, copy_r), **pdl.launch_options(pdl_on))
    return _PLANS.put(key, plan) if cache else plan


def _forward(x, weight, eps, residual, gemma, inplace: bool = False,
             config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One launch: ``(y, new residual)`` (None without ``residual``; ``residual`` itself with ``inplace``)."""
    plan = _plan(x, weight, eps, residual, gemma, inplace, config)  # validates first: nothing allocated for bad input
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, _run(plan, x, weight, residual, inplace, y, y)


# EMULATE's place in a plan's tail (the kernel's arguments from n_rows on)
_EMULATE_AT = _rmsnorm_kernel.arg_names.index("EMULATE") - _rmsnorm_kernel.arg_names.index("n_rows")


def fp8_scale_shape(shape: tuple[int, ...], fp8_out: str) -> tuple[int, ...]:
    """The FP8 output's scale shape for an input of ``shape``: ``[..., 1]`` per row, ``[..., ceil(hidden / 128)]``
    per 1 x 128 block (``quantize_fp8``'s for the 2-D view of the rows)."""
    group = FP8_OUT_GROUP[fp8_out]
    return (*shape[:-1], -(-shape[-1] // group) if group else 1)


def _forward_fp8(x, weight, eps, residual, gemma, inplace: bool = False,
                 fp8_out: str = "row") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One launch: ``(E4M3 y, scales, new residual)``: per row ``[..., 1]`` or per 1 x 128 block
    ``[..., ceil(hidden / 128)]`` (``fp8_out``)."""
    plan = _plan(x, weight, eps, residual, gemma, inplace, fp8_out=fp8_out)
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(fp8_scale_shape(x.shape, fp8_out), dtype=torch.float32, device=x.device)
    emulate = plan.tail[_EMULATE_AT]  # the interpreter stores bit patterns
    y_arg = y.view(torch.uint8) if emulate else y
    return y, scale, _run(plan, x, weight, residual, inplace, y_arg, scale)


def _run(plan: Plan, x, weight, residual, inplace: bool, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """Launch ``plan`` writing ``y`` (and ``scale`` for an FP8 output); returns the new residual."""
    new_residual = None
    if residual is not None:
        new_residual = residual if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if plan.n_rows == 0:
        return new_residual
    x2 = _rows(x).contiguous() if plan.extra.copy_x else _rows(x)
    y2 = y.view(-1, plan.extra.n)
    if residual is None:
        plan.launch(x2, x2, y2, y2, weight, scale)
        return None
    r2 = _rows(residual).contiguous() if plan.extra.copy_residual else _rows(residual)
    ro2 = r2 if inplace else new_residual.view(-1, plan.extra.n)
    plan.launch(x2, r2, y2, ro2, weight, scale)
    if inplace and plan.extra.copy_residual:
        residual.copy_(r2.view(residual.shape))  # a residual without one row stride: written back
    return new_residual


# ----------------------------------------------------------------------------------------------------------------
# Registration: triton_ops::rmsnorm, fused_add_rmsnorm, fused_add_rmsnorm_ and their FP8-output variants
# (rmsnorm_fp8, fused_add_rmsnorm_fp8, fused_add_rmsnorm_fp8_: inference only, no autograd)
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op(op_name("rmsnorm"), mutates_args=())
def _rmsnorm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    return _forward(x, weight, eps, None, gemma)[0]


@_rmsnorm_op.register_fake
def _(x, weight, eps, gemma):
    return x.new_empty(x.shape)


@torch.library.custom_op(op_name("fused_add_rmsnorm"), mutates_args=())
def _fused_add_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                  gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, weight, eps, residual, gemma)


@_fused_add_op.register_fake
def _(x, residual, weight, eps, gemma):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op(op_name("fused_add_rmsnorm_"), mutates_args=("residual",))
def _fused_add_inplace_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                          gemma: bool) -> torch.Tensor:
    return _forward(x, weight, eps, residual, gemma, inplace=True)[0]


@_fused_add_inplace_op.register_fake
def _(x, residual, weight, eps, gemma):
    return x.new_empty(x.shape)


def _scaling(block: bool) -> str:
    return "block" if block else "row"


@torch.library.custom_op(op_name("rmsnorm_fp8"), mutates_args=())
def _rmsnorm_fp8_op(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool,
                    block: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_fp8(x, weight, eps, None, gemma, fp8_out=_scaling(block))[:2]


def _fp8_fakes(x: torch.Tensor, block: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
            x.new_empty(fp8_scale_shape(x.shape, _scaling(block)), dtype=torch.float32))


@_rmsnorm_fp8_op.register_fake
def _(x, weight, eps, gemma, block=False):
    return _fp8_fakes(x, block)


@torch.library.custom_op(op_name("fused_add_rmsnorm_fp8"), mutates_args=())
def _fused_add_fp8_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool,
                      block: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_fp8(x, weight, eps, residual, gemma, fp8_out=_scaling(block))


@_fused_add_fp8_op.register_fake
def _(x, residual, weight, eps, gemma, block=False):
    return (*_fp8_fakes(x, block), x.new_empty(x.shape))


@torch.library.custom_op(op_name("fused_add_rmsnorm_fp8_"), mutates_args=("residual",))
def _fused_add_fp8_inplace_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                              gemma: bool, block: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_fp8(x, weight, eps, residual, gemma, inplace=True, fp8_out=_scaling(block))[:2]


@_fused_add_fp8_inplace_op.register_fake
def _(x, residual, weight, eps, gemma, block=False):
    return _fp8_fakes(x, block)


def _norm_backward(s: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool, grad: torch.Tensor,
                   need_weight: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of ``y = s * rstd(s) * w`` in fp32: ``ds = rstd * (g w - s_hat * mean(g w s_hat))`` and
    ``dw = sum(g s_hat)`` over the rows."""
    s32, g32 = s.float(), grad.float()
    w32 = weight.float() + 1.0 if gemma else weight.float()
    rstd = torch.rsqrt(s32.square().mean(-1, keepdim=True) + eps)
    s_hat = s32 * rstd
    gw = g32 * w32
    ds = rstd * (gw - s_hat * (gw * s_hat).mean(-1, keepdim=True))
    dw = (g32 * s_hat).reshape(-1, s.shape[-1]).sum(0).to(weight.dtype) if need_weight else None
    return ds.to(s.dtype), dw


def _rmsnorm_setup(ctx, inputs, output) -> None:
    x, weight, eps, gemma = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.gemma = eps, gemma


def _rmsnorm_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dw = _norm_backward(x, weight, ctx.eps, ctx.gemma, grad, ctx.needs_input_grad[1])
    return dx if ctx.needs_input_grad[0] else None, dw, None, None


def _fused_add_setup(ctx, inputs, output) -> None:
    _, _, weight, eps, gemma = inputs
    ctx.save_for_backward(output[1], weight)  # the new residual: what the norm read
    ctx.eps, ctx.gemma = eps, gemma


def _fused_add_backward(ctx, grad_y, grad_residual):
    s, weight = ctx.saved_tensors
    ds, dw = _norm_backward(s, weight, ctx.eps, ctx.gemma,
                            torch.zeros_like(s) if grad_y is None else grad_y, ctx.needs_input_grad[2])
    if grad_residual is not None:
        ds = ds + grad_residual
    need = ctx.needs_input_grad
    return ds if need[0] else None, ds if need[1] else None, dw, None, None


_rmsnorm_op.register_autograd(_rmsnorm_backward, setup_context=_rmsnorm_setup)
_fused_add_op.register_autograd(_fused_add_backward, setup_context=_fused_add_setup)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def _check_flag(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name}: expected a bool, got {value!r}")


def _fp8_scaling(fp8_out: object) -> str:
    """``fp8_out`` as a scaling: ``"row"`` (``True`` too) or ``"block"``."""
    if fp8_out is True or fp8_out == "row":
        return "row"
    if fp8_out == "block":
        return "block"
    raise InvalidArgumentError(f"fp8_out: expected False, True, 'row' or 'block', got {fp8_out!r}")


def _refuse_grad(*tensors: torch.Tensor | None) -> None:
    if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors):
        raise InvalidArgumentError("fp8_out: the FP8 output is not differentiable (inference only); run under "
                                   "torch.no_grad() / torch.inference_mode(), or take the bf16 output")


@overload
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = ..., *, gemma: bool = ...,
            fp8_out: Literal[False] = ...) -> torch.Tensor: ...
@overload
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = ..., *, gemma: bool = ...,
            fp8_out: Literal[True, "row", "block"]) -> tuple[torch.Tensor, torch.Tensor]: ...
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, gemma: bool = False,
            fp8_out: bool | Literal["row", "block"] = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dimension (``1 + weight`` with ``gemma``), in one pass.

    Args:
        x: ``[..., hidden]`` fp16/bf16/fp32, unit stride in ``hidden`` (any hidden size: rows longer than 8192
            loop twice over the row). weight: ``[hidden]``, any float dtype. eps: added to the mean square.
        gemma: scale by ``1 + weight`` (Gemma's RMSNorm).
        fp8_out: return ``(y_fp8, y_scale)`` instead: the output quantized to ``float8_e4m3fn`` in the same launch,
            ready for ``fp8_gemm`` as its activation. ``True`` or ``"row"``: one scale per row (``y_scale``: float32
            ``[..., 1]``, ``y ~ y_fp8.float() * y_scale``); ``"block"``: one per 1 x 128 block of a row (``y_scale``:
            float32 ``[..., ceil(hidden / 128)]``, the activation blocks that block- and group-scaled FP8 weights
            pair with). Bit-identical to ``quantize_fp8(rmsnorm(x, weight, eps), "e4m3", scaling)`` (for the 2-D
            view of the rows): the normalized row is rounded to x's dtype first, as the unfused pair does, so a
            model changes nothing by fusing. Needs FP8 support (compute capability 8.9+, or the interpreter); not
            differentiable.

    Returns a new tensor of x's shape and dtype; math in fp32, one rounding. Differentiable in x and weight.
    Registered as ``torch.ops.triton_ops.rmsnorm`` (``rmsnorm_fp8`` with ``fp8_out``, its ``block`` flag for
    ``"block"``).
    """
    if fp8_out is not False:
        scaling = _fp8_scaling(fp8_out)
        _refuse_grad(x, weight)
        if direct_call_ok(x, weight):
            return _forward_fp8(x, weight, eps, None, gemma, fp8_out=scaling)[:2]
        return _rmsnorm_fp8_op(x, weight, eps, gemma, scaling == "block")
    if direct_call_ok(x, weight):  # plain eager: no dispatcher round trip
        return _forward(x, weight, eps, None, gemma)[0]
    return _rmsnorm_op(x, weight, eps, gemma)


@overload
def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = ..., *,
                      gemma: bool = ..., inplace: bool = ...,
                      fp8_out: Literal[False] = ...) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = ..., *,
                      gemma: bool = ..., inplace: bool = ...,
                      fp8_out: Literal[True, "row", "block"]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                      gemma: bool = False, inplace: bool = False,
                      fp8_out: bool | Literal["row", "block"] = False) -> tuple[torch.Tensor, ...]:
    """The decoder layer's ``residual = x + residual; y = rmsnorm(residual)`` in one pass: returns ``(y, residual)``.

    The new residual is rounded to the activation dtype (as the model's own add rounds it) and the norm reads that
    rounded sum. With ``inplace=True`` the new residual is written into ``residual`` itself (not differentiable)
    and returned. With ``fp8_out`` (``True`` / ``"row"``, or ``"block"``): ``(y_fp8, y_scale, residual)``, ``y``
    quantized to E4M3 in the same launch, per row or per 1 x 128 block (see ``rmsnorm``). Registered as
    ``torch.ops.triton_ops.fused_add_rmsnorm`` and ``fused_add_rmsnorm_`` (in place), ``fused_add_rmsnorm_fp8``
    and ``fused_add_rmsnorm_fp8_``.
    """
    _check_flag(inplace, "inplace")
    if fp8_out is not False:
        scaling = _fp8_scaling(fp8_out)
        block = scaling == "block"
        _refuse_grad(x, residual, weight)
        if not inplace:
            if direct_call_ok(x, residual, weight):
                return _forward_fp8(x, weight, eps, residual, gemma, fp8_out=scaling)
            return _fused_add_fp8_op(x, residual, weight, eps, gemma, block)
        if direct_call_ok(x, residual, weight):
            return (*_forward_fp8(x, weight, eps, residual, gemma, inplace=True, fp8_out=scaling)[:2], residual)
        return (*_fused_add_fp8_inplace_op(x, residual, weight, eps, gemma, block), residual)
    if inplace:
        if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in (x, residual, weight)):
            raise InvalidArgumentError("inplace: expected False when a gradient is wanted, got True; run in-place "
                                       "under torch.no_grad()")
        if direct_call_ok(x, residual, weight):
            return _forward(x, weight, eps, residual, gemma, inplace=True)[0], residual
        return _fused_add_inplace_op(x, residual, weight, eps, gemma), residual
    if direct_call_ok(x, residual, weight):
        return _forward(x, weight, eps, residual, gemma)
    return _fused_add_op(x, residual, weight, eps, gemma)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, gemma: bool = False,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
    """The same math in PyTorch, in x's dtype (cast to float64 for a reference); with ``residual``, of the sum."""
    if residual is not None:
        x = x + residual
    w = weight.to(x.dtype) + 1 if gemma else weight.to(x.dtype)
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


__all__ = ["FP8_OUT_GROUP", "MAX_ONE_PASS", "fp8_scale_shape", "fused_add_rmsnorm", "rmsnorm", "rmsnorm_reference"]
