"""The environment of the subprocess tests: this folder importable, a given cache directory, the interpreter as in
the parent. (A module of its own, not conftest: one pytest run over several packages' tests has several conftests.)"""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def subprocess_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["KERNEL_AUTOTUNE_CACHE_DIR"] = str(cache_dir)
    env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env
