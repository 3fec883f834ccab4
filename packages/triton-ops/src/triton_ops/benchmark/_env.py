"""What a benchmark ran on: device, clocks, library versions, the command and the commit."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

_PACKAGES = ("triton-ops", "triton-ops-core", "kernel-autotune", "fused-rmsnorm-rope", "fused-gated-mlp", "fp8-gemm")


def _version(dist: str, module: str | None = None) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    if module is None:
        return None
    try:  # running from source (PYTHONPATH): the package's own __version__
        mod = __import__(module)
        return getattr(mod, "__version__", None)
    except Exception:
        return None


def _nvidia_smi() -> dict[str, str]:
    """Clocks, power limit and driver from nvidia-smi; empty when it is absent or refuses."""
    fields = ["driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem", "power.limit",
              "temperature.gpu"]
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    if not out:
        return {}
    values = [v.strip() for v in out[0].split(",")]
    return {k: v for k, v in zip(fields, values) if v and "N/A" not in v and "Not Supported" not in v}


def _git_commit() -> str | None:
    """The checkout's commit: ``GIT_COMMIT`` when set (a tree copied to a GPU box may carry a stale .git), else
    git's HEAD."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path.cwd())
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def collect_environment(measured: bool) -> dict[str, Any]:
    """A JSON-ready record of where and how the run happened."""
    import triton

    env: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.orig_argv[1:]])
        if hasattr(sys, "orig_argv") else " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "timed": measured,
        "git_commit": _git_commit(),
        "packages": {d: _version(d, d.replace("-", "_")) for d in _PACKAGES},
        "liger_kernel": _version("liger-kernel"),
    }
    if torch.cuda.is_available() and not env["interpreter"]:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["device"] = props.name
        env["sm_count"] = props.multi_processor_count
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        l2 = getattr(props, "L2_cache_size", None)
        if l2:
            env["l2_mib"] = round(l2 / 2**20, 1)
        env["nvidia_smi"] = _nvidia_smi()
    else:
        env["device"] = "cpu (triton interpreter)" if env["interpreter"] else "cpu"
    return env


def device_tag(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``: the suffix of report-<tag>.md."""
    for known in ("H100", "H200", "H800", "H20", "B200", "GB200", "A100", "L40S", "L4", "A10"):
        if re.search(rf"\b{known}\b", name):
            return known.lower()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return slug or "device"
