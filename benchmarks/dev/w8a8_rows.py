# ruff: noqa: B023  (the timed closures run inside the loop iteration that defines them)
"""The W8A8 decode GEMM's tiles for 17 to 64 rows with 1x128 activation blocks and group or 128x128 weight scales.

    python -m benchmarks.dev.w8a8_rows                        # M = 32 and 64, group scales, every shape
    python -m benchmarks.dev.w8a8_rows --scales group,block --shapes qkv,down

``fp8_gemm``'s split-K decode kernel (``gemm._launch(..., path="decode", config=...)``) on an activation quantized
in 1x128 blocks beforehand (not timed: the quantization launch is the same for every tile) and an E4M3 weight with
group scales (one per output feature and 128 inputs: the default recipe's) or 128x128 blocks, each candidate tile
run on ``--copies`` different weights back to back in a CUDA graph (as in ``weight_only_rows``), beside the tile
the heuristic picks. Prints the best tiles per case; writes ``w8a8_rows.json`` to ``$OUT`` (default /tmp).
Needs a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch

from .weight_only_chain import graph_us
from .weight_only_rows import SHAPES


def candidates(m: int) -> list[dict]:
    block_m = max(16, 1 << (m - 1).bit_length())
    out = []
    for (bn, warps), split, stages in itertools.product(((32, 4), (64, 4), (128, 4), (128, 8)), (1, 2, 4, 8), (4, 6)):
        out.append({"BLOCK_M": block_m, "BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": split, "num_warps": warps,
                    "num_stages": stages})
    return out


def _label(cfg: dict) -> str:
    return "m{BLOCK_M}-n{BLOCK_N}-w{num_warps}-s{num_stages}-split{SPLIT_K}".format(**cfg)


def run_case(name: str, m: int, scale: str, copies: int) -> list[dict]:
    from fp8_gemm import gemm, quantize_fp8
    from fp8_gemm.gemm_kernels import A_BLOCK, B_BLOCK, B_GROUP

    n, k = SHAPES[name]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    a_q, a_s = quantize_fp8(x, "e4m3", "block")
    weights = []
    for _ in range(copies):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        weights.append(quantize_fp8(w.t(), "e4m3", scale, role="weight"))  # b [K, N] (a view of [N, K]), scales
    b_mode = B_GROUP if scale == "group" else B_BLOCK
    outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    reference = gemm.fp8_gemm(a_q, weights[0][0], a_scale=a_s, b_scale=weights[0][1], out_dtype=torch.float32)
    rows = []
    for cfg in [None] + candidates(m):
        label = "heuristic" if cfg is None else _label(cfg)
        try:
            def fn():
                return [gemm._launch(a_q, b, out, a_s, b_s, None, A_BLOCK, b_mode, False, "decode", cfg)
                        for (b, b_s), out in zip(weights, outs)]

            info = fn()[0]
            err = ((outs[0].float() - reference).norm() / reference.norm()).item()
            us = graph_us(fn) / copies
        except Exception as exc:  # a tile the kernel cannot take (resources): reported, the sweep goes on
            print(f"  {name} M={m} {scale} {label}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        rows.append({"shape": name, "M": m, "scale": scale, "label": label, "us": us, "rel_err": err,
                     "config": {key: info[key] for key in info if key != "path"}})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.w8a8_rows", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rows", default="32,64")
    p.add_argument("--scales", default="group")
    p.add_argument("--copies", type=int, default=4)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("w8a8_rows needs a GPU")
        return 2
    rows = []
    out = Path(os.environ.get("OUT", "/tmp")) / "w8a8_rows.json"
    for name in args.shapes.split(","):
        for m in (int(v) for v in args.rows.split(",")):
            for scale in args.scales.split(","):
                case = run_case(name, m, scale, args.copies)
                rows += case
                out.write_text(json.dumps({"rows": rows}, indent=1))
                best = sorted(case, key=lambda r: r["us"])
                print(f"== {name} {SHAPES[name]} M={m} {scale}", flush=True)
                for r in [r for r in case if r["label"] == "heuristic"] + best[:5]:
                    print(f"   {r['label']:30s} {r['us']:7.2f} us  err {r['rel_err']:.1e}  {r['config']}", flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
