"""The mixture of experts: launchers, the ops' registration with their fakes, and the public functions.

Two registered ops, forward only:

- ``torch.ops.triton_ops.moe_route(hidden, router_weight, router_bias, top_k, renormalize)`` returns
  ``(topk_ids int32 [T, k], topk_weights fp32 [T, k])``: router GEMM, top-k, softmax (kernel 1 of ``_kernels``).
- ``torch.ops.triton_ops.moe_experts(hidden, topk_ids, topk_weights, gate_up_proj, gate_up_proj_bias, down_proj,
  down_proj_bias, activation, gate_up_layout, transposed, alpha, limit)`` returns ``[..., H]``: grouping by
  expert, the two grouped GEMMs and the combine (kernels 2 to 5).

``fused_moe`` is the two in a row (gpt-oss's ``GptOssMLP``); ``moe_experts`` alone serves routers of other
shapes. Every launch has a size fixed by (tokens, top_k, experts) and the routing result never goes to the host,
so a forward can be captured in a CUDA graph. No gradient: a backward raises ``MoEBackwardError``.

As in the other packages, plain eager calls skip the dispatcher (``triton_ops_core.library.direct_call_ok``), and
a call is validated and planned once per call signature (shapes, strides, dtypes, devices, 16-byte alignment,
options; ``triton_ops_core.launch``): later calls of the signature allocate their buffers and launch through
Triton's compiled launchers. ``clear_caches()`` forgets the plans.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from triton_ops_core import pdl, scratch
from triton_ops_core.device import device_info
from triton_ops_core.exceptions import LayoutError, ShapeMismatchError, TritonKernelError, UnsupportedDtypeError
from triton_ops_core.launch import Plan, PlanCache, call_key, cdiv, next_pow2
from triton_ops_core.library import direct_call_ok, op_name
from triton_ops_core.rms_prologue import check_norm, norm_block
from triton_ops_core.validation import check_choice, check_dtype, check_same_device, check_tensor

from . import _kernels as K
from .configs import MoEConfig, for_layout, for_weights, select_config
from .validation import SCALE_BLOCK, validate_experts_inputs, validate_route_inputs

_ACTIVATION_CODES = {"swiglu_oai": K.ACT_SWIGLU_OAI, "silu": K.ACT_SILU, "gelu": K.ACT_GELU,
                     "gelu_tanh": K.ACT_GELU_TANH}


class MoEBackwardError(TritonKernelError, NotImplementedError):
    """A gradient was asked of a forward-only MoE op (inference first: no backward is implemented)."""


# ----------------------------------------------------------------------------------------------------------------
# Host-side helpers
# ----------------------------------------------------------------------------------------------------------------

def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting (TF32 only where the user allowed it); halves are exact anyway.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast(device: torch.device, dtype: torch.dtype) -> bool:
    # The interpreter's 16-bit tl.dot is wrong: fp32 operands there (a constexpr, free on the GPU).
    return device.type == "cpu" and dtype != torch.float32


def _emulate_bf16(device: torch.device, dtype: torch.dtype) -> bool:
    # The interpreter's fp32 -> bf16 cast truncates: the kernels round on the bits there (constexpr).
    return device.type == "cpu" and dtype == torch.bfloat16


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # One place that allocates every buffer and output, so tests can hand the kernels poisoned memory.
    return torch.empty(shape, dtype=dtype, device=device)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _config(num_tokens: int, top_k: int, hidden: int, inter: int, experts: int, device: torch.device,
            weight_bytes: int = 2, fp8_activations: bool = False) -> MoEConfig:
    # one place the ops ask for tiles (tests force small tiles through it)
    return select_config(num_tokens, top_k, hidden, inter, experts, device.type == "cuda", weight_bytes,
                         fp8_activations)


_PLANS = PlanCache()


def _put(key: tuple | None, plan) -> None:
    if key is None:
        return
    try:
        _PLANS.put(key, plan)
    except TypeError:  # an unhashable option: that call is planned anew each time
        pass


def clear_caches() -> None:
    """Forget the cached launch plans and memoized configs (e.g. after changing ``configs``)."""
    _PLANS.clear()
    select_config.cache_clear()


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

# The router GEMM's K step and pipeline depth on a GPU (for up to 64 experts; narrower K beyond). H200, gpt-oss-20b
# router (32 x 2880), CUDA graphs: 15.6 us a call with 128-wide steps unpipelined, 9.5 pipelined 3 deep, 8.2 at 256.
ROUTE_TILE_K = (256, 3)
# Up to this many tokens the router GEMM runs first over programs that each take ROUTE_SPLIT_STEPS of its 128-wide
# K steps (_router_split_kernel: gpt-oss, 23 steps, 23 programs), the route kernel adding their partial logits in a
# fixed order. H200, gpt-oss-20b router, CUDA graphs (2026-12-04), one program against 2 / 3 / 4 steps a program:
# 1 token 8.1 / 4.2 / 4.7 / 5.3 us, 8 tokens 8.4 / 4.6 / 5.0 / 5.2, 64 tokens 8.4 / 4.8 / 5.4 / 5.6. H100, session 38
# (benchmarks.dev.moe_tiles --router), one program against 1 / 2 / 3 / 4 steps a program: gpt-oss-20b's router
# (32 x 2880) 8.0 / 4.0 / 4.3 / 4.8 / 5.2 us at 1 token, 8.2 / 4.4 / 4.6 / 4.9 / 5.3 at 8, 8.2 / 4.6 / 4.8 / 5.1 / 5.5
# at 64; Qwen3-30B-A3B's (128 x 2048) 15.4 / 6.9 / 7.8 / 7.7 / 8.9 at 1 token, 15.5 / 7.4 / 8.3 / 7.9 / 9.0 at 8,
# 15.4 / 7.7 / 8.7 / 8.0 / 9.2 at 64. 0 switches it off. Plans are cached: call clear_caches() after changing it.
ROUTE_SPLIT_MAX_TOKENS = 64
ROUTE_SPLIT_STEPS = 1
# With the router GEMM split, plain eager calls route in one launch: the split kernel's last program of each token
# block adds the partial logits and selects the experts (an arrival counter kept between calls,
# triton_ops_core.scratch) instead of a route kernel after it; the same bits either way. Not in CUDA graphs (captures
# and torch.compile's), where the counters would be a fresh buffer per call and its memset a graph node: H100,
# session 37 (benchmarks.dev.moe_one_launch), gpt-oss-20b's router at 1 token 4.44 us in two launches against 5.57 in
# one launch plus the memset (Qwen3-30B-A3B's 7.86 / 8.14), while eager calls, bound by the host, went 82 -> 70 us
# (72 -> 55). Routers whose weights are the softmax over all experts (renormalize=False) keep two launches: that
# softmax's sum is a reduction whose order follows each kernel's register layout, so the bits could differ between an
# eager call and a graph replay. False: always two launches. Plans are cached: call clear_caches() after changing it.
ROUTE_IN_ONE_LAUNCH = True
# Up to this many tokens (on a GPU) the router's logits come from _router_rows_kernel instead: the experts split over
# about ROUTE_ROWS_PROGRAMS programs, each summing its experts' logits over all of K on the CUDA cores, so the
# selection reads whole logits (one load) rather than every K range's partials (the split GEMM's 16 to 23 of them,
# added in order). It routes in one launch where the split GEMM would (ROUTE_IN_ONE_LAUNCH), the route kernel reading
# the logits otherwise. One token only: H100, session 47, CUDA graphs (benchmarks.dev.moe_tiles --router, the split
# GEMM at one K step a program against rows/N: the experts over N programs), gpt-oss-20b's router (32 x 2880) at one
# token 3.6 us against rows/8 3.7, rows/16 3.1, rows/32 3.0, rows/64 3.0; Qwen3-30B-A3B's (128 x 2048) 6.4 against
# 7.5 / 6.1 / 5.3 / 5.4; at eight tokens the rows took longer (gpt-oss-20b 3.7 against 4.7 at best, Qwen3-30B-A3B 6.9
# against 7.7: the [tokens, experts, K] products outgrow the registers). The layer at one token
# (benchmarks.dev.moe_decode_launches, with PDL): gpt-oss-20b 75.5 -> 74.7 us, Qwen3-30B-A3B 41.1 -> 40.2 (FP8
# experts 32.9 -> 32.0). 0: off (the split GEMM up to ROUTE_SPLIT_MAX_TOKENS). Plans are cached: call clear_caches()
# after changing it.
ROUTE_ROWS_MAX_TOKENS = 1
ROUTE_ROWS_PROGRAMS = 32
# The rows kernel's [tokens, experts, K] product tile, elements (its K step follows): registers, not shared memory
ROUTE_ROWS_TILE = 8192
# Launched early with PDL (triton_ops_core.pdl), programs may ask L2 for their first weights before they wait: each
# router split program its whole slice of the router (at most 8 lines a row), each down-GEMM program the first
# PREFETCH_TILES K tiles of its weight tile (its expert from the tile table the launches before the gate/up GEMM
# wrote: pdl.sees_two_back). The gate/up GEMM cannot: its experts come from the launch just before it. Off (0): on
# an H100 (session 47, benchmarks.dev.moe_decode_launches, the layer in CUDA graphs with PDL, 0 against 2) it
# measured no faster: gpt-oss-20b 75.7 / 75.1 us at one token (bf16), 354.3 / 355.6 at eight, FP8 experts 199.4 /
# 204.3 at eight; Qwen3-30B-A3B 41.0 / 41.8 at one token, 182.3 / 182.1 at eight. Plans are cached: call
# clear_caches() after changing it.
PREFETCH_TILES = 0
_NO_SELECT = (False, 1, 1, True, False, False)  # the split kernel's selection constexprs when it does not select
# The scratch buffers' names (per device and stream: triton_ops_core.scratch): int32 arrival counters, zero at rest
_ROUTE_COUNTERS = "moe.route_counters"
_DOWN_COUNTERS = "moe.down_counters"


def _route_tiles_that_fit(block_t: int, block_e: int, block_k: int, stages: int, element_size: int,
                          device: torch.device) -> tuple[int, int]:
    """(K step, stages) of the router GEMM lowered until its pipelined x and router tiles fit shared memory."""
    smem = device_info(device).smem_per_block or 227 * 1024
    while stages > 1 and stages * (block_t + block_e) * block_k * element_size > smem:
        stages -= 1
    while block_k > 16 and stages * (block_t + block_e) * block_k * element_size > smem:
        block_k //= 2
    return block_k, stages


class _RoutePlan(NamedTuple):
    """The routing's launches: the split router GEMM (None: the route kernel computes it) and the route kernel,
    or (``one_launch``, plain eager calls) the split GEMM whose last programs select the experts."""

    split: int
    gemm: Plan | None
    route: Plan
    one_launch: Plan | None = None


def _route_split(t: int, h: int, on_cpu: bool, split: int | None) -> int:
    """How many programs share the router GEMM's K (0: none, the route kernel's program computes it)."""
    if split is not None:
        return split
    if on_cpu or not ROUTE_SPLIT_STEPS or t > ROUTE_SPLIT_MAX_TOKENS:
        return 0
    split = cdiv(cdiv(h, 128), ROUTE_SPLIT_STEPS)
    return split if split > 1 else 0  # one program: the route kernel computes the GEMM itself, one launch fewer


def _route_rows(t: int, on_cpu: bool) -> bool:
    """Whether ``t`` tokens' router logits come from ``_router_rows_kernel`` (:data:`ROUTE_ROWS_MAX_TOKENS`; not
    under the interpreter, where the route kernel's one program is cheapest; the tests ask for it)."""
    return not on_cpu and 0 < t <= ROUTE_ROWS_MAX_TOKENS


