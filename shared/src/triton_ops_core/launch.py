"""The host side of a kernel launch: call signatures, cached launch plans, and the direct launcher.

Shared by the kernel packages (first written for fused-rmsnorm-rope).

Decode calls these ops with a handful of tokens, where the GPU work takes a few microseconds and the host decides the
latency. A call is therefore keyed by the metadata its validation and launch depend on (shapes, strides, dtypes,
devices, 16-byte alignment of the data pointers, the options): the first call with a key validates and builds a
``Plan`` (every scalar argument and constexpr of the kernel, precomputed); later calls with the same key skip both,
since the same metadata would validate the same way. After the first compiled launch, the plan keeps Triton's
``CompiledKernel`` launcher and calls it directly, bypassing the JIT's per-call argument binding and specialization
(the key already fixes everything Triton specializes on: pointer alignment, and the integers, which derive from
shapes and strides).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from triton.compiler import CompiledKernel

try:
    from triton import knobs as _knobs

    _RUNTIME_KNOBS: Any = _knobs.runtime
except ImportError:  # a Triton without knobs: no launch hooks to honour, and the runner below is never bypassed
    _RUNTIME_KNOBS = None
# The current device's raw CUDA stream, from two C calls: what Triton's runner looks up through its driver proxy
# and ``torch.cuda.current_device`` (a Python function) on every launch. None in a CPU-only torch.
_current_device = getattr(torch._C, "_cuda_getDevice", None)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)

MAX_PLANS = 4096

# TRITON_INTERPRET, read on every call (a key part: whether CPU tensors validate depends on it). ``os.environ.get``
# encodes the key and decodes the value each time (about 10x a tensor attribute read, ~1 us per call on the lent
# hosts); the mapping os.environ keeps underneath, updated by every assignment to os.environ, reads the same value
# without that work. Falls back to os.environ.get where that mapping is not there.
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _INTERPRET_KEY = os.environ.encodekey("TRITON_INTERPRET")  # type: ignore[attr-defined]
except AttributeError:
    _INTERPRET_KEY = None


def interpret_setting() -> Any:
    """The current value of ``TRITON_INTERPRET`` (raw: bytes or str as the platform stores it), or None."""
    if _ENV_DATA is not None and _INTERPRET_KEY is not None:
        return _ENV_DATA.get(_INTERPRET_KEY)
    return os.environ.get("TRITON_INTERPRET")


def tensor_key(t: torch.Tensor) -> tuple:
    """What validation and specialization read from a tensor (raises AttributeError for a non-tensor)."""
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1): block sizes and size buckets (plain integer math:
    ``triton.next_power_of_2`` is a JIT function and costs microseconds per host call)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``, in integer math."""
    return -(-a // b)


_Tensor = torch.Tensor


def call_key(*parts: Any) -> tuple | None:
    """A flat key of a call, or None when an argument is not a tensor or not hashable (validation will say why).

    Includes ``TRITON_INTERPRET``: whether CPU tensors are allowed depends on it.
    """
    key = [interpret_setting()]
    for p in parts:
        if isinstance(p, _Tensor):
            key += (p.shape, p.stride(), p.dtype, p.device, p.data_ptr() % 16)
        else:
            key.append(p)
    return tuple(key)


class Plan:
    """One call signature's launch: kernel, grid, scalar tail of the arguments, warps, and the direct launcher."""

    __slots__ = ("kernel", "grid", "tail", "num_warps", "options", "runner", "direct", "n_rows", "info", "extra",
                 "run", "function", "packed")

    def __init__(self, kernel: Any, grid: tuple[int, ...], tail: tuple, num_warps: int, n_rows: int = 0,
                 info: Any = None, extra: Any = None, **options: Any) -> None:
        # CompiledKernel's launcher reads grid[0], grid[1] and grid[2]: always keep three dimensions
        grid = tuple(grid) + (1,) * (3 - len(grid))
        self.kernel, self.grid, self.tail, self.num_warps = kernel, grid, tail, num_warps
        self.options = options  # further launch options of the JIT call (num_stages, ...)
        self.n_rows, self.info, self.extra = n_rows, info, extra
        self.runner: Callable[..., None] | None = None
        self.direct = True  # False once the direct launcher failed: JIT launches only from then on
        # The compiled kernel's launcher, function handle and packed metadata: what ``runner`` passes on, called
        # without it (Triton 3.6 to 3.9: ``run(gx, gy, gz, stream, function, packed_metadata, launch_metadata,
        # enter_hook, exit_hook, *args)``), skipping the runner's Python lookups of the driver, device and stream
        # on every launch. On the lent H200's host the saving was within the noise of its per-call timing (2026-12-03).
        self.run: Callable[..., None] | None = None
        self.function: Any = None
        self.packed: Any = None

    def launch(self, *tensors: torch.Tensor) -> None:
        """Launch with the tensor arguments (in the kernel's order) followed by the plan's scalar tail."""
        if self.runner is not None:
            try:
                if self.run is not None and _hooks_off():
                    grid = self.grid
                    # Tensors as their addresses: given a tensor, the launcher calls its data_ptr() and asks the
                    # driver whether the address is device memory (cuPointerGetAttribute), per pointer argument and
                    # launch; an int is taken as it is. Each op validated its tensors' devices when it built the
                    # plan, and the key holds every device (a CPU tensor would otherwise reach the kernel: Triton
                    # no longer refuses it). 7.8 -> 5.9 us per launch of eight pointers on the lent H200 host.
                    self.run(grid[0], grid[1], grid[2], _raw_stream(_current_device()), self.function, self.packed,
                             None, None, None, *[t.data_ptr() if type(t) in _TENSOR_TYPES else t for t in tensors],
                             *self.tail)
                else:  # launch hooks set (a profiler such as proton): Triton's runner calls them
                    self.runner(*tensors, *self.tail)
                return
            except (IndexError, TypeError, AttributeError, ValueError):
                # the launcher's calling convention is Triton-internal: if a Triton version changes it, the
                # error is raised before anything is enqueued, so fall back to the JIT path for good
                self.runner = self.run = None
                self.direct = False
        compiled = self.kernel[self.grid](*tensors, *self.tail, num_warps=self.num_warps, **self.options)
        if self.direct and isinstance(compiled, CompiledKernel):
            self.runner = compiled[self.grid]  # also loads the module: ``run`` and ``function`` exist from here
            if _raw_stream is not None and _RUNTIME_KNOBS is not None:
                self.run = getattr(compiled, "run", None)
                self.function = getattr(compiled, "function", None)
                self.packed = getattr(compiled, "packed_metadata", None)


_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _hooks_off() -> bool:
    """No launch enter or exit hook is set in Triton's runtime knobs (so no launch metadata is needed)."""
    return _RUNTIME_KNOBS.launch_enter_hook is None and _RUNTIME_KNOBS.launch_exit_hook is None


# Bumped by invalidate_plans(): every PlanCache drops its plans on its next lookup. For settings a plan bakes in
# that are not part of a call's key (whether launches use PDL: triton_ops_core.pdl.override).
_generation = 0


def invalidate_plans() -> None:
    """Every :class:`PlanCache` forgets its plans (on its next lookup): the next calls are planned anew."""
    global _generation
    _generation += 1


class PlanCache:
    """A bounded dict of plans (cleared when full: shapes in a serving loop repeat, so it refills at once, and by
    :func:`invalidate_plans`)."""

    def __init__(self) -> None:
        self._plans: dict[tuple, Any] = {}
        self._generation = _generation

    def get(self, key: tuple) -> Any:
        if self._generation != _generation:
            self._plans.clear()
            self._generation = _generation
        try:
            return self._plans.get(key)
        except TypeError:  # an unhashable argument: validation rejects it
            return None

    def put(self, key: tuple, plan: Any) -> Any:
        if len(self._plans) >= MAX_PLANS or self._generation != _generation:
            self._plans.clear()
            self._generation = _generation
        self._plans[key] = plan
        return plan

    def clear(self) -> None:
        self._plans.clear()


__all__ = ["MAX_PLANS", "Plan", "PlanCache", "call_key", "cdiv", "interpret_setting", "invalidate_plans", "next_pow2",
           "tensor_key"]
