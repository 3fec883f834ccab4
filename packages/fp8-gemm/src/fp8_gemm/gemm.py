"""``fp8_gemm``: ``a @ b`` on E4M3 operands with fp32 accumulation and scales of any granularity.

Three kernels (gemm_kernels.py): a persistent tensor-descriptor (TMA) kernel for aligned operands on Hopper,
a masked-pointer kernel for the rest (K or N not a multiple of 16, odd strides, GPUs without TMA), and a
split-K kernel for decode (M <= 64), where the weight stream is the whole cost.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
import triton
from triton_ops_core import scratch as _scratch
from triton_ops_core.device import is_hopper, is_interpreter, sm_count, supports_fp8
from triton_ops_core.exceptions import UnsupportedDtypeError
from triton_ops_core.launch import Plan, PlanCache, call_key
from triton_ops_core.library import capturing, direct_call_ok, op_name

from . import gemm_configs as cfgs
from . import gemm_wgmma
from .gemm_kernels import (
    A_BLOCK,
    A_ROW,
    A_ROW_IN_KERNEL,
    A_TENSOR,
    B_BLOCK,
    B_CHANNEL,
    B_GROUP,
    B_TENSOR,
    fp8_gemm_decode_kernel,
    fp8_gemm_ptr_kernel,
    fp8_gemm_tma_kernel,
)
from .quantize import quantize_fp8
from .quantize_plan import _PLANS as _QUANTIZE_PLANS
from .validation import validate_fp8_gemm_inputs

FP8 = torch.float8_e4m3fn
_A_MODE = {"tensor": A_TENSOR, "row": A_ROW, "block": A_BLOCK}
_B_MODE = {"tensor": B_TENSOR, "channel": B_CHANNEL, "block": B_BLOCK, "group": B_GROUP}
DECODE_MAX_M = 64
# fp16/bf16 activations of at most this many elements (M * K) are quantized per row inside the decode GEMM: one
# launch instead of two, which saves tens of microseconds of host time per call. Every program reads the whole
# activation to find its row maxima, so the GPU time grows with M * K: at this size it matches the two launches'
# (H100, M = 1 at K = 4096 and 11264, M = 4 at K = 4096); larger ones quantize in their own launch (docs/fp8-gemm.md).
FUSED_ROW_QUANT_MAX = 16384
# 128x128 weight blocks go to the Gluon kernel (Hopper, M > 64): one FMA an element, overlapping the next K block's
# MMA, against the Triton TMA kernel's scaling between its MMAs. H100, Llama-3-8B's projections at 2048 rows
# (session 48, benchmarks/dev/w8a8_prefill.py): 1.04-1.26x the Triton kernel's speed; the FP8 checkpoint's 2k prefill
# 52.96 -> 49.02 ms. False sends them back to the Triton kernel.
WGMMA_BLOCK_SCALES = True
# Per-tensor and per-channel weights with faithful accumulation on the Gluon ping-pong kernel (Hopper, M > 64; its
# weight scales wait for the epilogue, as the Triton kernel's do): compiled for sm_90 without spills, not yet timed
# on a GPU, so opt-in: ``path="wgmma"`` per call, or True here for every such call. False: the Triton TMA kernel.
WGMMA_CHANNEL_SCALES = False
# Triton reads TRITON_INTERPRET when the kernels are decorated (at import): that decision holds for the process.
_INTERP = is_interpreter()


def _alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    # Device-side tensor descriptors live in a global scratch buffer that Triton asks an allocator for. Triton
    # keeps it in a ContextVar (per thread), so the TMA path checks it on every call: one lookup.
    global _ALLOCATION
    if _ALLOCATION is None:
        from triton.runtime import _allocation

        _ALLOCATION = _allocation
    if isinstance(_ALLOCATION._allocator.get(), _ALLOCATION.NullAllocator):
        triton.set_allocator(_alloc)


_ALLOCATION: Any = None


def _quantize(t: torch.Tensor, granularity: str, scale: torch.Tensor | None,
              is_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a non-FP8 operand to E4M3 with this package's quantization kernels (``quantize_fp8``)."""
    if scale is not None and granularity in ("row", "channel"):  # validation allows [M] / [N]: give the 2-D form
        scale = scale.reshape(-1, 1) if granularity == "row" else scale.reshape(1, -1)
    return quantize_fp8(t, "e4m3", granularity, scale=scale, role="weight" if is_b else "activation")


