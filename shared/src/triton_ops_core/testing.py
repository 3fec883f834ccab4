"""Helpers for tests and benchmarks: references compared by relative error, NaN never passing, poisoned outputs.

Free of pytest so benchmarks can use them too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .device import has_gpu, is_interpreter

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


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


def _bits(t: object) -> object:
    # FP8 tensors compared by their bytes: torch has no arithmetic (hence no allclose) on them
    if isinstance(t, torch.Tensor):
        return t.detach().clone().view(torch.uint8) if t.dtype in _FP8 else t.detach().clone()
    return t


def opcheck_op(op: torch._ops.OpOverload, args: Sequence[object]) -> None:
    """``torch.library.opcheck`` of ``op`` on ``args``; inputs holding FP8 tensors skip its schema test.

    The schema test compares every input before and after the call with ``torch.allclose``, which torch does not
    implement for FP8; for those, the inputs are compared bit for bit here instead (an op that mutates an input
    its schema does not declare fails either way).
    """
    has_fp8 = any(isinstance(a, torch.Tensor) and a.dtype in _FP8 for a in args)
    if not has_fp8:
        torch.library.opcheck(op, tuple(args))
        return
    before = [_bits(a) for a in args]
    torch.library.opcheck(op, tuple(args),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    op(*args)
    for i, (a, b) in enumerate(zip(args, before)):
        if isinstance(a, torch.Tensor) and not torch.equal(_bits(a), b):
            raise AssertionError(f"{op}: input {i} changed, but the schema declares no mutation")


@contextlib.contextmanager
def count_compiles() -> Iterator[dict[str, int]]:
    """Count the frames ``torch.compile`` compiles inside the block: ``{"frames": n}`` once the block ends.

    A function compiled once and then called with new sizes without recompiling counts 1.
    """
    from torch._dynamo.utils import counters

    start = counters["stats"]["unique_graphs"]
    result = {"frames": 0}
    try:
        yield result
    finally:
        result["frames"] = counters["stats"]["unique_graphs"] - start


__all__ = ["assert_close_rel", "count_compiles", "device_for_tests", "opcheck_op", "poison_", "relative_error"]
