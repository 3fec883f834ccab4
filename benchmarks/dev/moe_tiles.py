"""Device script: the tiles of fused-moe's grouped GEMMs and its router, gpt-oss-20b's layer, timed per kernel.

    python -m benchmarks.dev.moe_tiles [--model gpt-oss-20b] [--tokens 1,8,64] [--weights bf16,fp8] [--budget 400]
        [--router]

Every candidate's output (``moe_experts`` with it as the tile choice, one routing) is first compared with the current
choice's: more than ``MAX_REL_ERR`` apart, it is reported ``WRONG`` and not timed. For each token count and expert
dtype it times, in CUDA graphs, the gate/up and the down GEMM of the package's
current choice (``fused_moe.configs.select_config``) and of candidate tiles: tensor-core tiles over row tiles, column
widths, pipeline depths and down-GEMM K splits; at 2 to 8 tokens also CUDA-core (FMA) tiles of one or two rows; in
prefill (more than 64 tokens) wider row and column tiles; at 1 to 8 tokens the one-row tiles in the weight tile's
layout (``MoEConfig.row_layout``) first. Each graph replays eight different routings three times
(the same weights, so at one token the experts hit differ between replays and L2 does not serve them), and the
median of seven replays is reported per launch. ``--router`` also times the router: one program against the split
GEMM (``fused_moe.ops.ROUTE_SPLIT_STEPS``). Lines go to stdout and, as JSON, to ``$OUT/moe_tiles.jsonl``.

It is how session 14's decode tiles were chosen (docs/benchmarks/moe-h200.md, the configs' comments): the best tile
per kernel is printed as ``BEST``. ``block_m`` and ``fma`` are shared by the two GEMMs (one tile table), so the
``sum`` line is the one a config can take. FP8 experts: every tensor-core tile also with fp16 dots (``f16_dot``);
``--weights fp8-nk`` stores them ``[E, N, K]`` (K contiguous) instead of gpt-oss's ``[E, K, N]``; ``fp8-block``
quantizes them with 128x128 block scales (FP8 checkpoints' format; the package caps its tiles to the blocks).
``--model``: gpt-oss-20b's layer (interleaved gate/up ``[E, H, 2I]`` with biases, the clamped SwiGLU) or Qwen3-MoE's
(``qwen3-30b-a3b``, ``qwen3-235b-a22b``: concatenated ``[E, 2I, H]``, SiLU, no biases).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch


class Shape(NamedTuple):
    """One model's MoE layer as the grouped GEMMs see it."""

    hidden: int
    inter: int
    experts: int
    top_k: int
    layout: str  # gate/up columns: "interleaved" (gpt-oss) or "concatenated"
    transposed: bool  # weights [E, K, N] (gpt-oss) rather than [E, N, K]
    activation: str
    biases: bool


MODELS = {"gpt-oss-20b": Shape(2880, 2880, 32, 4, "interleaved", True, "swiglu_oai", True),
          "qwen3-30b-a3b": Shape(2048, 768, 128, 8, "concatenated", False, "silu", False),
          "qwen3-235b-a22b": Shape(4096, 1536, 128, 8, "concatenated", False, "silu", False)}
GPT_OSS = MODELS["gpt-oss-20b"]
HIDDEN, INTER, E, TOP_K = GPT_OSS.hidden, GPT_OSS.inter, GPT_OSS.experts, GPT_OSS.top_k
REPS = 8


def expert_weights(dev: torch.device, shape: Shape = GPT_OSS) -> dict:
    """The layer's experts in its own layout (bf16 and their FP8 quantizations) and biases (None where it has
    none), random, on ``dev``."""
    from fused_moe import quantize_experts_fp8

    g = torch.Generator(device=dev).manual_seed(0)
    e, h, i = shape.experts, shape.hidden, shape.inter
    w1 = torch.randn(e, h, 2 * i, device=dev, generator=g) * 3 * h ** -0.5
    w2 = torch.randn(e, i, h, device=dev, generator=g) * i ** -0.5
    if not shape.transposed:
        w1, w2 = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    w1, w2 = w1.bfloat16(), w2.bfloat16()
    b1 = b2 = None
    if shape.biases:
        b1 = (torch.randn(e, 2 * i, device=dev, generator=g) * 0.5).bfloat16()
        b2 = (torch.randn(e, h, device=dev, generator=g) * 0.5).bfloat16()
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2, transposed=shape.transposed)
    out = {"bf16": (w1, None, w2, None), "fp8": (q1, s1, q2, s2), "biases": (b1, b2)}
    if shape.layout == "concatenated":  # (block scales: the package reads them in this layout only)
        out["fp8-block"] = quantize_experts_fp8(w1, w2, transposed=shape.transposed, granularity="block")
    if shape.transposed:
        # the same FP8 experts stored [E, N, K] (K contiguous, F.linear's layout): the kernels' dot tiles then read
        # K-contiguous weight columns (sm_90 PTX of the gate/up tile: 381 instructions a K step against 564)
        out["fp8-nk"] = (q1.transpose(1, 2).contiguous(), s1, q2.transpose(1, 2).contiguous(), s2)
    return out


