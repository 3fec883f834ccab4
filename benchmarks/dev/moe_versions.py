"""Device script: one fused-moe version's ``moe_experts`` at decode, for comparing versions (regression bisects).

    python -m benchmarks.dev.moe_versions [--tag NAME] [--tokens 1,2,4,8] [--variants bf16,fp8] [--profile 1,8]

Times ``moe_experts`` (grouping, both grouped GEMMs, combine) on gpt-oss-20b's layer with bf16 experts and
weight-only E4M3 experts, in CUDA graphs of eight different routings (``moe_tiles.graph_us``), with whichever
``fused_moe`` and ``triton_ops_core`` come first on ``PYTHONPATH``; it calls only the public API that every version
since session 14 has (``moe_experts``, ``quantize_experts_fp8``). At the ``--profile`` token counts it also splits
each call by kernel (torch.profiler, eager calls). To compare a commit with the checkout, on the GPU machine:

    git archive <rev> shared/src packages/fused-moe/src | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/shared/src:/tmp/old/packages/fused-moe/src:$PWD python -m benchmarks.dev.moe_versions --tag old

How session 30 found that ae47269 (one-row FP8 tiles accumulated in the weight tile's layout) had made FP8 experts
1.75x slower at one token (docs/benchmarks/dev/moe/fp8_one_row-*-h100-session30.log).
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

from benchmarks.dev.moe_tiles import HIDDEN, TOP_K, E, expert_weights, graph_us, routings


def kernel_split(calls: list) -> str:
    """The four largest kernels of one call (microseconds of GPU time, mean over three rounds of ``calls``)."""
    from torch.profiler import ProfilerActivity, profile

    for call in calls:
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            for call in calls:
                call()
        torch.cuda.synchronize()
    n = 3 * len(calls)
    rows = sorted(((e.key, e.device_time_total / n) for e in prof.key_averages() if e.device_time_total > 0),
                  key=lambda r: -r[1])
    return ", ".join(f"{name[:24]} {us:.1f}" for name, us in rows[:4])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tag", default="checkout", help="label of this version in the output lines")
    p.add_argument("--tokens", default="1,2,4,8")
    p.add_argument("--variants", default="bf16,fp8", help="bf16 and/or fp8 (weight-only E4M3 experts)")
    p.add_argument("--profile", default="1,8", help="token counts split by kernel ('' for none)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("moe_versions needs a CUDA GPU", file=sys.stderr)
        return 2
    from fused_moe import moe_experts

    w = expert_weights(torch.device("cuda"))
    b1, b2 = w["biases"]

    def call(x, ids, wts, ga, gs, da, ds):
        return moe_experts(x, ids, wts, ga, b1, da, b2, gate_up_scale=gs, down_scale=ds)

    profiled = {int(t) for t in args.profile.split(",") if t}
    for t in (int(v) for v in args.tokens.split(",")):
        x = torch.randn(t, HIDDEN, device="cuda").bfloat16()
        for name in args.variants.split(","):
            calls = [functools.partial(call, x, ids, wts, *w[name]) for ids, wts in routings(t, x.device)]
            split = kernel_split(calls) if t in profiled else ""
            print(f"{args.tag} tokens={t} experts={E}x top{TOP_K} {name} us={graph_us(lambda c: c(), calls):.1f}"
                  f" | {split}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
