"""Launch configs: the tunable space, the measured heuristic, and the cached lookup on the call path.

A config is ``{"num_warps": w, "ROWS_PER_PROG": r}``: ``w`` warps share one row held in registers, and each program
handles ``r`` consecutive tokens (several rows per program amortize the per-program setup for small rows).

The heuristic (``heuristic_config``) comes from a sweep of this space on the lent H100 (see its docstring and the
package README, "Performance").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from kernel_autotune import ConfigSpace, select_config

from .__about__ import __version__

SHIPPED_CONFIGS = Path(__file__).with_name("tuned_configs.json")
FWD_KERNEL = "fused_rmsnorm_rope.fwd"
QK_FWD_KERNEL = "fused_rmsnorm_rope.qk_fwd"


def _fits(cfg: dict[str, Any], problem: dict[str, int] | None) -> bool:
    """Prune configs that waste threads on padding or put too much of a large row in one program."""
    if problem is None:
        return True
    elems = problem["row_elems"]
    if cfg["num_warps"] * 32 * 2 > max(elems, 64):  # under 2 elements a thread: idle lanes
        return False
    if cfg["ROWS_PER_PROG"] > 1 and elems * cfg["ROWS_PER_PROG"] > 8192:
        return False
    return cfg["ROWS_PER_PROG"] <= max(problem["tokens"], 1)


_SPACE_PARAMS = {"num_warps": [1, 2, 4, 8, 16], "ROWS_PER_PROG": [1, 2, 4]}

RMSNORM_ROPE_CONFIGS = ConfigSpace(_SPACE_PARAMS, constraints=[_fits])


def heuristic_config(row_elems: int, tokens: int, qk: bool = False) -> dict[str, int]:
    """The measured default: ``row_elems`` is the padded number of elements of one row (one token).

    Measured on the H100 (fp16, head_dim 128, L2 flushed): 4 warps were best or within 1 % for rows of 2048, 4096
    and 8192 elements with at least 8192 tokens (9 % faster than 16 warps on 8192-element rows, 23 % on 4096);
    8 warps were best for 2048 tokens of 4096 elements (3 % over 4: fewer programs, so each keeps more bytes in
    flight); two or four rows per program were 3-13 % slower at the best warp count. The QK kernel (q then k heads
    in one program) was best with 8 warps on 32 + 8 heads of 128 (37.1 µs against 37.6 with 2 and 40.9 with 16).
    """
    if row_elems <= 256:
        warps = 1
    elif row_elems <= 1024:
        warps = 2
    elif qk:
        warps = 8
    elif row_elems <= 4096 and tokens <= 4096:
        warps = 8
    else:
        warps = 4
    return {"num_warps": warps, "ROWS_PER_PROG": 1}


_cache: dict[tuple, dict[str, int]] = {}


def get_config(kernel: str, row_elems: int, tokens: int, dtype: torch.dtype, device: torch.device,
               bench: Callable[[dict[str, Any]], Callable[[], Any]] | None = None) -> dict[str, int]:
    """The config of one launch; after the first call for a (kernel, size, token bucket, dtype, device) a dict hit.

    ``bench(config)`` returns a callable launching the kernel once with ``config`` on the caller's tensors: with
    ``KERNEL_AUTOTUNE=1`` (or inside ``kernel_autotune.tuning_session``), ``select_config`` tunes the problem with
    it on first use and caches the result on disk.
    """
    bucket = max(int(tokens), 1).bit_length()
    key = (kernel, row_elems, bucket, dtype, device)
    cfg = _cache.get(key)
    if cfg is None:
        default = heuristic_config(row_elems, tokens, qk=kernel == QK_FWD_KERNEL)
        cfg = select_config(
            kernel,
            version=__version__,
            problem={"tokens": int(tokens), "row_elems": int(row_elems)},
            dtypes=(dtype,),
            device=device,
            default=default,
            bucket=("tokens",),
            shipped=SHIPPED_CONFIGS,
            space=RMSNORM_ROPE_CONFIGS,
            bench=bench,
        )
        cfg = {"num_warps": int(cfg["num_warps"]), "ROWS_PER_PROG": int(cfg["ROWS_PER_PROG"])}
        _cache[key] = cfg
    return cfg


def clear_config_cache() -> None:
    """Forget the in-process config lookups (tests and tuning scripts; see also ``fused_rmsnorm_rope.clear_caches``)."""
    _cache.clear()


__all__ = ["RMSNORM_ROPE_CONFIGS", "clear_config_cache", "get_config", "heuristic_config"]
