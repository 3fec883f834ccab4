"""Relative error of a result against its reference, on the device the tensors live on.

The same rule as ``triton_ops_core.testing.relative_error`` (``||out - ref|| / ||ref||`` over the reference's finite
entries, NaN when NaN/Inf positions disagree), computed in float64 chunks where the tensors are, so a 1 GiB GPU
output is never copied to the host.
"""

from __future__ import annotations

import math

import torch
from triton_ops_core.testing import relative_error as _host_relative_error

_CHUNK = 2**24


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.device.type == "cpu" and ref.device.type == "cpu":
        return _host_relative_error(out, ref)
    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"shape {list(out.shape)} differs from reference {list(ref.shape)}")
    o = out.detach().reshape(-1)
    r = ref.detach().reshape(-1).to(o.device)
    diff2 = torch.zeros((), dtype=torch.float64, device=o.device)
    norm2 = torch.zeros((), dtype=torch.float64, device=o.device)
    bad = torch.zeros((), dtype=torch.bool, device=o.device)
    for start in range(0, o.numel(), _CHUNK):
        oc = o[start:start + _CHUNK].to(torch.float64)
        rc = r[start:start + _CHUNK].to(torch.float64)
        finite = torch.isfinite(rc)
        # NaN where the reference has none (or the reverse), infinities that differ, non-finite where ref is finite
        bad |= (torch.isnan(oc) != torch.isnan(rc)).any()
        bad |= ((~finite & ~torch.isnan(rc)) & (oc != rc)).any()
        bad |= (finite & ~torch.isfinite(oc)).any()
        d = torch.where(finite, oc - rc, 0.0)
        diff2 += (d * d).sum()
        norm2 += torch.where(finite, rc * rc, 0.0).sum()
    if bool(bad):
        return float("nan")
    diff, norm = math.sqrt(float(diff2)), math.sqrt(float(norm2))
    return diff if norm == 0 else diff / norm
