"""Triton kernels of the FP8 GEMM: a persistent tensor-descriptor (TMA) kernel, a pointer kernel for unaligned
operands, and a split-K decode kernel for small M.

Scale modes (constexpr): ``A_MODE`` 0 tensor, 1 row, 2 block (1x128), 3 per row applied by the caller (the
decode kernel's in-kernel activation quantization); ``B_MODE`` 0 tensor, 1 channel, 2 block
(128x128), 3 group (128x1: one scale per output column and 128-deep K block, ``[ceil(K/128), N]`` row-major).
Tensor/row/channel scales are applied once in the epilogue; block and group scales are applied to each 128-deep
K block's partial product inside the loop (DeepSeek-V3 style), which is also what keeps that partial product in
fp32. ``ACC`` selects how FP8 tensor-core partial sums reach the fp32 accumulator on Hopper:
0 fast (the tensor core's reduced-precision accumulation over the whole K loop), 1 faithful (a fresh partial
per K block, added to the fp32 accumulator), 2 faithful through ``max_num_imprecise_acc = BLOCK_K``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton_ops_core.fp8_cast import finite_abs as _finite_abs
from triton_ops_core.fp8_cast import group_scale as _group_scale
from triton_ops_core.fp8_cast import to_e4m3 as _to_e4m3

SCALE_BLOCK = 128

# The values of the A_MODE / B_MODE constexprs, by name (the host passes these; the kernels compare with the numbers)
A_TENSOR, A_ROW, A_BLOCK, A_ROW_IN_KERNEL = 0, 1, 2, 3
B_TENSOR, B_CHANNEL, B_BLOCK, B_GROUP = 0, 1, 2, 3


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row tiles share their B column tiles while they are hot in L2.
    group_size = GROUP_M * num_pid_n
    group_id = tile_id // group_size
    first_m = group_id * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % group_size) % rows
    pid_n = (tile_id % group_size) // rows
    return pid_m, pid_n


@triton.jit
def _k_block_scales(as_ptr, bs_ptr, offs_m, offs_n, kb, pid_n, M, N, SA_M, SA_K, NB,
                    A_MODE: tl.constexpr, B_MODE: tl.constexpr, BLOCK_N: tl.constexpr):
    # The factors of K block ``kb`` of the block- or group-scaled operands: a row vector and a column vector (an
    # outer-product tile would cost a second accumulator's worth of registers), 1.0 for the others. Loaded before
    # the block's dot is issued, so their latency hides behind it.
    sa = 1.0
    sb = 1.0
    if A_MODE == 2:
        sa = tl.load(as_ptr + offs_m * SA_M + kb * SA_K, mask=offs_m < M, other=0.0)[:, None]
    if B_MODE == 2:
        if 128 % BLOCK_N == 0:  # the tile lies inside one 128-wide scale block: one scalar
            sb = tl.load(bs_ptr + kb * NB + (pid_n * BLOCK_N) // 128)
        else:
            sb = tl.load(bs_ptr + kb * NB + offs_n // 128, mask=offs_n < N, other=0.0)[None, :]
    elif B_MODE == 3:  # one scale per column of this K block (NB: the scale's row stride, N)
        sb = tl.load(bs_ptr + kb * NB + offs_n, mask=offs_n < N, other=0.0)[None, :]
    return sa, sb


@triton.jit
def _epilogue(acc, as_ptr, bs_ptr, bias_ptr, offs_m, offs_n, M, N,
              A_MODE: tl.constexpr, B_MODE: tl.constexpr, HAS_BIAS: tl.constexpr):
    # Per-tensor, per-row and per-channel scales are constant along K: one multiply here instead of per K block.
    if A_MODE == 0:
        if B_MODE == 0:
            acc = acc * (tl.load(as_ptr) * tl.load(bs_ptr))
        else:
            acc = acc * tl.load(as_ptr)
    elif A_MODE == 1:
        acc = acc * tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if B_MODE == 1:
        acc = acc * tl.load(bs_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    elif B_MODE == 0:
        if A_MODE != 0:
            acc = acc * tl.load(bs_ptr)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _accumulate(acc, a, b, as_ptr, bs_ptr, offs_m, offs_n, kb, pid_n, M, N, SA_M, SA_K, NB,
                A_MODE: tl.constexpr, B_MODE: tl.constexpr, ACC: tl.constexpr, PROMOTE_K: tl.constexpr,
                BLOCK_N: tl.constexpr):
    if (A_MODE == 2) or (B_MODE == 2) or (B_MODE == 3):
        sa, sb = _k_block_scales(as_ptr, bs_ptr, offs_m, offs_n, kb, pid_n, M, N, SA_M, SA_K, NB, A_MODE, B_MODE,
                                 BLOCK_N)
        acc += tl.dot(a, b) * sa * sb
    elif ACC == 0:
        acc = tl.dot(a, b, acc)
    elif ACC == 1:
        acc += tl.dot(a, b)
    else:
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=PROMOTE_K)
    return acc


@triton.jit
def fp8_gemm_tma_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr,
    M, N, K, stride_am, stride_b, stride_cm, SA_M, SA_K, NB, num_progs,
    A_MODE: tl.constexpr, B_MODE: tl.constexpr, B_KMAJOR: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr, PROMOTE_K: tl.constexpr,
    EPI_SUBTILE: tl.constexpr,
):
    """Persistent GEMM over tensor descriptors: program ``pid`` takes tiles pid, pid + num_progs, ..."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B_KMAJOR:  # b is the transposed view of a row-major [N, K] weight
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    if EPI_SUBTILE:  # store the tile in two halves: half the epilogue's shared memory, one more pipeline stage
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                           block_shape=[BLOCK_M, BLOCK_N // 2])
    else:
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                           block_shape=[BLOCK_M, BLOCK_N])

    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    for tile_id in tl.range(tl.program_id(0), num_tiles, num_progs, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for ki in tl.range(0, k_tiles, warp_specialize=WARP_SPEC):
            off_k = ki * BLOCK_K
            a = a_desc.load([off_m, off_k])
            if B_KMAJOR:
                b = b_desc.load([off_n, off_k]).T
            else:
                b = b_desc.load([off_k, off_n])
            acc = _accumulate(acc, a, b, as_ptr, bs_ptr, offs_m, offs_n, off_k // 128, pid_n, M, N, SA_M, SA_K, NB,
                              A_MODE, B_MODE, ACC, PROMOTE_K, BLOCK_N)
        acc = _epilogue(acc, as_ptr, bs_ptr, bias_ptr, offs_m, offs_n, M, N, A_MODE, B_MODE, HAS_BIAS)
        if EPI_SUBTILE:
            c0, c1 = acc.reshape(BLOCK_M, 2, BLOCK_N // 2).permute(0, 2, 1).split()
            c_desc.store([off_m, off_n], c0.to(c_desc.dtype))
            c_desc.store([off_m, off_n + BLOCK_N // 2], c1.to(c_desc.dtype))
        else:
            c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


@triton.jit
def fp8_gemm_ptr_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr,
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, SA_M, SA_K, NB,
    A_MODE: tl.constexpr, B_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """GEMM through plain masked pointers: any strides, any sizes (the path for K or N that TMA cannot take)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for ki in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - ki * BLOCK_K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = _accumulate(acc, a, b, as_ptr, bs_ptr, offs_m, offs_n, (ki * BLOCK_K) // 128, pid_n, M, N, SA_M, SA_K, NB,
                          A_MODE, B_MODE, ACC, BLOCK_K, BLOCK_N)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    acc = _epilogue(acc, as_ptr, bs_ptr, bias_ptr, offs_m, offs_n, M, N, A_MODE, B_MODE, HAS_BIAS)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _row_scales(a_ptr, M, K, stride_am, stride_ak, BLOCK_M: tl.constexpr, AMAX_M: tl.constexpr,
                AMAX_K: tl.constexpr):
    """Per-row E4M3 scales of the unquantized ``a`` (rows 0..M-1) and their reciprocals, as the row quantizer
    computes them (finite values only set the maximum), spread over the dot's ``BLOCK_M`` rows.

    The maxima come from ``[AMAX_M, AMAX_K]`` tiles, ``AMAX_M`` the next power of two of M: a single token reads
    its row in one or two wide loads rather than a long loop of latency-bound ones in 16-row tiles.
    """
    rows = tl.arange(0, AMAX_M)
    cols = tl.arange(0, AMAX_K)
    amax = tl.zeros((AMAX_M,), tl.float32)
    row_ptrs = a_ptr + rows[:, None] * stride_am
    for k in range(0, K, AMAX_K):
        c = k + cols
        x = tl.load(row_ptrs + c[None, :] * stride_ak, mask=(rows[:, None] < M) & (c[None, :] < K), other=0.0)
        amax = tl.maximum(amax, tl.max(_finite_abs(x.to(tl.float32)), axis=1))
    scale, inv, _ = _group_scale(amax, amax, False, 448.0)
    # rows AMAX_M.. of the dot tile are masked (zero) rows: scale and reciprocal 0 there
    pick = tl.arange(0, BLOCK_M)[:, None] == rows[None, :]
    return tl.sum(tl.where(pick, scale[None, :], 0.0), axis=1), tl.sum(tl.where(pick, inv[None, :], 0.0), axis=1)


@triton.jit(do_not_specialize=["M", "SA_M", "SA_K", "NB", "tiles_per_split"])
def fp8_gemm_decode_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, SA_M, SA_K, NB, tiles_per_split,
    A_MODE: tl.constexpr, B_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN: tl.constexpr, QUANT_A: tl.constexpr, EMULATE: tl.constexpr, AMAX_M: tl.constexpr, AMAX_K: tl.constexpr,
):
    """Small-M GEMM (decode): one program per (BLOCK_N columns, K slice); the whole of M in one tile.

    Memory-bound: the weight streams once, in wide K-contiguous loads. With ``SPLIT_K > 1`` each program
    writes its fp32 partial to ``ws``; the last program of a column block to finish (a counter per block,
    reset by that program) sums the partials in a fixed order, so the result is deterministic. ``EVEN``: K and
    N are multiples of the tile, so the weight loads need no masks.

    ``QUANT_A``: ``a`` is the unquantized (fp16/bf16/fp32) activation, quantized here per row exactly as
    ``quantize_fp8(a, granularity="row")`` does (``A_MODE`` 3: the row scales stay in registers), so a call is
    one launch. Every program first finds the row maxima over the whole of K (``a`` is a few rows: L2 serves
    the repeated reads), then casts each ``a`` tile before its dot. ``EMULATE``: the interpreter's FP8 cast is
    wrong; round in integer arithmetic there.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_first = pid_k * tiles_per_split
    k_last = tl.minimum(k_first + tiles_per_split, tl.cdiv(K, BLOCK_K))
    if QUANT_A:
        a_scale, a_inv = _row_scales(a_ptr, M, K, stride_am, stride_ak, BLOCK_M, AMAX_M, AMAX_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + (k_first * BLOCK_K + offs_k[None, :]) * stride_ak
    b_ptrs = (b_ptr + (k_first * BLOCK_K + offs_k[:, None]).to(tl.int64) * stride_bk
              + offs_n[None, :].to(tl.int64) * stride_bn)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for ki in range(k_first, k_last):
        if EVEN:
            a = tl.load(a_ptrs, mask=offs_m[:, None] < M, other=0.0)
            b = tl.load(b_ptrs)
        else:
            k_left = K - ki * BLOCK_K
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        if QUANT_A:
            a = _to_e4m3(a.to(tl.float32) * a_inv[:, None], EMULATE)
        acc = _accumulate(acc, a, b, as_ptr, bs_ptr, offs_m, offs_n, (ki * BLOCK_K) // 128, pid_n, M, N, SA_M, SA_K, NB,
                          A_MODE, B_MODE, ACC, BLOCK_K, BLOCK_N)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    mask_c = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if SPLIT_K == 1:
        if QUANT_A:
            acc = acc * a_scale[:, None]
        acc = _epilogue(acc, as_ptr, bs_ptr, bias_ptr, offs_m, offs_n, M, N, A_MODE, B_MODE, HAS_BIAS)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)
    else:
        ws_tile = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_tile + pid_k * M * N, acc, mask=mask_c)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(ws_tile + s * M * N, mask=mask_c, other=0.0, cache_modifier=".cg")
            if QUANT_A:
                total = total * a_scale[:, None]
            total = _epilogue(total, as_ptr, bs_ptr, bias_ptr, offs_m, offs_n, M, N, A_MODE, B_MODE, HAS_BIAS)
            tl.store(c_ptrs, total.to(c_ptr.dtype.element_ty), mask=mask_c)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")
