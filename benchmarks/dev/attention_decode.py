# ruff: noqa: B023  (the timed closures run inside the loop iteration that defines them)
"""Decode attention as a patched model calls it: tiles and split counts swept, one layer's call in a CUDA graph.

    python -m benchmarks.dev.attention_decode                       # Llama-3-8B and gpt-oss heads, batch 1/8/64
    python -m benchmarks.dev.attention_decode --cases llama:1x1024 --quick

The call is the one ``triton_ops`` attention backend makes in a decode step with a ``StaticCache``: ``q`` the
transposed ``[B, 1, Hq, D]`` projection output, ``k``/``v`` a static cache of ``context + 13`` positions whose first
``context + 1`` are valid, transformers' bool mask ``[B, 1, 1, S]``. ``--copies`` layers' caches (default 32, a
model's depth) are called back to back in one CUDA graph, so the time per call is what a graphed model pays for it
(the caches do not stay in L2). For each case: the package's plan, the same without a mask (the cache sliced to its
valid positions: what the mask pass costs), and the swept tiles (KV positions a step, warps, stages) x split counts,
each checked against a float32 reference first. The package's plan is also profiled: attention and combine kernels
apart. Writes ``attention_decode.json`` to ``$OUT`` (default /tmp). Needs a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch

from .weight_only_chain import copy_gbps, graph_us

HEADS = {"llama": (32, 8, 128), "gptoss": (64, 8, 64)}  # (query heads, KV heads, head dim)
DEFAULT_CASES = "llama:1x1024,llama:1x8192,llama:8x1024,llama:64x1024,gptoss:1x1024,gptoss:64x1024"


def make_layers(heads: str, batch: int, context: int, copies: int):
    hq, hkv, d = HEADS[heads]
    cache_len = context + 13
    q = torch.randn(batch, 1, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    layers = []
    for _ in range(copies):
        k = torch.randn(batch, hkv, cache_len, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(batch, hkv, cache_len, d, device="cuda", dtype=torch.bfloat16)
        layers.append((k, v))
    mask = torch.zeros(batch, 1, 1, cache_len, device="cuda", dtype=torch.bool)
    mask[..., : context + 1] = True
    return q, layers, mask


def reference(q, k, v, valid: int) -> torch.Tensor:
    g = q.shape[1] // k.shape[1]
    kk = k[:, :, :valid].float().repeat_interleave(g, 1)
    vv = v[:, :, :valid].float().repeat_interleave(g, 1)
    p = torch.softmax(q.float() @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (p @ vv).transpose(1, 2)


def tile_candidates(d: int, quick: bool) -> list[tuple[int, int, int]]:
    """(KV positions a step, warps, stages)."""
    block_ns = (32, 64, 128) if d <= 128 else (32, 64)
    warps = (4,) if quick else (2, 4, 8)
    stages = (2,) if quick else (1, 2, 3)
    return list(itertools.product(block_ns, warps, stages))


def profile_kernels(fn) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.name[:40]] = out.get(e.name[:40], 0.0) + e.device_time / 5
    return out


def run_case(heads: str, batch: int, context: int, copies: int, bandwidth: float, quick: bool) -> list[dict]:
    from decode_attention import decode_attention, ops

    q, layers, mask = make_layers(heads, batch, context, copies)
    valid = context + 1
    ref = reference(q, *layers[0], valid)
    kv_bytes = 2 * layers[0][0][:, :, :valid].numel() * 2
    floor = kv_bytes / bandwidth / 1e3
    base_tiles = ops._tiles
    rows = []

    def timed(label: str, fn, cfg: dict | None) -> None:
        try:
            out = fn()[0]
            err = ((out.float() - ref).norm() / ref.norm()).item()
            us = graph_us(fn) / copies if err < 2e-2 else float("nan")
        except Exception as exc:  # a tile the kernel cannot take: reported, the sweep goes on
            print(f"  {heads} {batch}x{context} {label}: {type(exc).__name__}: {str(exc)[:120]}")
            return
        rows.append({"heads": heads, "batch": batch, "context": context, "label": label, "us": us,
                     "floor_us": floor, "rel_err": err, "config": cfg})

    ops.clear_caches()
    package = lambda: [decode_attention(q, k, v, mask) for k, v in layers]  # noqa: E731
    timed("package", package, None)
    kernels = profile_kernels(package)
    sliced = [(k[:, :, :valid], v[:, :, :valid]) for k, v in layers]
    ops.clear_caches()
    timed("package, no mask", lambda: [decode_attention(q, k, v) for k, v in sliced], None)
    d = HEADS[heads][2]
    splits_options = (None, 1, 2, 4, 8, 16, 32, 64)
    for (bn, warps, stages), splits in itertools.product(tile_candidates(d, quick), splits_options):
        if splits is not None and splits > max(1, valid // 32):
            continue

        def forced(rows_, head_dim, device, bn=bn, warps=warps, stages=stages):
            t = base_tiles(rows_, head_dim, device)
            return t._replace(block_n=bn, num_warps=warps, num_stages=stages)

        ops._tiles = forced
        ops.clear_caches()
        try:
            timed(f"n{bn}-w{warps}-s{stages}-splits{splits or 'auto'}",
                  lambda: [decode_attention(q, k, v, mask, num_splits=splits) for k, v in layers],
                  {"block_n": bn, "warps": warps, "stages": stages, "splits": splits})
        finally:
            ops._tiles = base_tiles
            ops.clear_caches()
    for r in rows:
        r["package_kernels_us"] = {k: v / copies for k, v in kernels.items()}
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.attention_decode", description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help="heads:BATCHxCONTEXT, comma-separated")
    p.add_argument("--copies", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="4 warps, 2 stages only")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_decode needs a GPU")
        return 2
    bandwidth = copy_gbps()
    out = Path(os.environ.get("OUT", "/tmp")) / "attention_decode.json"
    rows: list[dict] = []
    for case in args.cases.split(","):
        heads, shape = case.split(":")
        batch, context = (int(v) for v in shape.split("x"))
        copies = args.copies if batch * context <= 64 * 1024 else max(4, args.copies // 4)
        result = run_case(heads, batch, context, copies, bandwidth, args.quick)
        rows += result
        out.write_text(json.dumps({"bandwidth_gbps": bandwidth, "rows": rows}, indent=1))
        timed = sorted((r for r in result if r["us"] == r["us"] and r["config"]), key=lambda r: r["us"])
        fixed = [r for r in result if r["config"] is None]
        print(f"== {heads} {HEADS[heads]} {batch}x{context}: K/V floor {result[0]['floor_us']:.2f} us; package "
              f"kernels per call: " + ", ".join(f"{k} {v:.2f}" for k, v in result[0]["package_kernels_us"].items()),
              flush=True)
        for r in fixed + timed[:8]:
            print(f"   {r['label']:32s} {r['us']:7.2f} us  err {r['rel_err']:.1e}", flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
