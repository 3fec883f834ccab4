# ruff: noqa: B023  (the timed closures run inside the loop iteration that defines them)
"""The one-row weight-only GEMM as a decode step meets it: several different weights of one shape back to back.

    python -m benchmarks.dev.weight_only_chain                      # bf16 and FP8, Llama-3-8B's q/k/v, o and down
    python -m benchmarks.dev.weight_only_chain --weights fp8 --shapes o --splits 1,2,4
    python -m benchmarks.dev.weight_only_chain --weights fp8,fp8-group --rows 1,8   # group scales, several rows

Each candidate config of ``fp8_gemm``'s weight-only kernel (``weight_only.build_plan(..., config)``) runs on
``--copies`` different weights of the shape in a row, captured in a CUDA graph: no L2 reuse between them and no flush
either, as consecutive layers' projections meet them (an L2 flush before each GEMM leaves dirty lines whose write-back
the timed kernel pays). Time per GEMM against the weight bytes at the copy bandwidth (``--bandwidth`` GB/s, default:
measured). A plain GEMV kernel (16 or 8 columns a program, fp32 FMAs) runs beside as a reference. Prints the best
configs per shape and writes ``weight_only_chain.json`` to ``$OUT`` (default /tmp). Needs a GPU.
Published: docs/benchmarks/decode-layer-h200.md ("Update 3").
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "down": (4096, 14336), "gateup": (28672, 4096),
          "gptoss-qkv": (5120, 2880)}


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 STAGES: tl.constexpr):
    """``out[n] = sum_k x[k] * w[n, k]`` (scale 1), fp32 FMAs: the reference a weight-streaming kernel can reach."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for ki in tl.range(0, K // BLOCK_K, num_stages=STAGES):
        x = tl.load(x_ptr + ki * BLOCK_K + offs_k).to(tl.float32)
        acc += tl.load(w_ptrs + ki * BLOCK_K).to(tl.float32) * x[None, :]
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty))


def graph_us(fn, reps: int = 20, keep: bool = False) -> float:
    """Median-of-five time of one replay of ``fn`` captured in a CUDA graph, in microseconds. ``keep``: captured
    inside ``triton_ops_core.scratch.keep_on`` (split-K counters kept on the graph)."""
    import contextlib

    from triton_ops_core import scratch

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), (scratch.keep_on(graph) if keep else contextlib.nullcontext()):
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[2]