def routings(t: int, dev: torch.device, shape: Shape = GPT_OSS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """REPS routings of ``t`` tokens: at one token disjoint expert sets in turn, else random top-k sets."""
    e, k = shape.experts, shape.top_k
    out = []
    for r in range(REPS):
        if t == 1:
            ids = ((k * r + torch.arange(k)) % e).view(1, k)
        else:
            ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
        out.append((ids.to(dev, torch.int32), torch.rand(t, k, device=dev).softmax(-1)))
    return out


def graph_us(launch, args_per_rep: list) -> float:
    """Median time of one ``launch(args)`` over seven replays of a graph of 3 x REPS launches."""
    for a in args_per_rep:
        launch(a)
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for _ in range(3):
            for a in args_per_rep:
                launch(a)
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (3 * len(args_per_rep)))
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def tiles_as(cfg):
    """fused-moe plans ``cfg`` as its tile choice inside the block: ``ops._config`` returns it and the choice the
    plan makes for the weights' layout (``ops.for_weights``) leaves it as it is; the block scales' caps still apply."""
    from fused_moe import ops

    saved = ops._config, ops.for_weights
    ops._config = lambda *a, **k: cfg
    ops.for_weights = lambda chosen, *a, **k: chosen
    ops.clear_caches()
    try:
        yield
    finally:
        ops._config, ops.for_weights = saved
        ops.clear_caches()


def time_config(cfg, t: int, dtype: str, w: dict, routes: list, shape: Shape = GPT_OSS) -> tuple[float, float]:
    """(gate/up us, down us) of ``cfg``: the package's own plan for it (:func:`tiles_as`), launched on prepared
    groupings. The plan applies the package's own adjustments (block scales cap the tiles to their blocks)."""
    from fused_moe import ops

    ga, gs, da, ds = w[dtype]
    b1, b2 = w["biases"]
    dev = ga.device
    with tiles_as(cfg):
        x = torch.randn(t, shape.hidden, device=dev).bfloat16()
        plan = ops._experts_plan(x, shape.top_k, ga, b1, da, b2, shape.activation, shape.layout,
                                 shape.transposed and dtype != "fp8-nk", 1.702, 7.0, gs, ds)
    reps = []
    for ids, wts in routes:
        if plan.grouped:
            groups = ops._align(plan.align, ops._flat(ids), shape.experts)
        else:  # one-row tiles in pair order (no grouping launch): the ids are the tile table
            flat = ops._flat(ids)
            groups = ops.ExpertGroups(flat, flat, flat, flat)
        hmid = torch.empty(t * shape.top_k, shape.inter, device=dev, dtype=torch.bfloat16)
        y = torch.empty(t * shape.top_k * plan.split, shape.hidden, device=dev, dtype=torch.float32)
        reps.append((wts.reshape(-1).contiguous(), groups, hmid, y))
    # the output and the arrival counters of a down GEMM that adds the terms itself (FINISH: no combine launch; the
    # counters are zero at rest, each launch leaves them so); without FINISH the three are never read
    out = torch.empty(t, shape.hidden, device=dev, dtype=torch.bfloat16)
    cnt = torch.zeros(t * plan.down.grid[1], device=dev, dtype=torch.int32) if plan.combine is None else out
    # (ga: every absent bias's and scale's pointer, the norm weight's, the activation scales' and the intermediate
    # shares' pointers, never touched: HAS_BIAS, W_SCALED, NORM, A_SCALED and H_AMAX are off)
    b1, b2 = (ga if b is None else b for b in (b1, b2))

    def gate_up(r):
        _, g, hmid, _ = r
        plan.gate_up.launch(x, ga, b1, ga if gs is None else gs, g.sorted_pairs, g.offsets, g.tile_expert,
                            g.tile_start, ga, ga, hmid, ga)

    def down(r):
        wts, g, hmid, y = r
        plan.down.launch(hmid, da, b2, da if ds is None else ds, wts, g.sorted_pairs, g.offsets, g.tile_expert,
                         g.tile_start, da, y, out, out, cnt)

    return graph_us(gate_up, reps), graph_us(down, reps)


