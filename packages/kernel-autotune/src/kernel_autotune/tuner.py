"""``TritonAutoTuner``: search a config space for one kernel, keep the answer on disk.

Unlike ``triton.autotune``, a result is looked up before anything is timed, so a new process with
a warm cache never re-benchmarks, and a key never includes the config list, so growing a space keeps
old results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from triton_ops_core.device import can_run_on
from triton_ops_core.exceptions import InvalidArgumentError, UnsupportedDeviceError
from triton_ops_core.models import KernelMetrics, TrialResult, TuningResult, dtype_name

from . import cache as _cache
from .keys import make_key
from .measure import Runner, Timer, default_timer
from .search import make_entry, search
from .space import ConfigSpace


def _is_triton_kernel(fn: Any) -> bool:
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:  # pragma: no cover - triton is a dependency
        return False
    return isinstance(fn, KernelInterface)


def _check_runnable(device: torch.device | str | int | None) -> None:
    """Tuning launches the kernel: say plainly when it cannot run here (Triton's own error is "0 active drivers")."""
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    if not can_run_on(dev):
        where = ("a CPU device runs Triton kernels only under its interpreter: set TRITON_INTERPRET=1 before "
                 "importing triton (timings are then the interpreter's, not a GPU's)") if dev.type == "cpu" else (
                 "TRITON_INTERPRET=1 is set: kernels run on CPU tensors only" if dev.type == "cuda" else
                 "expected a CUDA device, or the CPU under the interpreter")
        raise UnsupportedDeviceError(f"device: cannot run a Triton kernel on {dev}: {where}")


def _problem_dict(problem_size: Mapping[str, int] | Sequence[int]) -> dict[str, int]:
    if isinstance(problem_size, Mapping):
        return {str(k): int(v) for k, v in problem_size.items()}
    if isinstance(problem_size, (tuple, list)) and all(isinstance(v, int) for v in problem_size):
        return {f"dim{i}": int(v) for i, v in enumerate(problem_size)}
    raise InvalidArgumentError(
        f"problem_size: expected a dict of dimension -> int or a tuple of ints, got {problem_size!r}")


class TritonAutoTuner:
    """Tune one kernel over a :class:`ConfigSpace`, with results cached on disk across processes.

    ``kernel_fn`` is either a ``@triton.jit`` kernel, launched as ``kernel_fn[grid](*args, **kwargs, **config)``
    (pass ``grid``: a tuple, or a callable of the launch's meta-parameters, Triton's convention), or any
    Python callable, called as ``kernel_fn(*args, **kwargs, **config)`` (or with the config as one keyword
    argument ``config_arg=config`` when ``config_arg`` is set).

    ``timer(fn, config) -> ms`` times one run; the default is CUDA events with L2 flushed on a GPU, the wall
    clock under the interpreter. ``time_budget_ms`` caps the timed runs per config by time. ``strategy`` is
    ``"exhaustive"`` (every config) or ``"coordinate"`` (one parameter at a time from the default);
    ``max_seconds`` bounds a search (the best config found by then wins). ``default`` (a config, or a
    callable of the problem dict) is the heuristic baseline, always timed too. Results go to
    ``cache_dir`` (default: ``$KERNEL_AUTOTUNE_CACHE_DIR`` or ``~/.cache/triton-ops/autotune``) unless
    ``cache=False``.
    """

    def __init__(
        self,
        kernel_fn: Callable[..., Any],
        config_space: ConfigSpace,
        warmup_runs: int = 10,
        benchmark_runs: int = 100,
        *,
        name: str | None = None,
        version: str = "0",
        grid: tuple[int, ...] | Callable[[dict[str, Any]], tuple[int, ...]] | None = None,
        config_arg: str | None = None,
        bucket: Iterable[str] = (),
        default: Mapping[str, Any] | Callable[[dict[str, int]], Mapping[str, Any]] | None = None,
        timer: Timer | None = None,
        time_budget_ms: float | None = None,
        strategy: str = "exhaustive",
        max_seconds: float | None = None,
        flush_l2: bool = True,
        cache: bool = True,
        cache_dir: Path | str | None = None,
    ) -> None:
        if not isinstance(config_space, ConfigSpace):
            raise InvalidArgumentError(f"config_space: expected a ConfigSpace, got {type(config_space).__name__}")
        if not callable(kernel_fn) and not _is_triton_kernel(kernel_fn):
            raise InvalidArgumentError(f"kernel_fn: expected a Triton kernel or a callable, got {kernel_fn!r}")
        if _is_triton_kernel(kernel_fn) and grid is None:
            raise InvalidArgumentError("grid: a @triton.jit kernel needs a launch grid (a tuple or a callable of meta)")
        if warmup_runs < 0 or benchmark_runs < 1:
            raise InvalidArgumentError(
                f"warmup_runs/benchmark_runs: expected >= 0 and >= 1, got {warmup_runs} and {benchmark_runs}")
        self.kernel_fn = kernel_fn
        self.config_space = config_space
        self.warmup_runs = int(warmup_runs)
        self.benchmark_runs = int(benchmark_runs)
        self.name = (name or getattr(kernel_fn, "__name__", None)
                     or getattr(getattr(kernel_fn, "fn", None), "__name__", "kernel"))
        self.version = str(version)
        self.grid = grid
        self.config_arg = config_arg
        self.bucket = tuple(bucket)
        self.default = default
        self.timer = timer
        self.time_budget_ms = time_budget_ms
        self.strategy = strategy
        self.max_seconds = max_seconds
        self.flush_l2 = flush_l2
        self.cache = cache
        self.cache_dir = cache_dir

    # ---- keys and cache -------------------------------------------------------------------------

    def _cache_path(self) -> Path:
        return _cache.cache_file(self.name, self.cache_dir)

    @staticmethod
    def _dtypes(args: Sequence[Any], dtypes: Iterable[torch.dtype | str] | None) -> list[str]:
        if dtypes is not None:
            return [d if isinstance(d, str) else dtype_name(d) for d in dtypes]
        return [dtype_name(a.dtype) for a in args if isinstance(a, torch.Tensor)]

    def key(self, *args: Any, problem_size: Mapping[str, int] | Sequence[int],
            device: torch.device | str | int | None = "cuda:0",
            dtypes: Iterable[torch.dtype | str] | None = None) -> dict[str, Any]:
        """The cache key of a call: kernel name and version, bucketed problem, dtypes, GPU name, Triton version."""
        return make_key(self.name, version=self.version, problem=_problem_dict(problem_size),
                        dtypes=self._dtypes(args, dtypes), device=device, bucket=self.bucket)

    def get_cached_config(self, *args: Any, problem_size: Mapping[str, int] | Sequence[int],
                          device: torch.device | str | int | None = "cuda:0",
                          dtypes: Iterable[torch.dtype | str] | None = None) -> TuningResult | None:
        """The cached result for this call's key, or None; never runs or times anything.

        ``dtypes`` defaults to those of the tensor arguments, as in :meth:`tune`.
        """
        key = self.key(*args, problem_size=problem_size, device=device, dtypes=dtypes)
        entry = _cache.lookup(self._cache_path(), key)
        if entry is None or not self.config_space.allows(entry["config"], _problem_dict(problem_size)):
            return None
        return result_from_entry(entry, _cache.load_trials(self._cache_path(), key))

    # ---- tuning ---------------------------------------------------------------------------------

    def _runner(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Callable[[dict[str, Any]], Runner]:
        fn = self.kernel_fn
        if _is_triton_kernel(fn):
            def make(config: dict[str, Any]) -> Runner:
                meta = {**kwargs, **config}
                grid = self.grid(meta) if callable(self.grid) else self.grid
                return lambda: fn[grid](*args, **meta)
        elif self.config_arg is not None:
            def make(config: dict[str, Any]) -> Runner:
                call_kwargs = {**kwargs, self.config_arg: config}
                return lambda: fn(*args, **call_kwargs)
        else:
            def make(config: dict[str, Any]) -> Runner:
                call_kwargs = {**kwargs, **config}
                return lambda: fn(*args, **call_kwargs)
        return make

    def _default_config(self, problem: dict[str, int]) -> dict[str, Any] | None:
        if self.default is None:
            return None
        return dict(self.default(problem) if callable(self.default) else self.default)

    def tune(
        self,
        *args: Any,
        problem_size: Mapping[str, int] | Sequence[int],
        device: torch.device | str | int | None = "cuda:0",
        dtypes: Iterable[torch.dtype | str] | None = None,
        bytes_moved: int | None = None,
        flops: int | None = None,
        work_items: int | None = None,
        force: bool = False,
        progress: Callable[[dict[str, Any], TrialResult], None] | None = None,
        **kwargs: Any,
    ) -> TuningResult:
        """Find the fastest config for these arguments, or return the cached one without timing anything.

        ``problem_size`` names the problem (a dict, or a tuple of ints keyed ``dim0``, ``dim1``, ...);
        ``bytes_moved`` (read + written) and ``flops`` turn the best latency into GB/s (and % of the
        device's peak) and TFLOP/s. ``force`` re-tunes even when a result is cached. Extra keyword
        arguments go to every launch. Raises ``TuningError`` only when every config fails.
        """
        problem = _problem_dict(problem_size)
        key = self.key(*args, problem_size=problem, device=device, dtypes=dtypes)
        if self.cache and not force:
            entry = _cache.lookup(self._cache_path(), key)
            if entry is not None and self.config_space.allows(entry["config"], problem):
                return result_from_entry(entry, _cache.load_trials(self._cache_path(), key))
        _check_runnable(device)  # a cached answer needs no kernel; a search does
        timer = self.timer or default_timer(device, flush_l2=self.flush_l2)
        outcome = search(
            self.config_space.configs(problem), self._runner(args, kwargs), timer=timer,
            warmup_runs=self.warmup_runs, benchmark_runs=self.benchmark_runs, time_budget_ms=self.time_budget_ms,
            device=device, default_config=self._default_config(problem), strategy=self.strategy,
            max_seconds=self.max_seconds, progress=progress,
        )
        metrics = KernelMetrics.from_timing(
            max(outcome.best.median_ms, 1e-9), bytes_moved=bytes_moved, flops=flops, work_items=work_items,
            peak_bandwidth_gbps=_peak_bandwidth(device) if bytes_moved is not None else None,
            latency_std_ms=outcome.best.std_ms, latency_min_ms=outcome.best.min_ms, latency_max_ms=outcome.best.max_ms,
        )
        entry = make_entry(key, outcome, metrics, source="TritonAutoTuner")
        if self.cache:
            _cache.store(self._cache_path(), [entry])
            _cache.store_trials(self._cache_path(), key, outcome.trials)
        return result_from_entry(entry, outcome.trials)


def _peak_bandwidth(device: torch.device | str | int | None) -> float | None:
    from triton_ops_core.device import device_peaks, has_gpu, is_interpreter

    if not has_gpu() or is_interpreter():
        return None
    dev = torch.device("cuda", device) if isinstance(device, int) else device
    peak = device_peaks(dev).memory_bandwidth_gbps
    return peak or None


def result_from_entry(entry: Mapping[str, Any], trials: Iterable[Any] = ()) -> TuningResult:
    """A ``TuningResult`` from a cache entry and its trials (``TrialResult`` objects or their dicts)."""
    metrics = entry.get("metrics")
    if isinstance(metrics, dict) and metrics.get("latency_ms"):
        km = KernelMetrics.from_dict(metrics)
    else:
        km = KernelMetrics(latency_ms=float(entry.get("latency_ms") or 0.0))
    parsed = tuple(t if isinstance(t, TrialResult) else TrialResult.from_dict(t) for t in trials)
    key = dict(entry["key"])
    return TuningResult(dict(entry["config"]), km, parsed, str(key.get("kernel", "")), key)


__all__ = ["TritonAutoTuner", "result_from_entry"]