@functools.lru_cache(maxsize=16)
def _device_caps(device: torch.device, interpreter: bool) -> tuple[bool, bool]:
    """(FP8 tensor cores?, tensor-memory accelerator?) of ``device``, asked once per device."""
    return supports_fp8(device), interpreter or is_hopper(device)


def _b_layout(b: torch.Tensor) -> tuple[bool, int] | None:
    """(K-major?, leading stride) of b: row-major [K, N], or the transposed view of a row-major [N, K]."""
    if b.stride(1) == 1:
        return False, b.stride(0)
    if b.stride(0) == 1:
        return True, b.stride(1)
    return None


def _pick_path(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, m: int) -> str:
    if m <= DECODE_MAX_M:
        return "decode"
    layout = _b_layout(b)
    # a K-major b is read in place (its row stride must be 16-byte aligned); a row-major one through a K-major copy
    # whose row stride is K
    b_ok = (layout is not None and b.data_ptr() % 16 == 0 and layout[1] % 16 == 0
            and (layout[0] or b.shape[0] % 16 == 0))
    a_ok = a.stride(1) == 1 and a.data_ptr() % 16 == 0 and a.stride(0) % 16 == 0
    c_ok = out.data_ptr() % 16 == 0 and (out.stride(0) * out.element_size()) % 16 == 0
    tma_device = _device_caps(a.device, _INTERP)[1]
    return "tma" if (a_ok and b_ok and c_ok and tma_device) else "ptr"


