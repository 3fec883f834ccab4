"""Programmatic dependent launch (PDL): a decode step's next kernel starts while the previous one finishes.

A decode step is a chain of short kernels (norm, projections, attention, MLP), each a few microseconds; between two
of them the GPU idles for the launch and for the next kernel's first weight loads. With PDL (Hopper and later), a
kernel launched with ``launch_pdl`` may start as soon as every program of the kernel before it has signalled
(``gdc_launch_dependents``); it reads what does not depend on that kernel (its weights) and then waits
(``gdc_wait``, which returns once the previous kernel has completed and its writes are visible) before it reads its
activations or writes anything. Measured on the H200 (session 25, ``benchmarks/dev/pdl_chain.py``: Llama-3-8B's
layer GEMVs and norms chained in a CUDA graph): 1.2 us (bf16) to 1.6 us (FP8) less per kernel with the first weight
tiles prefetched before the wait, 0.5-0.7 us with the wait at the start.

The rules every kernel that takes ``PDL`` follows:

- ``pdl_launch_dependents(PDL)`` early (the next kernel's programs then only wait in ``gdc_wait``);
- before ``pdl_wait(PDL)``: loads of weights only (parameters no kernel of the step writes), address arithmetic and
  L2 prefetches; never an activation, a cache, a mask, a position, or a store. Two exceptions read what was written
  before the previous kernel started, which is complete where every trigger follows its kernel's own wait
  (:func:`sees_two_back`): decode-attention's ``EARLY`` mask pass (the mask is written before the decoder layers
  run) and fused-moe's down GEMM finding its tile's expert (written before the gate/up GEMM ran) to prefetch its
  weights;
- after it, everything else.

A kernel that follows a non-PDL kernel (torch's, cuBLAS) starts when that one completes, as without PDL; a non-PDL
kernel after ours waits for ours to complete. So the rules above are the whole contract. Where ``PDL`` is False (a
GPU before Hopper, the interpreter, PDL not switched on) the calls compile to nothing.

On by default where it measured faster (:data:`ON_BY_DEFAULT`, matched against the device's name: the H100, session
44), off elsewhere (:data:`DEFAULT_ON`) until measured there; ``TRITON_OPS_PDL=1`` / ``0`` or :func:`override`
decide otherwise. With the trigger at the streaming loop's end (:data:`DEFAULT_TRIGGER`), on the lent H100: the
library's decode kernels of 16 Llama-3-8B layers in a CUDA graph 1.4-1.5 % faster than without it
(``benchmarks.dev.pdl_layers``), whole decode steps in a CUDA graph at one row 1-6 % faster (Llama-3-8B FP8
checkpoint 3,606 -> 3,450 us, bf16 6,021 -> 5,962; Qwen3-30B-A3B 4,148 -> 3,902) and within 0.4 % at eight rows;
every GPU test of the library passed with it on (session 44: 2,512). With the trigger at the start (sessions 26-42)
it measured no faster (a mixture of experts' one-token step half again slower): docs/torch-compile.md.

The launch side: :func:`enabled` says whether a device's launches use PDL; a plan built for that device passes
``launch_pdl=True`` with the kernel's ``PDL=True``. :func:`override` switches it for a block (tests, benchmarks)
and invalidates every cached plan (:func:`triton_ops_core.launch.invalidate_plans`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from .device import is_interpreter, sm_count
from .launch import invalidate_plans

try:  # Triton 3.3+ (the oldest we support, 3.6, has it)
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait

    _HAVE_GDC = True
except ImportError:  # pragma: no cover - older Triton: PDL stays off
    _HAVE_GDC = False

ENV = "TRITON_OPS_PDL"
# Where nothing says otherwise (``TRITON_OPS_PDL`` unset), PDL is on for a device whose name contains one of these
# (measured faster there: the module's docstring) and :data:`DEFAULT_ON` for any other capable device (not measured
# there yet: the H200, Blackwell).
ON_BY_DEFAULT = ("H100",)
DEFAULT_ON = False
_override: bool | None = None
# Where a kernel lets the next one launch: "start" (``pdl_launch_dependents``, before its own wait: the next kernel,
# and the one after it, may launch while the previous one still runs), "wait" (inside ``pdl_wait``, once this
# kernel runs: one kernel ahead at most, so the early kernels' L2 prefetches do not pile up) or "end"
# (``pdl_streamed``, once a streaming kernel's main loop is done: the next kernel's programs take the SMs only for
# this one's epilogue and tail; kernels without that call let it launch as they exit). Read once at import
# (``TRITON_OPS_PDL_TRIGGER``; a jitted function's globals are fixed once it compiles); for measurements.
# "end" by default (session 43, H100, PDL on against off in the same runs: the 16-layer decode chain of
# benchmarks.dev.pdl_layers 1.4-1.5 % faster with "end", 1.2-1.6 % slower with "start"; Llama-3-8B's FP8-checkpoint
# decode step at one row, CUDA graph, 3,606 -> 3,450 us with "end").
TRIGGER_ENV = "TRITON_OPS_PDL_TRIGGER"
TRIGGERS = ("start", "wait", "end")
DEFAULT_TRIGGER = "end"


def _trigger_setting() -> str:
    value = os.environ.get(TRIGGER_ENV, "").strip().lower() or DEFAULT_TRIGGER
    if value not in TRIGGERS:
        warnings.warn(f"{TRIGGER_ENV}={value!r} is not one of {TRIGGERS}: using {DEFAULT_TRIGGER!r}", stacklevel=2)
        return DEFAULT_TRIGGER
    return value


TRIGGER = _trigger_setting()
# With the "end" trigger, a kernel without a streaming loop (attention, the KV-cache write, a norm) lets the next
# kernel launch as it exits, so the next one's launch and its first weight loads start only then. With this switch
# such a kernel of a single row (a one-sequence decode step: ``rows`` at most RELEASE_MAX_ROWS) and a grid of one wave
# (at most one program per SM) lets it launch right after its own wait (``release_early``): the next kernel's
# programs take the SMs this one leaves idle, ask L2 for their first weight tiles and wait, as the rules above say.
# A long kernel of many waves keeps its exit trigger (the early programs would take the slots of its later waves: the
# "wait" trigger's loss). Measured on the lent H100 (session 46, bench_model, Llama-3-8B, 1k context, CUDA graph,
# three runs): one row 3,452-3,483 -> 3,380-3,388 us a step with the FP8 checkpoint (-2.0 to -3.0 %), 5,922 -> 5,856
# us in bf16 (-1.1 %); eight rows (released too in that measurement) 4,469-4,470 -> 4,535-4,538 us in two runs of
# three (+1.5 %), 6,692 -> 6,740 in bf16: hence the one-row rule. ``TRITON_OPS_PDL_RELEASE=0`` turns it off (read at
# import).
RELEASE_ENV = "TRITON_OPS_PDL_RELEASE"
RELEASE_SHORT = os.environ.get(RELEASE_ENV, "").strip().lower() not in {"0", "false", "no", "off"}
RELEASE_MAX_ROWS = 1
_TRIGGER_AT_START = tl.constexpr(TRIGGER == "start")
_TRIGGER_AFTER_WAIT = tl.constexpr(TRIGGER == "wait")
_TRIGGER_AT_END = tl.constexpr(TRIGGER == "end")


@triton.jit
def pdl_launch_dependents(PDL: tl.constexpr):
    """Let the next kernel's programs start (they wait in their own ``pdl_wait`` until this kernel completes)."""
    if PDL and _TRIGGER_AT_START:
        _gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the previous kernel has completed and its writes are visible: before any activation is read and
    before anything is written. (With ``TRITON_OPS_PDL_TRIGGER=wait``, the next kernel may launch from here.)"""
    if PDL:
        _gdc_wait()
        if _TRIGGER_AFTER_WAIT:
            _gdc_launch_dependents()


@triton.jit
def pdl_streamed(PDL: tl.constexpr):
    """A streaming kernel's main loop is done (its epilogue follows): with ``TRITON_OPS_PDL_TRIGGER=end``, the next
    kernel may launch from here. Correctness never depends on where: the next kernel still waits for this one to
    complete in its ``pdl_wait``."""
    if PDL and _TRIGGER_AT_END:
        _gdc_launch_dependents()


@triton.jit
def pdl_release(PDL: tl.constexpr, RELEASE: tl.constexpr):
    """After :func:`pdl_wait` in a kernel without a streaming loop: with ``RELEASE`` (the host's
    :func:`release_early` for this launch) and the "end" trigger, the next kernel may launch from here, as this one
    runs instead of as it exits."""
    if PDL and RELEASE and _TRIGGER_AT_END:
        _gdc_launch_dependents()


def release_early(on: bool, programs: int, device: torch.device, rows: int) -> bool:
    """Whether a launch of ``programs`` programs of a kernel without a streaming loop, over ``rows`` rows (tokens of
    a decode step), lets the next kernel launch right after its wait (:func:`pdl_release`): PDL ``on`` for it,
    :data:`RELEASE_SHORT`, the "end" trigger, at most :data:`RELEASE_MAX_ROWS` rows and a grid of one wave (at most
    one program per SM of ``device``)."""
    return bool(on and RELEASE_SHORT and TRIGGER == "end" and 0 < rows <= RELEASE_MAX_ROWS
                and 0 < programs <= sm_count(device, 0))


def sees_two_back(on: bool) -> bool:
    """Whether a kernel launched with PDL ``on`` may read, before its wait, what the kernel before the previous one
    wrote (the rules' other exception: a grouped GEMM's expert ids, written before the GEMM ahead of it ran). With
    the "wait" or "end" trigger every kernel of the library lets the next one launch only after its own wait has
    returned, that is after the kernel before it completed and its writes became visible; with "start" the previous
    kernel may still be waiting when this one starts."""
    return bool(on and TRIGGER != "start")


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines at ``ptrs`` (a tensor of addresses; nothing is returned or waited for): a
    weight tile's first lines fetched before :func:`pdl_wait`, so its first loads after the wait hit L2."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def prefetch_rows(base, rows, n_rows, stride_row, k_start, k_end, LINES: tl.constexpr):
    """L2-prefetch the first ``LINES`` 128-byte lines of each row in ``rows`` (``< n_rows``) of a K-contiguous
    matrix at ``base``, from column ``k_start`` (``< k_end``): a weight tile's first steps, before :func:`pdl_wait`.
    Lines outside the matrix are not asked for (their addresses fall back to ``base``'s first line)."""
    LINE: tl.constexpr = 1024 // base.dtype.element_ty.primitive_bitwidth  # elements per 128-byte line
    cols = k_start + tl.arange(0, LINES) * LINE
    ok = (rows < n_rows)[:, None] & (cols < k_end)[None, :]
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :]
    prefetch_l2(tl.where(ok, ptrs, base))


