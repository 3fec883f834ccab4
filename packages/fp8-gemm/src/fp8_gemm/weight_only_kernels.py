"""The Triton kernel of the weight-only (W8A16) decode path: ``out = x @ dequant(W)^T + bias`` in one launch.

``x`` is the unquantized fp16/bf16/fp32 activation, read as it is; ``W`` is the ``float8_e4m3fn`` ``[N, K]`` weight
of ``FP8Linear`` (K contiguous), streamed from HBM once and up-converted in registers. Every E4M3 value is exactly
an fp16, a bf16 and an fp32 value, so the conversion loses nothing; the products go into an fp32 accumulator. The
weight's scale is applied in fp32: per tensor and per output channel once in the epilogue, 128x128 blocks to each
K block's partial sum inside the loop. The result is the product of ``x`` with the dequantized weight up to the
fp32 accumulation (no activation quantization: W8A16, more accurate than the W8A8 GEMM).

Grid ``(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))``: one program per ``BLOCK_N`` output columns, K slice and row
tile. Decode has all of M (up to 16 rows) in one tile, so the weight is read exactly once; ``x`` (a few rows) is
read by every column block and comes from L2.

Two ways to multiply (``USE_DOT``, constexpr):

- ``tl.dot`` with ``BLOCK_M = 16`` (the smallest MMA row tile; rows past M are masked, which costs registers,
  not memory traffic): the weight tile ``[BLOCK_K, BLOCK_N]`` is converted to x's dtype (fp16/bf16, exact) and fed
  to the tensor cores, which accumulate in fp32. fp32 activations take the IEEE (non-TF32) dot.
- CUDA-core FMAs (``BLOCK_M`` 1, 2 or 4): ``x[m, k] * w[n, k]`` accumulated in an fp32 ``[BLOCK_M, BLOCK_N,
  BLOCK_K]`` register tile, summed over K once after the loop. One row accumulates in ``[BLOCK_N, BLOCK_K]``, the
  weight tile's own shape, so the products stay in the layout the tile is loaded in (16 contiguous K bytes a thread,
  one vector read from shared memory; the 3-D tile's layout re-reads it byte by byte), and block and group scales
  multiply each thread's 16-element partial sums (``_chunk_scales``, ``_block_chunk_scales``) instead of every
  weight element (or, for blocks before session 35, every element of x: 0.49-0.72x of the W8A8 path on the H200).

Split K (``SPLIT_K > 1``): each program writes its fp32 partial to the ``[SPLIT_K, M, N]`` workspace; the last
program of a column block to arrive (an int32 counter per block, reset by that program) sums the partials in the
fixed order 0..SPLIT_K-1, applies scale and bias and writes the output. Integer atomics only: the result is
deterministic, the same for every run and every arrival order. Counters and workspace are two scratch buffers
(``triton_ops_core.scratch``: the stream's; the counters zero at rest). They must stay apart: in one shared
buffer a later call with more column blocks read the earlier call's partials as its counters.

RMSNorm (``NORM``, ``triton_ops_core.rms_prologue``), deferred: x is the un-normalized row (a decoder layer's residual
stream). ``rstd`` is one number per row, so ``(x * rstd * w) @ W^T == rstd * ((x * w) @ W^T)``: each program feeds
the GEMM ``x * norm_weight`` (fp32; rounded to x's dtype where a 16-bit dot takes it) and sums the squares of the
x tiles it loads anyway; the row's sum of squares is complete where its K slices meet (one program without split
K; the last of a column block with it, from the ``[SPLIT_K, M]`` sums stored after the partials, in a fixed
order), and ``rstd`` (fp32, correctly rounded division and square root, as ``fused_rmsnorm_rope.rmsnorm``) multiplies
the sums before the weight scale and the bias. No launch of the norm's own, no normalized row written and read back,
and nothing read before the weight streaming starts (session 24's prologue, where every program summed the whole
row's squares first, made Llama-3-8B's decode step slower). The result differs from the norm's own launch followed
by this GEMM only by the normalized row's rounding to x's dtype, which is skipped here.

The next RMSNorm (``NORM_OUT``): a decoder layer's output projection adds the residual (``ADD_OUT``) and the
post-attention RMSNorm reads the sum next. With ``NORM_OUT`` the launch writes that norm's output too: every program
that finishes a column block of the output (each without split K, the last of the block's K slices with it) counts
itself on its row tile's counter (int32, after the column counters, zero at rest) once its tile is stored, with
its rows' fp64 sums of exact squares beside (``sq_ptr``, ``[column blocks, M]``); the last of the row tile's column
blocks adds those sums, reads the finished rows back through L2 once and writes ``rmsnorm(out, nw_out, eps_out)``
to ``normed``, bit for bit ``fused_rmsnorm_rope.rmsnorm``'s output (``rms_prologue.row_rstd`` / ``normalized``'s
arithmetic). One program's tail (one L2 round trip for the sums, one pass over the rows) instead of the norm's own
launch: for the few rows of a decode step.

Under Triton's interpreter (``EMULATE``): its FP8 upcast reads E4M3 NaN (0x7F / 0xFF) as 480, and its bf16/fp16
``tl.dot`` is unreliable; the weight is converted to fp32 with the NaN patterns restored, and the dot runs in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton_ops_core.fp8_cast import rows_to_f16
from triton_ops_core.pdl import pdl_launch_dependents, pdl_streamed, pdl_wait, prefetch_rows
from triton_ops_core.rms_prologue import normalized, rstd_from_squares, weighed

# SCALE_MODE (constexpr): how the weight's scale applies; values by name for the host. SCALE_NONE: a 16-bit weight
# (fp16/bf16, x's dtype) and no scale at all: the same kernel is then a plain decode GEMM (``decode_linear``).
# SCALE_GROUP: one scale per output feature and 128 input features (the [N, K] weight's rows in groups of 128).
SCALE_TENSOR, SCALE_CHANNEL, SCALE_BLOCK, SCALE_NONE, SCALE_GROUP = 0, 1, 2, 3, 4
# Block scales change every 128 along K and N (DeepSeek-V3 128x128 weight blocks)
SCALE_BLOCK_SIZE = 128


@triton.jit
def _dequant_type(w, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """An E4M3 tile in ``dtype`` (exact). Under the interpreter: fp32, with its NaN patterns kept NaN."""
    if EMULATE:
        bits = w.to(tl.uint8, bitcast=True)
        return tl.where((bits & 0x7F) == 0x7F, float("nan"), w.to(tl.float32))
    return w.to(dtype)


@triton.jit
def _group_scaled(wf, s_ptr, offs_n, k0, N, K, stride_sk, stride_sn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A dequantized ``[BLOCK_N, BLOCK_K]`` weight tile (rows: output features, from K position ``k0``) times its
    group scales, one per row and 128 columns (a tile of 128 or more spans whole groups; a narrower one, one). The
    last tile's groups past K are masked: their weights are zero, and a scale read past the end could be NaN."""
    if BLOCK_K >= 128:
        groups: tl.constexpr = BLOCK_K // 128
        g = k0 // 128 + tl.arange(0, groups)
        s = tl.load(s_ptr + g[None, :] * stride_sk + offs_n[:, None] * stride_sn,
                    mask=(offs_n < N)[:, None] & (g < tl.cdiv(K, 128))[None, :], other=0.0)
        return tl.reshape(tl.reshape(wf, (BLOCK_N, groups, 128)) * s[:, :, None], (BLOCK_N, BLOCK_K))
    s = tl.load(s_ptr + (k0 // 128) * stride_sk + offs_n * stride_sn, mask=offs_n < N, other=0.0)
    return wf * s[:, None]


@triton.jit
def _chunk_scales(s_ptr, offs_n, k0, N, K, stride_sk, stride_sn, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """The group scale of every ``CHUNK``-wide piece of a one-row K tile from ``k0``, ``[BLOCK_N, BLOCK_K //
    CHUNK]`` (``CHUNK`` divides 128: a piece lies inside one group). Pieces starting past K get a zero scale: their
    weights were masked to zero, and a scale read past the end could be anything (NaN included)."""
    starts = k0 + tl.arange(0, BLOCK_K // CHUNK) * CHUNK
    return tl.load(s_ptr + (starts // 128)[None, :] * stride_sk + offs_n[:, None] * stride_sn,
                   mask=(offs_n < N)[:, None] & (starts < K)[None, :], other=0.0)


@triton.jit
def _block_chunk_scales(s_col, k0, K, stride_sk, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """The 128x128 block scale of every ``CHUNK``-wide piece of a one-row K tile from ``k0``, ``[BLOCK_K //
    CHUNK]``, in the tile's block column ``s_col``; zero for pieces past K (as ``_chunk_scales``)."""
    starts = k0 + tl.arange(0, BLOCK_K // CHUNK) * CHUNK
    return tl.load(s_col + (starts // 128) * stride_sk, mask=starts < K, other=0.0)


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """A 2-D tile, masked only along the dimensions that may run past the tensor (zero there)."""
    if EVEN_ROWS:
        if EVEN_COLS:
            return tl.load(ptrs)
        return tl.load(ptrs, mask=(cols < n_cols)[None, :], other=0.0)
    if EVEN_COLS:
        return tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    return tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def _scale_and_bias(acc, s_ptr, bias_ptr, offs_n, N, stride_sn, stride_bias,
                    SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-tensor or per-channel weight scale (block scales were applied in the loop), then the bias, in fp32."""
    mask_n = offs_n < N
    if SCALE_MODE == 0:
        acc = acc * tl.load(s_ptr)
    elif SCALE_MODE == 1:
        acc = acc * tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _store_out(acc, out_ptrs, res_ptrs, mask_c, ADD_OUT: tl.constexpr):
    """The output tile, rounded once; with ``ADD_OUT`` the residual's tile added first (the residual is ``out``
    itself, updated in place, or another row-major tensor of out's shape: read by this program alone). Returns the
    stored (rounded) tile."""
    if ADD_OUT:
        acc = acc + tl.load(res_ptrs, mask=mask_c, other=0.0).to(tl.float32)
    stored = acc.to(out_ptrs.dtype.element_ty)
    tl.store(out_ptrs, stored, mask=mask_c)
    return stored


@triton.jit
def _normalize_rows(out_ptr, normed_ptr, nwo_ptr, sq_ptr, offs_m, M, N, stride_om, eps,
                    BLOCK_M: tl.constexpr, NORM_BLOCK: tl.constexpr, N_BLOCKS: tl.constexpr):
    """``NORM_OUT``'s tail: rows ``offs_m`` of the finished ``out`` (``[M, N]``, written by every program of the
    row tile, so read through L2: ``.cg``) RMS-normalized with ``nwo_ptr`` and ``eps`` into ``normed`` (``out``'s
    layout and dtype). The rows' squares come summed per column block (``sq_ptr``: ``[column blocks, M]`` fp64
    sums of exact squares, ``N_BLOCKS`` a power of two at least their count): their fp64 sum, then correctly rounded
    fp32 ``rstd`` and ``(x * rstd) * w`` rounded once: ``rms_prologue.row_rstd`` and ``normalized``, as the RMSNorm
    kernel computes them (an fp64 sum of exact squares is exact, whatever its order)."""
    blocks = tl.arange(0, N_BLOCKS)
    mask_m = offs_m < M
    parts = tl.load(sq_ptr + blocks[:, None].to(tl.int64) * M + offs_m[None, :],
                    mask=(blocks < tl.num_programs(0))[:, None] & mask_m[None, :], other=0.0, cache_modifier=".cg")
    rstd = rstd_from_squares(tl.sum(parts, axis=0), N, eps)[:, None]
    offs = tl.arange(0, NORM_BLOCK)
    rows = offs_m[:, None].to(tl.int64) * stride_om
    for n0 in range(0, N, NORM_BLOCK):
        nn = n0 + offs
        mask = mask_m[:, None] & (nn < N)[None, :]
        h = tl.load(out_ptr + rows + nn[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(normed_ptr + rows + nn[None, :], normalized(h, rstd, nwo_ptr, nn[None, :], N), mask=mask)


@triton.jit
def _last_of_row_tile_normalizes(stored, mask_c, cnt_ptr, out_ptr, normed_ptr, nwo_ptr, sq_ptr, offs_m, pid_m, pid_n,
                                 M, N, stride_om, eps, BLOCK_M: tl.constexpr, NORM_BLOCK: tl.constexpr,
                                 N_BLOCKS: tl.constexpr):
    """After a program stored its finished output tile (``stored``, rounded): its rows' fp64 sums of exact squares
    go to ``sq_ptr[pid_n, rows]``, and the program counts itself on its row tile's counter (after the column blocks'
    ``[row tiles, column blocks]`` counters); the row tile's last column block normalizes its rows
    (``_normalize_rows``) and sets the counter back to zero."""
    h64 = tl.where(mask_c, stored.to(tl.float32), 0.0).to(tl.float64)
    tl.store(sq_ptr + pid_n * M + offs_m, tl.sum(h64 * h64, axis=1), mask=offs_m < M)
    tl.debug_barrier()  # every thread's output and squares are written before the counter says so
    row_cnt = cnt_ptr + tl.num_programs(2) * tl.num_programs(0) + pid_m
    done = tl.atomic_add(row_cnt, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
        _normalize_rows(out_ptr, normed_ptr, nwo_ptr, sq_ptr, offs_m, M, N, stride_om, eps, BLOCK_M, NORM_BLOCK,
                        N_BLOCKS)
        tl.atomic_xchg(row_cnt, 0, sem="relaxed", scope="gpu")  # zero at rest for the next call


@triton.jit(do_not_specialize=["M"])
def fp8_weight_only_kernel(
    # tensors
    x_ptr, w_ptr, out_ptr, s_ptr, bias_ptr, cnt_ptr, ws_ptr, nw_ptr, res_ptr, normed_ptr, nwo_ptr, sq_ptr,
    # sizes and strides (M is not specialized: one binary serves every row count of a decode tile)
    M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_sk, stride_sn, stride_bias,
    tiles_per_split, norm_eps, norm_out_eps,
    # constexprs
    SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, ADD_OUT: tl.constexpr, NORM: tl.constexpr,
    USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, NUM_STAGES: tl.constexpr, EMULATE: tl.constexpr,
    F16_DOT: tl.constexpr, PDL: tl.constexpr = False, PREFETCH_LINES: tl.constexpr = 0,
    NORM_OUT: tl.constexpr = False, NORM_OUT_BLOCK: tl.constexpr = 1, NORM_OUT_N_BLOCKS: tl.constexpr = 1,
):
    """``out[M, N] = x[M, K] @ (W[N, K] * scale)^T + bias``, W in E4M3 (or, with ``SCALE_MODE`` 3, in x's 16-bit
    dtype and unscaled), x and out fp16/bf16/fp32; with ``ADD_OUT``, ``out = residual + ...`` (``res_ptr``: ``out``
    itself for an in-place add, or another row-major ``[M, N]`` tensor; one rounding of the sum); with ``NORM``, x
    is RMS-normalized over K with the weight at ``nw_ptr`` and ``norm_eps``, deferred (see the module docstring);
    with ``NORM_OUT``, the finished ``out`` rows are also RMS-normalized over N with the weight at ``nwo_ptr`` and
    ``norm_out_eps`` into ``normed_ptr`` (``out``'s layout), by the last column block of each row tile
    (``NORM_OUT_BLOCK`` columns a step; see the module docstring).

    ``EVEN_K`` / ``EVEN_N``: K / N are whole tiles (no masks on the weight along that dimension). With block
    scales the host guarantees that ``BLOCK_N`` divides 128 and, with ``USE_DOT``, that ``BLOCK_K`` does too, so a
    tile never straddles two scale blocks along N (dot: nor along K). ``NUM_STAGES``: the K loop's software
    pipeline depth (asynchronous copies into shared memory); given explicitly, so the FMA variant, whose loads
    feed no ``tl.dot``, is pipelined too. ``F16_DOT`` (E4M3 weights, bf16 x, ``USE_DOT``): the dot runs on fp16
    operands, x's rows scaled into fp16 exactly by powers of two (``rows_to_f16``), which saves the weight's second
    conversion (E4M3 -> fp16 is one packed instruction per two weights, -> bf16 two). ``PDL``
    (``triton_ops_core.pdl``): launched early, this program asks L2 for the first ``PREFETCH_LINES`` 128-byte
    lines of each of its weight rows, then waits for the previous kernel before it reads x or writes anything.
    """
    CHUNK: tl.constexpr = 16 if BLOCK_K >= 16 else BLOCK_K  # block / group scales, one row: products summed per chunk
    CHUNKED: tl.constexpr = (not USE_DOT) and BLOCK_M == 1 and (SCALE_MODE == 2 or SCALE_MODE == 4)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_first = pid_k * tiles_per_split
    k_last = tl.minimum(k_first + tiles_per_split, tl.cdiv(K, BLOCK_K))
    k_start = k_first * BLOCK_K
    pdl_launch_dependents(PDL)
    if PDL and PREFETCH_LINES > 0:  # the weight: no kernel of the step writes it
        prefetch_rows(w_ptr, offs_n, N, stride_wn, k_start, K, PREFETCH_LINES)
    pdl_wait(PDL)
    # the scale block column of this tile (block scales): constant over the tile since BLOCK_N divides 128
    s_col = s_ptr + ((pid_n * BLOCK_N) // 128) * stride_sn
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    if USE_DOT:
        # the [BLOCK_K, BLOCK_N] tile of W^T: K-contiguous columns, wide vector loads
        w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + (k_start + offs_k)[:, None] * stride_wk
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        # the [BLOCK_N, BLOCK_K] tile of W: K-contiguous rows
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :] * stride_wk
        if BLOCK_M == 1:
            # one row: products in the weight tile's own layout (a thread holds contiguous K bytes of a row, read
            # from shared memory a vector at a time, no re-layout); group scales: each thread's CHUNK products of
            # a row summed first (a chunk lies inside one group), then times the group's scale
            acc2 = tl.zeros([BLOCK_N, BLOCK_K // CHUNK if CHUNKED else BLOCK_K], dtype=tl.float32)
        else:
            acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    # the deferred norm: the squares of this program's K slice of its rows (summed over the splits at the end)
    ss = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for ki in tl.range(k_first, k_last, num_stages=NUM_STAGES):
        k0 = ki * BLOCK_K
        x = _load_tile(x_ptrs, offs_m, M, k0 + offs_k, K, False, EVEN_K)
        if NORM:
            x, ss = weighed(x, ss, nw_ptr, (k0 + offs_k)[None, :], K, EVEN_K)
            if USE_DOT and not F16_DOT and not EMULATE:  # the 16-bit dot's operand
                x = x.to(x_ptr.dtype.element_ty)
        if USE_DOT:
            w = _load_tile(w_ptrs, k0 + offs_k, K, offs_n, N, EVEN_K, EVEN_N)
            if F16_DOT:
                xd, back = rows_to_f16(x)
                if EMULATE:  # the interpreter's 16-bit dot is wrong: fp32 operands holding the same values
                    xd = xd.to(tl.float32)
                    wd = _dequant_type(w, tl.float32, True)
                else:
                    wd = w.to(tl.float16)  # E4M3 -> fp16: exact, one packed conversion per two weights
            elif EMULATE:
                xd = x.to(tl.float32)
                wd = _dequant_type(w, tl.float32, SCALE_MODE != 3)
            else:
                xd = x
                wd = _dequant_type(w, x_ptr.dtype.element_ty, False)
            if SCALE_MODE == 2 or SCALE_MODE == 4 or F16_DOT:
                # the partial product of this K block, scaled in fp32: its block scale or its columns' group scales,
                # and with F16_DOT its rows' factors
                part = tl.dot(xd, wd, input_precision="ieee")
                if SCALE_MODE == 2:
                    part = part * tl.load(s_col + (k0 // 128) * stride_sk)
                elif SCALE_MODE == 4:
                    part = part * tl.load(s_ptr + (k0 // 128) * stride_sk + offs_n * stride_sn, mask=offs_n < N,
                                          other=0.0)[None, :]
                if F16_DOT:
                    part = part * back[:, None]
                acc += part
            else:
                acc = tl.dot(xd, wd, acc, input_precision="ieee")
        else:
            w = _load_tile(w_ptrs, offs_n, N, k0 + offs_k, K, EVEN_N, EVEN_K)
            xf = x.to(tl.float32)
            if SCALE_MODE == 2 and not CHUNKED:
                # scale x by its K positions' block scale: cheaper than scaling the weight tile (x is shared by
                # every column of the tile); one more fp32 rounding per product
                kk = k0 + offs_k
                xf = xf * tl.load(s_col + (kk // 128) * stride_sk, mask=kk < K, other=0.0)[None, :]
            wf = _dequant_type(w, tl.float32, EMULATE and SCALE_MODE != 3)
            if BLOCK_M == 1:
                if CHUNKED:
                    part = tl.sum(tl.reshape(xf * wf, (BLOCK_N, BLOCK_K // CHUNK, CHUNK)), axis=2)
                    if SCALE_MODE == 4:
                        acc2 += part * _chunk_scales(s_ptr, offs_n, k0, N, K, stride_sk, stride_sn, BLOCK_K, CHUNK)
                    else:  # the tile's one block column: a scale per chunk, shared by its BLOCK_N rows
                        acc2 += part * _block_chunk_scales(s_col, k0, K, stride_sk, BLOCK_K, CHUNK)[None, :]
                else:
                    acc2 += xf * wf
            else:
                if SCALE_MODE == 4:
                    wf = _group_scaled(wf, s_ptr, offs_n, k0, N, K, stride_sk, stride_sn, BLOCK_N, BLOCK_K)
                acc3 += xf[:, None, :] * wf[None, :, :]
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    pdl_streamed(PDL)  # (TRITON_OPS_PDL_TRIGGER=end: the next kernel may launch during the epilogue)
    if not USE_DOT:
        if BLOCK_M == 1:
            acc = tl.sum(acc2, axis=1)[None, :]
        else:
            acc = tl.sum(acc3, axis=2)

    mask_c = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_offs = offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    out_ptrs = out_ptr + out_offs
    res_ptrs = res_ptr + out_offs
    if SPLIT_K == 1:
        if NORM:
            acc = acc * rstd_from_squares(tl.sum(ss, axis=1), K, norm_eps)[:, None]
        acc = _scale_and_bias(acc, s_ptr, bias_ptr, offs_n, N, stride_sn, stride_bias, SCALE_MODE, HAS_BIAS)
        stored = _store_out(acc, out_ptrs, res_ptrs, mask_c, ADD_OUT)
        if NORM_OUT:
            _last_of_row_tile_normalizes(stored, mask_c, cnt_ptr, out_ptr, normed_ptr, nwo_ptr, sq_ptr, offs_m,
                                         pid_m, pid_n, M, N, stride_om, norm_out_eps, BLOCK_M, NORM_OUT_BLOCK,
                                         NORM_OUT_N_BLOCKS)
    else:
        slice_stride = M.to(tl.int64) * N
        ws_tile = ws_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(ws_tile + pid_k * slice_stride, acc, mask=mask_c)
        # the squares of this K slice, after the [SPLIT_K, M, N] partials: every column block of the slice writes
        # the same values (the same rows, tiles and order)
        ws_ss = ws_ptr + SPLIT_K * slice_stride + offs_m
        if NORM:
            tl.store(ws_ss + pid_k * M, tl.sum(ss, axis=1), mask=offs_m < M)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        cnt = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            # the last of the column block: sum the partials in a fixed order (deterministic), read through L2
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(ws_tile + s * slice_stride, mask=mask_c, other=0.0, cache_modifier=".cg")
            if NORM:
                sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
                for s in range(SPLIT_K):
                    sum_sq += tl.load(ws_ss + s * M, mask=offs_m < M, other=0.0, cache_modifier=".cg")
                total = total * rstd_from_squares(sum_sq, K, norm_eps)[:, None]
            total = _scale_and_bias(total, s_ptr, bias_ptr, offs_n, N, stride_sn, stride_bias, SCALE_MODE,
                                    HAS_BIAS)
            stored = _store_out(total, out_ptrs, res_ptrs, mask_c, ADD_OUT)
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")  # zero at rest for the next call
            if NORM_OUT:
                _last_of_row_tile_normalizes(stored, mask_c, cnt_ptr, out_ptr, normed_ptr, nwo_ptr, sq_ptr, offs_m,
                                             pid_m, pid_n, M, N, stride_om, norm_out_eps, BLOCK_M, NORM_OUT_BLOCK,
                                             NORM_OUT_N_BLOCKS)


__all__ = ["SCALE_BLOCK", "SCALE_BLOCK_SIZE", "SCALE_CHANNEL", "SCALE_GROUP", "SCALE_NONE", "SCALE_TENSOR",
           "fp8_weight_only_kernel"]
