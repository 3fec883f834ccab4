"""Scratch buffers that kernels keep between calls: one set per (device, stream), and per CUDA graph captured.

Split-K / stream-K partial sums, arrival counters and grid-barrier words are zero at rest (the program that
consumes them resets them), so a buffer serves every call without a memset launch, and CUDA-graph replays too.
The pattern (fp8-gemm's split-K decode GEMMs, fused-moe's one-launch routing and its down GEMM that adds each
token's expert outputs): every program stores its partial, ``tl.debug_barrier()``, then
``tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")``; the program that sees the last arrival reads the partials
through L2 (``cache_modifier=".cg"``) in a fixed order (deterministic), finishes, and puts the counter back to 0.
Every program must arrive, skipped work included, or the counter stays off zero for the next call.
Two launches on different streams may run at the same time and must not share counters: the buffers are keyed
by the current stream (calls on one stream run one after another).

Kept buffers serve plain eager calls and, inside :func:`keep_on` (or with :data:`KEEP_IN_CAPTURES` where torch names
the capturing graph), calls captured into a CUDA graph by hand (``torch.cuda.graph``, as a serving loop or
``benchmarks.bench_model`` does). A capture keeps its own buffers on the graph being captured: made
(and, for counters, zeroed by one memset node) at their first use in that graph, shared by every later launch
captured on the same stream, freed with the graph. Measured on the H100 (``benchmarks.dev.capture_scratch``, 16 FP8
projections of 8 rows, K split in four): 14.1 -> 12.7 us a projection against a fresh zeroed buffer, a memset node,
per launch. Graphs never share buffers, so they may replay in any order or at once on different streams.

A call through the registered op (``torch.compile``, its CUDA graphs) gets buffers of its own, freed after it:
torch.compile's CUDA graphs allocate from a private pool and refuse to record while a tensor made there stays alive
without being an output ("tensors in the cudagraph pool not tracked as outputs", seen on a whole FP8 Llama), and a
kept buffer would be one. The price there is one small memset for the counters per split-K call. So is it under a
capture by hand outside :func:`keep_on` where this torch cannot name the capturing graph
(``CUDAGraph.get_currently_capturing_graph``, which no torch at hand has).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_BUFFERS: dict[tuple, torch.Tensor] = {}
_LOCAL = threading.local()
# Whether a capture by hand keeps its buffers on the graph torch names as capturing
# (``CUDAGraph.get_currently_capturing_graph``), without :func:`keep_on`. No torch at hand has that method (2.11 on
# the lent GPUs, 2.13 here: session 46), so this has no effect there and stays off; :func:`keep_on` names the graph
# explicitly on any torch.
KEEP_IN_CAPTURES = False
_GRAPH_ATTR = "_triton_ops_scratch"  # the dict of a capture's buffers, kept on its graph
_RETIRED = "retired"  # buffers a capture outgrew


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


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _capturing_graph() -> object | None:
    get = getattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph", None)
    if get is None:
        return None
    try:
        return get()
    except RuntimeError:  # capturing through a raw stream capture, not a torch CUDAGraph
        return None


@contextlib.contextmanager
def keep_on(graph: torch.cuda.CUDAGraph) -> Iterator[None]:
    """Inside, calls captured by hand keep their scratch buffers on ``graph``, which must be the graph being
    captured (they live as long as it does)::

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), scratch.keep_on(graph):
            out = model(x)

    One memset node per graph and buffer instead of one per split-K launch; works on every torch (no torch at hand,
    2.11 on the lent GPUs nor 2.13, names the capturing graph itself, which :data:`KEEP_IN_CAPTURES` needs).
    Calls through the registered ops (``torch.compile``'s graphs, :func:`per_call`) keep getting fresh buffers."""
    previous = getattr(_LOCAL, "graph", None)
    _LOCAL.graph = graph
    try:
        yield
    finally:
        _LOCAL.graph = previous


def _graph_buffers() -> dict | None:
    """The dict of buffers kept on the graph being captured, or None where the graph cannot keep one: not named by
    :func:`keep_on`, and this torch cannot name it (or :data:`KEEP_IN_CAPTURES` is off), or names it by a new Python
    object each time (an attribute set on it would not last)."""
    named = getattr(_LOCAL, "graph", None)
    if named is not None:
        return _buffers_on(named)
    graph = _capturing_graph() if KEEP_IN_CAPTURES else None
    if graph is None:
        return None
    buffers = _buffers_on(graph)
    if buffers is not None and getattr(_capturing_graph(), _GRAPH_ATTR, None) is not buffers:
        return None
    return buffers


def _buffers_on(graph: object) -> dict | None:
    buffers = getattr(graph, _GRAPH_ATTR, None)
    if buffers is None:
        buffers = {}
        try:
            setattr(graph, _GRAPH_ATTR, buffers)
        except AttributeError:
            return None
    return buffers


def kept(device: torch.device) -> bool:
    """Whether :func:`scratch` hands out kept buffers here: a plain eager call, or a capture by hand into a torch
    CUDA graph that can keep them (not inside :func:`per_call`). Where a kernel's counters would otherwise be a fresh
    buffer and its memset a graph node, a caller may prefer the launches that need no counters (fused-moe's routing
    does)."""
    if getattr(_LOCAL, "per_call", 0):
        return False
    return not _capturing(device) or _graph_buffers() is not None


def scratch(name: str, device: torch.device, numel: int, dtype: torch.dtype, zeroed: bool,
            stream: int | None = None) -> torch.Tensor:
    """A buffer of at least ``numel`` elements for ``name`` on ``device`` and the current stream (``stream``
    overrides the stream id, for tests); under a capture, the graph's own. ``zeroed``: all zero when first made
    (counters); else uninitialized (partials written before they are read)."""
    if getattr(_LOCAL, "per_call", 0):
        return _fresh(numel, dtype, device, zeroed)
    buffers = _graph_buffers() if _capturing(device) else _BUFFERS
    if buffers is None:
        return _fresh(numel, dtype, device, zeroed)
    key = (name, device, _stream_id(device) if stream is None else stream, dtype)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        size = max(numel, 2 * buf.numel() if buf is not None else 0, 1024)
        if buf is not None and buffers is not _BUFFERS:
            buffers.setdefault(_RETIRED, []).append(buf)  # launches captured before still use it: keep it alive
        buf = _fresh(size, dtype, device, zeroed)
        buffers[key] = buf
    return buf


def _fresh(numel: int, dtype: torch.dtype, device: torch.device, zeroed: bool) -> torch.Tensor:
    return (torch.zeros if zeroed else torch.empty)(numel, dtype=dtype, device=device)


def clear() -> None:
    """Drop every eager buffer (the next call allocates fresh ones); a graph's buffers go with the graph."""
    _BUFFERS.clear()
