# ruff: noqa: B023  (the timed closures run inside the loop iteration that defines them)
"""A W8A8 prefill's gated MLP tail, ``down_proj(act(gate) * up)``, fused against unfused: the product quantized as
it is formed (``fp8_gemm.quantize_gated_fp8``) and the down GEMM over it (``fp8_gated_linear``), against what the
patched model ran before (torch's SiLU, the product, ``fp8_linear``'s quantization and GEMM) and against
transformers' bf16 tail (SiLU, product, cuBLAS ``nn.Linear``); and the product alone in one pass
(``fused_gated_mlp.gated_activation``, a 16-bit ``down_proj``'s input) against torch's two kernels; and the
post-attention norm before gate/up: ``fused_add_rmsnorm(..., fp8_out=granularity)`` (the norm's launch writes E4M3 and
scales) against ``fused_add_rmsnorm`` then ``quantize_fp8`` of its output.

    python -m benchmarks.dev.gated_down                        # Llama-3-8B (I 14336, H 4096), 2048 rows
    python -m benchmarks.dev.gated_down --rows 512,2048,8192 --shapes llama3-8b,qwen3-8b

Per shape and activation granularity (``block``: 1x128, 128x128 block weights, the FP8 checkpoints'; ``row``:
per-channel weights): the quantization alone (fused kernel against ``quantize_fp8`` of a ready bf16 product, both
against the copy bandwidth over the bytes each moves), then the whole tail. CUDA-graph replays (``graph_us``),
inputs random, the fused result checked against the unfused one (relative error). Writes ``gated_down.json`` to
``$OUT`` (default /tmp). Needs a GPU with FP8 (compute capability 8.9+).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .weight_only_chain import copy_gbps, graph_us

SHAPES = {"llama3-8b": (14336, 4096), "qwen3-8b": (12288, 4096), "llama3-70b": (28672, 8192)}
WEIGHTS = {"block": "block", "row": "channel"}  # activation granularity -> the weight scales it pairs with


def _case(rows: int, inter: int, hidden: int, granularity: str, gbps: float) -> dict:
    import fp8_gemm
    from triton_ops_core.testing import relative_error

    torch.manual_seed(0)
    gate = torch.randn(rows, inter, device="cuda", dtype=torch.bfloat16) * 2
    up = torch.randn(rows, inter, device="cuda", dtype=torch.bfloat16)
    linear = torch.nn.Linear(inter, hidden, bias=False, device="cuda", dtype=torch.bfloat16)
    down = fp8_gemm.FP8Linear.from_linear(linear, weight_granularity=WEIGHTS[granularity],
                                          activation_granularity=granularity)
    hidden_bf16 = torch.nn.functional.silu(gate) * up
    element = rows * inter
    scale_bytes = 4 * (rows if granularity == "row" else rows * -(-inter // 128))
    fused_bytes = 2 * 2 * element + element + scale_bytes  # read gate and up, write E4M3 and scales
    quant_bytes = 2 * element + element + scale_bytes  # read the product, write E4M3 and scales
    from fused_gated_mlp import gated_activation

    act_bytes = 3 * 2 * element  # read gate and up, write the product (bf16)
    act_fused = graph_us(lambda: gated_activation(gate, up, "silu"))
    act_torch = graph_us(lambda: torch.nn.functional.silu(gate) * up)
    fused_q = graph_us(lambda: fp8_gemm.quantize_gated_fp8(gate, up, "silu", granularity))
    quant_only = graph_us(lambda: fp8_gemm.quantize_fp8(hidden_bf16, "e4m3", granularity))
    unfused_fn = lambda: down(torch.nn.functional.silu(gate) * up)  # noqa: E731
    fused_fn = lambda: fp8_gemm.fp8_gated_linear(gate, up, down.weight, down.weight_scale, None, "silu",  # noqa: E731
                                                 granularity)
    bf16_fn = lambda: linear(torch.nn.functional.silu(gate) * up)  # noqa: E731
    with torch.no_grad():
        unfused, fused = graph_us(unfused_fn), graph_us(fused_fn)
        bf16 = graph_us(bf16_fn)
        err = relative_error(fused_fn(), unfused_fn().float())
    norm = _norm_case(rows, hidden, granularity, gbps)
    return {**norm,
        "rows": rows, "intermediate": inter, "hidden": hidden, "granularity": granularity,
        "gated_activation_us": act_fused,
        "gated_activation_pct_copy": 100 * act_bytes / (act_fused * 1e-6) / 1e9 / gbps,
        "torch_silu_times_up_us": act_torch,
        "quantize_gated_us": fused_q, "quantize_gated_pct_copy": 100 * fused_bytes / (fused_q * 1e-6) / 1e9 / gbps,
        "quantize_fp8_of_product_us": quant_only,
        "quantize_fp8_pct_copy": 100 * quant_bytes / (quant_only * 1e-6) / 1e9 / gbps,
        "tail_unfused_us": unfused, "tail_fused_us": fused, "tail_bf16_cublas_us": bf16,
        "fused_vs_unfused": unfused / fused, "fused_vs_bf16": bf16 / fused, "rel_error_vs_unfused": err,
    }


def _norm_case(rows: int, hidden: int, granularity: str, gbps: float) -> dict:
    """The residual add and RMSNorm writing E4M3 for gate/up, against the 16-bit norm and ``quantize_fp8``."""
    import fp8_gemm
    from fused_rmsnorm_rope import fused_add_rmsnorm

    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    weight = torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5
    element = rows * hidden
    scale_bytes = 4 * (rows if granularity == "row" else rows * -(-hidden // 128))
    fused_bytes = 3 * 2 * element + element + scale_bytes  # read x and the residual, write the sum, E4M3, scales

    def unfused():
        y, _ = fused_add_rmsnorm(x, residual, weight)
        return fp8_gemm.quantize_fp8(y, "e4m3", granularity)

    fused = lambda: fused_add_rmsnorm(x, residual, weight, fp8_out=granularity)[:2]  # noqa: E731
    same = all(torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a,
                           b.view(torch.uint8) if b.dtype != torch.float32 else b) for a, b in zip(fused(), unfused()))
    fused_us, unfused_us = graph_us(fused), graph_us(unfused)
    return {"norm_fp8_out_us": fused_us, "norm_then_quantize_us": unfused_us,
            "norm_fp8_out_pct_copy": 100 * fused_bytes / (fused_us * 1e-6) / 1e9 / gbps,
            "norm_fp8_out_bit_identical": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="2048")
    parser.add_argument("--shapes", default="llama3-8b")
    parser.add_argument("--granularities", default="block,row")
    args = parser.parse_args()
    gbps = copy_gbps()
    print(f"{torch.cuda.get_device_name()}: copy {gbps:,.0f} GB/s")
    results = []
    for shape in args.shapes.split(","):
        inter, hidden = SHAPES[shape]
        for rows in map(int, args.rows.split(",")):
            for gran in args.granularities.split(","):
                r = _case(rows, inter, hidden, gran, gbps)
                r["shape"] = shape
                results.append(r)
                print(f"{shape} {rows} rows: gated_activation {r['gated_activation_us']:.1f} us "
                      f"({r['gated_activation_pct_copy']:.0f} % of copy) vs torch silu(g) * u "
                      f"{r['torch_silu_times_up_us']:.1f} us")
                print(f"{shape} {rows} rows {gran}: quantize fused {r['quantize_gated_us']:.1f} us "
                      f"({r['quantize_gated_pct_copy']:.0f} % of copy) vs quantize_fp8 of the product "
                      f"{r['quantize_fp8_of_product_us']:.1f} us ({r['quantize_fp8_pct_copy']:.0f} %); tail fused "
                      f"{r['tail_fused_us']:.1f} us, unfused {r['tail_unfused_us']:.1f} us "
                      f"({r['fused_vs_unfused']:.2f}x), bf16 cuBLAS {r['tail_bf16_cublas_us']:.1f} us "
                      f"({r['fused_vs_bf16']:.2f}x); rel. error {r['rel_error_vs_unfused']:.2e}")
                print(f"{shape} {rows} rows {gran}: add + norm writing E4M3 {r['norm_fp8_out_us']:.1f} us "
                      f"({r['norm_fp8_out_pct_copy']:.0f} % of copy) vs add + norm, quantize_fp8 "
                      f"{r['norm_then_quantize_us']:.1f} us; bit-identical: {r['norm_fp8_out_bit_identical']}")
    out = Path(os.environ.get("OUT", "/tmp")) / "gated_down.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbps": gbps, "results": results},
                              indent=1))


if __name__ == "__main__":
    main()
