# ruff: noqa: B023  (the timed lambdas run inside the loop iteration that defines them)
"""Device script: one gpt-oss-20b expert MLP as the model stores it, against the model's own PyTorch code.

    python benchmarks/dev_gpt_oss_mlp.py      # writes $OUT/gpt_oss_mlp.json and a log

gpt-oss keeps each expert's gate and up projections in ONE interleaved ``[2 * 2880, 2880]`` weight (gate rows at
even indices) with a bias, and applies its clamped SwiGLU (``alpha = 1.702``, ``limit = 7``). The eager baseline is
the model's formulation: ``gate_up = x @ W^T + b``, ``gate, up = gate_up[..., ::2], gate_up[..., 1::2]``, clamp,
``gate * sigmoid(alpha * gate) * (up + 1)``. Ours: ``fused_gated_mlp(x, W, activation="swiglu_oai",
weight_layout="interleaved", gate_bias=b)``. Timed as the suite times (L2 zero-filled, and emptied by a read), bf16,
M = 1, 8, 32, 64 (decode: tokens routed to one expert) and 2048; every result checked against float32 first.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

T0 = time.time()
OUT = Path(os.environ.get("OUT", "/tmp/gpt_oss_mlp"))
OUT.mkdir(parents=True, exist_ok=True)
HIDDEN = INTER = 2880
ALPHA, LIMIT = 1.702, 7.0


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def gpt_oss_eager(x, w, b):
    gate_up = torch.nn.functional.linear(x, w, b)
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=LIMIT)
    up = up.clamp(min=-LIMIT, max=LIMIT)
    return gate * torch.sigmoid(ALPHA * gate) * (up + 1)


def main():
    from fused_gated_mlp import fused_gated_mlp
    from triton_ops.benchmark._timing import CopyBandwidth, CudaTimer

    timers = {"zero": CudaTimer(10, 100, max_ms=40.0), "clean": CudaTimer(10, 100, max_ms=40.0, flush_by="read")}
    peak = CopyBandwidth(timers["zero"]).peak()
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(2 * INTER, HIDDEN, device="cuda", generator=g) / HIDDEN**0.5).to(torch.bfloat16)
    b = (torch.randn(2 * INTER, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    compiled = torch.compile(gpt_oss_eager, dynamic=False)
    spin = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(300):
        spin @ spin
    torch.cuda.synchronize()
    rows = []
    for m in (1, 8, 32, 64, 2048):
        x = (torch.randn(m, HIDDEN, device="cuda", generator=g) * 2).to(torch.bfloat16)
        ref = gpt_oss_eager(x.float(), w.float(), b.float())
        impls = {
            "ours": lambda: fused_gated_mlp(x, w, activation="swiglu_oai", weight_layout="interleaved", gate_bias=b,
                                            alpha=ALPHA, limit=LIMIT),
            "eager": lambda: gpt_oss_eager(x, w, b),
            "torch.compile": lambda: compiled(x, w, b),
            "cuBLAS GEMM only": lambda: torch.nn.functional.linear(x, w, b),
        }
        row = {"M": m}
        for name, fn in impls.items():
            out = fn()
            if name != "cuBLAS GEMM only":
                err = ((out.float() - ref).norm() / ref.norm()).item()
                row[f"{name}_err"] = err
                if not err < 2e-2:
                    log("WRONG", name, m, err)
                    continue
            row[name] = {k: t(fn).median_ms * 1e3 for k, t in timers.items()}
        wbytes = w.numel() * 2
        ours = row["ours"]
        log(f"M={m:4d}: ours {ours['zero']:.1f}/{ours['clean']:.1f} us ("
            f"{100 * wbytes / (ours['zero'] * 1e-6) / 1e9 / peak:.0f}/"
            f"{100 * wbytes / (ours['clean'] * 1e-6) / 1e9 / peak:.0f} % of peak copy) | "
            + " | ".join(f"{k} {v['zero']:.1f}/{v['clean']:.1f} us ({v['zero'] / ours['zero']:.2f}x)"
                         for k, v in row.items() if isinstance(v, dict) and k != "ours")
            + f" | err ours {row['ours_err']:.1e}")
        rows.append(row)
        (OUT / "gpt_oss_mlp.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                          "peak_copy_gbps": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