def _env_setting() -> bool | None:
    """``TRITON_OPS_PDL`` as a switch, or None where it is unset."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    return value not in {"0", "false", "no", "off"}


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def on_by_default(name: str) -> bool:
    """Whether a capable device called ``name`` (``torch.cuda.get_device_name``) uses PDL where nothing says
    otherwise: :data:`ON_BY_DEFAULT` names it, or :data:`DEFAULT_ON`."""
    return DEFAULT_ON or any(known in name for known in ON_BY_DEFAULT)


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` use PDL: a CUDA device of compute capability 9.0 or later (Hopper,
    Blackwell), compiled kernels (not the interpreter), Triton's GDC instructions present, and PDL switched on:
    :func:`override` inside its block, else ``TRITON_OPS_PDL`` (``1`` on, ``0`` off), else :func:`on_by_default`
    for the device's name."""
    if device.type != "cuda" or not _HAVE_GDC or is_interpreter():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not _capable(index):
        return False
    if _override is not None:
        return _override
    setting = _env_setting()
    return on_by_default(_device_name(index)) if setting is None else setting


@contextlib.contextmanager
def override(on: bool) -> Iterator[None]:
    """Launches use PDL (``on``) or not inside the block, on every capable device; cached plans are dropped on entry
    and exit so that the next calls are planned with the setting."""
    global _override
    previous = _override
    _override = bool(on)
    invalidate_plans()
    try:
        yield
    finally:
        _override = previous
        invalidate_plans()


def launch_options(on: bool) -> dict:
    """The JIT launch options of a plan: ``{"launch_pdl": True}`` when ``on``, else none (Triton's default)."""
    return {"launch_pdl": True} if on else {}


__all__ = ["DEFAULT_ON", "DEFAULT_TRIGGER", "ENV", "ON_BY_DEFAULT", "RELEASE_ENV", "RELEASE_MAX_ROWS", "RELEASE_SHORT",
           "TRIGGER", "TRIGGERS", "TRIGGER_ENV", "enabled", "launch_options", "on_by_default", "override",
           "pdl_launch_dependents", "pdl_release", "pdl_streamed", "pdl_wait", "prefetch_l2", "prefetch_rows",
           "release_early", "sees_two_back"]
