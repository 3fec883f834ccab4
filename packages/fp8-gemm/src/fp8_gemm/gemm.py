"""``fp8_gemm``: ``a @ b`` on E4M3 operands with fp32 accumulation and scales of any granularity.

Three kernels (gemm_kernels.py): a persistent tensor-descriptor (TMA) kernel for aligned operands on Hopper,
a masked-pointer kernel for the rest (K or N not a multiple of 16, odd strides, GPUs without TMA), and a
split-K kernel for decode (M <= 64), where the weight stream is the whole cost.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
from triton_ops_core.device import is_hopper, is_interpreter, supports_fp8
from triton_ops_core.exceptions import UnsupportedDtypeError
from triton_ops_core.validation.fp8_gemm import validate_fp8_gemm_inputs

from . import gemm_configs as cfgs
from .gemm_kernels import fp8_gemm_decode_kernel, fp8_gemm_ptr_kernel, fp8_gemm_tma_kernel

FP8 = torch.float8_e4m3fn
_A_MODE = {"tensor": 0, "row": 1, "block": 2}
_B_MODE = {"tensor": 0, "channel": 1, "block": 2}
DECODE_MAX_M = 64
_COUNTERS: dict[torch.device, torch.Tensor] = {}
# Triton reads TRITON_INTERPRET when the kernels are decorated (at import): that decision holds for the process.
_INTERP = is_interpreter()


def _alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    # Device-side tensor descriptors live in a global scratch buffer that Triton asks an allocator for.
    from triton.runtime import _allocation

    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_alloc)


def _quantize(t: torch.Tensor, granularity: str, scale: torch.Tensor | None,
              is_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a non-FP8 operand to E4M3 with this package's quantization kernels (``quantize_fp8``)."""
    from .quantize import quantize_fp8

    if scale is not None and granularity in ("row", "channel"):  # validation allows [M] / [N]: give the 2-D form
        scale = scale.reshape(-1, 1) if granularity == "row" else scale.reshape(1, -1)
    return quantize_fp8(t, "e4m3", granularity, scale=scale, role="weight" if is_b else "activation")


def _prepare_operand(t: torch.Tensor, scale: torch.Tensor | None, gran: str | None, default: str, is_b: bool):
    if t.dtype != FP8:
        gran = gran or default
        t, scale = _quantize(t, gran, scale, is_b)
    # The kernels read tensor/row/channel scales as a flat vector, block scales row-major (validated fp32).
    if gran != "block" and scale.dim() != 1:
        scale = scale.reshape(-1)
    if not scale.is_contiguous():
        scale = scale.contiguous()
    return t, scale, gran


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
    b_ok = layout is not None and b.data_ptr() % 16 == 0 and layout[1] % 16 == 0
    a_ok = a.stride(1) == 1 and a.data_ptr() % 16 == 0 and a.stride(0) % 16 == 0
    c_ok = out.data_ptr() % 16 == 0 and (out.stride(0) * out.element_size()) % 16 == 0
    tma_device = _device_caps(a.device, _INTERP)[1]
    return "tma" if (a_ok and b_ok and c_ok and tma_device) else "ptr"


def _counters(device: torch.device, n: int) -> torch.Tensor:
    # Split-K arrival counters: zero at rest, reset by the program that consumes them, so one buffer serves
    # every call on the device (and CUDA-graph replays).
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


@functools.lru_cache(maxsize=4096)
def _plan(path: str, m: int, n: int, k: int, a_mode: int, b_mode: int, fast: bool, device: torch.device,
          dtypes: tuple, interp: bool) -> dict[str, Any]:
    """The launch config of one problem (memoized: the hot path pays for it once per shape)."""
    blocked = a_mode == 2 or b_mode == 2
    problem = {"m": m, "n": n, "k": k}
    name = f"fp8_gemm.{path}.a{a_mode}b{b_mode}.{'fast' if fast else 'faithful'}"
    if path == "decode":
        cfg = cfgs.choose(name, problem, dtypes, device,
                          lambda: cfgs.decode_heuristic(m, n, k, blocked, device, interp),
                          cfgs.FP8_GEMM_DECODE_CONFIGS)
    elif path == "tma":
        cfg = cfgs.choose(name, problem, dtypes, device,
                          lambda: cfgs.tma_heuristic(m, n, k, blocked, fast, device, interp), cfgs.FP8_GEMM_CONFIGS)
    else:
        cfg = cfgs.choose(name, problem, dtypes, device, lambda: cfgs.ptr_heuristic(m, n, k, interp),
                          cfgs.FP8_GEMM_PTR_CONFIGS)
    return _fit_block_k(dict(cfg), blocked)


def clear_caches() -> None:
    """Forget memoized launch plans, e.g. after tuning, so the next calls look their configs up again."""
    _plan.cache_clear()


