"""Device measurements of fused-rmsnorm-rope (the kernel owner's script; the official suite is ``benchmarks``).

    python -m benchmarks.dev.rmsnorm_rope [--no-compile] [--out DIR] [--budget SECONDS]

On the GPU, for each issue shape and dtype: the fused kernel, a device copy of the same bytes (read + write of x),
eager PyTorch and ``torch.compile`` of the reference, all timed with ``triton.testing.do_bench`` (median, L2 flushed
between runs) in this one process. Then decode (64 tokens x 4096 with position_ids: do_bench, host wall time per
call, CUDA-graph replay) and ``fused_qk_norm_rope`` on Qwen3-8B-like shapes. Results go to
``DIR/rmsnorm_rope.json``; a table is printed last. Published: packages/fused-rmsnorm-rope/README.md, "Performance".

The ``--sweep`` option, which timed every config of ``RMSNORM_ROPE_CONFIGS`` (how ``heuristic_config`` was set),
launched the package's private kernel launchers and was removed: see this script at commit b1f7c59.
"""
# Lambdas below close over loop variables on purpose: each is timed at once, inside its iteration.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
from fused_rmsnorm_rope import fused_qk_norm_rope, fused_rmsnorm_rope, heuristic_config
from fused_rmsnorm_rope.reference import qk_norm_rope_reference, rmsnorm_rope_reference
from triton.testing import do_bench

SHAPES = [(2, 1024, 4096), (1, 8192, 4096), (4, 2048, 8192), (8, 4096, 2048), (16, 8192, 4096)]
DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIM = 128
START = time.time()


