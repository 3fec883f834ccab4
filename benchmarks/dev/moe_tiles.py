"""Device script: the tiles of fused-moe's grouped GEMMs and its router, gpt-oss-20b's layer, timed per kernel.

    python -m benchmarks.dev.moe_tiles [--tokens 1,8,64] [--weights bf16,fp8] [--budget 400] [--router]

For each token count and expert dtype it times, in CUDA graphs, the gate/up and the down GEMM of the package's
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
``--weights fp8-nk`` stores them ``[E, N, K]`` (K contiguous) instead of gpt-oss's ``[E, K, N]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

HIDDEN = INTER = 2880
E = 32
TOP_K = 4
REPS = 8


def expert_weights(dev: torch.device) -> dict:
    """gpt-oss-layout experts (bf16 and their FP8 quantization) and biases, random, on ``dev``."""
    from fused_moe import quantize_experts_fp8

    g = torch.Generator(device=dev).manual_seed(0)
    w1 = (torch.randn(E, HIDDEN, 2 * INTER, device=dev, generator=g) * 3 * HIDDEN ** -0.5).bfloat16()
    w2 = (torch.randn(E, INTER, HIDDEN, device=dev, generator=g) * INTER ** -0.5).bfloat16()
    b1 = (torch.randn(E, 2 * INTER, device=dev, generator=g) * 0.5).bfloat16()
    b2 = (torch.randn(E, HIDDEN, device=dev, generator=g) * 0.5).bfloat16()
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2)
    # the same FP8 experts stored [E, N, K] (K contiguous, F.linear's layout): the kernels' dot tiles then read
    # K-contiguous weight columns (sm_90 PTX of the gate/up tile: 381 instructions a K step against 564)
    nk = (q1.transpose(1, 2).contiguous(), s1, q2.transpose(1, 2).contiguous(), s2)
    return {"bf16": (w1, None, w2, None), "fp8": (q1, s1, q2, s2), "fp8-nk": nk, "biases": (b1, b2)}


def routings(t: int, dev: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """REPS routings of ``t`` tokens: at one token disjoint expert sets in turn, else random top-k sets."""
    out = []
    for r in range(REPS):
        if t == 1:
            ids = ((TOP_K * r + torch.arange(TOP_K)) % E).view(1, TOP_K)
        else:
            ids = torch.stack([torch.randperm(E)[:TOP_K] for _ in range(t)])
        out.append((ids.to(dev, torch.int32), torch.rand(t, TOP_K, device=dev).softmax(-1)))
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


def time_config(cfg, t: int, dtype: str, w: dict, routes: list) -> tuple[float, float]:
    """(gate/up us, down us) of ``cfg``: the package's own plan for it, launched on prepared groupings."""
    from fused_moe import ops

    ga, gs, da, ds = w[dtype]
    b1, b2 = w["biases"]
    dev = ga.device
    ops.clear_caches()
    saved = ops._config
    ops._config = lambda *a, **k: cfg
    try:
        x = torch.randn(t, HIDDEN, device=dev).bfloat16()
        plan = ops._experts_plan(x, TOP_K, ga, b1, da, b2, "swiglu_oai", "interleaved", dtype != "fp8-nk", 1.702,
                                 7.0, gs, ds)
    finally:
        ops._config = saved
    reps = []
    for ids, wts in routes:
        groups = ops._align(plan.align, ops._flat(ids), E)
        hmid = torch.empty(t * TOP_K, INTER, device=dev, dtype=torch.bfloat16)
        y = torch.empty(t * TOP_K * plan.split, HIDDEN, device=dev, dtype=torch.float32)
        reps.append((wts.reshape(-1).contiguous(), groups, hmid, y))

    def gate_up(r):
        _, g, hmid, _ = r
        plan.gate_up.launch(x, ga, b1, b1 if gs is None else gs, g.sorted_pairs, g.offsets, g.tile_expert,
                            g.tile_start, ga, ga, hmid, ga)  # (ga: the norm weight's, the activation scales' and
        # the intermediate shares' pointers, never touched: NORM, A_SCALED and H_AMAX are off)

    def down(r):
        wts, g, hmid, y = r
        plan.down.launch(hmid, da, b2, b2 if ds is None else ds, wts, g.sorted_pairs, g.offsets, g.tile_expert,
                         g.tile_start, da, y)  # (da: the activation scales' pointer, never read)

    return graph_us(gate_up, reps), graph_us(down, reps)


