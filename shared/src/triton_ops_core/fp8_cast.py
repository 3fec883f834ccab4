"""FP8 casts and scales inside Triton kernels, shared by every package that writes FP8 (``@triton.jit`` helpers).

One convention everywhere (``fp8_gemm.quantize``'s docstring has it in full)::

    scale = amax / fmt.max_value (float32, IEEE division; 1.0 where amax == 0)
    quantized = fp8(x.float() * (1.0 / scale))

Only finite values enter an absolute maximum; E4M3 saturates (it has no infinity), E5M2 keeps infinities; NaN stays
NaN. Triton's interpreter casts float32 to FP8 wrongly, so kernels pass ``EMULATE`` (``device.is_interpreter()``)
and round in integer arithmetic there (``fp8_bits_rne``), storing through a ``uint8`` view of the output.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def group_scale(amax, given, HAS_GIVEN: tl.constexpr, MAX_VALUE: tl.constexpr):
    """Scale, its reciprocal and an overflow flag for scale groups with absolute maximum ``amax``.

    With a given scale the group keeps it unless ``amax * (1/given)`` would not round to the format's largest
    value (``overflows``), or the given scale is not a positive finite number; then the group falls back to the
    dynamic scale, so nothing clips.
    """
    dyn = tl.math.div_rn(amax, tl.full(amax.shape, MAX_VALUE, tl.float32))
    dyn = tl.where(amax > 0, tl.maximum(dyn, 2.0**-126), 1.0)
    if HAS_GIVEN:
        inv_given = tl.math.div_rn(tl.full(given.shape, 1.0, tl.float32), given)
        bad = (given <= 0) | (given != given) | (inv_given == 0)
        over = bad | overflows(amax * inv_given, MAX_VALUE)
        scale = tl.where(over, dyn, given)
    else:
        over = amax < 0  # all False, with amax's shape
        scale = dyn
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    return scale, inv, over


@triton.jit
def overflows(v, MAX_VALUE: tl.constexpr):
    """Whether a scaled absolute value ``v`` no longer rounds to the format's largest value: E4M3 (max 448)
    above 464, E5M2 (max 57344) from 61440, where the cast turns to infinity (``FP8Format.overflow_threshold``).
    Values between the largest value and the threshold only round, so a given scale that yields them holds."""
    bound = 61439.99609375
    if MAX_VALUE == 448.0:
        bound = 464.0
    return v > bound


@triton.jit
def finite_abs(x):
    """|x| with NaN and infinities replaced by 0: non-finite values never set a scale."""
    a = tl.abs(x)
    return tl.where(a < float("inf"), a, 0.0)


@triton.jit
def fp8_bits_rne(v, IS_E4M3: tl.constexpr):
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
def store_fp8(ptrs, v, mask, IS_E4M3: tl.constexpr, EMULATE: tl.constexpr):
    """Cast float32 ``v`` to FP8 and store it; ``ptrs`` point to uint8 under EMULATE, to the FP8 dtype else."""
    if EMULATE:
        tl.store(ptrs, fp8_bits_rne(v, IS_E4M3), mask=mask)
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


@triton.jit
def to_e4m3(v, EMULATE: tl.constexpr):
    """float32 -> E4M3 in registers, bit-identical to ``store_fp8``'s (saturating, NaN kept)."""
    if EMULATE:
        return fp8_bits_rne(v, True).to(tl.float8e4nv, bitcast=True)
    return v.to(tl.float8e4nv)


@triton.jit
def pow2(e):
    """``2 ** e`` in fp32, exactly, for integer ``e`` in [-126, 127] (the exponent field written directly)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def rows_to_f16(x):
    """A ``[rows, K]`` tile of 16-bit (or fp32) activations as fp16, exactly, and the fp32 ``[rows]`` factors that
    undo the scaling: ``x[r] == x16[r] * back[r]``.

    For FP8 weights on fp16 tensor cores (E4M3 / E5M2 convert to fp16 in one packed instruction per two weights, to
    bf16 in two). Each row is scaled by a power of two that puts its largest magnitude in [2^14, 2^15): inside
    fp16's range, so every bf16 value of the row down to about 2^-29 of its largest is an fp16 value after scaling
    (smaller ones round). A row holding Inf or NaN keeps it; an all-zero row stays zero."""
    xf = x.to(tl.float32)
    amax = tl.max(tl.abs(xf), axis=1)
    # floor(log2(amax)) - 14 from the exponent field; an all-zero row (and Inf / NaN) land anywhere in range
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - 14
    e = tl.minimum(tl.maximum(e, -126), 126)
    return (xf * pow2(-e)[:, None]).to(tl.float16), pow2(e)
