"""Bad input, fuzzed: each tensor argument of fused_gated_mlp (separate and packed layouts) spoiled one way (dtype,
shape, layout, device, type), and NaN/Inf inputs: always a named error or a documented result, never a crash."""

from __future__ import annotations

import torch
from fused_gated_mlp import fused_gated_mlp
from hypothesis import given
from hypothesis import strategies as st
from triton_ops_core.testing import TENSOR_MUTATIONS, device_for_tests, mutate, named_error_or_result

DEVICE = device_for_tests()  # a module constant: hypothesis runs each example without re-entering fixtures


def _call(device, packed: bool):
    x = torch.randn(3, 32, device=DEVICE)
    if packed:
        return [x, torch.randn(32, 32, device=DEVICE) / 6, None], {"gate_bias": torch.randn(32, device=DEVICE),
                                                                   "weight_layout": "interleaved",
                                                                   "activation": "swiglu_oai"}
    return [x, torch.randn(16, 32, device=DEVICE) / 6, torch.randn(16, 32, device=DEVICE) / 6], {}


@given(packed=st.booleans(), which=st.integers(0, 3), how=st.sampled_from(TENSOR_MUTATIONS))
def test_a_spoiled_argument_is_a_named_error_or_a_result(packed, which, how):
    args, kwargs = _call(DEVICE, packed)
    if which == 3 and packed:
        kwargs["gate_bias"] = mutate(kwargs["gate_bias"], how)
    elif args[which % 3] is not None:
        args[which % 3] = mutate(args[which % 3], how)
    named_error_or_result(fused_gated_mlp, *args, **kwargs)


@given(packed=st.booleans(), value=st.sampled_from([float("nan"), float("inf")]))
def test_nan_and_inf_reach_their_row_only(packed, value):
    args, kwargs = _call(DEVICE, packed)
    args[0][1, 5] = value
    out = fused_gated_mlp(*args, **kwargs)
    assert not torch.isfinite(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
