"""The search: time every candidate config, record failures, pick the fastest.

Shared by ``TritonAutoTuner.tune`` and ``select_config``'s tune-on-first-use, so both measure the
same way and write the same cache entries.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from triton_ops_core.exceptions import InvalidArgumentError, TritonKernelError
from triton_ops_core.models import KernelMetrics, TrialResult

from .cache import now_iso
from .measure import Runner, Timer, Timing, measure


class TuningError(TritonKernelError, RuntimeError):
    """Every candidate config failed (each failure is listed), or there was nothing to try."""


@dataclass
class SearchOutcome:
    """What a search found: the best config, its timing, every trial, and the default's timing."""

    best_config: dict[str, Any]
    best: Timing
    trials: list[TrialResult]
    default_config: dict[str, Any] | None = None
    default: Timing | None = None
    seconds: float = 0.0
    verified: dict[str, float] = field(default_factory=dict)


def describe_error(e: BaseException) -> str:
    """One line naming the failure (compile error, out of resources, ...), for the trial record."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    if not first:
        frames = traceback.extract_tb(e.__traceback__)
        first = f"at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(e).__name__}: {first}"[:500]


def _recover(device: torch.device | str | int | None) -> None:
    # A failed launch may leave queued work behind; drain it so the next config's timing is clean.
    if torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - a sticky CUDA error will surface on the next config as its own failure
            pass


STRATEGIES = ("exhaustive", "coordinate")


def search(
    configs: Sequence[Mapping[str, Any]],
    make_runner: Callable[[dict[str, Any]], Runner],
    *,
    timer: Timer,
    warmup_runs: int,
    benchmark_runs: int,
    time_budget_ms: float | None = None,
    device: torch.device | str | int | None = None,
    default_config: Mapping[str, Any] | None = None,
    verify_default: bool = True,
    strategy: str = "exhaustive",
    max_seconds: float | None = None,
    progress: Callable[[dict[str, Any], TrialResult], None] | None = None,
) -> SearchOutcome:
    """Time the candidate configs (plus ``default_config`` when it is not among them) and return the fastest.

    ``strategy="exhaustive"`` times every config; ``"coordinate"`` starts from the default and changes one
    parameter at a time, keeping each improvement (at most two passes): a few dozen configs instead of
    hundreds, for spaces where each compile costs seconds. ``max_seconds`` stops trying new configs once
    that much time has passed (the best so far wins; the default is always tried first).

    A timer with ``calibrate`` (the GPU timer) is first handed the baseline's runner (the default, else the first
    config), to choose how this kernel is timed (CUDA-graph replay for a kernel of a few microseconds).

    A config whose runner cannot be built, fails to compile, runs out of resources or raises
    anything else is recorded as a failed trial and skipped. When the winner is not the
    default, both are timed once more, alternately, and the faster of that re-check wins: the
    chosen config is never slower than the heuristic default on the measurement that decides.
    """
    if strategy not in STRATEGIES:
        raise InvalidArgumentError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    start = time.perf_counter()
    grid = [dict(c) for c in configs]
    candidates = list(grid)
    default = dict(default_config) if default_config is not None else None
    if default is not None:
        candidates = [default] + [c for c in candidates if c != default]  # tried first, whatever the deadline
    if not candidates:
        raise TuningError("no config to try: the config space is empty for this problem (every config was pruned)")

    trials: list[TrialResult] = []
    timings: dict[str, tuple[dict[str, Any], Timing]] = {}
    tried: set[str] = set()

    def run_one(cfg: dict[str, Any]) -> Timing:
        return measure(make_runner(dict(cfg)), cfg, timer, warmup_runs=warmup_runs, benchmark_runs=benchmark_runs,
                       time_budget_ms=time_budget_ms, device=device)

    def out_of_time() -> bool:
        return max_seconds is not None and bool(timings) and time.perf_counter() - start > max_seconds

    def attempt(cfg: dict[str, Any]) -> Timing | None:
        name = _cfg_id(cfg)
        if name in tried:
            return timings[name][1] if name in timings else None
        tried.add(name)
        try:
            t = run_one(cfg)
        except Exception as e:  # noqa: BLE001 - any failure of one config is recorded, never fatal
            trial = TrialResult(cfg, error=describe_error(e))
            _recover(device)
            t = None
        else:
            trial = TrialResult(cfg, latency_ms=t.median_ms, latency_std_ms=t.std_ms)
            timings[name] = (cfg, t)
        trials.append(trial)
        if progress is not None:
            progress(cfg, trial)
        return t

    calibrate = getattr(timer, "calibrate", None)
    if calibrate is not None:  # the GPU timer picks events or CUDA-graph replay for this kernel, from the baseline
        try:
            calibrate(make_runner(dict(candidates[0])))
        except Exception:  # noqa: BLE001 - a baseline that fails here fails again, recorded, when it is attempted
            _recover(device)
    if strategy == "exhaustive":
        for cfg in candidates:
            if out_of_time():
                break
            attempt(cfg)
    else:
        _coordinate(grid or candidates, attempt, out_of_time, default)

    release = getattr(timer, "release", None)
    if not timings:
        if release is not None:
            release()
        failures = "; ".join(f"{t.config}: {t.error}" for t in trials[:8])
        raise TuningError(f"all {len(trials)} configs failed: {failures}")
    best_cfg, best = min(timings.values(), key=lambda ct: ct[1].median_ms)
    default_hit = timings.get(_cfg_id(default)) if default is not None else None
    default_timing = default_hit[1] if default_hit is not None else None
    verified: dict[str, float] = {}
    if verify_default and default_timing is not None and best_cfg != default:
        try:
            best_cfg, best, default_timing, verified = _recheck(best_cfg, default, run_one)
        except Exception:  # noqa: BLE001 - both ran before; a failure now keeps the search's own verdict
            _recover(device)
    if release is not None:
        release()
    return SearchOutcome(best_cfg, best, trials, default, default_timing, time.perf_counter() - start, verified)


def _cfg_id(cfg: Mapping[str, Any]) -> str:
    return repr(sorted(cfg.items()))


def _distance(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[int, float]:
    """How far config ``a`` is from ``b``: parameters that differ, then the summed log2 ratio of numeric ones."""
    differ, spread = 0, 0.0
    for k in set(a) | set(b):
        x, y = a.get(k), b.get(k)
        if x == y:
            continue
        differ += 1
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x > 0 and y > 0:
            spread += abs(math.log2(x / y))
        else:
            spread += 8.0
    return differ, spread


def _coordinate(grid: list[dict[str, Any]], attempt: Callable[[dict[str, Any]], Timing | None],
                out_of_time: Callable[[], bool], default: dict[str, Any] | None) -> None:
    if default is not None:
        attempt(default)  # the baseline, timed whatever happens next
    # Walk the grid from its config nearest the default (the default itself when it is on the grid; a heuristic
    # may pick values the grid does not list, and a walk has to start on the grid to have neighbours).
    ordered = sorted(grid, key=lambda c: _distance(c, default)) if default is not None else grid
    current, current_t = None, None
    for cfg in ordered:
        if out_of_time():
            return
        current_t = attempt(cfg)
        if current_t is not None:
            current = cfg
            break
    if current is None:
        return
    params = list(dict.fromkeys(k for c in grid for k in c))
    for _ in range(2):
        improved = False
        for p in params:
            others = [q for q in params if q != p]
            for cfg in grid:
                if cfg.get(p) == current.get(p) or any(cfg.get(q) != current.get(q) for q in others):
                    continue
                if out_of_time():
                    return
                t = attempt(cfg)
                if t is not None and t.median_ms < current_t.median_ms:
                    current, current_t, improved = cfg, t, True
        if not improved:
            return


def _combine(a: Timing, b: Timing) -> Timing:
    return Timing(median_ms=(a.median_ms + b.median_ms) / 2, std_ms=(a.std_ms + b.std_ms) / 2,
                  min_ms=min(a.min_ms, b.min_ms), max_ms=max(a.max_ms, b.max_ms), runs=a.runs + b.runs)


def _recheck(best_cfg: dict[str, Any], default: dict[str, Any], run_one: Callable[[dict[str, Any]], Timing],
             ) -> tuple[dict[str, Any], Timing, Timing, dict[str, float]]:
    # Alternate best, default, best, default: drift in clocks or temperature hits both alike. The re-check's
    # timings replace the search's for both configs, so the reported pair is measured alike.
    b1, d1 = run_one(best_cfg), run_one(default)
    b2, d2 = run_one(best_cfg), run_one(default)
    best, dflt = _combine(b1, b2), _combine(d1, d2)
    verified = {"best_ms": best.median_ms, "default_ms": dflt.median_ms}
    if dflt.median_ms < best.median_ms:
        return default, dflt, dflt, verified
    return best_cfg, best, dflt, verified


def make_entry(
    key: Mapping[str, Any],
    outcome: SearchOutcome,
    metrics: KernelMetrics,
    *,
    source: str,
) -> dict[str, Any]:
    """The cache entry recording ``outcome`` under ``key`` (plain JSON types only).

    Trials are counted here but kept in a side file (``cache.store_trials``): the entry a lookup parses
    stays small, so a cold lookup costs well under a millisecond.
    """
    entry: dict[str, Any] = {
        "key": dict(key),
        "config": dict(outcome.best_config),
        "latency_ms": outcome.best.median_ms,
        "metrics": metrics.to_dict(),
        "default_config": outcome.default_config,
        "default_latency_ms": outcome.default.median_ms if outcome.default is not None else None,
        "tuning_time_s": round(outcome.seconds, 4),
        "tuned_at": now_iso(),
        "source": source,
    }
    if outcome.verified:
        entry["verified"] = dict(outcome.verified)
    entry["trials_total"] = len(outcome.trials)
    entry["trials_failed"] = sum(1 for t in outcome.trials if not t.ok)
    return entry


__all__ = ["STRATEGIES", "SearchOutcome", "TuningError", "describe_error", "make_entry", "search"]
