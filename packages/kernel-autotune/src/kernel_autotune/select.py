"""``select_config``: the one call a kernel makes to get its launch config.

Order: in-process memo -> the user's disk cache -> the config file shipped in the kernel's package ->
tuning on first use (only with ``KERNEL_AUTOTUNE=1`` and a space and a bench) -> the heuristic default.
After the first call for a key the answer comes from a dict lookup: a few microseconds.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.models import KernelMetrics

from . import cache as _cache
from .keys import key_string, make_key, next_pow2
from .measure import Runner, Timer, default_timer
from .space import ConfigSpace

ENV_TUNE = "KERNEL_AUTOTUNE"
ENV_WARMUP = "KERNEL_AUTOTUNE_WARMUP_RUNS"
ENV_RUNS = "KERNEL_AUTOTUNE_BENCHMARK_RUNS"
ENV_BUDGET = "KERNEL_AUTOTUNE_TIME_BUDGET_MS"
ENV_STRATEGY = "KERNEL_AUTOTUNE_STRATEGY"
ENV_MAX_SECONDS = "KERNEL_AUTOTUNE_MAX_SECONDS"
_TRUTHY = {"1", "true", "yes", "on"}

# memo key -> (config, where it came from). Filled on the slow path, read on every call.
_MEMO: dict[tuple, tuple[dict[str, Any], str]] = {}
_memo_lock = threading.Lock()


class _Session:
    """Tuning-session state (see ``kernel_autotune.session``): while ``active``, every call takes the slow path."""

    active = False          # read on the hot path: a module attribute, not a thread-local
    retune = False          # tune every call that has a space and a bench, ignoring cache and shipped files
    timer: Timer | None = None
    overrides: dict[str, dict[str, Any]] = {}   # key string -> config to return instead of any lookup
    calls: list[dict[str, Any]] | None = None   # when a list: each call's arguments are appended to it
    recorded: list[list[dict[str, Any]]] = []   # lists receiving the cache entries tuned in this session
    memo: dict[tuple, dict[str, Any]] = {}      # answers within the session, cleared when an override changes


_session = _Session()


def clear_memo() -> None:
    """Forget every memoized answer (the next call per key consults the disk again)."""
    with _memo_lock:
        _MEMO.clear()


_cache._write_listeners.append(clear_memo)


def _memo_key(name, version, problem, dtypes, device, bucket) -> tuple:
    if bucket:
        items = tuple((k, next_pow2(v) if k in bucket else v) for k, v in problem.items())
    else:
        items = tuple(problem.items())
    return (name, version, items, tuple(dtypes), device)


def select_config(
    name: str,
    *,
    version: str,
    problem: Mapping[str, int],
    dtypes: Iterable[torch.dtype | str] = (),
    device: torch.device | str | int | None = None,
    default: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
    bucket: Iterable[str] = (),
    shipped: Path | str | None = None,
    space: ConfigSpace | None = None,
    bench: Callable[[dict[str, Any]], Runner] | None = None,
) -> dict[str, Any]:
    """The launch config for kernel ``name`` on this problem: cached, shipped, tuned, or the default.

    ``problem`` maps dimension names to ints; those named in ``bucket`` are rounded up to the next
    power of two for the key. ``default`` is a dict or a zero-argument callable (called only when
    nothing is cached). ``shipped`` is the kernel package's ``tuned_configs.json`` (may be missing).
    With ``KERNEL_AUTOTUNE=1`` in the environment and both ``space`` and ``bench`` given (``bench(config)``
    returns a zero-argument callable launching the kernel once), a problem with no cached or shipped
    entry is tuned right here and the result written to the cache. A cached or shipped config that
    ``space`` no longer allows is ignored. Returns a fresh dict each call.
    """
    mkey = _memo_key(name, version, problem, dtypes, device, bucket)
    hit = _MEMO.get(mkey)
    if hit is not None and not _session.active:
        return dict(hit[0])
    if _session.active and _session.calls is None and not _session.retune:
        # Timing an operation under a config override: answer repeat calls from the session memo so the
        # timed runs do not pay for key building and file lookups.
        cfg = _session.memo.get(mkey)
        if cfg is None:
            cfg, _ = _select_slow(name, version, problem, dtypes, device, default, bucket, shipped, space, bench)
            _session.memo[mkey] = cfg
        return dict(cfg)
    config, source = _select_slow(name, version, problem, dtypes, device, default, bucket, shipped, space, bench)
    if not _session.active:
        with _memo_lock:
            _MEMO[mkey] = (config, source)
    return dict(config)


def config_source(name: str, *, version: str, problem: Mapping[str, int], dtypes: Iterable[torch.dtype | str] = (),
                  device: torch.device | str | int | None = None, bucket: Iterable[str] = ()) -> str | None:
    """Where the memoized config of this call came from (``"cache"``, ``"shipped"``, ``"tuned"``,
    ``"default"``), or None if ``select_config`` has not answered it yet in this process."""
    hit = _MEMO.get(_memo_key(name, version, problem, dtypes, device, tuple(bucket)))
    return None if hit is None else hit[1]


def _accepts(space: ConfigSpace | None, config: Mapping[str, Any], problem: Mapping[str, int]) -> bool:
    return space is None or space.allows(config, problem)


def tuning_enabled() -> bool:
    """Whether ``KERNEL_AUTOTUNE`` asks for tuning on first use."""
    return os.environ.get(ENV_TUNE, "").strip().lower() in _TRUTHY


def _select_slow(name, version, problem, dtypes, device, default, bucket, shipped, space, bench):
    key = make_key(name, version=version, problem=problem, dtypes=dtypes, device=device, bucket=bucket)
    if _session.active:
        override = _session.overrides.get(key_string(key))
        if override is not None:
            return dict(override), "override"
        if _session.calls is not None:
            _session.calls.append({"key": key, "problem": dict(problem), "space": space, "default": default,
                                   "bench": bench})
    forced = _session.active and _session.retune
    if not forced:
        entry = _cache.lookup(_cache.cache_file(name), key)
        if entry is not None and _accepts(space, entry["config"], problem):
            return dict(entry["config"]), "cache"
        if shipped is not None:
            entry = _cache.lookup(Path(shipped), key, relaxed=True)
            if entry is not None and _accepts(space, entry["config"], problem):
                return dict(entry["config"]), "shipped"
    fallback = dict(default() if callable(default) else default)
    if not isinstance(fallback, dict) or not fallback:
        raise InvalidArgumentError(
            f"default: expected a non-empty config dict (or a callable returning one), got {fallback!r}")
    if (forced or tuning_enabled()) and space is not None and bench is not None:
        return _tune_here(key, problem, space, bench, fallback, device), "tuned"
    return fallback, "default"


def _env_int(name: str, fallback: int) -> int:
    try:
        return int(os.environ.get(name, "") or fallback)
    except ValueError:
        return fallback


def _tune_here(key, problem, space, bench, fallback, device) -> dict[str, Any]:
    from .search import make_entry, search

    budget = os.environ.get(ENV_BUDGET, "").strip()
    max_s = os.environ.get(ENV_MAX_SECONDS, "").strip()
    timer: Timer = _session.timer or default_timer(device)
    outcome = search(
        space.configs(problem), bench, timer=timer,
        warmup_runs=_env_int(ENV_WARMUP, 10), benchmark_runs=_env_int(ENV_RUNS, 100),
        time_budget_ms=float(budget) if budget else None, device=device, default_config=fallback,
        strategy=os.environ.get(ENV_STRATEGY, "").strip() or "exhaustive",
        max_seconds=float(max_s) if max_s else None,
    )
    metrics = KernelMetrics.from_timing(max(outcome.best.median_ms, 1e-9), latency_std_ms=outcome.best.std_ms,
                                        latency_min_ms=outcome.best.min_ms, latency_max_ms=outcome.best.max_ms)
    entry = make_entry(key, outcome, metrics, source="select_config")
    _cache.store(_cache.cache_file(key["kernel"]), [entry])
    _cache.store_trials(_cache.cache_file(key["kernel"]), key, outcome.trials)
    for rec in _session.recorded:
        rec.append(entry)
    return dict(outcome.best_config)


@contextmanager
def tuning_session(*, timer: Timer | None = None):
    """Within this block, every ``select_config`` call that has a space and a bench re-tunes its problem
    (ignoring memo, cache and shipped files) and writes the result to the cache; yields the list of
    new cache entries.
    """
    recorded: list[dict[str, Any]] = []
    prev = (_session.active, _session.retune, _session.timer)
    _session.active, _session.retune, _session.timer = True, True, timer
    _session.recorded.append(recorded)
    try:
        yield recorded
    finally:
        _session.active, _session.retune, _session.timer = prev
        _session.recorded.remove(recorded)
        clear_memo()


__all__ = ["ENV_TUNE", "clear_memo", "config_source", "select_config", "tuning_enabled", "tuning_session"]
