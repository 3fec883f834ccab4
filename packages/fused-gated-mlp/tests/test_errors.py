"""Bad input raises the shared exceptions, naming the argument."""

from __future__ import annotations

import pytest
import torch
from fused_gated_mlp import FusedGatedMLP, fused_gated_mlp
from triton_ops_core.exceptions import (
    DeviceMismatchError,
    InvalidArgumentError,
    LayoutError,
    ShapeMismatchError,
    UnsupportedDeviceError,
    UnsupportedDtypeError,
)


@pytest.fixture
def ops_in(device):
    x = torch.randn(4, 16, device=device, dtype=torch.float16)
    w = torch.randn(8, 16, device=device, dtype=torch.float16)
    return x, w, w.clone()


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_shape_mismatches(ops_in):
    x, wg, wu = ops_in
    _raises(ShapeMismatchError, "gate_weight", fused_gated_mlp, x, wg[:, :8], wu)
    _raises(ShapeMismatchError, "up_weight", fused_gated_mlp, x, wg, wu[:4])
    _raises(ShapeMismatchError, "up_weight", fused_gated_mlp, x, wg, wu[:, :8])
    _raises(ShapeMismatchError, "gate_weight", fused_gated_mlp, x, wg[0], wu)
    _raises(ShapeMismatchError, "x", fused_gated_mlp, x[:, :0], wg[:, :0], wu[:, :0])
    _raises(ShapeMismatchError, "gate_bias", fused_gated_mlp, x, wg, wu, gate_bias=torch.zeros(7, device=x.device))
    _raises(ShapeMismatchError, "up_bias", fused_gated_mlp, x, wg, wu, up_bias=torch.zeros(9, device=x.device))
    _raises(ShapeMismatchError, "gate_weight", fused_gated_mlp, x, wg[:7], weight_layout="interleaved")
    _raises(ShapeMismatchError, "gate_bias", fused_gated_mlp, x, wg, gate_bias=torch.zeros(4, device=x.device),
            weight_layout="concatenated")


def test_dtype_mismatches(ops_in):
    x, wg, wu = ops_in
    _raises(UnsupportedDtypeError, "up_weight", fused_gated_mlp, x, wg, wu.float())
    _raises(UnsupportedDtypeError, "gate_weight", fused_gated_mlp, x, wg.bfloat16(), wu.bfloat16())
    _raises(UnsupportedDtypeError, "x", fused_gated_mlp, x.to(torch.int32), wg, wu)
    _raises(UnsupportedDtypeError, "gate_bias", fused_gated_mlp, x, wg, wu,
            gate_bias=torch.zeros(8, dtype=torch.int64, device=x.device))


def test_bad_options(ops_in):
    x, wg, wu = ops_in
    _raises(InvalidArgumentError, "activation", fused_gated_mlp, x, wg, wu, "relu")
    _raises(InvalidArgumentError, "weight_layout", fused_gated_mlp, x, wg, wu, weight_layout="stacked")
    _raises(InvalidArgumentError, "up_weight", fused_gated_mlp, x, torch.cat([wg, wu]), wu,
            weight_layout="concatenated")
    _raises(InvalidArgumentError, "up_bias", fused_gated_mlp, x, torch.cat([wg, wu]), None,
            up_bias=torch.zeros(8, device=x.device), weight_layout="concatenated")
    _raises(InvalidArgumentError, "up_weight", fused_gated_mlp, x, wg, None)
    _raises(InvalidArgumentError, "x", fused_gated_mlp, x.tolist(), wg, wu)
    _raises(InvalidArgumentError, "limit", fused_gated_mlp, x, wg, wu, "swiglu_oai", limit=0.0)
    _raises(InvalidArgumentError, "alpha", fused_gated_mlp, x, wg, wu, "swiglu_oai", alpha=float("nan"))


def test_layout_and_device(ops_in):
    x, wg, wu = ops_in
    _raises(LayoutError, "x", fused_gated_mlp, torch.cat([x, x], dim=1)[:, ::2], wg, wu)
    _raises(LayoutError, "up_weight", fused_gated_mlp, x, wg, wu.t().contiguous().t())
    _raises(DeviceMismatchError, "gate_weight", fused_gated_mlp, x, wg.to("meta"), wu)
    _raises(DeviceMismatchError, "gate_bias", fused_gated_mlp, x, wg, wu, gate_bias=torch.zeros(8, device="meta"))
    _raises(UnsupportedDeviceError, "x", fused_gated_mlp, x.to("meta"), wg.to("meta"), wu.to("meta"))


def test_module_arguments():
    _raises(InvalidArgumentError, "hidden_dim", FusedGatedMLP, 0, 8)
    _raises(InvalidArgumentError, "intermediate_dim", FusedGatedMLP, 8, 2.5)
    _raises(InvalidArgumentError, "activation", FusedGatedMLP, 8, 8, "tanh")
    lin = torch.nn.Linear(8, 4)
    _raises(ShapeMismatchError, "up_proj", FusedGatedMLP.from_linear, lin, torch.nn.Linear(8, 5))
    _raises(InvalidArgumentError, "up_proj", FusedGatedMLP.from_linear, lin, torch.nn.Linear(8, 4, bias=False))
    _raises(InvalidArgumentError, "gate_proj", FusedGatedMLP.from_linear, torch.nn.Conv1d(8, 4, 1), lin)