def candidates(t: int, base, fp8: bool = False, fma_only: bool = False, row_layout: bool = False,
               k_steps: tuple[int, ...] = (16, 32, 64), stages_options: tuple[int, ...] = (3, 6),
               splits: tuple[int, ...] = (1, 2, 3)):
    """Tiles to try beside the package's choice ``base`` (a MoEConfig); with ``fp8`` every tensor-core tile also with
    fp16 dots (``f16_dot``); ``fma_only``: only one-row CUDA-core (FMA) tiles (:func:`_fma_grid`), with
    ``row_layout`` in the weight tile's layout (``MoEConfig.row_layout``)."""
    if fma_only:
        yield from _fma_grid(base, row_layout, k_steps, stages_options, splits)
        return
    for cfg in _tiles(t, base):
        yield cfg
        if fp8 and not cfg.fma and not cfg.f16_dot:
            yield cfg._replace(f16_dot=True)


def _fma_grid(base, row_layout: bool = False, k_steps: tuple[int, ...] = (16, 32, 64),
              stages_options: tuple[int, ...] = (3, 6), splits: tuple[int, ...] = (1, 2, 3)):
    """One-row CUDA-core tiles, FP8 decode's family at 1 to 8 tokens, as a factorized grid: the two GEMMs are timed
    apart, so each config pairs the i-th gate/up tile with the i-th down tile (column width, K step of ``k_steps``,
    down K split of ``splits``) for 2 or 4 warps and ``stages_options``; the best of each GEMM per (warps, stages)
    make the best config. ``row_layout``: the same grid with the row's products in the weight tile's layout
    (``MoEConfig.row_layout``)."""
    # (64-deep K steps: twice the bytes in flight a stage, for layers whose experts hit give fewer programs than SMs,
    # Qwen3-30B-A3B's 96 at one token; not swept before session 36)
    # (8 columns in the row layout: twice the programs of 16 where one token's experts give under three per SM,
    # Qwen3-30B-A3B's 384; not swept before session 47)
    gate_up = list(itertools.product((16, 32, 64, 128) if not row_layout else (8, 16, 32, 64), k_steps))
    down = list(itertools.product((32, 64, 128), k_steps, splits))
    for warps, stages in itertools.product((2, 4), stages_options):
        for i, (bn, bk, split) in enumerate(down):
            gn, gk = gate_up[i % len(gate_up)]
            yield base._replace(block_m=1, gate_up_block_n=gn, gate_up_block_k=gk, down_block_n=bn, down_block_k=bk,
                                num_warps=warps, num_stages=stages, fma=True, down_split_k=split,
                                row_layout=row_layout, f16_dot=False)


def _tiles(t: int, base):
    from fused_moe import MoEConfig

    yield base
    if t <= 8:  # one-row tiles in the weight tile's layout first (MoEConfig.row_layout: off until timed)
        for bn, bk, stages, split in itertools.product((64, 128), (32, 64), (3, 6), (1, 2, 3)):
            if bn * bk <= 4096:  # (a [BLOCK_K, 2 * BLOCK_N] fp32 sum: 128 registers a thread of 2 warps)
                yield MoEConfig(1, bn, bk, bn, bk, 2, stages, fma=True, down_split_k=split, row_layout=True)
    if t <= 64:
        for bm, bn, stages in itertools.product((16, 32) if t > 16 else (16,), (32, 64), (3, 4, 6)):
            yield MoEConfig(bm, bn, 64, bn, 64, 4, stages)
        for split in (2, 3, 4):
            yield base._replace(down_split_k=split)
        if t <= 8:  # (32-column tiles: twice the programs where few experts' columns are read)
            for bm, bn, bk, warps, stages in itertools.product((1, 2), (32, 64, 128), (16, 32), (2, 4), (3, 6)):
                if bm * bk * 2 * bn <= 16384:
                    for split in (1, 2, 3) if bm == 1 else (1,):
                        yield MoEConfig(bm, bn, bk, bn, bk, warps, stages, fma=True, down_split_k=split)
    else:
        for bm, bn, dn, warps, stages in itertools.product((64, 128), (64, 128), (64, 128), (4, 8), (3, 4)):
            yield MoEConfig(bm, bn, 64, dn, 64, warps, stages)


