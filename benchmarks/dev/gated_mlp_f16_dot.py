# ruff: noqa: B023  (the timed closures run inside the loop iteration that defines them)
"""The fused gated MLP's tensor-core decode tiles for FP8 weights at 3 to 16 rows: bf16 dots against fp16 dots.

    python -m benchmarks.dev.gated_mlp_f16_dot                     # Llama-3-8B, Qwen3-8B, gpt-oss-20b; M = 4, 8, 16
    python -m benchmarks.dev.gated_mlp_f16_dot --rows 8 --shapes llama3-8b --scales group
    python -m benchmarks.dev.gated_mlp_f16_dot --rows 8 --scales block       # 128x128 blocks (FP8 checkpoints)

From three rows on, FP8 gate/up weights take 16-row tensor-core tiles (weight-only: the weights converted in
registers). With bf16 activations each E4M3 weight costs a packed conversion to fp16 and a second one to bf16; with
fp16 operands the first is all (sm_90 PTX of a 16 x 32 x 256 tile: 530 instructions a K step against 274 for fp16
activations). Config ``F16_DOT`` feeds the tensor cores fp16: each row of the step's activation tile scaled by a
power of two into fp16's range (exact), the products scaled back in fp32; the scaling costs a row maximum per step,
which wider column tiles amortize (16 x 128 x 128, 8 warps: 338 instructions a step against 508). For each shape, M
and weight scale (per channel, the default recipe's groups, or an FP8 checkpoint's 128x128 blocks): the package's
choice, then tensor-core tiles (columns x K tile x K split) with and without ``F16_DOT``, each on ``--copies``
different weight pairs back to back in a CUDA graph (as ``weight_only_chain``), checked against a float64 reference
first. Writes
``gated_mlp_f16_dot.json`` to ``$OUT`` (default /tmp). Needs a GPU.
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


def candidates(scale: str) -> list[dict]:
    """16-row tensor-core tiles, with and without fp16 dots (group and block scales: K tiles inside one 128-wide
    group)."""
    out = []
    k_tiles = (128,) if scale in ("group", "block") else (128, 256)
    for bn, bk, split, f16 in itertools.product((32, 64, 128), k_tiles, (1, 2, 4), (False, True)):
        stages = 3 if bk * (16 * 2 + 2 * bn) * 4 <= 200 * 1024 else 2
        out.append({"path": "decode", "BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "GROUP_M": 1,
                    "num_warps": 4 if bn <= 64 else 8, "num_stages": stages, "F16_DOT": f16})
    return out


def _label(cfg: dict) -> str:
    return "n{BLOCK_N}-k{BLOCK_K}-split{SPLIT_K}-w{num_warps}-s{num_stages}".format(**cfg) + (
        "-f16" if cfg.get("F16_DOT") else "")


def run_case(name: str, m: int, scale: str, copies: int, bandwidth: float) -> list[dict]:
    from fused_gated_mlp import quantize_weight_fp8
    from fused_gated_mlp.ops import gated_mlp_forward

    hidden, inter = SHAPES[name]
    x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16)
    ops = []
    for _ in range(copies):
        wg = torch.randn(inter, hidden, device="cuda", dtype=torch.bfloat16) * hidden**-0.5
        wu = torch.randn(inter, hidden, device="cuda", dtype=torch.bfloat16) * hidden**-0.5
        ops.append((*quantize_weight_fp8(wg, scale), *quantize_weight_fp8(wu, scale)))
    floor = 2 * inter * hidden / bandwidth / 1e3

    def dequant(q, s):
        if s.dim() == 1:
            return q.double() * s.double()[:, None]
        if scale == "block":  # [ceil(rows / 128), ceil(hidden / 128)]
            return q.double() * s.double().repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, :hidden]
        return q.double() * s.double().repeat_interleave(128, 1)[:, :hidden]

    qg, sg, qu, su = ops[0]
    g, u = x.double() @ dequant(qg, sg).t(), x.double() @ dequant(qu, su).t()
    reference = g * torch.sigmoid(g) * u
    rows = []
    for label, cfg in [("package", None)] + [(_label(c), c) for c in candidates(scale)]:
        def fn():
            return [gated_mlp_forward(x, a, c, None, None, "silu", 1.702, 7.0, cfg, gate_scale=b, up_scale=d)
                    for a, b, c, d in ops]

        try:
            first = fn()[0]
            err = ((first.double() - reference).norm() / reference.norm()).item()
            us = graph_us(fn) / copies if err < 2e-2 else float("nan")
        except Exception as exc:  # a tile the kernel cannot take (resources): reported, the sweep goes on
            print(f"  {name} M={m} {scale} {label}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        rows.append({"shape": name, "M": m, "scale": scale, "label": label, "us": us, "floor_us": floor,
                     "rel_err": err, "config": cfg})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.gated_mlp_f16_dot", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rows", default="4,8,16")
    p.add_argument("--scales", default="channel,group")
    p.add_argument("--copies", type=int, default=4)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gated_mlp_f16_dot needs a GPU")
        return 2
    bandwidth = copy_gbps()
    rows = []
    out = Path(os.environ.get("OUT", "/tmp")) / "gated_mlp_f16_dot.json"
    for name in args.shapes.split(","):
        for m in (int(v) for v in args.rows.split(",")):
            for scale in args.scales.split(","):
                case = run_case(name, m, scale, args.copies, bandwidth)
                rows += case
                out.write_text(json.dumps({"bandwidth_gbps": bandwidth, "rows": rows}, indent=1))
                timed = sorted((r for r in case if r["us"] == r["us"]), key=lambda r: r["us"])
                package = [r for r in case if r["label"] == "package"]
                best_bf16 = [r for r in timed if r["config"] and not r["config"]["F16_DOT"]][:2]
                best_f16 = [r for r in timed if r["config"] and r["config"]["F16_DOT"]][:2]
                print(f"== {name} {SHAPES[name]} M={m} {scale}: floor {case[0]['floor_us']:.1f} us", flush=True)
                for r in package + best_bf16 + best_f16:
                    print(f"   {r['label']:34s} {r['us']:7.2f} us  err {r['rel_err']:.1e}", flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
