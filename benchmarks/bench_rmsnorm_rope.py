"""Fused RMSNorm + RoPE against eager, torch.compile and Liger-Kernel: ``python -m benchmarks.bench_rmsnorm_rope``.

On a GPU: the issue's shapes (2,1024,4096), (1,8192,4096), (4,2048,8192), (8,4096,2048), (16,8192,4096) in fp16
and bf16, head_dim 128; decode (64 tokens x 4096, position_ids, CUDA-graph time too); ``fused_qk_norm_rope`` on
Qwen3-8B heads (32 q / 8 kv x 128) as strided views of a packed QKV output.
"""

from __future__ import annotations

import sys

import torch

from ._common import run_groups

SHAPES = [(2, 1024, 4096), (1, 8192, 4096), (4, 2048, 8192), (8, 4096, 2048), (16, 8192, 4096)]


def run(suite, quick: bool = False) -> None:
    if not suite.on_gpu:  # interpreter: small shapes, every path
        suite.benchmark_rmsnorm_rope(shapes=[(2, 8, 256), (1, 5, 192)], dtypes=(torch.float16, torch.bfloat16),
                                     head_dim=64)
        suite.benchmark_rmsnorm_rope_decode(num_tokens=(4,), hidden_dims=(256,), head_dim=64, max_position=64)
        suite.benchmark_qk_norm_rope(batch_sizes=(1,), seq_lens=(6,), num_q_heads=4, num_kv_heads=2, head_dim=64)
        suite.benchmark_add_rmsnorm(num_tokens=(3,), hidden_dims=(200,), dtypes=(torch.float16, torch.bfloat16))
        return
    if quick:
        suite.benchmark_rmsnorm_rope(shapes=SHAPES[:2], dtypes=(torch.bfloat16,))
        suite.benchmark_rmsnorm_rope_decode()
        suite.benchmark_qk_norm_rope(batch_sizes=(1,), seq_lens=(8192,))
        return
    # Ordered so that a run cut short by --budget-s loses the least: bf16 prefill, decode, QK-norm, then fp16.
    suite.benchmark_rmsnorm_rope(shapes=SHAPES, dtypes=(torch.bfloat16,))
    suite.benchmark_rmsnorm_rope_decode(num_tokens=(64,), hidden_dims=(4096,), dtypes=(torch.bfloat16,))
    suite.benchmark_qk_norm_rope(batch_sizes=(1, 8), seq_lens=(2048,), dtypes=(torch.bfloat16,))
    suite.benchmark_qk_norm_rope(batch_sizes=(1,), seq_lens=(8192,), dtypes=(torch.bfloat16,), packed=False)
    suite.benchmark_add_rmsnorm(num_tokens=(1, 64, 2048, 8192), hidden_dims=(4096,))
    suite.benchmark_rmsnorm_rope(shapes=SHAPES, dtypes=(torch.float16,))


def main(argv=None) -> int:
    return run_groups({"rmsnorm-rope": run}, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
