"""Triton kernels of the mixture of experts: routing, grouping by expert, two grouped GEMMs, the combine.

One forward is five launches (six with the router GEMM split at decode, seven in prefill), all of a size fixed by
(tokens, top_k, experts) so that nothing waits for the host (no sync on the routing result; CUDA-graph safe):

1. ``_route_kernel``: router logits ``x @ Wr^T + br`` for ``BLOCK_T`` tokens (every expert in one tile, fp32
   accumulation, rounded to the input dtype as the model's ``F.linear`` does), top-k by repeated arg-max (ties go
   to the lowest expert index), softmax over the k chosen (or, without renormalization, the full softmax taken at
   the k chosen). Writes ``topk_ids [T, k]`` (int32) and ``topk_weights [T, k]`` (fp32). At decode the GEMM may
   run before it over many programs (``_router_split_kernel``, partial sums over K ranges, added in a fixed order),
   or (``FINISH``, plain eager calls) be the whole routing: its last program per token block selects.
2. ``_align_kernel`` (one program; past ``ALIGN_CHUNK`` pairs ``_align_count_kernel``, ``_align_scan_kernel``
   and ``_align_scatter_kernel``: a program per chunk of pairs around a one-program scan): groups the
   ``P = T * k`` (token, slot) pairs by expert. Counts per expert, exclusive offsets, and a stable order:
   ``sorted_pair[offsets[e] + r]`` is the r-th pair (in pair order) routed to expert ``e``. It also writes the
   tile table of the grouped GEMMs: tile ``i`` covers sorted rows ``tile_start[i] ..`` of expert
   ``tile_expert[i]``, ``-1`` past the last tile. Experts without a token get no tile, so their weights are never
   read. Integer work only: no float atomics anywhere.
3. ``_gate_up_kernel``: program ``(i, n)`` computes ``BLOCK_M`` sorted rows x ``BLOCK_N`` intermediate columns
   of both projections of expert ``tile_expert[i]``, gathering its tokens' rows of ``x``; bias and the activation
   (clamped SwiGLU, SiLU, GELU) in the epilogue; writes ``h [P, I]`` (sorted row order, input dtype). At decode
   the tiles have 16 rows (one per expert hit up to 16 tokens: each (expert, N-tile) program streams its slice of
   the expert's weights once for all the expert's tokens), or one row on the CUDA cores (``USE_FMA``).
4. ``_down_kernel``: the same tiles over ``h``: ``(h @ W2[e] + b2[e]) * topk_weight`` in fp32, written to
   ``y [P * SPLIT_K, H]`` at the pair's own row (``(token * k + slot) * SPLIT_K + split``; ``SPLIT_K`` programs
   share a tile along K at decode).
5. ``_combine_kernel``: ``out[t] = sum_j y[t * k + j]`` in a fixed order (j = 0..k-1): deterministic. With the
   down GEMM split along K (decode), each pair has one row per split, summed in the same fixed order. After tiles of
   one pair each (one-row tiles, one token) the down GEMM does this itself (``FINISH``: the last program of each
   (token, column tile) to arrive).

FP8 activations (W8A8, ``fp8_activations=True`` with E4M3 experts): ``_quant_rows_kernel`` quantizes the tokens'
rows before kernel 3 and the intermediate rows before kernel 4 (E4M3, one fp32 scale a row); both grouped GEMMs then
take E4M3 operands on both sides (Hopper's FP8 tensor cores read the weight tiles as loaded, with no conversion in
registers when the weights are stored K-major: ``quantize_experts_fp8(k_major=True)``) and apply the row's scale
beside the column's to the fp32 sum (``A_SCALED``). At decode the tokens' rows are quantized by programs of the
grouping's launch instead (``_align_quant_kernel``). Switches of ``MoEConfig``: the intermediate quantized inside
kernel 4 with scales from shares kernel 3 writes (``H_AMAX`` / ``A_AMAX``), the products with the weight tile as
the 64-row wgmma operand (``SWAP_AB``, ``_k_loop_swap``), both quantizations inside the GEMMs (``QUANT_A``).

Weights are addressed through their strides, so transformers' layouts are read where they lie: gpt-oss's
``gate_up_proj [E, H, 2I]`` (gate and up interleaved column by column) and ``down_proj [E, I, H]``, or
Qwen3-MoE / Mixtral's ``[E, 2I, H]`` (gate rows, then up rows) and ``[E, H, I]``. A stride of 1 is specialized by
Triton's JIT, so whichever dimension is contiguous gets the wide loads.

Everything after a dot happens in fp32 (the interpreter's bf16 arithmetic is unreliable; on a GPU it is the
accumulator's type anyway); ``UPCAST`` (interpreter only) also feeds fp32 operands to ``tl.dot``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton_ops_core.fp8_cast import finite_abs, group_scale, rows_to_f16, store_fp8, to_e4m3
from triton_ops_core.pdl import pdl_launch_dependents, pdl_release, pdl_streamed, pdl_wait, prefetch_rows
from triton_ops_core.rms_prologue import normalized, row_rstd

# Activation codes (constexpr): the host maps names to these.
ACT_SWIGLU_OAI = 0
ACT_SILU = 1
ACT_GELU = 2
ACT_GELU_TANH = 3


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _f16_dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` on fp16 tensor cores for an FP8 weight tile ``b`` and bf16 activations ``a`` (config
    ``f16_dot``): E4M3 / E5M2 convert to fp16 in one packed instruction per two weights, to bf16 in two. The
    activation rows go to fp16 instead, exactly (``rows_to_f16``: each row of the step's tile scaled by a power of two
    into fp16's range; a row holding Inf or NaN keeps it), and the step's products are scaled back in fp32."""
    a16, back = rows_to_f16(a)
    if UPCAST:  # interpreter: fp32 operands holding the same values (its 16-bit dot is wrong)
        a16 = a16.to(tl.float32)
        b16 = b.to(tl.float32)
    else:
        b16 = b.to(tl.float16)  # E4M3 / E5M2 -> fp16: exact, Inf and NaN kept
    return acc + tl.dot(a16, b16, input_precision=DOT_PRECISION) * back[:, None]


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, F16_DOT: tl.constexpr = False):
    """``acc + a @ b``. An FP8 weight tile ``b`` (weight-only FP8 experts) is converted to ``a``'s dtype first:
    exact, since every E4M3 / E5M2 value is an fp16, bf16 and fp32 value. ``F16_DOT``: ``_f16_dot`` instead."""
    if F16_DOT:
        return _f16_dot(a, b, acc, DOT_PRECISION, UPCAST)
    if UPCAST:  # interpreter only: its 16-bit dot is wrong, fp32 operands give the exact products
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    elif b.dtype != a.dtype:
        if b.dtype == tl.float8e5 and a.dtype == tl.bfloat16:
            # Triton's direct E5M2 -> bf16 conversion rebiases the exponent in integer arithmetic, which turns the
            # Inf and NaN codes finite; through fp16 (a byte shift, then a hardware conversion) they stay.
            b = b.to(tl.float16)
        b = b.to(a.dtype)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _weight_f32(w, INTERPRET: tl.constexpr):
    """A weight tile in fp32 for the CUDA-core products. On a GPU E5M2 goes through fp16 (a byte shift that keeps
    Inf and NaN, see ``_dot``); the interpreter converts directly."""
    if w.dtype == tl.float8e5 and not INTERPRET:
        w = w.to(tl.float16)
    return w.to(tl.float32)


@triton.jit
def _block_scaled(af, ws_ptr, ws2_ptr, stride_sk, k, PAIR: tl.constexpr):
    """``(af * s, af * s2)``: fp32 row values times the 128x128 block scales of the K step at ``k`` of the weight
    tiles whose block-scale rows ``ws_ptr`` / ``ws2_ptr`` point at (``s2`` with ``PAIR`` only; else ``af`` again)."""
    kb = k // 128
    scaled = af * tl.load(ws_ptr + kb * stride_sk)
    if PAIR:
        return scaled, af * tl.load(ws2_ptr + kb * stride_sk)
    return scaled, af


