"""Decode attention in plain eager calls, the splits merged by a combine launch or inside the attention launch.

    python -m benchmarks.dev.attention_one_launch [--cases llama:1x1024,llama:8x1024,gptoss:1x1024] [--copies 32]

``decode_attention.ops.COMBINE_IN_LAUNCH`` decides whether an eager call with more than one split launches the
combine kernel (off) or lets the last split of each row block merge the partials (on). For each case, ``--copies``
layers' caches are called back to back, as a patched model's eager decode step calls them, both ways: the outputs
compared bit for bit, then the wall time per call (host included: what an eager ``generate()`` pays) and the GPU time
per call (profiler, kernels summed) with the kernels' names. Needs a GPU; lines go to stdout.
"""

from __future__ import annotations

import argparse
import time

import torch

from .attention_decode import HEADS, make_layers, profile_kernels


def _wall_us(fn, copies: int, reps: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps / copies * 1e6


def _gpu_us(fn, copies: int) -> tuple[float, dict[str, float]]:
    names = {k: v / copies for k, v in profile_kernels(fn).items()}
    return sum(names.values()), names


def run_case(heads: str, batch: int, context: int, copies: int, profile: bool) -> dict:
    """Both ways, of one case: ``{merged: (outputs, wall us)}``, or with ``profile`` ``{merged: (GPU us, names)}``."""
    from decode_attention import decode_attention, ops

    q, layers, mask = make_layers(heads, batch, context, copies)
    step = lambda: [decode_attention(q, k, v, mask) for k, v in layers]  # noqa: E731
    saved, out = ops.COMBINE_IN_LAUNCH, {}
    try:
        for merged in (False, True):
            ops.COMBINE_IN_LAUNCH = merged
            ops.clear_caches()
            first = [o.clone() for o in step()]
            out[merged] = _gpu_us(step, copies) if profile else (first, _wall_us(step, copies))
    finally:
        ops.COMBINE_IN_LAUNCH = saved
        ops.clear_caches()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.attention_one_launch",
                                description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="llama:1x1024,llama:8x1024,llama:1x8192,gptoss:1x1024",
                   help=f"heads ({', '.join(HEADS)}):BATCHxCONTEXT, comma-separated")
    p.add_argument("--copies", type=int, default=32)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_one_launch needs a GPU")
        return 2
    print(torch.cuda.get_device_name(), torch.__version__)
    cases = []
    for case in args.cases.split(","):
        heads, shape = case.split(":")
        cases.append((heads, *(int(v) for v in shape.split("x"))))
    # every case's wall times before any profiling: the profiler's CUDA callbacks may outlive it and slow launches
    walls = {c: run_case(*c, args.copies, profile=False) for c in cases}
    for c in cases:
        gpus = run_case(*c, args.copies, profile=True)
        same = all(torch.equal(a, b) for a, b in zip(walls[c][False][0], walls[c][True][0]))
        for merged in (False, True):
            gpu, names = gpus[merged]
            kernels = ", ".join(f"{k} {v:.2f}" for k, v in names.items())
            print(f"{c[0]} {c[1]}x{c[2]} merged_in_launch={merged}: wall {walls[c][merged][1]:.2f} us/call, "
                  f"GPU {gpu:.2f} us/call ({kernels}); same bits={same}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
