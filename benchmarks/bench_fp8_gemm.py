"""FP8 quantization, GEMM and FP8Linear against cuBLAS (``torch._scaled_mm``, bf16 ``torch.matmul``) and eager:
``python -m benchmarks.bench_fp8_gemm``.

On a GPU: M = N = K = 4096 and 8192 with per-tensor and per-row/per-channel scales, faithful and fast
accumulation against ``_scaled_mm`` default and ``use_fast_accum=True``; 4096 x 4096 x 16384 (accumulation error
at large K); decode M = 1, 16, 64 with N, K in {4096, 11264}; ``quantize_fp8`` (tensor, row, 1x128 block) against
eager amax + scale + cast and its torch.compile; ``FP8Linear`` against bf16 ``nn.Linear`` at M = 1, 64, 2048, 8192;
accuracy tables (the GEMM's own error per granularity at K = 1024, 4096, 16384, quantization SQNR per granularity).
"""

from __future__ import annotations

import sys

from ._common import run_groups

DECODE_NK = [(4096, 4096), (11264, 4096), (4096, 11264), (11264, 11264)]


def run(suite, quick: bool = False) -> None:
    if not suite.on_gpu:
        suite.benchmark_fp8_gemm(sizes=[(16, 40, 96), (33, 64, 128)], granularities=("tensor", "row"),
                                 decode_m=(1,), decode_nk=[(48, 64)])
        suite.benchmark_quantize_fp8(shapes=[(8, 256)], granularities=("tensor", "row", "block"))
        suite.benchmark_fp8_linear(batch_sizes=(3,), in_features=64, out_features=48)
        suite.benchmark_fp8_accuracy(m=32, n=48, ks=(256,))
        return
    if quick:
        suite.benchmark_fp8_gemm(sizes=[(4096, 4096, 4096)], granularities=("tensor",), decode_m=(1, 64),
                                 decode_nk=[(4096, 4096)])
        suite.benchmark_quantize_fp8(shapes=[(4096, 4096)], granularities=("tensor", "row"))
        suite.benchmark_fp8_linear(batch_sizes=(1, 2048))
        suite.benchmark_fp8_accuracy(ks=(4096,))
        return
    suite.benchmark_fp8_gemm(sizes=[(4096, 4096, 4096), (8192, 8192, 8192)], granularities=("tensor", "row"),
                             decode_m=(1, 16, 64), decode_nk=DECODE_NK)
    suite.benchmark_quantize_fp8(shapes=[(4096, 4096), (8192, 8192)], granularities=("tensor", "row", "block"))
    suite.benchmark_fp8_linear(batch_sizes=(1, 64, 2048, 8192))
    suite.benchmark_fp8_gemm(sizes=[(4096, 4096, 16384)], granularities=("tensor",), decode_m=(), decode_nk=())
    suite.benchmark_fp8_accuracy(m=1024, n=1024, ks=(1024, 4096, 16384))


def main(argv=None) -> int:
    return run_groups({"fp8-gemm": run}, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