def _decode_scratch(device: torch.device, ws_numel: int, n_cnt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partials (written before they are read) and arrival counters (zero at rest, reset by the program
    that consumes them) of the current stream: no allocation or memset per call, and no sharing between
    streams that may run at once."""
    return (_scratch.scratch("gemm.partials", device, ws_numel, torch.float32, zeroed=False),
            _scratch.scratch("gemm.counters", device, n_cnt, torch.int32, zeroed=True))


@functools.lru_cache(maxsize=4096)
def _plan(path: str, m: int, n: int, k: int, a_mode: int, b_mode: int, fast: bool, device: torch.device,
          dtypes: tuple, interp: bool) -> dict[str, Any]:
    """The launch config of one problem (memoized: the hot path pays for it once per shape)."""
    return _choose(path, m, n, k, a_mode, b_mode, fast, device, dtypes, interp)


def _choose(path: str, m: int, n: int, k: int, a_mode: int, b_mode: int, fast: bool, device: torch.device,
            dtypes: tuple, interp: bool, bench=None) -> dict[str, Any]:
    """``_plan``'s lookup, with a ``bench`` for kernel-autotune's tuning on first use."""
    blocked = a_mode == A_BLOCK or b_mode in (B_BLOCK, B_GROUP)
    problem = {"m": m, "n": n, "k": k}
    name = f"fp8_gemm.{path}.a{a_mode}b{b_mode}.{'fast' if fast else 'faithful'}"
    if path == "decode":
        cfg = cfgs.choose(name, problem, dtypes, device,
                          lambda: cfgs.decode_heuristic(m, n, k, blocked, device, interp),
                          cfgs.FP8_GEMM_DECODE_CONFIGS, bench)
    elif path == "tma":
        cfg = cfgs.choose(name, problem, dtypes, device,
                          lambda: cfgs.tma_heuristic(m, n, k, blocked, fast, device, interp), cfgs.FP8_GEMM_CONFIGS,
                          bench)
    elif path == "wgmma":
        # per-tensor and per-channel weights run on the ping-pong kernel alone: its own space
        space = cfgs.FP8_GEMM_WGMMA_CONFIGS if b_mode in (B_BLOCK, B_GROUP) else cfgs.FP8_GEMM_PINGPONG_CONFIGS
        cfg = cfgs.choose(name, problem, dtypes, device, gemm_wgmma.default_config, space, bench)
    else:
        cfg = cfgs.choose(name, problem, dtypes, device, lambda: cfgs.ptr_heuristic(m, n, k, interp),
                          cfgs.FP8_GEMM_PTR_CONFIGS, bench)
    return _fit_block_k(dict(cfg), blocked)


def clear_caches() -> None:
    """Forget memoized configs and launch plans (of ``fp8_gemm``, ``quantize_fp8`` and ``FP8Linear``), e.g. after
    tuning, so the next calls look their configs up and validate again."""
    _plan.cache_clear()
    _CALLS.clear()
    _QUANTIZE_PLANS.clear()
    for clear in _CACHE_CLEARERS:
        clear()


# modules built on this one (linear) register their caches' clear() here: this module never imports them
_CACHE_CLEARERS: list = []


class LaunchNeeds(NamedTuple):
    """A plan's ``extra``: what the per-call part of a launch needs."""

    path: str  # "decode", "tma" or "ptr"
    flag: int | bool  # decode: split-K partials' elements (0 without split-K); tma: b needs a K-major copy
    n_counters: int  # decode: tile arrival counters of split K
    descriptors: bool  # device-side tensor descriptors: Triton needs its scratch allocator


def _launch_plan(a, b, out, a_s, b_s, bias, a_mode, b_mode, fast_accum, path=None, config=None,
                 quant_a=False) -> Plan:
    """The launch of one call signature: kernel, grid, scalar tail and options (``extra`` says what the
    per-call tensors need; ``info`` is the path and config). ``quant_a``: ``a`` is unquantized and the decode
    kernel quantizes it per row (``a_mode`` A_ROW_IN_KERNEL); the tiles are those of the row-scaled FP8 call, so
    both give bit-identical results."""
    m, k = a.shape
    n = b.shape[1]
    interp = _INTERP
    blocked = a_mode == A_BLOCK or b_mode in (B_BLOCK, B_GROUP)
    if quant_a:
        path = "decode"
    elif path is None:
        path = _pick_path(a, b, out, m)
        if path == "tma" and _wgmma_takes(a_mode, b_mode, out, b_s, fast_accum=fast_accum):
            path = "wgmma"
    if path == "wgmma" and not (_wgmma_takes(a_mode, b_mode, out, b_s, explicit=True, fast_accum=fast_accum)
                                and _pick_path(a, b, out, max(m, DECODE_MAX_M + 1)) == "tma"):
        raise ValueError("the wgmma path takes group- or block-scaled weights (and per-tensor or per-channel ones "
                         "with faithful accumulation) on Hopper only, with TMA-aligned operands")
    if config is None:
        cfg_a_mode, a_dtype = (A_ROW, FP8) if quant_a else (a_mode, a.dtype)
        problem = (path, m, n, k, cfg_a_mode, b_mode, bool(fast_accum), a.device, (a_dtype, b.dtype, out.dtype), interp)
        if not quant_a and not capturing(a.device):
            # kernel-autotune's tuning on first use, when due (a GPU without shipped configs, TRITON_OPS_AUTOTUNE):
            # candidates run on these operands into a scratch output; the answer lands in kernel-autotune's memo,
            # where _plan's own lookup of the same key finds it
            scratch: list[torch.Tensor] = []  # allocated only when a search runs

            def bench(cand: dict[str, Any]):
                if not scratch:
                    scratch.append(torch.empty_like(out))
                return lambda: _launch(a, b, scratch[0], a_s, b_s, bias, a_mode, b_mode, fast_accum, path, cand)

            _choose(*problem, bench=bench)
        cfg = _plan(*problem)
        if quant_a:
            cfg = cfgs.fused_decode_config(cfg, n, a.element_size(), interp)
    else:
        cfg = _fit_block_k(config, blocked)
    if path == "wgmma":
        return _wgmma_plan(a, b, out, a_s, b_s, bias, a_mode, b_mode, cfg)
    nb = n if b_mode == B_GROUP else -(-n // 128)  # the b scale's row stride (block / group scales)
    sa_m, sa_k = (a_s.stride(0), a_s.stride(1)) if a_mode == A_BLOCK else (0, 0)
    has_bias = bias is not None
    info = {"path": path, **cfg}
    # Constexprs go positionally, in the kernels' signature order (the direct launcher takes every argument).
    if path == "decode":
        k_tiles = triton.cdiv(k, cfg["BLOCK_K"])
        per_split = triton.cdiv(k_tiles, max(1, min(cfg["SPLIT_K"], k_tiles)))
        split = triton.cdiv(k_tiles, per_split)  # no empty K slices
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
        tail = (m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
                sa_m, sa_k, nb, per_split,
                a_mode, b_mode, has_bias, 0 if fast_accum else 1, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"],
                split, k % cfg["BLOCK_K"] == 0 and n % cfg["BLOCK_N"] == 0, bool(quant_a), interp)
        tail += _amax_tile(m, k) if quant_a else (1, 1)
        return Plan(fp8_gemm_decode_kernel, grid, tail, cfg["num_warps"], info=info,
                    extra=LaunchNeeds(path, split * m * n, grid[0], False), num_stages=cfg["num_stages"])
    if path == "tma":
        kmajor, lead = _b_layout(b)
        copy_b = not kmajor
        if copy_b:
            # FP8 wgmma reads B K-major only; a row-major B tile would be transposed through registers at a
            # tenth of the speed. One copy of b (K*N bytes, made per call) is far cheaper for M > 64.
            kmajor, lead = True, k
        tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
        progs = cfgs.persistent_programs(tiles, sm_count(a.device, cpu=4) * cfg.get("CTAS_PER_SM", 1)) \
            if cfg["PERSISTENT"] else tiles
        tail = (m, n, k, a.stride(0), lead, out.stride(0), sa_m, sa_k, nb, progs,
                a_mode, b_mode, kmajor, has_bias, 0 if fast_accum else cfg["FAITHFUL_ACC"],
                cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["GROUP_M"], bool(cfg.get("FLATTEN", False)),
                bool(cfg.get("WARP_SPEC", False)), cfg.get("PROMOTE_K", cfg["BLOCK_K"]),
                bool(cfg.get("EPI_SUBTILE", False)))
        return Plan(fp8_gemm_tma_kernel, (progs,), tail, cfg["num_warps"], info=info,
                    extra=LaunchNeeds(path, copy_b, 0, True), num_stages=cfg["num_stages"])
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    tail = (m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            sa_m, sa_k, nb,
            a_mode, b_mode, has_bias, 0 if fast_accum else 1, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"],
            cfg["GROUP_M"])
    return Plan(fp8_gemm_ptr_kernel, grid, tail, cfg["num_warps"], info=info, extra=LaunchNeeds(path, False, 0, False),
                num_stages=cfg["num_stages"])


def _wgmma_takes(a_mode: int, b_mode: int, out: torch.Tensor, b_s: torch.Tensor, explicit: bool = False,
                 fast_accum: bool = False) -> bool:
    """The Gluon kernels take the TMA path's group-scaled weights (activations per tensor, per row or in 1x128
    blocks) with a 16- or 32-bit output, when TMA can read the scales' rows (unit column stride, 16-byte aligned
    rows). 128x128 weight blocks run on them when asked for (``path="wgmma"``, :data:`WGMMA_BLOCK_SCALES` routes
    them there by default); per-tensor and per-channel weights with faithful accumulation likewise
    (:data:`WGMMA_CHANNEL_SCALES`), on the ping-pong kernel only."""
    if not (gemm_wgmma.AVAILABLE and a_mode in (A_TENSOR, A_ROW, A_BLOCK)
            and out.dtype in (torch.bfloat16, torch.float16, torch.float32)):
        return False
    if b_mode in (B_TENSOR, B_CHANNEL):  # (a per-tensor scale may be 0-dim: no stride to read)
        return not fast_accum and (explicit or WGMMA_CHANNEL_SCALES)
    if b_mode not in (B_BLOCK, B_GROUP) or b_s.stride(-1) != 1:
        return False
    if b_mode == B_BLOCK:
        return explicit or WGMMA_BLOCK_SCALES
    return b_s.data_ptr() % 16 == 0 and (b_s.stride(0) * 4) % 16 == 0


def _wgmma_plan(a, b, out, a_s, b_s, bias, a_mode, b_mode, cfg: dict[str, Any]) -> Plan:
    """The launch of ``gemm_wgmma``'s kernel: one program per output tile (at most one an SM for a persistent
    config: ``gemm_wgmma.programs``), b K-major (a row-major b is copied per call, as on the TMA path)."""
    m, k = a.shape
    n = b.shape[1]
    kmajor, lead = _b_layout(b)
    if not kmajor:
        lead = k
    if b_mode == B_BLOCK and 128 % cfg["BLOCK_N"]:
        raise ValueError(f"128x128 weight blocks need BLOCK_N to divide 128, got {cfg['BLOCK_N']}")
    sa_m, sa_k = (a_s.stride(0), a_s.stride(1)) if a_mode == A_BLOCK else (0, 0)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    # the weight scale's row stride is read for block and group scales only (0 otherwise: one specialization)
    tail = (m, n, k, a.stride(0), lead, out.stride(0), sa_m, sa_k, b_s.stride(0) if b_mode in (B_BLOCK, B_GROUP) else 0,
            a_mode, gemm_wgmma.weight_mode_arg(cfg, b_mode), bias is not None, *gemm_wgmma.launch_args(cfg))
    grid = gemm_wgmma.programs(cfg, tiles, sm_count(a.device, cpu=4))
    return Plan(gemm_wgmma.kernel_for(cfg), (grid,), tail, cfg["num_warps"],
                info={"path": "wgmma", **cfg}, extra=LaunchNeeds("tma", not kmajor, 0, True),
                **gemm_wgmma.launch_options(cfg))


_AMAX_TILE = 8192


def _amax_tile(m: int, k: int) -> tuple[int, int]:
    """Row-maximum tile of the fused activation quantization: the rows rounded up to a power of two,
    ``_AMAX_TILE`` elements in all (a single token's row in one or two loads), no wider than K needs."""
    rows = triton.next_power_of_2(m)
    return rows, max(16, min(triton.next_power_of_2(k), _AMAX_TILE // rows))


def _run_launch(plan: Plan, a, b, out, a_s, b_s, bias) -> None:
    """Launch ``plan`` with this call's tensors (the output is per call; partials and counters are the
    stream's scratch buffers)."""
    path, flag, n_cnt, descriptors = plan.extra  # see LaunchNeeds
    # the kernels read the bias at unit stride: a strided view (bias=t[::2]) is copied, not misread
    bias_arg = a_s if bias is None else (bias if bias.stride(0) == 1 else bias.contiguous())
    if descriptors and not _INTERP:
        _ensure_allocator()
    if path == "decode":
        if plan.grid[1] > 1:  # split K: the partial sums meet in the stream's scratch buffers
            ws, cnt = _decode_scratch(out.device, flag, n_cnt)
            plan.launch(a, b, out, a_s, b_s, bias_arg, ws, cnt)
        else:
            plan.launch(a, b, out, a_s, b_s, bias_arg, out, out)
        return
    if path == "tma" and flag:  # b row-major [K, N]: give the kernel a K-major copy
        b = b.t().contiguous().t()
    plan.launch(a, b, out, a_s, b_s, bias_arg)


def _launch(a, b, out, a_s, b_s, bias, a_mode, b_mode, fast_accum, path=None, config=None) -> dict[str, Any]:
    """Pick the kernel and its config, then launch it (no plan cache); returns the path and config used."""
    plan = _launch_plan(a, b, out, a_s, b_s, bias, a_mode, b_mode, fast_accum, path, config)
    _run_launch(plan, a, b, out, a_s, b_s, bias)
    return plan.info


def _fit_block_k(cfg: dict[str, Any], blocked: bool) -> dict[str, Any]:
    # Block scales change every 128 along K: a K tile must not straddle two scale blocks (the Gluon kernel's K step
    # is 128 by construction: no BLOCK_K in its configs).
    if blocked and cfg.get("BLOCK_K", 128) > 128:
        return {**cfg, "BLOCK_K": 128}
    return cfg


def fp8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    bias: torch.Tensor | None = None,
    fast_accum: bool = False,
) -> torch.Tensor:
    """``a @ b`` with E4M3 operands, fp32 accumulation, scales and bias in the kernel.

    Args:
        a: ``[M, K]``, ``float8_e4m3fn`` (with ``a_scale``) or fp16/bf16/fp32 (quantized here, per row unless
            ``a_scale`` says otherwise; a small one, ``M * K <= 16384``, without ``a_scale`` is quantized inside
            the GEMM kernel: one launch, the same result). Unit stride along K.
        b: ``[K, N]``, ``float8_e4m3fn`` (with ``b_scale``) or fp16/bf16/fp32 (quantized here, per output
            channel). Row-major ``[K, N]`` or the transposed view of a row-major ``[N, K]`` weight (``w.t()``,
            the layout of ``nn.Linear`` and cuBLAS).
        a_scale: fp32; one value (per tensor), ``[M]``/``[M, 1]`` (per row) or ``[M, ceil(K/128)]`` (1x128
            blocks). The dequantized operand is ``a.float() * a_scale`` (broadcast over its rows/blocks).
        b_scale: fp32; one value, ``[N]``/``[1, N]`` (per channel) or ``[ceil(K/128), ceil(N/128)]`` (128x128).
        out_dtype: float16, bfloat16 or float32 (default: a's dtype when half precision, else bfloat16).
        bias: ``[N]``, added in fp32 before the output rounding.
        fast_accum: keep the FP8 tensor core's reduced-precision running sum over the whole K loop (as cuBLAS's
            ``use_fast_accum=True``): faster, with an error that grows with K (about 3e-3 relative at K=16384
            on the H100). The default promotes the partial sums to fp32 every K block (error ~1e-4 at any K).
            Block and group scales always promote (each 128-deep K block's product is scaled before it is added),
            so the flag changes nothing for them.

    Returns:
        ``[M, N]`` tensor of ``out_dtype``.

    Raises:
        UnsupportedDtypeError: dtypes outside the above, an FP8 operand without its scale, or a GPU without FP8
            tensor cores. ShapeMismatchError, DeviceMismatchError, UnsupportedDeviceError, LayoutError as named.

    Registered as ``torch.ops.triton_ops.fp8_gemm``, so ``torch.compile(fullgraph=True)``, CUDA graphs and
    ``torch.export`` take it as one node. Not differentiable (FP8 operands have no gradient); ``FP8Linear`` is.
    """
    if direct_call_ok(a, b, a_scale, b_scale, bias):  # plain eager: no dispatcher round trip
        return _gemm(a, b, a_scale, b_scale, out_dtype, bias, fast_accum)
    return _gemm_op(a, b, a_scale, b_scale, out_dtype, bias, fast_accum)


def _gemm(a, b, a_scale, b_scale, out_dtype, bias, fast_accum) -> torch.Tensor:
    """The op's implementation: the call's cached plan (built and validated on the first call of its key)."""
    try:
        key = call_key(a, b, a_scale, b_scale, out_dtype, bias, fast_accum)
    except (AttributeError, RuntimeError, TypeError):  # not tensors: validation says which
        key = None
    call = _CALLS.get(key) if key is not None else None
    if call is None:
        call = _new_call(a, b, a_scale, b_scale, out_dtype, bias, fast_accum, key)
    return call.run(a, b, a_scale, b_scale, bias)


@torch.library.custom_op(op_name("fp8_gemm"), mutates_args=())
def _gemm_op(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor | None, b_scale: torch.Tensor | None,
             out_dtype: torch.dtype | None, bias: torch.Tensor | None, fast_accum: bool) -> torch.Tensor:
    with _scratch.per_call():  # no buffer outlives the call (torch.compile's CUDA graphs; see _scratch)
        return _gemm(a, b, a_scale, b_scale, out_dtype, bias, fast_accum)


@_gemm_op.register_fake
def _(a, b, a_scale, b_scale, out_dtype, bias, fast_accum):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=default_out_dtype(a.dtype, out_dtype))


def default_out_dtype(a_dtype: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    """The result's dtype: ``out_dtype``, else a's dtype when half precision, else bfloat16."""
    if out_dtype is not None:
        return out_dtype
    return a_dtype if a_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


class _Call:
    """One call signature of ``fp8_gemm``: what to do with each operand and the kernel launch (built on the
    first call, which validates; the key fixes every metadata the decisions read)."""

    __slots__ = ("m", "n", "out_dtype", "kind", "a_prep", "b_prep", "a_mode", "b_mode", "fast", "launch",
                 "fused")

    def __init__(self, spec, fast_accum: bool, a_scale, b_scale) -> None:
        self.m, self.n, self.out_dtype = spec.m, spec.n, spec.out_dtype
        # kind 1: empty output; 2: K == 0 (bias or zeros); 0: a launch
        self.kind = 1 if spec.m == 0 or spec.n == 0 else 2 if spec.k == 0 else 0
        self.a_prep = _operand_prep(spec.a.dtype, a_scale, spec.a_granularity, "row")
        self.b_prep = _operand_prep(spec.b.dtype, b_scale, spec.b_granularity, "channel")
        self.a_mode = _A_MODE[spec.a_granularity or "row"]
        self.b_mode = _B_MODE[spec.b_granularity or "channel"]
        self.fast = bool(fast_accum)
        self.launch: Plan | None = None
        # A small unquantized activation with dynamic row scales: quantized inside the decode GEMM.
        self.fused = (self.kind == 0 and self.a_prep == (2, "row") and a_scale is None and spec.m <= DECODE_MAX_M
                      and spec.m * spec.k <= FUSED_ROW_QUANT_MAX)

    def run(self, a, b, a_scale, b_scale, bias) -> torch.Tensor:
        out = torch.empty((self.m, self.n), dtype=self.out_dtype, device=a.device)
        if self.kind:
            if self.kind == 1:
                return out
            return out.copy_(bias.expand(self.m, self.n) if bias is not None else torch.zeros_like(out))
        if _INTERP:
            nan_rows, nan_cols = _nan_lines(a, 1), _nan_lines(b, 0)
        b, b_s = _apply_prep(self.b_prep, b, b_scale, True)
        if self.fused:
            plan = self.launch
            if plan is None:  # no scale tensor for a (b's stands in for the unused pointer)
                plan = self.launch = _launch_plan(a, b, out, b_s, b_s, bias, A_ROW_IN_KERNEL, self.b_mode, self.fast,
                                                  quant_a=True)
            _run_launch(plan, a, b, out, b_s, b_s, bias)
        else:
            a, a_s = _apply_prep(self.a_prep, a, a_scale, False)
            plan = self.launch
            if plan is None:
                plan = self.launch = _launch_plan(a, b, out, a_s, b_s, bias, self.a_mode, self.b_mode, self.fast)
            _run_launch(plan, a, b, out, a_s, b_s, bias)
        if _INTERP:
            out[nan_rows] = float("nan")
            out[:, nan_cols] = float("nan")
        return out


def _nan_lines(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows (``dim=1``) or columns (``dim=0``) of an operand holding a NaN (for E4M3: its NaN payload 0x7F/0xFF).

    The GPU's tensor cores carry a NaN into every sum it enters; the interpreter upcasts FP8 to fp16 for its dot
    and turns the payload into a number. Under the interpreter the GEMM marks those output rows and columns NaN
    itself, so CPU results propagate NaN as the GPU's do.
    """
    nan = (t.view(torch.uint8) & 0x7F) == 0x7F if t.dtype == FP8 else torch.isnan(t)
    return nan.any(dim=dim)


def _operand_prep(dtype: torch.dtype, scale: torch.Tensor | None, gran: str | None, default: str) -> tuple:
    """How an operand reaches the kernel: ``(0, _)`` as is (FP8, its scale's elements already in the order the
    kernel reads them), ``(1, gran)`` FP8 with a scale to flatten or copy, ``(2, gran)`` quantized here."""
    if dtype != FP8:
        return 2, gran or default
    return (0 if scale.is_contiguous() else 1), gran


def _apply_prep(prep: tuple, t: torch.Tensor, scale: torch.Tensor, is_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    kind, gran = prep
    if kind == 0:
        return t, scale  # the kernel reads the data pointer only: a [M, 1] scale serves as a flat [M] one
    if kind == 2:
        t, scale = _quantize(t, gran, scale, is_b)
    return t, _flat_scale(scale, gran)


def _flat_scale(scale: torch.Tensor, gran: str) -> torch.Tensor:
    # The kernels read tensor/row/channel scales as a flat vector, block and group scales row-major (validated fp32).
    if gran not in ("block", "group") and scale.dim() != 1:
        scale = scale.reshape(-1)
    return scale if scale.is_contiguous() else scale.contiguous()


def _new_call(a, b, a_scale, b_scale, out_dtype, bias, fast_accum, key) -> _Call:
    spec = validate_fp8_gemm_inputs(a, b, a_scale=a_scale, b_scale=b_scale, out_dtype=out_dtype, bias=bias)
    if not _device_caps(a.device, _INTERP)[0]:
        raise UnsupportedDtypeError(
            f"a: FP8 GEMM needs FP8 tensor cores (compute capability 8.9 or higher), got "
            f"{torch.cuda.get_device_name(a.device) if a.device.type == 'cuda' else a.device}")
    call = _Call(spec, fast_accum, a_scale, b_scale)
    if key is not None:
        try:
            _CALLS.put(key, call)
        except TypeError:  # an unhashable option: no caching, same results
            pass
    return call


_CALLS = PlanCache()


__all__ = ["clear_caches", "fp8_gemm"]
