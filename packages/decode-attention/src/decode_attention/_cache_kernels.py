"""Triton kernel of the KV-cache write: a step's new K and V rows into a static cache, in one launch.

``_kv_cache_write_kernel``, program ``p < KV_PROGRAMS`` of the grid: rows ``p * ROWS_PER_PROGRAM ..`` of the
flattened ``(batch, kv head, new position)`` index, ``BLOCK_R`` rows a step, each a head-dim vector of K and of V
copied from the new states (any strides, a unit last one: the transposed views of a packed QKV output as they are)
to the cache at its position. The position of new row ``t`` is (``POSITIONS``):

- ``POS_INDEX`` (0): ``t`` itself;
- ``POS_TENSOR`` (1): ``positions[t]`` (transformers 5.0's ``cache_position``);
- ``POS_LENGTH`` (2): ``length + t``, ``length`` a device counter (transformers 5.2x's ``cumulative_length``);
  with ``ADVANCE`` the kernel also adds ``T`` to it. Only a one-program grid advances it (its single program read
  the counter before it writes it), so a decode step's whole cache update is this one launch, where transformers'
  ``StaticLayer.update`` makes five (``arange``, the add, the in-place add, two ``index_copy_``).
- ``POS_RING`` (3): ``(length + t) % S_MAX``, advanced as ``POS_LENGTH``: a ring buffer (a full sliding window
  whose newest row overwrites its oldest; nothing else moves).

With ``ROPE`` the kernel also applies the rotary embedding first (transformers' ``rotate_half`` form over the whole
head dim, in float32, rounded once to the states' dtype): K rows are rotated by ``cos`` / ``sin`` ``[B', T, D]`` at
their batch (``B'`` is 1 or ``B``) and new position, written back to ``k`` in place and to the cache; the query
heads (``q`` ``[B, HQ, T, D]``) are rotated in place by further programs (``BLOCK_Q`` query rows each, after the
``KV_PROGRAMS``), in parallel with the write. With ``NORM`` each head is first RMS-normalized with its weight
(``qw`` / ``kw`` ``[D]``: Qwen3's q_norm / k_norm; with ``GEMMA`` scaled by ``1 + w``, Gemma 3's). A decode step's
RoPE (QK norm included) and cache update are then one launch.

A position outside ``[0, S_MAX)`` is never written. With ``TRAP`` (on a GPU) such a row stops the kernel with a
``trap`` instruction: the launch fails as ``index_copy_``'s device-side assertion makes it fail, rather than the
step going on with a stale cache. The interpreter has no ``trap``: the host checks the positions there.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton_ops_core.pdl import pdl_launch_dependents, pdl_release, pdl_wait

POS_INDEX = 0
POS_TENSOR = 1
POS_LENGTH = 2
POS_RING = 3


@triton.jit
def _trap_if(bad):
    """Stop the kernel (PTX ``trap``) where ``bad`` is set in any lane."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $1, 0; @p trap; mov.b32 $0, $1; }", "=r,r", [bad.to(tl.int32)],
        dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _copy_rows(dst_ptr, src_ptr, dst_off, src_off, ok, offs_d, d_ok):
    vals = tl.load(src_ptr + src_off[:, None] + offs_d[None, :], mask=ok[:, None] & d_ok[None, :])
    tl.store(dst_ptr + dst_off[:, None] + offs_d[None, :], vals, mask=ok[:, None] & d_ok[None, :])


