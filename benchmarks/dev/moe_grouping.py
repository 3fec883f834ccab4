"""Device script: fused-moe's one-row tiles with and without the grouping launch, end to end, in CUDA graphs.

    python -m benchmarks.dev.moe_grouping [--models gpt-oss-20b,qwen3-30b-a3b] [--tokens 1,2,4,8]

FP8 experts at 1 to 8 tokens run one-row CUDA-core tiles (``MoEConfig.block_m`` 1), which read the (token, slot)
pairs in their own order with the routing's ids as their tile table (``fused_moe.ops.UNGROUPED_ONE_ROW_TILES``):
no grouping launch before the GEMMs. This times ``moe_experts`` (grouping if any, both grouped GEMMs, combine) with
the switch on and off in the same run, per model (``moe_tiles.MODELS``), token count and FP8 weights (per-column
scales; 128x128 blocks where the layout takes them), on ``moe_tiles.routings`` (REPS routings in one graph, so that
one token's experts differ between launches), and checks that both give the same bits. Lines go to stdout and, as
JSON, to ``$OUT/moe_grouping.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from benchmarks.dev.moe_tiles import MODELS, expert_weights, graph_us, routings


def run_model(name: str, tokens: list[int], out: Path) -> None:
    from fused_moe import moe_experts, ops

    shape = MODELS[name]
    dev = torch.device("cuda")
    w = expert_weights(dev, shape)
    b1, b2 = w["biases"]
    for t in tokens:
        routes = routings(t, dev, shape)
        x = torch.randn(t, shape.hidden, device=dev).bfloat16()
        for label in [k for k in ("fp8", "fp8-block") if k in w]:
            a, sa, b, sb = w[label]

            def fn(route, x=x, a=a, sa=sa, b=b, sb=sb):
                return moe_experts(x, *route, a, b1, b, b2, shape.activation, gate_up_layout=shape.layout,
                                   transposed=shape.transposed, gate_up_scale=sa, down_scale=sb)

            row = {"model": name, "tokens": t, "weights": label}
            results = {}
            for ungrouped in (False, True):
                ops.UNGROUPED_ONE_ROW_TILES = ungrouped
                ops.clear_caches()
                results[ungrouped] = fn(routes[0]).clone()
                row["ungrouped us" if ungrouped else "grouped us"] = round(graph_us(fn, routes), 2)
            ops.UNGROUPED_ONE_ROW_TILES = True
            ops.clear_caches()
            row["same bits"] = bool(torch.equal(results[False], results[True]))
            row["ungrouped / grouped"] = round(row["ungrouped us"] / row["grouped us"], 3)
            print(" ".join(f"{key}={v}" for key, v in row.items()), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.moe_grouping", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="gpt-oss-20b,qwen3-30b-a3b", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--tokens", default="1,2,4,8")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_grouping needs a GPU")
        return 2
    print(torch.cuda.get_device_name(), flush=True)
    out = Path(os.environ.get("OUT", "/tmp")) / "moe_grouping.jsonl"
    for name in args.models.split(","):
        run_model(name, [int(v) for v in args.tokens.split(",")], out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
