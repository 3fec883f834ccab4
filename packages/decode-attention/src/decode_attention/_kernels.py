"""Triton kernels of decode attention: one pass over a KV head for all its query heads, and the split reduce.

``_attention_kernel``, program ``(bh, split, m)``:

- ``bh`` is one (batch, KV head). Its rows are the ``GROUP * SQ`` (query head of the group, query position) pairs,
  row ``r`` = head ``hkv * GROUP + r // SQ``, position ``r % SQ``; program ``m`` takes rows
  ``m * BLOCK_M ..``. With ``GROUP * SQ <= BLOCK_M`` (every decode and speculative-decoding shape) one program holds
  all of them, so each K/V element of the head is read from HBM once per step: no ``repeat_kv``.
- ``split`` takes the KV positions ``split * CHUNK .. + CHUNK`` (flash-decoding, when ``B * H_KV`` programs cannot
  fill the GPU), or with ``INTERLEAVE`` the ``BLOCK_N``-position blocks ``split, split + N_SPLITS, ..``: where a
  mask or a window decides which part of the cache is attended (a static cache's valid prefix, unknown on the host),
  every split then gets its share of it, where contiguous chunks past the prefix would find nothing to read. With
  one split the program normalizes and writes the output; with several it writes its partial row maxima, sums and
  unnormalized accumulators (fp32) for ``_combine_kernel``.
- The KV loop takes ``BLOCK_N`` positions a step: the K and V rows of its in-range positions (loaded without
  waiting for the mask, so the loop pipelines), and the step's validity ``[BLOCK_M, BLOCK_N]``: in range, the mask
  (bool: nonzero attends; additive: an entry at or below ``mask_floor``, the lowest finite value of the mask's
  dtype, or -inf, is masked), causal and sliding-window bounds (the queries are the last ``SQ`` positions).
  Unattended positions get a -inf logit and a zero V row, so whatever they hold (even NaN) never counts; the V
  zeroing (``_kv_loop``'s ``CLEAN_V``: the V tile out of shared memory and back, a third of the loop's sm_90
  instructions) runs only where the loop's range holds a position no row attends (counted by the mask pass), so
  a static cache's valid prefix and mask-free calls skip it; with a bool ``MASK_1D`` mask and no such position
  the loop reads no mask at all. Causal
  and window bounds narrow the loop itself; with a mask, a first pass over the mask alone (``TRIM_N`` positions a
  step) finds the first and last attended positions of the split, and the loop covers only the blocks between
  them: a static cache's unused tail (and left padding) costs its mask bytes only, never a K/V load. ``MASK_1D``:
  every row of the program reads the same mask row (a mask broadcast over heads, with one query row or broadcast
  over queries: transformers' decode masks), loaded as one vector per step. ``RING``: the cache is a ring buffer
  (a full sliding window written in place, ``update_kv_cache_(..., ring=True)``) whose oldest entry sits at slot
  ``ring_start % S``, and the mask is laid out oldest first: slot ``j`` reads mask column ``(j - ring_start) % S``.
  Softmax attention does not depend on the order of its positions, so the mask's columns are the only thing the
  ring changes.
- Online softmax in base 2 (``qk_scale = scale * log2(e)``), fp32 state; ``SOFTCAP`` (Gemma 2's logit
  softcapping): the scaled logit becomes ``cap * tanh(logit / cap)`` before the mask is added, as transformers' eager
  attention computes it (then ``qk_scale = scale / cap`` and ``cap_log2 = cap * log2(e)``); ``m_use`` stands in
  for a row max that is still -inf so that no ``-inf - -inf`` NaN appears, while a NaN in the inputs still reaches
  the output.

``_combine_kernel``, program ``(bh, r)``: merges the splits' partials of ``BLOCK_R`` rows, ``BLOCK_S`` splits at a
time loaded together (fixed-shape reductions: deterministic, no atomics), adds the attention sink to the
denominator, normalizes and writes. With ``FINISH`` (plain eager calls) the attention kernel's last split of each
row block to arrive does this itself (``_merge_rows``, the same tiles; an integer arrival counter per row block):
one launch.

Sinks (gpt-oss's per-head logit) join the denominator only: ``out = sum_j e^(s_j - M) v_j / (sum_j e^(s_j - M) +
e^(sink - M))``. A row with no attended position writes zeros (the sink alone gives zeros too).

``UPCAST`` (interpreter only, a constexpr) feeds fp32 operands to ``tl.dot``: the interpreter's 16-bit dot is wrong.
On a GPU the probabilities are rounded to the V dtype before the PV dot (``P_LOW``), as flash attention does.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton_ops_core.pdl import pdl_launch_dependents, pdl_release, pdl_wait, prefetch_rows

# Mask kinds (constexpr): the host maps the mask's dtype to these.
MASK_NONE = 0
MASK_BOOL = 1
MASK_ADD = 2

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # interpreter only: its 16-bit dot is wrong, fp32 operands give the exact products
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _finish(acc, m, denom, sink_ptr, head, row_ok, HAS_SINKS: tl.constexpr):
    """Normalized rows of a finished softmax state (``acc [R, D]``, ``m``/``denom [R]``, base 2); a sink joins the
    denominator; rows with nothing attended give zeros (a NaN anywhere in the state stays NaN)."""
    if HAS_SINKS:
        sink = tl.load(sink_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        m_f = tl.maximum(m, sink)
        m_f = tl.where(m_f == float("-inf"), 0.0, m_f)  # a -inf sink on an empty row: zeros, not NaN
        scale = tl.exp2(m - m_f)
        denom = denom * scale + tl.exp2(sink - m_f)
        acc = acc * scale[:, None]
    empty = denom == 0.0
    return tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, denom)[:, None])


@triton.jit
def _mask_cols(cols, m_shift, S, RING: tl.constexpr):
    """The mask columns of cache slots ``cols``: the slots themselves, or (``RING``) their age order,
    ``(cols - m_shift) mod S`` with ``0 <= m_shift < S`` the oldest entry's slot."""
    if RING:
        mc = cols - m_shift
        return tl.where(mc < 0, mc + S, mc)
    return cols


