# ruff: noqa: B023  (the timed closures run inside the loop iteration that defines them)
"""FP8 decode GEMMs of 17 to 64 rows: the weight-only kernel's tensor-core tiles against the W8A8 path and bf16.

    python -m benchmarks.dev.weight_only_rows                       # M = 32 and 64, Llama / Qwen3 / gpt-oss shapes
    python -m benchmarks.dev.weight_only_rows --rows 64 --shapes qkv,o --scales channel
    python -m benchmarks.dev.weight_only_rows --no-sweep       # FP8Linear's own choice against bf16 only
    python -m benchmarks.dev.weight_only_rows --rows 1         # one row: the CUDA-core (FMA) tiles instead
    python -m benchmarks.dev.weight_only_rows --rows 8         # 3-16 rows: 16-row tiles with / without fp16 dots
    python -m benchmarks.dev.weight_only_rows --rows 1 --tensor-cores --scales channel,bf16   # one row, both kinds

Batched decode (8 to 64 sequences a step) multiplies up to 64 token rows by every weight: still a weight stream, but
a 16-row tile no longer holds every row. For each shape, M and weight scale (per channel, or the default recipe's
groups of 128 inputs), every candidate tile of ``fp8_gemm``'s weight-only kernel (``weight_only.build_plan(...,
config)``: ``BLOCK_M`` 32 or 64, the whole M in one row tile) runs on ``--copies`` different weights back to back,
captured in a CUDA graph (no L2 reuse between them, no flush, as consecutive projections of a decode step meet them),
beside ``FP8Linear``'s current choice for that M (``path="auto"``), the W8A8 path forced, and bf16 ``F.linear``
(cuBLAS) on the same shapes. Prints the best tiles per case with the weight-read floor (FP8 bytes / copy bandwidth)
and writes ``weight_only_rows.json`` to ``$OUT`` (default /tmp). Needs a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .weight_only_chain import copy_gbps, graph_us

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate": (14336, 4096), "down": (4096, 14336),
          "qwen3-gate": (12288, 4096), "qwen3-down": (4096, 12288), "gptoss-qkv": (5120, 2880),
          "gptoss-o": (2880, 4096)}  # (out_features N, in_features K)
_SMEM = 160 * 1024


def fma_candidates(m: int) -> list[dict]:
    """CUDA-core (FMA) tiles for one or two rows (a 16-bit activation, an E4M3 weight)."""
    out = []
    for bn, bk, split, warps in itertools.product((8, 16, 32, 64), (256, 512), (1, 2), (4, 8)):
        stages = min(4, _SMEM // (bk * (m * 2 + bn)))
        if stages >= 2 and bn >= warps:
            out.append({"USE_DOT": False, "BLOCK_M": m, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
                        "num_warps": warps, "num_stages": stages})
    return out


def f16_candidates(m: int, scale: str) -> list[dict]:
    """16-row tensor-core tiles (3 to 16 rows) with and without fp16 dots (``F16_DOT``), K split in up to 16."""
    out = []
    k_tiles = (128,) if scale in ("group", "block") else (128, 256)
    for (bn, warps), bk, split, f16 in itertools.product(((32, 4), (64, 4), (128, 8)), k_tiles, (1, 2, 4, 8, 16),
                                                         (False, True)):
        stages = min(4, _SMEM // (bk * (16 * 2 + bn)))
        out.append({"USE_DOT": True, "BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
                    "num_warps": warps, "num_stages": stages, "F16_DOT": f16})
    return out


def candidates(m: int, scale: str, tensor_cores: bool = False) -> list[dict]:
    """Tensor-core tiles for ``m`` rows in one row tile (a 16-bit activation, an E4M3 weight); FMA tiles for one
    or two rows (with ``tensor_cores`` also the 16-row tiles); 16-row tiles with and without fp16 dots for 3 to 16
    rows."""
    if m <= 2:
        return fma_candidates(m) + (f16_candidates(m, scale) if tensor_cores else [])
    if m <= 16:
        return f16_candidates(m, scale)
    block_m = max(16, 1 << (m - 1).bit_length())
    out = []
    k_tiles = (64, 128) if scale in ("group", "block") else (64, 128, 256)  # a scaled dot stays in 128 inputs
    for (bn, warps), bk, split in itertools.product(((32, 4), (64, 4), (128, 4), (128, 8)), k_tiles, (1, 2, 4)):
        stage = bk * (block_m * 2 + bn)
        stages = min(4, _SMEM // stage)
        if stages >= 2:
            out.append({"USE_DOT": True, "BLOCK_M": block_m, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
                        "num_warps": warps, "num_stages": stages})
    return out


def _label(cfg: dict) -> str:
    return "m{BLOCK_M}-n{BLOCK_N}-k{BLOCK_K}-w{num_warps}-s{num_stages}-split{SPLIT_K}".format(**cfg) + (
        "-f16" if cfg.get("F16_DOT") else "")


def run_bf16_case(name: str, m: int, copies: int, bandwidth: float) -> list[dict]:
    """16-bit weights (``decode_linear``'s kernel): its choice, cuBLAS, and CUDA-core and tensor-core tiles."""
    from fp8_gemm import decode_linear
    from fp8_gemm import weight_only as wo

    n, k = SHAPES[name]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]
    reference = x.double() @ ws[0].double().t()
    floor = 2 * n * k / bandwidth / 1e3
    rows = []

    def record(label, fn, cfg=None):
        first = fn()[0]
        err = ((first.double() - reference).norm() / reference.norm()).item()
        rows.append({"shape": name, "M": m, "scale": "bf16", "label": label, "us": graph_us(fn) / copies,
                     "floor_us": floor, "rel_err": err, **({"config": cfg} if cfg else {})})

    record("decode_linear", lambda: [decode_linear(x, w) for w in ws])
    record("bf16 F.linear", lambda: [F.linear(x, w) for w in ws])
    tiles = [c for c in fma_candidates(m) if c["BLOCK_N"] <= 32] + [
        {**c, "F16_DOT": False} for c in f16_candidates(m, "channel") if not c["F16_DOT"]]
    for cfg in tiles:
        cfg = {**cfg, "num_stages": max(1, min(4, _SMEM // (cfg["BLOCK_K"] * 2 * (cfg["BLOCK_M"] + cfg["BLOCK_N"]))))}
        try:
            plans = [wo.build_plan(x, w, None, None, cfg) for w in ws]
            record(_label(cfg), lambda: [plan.run(x, w, None, None) for plan, w in zip(plans, ws)], cfg)
        except Exception as exc:  # a tile the kernel cannot take (resources): reported, the sweep goes on
            print(f"  {name} M={m} bf16 {_label(cfg)}: {type(exc).__name__}: {str(exc)[:120]}")
    return rows


def run_case(name: str, m: int, scale: str, copies: int, bandwidth: float, sweep: bool = True,
             tensor_cores: bool = False) -> list[dict]:
    from fp8_gemm import FP8Linear
    from fp8_gemm import weight_only as wo

    n, k = SHAPES[name]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    lins = []
    for _ in range(copies):
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.normal_(0.0, k**-0.5)
        lins.append(lin)
    act = "row" if scale == "channel" else "block"
    mods = [FP8Linear.from_linear(lin, weight_granularity=scale, activation_granularity=act) for lin in lins]
    floor = n * k / bandwidth / 1e3
    w0 = mods[0].weight.float()
    s0 = mods[0].weight_scale
    if scale == "group":  # [ceil(K/128), N] -> per weight element
        s_full = s0.t().repeat_interleave(128, dim=1)[:, :k]
    elif scale == "block":  # [ceil(K/128), ceil(N/128)] -> per weight element
        s_full = s0.t().repeat_interleave(128, dim=0)[:n].repeat_interleave(128, dim=1)[:, :k]
    else:
        s_full = s0.reshape(-1, 1)
    reference = x.double() @ (w0.double() * s_full.double()).t()

    def err(out):
        return ((out.double() - reference).norm() / reference.norm()).item()

    rows = []

    def record(label, fn, first, floor_us=floor):
        us = graph_us(fn) / copies
        rows.append({"shape": name, "M": m, "scale": scale, "label": label, "us": us, "floor_us": floor_us,
                     "rel_err": err(first) if first is not None else None})

    for label, path in (("auto", "auto"), ("weight_only", "weight_only"), ("w8a8", "w8a8")):
        for mod in mods:
            mod.path = path
        record(label, lambda: [mod(x) for mod in mods], mods[0](x))
    if scale == "channel":
        record("bf16 F.linear", lambda: [F.linear(x, lin.weight) for lin in lins], F.linear(x, lins[0].weight),
               2 * floor)
    for cfg in candidates(m, scale, tensor_cores) if sweep else []:
        try:
            plans = [wo.build_plan(x, mod.weight, mod.weight_scale, None, cfg) for mod in mods]

            def fn():
                return [plan.run(x, mod.weight, mod.weight_scale, None) for plan, mod in zip(plans, mods)]

            record(_label(cfg), fn, fn()[0])
            rows[-1]["config"] = cfg
        except Exception as exc:  # a tile the kernel cannot take (resources): reported, the sweep goes on
            print(f"  {name} M={m} {scale} {_label(cfg)}: {type(exc).__name__}: {str(exc)[:120]}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.weight_only_rows", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--rows", default="32,64", help="M values")
    p.add_argument("--scales", default="channel,group",
                   help="channel, group, block (128x128 weight blocks) or bf16 (16-bit weights)")
    p.add_argument("--copies", type=int, default=4, help="different weights per case in the timed chain")
    p.add_argument("--no-sweep", dest="sweep", action="store_false",
                   help="only FP8Linear's choice, the W8A8 path and bf16 (no weight-only tiles)")
    p.add_argument("--tensor-cores", action="store_true", help="one or two rows: also the 16-row tensor-core tiles")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("weight_only_rows needs a GPU")
        return 2
    bandwidth = copy_gbps()
    print(f"copy bandwidth {bandwidth:,.0f} GB/s", flush=True)
    rows = []
    out = Path(os.environ.get("OUT", "/tmp")) / "weight_only_rows.json"
    for name in args.shapes.split(","):
        for m in (int(v) for v in args.rows.split(",")):
            for scale in args.scales.split(","):
                if scale == "bf16":  # 16-bit weights: decode_linear's kernel
                    case = run_bf16_case(name, m, args.copies, bandwidth)
                else:
                    case = run_case(name, m, scale, args.copies, bandwidth, args.sweep, args.tensor_cores)
                rows += case
                out.write_text(json.dumps({"bandwidth_gbps": bandwidth, "rows": rows}, indent=1))
                fixed = [r for r in case if "config" not in r]
                best = sorted((r for r in case if "config" in r), key=lambda r: r["us"])
                print(f"== {name} {SHAPES[name]} M={m} {scale}: floor {case[0]['floor_us']:.2f} us", flush=True)
                for r in fixed + best[:5]:
                    print(f"   {r['label']:34s} {r['us']:7.2f} us  {r['floor_us'] / r['us']:4.0%}  "
                          f"err {r['rel_err']:.1e}", flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