def tables(n: int, width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, width, 2, device="cuda", dtype=torch.float32) / width))
    ang = torch.arange(n, device="cuda", dtype=torch.float32)[:, None] * inv[None, :]
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def host_us(fn, n: int = 2000) -> float:
    """Wall time per call of back-to-back calls (host-bound when the kernel is tiny)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def graph_us(fn) -> float:
    """One call captured in a CUDA graph, replayed under do_bench: the GPU-side cost without the host."""
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench(g.replay) * 1e3


def copy_ms(nbytes: int) -> float:
    src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src))


def row_elems(hidden: int) -> int:
    return triton.next_power_of_2(hidden // HEAD_DIM) * HEAD_DIM


def prefill(args, results: dict) -> None:
    compiled = {}
    for (b, s, h) in SHAPES:
        for dtype in DTYPES:
            if time.time() - START > args.budget:
                print(f"budget reached, skipping {(b, s, h)} {dtype}", flush=True)
                continue
            x = torch.randn(b, s, h, device="cuda", dtype=dtype)
            w = torch.randn(h, device="cuda", dtype=dtype)
            cos, sin = tables(s, HEAD_DIM, dtype)
            nbytes = x.numel() * x.element_size()
            rec = {"shape": [b, s, h], "dtype": str(dtype).removeprefix("torch."), "GB_moved": 2 * nbytes / 1e9}
            rec["copy_ms"] = copy_ms(nbytes)
            rec["fused_ms"] = bench(lambda: fused_rmsnorm_rope(x, w, cos, sin))
            rec["heuristic"] = heuristic_config(row_elems(h), b * s)
            if not args.no_compile and nbytes <= 2**31 and (dtype == torch.float16 or not args.fp16_compile_only):
                key = (b, s, h, dtype)
                torch._dynamo.reset()
                compiled[key] = torch.compile(rmsnorm_rope_reference, dynamic=False)
                fn = compiled[key]
                fn(x, w, cos, sin)
                rec["compile_ms"] = bench(lambda: fn(x, w, cos, sin))
            if nbytes <= 2**29:
                rec["eager_ms"] = bench(lambda: rmsnorm_rope_reference(x, w, cos, sin))
            rec["fused_GBps"] = 2 * nbytes / rec["fused_ms"] / 1e6
            rec["pct_of_copy"] = 100 * rec["copy_ms"] / rec["fused_ms"]
            rec["pct_of_peak_3017"] = 100 * rec["fused_GBps"] / 3017
            results["prefill"].append(rec)
            print(json.dumps(rec), flush=True)


def decode(results: dict) -> None:
    h, n = 4096, 64
    for dtype in DTYPES:
        x = torch.randn(n, 1, h, device="cuda", dtype=dtype)
        w = torch.randn(h, device="cuda", dtype=dtype)
        cos, sin = tables(32768, HEAD_DIM, dtype)
        pos = torch.randint(0, 32768, (n, 1), device="cuda")
        fn = lambda: fused_rmsnorm_rope(x, w, cos, sin, position_ids=pos)  # noqa: E731
        rec = {"case": f"decode {n}x{h} position_ids", "dtype": str(dtype).removeprefix("torch.")}
        rec["do_bench_us"] = bench(fn) * 1e3
        rec["host_us_per_call"] = host_us(fn)
        rec["cuda_graph_us"] = graph_us(fn)
        rec["copy_us"] = copy_ms(x.numel() * x.element_size()) * 1e3
        torch._dynamo.reset()
        cf = torch.compile(rmsnorm_rope_reference, dynamic=False)
        cf(x, w, cos, sin, position_ids=pos)
        rec["compile_us"] = bench(lambda: cf(x, w, cos, sin, position_ids=pos)) * 1e3
        results["decode"].append(rec)
        print(json.dumps(rec), flush=True)


def qk(results: dict, args) -> None:
    hq, hk, d = 32, 8, 128
    for (b, s) in [(1, 4096), (4, 2048), (64, 1)]:
        for dtype in DTYPES:
            qkv = torch.randn(b, s, (hq + 2 * hk) * d, device="cuda", dtype=dtype)
            q = qkv[..., : hq * d].unflatten(-1, (hq, d))
            k = qkv[..., hq * d: (hq + hk) * d].unflatten(-1, (hk, d))
            w = torch.randn(d, device="cuda", dtype=dtype)
            cos, sin = tables(8192, d, dtype)
            pos = torch.arange(s, device="cuda")[None, :].expand(b, s) + (4000 if s == 1 else 0)
            nbytes = (q.numel() + k.numel()) * q.element_size()
            rec = {"case": f"qk_norm_rope b{b} s{s} {hq}q/{hk}kv x{d}", "dtype": str(dtype).removeprefix("torch.")}
            rec["fused_ms"] = bench(lambda: fused_qk_norm_rope(q, k, w, w, cos, sin, pos))
            rec["copy_ms"] = copy_ms(nbytes)
            rec["pct_of_copy"] = 100 * rec["copy_ms"] / rec["fused_ms"]
            rec["GBps"] = 2 * nbytes / rec["fused_ms"] / 1e6
            if s == 1:  # decode: host cost per call and CUDA-graph replay
                fn = lambda: fused_qk_norm_rope(q, k, w, w, cos, sin, pos)  # noqa: E731
                rec["host_us_per_call"] = host_us(fn)
                rec["cuda_graph_us"] = graph_us(fn)
            if not args.no_compile and time.time() - START < args.budget:
                torch._dynamo.reset()
                cf = torch.compile(qk_norm_rope_reference, dynamic=False)
                cf(q, k, w, w, cos, sin, pos)
                rec["compile_ms"] = bench(lambda: cf(q, k, w, w, cos, sin, pos))
            results["qk"].append(rec)
            print(json.dumps(rec), flush=True)


def table(results: dict) -> str:
    lines = ["| shape | dtype | fused us | GB/s | % copy | % 3017 | compile us | eager us | x compile | heuristic |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["prefill"]:
        c = r.get("compile_ms")
        lines.append(
            f"| {tuple(r['shape'])} | {r['dtype']} | {r['fused_ms'] * 1e3:.1f} | {r['fused_GBps']:.0f} | "
            f"{r['pct_of_copy']:.1f} | {r['pct_of_peak_3017']:.1f} | {c * 1e3 if c else float('nan'):.1f} | "
            f"{r.get('eager_ms', float('nan')) * 1e3:.1f} | {c / r['fused_ms'] if c else float('nan'):.2f} | "
            f"w{r['heuristic']['num_warps']}_r{r['heuristic']['ROWS_PER_PROG']} |")
    for r in results["decode"]:
        lines.append(f"| {r['case']} | {r['dtype']} | do_bench {r['do_bench_us']:.1f} us, "
                     f"host {r['host_us_per_call']:.1f} us/call, graph {r['cuda_graph_us']:.1f} us, "
                     f"copy {r['copy_us']:.1f} us, compile {r['compile_us']:.1f} us |")
    for r in results["qk"]:
        c = r.get("compile_ms")
        extra = (f" host {r['host_us_per_call']:.1f} us/call, graph {r['cuda_graph_us']:.1f} us |"
                 if "host_us_per_call" in r else "")
        lines.append(f"| {r['case']} | {r['dtype']} | {r['fused_ms'] * 1e3:.1f} us | {r['GBps']:.0f} GB/s | "
                     f"{r['pct_of_copy']:.1f} % copy | compile {c * 1e3 if c else float('nan'):.1f} us |{extra}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget", type=float, default=150.0, help="seconds after which prefill cases are skipped")
    ap.add_argument("--only", default="prefill,decode,qk")
    ap.add_argument("--fp16-compile-only", action="store_true", help="torch.compile baselines for fp16 only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "command": " ".join(sys.argv), "prefill": [], "decode": [], "qk": []}
    print(json.dumps({k: results[k] for k in ("device", "torch", "triton")}), flush=True)
    for part in args.only.split(","):
        {"prefill": lambda: prefill(args, results), "decode": lambda: decode(results),
         "qk": lambda: qk(results, args)}[part]()
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "rmsnorm_rope.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