def candidates(t: int, base, fp8: bool = False):
    """Tiles to try beside the package's choice ``base`` (a MoEConfig); with ``fp8`` every tensor-core tile also with
    fp16 dots (``f16_dot``)."""
    for cfg in _tiles(t, base):
        yield cfg
        if fp8 and not cfg.fma and not cfg.f16_dot:
            yield cfg._replace(f16_dot=True)


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
        if t <= 8:
            for bm, bn, bk, warps, stages in itertools.product((1, 2), (64, 128), (16, 32), (2, 4), (3, 6)):
                if bm * bk * 2 * bn <= 16384:
                    for split in (1, 2, 3) if bm == 1 else (1,):
                        yield MoEConfig(bm, bn, bk, bn, bk, warps, stages, fma=True, down_split_k=split)
    else:
        for bm, bn, dn, warps, stages in itertools.product((64, 128), (64, 128), (64, 128), (4, 8), (3, 4)):
            yield MoEConfig(bm, bn, 64, dn, 64, warps, stages)


def sweep(t: int, dtype: str, w: dict, deadline: float, log) -> None:
    from fused_moe.configs import select_config

    base = select_config(t, TOP_K, HIDDEN, INTER, E, True, 1 if dtype.startswith("fp8") else 2)
    routes = routings(t, w["biases"][0].device)
    best: dict[str, tuple[float, tuple]] = {}
    seen = set()
    for cfg in [base] + [c for c in candidates(t, base, dtype.startswith("fp8")) if c != base]:
        if cfg in seen:
            continue
        seen.add(cfg)
        if time.time() > deadline:
            print("budget spent", flush=True)
            break
        try:
            gu, dn = time_config(cfg, t, dtype, w, routes)
        except Exception as exc:  # a tile that does not fit the device (shared memory) or does not compile
            print(f"{dtype} T={t} {tuple(cfg)} {type(exc).__name__}: {str(exc)[:100]}", flush=True)
            continue
        log.write(json.dumps({"weights": dtype, "tokens": t, "config": cfg._asdict(), "gate_up_us": gu,
                              "down_us": dn, "current": cfg == base}) + "\n")
        log.flush()
        print(f"{dtype} T={t} {tuple(cfg)} gate_up {gu:7.1f} down {dn:7.1f}{'  (current)' if cfg == base else ''}",
              flush=True)
        for key, us in (("gate_up", gu), ("down", dn), ("sum", gu + dn)):
            if key not in best or us < best[key][0]:
                best[key] = (us, tuple(cfg))
    for key, (us, cfg) in best.items():
        print(f"BEST {dtype} T={t} {key}: {us:.1f} us {cfg}", flush=True)


def time_router(dev: torch.device) -> None:
    """The router at 1, 8 and 64 tokens: one program, and the split GEMM at 2, 3 and 4 K steps per program."""
    from fused_moe import moe_route, ops

    rw = (torch.randn(E, HIDDEN, device=dev) * 3 * HIDDEN ** -0.5).bfloat16()
    rb = torch.randn(E, device=dev).bfloat16()
    saved = ops.ROUTE_SPLIT_STEPS
    try:
        for t in (1, 8, 64):
            xs = [torch.randn(t, HIDDEN, device=dev).bfloat16() for _ in range(REPS)]
            cells = []
            for steps in (0, 2, 3, 4):
                ops.ROUTE_SPLIT_STEPS = steps
                ops.clear_caches()
                cells.append(f"{steps or 'one program'}: {graph_us(lambda x: moe_route(x, rw, rb, TOP_K), xs):.1f} us")
            print(f"router T={t}: " + ", ".join(cells), flush=True)
    finally:
        ops.ROUTE_SPLIT_STEPS = saved
        ops.clear_caches()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1,2,4,8,64", help="comma-separated token counts")
    p.add_argument("--weights", default="bf16,fp8", help="comma-separated, of bf16, fp8, fp8-nk (FP8 stored [E, N, K])")
    p.add_argument("--budget", type=float, default=400.0, help="seconds for the whole sweep")
    p.add_argument("--router", action="store_true", help="also time the router's variants")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_tiles needs a CUDA GPU", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    deadline = time.time() + args.budget
    out = Path(os.environ.get("OUT", "/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    if args.router:
        time_router(dev)
    w = expert_weights(dev)
    with open(out / "moe_tiles.jsonl", "a") as log:
        for t, dtype in itertools.product((int(v) for v in args.tokens.split(",")), args.weights.split(",")):
            sweep(t, dtype, w, deadline, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
