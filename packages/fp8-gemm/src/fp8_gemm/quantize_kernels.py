"""The Triton kernels of FP8 quantization (``quantize``): the amax and the cast of every granularity in one place.

See ``quantize``'s docstring for the scale convention; the host side (launch plans) is in ``quantize_plan``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton_ops_core.fp8_cast import finite_abs as _finite_abs
from triton_ops_core.fp8_cast import group_scale as _group_scale
from triton_ops_core.fp8_cast import overflows as _overflows
from triton_ops_core.fp8_cast import store_fp8 as _store_fp8
from triton_ops_core.gated_activation import gate_times_up as _gate_times_up

# --------------------------------------------------------------------------------------------------------------
# Kernels. Every kernel sees a row-major [R, C] problem (unit column stride, any row stride): the host wrapper
# transposes column-major inputs first, so a [N, K] weight passed as ``w.t()`` is read along its rows.
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _line_steps(R, C, REDUCE_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tiles along the reduced dimension of ``_quant_lines_kernel``."""
    n = tl.cdiv(C, BLOCK_C)
    if REDUCE_ROWS:
        n = tl.cdiv(R, BLOCK_R)
    return n


@triton.jit
def _line_tile(step, rows, cols, line_mask, R, C, REDUCE_ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """Rows (int64), columns and mask of tile ``step`` along the reduced dimension: the next BLOCK_R rows of
    the program's columns (``REDUCE_ROWS``), else the next BLOCK_C columns of its rows."""
    if REDUCE_ROWS:
        r = step * BLOCK_R + rows
        c = cols
        mask = (r[:, None] < R) & line_mask[None, :]
    else:
        r = rows
        c = step * BLOCK_C + cols
        mask = line_mask[:, None] & (c[None, :] < C)
    return r.to(tl.int64), c, mask


@triton.jit
def _quant_lines_kernel(
    x_ptr, q_ptr, scale_ptr, given_ptr, flag_ptr,
    R, C, stride_xr, stride_qr,
    MAX_VALUE: tl.constexpr, REDUCE_ROWS: tl.constexpr, HAS_GIVEN: tl.constexpr,
    IS_E4M3: tl.constexpr, EMULATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    SINGLE: tl.constexpr,
):
    """One scale per row (``REDUCE_ROWS`` False: per-token) or per column (True: per-channel of a [K, N] weight).

    A program owns BLOCK_R rows (or BLOCK_C columns) and walks the reduced dimension twice: once for the
    absolute maximum, once to cast (the second read hits L2). ``SINGLE``: the whole line fits one tile and stays
    in registers, one read.
    """
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    if REDUCE_ROWS:
        cols = pid * BLOCK_C + cols
        line_mask = cols < C
        amax = tl.zeros((BLOCK_C,), tl.float32)
    else:
        rows = pid * BLOCK_R + rows
        line_mask = rows < R
        amax = tl.zeros((BLOCK_R,), tl.float32)
    if SINGLE:
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xr + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if REDUCE_ROWS:
            amax = tl.max(_finite_abs(x), axis=0)
        else:
            amax = tl.max(_finite_abs(x), axis=1)
    else:
        for step in range(0, _line_steps(R, C, REDUCE_ROWS, BLOCK_R, BLOCK_C)):
            r64, c, mask = _line_tile(step, rows, cols, line_mask, R, C, REDUCE_ROWS, BLOCK_R, BLOCK_C)
            x = tl.load(x_ptr + r64[:, None] * stride_xr + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if REDUCE_ROWS:
                amax = tl.maximum(amax, tl.max(_finite_abs(x), axis=0))
            else:
                amax = tl.maximum(amax, tl.max(_finite_abs(x), axis=1))
    if REDUCE_ROWS:
        line = cols
    else:
        line = rows
    given = amax
    if HAS_GIVEN:
        given = tl.load(given_ptr + line, mask=line_mask, other=1.0)
    scale, inv, over = _group_scale(amax, given, HAS_GIVEN, MAX_VALUE)
    tl.store(scale_ptr + line, scale, mask=line_mask)
    if HAS_GIVEN:
        n_over = tl.sum((over & line_mask).to(tl.int32), axis=0)
        tl.atomic_add(flag_ptr, n_over, mask=n_over > 0)
    if REDUCE_ROWS:
        inv2 = inv[None, :]
    else:
        inv2 = inv[:, None]
    if SINGLE:
        _store_fp8(q_ptr + rows.to(tl.int64)[:, None] * stride_qr + cols[None, :], x * inv2, mask,
                   IS_E4M3, EMULATE)
    else:
        for step in range(0, _line_steps(R, C, REDUCE_ROWS, BLOCK_R, BLOCK_C)):
            r64, c, mask = _line_tile(step, rows, cols, line_mask, R, C, REDUCE_ROWS, BLOCK_R, BLOCK_C)
            x = tl.load(x_ptr + r64[:, None] * stride_xr + c[None, :], mask=mask, other=0.0).to(tl.float32)
            _store_fp8(q_ptr + r64[:, None] * stride_qr + c[None, :], x * inv2, mask, IS_E4M3, EMULATE)


@triton.jit
def _quant_blocks_kernel(
    x_ptr, q_ptr, scale_ptr, given_ptr, flag_ptr,
    R, C, stride_xr, stride_qr, stride_sr,
    MAX_VALUE: tl.constexpr, GROUP_ROWS: tl.constexpr, HAS_GIVEN: tl.constexpr,
    IS_E4M3: tl.constexpr, EMULATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Block scales, one read: a [BLOCK_R, BLOCK_C] tile per program, BLOCK_C = the block's width.

    ``GROUP_ROWS`` 1: 1xBLOCK_C blocks (activations), one scale per tile row; else the tile is one
    BLOCK_R x BLOCK_C block (weights) with one scale.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    r64 = rows.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if GROUP_ROWS == 1:
        amax = tl.max(_finite_abs(x), axis=1)
        s_off = r64 * stride_sr + pid_c
        s_mask = rows < R
        given = amax
        if HAS_GIVEN:
            given = tl.load(given_ptr + s_off, mask=s_mask, other=1.0)
        scale, inv, over = _group_scale(amax, given, HAS_GIVEN, MAX_VALUE)
        tl.store(scale_ptr + s_off, scale, mask=s_mask)
        if HAS_GIVEN:
            n_over = tl.sum((over & s_mask).to(tl.int32), axis=0)
            tl.atomic_add(flag_ptr, n_over, mask=n_over > 0)
        y = x * inv[:, None]
    else:
        amax = tl.max(tl.max(_finite_abs(x), axis=1), axis=0)
        s_off = pid_r * stride_sr + pid_c
        given = amax
        if HAS_GIVEN:
            given = tl.load(given_ptr + s_off)
        scale, inv, over = _group_scale(amax, given, HAS_GIVEN, MAX_VALUE)
        tl.store(scale_ptr + s_off, scale)
        if HAS_GIVEN:
            tl.atomic_add(flag_ptr, 1, mask=over)
        y = x * inv
    _store_fp8(q_ptr + r64[:, None] * stride_qr + cols[None, :], y, mask, IS_E4M3, EMULATE)


@triton.jit
def _grid_barrier(sync_ptr, n_progs):
    """Wait until every program of the grid has arrived (``sync_ptr[1]`` counts arrivals). Only for grids whose
    programs are all resident at once: a cooperative launch on a GPU, a single program under the interpreter."""
    arrived = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu") + 1
    while arrived < n_progs:
        arrived = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")


@triton.jit
def _tile_ptrs(t, tiles_c, R, C, stride_xr, stride_qr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = (t // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (t % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    r64 = rows.to(tl.int64)
    return r64[:, None] * stride_xr + cols[None, :], r64[:, None] * stride_qr + cols[None, :], mask


@triton.jit
def _quant_tensor_coop_kernel(
    x_ptr, q_ptr, scale_ptr, given_ptr, flag_ptr, hist_ptr, sync_ptr,
    R, C, stride_xr, stride_qr, tiles_c, n_tiles, hist_len, margin_mul,
    MAX_VALUE: tl.constexpr, MODE: tl.constexpr, IS_E4M3: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HIST_BLOCK: tl.constexpr, REVERSE: tl.constexpr,
):
    """Per-tensor scaling in ONE launch of co-resident programs (a cooperative grid): program ``pid`` owns tiles
    pid, pid + P, ...; the programs meet once at a grid barrier, where the tensor's amax is known.

    ``MODE`` 0, dynamic: an amax pass, the barrier, then the cast pass, in reverse tile order (``REVERSE``) so it
    first reads the tiles the amax pass read last, still in L2. 1, a given scale (``given_ptr``): cast and amax
    in one pass; after the barrier, only if the amax overflows the given scale, re-cast with the raised one.
    2, delayed scaling: the given scale is ``max(hist) / MAX_VALUE * margin_mul``, computed here from the amax
    history; the first call (``calls == 0``) is dynamic; the last program out records this call's amax in
    ``hist[calls % hist_len]``. ``sync_ptr`` (int32): amax bits, arrivals, departures (zero at rest: the last
    program out resets them), then the call count of MODE 2.
    """
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    if MODE == 2:
        calls = tl.load(sync_ptr + 3)
        hoffs = tl.arange(0, HIST_BLOCK)
        hmax = tl.max(tl.load(hist_ptr + hoffs, mask=hoffs < hist_len, other=0.0), axis=0)
        g = tl.math.div_rn(hmax, tl.full(hmax.shape, MAX_VALUE, tl.float32))
        g = tl.maximum(g, 2.0**-126) * margin_mul
        given = tl.where(hmax > 0, g, 1.0)
        dynamic = calls == 0
    elif MODE == 1:
        given = tl.load(given_ptr)
        dynamic = given != given  # False, as a tensor: one code path for MODE 1 and 2
    else:
        given = 1.0
        dynamic = True
    n_mine = tl.cdiv(n_tiles - pid, n_progs)
    amax = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    if dynamic:
        for i in range(0, n_mine):
            xo, qo, mask = _tile_ptrs(pid + i * n_progs, tiles_c, R, C, stride_xr, stride_qr, BLOCK_R, BLOCK_C)
            amax = tl.maximum(amax, _finite_abs(tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)))
    else:
        inv_given = tl.math.div_rn(tl.full(given.shape, 1.0, tl.float32), given)
        for i in range(0, n_mine):
            xo, qo, mask = _tile_ptrs(pid + i * n_progs, tiles_c, R, C, stride_xr, stride_qr, BLOCK_R, BLOCK_C)
            x = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, _finite_abs(x))
            _store_fp8(q_ptr + qo, x * inv_given, mask, IS_E4M3, EMULATE)
    m = tl.max(tl.max(amax, axis=1), axis=0)
    tl.atomic_max(sync_ptr, m.to(tl.int32, bitcast=True), sem="relaxed", scope="gpu")
    _grid_barrier(sync_ptr, n_progs)
    total_amax = tl.atomic_max(sync_ptr, 0, sem="relaxed", scope="gpu").to(tl.float32, bitcast=True)
    if dynamic:
        scale, inv, over = _group_scale(total_amax, total_amax, False, MAX_VALUE)
        recast = total_amax == total_amax
    else:
        scale, inv, over = _group_scale(total_amax, given, True, MAX_VALUE)
        recast = over
    if recast:
        for i in range(0, n_mine):
            j = n_mine - 1 - i if REVERSE else i
            xo, qo, mask = _tile_ptrs(pid + j * n_progs, tiles_c, R, C, stride_xr, stride_qr, BLOCK_R, BLOCK_C)
            x = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
            _store_fp8(q_ptr + qo, x * inv, mask, IS_E4M3, EMULATE)
    if pid == 0:
        tl.store(scale_ptr, scale)
        if MODE != 0:
            tl.store(flag_ptr, over.to(tl.int32))
    departed = tl.atomic_add(sync_ptr + 2, 1, sem="acq_rel", scope="gpu")
    if departed == n_progs - 1:  # everyone has read the amax: record it, then reset for the next call
        if MODE == 2:
            tl.store(hist_ptr + calls % hist_len, total_amax)
            tl.store(sync_ptr + 3, calls + 1)
        tl.store(sync_ptr, 0)
        tl.store(sync_ptr + 1, 0)
        tl.store(sync_ptr + 2, 0)



@triton.jit
def _quant_tensor_given_kernel(
    x_ptr, q_ptr, given_ptr, over_ptr,
    R, C, stride_xr, stride_qr, tiles_c,
    MAX_VALUE: tl.constexpr, IS_E4M3: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """A given per-tensor scale, one read: a plain grid, one tile per program, cast with the given scale.

    A tile whose values overflow that scale (or any tile, if the scale is not a positive finite number) records
    its absolute maximum in ``over_ptr`` (int32, the float's bits plus one; 0 = no overflow, zero at rest). The
    overflowing tiles hold the tensor's largest value, so their maximum is the tensor's: what the raised scale
    needs. The common case does no atomics at all; ``_quant_tensor_given_fixup_kernel`` finishes the call.
    """
    xo, qo, mask = _tile_ptrs(tl.program_id(0), tiles_c, R, C, stride_xr, stride_qr, BLOCK_R, BLOCK_C)
    given = tl.load(given_ptr)
    inv_given = tl.math.div_rn(tl.full(given.shape, 1.0, tl.float32), given)
    x = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
    _store_fp8(q_ptr + qo, x * inv_given, mask, IS_E4M3, EMULATE)
    amax = tl.max(tl.max(_finite_abs(x), axis=1), axis=0)
    bad = (given <= 0) | (given != given) | (inv_given == 0)
    over = bad | _overflows(amax * inv_given, MAX_VALUE)
    tl.atomic_max(over_ptr, amax.to(tl.int32, bitcast=True) + 1, mask=over, sem="relaxed", scope="gpu")


@triton.jit
def _quant_tensor_given_fixup_kernel(
    x_ptr, q_ptr, scale_ptr, given_ptr, flag_ptr, over_ptr,
    R, C, stride_xr, stride_qr, tiles_c, n_tiles,
    MAX_VALUE: tl.constexpr, IS_E4M3: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The second launch of a given per-tensor scale (stream order: after every tile was cast). Without an
    overflow (``over_ptr[0] == 0``) it only stores the scale and the flag. Else every program re-casts its share
    of the tiles with the raised scale ``amax / MAX_VALUE``; the last one out resets ``over_ptr[0:2]`` (word 1
    counts departures), so the words are zero at rest and no call needs a memset."""
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    word = tl.load(over_ptr)
    given = tl.load(given_ptr)
    if word != 0:
        total_amax = (word - 1).to(tl.float32, bitcast=True)
        scale, inv, over = _group_scale(total_amax, given, True, MAX_VALUE)
        for t in range(pid, n_tiles, n_progs):
            xo, qo, mask = _tile_ptrs(t, tiles_c, R, C, stride_xr, stride_qr, BLOCK_R, BLOCK_C)
            x = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
            _store_fp8(q_ptr + qo, x * inv, mask, IS_E4M3, EMULATE)
        if pid == 0:
            tl.store(scale_ptr, scale)
            tl.store(flag_ptr, 1)
        departed = tl.atomic_add(over_ptr + 1, 1, sem="acq_rel", scope="gpu")
        if departed == n_progs - 1:  # everyone has read word 0
            tl.store(over_ptr, 0)
            tl.store(over_ptr + 1, 0)
    elif pid == 0:
        tl.store(scale_ptr, given)
        tl.store(flag_ptr, 0)


# --------------------------------------------------------------------------------------------------------------
# A gated MLP's hidden state, act(gate) * up, quantized in the same pass (``quantize_gated_fp8``): the product is
# formed in fp32 from the two inputs and never written in their dtype.
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _gated_tile(gate_ptr, up_ptr, r64, c, mask, stride_gr, stride_ur, alpha, limit, ACTIVATION: tl.constexpr):
    """``act(gate) * up`` of one tile in fp32 (masked elements: 0 for every activation but swiglu_oai's, whose
    ``(up + 1)`` makes them ``0 * sigmoid(0) * 1 = 0`` too)."""
    g = tl.load(gate_ptr + r64[:, None] * stride_gr + c[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + r64[:, None] * stride_ur + c[None, :], mask=mask, other=0.0).to(tl.float32)
    return _gate_times_up(g, u, alpha, limit, ACTIVATION)


@triton.jit
def _quant_gated_rows_kernel(
    gate_ptr, up_ptr, q_ptr, scale_ptr,
    R, C, stride_gr, stride_ur, stride_qr, alpha, limit,
    ACTIVATION: tl.constexpr, MAX_VALUE: tl.constexpr, IS_E4M3: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr,
):
    """One scale per row of ``act(gate) * up`` (per token). A program owns BLOCK_R rows and walks their columns
    twice, once for the absolute maximum and once to cast (the second read of both inputs hits L2), or once when a
    row fits one tile (``SINGLE``: the product stays in registers)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r64 = rows.to(tl.int64)
    row_mask = rows < R
    cols = tl.arange(0, BLOCK_C)
    if SINGLE:
        mask = row_mask[:, None] & (cols[None, :] < C)
        h = _gated_tile(gate_ptr, up_ptr, r64, cols, mask, stride_gr, stride_ur, alpha, limit, ACTIVATION)
        amax = tl.max(_finite_abs(h), axis=1)
    else:
        amax = tl.zeros((BLOCK_R,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            mask = row_mask[:, None] & (c[None, :] < C)
            h = _gated_tile(gate_ptr, up_ptr, r64, c, mask, stride_gr, stride_ur, alpha, limit, ACTIVATION)
            amax = tl.maximum(amax, tl.max(_finite_abs(h), axis=1))
    scale, inv, _ = _group_scale(amax, amax, False, MAX_VALUE)
    tl.store(scale_ptr + r64, scale, mask=row_mask)
    if SINGLE:
        _store_fp8(q_ptr + r64[:, None] * stride_qr + cols[None, :], h * inv[:, None], mask, IS_E4M3, EMULATE)
    else:
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            mask = row_mask[:, None] & (c[None, :] < C)
            h = _gated_tile(gate_ptr, up_ptr, r64, c, mask, stride_gr, stride_ur, alpha, limit, ACTIVATION)
            _store_fp8(q_ptr + r64[:, None] * stride_qr + c[None, :], h * inv[:, None], mask, IS_E4M3, EMULATE)


@triton.jit
def _quant_gated_groups_kernel(
    gate_ptr, up_ptr, q_ptr, scale_ptr,
    R, C, stride_gr, stride_ur, stride_qr, stride_sr, alpha, limit,
    ACTIVATION: tl.constexpr, MAX_VALUE: tl.constexpr, IS_E4M3: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP: tl.constexpr,
):
    """One scale per row and ``GROUP`` (128) columns of ``act(gate) * up`` (1x128 activation blocks), one read: a
    ``[BLOCK_R, GROUP]`` tile per program."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)
    r64 = rows.to(tl.int64)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    h = _gated_tile(gate_ptr, up_ptr, r64, cols, mask, stride_gr, stride_ur, alpha, limit, ACTIVATION)
    amax = tl.max(_finite_abs(h), axis=1)
    scale, inv, _ = _group_scale(amax, amax, False, MAX_VALUE)
    tl.store(scale_ptr + r64 * stride_sr + group, scale, mask=rows < R)
    _store_fp8(q_ptr + r64[:, None] * stride_qr + cols[None, :], h * inv[:, None], mask, IS_E4M3, EMULATE)
