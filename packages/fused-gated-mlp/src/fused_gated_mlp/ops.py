"""``fused_gated_mlp``: the launcher, the op's registration with its fake and autograd, and the public function.

Forward runs the Triton kernels of ``_kernels``. Backward is a composite of PyTorch operations that recomputes
the two projections from the saved inputs (nothing ``[tokens, intermediate]``-sized is kept between forward and
backward) and applies the analytic derivative of each activation; it is exact up to the rounding of the
recomputed projections, which is that of ``torch.nn.functional.linear``.

FP8 weights (E4M3 or E5M2, weight-only: activations stay bf16/fp16/fp32) run the same two kernels with a constexpr
switch: the weights are streamed as FP8, converted exactly to the activations' dtype in registers, and scaled in fp32
(see ``_kernels``). Scales are per output channel (``[rows]``) or per 128 x 128 block
(``[ceil(rows / 128), ceil(hidden / 128)]``); :func:`quantize_weight_fp8` makes both with PyTorch operations.

The call path is short on purpose (decode calls it with a handful of tokens, where the host is the cost): a lookup
of the call's cached launch plan (``triton_ops_core.launch``; validation and config selection happen only on a
miss), one ``torch.empty`` and one launch. The dispatcher (``torch.ops.triton_ops.fused_gated_mlp``) is entered
when tracing, under a mode, or when autograd must record the call (``triton_ops_core.library``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
from triton.runtime import _allocation
from triton_ops_core import pdl
from triton_ops_core.device import is_hopper
from triton_ops_core.exceptions import (
    InvalidArgumentError,
    UnsupportedDtypeError,
)
from triton_ops_core.gated_activation import ACTIVATION_CODES, gated_product
from triton_ops_core.launch import Plan, PlanCache, call_key, cdiv, next_pow2
from triton_ops_core.library import capturing, direct_call_ok, op_name
from triton_ops_core.rms_prologue import check_norm, rms_normalized
from triton_ops_core.validation import FLOAT_DTYPES, check_choice, check_dtype, check_ndim, check_tensor

from . import _kernels as K
from .activation import _PLANS as _ACTIVATION_PLANS
from .activation import _activation_grads
from .configs import DECODE_MAX_TOKENS, _heuristic, select_gated_mlp_config
from .validation import FP8_WEIGHT_DTYPES, SCALE_BLOCK, validate_gated_mlp_inputs

FP8_SCALINGS = ("channel", "block", "group")
# FP8_WEIGHT_DTYPES: the weight dtypes the kernels stream as FP8 (every value of both converts exactly to bf16 and
# fp16); SCALE_BLOCK: rows and columns of one block of a block-scaled weight (128, the DeepSeek-V3 / transformers
# FP8 block). Both defined with the validation.

_ACTIVATION_CODES = ACTIVATION_CODES  # the kernels' ACTIVATION constexpr by name


# ----------------------------------------------------------------------------------------------------------------
# Host-side helpers
# ----------------------------------------------------------------------------------------------------------------

def _alloc_descriptor_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # Called by Triton at launch, on the launching (current) device.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need global scratch, handed out by ``triton.set_allocator``'s allocator.

    The allocator lives in a ContextVar (per thread), and a user's own allocator wins: ours is installed only
    where none is set. Checked before every TMA launch (a ContextVar read): the first launch of each thread sets it.
    """
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_alloc_descriptor_scratch)


# K tiles of each weight row a decode program asks L2 for before it waits on the previous kernel (PDL), as the FP8
# weight-only GEMV does (fp8_gemm.weight_only.PREFETCH_TILES; benchmarks/dev/pdl_chain.py, session 25).
PREFETCH_TILES = 2


