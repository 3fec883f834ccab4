"""``select_config``: the one call a kernel makes to get its launch config.

Order: in-process memo -> the user's disk cache -> the config file shipped in the kernel's package (entries of this
GPU only: same product name and compute capability) -> tuning on first use (a call with a space and a bench; by
default only on a GPU its package ships no configs for, see ``TRITON_OPS_AUTOTUNE``) -> the heuristic default.
After the first call for a key the answer comes from a dict lookup: a few microseconds.

A GPU the package ships no configs for is announced once per process and kernel family (``UntunedDeviceWarning``),
naming the device and the command that tunes it. Tuning never starts inside a CUDA-graph capture or while
``torch.compile`` traces: the heuristic answers there.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from triton_ops_core.device import device_info, on_device_change
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.models import KernelMetrics

from . import cache as _cache
from .keys import key_string, make_key, next_pow2
from .measure import Runner, Timer, default_timer
from .space import ConfigSpace

ENV_MODE = "TRITON_OPS_AUTOTUNE"
ENV_TUNE = "KERNEL_AUTOTUNE"  # the older switch: 1 = TRITON_OPS_AUTOTUNE=1, 0 = off (TRITON_OPS_AUTOTUNE wins)
ENV_WARMUP = "KERNEL_AUTOTUNE_WARMUP_RUNS"
ENV_RUNS = "KERNEL_AUTOTUNE_BENCHMARK_RUNS"
ENV_BUDGET = "KERNEL_AUTOTUNE_TIME_BUDGET_MS"
ENV_STRATEGY = "KERNEL_AUTOTUNE_STRATEGY"
ENV_MAX_SECONDS = "KERNEL_AUTOTUNE_MAX_SECONDS"
_TRUTHY = {"1", "true", "yes", "on"}
_FALSY = {"0", "false", "no", "off"}
MODES = ("off", "auto", "on")
TUNE_COMMAND = "python -m kernel_autotune tune {family}"


class UntunedDeviceWarning(UserWarning):
    """A kernel family ships no tuned configs for this GPU: it is tuned on first use, or served by heuristics."""

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
on_device_change(clear_memo)  # a simulated device (tests) changes every key


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
    nothing is cached): the heuristic, which should read the device's properties
    (``triton_ops_core.device.device_info``). ``shipped`` is the kernel package's ``tuned_configs.json`` (may be
    missing); only its entries for this GPU's product name and compute capability are used, and a GPU it has no
    entry for is announced once per process and family (``UntunedDeviceWarning``). With both ``space`` and
    ``bench`` given (``bench(config)`` returns a zero-argument callable launching the kernel once), a problem with
    nothing cached or shipped is tuned right here when :func:`tuning_mode` says so (by default: on a GPU without
    shipped configs; never while capturing a CUDA graph or tracing with ``torch.compile``), under an inter-process
    lock, and the result written to the cache. A cached or shipped config that ``space`` no longer allows is
    ignored. Returns a fresh dict each call.
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


def tuning_mode() -> str:
    """When ``select_config`` tunes a problem on first use (read from the environment on each slow-path call):

    - ``"auto"`` (the default): on a GPU for which the kernel's package ships no tuned configs (no entry of this
      product name and compute capability in its ``tuned_configs.json``), each problem with nothing cached is tuned
      on first use, once per machine (the result goes to the cache). A GPU with shipped configs uses them, and the
      heuristic for problems they lack. The CPU interpreter never tunes.
    - ``"off"`` (``TRITON_OPS_AUTOTUNE=0``, or ``KERNEL_AUTOTUNE=0``): never; the heuristic answers.
    - ``"on"`` (``TRITON_OPS_AUTOTUNE=1``, or ``KERNEL_AUTOTUNE=1``): every problem with nothing cached or shipped.
    """
    value = os.environ.get(ENV_MODE, "").strip().lower()
    if not value:
        legacy = os.environ.get(ENV_TUNE, "").strip().lower()
        value = "on" if legacy in _TRUTHY else "off" if legacy in _FALSY else "auto"
    if value in _TRUTHY:
        return "on"
    if value in _FALSY:
        return "off"
    return "auto"  # "auto" and anything unrecognized


def tuning_enabled() -> bool:
    """Whether tuning on first use is asked for every problem (``TRITON_OPS_AUTOTUNE=1`` or ``KERNEL_AUTOTUNE=1``)."""
    return tuning_mode() == "on"


_compiling = torch.compiler.is_compiling


def _capturing(device: Any) -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except RuntimeError:  # no CUDA context yet: nothing can be capturing
        return False


def may_tune_now(device: Any = None) -> bool:
    """False while ``torch.compile`` traces or the current CUDA stream captures a graph: a search there would be
    traced, or would launch (and synchronize) inside the capture. The heuristic answers instead."""
    return not _compiling() and not _capturing(device)


def family_of(kernel: str) -> str:
    """The kernel family (package) a kernel name belongs to: the part before the first dot."""
    return kernel.split(".", 1)[0]


_warned_untuned: set[tuple[str, str, str | None]] = set()
_warn_lock = threading.Lock()


def reset_warnings() -> None:
    """Forget which untuned-device warnings were given (tests; a process that wants to hear them again)."""
    with _warn_lock:
        _warned_untuned.clear()


def _warn_untuned(family: str, info: Any, shipped: Path, tunes: bool) -> None:
    token = (family, *info.identity)
    with _warn_lock:
        if token in _warned_untuned:
            return
        _warned_untuned.add(token)
    others = sorted({f"{n} (sm_{c.replace('.', '')})" if c else n for n, c in _cache.devices(shipped)})
    shipped_for = f"; it ships configs for {', '.join(others)} only" if others else ""
    command = TUNE_COMMAND.format(family=family)
    if tunes:
        what = (f"each new problem size is tuned on first use and cached in {_cache.cache_dir()} (a few seconds each, "
                f"once per machine; {ENV_MODE}=0 turns this off)")
    else:
        what = f"launch configs come from heuristics reading its properties ({info.describe()})"
    warnings.warn(
        f"{family} has no tuned configs for {info.name} (compute capability {info.capability_str}{shipped_for}): "
        f"{what}. Tune every benchmark shape of {family} for this GPU once with `{command}`.",
        UntunedDeviceWarning, stacklevel=5)


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
    tunable = space is not None and bench is not None
    if forced:
        if tunable:
            return _tune_here(key, problem, space, bench, fallback, device, bounded=False), "tuned"
        return fallback, "default"
    mode = tuning_mode()
    untuned = False
    if shipped is not None and not _session.active:
        info = device_info(device)
        untuned = info.is_gpu and not _cache.has_device(Path(shipped), info.identity)
        if untuned:
            _warn_untuned(family_of(name), info, Path(shipped), tunes=tunable and mode == "auto")
    wanted = mode == "on" or (mode == "auto" and untuned)
    if tunable and wanted and not _session.active and may_tune_now(device):
        return _tune_once(key, problem, space, bench, fallback, device, bounded=mode == "auto")
    return fallback, "default"


def _tune_once(key, problem, space, bench, fallback, device, bounded):
    """Tune ``key`` unless another process is doing it: under the kernel's tuning lock, look in the cache again."""
    path = _cache.cache_file(key["kernel"])
    with _cache.tuning_lock(path) as held:
        if not held:  # another process has been tuning for longer than the lock's timeout: do not wait more
            return fallback, "default"
        entry = _cache.lookup(path, key)
        if entry is not None and _accepts(space, entry["config"], problem):
            return dict(entry["config"]), "cache"
        return _tune_here(key, problem, space, bench, fallback, device, bounded=bounded), "tuned"


