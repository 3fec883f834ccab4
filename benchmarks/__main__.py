"""``python -m benchmarks``: every family, then the combined report (``docs/benchmarks/report-<device>.md``)."""

from __future__ import annotations

import sys

from . import bench_attention, bench_fp8_gemm, bench_gated_mlp, bench_moe, bench_rmsnorm_rope
from ._common import run_groups


def main(argv=None) -> int:
    return run_groups(
        {"rmsnorm-rope": bench_rmsnorm_rope.run, "gated-mlp": bench_gated_mlp.run, "fp8-gemm": bench_fp8_gemm.run,
         "moe": bench_moe.run, "attention": bench_attention.run},
        "The triton-ops benchmark suite (every kernel against every baseline).", argv, combined=True,
    )


if __name__ == "__main__":
    sys.exit(main())
