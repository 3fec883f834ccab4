# ruff: noqa: B023  (the timed closures run inside the loop iteration that defines them)
"""The fused gated MLP's one- and two-row CUDA-core tiles with group-scaled FP8 weights (the default FP8 recipe's).

    python -m benchmarks.dev.gated_mlp_group_fma       # Llama-3-8B, Qwen3-8B and gpt-oss-20b MLP shapes, M = 1, 2
    python -m benchmarks.dev.gated_mlp_group_fma --rows 1,2,8 --no-sweep   # the package's choices only

Group scales (one per weight row and 128 of K) used to take the 16-row tensor-core tile with 128-deep K steps; the
CUDA-core (FMA) tile now scales each weight element by its group's scale. For each shape and M: the package's own
choice with channel, group and 128x128 block scales (FP8 checkpoints' format; since session 35 on the group tiles),
the former group and block path (the 16-row tensor-core tile of bf16 weights' rules, 128-deep K steps), and FMA tiles
(columns x K tile x stages), each on ``--copies`` different weight pairs back to back in a CUDA graph (as
``weight_only_chain``). Checked against a float64 reference first. Writes ``gated_mlp_group_fma.json`` to
``$OUT`` (default /tmp). Needs a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch

from .weight_only_chain import copy_gbps, graph_us

SHAPES = {"llama3-8b": (4096, 14336), "qwen3-8b": (4096, 12288), "gpt-oss-20b": (2880, 2880)}  # (hidden, inter)


def candidates(m: int) -> list[dict]:
    out = []
    for bn, bk, stages, warps in itertools.product((8, 16, 32), (256, 512), (3, 4), (2, 4, 8)):
        if bn >= warps:
            out.append({"path": "decode", "BLOCK_M": m, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1, "GROUP_M": 1,
                        "num_warps": warps, "num_stages": stages, "FMA": True})
    return out


def run_case(name: str, m: int, copies: int, bandwidth: float, sweep: bool = True) -> list[dict]:
    from fused_gated_mlp import configs, quantize_weight_fp8
    from fused_gated_mlp.ops import gated_mlp_forward

    hidden, inter = SHAPES[name]
    x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16)
    pairs = {"channel": [], "group": [], "block": []}
    for _ in range(copies):
        wg = torch.randn(inter, hidden, device="cuda", dtype=torch.bfloat16) * hidden**-0.5
        wu = torch.randn(inter, hidden, device="cuda", dtype=torch.bfloat16) * hidden**-0.5
        for scaling in pairs:
            pairs[scaling].append((*quantize_weight_fp8(wg, scaling), *quantize_weight_fp8(wu, scaling)))
    floor = 2 * inter * hidden / bandwidth / 1e3

    def dequant(q, s):
        if s.dim() == 1:
            return q.double() * s.double()[:, None]
        if s.shape[0] != q.shape[0]:  # 128x128 blocks
            s = s.repeat_interleave(128, 0)[: q.shape[0]]
        return q.double() * s.double().repeat_interleave(128, 1)[:, :hidden]

    references = {}
    for scaling, ops in pairs.items():
        qg, sg, qu, su = ops[0]
        g, u = x.double() @ dequant(qg, sg).t(), x.double() @ dequant(qu, su).t()
        references[scaling] = g * torch.sigmoid(g) * u
    old = {**configs.heuristic_config(m, hidden, inter, torch.bfloat16, x.device, weights="same"), "path": "decode"}
    rows = []
    cases = [("channel (package)", "channel", None), ("group (package)", "group", None),
             ("group, former tensor-core tile", "group", old), ("block (package)", "block", None),
             ("block, former tensor-core tile", "block", old)]
    cases += [("fma-n{BLOCK_N}-k{BLOCK_K}-s{num_stages}-w{num_warps}".format(**c), "group", c)
              for c in (candidates(m) if sweep and m <= 2 else [])]
    for label, scaling, cfg in cases:
        ops = pairs[scaling]

        def fn():
            return [gated_mlp_forward(x, a, c, None, None, "silu", 1.702, 7.0, cfg, gate_scale=b, up_scale=d)
                    for a, b, c, d in ops]

        try:
            first = fn()[0]
            us = graph_us(fn) / copies
        except Exception as exc:  # a tile the kernel cannot take (resources): reported, the sweep goes on
            print(f"  {name} M={m} {label}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        reference = references[scaling]
        err = ((first.double() - reference).norm() / reference.norm()).item()
        rows.append({"shape": name, "M": m, "label": label, "us": us, "floor_us": floor, "rel_err": err,
                     "config": cfg})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.gated_mlp_group_fma",
                                description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rows", default="1,2")
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="only the package's and the former tiles")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gated_mlp_group_fma needs a GPU")
        return 2
    bandwidth = copy_gbps()
    rows = []
    out = Path(os.environ.get("OUT", "/tmp")) / "gated_mlp_group_fma.json"
    for name in args.shapes.split(","):
        for m in (int(v) for v in args.rows.split(",")):
            case = run_case(name, m, args.copies, bandwidth, args.sweep)
            rows += case
            out.write_text(json.dumps({"bandwidth_gbps": bandwidth, "rows": rows}, indent=1))
            print(f"== {name} {SHAPES[name]} M={m}: floor {case[0]['floor_us']:.1f} us", flush=True)
            fixed = [r for r in case if not r["label"].startswith("fma")]
            best = sorted((r for r in case if r["label"].startswith("fma")), key=lambda r: r["us"])
            for r in fixed + best[:5]:
                err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
                print(f"   {r['label']:34s} {r['us']:7.2f} us  err {err}", flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