def _env_int(name: str, fallback: int) -> int:
    try:
        return int(os.environ.get(name, "") or fallback)
    except ValueError:
        return fallback


def _env_str(name: str) -> str:
    return os.environ.get(name, "").strip()


# Tuning a user did not ask for explicitly (TRITON_OPS_AUTOTUNE unset, on a GPU without shipped configs) stays short:
# coordinate search from the heuristic, a few seconds per problem at most. The environment variables override it.
_BOUNDED = {"warmup": 3, "runs": 20, "budget_ms": 50.0, "strategy": "coordinate", "max_s": 10.0}
_UNBOUNDED = {"warmup": 10, "runs": 100, "budget_ms": None, "strategy": "exhaustive", "max_s": None}


def _tune_here(key, problem, space, bench, fallback, device, bounded: bool = False) -> dict[str, Any]:
    from .search import make_entry, search

    limits = _BOUNDED if bounded else _UNBOUNDED
    budget = _env_str(ENV_BUDGET)
    max_s = _env_str(ENV_MAX_SECONDS)
    timer: Timer = _session.timer or default_timer(device)
    outcome = search(
        space.configs(problem), bench, timer=timer,
        warmup_runs=_env_int(ENV_WARMUP, limits["warmup"]), benchmark_runs=_env_int(ENV_RUNS, limits["runs"]),
        time_budget_ms=float(budget) if budget else limits["budget_ms"], device=device, default_config=fallback,
        strategy=_env_str(ENV_STRATEGY) or limits["strategy"],
        max_seconds=float(max_s) if max_s else limits["max_s"],
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


__all__ = [
    "ENV_MODE",
    "ENV_TUNE",
    "MODES",
    "TUNE_COMMAND",
    "UntunedDeviceWarning",
    "clear_memo",
    "config_source",
    "family_of",
    "may_tune_now",
    "reset_warnings",
    "select_config",
    "tuning_enabled",
    "tuning_mode",
    "tuning_session",
]
