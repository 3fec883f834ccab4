"""Triton kernels of RMSNorm + RoPE: forward for one norm group per row or per head, and the backward.

A "row" is one token. It holds ``NUM_HEADS`` heads of ``HEAD_DIM`` elements, ``stride_h`` apart (``HEAD_DIM`` for a
hidden vector, anything for q/k heads inside a packed QKV output). The row is held in registers as tiles
``[HEADS_PAD, HALF_PAD]``: the two rotary halves (neox: ``[0, R/2)`` and ``[R/2, R)``; interleaved: even and odd
elements, loaded as one contiguous ``[HEADS_PAD, 2 * HALF_PAD]`` tile and split in registers so loads stay
vectorized) and the pass-through tail
``[R, HEAD_DIM)``. The rotation then pairs elements of the same tile position: no shuffles, no second read.

The sum of squares is taken over the whole row (``PER_HEAD=False``, weight ``[NUM_HEADS * HEAD_DIM]``) or per head
(``PER_HEAD=True``, weight ``[HEAD_DIM]`` shared by the heads: QK-norm). All math is fp32.

The q/k kernel also rotates without normalizing (``NORM=False``: ``rope``, Llama-style attention) and applies the
transposed rotation (``TRANSPOSE=True``: RoPE's backward, ``rope`` with ``-sin`` when the table's halves match).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton_ops_core.pdl import pdl_launch_dependents, pdl_wait


@triton.jit
def _token_tables(row, seq_len, max_pos, POS, stride_pb, stride_ps, COS, SIN, stride_cb, stride_cs,
                  HAS_POS: tl.constexpr):
    """Split ``row`` into (batch, seq) and find its cos/sin rows.

    ``bad`` is 0.0, or NaN for an out-of-range position id: added to cos/sin it poisons that token's rotary
    elements instead of reading out of bounds (the id is clamped to 0 for the load). A scalar added to the tables
    rather than a mask, since Triton 3.9's interpreter rejects masks combined with a scalar bool.
    """
    b = (row // seq_len).to(tl.int64)
    s = (row % seq_len).to(tl.int64)
    if HAS_POS:
        pos = tl.load(POS + b * stride_pb + s * stride_ps).to(tl.int64)
        pos_ok = (pos >= 0) & (pos < max_pos)
        pos = tl.where(pos_ok, pos, 0)
        bad = tl.where(pos_ok, 0.0, float("nan"))
    else:
        pos = s
        bad = 0.0
    off = b * stride_cb + pos * stride_cs
    return b, s, COS + off, SIN + off, bad


@triton.jit
def _load_pair(ptr, h, j, stride_h, hmask, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The two rotary halves of rows ``h`` (a ``[rows, 1]`` tile) at ``ptr + h * stride_h``: fp32 ``[rows, HALF_PAD]``.

    Interleaved rows are loaded as one contiguous ``[rows, 2 * HALF_PAD]`` tile (vectorized) and split into even and
    odd elements in registers.
    """
    HALF_PAD: tl.constexpr = j.shape[1]
    if INTERLEAVED:
        c = tl.arange(0, 2 * HALF_PAD)[None, :]
        offs = h * stride_h + c
        v = tl.load(ptr + offs, mask=hmask & (c < 2 * HALF), other=0.0).to(tl.float32)
        a, b = tl.split(tl.reshape(v, [offs.shape[0], HALF_PAD, 2]))
    else:
        m = hmask & (j < HALF)
        a = tl.load(ptr + h * stride_h + j, mask=m, other=0.0).to(tl.float32)
        b = tl.load(ptr + h * stride_h + HALF + j, mask=m, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _load_table_pair(ptr, j, bad, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """cos or sin of one token for both halves, ``[1, HALF_PAD]`` fp32, plus ``bad`` (0, or NaN: invalid id)."""
    h0 = tl.arange(0, 1)[:, None]
    a, b = _load_pair(ptr, h0, j, 0, h0 < 1, HALF, INTERLEAVED)
    return a + bad, b + bad


@triton.jit
def _store_pair(ptr, h, j, stride_h, hmask, HALF: tl.constexpr, a, b, INTERLEAVED: tl.constexpr):
    dtype = ptr.dtype.element_ty
    HALF_PAD: tl.constexpr = j.shape[1]
    if INTERLEAVED:
        c = tl.arange(0, 2 * HALF_PAD)[None, :]
        offs = h * stride_h + c
        v = tl.reshape(tl.join(a, b), [offs.shape[0], 2 * HALF_PAD])
        tl.store(ptr + offs, v.to(dtype), mask=hmask & (c < 2 * HALF))
    else:
        m = hmask & (j < HALF)
        tl.store(ptr + h * stride_h + j, a.to(dtype), mask=m)
        tl.store(ptr + h * stride_h + HALF + j, b.to(dtype), mask=m)


@triton.jit
def _load_weights(W, h, j, p, hmask, HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr,
                  INTERLEAVED: tl.constexpr, GEMMA: tl.constexpr, PER_HEAD: tl.constexpr, HAS_PASS: tl.constexpr):
    """The weight tiles matching the row tiles; per-head weights are one ``[1, *]`` tile broadcast over heads."""
    if PER_HEAD:
        h0 = tl.arange(0, 1)[:, None]
        w1, w2 = _load_pair(W, h0, j, 0, h0 < 1, ROT_DIM // 2, INTERLEAVED)
    else:
        w1, w2 = _load_pair(W, h, j, HEAD_DIM, hmask, ROT_DIM // 2, INTERLEAVED)
    wp = w1
    if HAS_PASS:
        if PER_HEAD:
            wp = tl.load(W + ROT_DIM + p, mask=p < HEAD_DIM - ROT_DIM, other=0.0).to(tl.float32)
        else:
            pm = hmask & (p < HEAD_DIM - ROT_DIM)
            wp = tl.load(W + h * HEAD_DIM + ROT_DIM + p, mask=pm, other=0.0).to(tl.float32)
    if GEMMA:
        w1 += 1.0
        w2 += 1.0
        wp += 1.0
    return w1, w2, wp


@triton.jit
def _weights_for(W, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr,
                 HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr,
                 INTERLEAVED: tl.constexpr, GEMMA: tl.constexpr, PER_HEAD: tl.constexpr):
    h = tl.arange(0, HEADS_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    p = tl.arange(0, PASS_PAD)[None, :]
    hmask = h < NUM_HEADS
    return _load_weights(W, h, j, p, hmask, HEAD_DIM, ROT_DIM, INTERLEAVED, GEMMA, PER_HEAD,
                         HEAD_DIM > ROT_DIM)


@triton.jit
def _norm_rope_row_fwd(X, Y, w1, w2, wp, cos_row, sin_row, bad, RSTD, eps, stride_xh, stride_yh,
                       NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr,
                       HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr,
                       INTERLEAVED: tl.constexpr, GEMMA: tl.constexpr, PER_HEAD: tl.constexpr,
                       STORE_RSTD: tl.constexpr, NORM: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Normalize one row (X, Y point at its start), rotate it, write it; store rstd when training.

    The weight tiles (w1, w2, wp) come from the caller, loaded once per program for all its rows. ``NORM=False``
    rotates x itself (weights, eps and RSTD unused); ``TRANSPOSE=True`` applies the transposed rotation (the
    backward of RoPE: ``y1 = x1 c1 + x2 s2``, ``y2 = x2 c2 - x1 s1``).
    """
    HALF: tl.constexpr = ROT_DIM // 2
    PASS: tl.constexpr = HEAD_DIM - ROT_DIM
    HAS_PASS: tl.constexpr = PASS > 0
    h = tl.arange(0, HEADS_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    p = tl.arange(0, PASS_PAD)[None, :]
    hmask = h < NUM_HEADS
    pmask = hmask & (p < PASS)

    x1, x2 = _load_pair(X, h, j, stride_xh, hmask, HALF, INTERLEAVED)
    xp = x1
    if HAS_PASS:
        xp = tl.load(X + h * stride_xh + ROT_DIM + p, mask=pmask, other=0.0).to(tl.float32)
    if NORM:
        ss = x1 * x1 + x2 * x2
        if PER_HEAD:
            sumsq = tl.sum(ss, axis=1)
        else:
            sumsq = tl.sum(tl.sum(ss, axis=1), axis=0)
        if HAS_PASS:
            if PER_HEAD:
                sumsq += tl.sum(xp * xp, axis=1)
            else:
                sumsq += tl.sum(tl.sum(xp * xp, axis=1), axis=0)

        if PER_HEAD:
            rstd = tl.rsqrt(sumsq / HEAD_DIM + eps)
            r = rstd[:, None]
        else:
            rstd = tl.rsqrt(sumsq / (NUM_HEADS * HEAD_DIM) + eps)
            r = rstd
        if STORE_RSTD:
            if PER_HEAD:
                tl.store(RSTD + tl.arange(0, HEADS_PAD), rstd, mask=tl.arange(0, HEADS_PAD) < NUM_HEADS)
            else:
                tl.store(RSTD, rstd)
        n1 = x1 * r * w1
        n2 = x2 * r * w2
        np_ = xp * r * wp
    else:
        n1 = x1
        n2 = x2
        np_ = xp

    c1, c2 = _load_table_pair(cos_row, j, bad, HALF, INTERLEAVED)
    s1, s2 = _load_table_pair(sin_row, j, bad, HALF, INTERLEAVED)
    if TRANSPOSE:
        # the transpose of the rotation below (RoPE's backward): dn1 = g1 c1 + g2 s2, dn2 = g2 c2 - g1 s1
        y1 = n1 * c1 + n2 * s2
        y2 = n2 * c2 - n1 * s1
    else:
        # y = n * cos + rotate_half(n) * sin, rotate_half(n) = (-n2, n1) on the two halves
        y1 = n1 * c1 - n2 * s1
        y2 = n2 * c2 + n1 * s2
    _store_pair(Y, h, j, stride_yh, hmask, HALF, y1, y2, INTERLEAVED)
    if HAS_PASS:
        tl.store(Y + h * stride_yh + ROT_DIM + p, np_.to(Y.dtype.element_ty), mask=pmask)


@triton.jit
def _rmsnorm_rope_fwd_kernel(
    X, Y, W, COS, SIN, POS, RSTD,
    n_rows, seq_len, max_pos,
    stride_xb, stride_xs, stride_yb, stride_ys, stride_pb, stride_ps, stride_cb, stride_cs,
    eps,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr,
    INTERLEAVED: tl.constexpr, GEMMA: tl.constexpr, HAS_POS: tl.constexpr, STORE_RSTD: tl.constexpr,
    ROWS_PER_PROG: tl.constexpr, EVEN_ROWS: tl.constexpr,
):
    """``fused_rmsnorm_rope`` forward: ROWS_PER_PROG tokens per program, the norm over the whole hidden vector."""
    pid = tl.program_id(0)
    w1, w2, wp = _weights_for(W, NUM_HEADS, HEAD_DIM, ROT_DIM, HEADS_PAD, HALF_PAD, PASS_PAD, INTERLEAVED, GEMMA,
                              False)
    for i in tl.static_range(ROWS_PER_PROG):
        row = pid * ROWS_PER_PROG + i
        if EVEN_ROWS or row < n_rows:
            b, s, cos_row, sin_row, bad = _token_tables(row, seq_len, max_pos, POS, stride_pb, stride_ps,
                                                        COS, SIN, stride_cb, stride_cs, HAS_POS)
            _norm_rope_row_fwd(X + b * stride_xb + s * stride_xs, Y + b * stride_yb + s * stride_ys, w1, w2, wp,
                               cos_row, sin_row, bad, RSTD + row, eps, HEAD_DIM, HEAD_DIM,
                               NUM_HEADS, HEAD_DIM, ROT_DIM, HEADS_PAD, HALF_PAD, PASS_PAD,
                               INTERLEAVED, GEMMA, False, STORE_RSTD, True, False)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    Q, K, QO, KO, QW, KW, COS, SIN, POS, QRSTD, KRSTD,
    n_rows, seq_len, max_pos,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_qob, stride_qos, stride_qoh, stride_kob, stride_kos, stride_koh,
    stride_pb, stride_ps, stride_cb, stride_cs,
    eps,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr,
    INTERLEAVED: tl.constexpr, GEMMA: tl.constexpr, HAS_POS: tl.constexpr, STORE_RSTD: tl.constexpr,
    ROWS_PER_PROG: tl.constexpr, EVEN_ROWS: tl.constexpr, NORM: tl.constexpr, TRANSPOSE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """``fused_qk_norm_rope`` forward: per token, every q head then every k head, in one program.

    ``NORM=False``: RoPE alone (``rope``; QW, KW, eps, the RSTDs unused); ``TRANSPOSE=True``: its backward.
    ``PDL`` (``triton_ops_core.pdl``): launched early, the program loads the norm weights, then waits for the
    previous kernel before it reads q, k or a table.
    """
    pdl_launch_dependents(PDL)
    pid = tl.program_id(0)
    if NORM:
        qw1, qw2, qwp = _weights_for(QW, NUM_Q_HEADS, HEAD_DIM, ROT_DIM, Q_HEADS_PAD, HALF_PAD, PASS_PAD,
                                     INTERLEAVED, GEMMA, True)
        kw1, kw2, kwp = _weights_for(KW, NUM_K_HEADS, HEAD_DIM, ROT_DIM, K_HEADS_PAD, HALF_PAD, PASS_PAD,
                                     INTERLEAVED, GEMMA, True)
    else:  # placeholders: the row function reads no weight without NORM
        qw1, qw2, qwp, kw1, kw2, kwp = 1.0, 1.0, 1.0, 1.0, 1.0, 1.0
    pdl_wait(PDL)
    for i in tl.static_range(ROWS_PER_PROG):
        row = pid * ROWS_PER_PROG + i
        if EVEN_ROWS or row < n_rows:
            b, s, cos_row, sin_row, bad = _token_tables(row, seq_len, max_pos, POS, stride_pb, stride_ps,
                                                        COS, SIN, stride_cb, stride_cs, HAS_POS)
            _norm_rope_row_fwd(Q + b * stride_qb + s * stride_qs, QO + b * stride_qob + s * stride_qos,
                               qw1, qw2, qwp,
                               cos_row, sin_row, bad, QRSTD + row * NUM_Q_HEADS, eps, stride_qh, stride_qoh,
                               NUM_Q_HEADS, HEAD_DIM, ROT_DIM, Q_HEADS_PAD, HALF_PAD, PASS_PAD,
                               INTERLEAVED, GEMMA, True, STORE_RSTD, NORM, TRANSPOSE)
            _norm_rope_row_fwd(K + b * stride_kb + s * stride_ks, KO + b * stride_kob + s * stride_kos,
                               kw1, kw2, kwp,
                               cos_row, sin_row, bad, KRSTD + row * NUM_K_HEADS, eps, stride_kh, stride_koh,
                               NUM_K_HEADS, HEAD_DIM, ROT_DIM, K_HEADS_PAD, HALF_PAD, PASS_PAD,
                               INTERLEAVED, GEMMA, True, STORE_RSTD, NORM, TRANSPOSE)


@triton.jit
def _group_mean(v, PER_HEAD: tl.constexpr, N: tl.constexpr):
    if PER_HEAD:
        m = (tl.sum(v, axis=1) / N)[:, None]
    else:
        m = tl.sum(tl.sum(v, axis=1), axis=0) / N
    return m


@triton.jit
def _norm_rope_bwd_kernel(
    DY, X, DX, W, COS, SIN, POS, RSTD, DW_PART,
    n_rows, seq_len, max_pos,
    stride_dyb, stride_dys, stride_dyh, stride_xb, stride_xs, stride_xh, stride_dxb, stride_dxs, stride_dxh,
    stride_pb, stride_ps, stride_cb, stride_cs,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr,
    INTERLEAVED: tl.constexpr, GEMMA: tl.constexpr, PER_HEAD: tl.constexpr, HAS_POS: tl.constexpr,
):
    """Backward of one norm+rope group: dx per row; dweight summed over this program's rows into DW_PART[pid].

    With z = w * x * rstd and y = rope(z): dz = rope^T(dy) (dz1 = g1 c1 + g2 s2, dz2 = g2 c2 - g1 s1),
    dw += dz * x * rstd, and dx = rstd * (dn - n * mean(dn * n)) with n = x * rstd, dn = dz * w.
    """
    HALF: tl.constexpr = ROT_DIM // 2
    PASS: tl.constexpr = HEAD_DIM - ROT_DIM
    HAS_PASS: tl.constexpr = PASS > 0
    GROUP: tl.constexpr = HEAD_DIM if PER_HEAD else NUM_HEADS * HEAD_DIM
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    h = tl.arange(0, HEADS_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    p = tl.arange(0, PASS_PAD)[None, :]
    hmask = h < NUM_HEADS
    pmask = hmask & (p < PASS)
    w1, w2, wp = _load_weights(W, h, j, p, hmask, HEAD_DIM, ROT_DIM, INTERLEAVED, GEMMA, PER_HEAD, HAS_PASS)
    acc1 = tl.zeros([HEADS_PAD, HALF_PAD], tl.float32)
    acc2 = tl.zeros([HEADS_PAD, HALF_PAD], tl.float32)
    accp = tl.zeros([HEADS_PAD, PASS_PAD], tl.float32)
    for row in range(pid, n_rows, nprog):
        b, s, cos_row, sin_row, bad = _token_tables(row, seq_len, max_pos, POS, stride_pb, stride_ps,
                                                    COS, SIN, stride_cb, stride_cs, HAS_POS)
        x_row = X + b * stride_xb + s * stride_xs
        dy_row = DY + b * stride_dyb + s * stride_dys
        x1, x2 = _load_pair(x_row, h, j, stride_xh, hmask, HALF, INTERLEAVED)
        g1, g2 = _load_pair(dy_row, h, j, stride_dyh, hmask, HALF, INTERLEAVED)
        if PER_HEAD:
            r = tl.load(RSTD + row * NUM_HEADS + tl.arange(0, HEADS_PAD),
                        mask=tl.arange(0, HEADS_PAD) < NUM_HEADS, other=0.0)[:, None]
        else:
            r = tl.load(RSTD + row)
        c1, c2 = _load_table_pair(cos_row, j, bad, HALF, INTERLEAVED)
        s1, s2 = _load_table_pair(sin_row, j, bad, HALF, INTERLEAVED)
        n1 = x1 * r
        n2 = x2 * r
        dz1 = g1 * c1 + g2 * s2
        dz2 = g2 * c2 - g1 * s1
        acc1 += dz1 * n1
        acc2 += dz2 * n2
        dn1 = dz1 * w1
        dn2 = dz2 * w2
        dot = dn1 * n1 + dn2 * n2
        if HAS_PASS:
            xpv = tl.load(x_row + h * stride_xh + ROT_DIM + p, mask=pmask, other=0.0).to(tl.float32)
            gp = tl.load(dy_row + h * stride_dyh + ROT_DIM + p, mask=pmask, other=0.0).to(tl.float32)
            np_ = xpv * r
            accp += gp * np_
            dnp = gp * wp
            m = _group_mean(dot, PER_HEAD, GROUP) + _group_mean(dnp * np_, PER_HEAD, GROUP)
            dxp = r * (dnp - np_ * m)
            tl.store(DX + b * stride_dxb + s * stride_dxs + h * stride_dxh + ROT_DIM + p,
                     dxp.to(DX.dtype.element_ty), mask=pmask)
        else:
            m = _group_mean(dot, PER_HEAD, GROUP)
        dx1 = r * (dn1 - n1 * m)
        dx2 = r * (dn2 - n2 * m)
        _store_pair(DX + b * stride_dxb + s * stride_dxs, h, j, stride_dxh, hmask, HALF, dx1, dx2, INTERLEAVED)

    if PER_HEAD:
        # one [HEAD_DIM] partial per program: the heads share the weight
        dw_row = DW_PART + pid * HEAD_DIM
        h0 = tl.arange(0, 1)[:, None]
        _store_pair(dw_row, h0, j, 0, h0 < 1, HALF, tl.sum(acc1, axis=0)[None, :], tl.sum(acc2, axis=0)[None, :],
                    INTERLEAVED)
        if HAS_PASS:
            tl.store(dw_row + ROT_DIM + p, tl.sum(accp, axis=0)[None, :], mask=p < PASS)
    else:
        dw_row = DW_PART + pid * (NUM_HEADS * HEAD_DIM)
        _store_pair(dw_row, h, j, HEAD_DIM, hmask, HALF, acc1, acc2, INTERLEAVED)
        if HAS_PASS:
            tl.store(dw_row + h * HEAD_DIM + ROT_DIM + p, accp, mask=pmask)
