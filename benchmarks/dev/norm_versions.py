"""Device script: fused-rmsnorm-rope's decode-size norms as a decode step chains them, for comparing versions.

    python -m benchmarks.dev.norm_versions [--tag NAME] [--rows 1,8,64] [--hidden 2880,3840,4096,5120]

A decode step runs its norms back to back on a few rows, each waiting on the one before: what a launch costs there
is its latency chain (load the row, reduce, load the weight, write), not bandwidth. This times, per (rows, hidden),
a CUDA graph of 32 dependent calls (each call's output is the next one's input) of ``rmsnorm``,
``fused_add_rmsnorm`` (in place, as a decoder layer's residual stream), ``rmsnorm_add_rmsnorm`` and ``rmsnorm_add``
(Gemma's sandwich norms), bf16, and prints microseconds per call (median of 9 replays). It calls only the public API
that every version since the sandwich norms (fca1115, session 24) has, so that another version can be timed by
putting it first on ``PYTHONPATH``:

    git archive <rev> shared/src packages/fused-rmsnorm-rope/src | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/shared/src:/tmp/old/packages/fused-rmsnorm-rope/src:$PWD \
        python -m benchmarks.dev.norm_versions --tag old

For session 27's two changes (9b9e233: the sandwich kernel issues every load before its first reduction; 00d1ac0: the
one-pass RMSNorm loads its weight with the row), which were never timed: compare the checkout with e637c10.
"""

from __future__ import annotations

import argparse
import sys

import torch

CHAIN = 32


def chain_us(step, x: torch.Tensor) -> float:
    """Microseconds per call of ``CHAIN`` dependent calls of ``step`` (``x -> x``) replayed from one CUDA graph."""
    y = x
    for _ in range(3):
        y = step(y)
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        y = x
        for _ in range(CHAIN):
            y = step(y)
    times = []
    for _ in range(9):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CHAIN)
    return sorted(times)[len(times) // 2]


def steps(residual: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> dict:
    """The norms as ``x -> x`` steps (the residual stream updated in place where the op has one)."""
    import fused_rmsnorm_rope as f

    def add_norm(x):
        y, _ = f.fused_add_rmsnorm(x, residual, w1, 1e-6, inplace=True)
        return y

    def sandwich(x):
        y, _ = f.rmsnorm_add_rmsnorm(x, residual, w1, w2, 1e-6, gemma=True)
        return y

    return {"rmsnorm": lambda x: f.rmsnorm(x, w1, 1e-6),
            "fused_add_rmsnorm": add_norm,
            "rmsnorm_add_rmsnorm": sandwich,
            "rmsnorm_add": lambda x: f.rmsnorm_add(x, residual, w2, 1e-6, gemma=True)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tag", default="checkout", help="label of this version in the output lines")
    p.add_argument("--rows", default="1,8,64")
    p.add_argument("--hidden", default="2880,3840,4096,5120")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("norm_versions needs a CUDA GPU", file=sys.stderr)
        return 2
    for h in (int(v) for v in args.hidden.split(",")):
        w1 = torch.randn(h, device="cuda") * 0.1 + 1
        w2 = torch.randn(h, device="cuda") * 0.1
        for rows in (int(v) for v in args.rows.split(",")):
            x = torch.randn(rows, h, device="cuda").bfloat16()
            residual = torch.randn(rows, h, device="cuda").bfloat16()
            cells = [f"{name} {chain_us(step, x):.2f}"
                     for name, step in steps(residual, w1.bfloat16(), w2.bfloat16()).items()]
            print(f"{args.tag} rows={rows} hidden={h} us/call: " + ", ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