@triton.jit
def _k_loop(a_ptrs, w_ptrs, w2_ptrs, mask_m, mask_n, K, stride_wk, acc, acc2,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
            NUM_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_FMA: tl.constexpr,
            INTERPRET: tl.constexpr, PAIR: tl.constexpr, F16_DOT: tl.constexpr = False, rstd=None, nw_ptr=None,
            NORM: tl.constexpr = False, a_inv=None, QUANT_A: tl.constexpr = False, EMULATE_FP8: tl.constexpr = False,
            ws_ptr=None, ws2_ptr=None, stride_sk=0, k_base=0, W_BLOCK: tl.constexpr = False):
    """``(acc + A @ W, acc2 + A @ W2)`` over the whole K: rows of ``A`` (``a_ptrs``, unit stride along K) against
    ``[BLOCK_K, BLOCK_N]`` weight tiles (``w_ptrs``; with ``PAIR`` also ``w2_ptrs``, the up half of a concatenated
    gate/up, from the same loads of ``A``), ``stride_wk`` apart along K, ``NUM_STAGES`` deep. Without ``PAIR``
    ``w2_ptrs`` and ``acc2`` are not used (``acc2`` comes back as given).

    ``USE_FMA``: CUDA-core products into ``[BLOCK_M, BLOCK_K, BLOCK_N]`` fp32 register tiles, summed over K once at
    the end, instead of tensor-core dots. For one or two rows per expert (decode): a dot needs 16 rows (15 of them
    padding at one token) and, with FP8 weights, their conversion to 16 bits in registers first; plain loads and
    FMAs keep more weight bytes in flight. Any ``BLOCK_M``, 1 included. ``USE_FMA == 2`` with ``BLOCK_M == 1``
    (``MoEConfig.row_layout``): the row's products accumulate in ``[BLOCK_K, BLOCK_N]``, the weight tile's own
    layout, which saves the compiler's byte-wise reads of each FP8 tile from shared memory (sm_90: 3.3-3.7
    instructions a weight byte against 5.4-7.0). In that layout the row is one element a thread, too little for the
    pipeline's asynchronous copies, so each step's row is loaded a step ahead; loaded in its own step it made every
    step wait for memory (session 30: FP8 experts 1.75x slower at one token on an H100). ``F16_DOT`` (FP8 weights,
    bf16 activations, tensor-core dots): ``_f16_dot``.
    ``NORM``: each ``A`` tile RMS-normalized by its rows' ``rstd`` and the weight at ``nw_ptr`` first
    (``triton_ops_core.rms_prologue``). ``QUANT_A``: each ``A`` tile (normalized first) quantized to E4M3 in
    registers with its rows' reciprocal scales ``a_inv``, bit for bit as ``_quant_rows_kernel`` writes it (W8A8 at
    decode, without the launches of their own).

    ``W_BLOCK``: 128x128 block-scaled weights (FP8 checkpoints' experts). The host keeps every K step inside one
    128-deep scale block (``BLOCK_K`` divides 128; the steps start at ``k_base``, a multiple of ``BLOCK_K``) and
    each weight tile's columns inside one 128-wide block, so a step's scale is one number a weight: ``ws_ptr`` /
    ``ws2_ptr`` point at the tile's row of block scales (``stride_sk`` apart along K). The CUDA-core paths multiply
    the row values by it before their products (one fp32 multiply a row element, not a weight element); the dots
    scale each step's partial product before it joins the accumulator."""
    offs_k = tl.arange(0, BLOCK_K)
    ROW_LAYOUT: tl.constexpr = USE_FMA == 2 and BLOCK_M == 1
    if ROW_LAYOUT:
        acc2d = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        acc2d_2 = tl.zeros((BLOCK_K, BLOCK_N) if PAIR else (1, 1), dtype=tl.float32)
        # the row's first K step (the loop loads each next one a step ahead)
        a_next = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
    elif USE_FMA:
        acc3 = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.float32)
        acc3_2 = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N) if PAIR else (1, 1, 1), dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            if not ROW_LAYOUT:
                a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
            if PAIR:
                w2 = tl.load(w2_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            mask_k = (k + offs_k) < K
            if not ROW_LAYOUT:
                a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if PAIR:
                w2 = tl.load(w2_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if ROW_LAYOUT:
            # in the weight tile's layout the row is one element a thread, too little for the pipeline's
            # asynchronous copies: loaded a step before its products instead, so no step waits on it
            a = a_next
            a_next = tl.load(a_ptrs + BLOCK_K, mask=mask_m[:, None] & ((k + BLOCK_K + offs_k) < K)[None, :],
                             other=0.0)
        if NORM:
            a = normalized(a, rstd[:, None], nw_ptr, (k + offs_k)[None, :], K)
        if QUANT_A:
            a = to_e4m3(a.to(tl.float32) * a_inv[:, None], EMULATE_FP8)
        if ROW_LAYOUT:
            # the row's K values down the tile's rows; multiply-adds asked for explicitly (one instruction a weight,
            # whatever the compiler's fp-fusion default)
            af = tl.reshape(a.to(tl.float32), (BLOCK_K,))[:, None]
            af2 = af
            if W_BLOCK:  # this step's block scale of each weight tile, on the row's values
                af, af2 = _block_scaled(af, ws_ptr, ws2_ptr, stride_sk, k_base + k, PAIR)
            acc2d = tl.fma(af, _weight_f32(w, INTERPRET), acc2d)
            if PAIR:
                acc2d_2 = tl.fma(af2, _weight_f32(w2, INTERPRET), acc2d_2)
        elif USE_FMA:
            af = a.to(tl.float32)[:, :, None]
            af2 = af
            if W_BLOCK:
                af, af2 = _block_scaled(af, ws_ptr, ws2_ptr, stride_sk, k_base + k, PAIR)
            acc3 += af * _weight_f32(w, INTERPRET)[None, :, :]
            if PAIR:
                acc3_2 += af2 * _weight_f32(w2, INTERPRET)[None, :, :]
        elif W_BLOCK:  # each step's partial product scaled before it joins the fp32 accumulator
            kb = (k_base + k) // 128
            acc += _dot(a, w, tl.zeros_like(acc), DOT_PRECISION, UPCAST, F16_DOT) * tl.load(ws_ptr + kb * stride_sk)
            if PAIR:
                acc2 += (_dot(a, w2, tl.zeros_like(acc2), DOT_PRECISION, UPCAST, F16_DOT)
                         * tl.load(ws2_ptr + kb * stride_sk))
        else:
            acc = _dot(a, w, acc, DOT_PRECISION, UPCAST, F16_DOT)
            if PAIR:
                acc2 = _dot(a, w2, acc2, DOT_PRECISION, UPCAST, F16_DOT)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
        if PAIR:
            w2_ptrs += BLOCK_K * stride_wk
    if ROW_LAYOUT:
        acc += tl.sum(acc2d, axis=0)[None, :]
        if PAIR:
            acc2 += tl.sum(acc2d_2, axis=0)[None, :]
    elif USE_FMA:
        acc += tl.sum(acc3, axis=1)
        if PAIR:
            acc2 += tl.sum(acc3_2, axis=1)
    return acc, acc2


@triton.jit
def _k_loop_swap(a_ptrs, wt_ptrs, wt2_ptrs, mask_m, mask_n, K, stride_wk, acc, acc2,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 NUM_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, PAIR: tl.constexpr,
                 a_inv=None, QUANT_A: tl.constexpr = False, EMULATE_FP8: tl.constexpr = False):
    """``_k_loop``'s tensor-core products with the operands swapped (``SWAP_AB``, W8A8 at decode): each step
    multiplies a weight tile ``[BLOCK_N, BLOCK_K]`` (``wt_ptrs``, ``wt2_ptrs`` with ``PAIR``: the weights' columns
    as rows, K contiguous in a K-major copy) by the activation tile transposed, ``[BLOCK_K, BLOCK_M]``. The weights'
    columns fill Hopper's 64-row wgmma operand and a decode tile's few tokens its N (16), instead of 64 activation
    rows, mostly padding, taking as much shared memory a stage as the weights. Returns ``(acc + A @ W, acc2 +
    A @ W2)`` as ``_k_loop`` does (the sums transposed back once, after the loop)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc2_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(wt_ptrs, mask=mask_n[:, None], other=0.0)
            if PAIR:
                w2 = tl.load(wt2_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            mask_k = (k + offs_k) < K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(wt_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if PAIR:
                w2 = tl.load(wt2_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if QUANT_A:
            a = to_e4m3(a.to(tl.float32) * a_inv[:, None], EMULATE_FP8)
        at = tl.trans(a)
        acc_t = _dot(w, at, acc_t, DOT_PRECISION, UPCAST)
        if PAIR:
            acc2_t = _dot(w2, at, acc2_t, DOT_PRECISION, UPCAST)
        a_ptrs += BLOCK_K
        wt_ptrs += BLOCK_K * stride_wk
        if PAIR:
            wt2_ptrs += BLOCK_K * stride_wk
    acc += tl.trans(acc_t)
    if PAIR:
        acc2 += tl.trans(acc2_t)
    return acc, acc2


@triton.jit
def _round(v, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """``v`` (fp32) rounded to ``DTYPE``. ``EMULATE_BF16`` (interpreter only): its fp32 -> bf16 cast truncates,
    so round to nearest even on the bits first (the cast of the result is then exact)."""
    if EMULATE_BF16:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        v = b.to(tl.float32, bitcast=True)
    return v.to(DTYPE)


@triton.jit
def _activate(gate, up, alpha, limit, ACTIVATION: tl.constexpr):
    """``act(gate) * up`` in fp32. Clamps use ``tl.where`` so NaN passes through as in ``torch.clamp``."""
    if ACTIVATION == 0:  # swiglu_oai (gpt-oss): gate clamped above, up clamped both sides, (up + 1)
        g = tl.where(gate > limit, limit, gate)
        u = tl.where(up > limit, limit, tl.where(up < -limit, -limit, up))
        out = g * _sigmoid(alpha * g) * (u + 1.0)
    elif ACTIVATION == 1:  # silu (SwiGLU: Qwen3-MoE, Mixtral)
        out = gate * _sigmoid(gate) * up
    elif ACTIVATION == 2:  # gelu, exact (erf)
        out = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)) * up
    else:  # gelu, tanh approximation (Gemma 4): 0.5 g (1 + tanh(z)) == g * sigmoid(2 z), as fused_gated_mlp's
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        out = gate * _sigmoid(2.0 * z) * up
    return out


# ----------------------------------------------------------------------------------------------------------------
# 1. Routing
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _router_gemm(x_ptr, w_ptr, offs_t, mask_t, offs_e, mask_e, k_start, k_end, stride_xt, stride_we,
                 BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, nw_ptr, norm_eps, T, H, NORM: tl.constexpr,
                 NORM_BLOCK: tl.constexpr):
    """The router logits ``x @ Wr^T`` of tokens ``offs_t`` and experts ``offs_e`` over ``k_start..k_end``, fp32;
    with ``NORM``, of ``x`` RMS-normalized over all ``H`` columns first (``triton_ops_core.rms_prologue``)."""
    rstd = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if NORM:
        rstd = row_rstd(x_ptr, offs_t, T, H, stride_xt, 1, norm_eps, BLOCK_T, NORM_BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + (k_start + offs_k)[None, :]
    w_ptrs = w_ptr + offs_e.to(tl.int64)[None, :] * stride_we + (k_start + offs_k)[:, None]
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        mask_k = (k + offs_k) < k_end
        x = tl.load(x_ptrs, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_e[None, :], other=0.0)
        if NORM:
            x = normalized(x, rstd[:, None], nw_ptr, (k + offs_k)[None, :], H)
        acc = _dot(x, w, acc, DOT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _select_experts(acc, x_ptr, b_ptr, ids_ptr, wts_ptr, offs_t, mask_t, offs_e, mask_e, E, stride_b,
                    HAS_BIAS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_KP: tl.constexpr, RENORMALIZE: tl.constexpr,
                    ROUND_LOGITS: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_E: tl.constexpr):
    """From the router logits ``acc [BLOCK_T, BLOCK_E]`` (fp32, bias not yet added) of tokens ``offs_t``: the top-k
    experts and their weights, written to ``ids`` / ``wts`` ``[T, TOP_K]``."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_e * stride_b, mask=mask_e, other=0.0).to(tl.float32)[None, :]
    if ROUND_LOGITS:
        # The model's router is an F.linear in the input dtype: its logits (hence its choice of experts and
        # their ties) are rounded once to that dtype. Same here, so the experts chosen are the model's.
        acc = _round(acc, x_ptr.dtype.element_ty, EMULATE_BF16).to(tl.float32)

    col = offs_e[None, :] + tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)
    valid = col < E
    # Selection key: a NaN logit never wins, so a token with NaN still gets k distinct, valid experts (its own
    # weights, hence its own output, are NaN; no other token is touched).
    key = tl.where(acc != acc, float("-inf"), acc)
    avail = valid
    kcol = tl.arange(0, BLOCK_KP)[None, :]
    ids = tl.zeros((BLOCK_T, BLOCK_KP), dtype=tl.int32)
    vals = tl.full((BLOCK_T, BLOCK_KP), float("-inf"), dtype=tl.float32)
    top = tl.zeros((BLOCK_T,), dtype=tl.float32)
    den = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(tl.where(avail, key, float("-inf")), axis=1)
        hit = avail & (key == best[:, None])
        idx = tl.min(tl.where(hit, col, BLOCK_E), axis=1)  # lowest index among equals
        sel = col == idx[:, None]
        val = tl.sum(tl.where(sel, acc, 0.0), axis=1)
        ids = tl.where(kcol == j, idx[:, None], ids)
        vals = tl.where(kcol == j, val[:, None], vals)
        avail = avail & (col != idx[:, None])
        if RENORMALIZE:
            # The chosen come largest first. Their exponentials are added one at a time in that order, not by a
            # reduction whose order follows the register layout (which differs between the route kernel and the
            # one-launch routing: on an H100 Qwen3-MoE's weights differed in their last bits): the same bits in both.
            if j == 0:
                top = val
            den += tl.exp(val - top)

    kmask = kcol < TOP_K
    if RENORMALIZE:  # softmax over the k chosen logits (gpt-oss; == Qwen3-MoE / Mixtral with norm_topk_prob)
        num = tl.where(kmask, tl.exp(vals - top[:, None]), 0.0)
    else:  # the full softmax over every expert, taken at the k chosen
        vmax = tl.max(tl.where(valid, acc, float("-inf")), axis=1)
        num = tl.where(kmask, tl.exp(vals - vmax[:, None]), 0.0)
        den = tl.sum(tl.where(valid, tl.exp(acc - vmax[:, None]), 0.0), axis=1)
    wts = num / den[:, None]
    out_offs = offs_t.to(tl.int64)[:, None] * TOP_K + kcol
    out_mask = mask_t[:, None] & kmask
    tl.store(ids_ptr + out_offs, ids, mask=out_mask)
    tl.store(wts_ptr + out_offs, wts, mask=out_mask)


@triton.jit(do_not_specialize=["T"])
def _router_split_kernel(x_ptr, w_ptr, ws_ptr, nw_ptr, b_ptr, ids_ptr, wts_ptr, cnt_ptr, T, E, H, stride_xt,
                         stride_we, stride_b, norm_eps,
                         BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                         NUM_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         NORM: tl.constexpr = False, NORM_BLOCK: tl.constexpr = 16, PDL: tl.constexpr = False,
                         FINISH: tl.constexpr = False, HAS_BIAS: tl.constexpr = False, TOP_K: tl.constexpr = 1,
                         BLOCK_KP: tl.constexpr = 1, RENORMALIZE: tl.constexpr = True,
                         ROUND_LOGITS: tl.constexpr = False, EMULATE_BF16: tl.constexpr = False,
                         PREFETCH_LINES: tl.constexpr = 0):
    """Decode's router GEMM over many programs: program ``(t, s)`` writes the partial logits of K range ``s``
    (whole ``BLOCK_K`` steps) to ``ws[s, T, E]`` (fp32). One program reading the whole router (184 KB for gpt-oss)
    waited on its own loads. Without ``FINISH``, ``_route_kernel`` adds the ranges in a fixed order and selects.
    With it, the routing is this one launch: the last program of a token block to arrive (an arrival counter per
    block, ``cnt [T / BLOCK_T]`` int32, zero at rest: ``triton_ops_core.scratch``) adds the ranges in the same
    fixed order, selects the block's experts (``_select_experts``: the route kernel's bits) and puts the counter
    back to zero.

    ``PREFETCH_LINES`` (with ``PDL``): launched early, the program asks L2 for that many 128-byte lines of each
    expert's router row from its K range before it waits (weights: no kernel of the step writes them)."""
    pdl_launch_dependents(PDL)
    s = tl.program_id(1)
    steps = tl.cdiv(tl.cdiv(H, BLOCK_K), tl.num_programs(1))
    k_start = s * steps * BLOCK_K
    k_end = tl.minimum(H, k_start + steps * BLOCK_K)
    offs_e = tl.arange(0, BLOCK_E)
    if PDL and PREFETCH_LINES > 0:
        prefetch_rows(w_ptr, offs_e, E, stride_we, k_start, k_end, PREFETCH_LINES)
    pdl_wait(PDL)  # (triton_ops_core.pdl) launched early: no activation is read before the previous kernel is done
    pid_t = tl.program_id(0)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    mask_e = offs_e < E
    acc = _router_gemm(x_ptr, w_ptr, offs_t, mask_t, offs_e, mask_e, k_start, k_end, stride_xt, stride_we,
                       BLOCK_T, BLOCK_E, BLOCK_K, NUM_STAGES, DOT_PRECISION, UPCAST, nw_ptr, norm_eps, T, H, NORM,
                       NORM_BLOCK)
    pdl_streamed(PDL)  # (TRITON_OPS_PDL_TRIGGER=end: the next kernel may launch while the partials are stored)
    mask = mask_t[:, None] & mask_e[None, :]
    ws_tile = ws_ptr + offs_t.to(tl.int64)[:, None] * E + offs_e[None, :]
    tl.store(ws_tile + s * T * E, acc, mask=mask)
    if FINISH:
        tl.debug_barrier()  # every thread's partial is stored before the counter says so
        arrived = tl.atomic_add(cnt_ptr + pid_t, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(1) - 1:
            # the last of the block: the ranges in a fixed order (as _route_kernel adds them), read through L2
            total = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
            for r in range(0, tl.num_programs(1)):
                total += tl.load(ws_tile + r * T * E, mask=mask, other=0.0, cache_modifier=".cg")
            _select_experts(total, x_ptr, b_ptr, ids_ptr, wts_ptr, offs_t, mask_t, offs_e, mask_e, E, stride_b,
                            HAS_BIAS, TOP_K, BLOCK_KP, RENORMALIZE, ROUND_LOGITS, EMULATE_BF16, BLOCK_T, BLOCK_E)
            tl.atomic_xchg(cnt_ptr + pid_t, 0, sem="relaxed", scope="gpu")  # zero at rest for the next call


@triton.jit(do_not_specialize=["T"])
def _router_rows_kernel(x_ptr, w_ptr, ws_ptr, nw_ptr, b_ptr, ids_ptr, wts_ptr, cnt_ptr, T, E, H, stride_xt,
                        stride_we, stride_b, norm_eps,
                        BLOCK_T: tl.constexpr, BLOCK_EP: tl.constexpr, BLOCK_K: tl.constexpr,
                        NUM_STAGES: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, PDL: tl.constexpr,
                        FINISH: tl.constexpr, HAS_BIAS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_KP: tl.constexpr,
                        RENORMALIZE: tl.constexpr, ROUND_LOGITS: tl.constexpr, EMULATE_BF16: tl.constexpr,
                        BLOCK_E: tl.constexpr):
    """A few tokens' router logits on the CUDA cores, the experts split over the programs: program ``p`` sums the
    products of all ``T`` (at most ``BLOCK_T``) tokens' rows with experts ``p * BLOCK_EP ..`` over all of ``H``
    (fp32) and writes those logits whole to ``ws [T, E]`` (fp32). Each logit is one program's sum in a fixed order,
    so no partial sums meet: where the K-split GEMM (``_router_split_kernel``) left every K range's partials for
    the last program to add, one load of ``[T, E]`` logits is what the selection waits for. Without ``FINISH``,
    ``_route_kernel`` (``SPLIT`` 1) selects from them; with it the last program to arrive (an arrival counter,
    ``cnt [1]`` int32, zero at rest) does, with the same bits, and puts the counter back to zero. ``NORM``: the
    rows RMS-normalized first, as ``_router_gemm`` does."""
    pdl_launch_dependents(PDL)
    offs_ep = tl.program_id(0) * BLOCK_EP + tl.arange(0, BLOCK_EP)
    mask_ep = offs_ep < E
    pdl_wait(PDL)  # (triton_ops_core.pdl) launched early: nothing is read before the previous kernel is done
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    rstd = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if NORM:
        rstd = row_rstd(x_ptr, offs_t, T, H, stride_xt, 1, norm_eps, BLOCK_T, NORM_BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
    w_rows = w_ptr + offs_ep.to(tl.int64)[:, None] * stride_we
    acc = tl.zeros((BLOCK_T, BLOCK_EP), dtype=tl.float32)
    for k in tl.range(0, H, BLOCK_K, num_stages=NUM_STAGES):
        kk = k + offs_k
        mask_k = kk < H
        x = tl.load(x_rows + kk[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :], mask=mask_ep[:, None] & mask_k[None, :], other=0.0)
        if NORM:
            x = normalized(x, rstd[:, None], nw_ptr, kk[None, :], H)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    pdl_streamed(PDL)  # (TRITON_OPS_PDL_TRIGGER=end: the next kernel may launch while the logits are stored)
    tl.store(ws_ptr + offs_t[:, None] * E + offs_ep[None, :], acc, mask=mask_t[:, None] & mask_ep[None, :])
    if FINISH:
        tl.debug_barrier()  # every thread's logits are stored before the counter says so
        arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(0) - 1:
            # the last to arrive: every expert's logits, read through L2 (as _route_kernel adds its one split)
            offs_e = tl.arange(0, BLOCK_E)
            mask_e = offs_e < E
            total = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
            total += tl.load(ws_ptr + offs_t[:, None] * E + offs_e[None, :], mask=mask_t[:, None] & mask_e[None, :],
                             other=0.0, cache_modifier=".cg")
            _select_experts(total, x_ptr, b_ptr, ids_ptr, wts_ptr, offs_t, mask_t, offs_e, mask_e, E, stride_b,
                            HAS_BIAS, TOP_K, BLOCK_KP, RENORMALIZE, ROUND_LOGITS, EMULATE_BF16, BLOCK_T, BLOCK_E)
            tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")  # zero at rest for the next call


@triton.jit(do_not_specialize=["T"])
def _route_kernel(
    # inputs (ws: the partial logits of _router_split_kernel, [SPLIT, T, E] fp32, when SPLIT > 0)
    x_ptr, w_ptr, b_ptr, ws_ptr, nw_ptr,
    # outputs
    ids_ptr, wts_ptr,
    # sizes and strides
    T, E, H, stride_xt, stride_we, stride_b, norm_eps,
    # options
    HAS_BIAS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_KP: tl.constexpr, RENORMALIZE: tl.constexpr,
    ROUND_LOGITS: tl.constexpr, EMULATE_BF16: tl.constexpr,
    # tiles
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
    NORM: tl.constexpr = False, NORM_BLOCK: tl.constexpr = 16, PDL: tl.constexpr = False,
    RELEASE: tl.constexpr = False,
):
    """``RELEASE`` (the host's ``triton_ops_core.pdl.release_early``: one token): the next launch may start from
    this kernel's wait on, as it runs."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)  # (triton_ops_core.pdl) launched early: nothing is read before the previous kernel is done
    pdl_release(PDL, RELEASE)
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    mask_t = offs_t < T
    mask_e = offs_e < E
    if SPLIT == 0:
        # one program holds every expert of its tokens (the top-k needs them all); its loads pipelined
        acc = _router_gemm(x_ptr, w_ptr, offs_t, mask_t, offs_e, mask_e, 0, H, stride_xt, stride_we,
                           BLOCK_T, BLOCK_E, BLOCK_K, NUM_STAGES, DOT_PRECISION, UPCAST, nw_ptr, norm_eps, T, H,
                           NORM, NORM_BLOCK)
    else:  # the partial logits of the SPLIT K ranges, added in a fixed order (the same bits on every run)
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        mask = mask_t[:, None] & mask_e[None, :]
        for s in tl.static_range(SPLIT):
            acc += tl.load(ws_ptr + (s * T + offs_t.to(tl.int64))[:, None] * E + offs_e[None, :], mask=mask,
                           other=0.0)
    _select_experts(acc, x_ptr, b_ptr, ids_ptr, wts_ptr, offs_t, mask_t, offs_e, mask_e, E, stride_b, HAS_BIAS,
                    TOP_K, BLOCK_KP, RENORMALIZE, ROUND_LOGITS, EMULATE_BF16, BLOCK_T, BLOCK_E)


# ----------------------------------------------------------------------------------------------------------------
# 2. Grouping by expert
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _tile_table(counts, starts, offs_e, mask_e, tile_expert_ptr, tile_start_ptr, E, MAX_TILES,
                TILE_M: tl.constexpr, BLOCK_TILES: tl.constexpr):
    """Expert ``e`` owns tiles ``[tile_end[e] - tiles[e], tile_end[e])``; write each tile's expert and first row."""
    tiles = tl.where(mask_e, (counts + TILE_M - 1) // TILE_M, 0)
    tile_end = tl.cumsum(tiles, 0)
    tile_begin = tile_end - tiles
    for i0 in range(0, MAX_TILES, BLOCK_TILES):
        offs_i = i0 + tl.arange(0, BLOCK_TILES)
        # tile i belongs to the first expert whose tile range ends after i (ends are non-decreasing)
        owner = tl.sum(((tile_end[None, :] <= offs_i[:, None]) & mask_e[None, :]).to(tl.int32), axis=1)
        is_owner = offs_e[None, :] == owner[:, None]
        first = tl.sum(tl.where(is_owner, tile_begin[None, :], 0), axis=1)
        row0 = tl.sum(tl.where(is_owner, starts[None, :], 0), axis=1)
        live = owner < E
        mask_i = offs_i < MAX_TILES
        tl.store(tile_expert_ptr + offs_i, tl.where(live, owner, -1), mask=mask_i)
        tl.store(tile_start_ptr + offs_i, tl.where(live, row0 + (offs_i - first) * TILE_M, 0), mask=mask_i)


@triton.jit(do_not_specialize=["P", "MAX_TILES"])
def _align_kernel(
    # input: the flattened [T * k] expert ids
    ids_ptr,
    # outputs
    offsets_ptr, sorted_ptr, tile_expert_ptr, tile_start_ptr,
    # sizes
    P, E, MAX_TILES,
    # tiles
    TILE_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TILES: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The whole grouping in one program: decode (a few hundred pairs, one step of ``BLOCK_P``)."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)  # (triton_ops_core.pdl) launched early: nothing is read before the previous kernel is done
    _align_one_program(ids_ptr, offsets_ptr, sorted_ptr, tile_expert_ptr, tile_start_ptr, P, E, MAX_TILES, TILE_M,
                       BLOCK_P, BLOCK_E, BLOCK_TILES)


@triton.jit(do_not_specialize=["P", "MAX_TILES", "R"])
def _align_quant_kernel(
    # the grouping's tensors (_align_kernel's)
    ids_ptr, offsets_ptr, sorted_ptr, tile_expert_ptr, tile_start_ptr,
    # the tokens' rows and their E4M3 codes and scales (_quant_rows_kernel's)
    x_ptr, q_ptr, s_ptr, nw_ptr,
    # sizes
    P, E, MAX_TILES, R, C, stride_xr, norm_eps,
    # tiles and options
    TILE_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TILES: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, EMULATE: tl.constexpr, NORM: tl.constexpr = False,
    NORM_BLOCK: tl.constexpr = 16, PDL: tl.constexpr = False,
):
    """W8A8 at decode: the grouping (program 0, as ``_align_kernel``) and the tokens' row quantization (programs
    1.., ``BLOCK_R`` rows each, as ``_quant_rows_kernel``) in one launch. Neither reads the other's output, so a
    decode step waits on one launch for both."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)  # (triton_ops_core.pdl) launched early: nothing is read before the previous kernel is done
    pid = tl.program_id(0)
    if pid == 0:
        _align_one_program(ids_ptr, offsets_ptr, sorted_ptr, tile_expert_ptr, tile_start_ptr, P, E, MAX_TILES,
                           TILE_M, BLOCK_P, BLOCK_E, BLOCK_TILES)
    else:
        _quant_rows(x_ptr, q_ptr, s_ptr, nw_ptr, pid - 1, R, C, stride_xr, norm_eps, BLOCK_R, BLOCK_C, EMULATE, NORM,
                    NORM_BLOCK)


@triton.jit
def _align_one_program(ids_ptr, offsets_ptr, sorted_ptr, tile_expert_ptr, tile_start_ptr, P, E, MAX_TILES,
                       TILE_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
                       BLOCK_TILES: tl.constexpr):
    """``_align_kernel``'s work: counts, offsets, a stable sorted order of the pairs and the tile table."""
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    # pass 1: tokens per expert
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        e = tl.load(ids_ptr + offs_p, mask=offs_p < P, other=-1)
        counts += tl.sum((e[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    ends = tl.cumsum(counts, 0)
    starts = ends - counts
    tl.store(offsets_ptr + offs_e, starts, mask=mask_e)
    tl.store(offsets_ptr + E, P)
    # pass 2: a stable order of the pairs within each expert (rank = earlier pairs of that expert)
    running = starts
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        e = tl.load(ids_ptr + offs_p, mask=mask_p, other=-1)
        onehot = (e[:, None] == offs_e[None, :]).to(tl.int32)
        rank = tl.cumsum(onehot, 0) - onehot
        pos = tl.sum(onehot * (rank + running[None, :]), axis=1)
        tl.store(sorted_ptr + pos, offs_p, mask=mask_p)
        running += tl.sum(onehot, axis=0)
    _tile_table(counts, starts, offs_e, mask_e, tile_expert_ptr, tile_start_ptr, E, MAX_TILES, TILE_M, BLOCK_TILES)


# Prefill: the same grouping in three launches, so that tens of thousands of pairs are not walked by one program.

@triton.jit(do_not_specialize=["P"])
def _align_count_kernel(ids_ptr, counts_ptr, P, E, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
                        PDL: tl.constexpr = False):
    """counts[c, e]: the pairs of chunk ``c`` (``BLOCK_P`` pairs) routed to expert ``e``."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)  # (triton_ops_core.pdl) launched early: nothing is read before the previous kernel is done
    c = tl.program_id(0)
    offs_p = c * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_e = tl.arange(0, BLOCK_E)
    e = tl.load(ids_ptr + offs_p, mask=offs_p < P, other=-1)
    counts = tl.sum((e[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + c.to(tl.int64) * E + offs_e, counts, mask=offs_e < E)


@triton.jit(do_not_specialize=["P", "N_CHUNKS", "MAX_TILES"])
def _align_scan_kernel(counts_ptr, base_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, P, E, N_CHUNKS,
                       MAX_TILES, TILE_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
                       BLOCK_TILES: tl.constexpr, PDL: tl.constexpr = False):
    """One program: expert offsets, each chunk's first row per expert (``base[c, e]``), the tile table."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)  # (triton_ops_core.pdl) launched early: nothing is read before the previous kernel is done
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    totals = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, N_CHUNKS, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m = (offs_c < N_CHUNKS)[:, None] & mask_e[None, :]
        totals += tl.sum(tl.load(counts_ptr + offs_c.to(tl.int64)[:, None] * E + offs_e[None, :], mask=m, other=0),
                         axis=0)
    starts = tl.cumsum(totals, 0) - totals
    tl.store(offsets_ptr + offs_e, starts, mask=mask_e)
    tl.store(offsets_ptr + E, P)
    running = starts
    for c0 in range(0, N_CHUNKS, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m = (offs_c < N_CHUNKS)[:, None] & mask_e[None, :]
        ptrs = offs_c.to(tl.int64)[:, None] * E + offs_e[None, :]
        cnt = tl.load(counts_ptr + ptrs, mask=m, other=0)
        tl.store(base_ptr + ptrs, running[None, :] + tl.cumsum(cnt, 0) - cnt, mask=m)
        running += tl.sum(cnt, axis=0)
    _tile_table(totals, starts, offs_e, mask_e, tile_expert_ptr, tile_start_ptr, E, MAX_TILES, TILE_M, BLOCK_TILES)


@triton.jit(do_not_specialize=["P"])
def _align_scatter_kernel(ids_ptr, base_ptr, sorted_ptr, P, E, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
                          PDL: tl.constexpr = False):
    """sorted[base[c, e] + rank] = p: the chunk's pairs at their stable place in expert order."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)  # (triton_ops_core.pdl) launched early: nothing is read before the previous kernel is done
    c = tl.program_id(0)
    offs_p = c * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_e = tl.arange(0, BLOCK_E)
    e = tl.load(ids_ptr + offs_p, mask=mask_p, other=-1)
    onehot = (e[:, None] == offs_e[None, :]).to(tl.int32)
    rank = tl.cumsum(onehot, 0) - onehot
    base = tl.load(base_ptr + c.to(tl.int64) * E + offs_e, mask=offs_e < E, other=0)
    pos = tl.sum(onehot * (rank + base[None, :]), axis=1)
    tl.store(sorted_ptr + pos, offs_p, mask=mask_p)


# ----------------------------------------------------------------------------------------------------------------
# FP8 activations (W8A8): rows quantized before each grouped GEMM
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _row_tile(x_ptr, rows, mask_r, cols, C, stride_xr, rstd, nw_ptr, NORM: tl.constexpr):
    """Columns ``cols`` of rows ``rows`` in fp32 (normalized first with ``NORM``), their columns and mask."""
    mask = mask_r[:, None] & (cols < C)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0)
    if NORM:
        x = normalized(x, rstd[:, None], nw_ptr, cols[None, :], C)
    return x.to(tl.float32), cols, mask


@triton.jit
def _tile_row_scales(x_ptr, rows, n_rows, K, stride_xr, norm_eps, nw_ptr, NORM: tl.constexpr, BLOCK_M: tl.constexpr,
                     ROW_BLOCK: tl.constexpr, NORM_BLOCK: tl.constexpr):
    """``(scale, 1 / scale, rstd)`` of the first ``n_rows`` rows of a tile (``rows``: their int64 row indices into
    ``x [., K]``): each row's E4M3 scale over all of K as ``_quant_rows_kernel`` computes it (NaN for a row holding
    NaN or an infinity), with ``NORM`` of the row normalized (and its ``rstd``, as ``row_rstd`` gives it). One row
    at a time, ``ROW_BLOCK`` columns a step: a decode tile holds a few real rows among its 64, and only those are
    read. Rows past ``n_rows``: scale 1, ``rstd`` 0."""
    offs = tl.arange(0, BLOCK_M)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    bad = tl.zeros((BLOCK_M,), dtype=tl.int32)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r in range(0, n_rows):
        row = tl.full((1,), 0, tl.int64) + tl.sum(tl.where(offs == r, rows, 0), axis=0)  # the r-th row, as [1]
        r_rstd = tl.zeros((1,), dtype=tl.float32)
        if NORM:
            r_rstd = row_rstd(x_ptr, row, row + 1, K, stride_xr, 1, norm_eps, 1, NORM_BLOCK)
        r_amax = tl.zeros((1,), dtype=tl.float32)
        r_bad = tl.zeros((1,), dtype=tl.int32)
        for c0 in range(0, K, ROW_BLOCK):
            xf, _, _ = _row_tile(x_ptr, row, row >= 0, c0 + tl.arange(0, ROW_BLOCK), K, stride_xr, r_rstd, nw_ptr,
                                 NORM)
            r_amax = tl.maximum(r_amax, tl.max(finite_abs(xf), axis=1))
            r_bad = tl.maximum(r_bad, tl.max(((tl.abs(xf) == float("inf")) | (xf != xf)).to(tl.int32), axis=1))
        here = offs == r  # (each a sum of one element: itself, NaN included)
        amax = tl.where(here, tl.sum(r_amax, axis=0), amax)
        bad = tl.where(here, tl.sum(r_bad, axis=0), bad)
        rstd = tl.where(here, tl.sum(r_rstd, axis=0), rstd)
    scale, inv, _ = group_scale(amax, amax, False, 448.0)
    return tl.where(bad != 0, float("nan"), scale), inv, rstd


@triton.jit
def _row_part_max(v, col_ok):
    """Per row of ``v`` (fp32 ``[R, C]``), over the columns ``col_ok``: the largest finite ``|v|``, or NaN where the
    row holds NaN or an infinity (one tile's share of a row's E4M3 scale, ``H_AMAX``)."""
    amax = tl.max(tl.where(col_ok, finite_abs(v), 0.0), axis=1)
    bad = tl.max((col_ok & ((tl.abs(v) == float("inf")) | (v != v))).to(tl.int32), axis=1)
    return tl.where(bad != 0, float("nan"), amax)


@triton.jit
def _scales_from_parts(p_ptr, rows, mask_r, PARTS: tl.constexpr, BLOCK_M: tl.constexpr,
                       PARTS_BLOCK: tl.constexpr):
    """``(scale, 1 / scale)`` of rows ``rows`` from their ``PARTS`` shares (``p [rows, PARTS]``, written by the
    gate/up GEMM's ``H_AMAX`` epilogue): the scale ``_quant_rows_kernel`` gives the whole row, NaN for a row with a
    NaN share. Rows outside ``mask_r``: scale 1."""
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    bad = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for p0 in range(0, PARTS, PARTS_BLOCK):
        cols = p0 + tl.arange(0, PARTS_BLOCK)
        v = tl.load(p_ptr + rows[:, None] * PARTS + cols[None, :], mask=mask_r[:, None] & (cols < PARTS)[None, :],
                    other=0.0)
        bad = tl.maximum(bad, tl.max((v != v).to(tl.int32), axis=1))
        amax = tl.maximum(amax, tl.max(tl.where(v != v, 0.0, v), axis=1))
    scale, inv, _ = group_scale(amax, amax, False, 448.0)
    return tl.where(bad != 0, float("nan"), scale), inv


@triton.jit(do_not_specialize=["R"])
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, nw_ptr, R, C, stride_xr, norm_eps,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, EMULATE: tl.constexpr,
                       NORM: tl.constexpr = False, NORM_BLOCK: tl.constexpr = 16, PDL: tl.constexpr = False):
    """Rows of ``x [R, C]`` to E4M3 with one fp32 scale each: ``s[r] = amax(|x[r]|) / 448`` (finite values only;
    1 for an all-zero row), ``q[r] = e4m3(x[r] * (1 / s[r]))`` saturating (``triton_ops_core.fp8_cast``'s
    convention, as ``fp8_gemm``'s per-row activation scales). A row holding NaN or an infinity gets a NaN scale, so
    its token's output is NaN wherever it goes (E4M3 has no infinity, and the interpreter reads its NaN code as a
    number): nothing non-finite comes out finite. ``q`` is a contiguous ``[R, C]`` (a ``uint8`` view
    under ``EMULATE``, the interpreter, whose own FP8 cast is wrong). ``NORM``: each row RMS-normalized first with
    the weight at ``nw_ptr`` (bit for bit the ``rmsnorm`` output, ``triton_ops_core.rms_prologue``), the
    normalized row being what is quantized. Two passes over each row: its absolute maximum, then the scaled
    cast (the row is read again from cache)."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)  # (triton_ops_core.pdl) launched early: nothing is read before the previous kernel is done
    _quant_rows(x_ptr, q_ptr, s_ptr, nw_ptr, tl.program_id(0), R, C, stride_xr, norm_eps, BLOCK_R, BLOCK_C, EMULATE,
                NORM, NORM_BLOCK)


@triton.jit
def _quant_rows(x_ptr, q_ptr, s_ptr, nw_ptr, block, R, C, stride_xr, norm_eps, BLOCK_R: tl.constexpr,
                BLOCK_C: tl.constexpr, EMULATE: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr):
    """``_quant_rows_kernel``'s work for its row block ``block``."""
    offs_r = block * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    rows = offs_r.to(tl.int64)
    rstd = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if NORM:
        rstd = row_rstd(x_ptr, offs_r, R, C, stride_xr, 1, norm_eps, BLOCK_R, NORM_BLOCK)
    offs_c = tl.arange(0, BLOCK_C)
    amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    bad = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        xf, cols, mask = _row_tile(x_ptr, rows, mask_r, c0 + offs_c, C, stride_xr, rstd, nw_ptr, NORM)
        amax = tl.maximum(amax, tl.max(finite_abs(xf), axis=1))
        bad = tl.maximum(bad, tl.max(((tl.abs(xf) == float("inf")) | (xf != xf)).to(tl.int32), axis=1))
    scale, inv, _ = group_scale(amax, amax, False, 448.0)
    tl.store(s_ptr + rows, tl.where(bad != 0, float("nan"), scale), mask=mask_r)
    for c0 in range(0, C, BLOCK_C):
        xf, cols, mask = _row_tile(x_ptr, rows, mask_r, c0 + offs_c, C, stride_xr, rstd, nw_ptr, NORM)
        store_fp8(q_ptr + rows[:, None] * C + cols[None, :], xf * inv[:, None], mask, True, EMULATE)


# ----------------------------------------------------------------------------------------------------------------
# 3. Grouped GEMM: gate/up with bias and activation
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _tile_rows(tile_expert_ptr, tile_start_ptr, offsets_ptr, pid_t, NUM_EXPERTS, GROUPED: tl.constexpr):
    """``(expert, first row, row bound, skip)`` of a grouped GEMM's tile ``pid_t``. ``GROUPED``: from the grouping's
    tile table (rows of one expert in sorted order; ``-1`` past the last tile). Otherwise no grouping at all (one-row
    tiles, or one token whatever the tile's rows): tile ``i`` is row ``i``, the pair ``i`` itself, and
    ``tile_expert_ptr`` holds the pairs' expert ids (``topk_ids``). A pair's row is then its own: at 1 to 8 tokens
    each expert hit has one or two rows, at one token one, so sorting bought nothing but a launch. Ids outside
    ``[0, NUM_EXPERTS)`` (unchecked input) are skipped rather than read past the weights."""
    expert = tl.load(tile_expert_ptr + pid_t)
    if GROUPED:
        row0 = tl.load(tile_start_ptr + pid_t)
        skip = expert < 0
        row_end = tl.load(offsets_ptr + tl.maximum(expert, 0) + 1)
    else:
        row0 = pid_t
        skip = (expert < 0) | (expert >= NUM_EXPERTS)
        row_end = pid_t + 1
    return expert, row0, row_end, skip


@triton.jit
def _tile_pairs(sorted_ptr, offs_m, mask_m, GROUPED: tl.constexpr):
    """The (token, slot) pairs of a tile's rows (``_tile_rows``): the sorted order's, or the rows themselves."""
    if GROUPED:
        pair = tl.load(sorted_ptr + offs_m, mask=mask_m, other=0)
    else:
        pair = offs_m
    return pair


@triton.jit(do_not_specialize=["MAX_TILES"])
def _gate_up_kernel(
    # inputs
    x_ptr, w_ptr, b_ptr, s_ptr, sorted_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr, nw_ptr,
    # the tokens' activation scales (fp32 [T], A_SCALED: x holds E4M3 rows from _quant_rows_kernel)
    xs_ptr,
    # output (and with H_AMAX each row's share of its E4M3 scale from this program's columns: fp32 [P, N tiles])
    h_ptr, hamax_ptr,
    # sizes and strides (N: the intermediate size, K: hidden)
    N, K, MAX_TILES, stride_xt, stride_we, stride_wk, stride_wn, stride_be, stride_bn, stride_se, stride_sn,
    stride_hm, alpha, limit, norm_eps,
    # options (W_SCALED: FP8 weights, one fp32 scale per expert and output column, s [E, 2N])
    TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, INTERLEAVED: tl.constexpr,
    W_SCALED: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EMULATE_BF16: tl.constexpr,
    USE_FMA: tl.constexpr, INTERPRET: tl.constexpr, F16_DOT: tl.constexpr = False, NORM: tl.constexpr = False,
    NORM_BLOCK: tl.constexpr = 16, PDL: tl.constexpr = False, A_SCALED: tl.constexpr = False,
    QUANT_A: tl.constexpr = False, QUANT_BLOCK: tl.constexpr = 16, EMULATE_FP8: tl.constexpr = False,
    H_AMAX: tl.constexpr = False, SWAP_AB: tl.constexpr = False,
    # W_BLOCK: FP8 weights with 128x128 block scales, s [E, ceil(2N / 128), ceil(K / 128)] (strides stride_se,
    # stride_sn per block row, stride_sk per block column), applied in the K loop (concatenated layout only)
    stride_sk=0, W_BLOCK: tl.constexpr = False,
    # GROUPED off (one pair a tile): no grouping launch before this one; tile i is pair i, tile_expert_ptr the pairs'
    # expert ids (topk_ids), ids outside [0, NUM_EXPERTS) skipped (see _tile_rows)
    NUM_EXPERTS=0, GROUPED: tl.constexpr = True,
):
    """``QUANT_A`` (W8A8 at decode, with ``A_SCALED``): ``x`` holds the tokens' 16/32-bit rows, quantized to E4M3 in
    registers (``_tile_row_scales``, then each tile in ``_k_loop``) instead of by ``_quant_rows_kernel``.
    ``H_AMAX`` (W8A8, ``MoEConfig.quant_h_in_down``): each program also writes its rows' largest finite ``|h|`` over
    its columns as stored (NaN for a non-finite value), from which the down GEMM finds each row's scale: no launch
    quantizes ``h``."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)  # (triton_ops_core.pdl) launched early: nothing is read before the previous kernel is done
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, row0, row_end, skip = _tile_rows(tile_expert_ptr, tile_start_ptr, offsets_ptr, pid_t, NUM_EXPERTS,
                                             GROUPED)
    if skip:  # past the last tile: this launch had fewer (expert, tile) pairs than its worst case
        return
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    pair = _tile_pairs(sorted_ptr, offs_m, mask_m, GROUPED)
    token = (pair // TOP_K).to(tl.int64)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    a_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    a_inv = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if QUANT_A:  # the real rows' E4M3 scales (and rstd with NORM), one row at a time
        a_scale, a_inv, rstd = _tile_row_scales(x_ptr, token, tl.minimum(row_end - row0, BLOCK_M), K, stride_xt,
                                                norm_eps, nw_ptr, NORM, BLOCK_M, QUANT_BLOCK, NORM_BLOCK)
    elif NORM:  # the tokens' RMSNorm over all of K. Each row's bound is its own token + 1 (every gathered row is a
        # real token), or 0 for rows past the tile's (token 0's otherwise): those load nothing
        rstd = row_rstd(x_ptr, token, tl.where(mask_m, token + 1, 0), K, stride_xt, 1, norm_eps, BLOCK_M,
                        NORM_BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :]
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    b_base = b_ptr + expert.to(tl.int64) * stride_be
    s_base = s_ptr + expert.to(tl.int64) * stride_se
    if INTERLEAVED:
        # gpt-oss: packed columns 2j (gate j) and 2j + 1 (up j); one contiguous [BLOCK_K, 2 * BLOCK_N] tile per
        # K step, split into the two halves in the epilogue.
        offs_c = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
        mask_c = offs_c < 2 * N
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        if SWAP_AB:  # (W8A8 at decode: the weight tile as the 64-row operand, see _k_loop_swap)
            wt_ptrs = w_base + offs_c.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
            acc, _ = _k_loop_swap(x_ptrs, wt_ptrs, wt_ptrs, mask_m, mask_c, K, stride_wk, acc, acc, BLOCK_M,
                                  2 * BLOCK_N, BLOCK_K, EVEN_K, NUM_STAGES, DOT_PRECISION, UPCAST, False, a_inv,
                                  QUANT_A, EMULATE_FP8)
        else:
            w_ptrs = w_base + offs_k[:, None] * stride_wk + offs_c.to(tl.int64)[None, :] * stride_wn
            acc, _ = _k_loop(x_ptrs, w_ptrs, w_ptrs, mask_m, mask_c, K, stride_wk, acc, acc, BLOCK_M, 2 * BLOCK_N,
                             BLOCK_K, EVEN_K, NUM_STAGES, DOT_PRECISION, UPCAST, USE_FMA, INTERPRET, False, F16_DOT,
                             rstd, nw_ptr, NORM, a_inv, QUANT_A, EMULATE_FP8)
        if W_SCALED:  # the whole K sum of each column times its scale, before the bias
            acc *= tl.load(s_base + offs_c * stride_sn, mask=mask_c, other=0.0)[None, :]
        if A_SCALED:  # and of each row times its token's activation scale (W8A8)
            if QUANT_A:
                acc *= a_scale[:, None]
            else:
                acc *= tl.load(xs_ptr + token, mask=mask_m, other=0.0)[:, None]
        if HAS_BIAS:
            acc += tl.load(b_base + offs_c * stride_bn, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
    else:
        # concatenated: gate columns [0, N), up columns [N, 2N)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SWAP_AB:
            wgt_ptrs = w_base + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
            gate, up = _k_loop_swap(x_ptrs, wgt_ptrs, wgt_ptrs + N * stride_wn, mask_m, mask_n, K, stride_wk, zero,
                                    zero, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, NUM_STAGES, DOT_PRECISION, UPCAST, True,
                                    a_inv, QUANT_A, EMULATE_FP8)
        else:
            wg_ptrs = w_base + offs_k[:, None] * stride_wk + offs_n.to(tl.int64)[None, :] * stride_wn
            wu_ptrs = wg_ptrs + N * stride_wn
            # (W_BLOCK) the block-scale rows of the gate tile (rows from pid_n * BLOCK_N) and of the up tile
            sg_row = s_base + ((pid_n * BLOCK_N) // 128) * stride_sn
            su_row = s_base + ((N + pid_n * BLOCK_N) // 128) * stride_sn
            gate, up = _k_loop(x_ptrs, wg_ptrs, wu_ptrs, mask_m, mask_n, K, stride_wk, zero, zero, BLOCK_M, BLOCK_N,
                               BLOCK_K, EVEN_K, NUM_STAGES, DOT_PRECISION, UPCAST, USE_FMA, INTERPRET, True, F16_DOT,
                               rstd, nw_ptr, NORM, a_inv, QUANT_A, EMULATE_FP8, sg_row, su_row, stride_sk, 0, W_BLOCK)
        if W_SCALED:
            gate *= tl.load(s_base + offs_n * stride_sn, mask=mask_n, other=0.0)[None, :]
            up *= tl.load(s_base + (N + offs_n) * stride_sn, mask=mask_n, other=0.0)[None, :]
        if A_SCALED:
            if QUANT_A:
                row_scale = a_scale[:, None]
            else:
                row_scale = tl.load(xs_ptr + token, mask=mask_m, other=0.0)[:, None]
            gate *= row_scale
            up *= row_scale
        if HAS_BIAS:
            gate += tl.load(b_base + offs_n * stride_bn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            up += tl.load(b_base + (N + offs_n) * stride_bn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    pdl_streamed(PDL)  # (TRITON_OPS_PDL_TRIGGER=end: the next kernel may launch during the epilogue)
    out = _activate(gate, up, alpha, limit, ACTIVATION)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :]
    hv = _round(out, h_ptr.dtype.element_ty, EMULATE_BF16)
    tl.store(h_ptrs, hv, mask=mask_m[:, None] & (offs_n < N)[None, :])
    if H_AMAX:  # this program's share of each row's scale: the values as stored, as _quant_rows_kernel reads them
        part = _row_part_max(hv.to(tl.float32), (offs_n < N)[None, :])
        tl.store(hamax_ptr + offs_m.to(tl.int64) * tl.cdiv(N, BLOCK_N) + pid_n, part, mask=mask_m)


# ----------------------------------------------------------------------------------------------------------------
# 4. Grouped GEMM: down with bias and the routing weight
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _prefetch_down_tile(w_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr, pid_t, pid_n, pid_k, N, K, stride_we,
                        stride_wk, stride_wn, NUM_EXPERTS, GROUPED: tl.constexpr, SPLIT_K: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
                        PREFETCH_ROWS: tl.constexpr, PREFETCH_LINES: tl.constexpr):
    """Before the down GEMM's PDL wait: ask L2 for the first lines of this program's weight tile (expert, its
    ``BLOCK_N`` columns, its split's K range). ``PREFETCH`` 1: N-contiguous weights (gpt-oss's ``[E, I, H]``), the
    first ``PREFETCH_ROWS`` rows of the K range, ``PREFETCH_LINES`` lines of the tile's columns each; 2:
    K-contiguous (``[E, H, I]``), the tile's ``PREFETCH_ROWS`` (= ``BLOCK_N``) rows, the first ``PREFETCH_LINES``
    lines of the K range each.

    The expert comes from the tile table (or the ids), which the launches before the gate/up GEMM wrote: the host
    asks for this only where that kernel lets this one launch after its own wait returned
    (``triton_ops_core.pdl.sees_two_back``), so those writes are complete here. Nothing is stored."""
    expert, row0, row_end, skip = _tile_rows(tile_expert_ptr, tile_start_ptr, offsets_ptr, pid_t, NUM_EXPERTS,
                                             GROUPED)
    if not skip:
        steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
        k_start = pid_k * steps * BLOCK_K
        k_end = tl.minimum(K, k_start + steps * BLOCK_K)
        w_e = w_ptr + expert.to(tl.int64) * stride_we
        if PREFETCH == 1:
            rows = k_start + tl.arange(0, PREFETCH_ROWS)
            prefetch_rows(w_e + pid_n * BLOCK_N, rows, k_end, stride_wk, 0, N - pid_n * BLOCK_N, PREFETCH_LINES)
        else:
            rows = pid_n * BLOCK_N + tl.arange(0, PREFETCH_ROWS)
            prefetch_rows(w_e, rows, N, stride_wn, k_start, k_end, PREFETCH_LINES)


@triton.jit(do_not_specialize=["MAX_TILES"])
def _down_kernel(
    # inputs
    h_ptr, w_ptr, b_ptr, s_ptr, wts_ptr, sorted_ptr, offsets_ptr, tile_expert_ptr, tile_start_ptr,
    # the sorted rows' activation scales (fp32 [P], A_SCALED: h holds E4M3 rows from _quant_rows_kernel), or with
    # A_AMAX the shares of each row's scale (fp32 [P, AMAX_PARTS], the gate/up GEMM's H_AMAX)
    hs_ptr,
    # output: [P * SPLIT_K, N] fp32, row = the pair's index (token * k + slot) * SPLIT_K + the K split
    y_ptr,
    # FINISH: the layer's output [T, N], the residual added to it (HAS_RESIDUAL) and the arrival counters
    # [T, N / BLOCK_N] (int32, zero at rest); any pointers otherwise
    out_ptr, res_ptr, cnt_ptr,
    # sizes and strides (N: hidden, K: the intermediate size)
    N, K, MAX_TILES, stride_hm, stride_we, stride_wk, stride_wn, stride_be, stride_bn, stride_se, stride_sn,
    stride_ym, stride_ot, stride_rt,
    # options (W_SCALED: FP8 weights, one fp32 scale per expert and output column, s [E, N])
    HAS_BIAS: tl.constexpr, W_SCALED: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_FMA: tl.constexpr,
    INTERPRET: tl.constexpr, SPLIT_K: tl.constexpr, F16_DOT: tl.constexpr = False, PDL: tl.constexpr = False,
    A_SCALED: tl.constexpr = False, QUANT_A: tl.constexpr = False, QUANT_BLOCK: tl.constexpr = 16,
    EMULATE_FP8: tl.constexpr = False, A_AMAX: tl.constexpr = False, AMAX_PARTS: tl.constexpr = 1,
    SWAP_AB: tl.constexpr = False,
    # W_BLOCK: 128x128 block scales, s [E, ceil(N / 128), ceil(K / 128)] (as _gate_up_kernel's)
    stride_sk=0, W_BLOCK: tl.constexpr = False,
    # GROUPED off: one pair a tile, in the pairs' own order (as _gate_up_kernel's)
    NUM_EXPERTS=0, GROUPED: tl.constexpr = True,
    # FINISH (GROUPED off): the combine in this launch (see below); TOP_K, the slots of a token
    FINISH: tl.constexpr = False, TOP_K: tl.constexpr = 1, HAS_RESIDUAL: tl.constexpr = False,
    EMULATE_BF16: tl.constexpr = False,
    # PREFETCH (with PDL; see _prefetch_down_tile): 0 none, 1 N-contiguous weights, 2 K-contiguous weights
    PREFETCH: tl.constexpr = 0, PREFETCH_ROWS: tl.constexpr = 1, PREFETCH_LINES: tl.constexpr = 1,
):
    """``SPLIT_K`` programs share each output tile, each over its own range of K (whole ``BLOCK_K`` steps), and
    write their partial sums to rows of their own; the combine adds them in a fixed order (deterministic). At one
    token that is what fills the GPU: 4 experts x 90 column tiles are fewer programs than the weights need.

    ``FINISH``: no combine launch. The ``TOP_K * SPLIT_K`` programs of a (token, column tile) count their arrivals
    (``cnt``); the last adds the token's rows of ``y`` in the combine's fixed order (``_sum_terms``: its bits), the
    residual first, writes the output and puts the counter back to zero. A pair with an id outside the experts
    still arrives, with a row of zeros.

    ``PREFETCH`` (with ``PDL``): launched early, the program asks L2 for the first lines of its weight tile before
    it waits (``_prefetch_down_tile``)."""
    pdl_launch_dependents(PDL)
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if PDL and PREFETCH > 0:
        _prefetch_down_tile(w_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr, pid_t, pid_n, pid_k, N, K,
                            stride_we, stride_wk, stride_wn, NUM_EXPERTS, GROUPED, SPLIT_K, BLOCK_N, BLOCK_K,
                            PREFETCH, PREFETCH_ROWS, PREFETCH_LINES)
    pdl_wait(PDL)  # (triton_ops_core.pdl) launched early: no activation is read before the previous kernel is done
    expert, row0, row_end, skip = _tile_rows(tile_expert_ptr, tile_start_ptr, offsets_ptr, pid_t, NUM_EXPERTS,
                                             GROUPED)
    if not FINISH:
        if skip:
            return
    steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_start = pid_k * steps * BLOCK_K
    k_len = tl.minimum(K - k_start, steps * BLOCK_K)
    if FINISH:  # a skipped pair reads nothing (an empty K loop on expert 0's pointers) and stores zeros
        expert = tl.where(skip, 0, expert)
        k_len = tl.where(skip, 0, k_len)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + (k_start + offs_k)[None, :]
    w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + (k_start + offs_k)[:, None].to(tl.int64) * stride_wk
              + offs_n.to(tl.int64)[None, :] * stride_wn)
    a_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    a_inv = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if A_AMAX:  # h's 16/32-bit rows quantized in registers with the scales of their shares from the gate/up GEMM
        a_scale, a_inv = _scales_from_parts(hs_ptr, offs_m.to(tl.int64), mask_m, AMAX_PARTS, BLOCK_M, QUANT_BLOCK)
    elif QUANT_A:  # W8A8 at decode: h's 16/32-bit rows quantized in registers, each over ALL of K (every split)
        a_scale, a_inv, _ = _tile_row_scales(h_ptr, offs_m.to(tl.int64), tl.minimum(row_end - row0, BLOCK_M), K,
                                             stride_hm, 0.0, h_ptr, False, BLOCK_M, QUANT_BLOCK, 16)
    # k_len <= 0 (more splits than K steps): an empty loop, the split writes zeros (or the bias, split 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SWAP_AB:  # (W8A8 at decode: the weight tile as the 64-row operand, see _k_loop_swap)
        wt_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
                   + (k_start + offs_k)[None, :].to(tl.int64) * stride_wk)
        acc, _ = _k_loop_swap(a_ptrs, wt_ptrs, wt_ptrs, mask_m, mask_n, k_len, stride_wk, acc, acc, BLOCK_M, BLOCK_N,
                              BLOCK_K, EVEN_K, NUM_STAGES, DOT_PRECISION, UPCAST, False, a_inv, QUANT_A, EMULATE_FP8)
    else:
        s_row = s_ptr + expert.to(tl.int64) * stride_se + ((pid_n * BLOCK_N) // 128) * stride_sn  # (W_BLOCK)
        acc, _ = _k_loop(a_ptrs, w_ptrs, w_ptrs, mask_m, mask_n, k_len, stride_wk, acc, acc, BLOCK_M, BLOCK_N,
                         BLOCK_K, EVEN_K, NUM_STAGES, DOT_PRECISION, UPCAST, USE_FMA, INTERPRET, False, F16_DOT, None,
                         None, False, a_inv, QUANT_A, EMULATE_FP8, s_row, s_row, stride_sk, k_start, W_BLOCK)
    pdl_streamed(PDL)  # (TRITON_OPS_PDL_TRIGGER=end: the next kernel may launch during the epilogue)
    if W_SCALED:
        acc *= tl.load(s_ptr + expert.to(tl.int64) * stride_se + offs_n * stride_sn, mask=mask_n, other=0.0)[None, :]
    if A_SCALED:
        if QUANT_A:
            acc *= a_scale[:, None]
        else:
            acc *= tl.load(hs_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + expert.to(tl.int64) * stride_be + offs_n * stride_bn, mask=mask_n,
                           other=0.0).to(tl.float32)[None, :]
    pair = _tile_pairs(sorted_ptr, offs_m, mask_m, GROUPED)
    acc = acc * tl.load(wts_ptr + pair, mask=mask_m, other=0.0)[:, None]
    if FINISH:
        acc = tl.where(skip, 0.0, acc)
    y_ptrs = y_ptr + (pair.to(tl.int64) * SPLIT_K + pid_k)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])
    if FINISH:  # (one pair a tile, in pair order: this program's row is pair pid_t, of token pid_t // TOP_K)
        token = pid_t // TOP_K
        tl.debug_barrier()  # every thread's share of the row is stored before the counter says so
        cnt = cnt_ptr + token * tl.num_programs(1) + pid_n
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if arrived == TOP_K * SPLIT_K - 1:
            offs_t = token + tl.arange(0, 1)
            mask = (offs_t < token + 1)[:, None] & mask_n[None, :]
            total = _sum_terms(y_ptr, res_ptr, offs_t, offs_n, mask, stride_ym, stride_rt, TOP_K * SPLIT_K,
                               HAS_RESIDUAL, ".cg")
            tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_ot + offs_n[None, :],
                     _round(total, out_ptr.dtype.element_ty, EMULATE_BF16), mask=mask)
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")  # zero at rest for the next call


# ----------------------------------------------------------------------------------------------------------------
# 5. Combine
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _sum_terms(y_ptr, res_ptr, offs_t, offs_n, mask, stride_ym, stride_rt, TERMS: tl.constexpr,
               HAS_RESIDUAL: tl.constexpr, CACHE: tl.constexpr):
    """``(residual[t] +) sum_j y[t * TERMS + j]`` over columns ``offs_n`` of tokens ``offs_t``, fp32, the terms in a
    fixed order (the same bits on every run, and in ``_combine_kernel`` and the down GEMM's ``FINISH`` alike).
    ``CACHE``: the loads' cache modifier (``.cg``: through L2, for rows other programs of the launch wrote)."""
    acc = tl.zeros(mask.shape, dtype=tl.float32)
    if HAS_RESIDUAL:
        acc = tl.load(res_ptr + offs_t.to(tl.int64)[:, None] * stride_rt + offs_n[None, :], mask=mask,
                      other=0.0).to(tl.float32)
    for j in tl.static_range(TERMS):
        rows = offs_t.to(tl.int64) * TERMS + j
        acc += tl.load(y_ptr + rows[:, None] * stride_ym + offs_n[None, :], mask=mask, other=0.0,
                       cache_modifier=CACHE)
    return acc


@triton.jit(do_not_specialize=["T"])
def _combine_kernel(y_ptr, out_ptr, res_ptr, T, N, stride_ym, stride_ot, stride_rt,
                    TERMS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                    EMULATE_BF16: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr = False):
    """``out[t] = sum_j y[t * TERMS + j]``: a token's k expert outputs (times the down GEMM's K splits); with
    ``HAS_RESIDUAL`` the residual's row first (a decoder layer's add after its MoE, the sum rounded once)."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)  # (triton_ops_core.pdl) launched early: nothing is read before the previous kernel is done
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_t < T)[:, None] & (offs_n < N)[None, :]
    acc = _sum_terms(y_ptr, res_ptr, offs_t, offs_n, mask, stride_ym, stride_rt, TERMS, HAS_RESIDUAL, "")
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_ot + offs_n[None, :],
             _round(acc, out_ptr.dtype.element_ty, EMULATE_BF16), mask=mask)