def _launch(a, b, out, a_s, b_s, bias, a_mode, b_mode, fast_accum, path=None, config=None) -> dict[str, Any]:
    """Pick the kernel and its config, then launch it; returns the path and config used."""
    m, k = a.shape
    n = b.shape[1]
    interp = _INTERP
    path = path or _pick_path(a, b, out, m)
    blocked = a_mode == 2 or b_mode == 2
    if config is None:
        cfg = _plan(path, m, n, k, a_mode, b_mode, bool(fast_accum), a.device, (a.dtype, b.dtype, out.dtype), interp)
    else:
        cfg = _fit_block_k(config, blocked)
    nb = -(-n // 128)
    sa_m, sa_k = (a_s.stride(0), a_s.stride(1)) if a_mode == 2 else (0, 0)
    bias_arg = bias if bias is not None else a_s
    common = dict(A_MODE=a_mode, B_MODE=b_mode, HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"],
                  BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    if path == "decode":
        k_tiles = triton.cdiv(k, cfg["BLOCK_K"])
        per_split = triton.cdiv(k_tiles, max(1, min(cfg["SPLIT_K"], k_tiles)))
        split = triton.cdiv(k_tiles, per_split)  # no empty K slices
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
        ws = torch.empty((split, m, n), dtype=torch.float32, device=a.device) if split > 1 else out
        cnt = _counters(a.device, grid[0]) if split > 1 else out
        fp8_gemm_decode_kernel[grid](
            a, b, out, a_s, b_s, bias_arg, ws, cnt, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out.stride(0), out.stride(1), sa_m, sa_k, nb, per_split,
            ACC=0 if fast_accum else 1, SPLIT_K=split, **common)
    elif path == "tma":
        if not interp:
            _ensure_allocator()
        kmajor, lead = _b_layout(b)
        if not kmajor:
            # FP8 wgmma reads B K-major only; a row-major B tile would be transposed through registers at a
            # tenth of the speed. One copy of b (K*N bytes) is far cheaper for M > 64.
            b = b.t().contiguous().t()
            kmajor, lead = True, b.stride(1)
        tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
        progs = min(tiles, cfgs.num_sms(a.device) * cfg.get("CTAS_PER_SM", 1)) if cfg["PERSISTENT"] else tiles
        fp8_gemm_tma_kernel[(progs,)](
            a, b, out, a_s, b_s, bias_arg, m, n, k, a.stride(0), lead, out.stride(0), sa_m, sa_k, nb, progs,
            B_KMAJOR=kmajor, ACC=0 if fast_accum else cfg["FAITHFUL_ACC"], GROUP_M=cfg["GROUP_M"],
            FLATTEN=bool(cfg.get("FLATTEN", False)), WARP_SPEC=bool(cfg.get("WARP_SPEC", False)),
            PROMOTE_K=cfg.get("PROMOTE_K", cfg["BLOCK_K"]), EPI_SUBTILE=bool(cfg.get("EPI_SUBTILE", False)),
            **common)
    else:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        fp8_gemm_ptr_kernel[grid](
            a, b, out, a_s, b_s, bias_arg, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out.stride(0), out.stride(1), sa_m, sa_k, nb,
            ACC=0 if fast_accum else 1, GROUP_M=cfg["GROUP_M"], **common)
    return {"path": path, **cfg}


def _fit_block_k(cfg: dict[str, Any], blocked: bool) -> dict[str, Any]:
    # Block scales change every 128 along K: a K tile must not straddle two scale blocks.
    if blocked and cfg["BLOCK_K"] > 128:
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
            ``a_scale`` says otherwise). Unit stride along K.
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

    Returns:
        ``[M, N]`` tensor of ``out_dtype``.

    Raises:
        UnsupportedDtypeError: dtypes outside the above, an FP8 operand without its scale, or a GPU without FP8
            tensor cores. ShapeMismatchError, DeviceMismatchError, UnsupportedDeviceError, LayoutError as named.
    """
    spec = validate_fp8_gemm_inputs(a, b, a_scale=a_scale, b_scale=b_scale, out_dtype=out_dtype, bias=bias)
    if not _device_caps(a.device, _INTERP)[0]:
        raise UnsupportedDtypeError(
            f"a: FP8 GEMM needs FP8 tensor cores (compute capability 8.9 or higher), got "
            f"{torch.cuda.get_device_name(a.device) if a.device.type == 'cuda' else a.device}")
    out = torch.empty((spec.m, spec.n), dtype=spec.out_dtype, device=a.device)
    if spec.m == 0 or spec.n == 0:
        return out
    if spec.k == 0:
        return out.copy_(bias.expand(spec.m, spec.n) if bias is not None else torch.zeros_like(out))
    a_q, a_s, a_gran = _prepare_operand(a, a_scale, spec.a_granularity, "row", is_b=False)
    b_q, b_s, b_gran = _prepare_operand(b, b_scale, spec.b_granularity, "channel", is_b=True)
    _launch(a_q, b_q, out, a_s, b_s, bias, _A_MODE[a_gran], _B_MODE[b_gran], fast_accum)
    return out


__all__ = ["clear_caches", "fp8_gemm"]
