# ruff: noqa: B023  (the timed lambdas run inside the loop iteration that defines them)
"""Device script: decode tiles for gated-MLP layers whose column tiles alone under-fill the GPU (gpt-oss: hidden
2880, intermediate 2880 per expert), with plain loads: split-K and narrow column blocks.

    python benchmarks/dev_gated_mlp_narrow.py      # writes $OUT/gated_mlp_narrow.json and a log

32-column tiles give 90 programs for 2880 columns on 132 SMs, and the plain-load sweep of
``dev_gated_mlp_decode.py`` tried no split-K. Timed as the published suite times (CudaTimer: L2 zero-filled, and
again emptied by a read), beside the package's current choice, one cuBLAS GEMM on the concatenated weights and
the weights-read ceiling; each candidate is checked against a float32 reference first.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from dev_gated_mlp import precompile, weights  # beside this script (run from benchmarks/)
from fused_gated_mlp.configs import decode_block_m

T0 = time.time()
OUT = Path(os.environ.get("OUT", "/tmp/gated_mlp_narrow"))
OUT.mkdir(parents=True, exist_ok=True)
SHAPES = [(2880, 2880)]
DECODE_M = [1, 8, 32, 64]


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def candidates(bm):
    out = []
    for bn, bk, split, stages in itertools.product((16, 32, 64), (64, 128, 256), (1, 2, 3, 4), (3, 4)):
        if (bm + 2 * bn) * bk * 2 * stages > 220 * 1024:
            continue
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, GROUP_M=1, num_warps=4,
                        num_stages=stages, USE_TMA=False, path="decode"))
    return out


def main():
    from fused_gated_mlp import heuristic_config
    from fused_gated_mlp.ops import gated_mlp_forward
    from triton_ops.benchmark._ceilings import weights_read
    from triton_ops.benchmark._timing import CopyBandwidth, CudaTimer

    jobs = [(cfg, h, i, m) for h, i in SHAPES for m in DECODE_M for cfg in candidates(decode_block_m(m))]
    precompile(jobs)
    timers = {"zero": CudaTimer(10, 60, max_ms=30.0), "clean": CudaTimer(10, 60, max_ms=30.0, flush_by="read")}
    peak = CopyBandwidth(timers["zero"]).peak()
    spin = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(300):
        spin @ spin
    torch.cuda.synchronize()
    results = {"device": torch.cuda.get_device_name(), "peak_copy_gbps": peak, "rows": []}
    for hidden, inter in SHAPES:
        wg, wu = weights(hidden, inter)
        wcat = torch.cat([wg, wu])
        wbytes = 2 * inter * hidden * 2
        pct = lambda ms: 100 * wbytes / (ms * 1e-3) / 1e9 / peak  # noqa: E731
        read = {k: t(weights_read(wg, wu)).median_ms for k, t in timers.items()}
        for m in DECODE_M:
            x = torch.randn(m, hidden, device="cuda").to(torch.bfloat16)
            ref = F.silu(F.linear(x.float(), wg.float())) * F.linear(x.float(), wu.float())
            cat = {k: t(lambda: F.linear(x, wcat)).median_ms for k, t in timers.items()}
            heur = heuristic_config(m, hidden, inter, torch.bfloat16, x.device)
            rows = []
            for cfg in [heur] + candidates(decode_block_m(m)):
                try:
                    out = gated_mlp_forward(x, wg, wu, None, None, "silu", 1.702, 7.0, cfg)
                except Exception as exc:  # noqa: BLE001
                    log("skip", cfg, repr(exc)[:100])
                    continue
                err = ((out.float() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    log("WRONG", m, cfg, err)
                    continue
                rows.append((timers["zero"](lambda: gated_mlp_forward(x, wg, wu, None, None, "silu", 1.702, 7.0,
                                                                       cfg)).median_ms, cfg))
            heur_ms = rows[0][0]
            rows.sort(key=lambda r: r[0])
            top = []
            for ms, cfg in rows[:5]:
                clean = timers["clean"](lambda: gated_mlp_forward(x, wg, wu, None, None, "silu", 1.702, 7.0,
                                                                   cfg)).median_ms
                top.append({"zero_ms": ms, "clean_ms": clean, "cfg": cfg})
            row = {"M": m, "hidden": hidden, "inter": inter, "heur": heur, "heur_ms": heur_ms, "cat_ms": cat,
                   "read_ms": read, "top": top}
            results["rows"].append(row)
            log(f"M={m:2d} {inter}x{hidden} % of peak copy (zero/clean): heuristic {pct(heur_ms):.0f} | cat "
                f"{pct(cat['zero']):.0f}/{pct(cat['clean']):.0f} | read {pct(read['zero']):.0f}/"
                f"{pct(read['clean']):.0f}")
            for t in top:
                c = t["cfg"]
                log(f"    {pct(t['zero_ms']):.0f}/{pct(t['clean_ms']):.0f} ({t['zero_ms'] * 1e3:.1f} us) "
                    f"BN{c['BLOCK_N']} BK{c['BLOCK_K']} split{c['SPLIT_K']} st{c['num_stages']}")
            (OUT / "gated_mlp_narrow.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