def experts_with(cfg, t: int, dtype: str, w: dict, route, shape: Shape = GPT_OSS) -> torch.Tensor:
    """``moe_experts``' output for one routing with ``cfg`` as the package's tile choice (the whole op: grouping,
    both GEMMs, the combine or the down GEMM's own), on tokens drawn from a fixed seed."""
    from fused_moe import moe_experts

    ga, gs, da, ds = w[dtype]
    b1, b2 = w["biases"]
    g = torch.Generator(device=ga.device).manual_seed(7)
    x = torch.randn(t, shape.hidden, device=ga.device, generator=g).bfloat16()
    ids, wts = route
    with tiles_as(cfg):
        return moe_experts(x, ids, wts, ga, b1, da, b2, shape.activation, gate_up_layout=shape.layout,
                           transposed=shape.transposed and dtype != "fp8-nk", gate_up_scale=gs, down_scale=ds)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error in float32 (NaN when either holds a NaN: it then fails any tolerance)."""
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm()).item()


# A candidate whose output differs from the current choice's by more than this (relative) is reported and not timed:
# the two sum the same fp32 products in other orders, within 1e-3 of each other at these shapes
MAX_REL_ERR = 1e-2


def sweep(t: int, dtype: str, w: dict, deadline: float, log, shape: Shape = GPT_OSS, model: str = "",
          fma_only: bool = False, row_layout: bool = False, k_steps: tuple[int, ...] = (16, 32, 64),
          stages_options: tuple[int, ...] = (3, 6), splits: tuple[int, ...] = (1, 2, 3)) -> None:
    from fused_moe.configs import for_weights, select_config

    fp8 = dtype.startswith("fp8")
    base = select_config(t, shape.top_k, shape.hidden, shape.inter, shape.experts, True, 1 if fp8 else 2)
    # the current choice as the plan makes it for these weights' layout (K-contiguous: not gpt-oss's [E, K, N])
    base = for_weights(base, t, not shape.transposed or dtype == "fp8-nk", False)
    routes = routings(t, w["bf16"][0].device, shape)
    best: dict[str, tuple[float, tuple]] = {}
    seen = set()
    # a warm-up run of the current choice, not reported: the first config timed in a process measured up to 15 %
    # slower than the same tile timed later in the sweep (session 38)
    time_config(base, t, dtype, w, routes, shape)
    expected = experts_with(base, t, dtype, w, routes[0], shape)
    for cfg in [base] + [c for c in candidates(t, base, fp8, fma_only, row_layout, k_steps, stages_options, splits)
                          if c != base]:
        if cfg in seen:
            continue
        seen.add(cfg)
        if time.time() > deadline:
            print("budget spent", flush=True)
            break
        try:
            err = rel_err(experts_with(cfg, t, dtype, w, routes[0], shape), expected)
            if not err <= MAX_REL_ERR:  # (NaN fails too)
                print(f"{dtype} T={t} {tuple(cfg)} WRONG: relative error {err:.2e} against the current choice",
                      flush=True)
                continue
            gu, dn = time_config(cfg, t, dtype, w, routes, shape)
        except Exception as exc:  # a tile that does not fit the device (shared memory) or does not compile
            print(f"{dtype} T={t} {tuple(cfg)} {type(exc).__name__}: {str(exc)[:100]}", flush=True)
            continue
        log.write(json.dumps({"model": model, "weights": dtype, "tokens": t, "config": cfg._asdict(), "gate_up_us": gu,
                              "down_us": dn, "rel_err": err, "current": cfg == base}) + "\n")
        log.flush()
        print(f"{dtype} T={t} {tuple(cfg)} gate_up {gu:7.1f} down {dn:7.1f}{'  (current)' if cfg == base else ''}",
              flush=True)
        for key, us in (("gate_up", gu), ("down", dn), ("sum", gu + dn)):
            if key not in best or us < best[key][0]:
                best[key] = (us, tuple(cfg))
    for key, (us, cfg) in best.items():
        print(f"BEST {dtype} T={t} {key}: {us:.1f} us {cfg}", flush=True)


def time_router(dev: torch.device, shape: Shape = GPT_OSS) -> None:
    """The router of ``shape`` at 1, 8 and 64 tokens: one program, the split GEMM at 1 to 4 K steps per program and,
    up to ``ROUTE_ROWS_MAX_TOKENS`` tokens as shipped, the experts split over 8 to 64 programs (``rows/N``)."""
    from fused_moe import moe_route, ops

    e, h = shape.experts, shape.hidden
    rw = (torch.randn(e, h, device=dev) * 3 * h ** -0.5).bfloat16()
    rb = torch.randn(e, device=dev).bfloat16() if shape.biases else None
    saved = ops.ROUTE_SPLIT_STEPS, ops.ROUTE_ROWS_MAX_TOKENS, ops.ROUTE_ROWS_PROGRAMS
    try:
        for t in (1, 8, 64):
            xs = [torch.randn(t, h, device=dev).bfloat16() for _ in range(REPS)]
            cells = []
            ops.ROUTE_ROWS_MAX_TOKENS = 0
            for steps in (0, 1, 2, 3, 4):
                ops.ROUTE_SPLIT_STEPS = steps
                ops.clear_caches()
                us = graph_us(lambda x: moe_route(x, rw, rb, shape.top_k), xs)
                cells.append(f"{steps or 'one program'}: {us:.1f} us")
            ops.ROUTE_SPLIT_STEPS, ops.ROUTE_ROWS_MAX_TOKENS = saved[:2]
            for programs in (8, 16, 32, 64) if t <= saved[1] else ():
                ops.ROUTE_ROWS_PROGRAMS = programs
                ops.clear_caches()
                us = graph_us(lambda x: moe_route(x, rw, rb, shape.top_k), xs)
                cells.append(f"rows/{programs}: {us:.1f} us")
            print(f"router {e}x{h} T={t}: " + ", ".join(cells), flush=True)
    finally:
        ops.ROUTE_SPLIT_STEPS, ops.ROUTE_ROWS_MAX_TOKENS, ops.ROUTE_ROWS_PROGRAMS = saved
        ops.clear_caches()


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt-oss-20b", choices=sorted(MODELS), help="the MoE layer's shape")
    p.add_argument("--tokens", default="1,2,4,8,64", help="comma-separated token counts")
    p.add_argument("--weights", default="bf16,fp8",
                   help="comma-separated, of bf16, fp8, fp8-nk (FP8 stored [E, N, K], gpt-oss only), fp8-block "
                        "(128x128 block scales, Qwen3-MoE only)")
    p.add_argument("--budget", type=float, default=400.0, help="seconds for the whole sweep")
    p.add_argument("--router", action="store_true", help="also time the router's variants")
    p.add_argument("--fma-only", action="store_true", help="beside the current choice, only CUDA-core (FMA) tiles")
    p.add_argument("--row-layout", action="store_true",
                   help="with --fma-only: the one-row tiles in the weight tile's layout (MoEConfig.row_layout)")
    p.add_argument("--k-steps", default="16,32,64", help="with --fma-only: the K steps swept, comma-separated")
    p.add_argument("--stages", default="3,6", help="with --fma-only: the pipeline depths swept, comma-separated")
    p.add_argument("--splits", default="1,2,3", help="with --fma-only: the down GEMM's K splits swept, comma-separated")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_tiles needs a CUDA GPU", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    deadline = time.time() + args.budget
    out = Path(os.environ.get("OUT", "/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    shape = MODELS[args.model]
    if args.router:
        time_router(dev, shape)
    w = expert_weights(dev, shape)
    unknown = [d for d in args.weights.split(",") if d not in w or d == "biases"]
    if unknown:
        p.error(f"--weights {','.join(unknown)}: {args.model} has {', '.join(k for k in w if k != 'biases')}")
    print(f"{args.model}: {shape}; {torch.cuda.get_device_name()}", flush=True)
    with open(out / "moe_tiles.jsonl", "a") as log:
        for t, dtype in itertools.product((int(v) for v in args.tokens.split(",")), args.weights.split(",")):
            sweep(t, dtype, w, deadline, log, shape, args.model, args.fma_only, args.row_layout,
                  _ints(args.k_steps), _ints(args.stages), _ints(args.splits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
