# ruff: noqa: B023  (the timed closures run inside the loop iteration that defines them)
"""The library's own decode kernels chained over decoder layers, with and without programmatic dependent launch.

    python -m benchmarks.dev.pdl_layers                                 # Llama-3-8B's layer, FP8 blocks and bf16
    TRITON_OPS_PDL_TRIGGER=wait python -m benchmarks.dev.pdl_layers     # the next kernel launches once this one runs
    TRITON_OPS_PDL_TRIGGER=end python -m benchmarks.dev.pdl_layers      # ... once this one's main loop is done
    python -m benchmarks.dev.pdl_layers --weights fp8 --prefetch-tiles 0,2,8

``benchmarks.dev.pdl_chain`` (session 25) measured PDL on a plain GEMV kernel of its own: 1.2-1.6 us less per
kernel on the H200. Whole models (``bench_model``'s ``-pdl`` variants) gained 0-2 % on an H100. This sits between
the two: the kernels a patched Llama's decode step launches at one row, as the decoder layers call them, without
attention and its cache: the input norm inside the packed q/k/v GEMM (``decode_linear(norm_weight=)``), the output
projection with its residual add (``decode_linear(residual=)``; it reads the q/k/v output's first ``hidden``
columns, standing in for the attention's), the post-attention RMSNorm (``fused_rmsnorm_rope.rmsnorm``), the fused
gated MLP and the down projection with its residual add: five launches a layer, ``--layers`` layers with weights of
their own (no L2 reuse between layers), captured in one CUDA graph. Timed with PDL off and on
(``triton_ops_core.pdl.override``), with PDL at each ``--prefetch-tiles`` depth (K tiles of each weight row a
program asks L2 for before its wait: ``fp8_gemm.weight_only.PREFETCH_TILES`` and
``fused_gated_mlp.ops.PREFETCH_TILES``, shipped 2). Where a kernel lets the next one launch is fixed per process
(``TRITON_OPS_PDL_TRIGGER``, read at import): run it once per setting. Every result must equal the serial chain's
bits (an early read of a previous kernel's output would show). Reports microseconds per layer against the floor
(the weight bytes over the copy bandwidth measured in the run). Writes ``pdl_layers.json`` to ``--out`` (default
``$OUT`` or /tmp). Needs a Hopper GPU.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .weight_only_chain import copy_gbps, graph_us

HIDDEN, INTER, QKV = 4096, 14336, 6144  # Llama-3-8B: 32 q heads and 2 x 8 kv heads of 128
EPS = 1e-5
DEVICE = "cuda"


def _weight(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(n, k, device=DEVICE, generator=gen) / k**0.5).to(torch.bfloat16)


def make_layer(fp8: bool, gen: torch.Generator) -> dict:
    """One layer's weights: bf16, or E4M3 in 128x128 blocks as an FP8 checkpoint holds them (the linears as
    ``FP8Linear`` stores them, the gate and up as the fused MLP takes them)."""
    from fp8_gemm import FP8Linear
    from fused_gated_mlp import quantize_weight_fp8

    def linear(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = _weight(n, k, gen)
        if not fp8:
            return w, None
        lin = torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)
        lin.weight.data.copy_(w)
        q = FP8Linear.from_linear(lin, weight_granularity="block", activation_granularity="block")
        return q._buffers["weight"], q._buffers["weight_scale"]

    def gated(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return quantize_weight_fp8(w, "block") if fp8 else (w, None)

    norm = lambda: (1 + 0.1 * torch.randn(HIDDEN, device=DEVICE, generator=gen)).to(torch.bfloat16)  # noqa: E731
    layer = {"qkv": linear(QKV, HIDDEN), "o": linear(HIDDEN, HIDDEN), "down": linear(HIDDEN, INTER),
             "gate": gated(_weight(INTER, HIDDEN, gen)), "up": gated(_weight(INTER, HIDDEN, gen)),
             "input_norm": norm(), "post_norm": norm()}
    return layer


def layer_bytes(layer: dict) -> int:
    tensors = [t for v in layer.values() for t in (v if isinstance(v, tuple) else (v,)) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def decode_layer(h: torch.Tensor, layer: dict) -> torch.Tensor:
    """One decoder layer's kernels as the patched layers launch them at one row (attention left out)."""
    from fp8_gemm import decode_linear
    from fused_gated_mlp import fused_gated_mlp
    from fused_rmsnorm_rope import rmsnorm

    (w_qkv, s_qkv), (w_o, s_o), (w_down, s_down) = layer["qkv"], layer["o"], layer["down"]
    (w_gate, s_gate), (w_up, s_up) = layer["gate"], layer["up"]
    qkv = decode_linear(h, w_qkv, weight_scale=s_qkv, norm_weight=layer["input_norm"], norm_eps=EPS)
    h = decode_linear(qkv[:, :HIDDEN], w_o, weight_scale=s_o, residual=h)
    x = rmsnorm(h, layer["post_norm"], EPS)
    a = fused_gated_mlp(x, w_gate, w_up, "silu", gate_scale=s_gate, up_scale=s_up)
    return decode_linear(a, w_down, weight_scale=s_down, residual=h)


