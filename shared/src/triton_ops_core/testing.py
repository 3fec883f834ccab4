"""Helpers for tests and benchmarks: references compared by relative error, NaN never passing, poisoned outputs.

Free of pytest so benchmarks can use them too.
"""

from __future__ import annotations

import torch

from .device import has_gpu, is_interpreter


def device_for_tests() -> torch.device:
    """The device tests run kernels on: CUDA when a GPU is used, else the CPU (under the interpreter)."""
    return torch.device("cuda") if has_gpu() and not is_interpreter() else torch.device("cpu")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 over finite reference entries; NaN where ``out`` has NaN/Inf that
    ``ref`` lacks (or lacks NaN/Inf that ``ref`` has), so a comparison with a tolerance always fails then."""
    out64 = out.detach().to(torch.float64).cpu()
    ref64 = ref.detach().to(torch.float64).cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {list(out64.shape)} differs from reference {list(ref64.shape)}")
    finite = torch.isfinite(ref64)
    same_special = torch.equal(torch.isnan(out64), torch.isnan(ref64)) and torch.equal(
        out64[~finite & ~torch.isnan(ref64)], ref64[~finite & ~torch.isnan(ref64)]
    )
    if not same_special or not torch.isfinite(out64[finite]).all():
        return float("nan")
    diff = torch.linalg.vector_norm(out64[finite] - ref64[finite])
    norm = torch.linalg.vector_norm(ref64[finite])
    if norm == 0:
        return float(diff)
    return float(diff / norm)


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> float:
    """Assert ``relative_error(out, ref) <= tol`` (NaN fails); returns the error."""
    err = relative_error(out, ref)
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3e} exceeds {tol:.1e}")
    return err


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with NaN (floats) or an extreme value, so unwritten elements are caught."""
    if t.dtype.is_floating_point:
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            t.view(torch.uint8).fill_(0x7F)  # NaN in both FP8 formats
            return t
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)


__all__ = ["assert_close_rel", "poison_", "relative_error", "device_for_tests"]
