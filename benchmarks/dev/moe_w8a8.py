"""Device script: fused-moe's W8A8 experts (``fp8_activations=True``) against bf16 and weight-only FP8 experts,
gpt-oss-20b's layer (hidden 2880, 32 experts, top 4, intermediate 2880), in CUDA graphs.

    python -m benchmarks.dev.moe_w8a8 [--tokens 1,8,64,512,2048,8192] [--sweep] [--profile]

Per token count: ``moe_experts`` (grouping, both grouped GEMMs, combine; W8A8 also its two row quantizations) with
bf16 experts, weight-only E4M3 experts (gpt-oss's N-major layout), and W8A8 with the E4M3 experts K-major and
N-major, each a graph of eight different routings replayed (``moe_tiles.graph_us``: at one token the experts hit
differ between replays, so L2 does not serve them). ``floor`` is the FP8 bytes of the experts hit over 4.25 TB/s.
W8A8 also runs with the activations quantized another way (``MoEConfig.quant_in_gemm`` flipped: inside the GEMMs or
by launches before them; ``MoEConfig.quant_h_in_down`` flipped: the intermediate inside the down GEMM;
``MoEConfig.quant_x_with_align`` flipped: the tokens' rows quantized in the grouping's launch or their own); at
decode, where the package takes ``MoEConfig.swap_ab`` (16-token tiles, the weights as wgmma's 64-row operand), also
without it (64-token tiles, the tokens as that operand). ``--sweep``
also times W8A8 tiles around the package's choice (``fused_moe.configs.select_config``). ``--profile`` splits each
variant's time by kernel (torch.profiler over graph replays: microseconds per call and launches per call of each
kernel). Lines go to stdout and, as JSON, to ``$OUT/moe_w8a8.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from benchmarks.dev.moe_tiles import HIDDEN, INTER, TOP_K, E, expert_weights, graph_us, routings

BPS = 4.25e12


def _emit(out: Path, **row) -> None:
    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _variants(w: dict):
    from fused_moe import quantize_experts_fp8

    b1, b2 = w["biases"]
    w1, _, w2, _ = w["bf16"]
    q1, s1, q2, s2 = w["fp8"]
    k1, _, k2, _ = quantize_experts_fp8(w1, w2, k_major=True)
    return {
        "bf16": ((w1, b1, w2, b2), {}),
        "fp8 weight-only": ((q1, b1, q2, b2), dict(gate_up_scale=s1, down_scale=s2)),
        "w8a8 k-major": ((k1, b1, k2, b2), dict(gate_up_scale=s1, down_scale=s2, fp8_activations=True)),
        "w8a8 n-major": ((q1, b1, q2, b2), dict(gate_up_scale=s1, down_scale=s2, fp8_activations=True)),
    }


def _time(t: int, x: torch.Tensor, routes: list, weights: tuple, kw: dict) -> float:
    from fused_moe import moe_experts

    return graph_us(lambda r: moe_experts(x, r[0], r[1], weights[0], weights[1], weights[2], weights[3], **kw),
                    routes)


def _profile(x: torch.Tensor, routes: list, weights: tuple, kw: dict) -> list[tuple[str, float, float]]:
    """(kernel, us per call, launches per call) of ``moe_experts`` over ``routes``, from graph replays."""
    from fused_moe import moe_experts
    from torch.profiler import ProfilerActivity, profile

    def launch(r):
        return moe_experts(x, r[0], r[1], weights[0], weights[1], weights[2], weights[3], **kw)

    for r in routes:
        launch(r)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in routes:
            launch(r)
    graph.replay()
    torch.cuda.synchronize()
    replays = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    calls = replays * len(routes)
    rows = [(e.key, e.device_time_total / calls, e.count / calls) for e in prof.key_averages()
            if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def _time_config(cfg, t: int, x: torch.Tensor, routes: list, weights: tuple, kw: dict) -> float:
    """``_time`` with the package's tiles replaced by ``cfg`` (restored after)."""
    from fused_moe import ops

    saved = ops._config
    ops._config = lambda *a: cfg
    ops.clear_caches()
    try:
        return _time(t, x, routes, weights, kw)
    finally:
        ops._config = saved
        ops.clear_caches()


def _ints(csv: str) -> list[int]:
    return [int(v) for v in csv.split(",")]


