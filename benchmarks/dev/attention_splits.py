# ruff: noqa: B023  (the timed closures run inside the loop iteration that defines them)
"""Decode attention over a static cache whose valid prefix is shorter than the cache: splits that take the KV
blocks in turn against contiguous chunks, and split counts for batches that already fill the GPU.

    python -m benchmarks.dev.attention_splits                      # the default cases
    python -m benchmarks.dev.attention_splits --cases llama:1x65536:32768 --splits auto,1,2,4

A case is ``heads:BATCHxCACHE:VALID``: ``q`` the transposed ``[B, 1, Hq, D]`` projection output, ``k``/``v`` static
caches of ``CACHE`` positions whose first ``VALID`` are valid, transformers' bool mask ``[B, 1, 1, CACHE]`` (what a
``StaticCache`` sized for a long generation holds early in it: ``generate(max_new_tokens=...)`` with a static cache,
or ``torch.compile``'s). Enough layers' caches (up to ``--copies``, at least 256 MB of K/V in all) are called back to
back in one CUDA graph, so the caches do not stay in L2; the time per call is what a graphed model pays. For each
case and split count (``auto``: the package's choice): the splits interleaved (``decode_attention.ops.
INTERLEAVE_SPLITS``, the default) and contiguous, each checked against a float32 reference first; floor = the valid
K/V bytes over the measured copy bandwidth. Writes ``attention_splits.json`` to ``--out`` (default /tmp). Needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .attention_decode import HEADS, reference
from .weight_only_chain import copy_gbps, graph_us

DEFAULT_CASES = ("llama:1x2048:1024,llama:1x65536:1024,llama:1x65536:8192,llama:1x65536:32768,llama:1x65536:60000,"
                 "gptoss:1x65536:32768,llama:8x16384:4096,llama:64x2048:1024,llama:64x33000:32768,"
                 "gptoss:64x33000:32768")


def parse_case(text: str) -> tuple[str, int, int, int]:
    heads, shape, valid = text.split(":")
    batch, cache = shape.split("x")
    return heads, int(batch), int(cache), int(valid)


def make_layers(heads: str, batch: int, cache: int, valid: int, copies: int):
    hq, hkv, d = HEADS[heads]
    per_layer = 2 * batch * hkv * cache * d * 2
    copies = max(1, min(copies, (256 << 20) // max(1, 2 * batch * hkv * valid * d * 2) + 1,
                        (24 << 30) // per_layer))
    q = torch.randn(batch, 1, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    layers = []
    for _ in range(copies):
        k = torch.randn(batch, hkv, cache, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(batch, hkv, cache, d, device="cuda", dtype=torch.bfloat16)
        k[:, :, valid:] = float("nan")  # never attended: must never reach the output
        v[:, :, valid:] = float("nan")
        layers.append((k, v))
    mask = torch.zeros(batch, 1, 1, cache, device="cuda", dtype=torch.bool)
    mask[..., :valid] = True
    return q, layers, mask


def run_case(case: str, splits_options: list[int | None], copies: int, bandwidth: float) -> list[dict]:
    from decode_attention import decode_attention, ops

    heads, batch, cache, valid = parse_case(case)
    q, layers, mask = make_layers(heads, batch, cache, valid, copies)
    few = min(batch, 2)  # the float32 reference of two sequences (a batch of 64 long caches would not fit)
    ref = reference(q[:few], layers[0][0][:few], layers[0][1][:few], valid)
    floor = 2 * layers[0][0][:, :, :valid].numel() * 2 / bandwidth / 1e3
    rows = []
    saved = ops.INTERLEAVE_SPLITS
    try:
        for splits in splits_options:
            for interleave in (True, False):
                ops.INTERLEAVE_SPLITS = interleave
                ops.clear_caches()
                fn = lambda: [decode_attention(q, k, v, mask, num_splits=splits) for k, v in layers]  # noqa: E731
                out = fn()[0][:few]
                err = ((out.float() - ref).norm() / ref.norm()).item()
                us = graph_us(fn, keep=ops.COMBINE_IN_GRAPHS) / len(layers) if err < 2e-2 else float("nan")
                row = {"case": case, "heads": heads, "batch": batch, "cache": cache, "valid": valid,
                       "splits": splits or "auto", "interleave": interleave, "us": us, "floor_us": floor,
                       "x_floor": us / floor, "rel_err": err, "layers": len(layers)}
                rows.append(row)
                print(f"  {case:24s} splits {str(splits or 'auto'):>4s} "
                      f"{'interleaved' if interleave else 'contiguous ':11s} {us:9.2f} us  x floor {us / floor:6.2f}"
                      f"  err {err:.1e}", flush=True)
    finally:
        ops.INTERLEAVE_SPLITS = saved
        ops.clear_caches()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.attention_splits", description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help="heads:BATCHxCACHE:VALID, comma-separated")
    p.add_argument("--splits", default="auto,1,2,4,8",
                   help="split counts, comma-separated (auto: the package's choice); each is capped by the kernel")
    p.add_argument("--full-warps", default=None,
                   help="warps of unsplit programs that fill the GPU (ops.FULL_GPU_WARPS), comma-separated: swept")
    p.add_argument("--prefetch", default=None,
                   help="K/V tiles asked of L2 before the mask pass (ops.PREFETCH_TILES), comma-separated: swept")
    p.add_argument("--combine-in-graphs", default=None,
                   help="0/1: split merged in the attention launch under the graph's capture (ops.COMBINE_IN_GRAPHS), "
                        "comma-separated: swept")
    p.add_argument("--copies", type=int, default=16, help="layers' caches per graph, at most")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_splits needs a GPU")
        return 2
    splits = [None if s == "auto" else int(s) for s in args.splits.split(",")]
    bandwidth = copy_gbps()
    print(f"copy bandwidth {bandwidth:,.0f} GB/s on {torch.cuda.get_device_name()}", flush=True)
    from decode_attention import ops

    rows = []
    shipped = ops.FULL_GPU_WARPS, ops.PREFETCH_TILES, ops.COMBINE_IN_GRAPHS

    def sweep(text, default, kind):
        return [kind(x) for x in text.split(",")] if text else [default]

    try:
        for warps in sweep(args.full_warps, shipped[0], int):
            for prefetch in sweep(args.prefetch, shipped[1], int):
                for combine in sweep(args.combine_in_graphs, shipped[2], lambda x: bool(int(x))):
                    ops.FULL_GPU_WARPS, ops.PREFETCH_TILES, ops.COMBINE_IN_GRAPHS = warps, prefetch, combine
                    print(f"unsplit programs that fill the GPU: {warps} warps; K/V tiles prefetched {prefetch}; "
                          f"splits merged in the launch under capture: {combine}", flush=True)
                    for case in args.cases.split(","):
                        rows += [{**r, "full_gpu_warps": warps, "prefetch_tiles": prefetch,
                                  "combine_in_graphs": combine}
                                 for r in run_case(case, splits, args.copies, bandwidth)]
                        torch.cuda.empty_cache()
    finally:
        ops.FULL_GPU_WARPS, ops.PREFETCH_TILES, ops.COMBINE_IN_GRAPHS = shipped
        ops.clear_caches()
    out = Path(args.out) / "attention_splits.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "copy_gbps": bandwidth, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
