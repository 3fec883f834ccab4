"""Device script: a mixture of experts' decode layer as its launches chain, switch by switch, in CUDA graphs.

    python -m benchmarks.dev.moe_decode_launches [--models gpt-oss-20b,qwen3-30b-a3b] [--tokens 1,8]
        [--weights bf16,fp8,w8a8] [--prefetch]

``fused_moe`` (router, experts, the residual added) over ``moe_tiles.REPS`` different inputs in one graph (so the
experts hit differ between launches and L2 does not serve them), timed as each step below is switched on in turn,
in the same run:

1. ``grouped``: one token's pairs grouped by expert first (``fused_moe.ops.UNGROUPED_ONE_TOKEN`` off), PDL off, the
   router's K split over programs (``ROUTE_ROWS_MAX_TOKENS`` 0);
2. ``ungrouped``: one token's pairs one a tile in their own order, no grouping or combine launch (for FP8 experts'
   one-row tiles this was already so: 1 = 2 there);
3. ``pdl``: the launches with programmatic dependent launch (``triton_ops_core.pdl.override(True)``: the trigger at
   each streaming loop's end, one token's route released early);
4. ``rows``: up to ``ROUTE_ROWS_MAX_TOKENS`` tokens the router's experts split over programs instead of its K
   (``_router_rows_kernel``), as shipped;
5. with ``--prefetch``, ``prefetch``: also the router split's and the down GEMM's first weights asked of L2 before
   their wait (``fused_moe.ops.PREFETCH_TILES`` 2; off as shipped).

Each row also gives the weight-read floor: the bytes of the router and of the experts the routings hit (each
expert's gate/up and down weights, scales and biases, once per launch), over the copy bandwidth this run measures,
and the share of it each step reaches (issue 15: at least 80 % at decode). ``--weights``: ``bf16``, ``fp8``
(weight-only E4M3 experts, per-column scales), ``fp8-block`` (128x128 blocks, Qwen3-MoE's layout only) and ``w8a8``
(K-major E4M3 experts, the activations quantized too: ``fp8_activations=True``); each FP8 row also gives its time
over bf16's (issue 15: at most 0.6 at decode). Every step but ``rows`` must give the bits
of the one before it (``same bits``; the rows router sums each logit in another order, so a near tie may choose
otherwise: its ids are compared with the step before, ``same experts``). Lines go to stdout and, as JSON, to
``$OUT/moe_decode_launches.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import torch

from benchmarks.bench_fp8_decode import copy_gbps
from benchmarks.dev.moe_tiles import MODELS, REPS, expert_weights, graph_us

STEPS = ("grouped", "ungrouped", "pdl", "rows")


@contextlib.contextmanager
def switched(step: str):
    """fused-moe's switches and PDL as ``step`` has them; restored, and every plan dropped, after."""
    from fused_moe import ops
    from triton_ops_core import pdl

    shipped = ops.UNGROUPED_ONE_TOKEN, ops.PREFETCH_TILES, ops.ROUTE_ROWS_MAX_TOKENS
    ops.UNGROUPED_ONE_TOKEN = step != "grouped"
    ops.PREFETCH_TILES = 2 if step == "prefetch" else 0
    ops.ROUTE_ROWS_MAX_TOKENS = shipped[2] if step in ("rows", "prefetch") else 0
    ops.clear_caches()
    try:
        with pdl.override(step not in ("grouped", "ungrouped")):
            yield
    finally:
        ops.UNGROUPED_ONE_TOKEN, ops.PREFETCH_TILES, ops.ROUTE_ROWS_MAX_TOKENS = shipped
        ops.clear_caches()


def expert_bytes(weights: tuple, biases: tuple) -> int:
    """One expert's bytes: its gate/up and down weights, their scales and biases (whatever of them there are)."""
    return sum(t[0].numel() * t.element_size() for t in (*weights, *biases) if t is not None)


def floor_us(weights: tuple, biases: tuple, router: torch.Tensor, hit: float, gbps: float) -> float:
    """The read floor of one launch: the router's and ``hit`` experts' bytes at the copy bandwidth ``gbps`` (bytes
    read plus written a second, as the suite's floors take it)."""
    read = router.numel() * router.element_size() + hit * expert_bytes(weights, biases)
    return read / (gbps * 1e9) * 1e6