@triton.jit
def _rotate_rows(ptr, off, cos_ptr, sin_ptr, cs_off, ok, offs_h, h_ok, w_ptr, eps, HALF: tl.constexpr,
                 NORM: tl.constexpr, GEMMA: tl.constexpr = False):
    """Rows ``x`` at ``ptr + off`` become ``n * cos + rotate_half(n) * sin`` in place, ``n`` = x, or with ``NORM``
    its RMSNorm ``x * rsqrt(mean(x^2) + eps) * w`` (Qwen3's per-head q/k norm; ``GEMMA``: ``* (1 + w)``, Gemma 3's);
    float32, one rounding: ``fused_qk_norm_rope``'s arithmetic. The rotated rows are returned (the halves, in the
    rows' dtype)."""
    m = ok[:, None] & h_ok[None, :]
    lo_ptr = ptr + off[:, None] + offs_h[None, :]
    x1 = tl.load(lo_ptr, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(lo_ptr + HALF, mask=m, other=0.0).to(tl.float32)
    if NORM:
        r = tl.rsqrt(tl.sum(x1 * x1 + x2 * x2, axis=1) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + offs_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        if GEMMA:
            w1 += 1.0
            w2 += 1.0
        x1 = x1 * r * w1
        x2 = x2 * r * w2
    cs = cs_off[:, None] + offs_h[None, :]
    c1 = tl.load(cos_ptr + cs, mask=m).to(tl.float32)
    c2 = tl.load(cos_ptr + cs + HALF, mask=m).to(tl.float32)
    s1 = tl.load(sin_ptr + cs, mask=m).to(tl.float32)
    s2 = tl.load(sin_ptr + cs + HALF, mask=m).to(tl.float32)
    r1 = (x1 * c1 - x2 * s1).to(ptr.dtype.element_ty)
    r2 = (x2 * c2 + x1 * s2).to(ptr.dtype.element_ty)
    tl.store(lo_ptr, r1, mask=m)
    tl.store(lo_ptr + HALF, r2, mask=m)
    return r1, r2


@triton.jit
def _kv_cache_write_kernel(
    keys_ptr, values_ptr, k_ptr, v_ptr, pos_ptr, len_ptr, q_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr,
    H, T, ROWS, ROWS_PER_PROGRAM, S_MAX, HQ, QROWS, KV_PROGRAMS, eps,
    # strides in elements: the cache's (batch, head, position) and the new states' (batch, head, new position)
    s_keys_b, s_keys_h, s_keys_s, s_vals_b, s_vals_h, s_vals_s,
    s_k_b, s_k_h, s_k_t, s_v_b, s_v_h, s_v_t,
    # (ROPE) q's (batch, head, new position) and the tables' (batch, new position)
    s_q_b, s_q_h, s_q_t, s_cs_b, s_cs_t,
    POSITIONS: tl.constexpr, ADVANCE: tl.constexpr, TRAP: tl.constexpr, ROPE: tl.constexpr, NORM: tl.constexpr,
    GEMMA: tl.constexpr, K_DIM: tl.constexpr, V_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr,
    PDL: tl.constexpr = False, RELEASE: tl.constexpr = False,
):
    # PDL (triton_ops_core.pdl): launched early, every program waits for the previous kernel first; with RELEASE
    # (a grid of one wave: pdl.release_early) the next kernel (the attention) may launch once this one runs
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)
    pdl_release(PDL, RELEASE)
    pid = tl.program_id(0)
    HALF: tl.constexpr = K_DIM // 2
    offs_h = tl.arange(0, BLOCK_D // 2)
    h_ok = offs_h < HALF
    if pid >= KV_PROGRAMS:
        # (ROPE) the query rows, (batch, q head, new position), BLOCK_Q of them per program beside the KV
        # programs: no counter or cache involved, so they run in parallel with the write
        rows = (pid - KV_PROGRAMS) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        ok = rows < QROWS
        t = rows % T
        bh = rows // T
        hq = (bh % HQ).to(tl.int64)
        b = (bh // HQ).to(tl.int64)
        _rotate_rows(q_ptr, b * s_q_b + hq * s_q_h + t * s_q_t, cos_ptr, sin_ptr, b * s_cs_b + t * s_cs_t, ok,
                     offs_h, h_ok, qw_ptr, eps, HALF, NORM, GEMMA)
    else:
        start = pid * ROWS_PER_PROGRAM
        end = tl.minimum(start + ROWS_PER_PROGRAM, ROWS)
        offs_d = tl.arange(0, BLOCK_D)
        base = 0
        if POSITIONS >= 2:
            base = tl.load(len_ptr).to(tl.int64)
        for r0 in range(start, end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            ok = rows < end
            t = rows % T
            bh = rows // T
            h = (bh % H).to(tl.int64)
            b = (bh // H).to(tl.int64)
            if POSITIONS == 1:
                pos = tl.load(pos_ptr + t, mask=ok, other=0).to(tl.int64)
            elif POSITIONS == 2:
                pos = base + t
            elif POSITIONS == 3:
                pos = (base + t) % S_MAX
            else:
                pos = t.to(tl.int64)
            inside = (pos >= 0) & (pos < S_MAX)
            if TRAP:
                _trap_if(ok & ~inside)
            write = ok & inside
            if ROPE:
                r1, r2 = _rotate_rows(k_ptr, b * s_k_b + h * s_k_h + t * s_k_t, cos_ptr, sin_ptr,
                                      b * s_cs_b + t * s_cs_t, ok, offs_h, h_ok, kw_ptr, eps, HALF, NORM, GEMMA)
                dst = keys_ptr + (b * s_keys_b + h * s_keys_h + pos * s_keys_s)[:, None] + offs_h[None, :]
                tl.store(dst, r1, mask=write[:, None] & h_ok[None, :])
                tl.store(dst + HALF, r2, mask=write[:, None] & h_ok[None, :])
            else:
                _copy_rows(keys_ptr, k_ptr, b * s_keys_b + h * s_keys_h + pos * s_keys_s,
                           b * s_k_b + h * s_k_h + t * s_k_t, write, offs_d, offs_d < K_DIM)
            _copy_rows(values_ptr, v_ptr, b * s_vals_b + h * s_vals_h + pos * s_vals_s,
                       b * s_v_b + h * s_v_h + t * s_v_t, write, offs_d, offs_d < V_DIM)
        if ADVANCE:
            tl.store(len_ptr, base + T)


@triton.jit
def _shift_strip(cache, new, stride, W, offs_d, d_ok, BLOCK_W: tl.constexpr):
    """One strip of columns (``offs_d``) of one head's ``W`` rows at ``cache`` (row stride ``stride``): each row one
    position up, ``new``'s columns into the last row. A chunk's loads, a barrier for every thread's loads, then its
    stores: the row a store overwrites was loaded by the previous chunk (before the previous barrier) or by this
    one, and later chunks load only rows no store has reached."""
    offs_w = tl.arange(0, BLOCK_W)
    for w0 in range(0, W - 1, BLOCK_W):
        dst = w0 + offs_w
        ok = (dst < W - 1)[:, None] & d_ok[None, :]
        rows = tl.load(cache + (dst + 1).to(tl.int64)[:, None] * stride + offs_d[None, :], mask=ok)
        tl.debug_barrier()
        tl.store(cache + dst.to(tl.int64)[:, None] * stride + offs_d[None, :], rows, mask=ok)
    tl.debug_barrier()
    row = tl.load(new + offs_d, mask=d_ok)
    tl.store(cache + tl.cast(W - 1, tl.int64) * stride + offs_d, row, mask=d_ok)


@triton.jit
def _kv_cache_shift_kernel(keys, values, k, v, H, W, DK, DV, skb, skh, sks, svb, svh, svs, nkb, nkh, nvb, nvh,
                           K_BLOCKS, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    """A full sliding-window cache takes one new row: every row moves one position toward the start (the oldest is
    dropped) and the new row goes last, in place. Program ``(b * H + h, j)``: ``BLOCK_D`` columns of one head's
    rows (:func:`_shift_strip`), of K for ``j < K_BLOCKS``, else of V (each branch its own call: K and V may differ
    in dtype and stride width). Its columns are its own, so programs never meet. ``PDL``: launched early, it waits
    for the previous kernel first (triton_ops_core.pdl)."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)
    bh = tl.program_id(0)
    j = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if j < K_BLOCKS:
        offs_d = j * BLOCK_D + tl.arange(0, BLOCK_D)
        _shift_strip(keys + b * skb + h * skh, k + b * nkb + h * nkh, sks, W, offs_d, offs_d < DK, BLOCK_W)
    else:
        offs_d = (j - K_BLOCKS) * BLOCK_D + tl.arange(0, BLOCK_D)
        _shift_strip(values + b * svb + h * svh, v + b * nvb + h * nvh, svs, W, offs_d, offs_d < DV, BLOCK_W)
