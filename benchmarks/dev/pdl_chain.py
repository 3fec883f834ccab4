# ruff: noqa: B023  (the timed closures run inside the loop iteration that defines them)
"""Does programmatic dependent launch (PDL) close the gaps of a decode step's kernel chain? A chain experiment.

    python -m benchmarks.dev.pdl_chain

A decode step is a chain of short kernels, each waiting for the one before. Here: 8 layers of Llama-3-8B's one-row
GEMVs (q/k/v 6144x4096, o 4096x4096, gate/up 28672x4096, down 4096x14336; bf16 or E4M3 weights, fp32 FMAs, a plain
GEMV kernel of this file), each reading what the one before wrote, optionally with a one-row RMSNorm kernel before
q/k/v and gate/up (48 kernels), captured in one CUDA graph. Variants per tile (columns, K step, warps, stages):

- no PDL (the chain as launched before session 25);
- ``pdl``: every kernel launched with ``launch_pdl`` and ``gdc_launch_dependents`` at its start, ``gdc_wait`` before
  its first load;
- ``pdl + prefetch``: the same, with the first two weight tiles loaded into registers before the wait;
- ``prefetch`` alone (the peeled loop without PDL: its own effect on the kernel).

Each result is checked against the no-PDL chain's (an early read of the previous kernel's output would show). Time
per chain against the weight bytes at the copy bandwidth measured in the run. Writes ``pdl_chain.json`` to ``$OUT``
(default /tmp). Needs a Hopper GPU. Published: docs/benchmarks/dev/pdl/ (session 25) and docs/pdl.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .weight_only_chain import copy_gbps, graph_us

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): q/k/v, o, gate/up, down
LAYERS = 8
TILES = {torch.bfloat16: [(16, 512, 4, 3), (32, 256, 4, 3), (16, 256, 4, 4), (8, 512, 4, 3)],
         torch.float8_e4m3fn: [(16, 512, 4, 3), (32, 512, 4, 3), (16, 1024, 4, 3), (32, 256, 4, 4)]}


@triton.jit
def _gemv(w_ptr, x_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
          PREFETCH: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    if PDL:
        gdc_launch_dependents()
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if PREFETCH:  # the first two weight tiles before the wait (weights: no kernel of the chain writes them)
        w0 = tl.load(w_ptrs)
        w1 = tl.load(w_ptrs + BLOCK_K)
        if PDL:
            gdc_wait()
        x0 = tl.load(x_ptr + rk).to(tl.float32)
        x1 = tl.load(x_ptr + BLOCK_K + rk).to(tl.float32)
        acc += w0.to(tl.float32) * x0[None, :] + w1.to(tl.float32) * x1[None, :]
        start = 2 * BLOCK_K
    else:
        if PDL:
            gdc_wait()
        start = 0
    for k0 in range(start, K, BLOCK_K):
        acc += tl.load(w_ptrs + k0).to(tl.float32) * tl.load(x_ptr + k0 + rk).to(tl.float32)[None, :]
    tl.store(y_ptr + rn, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty))


@triton.jit
def _norm(x_ptr, w_ptr, y_ptr, K, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    offs = tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
    x = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x) / K + 1e-6)
    tl.store(y_ptr + offs, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=offs < K)


def _chain(weights, with_norms: bool, bufs, norm_w, pdl: bool, prefetch: bool, tile) -> torch.Tensor:
    block_n, block_k, warps, stages = tile
    x = bufs[0]
    for i, w in enumerate(weights):
        n, k = w.shape
        if with_norms and i % 4 in (0, 2):  # before q/k/v and gate/up
            y = bufs[1] if x is bufs[0] else bufs[0]
            _norm[(1,)](x, norm_w, y, k, BLOCK=4096, PDL=pdl, num_warps=4, launch_pdl=pdl)
            x = y
        y = bufs[1] if x is bufs[0] else bufs[0]
        _gemv[(n // block_n,)](w, x, y, n, k, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl, PREFETCH=prefetch,
                               num_warps=warps, num_stages=stages, launch_pdl=pdl)
        x = y
    return x


def main(argv=None) -> int:
    bandwidth = copy_gbps()
    print(f"copy bandwidth {bandwidth:,.0f} GB/s")
    results = []
    for dtype in TILES:
        weights = [(torch.randn(n, k, device="cuda") * 0.02).to(dtype) for _ in range(LAYERS) for n, k in SHAPES]
        floor = sum(w.numel() * w.element_size() for w in weights) / bandwidth / 1e3
        for with_norms in (False, True):
            bufs = [torch.empty(32768, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
            norm_w = torch.rand(4096, device="cuda", dtype=torch.bfloat16)
            x0 = torch.randn(32768, device="cuda", dtype=torch.bfloat16)
            kernels = len(weights) + (2 * LAYERS if with_norms else 0)
            for tile in TILES[dtype]:
                ref = None
                for pdl, prefetch in ((False, False), (True, False), (True, True), (False, True)):
                    bufs[0].copy_(x0)
                    out = _chain(weights, with_norms, bufs, norm_w, pdl, prefetch, tile).float().clone()
                    ref = out if ref is None else ref
                    err = ((out - ref).norm() / ref.norm()).item()
                    us = graph_us(lambda: _chain(weights, with_norms, bufs, norm_w, pdl, prefetch, tile))
                    row = dict(weights=str(dtype).removeprefix("torch."), norms=with_norms, tile=tile, pdl=pdl,
                               prefetch=prefetch, us=round(us, 1), floor_us=round(floor, 1),
                               x_floor=round(us / floor, 3), kernels=kernels,
                               us_over_floor_per_kernel=round((us - floor) / kernels, 2), err=err)
                    results.append(row)
                    print(row, flush=True)
        torch.cuda.empty_cache()
    out = Path(os.environ.get("OUT", "/tmp")) / "pdl_chain.json"
    out.write_text(json.dumps({"copy_gbps": bandwidth, "device": torch.cuda.get_device_name(), "results": results},
                              indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
