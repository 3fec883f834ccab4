# ruff: noqa: B023  (the timed lambdas run inside the loop iteration that defines them)
"""Device script of the fused-gated-mlp package: config sweep and the benchmark against eager / compile / cuBLAS.

    python -m benchmarks.dev.gated_mlp sweep   # time candidate configs per shape (parallel precompile first)
    python -m benchmarks.dev.gated_mlp bench   # final numbers with the package's own config choice
    python -m benchmarks.dev.gated_mlp all     # sweep, then bench with the sweep's winners (what ran on the H100)

Shapes: intermediate 5632 / 11264 with hidden 4096, 22528 with hidden 6144 (and gpt-oss 2880x2880), bf16;
decode M = 1, 8, 32, 64 (reported as % of the measured copy bandwidth, weight bytes) and prefill M = 2048, 8192
(TFLOP/s and ratio to eager). Writes JSON (and in bench mode a Markdown table and a PNG) under $OUT. Published:
docs/benchmarks/dev/gated-mlp/RESULTS.md. Candidates run through the public launcher with an explicit config
(``fused_gated_mlp.ops.gated_mlp_forward``). The ``aot`` mode (sm_90 registers, spills and shared memory
without a GPU) compiled the package's private kernel objects and was removed: see this script at commit 8363412.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

T0 = time.time()
OUT = Path(os.environ.get("OUT", "/tmp/gated_mlp_out"))
SHAPES = [(4096, 5632), (4096, 11264), (6144, 22528), (2880, 2880)]
DECODE_M = [1, 8, 32, 64]
PREFILL_M = [2048, 8192]
BUDGET_S = float(os.environ.get("GMLP_BUDGET_S", "170"))  # no new benchmark problem after this many seconds
SWEEP_BUDGET_S = float(os.environ.get("GMLP_SWEEP_BUDGET_S", "120"))  # no new sweep problem after this

PREFILL_CANDIDATES = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, USE_TMA=False),
]
PREFILL_CANDIDATES = [{**c, "SPLIT_K": 1, "GROUP_M": 8} for c in PREFILL_CANDIDATES]


DECODE_TILES = [(16, 128, 3), (16, 128, 4), (16, 256, 3), (32, 64, 4), (32, 128, 3), (32, 128, 4), (32, 256, 3),
                (64, 64, 4), (64, 128, 3), (64, 128, 4)]


def decode_candidates(block_m: int) -> list[dict]:
    out = []
    for bn, bk, stages in DECODE_TILES:
        for split in (1, 2, 3, 4):
            # stay inside the 227 KB of shared memory an H100 program may hold
            if (block_m + 2 * bn) * bk * 2 * (stages - 1) > 220 * 1024:
                continue
            out.append(dict(BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, GROUP_M=1,
                            num_warps=4, num_stages=stages))
    return out


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def weights(hidden, inter, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    s = 1.0 / hidden**0.5
    wg = (torch.randn(inter, hidden, device="cuda", generator=g) * s).to(dtype)
    wu = (torch.randn(inter, hidden, device="cuda", generator=g) * s).to(dtype)
    return wg, wu


def _compile_worker(jobs):
    """Run each (config, hidden, inter, m) once so the Triton disk cache holds the binary for the main process."""
    from fused_gated_mlp.ops import gated_mlp_forward

    done = 0
    cache = {}
    for cfg, hidden, inter, m in jobs:
        if (hidden, inter) not in cache:
            cache.clear()
            cache[(hidden, inter)] = weights(hidden, inter)
        wg, wu = cache[(hidden, inter)]
        x = torch.randn(m, hidden, device="cuda").to(torch.bfloat16)
        try:
            gated_mlp_forward(x, wg, wu, None, None, "silu", 1.702, 7.0, cfg)
            torch.cuda.synchronize()
            done += 1
        except Exception as exc:  # a config that does not compile (resources) is reported, not fatal
            print("compile failed", cfg, repr(exc)[:200], flush=True)
    return done


def precompile(jobs, workers=14):
    ctx = mp.get_context("spawn")
    chunks = [jobs[i::workers] for i in range(workers)]
    with ctx.Pool(workers) as pool:
        n = sum(pool.map(_compile_worker, [c for c in chunks if c]))
    log(f"precompiled {n}/{len(jobs)} variants")


def bench_ms(fn, rep=30, warmup=8):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_gbps(nbytes):
    src = torch.randn(nbytes // 2, device="cuda").to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), rep=60)
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e9


def eager(x, wg, wu):
    return F.silu(F.linear(x, wg)) * F.linear(x, wu)


def reference(x, wg, wu):
    return F.silu(F.linear(x.float(), wg.float())) * F.linear(x.float(), wu.float())


def check(out, x, wg, wu, ref=None):
    ref = reference(x, wg, wu) if ref is None else ref
    err = ((out.float() - ref).norm() / ref.norm()).item()
    return err < 1e-2, err


def sweep():
    from fused_gated_mlp import heuristic_config
    from fused_gated_mlp.configs import decode_block_m
    from fused_gated_mlp.ops import gated_mlp_forward

    jobs = []
    for bm in (16, 32, 64):
        m = {16: 8, 32: 32, 64: 64}[bm]
        for cfg in decode_candidates(bm):
            jobs.append((cfg, 4096, 5632, m))
    for cfg in PREFILL_CANDIDATES:
        jobs.append((cfg, 4096, 5632, 256))
    for m in (1, 32, 64, 256):
        jobs.append((heuristic_config(m, 4096, 5632, torch.bfloat16, torch.device("cuda")), 4096, 5632, m))
    precompile(jobs)
    wait_for_tests()

    peak_copy = copy_gbps(512 * 2**20)
    log(f"copy bandwidth 512 MiB: {peak_copy:.0f} GB/s")
    results = {"peak_copy_GBps": peak_copy, "decode": {}, "prefill": {}, "wrong": []}
    bad = results["wrong"]
    for hidden, inter in SHAPES:
        wg, wu = weights(hidden, inter)
        wbytes = 2 * inter * hidden * 2
        same_copy = copy_gbps(wbytes)
        for m in DECODE_M:
            if time.time() - T0 > SWEEP_BUDGET_S:
                log("budget reached; stopping the sweep")
                break
            x = torch.randn(m, hidden, device="cuda").to(torch.bfloat16)
            t_eager = bench_ms(lambda: eager(x, wg, wu))
            heur = heuristic_config(m, hidden, inter, torch.bfloat16, x.device)
            ref = reference(x, wg, wu)
            key = f"m{m}_H{hidden}_I{inter}"
            rows = []
            for cfg in decode_candidates(decode_block_m(m)) + [heur]:
                try:
                    out = gated_mlp_forward(x, wg, wu, None, None, "silu", 1.702, 7.0, cfg)
                except Exception as exc:  # out of shared memory or registers: skip the config
                    log("skip", cfg, repr(exc)[:120])
                    continue
                ok, err = check(out, x, wg, wu, ref)
                if not ok:
                    bad.append((key, err, cfg))
                    log("WRONG", key, f"{err:.3e}", cfg)
                    continue
                ms = bench_ms(lambda: gated_mlp_forward(x, wg, wu, None, None, "silu", 1.702, 7.0, cfg), rep=15,
                              warmup=4)
                rows.append((ms, cfg))
            rows.sort(key=lambda r: r[0])
            if not rows:
                continue
            best_ms, best = rows[0]
            heur_ms = ([ms for ms, c in rows if c is heur] or [float("nan")])[0]
            gbps = lambda ms: wbytes / (ms * 1e-3) / 1e9  # noqa: E731
            key = f"m{m}_H{hidden}_I{inter}"
            results["decode"][key] = {
                "eager_ms": t_eager, "best_ms": best_ms, "best": best, "heuristic_ms": heur_ms, "heuristic": heur,
                "best_pct_copy": 100 * gbps(best_ms) / peak_copy, "heur_pct_copy": 100 * gbps(heur_ms) / peak_copy,
                "eager_pct_copy": 100 * gbps(t_eager) / peak_copy, "same_size_copy_GBps": same_copy,
                "top5": [(ms, c) for ms, c in rows[:5]],
            }
            log(f"decode {key}: eager {t_eager*1e3:.1f}us ({100*gbps(t_eager)/peak_copy:.0f}%), "
                f"heur {heur_ms*1e3:.1f}us ({100*gbps(heur_ms)/peak_copy:.0f}%), best {best_ms*1e3:.1f}us "
                f"({100*gbps(best_ms)/peak_copy:.0f}%) {best}")
        for m in PREFILL_M:
            if time.time() - T0 > SWEEP_BUDGET_S:
                break
            x = torch.randn(m, hidden, device="cuda").to(torch.bfloat16)
            t_eager = bench_ms(lambda: eager(x, wg, wu), rep=50)
            flops = 2 * 2 * m * hidden * inter
            ref = reference(x, wg, wu)
            key = f"m{m}_H{hidden}_I{inter}"
            rows = []
            for cfg in PREFILL_CANDIDATES:
                try:
                    out = gated_mlp_forward(x, wg, wu, None, None, "silu", 1.702, 7.0, cfg)
                except Exception as exc:
                    log("skip", cfg, repr(exc)[:120])
                    continue
                ok, err = check(out, x, wg, wu, ref)
                if not ok:
                    bad.append((key, err, cfg))
                    log("WRONG", key, f"{err:.3e}", cfg)
                    continue
                ms = bench_ms(lambda: gated_mlp_forward(x, wg, wu, None, None, "silu", 1.702, 7.0, cfg), rep=40)
                rows.append((ms, cfg))
            rows.sort(key=lambda r: r[0])
            if not rows:
                continue
            results["prefill"][key] = {
                "best": rows[0][1], "best_ms": rows[0][0],
                "eager_ms": t_eager, "eager_TFLOPS": flops / t_eager / 1e9,
                "all": [(ms, flops / ms / 1e9, c) for ms, c in rows],
            }
            log(f"prefill {key}: eager {t_eager:.3f}ms ({flops/t_eager/1e9:.0f} TF/s); " + "; ".join(
                f"{ms:.3f}ms {flops/ms/1e9:.0f}TF {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"
                f"w{c['num_warps']}s{c['num_stages']}{'' if c.get('USE_TMA', True) else '-ptr'}"
                for ms, c in rows[:4]))
        torch.cuda.empty_cache()
        (OUT / "gated_mlp_sweep.json").write_text(json.dumps(results, indent=1))
    (OUT / "gated_mlp_sweep.json").write_text(json.dumps(results, indent=1))
    return results


def wait_for_tests():
    """GPU tests may run beside the precompile phase; timings start only once they are done."""
    pid = int(os.environ.get("GMLP_WAIT_PID", "0"))
    while pid:
        try:
            os.kill(pid, 0)
        except OSError:
            break
        if time.time() - T0 > SWEEP_BUDGET_S - 60:
            log("tests still running; timing beside them")
            break
        time.sleep(1)
    log("timing starts")


def peak_bytes(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def bench(tuned=None):
    from fused_gated_mlp import fused_gated_mlp, select_gated_mlp_config

    torch._dynamo.config.cache_size_limit = 64
    compiled = torch.compile(eager, dynamic=False)
    peak_copy = copy_gbps(512 * 2**20)
    log(f"copy bandwidth 512 MiB: {peak_copy:.0f} GB/s")
    rows = []
    for hidden, inter in SHAPES:
        wg, wu = weights(hidden, inter)
        wcat = torch.cat([wg, wu])
        wbytes = 2 * inter * hidden * 2
        same_copy = copy_gbps(wbytes)
        for m in DECODE_M + PREFILL_M:
            if time.time() - T0 > BUDGET_S:
                log("budget reached")
                break
            x = torch.randn(m, hidden, device="cuda").to(torch.bfloat16)
            key = f"m{m}_H{hidden}_I{inter}"
            entry = (tuned or {}).get("decode" if m <= 64 else "prefill", {}).get(key, {})
            cfg = entry.get("best")
            ok, err = check(fused_gated_mlp(x, wg, wu, config=cfg), x, wg, wu)
            if not ok:
                log("WRONG in bench", key, err, cfg)
            rep = 30 if m <= 64 else 60
            t = {
                "fused": bench_ms(lambda: fused_gated_mlp(x, wg, wu, config=cfg), rep=rep),
                "eager": bench_ms(lambda: eager(x, wg, wu), rep=rep),
                "cat_gemm": bench_ms(lambda: F.linear(x, wcat), rep=rep),
            }
            try:
                compiled(x, wg, wu)
                t["compile"] = bench_ms(lambda: compiled(x, wg, wu), rep=rep)
            except Exception as exc:  # keep the run going; report the failure
                log("torch.compile failed", repr(exc)[:200])
                t["compile"] = float("nan")
            flops = 2 * 2 * m * hidden * inter
            row = {"m": m, "hidden": hidden, "inter": inter, "ms": t,
                   "config": cfg or select_gated_mlp_config(m, hidden, inter, torch.bfloat16, x.device),
                   "config_source": "tuned in this run" if cfg else "heuristic", "rel_err": err,
                   "pct_copy": {k: 100 * wbytes / (v * 1e-3) / 1e9 / peak_copy for k, v in t.items()},
                   "pct_same_size_copy": {k: 100 * wbytes / (v * 1e-3) / 1e9 / same_copy for k, v in t.items()},
                   "TFLOPS": {k: flops / v / 1e9 for k, v in t.items()},
                   "speedup_vs_eager": t["eager"] / t["fused"]}
            if m in (64, 2048, 8192):
                row["peak_bytes"] = {"fused": peak_bytes(lambda: fused_gated_mlp(x, wg, wu, config=cfg)),
                                     "eager": peak_bytes(lambda: eager(x, wg, wu))}
            rows.append(row)
            log(f"m={m:5d} H={hidden} I={inter}: fused {t['fused']*1e3:8.1f}us eager {t['eager']*1e3:8.1f}us "
                f"compile {t['compile']*1e3:8.1f}us cat {t['cat_gemm']*1e3:8.1f}us | "
                + (f"%copy fused {row['pct_copy']['fused']:.0f} eager {row['pct_copy']['eager']:.0f} "
                   f"cat {row['pct_copy']['cat_gemm']:.0f}" if m <= 64 else
                   f"TF/s fused {row['TFLOPS']['fused']:.0f} eager {row['TFLOPS']['eager']:.0f} "
                   f"cat {row['TFLOPS']['cat_gemm']:.0f}")
                + f" | x{row['speedup_vs_eager']:.2f} vs eager")
        torch.cuda.empty_cache()
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "peak_copy_GBps": peak_copy}
    (OUT / "gated_mlp_bench.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    write_markdown(env, rows)
    plot(rows)


def write_markdown(env, rows):
    lines = [f"device {env['device']}, torch {env['torch']}, triton {env['triton']}, copy {env['peak_copy_GBps']:.0f}"
             " GB/s", "", "| M | hidden | inter | fused us | eager us | compile us | cat GEMM us | fused vs eager |"
             " fused % copy / TF/s | eager % copy / TF/s | peak MB fused / eager |", "|" + "---|" * 11]
    for r in rows:
        t = r["ms"]
        metric = (lambda k: f"{r['pct_copy'][k]:.0f} %") if r["m"] <= 64 else (lambda k: f"{r['TFLOPS'][k]:.0f}")
        pk = r.get("peak_bytes")
        pk_s = f"{pk['fused']/2**20:.0f} / {pk['eager']/2**20:.0f}" if pk else ""
        lines.append(f"| {r['m']} | {r['hidden']} | {r['inter']} | {t['fused']*1e3:.1f} | {t['eager']*1e3:.1f} | "
                     f"{t['compile']*1e3:.1f} | {t['cat_gemm']*1e3:.1f} | {r['speedup_vs_eager']:.2f}x | "
                     f"{metric('fused')} | {metric('eager')} | {pk_s} |")
    text = "\n".join(lines)
    (OUT / "gated_mlp_bench.md").write_text(text + "\n")
    print(text)


def plot(rows):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, decode in zip(axes, (True, False)):
        sel = [r for r in rows if (r["m"] <= 64) == decode]
        labels = [f"M{r['m']}\nI{r['inter']}" for r in sel]
        xs = range(len(sel))
        for i, k in enumerate(("fused", "eager", "compile", "cat_gemm")):
            vals = [r["pct_copy"][k] if decode else r["TFLOPS"][k] for r in sel]
            ax.bar([x + 0.2 * i for x in xs], vals, width=0.2, label=k)
        ax.set_xticks([x + 0.3 for x in xs], labels, fontsize=7)
        ax.set_ylabel("% of copy bandwidth (weight bytes)" if decode else "TFLOP/s")
        ax.set_title("decode" if decode else "prefill")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "gated_mlp_bench.png", dpi=110)


MODES = ("sweep", "bench", "all")


def main(mode: str) -> None:
    if mode not in MODES:
        sys.exit(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    OUT.mkdir(parents=True, exist_ok=True)
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {__import__('triton').__version__}")
    if mode == "sweep":
        sweep()
    elif mode == "bench":
        bench()
    else:  # all: tune, then benchmark with the winners
        bench(sweep())
    log("done")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench")