@triton.jit
def _attended(cols, end, row_ok, q_pos, m_rows, stride_mn, mask_floor, WINDOW, m_shift, S, MASK_KIND: tl.constexpr,
              MASK_1D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, RING: tl.constexpr):
    """Which (row, position) pairs of a tile attend (``[rows, cols]``), and the additive mask's values there
    (``[rows, cols]``, or ``[1, cols]`` with ``MASK_1D``: one mask row serves every row of the program, loaded as
    one vector instead of a tile). ``RING``: the mask is read in age order (:func:`_mask_cols`)."""
    in_range = cols < end
    valid = row_ok[:, None] & in_range[None, :]
    if CAUSAL:
        valid = valid & (cols[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        valid = valid & (cols[None, :] > q_pos[:, None] - WINDOW)
    madd = tl.where(valid, 0.0, 0.0)
    if MASK_KIND != 0:
        mcols = _mask_cols(cols, m_shift, S, RING)
        if MASK_1D:
            mv = tl.load(m_rows + mcols * stride_mn, mask=in_range, other=0)[None, :]
        else:
            mv = tl.load(m_rows + mcols[None, :] * stride_mn, mask=valid, other=0)
        if MASK_KIND == 1:
            valid = valid & (mv != 0)
        else:
            madd = mv.to(tl.float32)
            # masked: at or below the dtype's lowest finite value, or -inf; a NaN entry stays (and propagates)
            valid = valid & ~(madd <= mask_floor)
    return valid, madd


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^2x + 1): exact limits (+-1, where e^2x overflows or vanishes), NaN stays NaN; fp32 (the
    # interpreter has no libdevice). Near 0 its absolute error is ~1e-7, a logit error of cap * 1e-7.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _kv_loop(q, k_ptrs, v_ptrs, lo, end, step, first_pos, row_ok, q_pos, m_rows, stride_mn, stride_kn, stride_vn,
             qk_scale, cap_log2, mask_floor, WINDOW, m_shift, S, offs_n, d_ok, MASK_KIND: tl.constexpr,
             MASK_1D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, RING: tl.constexpr,
             SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, P_LOW: tl.constexpr, CLEAN_V: tl.constexpr,
             INTERLEAVE: tl.constexpr):
    """The online softmax over the ``BLOCK_N``-position tiles starting at ``lo, lo + step, ..`` below ``end`` (the
    pointers at the first tile; ``step`` is ``BLOCK_N``, or with ``INTERLEAVE`` the splits' stride): the state
    ``(m, l, acc)`` of the program's rows, base 2. Positions at or past ``end`` (and, ``INTERLEAVE``, below
    ``first_pos``: the first tile of a window's range starts on the block grid) are not loaded and never count.

    ``CLEAN_V``: zero the V rows of positions no row attends before the PV dot. A probability of 0 times a NaN V
    element is NaN, so a masked position inside the range (a hole in the mask, or the block-aligned start before
    the first attended position) must not bring its memory in. The caller drops it when the range has no such
    position: the zeroing takes the V tile out of shared memory and back (a select per element and barriers)."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, end, step):
        cols = n0 + offs_n
        # K and V of the step's in-range positions load without waiting for the mask (no load-to-load dependency:
        # the loop pipelines); a masked position inside the range is loaded but never counts: its logit is set to
        # -inf and (CLEAN_V) its V row to zero
        in_range = cols < end
        if INTERLEAVE:  # a window's first tile starts on the block grid: what lies before it is not loaded
            in_range = in_range & (cols >= first_pos)
        kv_ok = in_range[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
        valid, madd = _attended(cols, end, row_ok, q_pos, m_rows, stride_mn, mask_floor, WINDOW, m_shift, S,
                                MASK_KIND, MASK_1D, CAUSAL, HAS_WINDOW, RING)
        qk = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale
        if SOFTCAP:  # qk_scale = scale / cap: cap * tanh(scale * q.k / cap), in base 2 (cap_log2 = cap * log2(e))
            qk = _tanh(qk) * cap_log2
        if MASK_KIND == 2:
            qk = qk + madd * 1.4426950408889634
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
        if CLEAN_V:
            need = tl.max(valid.to(tl.int32), axis=0) > 0
            v = tl.where(need[:, None], v, 0.0)
        if P_LOW:
            p = p.to(v.dtype)
        acc = acc * alpha[:, None] + _dot(p, v, DOT_PRECISION, UPCAST)
        m_i = m_new
        k_ptrs += step * stride_kn
        v_ptrs += step * stride_vn
    return m_i, l_i, acc


@triton.jit
def _attention_kernel(
    # tensors
    q_ptr, k_ptr, v_ptr, mask_ptr, ring_ptr, sink_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, cnt_ptr,
    # sizes
    H_KV, GROUP, SQ, S, CHUNK, N_SPLITS, ROWS_PAD,
    # strides, in elements (the last dimension of q, k, v is contiguous)
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mq, stride_mn,
    # numbers
    qk_scale, cap_log2, mask_floor, WINDOW,
    # options
    MASK_KIND: tl.constexpr, MASK_1D: tl.constexpr, HAS_SINKS: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, RING: tl.constexpr, SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr, INTERLEAVE: tl.constexpr,
    # tiles (a constexpr head dim: the d-masks fold away or keep 16-element runs, and loads stay vectorized)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TRIM_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, P_LOW: tl.constexpr,
    PDL: tl.constexpr = False,
    # PREFETCH_TILES (with a mask): this split's first tiles' K and V rows asked of L2 before the mask pass, KV_LINES
    # 128-byte lines a row
    PREFETCH_TILES: tl.constexpr = 0, KV_LINES: tl.constexpr = 1,
    # FINISH (with SPLIT): the last split of a row block to arrive merges the partials (_merge_rows, MERGE_R rows
    # and MERGE_S splits a step: the combine's tiles) and writes the output; no _combine_kernel launch
    FINISH: tl.constexpr = False, MERGE_R: tl.constexpr = 16, MERGE_S: tl.constexpr = 2,
    # RELEASE (triton_ops_core.pdl.release_early): the next kernel may launch once this one runs (a grid of one wave)
    RELEASE: tl.constexpr = False,
    # EARLY (PDL, a mask, no ring; ops.EARLY_MASK_PASS): the mask pass and the K/V prefetch run before the wait
    EARLY: tl.constexpr = False,
):
    # PDL (triton_ops_core.pdl): launched early, every program waits for the previous kernel (the cache's write)
    # before it reads q, the cache or the ring's counter. With EARLY, the mask pass (and PREFETCH_TILES' L2 requests)
    # come first: the mask was written before the decoder layers ran, and where every trigger follows its kernel's
    # own wait (not TRITON_OPS_PDL_TRIGGER=start) the kernel before the previous one has completed when this one
    # starts, so only the previous kernel's writes (q rotated, the new K/V row) are still to come; a prefetched line
    # that the previous kernel then writes is updated in L2, which serves every later load.
    pdl_launch_dependents(PDL)
    if not EARLY:
        pdl_wait(PDL)
        pdl_release(PDL, RELEASE)
    pid_bh = tl.program_id(0)
    pid_split = tl.program_id(1)
    pid_m = tl.program_id(2)
    # 64-bit batch offsets: a large cache's batch stride times the batch index passes 2^31 elements
    b = (pid_bh // H_KV).to(tl.int64)
    hkv = pid_bh % H_KV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * SQ
    sq = rows % SQ
    head = hkv * GROUP + rows // SQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)

    k_head = k_ptr + b * stride_kb + hkv.to(tl.int64) * stride_kh
    v_head = v_ptr + b * stride_vb + hkv.to(tl.int64) * stride_vh
    # the position of each query row in the cache: the queries are its last SQ entries
    q_pos = S - SQ + sq

    # the positions some row of the block may attend: narrowed by the causal and window bounds of its rows
    lo = 0
    end = S
    if CAUSAL:
        end = tl.minimum(end, S - SQ + tl.max(tl.where(row_ok, sq, 0), axis=0) + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, S - SQ + tl.min(tl.where(row_ok, sq, SQ), axis=0) - WINDOW + 1)
    first_pos = lo
    if INTERLEAVE:
        # this split's tiles: blocks pid_split, pid_split + N_SPLITS, .. of BLOCK_N positions (from the block that
        # holds ``lo``): whatever part of the cache is attended, every split gets its share of it
        step = N_SPLITS * BLOCK_N
        lo_block = lo // BLOCK_N
        lo = (lo_block + (pid_split - lo_block % N_SPLITS + N_SPLITS) % N_SPLITS) * BLOCK_N
    else:
        # this split's positions: one contiguous chunk
        step = BLOCK_N
        lo = tl.maximum(lo, pid_split * CHUNK)
        end = tl.minimum(end, pid_split * CHUNK + CHUNK)
    if PREFETCH_TILES > 0 and MASK_KIND != 0:
        # the mask pass below decides where this split's loop starts, a load-to-load wait; a static cache's valid
        # prefix starts at the split's first tiles, so ask L2 for their K and V rows now: their DRAM latency
        # overlaps the mask's
        for t in tl.static_range(PREFETCH_TILES):
            pos = lo + t * step + offs_n
            prefetch_rows(k_head, pos, end, stride_kn, 0, HEAD_DIM, KV_LINES)
            prefetch_rows(v_head, pos, end, stride_vn, 0, HEAD_DIM, KV_LINES)
    m_rows = mask_ptr
    holes = False
    m_shift = 0
    if RING:  # the oldest entry's slot (a ring buffer's counter, read on the device)
        m_shift = (tl.load(ring_ptr).to(tl.int64) % S).to(tl.int32)
    if MASK_KIND != 0:
        if MASK_1D:  # every row of the program reads the same mask row (that of its first row)
            m_rows = mask_ptr + b * stride_mb + (hkv * GROUP).to(tl.int64) * stride_mh
        else:
            m_rows = mask_ptr + b * stride_mb + head[:, None] * stride_mh + sq[:, None] * stride_mq
        # the first and last positions some row attends, from the mask alone in TRIM_N-wide steps (of this split's
        # tiles): the KV loop then covers only the tiles between them, so a static cache's unused tail (or left
        # padding) costs its mask bytes, not loop steps
        first = end
        last = lo - 1
        attended = 0
        offs_t = tl.arange(0, TRIM_N)
        for t0 in range(lo, end, (TRIM_N // BLOCK_N) * step):
            if INTERLEAVE:  # TRIM_N // BLOCK_N of this split's tiles
                cols_t = t0 + (offs_t // BLOCK_N) * step + offs_t % BLOCK_N
            else:
                cols_t = t0 + offs_t
            valid_t, _ = _attended(cols_t, end, row_ok, q_pos, m_rows, stride_mn, mask_floor, WINDOW, m_shift, S,
                                   MASK_KIND, MASK_1D, CAUSAL, HAS_WINDOW, RING)
            hit = tl.max(valid_t.to(tl.int32), axis=0) > 0  # (the window's bound is part of the validity)
            first = tl.minimum(first, tl.min(tl.where(hit, cols_t, end), axis=0))
            last = tl.maximum(last, tl.max(tl.where(hit, cols_t, lo - 1), axis=0))
            attended += tl.sum(hit.to(tl.int32), axis=0)
        # on the same tile grid as before (first >= lo when anything attends; else an empty loop)
        lo = tl.where(first < end, lo + ((first - lo) // step) * step, end)
        end = tl.minimum(end, last + 1)
        # every position of the loop's tiles below ``end`` (and from ``first_pos``) attended by some row (a static
        # cache's valid prefix): no V to clean. The tiles hold ``tiles * BLOCK_N`` positions, less the last tile's
        # part past ``end`` and the first's before ``first_pos``
        tiles = tl.maximum((end - lo + step - 1) // step, 0)
        in_loop = tiles * BLOCK_N - tl.maximum(lo + (tiles - 1) * step + BLOCK_N - end, 0)
        if INTERLEAVE:
            in_loop -= tl.minimum(tl.maximum(first_pos - lo, 0), BLOCK_N)
        holes = attended < in_loop
    if EARLY:
        pdl_wait(PDL)
        pdl_release(PDL, RELEASE)
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + sq[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # pointers of the first step's tiles, advanced by ``step`` rows a step (the 64-bit start keeps a long cache's
    # position offsets exact; the in-tile offsets stay 32-bit)
    k_ptrs = k_head + lo.to(tl.int64) * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_head + lo.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :]
    # Without a mask every position of the range is attended by some row (causal and window bounds narrowed it):
    # no V to clean (``holes`` stays a constexpr False). With one, only a range with holes takes the cleaning loop
    # (both are compiled; the branch is uniform over the program); a bool mask row shared by the program's rows and
    # attending the whole range leaves the loop no mask to read.
    LOOP_MASK_KIND: tl.constexpr = 0 if (MASK_KIND == 1 and MASK_1D) else MASK_KIND
    if holes:
        m_i, l_i, acc = _kv_loop(q, k_ptrs, v_ptrs, lo, end, step, first_pos, row_ok, q_pos, m_rows, stride_mn,
                                 stride_kn, stride_vn, qk_scale, cap_log2, mask_floor, WINDOW, m_shift, S, offs_n,
                                 d_ok, MASK_KIND, MASK_1D, CAUSAL, HAS_WINDOW, RING, SOFTCAP, BLOCK_M, BLOCK_N,
                                 BLOCK_D, DOT_PRECISION, UPCAST, P_LOW, True, INTERLEAVE)
    else:
        m_i, l_i, acc = _kv_loop(q, k_ptrs, v_ptrs, lo, end, step, first_pos, row_ok, q_pos, m_rows, stride_mn,
                                 stride_kn, stride_vn, qk_scale, cap_log2, mask_floor, WINDOW, m_shift, S, offs_n,
                                 d_ok, LOOP_MASK_KIND, MASK_1D, CAUSAL, HAS_WINDOW, RING, SOFTCAP, BLOCK_M, BLOCK_N,
                                 BLOCK_D, DOT_PRECISION, UPCAST, P_LOW, False, INTERLEAVE)

    if SPLIT:
        # partials at [bh, split, row] (rows padded to ROWS_PAD, head dim to BLOCK_D: no masks needed)
        idx = (pid_bh.to(tl.int64) * N_SPLITS + pid_split) * ROWS_PAD + rows
        tl.store(part_m_ptr + idx, m_i)
        tl.store(part_l_ptr + idx, l_i)
        tl.store(part_acc_ptr + idx[:, None] * BLOCK_D + offs_d[None, :], acc)
        if FINISH:  # arrival counters per (bh, row block), zero at rest (triton_ops_core.scratch)
            tl.debug_barrier()  # every thread's partial is stored before the counter says so
            cnt = cnt_ptr + pid_bh * tl.num_programs(2) + pid_m
            arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            if arrived == N_SPLITS - 1:
                for r0 in tl.static_range(0, BLOCK_M, MERGE_R):
                    # steps of padding rows only (a decode step's GQA group is often smaller than the row tile) are
                    # skipped: each merge step waits on its partials' loads, one L2 round trip after another
                    if pid_m * BLOCK_M + r0 < GROUP * SQ:
                        _merge_rows(part_acc_ptr, part_m_ptr, part_l_ptr, sink_ptr, out_ptr, pid_bh,
                                    pid_m * BLOCK_M + r0 + tl.arange(0, MERGE_R), H_KV, GROUP, SQ, N_SPLITS,
                                    ROWS_PAD, HAS_SINKS, HEAD_DIM, MERGE_R, BLOCK_D, MERGE_S, ".cg")
                tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")  # zero at rest for the next call
    else:
        out = _finish(acc, m_i, l_i, sink_ptr, head, row_ok, HAS_SINKS)
        # out is [B, SQ, H_KV * GROUP, D], contiguous
        o_row = (b * SQ + sq) * (H_KV * GROUP) + head
        tl.store(out_ptr + o_row[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, sink_ptr, out_ptr,
    H_KV, GROUP, SQ, N_SPLITS, ROWS_PAD,
    HAS_SINKS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr, PDL: tl.constexpr = False, RELEASE: tl.constexpr = False,
):
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)  # the partials are the attention kernel's
    pdl_release(PDL, RELEASE)
    pid_bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    _merge_rows(part_acc_ptr, part_m_ptr, part_l_ptr, sink_ptr, out_ptr, pid_bh, rows, H_KV, GROUP, SQ, N_SPLITS,
                ROWS_PAD, HAS_SINKS, HEAD_DIM, BLOCK_R, BLOCK_D, BLOCK_S, "")


@triton.jit
def _merge_rows(part_acc_ptr, part_m_ptr, part_l_ptr, sink_ptr, out_ptr, pid_bh, rows, H_KV, GROUP, SQ, N_SPLITS,
                ROWS_PAD, HAS_SINKS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, CACHE: tl.constexpr):
    """Merge the splits' partials of rows ``rows`` of KV head ``pid_bh`` and write their output (the combine, and
    the attention kernel's ``FINISH``). ``CACHE``: the partials' loads' cache modifier (``.cg``: through L2, for
    partials other programs of the same launch wrote)."""
    b = (pid_bh // H_KV).to(tl.int64)
    hkv = pid_bh % H_KV
    row_ok = rows < GROUP * SQ
    sq = rows % SQ
    head = hkv * GROUP + rows // SQ
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, BLOCK_S)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    # BLOCK_S splits' partials per step, loaded at once (one memory round trip for a decode step's usual <= 16
    # splits), merged by reductions of fixed shape: the same sum on every run, no atomics
    for s0 in range(0, N_SPLITS, BLOCK_S):
        splits = s0 + offs_s
        ok = row_ok[:, None] & (splits < N_SPLITS)[None, :]
        idx = (pid_bh.to(tl.int64) * N_SPLITS + splits[None, :]) * ROWS_PAD + rows[:, None]  # [R, S]
        m_s = tl.load(part_m_ptr + idx, mask=ok, other=float("-inf"), cache_modifier=CACHE)
        l_s = tl.load(part_l_ptr + idx, mask=ok, other=0.0, cache_modifier=CACHE)
        a_s = tl.load(part_acc_ptr + idx[:, :, None] * BLOCK_D + offs_d[None, None, :], mask=ok[:, :, None],
                      other=0.0, cache_modifier=CACHE)
        m_new = tl.maximum(m, tl.max(m_s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        beta = tl.exp2(m_s - m_use[:, None])  # a NaN partial stays NaN here, and in the sums
        denom = denom * alpha + tl.sum(l_s * beta, axis=1)
        acc = acc * alpha[:, None] + tl.sum(a_s * beta[:, :, None], axis=1)
        m = m_new
    out = _finish(acc, m, denom, sink_ptr, head, row_ok, HAS_SINKS)
    o_row = (b * SQ + sq) * (H_KV * GROUP) + head
    tl.store(out_ptr + o_row[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
