"""FP8 quantization, GEMM and FP8Linear against cuBLAS (``torch._scaled_mm``, bf16 ``torch.matmul``) and eager:
``python -m benchmarks.bench_fp8_gemm``.

On a GPU: M = N = K = 4096 and 8192 with per-tensor and per-row/per-channel scales, faithful and fast
accumulation against ``_scaled_mm`` default and ``use_fast_accum=True``; 4096 x 4096 x 16384 (accumulation error
at large K); decode M = 1, 16, 64 with N, K in {4096, 11264}; ``quantize_fp8`` (dynamic tensor, row and 1x128
block scales; a given static per-tensor scale; ``DelayedScaler``) against the same computation in eager PyTorch
and its torch.compile; ``FP8Linear`` against bf16 ``nn.Linear`` at M = 1, 64, 2048, 8192; accuracy tables (the
GEMM's own error per granularity at K = 1024, 4096, 16384, quantization SQNR per granularity).
"""

from __future__ import annotations

import math
import sys

import torch

from ._common import run_groups

DECODE_NK = [(4096, 4096), (11264, 4096), (4096, 11264), (11264, 11264)]
FP8_MAX = 448.0
# Baselines may round a few values differently (a compiled division need not be IEEE-exact): fraction of values
QUANT_BASELINE_TOL = 1e-3
# torch.compile's generated kernels divide approximately: with 32 scales per row of 4096 a few more values land
# one rounding step away than with one scale per row or tensor
QUANT_COMPILED_BLOCK_TOL = 4e-3
# The compiled delayed-scaling baseline's amax / 448 came out one float32 ulp off on the H100 (0.01248604990541935
# for 0.012486048974096775); every value whose scaled magnitude sits on a rounding boundary then lands one FP8
# step away: 2e-7 of the values in one draw, 0.6 % in another (4096 x 4096)
QUANT_COMPILED_DELAYED_TOL = 1e-2


def _ieee_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # tensor / tensor: correctly rounded on CUDA (a division by a Python scalar multiplies by its reciprocal)
    return torch.div(a, b)


def _scale(amax: torch.Tensor) -> torch.Tensor:
    dyn = _ieee_div(amax, torch.full_like(amax, FP8_MAX)).clamp_min(2.0**-126)
    return torch.where(amax > 0, dyn, torch.ones_like(dyn))