def _prefetch_lines(pdl_on: bool, block_k: int, tiles_per_split: int, weight_bytes: int) -> int:
    """The decode kernel's ``PREFETCH_LINES``: 128-byte lines of each weight row prefetched before the PDL wait."""
    if not pdl_on:
        return 0
    return next_pow2(max(1, min(PREFETCH_TILES, tiles_per_split) * block_k * weight_bytes // 128))


@functools.cache
def _is_hopper(index: int | None) -> bool:
    # Asked on every launch: cached, since the device query costs microseconds of host time.
    return is_hopper(torch.device("cuda", index if index is not None else torch.cuda.current_device()))


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned base addresses and row strides (and a unit last stride)."""
    for t in tensors:
        esize = t.element_size()
        if t.data_ptr() % 16 or (t.stride(0) * esize) % 16 or t.shape[1] * esize < 16:
            return False
    return True


POINTER_PREFILL_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}

_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_k_workspace(device: torch.device, ws_numel: int, lock_numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 partial-sum buffer and int32 tile semaphores, one pair per (device, stream).

    The decode kernel leaves both zeroed after every call (the last program of a tile resets its part), so they
    are allocated once and reused; a separate pair per stream keeps concurrent streams from sharing counters.
    """
    # The raw stream handle is what Triton's launcher reads too (no Stream object built per call).
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    pair = _workspaces.get(key)
    if pair is not None and pair[0].numel() >= ws_numel and pair[1].numel() >= lock_numel:
        return pair
    ws, lock = pair if pair is not None else (None, None)
    if ws is None or ws.numel() < ws_numel:
        ws = torch.zeros(max(ws_numel, 1 << 16), dtype=torch.float32, device=device)
    if lock is None or lock.numel() < lock_numel:
        lock = torch.zeros(max(lock_numel, 1024), dtype=torch.int32, device=device)
    _workspaces[key] = (ws, lock)
    return ws, lock


def _new_output(m: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # One place that allocates the result, so tests can hand the kernel a poisoned buffer. The launch plan
    # assumes a contiguous [m, n] result (its row stride is n).
    return torch.empty((m, n), dtype=dtype, device=device)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting (TF32 only where the user allowed it); halves are exact anyway.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


class LaunchNeeds(NamedTuple):
    """A plan's ``extra``: what the per-call part of a launch needs."""

    n: int  # output columns (the intermediate size)
    device: torch.device
    is_cuda: bool
    workspace: tuple[int, ...] | None  # split-K sizes (partials, semaphores); () without split-K; None: prefill
    tma: bool  # device-side tensor descriptors on a GPU: Triton needs its scratch allocator


_SCALING_CODES = {"channel": K.SCALE_CHANNEL, "block": K.SCALE_BLOCK, "group": K.SCALE_GROUP}
# The config tables' weight kind of each scaling code (configs.WEIGHT_KINDS)
_WEIGHT_KINDS = {K.SCALE_NONE: "same", K.SCALE_CHANNEL: "fp8_channel", K.SCALE_BLOCK: "fp8_block",
                 K.SCALE_GROUP: "fp8_group"}


def _scaling_code(gate_scale: torch.Tensor | None, rows: int, kind: str | None) -> int:
    """The kernels' ``W_SCALING`` for these scales: the validated ``kind``, or (unvalidated calls, separate weights
    of ``rows`` rows) from the shape: ``[rows]`` per channel, ``[rows, ceil(K/128)]`` per group (for one row the
    same scale as a block's), ``[ceil(rows/128), ceil(K/128)]`` per block."""
    if gate_scale is None:
        return K.SCALE_NONE
    if kind is not None:
        return _SCALING_CODES[kind]
    if gate_scale.dim() == 1:
        return K.SCALE_CHANNEL
    return K.SCALE_GROUP if gate_scale.shape[0] == rows else K.SCALE_BLOCK


def _build_plan(
    x2d: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    activation: str,
    alpha: float,
    limit: float,
    config: dict | None = None,
    bench: Callable[[dict], Callable[[], object]] | None = None,
    *,
    gate_scale: torch.Tensor | None = None,
    up_scale: torch.Tensor | None = None,
    scale_rows: tuple[int, int, int] = (1, 0, 0),
    scaling_kind: str | None = None,
    norm_eps: float | None = None,
) -> Plan:
    """Everything of a launch but its tensors: kernel, grid, scalar and constexpr tail (in the kernel's signature
    order), warps, stages. ``extra`` holds what the per-call part needs (``LaunchNeeds``). A plan without kernel
    (empty output) launches nothing.

    FP8 weights come with ``gate_scale`` / ``up_scale`` (the halves' views for a packed channel scale, the packed
    tensor itself twice for a packed block scale); ``scale_rows`` = (multiplier, gate offset, up offset) maps a
    half's row to its packed row for block and group scales (see ``_kernels._block_scales``). ``scaling_kind``: the
    validated kind of the scales (``"channel"``, ``"block"``, ``"group"``); None: read from their shapes.
    ``norm_eps``: the decode kernel's RMSNorm (deferred, in its launch) with this epsilon (the norm weight comes with
    each call), or None; a plan with it is always a decode plan (a forced prefill config is refused: the prefill
    kernel has no norm)."""
    M, K_dim = x2d.shape
    N = gate_weight.shape[0]
    device = x2d.device
    is_cuda = device.type == "cuda"
    if M == 0 or N == 0:
        return Plan(None, (1,), (), 0, n_rows=M, extra=LaunchNeeds(N, device, is_cuda, None, False))
    scaling = _scaling_code(gate_scale, N, scaling_kind)
    if config is not None:
        cfg = dict(config)
    else:
        # FP8 weights have entries of their own (at one or two rows the CUDA-core tiles). No tune-on-first-use
        # for them: the tuner's space holds tensor-core tiles only.
        weights = _WEIGHT_KINDS[scaling]
        # (the RMSNorm runs in the decode kernel only: more rows take its config for the most it is made for)
        rows = min(M, DECODE_MAX_TOKENS) if norm_eps is not None else M
        cfg = select_gated_mlp_config(rows, K_dim, N, x2d.dtype, device,
                                      bench=bench if scaling == K.SCALE_NONE else None, weights=weights)
    on_cpu = device.type == "cpu"
    # The path follows the token count; a forced config may name it (tests run both paths on any size).
    path = cfg.get("path", "decode" if M <= DECODE_MAX_TOKENS or norm_eps is not None else "prefill")
    if norm_eps is not None and path != "decode":
        raise InvalidArgumentError(f"config: the RMSNorm in the launch (norm_weight) runs in the decode kernel only, "
                                   f"got path {path!r}")
    # CUDA-core products (config FMA; the decode kernel's plain loads): with channel scales, or group and block
    # scales (the FMA loop scales partial sums of each group, any K tile)
    fma = bool(cfg.get("FMA", False)) and path == "decode" and not cfg.get("USE_TMA", False)
    if scaling in (K.SCALE_BLOCK, K.SCALE_GROUP) and cfg["BLOCK_K"] > SCALE_BLOCK and not fma:
        # Block scales apply per K step: a step must lie inside one 128-wide scale block. Block sizes are powers of
        # two, so capping BLOCK_K at 128 (from 256 in some decode configs) makes it a divisor of 128.
        cfg = {**cfg, "BLOCK_K": SCALE_BLOCK}  # a copy: a selected config may be a memoized object
    # Tensor descriptors (TMA) by default for the prefill GEMM only: the decode kernel streamed its weights 2-15 %
    # faster with plain wide loads on the H100, at every required shape (benchmarks/dev/gated_mlp_decode.py).
    use_tma = bool(cfg.get("USE_TMA", path != "decode") and K_dim > 0 and (on_cpu or _is_hopper(device.index))
                   and _tma_ok(x2d, gate_weight, up_weight))
    if path != "decode" and not use_tma and config is None and x2d.element_size() == 2:
        # Without TMA the pointer GEMM keeps operands in registers: larger tiles spill (seen in ptxas reports).
        cfg.update(POINTER_PREFILL_CONFIG)
    # The output is a fresh contiguous [M, N] tensor: its row stride is N.
    # Biases are read with their own stride: the halves of an interleaved packed bias are strided views.
    bias_strides = (1 if gate_bias is None else gate_bias.stride(0), 1 if up_bias is None else up_bias.stride(0))
    # Scales are read with their own stride too: element stride per channel (2 for the halves of an interleaved
    # packed scale, 0 for a per-tensor scale expanded to [N]), row stride per block.
    scale_strides = (1 if gate_scale is None else gate_scale.stride(0), 1 if up_scale is None else up_scale.stride(0))
    sizes = (M, N, K_dim, x2d.stride(0), gate_weight.stride(0), up_weight.stride(0), N, *bias_strides,
             *scale_strides, *scale_rows, float(alpha), float(limit))
    options = (_ACTIVATION_CODES[activation], gate_bias is not None, up_bias is not None, scaling)
    precision = (_dot_precision(x2d.dtype), on_cpu and x2d.dtype != torch.float32)  # DOT_PRECISION, UPCAST
    grid_m, grid_n = cdiv(M, cfg["BLOCK_M"]), cdiv(N, cfg["BLOCK_N"])
    pdl_on = False  # the prefill GEMM launches as before (its tiles are not a decode step's chain)
    if path == "decode":
        split_k = cfg.get("SPLIT_K", 1)
        # EVEN_K only matters to the pointer loads; fixing it under TMA lets all shapes share one binary.
        even_k = use_tma or K_dim % (cfg["BLOCK_K"] * split_k) == 0
        kernel = K._gated_mlp_decode_kernel
        use_fma = fma and not use_tma  # (TMA only when a forced config asks for it)
        if not use_fma and cfg["BLOCK_M"] < 16:  # an FMA tile with fewer rows than a tl.dot takes
            cfg = {**cfg, "BLOCK_M": 16}
            grid_m = cdiv(M, 16)
        grid: tuple[int, ...] = (grid_n, split_k, grid_m)
        # F16_DOT (config, off by default): fp16 tensor-core dots for FP8 weights with bf16 activations
        f16_dot = (bool(cfg.get("F16_DOT", False)) and not use_fma and scaling != K.SCALE_NONE
                   and x2d.dtype == torch.bfloat16)
        norm = (norm_eps is not None,)  # NORM
        pdl_on = pdl.enabled(device)
        tail = (sizes + (0.0 if norm_eps is None else float(norm_eps),) + options
                + (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], split_k, even_k, cfg["num_stages"], use_tma)
                + precision + (on_cpu, use_fma, f16_dot) + norm
                + (pdl_on, _prefetch_lines(pdl_on, cfg["BLOCK_K"], cdiv(cdiv(K_dim, cfg["BLOCK_K"]), split_k),
                                           gate_weight.element_size())))
        # split K: the [2, M, N] partial sums, with the norm the [column blocks, M] sums of squares after them
        workspace: tuple[int, ...] | None = (2 * M * N + grid_n * M, grid_m * grid_n) if split_k > 1 else ()
    else:
        kernel = K._gated_mlp_prefill_kernel
        grid = (grid_m * grid_n,)
        tail = (sizes + options + (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg.get("GROUP_M", 8),
                                   cfg["num_stages"], use_tma) + precision)
        workspace = None
    extra = LaunchNeeds(N, device, is_cuda, workspace, use_tma and is_cuda)
    return Plan(kernel, grid, tail, cfg["num_warps"], n_rows=M, info=cfg, extra=extra,
                num_stages=cfg["num_stages"], **pdl.launch_options(path == "decode" and pdl_on))


def _run(plan: Plan, x2d: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
         gate_bias: torch.Tensor | None, up_bias: torch.Tensor | None, gate_scale: torch.Tensor | None = None,
         up_scale: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The per-call part of a forward: allocate the output, pick the workspace, launch the plan."""
    n, device, is_cuda, workspace, tma = plan.extra
    if is_cuda and device.index != torch.cuda.current_device():
        # Triton launches on the current device: make it the tensors' one (multi-GPU processes).
        with torch.cuda.device(device):
            return _run(plan, x2d, gate_weight, up_weight, gate_bias, up_bias, gate_scale, up_scale, norm_weight)
    out = _new_output(plan.n_rows, n, x2d.dtype, device)
    if plan.kernel is None:
        return out
    # Absent operands get a placeholder pointer the kernel never reads (their constexpr switch is off).
    bg = out if gate_bias is None else gate_bias
    bu = out if up_bias is None else up_bias
    sg = out if gate_scale is None else gate_scale
    su = out if up_scale is None else up_scale
    if tma:
        _ensure_tma_allocator()
    nw = out if norm_weight is None else norm_weight  # decode kernel only: read when its NORM is on
    if workspace is None:
        plan.launch(x2d, gate_weight, up_weight, bg, bu, sg, su, out)
    elif workspace:
        ws, lock = _split_k_workspace(device, *workspace)
        plan.launch(x2d, gate_weight, up_weight, bg, bu, sg, su, out, ws, lock, nw)
    else:
        plan.launch(x2d, gate_weight, up_weight, bg, bu, sg, su, out, out, out, nw)
    return out


def gated_mlp_forward(
    x2d: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    activation: str,
    alpha: float,
    limit: float,
    config: dict | None = None,
    *,
    gate_scale: torch.Tensor | None = None,
    up_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the fused kernel on validated 2-D operands (``[M, K]``, ``[N, K]`` views with unit last stride).

    FP8 weights take their own ``gate_scale`` / ``up_scale`` (``[N]`` or ``[ceil(N/128), ceil(K/128)]``, fp32).
    No validation here (benchmarks, tuning candidates and tests call it with explicit configs); launch plans are
    cached by the same kind of key as ``fused_gated_mlp``'s, so timed repeats pay only the per-call part.
    """
    key = call_key(_FORWARD, x2d, gate_weight, up_weight, gate_bias, up_bias, gate_scale, up_scale, activation,
                   alpha, limit, _config_key(config),
                   x2d.dtype is torch.float32 and torch.backends.cuda.matmul.allow_tf32)
    plan = _PLANS.get(key)
    if plan is None:

        def bench(candidate: dict) -> Callable[[], object]:  # for opt-in tune-on-first-use (KERNEL_AUTOTUNE=1)
            return functools.partial(gated_mlp_forward, x2d, gate_weight, up_weight, gate_bias, up_bias,
                                     activation, alpha, limit, candidate, gate_scale=gate_scale,
                                     up_scale=up_scale)

        plan = _build_plan(x2d, gate_weight, up_weight, gate_bias, up_bias, activation, alpha, limit, config,
                           bench if config is None else None, gate_scale=gate_scale, up_scale=up_scale)
        _put(key, plan)
    return _run(plan, x2d, gate_weight, up_weight, gate_bias, up_bias, gate_scale, up_scale)


_PLANS = PlanCache()
_FORWARD = "gated_mlp_forward"  # tags that function's keys: its arguments differ from fused_gated_mlp's


def _put(key: tuple, plan: Plan) -> None:
    try:
        _PLANS.put(key, plan)
    except TypeError:  # an unhashable value inside ``config``: that call is planned anew each time
        pass


def clear_caches() -> None:
    """Forget cached launch plans and memoized configs, e.g. after tuning, so the next calls choose again."""
    _PLANS.clear()
    _ACTIVATION_PLANS.clear()
    _heuristic.cache_clear()


# ----------------------------------------------------------------------------------------------------------------
# Backward: analytic derivatives of act(gate) * up, in fp32
# ----------------------------------------------------------------------------------------------------------------

def _pack(gate: torch.Tensor, up: torch.Tensor, layout: str) -> torch.Tensor:
    """The inverse of ``split_packed``: one ``[2 * intermediate, ...]`` tensor from the two halves."""
    if layout == "concatenated":
        return torch.cat([gate, up])
    return torch.stack([gate, up], dim=1).reshape(2 * gate.shape[0], *gate.shape[1:])


def _gated_mlp_backward(x, wg, wu, bg, bu, grad_out, activation, alpha, limit, need):
    """Gradients of ``act(x @ wg^T + bg) * (x @ wu^T + bu)`` (separate halves), recomputing the projections."""
    hidden, inter = x.shape[-1], wg.shape[0]
    x2d = x.reshape(-1, hidden)
    gate = torch.nn.functional.linear(x2d, wg).float()
    up = torch.nn.functional.linear(x2d, wu).float()
    if bg is not None:
        gate += bg.float()
    if bu is not None:
        up += bu.float()
    grad = grad_out.reshape(-1, inter).float()
    d_gate, d_up = _activation_grads(gate, up, grad, activation, alpha, limit)
    del gate, up, grad
    dg, du = d_gate.to(x.dtype), d_up.to(x.dtype)
    dx = (dg @ wg + du @ wu).reshape(x.shape) if need[0] else None
    dwg = dg.t() @ x2d if need[1] else None
    dwu = du.t() @ x2d if need[2] else None
    dbg = d_gate.sum(0).to(bg.dtype) if bg is not None and need[3] else None
    dbu = d_up.sum(0).to(bu.dtype) if bu is not None and need[4] else None
    return dx, dwg, dwu, dbg, dbu


# ----------------------------------------------------------------------------------------------------------------
# Registration: triton_ops::fused_gated_mlp
# ----------------------------------------------------------------------------------------------------------------

@torch.compiler.assume_constant_result  # a forced config is a constant of the traced program (dynamo cannot trace json)
def _config_to_json(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


@functools.lru_cache(maxsize=256)
def _config_from_json(config: str | None) -> dict | None:
    # The op's schema carries a forced config as JSON text (a schema has no dicts); parsed once per distinct text.
    return None if config is None else json.loads(config)


def _forward(x, gate_weight, up_weight, gate_bias, up_bias, activation, weight_layout, alpha, limit,
             config: dict | None, gate_scale=None, up_scale=None, norm_weight=None, norm_eps=0.0) -> torch.Tensor:
    """The op's implementation: the call's cached plan (built on the first call of its key), then one launch."""
    key = call_key(x, gate_weight, up_weight, gate_bias, up_bias, gate_scale, up_scale, activation, weight_layout,
                   alpha, limit, norm_weight, norm_eps if norm_weight is not None else None, norm_eps.__class__,
                   alpha.__class__, limit.__class__,  # True == 1: keep a bool (rejected) apart from an int
                   _config_key(config),
                   # fp32 dots follow torch's TF32 switch (read only for fp32 inputs: it costs a microsecond)
                   getattr(x, "dtype", None) is torch.float32 and torch.backends.cuda.matmul.allow_tf32)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _new_plan(key, x, gate_weight, up_weight, gate_bias, up_bias, activation, weight_layout, alpha,
                         limit, config, gate_scale, up_scale, norm_weight, norm_eps)
    if weight_layout != "separate":
        gate_weight, up_weight = split_packed(gate_weight, weight_layout)
        if gate_bias is not None:
            gate_bias, up_bias = split_packed(gate_bias, weight_layout)
        if gate_scale is not None:
            gate_scale, up_scale = _split_packed_scale(gate_scale, weight_layout)
    out = _run(plan, _as_2d(x), gate_weight, up_weight, gate_bias, up_bias, gate_scale, up_scale, norm_weight)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], plan.extra.n)


@torch.library.custom_op(op_name("fused_gated_mlp"), mutates_args=())
def _gated_mlp_op(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor | None,
                  gate_bias: torch.Tensor | None, up_bias: torch.Tensor | None, activation: str, weight_layout: str,
                  alpha: float, limit: float, config: str | None, gate_scale: torch.Tensor | None = None,
                  up_scale: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                  norm_eps: float = 0.0) -> torch.Tensor:
    # The FP8 scales and then the norm came last, with defaults, so calls written for the schema without them stay
    # valid.
    return _forward(x, gate_weight, up_weight, gate_bias, up_bias, activation, weight_layout, alpha, limit,
                    _config_from_json(config), gate_scale, up_scale, norm_weight, norm_eps)


@_gated_mlp_op.register_fake
def _(x, gate_weight, up_weight, gate_bias, up_bias, activation, weight_layout, alpha, limit, config,
      gate_scale=None, up_scale=None, norm_weight=None, norm_eps=0.0):
    inter = gate_weight.shape[0] if weight_layout == "separate" else gate_weight.shape[0] // 2
    return x.new_empty((*x.shape[:-1], inter))


def _setup_context(ctx, inputs, output) -> None:
    x, gate_weight, up_weight, gate_bias, up_bias, activation, weight_layout, alpha, limit, _, gs, us = inputs[:12]
    ctx.save_for_backward(x, gate_weight, up_weight, gate_bias, up_bias, gs, us)
    ctx.options = (activation, weight_layout, alpha, limit)
    ctx.normed = len(inputs) > 12 and inputs[12] is not None


def _no_fp8_gradients(ctx) -> None:
    """FP8 weights and their scales are constants of the op: name the first one a gradient was asked for."""
    # The dispatcher drops trailing arguments equal to their defaults (up_scale=None of a packed weight), and
    # needs_input_grad has no entry for them.
    needs = ctx.needs_input_grad
    for name, i in (("gate_weight", 1), ("up_weight", 2), ("gate_scale", 10), ("up_scale", 11)):
        if i < len(needs) and needs[i]:
            raise InvalidArgumentError(
                f"{name}: FP8 weights and their scales get no gradient from triton_ops.fused_gated_mlp; leave "
                "requires_grad off for them (gradients still reach x and the biases, through the dequantized "
                "weights)")


def _backward(ctx, grad_out):
    if ctx.normed:
        raise InvalidArgumentError(
            "triton_ops::fused_gated_mlp with norm_weight (the RMSNorm in its launch) has no backward; "
            "fused_gated_mlp(..., norm_weight=) records a differentiable path itself when a gradient is needed")
    x, wg, wu, bg, bu, gs, us = ctx.saved_tensors
    activation, layout, alpha, limit = ctx.options
    need = list(ctx.needs_input_grad[:5])
    if gs is not None:
        # FP8 weights: the input (and bias) gradient through the dequantized weights, in x's dtype (as the
        # recomputed projections of the high-precision path); a transient copy of the weights for this backward.
        _no_fp8_gradients(ctx)
        wg = dequantize_weight_fp8(wg, gs, x.dtype)
        wu = None if wu is None else dequantize_weight_fp8(wu, us, x.dtype)
        need[1] = need[2] = False
    if layout == "separate":
        grads = _gated_mlp_backward(x, wg, wu, bg, bu, grad_out, activation, alpha, limit, need)
        return (*grads, None, None, None, None, None, None, None, None, None)
    # packed: the gradients of both halves, packed back into the layout of the weight (and bias) given
    wg, wu = split_packed(wg, layout)
    if bg is not None:
        bg, bu = split_packed(bg, layout)
    need = [need[0], need[1], need[1], need[3], need[3]]
    dx, dwg, dwu, dbg, dbu = _gated_mlp_backward(x, wg, wu, bg, bu, grad_out, activation, alpha, limit, need)
    dw = _pack(dwg, dwu, layout) if need[1] else None
    db = _pack(dbg, dbu, layout) if dbg is not None else None
    return dx, dw, None, db, None, None, None, None, None, None, None, None, None, None


_gated_mlp_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def split_packed(weight: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the gate and up halves of a packed ``[2 * intermediate, ...]`` weight (or bias).

    ``"concatenated"``: rows ``[0, I)`` are the gate, ``[I, 2I)`` the up projection (``torch.cat([Wg, Wu])``,
    vLLM's ``gate_up_proj``). ``"interleaved"``: even rows are the gate, odd rows the up projection (gpt-oss's
    ``mlp1_weight``: its ``swiglu`` reads ``x[..., ::2]`` as the gate and ``x[..., 1::2]`` as the linear part).
    The views share storage with ``weight``, so gradients flow back into the packed tensor.
    """
    if layout == "concatenated":
        half = weight.shape[0] // 2
        return weight[:half], weight[half:]
    return weight[0::2], weight[1::2]


def fused_gated_mlp(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor | None = None,
    activation: str = "silu",
    *,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    weight_layout: str = "separate",
    alpha: float = 1.702,
    limit: float = 7.0,
    config: dict | None = None,
    gate_scale: torch.Tensor | None = None,
    up_scale: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """Gated MLP intermediate ``act(x @ Wg^T + bg) * (x @ Wu^T + bu)`` in one Triton kernel.

    The activation applies to the **gate** projection, as in LLaMA and Hugging Face checkpoints
    (``act_fn(gate_proj(x)) * up_proj(x)``), so their ``gate_proj``/``up_proj`` weights plug in unchanged. The
    down projection is not part of this op.

    Args:
        x: ``[..., hidden]``, float16, bfloat16 or float32, unit stride in the last dimension.
        gate_weight: ``[intermediate, hidden]`` (``nn.Linear`` layout), or with a packed ``weight_layout`` the
            packed ``[2 * intermediate, hidden]`` weight holding both projections. In ``x``'s dtype, or FP8
            (``float8_e4m3fn`` or ``float8_e5m2``, both weights alike) with ``gate_scale`` / ``up_scale``.
        up_weight: ``[intermediate, hidden]``; None with a packed layout.
        activation: ``"silu"`` (SwiGLU), ``"gelu"`` (exact, erf; GeGLU), ``"gelu_tanh"`` (tanh approximation)
            or ``"swiglu_oai"`` (gpt-oss: ``g = gate.clamp(max=limit)``, ``u = up.clamp(-limit, limit)``,
            ``g * sigmoid(alpha * g) * (u + 1)``).
        gate_bias, up_bias: optional ``[intermediate]`` biases (any float dtype; added in fp32). With a packed
            layout pass the packed ``[2 * intermediate]`` bias as ``gate_bias`` and leave ``up_bias`` None.
        weight_layout: ``"separate"``, ``"concatenated"`` (gate rows first, then up rows) or ``"interleaved"``
            (even rows gate, odd rows up, as gpt-oss stores ``mlp1``).
        alpha, limit: parameters of ``"swiglu_oai"`` (gpt-oss uses 1.702 and 7.0); ignored otherwise.
        config: a launch config (see ``fused_gated_mlp.configs``) overriding the automatic choice. With block
            scales its ``BLOCK_K`` is capped at 128.
        gate_scale, up_scale: float32 dequantization scales of FP8 weights (``W ~= W_fp8 * scale``), required
            with FP8 weights and refused otherwise. Either per output channel, ``[intermediate]`` (any stride: a
            per-tensor scale ``s`` is ``s.expand(intermediate)``), or per 128 x 128 block,
            ``[ceil(intermediate / 128), ceil(hidden / 128)]`` (unit stride in the last dimension; sizes that are
            no multiple of 128 end in a partial block). Both of one kind. With a packed layout pass the packed
            weight's scale as ``gate_scale`` and leave ``up_scale`` None: ``[2 * intermediate]`` per channel, or
            the 128 x 128 blocks of the packed ``[2 * intermediate, hidden]`` tensor, i.e.
            ``[ceil(2 * intermediate / 128), ceil(hidden / 128)]`` (as :func:`quantize_weight_fp8` of the packed
            weight returns it; a block may then hold rows of both halves).
        norm_weight: ``[hidden]`` (any float dtype, contiguous), or None: then ``x`` is first RMS-normalized with
            this weight and ``norm_eps``, inside the decode kernel's launch, bit for bit as
            ``fused_rmsnorm_rope.rmsnorm(x, norm_weight, norm_eps)`` writes it (a decoder layer's post-attention
            norm and its gated MLP in one launch). Every program sums its rows' squares again (from L2): meant for
            the few rows of a decode step; more rows than the decode kernel's (``DECODE_MAX_TOKENS``) run it too,
            with its config for that many.
        norm_eps: the norm's epsilon (> 0, as ``rmsnorm``'s).

    Returns:
        ``[..., intermediate]`` in ``x``'s dtype. Products accumulate in fp32; the activation runs in fp32.

    FP8 weights (weight-only quantization, W8A16): the kernels read the weights as FP8, half the bytes of bf16 (the
    decode kernel is bound by exactly that read), and convert them in registers to ``x``'s dtype, which is exact;
    the scales multiply the fp32 accumulators: per channel once after the K sum, before the bias and the
    activation; per block on every K step's partial product. So decode and prefill both compute in ``x``'s dtype
    on the FP8 weight values (16-bit tensor-core dots, fp32 accumulation and scaling); FP8 x FP8 tensor-core
    prefill, which would quantize ``x`` too, is not done here. E4M3 and E5M2 weights need a GPU of compute
    capability 8.9 or higher (Triton's FP8 conversions), or the interpreter.

    Gradients flow to ``x``, the weights and the biases (composite PyTorch backward recomputing the
    projections; see the module docstring). With FP8 weights they flow to ``x`` and the biases through the
    dequantized weights; FP8 weights and scales get none (``InvalidArgumentError`` at backward when one of them
    requires a gradient).

    Registered as ``torch.ops.triton_ops.fused_gated_mlp`` (a forced ``config`` travels as JSON text), so
    ``torch.compile(fullgraph=True)``, CUDA graphs and ``torch.export`` take it as one node.

    Raises:
        ShapeMismatchError, UnsupportedDtypeError, DeviceMismatchError, UnsupportedDeviceError, LayoutError,
        InvalidArgumentError: from ``triton_ops_core`` validation, naming the offending argument.

    Repeated calls are cheap on the host: a call is keyed by the metadata validation and launch depend on
    (shapes, strides, dtypes, devices, 16-byte alignment of the data, the options); the first call with a key
    validates and builds a launch plan, later ones only allocate the output and launch (see
    ``triton_ops_core.launch``). ``clear_caches()`` forgets the plans.
    """
    if norm_weight is not None and torch.is_grad_enabled() and any(
            getattr(t, "requires_grad", False) for t in (x, gate_weight, up_weight, gate_bias, up_bias, norm_weight)):
        # a gradient to record: the norm in torch (differentiable), then the op and its backward; its arguments
        # refused as the kernel's path refuses them
        check_tensor(x, "x")
        check_norm(x, norm_weight, norm_eps)
        x, norm_weight = rms_normalized(x, norm_weight, norm_eps), None
    if direct_call_ok(x, gate_weight, up_weight, gate_bias, up_bias, gate_scale, up_scale, norm_weight):
        # plain eager: no dispatcher round trip
        return _forward(x, gate_weight, up_weight, gate_bias, up_bias, activation, weight_layout, alpha, limit,
                        config, gate_scale, up_scale, norm_weight, norm_eps)
    return _gated_mlp_op(x, gate_weight, up_weight, gate_bias, up_bias, activation, weight_layout, alpha, limit,
                         None if config is None else _config_to_json(config), gate_scale, up_scale, norm_weight,
                         float(norm_eps) if norm_weight is not None else 0.0)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    # The [tokens, hidden] view the kernels read; the same for the plan and for every call of its key.
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _config_key(config: dict | None) -> tuple | None:
    # A dict is unhashable: its items are (a config with unhashable values is never cached; see PlanCache.get).
    return None if config is None else (tuple(config.items()),)


def _new_plan(key: tuple, x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor | None,
              gate_bias: torch.Tensor | None, up_bias: torch.Tensor | None, activation: str, weight_layout: str,
              alpha: float, limit: float, config: dict | None, gate_scale: torch.Tensor | None = None,
              up_scale: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
              norm_eps: float = 0.0) -> Plan:
    """The first call of a key: validate, choose the config, build the plan and cache it."""
    spec = validate_gated_mlp_inputs(
        x, gate_weight, up_weight, activation, gate_bias=gate_bias, up_bias=up_bias,
        weight_layout=weight_layout, alpha=alpha, limit=limit, gate_scale=gate_scale, up_scale=up_scale,
    )
    if norm_weight is not None:
        check_norm(x, norm_weight, norm_eps)
    scale_rows = (1, 0, 0)
    if weight_layout != "separate":
        inter = gate_weight.shape[0] // 2
        gate_weight, up_weight = split_packed(gate_weight, weight_layout)
        if gate_bias is not None:
            gate_bias, up_bias = split_packed(gate_bias, weight_layout)
        if gate_scale is not None:
            if gate_scale.dim() == 2:
                # Half-row n is packed row n + I (concatenated) or 2n / 2n + 1 (interleaved).
                scale_rows = (1, 0, inter) if weight_layout == "concatenated" else (2, 0, 1)
            gate_scale, up_scale = _split_packed_scale(gate_scale, weight_layout)
    x2d = _as_2d(x)

    def bench(candidate: dict) -> Callable[[], object]:  # for opt-in tune-on-first-use (KERNEL_AUTOTUNE=1)
        return functools.partial(gated_mlp_forward, x2d, gate_weight, up_weight, gate_bias, up_bias,
                                 activation, alpha, limit, candidate)  # (not used with FP8 weights)

    tune = config is None and not capturing(x.device)  # never a config search inside a CUDA-graph capture
    plan = _build_plan(x2d, gate_weight, up_weight, gate_bias, up_bias, activation, alpha, limit, config,
                       bench if tune and norm_weight is None else None, gate_scale=gate_scale, up_scale=up_scale,
                       scale_rows=scale_rows, scaling_kind=spec.weight_scaling,
                       norm_eps=None if norm_weight is None else norm_eps)
    _put(key, plan)
    return plan


def _split_packed_scale(scale: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The halves' scales of a packed FP8 weight: views of a per-channel ``[2I]`` scale; a block or group scale
    stays the packed tensor for both halves (the kernel maps each half's rows onto it, see ``_new_plan``)."""
    if scale.dim() == 1:
        return split_packed(scale, layout)
    return scale, scale


# ----------------------------------------------------------------------------------------------------------------
# FP8 weights: quantization with PyTorch operations (done once, when a model is converted)
# ----------------------------------------------------------------------------------------------------------------

def quantize_weight_fp8(
    weight: torch.Tensor,
    scaling: str = "channel",
    dtype: torch.dtype = torch.float8_e4m3fn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a ``[rows, hidden]`` weight to FP8 for :func:`fused_gated_mlp`: ``(weight_fp8, scale)``.

    Dynamic absmax scaling in plain PyTorch (amax / fmax, divide, clamp, cast; no kernel): ``scale`` is the float32
    dequantization factor, ``weight ~= weight_fp8 * scale``, with the largest magnitude of each group mapped to the
    format's largest value (448 for E4M3, 57344 for E5M2); an all-zero group gets scale 1.

    Args:
        weight: ``[rows, hidden]``, float16, bfloat16 or float32, finite. A packed gate/up weight is quantized as
            one tensor (its scale is the packed scale ``fused_gated_mlp`` takes as ``gate_scale``).
        scaling: ``"channel"`` (one scale per row: ``[rows]``), ``"block"`` (one per 128 x 128 block:
            ``[ceil(rows / 128), ceil(hidden / 128)]``; partial edge blocks are scaled by their own values) or
            ``"group"`` (one per row and 128 columns: ``[rows, ceil(hidden / 128)]``, finer than blocks: the
            accuracy of fp8_gemm's ``"group"`` recipe).
        dtype: ``torch.float8_e4m3fn`` (default) or ``torch.float8_e5m2``.

    Raises:
        InvalidArgumentError, UnsupportedDtypeError, ShapeMismatchError: a bad option, dtype or shape, or a weight
            holding NaN or infinity (no scale represents it).
    """
    check_choice(scaling, "scaling", FP8_SCALINGS)
    if dtype not in FP8_WEIGHT_DTYPES:
        raise UnsupportedDtypeError(
            f"dtype: expected torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    check_tensor(weight, "weight")
    check_dtype(weight, "weight", FLOAT_DTYPES)
    check_ndim(weight, "weight", exact=2)
    fmax = torch.finfo(dtype).max
    w = weight.detach().float()
    rows, cols = w.shape
    if scaling == "channel":
        amax = w.abs().amax(dim=1) if cols else w.new_zeros(rows)
        groups = w
    elif scaling == "group":
        pad_c = -cols % SCALE_BLOCK
        groups = torch.nn.functional.pad(w, (0, pad_c)).view(rows, (cols + pad_c) // SCALE_BLOCK, SCALE_BLOCK)
        amax = groups.abs().amax(dim=2)
    else:
        pad_r, pad_c = -rows % SCALE_BLOCK, -cols % SCALE_BLOCK
        # zero padding never raises a block's amax
        padded = torch.nn.functional.pad(w, (0, pad_c, 0, pad_r))
        groups = padded.view((rows + pad_r) // SCALE_BLOCK, SCALE_BLOCK, (cols + pad_c) // SCALE_BLOCK, SCALE_BLOCK)
        amax = groups.abs().amax(dim=(1, 3))
    if not bool(torch.isfinite(amax).all()):
        raise InvalidArgumentError("weight: expected finite values (NaN or infinity has no FP8 scale)")
    # Tensor / tensor: CUDA's division by a Python scalar multiplies by its reciprocal instead.
    scale = torch.where(amax > 0, amax / torch.full_like(amax, fmax), torch.ones_like(amax))
    if scaling == "channel":
        q = (groups / scale[:, None]).clamp(-fmax, fmax).to(dtype)
    elif scaling == "group":
        q = (groups / scale[:, :, None]).clamp(-fmax, fmax).to(dtype)
        q = q.view(rows, -1)[:, :cols].contiguous()
    else:
        q = (groups / scale[:, None, :, None]).clamp(-fmax, fmax).to(dtype)
        q = q.view(rows + pad_r, cols + pad_c)[:rows, :cols].contiguous()
    return q, scale.contiguous()


def dequantize_weight_fp8(weight: torch.Tensor, scale: torch.Tensor,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``weight * scale`` in ``dtype`` for an FP8 ``[rows, hidden]`` weight and its per-channel (``[rows]``),
    128 x 128 block (``[ceil(rows / 128), ceil(hidden / 128)]``) or group (``[rows, ceil(hidden / 128)]``) scale: the
    weights the kernels compute with. (Products are formed in float32, then rounded to ``dtype``.)"""
    w = weight.float()
    if scale.dim() == 1:
        return (w * scale.float()[:, None]).to(dtype)
    rows, cols = w.shape
    if scale.shape[0] == rows:  # group scales (for one row, the same as a block's)
        return (w * scale.float().repeat_interleave(SCALE_BLOCK, 1)[:, :cols]).to(dtype)
    full = scale.float().repeat_interleave(SCALE_BLOCK, 0)[:rows].repeat_interleave(SCALE_BLOCK, 1)[:, :cols]
    return (w * full).to(dtype)


def gated_mlp_reference(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor | None = None,
    activation: str = "silu",
    *,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    weight_layout: str = "separate",
    alpha: float = 1.702,
    limit: float = 7.0,
    gate_scale: torch.Tensor | None = None,
    up_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same function in plain PyTorch, computed in the inputs' dtype (cast to float64 for a reference).

    FP8 weights are dequantized with their scales (:func:`dequantize_weight_fp8`) to ``x``'s dtype first."""
    if gate_scale is not None:
        gate_weight = dequantize_weight_fp8(gate_weight, gate_scale, x.dtype)
        if up_weight is not None:
            up_weight = dequantize_weight_fp8(up_weight, up_scale, x.dtype)
    if weight_layout != "separate":
        gate_weight, up_weight = split_packed(gate_weight, weight_layout)
        if gate_bias is not None:
            gate_bias, up_bias = split_packed(gate_bias, weight_layout)
    gate = torch.nn.functional.linear(x, gate_weight)
    up = torch.nn.functional.linear(x, up_weight)
    if gate_bias is not None:
        gate = gate + gate_bias.to(gate.dtype)
    if up_bias is not None:
        up = up + up_bias.to(up.dtype)
    return gated_product(gate, up, activation, alpha, limit)


__all__ = ["FP8_SCALINGS", "FP8_WEIGHT_DTYPES", "SCALE_BLOCK", "clear_caches", "dequantize_weight_fp8",
           "fused_gated_mlp", "gated_mlp_forward", "gated_mlp_reference", "quantize_weight_fp8", "split_packed"]