def chain(h0: torch.Tensor, layers: list[dict]) -> torch.Tensor:
    h = h0
    for layer in layers:
        h = decode_layer(h, layer)
    return h


def set_prefetch(tiles: int) -> None:
    import fused_gated_mlp.ops as gated_ops
    from fp8_gemm import weight_only

    weight_only.PREFETCH_TILES = gated_ops.PREFETCH_TILES = tiles


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="fp8,bf16", help="comma-separated, of fp8 (128x128 blocks) and bf16")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--prefetch-tiles", default="2,8", help="comma-separated PDL prefetch depths (K tiles a row)")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    return parser.parse_args(argv)


@torch.inference_mode()
def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        print("pdl_layers needs a Hopper (or later) GPU: programmatic dependent launch is sm_90+")
        return 0
    from triton_ops_core import pdl

    bandwidth = copy_gbps()
    trigger = pdl.TRIGGER
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth:,.0f} GB/s, PDL trigger {trigger}", flush=True)
    results = []
    for weights in args.weights.split(","):
        gen = torch.Generator(device="cuda").manual_seed(0)
        layers = [make_layer(weights == "fp8", gen) for _ in range(args.layers)]
        floor = sum(layer_bytes(layer) for layer in layers) / bandwidth / 1e3
        h0 = torch.randn(1, HIDDEN, device="cuda", generator=gen).to(torch.bfloat16)
        set_prefetch(2)
        with pdl.override(False):
            want = chain(h0, layers).clone()
            settings = [("off", 2, graph_us(lambda: chain(h0, layers)))]
        if not torch.isfinite(want).all():
            raise RuntimeError(f"{weights}: the serial chain's output is not finite")
        for tiles in (int(t) for t in args.prefetch_tiles.split(",")):
            set_prefetch(tiles)
            with pdl.override(True):
                got = chain(h0, layers)
                if not torch.equal(got, want):
                    raise RuntimeError(f"{weights}, PDL, {tiles} prefetch tiles: the chain's bits differ from the "
                                       "serial chain's")
                settings.append(("on", tiles, graph_us(lambda: chain(h0, layers))))
        set_prefetch(2)
        for mode, tiles, us in settings:
            row = dict(weights=weights, pdl=mode, trigger=trigger if mode == "on" else "-", prefetch_tiles=tiles,
                       layers=args.layers, us=round(us, 1), us_per_layer=round(us / args.layers, 2),
                       floor_us=round(floor, 1), x_floor=round(us / floor, 3),
                       over_floor_per_kernel_us=round((us - floor) / (5 * args.layers), 2))
            results.append(row)
            print(row, flush=True)
        torch.cuda.empty_cache()
    out = Path(args.out) / "pdl_layers.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbps": bandwidth, "trigger": trigger,
                               "torch": torch.__version__, "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
