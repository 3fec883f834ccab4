"""The triton-ops benchmark suite: every kernel against PyTorch eager, ``torch.compile``, cuBLAS and Liger-Kernel,
checked for correctness first, timed with device events, reported as Markdown, JSON and PNG.

``python -m benchmarks`` (from the repository) runs the whole sweep; ``BenchmarkSuite`` is the library behind it.
"""

from ._cases import TOLERANCES, CaseFactory
from ._model import Case, CaseResult, Impl, ImplResult, Timing
from ._report import headline_table
from ._suite import BenchmarkSuite

__all__ = ["TOLERANCES", "BenchmarkSuite", "Case", "CaseFactory", "CaseResult", "Impl", "ImplResult", "Timing",
           "headline_table"]
