"""Launch configs: the tunable space, the measured heuristic, and the cached lookup on the call path.

A config is ``{"num_warps": w, "ROWS_PER_PROG": r}``: ``w`` warps share one row held in registers, and each program
handles ``r`` consecutive tokens (several rows per program amortize the per-program setup for small rows).

The heuristic (``heuristic_config``) comes from a sweep of this space on the lent H100 (see its docstring and the
package README, "Performance"), with its token threshold scaled by the device's SM count. ``select_config``
(kernel-autotune) serves the shipped table of the GPU it runs on (product name and compute capability: the H100's,
the H200's) before it, and tunes on first use on a GPU the table does not cover (``TRITON_OPS_AUTOTUNE``).

``rmsnorm`` and ``fused_add_rmsnorm`` take ``{"num_warps": w}`` from :func:`get_norm_config` (one program per row).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from kernel_autotune import ConfigSpace, select_config
from triton_ops_core.device import sm_count

from .__about__ import __version__

SHIPPED_CONFIGS = Path(__file__).with_name("tuned_configs.json")
FWD_KERNEL = "fused_rmsnorm_rope.fwd"
QK_FWD_KERNEL = "fused_rmsnorm_rope.qk_fwd"
NORM_KERNEL = "fused_rmsnorm_rope.norm"
ADD_NORM_KERNEL = "fused_rmsnorm_rope.add_norm"
_H100_SMS = 132  # the sweep's GPU: thresholds in token counts below are scaled by a device's SMs over this


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


def heuristic_config(row_elems: int, tokens: int, qk: bool = False,
                     device: torch.device | None = None) -> dict[str, int]:
    """The measured default: ``row_elems`` is the padded number of elements of one row (one token).

    Measured on the H100 (fp16, head_dim 128, L2 flushed): 4 warps were best or within 1 % for rows of 2048, 4096
    and 8192 elements with at least 8192 tokens (9 % faster than 16 warps on 8192-element rows, 23 % on 4096);
    8 warps were best for 2048 tokens of 4096 elements (3 % over 4: fewer programs, so each keeps more bytes in
    flight); two or four rows per program were 3-13 % slower at the best warp count. The QK kernel (q then k heads
    in one program) was best with 8 warps on 32 + 8 heads of 128 (37.1 µs against 37.6 with 2 and 40.9 with 16).

    The "few programs" threshold (4096 tokens on the H100's 132 SMs: about 31 rows per SM) scales with ``device``'s
    SM count (``None``, or the CPU interpreter: the H100's).
    """
    sms = _H100_SMS if device is None else sm_count(device, cpu=_H100_SMS)
    if row_elems <= 256:
        warps = 1
    elif row_elems <= 1024:
        warps = 2
    elif qk:
        warps = 8
    elif row_elems <= 4096 and tokens * _H100_SMS <= 4096 * sms:
        warps = 8
    else:
        warps = 4
    return {"num_warps": warps, "ROWS_PER_PROG": 1}


_cache: dict[tuple, dict[str, int]] = {}


def get_config(kernel: str, row_elems: int, tokens: int, dtype: torch.dtype, device: torch.device,
               bench: Callable[[dict[str, Any]], Callable[[], Any]] | None = None) -> dict[str, int]:
    """The config of one launch; after the first call for a (kernel, size, token bucket, dtype, device) a dict hit.

    ``bench(config)`` returns a callable launching the kernel once with ``config`` on the caller's tensors:
    ``select_config`` tunes the problem with it on first use and caches the result on disk when
    ``TRITON_OPS_AUTOTUNE`` says so (by default on a GPU this package ships no configs for; ``=1``: always, ``=0``:
    never; never during a CUDA-graph capture or a ``torch.compile`` trace), or inside
    ``kernel_autotune.tuning_session``.
    """
    bucket = max(int(tokens), 1).bit_length()
    key = (kernel, row_elems, bucket, dtype, device)
    cfg = _cache.get(key)
    if cfg is None:
        default = heuristic_config(row_elems, tokens, qk=kernel == QK_FWD_KERNEL, device=device)
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


# ---- rmsnorm / fused_add_rmsnorm: one program per row ----------------------------------------------------------


def _norm_fits(cfg: dict[str, Any], problem: dict[str, int] | None) -> bool:
    """Prune warps that would hold under 2 elements of a row's block each (idle lanes)."""
    return problem is None or cfg["num_warps"] * 32 * 2 <= max(problem["block"], 64)


NORM_CONFIGS = ConfigSpace({"num_warps": [1, 2, 4, 8, 16]}, constraints=[_norm_fits])


def norm_heuristic(block: int, element_size: int) -> dict[str, int]:
    """The default of ``rmsnorm`` / ``fused_add_rmsnorm``: ``block`` is the padded row tile (``hidden`` up to 8192).
    Rows of 16 KB and more stream best with 8 warps; a short row needs few."""
    warps = 8 if block * element_size >= 16384 else 4 if block >= 1024 else 2
    return {"num_warps": warps}


def get_norm_config(hidden: int, block: int, tokens: int, dtype: torch.dtype, device: torch.device,
                    residual: bool = False, bench: Callable[[dict[str, Any]], Callable[[], Any]] | None = None,
                    ) -> dict[str, int]:
    """The ``num_warps`` of one ``rmsnorm`` (``residual=False``) or ``fused_add_rmsnorm`` launch: cached, shipped for
    this GPU, tuned on first use with ``bench`` (see :func:`get_config`), else :func:`norm_heuristic`."""
    kernel = ADD_NORM_KERNEL if residual else NORM_KERNEL
    bucket = max(int(tokens), 1).bit_length()
    key = (kernel, hidden, block, bucket, dtype, device)
    cfg = _cache.get(key)
    if cfg is None:
        cfg = select_config(
            kernel,
            version=__version__,
            problem={"tokens": int(tokens), "hidden": int(hidden), "block": int(block)},
            dtypes=(dtype,),
            device=device,
            default=norm_heuristic(block, dtype.itemsize),
            bucket=("tokens",),
            shipped=SHIPPED_CONFIGS,
            space=NORM_CONFIGS,
            bench=bench,
        )
        cfg = {"num_warps": int(cfg["num_warps"])}
        _cache[key] = cfg
    return cfg


def clear_config_cache() -> None:
    """Forget the in-process config lookups (tests and tuning scripts; see also ``fused_rmsnorm_rope.clear_caches``)."""
    _cache.clear()


__all__ = [
    "ADD_NORM_KERNEL",
    "NORM_CONFIGS",
    "NORM_KERNEL",
    "RMSNORM_ROPE_CONFIGS",
    "clear_config_cache",
    "get_config",
    "get_norm_config",
    "heuristic_config",
    "norm_heuristic",
]
