"""Device script: fused-moe with 128x128 block-scaled FP8 experts (FP8 checkpoints' format, transformers'
``FP8Experts``) against per-column FP8 experts and bf16 experts, Qwen3-MoE's layer shapes, in CUDA graphs.

    python -m benchmarks.dev.moe_block_scales [--models qwen3-30b-a3b,qwen3-235b-a22b] [--tokens 1,8,64,512,2048]

Per model and token count: ``moe_experts`` (grouping, both grouped GEMMs, combine) with the experts in bf16, in
E4M3 with one scale per output column (``quantize_experts_fp8``), and in E4M3 with 128x128 block scales
(``quantize_experts_fp8(..., granularity="block")``), all in Qwen3-MoE's ``[E, 2I, H]`` / ``[E, H, I]`` layout,
on random top-k routings (``REPS`` of them captured in one graph by ``moe_tiles.graph_us``, so that one token's
experts differ between launches and L2 does not serve them). ``floor``: the FP8 bytes of the experts hit (the
expected share at random routing) over the copy bandwidth measured first. Each variant is checked against a
float64 product of its own dequantized weights at the first token count. ``--w8a8``: each FP8 variant also with
E4M3 activations per row (``fp8_activations=True``). Lines go to stdout and, as JSON, to
``$OUT/moe_block_scales.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from benchmarks.dev.moe_tiles import graph_us
from benchmarks.dev.weight_only_chain import copy_gbps

MODELS = {"qwen3-30b-a3b": (2048, 768, 128, 8), "qwen3-235b-a22b": (4096, 1536, 128, 8)}  # hidden, inter, E, k
REPS = 8


def _routings(t: int, e: int, k: int, dev: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device="cpu").manual_seed(t)
    out = []
    for _ in range(REPS):
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(dev, torch.int32)
        wts = torch.rand(t, k, generator=g).softmax(-1).to(dev)
        out.append((ids, wts))
    return out


def _dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``[E, out, in]`` FP8 weights and their per-column ``[E, out]`` or block ``[E, out/128, in/128]`` scales."""
    qd = q.double()
    if s.dim() == 2:
        return qd * s.double()[:, :, None]
    full = s.double().repeat_interleave(128, 1)[:, :q.shape[1]].repeat_interleave(128, 2)[:, :, :q.shape[2]]
    return qd * full


def run_model(name: str, tokens: list[int], bandwidth: float, out: Path, w8a8: bool = False) -> None:
    from fused_moe import moe_experts, moe_experts_reference, quantize_experts_fp8

    hidden, inter, e, k = MODELS[name]
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    w1 = (torch.randn(e, 2 * inter, hidden, device=dev, generator=g) * hidden ** -0.5).bfloat16()
    w2 = (torch.randn(e, hidden, inter, device=dev, generator=g) * inter ** -0.5).bfloat16()
    variants = {"bf16": (w1, None, w2, None),
                "fp8 per column": quantize_experts_fp8(w1, w2, transposed=False),
                "fp8 128x128 blocks": quantize_experts_fp8(w1, w2, transposed=False, granularity="block")}
    expert_bytes = 3 * hidden * inter  # one expert's FP8 weights
    for t in tokens:
        routes = _routings(t, e, k, dev)
        x = torch.randn(t, hidden, device=dev, generator=g).bfloat16()
        hit = e * (1 - (1 - k / e) ** t)
        floor_us = hit * expert_bytes / (bandwidth * 1e9) * 1e6
        row = {"model": name, "tokens": t, "experts_hit": round(hit, 1), "fp8_floor_us": round(floor_us, 2)}
        for label, (a, sa, b, sb) in variants.items():
            def fn(route, x=x, a=a, sa=sa, b=b, sb=sb, act=False):
                return moe_experts(x, *route, a, None, b, None, "silu", gate_up_layout="concatenated",
                                   transposed=False, gate_up_scale=sa, down_scale=sb, fp8_activations=act)
            if w8a8 and sa is not None:  # E4M3 activations per row too (the weights are K-major in this layout)
                row[f"{label} W8A8 us"] = round(graph_us(lambda route, fn=fn: fn(route, act=True), routes), 2)
            if t == tokens[0]:  # checked once against float64 of its own (dequantized) weights
                ids, wts = routes[0]
                d1 = a.double() if sa is None else _dequant(a, sa)
                d2 = b.double() if sb is None else _dequant(b, sb)
                ref = moe_experts_reference(x.double(), ids.long(), wts.double(), d1, None, d2, None, "silu",
                                            gate_up_layout="concatenated", transposed=False,
                                            round_intermediate=torch.bfloat16)
                got = fn(routes[0]).double()
                row[f"{label} rel_err"] = float((got - ref).norm() / ref.norm())
            row[f"{label} us"] = round(graph_us(fn, routes), 2)
        row["blocks / per column"] = round(row["fp8 128x128 blocks us"] / row["fp8 per column us"], 3)
        row["blocks / bf16"] = round(row["fp8 128x128 blocks us"] / row["bf16 us"], 3)
        row["floor / blocks"] = round(floor_us / row["fp8 128x128 blocks us"], 3)
        print(" ".join(f"{key}={v}" for key, v in row.items()), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.moe_block_scales", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--tokens", default="1,8,64,512,2048")
    p.add_argument("--w8a8", action="store_true", help="also each FP8 variant with E4M3 activations (W8A8)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_block_scales needs a GPU")
        return 2
    bandwidth = copy_gbps()
    print(f"copy bandwidth {bandwidth:,.0f} GB/s; {torch.cuda.get_device_name()}", flush=True)
    out = Path(os.environ.get("OUT", "/tmp")) / "moe_block_scales.jsonl"
    for name in args.models.split(","):
        run_model(name, [int(v) for v in args.tokens.split(",")], bandwidth, out, args.w8a8)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