def copy_gbps() -> float:
    """Device-to-device copy bandwidth (bytes read + written), after half a second of copies: on a machine that has
    just started, the first copies ran at idle clocks (2,768 GB/s measured first thing in a session, 4,158 warm)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(700):  # about 0.5 s of copies at 4 TB/s
        dst.copy_(src)
    torch.cuda.synchronize()
    us = graph_us(lambda: dst.copy_(src), reps=10)
    return 2 * src.numel() / us / 1e3


def candidates(splits: list[int], wide: bool = False) -> list[dict]:
    """FMA tiles of one row: 24 per weight dtype by default (each compiles once, about a second), 128 with ``wide``."""
    space = ((8, 16, 32), (128, 256, 512), (4, 8), (1, 2, 3, 4)) if wide else ((8, 16, 32), (256, 512), (4,), (2, 4))
    out = []
    for bn, bk, warps, stages, split in itertools.product(*space, splits):
        if 2048 <= bn * bk <= 16384:
            out.append({"USE_DOT": False, "BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
                        "num_warps": warps, "num_stages": stages})
    return out


def run_shape(name: str, weights: str, copies: int, bandwidth: float, splits: list[int],
              wide: bool = False, rows_m: int = 1) -> list[dict]:
    from fp8_gemm import weight_only as wo

    n, k = SHAPES[name]
    x = torch.randn(rows_m, k, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05 for _ in range(copies)]
    scale = None
    if weights == "fp8":
        ws = [w.to(torch.float8_e4m3fn) for w in ws]
        scale = torch.rand(n, device="cuda", dtype=torch.float32) + 0.5
    elif weights == "fp8-group":  # the default recipe's: a scale per output feature and 128 inputs, [K/128, N]
        ws = [w.to(torch.float8_e4m3fn) for w in ws]
        scale = torch.rand(-(-k // 128), n, device="cuda", dtype=torch.float32) + 0.5
    outs = [torch.empty(rows_m, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    floor = n * k * ws[0].element_size() / bandwidth / 1e3
    if weights == "fp8-group":
        dequant = ws[0].float() * scale.repeat_interleave(128, dim=0)[:k].t()
    else:
        dequant = ws[0].float() * (1.0 if scale is None else scale[:, None])
    reference = x.float() @ dequant.t()
    mode = {"bf16": wo.SCALE_NONE, "fp8": wo.SCALE_CHANNEL, "fp8-group": wo.SCALE_GROUP}[weights]
    heuristic = wo.weight_only_config(rows_m, n, k, mode, 2,
                                      torch.cuda.get_device_properties(0).multi_processor_count, False)
    rows = []
    for label, cfg in [("heuristic", dict(heuristic))] + [(None, c) for c in candidates(splits, wide)]:
        label = label or "bn{BLOCK_N}-bk{BLOCK_K}-w{num_warps}-s{num_stages}-k{SPLIT_K}".format(**cfg)
        try:
            plans = [wo.build_plan(x, w, scale, None, cfg) for w in ws]

            def fn():
                return [plan.run(x, w, scale, None) for plan, w in zip(plans, ws)]

            first = fn()[0]
            err = ((first.float() - reference).norm() / reference.norm()).item()
            us = graph_us(fn) / copies
        except Exception as exc:  # a config the kernel cannot take (resources): reported, the sweep goes on
            print(f"  {weights} {name} {label}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        rows.append({"weights": weights, "shape": name, "rows": rows_m, "label": label, "us": us, "floor_us": floor,
                     "rel_err": err, "config": cfg})
    if weights == "bf16" and rows_m == 1:
        for bn, bk in ((16, 256), (8, 512), (16, 512)):
            def fn():
                for w, out in zip(ws, outs):
                    _gemv_kernel[(n // bn,)](x, w, out, k, BLOCK_N=bn, BLOCK_K=bk, STAGES=4, num_warps=4)

            rows.append({"weights": weights, "shape": name, "label": f"plain-gemv-bn{bn}-bk{bk}",
                         "us": graph_us(fn) / copies, "floor_us": floor, "rel_err": 0.0, "config": {}})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.weight_only_chain", description=__doc__.split("\n")[0])
    p.add_argument("--weights", default="bf16,fp8")
    p.add_argument("--shapes", default="qkv,o,down", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--splits", default="1,2", help="SPLIT_K values to sweep")
    p.add_argument("--copies", type=int, default=8, help="different weights per shape in the timed chain")
    p.add_argument("--bandwidth", type=float, default=0.0, help="copy GB/s (default: measured)")
    p.add_argument("--wide", action="store_true", help="the wider tile space (warps 4/8, stages 1-4, K tiles 128)")
    p.add_argument("--rows", default="1", help="row counts M, comma-separated")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("weight_only_chain needs a GPU")
        return 2
    bandwidth = args.bandwidth or copy_gbps()
    print(f"copy bandwidth {bandwidth:,.0f} GB/s")
    rows = []
    for weights, rows_m, name in itertools.product(args.weights.split(","), [int(v) for v in args.rows.split(",")],
                                                   args.shapes.split(",")):
        splits = [int(v) for v in args.splits.split(",")]
        shape_rows = run_shape(name, weights, args.copies, bandwidth, splits, args.wide, rows_m)
        rows += shape_rows
        best = sorted(shape_rows, key=lambda r: r["us"])
        print(f"== {weights} M={rows_m} {name} {SHAPES[name]}: floor {best[0]['floor_us']:.2f} us", flush=True)
        for r in [r for r in shape_rows if r["label"] == "heuristic"] + best[:6]:
            print(f"   {r['label']:28s} {r['us']:7.2f} us  {r['floor_us'] / r['us']:4.0%}  err {r['rel_err']:.1e}")
    out = Path(os.environ.get("OUT", "/tmp")) / "weight_only_chain.json"
    out.write_text(json.dumps({"bandwidth_gbps": bandwidth, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
