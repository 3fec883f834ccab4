"""Development benchmark of fp8_gemm on the GPU (one device run): variants against cuBLAS, accuracy vs K.

Usage (device): PYTHONPATH=... python benchmarks/dev_fp8_gemm.py [--quick] [--out DIR]
Prints compact tables; writes everything to DIR/fp8_gemm_dev.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
from fp8_gemm.gemm import _launch, fp8_gemm
from triton.testing import do_bench, do_bench_cudagraph
from triton_ops_core.device import measure_copy_bandwidth

T0 = time.time()
RESULTS: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
FP8 = torch.float8_e4m3fn


def log(*a):
    print(*a, flush=True)


def rel(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def quant(t, dim=None):
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    s = (amax.float().clamp(min=1e-12) / 448.0)
    return (t.float() / s).clamp(-448, 448).to(FP8), s


def operands(m, n, k, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(m, k, device="cuda", generator=g)
    w = torch.randn(n, k, device="cuda", generator=g)  # weight [N, K]; b = w.t()
    a_q, a_s = quant(a)
    w_q, w_s = quant(w)
    return a_q, a_s.reshape(()), w_q, w_s.reshape(())


def tflops(m, n, k, ms):
    return 2 * m * n * k / ms / 1e9


def bench(fn, graph=False):
    fn()
    torch.cuda.synchronize()
    if graph:
        return do_bench_cudagraph(fn, rep=50, return_mode="median")
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def accuracy_vs_k():
    rows = []
    for k in (1024, 4096, 16384):
        a_q, a_s, w_q, w_s = operands(1024, 1024, k, seed=k)
        b_q = w_q.t()
        ref = (a_q.double() * a_s.double()) @ (b_q.double() * w_s.double())
        row = {"K": k}
        for name, kw in (("faithful", {}), ("fast", {"fast_accum": True})):
            out = fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=w_s, out_dtype=torch.float32, **kw)
            row[name] = rel(out, ref)
        out = torch.empty(1024, 1024, device="cuda", dtype=torch.float32)
        for acc in (1, 2):
            cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4,
                   "PERSISTENT": False, "FAITHFUL_ACC": acc}
            try:
                _launch(a_q, b_q, out, a_s.reshape(1), w_s.reshape(1), None, 0, 0, False, "tma", cfg)
                row[f"acc{acc}"] = rel(out, ref)
            except Exception as e:  # noqa: BLE001
                row[f"acc{acc}"] = f"ERR {type(e).__name__}"
        for fast in (False, True):
            try:
                o = torch._scaled_mm(a_q, b_q, scale_a=a_s.reshape(()), scale_b=w_s.reshape(()),
                                     out_dtype=torch.float32, use_fast_accum=fast)
                row["cublas_fast" if fast else "cublas"] = rel(o, ref)
            except Exception as e:  # noqa: BLE001
                row["cublas_fast" if fast else "cublas"] = f"ERR {e}"[:80]
        rows.append(row)
        log("acc", json.dumps({kk: (f"{v:.2e}" if isinstance(v, float) else v) for kk, v in row.items()}))
    # every granularity pair at K = 16384 (faithful, fp32 out)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "packages", "fp8-gemm", "tests"))
    from _gemm_ref import gemm_ref, make_operands

    gran = {}
    for ag in ("tensor", "row", "block"):
        for bg in ("tensor", "channel", "block"):
            a_q, a_s, b_q, b_s = make_operands(512, 512, 16384, ag, bg, "cuda", kmajor_b=True, seed=3)
            ref = gemm_ref(a_q, a_s, ag, b_q, b_s, bg)
            out = fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, out_dtype=torch.float32)
            outf = fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=b_s, out_dtype=torch.float32, fast_accum=True)
            gran[f"{ag}/{bg}"] = (rel(out, ref), rel(outf, ref))
    log("gran K=16384 (faithful, fast):", {k: f"{v[0]:.1e},{v[1]:.1e}" for k, v in gran.items()})
    RESULTS["accuracy_vs_k"] = rows
    RESULTS["granularity_k16384"] = gran


TOP: set = set()
def V(name, bm, bn, bk, w, st, pers=False, flat=False, ws=False, promote=None, sub=False, modes=("fast", "acc1", "acc2")):
    return (name, {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": w, "num_stages": st,
                   "PERSISTENT": pers, "FLATTEN": flat, "WARP_SPEC": ws, "PROMOTE_K": promote or bk,
                   "EPI_SUBTILE": sub}, modes)


TMA_VARIANTS = [
    V("128x256x128 s3 pers flat", 128, 256, 128, 8, 3, True, True),
    V("128x256x128 s4 pers flat sub", 128, 256, 128, 8, 4, True, True, sub=True),
    V("128x256x128 s4 sub", 128, 256, 128, 8, 4, sub=True),
    V("128x256x128 s4 pers flat sub ws", 128, 256, 128, 8, 4, True, True, True, sub=True, modes=("fast", "acc2")),
    V("256x128x128 s3 pers flat", 256, 128, 128, 8, 3, True, True),
    V("256x128x128 s4 pers flat sub", 256, 128, 128, 8, 4, True, True, sub=True),
    V("128x256x256 s2 P128", 128, 256, 256, 8, 2, promote=128, modes=("acc1", "acc2")),
    V("128x256x256 s2 sub P128", 128, 256, 256, 8, 2, True, True, promote=128, sub=True, modes=("acc1", "acc2")),
    V("128x128x256 s3 pers flat P128", 128, 128, 256, 8, 3, True, True, promote=128, modes=("acc1", "acc2")),
    V("128x256x128 s3 pers flat G16", 128, 256, 128, 8, 3, True, True, modes=("fast", "acc2")),
]


def large():
    out_rows = []
    for size in (4096, 8192):
        m = n = k = size
        a_q, a_s, w_q, w_s = operands(m, n, k, seed=size)
        b_q = w_q.t()
        a_bf, b_bf = (a_q.float() * a_s).bfloat16(), (b_q.float() * w_s).bfloat16()
        base = {}
        for fast in (False, True):
            ms = bench(lambda: torch._scaled_mm(a_q, b_q, scale_a=a_s, scale_b=w_s, out_dtype=torch.bfloat16,
                                                use_fast_accum=fast))
            base["cublas_fast" if fast else "cublas"] = tflops(m, n, k, ms)
        sa_row = a_s.expand(m, 1).contiguous()
        sb_col = w_s.expand(1, n).contiguous()
        try:
            ms = bench(lambda: torch._scaled_mm(a_q, b_q, scale_a=sa_row, scale_b=sb_col, out_dtype=torch.bfloat16))
            base["cublas_rowwise"] = tflops(m, n, k, ms)
        except Exception as e:  # noqa: BLE001
            base["cublas_rowwise"] = f"ERR {e}"[:60]
        base["bf16_matmul"] = tflops(m, n, k, bench(lambda: a_bf @ b_bf))
        ref = torch._scaled_mm(a_q, b_q, scale_a=a_s, scale_b=w_s, out_dtype=torch.bfloat16).float()
        log(f"{size}^3 baselines TFLOP/s:", {kk: (round(v) if isinstance(v, float) else v) for kk, v in base.items()})
        row = {"size": size, **base, "variants": {}}
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        s1a, s1b = a_s.reshape(1), w_s.reshape(1)
        for name, base_cfg, modes in TMA_VARIANTS:
            if time.time() - T0 > BUDGET_S * 0.6:
                log("time budget: skipping", name)
                continue
            for mode in modes:
                if size == 8192 and f"{name} {mode}" not in TOP:
                    continue
                cfg = {**base_cfg, "FAITHFUL_ACC": 2 if mode == "acc2" else 1}
                if name.endswith("G16"):
                    cfg["GROUP_M"] = 16
                fn = lambda: _launch(a_q, b_q, out, s1a, s1b, None, 0, 0, mode == "fast", "tma", cfg)  # noqa: E731
                try:
                    t = time.time()
                    fn()
                    torch.cuda.synchronize()
                    err = rel(out.float(), ref.double()) if size == 4096 else float("nan")
                    ms = bench(fn)
                    res = tflops(m, n, k, ms)
                    ref_base = base["cublas_fast"] if mode == "fast" else base["cublas"]
                    log(f"  {size} {name:30s} {mode:5s} {res:7.0f} TFLOP/s {res / ref_base:5.2f}x  "
                        f"err-vs-cublas {err:.1e} ({time.time() - t:.1f}s)")
                    row["variants"][f"{name} {mode}"] = res
                except Exception as e:  # noqa: BLE001
                    log(f"  {size} {name:30s} {mode:5s} ERR {type(e).__name__}: {str(e)[:200]}")
        # granularity speeds with the default config (faithful), and row-major b
        for ag, bg in (("row", "channel"), ("block", "block"), ("block", "block128")):
            a_sc = sa_row.reshape(-1) if ag == "row" else torch.full((m, k // 128), float(a_s), device="cuda")
            b_sc = sb_col.reshape(-1) if bg == "channel" else torch.full((k // 128, n // 128), float(w_s),
                                                                         device="cuda")
            cfg128 = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4,
                      "PERSISTENT": True, "FLATTEN": True, "FAITHFUL_ACC": 1}
            try:
                if bg == "block128":
                    ms = bench(lambda: _launch(a_q, b_q, out, a_sc, b_sc, None, 2, 2, False, "tma", cfg128))
                else:
                    ms = bench(lambda: fp8_gemm(a_q, b_q, a_scale=a_sc, b_scale=b_sc, out_dtype=torch.bfloat16))
                row[f"ours_{ag}_{bg}"] = tflops(m, n, k, ms)
                log(f"  {size} default faithful {ag}/{bg}: {row[f'ours_{ag}_{bg}']:.0f}")
            except Exception as e:  # noqa: BLE001
                log(f"  {size} {ag}/{bg} ERR {type(e).__name__}: {str(e)[:200]}")
        b_rm = b_q.contiguous()
        for fast in (False, True):
            try:
                ms = bench(lambda: fp8_gemm(a_q, b_rm, a_scale=a_s, b_scale=w_s, out_dtype=torch.bfloat16,
                                            fast_accum=fast))
                log(f"  {size} default row-major b fast={fast}: {tflops(m, n, k, ms):.0f}")
                row[f"ours_rowmajor_b_fast{fast}"] = tflops(m, n, k, ms)
            except Exception as e:  # noqa: BLE001
                log(f"  {size} row-major b ERR {type(e).__name__}: {str(e)[:200]}")
        out_rows.append(row)
        if size == 4096:
            for mode in ("fast", "acc1", "acc2"):
                ranked = sorted((v, kk) for kk, v in row["variants"].items() if kk.endswith(" " + mode))
                TOP.update(kk for _, kk in ranked[-3:])
    RESULTS["large"] = out_rows


DECODE_VARIANTS = [
    # BLOCK_N, BLOCK_K, SPLIT_K, warps, stages, fast (None: the heuristic); small: BLOCK_M 16, big: 32/64
    None,
    (32, 256, 1, 4, 4, False, "small"),
    (32, 256, 2, 4, 4, False, "small"),
    (32, 512, 2, 4, 3, False, "small"),
    (64, 256, 2, 4, 4, False, "small"),
    (32, 512, 1, 4, 3, False, "small"),
    (32, 256, 1, 4, 4, False, "big"),
    (64, 256, 1, 4, 4, False, "big"),
    (64, 512, 1, 4, 3, False, "big"),
    (64, 256, 1, 8, 4, False, "big"),
    (128, 256, 1, 8, 3, False, "big"),
    (64, 128, 1, 4, 6, False, "big"),
    (64, 256, 2, 4, 4, False, "big"),
    (64, 512, 1, 4, 3, True, "big"),
    (32, 256, 1, 4, 4, True, "big"),
]


def host_overhead():
    import cProfile
    import pstats

    m, n, k = 1, 256, 256
    a_q, a_s, w_q, w_s = operands(m, n, k)
    b_q = w_q.t()
    res = {}
    for name, fn in (("fp8_gemm", lambda: fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=w_s, out_dtype=torch.bfloat16)),
                     ("scaled_mm", lambda: torch._scaled_mm(a_q, b_q, scale_a=a_s, scale_b=w_s,
                                                            out_dtype=torch.bfloat16))):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(300):
            fn()
        torch.cuda.synchronize()
        res[name] = (time.perf_counter() - t) / 300 * 1e6
    log("host us per call:", {kk: round(v, 1) for kk, v in res.items()})
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        fp8_gemm(a_q, b_q, a_scale=a_s, b_scale=w_s, out_dtype=torch.bfloat16)
    pr.disable()
    st = pstats.Stats(pr)
    st.sort_stats("tottime").print_stats(14)
    RESULTS["host_us"] = res


def decode():
    rows = []
    bw_cache = {}
    for n, k in ((4096, 4096), (11264, 4096), (4096, 11264), (11264, 11264)):
        wbytes = n * k
        if wbytes not in bw_cache:
            bw_cache[wbytes] = measure_copy_bandwidth(nbytes=wbytes)
        copy = bw_cache[wbytes]
        copies = max(2, -(-160 * 2**20 // wbytes))  # rotate weights: together well over the 50 MB L2
        for m in (1, 16, 64):
            if time.time() - T0 > BUDGET_S * 0.95:
                log("time budget: skipping decode", m, n, k)
                continue
            sets = [operands(m, n, k, seed=m + n + k + i) for i in range(copies)]
            sets = [(a_q, a_s, w_q.t(), w_s) for a_q, a_s, w_q, w_s in sets]
            pct = lambda ms: wbytes * copies / (ms * 1e-3) / 1e9 / copy * 100  # noqa: E731
            row = {"M": m, "N": n, "K": k, "copy_GBps": copy}
            for fast in (False, True):
                try:
                    fns = [lambda a_q=a_q, a_s=a_s, b_q=b_q, w_s=w_s: torch._scaled_mm(
                        a_q, b_q, scale_a=a_s, scale_b=w_s, out_dtype=torch.bfloat16, use_fast_accum=fast)
                        for a_q, a_s, b_q, w_s in sets]
                    row["cublas_fast_pct" if fast else "cublas_pct"] = pct(bench(lambda: [f() for f in fns],
                                                                               graph=True))
                except Exception as e:  # noqa: BLE001
                    row["cublas_fast_pct" if fast else "cublas_pct"] = f"ERR {e}"[:60]
            a_q, a_s, b_q, w_s = sets[0]
            ref = (a_q.double() * a_s.double()) @ (b_q.double() * w_s.double())
            outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in sets]
            best = 0.0
            for v in DECODE_VARIANTS:
                if v is not None and (v[6] == "small") != (m <= 16):
                    continue
                cfg = None if v is None else {"BLOCK_M": max(16, triton.next_power_of_2(m)), "BLOCK_N": v[0],
                                              "BLOCK_K": v[1], "SPLIT_K": v[2], "num_warps": v[3], "num_stages": v[4]}
                fast = v is not None and v[5]
                fns = [lambda a_q=a_q, a_s=a_s, b_q=b_q, w_s=w_s, o=o, cfg=cfg, fast=fast: _launch(
                    a_q, b_q, o, a_s.reshape(1), w_s.reshape(1), None, 0, 0, fast, "decode", cfg)
                    for (a_q, a_s, b_q, w_s), o in zip(sets, outs)]
                try:
                    info = fns[0]()
                    torch.cuda.synchronize()
                    err = rel(outs[0].float(), ref)
                    p = pct(bench(lambda: [f() for f in fns], graph=True))
                    key = "heur" if v is None else "x".join(map(str, v[:5])) + ("F" if v[5] else "")
                    row[key] = (p, err, info.get("SPLIT_K"))
                    best = max(best, p)
                except Exception as e:  # noqa: BLE001
                    log(f"  decode {m} {n} {k} {v} ERR {type(e).__name__}: {str(e)[:200]}")
            eager_fns = [lambda a_q=a_q, a_s=a_s, b_q=b_q, w_s=w_s: fp8_gemm(
                a_q, b_q, a_scale=a_s, b_scale=w_s, out_dtype=torch.bfloat16) for a_q, a_s, b_q, w_s in sets]
            row["ours_eager_pct"] = pct(bench(lambda: [f() for f in eager_fns]))
            row["best_pct"] = best
            rows.append(row)
            log("decode", json.dumps({kk: (round(v, 1) if isinstance(v, float) else
                                           [round(x, 4) if isinstance(x, float) else x for x in v]
                                           if isinstance(v, tuple) else v) for kk, v in row.items()}))
            del sets
    RESULTS["decode"] = rows


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--budget", type=float, default=270.0)
    p.add_argument("--parts", default="host,acc,large,decode")
    args = p.parse_args()
    BUDGET_S = args.budget
    parts = args.parts.split(",")
    for part, fn in (("host", host_overhead), ("acc", accuracy_vs_k), ("large", large), ("decode", decode)):
        if part in parts:
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                log(f"{part} FAILED: {type(e).__name__}: {e}")
            log(f"[{part} done at {time.time() - T0:.0f}s]")
            with open(os.path.join(args.out, "fp8_gemm_dev.json"), "w") as f:
                json.dump(RESULTS, f, indent=1, default=str)
