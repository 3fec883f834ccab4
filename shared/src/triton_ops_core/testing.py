"""Helpers for tests and benchmarks: references compared by relative error, NaN never passing, poisoned outputs.

Free of pytest so benchmarks can use them too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import triton
import triton.language as tl

from .device import has_gpu, is_interpreter
from .rms_prologue import normalized, row_rstd

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
    its schema does not declare fails either way; a declared one, ``Tensor(a!)``, may change).
    """
    has_fp8 = any(isinstance(a, torch.Tensor) and a.dtype in _FP8 for a in args)
    if not has_fp8:
        torch.library.opcheck(op, tuple(args))
        return
    before = [_bits(a) for a in args]
    torch.library.opcheck(op, tuple(args),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    op(*args)
    schema_args = op._schema.arguments
    for i, (a, b) in enumerate(zip(args, before)):
        alias = schema_args[i].alias_info if i < len(schema_args) else None
        if alias is not None and alias.is_write:  # a declared mutation
            continue
        if isinstance(a, torch.Tensor) and not torch.equal(_bits(a), b):
            raise AssertionError(f"{op}: input {i} changed, but the schema declares no mutation")


def assert_compiled_in_place_add(add_: Callable[[torch.Tensor, torch.Tensor], object], residual: torch.Tensor,
                                 x: torch.Tensor) -> None:
    """``add_(residual, x)`` (an op mutating ``residual``) inside a ``torch.compile``'d step (``fullgraph``,
    ``aot_eager``) that also reads the mutated tensor afterwards: same result, same mutation as eager."""

    def step(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        add_(r, x)
        return r * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        a, b = residual.clone(), residual.clone()
        assert torch.equal(compiled(a, x), step(b, x)) and torch.equal(a, b)


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


# How the fuzz tests spoil one tensor argument of a valid call.
TENSOR_MUTATIONS = ("int32", "float64", "bool", "shorter_last_dim", "strided_last_dim", "meta", "list", "zero_dim",
                    "extra_dim", "empty_first_dim")


def mutate(t: torch.Tensor, how: str) -> object:
    """``t`` spoiled one way (see ``TENSOR_MUTATIONS``): a wrong dtype, shape, layout, device or type."""
    if how == "int32":
        return torch.ones(t.shape, dtype=torch.int32, device=t.device)
    if how == "float64":
        return t.double()
    if how == "bool":
        return t != 0
    if how == "shorter_last_dim":
        return t[..., : max(t.shape[-1] - 1, 0)] if t.dim() else t
    if how == "strided_last_dim":
        return torch.stack([t, t], dim=-1)[..., 0] if t.dim() else t  # last stride 2
    if how == "meta":
        return t.to("meta")
    if how == "list":
        return t.tolist()
    if how == "zero_dim":
        return t.reshape(-1)[0] if t.numel() else torch.tensor(0.0, device=t.device)
    if how == "extra_dim":
        return t.unsqueeze(0).expand(2, *t.shape)
    if how == "empty_first_dim":
        return t[:0] if t.dim() else t
    raise ValueError(f"how: unknown mutation {how!r}")


def named_error_or_result(fn, *args, **kwargs) -> object:
    """Call ``fn``: a ``TritonKernelError`` (a named error of ours) returns None, a result returns it, and any other
    exception (a Triton compile error, an IndexError, a CUDA error...) fails the caller's test."""
    from .exceptions import TritonKernelError

    try:
        return fn(*args, **kwargs)
    except TritonKernelError:
        return None
    except Exception as err:  # noqa: BLE001 - exactly what must not happen
        raise AssertionError(f"{type(err).__name__} escaped instead of a named error: {err}") from err


@triton.jit
def _normalize_rows_kernel(x_ptr, w_ptr, out_ptr, K, eps, BLOCK_K: tl.constexpr, NORM_BLOCK: tl.constexpr):
    row = tl.program_id(0)
    rstd = row_rstd(x_ptr, row + tl.arange(0, 1), row + 1, K, K, 1, eps, 1, NORM_BLOCK)
    kk = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + row * K + kk[None, :], mask=(kk < K)[None, :], other=0.0)
    tl.store(out_ptr + row * K + kk[None, :], normalized(x, rstd[:, None], w_ptr, kk[None, :], K),
             mask=(kk < K)[None, :])


def normalized_like_the_prologue(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x``'s rows RMS-normalized by a launch of :mod:`triton_ops_core.rms_prologue`'s own helpers, one row a
    program: what an op's RMSNorm prologue must feed its GEMM (on the GPU the RMSNorm kernel's arithmetic, correctly
    rounded; under the interpreter its emulation of ``div_rn`` / ``sqrt_rn``, an fp32 ulp off now and then, for the
    prologue and the RMSNorm kernel alike). For tests of ops with ``norm_weight=``."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty_like(x2)
    k = x2.shape[1]
    _normalize_rows_kernel[(x2.shape[0],)](x2, weight, out, k, eps, triton.next_power_of_2(k), 64)
    return out.reshape(x.shape)


__all__ = [
    "normalized_like_the_prologue",
    "TENSOR_MUTATIONS",
    "assert_close_rel",
    "count_compiles",
    "device_for_tests",
    "mutate",
    "named_error_or_result",
    "opcheck_op",
    "poison_",
    "relative_error",
]
