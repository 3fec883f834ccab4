"""Tuning a whole operation: find the kernels it launches, then time it under each config of each kernel.

The ``tune`` command uses this on each kernel family's public function (``fused_rmsnorm_rope(x, ...)``) so a
kernel package needs no tuning code of its own: it only has to take its configs from ``select_config`` with a
``space``. A first run records every ``select_config`` call the operation makes; then, kernel by kernel, the
operation is timed with that kernel's answer overridden by each candidate config (the other kernels keep
their cached or default configs), and the fastest is written to the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from triton_ops_core.models import KernelMetrics

from . import cache as _cache
from .keys import key_string
from .measure import Runner, Timer, default_timer
from .search import SearchOutcome, TuningError, make_entry, search
from .select import _session, clear_memo


@dataclass
class KernelTuning:
    """The outcome for one kernel of an operation: its cache entry, or why it was not tuned."""

    kernel: str
    key: dict[str, Any]
    entry: dict[str, Any] | None = None
    skipped: str | None = None
    outcome: SearchOutcome | None = field(default=None, repr=False)


def _synchronize(device: torch.device | str | None) -> None:
    if torch.cuda.is_available() and torch.device(device or "cuda").type == "cuda":
        from triton_ops_core.device import is_interpreter

        if not is_interpreter():
            torch.cuda.synchronize()


def discover(runner: Runner, reset: Callable[[], None] | None = None, device: torch.device | str | None = None,
             ) -> list[dict[str, Any]]:
    """Run ``runner`` once and return the distinct ``select_config`` calls it made (key, problem, space, default)."""
    prev = (_session.active, _session.calls)
    _session.active, _session.calls = True, []
    try:
        if reset is not None:
            reset()
        runner()
        _synchronize(device)
        calls = _session.calls
    finally:
        _session.active, _session.calls = prev
    seen: dict[str, dict[str, Any]] = {}
    for call in calls:
        seen.setdefault(key_string(call["key"]), call)
    return list(seen.values())


def tune_operation(
    runner: Runner,
    *,
    reset: Callable[[], None] | None = None,
    timer: Timer | None = None,
    warmup_runs: int = 5,
    benchmark_runs: int = 50,
    time_budget_ms: float | None = 200.0,
    strategy: str = "exhaustive",
    max_seconds: float | None = None,
    total_seconds: float | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[dict[str, Any], Any], None] | None = None,
) -> list[KernelTuning]:
    """Tune every kernel ``runner`` launches through ``select_config``; returns one record per kernel.

    ``reset`` clears the kernel package's own memo of configs (if it keeps one) so an override reaches the
    launch. Kernels whose ``select_config`` call has no ``space`` are reported as skipped. Each tuned entry
    is stored in the cache right away, so the kernels tuned later in the same operation run with it.
    ``max_seconds`` bounds each kernel's search; ``total_seconds`` bounds the whole operation's, shared evenly
    among the kernels still to tune (each kernel's default is timed whatever the budget).
    """
    import time

    started = time.perf_counter()
    timer = timer or default_timer(device)
    results: list[KernelTuning] = []
    calls = discover(runner, reset, device)
    for index, call in enumerate(calls):
        limit = max_seconds
        if total_seconds is not None:
            share = max(0.0, total_seconds - (time.perf_counter() - started)) / (len(calls) - index)
            limit = share if limit is None else min(limit, share)
        key = call["key"]
        if call["space"] is None:
            results.append(KernelTuning(key["kernel"], key, skipped="select_config was called without a space"))
            continue
        default = call["default"]
        default_cfg = dict(default() if callable(default) else default)
        ks = key_string(key)

        def make_runner(cfg: dict[str, Any], ks: str = ks) -> Runner:
            _session.overrides[ks] = dict(cfg)
            _session.memo.clear()
            if reset is not None:
                reset()
            return runner

        prev_active = _session.active
        _session.active = True
        try:
            outcome = search(call["space"].configs(call["problem"]), make_runner, timer=timer,
                             warmup_runs=warmup_runs, benchmark_runs=benchmark_runs, time_budget_ms=time_budget_ms,
                             device=device, default_config=default_cfg, strategy=strategy,
                             max_seconds=limit, progress=progress)
        except TuningError as e:
            results.append(KernelTuning(key["kernel"], key, skipped=str(e)))
            continue
        finally:
            _session.overrides.pop(ks, None)
            _session.memo.clear()
            _session.active = prev_active
            if reset is not None:
                reset()
        metrics = KernelMetrics.from_timing(max(outcome.best.median_ms, 1e-9), latency_std_ms=outcome.best.std_ms,
                                            latency_min_ms=outcome.best.min_ms, latency_max_ms=outcome.best.max_ms)
        entry = make_entry(key, outcome, metrics, source="kernel_autotune tune")
        _cache.store(_cache.cache_file(key["kernel"]), [entry])
        _cache.store_trials(_cache.cache_file(key["kernel"]), key, outcome.trials)
        clear_memo()
        results.append(KernelTuning(key["kernel"], key, entry=entry, outcome=outcome))
    return results


__all__ = ["KernelTuning", "discover", "tune_operation"]
