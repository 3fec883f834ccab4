"""triton-ops: fused Triton kernels for transformer inference, in one import.

``pip install triton-ops`` installs every package of the family; this module re-exports their documented API:

- RMSNorm + RoPE (``fused-rmsnorm-rope``): ``fused_rmsnorm_rope``, ``fused_qk_norm_rope``, ``apply_rope`` (RoPE
  alone on q and k), ``FusedRMSNormRoPE``
- gated MLP (``fused-gated-mlp``): ``fused_gated_mlp``, ``FusedGatedMLP``
- mixture of experts (``fused-moe``): ``fused_moe``, ``FusedMoE``
- decode attention (``decode-attention``): ``decode_attention`` (and ``triton_ops.models.attention_backend``:
  transformers' attention backend ``"triton_ops"``)
- FP8 (``fp8-gemm``): ``quantize_fp8``, ``dequantize_fp8``, ``fp8_gemm``, ``fp8_linear``, ``FP8Linear``,
  ``convert_to_fp8``
- tuning (``kernel-autotune``): ``TritonAutoTuner`` and the config spaces ``RMSNORM_ROPE_CONFIGS``,
  ``GATED_MLP_CONFIGS``, ``FP8_GEMM_CONFIGS``
- the shared exceptions and data models (``triton-ops-core``)
- ``BenchmarkSuite``: the benchmark suite (``triton_ops.benchmark``)

``patch_model(model)`` puts them into a Hugging Face Llama / Mistral / Qwen2 / Qwen3 model (``triton_ops.models``);
``triton_ops.layers`` holds the forward-only layers it swaps in. ``triton_ops.parallel`` (imported on first use;
``tensor_parallel_plan``, ``parallelize_model``) splits them over GPUs with ``torch.distributed``.

Every op is registered under ``torch.ops.triton_ops`` (``REGISTERED_OPS`` lists them): ``torch.compile``,
CUDA graphs and ``torch.export`` take each as one node.

Without a GPU, set ``TRITON_INTERPRET=1`` before importing to run the kernels on CPU tensors (slowly).
"""

from decode_attention import decode_attention
from fp8_gemm import (
    FP8_GEMM_CONFIGS,
    FP8Linear,
    TrainableFP8Linear,
    convert_to_fp8,
    dequantize_fp8,
    fp8_gemm,
    fp8_linear,
    quantize_fp8,
)
from fused_gated_mlp import GATED_MLP_CONFIGS, FusedGatedMLP, fused_gated_mlp
from fused_moe import FusedMoE, fused_moe
from fused_rmsnorm_rope import (
    RMSNORM_ROPE_CONFIGS,
    FusedAddRMSNorm,
    FusedRMSNormRoPE,
    RMSNorm,
    apply_rope,
    fused_add_rmsnorm,
    fused_qk_norm_rope,
    fused_rmsnorm_rope,
    rmsnorm,
    rmsnorm_add,
    rmsnorm_add_rmsnorm,
)
from kernel_autotune import ConfigSpace, TritonAutoTuner, select_config
from triton_ops_core import (
    DeviceMismatchError,
    FP8Format,
    InvalidArgumentError,
    KernelMetrics,
    LayoutError,
    NumericalOverflowError,
    ShapeMismatchError,
    TensorSpec,
    TrialResult,
    TritonKernelError,
    TuningResult,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
)

from . import layers
from .__about__ import __version__
from .benchmark import BenchmarkSuite
from .models import UnsupportedModelError, patch_model

_PARALLEL = ("tensor_parallel_plan", "parallelize_model")


def __getattr__(name: str):
    # Tensor parallelism (triton_ops.parallel, docs/tensor-parallel.md) imports torch.distributed: on first use only.
    if name == "parallel" or name in _PARALLEL:
        import importlib

        module = importlib.import_module(".parallel", __name__)
        return module if name == "parallel" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The ops the packages above register when imported (the backward ops are what autograd calls).
REGISTERED_OPS = (
    "fused_rmsnorm_rope", "fused_rmsnorm_rope_backward", "fused_qk_norm_rope", "fused_qk_norm_rope_",
    "fused_qk_norm_rope_backward", "rmsnorm", "fused_add_rmsnorm", "fused_add_rmsnorm_",
    "rmsnorm_fp8", "fused_add_rmsnorm_fp8", "fused_add_rmsnorm_fp8_", "rope", "rope_", "rope_backward",
    "rmsnorm_add_rmsnorm", "rmsnorm_add",
    "fused_gated_mlp", "gated_activation", "quantize_fp8", "dequantize_fp8", "fp8_gemm", "fp8_linear",
    "fp8_linear_add_",
    "fp8_linear_add_norm_", "quantize_gated_fp8", "fp8_gated_linear", "decode_linear", "decode_linear_norm_out",
    "decode_linear_add_", "decode_linear_add_norm_",
    "moe_route", "moe_experts", "decode_attention", "kv_cache_write_",
    "kv_cache_append_", "kv_cache_write_rope_", "kv_cache_append_rope_", "kv_cache_shift_",
)

__all__ = [
    "FP8_GEMM_CONFIGS",
    "GATED_MLP_CONFIGS",
    "REGISTERED_OPS",
    "RMSNORM_ROPE_CONFIGS",
    "BenchmarkSuite",
    "UnsupportedModelError",
    "ConfigSpace",
    "DeviceMismatchError",
    "FP8Format",
    "FP8Linear",
    "FusedGatedMLP",
    "FusedMoE",
    "FusedAddRMSNorm",
    "FusedRMSNormRoPE",
    "RMSNorm",
    "InvalidArgumentError",
    "KernelMetrics",
    "LayoutError",
    "NumericalOverflowError",
    "ShapeMismatchError",
    "TensorSpec",
    "TrainableFP8Linear",
    "TrialResult",
    "TritonAutoTuner",
    "TritonKernelError",
    "TuningResult",
    "UnsupportedDeviceError",
    "UnsupportedDtypeError",
    "__version__",
    "apply_rope",
    "convert_to_fp8",
    "decode_attention",
    "dequantize_fp8",
    "fp8_gemm",
    "fp8_linear",
    "fused_add_rmsnorm",
    "fused_gated_mlp",
    "fused_moe",
    "fused_qk_norm_rope",
    "fused_rmsnorm_rope",
    "layers",
    "patch_model",
    "quantize_fp8",
    "rmsnorm",
    "rmsnorm_add",
    "rmsnorm_add_rmsnorm",
    "select_config",
]
