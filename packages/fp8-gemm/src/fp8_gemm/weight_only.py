"""The weight-only (W8A16) decode path of ``FP8Linear``: the launch config, the call plan and the launcher.

A decode step multiplies a few token rows by every weight of the model: the weight bytes are the whole cost. For
``M <= WEIGHT_ONLY_MAX_M`` rows, where it measured faster (``use_weight_only``: every row of a 16-bit activation,
one row of an fp32 one past 2**24 weight elements), ``fp8_linear`` (hence ``FP8Linear`` and
``torch.ops.triton_ops.fp8_linear``) skips the activation's quantization and runs one kernel
(``weight_only_kernels``): ``x`` read as it is (fp16/bf16/fp32), the E4M3 weight streamed from HBM once and
up-converted in registers, the weight scale (per tensor, per output channel, 128x128 blocks, or per output channel
in groups of 128 input features) and the bias applied in fp32, the output in x's dtype. A decode row's output is
therefore the exact product of the row with the dequantized weight, up to fp32 accumulation: more accurate than the
W8A8 GEMM that larger M take (there the activation is quantized to E4M3, per row, per tensor or in 1x128 blocks, as
the module's ``activation_granularity`` says; that setting does not apply to decode rows).

Why 16 rows: the tensor-core row tile (``BLOCK_M``) is 16, the smallest an MMA takes, so every M from 1 to 16 runs
the same binary, with the weight read once and the cost the weight's bytes whatever M is. Every column block also
reads the ``[M, K]`` activation (from L2): ``2 M / BLOCK_N`` bytes per weight byte for 16-bit activations, which is
1 at M = 16 with 32-column blocks. Past that the activation traffic outgrows the weight's, and a second row tile
(or a 32-row one: twice the registers and shared-memory stages) costs more, while the W8A8 GEMM reads 1-byte
activations in 128-column blocks for up to 64 rows on the FP8 tensor cores. A prefill (hundreds of rows) is
compute-bound and belongs to the FP8 tensor cores. (benchmarks/bench_fp8_decode.py measures M = 1, 4 and 16.)

Choosing the path (``fp8_linear(..., path=...)``, ``FP8Linear.path``): ``"auto"`` (the default: weight-only for
``M <= WEIGHT_ONLY_MAX_M`` by ``use_weight_only``'s measured rule, else W8A8), ``"weight_only"`` (every M; larger
M read the weight once per 64-row tile), ``"w8a8"`` (activation quantization and the FP8 GEMM for every M, as before
this path existed).

Host path of a call (the plan is cached per call signature in ``linear._PLANS``: M, dtypes, strides, devices,
16-byte alignment, path): allocate the output, fetch the split-K workspace when the config splits K, launch through
Triton's compiled launcher. No validation, no host sync, no other allocation.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from triton_ops_core import pdl
from triton_ops_core import scratch as _scratch
from triton_ops_core.device import is_interpreter, sm_count
from triton_ops_core.exceptions import DeviceMismatchError, InvalidArgumentError, ShapeMismatchError
from triton_ops_core.launch import Plan, cdiv, next_pow2
from triton_ops_core.rms_prologue import check_norm, rms_normalized
from triton_ops_core.validation import (
    FLOAT_DTYPES,
    check_dim_size,
    check_dtype,
    check_kernel_device,
    check_ndim,
    check_same_device,
    check_tensor,
)

from .validation import b_scale_granularity
from .weight_only_kernels import (
    SCALE_BLOCK,
    SCALE_BLOCK_SIZE,
    SCALE_CHANNEL,
    SCALE_GROUP,
    SCALE_NONE,
    SCALE_TENSOR,
    fp8_weight_only_kernel,
)

WEIGHT_ONLY_MAX_M = 16
"""Rows (tokens) up to which ``path="auto"`` takes the weight-only kernel (see the module docstring)."""
PATHS = ("auto", "weight_only", "w8a8")

_SCALE_MODE = {"tensor": SCALE_TENSOR, "channel": SCALE_CHANNEL, "block": SCALE_BLOCK, "group": SCALE_GROUP}
# Triton reads TRITON_INTERPRET when the kernels are decorated (at import): that decision holds for the process.
_INTERP = is_interpreter()
# Shared memory the pipeline's stages may take (of Hopper's 227 KB a program; the rest is the compiler's scratch for
# layout conversions), as in the W8A8 decode kernel's fused config.
_SMEM_BUDGET = 160 * 1024
# The split-K scratch buffers' names (per device and stream: _scratch): int32 arrival counters, zero at rest, and fp32
# partials. Two buffers, never one: in a shared buffer a later call with more column blocks took the previous call's
# partials for counters (wrong sums, H200).
_COUNTERS = "weight_only.counters"
_PARTIALS = "weight_only.partials"
_SQUARES = "weight_only.squares"  # NORM_OUT: each column block's fp64 sums of its rows' squares


# Whether ``path="auto"`` takes the weight-only kernel for M <= WEIGHT_ONLY_MAX_M. It was off for a while: on the H200
# the split-K calls gave wrong sums after a call with fewer column blocks (the arrival counters shared a buffer with
# the previous call's partials). Fixed and re-measured on the H200 (docs/benchmarks/fp8-decode-h200.md).
AUTO_WEIGHT_ONLY = True


# ``path="auto"`` for decode rows, measured on the H200 (docs/benchmarks/fp8-decode-h200.md, Llama-3-8B's
# projections, bf16 activations): the weight-only kernel beat the W8A8 path for weights of up to 2**24 elements (q/o,
# k/v: 1.2-2.1x at M = 1, 4 and 16, any scales), and for one row with per-channel or per-tensor scales at every size
# (gate/up 1.0x, down 1.19x, lm_head 1.09x); for larger weights with more rows (0.73-0.93x) or with 128x128 block
# scales at one row (0.49-0.72x: the FMA variant then scaled x per K element; see BLOCK_WEIGHT_ONLY_MAX_ELEMENTS for
# today's rule) the W8A8 path was faster and took them.
# Re-measured in session 15 (H200, L2 flushed before each call, FP8Linear on Llama-3-8B's packed q/k/v 4096 -> 6144,
# o, gate 4096 -> 14336 and down; weight-only against W8A8): per-channel scales at M = 4: 18.3 / 15.4 / 29.6 / 28.2 us
# against 23.3 / 15.3 / 27.5 / 29.8, at M = 16: 18.3 / 15.4 / 29.8 / 28.4 against 56.5 / 15.4 / 35.8 / 30.0 (the
# W8A8 decode GEMM's larger weights at more rows are no longer faster); group scales at M = 16: 18.7 / 15.1 / 30.7 /
# 29.9 against 44.7 / - / 62.8 / 72.9 (the W8A8 K loop applies a scale vector per 128-deep block). So every decode M
# takes the weight-only kernel, except 128x128 block scales on large weights at several rows.
WEIGHT_ONLY_MAX_ELEMENTS = 2**24

# 128x128 block scales (FP8 checkpoints' format), re-measured in session 35 on the H200 after the one-row FMA tile
# began scaling 16-element partial sums instead of every element of x (``python -m benchmarks.dev.weight_only_rows
# --rows 1,4,16 --scales block --no-sweep``, four weights back to back in a CUDA graph; weight-only against W8A8):
# M = 1: packed q/k/v 4096 -> 6144 8.8 / 19.0 us, down 17.2 / 25.1, gate 18.4 / 24.1; M = 4 and 16: q/k/v 13.7-13.8
# / 19.0-19.4, down 25.8-26.1 / 25.3-26.2, gate 25.4-26.9 / 24.2-25.1: a tie for the MLP's 58.7M-element weights at
# several rows, which kept the W8A8 path until session 44. Session 44, lent H100, M = 8 (``--rows 1,8 --scales
# block``): down 26.9 us weight-only against 29.6 W8A8 (and 1.7e-3 against 2.6e-2 relative error: no activation
# quantization); in Llama-3-8B's FP8-checkpoint step at batch 8 the W8A8 down projections took 812 us plus 60 us of
# activation quantization (32 launches each). So every 16-bit decode row takes the weight-only kernel, block scales
# included; fp32 activations (an IEEE dot: CUDA-core work at several rows) keep the W8A8 path past one row.

def use_weight_only(path: str, m: int, weight: torch.Tensor | None = None,
                    weight_scale: torch.Tensor | None = None, x_bytes: int = 2) -> bool:
    """Whether a call of ``m`` rows with ``path`` takes the weight-only kernel. For ``"auto"`` with a weight given,
    the measured rule above; without one, every ``m <= WEIGHT_ONLY_MAX_M``. ``x_bytes``: the activation's element
    size (the rule for several rows of a large weight was measured with 16-bit activations; fp32 ones, whose IEEE
    dot is CUDA-core work, keep the W8A8 path there). ``weight_scale`` no longer changes the answer (since session
    44 block scales follow the same rule); it stays in the signature for callers that pass it."""
    if path == "weight_only":
        return True
    if path != "auto" or not AUTO_WEIGHT_ONLY or m > WEIGHT_ONLY_MAX_M:
        return False
    if weight is None or weight.dim() != 2 or weight.numel() <= WEIGHT_ONLY_MAX_ELEMENTS:
        return True
    return m == 1 or x_bytes == 2


# Rows up to which the CUDA-core FMA variant multiplies instead of the tensor cores, by the activation's element size.
# fp32: the IEEE dot is itself FMAs over all 16 rows of its tile (16x the multiplies at M = 1), so few rows take the
# FMA variant. fp16/bf16: one row; measured on the H200 (bench_fp8_decode --sweep, Llama-3-8B's projections, M = 1),
# 16 x 512 FMA tiles took 10.3 / 7.6 / 22.6 / 20.1 / 133.5 us where the best tensor-core tile took 12.8 / 8.2 /
# 27.5 / 27.6 / 175.8 us (q/o, k/v, gate/up, down, lm_head).
FMA_MAX_ROWS = {2: 1, 4: 4}


@functools.lru_cache(maxsize=1024)
def weight_only_config(m: int, n: int, k: int, scale_mode: int, x_bytes: int, sms: int,
                       interpreter: bool) -> dict[str, Any]:
    """The launch config of one problem, a heuristic from the N, K, scale mode, activation width and SM count (M
    only picks the row tile and, above 4 rows, the column width: every M of a decode tile shares one binary).

    - Tensor cores (``USE_DOT``), ``BLOCK_M`` 16 (the MMA's smallest row tile; the whole decode M in one tile), 64
      for larger forced M. Up to ``FMA_MAX_ROWS`` rows: the FMA variant, ``BLOCK_M`` the rows' next power of two;
      one fp16/bf16 row: 16 columns and 512 of K a program, never split (measured, see ``FMA_MAX_ROWS``).
    - E4M3 weights with 16-bit activations on the 16-row tensor-core tile: ``_f16_dot_tile`` (fp16 dots, measured
      on the H200). The rules below serve the other cases (16-bit weights, fp32 activations, forced 64-row tiles).
    - 32 output columns a program (narrow: many programs, each streaming ``32 x K`` bytes); 64 when M > 4 and there
      are still two column blocks per SM, which halves the re-reads of the ``[M, K]`` activation from L2.
    - K tiles of 512 for weights up to 16 MB, else 256 (the W8A8 decode kernel's measured rules, H100); 128 with
      block or group scales (a tile must not straddle two scale blocks: each K block's partial product is scaled
      alone; the FMA variant takes any K tile: at one row it scales 16-element partial sums, at more rows each
      weight element);
      32 for the fp32 IEEE dot (its FMA tile lives in registers), ``256 / BLOCK_M`` for the FMA variant.
    - Split K when the column blocks alone leave the GPU short (fewer than two per SM, or under 3/4 of a wave at
      K >= 8192): the smallest power of two giving two programs per SM, at most 16, keeping two K tiles per split.
      On 132 SMs: 4096 -> 4096 (128 column blocks) runs unsplit, 14336 -> 4096 in 4, 4096 -> 1024 in 4 (16 with
      block scales' 128-deep K tiles), 4096 -> 14336 and the lm_head unsplit.
    - Pipeline stages: as many as fit ``_SMEM_BUDGET`` (x and weight tiles per stage), at most 4 (6 for K tiles of
      128 or less).
    """
    blocked = scale_mode in (SCALE_BLOCK, SCALE_GROUP)  # a dot's K tile inside one 128-deep scale block
    fma = m <= FMA_MAX_ROWS.get(x_bytes, 0)
    block_m = next_pow2(m) if fma else 16 if m <= WEIGHT_ONLY_MAX_M else 64
    if interpreter:  # few programs (each costs ~0.1 s there) that still exercise masks and split K on tiny tests
        block_k = 64
        return {"USE_DOT": not fma, "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": block_k,
                "SPLIT_K": 2 if k > block_k else 1, "num_warps": 4, "num_stages": 1}
    w_bytes = 2 if scale_mode == SCALE_NONE else 1
    if fma and block_m == 1 and x_bytes == 2:
        # one 16-bit row, unsplit, 4 stages. E4M3 weights: 16 columns x 512 of K a program (the H200 sweep's best
        # for every Llama-3-8B projection; a split cost 5-40 % there). 16-bit weights: 8 columns (the H200 sweep,
        # bf16: 15.3 / 11.2 / 30.2 us for Llama-3-8B's packed q/k/v, o and down against cuBLAS's 16.3 / 12.8 / 31.6;
        # gpt-oss's 2880 x 4096 8.7 against 11.3)
        # Group scales take the same 16 columns since session 17 (the scale multiplies each thread's 16-element
        # partial sum, no longer every element): H200, whole Llama-3-8B with the default recipe at batch 1, the 64
        # q/k/v and o launches of a step 551 us with 32 columns, 509 us with 16.
        block_n = 8 if w_bytes == 2 else 16
        return {"USE_DOT": False, "BLOCK_M": 1, "BLOCK_N": block_n, "BLOCK_K": 512, "SPLIT_K": 1, "num_warps": 4,
                "num_stages": max(1, min(4, _SMEM_BUDGET // (512 * (2 + block_n * w_bytes))))}
    if not fma and block_m == 16 and x_bytes == 2 and w_bytes == 1:
        return _f16_dot_tile(n, k, blocked, sms)
    block_n = 64 if (m > 4 and cdiv(n, 64) >= 2 * sms) else 32
    if fma:
        block_k = 256 // block_m
    elif x_bytes == 4:
        block_k = 32
    elif blocked:
        block_k = 128
    else:
        block_k = 512 if n * k <= 2**24 else 256
    cols, k_tiles = cdiv(n, block_n), cdiv(k, block_k)
    split = 1
    if not (cols >= 2 * sms or (4 * cols >= 3 * sms and k < 8192)):
        split = max(1, min(next_pow2(cdiv(2 * sms, cols)), 16, k_tiles // 2))
    stage = block_k * (block_m * x_bytes + block_n * w_bytes)
    stages = max(1, min(6 if block_k <= 128 else 4, _SMEM_BUDGET // stage))
    return {"USE_DOT": not fma, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split,
            "num_warps": 4, "num_stages": stages}


def _f16_dot_tile(n: int, k: int, blocked: bool, sms: int) -> dict[str, Any]:
    """The 16-row tensor-core tile of E4M3 weights with 16-bit activations (2 to 16 rows): fp16 dots (``F16_DOT``;
    bf16 activations scaled into fp16 by a power of two per row; fp16 ones as they are), K split in 4 while the
    column blocks number fewer than two per SM.

    H200, session 18 (``python -m benchmarks.dev.weight_only_rows --rows 8``, four weights back to back in a CUDA
    graph, 36 tiles with and without fp16 dots; the previous rule's tile in brackets): Llama-3-8B's packed q/k/v
    13.7 us (15.6), o 11.7 (13.1), down 21.3 (26.3) with per-channel scales; with group scales 14.0 (16.5), 11.6
    (12.7), 25.1 (27.6); gpt-oss's q/k/v 11.5 (14.2) and 11.6 (13.2). 64 columns and 128-deep K steps, 4 warps;
    per-channel scales at K >= 8192 (down) 128 columns and 256-deep steps, 8 warps (22.8 us with 64 x 256).

    Measured and not taken (session 44, lent H100, M = 8 and 16, block and channel scales; log:
    docs/benchmarks/dev/fp8-gemm/weight_only_rows-m8-swap-next-h100-session44.log): ``out^T = W @ x^T`` with the
    weight tile as the warpgroup MMA's row operand (as session 20 found on the H200) 4-9 % slower than this tile;
    the next weight tile loaded into registers a step ahead (compiled for sm_90, this tile's loop waits on 77 plain
    weight loads, 16 with it) 30-45 % slower, Llama-3-8B's FP8-checkpoint step at batch 8 4,363 -> 5,015 us."""
    block_n, block_k, warps = (128, 256, 8) if (not blocked and k >= 8192) else (64, 128, 4)
    cols, k_tiles = cdiv(n, block_n), cdiv(k, block_k)
    split = 1 if cols >= 2 * sms else max(1, min(4, k_tiles // 2))
    stages = max(1, min(4, _SMEM_BUDGET // (block_k * (16 * 2 + block_n))))
    return {"USE_DOT": True, "BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split,
            "num_warps": warps, "num_stages": stages, "F16_DOT": True}


def _f16_dot(cfg: dict[str, Any], mode: int, x_dtype: torch.dtype) -> bool:
    """Whether the launch takes fp16 tensor-core dots (config ``F16_DOT``): for E4M3 weights with bf16 activations
    on the tensor-core tile only (fp16 activations already take one conversion a weight; 16-bit weights none)."""
    return bool(cfg.get("F16_DOT", False)) and bool(cfg["USE_DOT"]) and mode != SCALE_NONE and (
        x_dtype == torch.bfloat16)


def _check_config(cfg: dict[str, Any], scale_mode: int) -> dict[str, Any]:
    """A given config (tests, benchmarks): the keys of ``weight_only_config`` and what the kernel requires."""
    need = ("USE_DOT", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")
    missing = [key for key in need if key not in cfg]
    if missing:
        raise InvalidArgumentError(f"config: missing {missing}; expected the keys {list(need)}, got {sorted(cfg)}")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = cfg[key]
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise InvalidArgumentError(f"config: {key} must be a power of two, got {v!r}")
    if cfg["USE_DOT"] and min(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) < 16:
        raise InvalidArgumentError(f"config: tl.dot needs BLOCK_M, BLOCK_N and BLOCK_K >= 16, got {cfg}")
    if scale_mode == SCALE_GROUP and cfg["USE_DOT"] and cfg["BLOCK_K"] > SCALE_BLOCK_SIZE:
        raise InvalidArgumentError(
            f"config: with group scales a dot's K tile must lie inside one 128-deep group: BLOCK_K <= 128 with "
            f"USE_DOT, got BLOCK_K={cfg['BLOCK_K']}")
    if scale_mode == SCALE_BLOCK and (cfg["BLOCK_N"] > SCALE_BLOCK_SIZE or
                                      (cfg["USE_DOT"] and cfg["BLOCK_K"] > SCALE_BLOCK_SIZE)):
        raise InvalidArgumentError(
            f"config: with 128x128 block scales a tile must lie inside one scale block: BLOCK_N <= 128 (and "
            f"BLOCK_K <= 128 with USE_DOT), got BLOCK_N={cfg['BLOCK_N']}, BLOCK_K={cfg['BLOCK_K']}")
    if not isinstance(cfg["SPLIT_K"], int) or cfg["SPLIT_K"] < 1:
        raise InvalidArgumentError(f"config: SPLIT_K must be a positive integer, got {cfg['SPLIT_K']!r}")
    return cfg


class WeightOnlyPlan:
    """One call signature of the weight-only path: output shape and dtype, the launch, the split-K scratch sizes.

    ``kind``: 0 a launch, 1 an empty output (M or N is 0), 2 K == 0 (the bias, or zeros).
    """

    __slots__ = ("m", "n", "out_dtype", "device", "kind", "launch", "counters", "partials", "config", "norm_out_eps")

    def __init__(self, m: int, n: int, out_dtype: torch.dtype, device: torch.device, kind: int,
                 launch: Plan | None, counters: int, partials: int, config: dict[str, Any] | None,
                 norm_out_eps: float = 0.0) -> None:
        self.m, self.n, self.out_dtype, self.device, self.kind = m, n, out_dtype, device, kind
        self.launch, self.counters, self.partials, self.config = launch, counters, partials, config
        self.norm_out_eps = norm_out_eps

    def run(self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
            bias: torch.Tensor | None, out: torch.Tensor | None = None,
            norm_weight: torch.Tensor | None = None, residual: torch.Tensor | None = None,
            normed: torch.Tensor | None = None, norm_out_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x [M, K] @ dequant(weight)^T + bias`` for this signature's tensors (validated when the plan was made);
        with ``out`` (a plan built with ``add_out``): added to it in place, and it is returned; with ``residual``
        instead (a plan built with ``add_out`` of its layout): ``residual + ...`` in a new tensor. ``norm_weight``:
        the RMSNorm weight of a plan built with one (x normalized first). ``normed``, ``norm_out_weight``: a plan
        built with ``norm_out_weight``: the output's RMSNorm is written to ``normed`` (``[M, N]``, contiguous, the
        output's dtype) in the same launch."""
        if out is None:
            out = torch.empty((self.m, self.n), dtype=self.out_dtype, device=self.device)
            if self.kind:
                if self.kind == 2:
                    out.copy_(bias.expand(self.m, self.n)) if bias is not None else out.zero_()
                    if residual is not None:
                        out.add_(residual)
                elif residual is not None:
                    out.copy_(residual)
                self._normalize_apart(out, normed, norm_out_weight)
                return out
        elif self.kind:
            if self.kind == 2 and bias is not None:
                out.add_(bias)
            self._normalize_apart(out, normed, norm_out_weight)
            return out
        if weight_scale is None:  # a 16-bit weight (SCALE_NONE): any pointer, never read
            weight_scale = weight
        bias_arg = weight_scale if bias is None else bias  # any pointer: HAS_BIAS is off
        nw_arg = x if norm_weight is None else norm_weight  # any pointer: NORM is off
        res_arg = out if residual is None else residual  # ADD_OUT's source: out itself (in place), or residual
        normed_arg, nwo_arg = (out, nw_arg) if normed is None else (normed, norm_out_weight)  # NORM_OUT is off
        sq = out if normed is None else _scratch.scratch(_SQUARES, self.device, self.launch.grid[0] * self.m,
                                                          torch.float64, zeroed=False)
        # counters (split K's per column block, NORM_OUT's per row tile) and split K's partial sums in scratch (the
        # stream's, or the call's own)
        cnt = _scratch.scratch(_COUNTERS, self.device, self.counters, torch.int32, zeroed=True) \
            if self.counters else out
        ws = _scratch.scratch(_PARTIALS, self.device, self.partials, torch.float32, zeroed=False) \
            if self.partials else out
        self.launch.launch(x, weight, out, weight_scale, bias_arg, cnt, ws, nw_arg, res_arg, normed_arg, nwo_arg, sq)
        return out

    def _normalize_apart(self, out: torch.Tensor, normed: torch.Tensor | None,
                         norm_out_weight: torch.Tensor | None) -> None:
        """``NORM_OUT`` without a launch (M, N or K is 0): the norm of ``out`` as the kernel's tail writes it."""
        if normed is not None and normed.numel():
            normed.copy_(rms_normalized(out, norm_out_weight, self.norm_out_eps))


def check_residual(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """The in-place add ops' checks (``decode_linear_add_``, ``fp8_linear_add_``): tensors, a 2-D weight, and a
    contiguous ``residual`` of x's leading shape, the weight's out_features and x's dtype."""
    check_tensor(residual, "residual")
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    check_ndim(weight, "weight", exact=2)
    n = weight.shape[0]
    if x.dim() == 0 or tuple(residual.shape) != (*x.shape[:-1], n):
        raise ShapeMismatchError(f"residual: expected shape {[*x.shape[:-1], n]} (x's rows, weight's out_features), "
                                 f"got {list(residual.shape)}")
    if not residual.is_contiguous():
        raise ShapeMismatchError("residual: expected a contiguous tensor (updated in place through a flat view)")
    check_dtype(residual, "residual", (x.dtype,))


def check_normed(normed: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 norm_weight: torch.Tensor, norm_eps: object) -> None:
    """The ops' next norm (``next_norm_weight=``, ``normed=``): ``normed`` a contiguous tensor of the output's
    ``shape``, ``dtype`` and ``device``; ``norm_weight`` ``[shape[-1]]`` (``check_norm``'s rules, named
    ``next_norm_weight`` / ``next_norm_eps``)."""
    check_tensor(normed, "normed")
    if tuple(normed.shape) != tuple(shape) or not normed.is_contiguous():
        raise ShapeMismatchError(f"normed: expected a contiguous tensor of the output's shape {list(shape)}, got "
                                 f"shape {list(normed.shape)}")
    check_dtype(normed, "normed", (dtype,))
    if normed.device != device:
        raise DeviceMismatchError(f"normed: expected the output's device {device}, got {normed.device}")
    check_norm(normed, norm_weight, norm_eps, name="next_norm_weight", size_name="the output's last dimension")


# K tiles of each weight row a program asks L2 for before it waits on the previous kernel (PDL): two tiles' worth,
# as measured on the H200 (benchmarks/dev/pdl_chain.py, session 25: the first weight tiles fetched before the wait
# took 0.7-0.9 us more off each GEMV of a chain than the early launch alone).
PREFETCH_TILES = 2


def _pdl_tail(device: torch.device, weight: torch.Tensor, block_k: int, tiles_per_split: int) -> tuple[bool, int]:
    """The kernel's ``PDL`` and ``PREFETCH_LINES``: whether launches on ``device`` use PDL, and how many 128-byte
    lines of each weight row a program prefetches first (K-contiguous weights only; a power of two)."""
    on = pdl.enabled(device)
    if not on or weight.stride(1) != 1:
        return on, 0
    row_bytes = min(PREFETCH_TILES, tiles_per_split) * block_k * weight.element_size()
    return on, next_pow2(max(1, row_bytes // 128))


def build_plan(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None, bias: torch.Tensor | None,
               config: dict[str, Any] | None = None, add_out: torch.Tensor | None = None,
               norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0,
               norm_out_weight: torch.Tensor | None = None, norm_out_eps: float = 0.0) -> WeightOnlyPlan:
    """Validate one call signature and plan its launch.

    Args:
        x: ``[M, K]`` fp16/bf16/fp32 (any strides). weight: ``float8_e4m3fn`` ``[N, K]`` (``nn.Linear`` layout;
            K-contiguous reads are the fast case). weight_scale: fp32, in the GEMM's ``[K, N]`` convention: one
            value, ``[N]`` / ``[1, N]`` (per output channel), ``[ceil(K/128), ceil(N/128)]`` (128x128 blocks;
            K and N need not be multiples of 128: the last blocks are partial) or ``[ceil(K/128), N]`` (groups of
            128 inputs per output channel); or None with a 16-bit weight in
            x's dtype (fp16/bf16: ``decode_linear``, the same kernel unscaled). bias: ``[N]`` or None.
        config: a launch config (keys of ``weight_only_config``) instead of the heuristic's.
        add_out: a row-major ``[M, N]`` tensor of x's dtype the product is added to in place (``run(..., out=)``
            with it: a residual stream, one rounding of the sum), or None.
        norm_weight, norm_eps: RMS-normalize x over K first (``[K]`` weight of any float dtype, ``eps`` > 0),
            deferred (``run(..., norm_weight=)`` with it); or None.
        norm_out_weight, norm_out_eps: also write the output's RMSNorm (``[N]`` weight of any float dtype, ``eps``
            > 0), bit for bit ``fused_rmsnorm_rope.rmsnorm(out, norm_out_weight, norm_out_eps)``, in the same
            launch (``run(..., normed=, norm_out_weight=)``: a contiguous ``[M, N]`` tensor of x's dtype); or None.

    Raises:
        UnsupportedDtypeError, ShapeMismatchError, DeviceMismatchError, UnsupportedDeviceError,
        InvalidArgumentError (a bad ``config``).
    """
    check_tensor(x, "x")
    check_dtype(x, "x", FLOAT_DTYPES)
    check_ndim(x, "x", exact=2)
    check_tensor(weight, "weight")
    check_ndim(weight, "weight", exact=2)
    if weight_scale is None:  # a plain 16-bit weight: decode_linear
        check_dtype(x, "x", (torch.float16, torch.bfloat16))
        check_dtype(weight, "weight", (x.dtype,))
    else:
        check_dtype(weight, "weight", (torch.float8_e4m3fn,))
    n, k = weight.shape
    m = x.shape[0]
    if x.shape[1] != k:
        raise ShapeMismatchError(f"x: expected last dimension {k} (weight's in_features), got shape {list(x.shape)}")
    if weight_scale is not None:
        check_tensor(weight_scale, "weight_scale")
        check_dtype(weight_scale, "weight_scale", (torch.float32,))
        granularity = b_scale_granularity(weight_scale, k, n, "weight_scale")
    if bias is not None:
        check_tensor(bias, "bias")
        check_dtype(bias, "bias", FLOAT_DTYPES)
        check_ndim(bias, "bias", exact=1)
        check_dim_size(bias, "bias", 0, n, "weight's out_features N")
    if add_out is not None:
        check_tensor(add_out, "residual")
        check_dtype(add_out, "residual", (x.dtype,))
        laid_out = add_out.numel() == 0 or ((m == 1 or add_out.stride(0) == n) and add_out.stride(-1) == 1)
        if tuple(add_out.shape) != (m, n) or not laid_out:  # (an empty tensor's strides are arbitrary)
            raise ShapeMismatchError(f"residual: expected a row-major [{m}, {n}] (x's rows, weight's out_features), "
                                     f"got shape {list(add_out.shape)} with strides {add_out.stride()}")
    if norm_weight is not None:
        check_norm(x, norm_weight, norm_eps)
    if norm_out_weight is not None:
        check_norm(x, norm_out_weight, norm_out_eps, name="norm_out_weight", size=n,
                   size_name="the weight's out_features")
    check_same_device(x=x, weight=weight, weight_scale=weight_scale, bias=bias, residual=add_out,
                      norm_weight=norm_weight, norm_out_weight=norm_out_weight)
    check_kernel_device(x, "x")
    kind = 1 if m == 0 or n == 0 else 2 if k == 0 else 0
    out_eps = float(norm_out_eps) if norm_out_weight is not None else 0.0
    if kind:
        return WeightOnlyPlan(m, n, x.dtype, x.device, kind, None, 0, 0, None, out_eps)

    mode = SCALE_NONE if weight_scale is None else _SCALE_MODE[granularity]
    if config is None:
        cfg = weight_only_config(m, n, k, mode, x.element_size(), sm_count(x.device, cpu=4), _INTERP)
    else:
        cfg = _check_config(dict(config), mode)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    k_tiles = cdiv(k, bk)
    per_split = cdiv(k_tiles, max(1, min(cfg["SPLIT_K"], k_tiles)))
    split = cdiv(k_tiles, per_split)  # no empty K slices
    grid = (cdiv(n, bn), split, cdiv(m, bm))
    if mode in (SCALE_TENSOR, SCALE_NONE):
        ss_k = ss_n = 0
    elif mode == SCALE_CHANNEL:
        ss_k, ss_n = 0, weight_scale.stride(-1)
    else:
        ss_k, ss_n = weight_scale.stride(0), weight_scale.stride(1)
    # split K: one int32 counter per (column block, row tile), the [split, M, N] fp32 partials and, for the norm,
    # the [split, M] sums of squares; the output's norm: one more counter per row tile, after those
    counters, partials = (grid[0] * grid[2], split * m * (n + 1)) if split > 1 else (0, 0)
    if norm_out_weight is not None:
        counters = grid[0] * grid[2] + grid[2]
    pdl_on, prefetch = _pdl_tail(x.device, weight, bk, per_split)
    # Constexprs go positionally, in the kernel's signature order (the direct launcher takes every argument).
    tail = (m, n, k, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), n, ss_k, ss_n,
            bias.stride(0) if bias is not None else 0, per_split, float(norm_eps), out_eps,
            mode, bias is not None, add_out is not None, norm_weight is not None,
            bool(cfg["USE_DOT"]), bm, bn, bk, split, k % bk == 0, n % bn == 0,
            cfg["num_stages"], _INTERP, _f16_dot(cfg, mode, x.dtype), pdl_on, prefetch,
            norm_out_weight is not None, norm_out_block(n, bm, _INTERP), next_pow2(grid[0]))
    launch = Plan(fp8_weight_only_kernel, grid, tail, cfg["num_warps"], info={**cfg, "SPLIT_K": split},
                  num_stages=cfg["num_stages"], **pdl.launch_options(pdl_on))
    return WeightOnlyPlan(m, n, x.dtype, x.device, 0, launch, counters, partials, launch.info, out_eps)


def norm_out_block(n: int, rows: int, interpreter: bool) -> int:
    """Columns a step of ``NORM_OUT``'s tail: 4096 fp32 values a program a step (a decode row of up to 4096 in one
    L2 round trip; 32 registers a thread at 4 warps), fewer columns as the row tile grows; 64 under the interpreter
    (small tests loop)."""
    if interpreter:
        return 64
    return max(16, min(next_pow2(max(1, n)), 4096 // max(1, rows)))


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, *, config: dict[str, Any] | None = None) -> torch.Tensor:
    """``x @ dequant(weight)^T + bias`` through the weight-only kernel for any M, with an optional launch config:
    for tests and benchmarks (no plan cache; the public path is ``fp8_linear(..., path="weight_only")``).

    ``x``: ``[..., K]``; the result ``[..., N]`` in x's dtype.
    """
    check_tensor(x, "x")
    check_ndim(x, "x", minimum=1)
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    plan = build_plan(x2, weight, weight_scale, bias, config)
    out = plan.run(x2, weight, weight_scale, bias)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], plan.n)


def clear_caches() -> None:
    """Forget the memoized configs (``fp8_gemm.clear_caches`` calls this)."""
    weight_only_config.cache_clear()


__all__ = ["PATHS", "WEIGHT_ONLY_MAX_ELEMENTS", "WEIGHT_ONLY_MAX_M", "WeightOnlyPlan", "build_plan", "check_normed",
           "check_residual", "norm_out_block", "use_weight_only", "weight_only_config", "weight_only_linear"]
