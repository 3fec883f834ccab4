# ruff: noqa: B023  (the timed lambdas run inside the loop iteration that defines them)
"""Device script: per-row activation quantization inside the FP8 decode GEMM (one launch) against two launches.

    python benchmarks/dev_fp8_fused.py      # writes $OUT/fp8_fused.json and a log

For FP8Linear (bf16 in and out, per-channel weights, per-row activations) at decode sizes it measures, with the
fused path forced on and forced off: the GPU time (the suite's timer: L2 zero-filled, and emptied by a read),
the host time per call (calls issued without synchronizing), and the time per call of an eager loop of calls
(what a decode step without CUDA graphs sees: the larger of host and GPU time), against bf16 ``nn.Linear``.
Outputs are compared bit for bit first. Every program of the fused kernel reads the whole activation to find
its row maxima, so the GPU time of the fused path grows with M * K: the table sets ``FUSED_ROW_QUANT_MAX``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import triton
from host_overhead import host_us  # beside this script (run from benchmarks/ or as a path)

T0 = time.time()
OUT = Path(os.environ.get("OUT", "/tmp/fp8_fused_out"))
OUT.mkdir(parents=True, exist_ok=True)
RESULTS: dict = {"torch": torch.__version__, "triton": triton.__version__, "rows": []}


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def main():
    from fp8_gemm import FP8Linear, clear_caches, fp8_gemm, quantize_fp8
    from fp8_gemm import gemm as gemm_mod
    from triton_ops.benchmark._timing import CudaTimer

    RESULTS["device"] = torch.cuda.get_device_name()
    timers = {"zero": CudaTimer(10, 100, max_ms=40.0), "clean": CudaTimer(10, 100, max_ms=40.0, flush_by="read")}
    spin = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(300):
        spin @ spin
    torch.cuda.synchronize()
    for n, k in ((4096, 4096), (11264, 4096), (4096, 11264), (11264, 11264), (2880, 2880)):
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        q = FP8Linear.from_linear(lin)
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"M": m, "N": n, "K": k}
            outs = {}
            for mode, limit in (("fused", 1 << 30), ("two", 0)):
                gemm_mod.FUSED_ROW_QUANT_MAX = limit
                clear_caches()
                outs[mode] = q(x)
                row[mode] = {f"gpu_{fl}_us": t(lambda: q(x)).median_ms * 1e3 for fl, t in timers.items()}
                row[mode]["host_us"] = host_us(lambda: q(x))
                row[mode]["loop_us"] = host_us(lambda: q(x), until_done=True)
            row["identical"] = bool(torch.equal(outs["fused"], outs["two"]))
            a_q, a_s = quantize_fp8(x, "e4m3", "row")
            w_t, w_s = q.weight.t(), q.weight_scale
            row["gemm_only"] = {f"gpu_{fl}_us": t(lambda: fp8_gemm(a_q, w_t, a_scale=a_s, b_scale=w_s,
                                                                   out_dtype=torch.bfloat16)).median_ms * 1e3
                                for fl, t in timers.items()}
            row["linear"] = {f"gpu_{fl}_us": t(lambda: lin(x)).median_ms * 1e3 for fl, t in timers.items()}
            row["linear"]["host_us"] = host_us(lambda: lin(x))
            row["linear"]["loop_us"] = host_us(lambda: lin(x), until_done=True)
            RESULTS["rows"].append(row)
            f, tw, li = row["fused"], row["two"], row["linear"]
            log(f"M={m:2d} N={n:5d} K={k:5d} identical={row['identical']} | GPU zero/clean us: fused "
                f"{f['gpu_zero_us']:.1f}/{f['gpu_clean_us']:.1f} two {tw['gpu_zero_us']:.1f}/{tw['gpu_clean_us']:.1f}"
                f" gemm only {row['gemm_only']['gpu_zero_us']:.1f}/{row['gemm_only']['gpu_clean_us']:.1f}"
                f" linear {li['gpu_zero_us']:.1f}/{li['gpu_clean_us']:.1f} | host us: fused {f['host_us']:.1f} two "
                f"{tw['host_us']:.1f} linear {li['host_us']:.1f} | loop us: fused {f['loop_us']:.1f} two "
                f"{tw['loop_us']:.1f} linear {li['loop_us']:.1f}")
            (OUT / "fp8_fused.json").write_text(json.dumps(RESULTS, indent=1))
        lin = q = None  # free the weights before the next shape
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
