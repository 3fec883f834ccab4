"""Triton kernels of the fused gated MLP: ``act(x @ Wg^T + bg) * (x @ Wu^T + bu)`` in one pass.

Every program owns a ``[BLOCK_M, BLOCK_N]`` tile of the output and computes the same tile of BOTH projections,
in two fp32 accumulators, from one read of the ``x`` tile per K step. The activation and the product happen in
the epilogue, so the two ``[tokens, intermediate]`` projections never reach device memory.

Two kernels, chosen on the host by the number of tokens:

- ``_gated_mlp_decode_kernel`` (few tokens): the weights are the only large operand, so the job is streaming
  them at copy bandwidth. Narrow ``BLOCK_N`` gives many programs; optional split-K gives more when the
  intermediate size alone cannot fill the GPU. Split-K partial sums meet in an fp32 workspace through atomics and
  the last program of a tile (counted by a per-tile semaphore) applies the activation and resets the workspace,
  so a call needs one launch and the workspace stays zeroed between calls.
- ``_gated_mlp_prefill_kernel`` (many tokens): a classic tiled GEMM with grouped tile order (programs that run
  together share weight tiles in L2) and, on Hopper, tensor descriptors (TMA) for the operand loads.

Both run unchanged under Triton's CPU interpreter; bf16 arithmetic is unreliable there, so everything after the
dot happens in fp32.

FP8 weights (weight-only, W8A16; constexpr ``W_SCALING``): both kernels load E4M3/E5M2 weight tiles (half the bytes
of bf16: the point of the decode kernel) and convert them in registers to the activations' dtype. That conversion
is exact (every E4M3 and E5M2 value is a bf16 and an fp16 value), so the tensor cores see the FP8 values
themselves; the scales are applied in fp32 to the accumulators, never to the weights: per output channel
(``W_SCALING == 1``) once in the epilogue, after all K (and after the split-K partial sums met) and before the bias
and the activation; per 128x128 block (``W_SCALING == 2``) or per row and 128-wide K group (``W_SCALING == 3``) to
each K step's partial product, inside the K loop.
Prefill therefore runs bf16 (fp16) tensor-core dots on the FP8 values, not FP8 dots (FP8 x FP8 prefill would also
quantize the activations: a later step).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton_ops_core.fp8_cast import rows_to_f16
from triton_ops_core.gated_activation import gate_times_up  # ACTIVATION: its ACTIVATION_CODES
from triton_ops_core.pdl import pdl_launch_dependents, pdl_streamed, pdl_wait, prefetch_rows
from triton_ops_core.rms_prologue import rstd_from_squares, weighed

# Weight scaling codes (constexpr W_SCALING): plain weights, FP8 with one scale per output channel, FP8 with one
# scale per 128 x 128 block (rows x K) of the weight (the 128 below is validation.SCALE_BLOCK).
SCALE_NONE = 0
SCALE_CHANNEL = 1
SCALE_BLOCK = 2
# FP8 with one scale per row and 128-wide K group of the weight ([rows, ceil(K / 128)]).
SCALE_GROUP = 3


@triton.jit
def _block_scales(s_ptr, offs_n, N, stride_s, srow_mul, srow_off, k, ROWS_PER_SCALE: tl.constexpr):
    """``[BLOCK_N]`` scales of rows ``offs_n`` for the 128-wide K block holding column ``k`` (``W_SCALING`` 2:
    ``ROWS_PER_SCALE`` 128, one scale per 128 x 128 block; 3: 1, one per row and 128-wide K group).

    Half-row ``n`` lies in scale row ``(n * srow_mul + srow_off) // ROWS_PER_SCALE``: ``(1, 0)`` for a weight of its
    own, and for the halves of a packed weight quantized as one tensor ``(1, I)`` (concatenated: up rows start at
    ``I``) or ``(2, 0|1)`` (interleaved: half-row ``n`` is packed row ``2n`` or ``2n + 1``)."""
    rows = (offs_n * srow_mul + srow_off) // ROWS_PER_SCALE
    return tl.load(s_ptr + rows * stride_s + k // 128, mask=offs_n < N, other=0.0)


@triton.jit
def _f16_dot2(x, wg, wu, acc_g, acc_u, sg, su, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
              W_SCALING: tl.constexpr):
    """``_dot2`` on fp16 tensor cores for FP8 weights and bf16 activations (config ``F16_DOT``).

    E4M3 converts to fp16 in one packed instruction per two weights, and the tensor cores take it as it comes; to
    bf16 it takes a second conversion per weight (sm_90 PTX of a 16 x 32 x 256 decode tile: 274 instructions a K
    step against 722). The activations go to fp16 instead, exactly: each row of the step's tile is scaled by a power
    of two that puts its largest magnitude in [2^14, 2^15) (inside fp16's range, so every bf16 value there is an
    fp16 value; only values below about 2^-29 of the row's largest round), and the step's products are scaled back
    in fp32. A row holding Inf or NaN keeps it. The weights' scales apply as in ``_dot2``."""
    x16, back = rows_to_f16(x)
    if UPCAST:  # interpreter: fp32 operands holding the same values (its 16-bit dot is wrong; FP8 straight to fp32)
        x16 = x16.to(tl.float32)
        wg16 = wg.to(tl.float32)
        wu16 = wu.to(tl.float32)
    else:
        wg16 = wg.to(tl.float16)  # E4M3 / E5M2 -> fp16: exact, Inf and NaN kept
        wu16 = wu.to(tl.float16)
    pg = tl.dot(x16, tl.trans(wg16), input_precision=DOT_PRECISION) * back[:, None]
    pu = tl.dot(x16, tl.trans(wu16), input_precision=DOT_PRECISION) * back[:, None]
    if W_SCALING >= 2:
        pg = pg * sg[None, :]
        pu = pu * su[None, :]
    return acc_g + pg, acc_u + pu


@triton.jit
def _dot2(x, wg, wu, acc_g, acc_u, sg, su, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
          W_SCALING: tl.constexpr, F16_DOT: tl.constexpr = False):
    """Both projections of one K step. ``UPCAST`` (interpreter only): its bf16/fp16 ``tl.dot`` is wrong, so the
    operands go to fp32 first; on a GPU the tensor cores take the 16-bit operands directly.

    FP8 weight tiles are converted to the activations' dtype (exact). With block scales (``W_SCALING == 2``) each K
    step's partial product is scaled by its rows' block scales ``sg`` / ``su`` (``[BLOCK_N]``, fp32) before it joins
    the accumulator; otherwise ``sg`` / ``su`` are unused. ``F16_DOT`` (FP8 weights, bf16 activations):
    ``_f16_dot2`` instead."""
    if F16_DOT:
        return _f16_dot2(x, wg, wu, acc_g, acc_u, sg, su, DOT_PRECISION, UPCAST, W_SCALING)
    if UPCAST:
        x = x.to(tl.float32)
        wg = wg.to(tl.float32)
        wu = wu.to(tl.float32)
    if wg.dtype == tl.float8e5 and x.dtype == tl.bfloat16:
        # Triton's direct E5M2 -> bf16 conversion rebiases the exponent with integer arithmetic, which turns the
        # Inf and NaN codes into finite numbers (seen on the H200); E5M2 -> fp16 is a byte shift that keeps them,
        # and fp16 -> bf16 is a hardware conversion. Both steps are exact.
        wg = wg.to(tl.float16)
        wu = wu.to(tl.float16)
    wg = wg.to(x.dtype)  # FP8 -> x's dtype (a no-op for 16/32-bit weights, which share x's dtype)
    wu = wu.to(x.dtype)
    if W_SCALING >= 2:
        acc_g += tl.dot(x, tl.trans(wg), input_precision=DOT_PRECISION) * sg[None, :]
        acc_u += tl.dot(x, tl.trans(wu), input_precision=DOT_PRECISION) * su[None, :]
    else:
        acc_g = tl.dot(x, tl.trans(wg), acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(x, tl.trans(wu), acc_u, input_precision=DOT_PRECISION)
    return acc_g, acc_u


@triton.jit
def _k_step(x, wg, wu, acc_g, acc_u, k, offs_n, N, sg_ptr, su_ptr, stride_sg, stride_su, srow_mul, srow_off_g,
            srow_off_u, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, W_SCALING: tl.constexpr,
            F16_DOT: tl.constexpr = False):
    """One K step at column ``k``: the block scales of the step when there are any, then both dots."""
    if W_SCALING == 2:
        # K steps never straddle a 128-wide scale block: the host keeps BLOCK_K a divisor of 128 and every
        # step's start a multiple of BLOCK_K.
        sg = _block_scales(sg_ptr, offs_n, N, stride_sg, srow_mul, srow_off_g, k, 128)
        su = _block_scales(su_ptr, offs_n, N, stride_su, srow_mul, srow_off_u, k, 128)
    elif W_SCALING == 3:  # group scales: the same K steps, a scale row per weight row
        sg = _block_scales(sg_ptr, offs_n, N, stride_sg, srow_mul, srow_off_g, k, 1)
        su = _block_scales(su_ptr, offs_n, N, stride_su, srow_mul, srow_off_u, k, 1)
    else:
        sg = 1.0
        su = 1.0
    return _dot2(x, wg, wu, acc_g, acc_u, sg, su, DOT_PRECISION, UPCAST, W_SCALING, F16_DOT)


@triton.jit
def _load_k_step(x_ptrs, wg_ptrs, wu_ptrs, k, offs_k, k_end, mask_m, mask_n, EVEN_K: tl.constexpr):
    """The x, gate and up tiles of the K step at ``k`` (plain loads; no K mask when ``EVEN_K``)."""
    if EVEN_K:
        x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        wg = tl.load(wg_ptrs, mask=mask_n[:, None], other=0.0)
        wu = tl.load(wu_ptrs, mask=mask_n[:, None], other=0.0)
    else:
        mask_k = (k + offs_k) < k_end
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        wu = tl.load(wu_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    return x, wg, wu


@triton.jit
def _pointer_k_loop(x_ptr, wg_ptr, wu_ptr, offs_m, offs_n, M, N, k_start, k_end, stride_xm, stride_wg, stride_wu,
                    acc_g, acc_u, sg_ptr, su_ptr, stride_sg, stride_su, srow_mul, srow_off_g, srow_off_u,
                    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, W_SCALING: tl.constexpr,
                    F16_DOT: tl.constexpr = False, nw_ptr=None, K=None, NORM: tl.constexpr = False):
    """Both projections of rows ``offs_m`` and columns ``offs_n`` over ``k_start..k_end``, with plain (wide,
    K-contiguous) loads, ``NUM_STAGES`` deep. ``EVEN_K``: the range is whole BLOCK_K tiles, no K mask. ``NORM``:
    each x tile times the norm weight at ``nw_ptr`` (rounded to x's dtype for the dot) and its squares summed
    (``rms_prologue.weighed``: the deferred norm). Returns both sums and the rows' sums of squares (``[BLOCK_M]``,
    zero without ``NORM``)."""
    offs_k = tl.arange(0, BLOCK_K)
    ss = tl.zeros((offs_m.shape[0], BLOCK_K), dtype=tl.float32)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (k_start + offs_k)[None, :]
    wg_ptrs = wg_ptr + offs_n.to(tl.int64)[:, None] * stride_wg + (k_start + offs_k)[None, :]
    wu_ptrs = wu_ptr + offs_n.to(tl.int64)[:, None] * stride_wu + (k_start + offs_k)[None, :]
    for k in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        x, wg, wu = _load_k_step(x_ptrs, wg_ptrs, wu_ptrs, k, offs_k, k_end, mask_m, mask_n, EVEN_K)
        if NORM:
            xw, ss = weighed(x, ss, nw_ptr, (k + offs_k)[None, :], K, EVEN_K)
            x = xw.to(x.dtype)
        acc_g, acc_u = _k_step(x, wg, wu, acc_g, acc_u, k, offs_n, N, sg_ptr, su_ptr, stride_sg, stride_su,
                               srow_mul, srow_off_g, srow_off_u, DOT_PRECISION, UPCAST, W_SCALING, F16_DOT)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    return acc_g, acc_u, tl.sum(ss, axis=1)


@triton.jit
def _fp8_to_f32(w, INTERPRET: tl.constexpr):
    """A weight tile in fp32. On a GPU E5M2 goes through fp16 (a byte shift that keeps Inf and NaN; see
    ``_dot2``); the interpreter converts directly (its own E5M2 -> fp16 misreads some codes)."""
    if w.dtype == tl.float8e5 and not INTERPRET:
        w = w.to(tl.float16)
    return w.to(tl.float32)


# The group-scaled CUDA-core loop's view of a K tile: ``k = g * SPAN + e * LANES + c`` for the tile's group ``g``
# (``SPAN``: 128, the group width, or the whole tile where it is narrower), row ``e`` of the group and lane ``c``
# (``LANES``: GROUP_LANES, or the span where it is narrower). Lanes run across a warp's threads; a group's rows stay in
# each thread's registers, so their products are summed there before the group's scale multiplies the sum.
GROUP_LANES = tl.constexpr(32)


@triton.jit
def _group_k_view(BLOCK_K: tl.constexpr):
    """The K offsets of a tile as ``[G, E, LANES]`` (group, row, lane); see ``GROUP_LANES``."""
    SPAN: tl.constexpr = 128 if BLOCK_K >= 128 else BLOCK_K
    LANES: tl.constexpr = GROUP_LANES if SPAN >= GROUP_LANES else SPAN
    return (tl.arange(0, BLOCK_K // SPAN)[:, None, None] * SPAN + tl.arange(0, SPAN // LANES)[None, :, None] * LANES
            + tl.arange(0, LANES)[None, None, :])


@triton.jit
def _group_partial(xf, w, s_ptr, rows, mask_n, stride_s, k, k_end, BLOCK_K: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """One weight's K step at column ``k`` with group scales: ``xf [BLOCK_M, G, E, 1, LANES]`` (fp32) times
    ``w [G, E, BLOCK_N, LANES]`` (FP8), the products summed over each group's rows in registers, then times the
    ``[G, BLOCK_N]`` group scales of weight rows ``rows``. Groups starting past ``k_end`` get a zero scale: their
    weights were masked to zero, and a scale read past the end of a row could be anything (NaN included)."""
    SPAN: tl.constexpr = 128 if BLOCK_K >= 128 else BLOCK_K
    part = tl.sum(xf * _fp8_to_f32(w, INTERPRET)[None, :, :, :, :], axis=2)  # [BLOCK_M, G, BLOCK_N, LANES]
    start = k + tl.arange(0, BLOCK_K // SPAN) * SPAN  # each group's first column in this tile
    s = tl.load(s_ptr + rows[None, :] * stride_s + (start // 128)[:, None],
                mask=mask_n[None, :] & (start < k_end)[:, None], other=0.0)
    return part * s[None, :, :, None]


@triton.jit
def _fma_group_row_loop(x_ptr, wg_ptr, wu_ptr, offs_m, offs_n, N, k_start, k_end, stride_xm, stride_wg, stride_wu,
                        acc_g, acc_u, sg_ptr, su_ptr, stride_sg, stride_su, srow_mul, srow_off_g, srow_off_u,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                        NUM_STAGES: tl.constexpr, INTERPRET: tl.constexpr, nw_ptr, K, NORM: tl.constexpr,
                        ROWS_PER_SCALE: tl.constexpr = 1):
    """``_fma_group_k_loop`` for one row: the weight tiles as ``[BLOCK_N, G, SPAN]`` (``SPAN`` = 128 or a narrower
    tile), multiplied in the layout they are loaded in (a thread holds contiguous K bytes of a row, read from shared
    memory a vector at a time); each thread's products of a ``CHUNK`` (16 K positions, inside one group) are summed in
    registers and that sum is multiplied by the group's scale (one multiply per 16 weight elements), into fp32
    registers ``[BLOCK_N, G, SPAN / CHUNK]`` summed once after the loop."""
    SPAN: tl.constexpr = 128 if BLOCK_K >= 128 else BLOCK_K
    G: tl.constexpr = BLOCK_K // SPAN
    kk = tl.arange(0, G)[:, None] * SPAN + tl.arange(0, SPAN)[None, :]  # [G, SPAN]
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None, None] * stride_xm + (k_start + kk)[None, :, :]  # [1, G, SPAN]
    n64 = offs_n.to(tl.int64)[:, None, None]
    wg_ptrs = wg_ptr + n64 * stride_wg + (k_start + kk)[None, :, :]  # [BLOCK_N, G, SPAN]
    wu_ptrs = wu_ptr + n64 * stride_wu + (k_start + kk)[None, :, :]
    rows_g = (offs_n * srow_mul + srow_off_g) // ROWS_PER_SCALE
    rows_u = (offs_n * srow_mul + srow_off_u) // ROWS_PER_SCALE
    mask_w = mask_n[:, None, None]
    CHUNK: tl.constexpr = 16 if SPAN >= 16 else SPAN
    acc3_g = tl.zeros((BLOCK_N, G, SPAN // CHUNK), dtype=tl.float32)
    acc3_u = tl.zeros((BLOCK_N, G, SPAN // CHUNK), dtype=tl.float32)
    ss = tl.zeros((1, G, SPAN), dtype=tl.float32)
    for k in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            x = tl.load(x_ptrs)
            wg = tl.load(wg_ptrs, mask=mask_w, other=0.0)
            wu = tl.load(wu_ptrs, mask=mask_w, other=0.0)
        else:
            in_k = ((k + kk) < k_end)[None, :, :]
            x = tl.load(x_ptrs, mask=in_k, other=0.0)
            wg = tl.load(wg_ptrs, mask=mask_w & in_k, other=0.0)
            wu = tl.load(wu_ptrs, mask=mask_w & in_k, other=0.0)
        start = k + tl.arange(0, G) * SPAN  # each group's first column in this tile
        live = mask_n[:, None] & (start < k_end)[None, :]
        sg = tl.load(sg_ptr + rows_g[:, None] * stride_sg + (start // 128)[None, :], mask=live, other=0.0)
        su = tl.load(su_ptr + rows_u[:, None] * stride_su + (start // 128)[None, :], mask=live, other=0.0)
        xf = x.to(tl.float32)
        if NORM:
            xf, ss = weighed(x, ss, nw_ptr, (k + kk)[None, :, :], K, EVEN_K)
        pg = tl.sum(tl.reshape(xf * _fp8_to_f32(wg, INTERPRET), (BLOCK_N, G, SPAN // CHUNK, CHUNK)), axis=3)
        pu = tl.sum(tl.reshape(xf * _fp8_to_f32(wu, INTERPRET), (BLOCK_N, G, SPAN // CHUNK, CHUNK)), axis=3)
        acc3_g += pg * sg[:, :, None]
        acc3_u += pu * su[:, :, None]
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    return (acc_g + tl.sum(tl.sum(acc3_g, axis=2), axis=1)[None, :],
            acc_u + tl.sum(tl.sum(acc3_u, axis=2), axis=1)[None, :], tl.sum(tl.sum(ss, axis=2), axis=1))


@triton.jit
def _fma_group_k_loop(x_ptr, wg_ptr, wu_ptr, offs_m, offs_n, M, N, k_start, k_end, stride_xm, stride_wg, stride_wu,
                      acc_g, acc_u, sg_ptr, su_ptr, stride_sg, stride_su, srow_mul, srow_off_g, srow_off_u,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                      NUM_STAGES: tl.constexpr, INTERPRET: tl.constexpr, nw_ptr, K, NORM: tl.constexpr,
                      ROWS_PER_SCALE: tl.constexpr = 1):
    """``_fma_k_loop`` with group scales (``W_SCALING`` 3; ``BLOCK_K`` a power of two, at least 16): the K tile is
    viewed as ``[group, row, lane]`` (``_group_k_view``), each thread sums the products of its rows of a group and
    only that sum is scaled: one scale product per ``128 / GROUP_LANES`` weight elements instead of one per element,
    and a thread needs only the scales of its own rows and groups. 128x128 block scales (``W_SCALING`` 2) are group
    scales shared by 128 rows: ``ROWS_PER_SCALE`` 128 maps a weight row to its scale row (as ``_block_scales``)."""
    SPAN: tl.constexpr = 128 if BLOCK_K >= 128 else BLOCK_K
    LANES: tl.constexpr = GROUP_LANES if SPAN >= GROUP_LANES else SPAN
    if BLOCK_M == 1:
        return _fma_group_row_loop(x_ptr, wg_ptr, wu_ptr, offs_m, offs_n, N, k_start, k_end, stride_xm, stride_wg,
                                   stride_wu, acc_g, acc_u, sg_ptr, su_ptr, stride_sg, stride_su, srow_mul,
                                   srow_off_g, srow_off_u, BLOCK_N, BLOCK_K, EVEN_K, NUM_STAGES, INTERPRET, nw_ptr,
                                   K, NORM, ROWS_PER_SCALE)
    kk = _group_k_view(BLOCK_K)  # [G, E, LANES]
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None, None, None] * stride_xm + (k_start + kk)[None, :, :, :]
    n64 = offs_n.to(tl.int64)[None, None, :, None]
    wg_ptrs = wg_ptr + n64 * stride_wg + (k_start + kk)[:, :, None, :]  # [G, E, BLOCK_N, LANES]
    wu_ptrs = wu_ptr + n64 * stride_wu + (k_start + kk)[:, :, None, :]
    rows_g = (offs_n * srow_mul + srow_off_g) // ROWS_PER_SCALE
    rows_u = (offs_n * srow_mul + srow_off_u) // ROWS_PER_SCALE
    mask_x = mask_m[:, None, None, None]
    mask_w = mask_n[None, None, :, None]
    acc4_g = tl.zeros((BLOCK_M, BLOCK_K // SPAN, BLOCK_N, LANES), dtype=tl.float32)
    acc4_u = tl.zeros((BLOCK_M, BLOCK_K // SPAN, BLOCK_N, LANES), dtype=tl.float32)
    ss = tl.zeros((BLOCK_M, BLOCK_K // SPAN, SPAN // LANES, LANES), dtype=tl.float32)
    for k in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_x, other=0.0)
            wg = tl.load(wg_ptrs, mask=mask_w, other=0.0)
            wu = tl.load(wu_ptrs, mask=mask_w, other=0.0)
        else:
            in_k = (k + kk) < k_end
            x = tl.load(x_ptrs, mask=mask_x & in_k[None, :, :, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=mask_w & in_k[:, :, None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=mask_w & in_k[:, :, None, :], other=0.0)
        xf = x.to(tl.float32)
        if NORM:
            xf, ss = weighed(x, ss, nw_ptr, (k + kk)[None, :, :, :], K, EVEN_K)
        xf = xf[:, :, :, None, :]
        acc4_g += _group_partial(xf, wg, sg_ptr, rows_g, mask_n, stride_sg, k, k_end, BLOCK_K, INTERPRET)
        acc4_u += _group_partial(xf, wu, su_ptr, rows_u, mask_n, stride_su, k, k_end, BLOCK_K, INTERPRET)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    return (acc_g + tl.sum(tl.sum(acc4_g, axis=3), axis=1), acc_u + tl.sum(tl.sum(acc4_u, axis=3), axis=1),
            tl.sum(tl.sum(tl.sum(ss, axis=3), axis=2), axis=1))


@triton.jit
def _fma_k_loop(x_ptr, wg_ptr, wu_ptr, offs_m, offs_n, M, N, k_start, k_end, stride_xm, stride_wg, stride_wu,
                acc_g, acc_u, sg_ptr, su_ptr, stride_sg, stride_su, srow_mul, srow_off_g, srow_off_u,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr, INTERPRET: tl.constexpr, W_SCALING: tl.constexpr,
                nw_ptr, K, NORM: tl.constexpr):
    """``_pointer_k_loop`` on the CUDA cores (config ``FMA``): products in fp32 registers, ``[BLOCK_M, BLOCK_N,
    BLOCK_K]`` per projection, summed over K once at the end. For one or a few rows with FP8 weights: a tensor-core
    dot needs 16 rows (15 of them padding at M = 1) and its FP8 -> bf16 conversion in registers, and then streams
    the FP8 weights at ~60 % of copy bandwidth on the H200; plain loads and FMAs of wide K tiles keep more bytes in
    flight. One row accumulates in ``[BLOCK_N, BLOCK_K]``, the weight tile's own shape: the products stay in the
    layout the tile is loaded in (16 contiguous K bytes a thread, one vector read from shared memory), where the
    3-D tile's default layout re-read the weights byte by byte. Group and 128x128 block scales (``W_SCALING`` 3, 2)
    take ``_fma_group_k_loop``, which scales each group's partial sums."""
    if W_SCALING >= 2:
        return _fma_group_k_loop(x_ptr, wg_ptr, wu_ptr, offs_m, offs_n, M, N, k_start, k_end, stride_xm, stride_wg,
                                 stride_wu, acc_g, acc_u, sg_ptr, su_ptr, stride_sg, stride_su, srow_mul, srow_off_g,
                                 srow_off_u, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, NUM_STAGES, INTERPRET, nw_ptr, K,
                                 NORM, 128 if W_SCALING == 2 else 1)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (k_start + offs_k)[None, :]
    wg_ptrs = wg_ptr + offs_n.to(tl.int64)[:, None] * stride_wg + (k_start + offs_k)[None, :]
    wu_ptrs = wu_ptr + offs_n.to(tl.int64)[:, None] * stride_wu + (k_start + offs_k)[None, :]
    ss = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if BLOCK_M == 1:
        acc2_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc2_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
            x, wg, wu = _load_k_step(x_ptrs, wg_ptrs, wu_ptrs, k, offs_k, k_end, mask_m, mask_n, EVEN_K)
            xf = x.to(tl.float32)
            if NORM:
                xf, ss = weighed(x, ss, nw_ptr, (k + offs_k)[None, :], K, EVEN_K)
            acc2_g += xf * _fp8_to_f32(wg, INTERPRET)
            acc2_u += xf * _fp8_to_f32(wu, INTERPRET)
            x_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K
            wu_ptrs += BLOCK_K
        return acc_g + tl.sum(acc2_g, axis=1)[None, :], acc_u + tl.sum(acc2_u, axis=1)[None, :], tl.sum(ss, axis=1)
    acc3_g = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc3_u = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        x, wg, wu = _load_k_step(x_ptrs, wg_ptrs, wu_ptrs, k, offs_k, k_end, mask_m, mask_n, EVEN_K)
        xf = x.to(tl.float32)
        if NORM:
            xf, ss = weighed(x, ss, nw_ptr, (k + offs_k)[None, :], K, EVEN_K)
        xf = xf[:, None, :]
        wgf = _fp8_to_f32(wg, INTERPRET)
        wuf = _fp8_to_f32(wu, INTERPRET)
        acc3_g += xf * wgf[None, :, :]
        acc3_u += xf * wuf[None, :, :]
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    return acc_g + tl.sum(acc3_g, axis=2), acc_u + tl.sum(acc3_u, axis=2), tl.sum(ss, axis=1)


@triton.jit
def _epilogue(acc_g, acc_u, offs_m, offs_n, M, N, bg_ptr, bu_ptr, stride_bg, stride_bu, sg_ptr, su_ptr, stride_sg,
              stride_su, out_ptr, stride_om, alpha, limit, ACTIVATION: tl.constexpr, HAS_GATE_BIAS: tl.constexpr,
              HAS_UP_BIAS: tl.constexpr, W_SCALING: tl.constexpr):
    mask_n = offs_n < N
    if W_SCALING == 1:  # per output channel: the whole K sum at once, before the bias and the activation
        acc_g *= tl.load(sg_ptr + offs_n * stride_sg, mask=mask_n, other=0.0)[None, :]
        acc_u *= tl.load(su_ptr + offs_n * stride_su, mask=mask_n, other=0.0)[None, :]
    if HAS_GATE_BIAS:
        acc_g += tl.load(bg_ptr + offs_n * stride_bg, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_UP_BIAS:
        acc_u += tl.load(bu_ptr + offs_n * stride_bu, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = gate_times_up(acc_g, acc_u, alpha, limit, ACTIVATION)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & mask_n[None, :])


@triton.jit(do_not_specialize=["M"])
def _gated_mlp_decode_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, sg_ptr, su_ptr, out_ptr, ws_ptr, lock_ptr, nw_ptr,
    M, N, K,
    stride_xm, stride_wg, stride_wu, stride_om, stride_bg, stride_bu,
    stride_sg, stride_su, srow_mul, srow_off_g, srow_off_u,
    alpha, limit, norm_eps,
    ACTIVATION: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, W_SCALING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, INTERPRET: tl.constexpr, USE_FMA: tl.constexpr, F16_DOT: tl.constexpr,
    NORM: tl.constexpr, PDL: tl.constexpr = False, PREFETCH_LINES: tl.constexpr = 0,
):
    """Few tokens: grid (N tiles, SPLIT_K, M tiles); each program streams [BLOCK_N, K / SPLIT_K] of both weights.
    ``USE_FMA``: CUDA-core products (``_fma_k_loop``) instead of tensor-core dots; any ``BLOCK_M``, 1 included.
    ``NORM``: x is RMS-normalized with the weight at ``nw_ptr`` and ``norm_eps``, deferred: each loaded x tile times
    the norm weight feeds the products (fp32; rounded to x's dtype for a dot) and its squares are summed; where the
    row's K slices meet (this program without split K, else the tile's last, from ``[column blocks, M]`` sums after
    the partials) both sums are multiplied by the row's ``rstd`` before the scales, the bias and the activation
    (``rstd`` is a row factor: ``(x * rstd * w) @ W^T == rstd * ((x * w) @ W^T)``). Nothing is read before the
    weight streaming starts (session 24's prologue summed the whole row first in every program, and was slower than
    the norm's own launch); the result differs from the norm's own launch first only by the normalized row's
    rounding to x's dtype, skipped here. ``PDL``
    (``triton_ops_core.pdl``): launched early, the program asks L2 for the first ``PREFETCH_LINES`` lines of its
    rows of both weights, then waits for the previous kernel before it reads x or writes anything."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    # This split's K range, in whole BLOCK_K tiles.
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_start = pid_k * tiles_per_split * BLOCK_K
    k_end = tl.minimum(K, k_start + tiles_per_split * BLOCK_K)
    pdl_launch_dependents(PDL)
    if PDL and PREFETCH_LINES > 0:  # the weights: no kernel of the step writes them
        prefetch_rows(wg_ptr, offs_n, N, stride_wg, k_start, k_end, PREFETCH_LINES)
        prefetch_rows(wu_ptr, offs_n, N, stride_wu, k_start, k_end, PREFETCH_LINES)
    pdl_wait(PDL)

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        # Opt-in (config USE_TMA): the copy engine streams weight tiles into a NUM_STAGES-deep shared-memory ring;
        # rows past N and columns past K read as zero, so no masks. The default plain loads below streamed 2-15 %
        # faster on the H100 (a descriptor tile is at most 256 elements wide; the loads are not).
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        wg_desc = tl.make_tensor_descriptor(wg_ptr, shape=[N, K], strides=[stride_wg, 1],
                                            block_shape=[BLOCK_N, BLOCK_K])
        wu_desc = tl.make_tensor_descriptor(wu_ptr, shape=[N, K], strides=[stride_wu, 1],
                                            block_shape=[BLOCK_N, BLOCK_K])
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        ss = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for k in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
            x = x_desc.load([off_m, k])
            if NORM:
                xw, ss = weighed(x, ss, nw_ptr, (k + tl.arange(0, BLOCK_K))[None, :], K)
                x = xw.to(x.dtype)
            wg = wg_desc.load([off_n, k])
            wu = wu_desc.load([off_n, k])
            acc_g, acc_u = _k_step(x, wg, wu, acc_g, acc_u, k, offs_n, N, sg_ptr, su_ptr, stride_sg, stride_su,
                                   srow_mul, srow_off_g, srow_off_u, DOT_PRECISION, UPCAST, W_SCALING, F16_DOT)
        sum_sq = tl.sum(ss, axis=1)
    elif USE_FMA:
        acc_g, acc_u, sum_sq = _fma_k_loop(x_ptr, wg_ptr, wu_ptr, offs_m, offs_n, M, N, k_start, k_end,
                                           stride_xm, stride_wg, stride_wu, acc_g, acc_u,
                                           sg_ptr, su_ptr, stride_sg, stride_su, srow_mul, srow_off_g, srow_off_u,
                                           BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, NUM_STAGES, INTERPRET, W_SCALING,
                                           nw_ptr, K, NORM)
    else:
        acc_g, acc_u, sum_sq = _pointer_k_loop(x_ptr, wg_ptr, wu_ptr, offs_m, offs_n, M, N, k_start, k_end,
                                               stride_xm, stride_wg, stride_wu, acc_g, acc_u,
                                               sg_ptr, su_ptr, stride_sg, stride_su, srow_mul, srow_off_g,
                                               srow_off_u, BLOCK_K, EVEN_K, NUM_STAGES, DOT_PRECISION, UPCAST,
                                               W_SCALING, F16_DOT, nw_ptr, K, NORM)
    pdl_streamed(PDL)  # (TRITON_OPS_PDL_TRIGGER=end: the next kernel may launch during the epilogue)

    if SPLIT_K == 1:
        if NORM:  # the deferred norm: the whole row's rstd times both sums
            rstd = rstd_from_squares(sum_sq, K, norm_eps)[:, None]
            acc_g, acc_u = acc_g * rstd, acc_u * rstd
        _epilogue(acc_g, acc_u, offs_m, offs_n, M, N, bg_ptr, bu_ptr, stride_bg, stride_bu, sg_ptr, su_ptr,
                  stride_sg, stride_su, out_ptr, stride_om, alpha, limit, ACTIVATION, HAS_GATE_BIAS, HAS_UP_BIAS,
                  W_SCALING)
    else:
        lock = lock_ptr + pid_m * tl.num_programs(0) + pid_n
        _meet_partials(acc_g, acc_u, offs_m, offs_n, M, N, ws_ptr, lock, 1, SPLIT_K,
                       bg_ptr, bu_ptr, stride_bg, stride_bu, sg_ptr, su_ptr, stride_sg, stride_su,
                       out_ptr, stride_om, alpha, limit,
                       ACTIVATION, HAS_GATE_BIAS, HAS_UP_BIAS, W_SCALING, BLOCK_M, BLOCK_N, INTERPRET,
                       sum_sq, pid_n, K, norm_eps, NORM)


@triton.jit
def _meet_partials(acc_g, acc_u, offs_m, offs_n, M, N, ws_ptr, lock, units, total_units,
                   bg_ptr, bu_ptr, stride_bg, stride_bu, sg_ptr, su_ptr, stride_sg, stride_su,
                   out_ptr, stride_om, alpha, limit,
                   ACTIVATION: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
                   W_SCALING: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   INTERPRET: tl.constexpr, sum_sq, pid_n, K, norm_eps, NORM: tl.constexpr):
    """Add a partial sum of an output tile that several programs share; the program that completes the tile
    finishes it.

    Partial sums meet in the fp32 workspace ``[2, M, N]``; ``lock`` counts the K slices summed so far (each
    program adds its ``units``), so the program that brings it to ``total_units`` reads the totals, applies the
    epilogue and resets workspace and counter to zero for the next call. With ``NORM`` the rows' sums of squares
    of each K slice (``sum_sq``) meet after them, ``[column blocks, M]`` (the tile's own slots, ``pid_n``), and the
    last program multiplies both totals by the rows' ``rstd``.
    """
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ws_g = ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    ws_u = ws_g + M.to(tl.int64) * N
    ws_ss = ws_ptr + 2 * M.to(tl.int64) * N + pid_n * M + offs_m
    tl.atomic_add(ws_g, acc_g, mask=mask, sem="relaxed")
    tl.atomic_add(ws_u, acc_u, mask=mask, sem="relaxed")
    if NORM:
        tl.atomic_add(ws_ss, sum_sq, mask=offs_m < M, sem="relaxed")
    # Classic threadfence reduction: every thread waits until its own partial sums are performed at GPU
    # scope (membar.gl), then one thread counts the arrival. A barrier alone does not wait for in-flight
    # atomics (wrong sums were seen on an H100 with 32- and 64-row tiles without the fence).
    fence = 0
    if not INTERPRET:  # the interpreter runs programs one after another: nothing to order there
        fenced = tl.inline_asm_elementwise("membar.gl;\n\tmov.u32 $0, 0;", "=r,r",
                                           [tl.full([1], 0, tl.int32)], dtype=tl.int32, is_pure=False,
                                           pack=1)
        fence = tl.sum(fenced, axis=0)  # the asm's 0, unknown to the compiler: keeps the fence in place
    tl.debug_barrier()
    arrived = tl.atomic_add(lock, units + fence, sem="acq_rel")
    if arrived + units == total_units:
        # Read the totals with atomics too: they are served by L2, where the sums live.
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.atomic_add(ws_g, zeros, mask=mask, sem="relaxed")
        acc_u = tl.atomic_add(ws_u, zeros, mask=mask, sem="relaxed")
        if NORM:
            rows_ss = tl.atomic_add(ws_ss, tl.zeros((BLOCK_M,), dtype=tl.float32), mask=offs_m < M, sem="relaxed")
            rstd = rstd_from_squares(rows_ss, K, norm_eps)[:, None]
            acc_g, acc_u = acc_g * rstd, acc_u * rstd
        _epilogue(acc_g, acc_u, offs_m, offs_n, M, N, bg_ptr, bu_ptr, stride_bg, stride_bu, sg_ptr, su_ptr,
                  stride_sg, stride_su, out_ptr, stride_om, alpha, limit, ACTIVATION, HAS_GATE_BIAS, HAS_UP_BIAS,
                  W_SCALING)
        # The epilogue consumed every read; only then clear the tile for the next call.
        tl.debug_barrier()
        tl.store(ws_g, zeros, mask=mask)
        tl.store(ws_u, zeros, mask=mask)
        if NORM:
            tl.store(ws_ss, tl.zeros((BLOCK_M,), dtype=tl.float32), mask=offs_m < M)
        tl.atomic_xchg(lock, 0, sem="relaxed")


@triton.jit(do_not_specialize=["M"])
def _gated_mlp_prefill_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, sg_ptr, su_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wg, stride_wu, stride_om, stride_bg, stride_bu,
    stride_sg, stride_su, srow_mul, srow_off_g, srow_off_u,
    alpha, limit,
    ACTIVATION: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, W_SCALING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_STAGES: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Many tokens: one program per [BLOCK_M, BLOCK_N] output tile, in grouped order for L2 reuse."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row-tiles sweep the column tiles together, so a weight tile loaded once from HBM
    # serves GROUP_M programs from L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        # Out-of-bounds rows and columns of a descriptor load read as zero: no masks in the loop.
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        wg_desc = tl.make_tensor_descriptor(wg_ptr, shape=[N, K], strides=[stride_wg, 1],
                                            block_shape=[BLOCK_N, BLOCK_K])
        wu_desc = tl.make_tensor_descriptor(wu_ptr, shape=[N, K], strides=[stride_wu, 1],
                                            block_shape=[BLOCK_N, BLOCK_K])
        for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            x = x_desc.load([off_m, k])
            wg = wg_desc.load([off_n, k])
            wu = wu_desc.load([off_n, k])
            acc_g, acc_u = _k_step(x, wg, wu, acc_g, acc_u, k, offs_n, N, sg_ptr, su_ptr, stride_sg, stride_su,
                                   srow_mul, srow_off_g, srow_off_u, DOT_PRECISION, UPCAST, W_SCALING)
    else:
        acc_g, acc_u, _ = _pointer_k_loop(x_ptr, wg_ptr, wu_ptr, offs_m, offs_n, M, N, 0, K,
                                          stride_xm, stride_wg, stride_wu, acc_g, acc_u,
                                          sg_ptr, su_ptr, stride_sg, stride_su, srow_mul, srow_off_g, srow_off_u,
                                          BLOCK_K, False, NUM_STAGES, DOT_PRECISION, UPCAST, W_SCALING)

    _epilogue(acc_g, acc_u, offs_m, offs_n, M, N, bg_ptr, bu_ptr, stride_bg, stride_bu, sg_ptr, su_ptr,
              stride_sg, stride_su, out_ptr, stride_om, alpha, limit, ACTIVATION, HAS_GATE_BIAS, HAS_UP_BIAS,
              W_SCALING)


@triton.jit
def _gated_activation_kernel(gate_ptr, up_ptr, out_ptr, R, C, stride_gr, stride_ur, stride_or, alpha, limit,
                             ACTIVATION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``out = act(gate) * up`` over a ``[R, C]`` tile grid (unit column strides, any row strides: the halves of a
    packed gate/up output are read in place), in fp32, rounded once to the output's dtype."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    r64 = rows.to(tl.int64)[:, None]
    g = tl.load(gate_ptr + r64 * stride_gr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + r64 * stride_ur + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = gate_times_up(g, u, alpha, limit, ACTIVATION)
    tl.store(out_ptr + r64 * stride_or + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
