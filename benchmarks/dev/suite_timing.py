"""The published suite's timing for the sweeps, through ``triton_ops.benchmark``'s public API.

``BenchmarkSuite.run_case`` checks one hand-built case against its reference, then times it as the suite times
every case: CUDA events, median, L2 zero-filled before every run, and for bandwidth-bound cases again with L2
emptied by a read (``clean_ms``: no dirty lines for the timed kernel to write back). A sweep timed this way compares
directly with the published reports, and its ceilings (a copy of the same bytes, the peak copy, the kernel that
only reads a gated MLP's weights) are the suite's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from triton_ops.benchmark import BenchmarkSuite, Case, CaseResult, Impl, ImplResult


def sweep_suite(benchmark_runs: int = 100, max_ms: float = 40.0) -> BenchmarkSuite:
    """A suite that times only what it is handed: no torch.compile, Liger or CUDA-graph extras, no progress lines.

    ``max_ms`` caps one zero-filled measurement; the suite gives the clean-L2 one half of it.
    """
    return BenchmarkSuite(10, benchmark_runs, max_ms_per_measurement=max_ms, cuda_graphs=False,
                          compile_baselines=False, liger=False, progress=False, verbose=False)


def timed(suite: BenchmarkSuite, name: str, fn: Callable[[], Any],
          reference: Callable[[], torch.Tensor] | None = None, tol: float = 1e-2, clean: bool = False) -> ImplResult:
    """``fn`` checked against ``reference()`` (relative error at most ``tol``; no check without a reference), then
    timed with L2 zero-filled and, with ``clean``, again with L2 emptied by a read.

    A call that raises or a wrong result is not timed: ``timing`` is None, ``status`` and ``message`` say why.
    """
    unchecked = {"error_fn": lambda out: 0.0} if reference is None else {}
    impl = Impl(name, fn, role="ours", **unchecked)
    # The suite takes the clean-L2 time of bandwidth-bound ("gbps") cases only.
    case = Case(group="sweep", name=name, dtype="", reference=reference, impls=[impl], tol=tol,
                metric="gbps" if clean else "tflops")
    return suite.run_case(case).impls[0]


def gated_mlp_case(suite: BenchmarkSuite, tokens: int, hidden: int, intermediate: int) -> CaseResult:
    """The suite's own bf16 gated-MLP case at one shape: the package's choice ("triton-ops"), eager, one cuBLAS GEMM
    on the concatenated weights ("cuBLAS cat-GEMM") and, at decode sizes, the kernel that only reads both weights
    ("weights read", the streaming ceiling), each with its zero-filled and clean-L2 time."""
    return suite.benchmark_gated_mlp(batch_sizes=[tokens], hidden_dims=[hidden], intermediate_dims=[intermediate])[0]
