"""The shared gated activations: the PyTorch form against closed forms, and the named errors of ``check_gate_up``."""

from __future__ import annotations

import math

import pytest
import torch
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError, UnsupportedDtypeError
from triton_ops_core.gated_activation import ACTIVATION_CODES, check_gate_up, gated_product
from triton_ops_core.testing import device_for_tests


def test_gated_product_against_closed_forms():
    gate = torch.tensor([-3.0, -0.5, 0.0, 0.7, 2.0, 9.0], dtype=torch.float64)
    up = torch.tensor([1.5, -2.0, 3.0, 0.25, -8.0, 4.0], dtype=torch.float64)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    for activation, fn in {
        "silu": lambda g, u: g * sig(g) * u,
        "gelu": lambda g, u: 0.5 * g * (1 + math.erf(g / math.sqrt(2))) * u,
        "gelu_tanh": lambda g, u: 0.5 * g * (1 + math.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) * u,
        # gpt-oss: gate clamped above at 7, up to [-7, 7], sigmoid(1.702 gate), (up + 1)
        "swiglu_oai": lambda g, u: min(g, 7.0) * sig(1.702 * min(g, 7.0)) * (max(-7.0, min(u, 7.0)) + 1),
    }.items():
        want = torch.tensor([fn(g, u) for g, u in zip(gate.tolist(), up.tolist())], dtype=torch.float64)
        torch.testing.assert_close(gated_product(gate, up, activation), want, rtol=1e-12, atol=1e-12)
    assert set(ACTIVATION_CODES) == {"silu", "gelu", "gelu_tanh", "swiglu_oai"}


def test_check_gate_up_names_each_problem():
    gate, up = torch.randn(4, 8, device=device_for_tests()), torch.randn(4, 8, device=device_for_tests())
    check_gate_up(gate, up, "silu")
    with pytest.raises(ShapeMismatchError, match="up"):
        check_gate_up(gate, up[:, :4], "silu")
    with pytest.raises(UnsupportedDtypeError, match="up"):
        check_gate_up(gate, up.double(), "silu")
    with pytest.raises(UnsupportedDtypeError, match="gate"):
        check_gate_up(gate.int(), up.int(), "silu")
    with pytest.raises(InvalidArgumentError, match="activation"):
        check_gate_up(gate, up, "relu")
    with pytest.raises(Exception, match="gate"):
        check_gate_up("gate", up, "silu")
