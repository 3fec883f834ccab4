# ruff: noqa: B023  (the timed closures run inside the loop iteration that defines them)
"""Can a decode step's latency-bound attention hide the next projection's weight read? An L2-prefetch experiment.

    python -m benchmarks.dev.l2_prefetch

At batch 1 a layer's attention (KV-cache write, attention, split combine: ~10 us on the H200 for 4 MB of K/V) leaves
the HBM mostly idle, and the o projection that follows is a small weight read (16.8 MB in FP8, 33.5 MB in bf16) that
runs at 53-72 % of copy bandwidth: ramp-up and tail. If the o weight were read into L2 (60 MB) while attention runs,
the projection would stream from L2. Per layer, 32 layers' caches and weights back to back in one CUDA graph (the
caches and weights do not stay in L2 between layers):

- ``attn + o``: the model's order today;
- ``attn + o, prefetch``: the same, with a prefetch kernel on a side stream forked before the attention and joined
  before the projection (``cp.async.bulk.prefetch.L2``: one instruction per 4 KB chunk);
- ``o alone`` and ``o, L2-warm`` (the same projection run twice, the second timed by difference): the projection's
  cost cold and its lower bound from L2;
- ``attn alone``.

bf16 weights (``decode_linear``) and E4M3 with channel scales (``FP8Linear``, the weight-only kernel). Writes
``l2_prefetch.json`` to ``$OUT`` (default /tmp). Needs a GPU (sm_90: the bulk prefetch instruction).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from .weight_only_chain import copy_gbps, graph_us

CHUNK = 4096  # bytes per prefetch instruction


@triton.jit
def _prefetch_l2_kernel(ptr, n_chunks, CHUNK_BYTES: tl.constexpr, BLOCK: tl.constexpr):
    """Prefetch ``n_chunks`` chunks of ``CHUNK_BYTES`` from ``ptr`` (a byte pointer) into L2, ``BLOCK`` a program."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n_chunks
    addr = ptr + idx.to(tl.int64) * CHUNK_BYTES
    addr = tl.where(ok, addr, ptr)  # out-of-range lanes prefetch the first chunk again (harmless)
    tl.inline_asm_elementwise(
        f"cp.async.bulk.prefetch.L2.global [$1], {CHUNK_BYTES}; mov.u32 $0, 0;", "=r,l",
        [addr], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_l2(t: torch.Tensor) -> None:
    n_bytes = t.numel() * t.element_size()
    chunks = n_bytes // CHUNK
    block = 128
    _prefetch_l2_kernel[(triton.cdiv(chunks, block),)](t.view(torch.uint8), chunks, CHUNK_BYTES=CHUNK, BLOCK=block,
                                                        num_warps=4)


def main(argv=None) -> int:
    from decode_attention import decode_attention
    from fp8_gemm import FP8Linear, decode_linear

    from .attention_decode import make_layers

    if not torch.cuda.is_available():
        print("l2_prefetch needs a GPU")
        return 2
    bandwidth = copy_gbps()
    copies = 32
    q, layers, mask = make_layers("llama", 1, 1024, copies)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    rows = []
    out = Path(os.environ.get("OUT", "/tmp")) / "l2_prefetch.json"
    for kind in ("bf16", "fp8"):
        lins = []
        for _ in range(copies):
            lin = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
            lins.append(FP8Linear.from_linear(lin, weight_granularity="channel") if kind == "fp8" else lin)

        def o_proj(i):
            lin = lins[i]
            return lin(x) if kind == "fp8" else decode_linear(x, lin.weight)

        def attn(i):
            k, v = layers[i]
            return decode_attention(q, k, v, mask)

        def chain(prefetch: bool, with_attn: bool = True, twice: bool = False):
            def fn():
                outs = []
                for i in range(copies):
                    if prefetch:
                        side.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(side):
                            prefetch_l2(lins[i].weight)
                    if with_attn:
                        outs.append(attn(i))
                    if prefetch:
                        torch.cuda.current_stream().wait_stream(side)
                    outs.append(o_proj(i))
                    if twice:
                        outs.append(o_proj(i))
                return outs
            return fn

        weight_mb = lins[0].weight.numel() * lins[0].weight.element_size() / 1e6
        variants = {
            "attn + o": chain(False),
            "attn + o, prefetch": chain(True),
            "o alone": chain(False, with_attn=False),
            "o twice": chain(False, with_attn=False, twice=True),
            "attn alone": lambda: [attn(i) for i in range(copies)],
        }
        times = {label: graph_us(fn) / copies for label, fn in variants.items()}
        times["o, L2-warm (twice - alone)"] = times["o twice"] - times["o alone"]
        floor = weight_mb * 1e6 / bandwidth / 1e3
        print(f"== o_proj {kind} 4096 x 4096 ({weight_mb:.1f} MB, floor {floor:.2f} us):", flush=True)
        for label, us in times.items():
            print(f"   {label:28s} {us:7.2f} us", flush=True)
        rows.append({"weights": kind, "weight_mb": weight_mb, "floor_us": floor, "us": times})
        out.write_text(json.dumps({"bandwidth_gbps": bandwidth, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
