"""Device script: fused-moe's decode with its reductions finished inside the launch before them, against before.

    python -m benchmarks.dev.moe_one_launch [--models gpt-oss-20b,qwen3-30b-a3b] [--tokens 1,2,4,8,64]

Two switches of ``fused_moe.ops``, each timed on and off in the same run, with a check that both give the same bits:

- ``ROUTE_IN_ONE_LAUNCH``: at decode (up to 64 tokens) the router GEMM is split along K over many programs; the last
  program of each token block adds the partial logits and selects the experts (an arrival counter), instead of a
  route kernel launched after it.
- ``COMBINE_IN_DOWN``: FP8 experts at 1 to 8 tokens (one-row tiles in pair order) add each token's expert outputs and
  the residual in the down GEMM's last program per (token, column tile), instead of a combine launch after it.

Rows: the routing alone (``moe_route``), the experts alone (``moe_experts`` with FP8 experts and a residual, as
``patch_model`` calls it), and the whole layer (``fused_moe``: both, bf16 and FP8 experts) with both switches on and
both off, and FP8 / bf16 of the layer (issue 15's target: at most 0.6). Times: the median over CUDA-graph replays
(``moe_tiles.graph_us``; under capture the counters are fresh per call: a memset node each), and eager launches
timed by events (``eager us``: the kept counters, no memset). Lines go to stdout and, as JSON, to
``$OUT/moe_one_launch.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from benchmarks.dev.moe_tiles import MODELS, REPS, expert_weights, graph_us, routings

EAGER_CALLS = 200


def eager_us(launch, args_per_rep: list) -> float:
    """Mean time of one ``launch(args)`` over EAGER_CALLS eager calls (after a warm-up), by CUDA events."""
    for a in args_per_rep:
        launch(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(EAGER_CALLS):
        launch(args_per_rep[i % len(args_per_rep)])
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / EAGER_CALLS


def _switched(ops, on: bool) -> None:
    ops.ROUTE_IN_ONE_LAUNCH = on
    ops.COMBINE_IN_DOWN = on
    ops.clear_caches()


def _emit(row: dict, out: Path) -> None:
    print(" ".join(f"{key}={v}" for key, v in row.items()), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _compare(row: dict, fn, args: list, ops) -> dict:
    """``fn`` timed with the switches off and on (graph and eager), and whether both gave the same bits."""
    results = {}
    for on in (False, True):
        _switched(ops, on)
        results[on] = fn(args[0])
        results[on] = tuple(r.clone() for r in results[on]) if isinstance(results[on], tuple) else results[on].clone()
        label = "one launch" if on else "before"
        row[f"{label} us"] = round(graph_us(fn, args), 2)
        row[f"{label} eager us"] = round(eager_us(fn, args), 2)
    _switched(ops, True)
    if isinstance(results[True], tuple):
        same = all(torch.equal(a, b) for a, b in zip(results[False], results[True]))
    else:
        same = torch.equal(results[False], results[True])
    row["same bits"] = bool(same)
    row["after / before (graph)"] = round(row["one launch us"] / row["before us"], 3)
    row["after / before (eager)"] = round(row["one launch eager us"] / row["before eager us"], 3)
    return row


def run_model(name: str, tokens: list[int], out: Path) -> None:
    from fused_moe import fused_moe, moe_experts, moe_route, ops

    shape = MODELS[name]
    dev = torch.device("cuda")
    w = expert_weights(dev, shape)
    b1, b2 = w["biases"]
    g = torch.Generator(device=dev).manual_seed(1)
    rw = (torch.randn(shape.experts, shape.hidden, device=dev, generator=g) * shape.hidden ** -0.5).bfloat16()
    rb = (torch.randn(shape.experts, device=dev, generator=g) * 0.1).bfloat16() if shape.biases else None
    for t in tokens:
        xs = [torch.randn(t, shape.hidden, device=dev, generator=g).bfloat16() for _ in range(REPS)]
        res = [torch.randn(t, shape.hidden, device=dev, generator=g).bfloat16() for _ in range(REPS)]
        base = {"model": name, "tokens": t}
        if t <= ops.ROUTE_SPLIT_MAX_TOKENS:
            _emit(_compare({**base, "part": "routing"}, lambda x: moe_route(x, rw, rb, shape.top_k), xs, ops), out)
        if t <= 8:
            routes = [(*r, res[i]) for i, r in enumerate(routings(t, dev, shape))]
            for label in [k for k in ("fp8", "fp8-block") if k in w]:
                a, sa, b, sb = w[label]

                def experts(route, x=xs[0], a=a, sa=sa, b=b, sb=sb):
                    ids, wts, r = route
                    return moe_experts(x, ids, wts, a, b1, b, b2, shape.activation, gate_up_layout=shape.layout,
                                       transposed=shape.transposed, gate_up_scale=sa, down_scale=sb, residual=r)

                _emit(_compare({**base, "part": "experts", "weights": label}, experts, routes, ops), out)
        layer = {}
        for label in [k for k in ("bf16", "fp8", "fp8-block") if k in w]:
            a, sa, b, sb = w[label]

            def whole(args, a=a, sa=sa, b=b, sb=sb):
                x, r = args
                return fused_moe(x, rw, rb, a, b1, b, b2, shape.top_k, shape.activation,
                                 gate_up_layout=shape.layout, transposed=shape.transposed,
                                 gate_up_scale=sa, down_scale=sb, residual=r)

            row = _compare({**base, "part": "layer", "weights": label}, whole, list(zip(xs, res)), ops)
            layer[label] = row
            if label != "bf16" and "bf16" in layer:
                row["vs bf16 (graph, before)"] = round(row["before us"] / layer["bf16"]["before us"], 3)
                row["vs bf16 (graph, one launch)"] = round(row["one launch us"] / layer["bf16"]["one launch us"], 3)
            _emit(row, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.moe_one_launch", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="gpt-oss-20b,qwen3-30b-a3b", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--tokens", default="1,2,4,8,64")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_one_launch needs a GPU")
        return 2
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    out = Path(os.environ.get("OUT", "/tmp")) / "moe_one_launch.jsonl"
    for name in args.models.split(","):
        run_model(name, [int(v) for v in args.tokens.split(",")], out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
