"""Cache keys: what a tuned config depends on, and nothing else.

A key names the kernel and its package version, the problem size (bucketed), the dtypes, the GPU and
the Triton version. It never names the config list: adding a config to a space keeps old results.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from triton_ops_core.device import device_info
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.launch import next_pow2
from triton_ops_core.models import dtype_name

CPU_INTERPRETER = "cpu-interpreter"
_UNSET = object()


def bucket_problem(problem: Mapping[str, int], bucket: Iterable[str] = ()) -> dict[str, int]:
    """``problem`` with the dimensions named in ``bucket`` rounded up to the next power of two.

    Token counts vary from call to call; rounding them keeps one tuned entry per size class
    instead of one per exact count. Other dimensions (hidden sizes) are kept exact.
    """
    if not isinstance(problem, Mapping):
        raise InvalidArgumentError(f"problem: expected a mapping of dimension name -> int, got {problem!r}")
    bucket = set(bucket)
    unknown = bucket - set(problem)
    if unknown:
        raise InvalidArgumentError(f"bucket: {sorted(unknown)} are not dimensions of problem {dict(problem)}")
    out: dict[str, int] = {}
    for k, v in problem.items():
        if isinstance(v, bool) or not isinstance(v, int):
            try:
                v = int(v)
            except (TypeError, ValueError):
                raise InvalidArgumentError(f"problem[{k!r}]: expected an int, got {v!r}") from None
        out[str(k)] = next_pow2(v) if k in bucket else int(v)
    return out


def device_identity(device: torch.device | str | int | None = None) -> tuple[str, str | None]:
    """``(product name, compute capability)`` of ``device``: ``("NVIDIA H200", "9.0")``, or
    ``("cpu-interpreter", None)``. What every key, shipped table and warning names a GPU by.

    ``None`` means the current CUDA device when one is usable (and the interpreter is off), else the CPU
    interpreter. Inside ``triton_ops_core.device.simulate_device``, the simulated device.
    """
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device) and device.type not in ("cuda", "cpu") and not _simulating():
        return device.type, None
    return device_info(device).identity


def _simulating() -> bool:
    return device_info(torch.device("cpu")).is_gpu


def device_key(device: torch.device | str | int | None = None) -> str:
    """The device name part of a key: the GPU's product name, or ``"cpu-interpreter"`` (see :func:`device_identity`)."""
    return device_identity(device)[0]


@functools.lru_cache(maxsize=1)
def triton_version() -> str:
    """The installed Triton's version string (part of every key: codegen changes between releases)."""
    import triton

    return str(triton.__version__)


def dtype_names(dtypes: Iterable[torch.dtype | str]) -> list[str]:
    """Stable dtype spellings for a key (``"bfloat16"``)."""
    return [d if isinstance(d, str) else dtype_name(d) for d in dtypes]


def make_key(
    kernel: str,
    *,
    version: str,
    problem: Mapping[str, int],
    dtypes: Iterable[torch.dtype | str] = (),
    device: torch.device | str | int | None = None,
    bucket: Iterable[str] = (),
    device_name: str | None = None,
    capability: str | None | object = _UNSET,
) -> dict[str, Any]:
    """The full key dict of one tuned entry, with the problem bucketed.

    The device is named by product name and compute capability (``"device"``, ``"capability"``). ``device_name``
    and ``capability`` override what ``device`` says (to address another machine's entries).
    """
    if not isinstance(kernel, str) or not kernel:
        raise InvalidArgumentError(f"kernel name: expected a non-empty string, got {kernel!r}")
    name, cap = device_identity(device) if device_name is None or capability is _UNSET else (None, None)
    return {
        "kernel": kernel,
        "version": str(version),
        "problem": bucket_problem(problem, bucket),
        "dtypes": dtype_names(dtypes),
        "device": device_name if device_name is not None else name,
        "capability": cap if capability is _UNSET else capability,
        "triton": triton_version(),
    }


def key_string(key: Mapping[str, Any]) -> str:
    """The canonical text of a key dict: the entry's name in a cache file."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def relaxed_key_string(key: Mapping[str, Any]) -> str:
    """A key without the package and Triton versions: how a shipped file is matched as a fallback.

    Shipped results travel with the package they were tuned for; a newer Triton still runs the
    same launch configs, so a shipped entry tuned under another Triton beats the heuristic. The device's
    name and compute capability stay: a shipped entry only ever serves the GPU it was tuned on.
    """
    return key_string({k: v for k, v in key.items() if k not in ("version", "triton")})


def legacy_key_string(key: Mapping[str, Any]) -> str:
    """A relaxed key without the compute capability: how entries written before keys named it (kernel-autotune
    0.1) are matched, by exact product name."""
    return key_string({k: v for k, v in key.items() if k not in ("version", "triton", "capability")})


__all__ = [
    "CPU_INTERPRETER",
    "bucket_problem",
    "device_identity",
    "device_key",
    "dtype_names",
    "key_string",
    "legacy_key_string",
    "make_key",
    "next_pow2",
    "relaxed_key_string",
    "triton_version",
]
