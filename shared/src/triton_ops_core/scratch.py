"""Scratch buffers that kernels keep between calls: one set per (device, stream).

Split-K / stream-K partial sums, arrival counters and grid-barrier words are zero at rest (the program that
consumes them resets them), so a buffer serves every call without a memset launch, and CUDA-graph replays too.
The pattern (fp8-gemm's split-K decode GEMMs, fused-moe's one-launch routing and its down GEMM that adds each
token's expert outputs): every program stores its partial, ``tl.debug_barrier()``, then
``tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")``; the program that sees the last arrival reads the partials
through L2 (``cache_modifier=".cg"``) in a fixed order (deterministic), finishes, and puts the counter back to 0.
Every program must arrive, skipped work included, or the counter stays off zero for the next call.
Two launches on different streams may run at the same time and must not share counters: the buffers are keyed
by the current stream (calls on one stream run one after another).

Kept buffers are for plain eager calls only. A call through the registered op (``torch.compile``, its CUDA graphs)
or under CUDA-graph capture gets buffers of its own, freed after it: torch.compile's CUDA graphs allocate from a
private pool and refuse to record while a tensor made there stays alive without being an output ("tensors in the
cudagraph pool not tracked as outputs", seen on a whole FP8 Llama), and a kept buffer would be one. The price there
is one small memset for the counters per split-K call.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_BUFFERS: dict[tuple, torch.Tensor] = {}
_LOCAL = threading.local()


@contextlib.contextmanager
def per_call() -> Iterator[None]:
    """Inside, :func:`scratch` hands out buffers for this call only (the registered ops' implementations run in it)."""
    depth = getattr(_LOCAL, "per_call", 0)
    _LOCAL.per_call = depth + 1
    try:
        yield
    finally:
        _LOCAL.per_call = depth


def _stream_id(device: torch.device) -> int:
    if device.type != "cuda":
        return 0  # the interpreter runs every launch to completion in order
    return torch._C._cuda_getCurrentRawStream(device.index if device.index is not None else -1)


def kept(device: torch.device) -> bool:
    """Whether :func:`scratch` hands out kept buffers here: a plain eager call (not inside :func:`per_call`, not
    under CUDA-graph capture). Where a kernel's counters would otherwise be a fresh buffer and its memset a graph
    node, a caller may prefer the launches that need no counters (fused-moe's routing does)."""
    if getattr(_LOCAL, "per_call", 0):
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def scratch(name: str, device: torch.device, numel: int, dtype: torch.dtype, zeroed: bool,
            stream: int | None = None) -> torch.Tensor:
    """A buffer of at least ``numel`` elements for ``name`` on ``device`` and the current stream (``stream``
    overrides the stream id, for tests). ``zeroed``: all zero when first made (counters); else uninitialized
    (partials written before they are read)."""
    if not kept(device):
        return (torch.zeros if zeroed else torch.empty)(numel, dtype=dtype, device=device)
    key = (name, device, _stream_id(device) if stream is None else stream, dtype)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        size = max(numel, 2 * buf.numel() if buf is not None else 0, 1024)
        buf = (torch.zeros if zeroed else torch.empty)(size, dtype=dtype, device=device)
        _BUFFERS[key] = buf
    return buf


def clear() -> None:
    """Drop every buffer (the next call allocates fresh ones)."""
    _BUFFERS.clear()