def run_model(name: str, tokens: list[int], kinds: list[str], gbps: float, out: Path, steps: tuple) -> None:
    from fused_moe import fused_moe, moe_route, quantize_experts_fp8

    shape = MODELS[name]
    dev = torch.device("cuda")
    w = expert_weights(dev, shape)
    if "w8a8" in kinds:  # (K-major E4M3: what Hopper's FP8 tensor cores read as loaded)
        w["w8a8"] = quantize_experts_fp8(w["bf16"][0], w["bf16"][2], transposed=shape.transposed, k_major=True)
    b1, b2 = w["biases"]
    g = torch.Generator(device=dev).manual_seed(1)
    rw = (torch.randn(shape.experts, shape.hidden, device=dev, generator=g) * shape.hidden ** -0.5).bfloat16()
    rb = (torch.randn(shape.experts, device=dev, generator=g) * 0.1).bfloat16() if shape.biases else None
    for t in tokens:
        xs = [torch.randn(t, shape.hidden, device=dev, generator=g).bfloat16() for _ in range(REPS)]
        res = [torch.randn(t, shape.hidden, device=dev, generator=g).bfloat16() for _ in range(REPS)]
        hit = sum(moe_route(x, rw, rb, shape.top_k)[0].unique().numel() for x in xs) / REPS
        bf16_us = {}
        for kind in [k for k in kinds if k in w]:
            a, sa, b, sb = w[kind]
            w8a8 = kind == "w8a8"

            def layer(args, a=a, sa=sa, b=b, sb=sb, w8a8=w8a8):
                x, r = args
                return fused_moe(x, rw, rb, a, b1, b, b2, shape.top_k, shape.activation,
                                 gate_up_layout=shape.layout, transposed=shape.transposed,
                                 gate_up_scale=sa, down_scale=sb, residual=r, fp8_activations=w8a8)

            floor = floor_us((a, sa, b, sb), (b1, b2), rw, hit, gbps)
            row = {"model": name, "tokens": t, "weights": kind, "experts hit": round(hit, 2),
                   "floor us": round(floor, 2)}
            before = None
            for step in steps:
                with switched(step):
                    result = layer((xs[0], res[0])).clone()
                    ids = [moe_route(x, rw, rb, shape.top_k)[0] for x in xs]
                    us = graph_us(layer, list(zip(xs, res)))
                row[f"{step} us"] = round(us, 2)
                row[f"{step} % of floor"] = round(100 * floor / us, 1)
                if before is not None:
                    row[f"{step} same bits"] = bool(torch.equal(result, before[0]))
                    row[f"{step} same experts"] = all(torch.equal(a, b) for a, b in zip(ids, before[1]))
                before = result, ids
                if kind == "bf16":
                    bf16_us[step] = us
                elif step in bf16_us:
                    row[f"{step} / bf16"] = round(us / bf16_us[step], 3)
            print(" ".join(f"{key}={v}" for key, v in row.items()), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.moe_decode_launches",
                                description=__doc__.split("\n")[0])
    p.add_argument("--models", default="gpt-oss-20b,qwen3-30b-a3b", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--tokens", default="1,8")
    p.add_argument("--weights", default="bf16,fp8", help="comma-separated, of bf16, fp8, fp8-block")
    p.add_argument("--prefetch", action="store_true", help="also the weights prefetched before the PDL wait")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_decode_launches needs a GPU")
        return 2
    dev = torch.device("cuda")
    gbps = copy_gbps(dev)
    print(torch.cuda.get_device_name(), torch.__version__, f"copy {gbps:.0f} GB/s", flush=True)
    out = Path(os.environ.get("OUT", "/tmp")) / "moe_decode_launches.jsonl"
    for name in args.models.split(","):
        run_model(name, [int(v) for v in args.tokens.split(",")], args.weights.split(","), gbps, out,
                  STEPS + (("prefetch",) if args.prefetch else ()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
