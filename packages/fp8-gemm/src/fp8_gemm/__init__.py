"""fp8_gemm: FP8 quantization (tensor, row, channel, block and group scales), the FP8 GEMM and FP8Linear, in Triton.

Recipes (what ``convert_to_fp8`` converts, and how): :mod:`fp8_gemm.recipes`; a PyTorch emulation for accuracy
measurements: :mod:`fp8_gemm.emulate`; the weight-only (W8A16) decode path that ``FP8Linear`` takes for at most
``WEIGHT_ONLY_MAX_M`` rows: :mod:`fp8_gemm.weight_only`; the same kernel for 16-bit weights, a decode step's GEMM
without FP8: :func:`decode_linear`.
"""

from .__about__ import __version__
from .accuracy import outlier_activations, quantization_sqnr, sqnr_db, sqnr_report
from .decode_linear import decode_linear, decode_linear_add_
from .gated import fp8_gated_linear, gated_reference, quantize_gated_fp8
from .gemm import clear_caches, fp8_gemm
from .gemm_configs import FP8_GEMM_CONFIGS, FP8_GEMM_DECODE_CONFIGS, FP8_GEMM_PTR_CONFIGS
from .linear import FP8Linear, TrainableFP8Linear, convert_to_fp8, fp8_linear, fp8_linear_add_
from .quantize import (
    ACTIVATION_BLOCK,
    GRANULARITIES,
    WEIGHT_BLOCK,
    WEIGHT_GROUP,
    dequantize_fp8,
    expand_scale,
    fp8_max,
    quantize_fp8,
    scale_shape,
)
from .recipes import RECIPES, FP8Recipe
from .scaling import DelayedScaler, ScaleTracker
from .weight_only import WEIGHT_ONLY_MAX_M

__all__ = [
    "ACTIVATION_BLOCK",
    "FP8_GEMM_CONFIGS",
    "FP8_GEMM_DECODE_CONFIGS",
    "FP8_GEMM_PTR_CONFIGS",
    "GRANULARITIES",
    "RECIPES",
    "WEIGHT_BLOCK",
    "WEIGHT_GROUP",
    "WEIGHT_ONLY_MAX_M",
    "DelayedScaler",
    "FP8Linear",
    "FP8Recipe",
    "ScaleTracker",
    "TrainableFP8Linear",
    "__version__",
    "clear_caches",
    "convert_to_fp8",
    "decode_linear",
    "decode_linear_add_",
    "dequantize_fp8",
    "expand_scale",
    "fp8_gated_linear",
    "fp8_gemm",
    "fp8_linear",
    "fp8_linear_add_",
    "fp8_max",
    "gated_reference",
    "outlier_activations",
    "quantization_sqnr",
    "quantize_fp8",
    "quantize_gated_fp8",
    "scale_shape",
    "sqnr_db",
    "sqnr_report",
]