def _floor_us(t: int, routes: list) -> float:
    hit = sum(int(torch.unique(ids).numel()) for ids, _ in routes) / len(routes)
    return hit * 3 * HIDDEN * INTER / BPS * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8,64,512,2048,8192")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--profile", action="store_true", help="each variant's time split by kernel")
    ap.add_argument("--sweep-bn", default="32,64,128", help="--sweep: gate/up column tiles (down: the same at decode)")
    ap.add_argument("--sweep-bk", default="64", help="--sweep: K steps of both GEMMs")
    ap.add_argument("--sweep-stages", default="3,4,6")
    ap.add_argument("--sweep-warps", default="4,8")
    ap.add_argument("--sweep-swap", action="store_true", help="--sweep: MoEConfig.swap_ab tiles (decode)")
    ap.add_argument("--sweep-split", default="", help="--sweep: the down GEMM's K splits (default: the chosen one)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("a GPU is needed", file=sys.stderr)
        return 2
    from fused_moe import select_config

    dev = torch.device("cuda")
    out = Path(os.environ.get("OUT", ".")) / "moe_w8a8.jsonl"
    w = expert_weights(dev)
    variants = _variants(w)
    for t in (int(s) for s in args.tokens.split(",")):
        x = torch.randn(t, HIDDEN, device=dev).bfloat16()
        routes = routings(t, dev)
        floor = _floor_us(t, routes)
        base = None
        for name, (weights, kw) in variants.items():
            us = _time(t, x, routes, weights, kw)
            base = base or us
            _emit(out, tokens=t, variant=name, us=round(us, 1), vs_bf16=round(us / base, 3),
                  fp8_floor_us=round(floor, 1))
            if args.profile and "n-major" not in name:
                for kernel, k_us, launches in _profile(x, routes, weights, kw):
                    _emit(out, tokens=t, variant=name, kernel=kernel[:60], us=round(k_us, 1),
                          launches=round(launches, 2))
        chosen = select_config(t, TOP_K, HIDDEN, INTER, E, dev, 1, True)
        w8a8 = variants["w8a8 k-major"]
        others = [(f"{switch}={not getattr(chosen, switch)}", chosen._replace(**{switch: not getattr(chosen, switch)}))
                  # the other ways to quantize the activations: launches before the GEMMs, or inside them
                  # (quant_in_gemm: both; quant_h_in_down: the intermediate, with scales from the gate/up GEMM's
                  # shares), the tokens' rows in the grouping's launch or a launch of their own (quant_x_with_align)
                  for switch in ("quant_in_gemm", "quant_h_in_down", "quant_x_with_align")]
        if t <= 64:  # decode: the chosen swapped tiles (MoEConfig.swap_ab) against the tokens as the 64-row operand
            others += [("no swap_ab, block_m=64, down_block_n=32",
                        chosen._replace(swap_ab=False, block_m=64, gate_up_block_n=32, down_block_n=32))]
        for label, cfg in others:
            us = _time_config(cfg, t, x, routes, *w8a8)
            _emit(out, tokens=t, variant=f"w8a8 k-major, {label}", us=round(us, 1), vs_bf16=round(us / base, 3),
                  fp8_floor_us=round(floor, 1))
        if not args.sweep:
            continue
        splits = _ints(args.sweep_split) if args.sweep_split else [chosen.down_split_k]
        grid = [(bn, bk, stages, warps, split) for bn in _ints(args.sweep_bn) for bk in _ints(args.sweep_bk)
                for stages in _ints(args.sweep_stages) for warps in _ints(args.sweep_warps) for split in splits]
        for bn, bk, stages, warps, split in grid:
            if args.sweep_swap:  # 16-token tiles, the weights as the 64/128-row operand, down tiles twice as wide
                cfg = chosen._replace(block_m=16, gate_up_block_n=bn, gate_up_block_k=bk, down_block_n=2 * bn,
                                      down_block_k=bk, num_warps=warps, num_stages=stages, swap_ab=True)
            else:
                cfg = chosen._replace(block_m=64, gate_up_block_n=bn, gate_up_block_k=bk,
                                      down_block_n=bn if t <= 64 else 128, down_block_k=bk, num_warps=warps,
                                      num_stages=stages, swap_ab=False)
            cfg = cfg._replace(down_split_k=split)
            try:
                us = _time_config(cfg, t, x, routes, *w8a8)
            except Exception as exc:  # noqa: BLE001 - a tile that does not fit: reported, skipped
                _emit(out, tokens=t, sweep=str(cfg), error=type(exc).__name__)
                continue
            _emit(out, tokens=t, sweep=str(cfg), us=round(us, 1), chosen=cfg == chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