def _cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Three elementwise passes: the multiply (a bf16 ``x`` times the float32 reciprocal of a scale with at least
    one dimension promotes to float32 inside the multiply, no separate ``x.float()`` pass), the clamp in place,
    the cast."""
    if scale.dim() == 0:  # a 0-dim float32 tensor would not promote a bf16 x: the product would round to bf16
        scale = scale.reshape(1)
    return (x * _ieee_div(torch.ones_like(scale), scale)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def block_quantize_eager(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x ``block`` scales in plain PyTorch, dividing as the package's reference does (IEEE tensor divisions)."""
    m, k = x.shape
    xb = x.view(m, k // block, block)
    scale = _scale(xb.abs().amax(dim=-1, keepdim=True).float())
    return _cast(xb, scale).view(m, k), scale.squeeze(-1)


def static_quantize_eager(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A given per-tensor scale, as a user writes it (no overflow check): multiply, clamp, cast."""
    return _cast(x, scale), scale


def delayed_quantize_eager(x: torch.Tensor, hist: torch.Tensor, margin: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Delayed scaling in plain PyTorch (Transformer Engine's recipe): the scale from the amax history, this
    call's amax recorded in the history (a roll, then a write), the cast."""
    scale = _scale(hist.amax().reshape(1)) * float(2**margin)
    q = _cast(x, scale)
    hist.copy_(hist.roll(1))
    hist[0] = x.abs().amax().float()
    return q, scale


def _quant_extra_cases(suite, shapes, with_block: bool, dtype=torch.bfloat16):
    """Cases the shared sweep does not build: 1x128 block scales with an IEEE-dividing eager baseline, a given
    static per-tensor scale, and ``DelayedScaler`` (the default margin 0, in a steady state: one read)."""
    from fp8_gemm import DelayedScaler, quantize_fp8
    from fp8_gemm.reference import quantize_fp8_reference
    from triton_ops.benchmark._cases import CaseFactory, _compiled, _device, _randn
    from triton_ops.benchmark._model import Case, Impl
    from triton_ops_core.models import dtype_name

    def error_fn(x, scale=None):
        q_ref, s_ref = quantize_fp8_reference(x, "e4m3", "tensor" if scale is not None else "block", scale=scale)

        def error(out):
            q, s = out
            if q.shape != q_ref.shape or q.dtype != q_ref.dtype:
                return math.nan
            mismatch = (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item()
            s_err = ((s.float().reshape(s_ref.shape) - s_ref).norm() / s_ref.norm()).item()
            return max(mismatch, s_err)
        return error

    def case(m, k, kind):
        dev = _device(suite)
        x = _randn((m, k), dtype, dev)
        es = x.element_size()
        if kind == "block":
            err = error_fn(x)
            impls = [Impl("triton-ops", lambda: quantize_fp8(x, "e4m3", "block"), role="ours", error_fn=err),
                     Impl("eager", lambda: block_quantize_eager(x), error_fn=err, tol=QUANT_BASELINE_TOL),
                     _compiled(suite, "torch.compile", block_quantize_eager, x)]
            impls[2].tol = QUANT_COMPILED_BLOCK_TOL
            n_scales, note = m * (k // 128), "dynamic 1x128 block scales"
        else:
            amax = x.float().abs().amax().reshape(1)
            static = _scale(amax) * 2.0  # a calibrated scale with 2x headroom
            err = error_fn(x, static)
            if kind == "static":
                impls = [Impl("triton-ops", lambda: quantize_fp8(x, "e4m3", "tensor", scale=static), role="ours",
                              error_fn=err),
                         Impl("eager", lambda: static_quantize_eager(x, static), error_fn=err, tol=QUANT_BASELINE_TOL),
                         _compiled(suite, "torch.compile", static_quantize_eager, x, static)]
                note = "a given per-tensor scale (2x headroom), one read; ours also checks it against the amax"
            else:
                # The default margin 0: in a steady state amax * (1 / (amax / 448)) may round to just above 448,
                # which only rounds (the overflow threshold is 464), so every later call keeps amax / 448.
                scaler = DelayedScaler("e4m3", history_len=16, margin=0)
                scaler(x)  # the history now holds amax(x)
                hist = torch.full((16,), float(amax), device=dev)
                err = error_fn(x, _scale(amax))
                impls = [Impl("triton-ops", lambda: scaler(x), role="ours", error_fn=err),
                         Impl("eager", lambda: delayed_quantize_eager(x, hist, 0), error_fn=err,
                              tol=QUANT_BASELINE_TOL),
                         _compiled(suite, "torch.compile", delayed_quantize_eager, x, hist, 0)]
                impls[2].error_fn, impls[2].tol = err, QUANT_COMPILED_DELAYED_TOL
                note = "DelayedScaler(history_len=16, margin=0) in steady state: scale and history on the device"
            if len(impls) > 2 and impls[2].error_fn is None:
                impls[2].error_fn, impls[2].tol = err, QUANT_BASELINE_TOL
            n_scales = 1
        impls[2].error_fn = impls[2].error_fn or err
        return Case(group="fp8-gemm", name=f"quantize {m}x{k} {kind}", dtype=dtype_name(dtype), reference=None,
                    impls=impls, tol=1e-6, params={"M": m, "K": k, "granularity": kind, "fmt": "e4m3"},
                    bytes_moved=m * k * (es + 1) + 4 * n_scales, panel="quantize_fp8 (dynamic, E4M3)",
                    x=m * k * (es + 1) / 2**20, x_label="MB moved", note=note)

    kinds = (["block"] if with_block else []) + ["static", "delayed"]
    factories = [CaseFactory(f"fp8-gemm:quantize {m}x{k} {kind}", lambda m=m, k=k, kind=kind: case(m, k, kind))
                 for (m, k) in shapes for kind in kinds]
    return suite.run(factories, "quantize-fp8")


def _quantize(suite, shapes, granularities) -> None:
    dynamic = [g for g in granularities if g != "block"]
    if dynamic:
        suite.benchmark_quantize_fp8(shapes=shapes, granularities=dynamic)
    _quant_extra_cases(suite, shapes, "block" in granularities)


def run(suite, quick: bool = False) -> None:
    if not suite.on_gpu:
        suite.benchmark_fp8_gemm(sizes=[(16, 40, 96), (33, 64, 128)], granularities=("tensor", "row"),
                                 decode_m=(1,), decode_nk=[(48, 64)])
        _quantize(suite, [(8, 256)], ("tensor", "row", "block"))
        suite.benchmark_fp8_linear(batch_sizes=(3,), in_features=64, out_features=48)
        suite.benchmark_fp8_accuracy(m=32, n=48, ks=(256,))
        return
    if quick:
        suite.benchmark_fp8_gemm(sizes=[(4096, 4096, 4096)], granularities=("tensor",), decode_m=(1, 64),
                                 decode_nk=[(4096, 4096)])
        _quantize(suite, [(4096, 4096)], ("tensor", "row"))
        suite.benchmark_fp8_linear(batch_sizes=(1, 2048))
        suite.benchmark_fp8_accuracy(ks=(4096,))
        return
    suite.benchmark_fp8_gemm(sizes=[(4096, 4096, 4096), (8192, 8192, 8192)], granularities=("tensor", "row"),
                             decode_m=(1, 16, 64), decode_nk=DECODE_NK)
    _quantize(suite, [(4096, 4096), (8192, 8192)], ("tensor", "row", "block"))
    suite.benchmark_fp8_linear(batch_sizes=(1, 64, 2048, 8192))
    suite.benchmark_fp8_gemm(sizes=[(4096, 4096, 16384)], granularities=("tensor",), decode_m=(), decode_nk=())
    suite.benchmark_fp8_accuracy(m=1024, n=1024, ks=(1024, 4096, 16384))


def main(argv=None) -> int:
    return run_groups({"fp8-gemm": run}, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
