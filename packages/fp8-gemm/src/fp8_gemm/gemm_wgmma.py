"""The group- and block-scaled FP8 GEMM for Hopper, written in Gluon: each 128-deep K block's partial product is
scaled and added while the tensor cores already compute the next one.

Group scales (one per output column and 128-deep K block: the default recipe's weights) change every 128 along K,
so each K block's partial product must be scaled before it joins the fp32 accumulator (DeepSeek-V3's promotion).
Triton's ``tl.dot`` waits for a partial product right after issuing it, so in ``gemm_kernels.fp8_gemm_tma_kernel``
the scaling and the tensor-core work take turns. Gluon exposes the asynchronous wgmma
(``warpgroup_mma(..., is_async=True)`` and ``warpgroup_mma_wait``): here K block ``i``'s MMA is issued first, then
block ``i - 1``'s partial product (complete, in other registers) is scaled into the accumulator, then the kernel
waits for block ``i``. The column scales of a K block arrive by TMA with its operands (a row of ``BLOCK_N`` fp32 in
the ring), so no per-thread address arithmetic or loads sit in the loop for them.

The scaling is the limit on Hopper. With 1x128 activation blocks each output element takes two FP32 operations per
K block (row factor, column factor) against the tensor core's 256 FLOPs for it: an SM's 128 FP32 lanes then need as
many cycles as its FP8 MMAs (8192 FLOP/clock), before the loop's other instructions (about 260 a K block a thread
in all, sm_90 machine code). 128x128 weight blocks (``B_BLOCKS``: the FP8 checkpoints' 1x128 x 128x128 recipe) need
one FMA an element: a tile of at most 128 columns lies in one column of weight blocks, so the block's scale joins
the row factors (about 190 instructions a K block a thread). ``gemm`` sends block weights here only when asked
(``path="wgmma"``) or with ``gemm.WGMMA_BLOCK_SCALES`` on.

The warp-specialized ping-pong kernel also takes per-tensor and per-channel weights with faithful accumulation
(``gemm.WGMMA_CHANNEL_SCALES``, or ``path="wgmma"``): the Triton kernel's scheme for those, a fresh partial per K
block added in fp32 and the weight scale in the epilogue, on a TMA producer and two alternating consumer warp groups.

Numerics are those of the Triton kernel: a fresh tensor-core partial per 128-deep K block (FP8 products summed in
the tensor core over 128 only), scaled in fp32 and added in fp32, K blocks in order. Gluon kernels do not run under
Triton's interpreter: ``AVAILABLE`` is False there (and on a Triton without Gluon's Hopper module or outside
``VALIDATED_TRITON``, or with ``TRITON_OPS_GLUON=0`` in the environment), and the caller takes the Triton kernel.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from . import gemm_kernels

try:  # Gluon is experimental: its Hopper module is present from Triton 3.5 on
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
except ImportError:  # pragma: no cover - depends on the Triton build
    gluon = None

from triton_ops_core.device import is_interpreter

# Gluon's API is experimental and the kernel's shared-memory ordering relies on the barriers and proxy fences this
# Triton's compiler inserts (checked in its sm_90 PTX): only the Triton releases it was validated with take it. Triton
# 3.5's Gluon lacks tma.make_tensor_descriptor (and takes warp_specialize's partitions in another form): 3.6 only, as
# the packages require.
VALIDATED_TRITON = ("3.6",)
# TRITON_OPS_GLUON=0 sends these calls back to the Triton kernel (read once, at import)
AVAILABLE = (gluon is not None and not is_interpreter() and os.environ.get("TRITON_OPS_GLUON", "1") != "0"
             and triton.__version__.startswith(VALIDATED_TRITON))
SCALE_BLOCK = 128  # the K depth of one scale block, and of the kernel's K step
# the weight-scale modes (gemm_kernels' numbering) as the kernels' globals must be: constexpr. The ping-pong kernel
# takes all four (B_MODE); the one-partition and tall kernels take group or block weights (B_BLOCKS)
_B_TENSOR, _B_CHANNEL, _B_BLOCK, _B_GROUP = (tl.constexpr(m) for m in (gemm_kernels.B_TENSOR, gemm_kernels.B_CHANNEL,
                                                                       gemm_kernels.B_BLOCK, gemm_kernels.B_GROUP))


def warps_per_cta(block_m: int, num_warps: int) -> list[int]:
    """wgmma's warp grid: the atom is four warps over 64 rows; more warps stack along M while each keeps at least
    16 rows, then along N."""
    warps = [4, 1]
    while warps[0] * warps[1] != num_warps:
        if block_m > 16 * warps[0]:
            warps[0] *= 2
        else:
            warps[1] *= 2
    return warps


def instr_n(block_m: int, block_n: int, num_warps: int) -> int:
    """The widest wgmma N (a multiple of 8, at most 256) that divides each warp group's share of the columns."""
    n_reps = triton.cdiv(num_warps, triton.cdiv(block_m, 16))
    max_n = max(block_n // n_reps, 8)
    n = 256
    while n > max_n or block_n % n:
        n -= 8
    return n


if gluon is not None:

    @gluon.jit
    def _refill(a_desc, b_desc, s_desc, a_bufs, b_bufs, s_bufs, bars, off_m, off_n, kb, k_end,
                STAGES: gl.constexpr, NBYTES: gl.constexpr, B_BLOCKS: gl.constexpr):
        # K block kb (if below k_end; TMA zero-fills past K) into its ring slot: a, b and (group scales) b's
        # column scales
        slot = kb % STAGES
        pred = kb < k_end
        mbarrier.expect(bars.index(slot), NBYTES, pred=pred)
        tma.async_copy_global_to_shared(a_desc, [off_m, kb * 128], bars.index(slot), a_bufs.index(slot), pred=pred)
        tma.async_copy_global_to_shared(b_desc, [off_n, kb * 128], bars.index(slot), b_bufs.index(slot), pred=pred)
        if not B_BLOCKS:
            tma.async_copy_global_to_shared(s_desc, [kb, off_n], bars.index(slot), s_bufs.index(slot), pred=pred)

    @gluon.jit
    def _tile_origin(M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
        # this program's tile in grouped order: GROUP_M row tiles share their B column tiles while they are hot in L2
        return _tile_origin_of(gl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    @gluon.jit
    def _tile_origin_of(pid, M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
        # tile ``pid``'s origin in grouped order
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        group_size = GROUP_M * num_pid_n
        first_m = (pid // group_size) * GROUP_M
        rows = gl.minimum(num_pid_m - first_m, GROUP_M)
        return (first_m + (pid % group_size) % rows) * BLOCK_M, (pid % group_size) // rows * BLOCK_N

    @gluon.jit
    def _operand_descriptors(a_ptr, b_ptr, bs_ptr, M, N, K, stride_am, stride_bn, stride_bs, k_tiles,
                             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, B_BLOCKS: gl.constexpr):
        # TMA descriptors of a, b and (group scales) b's column scales; a block scale is one scalar a tile and K
        # block, loaded where it is used (its descriptor slot holds a's, never read)
        ab_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        s_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
        a_desc = tma.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [BLOCK_M, 128], ab_layout)
        b_desc = tma.make_tensor_descriptor(b_ptr, [N, K], [stride_bn, 1], [BLOCK_N, 128], ab_layout)
        if B_BLOCKS:
            s_desc = a_desc
        else:
            s_desc = tma.make_tensor_descriptor(bs_ptr, [k_tiles, N], [stride_bs, 1], [1, BLOCK_N], s_layout)
        return a_desc, b_desc, s_desc

    @gluon.jit
    def _output_descriptor(c_ptr, M, N, stride_cm, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        # the TMA descriptor the epilogue stores [BLOCK_M, BLOCK_N] tiles of c through
        c_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128,
                                                      element_bitwidth=c_ptr.dtype.element_ty.primitive_bitwidth,
                                                      rank=2)
        return tma.make_tensor_descriptor(c_ptr, [M, N], [stride_cm, 1], [BLOCK_M, BLOCK_N], c_layout)

    @gluon.jit
    def _alloc_ring(a_desc, b_desc, s_desc, off_m, off_n, k_end, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    STAGES: gl.constexpr, B_BLOCKS: gl.constexpr):
        # the STAGES-deep ring of K blocks (a, b, b's column scales) and its barriers, every slot's load started
        ab_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        s_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
        a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, 128], ab_layout)
        b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, 128], ab_layout)
        s_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK_N], s_layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        nbytes: gl.constexpr = (BLOCK_M + BLOCK_N) * 128 + BLOCK_N * 4 * (1 - B_BLOCKS)
        for i in gl.static_range(STAGES):
            _refill(a_desc, b_desc, s_desc, a_bufs, b_bufs, s_bufs, bars, off_m, off_n, i, k_end, STAGES, nbytes,
                    B_BLOCKS)
        return a_bufs, b_bufs, s_bufs, bars

    @gluon.jit
    def _column_row(ptr, col0, N, WIDTH: gl.constexpr, num_warps: gl.constexpr, layout: gl.constexpr):
        # a per-column vector (bias, channel scales) as fp32, shaped [1, WIDTH] for the accumulator: one column a
        # thread, then to the accumulator's layout (the MMA layout's own load needs an address per column a thread
        # holds, which pushed the loop's registers into spills with block weights)
        cols: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        offs = col0 + gl.arange(0, WIDTH, layout=cols)
        vec = gl.load(ptr + offs, mask=offs < N, other=0.0).to(gl.float32)
        return gl.convert_layout(vec, gl.SliceLayout(0, layout))[None, :]

    @gluon.jit
    def _add_bias(acc, bias_ptr, col0, N, WIDTH: gl.constexpr, num_warps: gl.constexpr, layout: gl.constexpr):
        return acc + _column_row(bias_ptr, col0, N, WIDTH, num_warps, layout)

    @gluon.jit
    def _issue(a_bufs, b_bufs, bars, kb, part, STAGES: gl.constexpr):
        # wait for K block kb's operands, then start its MMA into ``part``'s registers (their old value is dead)
        slot = kb % STAGES
        mbarrier.wait(bars.index(slot), (kb // STAGES) & 1)
        return warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), part, use_acc=False,
                             is_async=True)

    @gluon.jit
    def _row_factors(sa_rows, offs_m, kb, SA_K, k_tiles, A_MODE: gl.constexpr, BLOCK_M: gl.constexpr):
        # K block kb's row factors: 1x128 activation blocks, else 1 (row and tensor scales wait for the epilogue).
        # No masks: sa_rows clamps the rows to M (rows past it are zero-filled operands, never stored) and an odd
        # block count's padding block (zero operands) takes the last block's scales, finite times zero.
        if A_MODE == 2:
            sa = gl.load(sa_rows + gl.minimum(kb, k_tiles - 1) * SA_K)
        else:
            sa = gl.full([BLOCK_M], 1.0, gl.float32, layout=offs_m.type.layout)
        return sa

    @gluon.jit
    def _promote(acc, part, s_bufs, sa_rows, bs_col_ptr, offs_m, kb, SA_K, k_tiles, stride_bs,
                 STAGES: gl.constexpr, A_MODE: gl.constexpr, B_BLOCKS: gl.constexpr, BLOCK_M: gl.constexpr,
                 mma: gl.constexpr, FIRST: gl.constexpr = False):
        # acc += K block kb's partial product times its row and column factors (FIRST: acc starts from it). Group
        # scales: the columns' from the ring, two operations an element. 128x128 weight blocks: the tile lies in one
        # column of blocks, so the block's scale joins the row factors and each element takes one FMA.
        sa = _row_factors(sa_rows, offs_m, kb, SA_K, k_tiles, A_MODE, BLOCK_M)
        if B_BLOCKS:
            f = (sa * gl.load(bs_col_ptr + gl.minimum(kb, k_tiles - 1) * stride_bs))[:, None]
            if FIRST:
                return part * f
            else:
                return gl.fma(part, f, acc)
        else:
            sb = s_bufs.index(kb % STAGES).load(mma)  # [1, BLOCK_N], broadcast over the rows
            if FIRST:
                return part * sa[:, None] * sb
            else:
                return acc + part * sa[:, None] * sb

    @gluon.jit
    def fp8_group_gemm_wgmma_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr,
        M, N, K, stride_am, stride_bn, stride_cm, SA_M, SA_K, stride_bs,
        A_MODE: gl.constexpr, B_BLOCKS: gl.constexpr, HAS_BIAS: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
        WARPS_M: gl.constexpr, INSTR_N: gl.constexpr, num_warps: gl.constexpr,
    ):
        """``c = a @ b.T`` for E4M3 ``a [M, K]`` and K-major ``b [N, K]`` with group scales ``bs
        [ceil(K / 128), N]`` or (``B_BLOCKS``) 128x128 block scales ``bs [ceil(K / 128), ceil(N / 128)]`` (row
        stride ``stride_bs``; blocks need ``BLOCK_N`` to divide 128), one ``[BLOCK_M, BLOCK_N]`` tile a program
        (grouped order), a ``STAGES``-deep TMA ring of 128-deep K blocks (a, b and, for groups, the block's row of
        b scales). ``A_MODE`` 0 tensor, 1 row, 2 1x128 blocks (``gemm_kernels``' numbering).

        K blocks go two at a time, into two partial tiles in turn: the MMA of one writes over the tile whose
        product was scaled in the previous half step, so no register copy feeds it (one loop-carried partial
        cost 64 moves a K block)."""
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS_M, num_warps // WARPS_M],
                                                      instr_shape=[16, INSTR_N, 32])
        k_tiles = gl.cdiv(K, 128)
        a_desc, b_desc, s_desc = _operand_descriptors(a_ptr, b_ptr, bs_ptr, M, N, K, stride_am, stride_bn, stride_bs,
                                                      k_tiles, BLOCK_M, BLOCK_N, B_BLOCKS)
        c_desc = _output_descriptor(c_ptr, M, N, stride_cm, BLOCK_M, BLOCK_N)
        off_m, off_n = _tile_origin(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
        sa_rows = as_ptr + gl.minimum(offs_m, M - 1) * SA_M  # 1x128 activation blocks: each row's scales
        bs_col_ptr = bs_ptr + off_n // 128  # 128x128 weight blocks: the tile's column of block scales
        k_pairs = (k_tiles + 1) // 2 * 2  # an odd count's last block: TMA's zero fill (operands and column scales)
        nbytes: gl.constexpr = (BLOCK_M + BLOCK_N) * 128 + BLOCK_N * 4 * (1 - B_BLOCKS)
        # the whole ring loading; a slot takes block + STAGES once its block is scaled
        a_bufs, b_bufs, s_bufs, bars = _alloc_ring(a_desc, b_desc, s_desc, off_m, off_n, k_pairs, BLOCK_M, BLOCK_N,
                                                   STAGES, B_BLOCKS)

        part0 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
        part1 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
        # The first pair, peeled (its first half has no previous block to scale). Inside the loop, a conditional
        # scaling there made ptxas wait for the MMA in flight halfway through each half step's scaling
        # ("warpgroup.wait is injected", C7517) and move part of the other half's after its wait.
        token = _issue(a_bufs, b_bufs, bars, 0, part0, STAGES)
        part0 = warpgroup_mma_wait(num_outstanding=0, deps=(token, a_bufs.index(0), b_bufs.index(0)))[0]
        token = _issue(a_bufs, b_bufs, bars, 1, part1, STAGES)
        acc = _promote(part0, part0, s_bufs, sa_rows, bs_col_ptr, offs_m, 0, SA_K, k_tiles,
                       stride_bs, STAGES, A_MODE, B_BLOCKS, BLOCK_M, mma, FIRST=True)
        _refill(a_desc, b_desc, s_desc, a_bufs, b_bufs, s_bufs, bars, off_m, off_n, STAGES, k_pairs, STAGES, nbytes,
                B_BLOCKS)
        part1 = warpgroup_mma_wait(num_outstanding=0, deps=(token, a_bufs.index(1 % STAGES),
                                                            b_bufs.index(1 % STAGES)))[0]
        for kp in range(2, k_pairs, 2):
            # even block kp into part0 while block kp - 1 (part1) is scaled into the accumulator; then its ring
            # slot (its MMA and scale reads done) takes block kp - 1 + STAGES
            s0 = kp % STAGES
            token = _issue(a_bufs, b_bufs, bars, kp, part0, STAGES)
            acc = _promote(acc, part1, s_bufs, sa_rows, bs_col_ptr, offs_m, kp - 1, SA_K, k_tiles,
                           stride_bs, STAGES, A_MODE, B_BLOCKS, BLOCK_M, mma)
            _refill(a_desc, b_desc, s_desc, a_bufs, b_bufs, s_bufs, bars, off_m, off_n, kp - 1 + STAGES, k_pairs,
                    STAGES, nbytes, B_BLOCKS)
            part0 = warpgroup_mma_wait(num_outstanding=0, deps=(token, a_bufs.index(s0), b_bufs.index(s0)))[0]
            # odd block kp + 1 into part1 while block kp (part0) is scaled
            s1 = (kp + 1) % STAGES
            token = _issue(a_bufs, b_bufs, bars, kp + 1, part1, STAGES)
            acc = _promote(acc, part0, s_bufs, sa_rows, bs_col_ptr, offs_m, kp, SA_K, k_tiles,
                           stride_bs, STAGES, A_MODE, B_BLOCKS, BLOCK_M, mma)
            _refill(a_desc, b_desc, s_desc, a_bufs, b_bufs, s_bufs, bars, off_m, off_n, kp + STAGES, k_pairs,
                    STAGES, nbytes, B_BLOCKS)
            part1 = warpgroup_mma_wait(num_outstanding=0, deps=(token, a_bufs.index(s1), b_bufs.index(s1)))[0]
        acc = _promote(acc, part1, s_bufs, sa_rows, bs_col_ptr, offs_m, k_pairs - 1, SA_K, k_tiles,
                       stride_bs, STAGES, A_MODE, B_BLOCKS, BLOCK_M, mma)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        if A_MODE == 0:
            acc = acc * gl.load(as_ptr)
        elif A_MODE == 1:
            acc = acc * gl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
        if HAS_BIAS:
            acc = _add_bias(acc, bias_ptr, off_n, N, BLOCK_N, num_warps, mma)
        c_smem = gl.allocate_shared_memory(c_desc.dtype, [BLOCK_M, BLOCK_N], c_desc.layout)
        c_smem.store(acc.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _tall_factors(sa_rows, bs_col_ptr, s_bufs, kb, SA_K, k_tiles, stride_bs, H: gl.constexpr,
                      STAGES: gl.constexpr, A_MODE: gl.constexpr, B_BLOCKS: gl.constexpr, SUB_M: gl.constexpr,
                      SUB_N: gl.constexpr, sub: gl.constexpr):
        # K block kb's factors of one [SUB_M, SUB_N] sub-tile: [SUB_M, 1] (block weights: the row factors times
        # the block's scale) or [SUB_M, SUB_N] (group weights: times column half H's scales from the ring)
        if A_MODE == 2:
            sa = gl.load(sa_rows + gl.minimum(kb, k_tiles - 1) * SA_K)
        else:
            sa = gl.full([SUB_M], 1.0, gl.float32, layout=gl.SliceLayout(1, sub))
        if B_BLOCKS:
            return (sa * gl.load(bs_col_ptr + gl.minimum(kb, k_tiles - 1) * stride_bs))[:, None]
        else:
            sb = s_bufs.index(kb % STAGES).slice(H * SUB_N, SUB_N, dim=1).load(sub)  # [1, SUB_N]
            return sa[:, None] * sb

    @gluon.jit
    def _tall_a(a_bufs, kb, S: gl.constexpr, STAGES: gl.constexpr, SUB_M: gl.constexpr, A_REGS: gl.constexpr,
                sub: gl.constexpr):
        # row half S of K block kb's a tile: its shared-memory view, or (A_REGS) its values in registers, read from
        # shared memory once for both column halves' MMAs instead of once by each
        view = a_bufs.index(kb % STAGES).slice(S * SUB_M, SUB_M, dim=0)
        if A_REGS:
            return view.load(gl.DotOperandLayout(operand_index=0, parent=sub, k_width=4))
        else:
            return view

    @gluon.jit
    def _tall_issue(a, b_bufs, kb, part, H: gl.constexpr, STAGES: gl.constexpr, SUB_N: gl.constexpr):
        # K block kb's MMA of sub-tile (a's row half, column half H) into ``part`` (its old value is dead)
        b = b_bufs.index(kb % STAGES).slice(H * SUB_N, SUB_N, dim=0)
        return warpgroup_mma(a, b.permute((1, 0)), part, use_acc=False, is_async=True)

    @gluon.jit
    def _tall_wait(token, a_bufs, b_bufs, kb, STAGES: gl.constexpr):
        # the MMA's result; the slot's a and b stay untouched until then (a in registers: ptxas tracks the
        # asynchronous MMA's register operands itself; the sm_90 compile test fails on any wait it injects for them)
        slot = kb % STAGES
        return warpgroup_mma_wait(num_outstanding=0, deps=(token, a_bufs.index(slot), b_bufs.index(slot)))[0]

    @gluon.jit
    def _tall_store(acc, c_desc, c_smem, as_ptr, bias_ptr, off_m, off_n, M, N, S: gl.constexpr, H: gl.constexpr,
                    A_MODE: gl.constexpr, HAS_BIAS: gl.constexpr, SUB_M: gl.constexpr, SUB_N: gl.constexpr,
                    num_warps: gl.constexpr, sub: gl.constexpr):
        # one sub-tile's epilogue: per-tensor or per-row activation scales, the bias, then a TMA store through
        # the one staging buffer (the previous sub-tile's store drained first)
        row0 = off_m + S * SUB_M
        col0 = off_n + H * SUB_N
        if A_MODE == 0:
            acc = acc * gl.load(as_ptr)
        elif A_MODE == 1:
            offs_m = row0 + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, sub))
            acc = acc * gl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
        if HAS_BIAS:
            acc = _add_bias(acc, bias_ptr, col0, N, SUB_N, num_warps, sub)
        tma.store_wait(pendings=0)
        c_smem.store(acc.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [row0, col0], c_smem)

    @gluon.jit
    def fp8_scaled_gemm_wgmma_tall_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr,
        M, N, K, stride_am, stride_bn, stride_cm, SA_M, SA_K, stride_bs,
        A_MODE: gl.constexpr, B_BLOCKS: gl.constexpr, HAS_BIAS: gl.constexpr,
        GROUP_M: gl.constexpr, STAGES: gl.constexpr, A_REGS: gl.constexpr, num_warps: gl.constexpr,
    ):
        """``fp8_group_gemm_wgmma_kernel``'s product (same arguments and numerics) on 256 x 128 tiles: half the
        operand bytes from L2 of its 128 x 128 tiles for the same product (those tiles are L2-bound).

        Two warp groups hold the 256 x 128 accumulator as four 128 x 64 sub-tiles; each K block runs four sub-tile
        MMAs (row half S, column half H), each into one of two 128 x 64 partials in turn while the previous
        sub-tile's partial is scaled into its accumulator. Registers: four accumulator and two partial sub-tiles,
        as many as the 128 x 128 kernel's one accumulator and two partials.

        The 64-column MMAs read each row half of ``a`` from shared memory twice a K block (once per column half),
        which cost what the halved L2 traffic saved (H100, session 48: no faster than 128 x 128 tiles). ``A_REGS``
        loads each row half into registers once and feeds both MMAs from there (wgmma's register operand), cutting
        the shared-memory reads a K block by a quarter; not yet run on a GPU (``launch_args``: ``A_REGS`` in the
        config, off by default and outside the tuner's space)."""
        BLOCK_M: gl.constexpr = 256
        BLOCK_N: gl.constexpr = 128
        SUB_M: gl.constexpr = 128
        SUB_N: gl.constexpr = 64
        sub: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, SUB_N, 32])
        k_tiles = gl.cdiv(K, 128)
        a_desc, b_desc, s_desc = _operand_descriptors(a_ptr, b_ptr, bs_ptr, M, N, K, stride_am, stride_bn, stride_bs,
                                                      k_tiles, BLOCK_M, BLOCK_N, B_BLOCKS)
        c_desc = _output_descriptor(c_ptr, M, N, stride_cm, SUB_M, SUB_N)
        off_m, off_n = _tile_origin(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows0 = off_m + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, sub))
        sa_rows0 = as_ptr + gl.minimum(rows0, M - 1) * SA_M
        sa_rows1 = as_ptr + gl.minimum(rows0 + SUB_M, M - 1) * SA_M
        bs_col_ptr = bs_ptr + off_n // 128
        nbytes: gl.constexpr = (BLOCK_M + BLOCK_N) * 128 + BLOCK_N * 4 * (1 - B_BLOCKS)
        a_bufs, b_bufs, s_bufs, bars = _alloc_ring(a_desc, b_desc, s_desc, off_m, off_n, k_tiles, BLOCK_M, BLOCK_N,
                                                   STAGES, B_BLOCKS)

        part0 = gl.zeros([SUB_M, SUB_N], gl.float32, layout=sub)
        part1 = gl.zeros([SUB_M, SUB_N], gl.float32, layout=sub)
        acc11 = gl.zeros([SUB_M, SUB_N], gl.float32, layout=sub)
        # K block 0, peeled: its first three sub-tiles start their accumulators
        mbarrier.wait(bars.index(0), 0)
        a0 = _tall_a(a_bufs, 0, 0, STAGES, SUB_M, A_REGS, sub)
        token = _tall_issue(a0, b_bufs, 0, part0, 0, STAGES, SUB_N)
        part0 = _tall_wait(token, a_bufs, b_bufs, 0, STAGES)
        token = _tall_issue(a0, b_bufs, 0, part1, 1, STAGES, SUB_N)
        acc00 = part0 * _tall_factors(sa_rows0, bs_col_ptr, s_bufs, 0, SA_K, k_tiles,
                                      stride_bs, 0, STAGES, A_MODE, B_BLOCKS, SUB_M, SUB_N, sub)
        part1 = _tall_wait(token, a_bufs, b_bufs, 0, STAGES)
        a1 = _tall_a(a_bufs, 0, 1, STAGES, SUB_M, A_REGS, sub)
        token = _tall_issue(a1, b_bufs, 0, part0, 0, STAGES, SUB_N)
        acc01 = part1 * _tall_factors(sa_rows0, bs_col_ptr, s_bufs, 0, SA_K, k_tiles,
                                      stride_bs, 1, STAGES, A_MODE, B_BLOCKS, SUB_M, SUB_N, sub)
        part0 = _tall_wait(token, a_bufs, b_bufs, 0, STAGES)
        token = _tall_issue(a1, b_bufs, 0, part1, 1, STAGES, SUB_N)
        acc10 = part0 * _tall_factors(sa_rows1, bs_col_ptr, s_bufs, 0, SA_K, k_tiles,
                                      stride_bs, 0, STAGES, A_MODE, B_BLOCKS, SUB_M, SUB_N, sub)
        part1 = _tall_wait(token, a_bufs, b_bufs, 0, STAGES)
        for kb in range(1, k_tiles):
            # sub-tile (0, 0) of block kb while block kb - 1's last partial is scaled; then block kb - 1's slot (its
            # MMAs and scale reads done) takes block kb - 1 + STAGES
            mbarrier.wait(bars.index(kb % STAGES), (kb // STAGES) & 1)
            a0 = _tall_a(a_bufs, kb, 0, STAGES, SUB_M, A_REGS, sub)
            token = _tall_issue(a0, b_bufs, kb, part0, 0, STAGES, SUB_N)
            f = _tall_factors(sa_rows1, bs_col_ptr, s_bufs, kb - 1, SA_K, k_tiles, stride_bs, 1,
                              STAGES, A_MODE, B_BLOCKS, SUB_M, SUB_N, sub)
            acc11 = gl.fma(part1, f, acc11)
            _refill(a_desc, b_desc, s_desc, a_bufs, b_bufs, s_bufs, bars, off_m, off_n, kb - 1 + STAGES, k_tiles,
                    STAGES, nbytes, B_BLOCKS)
            part0 = _tall_wait(token, a_bufs, b_bufs, kb, STAGES)
            token = _tall_issue(a0, b_bufs, kb, part1, 1, STAGES, SUB_N)
            f = _tall_factors(sa_rows0, bs_col_ptr, s_bufs, kb, SA_K, k_tiles, stride_bs, 0,
                              STAGES, A_MODE, B_BLOCKS, SUB_M, SUB_N, sub)
            acc00 = gl.fma(part0, f, acc00)
            part1 = _tall_wait(token, a_bufs, b_bufs, kb, STAGES)
            a1 = _tall_a(a_bufs, kb, 1, STAGES, SUB_M, A_REGS, sub)
            token = _tall_issue(a1, b_bufs, kb, part0, 0, STAGES, SUB_N)
            f = _tall_factors(sa_rows0, bs_col_ptr, s_bufs, kb, SA_K, k_tiles, stride_bs, 1,
                              STAGES, A_MODE, B_BLOCKS, SUB_M, SUB_N, sub)
            acc01 = gl.fma(part1, f, acc01)
            part0 = _tall_wait(token, a_bufs, b_bufs, kb, STAGES)
            token = _tall_issue(a1, b_bufs, kb, part1, 1, STAGES, SUB_N)
            f = _tall_factors(sa_rows1, bs_col_ptr, s_bufs, kb, SA_K, k_tiles, stride_bs, 0,
                              STAGES, A_MODE, B_BLOCKS, SUB_M, SUB_N, sub)
            acc10 = gl.fma(part0, f, acc10)
            part1 = _tall_wait(token, a_bufs, b_bufs, kb, STAGES)
        f = _tall_factors(sa_rows1, bs_col_ptr, s_bufs, k_tiles - 1, SA_K, k_tiles, stride_bs, 1,
                          STAGES, A_MODE, B_BLOCKS, SUB_M, SUB_N, sub)
        acc11 = gl.fma(part1, f, acc11)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        c_smem = gl.allocate_shared_memory(c_desc.dtype, [SUB_M, SUB_N], c_desc.layout)
        _tall_store(acc00, c_desc, c_smem, as_ptr, bias_ptr, off_m, off_n, M, N, 0, 0, A_MODE, HAS_BIAS, SUB_M, SUB_N,
                    num_warps, sub)
        _tall_store(acc01, c_desc, c_smem, as_ptr, bias_ptr, off_m, off_n, M, N, 0, 1, A_MODE, HAS_BIAS, SUB_M, SUB_N,
                    num_warps, sub)
        _tall_store(acc10, c_desc, c_smem, as_ptr, bias_ptr, off_m, off_n, M, N, 1, 0, A_MODE, HAS_BIAS, SUB_M, SUB_N,
                    num_warps, sub)
        _tall_store(acc11, c_desc, c_smem, as_ptr, bias_ptr, off_m, off_n, M, N, 1, 1, A_MODE, HAS_BIAS, SUB_M, SUB_N,
                    num_warps, sub)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _pingpong_producer(a_desc, b_desc, s_desc, a_bufs, b_bufs, s_bufs, ready, empty, M, N, k_tiles,
                           STAGES: gl.constexpr, NBYTES: gl.constexpr, B_MODE: gl.constexpr, GROUP_M: gl.constexpr):
        # the default partition: each K block of each of the program's tiles into its ring slot once both
        # consumers released the slot's previous block (empty: count 2; a fresh barrier counts as released: phase
        # 1). It runs ahead across tiles: the next tile's first blocks load while the consumers store this one.
        num_tiles = gl.cdiv(M, 128) * gl.cdiv(N, 128)
        it = 0  # K blocks loaded so far, over the program's tiles: the ring position and phase
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            off_m, off_n = _tile_origin_of(tile, M, N, 128, 128, GROUP_M)
            for kb in range(k_tiles):
                slot = it % STAGES
                mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(slot), NBYTES)
                tma.async_copy_global_to_shared(a_desc, [off_m, kb * 128], ready.index(slot), a_bufs.index(slot))
                tma.async_copy_global_to_shared(b_desc, [off_n, kb * 128], ready.index(slot), b_bufs.index(slot))
                if B_MODE == _B_GROUP:
                    tma.async_copy_global_to_shared(s_desc, [kb, off_n], ready.index(slot), s_bufs.index(slot))
                it += 1

    @gluon.jit
    def _pingpong_scales(acc, as_ptr, bs_ptr, offs_m, off_n, M, N, A_MODE: gl.constexpr, B_MODE: gl.constexpr,
                         BLOCK_N: gl.constexpr, mma: gl.constexpr):
        # the scales constant along K, in the Triton kernel's order (gemm_kernels._epilogue): per-tensor or per-row
        # activations, then per-channel or per-tensor weights (a per-tensor pair as one product)
        if A_MODE == 0:
            if B_MODE == _B_TENSOR:
                acc = acc * (gl.load(as_ptr) * gl.load(bs_ptr))
            else:
                acc = acc * gl.load(as_ptr)
        elif A_MODE == 1:
            acc = acc * gl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
        if B_MODE == _B_CHANNEL:
            acc = acc * _column_row(bs_ptr, off_n, N, BLOCK_N, 4, mma)
        elif B_MODE == _B_TENSOR:
            if A_MODE != 0:
                acc = acc * gl.load(bs_ptr)
        return acc

    @gluon.jit
    def _pingpong_consumer(half: gl.constexpr, c_desc, a_bufs, b_bufs, s_bufs, ready, empty, as_ptr, bs_ptr,
                           bias_ptr, M, N, k_tiles, SA_M, SA_K, stride_bs, A_MODE: gl.constexpr,
                           B_MODE: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr,
                           STAGES: gl.constexpr, GROUP_M: gl.constexpr):
        # one warp group: rows half * 64 .. + 63 of each 128-row tile. Each K block: its MMA into the partial, the
        # wait, the slot released, the promotion; the other warp group's MMA runs on the tensor cores meanwhile.
        # A tile's store is asynchronous: waited for only before the next tile's result goes into the buffer.
        # Per-tensor and per-channel weights (B_MODE 0, 1) are constant along K: their partials join the
        # accumulator unscaled (times the 1x128 activation scales, if any) and the weight scale waits for the
        # epilogue, as in the Triton kernel.
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        c_smem = gl.allocate_shared_memory(c_desc.dtype, [64, BLOCK_N], c_desc.layout)
        num_tiles = gl.cdiv(M, 128) * gl.cdiv(N, 128)
        it = 0  # K blocks consumed so far (the producer's count)
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            off_m, off_n = _tile_origin_of(tile, M, N, 128, BLOCK_N, GROUP_M)
            row0 = off_m + half * 64
            offs_m = row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, mma))
            sa_rows = as_ptr + gl.minimum(offs_m, M - 1) * SA_M
            bs_col_ptr = bs_ptr + off_n // 128
            acc = gl.zeros([64, BLOCK_N], gl.float32, layout=mma)
            part = gl.zeros([64, BLOCK_N], gl.float32, layout=mma)
            for kb in range(k_tiles):
                slot = it % STAGES
                mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
                a_half = a_bufs.index(slot).slice(half * 64, 64, dim=0)
                b_tile = b_bufs.index(slot).permute((1, 0))
                token = warpgroup_mma(a_half, b_tile, part, use_acc=False, is_async=True)
                f = _row_factors(sa_rows, offs_m, kb, SA_K, k_tiles, A_MODE, 64)
                if B_MODE == _B_BLOCK:
                    f = f * gl.load(bs_col_ptr + gl.minimum(kb, k_tiles - 1) * stride_bs)
                part = warpgroup_mma_wait(num_outstanding=0, deps=(token, a_half, b_tile))[0]
                if B_MODE == _B_GROUP:
                    sb = s_bufs.index(slot).load(mma)  # read before the slot is released
                    acc = acc + part * f[:, None] * sb
                    fence_async_shared()  # (the generic-proxy read of the scales before the producer's TMA write)
                elif B_MODE == _B_BLOCK or A_MODE == 2:
                    acc = gl.fma(part, f[:, None], acc)
                else:
                    acc = acc + part
                mbarrier.arrive(empty.index(slot), count=1)
                it += 1
            acc = _pingpong_scales(acc, as_ptr, bs_ptr, offs_m, off_n, M, N, A_MODE, B_MODE, BLOCK_N, mma)
            if HAS_BIAS:
                acc = _add_bias(acc, bias_ptr, off_n, N, BLOCK_N, 4, mma)
            tma.store_wait(pendings=0)  # the previous tile's store has read the buffer
            c_smem.store(acc.to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [row0, off_n], c_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def fp8_scaled_gemm_wgmma_pingpong_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr,
        M, N, K, stride_am, stride_bn, stride_cm, SA_M, SA_K, stride_bs,
        A_MODE: gl.constexpr, B_MODE: gl.constexpr, HAS_BIAS: gl.constexpr,
        GROUP_M: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr,
    ):
        """The 128 x 128 tile of ``fp8_group_gemm_wgmma_kernel`` (same arguments, scales and numerics) with warp
        specialization: the default partition (``num_warps`` warps) loads the ring by TMA; two worker warp groups
        (``CONSUMER_REGS`` registers a thread) each own 64 of the tile's rows and run their K blocks one at a time
        (MMA, wait, promotion), so one group's promotion runs beside the other's MMA on the SM's tensor cores:
        the overlap the one-partition kernel's schedule loses in ptxas (docs/fp8-gemm.md, session 49). One
        partial a warp group (no second one in flight). A program walks the tiles ``program_id``, ``+
        num_programs`` ... (grouped order): launched with one program a tile, or persistent (a grid of at most
        one program an SM: ``PERSISTENT`` configs), where the ring runs on across tiles, so the next tile's loads
        and this tile's store overlap. ``B_MODE`` (``gemm_kernels``' numbering) takes every weight scaling: group
        and 128x128 block weights promote per K block as above; per-tensor and per-channel weights (faithful
        accumulation: a fresh partial per K block, added in fp32) are scaled once in the epilogue."""
        BLOCK_M: gl.constexpr = 128
        BLOCK_N: gl.constexpr = 128
        k_tiles = gl.cdiv(K, 128)
        a_desc, b_desc, s_desc = _operand_descriptors(a_ptr, b_ptr, bs_ptr, M, N, K, stride_am, stride_bn, stride_bs,
                                                      k_tiles, BLOCK_M, BLOCK_N, B_MODE != _B_GROUP)
        c_desc = _output_descriptor(c_ptr, M, N, stride_cm, 64, BLOCK_N)
        ab_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        s_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
        a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, 128], ab_layout)
        b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, 128], ab_layout)
        s_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK_N], s_layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # both consumer warp groups release a slot
        nbytes: gl.constexpr = (BLOCK_M + BLOCK_N) * 128 + BLOCK_N * 4 * (B_MODE == _B_GROUP)
        gl.warp_specialize([
            (_pingpong_producer, (a_desc, b_desc, s_desc, a_bufs, b_bufs, s_bufs, ready, empty, M, N, k_tiles,
                                  STAGES, nbytes, B_MODE, GROUP_M)),
            (_pingpong_consumer, (0, c_desc, a_bufs, b_bufs, s_bufs, ready, empty, as_ptr, bs_ptr, bias_ptr, M, N,
                                  k_tiles, SA_M, SA_K, stride_bs, A_MODE, B_MODE, HAS_BIAS, BLOCK_N, STAGES,
                                  GROUP_M)),
            (_pingpong_consumer, (1, c_desc, a_bufs, b_bufs, s_bufs, ready, empty, as_ptr, bs_ptr, bias_ptr, M, N,
                                  k_tiles, SA_M, SA_K, stride_bs, A_MODE, B_MODE, HAS_BIAS, BLOCK_N, STAGES,
                                  GROUP_M)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
        # (warp_specialize joins the partitions before this point; the barriers die with the program)


else:  # pragma: no cover
    fp8_group_gemm_wgmma_kernel = fp8_scaled_gemm_wgmma_tall_kernel = fp8_scaled_gemm_wgmma_pingpong_kernel = None


def default_config() -> dict:
    """The persistent warp-specialized kernel's 128 x 128 tiles (a TMA partition, two consumer warp groups, a 3-deep
    ring, one program an SM), for group and 128x128 block weights. On the H100 (session 50, Llama-3-8B's
    projections at 2048 rows, ``benchmarks/dev/w8a8_prefill.py --lead``, docs/fp8-gemm.md) against the
    one-partition 128 x 128 kernel (the default of session 48, which beat 64 x 128 tiles there): block weights
    138.2 -> 106.8 us (q/k/v), 93.9 -> 75.3 (o), 312.3 -> 237.7 (gate), 284.3 -> 250.7 (down), 0.90-1.06x of the
    per-channel kernel's speed; group weights 162.3 -> 129.2, 108.0 -> 88.3, 378.7 -> 321.4, 311.5 -> 321.4 (down
    the one loss, 3 %). Not in the tuner's space (explicit configs only). The H200's shipped entries (session 20,
    group weights, the one-partition kernel's 64 x 128 tiles) predate it and still win selection there."""
    return {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "STAGES": 3, "num_warps": 4, "PINGPONG": True,
            "PERSISTENT": True}


def one_partition_config() -> dict:
    """The one-partition kernel's 128 x 128 tiles on two warp groups (the default of sessions 48-49): the tuner's
    space holds its family."""
    return {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "STAGES": 4, "num_warps": 8}


TALL_BLOCK_M = 256  # a config with this many rows takes the 256 x 128 tile kernel (8 warps)


# A config with ``"PINGPONG": True`` takes the warp-specialized 128 x 128 kernel: 4 warps load (the default
# partition), two warp groups of PINGPONG_REGS registers a thread compute; launched with PINGPONG_MAXNREG so the
# 12 warps fit the register file (the producer keeps what the consumers leave: 40 a thread). ``"PERSISTENT": True``
# beside it launches at most one program an SM, each walking several tiles (``programs``): a program of the
# one-tile launch starts with its ring empty and ends waiting for its store, about a tenth of a 4096-deep tile's
# time that a persistent program overlaps with its next tile's loads.
PINGPONG_REGS = 232
PINGPONG_MAXNREG = 168


def kernel_for(cfg: dict):
    """The kernel a config launches: ``fp8_scaled_gemm_wgmma_pingpong_kernel`` for ``PINGPONG`` configs,
    ``fp8_scaled_gemm_wgmma_tall_kernel`` for 256-row tiles, else ``fp8_group_gemm_wgmma_kernel``."""
    if cfg.get("PINGPONG"):
        return fp8_scaled_gemm_wgmma_pingpong_kernel
    return fp8_scaled_gemm_wgmma_tall_kernel if cfg["BLOCK_M"] == TALL_BLOCK_M else fp8_group_gemm_wgmma_kernel


def programs(cfg: dict, tiles: int, sms: int) -> int:
    """The grid of a config over ``tiles`` output tiles: one program a tile, or for ``PERSISTENT`` ping-pong configs
    one an SM (``sms``; fewer for fewer tiles), each walking its tiles with the ring running on across them. With
    ``"BALANCED": True`` beside it, the tiles spread evenly over the fewest programs that keep the number of waves
    (``gemm_configs.persistent_programs``: 1.5 % faster for the Triton TMA kernel on the H100; candidates in
    ``benchmarks.dev.w8a8_prefill``, not yet timed here)."""
    if not cfg.get("PERSISTENT"):
        return tiles
    if cfg.get("BALANCED"):
        from .gemm_configs import persistent_programs

        return persistent_programs(tiles, sms)
    return max(1, min(tiles, sms))


def weight_mode_arg(cfg: dict, b_mode: int):
    """The weight-scale constexpr a config's kernel takes: the ping-pong kernel's ``B_MODE`` (every mode, in
    ``gemm_kernels``' numbering), else ``B_BLOCKS`` (128x128 blocks, or else group scales: the only two the
    one-partition and tall kernels know)."""
    if cfg.get("PINGPONG"):
        return b_mode
    if b_mode not in (gemm_kernels.B_BLOCK, gemm_kernels.B_GROUP):
        raise ValueError("per-tensor and per-channel weights run on the ping-pong kernel only (a PINGPONG config), "
                         f"got {cfg}")
    return b_mode == gemm_kernels.B_BLOCK


def launch_options(cfg: dict) -> dict:
    """Launch options beyond ``num_warps`` a config's kernel needs: the register cap of the warp-specialized one."""
    return {"maxnreg": PINGPONG_MAXNREG} if cfg.get("PINGPONG") else {}


def launch_args(cfg: dict) -> tuple:
    """The kernel's trailing constexprs of a config, in signature order (after ``HAS_BIAS``)."""
    bm, bn, warps = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"]
    if cfg["STAGES"] < 2:  # the loop waits for block kp + 1 before refilling: one slot would never be loaded
        raise ValueError(f"STAGES: expected at least 2, got {cfg['STAGES']}")
    if cfg.get("PERSISTENT") and not cfg.get("PINGPONG"):
        raise ValueError("PERSISTENT: only the ping-pong kernel walks several tiles a program (PINGPONG configs)")
    if cfg.get("PINGPONG"):
        if bm != 128 or bn != 128 or warps != 4:
            raise ValueError(f"ping-pong tiles are 128 x 128 on 4 + 8 warps (num_warps 4), got {bm} x {bn} on {warps}")
        return cfg["GROUP_M"], cfg["STAGES"], PINGPONG_REGS
    if bm == TALL_BLOCK_M:
        if bn != 128 or warps != 8:
            raise ValueError(f"256-row tiles are 256 x 128 on 8 warps, got {bm} x {bn} on {warps}")
        return cfg["GROUP_M"], cfg["STAGES"], bool(cfg.get("A_REGS", False))
    return bm, bn, cfg["GROUP_M"], cfg["STAGES"], warps_per_cta(bm, warps)[0], instr_n(bm, bn, warps)


__all__ = ["AVAILABLE", "PINGPONG_MAXNREG", "PINGPONG_REGS", "TALL_BLOCK_M", "default_config",
           "fp8_group_gemm_wgmma_kernel", "fp8_scaled_gemm_wgmma_pingpong_kernel", "fp8_scaled_gemm_wgmma_tall_kernel",
           "instr_n", "kernel_for", "launch_args", "launch_options", "one_partition_config", "programs",
           "warps_per_cta", "weight_mode_arg"]
