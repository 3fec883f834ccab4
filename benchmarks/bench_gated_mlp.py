"""Fused gated MLP against eager, torch.compile, one concatenated cuBLAS GEMM and Liger: ``python -m
benchmarks.bench_gated_mlp``.

On a GPU: bf16, (hidden, intermediate) = (4096, 5632), (4096, 11264), (6144, 22528); decode M = 1, 8, 32, 64
(weight streaming, % of copy bandwidth) and prefill M = 2048, 8192 (TFLOP/s, % of cuBLAS); peak memory vs eager.
Then one gpt-oss expert (2880 x 2880, interleaved packed weight and bias, clamped SwiGLU) at M = 1, 8, 32, 64 and
2048 against the model's own PyTorch code.
"""

from __future__ import annotations

import sys

import torch

from ._common import run_groups

DIMS = [(4096, 5632), (4096, 11264), (6144, 22528)]


def run(suite, quick: bool = False) -> None:
    if not suite.on_gpu:
        suite.benchmark_gated_mlp(batch_sizes=(1, 5), hidden_dims=(), intermediate_dims=(),
                                  shapes=[(64, 96)], dtypes=(torch.float16, torch.bfloat16))
        suite.benchmark_gpt_oss_expert(batch_sizes=(3,), hidden=64, intermediate=48)
        return
    if quick:
        suite.benchmark_gated_mlp(batch_sizes=(1, 64, 2048), hidden_dims=(), intermediate_dims=(),
                                  shapes=[(4096, 11264)])
        return
    suite.benchmark_gated_mlp(batch_sizes=(1, 8, 32, 64, 2048, 8192), hidden_dims=(), intermediate_dims=(),
                              shapes=DIMS, dtypes=(torch.bfloat16,))
    suite.benchmark_gpt_oss_expert()


def main(argv=None) -> int:
    return run_groups({"gated-mlp": run}, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
