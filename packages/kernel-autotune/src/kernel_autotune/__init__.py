"""kernel_autotune: launch configs for Triton kernels, tuned once and served from disk.

Kernels call :func:`select_config`; users tune with :class:`TritonAutoTuner` or ``python -m kernel_autotune tune``.
See docs/autotune.md.
"""

from .__about__ import __version__
from .cache import CacheFileWarning, cache_dir, cache_file
from .keys import bucket_problem, device_identity, device_key, make_key, next_pow2
from .measure import CudaEventTimer, GpuTimer, Timer, WallClockTimer
from .registry import Tunable, available_tunables, get_tunable, register_tunable, unregister_tunable
from .search import TuningError
from .select import (
    UntunedDeviceWarning,
    clear_memo,
    config_source,
    select_config,
    tuning_mode,
    tuning_session,
)
from .session import KernelTuning, tune_operation
from .space import (
    ConfigSpace,
    block_fits,
    elements_per_thread_at_most,
    shared_memory_fits,
    threads_at_most_block,
)
from .tuner import TritonAutoTuner, result_from_entry

__all__ = [
    "CacheFileWarning",
    "ConfigSpace",
    "CudaEventTimer",
    "GpuTimer",
    "KernelTuning",
    "Timer",
    "TritonAutoTuner",
    "Tunable",
    "TuningError",
    "UntunedDeviceWarning",
    "WallClockTimer",
    "__version__",
    "available_tunables",
    "block_fits",
    "bucket_problem",
    "cache_dir",
    "cache_file",
    "clear_memo",
    "config_source",
    "device_identity",
    "device_key",
    "elements_per_thread_at_most",
    "get_tunable",
    "make_key",
    "next_pow2",
    "register_tunable",
    "result_from_entry",
    "select_config",
    "shared_memory_fits",
    "threads_at_most_block",
    "tune_operation",
    "tuning_mode",
    "tuning_session",
    "unregister_tunable",
]
