"""Quantization accuracy: SQNR per granularity, on normal data and on activations with outlier channels.

E4M3 keeps 3 mantissa bits: round-to-nearest leaves a relative error of at most 2**-4 per value, and about
31 dB SQNR on Gaussian data whatever the scaling. What scaling decides is how much worse it gets when a few
channels are much larger than the rest (the outliers of LLM activations): those set the amax of every group
they touch.
"""

from __future__ import annotations

import math

import torch

from .quantize import GRANULARITIES, dequantize_fp8, quantize_fp8


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||ref||^2 / ||ref - approx||^2)`` in dB (float64).

    ``inf`` for an exact match; NaN if ``approx`` has a NaN or infinity where ``reference`` is finite.
    """
    ref = reference.detach().double().cpu()
    out = approx.detach().double().cpu()
    if not torch.isfinite(out[torch.isfinite(ref)]).all():
        return float("nan")
    noise = float(((ref - out) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0:
        return float("inf")
    return 10 * math.log10(signal / noise)


def outlier_activations(m: int, k: int, *, n_outliers: int = 4, factor: float = 100.0, seed: int = 0,
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Gaussian ``[m, k]`` activations whose ``n_outliers`` columns (spread over K) are ``factor`` times larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float32)
    x[:, outlier_columns(k, n_outliers, seed)] *= factor
    return x.to(device=device, dtype=dtype)


def outlier_columns(k: int, n_outliers: int = 4, seed: int = 0) -> torch.Tensor:
    """The columns :func:`outlier_activations` scales up (the same seed gives the same columns)."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(k, generator=g)[:n_outliers]


def quantization_sqnr(t: torch.Tensor, granularity: str, fmt: str = "e4m3",
                      block_size: tuple[int, int] | None = None) -> float:
    """SQNR (dB) of ``dequantize(quantize(t))`` against ``t`` for one granularity."""
    q, s = quantize_fp8(t, fmt, granularity, block_size=block_size)
    return sqnr_db(t, dequantize_fp8(q, s, torch.float32))


def sqnr_report(m: int = 256, k: int = 1024, *, fmt: str = "e4m3", n_outliers: int = 4, factor: float = 100.0,
                device: torch.device | str = "cpu", seed: int = 0) -> list[dict[str, object]]:
    """SQNR per granularity on Gaussian data and on outlier activations, with the noise ratio between them.

    ``noise_ratio`` is the outlier case's relative error over the normal case's (1.0: outliers cost nothing);
    ``inlier_noise_ratio`` the same over the ordinary columns alone (where coarse scales hurt: the outliers set
    the scale of every group they share with them). Block rows are reported for both block shapes.
    """
    normal = outlier_activations(m, k, n_outliers=0, seed=seed, device=device)
    outlier = outlier_activations(m, k, n_outliers=n_outliers, factor=factor, seed=seed, device=device)
    rows = []
    # group scales (128x1) are the 128x128 block's weight-side refinement: not reported on activations
    cases = [(g, None) for g in GRANULARITIES if g not in ("block", "group")] + [("block", (1, 128)),
                                                                                  ("block", (128, 128))]
    for gran, block in cases:
        a = quantization_sqnr(normal, gran, fmt, block)
        q, s = quantize_fp8(outlier, fmt, gran, block_size=block)
        deq = dequantize_fp8(q, s, torch.float32)
        b = sqnr_db(outlier, deq)
        keep = torch.ones(k, dtype=torch.bool)
        keep[outlier_columns(k, n_outliers, seed)] = False
        keep = keep.to(deq.device)
        c = sqnr_db(outlier[:, keep], deq[:, keep])
        label = gran if block is None else f"block {block[0]}x{block[1]}"
        rows.append({"granularity": label, "fmt": fmt, "sqnr_db": a, "sqnr_outliers_db": b,
                     "sqnr_outliers_inliers_db": c, "noise_ratio": 10 ** ((a - b) / 20),
                     "inlier_noise_ratio": 10 ** ((a - c) / 20)})
    return rows


__all__ = ["outlier_activations", "outlier_columns", "quantization_sqnr", "sqnr_db", "sqnr_report"]
