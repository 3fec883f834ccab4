"""Decode attention: the launcher, the op's registration with its fake, and the public function.

One registered op, forward only: ``torch.ops.triton_ops.decode_attention(q, k, v, attn_mask, scale, sinks,
sliding_window, is_causal, num_splits, ring_start=None, softcap=None)`` returns ``[B, Sq, Hq, D]``. One launch of
``_attention_kernel`` (plus one of ``_combine_kernel`` when the KV length is split over programs, except in plain
eager calls, which merge the splits in the attention launch: ``COMBINE_IN_LAUNCH``); sizes fixed by
the shapes, nothing read back on the host, so a call can be captured in a CUDA graph. No gradient: a backward raises
``DecodeAttentionBackwardError``.

As in the other packages, plain eager calls skip the dispatcher (``triton_ops_core.library.direct_call_ok``), and
a call is validated and planned once per call signature (shapes, strides, dtypes, devices, 16-byte alignment,
options; ``triton_ops_core.launch``): later calls allocate the output (and the split partials) and launch through
Triton's compiled launchers. ``clear_caches()`` forgets the plans.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from triton_ops_core import pdl, scratch
from triton_ops_core.device import sm_count
from triton_ops_core.exceptions import TritonKernelError
from triton_ops_core.launch import Plan, PlanCache, call_key, cdiv, next_pow2
from triton_ops_core.library import capturing, direct_call_ok, op_name

from . import _kernels as K
from .kv_cache import clear_kv_cache_plans
from .validation import AttentionInput, validate_decode_attention


class DecodeAttentionBackwardError(TritonKernelError, NotImplementedError):
    """A gradient was asked of ``decode_attention`` (inference only: no backward is implemented)."""


# ----------------------------------------------------------------------------------------------------------------
# Launch heuristics
# ----------------------------------------------------------------------------------------------------------------

# Flash-decoding: when B * Hkv programs are fewer than the SMs, split the KV length into a power of two of splits,
# the largest that keeps at most about this many programs per SM (unless the positions cap below binds: then the
# cap, any count; 1-2 KV heads at 8256 positions get 65 where 64 measured 4-6 % faster, not yet fixed).
# Measured on the H200 (session 13, 8-32 layers'
# caches in one CUDA graph, bf16, D 128, splits swept 2-128): the best split count gave 128-256 programs for batch 1
# (8, 2 and 1 KV heads; 8k and 32k tokens: 32 / 64 / 64 splits at 8k, 32 / 128 / 128 at 32k) and batch 4 (8);
# four programs per SM (the rule before) chose 65 splits for 8 KV heads at 8k (22.3 us per layer against 19.2 with
# 32) and an odd count for batch 8 (9 splits at 8k: 95 us against 82 with 4; 5 splits: 119) ...
PROGRAMS_PER_SM = 2
# ... but give each split at least this many positions (a shorter split pays its prologue and partial writes for
# little streaming; at least one KV block), and never more than this many splits (the combine reads every split's
# partials). Once the programs fill the SMs, no split: on the H200 (1k tokens in a 2k static cache, Llama-3-8B and
# gpt-oss heads) batch 64 took 70 / 39 us unsplit against 79 / 42 us in two splits, and 2 warps beat 4 there.
MIN_SPLIT_POSITIONS = 128
MAX_SPLITS = 128
# Unsplit programs that fill the GPU run with this many warps (smaller CTAs, more of them resident: measured above).
FULL_GPU_WARPS = 2
# A batch that fills the GPU with fewer than FULL_SPLIT_BELOW programs per SM still splits a long cache in two (at
# least LONG_CACHE positions): H100, session 43 (benchmarks.dev.attention_splits, 64 sequences x 8 KV heads = 512
# programs, bool mask, 32k of a 33k static cache): Llama-3-8B heads 3,343 -> 2,844 us, gpt-oss heads
# 1,727 -> 1,448 us (4 or 8 splits: no better than 2).
FULL_SPLIT_BELOW = 4
LONG_CACHE = 8192

# Where the attended positions are not known on the host (a mask: a static cache's valid prefix, left padding) or
# are a narrow band of the cache (a sliding window), the splits take the KV blocks in turn (split j: blocks j,
# j + splits, ...; ``INTERLEAVE``) instead of one contiguous chunk each: with contiguous chunks, the splits past a
# static cache's valid prefix find nothing to read and the rest read it all (half a 64k cache valid: half the
# programs idle). Without a mask or a window the chunks are already even, and stay contiguous.
INTERLEAVE_SPLITS = True

# With the KV length split, plain eager calls merge the splits in the attention launch itself: its last split of each
# row block to arrive (an arrival counter kept between calls, triton_ops_core.scratch) merges the partials as
# _combine_kernel would, so the combine launch goes: the same bits, a launch less of host time a layer in eager decode.
# H100, session 38 (benchmarks.dev.attention_one_launch, layers' calls back to back): 75 -> 48 us of wall time a
# call with Llama-3-8B's heads at 1x1024 (8x8192: 108 -> 100; gpt-oss's at 8x8192: 77 -> 71), while the kernels' GPU
# time grows by 0 to 5 us (8.4 -> 11.1 at 1x1024: the last split's merge is the launch's tail). Splits are taken only
# when B * Hkv programs cannot fill the GPU, that is where eager decode waits on the host, not the GPU. CUDA graphs
# keep the combine launch (torch.compile's: the counters would be a fresh buffer per call and its memset a graph node,
# as fused-moe's routing measured slower; captures by hand: COMBINE_IN_GRAPHS). False: always the combine launch.
# Plans are cached: call clear_caches() after changing it.
COMBINE_IN_LAUNCH = True
# Under a capture by hand the counters are kept on the graph (triton_ops_core.scratch), so a graph could take the
# one launch too; it keeps the combine launch unless this says otherwise (measured: benchmarks.dev.attention_splits
# --combine-in-graphs 0,1). Read at each call.
COMBINE_IN_GRAPHS = False
# With a mask, the first PREFETCH_TILES tiles of each split's K and V rows are asked of L2 before the mask pass that
# trims the split's range (0: none). Plans are cached: call clear_caches() after changing it.
PREFETCH_TILES = 0
# Launched early with PDL, the mask pass (and PREFETCH_TILES' requests) run before the kernel waits for the cache
# write before it (the kernel's EARLY): a mask, no ring, and where the kernel before the attention lets it launch
# while it runs (triton_ops_core.pdl.release_early: one row; else it launches as that kernel exits and nothing would
# overlap). Measured with the release (session 46, H100): a one-row Llama-3-8B step 2-3 % shorter in a CUDA graph.
# Plans are cached: call clear_caches() after changing it.
EARLY_MASK_PASS = True
_COUNTERS = "decode_attention.counters"


class Tiles(NamedTuple):
    """Tile sizes of one call: query rows, KV positions per step, the padded head dim; warps and stages."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def _on_gpu(device: torch.device) -> bool:
    """Whether launches on ``device`` run compiled on a GPU (else the interpreter): one place the planning asks, so
    the GPU's planning rules can be checked on a CPU (the tests replace it)."""
    return device.type == "cuda"


