# ruff: noqa: B023  (the timed lambdas run inside the loop iteration that defines them)
"""Device script: decode tiles for gated-MLP layers whose column tiles alone under-fill the GPU (gpt-oss: hidden
2880, intermediate 2880 per expert), with plain loads: split-K and narrow column blocks.

    python -m benchmarks.dev.gated_mlp_narrow      # writes $OUT/gated_mlp_narrow.json and a log

32-column tiles give 90 programs for 2880 columns on 132 SMs, and the plain-load sweep of
``benchmarks.dev.gated_mlp_decode`` tried no split-K. Timed as the published suite times (L2 zero-filled, and
again emptied by a read for the best five), beside the suite's own case at each shape: the package's current
choice, one cuBLAS GEMM on the concatenated weights and the weights-read ceiling. Each candidate is checked
against a float32 reference first. Published: docs/benchmarks/dev/gated-mlp/DECODE-SWEEP.md (session 3).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fused_gated_mlp.configs import decode_block_m

from .gated_mlp import precompile, weights
from .suite_timing import gated_mlp_case, sweep_suite, timed

T0 = time.time()
OUT = Path(os.environ.get("OUT", "/tmp/gated_mlp_narrow"))
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


def zero_and_clean(result) -> dict:
    """Milliseconds of one of the suite's implementations: L2 zero-filled, and emptied by a read."""
    return {"zero": result.ms, "clean": result.clean_ms}


def main():
    from fused_gated_mlp import heuristic_config
    from fused_gated_mlp.ops import gated_mlp_forward

    OUT.mkdir(parents=True, exist_ok=True)
    jobs = [(cfg, h, i, m) for h, i in SHAPES for m in DECODE_M for cfg in candidates(decode_block_m(m))]
    precompile(jobs)
    suite = sweep_suite(benchmark_runs=60, max_ms=30.0)
    spin = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(300):  # clocks up before the first timing
        spin @ spin
    torch.cuda.synchronize()
    results = {"device": torch.cuda.get_device_name(), "rows": []}
    for hidden, inter in SHAPES:
        wg, wu = weights(hidden, inter)
        wbytes = 2 * inter * hidden * 2
        for m in DECODE_M:
            base = gated_mlp_case(suite, m, hidden, inter)
            cat, read = zero_and_clean(base.impl("cuBLAS cat-GEMM")), zero_and_clean(base.impl("weights read"))
            peak = results["peak_copy_gbps"] = suite.peak_copy_gbps  # measured with the suite's first case
            pct = lambda ms: 100 * wbytes / (ms * 1e-3) / 1e9 / peak  # noqa: E731
            x = torch.randn(m, hidden, device="cuda").to(torch.bfloat16)
            ref = F.silu(F.linear(x.float(), wg.float())) * F.linear(x.float(), wu.float())
            heur = heuristic_config(m, hidden, inter, torch.bfloat16, x.device)
            rows = []
            for cfg in [heur] + candidates(decode_block_m(m)):
                fn = lambda: gated_mlp_forward(x, wg, wu, None, None, "silu", 1.702, 7.0, cfg)
                r = timed(suite, str(cfg), fn, reference=lambda: ref)
                if r.timing is None:  # out of resources, or wrong: reported, never timed
                    log(r.status, m, cfg, r.message[:100])
                    continue
                rows.append((r.ms, cfg))
            heur_ms = rows[0][0] if rows and rows[0][1] is heur else float("nan")
            rows.sort(key=lambda r: r[0])
            top = []
            for ms, cfg in rows[:5]:
                fn = lambda: gated_mlp_forward(x, wg, wu, None, None, "silu", 1.702, 7.0, cfg)
                top.append({"zero_ms": ms, "clean_ms": timed(suite, str(cfg), fn, clean=True).clean_ms, "cfg": cfg})
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
