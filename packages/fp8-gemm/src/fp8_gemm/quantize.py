"""FP8 quantization and dequantization: Triton kernels that find the absolute maximum and cast in one place.

Scale convention (one rule for every granularity, shared with the GEMM and with :mod:`fp8_gemm.reference`)::

    dequantized = quantized.float() * scale
    scale       = amax / fmt.max_value          (float32, IEEE division; 1.0 where amax == 0)
    quantized   = fp8(x.float() * (1.0 / scale)) (the reciprocal is an IEEE float32 division, then one multiply)

``x * (1/scale)`` and ``x / scale`` round differently; we use the multiply (one reciprocal per scale group, a
multiply per element) and the reference does exactly the same, so results are bit-identical to torch's own cast
of the same float32 values. Triton's plain ``/`` on float32 is an approximate division on NVIDIA GPUs, so the
kernels divide with ``tl.math.div_rn`` (correctly rounded, what torch does).

Only finite values enter the absolute maximum: NaN stays NaN, and an infinity saturates to +-448 in E4M3 (it has
no infinities; torch >= 2.13 and the hardware conversion do the same) and stays infinite in E5M2; neither changes
the scale of its group.

Triton's interpreter casts float32 to FP8 wrongly (lost rounding carries, no ties-to-even). Under the
interpreter the kernels therefore round in integer arithmetic (the ``EMULATE`` constexpr); on a GPU they use
the hardware conversion and pay nothing for the CPU path.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton_ops_core.device import is_interpreter, sm_count, supports_fp8
from triton_ops_core.exceptions import (
    InvalidArgumentError,
    NumericalOverflowError,
    ShapeMismatchError,
    UnsupportedDtypeError,
)
from triton_ops_core.launch import Plan, PlanCache, call_key, cdiv, next_pow2
from triton_ops_core.library import capturing, direct_call_ok, op_name
from triton_ops_core.models import FP8Format
from triton_ops_core.validation import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    check_choice,
    check_dtype,
    check_kernel_device,
    check_ndim,
    check_same_device,
    check_tensor,
)

from . import _scratch
from .validation import SCALE_BLOCK

GRANULARITIES = ("tensor", "row", "channel", "block")
ROLES = ("activation", "weight")
ACTIVATION_BLOCK = (1, SCALE_BLOCK)
WEIGHT_BLOCK = (SCALE_BLOCK, SCALE_BLOCK)
# Per-tensor scaling: tile elements and programs per SM of the cooperative kernel (H100: 4 x 8192 streamed best,
# docs/fp8-gemm.md); fewer programs per SM if a GPU cannot keep that many resident.
_TENSOR_TILE = 8192
_TENSOR_PROGS_PER_SM = 4
# A given per-tensor scale takes the two-launch grid path (no grid barrier) beyond this many tiles per program
# of the cooperative grid (H100: from 17 M elements; docs/fp8-gemm.md).
_GIVEN_GRID_TILES_PER_PROG = 4


# --------------------------------------------------------------------------------------------------------------
# Device-side helpers
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _group_scale(amax, given, HAS_GIVEN: tl.constexpr, MAX_VALUE: tl.constexpr):
    """Scale, its reciprocal and an overflow flag for scale groups with absolute maximum ``amax``.

    With a given scale the group keeps it unless ``amax * (1/given)`` would not round to the format's largest
    value (``_overflows``), or the given scale is not a positive finite number; then the group falls back to the
    dynamic scale, so nothing clips.
    """
    dyn = tl.math.div_rn(amax, tl.full(amax.shape, MAX_VALUE, tl.float32))
    dyn = tl.where(amax > 0, tl.maximum(dyn, 2.0**-126), 1.0)
    if HAS_GIVEN:
        inv_given = tl.math.div_rn(tl.full(given.shape, 1.0, tl.float32), given)
        bad = (given <= 0) | (given != given) | (inv_given == 0)
        over = bad | _overflows(amax * inv_given, MAX_VALUE)
        scale = tl.where(over, dyn, given)
    else:
        over = amax < 0  # all False, with amax's shape
        scale = dyn
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    return scale, inv, over


@triton.jit
def _overflows(v, MAX_VALUE: tl.constexpr):
    """Whether a scaled absolute value ``v`` no longer rounds to the format's largest value: E4M3 (max 448)
    above 464, E5M2 (max 57344) from 61440, where the cast turns to infinity (``FP8Format.overflow_threshold``).
    Values between the largest value and the threshold only round, so a given scale that yields them holds."""
    bound = 61439.99609375
    if MAX_VALUE == 448.0:
        bound = 464.0
    return v > bound


@triton.jit
def _finite_abs(x):
    """|x| with NaN and infinities replaced by 0: non-finite values never set a scale."""
    a = tl.abs(x)
    return tl.where(a < float("inf"), a, 0.0)


@triton.jit
def _fp8_bits_rne(v, IS_E4M3: tl.constexpr):
    """float32 -> FP8 bit pattern (uint8) with round-to-nearest-even, exactly as torch's cast (c10) does it.

    Only used under the interpreter, whose own cast is wrong. Normal results round the float32 mantissa in
    integer arithmetic; subnormal results come from adding a power of two whose ulp is the FP8 subnormal step.
    Too large values and infinities saturate to 448 in E4M3 (it has no infinity, as torch >= 2.13 and the
    hardware's conversion do) and become infinite in E5M2.
    """
    if IS_E4M3:
        MAN: tl.constexpr = 3
        BIAS: tl.constexpr = 7
        MAX_CODE: tl.constexpr = 0x7E
        OVER_CODE: tl.constexpr = 0x7E  # saturate: E4M3 has no infinity
        INF_CODE: tl.constexpr = 0x7E
        MAGIC: tl.constexpr = 16384.0  # 2**14: its float32 ulp is 2**-9, E4M3's subnormal step
    else:
        MAN: tl.constexpr = 2
        BIAS: tl.constexpr = 15
        MAX_CODE: tl.constexpr = 0x7B
        OVER_CODE: tl.constexpr = 0x7C
        INF_CODE: tl.constexpr = 0x7C
        MAGIC: tl.constexpr = 128.0  # 2**7: its float32 ulp is 2**-16, E5M2's subnormal step
    SHIFT: tl.constexpr = 23 - MAN
    MAGIC_BITS: tl.constexpr = (127 + 24 - BIAS - MAN) << 23
    MIN_NORMAL_BITS: tl.constexpr = (127 + 1 - BIAS) << 23
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    absb = bits & 0x7FFFFFFF
    odd = (absb >> SHIFT) & 1
    normal = ((absb + ((1 << (SHIFT - 1)) - 1) + odd) >> SHIFT) - ((127 - BIAS) << MAN)
    absf = absb.to(tl.float32, bitcast=True)
    sub = (absf + MAGIC).to(tl.int32, bitcast=True) - MAGIC_BITS
    code = tl.where(absb < MIN_NORMAL_BITS, sub, normal)
    code = tl.where(code > MAX_CODE, OVER_CODE, code)
    code = tl.where(absb == 0x7F800000, INF_CODE, code)
    code = tl.where(absb > 0x7F800000, 0x7F, code)
    return (code | sign).to(tl.uint8)


@triton.jit
def _store_fp8(ptrs, v, mask, IS_E4M3: tl.constexpr, EMULATE: tl.constexpr):
    """Cast float32 ``v`` to FP8 and store it; ``ptrs`` point to uint8 under EMULATE, to the FP8 dtype else."""
    if EMULATE:
        tl.store(ptrs, _fp8_bits_rne(v, IS_E4M3), mask=mask)
    else:
        # The hardware conversion (cvt.rn.satfinite) saturates infinities to the largest finite value: what we
        # want for E4M3, which has none. E5M2 has infinities and keeps them, as torch's cast does: one select.
        if IS_E4M3:
            y = v.to(tl.float8e4nv)
        else:
            is_inf = tl.abs(v) == float("inf")
            y = v.to(tl.float8e5).to(tl.uint8, bitcast=True)
            y = tl.where(is_inf, tl.where(v > 0, 0x7C, 0xFC).to(tl.uint8), y)
            y = y.to(tl.float8e5, bitcast=True)
        tl.store(ptrs, y, mask=mask)


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
# Launch heuristics: memory-bound kernels want 4-16 K elements per program and enough programs to fill the GPU.
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _tile_config(r: int, c: int, elements: int = 8192) -> dict[str, int]:
    block_c = min(next_pow2(c), elements)
    block_r = max(1, min(next_pow2(r), elements // block_c))
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": 8 if block_r * block_c >= 4096 else 4}


@functools.lru_cache(maxsize=4096)
def _lines_config(r: int, c: int, reduce_rows: bool) -> dict[str, int]:
    if reduce_rows:  # per-column scales: a strip of columns per program, walking all rows
        block_c = min(next_pow2(c), 64)
        block_r = min(next_pow2(r), 64)
        return {"BLOCK_R": block_r, "BLOCK_C": block_c, "SINGLE": r <= block_r, "num_warps": 4}
    block_c = min(next_pow2(c), 8192)  # a whole row of up to 8192 stays in registers: one read
    block_r = max(1, min(next_pow2(r), 4096 // block_c))
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "SINGLE": c <= block_c,
            "num_warps": 8 if block_r * block_c >= 4096 else 4}


# --------------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------------


def _check_block_size(block_size: object, role: str) -> tuple[int, int]:
    if block_size is None:
        return ACTIVATION_BLOCK if role == "activation" else WEIGHT_BLOCK
    size = tuple(block_size) if isinstance(block_size, (tuple, list)) else block_size
    if size not in (ACTIVATION_BLOCK, WEIGHT_BLOCK):
        raise InvalidArgumentError(
            f"block_size: expected {ACTIVATION_BLOCK} (activations) or {WEIGHT_BLOCK} (weights), got {block_size!r}"
        )
    return size  # type: ignore[return-value]


def scale_shape(shape: tuple[int, ...], granularity: str, block_size: tuple[int, int] | None = None,
                role: str = "activation") -> tuple[int, ...]:
    """The shape of the scale ``quantize_fp8`` returns for a tensor of ``shape``.

    ``tensor``: ``(1,)``; ``row``: ``(*shape[:-1], 1)``; ``channel`` (2-D ``[K, N]``): ``(1, N)``; ``block``
    (2-D): ``(ceil(M / bm), ceil(K / bk))`` for ``block_size = (bm, bk)``.
    """
    check_choice(granularity, "granularity", GRANULARITIES)
    if granularity == "tensor":
        return (1,)
    if granularity == "row":
        return (*shape[:-1], 1)
    if granularity == "channel":
        return (1, shape[1])
    bm, bk = _check_block_size(block_size, role)
    return (cdiv(shape[0], bm), cdiv(shape[1], bk))


_FP8_OK: dict[int, bool] = {}


def _fp8_ok(device: torch.device) -> bool:
    # A GPU's capability never changes: ask once per CUDA device (this is on every call's path).
    if device.type != "cuda":
        return supports_fp8(device)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    ok = _FP8_OK.get(idx)
    if ok is None:
        ok = _FP8_OK[idx] = supports_fp8(torch.device("cuda", idx))
    return ok


def _validate(t, fmt, granularity, scale, block_size, role):
    check_tensor(t, "t")
    fmt = FP8Format.from_name(fmt)
    check_choice(granularity, "granularity", GRANULARITIES)
    check_choice(role, "role", ROLES)
    check_dtype(t, "t", FLOAT_DTYPES)
    if granularity in ("channel", "block"):
        check_ndim(t, "t", exact=2)
    else:
        check_ndim(t, "t", minimum=1)
    if block_size is not None and granularity != "block":
        raise InvalidArgumentError(f"block_size: only applies to granularity 'block', got granularity {granularity!r}")
    block = _check_block_size(block_size, role) if granularity == "block" else None
    check_kernel_device(t, "t")
    if not _fp8_ok(t.device):
        name = torch.cuda.get_device_name(t.device) if t.device.type == "cuda" else str(t.device)
        raise UnsupportedDtypeError(
            f"t: FP8 needs a GPU with FP8 tensor cores (compute capability 8.9 or higher), got {name}"
        )
    expected = scale_shape(tuple(t.shape), granularity, block, role)
    if scale is not None:
        check_tensor(scale, "scale")
        check_same_device(t=t, scale=scale)
        check_dtype(scale, "scale", (torch.float32,))
        ok = scale.numel() == 1 if granularity == "tensor" else tuple(scale.shape) == expected
        if not ok:
            raise ShapeMismatchError(
                f"scale: expected shape {list(expected)} for granularity {granularity!r} and t of shape "
                f"{list(t.shape)}, got {list(scale.shape)}"
            )
    return fmt, block, expected


def _row_major(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 or t.shape[-1] == 1


def _column_major(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[0] > 1 and t.stride(0) == 1 and t.stride(1) >= t.shape[0]


def _as_rows(t: torch.Tensor, mode: int) -> torch.Tensor:
    """``t`` as the row-major 2-D problem the kernels read (``mode``: see ``_QuantPlan``)."""
    if mode == 0:
        return t
    if mode == 1:
        return t.t()
    if mode == 2:
        return t.contiguous()
    x = t.reshape(-1, t.shape[-1])
    return x if mode == 3 else x.contiguous()


class _QuantPlan:
    """Everything but the tensors of one ``quantize_fp8`` call signature: how ``t`` becomes the row-major 2-D
    problem, how the given scale reaches the kernel, the launches and the output views.

    ``x_mode``: 0 ``t``, 1 ``t.t()`` (column-major input), 2 ``t.contiguous()``, 3 ``t.reshape(-1, C)``, 4 the
    reshape made contiguous. ``given_mode``: 0 the given scale as is (its elements already lie in the order the
    kernel reads), 1 flattened and contiguous, 2 contiguous, 3 transposed then contiguous.
    """

    __slots__ = ("x_mode", "given_mode", "gran", "dtype", "emulate", "r", "c", "scale_shape", "launches",
                 "transposed", "out_shape", "expected", "has_given", "fmt", "granularity", "reshape", "delayed")

    def run(self, t: torch.Tensor, given: torch.Tensor | None,
            delayed: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(q, scale, overflow_count)`` in the caller's layout; ``overflow_count`` is a device int32 tensor
        (None without a given scale). ``delayed``: the (history, state) buffers of a ``DelayedScaler``."""
        x = _as_rows(t, self.x_mode)
        device = t.device
        q = torch.empty((self.r, self.c), dtype=self.dtype, device=device)
        flag = None
        if not self.launches:  # nothing to read: every (empty) group has amax 0, hence scale 1
            s = torch.ones(self.scale_shape, dtype=torch.float32, device=device)
        else:
            q_arg = q.view(torch.uint8) if self.emulate else q
            s = torch.empty(self.scale_shape, dtype=torch.float32, device=device)
            g = given
            if self.has_given:
                gm = self.given_mode
                if gm == 1:
                    g = given.reshape(-1).contiguous()
                elif gm == 2:
                    g = given.contiguous()
                elif gm == 3:
                    g = given.t().contiguous()
            if self.has_given or delayed is not None:
                # Other granularities count overflowing groups with atomics (a zeroed counter); the per-tensor
                # kernel stores its one flag (no memset launch: it cost 8 % of a 4096 x 4096 cast).
                alloc = torch.empty if self.gran == "tensor" else torch.zeros
                flag = alloc(1, dtype=torch.int32, device=device)
            gran = self.gran
            if gran == "tensor" and len(self.launches) == 2:  # a given scale, grid kernel and fix-up
                over = _scratch.scratch("quantize.over", device, 2, torch.int32, zeroed=True)
                self.launches[0].launch(x, q_arg, g, over)
                self.launches[1].launch(x, q_arg, s, g, flag, over)
            elif gran == "tensor":
                hist, sync = delayed if delayed is not None else (s, _scratch.scratch(
                    "quantize.sync", device, 4, torch.int32, zeroed=True))
                _launch_coop(self, x, q_arg, s, g if self.has_given else s, flag if flag is not None else s, hist,
                             sync)
            else:
                self.launches[0].launch(x, q_arg, s, g if self.has_given else s, flag if self.has_given else s)
        if self.transposed:
            return q.t(), (s.t().contiguous() if self.gran != "tensor" else s), flag
        if self.reshape:
            return q.view(self.out_shape), s.view(self.expected), flag
        return q, s, flag


def _plan_2d(plan: _QuantPlan, x: torch.Tensor, fmt: FP8Format, granularity: str, block) -> None:
    """The launches of a row-major ``x`` ``[R, C]`` (kernels, grids and scalar tails)."""
    r, c = x.shape
    emulate = is_interpreter()
    plan.r, plan.c, plan.gran, plan.dtype, plan.emulate = r, c, granularity, fmt.torch_dtype, emulate
    if granularity in ("row", "channel"):
        plan.scale_shape = (1, c) if granularity == "channel" else (r, 1)
    elif granularity == "block":
        plan.scale_shape = (cdiv(r, block[0]), cdiv(c, block[1]))
    else:
        plan.scale_shape = (1,)
    if r == 0 or c == 0:
        plan.launches = ()
        return
    has_given = plan.has_given
    max_value, is_e4m3 = fmt.max_value, fmt.name == "e4m3"
    stride_xr = x.stride(0) if r > 1 else c
    # Constexprs go positionally, in each kernel's signature order (the direct launcher takes every argument).
    if granularity in ("row", "channel"):
        reduce_rows = granularity == "channel"
        cfg = _lines_config(r, c, reduce_rows)
        n_prog = cdiv(c, cfg["BLOCK_C"]) if reduce_rows else cdiv(r, cfg["BLOCK_R"])
        tail = (r, c, stride_xr, c, max_value, reduce_rows, has_given, is_e4m3, emulate, cfg["BLOCK_R"],
                cfg["BLOCK_C"], cfg["SINGLE"])
        plan.launches = (Plan(_quant_lines_kernel, (n_prog,), tail, cfg["num_warps"]),)
    elif granularity == "block":
        bm, bk = block
        block_r = 32 if bm == 1 else bm
        tail = (r, c, stride_xr, c, cdiv(c, bk), max_value, bm, has_given, is_e4m3, emulate, block_r, bk)
        plan.launches = (Plan(_quant_blocks_kernel, (cdiv(r, block_r), cdiv(c, bk)), tail, 8 if bm > 1 else 4),)
    else:
        # A contiguous tensor is one long row: long tiles, no row masks.
        flat = x.is_contiguous()
        rr, cc, sr = (1, r * c, r * c) if flat else (r, c, stride_xr)
        cfg = _tile_config(rr, cc, _TENSOR_TILE)
        br, bc = cfg["BLOCK_R"], cfg["BLOCK_C"]
        tiles_c = cdiv(cc, bc)
        n_tiles = cdiv(rr, br) * tiles_c
        progs = 1 if emulate else min(n_tiles, _TENSOR_PROGS_PER_SM * sm_count(x.device, cpu=1))
        if has_given and not plan.delayed and n_tiles > _GIVEN_GRID_TILES_PER_PROG * progs:
            # A given scale on a large tensor: a plain grid that casts and flags overflowing tiles, then a small
            # launch that stores the scale and re-casts only after an overflow (_quant_tensor_given_kernel).
            # No grid barrier, so no program waits for the slowest: 95 % of copy at 8192^2 bf16 on the H100
            # against 89 % cooperative. It costs one more launch on the host (10-30 us on the benchmark
            # machine), which smaller tensors do not earn back: 4096^2 gains 2 us on the device (88 % vs 82 %).
            consts = (max_value, is_e4m3, emulate, br, bc)
            fix_progs = min(n_tiles, 2 if emulate else sm_count(x.device, cpu=1))
            plan.launches = (
                Plan(_quant_tensor_given_kernel, (n_tiles,), (rr, cc, sr, cc, tiles_c, *consts), cfg["num_warps"]),
                Plan(_quant_tensor_given_fixup_kernel, (fix_progs,), (rr, cc, sr, cc, tiles_c, n_tiles, *consts),
                     cfg["num_warps"]),
            )
            return
        # One cooperative launch (see _quant_tensor_coop_kernel).
        hist_len, margin_mul = plan.delayed or (1, 1.0)
        mode = 2 if plan.delayed else 1 if has_given else 0
        tail = (rr, cc, sr, cc, tiles_c, n_tiles, hist_len, margin_mul, max_value, mode, is_e4m3, emulate, br, bc,
                next_pow2(hist_len), True)
        options = {} if emulate else {"launch_cooperative_grid": True}
        plan.launches = (Plan(_quant_tensor_coop_kernel, (progs,), tail, cfg["num_warps"], **options),)


def _launch_coop(plan: _QuantPlan, *tensors: torch.Tensor) -> None:
    """Launch the cooperative per-tensor kernel; if the GPU cannot keep that many programs resident (the launch
    is refused before anything runs), halve the programs for good and retry."""
    launch = plan.launches[0]
    try:
        launch.launch(*tensors)
    except RuntimeError as exc:
        if "cooperative" not in str(exc) or launch.grid[0] <= 1:
            raise
        plan.launches = (Plan(launch.kernel, (max(1, launch.grid[0] // 2),), launch.tail, launch.num_warps,
                              **launch.options),)
        _launch_coop(plan, *tensors)


def _build_plan(t: torch.Tensor, fmt: FP8Format, granularity: str, given: torch.Tensor | None, block,
                expected: tuple[int, ...], delayed: tuple[int, float] | None = None) -> _QuantPlan:
    """The plan of a validated call (the layout decisions of the quantization, taken once per signature).
    ``delayed``: (history length, 2**margin) of a DelayedScaler (per-tensor only)."""
    plan = _QuantPlan()
    plan.delayed = delayed
    plan.fmt, plan.granularity, plan.expected, plan.has_given = fmt, granularity, expected, given is not None
    plan.transposed = False
    plan.out_shape = t.shape
    transpose_given = False
    if t.dim() == 2 and not _row_major(t) and _column_major(t):
        # A column-major [K, N] operand (a weight stored [N, K] and passed as w.t()) is a row-major [N, K]
        # problem with the roles of rows and columns swapped: read it along its contiguous dimension.
        gran = {"row": "channel", "channel": "row"}.get(granularity, granularity)
        blk = (block[1], block[0]) if block is not None else None
        if blk is not None and blk not in (ACTIVATION_BLOCK, WEIGHT_BLOCK):
            plan.x_mode, gran, blk = 2, granularity, block
        else:
            plan.x_mode, plan.transposed = 1, True
            transpose_given = given is not None and granularity != "tensor"
    else:
        gran, blk = granularity, block
        if t.dim() == 2 and _row_major(t):
            plan.x_mode = 0
        else:
            plan.x_mode = 3 if _row_major(t.reshape(-1, t.shape[-1])) else 4
    x = _as_rows(t, plan.x_mode)
    plan.given_mode = 0
    if given is not None:
        g = given.t() if transpose_given else given
        if gran == "block":
            plan.given_mode = 0 if g.is_contiguous() else (3 if transpose_given else 2)
        elif gran == "tensor" or g.is_contiguous():
            plan.given_mode = 0  # one value, or the groups' scales already in line order
        else:
            plan.given_mode = 1
    _plan_2d(plan, x, fmt, gran, blk)
    # the views of the outputs, skipped when they would not change the shape (views cost on the hot path)
    plan.reshape = tuple(plan.out_shape) != (plan.r, plan.c) or tuple(expected) != tuple(plan.scale_shape)
    return plan


_PLANS = PlanCache()


def _put(key: tuple | None, plan):
    if key is not None:
        try:
            _PLANS.put(key, plan)
        except TypeError:  # an unhashable option (a list block_size): no caching, same results
            pass
    return plan


def _quantize(t, fmt, granularity, scale, block_size, strict, role):
    try:
        key = call_key(t, fmt, granularity, scale, block_size, role)
    except (AttributeError, RuntimeError, TypeError):  # not tensors: validation says which
        key = None
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        fmt_, block, expected = _validate(t, fmt, granularity, scale, block_size, role)
        plan = _put(key, _build_plan(t, fmt_, granularity, scale, block, expected))
    q, s, flag = plan.run(t, scale)
    _check_overflow(strict, flag, granularity, plan.fmt)
    return q, s


def _check_overflow(strict: bool, flag: torch.Tensor | None, granularity: str, fmt: FP8Format) -> None:
    if strict and flag is not None:  # the one host synchronization, only when asked for
        if capturing(flag.device):
            raise InvalidArgumentError(
                "strict: True reads the overflow count on the host, which a CUDA-graph capture does not allow; "
                "pass strict=False inside a captured region (the returned scale shows any raised group)")
        n_over = int(flag.item())
        if n_over:
            raise NumericalOverflowError(
                f"t: {n_over} scale group(s) ({granularity}) exceed the {fmt.name} range (max {fmt.max_value:g}, "
                f"values up to {fmt.overflow_threshold:g} round to it) with the given scale; pass strict=False to "
                "have the scale raised instead"
            )


def _quantize_delayed(t: torch.Tensor, fmt: FP8Format, hist: torch.Tensor, state: torch.Tensor, margin: int,
                      strict: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor E4M3/E5M2 with a delayed scale, in one launch: the kernel derives the scale from the amax
    history ``hist`` and records this call's amax there (``state``: the kernel's barrier words and call count)."""
    try:
        key = call_key(t, fmt, "delayed", hist.numel(), margin)
    except (AttributeError, RuntimeError, TypeError):
        key = None
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        fmt_, _, expected = _validate(t, fmt, "tensor", None, None, "activation")
        plan = _put(key, _build_plan(t, fmt_, "tensor", None, None, expected,
                                     delayed=(hist.numel(), float(2**margin))))
    q, s, flag = plan.run(t, None, (hist, state))
    _check_overflow(strict, flag, "tensor", plan.fmt)
    return q, s


def _activation_plan(x: torch.Tensor, granularity: str) -> _QuantPlan:
    """E4M3 with dynamic scales for a validated 2-D row-major activation (FP8Linear: no re-validation)."""
    block = ACTIVATION_BLOCK if granularity == "block" else None
    return _build_plan(x, FP8Format.E4M3, granularity, None, block,
                       scale_shape(tuple(x.shape), granularity, block, "activation"))


def quantize_fp8(
    t: torch.Tensor,
    fmt: str | FP8Format | torch.dtype = "e4m3",
    granularity: str = "tensor",
    *,
    scale: torch.Tensor | None = None,
    block_size: tuple[int, int] | None = None,
    strict: bool = False,
    role: str = "activation",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``t`` to FP8; returns ``(quantized, scale)`` with ``dequantized = quantized.float() * scale``.

    Args:
        t: fp16, bf16 or fp32; any rank for ``tensor`` and ``row``, 2-D for ``channel`` and ``block``. A 2-D
            column-major ``t`` (e.g. ``linear.weight.t()``) is read along its contiguous dimension and the
            result keeps that layout (``quantized.t()`` is then contiguous).
        fmt: ``"e4m3"`` (``torch.float8_e4m3fn``, max 448) or ``"e5m2"`` (``torch.float8_e5m2``, max 57344).
        granularity: ``"tensor"`` (scale ``[1]``), ``"row"`` (per token: ``[M, 1]``, or ``[*lead, 1]``),
            ``"channel"`` (per output column of a ``[K, N]`` weight used as ``a @ b``: ``[1, N]``; for an
            ``nn.Linear`` weight ``[out, in]`` pass ``weight.t()``, one scale per output feature) or ``"block"``
            (``[ceil(M/bm), ceil(K/bk)]``). These are the shapes ``fp8_gemm`` accepts.
        scale: a given scale of that shape (float32), used as is unless some value of its group would not
            round to the format's largest value (``FP8Format.overflow_threshold``: 464 for E4M3); that group's
            scale is then raised to ``amax / max_value`` so nothing clips, and the returned scale says so. A
            non-positive or non-finite given scale counts as overflowing.
        block_size: ``(1, 128)`` (activations, DeepSeek-V3 style) or ``(128, 128)`` (weights); default by ``role``.
        strict: raise ``NumericalOverflowError`` when a given scale had to be raised (synchronizes the GPU).
        role: ``"activation"`` or ``"weight"``: picks the default ``block_size``.

    Without a given scale the absolute maximum of each group is computed in the kernel (non-finite values
    excluded); an all-zero group gets scale 1. NaN stays NaN.

    Registered as ``torch.ops.triton_ops.quantize_fp8`` (``fmt`` as its name, ``block_size`` as a list). With
    ``strict=True`` the call synchronizes with the GPU, which a CUDA-graph capture does not allow.
    """
    if direct_call_ok(t, scale):  # plain eager: no dispatcher round trip
        return _quantize(t, fmt, granularity, scale, block_size, strict, role)
    return _quantize_op(t, FP8Format.from_name(fmt).name, granularity, scale,
                        None if block_size is None else list(block_size), strict, role)


@torch.library.custom_op(op_name("quantize_fp8"), mutates_args=())
def _quantize_op(t: torch.Tensor, fmt: str, granularity: str, scale: torch.Tensor | None,
                 block_size: list[int] | None, strict: bool, role: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = _quantize(t, fmt, granularity, scale, None if block_size is None else tuple(block_size), strict, role)
    # the op's outputs must not alias its inputs: a given per-tensor scale kept as is comes back as a copy
    return q, (s.clone() if s is scale else s)


@_quantize_op.register_fake
def _(t, fmt, granularity, scale, block_size, strict, role):
    block = _check_block_size(block_size, role) if granularity == "block" else None
    s = t.new_empty(scale_shape(tuple(t.shape), granularity, block, role), dtype=torch.float32)
    dtype = FP8Format.from_name(fmt).torch_dtype
    if _keeps_column_major(t, granularity, block):
        return t.new_empty(t.shape[::-1], dtype=dtype).t(), s
    return t.new_empty(t.shape, dtype=dtype), s


def _keeps_column_major(t: torch.Tensor, granularity: str, block: tuple[int, int] | None) -> bool:
    """Whether the result of ``t`` comes back column-major (see ``_build_plan``)."""
    if not (t.dim() == 2 and not _row_major(t) and _column_major(t)):
        return False
    return granularity != "block" or (block[1], block[0]) in (ACTIVATION_BLOCK, WEIGHT_BLOCK)


# --------------------------------------------------------------------------------------------------------------
# Dequantization
# --------------------------------------------------------------------------------------------------------------


def expand_scale(scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Broadcast a scale of any granularity to ``shape`` (block scales repeat over their 128-wide blocks).

    Per dimension, a scale size equal to the tensor's is per element, 1 is the whole dimension, and
    ``ceil(n / 128)`` is 128-wide blocks (the cases coincide only where they mean the same thing).
    """
    if scale.numel() == 1:
        return scale.reshape(()).expand(shape)
    if scale.dim() != len(shape):
        raise ShapeMismatchError(
            f"scale: expected {len(shape)} dimensions (or one value) for a tensor of shape {list(shape)}, "
            f"got shape {list(scale.shape)}"
        )
    out = scale
    for dim, (s, n) in enumerate(zip(scale.shape, shape)):
        if s in (n, 1):
            continue
        if s == cdiv(n, SCALE_BLOCK):
            out = out.repeat_interleave(SCALE_BLOCK, dim=dim).narrow(dim, 0, n)
            continue
        raise ShapeMismatchError(
            f"scale: size {s} in dimension {dim} fits neither {n} (per element), 1 (whole dimension) nor "
            f"{cdiv(n, SCALE_BLOCK)} ({SCALE_BLOCK}-wide blocks) for a tensor of shape {list(shape)}"
        )
    return out.expand(shape)


def dequantize_fp8(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The exact inverse of :func:`quantize_fp8`'s scaling: ``(quantized.float() * scale).to(dtype)``.

    ``scale`` may have any granularity ``quantize_fp8`` returns; the product is formed in float32 and rounded
    once to ``dtype`` (fp16, bf16 or fp32).

    Registered as ``torch.ops.triton_ops.dequantize_fp8``, a composite of PyTorch operations
    (CompositeImplicitAutograd): ``torch.compile`` fuses it with its neighbours and autograd differentiates it.
    """
    if direct_call_ok(quantized, scale):
        return _dequantize(quantized, scale, dtype)
    return torch.ops.triton_ops.dequantize_fp8(quantized, scale, dtype)


def _dequantize(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    check_tensor(quantized, "quantized")
    check_tensor(scale, "scale")
    check_dtype(quantized, "quantized", FP8_DTYPES)
    check_dtype(scale, "scale", (torch.float32,))
    check_same_device(quantized=quantized, scale=scale)
    if dtype not in FLOAT_DTYPES:
        raise UnsupportedDtypeError(
            f"dtype: expected float16, bfloat16 or float32, got {str(dtype).removeprefix('torch.')}"
        )
    return (quantized.float() * expand_scale(scale, tuple(quantized.shape))).to(dtype)


torch.library.define(op_name("dequantize_fp8"), "(Tensor quantized, Tensor scale, ScalarType dtype) -> Tensor")
torch.library.impl(op_name("dequantize_fp8"), "CompositeImplicitAutograd", func=_dequantize)


def fp8_max(fmt: str | FP8Format | torch.dtype = "e4m3") -> float:
    """The largest finite value of the format (448 for E4M3, 57344 for E5M2)."""
    return FP8Format.from_name(fmt).max_value


__all__ = [
    "ACTIVATION_BLOCK",
    "GRANULARITIES",
    "WEIGHT_BLOCK",
    "dequantize_fp8",
    "expand_scale",
    "fp8_max",
    "quantize_fp8",
    "scale_shape",
]