def _tiles(rows: int, head_dim: int, device: torch.device) -> Tiles:
    """The tiles for ``rows`` (= group * Sq) query rows of one KV head (tests force small tiles through this)."""
    block_d = max(16, next_pow2(head_dim))
    if not _on_gpu(device):
        # interpreter: each program instance and each loop step cost host time, not FLOPs: few, large programs
        return Tiles(min(128, max(16, next_pow2(rows))), 64, block_d, 4, 1)
    # tl.dot needs 16 rows; decode (group * Sq <= 16) is one row block. K + V tiles of 16-32 KB per stage.
    block_m = min(64, max(16, next_pow2(rows)))
    block_n = 128 if block_d <= 64 else 64 if block_d <= 128 else 32
    warps = 8 if block_m * block_d > 8192 else 4
    return Tiles(block_m, block_n, block_d, warps, 2)


def _trim_n(t: Tiles, mask_1d: bool = False) -> int:
    # positions per step of the pass that finds a split's attended range from the mask: ~8k mask elements a step
    # ([BLOCK_M, TRIM_N], or [TRIM_N] for a mask row shared by the program's rows), at least one KV block
    return max(t.block_n, 2048 if mask_1d else min(1024, 8192 // t.block_m))


def _splits(programs: int, kv_len: int, block_n: int, device: torch.device, requested: int | None) -> int:
    """How many programs share one KV head's positions (1 when the batch and heads already fill the device)."""
    most = max(1, cdiv(kv_len, block_n))
    if requested is not None:
        return min(requested, most)
    # the interpreter counts as one "SM": a split there only costs host time
    sms = sm_count(device, cpu=1)
    if _on_gpu(device) and programs >= sms:
        return 2 if programs < FULL_SPLIT_BELOW * sms and kv_len >= LONG_CACHE else 1
    want = 1 << (max(1, (PROGRAMS_PER_SM * sms) // max(1, programs)).bit_length() - 1)  # a power of two
    return max(1, min(want, cdiv(kv_len, max(MIN_SPLIT_POSITIONS, block_n)), MAX_SPLITS))


def _interleave(splits: int, attn_mask: torch.Tensor | None, sliding_window: int | None) -> bool:
    """Whether the splits take the KV blocks in turn (``INTERLEAVE_SPLITS``, above)."""
    return INTERLEAVE_SPLITS and splits > 1 and (attn_mask is not None or sliding_window is not None)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting (TF32 only where the user allowed it); halves are exact anyway.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _mask_strides(mask: torch.Tensor | None, shape4: tuple[int, ...] | None,
                  target: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """(batch, head, query, key) strides of the mask broadcast to ``target`` (0 along broadcast dimensions)."""
    if mask is None or shape4 is None:
        return (0, 0, 0, 0)
    strides = (0,) * (4 - mask.dim()) + tuple(mask.stride())
    return tuple(0 if size == 1 and want != 1 else st  # type: ignore[return-value]
                 for size, want, st in zip(shape4, target, strides))


# ----------------------------------------------------------------------------------------------------------------
# Plan and launch
# ----------------------------------------------------------------------------------------------------------------

class _AttentionPlan(NamedTuple):
    """The launches of one call signature (``Plan``: kernel, grid, scalar tail) and the buffers they need."""

    out_shape: tuple[int, int, int, int]
    main: Plan | None  # None: an empty output, nothing to launch
    combine: Plan | None  # None: one split, the main kernel writes the output
    partials: int  # rows of the split partials (bh * splits * rows_pad); 0 without splits
    block_d: int
    finish: Plan | None = None  # splits, plain eager calls: the main kernel merging them itself (COMBINE_IN_LAUNCH)


def _plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
          scale: float | None, sinks: torch.Tensor | None, sliding_window: int | None, is_causal: bool,
          num_splits: int | None, info: AttentionInput, ring: bool = False,
          softcap: float | None = None) -> _AttentionPlan:
    b, hq, hkv, sq, s, d = info.batch, info.q_heads, info.kv_heads, info.q_len, info.kv_len, info.head_dim
    out_shape = (b, sq, hq, d)
    rows = info.group * sq
    if b * hq * sq == 0:
        return _AttentionPlan(out_shape, None, None, 0, 0)
    dev, dtype = q.device, q.dtype
    t = _tiles(rows, d, dev)
    row_blocks = cdiv(rows, t.block_m)
    bh = b * hkv
    splits = _splits(bh * row_blocks, s, t.block_n, dev, num_splits)
    chunk = cdiv(cdiv(max(s, 1), splits), t.block_n) * t.block_n
    splits = max(1, cdiv(s, chunk))
    if splits == 1 and _on_gpu(dev) and t.block_m == 16 and bh * row_blocks >= sm_count(dev, cpu=1):
        t = t._replace(num_warps=FULL_GPU_WARPS)  # programs fill the GPU: smaller CTAs, more of them resident
    rows_pad = row_blocks * t.block_m
    if attn_mask is None:
        mask_kind, mask_floor = K.MASK_NONE, 0.0
    elif attn_mask.dtype == torch.bool:
        mask_kind, mask_floor = K.MASK_BOOL, 0.0
    else:
        mask_kind, mask_floor = K.MASK_ADD, float(torch.finfo(attn_mask.dtype).min)
    sm_b, sm_h, sm_q, sm_n = _mask_strides(attn_mask, info.mask_shape, (b, hq, sq, s))
    # one mask row for all rows of a program: broadcast over the group's heads and over the query rows (decode)
    mask_1d = attn_mask is not None and (sm_h == 0 or info.group == 1) and (sm_q == 0 or sq == 1)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # softcapping: tanh of the logit over the cap (scale / cap folded into the dot's scale), times the cap in base 2
    qk_scale, cap_log2 = (scale * K.LOG2E, 1.0) if softcap is None else (scale / softcap, softcap * K.LOG2E)
    on_cpu = not _on_gpu(dev)
    pdl_on = pdl.enabled(dev)
    main_tail = (
        hkv, info.group, sq, s, chunk, splits, rows_pad,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sm_b, sm_h, sm_q, sm_n,
        qk_scale, cap_log2, mask_floor, sliding_window or 0,
        # MASK_KIND, MASK_1D, HAS_SINKS, CAUSAL, HAS_WINDOW, RING, SOFTCAP, SPLIT, INTERLEAVE
        mask_kind, mask_1d, sinks is not None, is_causal, sliding_window is not None, ring and attn_mask is not None,
        softcap is not None, splits > 1, _interleave(splits, attn_mask, sliding_window),
        # HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, TRIM_N, DOT_PRECISION, UPCAST, P_LOW
        d, t.block_m, t.block_n, t.block_d, _trim_n(t, mask_1d), _dot_precision(dtype),
        on_cpu and dtype != torch.float32, not on_cpu and dtype != torch.float32, pdl_on,
        # PREFETCH_TILES, KV_LINES (an L2 prefetch is PTX: not under the interpreter)
        0 if on_cpu or attn_mask is None else PREFETCH_TILES, next_pow2(cdiv(d * k.element_size(), 128)))
    # RELEASE (triton_ops_core.pdl.release_early): a grid of one wave lets the next kernel launch once it runs
    release = pdl.release_early(pdl_on, bh * splits * row_blocks, dev, b * sq)
    # (the cache write before it released it early: the same rule over its rows, which are these)
    early = (EARLY_MASK_PASS and pdl.release_early(pdl_on, 1, dev, b * sq) and attn_mask is not None and not ring)
    main = Plan(K._attention_kernel, (bh, splits, row_blocks), (*main_tail, False, 16, 2, release, early),
                t.num_warps, num_stages=t.num_stages, **pdl.launch_options(pdl_on))
    combine = finish = None
    if splits > 1:
        block_r = min(128 if on_cpu else 16, max(2, next_pow2(rows)), t.block_m)
        # all splits' partials of a row block at once, up to ~8k fp32 accumulator elements per step
        block_s = max(2, min(next_pow2(splits), 8192 // (block_r * t.block_d) if not on_cpu else 64))
        combine = Plan(K._combine_kernel, (bh, cdiv(rows, block_r)),
                       (hkv, info.group, sq, splits, rows_pad, sinks is not None, d, block_r, t.block_d, block_s,
                        pdl_on, pdl.release_early(pdl_on, bh * cdiv(rows, block_r), dev, b * sq)), 4,
                       **pdl.launch_options(pdl_on))
        if COMBINE_IN_LAUNCH:  # FINISH, MERGE_R, MERGE_S: the combine's tiles
            finish = Plan(K._attention_kernel, (bh, splits, row_blocks),
                          (*main_tail, True, block_r, block_s, release, early), t.num_warps,
                          num_stages=t.num_stages, **pdl.launch_options(pdl_on))
    return _AttentionPlan(out_shape, main, combine, bh * splits * rows_pad if splits > 1 else 0, t.block_d, finish)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # One place that allocates the output and the partials, so tests can hand the kernels poisoned memory.
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(plan: _AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
            sinks: torch.Tensor | None, ring_start: torch.Tensor | None = None) -> torch.Tensor:
    out = _empty(plan.out_shape, q.dtype, q.device)
    if plan.main is None:
        return out
    mask = q if attn_mask is None else attn_mask  # never read without a mask (a constexpr says so)
    ring = q if ring_start is None else ring_start  # read only with a mask and a ring (a constexpr says so)
    sink = q if sinks is None else sinks
    if plan.combine is None:
        plan.main.launch(q, k, v, mask, ring, sink, out, out, out, out, out)
        return out
    part_acc = _empty((plan.partials, plan.block_d), torch.float32, q.device)
    part_m = _empty((plan.partials,), torch.float32, q.device)
    part_l = _empty((plan.partials,), torch.float32, q.device)
    if plan.finish is not None and scratch.kept(q.device) and (COMBINE_IN_GRAPHS or not capturing(q.device)):
        # the row blocks' arrival counters, zero at rest (see COMBINE_IN_LAUNCH)
        cnt = scratch.scratch(_COUNTERS, q.device, plan.finish.grid[0] * plan.finish.grid[2], torch.int32,
                              zeroed=True)
        plan.finish.launch(q, k, v, mask, ring, sink, out, part_acc, part_m, part_l, cnt)
        return out
    plan.main.launch(q, k, v, mask, ring, sink, out, part_acc, part_m, part_l, out)
    plan.combine.launch(part_acc, part_m, part_l, sink, out)
    return out


_PLANS = PlanCache()


def clear_caches() -> None:
    """Forget the cached launch plans (attention and the KV-cache write)."""
    _PLANS.clear()
    clear_kv_cache_plans()


def _on_device(device: torch.device):
    # Triton launches on the current device: make it the tensors' one (multi-GPU processes).
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return None


def _tf32(x: object) -> bool:
    # fp32 dots follow torch's TF32 switch (read only for fp32 inputs: it costs a microsecond)
    return getattr(x, "dtype", None) is torch.float32 and torch.backends.cuda.matmul.allow_tf32


def _impl(q, k, v, attn_mask, scale, sinks, sliding_window, is_causal, num_splits, ring_start=None, softcap=None):
    """The op's implementation: the call's cached plan (validated and built on the first call of its key)."""
    key = call_key("decode_attention", q, k, v, attn_mask, sinks, ring_start, scale, scale.__class__,
                   sliding_window, sliding_window.__class__, is_causal, is_causal.__class__, num_splits,
                   num_splits.__class__, softcap, softcap.__class__, _tf32(q))
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        info = validate_decode_attention(q, k, v, attn_mask, scale, sinks, sliding_window, is_causal, num_splits,
                                         ring_start, softcap)
        plan = _plan(q, k, v, attn_mask, scale, sinks, sliding_window, is_causal, num_splits, info,
                     ring_start is not None, softcap)
        if key is not None:
            try:
                _PLANS.put(key, plan)
            except TypeError:  # an unhashable option: that call is planned anew each time
                pass
    ctx = _on_device(q.device)
    if ctx is not None:
        with ctx:
            return _launch(plan, q, k, v, attn_mask, sinks, ring_start)
    return _launch(plan, q, k, v, attn_mask, sinks, ring_start)


# ----------------------------------------------------------------------------------------------------------------
# Registration: triton_ops::decode_attention
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op(op_name("decode_attention"), mutates_args=())
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                         scale: float | None, sinks: torch.Tensor | None, sliding_window: int | None,
                         is_causal: bool, num_splits: int | None,
                         ring_start: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    with scratch.per_call():  # no buffer outlives the call (torch.compile's CUDA graphs; see triton_ops_core.scratch)
        return _impl(q, k, v, attn_mask, scale, sinks, sliding_window, is_causal, num_splits, ring_start, softcap)


@_decode_attention_op.register_fake
def _(q, k, v, attn_mask, scale, sinks, sliding_window, is_causal, num_splits, ring_start=None, softcap=None):
    b, hq, sq, d = q.shape
    return q.new_empty((b, sq, hq, d))


def _no_context(ctx, inputs, output) -> None:
    pass


def _backward(ctx, grad):
    raise DecodeAttentionBackwardError(
        "triton_ops::decode_attention has no backward (decode attention is forward-only, for inference): run the "
        "forward under torch.no_grad() / torch.inference_mode(), or use torch's scaled_dot_product_attention for "
        "training")


_decode_attention_op.register_autograd(_backward, setup_context=_no_context)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    is_causal: bool = False,
    num_splits: int | None = None,
    ring_start: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention of a few query positions over a KV cache, grouped-query heads read once.

    ``out[b, i, h] = sum_j softmax_j(q[b, h, i] . k[b, h // G, j] * scale + mask) v[b, h // G, j]`` with
    ``G = Hq / Hkv``: one program handles one KV head for all its ``G`` query heads and all ``Sq`` query rows, so
    each K/V element is read from memory once (no ``repeat_kv``); when ``B * Hkv`` programs cannot fill the GPU,
    the KV length is split over several (flash-decoding) and a second kernel merges their partial softmaxes in a
    fixed order (deterministic). Exact softmax, fp32 accumulation.

    Args:
        q: ``[B, Hq, Sq, D]``, float16, bfloat16 or float32, any strides with a unit last one (transformers'
            ``query.transpose(1, 2)`` as it is). ``Sq`` of 1 to 16 is what it is made for (decode, speculative
            decoding); any ``Sq`` is computed correctly.
        k, v: ``[B, Hkv, S, D]`` in ``q``'s dtype, any strides with a unit last one (a static cache's tensors, or
            slices of a bigger cache), ``Hq % Hkv == 0`` (MHA, GQA, MQA). ``1 <= D <= 256`` (64, 80, 96, 128, 256
            and others: the tile is padded to a power of two and masked).
        attn_mask: None, a bool mask broadcastable to ``[B, Hq, Sq, S]`` (True attends; transformers passes
            ``[B, 1, Sq, S]``), or an additive float mask (any float dtype) of such a shape, added to the scaled
            logits. An additive entry of -inf or at most the mask dtype's lowest finite value (transformers' fill
            value) masks its position. Blocks of positions that every query row of a KV head has masked skip their
            K/V loads: a static cache's unused tail costs only the mask read, and whatever memory lies there
            (even NaN) is never read.
        scale: the logits' scale, default ``1 / sqrt(D)``.
        sinks: optional ``[Hq]`` attention-sink logits (gpt-oss's ``sinks``, transformers' ``s_aux``), any float
            dtype: each joins its head's softmax denominator only.
        sliding_window: optional ``W``: query row ``i`` sits at position ``p = S - Sq + i`` (the queries are the
            cache's last ``Sq`` entries) and attends only positions ``j > p - W`` (the ``W`` most recent, itself
            included, as transformers' sliding-window layers); older positions are not loaded. With a static
            cache, whose valid length is not ``S``, express the window in ``attn_mask`` instead.
        is_causal: mask positions ``j > p`` (same alignment: the queries are the last ``Sq`` positions; this is
            torch's ``is_causal`` when ``Sq == S``); positions past the last query are not loaded.
        num_splits: how many programs share one KV head's positions, at most (default: chosen from the SM count,
            the batch and the heads; 1 once ``B * Hkv`` programs fill the GPU).
        ring_start: optional int32/int64 tensor of one element on q's device, read on the device (a CUDA graph
            replays it): ``k`` and ``v`` are a ring buffer (a full sliding window written in place by
            :func:`~decode_attention.update_kv_cache_` with ``ring=True``, whose ``length`` counter this is) with
            its oldest entry at slot ``ring_start % S``, while ``attn_mask``'s last dimension is laid out oldest
            first (as transformers lays out a sliding window): slot ``j`` takes mask column
            ``(j - ring_start) % S``. Attention does not depend on the order of its positions, so that is all it
            changes. Not with ``is_causal`` or ``sliding_window`` (they count positions in slot order).
        softcap: optional ``c > 0``, logit softcapping (Gemma 2's ``attn_logit_softcapping``): each scaled logit
            ``x`` becomes ``c * tanh(x / c)`` before the mask is added, as transformers' eager attention computes
            it.

    Returns:
        ``[B, Sq, Hq, D]`` contiguous in ``q``'s dtype: the layout transformers' attention functions return
        (``reshape(B, Sq, Hq * D)`` gives the ``o_proj`` input). A query row with no attended position gives
        zeros, as ``F.scaled_dot_product_attention`` does since torch 2.5 (before, it gave NaN; transformers'
        eager attention, whose additive mask holds the dtype's lowest value, averages V over such a row). NaN in
        an attended input gives NaN.

    Registered as ``torch.ops.triton_ops.decode_attention``; no gradient (``DecodeAttentionBackwardError`` on
    backward).

    Raises:
        ShapeMismatchError, UnsupportedDtypeError, DeviceMismatchError, UnsupportedDeviceError, LayoutError,
        InvalidArgumentError: naming the offending argument.
    """
    if direct_call_ok(q, k, v, attn_mask, sinks, ring_start):
        return _impl(q, k, v, attn_mask, scale, sinks, sliding_window, is_causal, num_splits, ring_start, softcap)
    return _decode_attention_op(q, k, v, attn_mask, scale, sinks, sliding_window, is_causal, num_splits, ring_start,
                                softcap)


__all__ = ["DecodeAttentionBackwardError", "Tiles", "clear_caches", "decode_attention"]
