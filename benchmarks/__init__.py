"""The triton-ops benchmark suite, runnable from a checkout.

    python -m benchmarks                       # every kernel: full sweep on a GPU, interpreter check without one
    python -m benchmarks.bench_rmsnorm_rope    # one family (also bench_gated_mlp, bench_fp8_gemm, bench_moe)

Each takes ``--out DIR`` (default ``docs/benchmarks`` on a GPU) and ``--quick``. Without a GPU the kernels run on
small shapes under Triton's interpreter, correctness is checked, nothing is timed, and the exit status is non-zero
if a kernel is wrong. The packages are imported from the environment, or from this checkout's ``src`` folders when
they are not installed (so ``PYTHONPATH`` is optional).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _prepare() -> None:
    # Triton reads TRITON_INTERPRET when a kernel is decorated: decide before any kernel module is imported.
    if "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    if importlib.util.find_spec("triton_ops") is None:
        srcs = [ROOT / "shared" / "src", *sorted((ROOT / "packages").glob("*/src"))]
        sys.path[:0] = [str(p) for p in srcs if p.is_dir()]


_prepare()
