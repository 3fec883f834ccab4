"""Every documented name is importable from ``triton_ops`` and is the object its package defines."""

from __future__ import annotations

import importlib

import pytest
import triton_ops

DOCUMENTED = {
    "fused_rmsnorm_rope": "fused_rmsnorm_rope",
    "fused_qk_norm_rope": "fused_rmsnorm_rope",
    "FusedRMSNormRoPE": "fused_rmsnorm_rope",
    "RMSNorm": "fused_rmsnorm_rope",
    "FusedAddRMSNorm": "fused_rmsnorm_rope",
    "rmsnorm": "fused_rmsnorm_rope",
    "fused_add_rmsnorm": "fused_rmsnorm_rope",
    "patch_model": "triton_ops.models",
    "RMSNORM_ROPE_CONFIGS": "fused_rmsnorm_rope",
    "fused_gated_mlp": "fused_gated_mlp",
    "FusedGatedMLP": "fused_gated_mlp",
    "GATED_MLP_CONFIGS": "fused_gated_mlp",
    "fp8_gemm": "fp8_gemm",
    "quantize_fp8": "fp8_gemm",
    "dequantize_fp8": "fp8_gemm",
    "FP8Linear": "fp8_gemm",
    "fp8_linear": "fp8_gemm",
    "TrainableFP8Linear": "fp8_gemm",
    "convert_to_fp8": "fp8_gemm",
    "TritonAutoTuner": "kernel_autotune",
    "BenchmarkSuite": "triton_ops.benchmark",
}
EXCEPTIONS = ["TritonKernelError", "ShapeMismatchError", "UnsupportedDtypeError", "DeviceMismatchError",
              "UnsupportedDeviceError", "LayoutError", "InvalidArgumentError",
              "NumericalOverflowError"]
MODELS = ["TensorSpec", "KernelMetrics", "TrialResult", "TuningResult", "FP8Format"]


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_documented_name_is_the_packages_object(name: str) -> None:
    obj = getattr(triton_ops, name)
    assert obj is not None
    home = importlib.import_module(DOCUMENTED[name])
    if hasattr(home, name):  # the same object, not a copy or a wrapper
        assert getattr(home, name) is obj
    assert name in triton_ops.__all__


def test_config_spaces_list_configs() -> None:
    for name in ("RMSNORM_ROPE_CONFIGS", "GATED_MLP_CONFIGS", "FP8_GEMM_CONFIGS"):
        space = getattr(triton_ops, name)
        configs = space.configs() if hasattr(space, "configs") else list(space)
        assert configs, f"{name} lists no config"
        assert all(isinstance(c, dict) for c in configs)


@pytest.mark.parametrize("name", EXCEPTIONS)
def test_shared_exceptions(name: str) -> None:
    import triton_ops_core

    exc = getattr(triton_ops, name)
    assert exc is getattr(triton_ops_core, name)
    assert issubclass(exc, triton_ops.TritonKernelError)


@pytest.mark.parametrize("name", MODELS)
def test_shared_models(name: str) -> None:
    import triton_ops_core

    assert getattr(triton_ops, name) is getattr(triton_ops_core, name)


def test_star_import_matches_all() -> None:
    ns: dict = {}
    exec("from triton_ops import *", ns)
    missing = [n for n in triton_ops.__all__ if n not in ns]
    assert not missing
    assert isinstance(triton_ops.__version__, str) and triton_ops.__version__.count(".") >= 2


def test_every_public_op_is_registered_in_one_namespace() -> None:
    import torch

    for name in triton_ops.REGISTERED_OPS:
        op = getattr(torch.ops.triton_ops, name).default
        assert isinstance(op, torch._ops.OpOverload) and op.namespace == "triton_ops", name
    # and the list is complete: every op the packages registered in the namespace is on it
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("triton_ops::")}
    assert registered == set(triton_ops.REGISTERED_OPS), registered ^ set(triton_ops.REGISTERED_OPS)
