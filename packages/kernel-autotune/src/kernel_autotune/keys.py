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
from triton_ops_core.device import is_interpreter
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.launch import next_pow2
from triton_ops_core.models import dtype_name

CPU_INTERPRETER = "cpu-interpreter"


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


@functools.lru_cache(maxsize=64)
def _cuda_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)


def device_key(device: torch.device | str | int | None = None) -> str:
    """The device part of a key: the GPU's product name, or ``"cpu-interpreter"``.

    ``None`` means the current CUDA device when one is usable (and the interpreter is off),
    else the CPU interpreter.
    """
    if isinstance(device, int):
        device = torch.device("cuda", device)
    elif isinstance(device, str):
        device = torch.device(device)
    if device is None:
        if torch.cuda.is_available() and not is_interpreter():
            return _cuda_name(torch.cuda.current_device())
        return CPU_INTERPRETER
    if device.type == "cuda":
        if is_interpreter() or not torch.cuda.is_available():
            return CPU_INTERPRETER
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        return CPU_INTERPRETER
    return device.type


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
) -> dict[str, Any]:
    """The full key dict of one tuned entry, with the problem bucketed.

    ``device_name`` overrides the name found from ``device`` (to address another machine's entries).
    """
    if not isinstance(kernel, str) or not kernel:
        raise InvalidArgumentError(f"kernel name: expected a non-empty string, got {kernel!r}")
    return {
        "kernel": kernel,
        "version": str(version),
        "problem": bucket_problem(problem, bucket),
        "dtypes": dtype_names(dtypes),
        "device": device_name if device_name is not None else device_key(device),
        "triton": triton_version(),
    }


def key_string(key: Mapping[str, Any]) -> str:
    """The canonical text of a key dict: the entry's name in a cache file."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def relaxed_key_string(key: Mapping[str, Any]) -> str:
    """A key without the package and Triton versions: how a shipped file is matched as a fallback.

    Shipped results travel with the package they were tuned for; a newer Triton still runs the
    same launch configs, so a shipped entry tuned under another Triton beats the heuristic.
    """
    return key_string({k: v for k, v in key.items() if k not in ("version", "triton")})


__all__ = [
    "CPU_INTERPRETER",
    "bucket_problem",
    "device_key",
    "dtype_names",
    "key_string",
    "make_key",
    "next_pow2",
    "relaxed_key_string",
    "triton_version",
]
