"""Bad input, fuzzed: each tensor argument of every op spoiled one way (dtype, shape, layout, device, type), and
NaN/Inf and out-of-range positions: always a named error or a documented result, never a crash."""

from __future__ import annotations

import torch
from _rope_helpers import DEVICE
from fused_rmsnorm_rope import fused_add_rmsnorm, fused_qk_norm_rope, fused_rmsnorm_rope, rmsnorm
from hypothesis import given
from hypothesis import strategies as st
from triton_ops_core.testing import TENSOR_MUTATIONS, mutate, named_error_or_result


def _rope_call():
    x = torch.randn(2, 3, 32, device=DEVICE)
    args = [x, torch.randn(32, device=DEVICE), torch.randn(3, 16, device=DEVICE), torch.randn(3, 16, device=DEVICE)]
    return fused_rmsnorm_rope, args, {"head_dim": 16}


def _qk_call():
    q, k = torch.randn(1, 3, 4, 16, device=DEVICE), torch.randn(1, 3, 2, 16, device=DEVICE)
    w, cos, sin = torch.randn(16, device=DEVICE), torch.randn(3, 16, device=DEVICE), torch.randn(3, 16, device=DEVICE)
    return fused_qk_norm_rope, [q, k, w, w.clone(), cos, sin], {}


def _norm_call():
    return rmsnorm, [torch.randn(3, 40, device=DEVICE), torch.randn(40, device=DEVICE)], {}


def _add_norm_call():
    x = torch.randn(3, 40, device=DEVICE)
    return fused_add_rmsnorm, [x, torch.randn_like(x), torch.randn(40, device=DEVICE)], {}


CALLS = {"fused_rmsnorm_rope": _rope_call, "fused_qk_norm_rope": _qk_call, "rmsnorm": _norm_call,
         "fused_add_rmsnorm": _add_norm_call}


@given(op=st.sampled_from(sorted(CALLS)), which=st.integers(0, 5), how=st.sampled_from(TENSOR_MUTATIONS))
def test_a_spoiled_argument_is_a_named_error_or_a_result(op, which, how):
    fn, args, kwargs = CALLS[op]()
    which %= len(args)
    args[which] = mutate(args[which], how)
    named_error_or_result(fn, *args, **kwargs)


@given(op=st.sampled_from(sorted(CALLS)), value=st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_nan_and_inf_inputs_give_results_not_crashes(op, value):
    fn, args, kwargs = CALLS[op]()
    args[0].view(-1)[1] = value
    out = fn(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == args[0].shape and not torch.isfinite(out.reshape(out.shape[0], -1)[0]).all()


@given(bad=st.sampled_from([-1, 3, 10**6, -(10**9)]), dtype=st.sampled_from([torch.int32, torch.int64]))
def test_out_of_range_positions_poison_their_token_only(bad, dtype):
    x = torch.randn(1, 4, 32, device=DEVICE)
    cos, sin = torch.randn(3, 16, device=DEVICE), torch.randn(3, 16, device=DEVICE)
    pos = torch.tensor([[0, 1, bad, 2]], device=DEVICE, dtype=dtype)
    out = fused_rmsnorm_rope(x, torch.randn(32, device=DEVICE), cos, sin, position_ids=pos, head_dim=16)
    assert out[0, 2].isnan().any() and torch.isfinite(out[0, [0, 1, 3]]).all()  # documented: NaN, no OOB read
