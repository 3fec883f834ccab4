# ruff: noqa: B023  (the timed closures run inside the loop iteration that defines them)
"""Prefill FP8 GEMMs with block and group scales against per-channel ones: the Triton TMA kernel, the Gluon wgmma
kernel for group and block scales (``fp8_gemm.gemm_wgmma``) and its tiles, cuBLAS.

    python -m benchmarks.dev.w8a8_prefill                           # M = 2048, Llama-3-8B's projections
    python -m benchmarks.dev.w8a8_prefill --rows 2048,8192 --shapes qkv,down,sq4096
    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \
        python -m benchmarks.dev.w8a8_prefill --shapes gate --kinds block --copies 1 --ncu

Per case, in one run: cuBLAS bf16 ``mm`` and row-wise ``_scaled_mm``; ``fp8_gemm``'s per-channel call (per-row
activations, the faithful default, the TMA kernel) and the same on the Gluon ping-pong kernel (``path="wgmma"``,
one program a tile and persistent); then per scale kind (``group``: 1x128 activation blocks and
group weights, the default recipe's; ``block``: 1x128 and 128x128; ``row-group``: per-row activations, group
weights) the Triton TMA kernel's default and the Gluon kernel's tiles (block weights on it with their one-FMA
scaling, ``path="wgmma"``). Operands are quantized
beforehand (not timed); each GEMM runs on ``--copies`` different weights back to back in a CUDA graph. Errors:
relative Frobenius error against the float32 product of the dequantized operands. Writes ``w8a8_prefill.json`` to
``$OUT`` (default /tmp). Needs a Hopper GPU.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .weight_only_chain import graph_us
from .weight_only_rows import SHAPES

EXTRA_SHAPES = {"sq4096": (4096, 4096), "sq8192": (8192, 8192)}
KINDS = {"group": ("block", "group"), "block": ("block", "block"), "row-group": ("row", "group")}


def wgmma_candidates(lead: bool = False) -> list[dict]:
    """The Gluon configs timed; ``lead``: only the default 128 x 128 tile and the warp-specialized ones."""
    if lead:
        out = [{"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "STAGES": 4, "num_warps": 8}]
        for stages in (3, 4):
            out.append({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "STAGES": stages, "num_warps": 4,
                        "PINGPONG": True})
        for stages in (3, 4, 5):
            out.append({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "STAGES": stages, "num_warps": 4,
                        "PINGPONG": True, "PERSISTENT": True})
        out.append({**out[-3], "BALANCED": True})  # the default's tiles spread evenly over the programs
        return out
    out = []
    for stages in (3, 4, 5):
        for group_m in (8, 16):
            out.append({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": group_m, "STAGES": stages, "num_warps": 8})
    out.append({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "STAGES": 4, "num_warps": 4})
    for stages in (3, 4):
        for group_m in (8, 16):
            out.append({"BLOCK_M": 256, "BLOCK_N": 128, "GROUP_M": group_m, "STAGES": stages, "num_warps": 8})
            out.append({"BLOCK_M": 256, "BLOCK_N": 128, "GROUP_M": group_m, "STAGES": stages, "num_warps": 8,
                        "A_REGS": True})
    for stages in (3, 4):  # the warp-specialized 128 x 128 kernel (a TMA partition, two consumer warp groups)
        out.append({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "STAGES": stages, "num_warps": 4, "PINGPONG": True})
        out.append({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "STAGES": stages, "num_warps": 4, "PINGPONG": True,
                    "PERSISTENT": True})
    return out


def pingpong_candidates() -> list[dict]:
    """The ping-pong configs timed for per-channel weights: one program a tile, and persistent."""
    base = {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 4, "PINGPONG": True}
    return ([{**base, "STAGES": 4}] + [{**base, "STAGES": s, "PERSISTENT": True} for s in (3, 4, 5)]
            + [{**base, "STAGES": 3, "PERSISTENT": True, "BALANCED": True}])


def _dequant_a(q, s, gran):
    x = q.float()
    if gran == "row":
        return x * s.reshape(-1, 1)
    m, k = x.shape
    return (x.reshape(m, -1, 128) * s.reshape(m, -1, 1)).reshape(m, k) if k % 128 == 0 else None


def _dequant_w(q, s, gran):
    # q: [K, N] view; s: group [ceil(K/128), N] or block [ceil(K/128), ceil(N/128)]
    w = q.float()
    k, n = w.shape
    if gran == "group":
        return w * s.repeat_interleave(128, 0)[:k]
    return w * s.repeat_interleave(128, 0)[:k].repeat_interleave(128, 1)[:, :n]


def run_case(name: str, m: int, copies: int, kinds: list[str], ncu: bool = False, lead: bool = False) -> list[dict]:
    from fp8_gemm import gemm, gemm_wgmma, quantize_fp8

    n, k = (SHAPES | EXTRA_SHAPES)[name]
    flops = 2 * m * n * k
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]
    outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    rows = []

    def record(label, fn, ref=None, kind=""):
        if ncu:  # one call of each GEMM inside the profiler range, for `ncu --profile-from-start off`
            try:
                fn()
                torch.cuda.synchronize()
            except Exception as exc:  # a tile the kernel cannot take: said, the others are profiled
                print(f"  {name} M={m} {label}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                return
            torch.cuda.cudart().cudaProfilerStart()
            fn()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            print(f"  profiled {name} M={m} {label}", flush=True)
            return
        try:
            fn()
            err = None
            if ref is not None:
                err = ((outs[0].float() - ref).norm() / ref.norm()).item()
                if outs[0].isnan().any():
                    err = float("nan")
            us = graph_us(fn) / copies
        except Exception as exc:  # a tile the kernel cannot take: reported, the sweep goes on
            print(f"  {name} M={m} {label}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            return
        rows.append({"shape": name, "M": m, "N": n, "K": k, "kind": kind, "label": label, "us": us,
                     "tflops": flops / us / 1e6, "rel_err": err})

    record("cublas bf16 mm", lambda: [torch.mm(x, w.t(), out=o) for w, o in zip(ws, outs)])
    xq, xs = quantize_fp8(x, "e4m3", "row")
    wch = [quantize_fp8(w.t(), "e4m3", "channel", role="weight") for w in ws]
    record("cublas _scaled_mm rowwise",
           lambda: [torch._scaled_mm(xq, b, scale_a=xs.reshape(-1, 1), scale_b=bs.reshape(1, -1),
                                     out_dtype=torch.bfloat16, out=o) for (b, bs), o in zip(wch, outs)])
    ref = (x.float() @ ws[0].float().t())
    record("ours per-channel (tma, faithful)",
           lambda: [gemm._launch(xq, b, o, xs, bs, None, gemm.A_ROW, gemm.B_CHANNEL, False, "tma") for (b, bs), o
                    in zip(wch, outs)], ref, "channel")
    if gemm_wgmma.AVAILABLE:  # per-channel weights on the ping-pong kernel (faithful, scales in the epilogue)
        for cfg in pingpong_candidates():
            label = "channel: wgmma ping-pong s{STAGES} g{GROUP_M}".format(**cfg)
            label += " persistent" if cfg.get("PERSISTENT") else ""
            label += " balanced" if cfg.get("BALANCED") else ""
            record(label, lambda: [gemm._launch(xq, b, o, xs, bs, None, gemm.A_ROW, gemm.B_CHANNEL, False, "wgmma",
                                                cfg) for (b, bs), o in zip(wch, outs)], ref, "channel")
    for kind in kinds:
        a_gran, w_gran = KINDS[kind]
        aq, as_ = quantize_fp8(x, "e4m3", a_gran)
        wq = [quantize_fp8(w.t(), "e4m3", w_gran, role="weight") for w in ws]
        a_mode = gemm.A_BLOCK if a_gran == "block" else gemm.A_ROW
        b_mode = gemm.B_GROUP if w_gran == "group" else gemm.B_BLOCK
        da = _dequant_a(aq, as_, a_gran)
        ref = da @ _dequant_w(*wq[0], w_gran) if da is not None else None
        record(f"{kind}: triton tma (default)",
               lambda: [gemm._launch(aq, b, o, as_, bs, None, a_mode, b_mode, False, "tma") for (b, bs), o
                        in zip(wq, outs)], ref, kind)
        if not gemm_wgmma.AVAILABLE:  # the Gluon kernel takes group and (asked for) block scales
            continue
        for cfg in wgmma_candidates(lead):
            label = "{}: wgmma {BLOCK_M}x{BLOCK_N} w{num_warps} s{STAGES} g{GROUP_M}".format(kind, **cfg)
            label += " a-regs" if cfg.get("A_REGS") else ""
            label += " ping-pong" if cfg.get("PINGPONG") else ""
            label += " persistent" if cfg.get("PERSISTENT") else ""
            label += " balanced" if cfg.get("BALANCED") else ""
            record(label, lambda: [gemm._launch(aq, b, o, as_, bs, None, a_mode, b_mode, False, "wgmma", cfg)
                                   for (b, bs), o in zip(wq, outs)], ref, kind)
        record(f"{kind}: public fp8_gemm",
               lambda: [gemm.fp8_gemm(aq, b, a_scale=as_, b_scale=bs, out_dtype=torch.bfloat16) for b, bs in wq],
               None, kind)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.w8a8_prefill", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="qkv,o,gate,down")
    p.add_argument("--rows", default="2048")
    p.add_argument("--kinds", default="group,block,row-group")
    p.add_argument("--copies", type=int, default=2)
    p.add_argument("--lead", action="store_true",
                   help="of the Gluon configs, only the default 128 x 128 tile and the warp-specialized ones")
    p.add_argument("--ncu", action="store_true",
                   help="time nothing: run each GEMM once inside cudaProfilerStart/Stop (under `ncu "
                        "--profile-from-start off`; with --copies 1 each kernel is profiled once)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("w8a8_prefill needs a GPU")
        return 2
    out = Path(os.environ.get("OUT", "/tmp")) / "w8a8_prefill.json"
    rows: list[dict] = []
    for name in args.shapes.split(","):
        for m in (int(v) for v in args.rows.split(",")):
            case = run_case(name, m, args.copies, args.kinds.split(","), args.ncu, args.lead)
            if args.ncu:
                continue
            rows += case
            out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
            channel = next((r["us"] for r in case if r["kind"] == "channel"), None)
            print(f"== {name} M={m} N={case[0]['N']} K={case[0]['K']}", flush=True)
            for r in case:
                rel = f"{channel / r['us']:.2f}x of per-channel" if channel else ""
                err = "" if r["rel_err"] is None else f"err {r['rel_err']:.1e}"
                print(f"   {r['label']:42s} {r['us']:8.1f} us {r['tflops']:7.0f} TFLOP/s  {rel:22s} {err}",
                      flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