def _rows_route_plans(x2d: torch.Tensor, router_weight: torch.Tensor, stride_b: int, eps: float, norm: tuple,
                      on: bool, select: tuple, one_launch: bool) -> tuple[Plan, Plan | None]:
    """``_router_rows_kernel``'s plans (logits only; and, with ``one_launch``, the whole routing)."""
    t, h = x2d.shape
    e = router_weight.shape[0]
    block_t = next_pow2(t)
    block_ep = max(1, next_pow2(e) // ROUTE_ROWS_PROGRAMS)
    block_k = min(next_pow2(h), max(16, ROUTE_ROWS_TILE // (block_t * block_ep)))
    steps = cdiv(h, block_k)
    if norm[0]:  # (the norm prologue's step for this kernel's rows)
        norm = (True, norm_block(h, block_t, x2d.device.type == "cpu"))
    head = (t, e, h, x2d.stride(0), router_weight.stride(0), stride_b, eps, block_t, block_ep, block_k,
            min(3, steps), *norm, on)
    grid, warps, block_e = (cdiv(e, block_ep),), 4, max(16, next_pow2(e))
    logits = Plan(K._router_rows_kernel, grid, (*head, False, *_NO_SELECT, block_e), warps, **pdl.launch_options(on))
    whole = None
    if one_launch:
        whole = Plan(K._router_rows_kernel, grid, (*head, True, *select, block_e), warps, **pdl.launch_options(on))
    return logits, whole


def _route_plan(x2d: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None, top_k: int,
                renormalize: bool, split: int | None = None, norm_eps: float | None = None) -> _RoutePlan:
    """Everything of the routing launches but their tensors (x, weight, bias, workspace, ids, weights)."""
    t, h = x2d.shape
    e = router_weight.shape[0]
    on_cpu = x2d.device.type == "cpu"
    if t == 0:
        return _RoutePlan(0, None, Plan(None, (1,), (), 0, n_rows=0))
    rows = _route_rows(t, on_cpu)
    block_e = max(16, next_pow2(e))
    # interpreter: one program for up to 64 tokens (each program instance costs ~1 ms there); GPU: 16 tokens
    block_t = min(64, max(16, next_pow2(t))) if on_cpu else 16
    block_k, stages = ROUTE_TILE_K if not on_cpu else (64, 1)
    # a [BLOCK_E, BLOCK_K] router tile per step: narrower K steps for routers of many experts (registers)
    block_k = min(max(16, block_k * 64 // max(block_e, 64)), max(16, next_pow2(h)))
    if not on_cpu:  # stages, then K steps, that fit the GPU's shared memory (99 KB on an RTX 4090, L4, A10)
        block_k, stages = _route_tiles_that_fit(block_t, block_e, block_k, stages, x2d.element_size(), x2d.device)
    warps = 4 if block_e <= 64 else 8
    split = 1 if rows else _route_split(t, h, on_cpu, split)
    precision, upcast = _dot_precision(x2d.dtype), _upcast(x2d.device, x2d.dtype)
    gemm = None
    eps = 0.0 if norm_eps is None else float(norm_eps)
    # NORM, NORM_BLOCK (a fixed 16 when off: no compiled variant per hidden size for nothing)
    norm = (norm_eps is not None, norm_block(h, block_t, on_cpu) if norm_eps is not None else 16)
    on = pdl.enabled(x2d.device)
    stride_b = 1 if router_bias is None else router_bias.stride(0)
    # HAS_BIAS, TOP_K, BLOCK_KP, RENORMALIZE, ROUND_LOGITS, EMULATE_BF16
    select = (router_bias is not None, top_k, next_pow2(top_k), renormalize, x2d.dtype != torch.float32,
              _emulate_bf16(x2d.device, x2d.dtype))
    one_launch = None
    if rows:  # (its logits whole: the route kernel reads them as one split)
        gemm, one_launch = _rows_route_plans(x2d, router_weight, stride_b, eps, norm, on, select,
                                             ROUTE_IN_ONE_LAUNCH and renormalize)
    elif split:
        split_k = min(128, block_k) if not on_cpu else min(64, block_k)
        head = (t, e, h, x2d.stride(0), router_weight.stride(0), stride_b, eps,
                block_t, block_e, split_k, 2, precision, upcast, *norm, on)
        lines = _router_prefetch_lines(on, h, split, split_k, router_weight.element_size())
        gemm = Plan(K._router_split_kernel, (cdiv(t, block_t), split), (*head, False, *_NO_SELECT, lines), warps,
                    **pdl.launch_options(on))
        if ROUTE_IN_ONE_LAUNCH and renormalize:
            one_launch = Plan(K._router_split_kernel, (cdiv(t, block_t), split), (*head, True, *select, lines),
                              warps, **pdl.launch_options(on))
    tail = (t, e, h, x2d.stride(0), router_weight.stride(0), stride_b, eps, *select,
            # BLOCK_T, BLOCK_E, BLOCK_K, NUM_STAGES, DOT_PRECISION, UPCAST, SPLIT
            block_t, block_e, block_k, stages, precision, upcast, split, *norm, on,
            # RELEASE: one token's route lets the gate/up GEMM launch as it runs
            pdl.release_early(on, cdiv(t, block_t), x2d.device, t))
    return _RoutePlan(split, gemm, Plan(K._route_kernel, (cdiv(t, block_t),), tail, warps, n_rows=t,
                                        **pdl.launch_options(on)), one_launch)


def _router_prefetch_lines(on: bool, hidden: int, split: int, block_k: int, element_size: int) -> int:
    """The router split kernel's ``PREFETCH_LINES``: the 128-byte lines of each expert's row in a program's K range
    (at most 8), or 0 without PDL or :data:`PREFETCH_TILES`."""
    if not (on and PREFETCH_TILES):
        return 0
    steps = cdiv(cdiv(hidden, block_k), split)
    return min(8, next_pow2(cdiv(steps * block_k * element_size, 128)))


def _down_prefetch(on: bool, w: torch.Tensor, transposed: bool, block_n: int, block_k: int) -> tuple[int, int, int]:
    """The down GEMM's ``(PREFETCH, PREFETCH_ROWS, PREFETCH_LINES)`` (``K._prefetch_down_tile``): its first
    :data:`PREFETCH_TILES` K tiles, along whichever dimension of the weight is contiguous; none without PDL, where
    the tile's expert may not be read before the wait (``pdl.sees_two_back``), or for weights contiguous in
    neither."""
    _, stride_k, stride_n = _weight_strides(w, transposed)
    if not (PREFETCH_TILES and pdl.sees_two_back(on)):
        return 0, 1, 1
    per_line = 128 // w.element_size()
    if stride_n == 1:  # rows along K, the tile's columns in lines
        return 1, next_pow2(PREFETCH_TILES * block_k), max(1, next_pow2(cdiv(block_n, per_line)))
    if stride_k == 1:  # the tile's rows, their first K tiles in lines
        return 2, block_n, max(1, next_pow2(cdiv(PREFETCH_TILES * block_k, per_line)))
    return 0, 1, 1


def _route(plan: _RoutePlan, x2d: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None,
           top_k: int, norm_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    t = x2d.shape[0]
    ids = _empty((t, top_k), torch.int32, device=x2d.device)
    wts = _empty((t, top_k), torch.float32, device=x2d.device)
    if plan.route.kernel is None:
        return ids, wts
    ws = router_weight  # any pointer: the route kernel reads no partial logits without a split
    nw = router_weight if norm_weight is None else norm_weight  # any pointer: NORM is off
    bias = router_weight if router_bias is None else router_bias  # any pointer: HAS_BIAS is off
    if plan.gemm is not None:
        ws = _empty((plan.split, t, router_weight.shape[0]), torch.float32, device=x2d.device)
        if plan.one_launch is not None and scratch.kept(x2d.device):
            # the token blocks' arrival counters, zero at rest (see ROUTE_IN_ONE_LAUNCH)
            cnt = scratch.scratch(_ROUTE_COUNTERS, x2d.device, plan.gemm.grid[0], torch.int32, zeroed=True)
            plan.one_launch.launch(x2d, router_weight, ws, nw, bias, ids, wts, cnt)
            return ids, wts
        plan.gemm.launch(x2d, router_weight, ws, nw, bias, ids, wts, ids)
    plan.route.launch(x2d, router_weight, bias, ws, nw, ids, wts)
    return ids, wts


class ExpertGroups(NamedTuple):
    """The (token, slot) pairs grouped by expert, and the tile table of the grouped GEMMs (all int32, on the
    device of the ids; pair ``p`` is token ``p // k``, slot ``p % k``).

    - ``offsets [E + 1]``: rows ``offsets[e] .. offsets[e + 1]`` of the sorted order belong to expert ``e``
      (``offsets[E] == T * k``); counts are ``offsets.diff()``.
    - ``sorted_pairs [T * k]``: the pairs in expert order, stable (pair order within an expert).
    - ``tile_expert [max_tiles]``: the expert of each ``block_m``-row tile, ``-1`` past the last tile.
    - ``tile_start [max_tiles]``: the first sorted row of each tile (0 past the last).
    """

    offsets: torch.Tensor
    sorted_pairs: torch.Tensor
    tile_expert: torch.Tensor
    tile_start: torch.Tensor


def max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The most ``block_m``-row tiles ``num_pairs`` pairs over ``num_experts`` experts can need (launch size)."""
    if num_pairs == 0:
        return 0
    return min(num_pairs, cdiv(num_pairs, block_m) + min(num_experts, num_pairs))


class _AlignPlan(NamedTuple):
    """The grouping's launches: one program (``single``), or count / scan / scatter over chunks of pairs."""

    tiles: int  # the tile table's length
    chunks: int  # 0: the one-program kernel
    single: Plan | None
    count: Plan | None = None
    scan: Plan | None = None
    scatter: Plan | None = None


# Pairs per program of the chunked grouping (prefill); at most this many pairs go through the one-program kernel.
ALIGN_CHUNK = 512
_INTERPRETER_ALIGN_CHUNK = 1 << 30  # under the interpreter one program is cheapest (tests lower it)


def _align_plan(num_pairs: int, num_experts: int, block_m: int, device: torch.device,
                chunk: int | None = None) -> _AlignPlan:
    """The grouping of ``num_pairs`` pairs; tensors (ids, offsets, sorted, tile_expert, tile_start)."""
    tiles = max_tiles(num_pairs, num_experts, block_m)
    if num_pairs == 0:
        return _AlignPlan(tiles, 0, None)
    block_e = max(16, next_pow2(num_experts))
    # a [BLOCK_P, BLOCK_E] one-hot per step: kept near 16k elements so it stays in registers on a GPU
    cap = max(16, 16384 // block_e)
    block_tiles = min(cap, max(16, next_pow2(tiles)))
    warps = 8 if device.type == "cuda" else 4
    if chunk is None:
        chunk = ALIGN_CHUNK if device.type == "cuda" else _INTERPRETER_ALIGN_CHUNK
    chunk = min(cap, chunk)
    on = pdl.enabled(device)
    early = pdl.launch_options(on)
    if num_pairs <= chunk:
        tail = (num_pairs, num_experts, tiles, block_m, min(cap, max(16, next_pow2(num_pairs))), block_e,
                block_tiles, on)
        return _AlignPlan(tiles, 0, Plan(K._align_kernel, (1,), tail, warps, **early))
    chunk = next_pow2(chunk)
    chunks = cdiv(num_pairs, chunk)
    block_c = min(max(16, next_pow2(chunks)), max(16, 16384 // block_e))
    return _AlignPlan(
        tiles, chunks, None,
        Plan(K._align_count_kernel, (chunks,), (num_pairs, num_experts, chunk, block_e, on), 4, **early),
        Plan(K._align_scan_kernel, (1,), (num_pairs, num_experts, chunks, tiles, block_m, block_c, block_e,
                                          block_tiles, on), warps, **early),
        Plan(K._align_scatter_kernel, (chunks,), (num_pairs, num_experts, chunk, block_e, on), 4, **early),
    )


def _groups(plan: _AlignPlan, ids: torch.Tensor, num_experts: int) -> ExpertGroups:
    """Fresh tensors of a grouping (written by the align launches)."""
    dev = ids.device
    return ExpertGroups(_empty((num_experts + 1,), torch.int32, device=dev),
                        _empty((ids.numel(),), torch.int32, device=dev),
                        _empty((plan.tiles,), torch.int32, device=dev),
                        _empty((plan.tiles,), torch.int32, device=dev))


def _align(plan: _AlignPlan, ids: torch.Tensor, num_experts: int) -> ExpertGroups:
    dev = ids.device
    groups = _groups(plan, ids, num_experts)
    if plan.single is not None:
        plan.single.launch(ids, *groups)
    elif plan.chunks:
        counts = _empty((plan.chunks, num_experts), torch.int32, device=dev)
        base = _empty((plan.chunks, num_experts), torch.int32, device=dev)
        plan.count.launch(ids, counts)
        plan.scan.launch(counts, base, groups.offsets, groups.tile_expert, groups.tile_start)
        plan.scatter.launch(ids, base, groups.sorted_pairs)
    else:
        groups.offsets.zero_()
    return groups


def _flat(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    # [T, k] routing tensors as the [T * k] vectors the kernels index (a copy only when not already so)
    t = t.reshape(-1)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, *, chunk: int | None = None) -> ExpertGroups:
    """Group the pairs of ``topk_ids [T, k]`` (int32/int64, ids in ``[0, num_experts)``) by expert, on the
    device, without a host sync: one launch up to ``chunk`` pairs (default ``ALIGN_CHUNK`` on a GPU, unbounded
    under the interpreter), else three (count per chunk, scan, scatter). See ``ExpertGroups``;
    ``align_reference`` is its PyTorch twin."""
    ids = _flat(topk_ids)
    return _align(_align_plan(ids.numel(), num_experts, block_m, ids.device, chunk), ids, num_experts)


def _weight_strides(w: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """(expert, K, N) strides of a ``[E, K, N]`` (transposed, ``x @ W``) or ``[E, N, K]`` (``F.linear``) weight."""
    if transposed:
        return w.stride(0), w.stride(1), w.stride(2)
    return w.stride(0), w.stride(2), w.stride(1)


class _ExpertsPlan(NamedTuple):
    """The launches of ``moe_experts`` for one call signature (``Plan``: kernel, grid, scalar tail)."""

    rows: int  # tokens
    k: int
    experts: int
    inter: int
    hidden: int
    split: int  # the down GEMM's K splits (rows of y per pair)
    align: Plan
    gate_up: Plan
    down: Plan
    combine: Plan | None  # None: the down GEMM adds the terms (COMBINE_IN_DOWN)
    quant_x: Plan | None = None  # FP8 activations: the tokens' rows to E4M3 before the gate/up GEMM
    quant_h: Plan | None = None  # and the intermediate rows before the down GEMM
    amax_parts: int = 0  # or (MoEConfig.quant_h_in_down) the gate/up GEMM's shares of their scales per row
    align_quant: Plan | None = None  # W8A8 at decode: the grouping and quant_x in one launch (replaces both)
    grouped: bool = True  # False: one pair a tile, in the pairs' own order, no grouping launch (_ungrouped)


def _row_block(cols: int, device: torch.device) -> int:
    """Columns a step of a row's E4M3 scale inside the GEMMs (``_tile_row_scales``): the whole row up to 4096 on a
    GPU (one round trip through L2 a row), 64 under the interpreter."""
    return min(4096 if device.type == "cuda" else 64, max(16, next_pow2(cols)))


def _quant_rows_plan(rows: int, cols: int, stride: int, device: torch.device, norm_eps: float | None = None) -> Plan:
    """``_quant_rows_kernel`` over ``rows`` rows of ``cols`` (tensors: x, q, scales, norm weight)."""
    on_cpu = device.type == "cpu"
    # GPU: a row a program, its columns 2048 at a time; interpreter: as many rows and columns as fit one step
    block_r = min(64, max(1, next_pow2(rows))) if on_cpu else 1
    block_c = min(256 if on_cpu else 2048, max(16, next_pow2(cols)))
    norm = (norm_eps is not None, norm_block(cols, block_r, on_cpu) if norm_eps is not None else 16)
    on = pdl.enabled(device)
    return Plan(K._quant_rows_kernel, (cdiv(rows, block_r),),
                (rows, cols, stride, 0.0 if norm_eps is None else float(norm_eps), block_r, block_c, on_cpu, *norm,
                 on), 4, **pdl.launch_options(on))


def _align_quant_plan(align: Plan, quant: Plan) -> Plan:
    """``_align_quant_kernel``: the one-program grouping ``align`` and the row quantization ``quant`` (their plans'
    tails) in one launch, the quantization's row blocks after the grouping's program."""
    p, e, tiles, tile_m, block_p, block_e, block_tiles, on = align.tail
    rows, cols, stride, eps, block_r, block_c, emulate, norm, norm_blk, _ = quant.tail
    return Plan(K._align_quant_kernel, (1 + quant.grid[0],),
                (p, e, tiles, rows, cols, stride, eps, tile_m, block_p, block_e, block_tiles, block_r, block_c,
                 emulate, norm, norm_blk, on), align.num_warps, **align.options)


def _for_block_scales(cfg: MoEConfig, inter: int) -> MoEConfig:
    """``cfg`` for 128x128 block-scaled experts: a K step inside one scale block (``BLOCK_K`` at most 128, a power
    of two, so a divisor of 128), and every weight tile's columns inside one block: ``BLOCK_N`` a divisor of 128 and,
    for the up half (whose rows start at ``inter``), of ``inter``'s offset into its block. No swapped W8A8 products
    (``_k_loop_swap`` takes no block scales)."""
    gate_up_n = min(cfg.gate_up_block_n, SCALE_BLOCK)
    while (inter % SCALE_BLOCK) % gate_up_n:
        gate_up_n //= 2
    return cfg._replace(gate_up_block_n=gate_up_n, gate_up_block_k=min(cfg.gate_up_block_k, SCALE_BLOCK),
                        down_block_n=min(cfg.down_block_n, SCALE_BLOCK),
                        down_block_k=min(cfg.down_block_k, SCALE_BLOCK), swap_ab=False)


# One-row tiles read the pairs in their own order, without the grouping launch (see _ungrouped). False: they group
# first, as every other tile does (for a before/after in one run: benchmarks.dev.moe_grouping). Plans are cached:
# call clear_caches() after changing it.
UNGROUPED_ONE_ROW_TILES = True
# One token's pairs too, whatever the tiles (bf16 experts' 16-row tensor-core tiles): the router's top k are k distinct
# experts, so grouping them made one tile per pair, each of one row, in expert order; in pair order, with the ids as
# the tile table, the grouping launch goes and the down GEMM adds the token's terms (COMBINE_IN_DOWN): two launches
# fewer. (Ids given to moe_experts that repeat an expert are still right: that expert is read once per pair.) False:
# one token groups as before (benchmarks.dev.moe_decode_launches times both: session 47, H100, gpt-oss-20b's layer
# 79.2 -> 77.1 us in bf16, Qwen3-30B-A3B's 49.9 -> 43.4). Plans are cached: call clear_caches() after changing it.
UNGROUPED_ONE_TOKEN = True


# Where the pairs run ungrouped (_ungrouped), the down GEMM also adds each token's expert outputs (and the residual):
# the last of a (token, column tile)'s programs to arrive writes the output (an arrival counter,
# triton_ops_core.scratch), so no combine launch follows. The same bits either way. False: the combine launch (a
# before/after in one run: benchmarks.dev.moe_one_launch). Plans are cached: call clear_caches() after changing it.
COMBINE_IN_DOWN = True


def _ungrouped(cfg: MoEConfig, fp8_activations: bool, tokens: int) -> bool:
    """Whether the grouped GEMMs take the pairs in their own order, one pair a tile, with no grouping launch before
    them (the kernels' ``GROUPED`` off): one-row tiles (``block_m`` 1, FP8 experts' CUDA-core tiles at 1 to 8
    tokens, :data:`UNGROUPED_ONE_ROW_TILES`) and one token (:data:`UNGROUPED_ONE_TOKEN`), where sorting the pairs by
    expert only decided which tile reads which row. With E4M3 activations (W8A8) only at one token: its row is
    quantized by a launch of its own instead of the grouping's (which quantizes at 2 to 64 tokens), and the combine
    launch goes."""
    one_token = UNGROUPED_ONE_TOKEN and tokens == 1
    return one_token or (UNGROUPED_ONE_ROW_TILES and cfg.block_m == 1 and not fp8_activations)


def _experts_plan(x2d: torch.Tensor, k: int, gate_up_proj: torch.Tensor, gate_up_proj_bias: torch.Tensor | None,
                  down_proj: torch.Tensor, down_proj_bias: torch.Tensor | None, activation: str,
                  gate_up_layout: str, transposed: bool, alpha: float, limit: float,
                  gate_up_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, norm_eps: float | None = None,
                  fp8_activations: bool = False) -> _ExpertsPlan:
    t, h = x2d.shape
    e = gate_up_proj.shape[0]
    inter = (gate_up_proj.shape[2] if transposed else gate_up_proj.shape[1]) // 2
    dev, dtype = x2d.device, x2d.dtype
    p = t * k
    cfg = _config(t, k, h, inter, e, dev, gate_up_proj.element_size(), fp8_activations)
    if fp8_activations and dev.type == "cuda":  # (the interpreter's tests choose their tiles)
        cfg = for_layout(cfg, gate_up_layout == "interleaved")
    cfg = for_weights(cfg, t, _weight_strides(gate_up_proj, transposed)[1] == 1, norm_eps is not None)
    blocks = gate_up_scale is not None and gate_up_scale.dim() == 3  # 128x128 block scales, applied in the K loops
    if blocks:
        cfg = _for_block_scales(cfg, inter)
    grouped = not _ungrouped(cfg, fp8_activations, t)
    align = _align_plan(p, e, cfg.block_m, dev)
    tiles = align.tiles if grouped else p  # ungrouped: tile i is pair i
    if t == 0:
        none = Plan(None, (1,), (), 0)
        return _ExpertsPlan(t, k, e, inter, h, 1, align, none, none, none)
    precision, upcast, emulate = _dot_precision(dtype), _upcast(dev, dtype), _emulate_bf16(dev, dtype)
    on = pdl.enabled(dev)  # each launch starts as the one before it ends (triton_ops_core.pdl)
    early = pdl.launch_options(on)
    b1, b2, s1, s2 = gate_up_proj_bias, down_proj_bias, gate_up_scale, down_scale
    # fp16 tensor-core dots (config f16_dot): FP8 weights, bf16 activations, dot tiles only
    f16 = cfg.f16_dot and not cfg.fma and dtype == torch.bfloat16 and not fp8_activations
    quant_x = quant_h = None
    stride_xt = x2d.stride(0)
    in_gemm = fp8_activations and cfg.quant_in_gemm
    # the intermediate rows quantized inside the down GEMM, their scales from the gate/up GEMM's shares
    h_in_down = fp8_activations and cfg.quant_h_in_down and not in_gemm
    amax_parts = cdiv(inter, cfg.gate_up_block_n) if h_in_down else 0
    # W8A8's tensor-core products with the weights as the 64-row operand (MoEConfig.swap_ab)
    swap = fp8_activations and cfg.swap_ab and not in_gemm and not cfg.fma
    # the K loops' USE_FMA: 0 dots, 1 the [rows, BLOCK_K, BLOCK_N] CUDA-core tile, 2 one row in the weight tile's
    # layout (MoEConfig.row_layout; not behind the gate/up GEMM's RMSNorm prologue, whose weight it would load
    # synchronously in every K step)
    down_fma = (2 if cfg.row_layout and cfg.block_m == 1 else 1) if cfg.fma else 0
    fma = 1 if down_fma == 2 and norm_eps is not None else down_fma
    norm_rows = cfg.block_m  # the rows of the gate/up GEMM's RMSNorm prologue (one at a time with in_gemm)
    if fp8_activations:
        # the GEMMs read E4M3 on both sides: the interpreter's FP8 dot is wrong too, so its operands go to fp32
        # (exact) as its 16-bit ones do
        upcast = dev.type == "cpu"
    if in_gemm:  # quantized in registers inside the GEMMs (the norm too)
        norm_rows = 1
    elif fp8_activations:  # the rows quantized first (normalized there when asked)
        quant_x = _quant_rows_plan(t, h, x2d.stride(0), dev, norm_eps)
        quant_h = None if h_in_down else _quant_rows_plan(p, inter, inter, dev)
        stride_xt, norm_eps = h, None
    # each GEMM's QUANT_A, QUANT_BLOCK (a row's columns a step while its E4M3 scale is found; with h_in_down the
    # down GEMM's shares a step), EMULATE_FP8
    quant = ((in_gemm, _row_block(h, dev), dev.type == "cpu"),
             (True, min(128, next_pow2(amax_parts)), dev.type == "cpu") if h_in_down
             else (in_gemm, _row_block(inter, dev), dev.type == "cpu"))
    # gate/up: h = act(x @ W1[e] (* s1[e]) + b1[e]) in sorted row order; h is a fresh contiguous [p, inter]
    gate_up = Plan(K._gate_up_kernel, (tiles, cdiv(inter, cfg.gate_up_block_n)), (
        inter, h, tiles, stride_xt, *_weight_strides(gate_up_proj, transposed),
        0 if b1 is None else b1.stride(0), 1 if b1 is None else b1.stride(1),
        0 if s1 is None else s1.stride(0), 1 if s1 is None else s1.stride(1), inter, float(alpha), float(limit),
        0.0 if norm_eps is None else float(norm_eps),
        # TOP_K, ACTIVATION, HAS_BIAS, INTERLEAVED, W_SCALED (per column, in the epilogue)
        k, _ACTIVATION_CODES[activation], b1 is not None, gate_up_layout == "interleaved",
        s1 is not None and not blocks,
        # BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, NUM_STAGES, DOT_PRECISION, UPCAST, EMULATE_BF16
        cfg.block_m, cfg.gate_up_block_n, cfg.gate_up_block_k, h % cfg.gate_up_block_k == 0, cfg.num_stages,
        precision, upcast, emulate, fma, dev.type == "cpu", f16 and s1 is not None,
        # NORM, NORM_BLOCK
        norm_eps is not None, norm_block(h, norm_rows, dev.type == "cpu") if norm_eps is not None else 16, on,
        fp8_activations, *quant[0], h_in_down, swap, s1.stride(2) if blocks else 0, blocks, e, grouped),
        cfg.num_warps, **early)
    # down: y[pair * split + s] = (h @ W2[e] (* s2[e]) + b2[e]) * weight over split s's K range, fp32; y is a fresh
    # contiguous [p * split, hidden]
    split = cfg.down_split_k
    finish = not grouped and COMBINE_IN_DOWN  # the combine in the down GEMM's last programs (COMBINE_IN_DOWN)
    stride_rt = 0 if residual is None else _as_2d(residual).stride(0)
    down = Plan(K._down_kernel, (tiles, cdiv(h, cfg.down_block_n), split), (
        h, inter, tiles, inter, *_weight_strides(down_proj, transposed),
        0 if b2 is None else b2.stride(0), 1 if b2 is None else b2.stride(1),
        0 if s2 is None else s2.stride(0), 1 if s2 is None else s2.stride(1), h, h, stride_rt,
        b2 is not None, s2 is not None and not blocks,
        cfg.block_m, cfg.down_block_n, cfg.down_block_k, inter % cfg.down_block_k == 0, cfg.num_stages,
        precision, upcast, down_fma, dev.type == "cpu", split, f16 and s2 is not None, on, fp8_activations, *quant[1],
        h_in_down, max(1, amax_parts), swap, s2.stride(2) if blocks else 0, blocks, e, grouped,
        # FINISH, TOP_K, HAS_RESIDUAL, EMULATE_BF16 (of the output's rounding)
        finish, k if finish else 1, finish and residual is not None, finish and emulate,
        *_down_prefetch(on, down_proj, transposed, cfg.down_block_n, cfg.down_block_k)), cfg.num_warps, **early)
    # combine: out[t] = (residual[t] +) sum_j y[t * k * split + j], fixed order; out is a fresh contiguous [t, hidden]
    block_t = 16 if dev.type == "cuda" else min(64, max(16, next_pow2(t)))
    block_n = min(256, max(16, next_pow2(h)))
    combine = None if finish else Plan(
        K._combine_kernel, (cdiv(t, block_t), cdiv(h, block_n)),
        (t, h, h, h, stride_rt, k * split, block_t, block_n, emulate, residual is not None, on), 4, **early)
    align_quant = None
    if quant_x is not None and align.single is not None and cfg.quant_x_with_align and grouped:
        align_quant, quant_x = _align_quant_plan(align.single, quant_x), None
    return _ExpertsPlan(t, k, e, inter, h, split, align, gate_up, down, combine, quant_x, quant_h, amax_parts,
                        align_quant, grouped)


def _experts(plan: _ExpertsPlan, x2d: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
             gate_up_proj: torch.Tensor, gate_up_proj_bias: torch.Tensor | None, down_proj: torch.Tensor,
             down_proj_bias: torch.Tensor | None, gate_up_scale: torch.Tensor | None = None,
             down_scale: torch.Tensor | None = None, residual: torch.Tensor | None = None,
             norm_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The per-call part: allocate the buffers, launch the grouping, the two grouped GEMMs and the combine."""
    t, h, p, dev = plan.rows, plan.hidden, plan.rows * plan.k, x2d.device
    out = _empty((t, h), x2d.dtype, device=dev)
    if t == 0:
        return out
    # absent biases and scales: any pointer (the kernels' HAS_BIAS / W_SCALED / A_SCALED are off)
    b1 = gate_up_proj if gate_up_proj_bias is None else gate_up_proj_bias
    s1 = gate_up_proj if gate_up_scale is None else gate_up_scale
    nw = gate_up_proj if norm_weight is None else norm_weight  # any pointer: NORM is off
    a, a_scale = x2d, s1
    if not plan.grouped:  # one pair a tile, in pair order: the ids are the tile table; the rest is never read
        ids = _flat(topk_ids)
        groups = ExpertGroups(ids, ids, ids, ids)
    elif plan.align_quant is not None:  # the grouping and the tokens' E4M3 rows from one launch
        groups = _groups(plan.align, _flat(topk_ids), plan.experts)
        a, a_scale = _fp8_rows(x2d)
        plan.align_quant.launch(_flat(topk_ids), *groups, x2d, _fp8_view(a), a_scale, nw)
    else:
        groups = _align(plan.align, _flat(topk_ids), plan.experts)
    if plan.quant_x is not None:  # (W8A8 without the grouping's launch to quantize them)
        a, a_scale = _quantized_rows(plan.quant_x, x2d, nw)
    sorted_pairs, offsets, tile_expert, tile_start = groups.sorted_pairs, groups.offsets, *groups[2:]
    hmid = _empty((p, plan.inter), x2d.dtype, device=dev)
    # the shares of each intermediate row's scale (every entry written by one gate/up program), or any pointer
    hamax = _empty((p, plan.amax_parts), torch.float32, device=dev) if plan.amax_parts else hmid
    plan.gate_up.launch(a, gate_up_proj, b1, s1, sorted_pairs, offsets, tile_expert, tile_start, nw, a_scale, hmid,
                        hamax)
    y = _empty((p * plan.split, h), torch.float32, device=dev)
    b2 = down_proj if down_proj_bias is None else down_proj_bias
    s2 = down_proj if down_scale is None else down_scale
    a, a_scale = hmid, hamax if plan.amax_parts else s2
    if plan.quant_h is not None:
        a, a_scale = _quantized_rows(plan.quant_h, hmid, nw)
    res = out if residual is None else _as_2d(residual)  # any pointer without a residual
    if plan.combine is None:  # the down GEMM's last programs add the terms (zero-at-rest arrival counters)
        cnt = scratch.scratch(_DOWN_COUNTERS, dev, t * plan.down.grid[1], torch.int32, zeroed=True)
        plan.down.launch(a, down_proj, b2, s2, _flat(topk_weights, torch.float32), sorted_pairs, offsets,
                         tile_expert, tile_start, a_scale, y, out, res, cnt)
        return out
    plan.down.launch(a, down_proj, b2, s2, _flat(topk_weights, torch.float32), sorted_pairs, offsets,
                     tile_expert, tile_start, a_scale, y, out, res, out)
    plan.combine.launch(y, out, res)
    return out


def _quantized_rows(plan: Plan, x2d: torch.Tensor, norm_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E4M3 rows [R, C], fp32 scales [R])`` of ``x2d`` (``_quant_rows_kernel``; normalized first when the plan
    says so)."""
    q, scales = _fp8_rows(x2d)
    plan.launch(x2d, _fp8_view(q), scales, norm_weight)
    return q, scales


def _fp8_rows(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh E4M3 rows shaped as ``x2d`` and their fp32 scales (written by the row quantization)."""
    return (_empty(tuple(x2d.shape), torch.float8_e4m3fn, device=x2d.device),
            _empty((x2d.shape[0],), torch.float32, device=x2d.device))


def _fp8_view(q: torch.Tensor) -> torch.Tensor:
    # the interpreter's FP8 cast is wrong: the kernel writes the rounded codes through a byte view there
    return q.view(torch.uint8) if q.device.type == "cpu" else q


def _on_device(device: torch.device):
    # Triton launches on the current device: make it the tensors' one (multi-GPU processes).
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return None


def _tf32(x: object) -> bool:
    # fp32 dots follow torch's TF32 switch (read only for fp32 inputs: it costs a microsecond)
    return getattr(x, "dtype", None) is torch.float32 and torch.backends.cuda.matmul.allow_tf32


def _norm_key(norm_weight, norm_eps) -> tuple:
    # the epsilon is baked into the plan: its value and type are part of the key (True == 1)
    return (norm_eps, norm_eps.__class__) if norm_weight is not None else (None, None)


def _route_impl(hidden, router_weight, router_bias, top_k, renormalize, norm_weight=None, norm_eps=0.0):
    """The op's implementation: the call's cached plan (validated and built on the first call of its key)."""
    key = call_key("route", hidden, router_weight, router_bias, norm_weight, *_norm_key(norm_weight, norm_eps),
                   top_k, top_k.__class__, renormalize, renormalize.__class__, _tf32(hidden))
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        validate_route_inputs(hidden, router_weight, router_bias, top_k, renormalize)
        if norm_weight is not None:
            check_norm(hidden, norm_weight, norm_eps)
        plan = _route_plan(_as_2d(hidden), router_weight, router_bias, top_k, renormalize,
                           norm_eps=None if norm_weight is None else norm_eps)
        _put(key, plan)
    x2d = _as_2d(hidden)
    ctx = _on_device(hidden.device)
    if ctx is not None:
        with ctx:
            ids, wts = _route(plan, x2d, router_weight, router_bias, top_k, norm_weight)
    else:
        ids, wts = _route(plan, x2d, router_weight, router_bias, top_k, norm_weight)
    if hidden.dim() != 2:  # [..., k], like the hidden states' leading dimensions
        lead = hidden.shape[:-1]
        ids, wts = ids.reshape(*lead, top_k), wts.reshape(*lead, top_k)
    return ids, wts


def _check_residual(hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
    """The combine's residual: ``hidden``'s shape, dtype and device, rows of unit stride along H (any row stride)."""
    if residual is None:
        return
    check_tensor(residual, "residual")
    if tuple(residual.shape) != tuple(hidden.shape):
        raise ShapeMismatchError(f"residual: expected hidden's shape {list(hidden.shape)}, got {list(residual.shape)}")
    check_dtype(residual, "residual", (hidden.dtype,))
    check_same_device(hidden=hidden, residual=residual)
    if residual.stride(-1) != 1 or (residual.dim() != 2 and not residual.is_contiguous()):
        raise LayoutError(f"residual: expected a unit stride along the hidden size (and, beyond 2-D, a contiguous "
                          f"tensor), got strides {residual.stride()}")


def _rows(t):
    # [..., k] routing tensors as [T, k] (anything else goes to validation unchanged, which names it)
    return t.reshape(-1, t.shape[-1]) if isinstance(t, torch.Tensor) and t.dim() else t


def _experts_impl(hidden, topk_ids, topk_weights, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                  activation, gate_up_layout, transposed, alpha, limit, gate_up_scale=None, down_scale=None,
                  residual=None, norm_weight=None, norm_eps=0.0, fp8_activations=False):
    """The op's implementation: the call's cached plan (validated and built on the first call of its key)."""
    key = call_key("experts", hidden, topk_ids, topk_weights, gate_up_proj, gate_up_proj_bias, down_proj,
                   down_proj_bias, gate_up_scale, down_scale, residual, norm_weight, *_norm_key(norm_weight, norm_eps),
                   activation, gate_up_layout, transposed, alpha, limit, alpha.__class__, limit.__class__,
                   transposed.__class__, _tf32(hidden), fp8_activations, fp8_activations.__class__)
    ids2d, w2d = _rows(topk_ids), _rows(topk_weights)
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        validate_experts_inputs(hidden, ids2d, w2d, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                                activation, gate_up_layout, transposed, alpha, limit, gate_up_scale, down_scale,
                                fp8_activations)
        _check_residual(hidden, residual)
        if norm_weight is not None:
            check_norm(hidden, norm_weight, norm_eps)
        plan = _experts_plan(_as_2d(hidden), ids2d.shape[1], gate_up_proj, gate_up_proj_bias, down_proj,
                             down_proj_bias, activation, gate_up_layout, transposed, alpha, limit, gate_up_scale,
                             down_scale, residual, None if norm_weight is None else norm_eps, fp8_activations)
        _put(key, plan)
    ctx = _on_device(hidden.device)
    args = (plan, _as_2d(hidden), ids2d, w2d, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
            gate_up_scale, down_scale, residual, norm_weight)
    if ctx is not None:
        with ctx:
            out = _experts(*args)
    else:
        out = _experts(*args)
    return out if hidden.dim() == 2 else out.reshape(hidden.shape)


# ----------------------------------------------------------------------------------------------------------------
# Registration: triton_ops::moe_route, triton_ops::moe_experts
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op(op_name("moe_route"), mutates_args=())
def _route_op(hidden: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None, top_k: int,
              renormalize: bool, norm_weight: torch.Tensor | None = None,
              norm_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    with scratch.per_call():  # no buffer outlives the call (torch.compile's CUDA graphs; see triton_ops_core.scratch)
        return _route_impl(hidden, router_weight, router_bias, top_k, renormalize, norm_weight, norm_eps)


@_route_op.register_fake
def _(hidden, router_weight, router_bias, top_k, renormalize, norm_weight=None, norm_eps=0.0):
    shape = (*hidden.shape[:-1], top_k)
    return (hidden.new_empty(shape, dtype=torch.int32), hidden.new_empty(shape, dtype=torch.float32))


@torch.library.custom_op(op_name("moe_experts"), mutates_args=())
def _experts_op(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                gate_up_proj: torch.Tensor, gate_up_proj_bias: torch.Tensor | None, down_proj: torch.Tensor,
                down_proj_bias: torch.Tensor | None, activation: str, gate_up_layout: str, transposed: bool,
                alpha: float, limit: float, gate_up_scale: torch.Tensor | None = None,
                down_scale: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0,
                fp8_activations: bool = False) -> torch.Tensor:
    with scratch.per_call():  # no buffer outlives the call (torch.compile's CUDA graphs; see triton_ops_core.scratch)
        return _experts_impl(hidden, topk_ids, topk_weights, gate_up_proj, gate_up_proj_bias, down_proj,
                             down_proj_bias, activation, gate_up_layout, transposed, alpha, limit, gate_up_scale,
                             down_scale, residual, norm_weight, norm_eps, fp8_activations)


@_experts_op.register_fake
def _(hidden, topk_ids, topk_weights, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, activation,
      gate_up_layout, transposed, alpha, limit, gate_up_scale=None, down_scale=None, residual=None, norm_weight=None,
      norm_eps=0.0, fp8_activations=False):
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


def _no_context(ctx, inputs, output) -> None:
    pass


def _route_backward(ctx, *grads):
    raise MoEBackwardError(
        "triton_ops::moe_route has no backward (the fused MoE is forward-only, for inference): run the forward "
        "under torch.no_grad() / torch.inference_mode(), or use transformers' own module for training")


def _experts_backward(ctx, grad):
    raise MoEBackwardError(
        "triton_ops::moe_experts has no backward (the fused MoE is forward-only, for inference): run the forward "
        "under torch.no_grad() / torch.inference_mode(), or use transformers' own module for training")


_route_op.register_autograd(_route_backward, setup_context=_no_context)
_experts_op.register_autograd(_experts_backward, setup_context=_no_context)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def moe_route(hidden: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None = None,
              top_k: int = 4, *, renormalize: bool = True, norm_weight: torch.Tensor | None = None,
              norm_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The router: ``logits = hidden @ router_weight^T + router_bias``, the ``top_k`` largest, their weights.

    Args:
        hidden: ``[..., H]``, float16, bfloat16 or float32, unit stride in the last dimension.
        router_weight: ``[E, H]`` in ``hidden``'s dtype (``GptOssTopKRouter.weight``), unit last stride.
        router_bias: ``[E]`` or None.
        top_k: experts per token, ``1 <= top_k <= E``.
        renormalize: True (gpt-oss; Qwen3-MoE / Mixtral with ``norm_topk_prob``): softmax over the k chosen
            logits. False: the softmax over all E logits, taken at the k chosen.
        norm_weight, norm_eps: ``hidden`` RMS-normalized first with this ``[H]`` weight and epsilon (> 0), inside the
            router's launches, bit for bit as ``fused_rmsnorm_rope.rmsnorm`` writes it (a decoder layer's
            post-attention norm; ``triton_ops_core.rms_prologue``); or None.

    Returns:
        ``(topk_ids, topk_weights)``, both ``[..., top_k]``: int32 expert ids in descending order of their
        logit (ties: the lowest expert id first), fp32 weights. Logits accumulate in fp32 and are rounded to
        ``hidden``'s dtype before the choice, as the model's ``F.linear`` rounds them.

    Registered as ``torch.ops.triton_ops.moe_route``; no gradient (``MoEBackwardError`` on backward).

    Raises:
        ShapeMismatchError, UnsupportedDtypeError, DeviceMismatchError, UnsupportedDeviceError, LayoutError,
        InvalidArgumentError: naming the offending argument.
    """
    if direct_call_ok(hidden, router_weight, router_bias, norm_weight):
        return _route_impl(hidden, router_weight, router_bias, top_k, renormalize, norm_weight, norm_eps)
    return _route_op(hidden, router_weight, router_bias, top_k, renormalize, norm_weight,
                     norm_eps if norm_weight is not None else 0.0)


def moe_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_proj_bias: torch.Tensor | None,
    down_proj: torch.Tensor,
    down_proj_bias: torch.Tensor | None,
    activation: str = "swiglu_oai",
    *,
    gate_up_layout: str = "interleaved",
    transposed: bool = True,
    alpha: float = 1.702,
    limit: float = 7.0,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    fp8_activations: bool = False,
) -> torch.Tensor:
    """The experts of a given routing: ``out[t] = sum_j w[t, j] * (act(x[t] @ W1[e] + b1[e]) @ W2[e] + b2[e])``
    with ``e = topk_ids[t, j]``, ``act(gate, up)`` the gated activation of the two halves of ``W1``'s output.

    Args:
        hidden: ``[..., H]``, float16, bfloat16 or float32, unit last stride.
        topk_ids: ``[..., k]`` int32/int64 expert ids in ``[0, E)`` (out-of-range ids are not checked on the
            device: that would need a host sync), one row per token of ``hidden``.
        topk_weights: ``[..., k]`` routing weights (any float dtype; used in fp32).
        gate_up_proj: ``transposed=True`` (gpt-oss): ``[E, H, 2I]``; ``transposed=False`` (Qwen3-MoE, Mixtral in
            transformers 5): ``[E, 2I, H]``. Any strides; read in place.
        gate_up_proj_bias: ``[E, 2I]`` (packed like the weight's 2I columns) or None.
        down_proj: ``[E, I, H]`` (``transposed=True``) or ``[E, H, I]``.
        down_proj_bias: ``[E, H]`` or None.
        activation: ``"swiglu_oai"`` (gpt-oss: ``g = gate.clamp(max=limit)``, ``u = up.clamp(-limit, limit)``,
            ``g * sigmoid(alpha * g) * (u + 1)``), ``"silu"`` (``silu(gate) * up``), ``"gelu"`` (exact GELU) or
            ``"gelu_tanh"`` (GELU's tanh approximation, transformers' ``gelu_pytorch_tanh``: Gemma's).
        gate_up_layout: ``"interleaved"`` (gpt-oss: gate and up alternate, column 2j is gate j) or
            ``"concatenated"`` (gate first, then up).
        alpha, limit: ``"swiglu_oai"``'s parameters (gpt-oss: 1.702, 7.0).
        gate_up_scale, down_scale: FP8 experts (weight-only): with ``gate_up_proj`` / ``down_proj`` in
            ``float8_e4m3fn`` (or both ``float8_e5m2``), their fp32 scales, ``[E, 2I]`` and ``[E, H]``: one per
            expert and output column, the weight being ``W[e][:, n] * scale[e, n]``
            (:func:`quantize_experts_fp8`). The FP8 tiles are converted in registers (exact), to ``hidden``'s dtype
            for the tensor-core tiles or to fp32 for the CUDA-core ones (FP8 experts at 2 to 8 tokens), and the
            scale applied to each column's fp32 sum: half the weight bytes of bf16, the activations unquantized.
            Or 128x128 block scales, as FP8 checkpoints ship their experts (transformers' ``FP8Experts``:
            ``gate_up_proj_scale_inv`` / ``down_proj_scale_inv``, float32): ``[E, ceil(2I / 128), ceil(H /
            128)]`` and ``[E, ceil(H / 128), ceil(I / 128)]``, output features by input features whatever the
            weights' layout, ``W[e][n, k] * scale[e, n // 128, k // 128]``; concatenated gate/up only, the
            intermediate size a multiple of 16. Each 128-deep K step's partial product (tensor cores) or row values
            (CUDA cores) are scaled by the step's block scale. None (the default) for 16/32-bit weights.
        residual: ``hidden``'s shape and dtype (rows of unit stride), or None: added to each token's sum before its
            one rounding (a decoder layer's residual add after its MoE, without a launch of its own).
        norm_weight, norm_eps: ``hidden`` RMS-normalized first (as :func:`moe_route`'s), inside the gate/up
            GEMM's launch: every program sums its tokens' squares over all of H again (from L2) before its weights
            stream, which a decode step's few tokens pay for with a launch less; for prefill-sized calls normalize
            first instead (``rmsnorm``); or None.
        fp8_activations: W8A8 (E4M3 experts with their scales only). Each token's row of ``hidden`` (normalized
            first with ``norm_weight``) and each intermediate row are quantized to E4M3 with one fp32 scale per row
            (``amax / 448``, finite values only, saturating; NaN kept) by a launch before each grouped GEMM, whose
            dots then take FP8 on both sides (Hopper's FP8 tensor cores, fast accumulation as Triton's default FP8
            dot: partial sums in the tensor core's reduced precision) and scale each fp32 sum by its row's and its
            column's scale. Store the weights K-major (``quantize_experts_fp8(..., k_major=True)``) so that their
            tiles reach the tensor cores as loaded. Adds the activations' FP8 rounding (about 2^-4 relative per
            element) to the weights'. A token whose row holds NaN or an infinity comes out NaN.

    Returns:
        ``[..., H]`` in ``hidden``'s dtype. Products accumulate in fp32; the intermediate activation is rounded
        to ``hidden``'s dtype (as the model's own GEMMs do); bias, routing weight and the sum of the k terms are
        fp32, in a fixed order (deterministic, no atomics).

    Registered as ``torch.ops.triton_ops.moe_experts``; no gradient (``MoEBackwardError`` on backward).
    """
    if direct_call_ok(hidden, topk_ids, topk_weights, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                      gate_up_scale, down_scale, residual, norm_weight):
        return _experts_impl(hidden, topk_ids, topk_weights, gate_up_proj, gate_up_proj_bias, down_proj,
                             down_proj_bias, activation, gate_up_layout, transposed, alpha, limit, gate_up_scale,
                             down_scale, residual, norm_weight, norm_eps, fp8_activations)
    return _experts_op(hidden, topk_ids, topk_weights, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                       activation, gate_up_layout, transposed, alpha, limit, gate_up_scale, down_scale, residual,
                       norm_weight, norm_eps if norm_weight is not None else 0.0, fp8_activations)


def fused_moe(
    hidden: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor | None,
    gate_up_proj: torch.Tensor,
    gate_up_proj_bias: torch.Tensor | None,
    down_proj: torch.Tensor,
    down_proj_bias: torch.Tensor | None,
    top_k: int = 4,
    activation: str = "swiglu_oai",
    alpha: float = 1.702,
    limit: float = 7.0,
    *,
    gate_up_layout: str = "interleaved",
    transposed: bool = True,
    renormalize: bool = True,
    return_router_scores: bool = False,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    fp8_activations: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A mixture-of-experts feed-forward block: ``moe_route`` then ``moe_experts``.

    The defaults are gpt-oss's ``GptOssMLP``: pass ``mlp.router.weight``, ``mlp.router.bias``,
    ``mlp.experts.gate_up_proj``, ``mlp.experts.gate_up_proj_bias``, ``mlp.experts.down_proj``,
    ``mlp.experts.down_proj_bias`` as they are (no copies). Qwen3-MoE / Mixtral-style experts:
    ``router_bias=None``, biases None, ``activation="silu"``, ``gate_up_layout="concatenated"``,
    ``transposed=False`` (and ``renormalize=config.norm_topk_prob``). FP8 experts: ``gate_up_proj`` /
    ``down_proj`` in FP8 with ``gate_up_scale`` / ``down_scale`` (see :func:`moe_experts`,
    :func:`quantize_experts_fp8`), with ``fp8_activations=True`` E4M3 activations too (W8A8, see
    :func:`moe_experts`); the router stays in ``hidden``'s dtype.

    Returns ``[..., H]`` in ``hidden``'s dtype (with ``residual``, that plus the residual, rounded once: see
    :func:`moe_experts`); with ``return_router_scores=True`` also the routing weights ``[T, top_k]`` in
    ``hidden``'s dtype (what ``GptOssMLP`` returns beside its output). With ``norm_weight`` (and ``norm_eps``),
    ``hidden`` is RMS-normalized first inside the router's and the gate/up GEMM's launches (a decoder layer's
    post-attention norm without a launch of its own; see :func:`moe_route`); ``residual`` is then typically the
    un-normalized ``hidden`` itself.

    Raises:
        ShapeMismatchError (also when the router's and the experts' expert counts differ), UnsupportedDtypeError,
        DeviceMismatchError, UnsupportedDeviceError, LayoutError, InvalidArgumentError.
    """
    if (isinstance(router_weight, torch.Tensor) and isinstance(gate_up_proj, torch.Tensor)
            and router_weight.dim() >= 1 and gate_up_proj.dim() >= 1
            and router_weight.shape[0] != gate_up_proj.shape[0]):
        raise ShapeMismatchError(
            f"router_weight: expected {gate_up_proj.shape[0]} experts (rows) to match gate_up_proj's experts, "
            f"got {router_weight.shape[0]}")
    ids, wts = moe_route(hidden, router_weight, router_bias, top_k, renormalize=renormalize,
                         norm_weight=norm_weight, norm_eps=norm_eps)
    out = moe_experts(hidden, ids, wts, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, activation,
                      gate_up_layout=gate_up_layout, transposed=transposed, alpha=alpha, limit=limit,
                      gate_up_scale=gate_up_scale, down_scale=down_scale, residual=residual,
                      norm_weight=norm_weight, norm_eps=norm_eps, fp8_activations=fp8_activations)
    if return_router_scores:
        return out, wts.reshape(-1, wts.shape[-1]).to(hidden.dtype)
    return out


_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


@torch.no_grad()
def quantize_experts_fp8(gate_up_proj: torch.Tensor, down_proj: torch.Tensor, *, transposed: bool = True,
                         dtype: torch.dtype = torch.float8_e4m3fn, k_major: bool = False,
                         granularity: str = "channel") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert weights in FP8 for :func:`moe_experts` / :func:`fused_moe`: ``(gate_up_fp8, gate_up_scale,
    down_fp8, down_scale)``.

    One scale per expert and output column (the column's absolute maximum mapped to the format's largest value,
    448 for E4M3, 57344 for E5M2; an all-zero column gets scale 1), so ``W[e][:, n] ~= W_fp8[e][:, n] *
    scale[e, n]``. The FP8 weights keep the layout given (``transposed=True``: gpt-oss's ``[E, H, 2I]`` and
    ``[E, I, H]``; ``False``: ``[E, 2I, H]`` and ``[E, H, I]``), contiguous; the scales are fp32 ``[E, 2I]`` and
    ``[E, H]``. Plain PyTorch, once per model (no kernel).

    ``granularity="block"``: one scale per expert and 128x128 block of the weight (each block's absolute maximum
    mapped to the format's largest value), as FP8 checkpoints quantize their experts (DeepSeek-V3, Qwen3-MoE's FP8
    releases): scales ``[E, ceil(2I / 128), ceil(H / 128)]`` and ``[E, ceil(H / 128), ceil(I / 128)]``, output
    features by input features in either layout; for the concatenated gate/up layout (``moe_experts`` reads them
    there). Finer than per-column scales along K, so closer to the weights where a column's values differ a lot.

    ``k_major=True``: the same shapes, stored with the reduction dimension (H for gate/up, I for down) contiguous,
    whatever ``transposed`` says: Hopper's FP8 tensor cores take only K-major weight tiles, so E4M3 activations
    (``moe_experts(..., fp8_activations=True)``) read such weights without reordering any byte in registers. The
    kernels address weights through their strides, so either storage gives the same results.

    Raises:
        UnsupportedDtypeError: ``dtype`` not an FP8 format, or weights not floating point.
        ShapeMismatchError: weights not 3-D.
    """
    if dtype not in _FP8_MAX:
        raise UnsupportedDtypeError(f"dtype: expected torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    check_choice(granularity, "granularity", ("channel", "block"))
    out = []
    for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dtype in _FP8_MAX:
            raise UnsupportedDtypeError(
                f"{name}: expected a float16/bfloat16/float32 tensor, got "
                f"{getattr(w, 'dtype', type(w).__name__)}")
        if w.dim() != 3:
            raise ShapeMismatchError(f"{name}: expected a 3-D [experts, ., .] weight, got shape {list(w.shape)}")
        k_dim = 1 if transposed else 2  # the reduction dimension; the scales run along the other one
        wf = w.float()
        if granularity == "block":
            q, scale = _block_quantized(wf.transpose(1, 2) if transposed else wf, dtype)
            q = q.transpose(1, 2) if transposed else q
        else:
            amax = wf.abs().amax(dim=k_dim)
            scale = torch.where(amax > 0, amax / _FP8_MAX[dtype], torch.ones_like(amax))
            q = (wf / scale.unsqueeze(k_dim)).clamp(-_FP8_MAX[dtype], _FP8_MAX[dtype]).to(dtype)
        if k_major and k_dim == 1:  # K innermost in memory, the logical shape kept
            q = q.transpose(1, 2).contiguous().transpose(1, 2)
        else:
            q = q.contiguous()
        out += [q, scale.contiguous()]
    return out[0], out[1], out[2], out[3]


def _block_quantized(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 ``[E, out, in]`` weight in ``dtype`` with one scale per 128x128 block: ``(q [E, out, in], scales
    [E, ceil(out / 128), ceil(in / 128)])``."""
    e, rows, cols = w.shape
    pad_r, pad_c = -rows % SCALE_BLOCK, -cols % SCALE_BLOCK
    blocks = torch.nn.functional.pad(w, (0, pad_c, 0, pad_r)).view(
        e, (rows + pad_r) // SCALE_BLOCK, SCALE_BLOCK, (cols + pad_c) // SCALE_BLOCK, SCALE_BLOCK)
    amax = blocks.abs().amax(dim=(2, 4))
    scale = torch.where(amax > 0, amax / _FP8_MAX[dtype], torch.ones_like(amax))
    full = scale.repeat_interleave(SCALE_BLOCK, 1)[:, :rows].repeat_interleave(SCALE_BLOCK, 2)[:, :, :cols]
    return (w / full).clamp(-_FP8_MAX[dtype], _FP8_MAX[dtype]).to(dtype), scale


__all__ = ["ExpertGroups", "MoEBackwardError", "clear_caches", "fused_moe", "max_tiles", "moe_align",
           "moe_experts", "moe_route", "quantize_experts_fp8"]
