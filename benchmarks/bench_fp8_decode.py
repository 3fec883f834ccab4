"""FP8 decode GEMMs on Llama-3-8B's shapes: the weight-only (W8A16) kernel against the W8A8 path, bf16 cuBLAS and
``torch._scaled_mm``: ``python -m benchmarks.bench_fp8_decode``.

Per projection of Llama-3-8B (``in -> out``: 4096 -> 4096 q/o, 4096 -> 1024 k/v, 4096 -> 14336 gate/up,
14336 -> 4096 down, 4096 -> 128256 lm_head) and M = 1, 4, 16 rows (bf16 activations, no bias):

- ``weight-only channel`` / ``weight-only block`` / ``weight-only group``: ``FP8Linear`` forced onto the weight-only
  kernel (``path="weight_only"``: one launch), per-channel weights (the ``channel`` recipe), 128x128 weight blocks
  (the ``block-mlp-out`` / ``block`` recipes) and group scales (the ``group`` recipe, the default); the table's last
  column says which path ``path="auto"`` takes there (``fp8_gemm.weight_only.use_weight_only``, drawn from this table
  on the H200);
- ``W8A8 channel`` / ``W8A8 block`` / ``W8A8 group``: the same modules forced onto the W8A8 path (``path="w8a8"``:
  per-row or 1x128 activation quantization, then the FP8 GEMM's split-K decode kernel), what every call did before;
- ``bf16 F.linear``: cuBLAS on the bf16 weight (twice the bytes);
- ``_scaled_mm``: cuBLAS's FP8 GEMM on the same E4M3 weight with row/column scales, GEMM only (the activation
  quantized beforehand, not timed);
- at M = 1, ``weight-only dot channel``: the weight-only kernel's tensor-core variant with the config a 16-row
  decode tile takes, against the CUDA-core FMA variant that ``path="auto"`` runs for one 16-bit row
  (``fp8_gemm.weight_only.FMA_MAX_ROWS``).

GPU time: median of CUDA-event timings, each call after a read of a 256 MiB buffer (L2 holds clean, unrelated lines,
as after the previous layer of a decode step). The floor: the weight's bytes divided by the device copy bandwidth
measured in the same run (bytes read plus written, 1 GiB); "% of floor" = floor / time (bf16 against its own,
doubled, bytes). Every output is checked against a float64 reference (the dequantized weight for the FP8 paths).
Kernel launches per call (profiler), and host time per call at M = 1 (``FP8Linear`` weight-only, forced W8A8, bf16
``nn.Linear``; 300 back-to-back calls, no sync, best of two alternated rounds) with a check that the weight-only
call costs the host no more than 1.1x the W8A8 call it replaces. Writes ``fp8-decode-<device>.md`` / ``.json`` to
``--out`` (default docs/benchmarks).
About 40-60 s on a fresh H200 (mostly Triton compiling; ``--budget-s``, default 55, skips what runs past it);
``--sweep`` adds a config sweep of the weight-only kernel (up to ``--sweep-budget-s``, default 240). Without a GPU:
small shapes under Triton's interpreter, correctness only, nothing written.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import ROOT

SHAPES = [("q_proj / o_proj", 4096, 4096), ("k_proj / v_proj", 4096, 1024), ("gate_proj / up_proj", 4096, 14336),
          ("down_proj", 14336, 4096), ("lm_head", 4096, 128256)]  # (name, in_features K, out_features N)
ROWS = (1, 4, 16)
# Correctness bounds (relative Frobenius error against float64): bf16 output rounding for the weight-only path and
# cuBLAS bf16; the W8A8 path also rounds the activation to E4M3 (a few percent on random data)
TOL = {"weight-only": 6e-3, "W8A8": 8e-2, "bf16": 6e-3}
HOST_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336)]
DEVICE = "cuda"  # a dry run of the harness may point it elsewhere


def copy_gbps(device: torch.device, nbytes: int = 2**30) -> float:
    """Device copy bandwidth, GB/s counting bytes read plus written (median of 10 CUDA-event timings)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


def gpu_us(fn: Callable[[], Any], flush: Callable[[], None], reps: int) -> tuple[float, float]:
    """Median and interquartile range (us) of ``reps`` CUDA-event timings of ``fn``, each after ``flush``."""
    fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1e3 for s, e in events)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[2] - q[0]


def kernels_per_call(fn: Callable[[], Any]) -> int | None:
    """GPU kernels one call launches (the profiler's CUDA kernel events; memsets and copies excluded)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return sum(1 for n in names if not n.lower().startswith(("memset", "memcpy", "[memset", "[memcpy")))
    except Exception:  # a profiler that cannot attach: the column says n/a
        return None


def _reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, chunk: int = 16384) -> torch.Tensor:
    """``x @ W^T`` in float64 for a bf16 ``W`` (``scale`` None) or an E4M3 one with its ``[K, N]``-convention
    scale, by chunks of output features (the lm_head's float64 weight would take 4 GB at once)."""
    from fp8_gemm.quantize import expand_scale

    n, k = weight.shape
    x64 = x.double()
    s_kn = None if scale is None else expand_scale(scale, (k, n))
    outs = []
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        w = weight[lo:hi].double()
        if s_kn is not None:
            w = w * s_kn[:, lo:hi].double().t()
        outs.append(x64 @ w.t())
    return torch.cat(outs, dim=1)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    from triton_ops_core.testing import relative_error

    return relative_error(out, ref)


def _dot_plan(x, mod):
    """The weight-only kernel's tensor-core variant with a 16-row decode tile's config, for M = 1, planned once."""
    from fp8_gemm.weight_only import SCALE_CHANNEL, build_plan, weight_only_config
    from triton_ops_core.device import sm_count

    n, k = mod.weight.shape
    cfg = weight_only_config(16, n, k, SCALE_CHANNEL, x.element_size(), sm_count(x.device, cpu=4), False)
    return build_plan(x, mod.weight, mod.weight_scale, None, dict(cfg))


def _impls(x, lin, mod_c, mod_b, mod_g, include_w8a8_block: bool) -> list[tuple[str, str, Callable[[], Any], Any]]:
    """(name, kind for the tolerance, call, what its reference is made of)."""
    from fp8_gemm import fp8_linear, quantize_fp8

    wc, sc, wb, sb = mod_c.weight, mod_c.weight_scale, mod_b.weight, mod_b.weight_scale
    wg, sg = mod_g.weight, mod_g.weight_scale
    impls = [
        ("weight-only channel", "weight-only", lambda: mod_c(x), (wc, sc)),
        ("weight-only block", "weight-only", lambda: mod_b(x), (wb, sb)),
        ("weight-only group", "weight-only", lambda: mod_g(x), (wg, sg)),
        ("W8A8 channel", "W8A8", lambda: fp8_linear(x, wc, sc, None, "row", False, "w8a8"), (wc, sc)),
    ]
    if include_w8a8_block:
        impls.append(("W8A8 block", "W8A8", lambda: fp8_linear(x, wb, sb, None, "block", False, "w8a8"), (wb, sb)))
        impls.append(("W8A8 group", "W8A8", lambda: fp8_linear(x, wg, sg, None, "block", False, "w8a8"), (wg, sg)))
    impls.append(("bf16 F.linear", "bf16", lambda: F.linear(x, lin.weight), (lin.weight, None)))
    x_q, x_s = quantize_fp8(x, "e4m3", "row")
    impls.append(("_scaled_mm", "W8A8",
                  lambda: torch._scaled_mm(x_q, wc.t(), scale_a=x_s, scale_b=sc, out_dtype=x.dtype), (wc, sc)))
    if x.shape[0] == 1:  # the tensor-core variant, last (the budget cuts it first)
        plan = _dot_plan(x, mod_c)
        impls.append(("weight-only dot channel", "weight-only", lambda: plan.run(x, wc, sc, None), (wc, sc)))
    return impls


def run_shape(name: str, k: int, n: int, args, flush, bw: float, deadline: float) -> dict[str, Any]:
    from fp8_gemm import FP8Linear, fp8_linear
    from fp8_gemm.weight_only import use_weight_only

    dev, dt = torch.device(DEVICE), torch.bfloat16
    torch.manual_seed(k + n)
    lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=dt)
    with torch.no_grad():
        lin.weight.normal_(0.0, k**-0.5)
    mod_c = FP8Linear.from_linear(lin, weight_granularity="channel", activation_granularity="row")
    mod_b = FP8Linear.from_linear(lin, weight_granularity="block", activation_granularity="block")
    mod_g = FP8Linear.from_linear(lin, weight_granularity="group", activation_granularity="block")
    mod_c.path = mod_b.path = mod_g.path = "weight_only"  # the kernel at every M; "auto"'s pick is reported beside
    fp8_bytes = n * k
    entry: dict[str, Any] = {"name": name, "in": k, "out": n, "weight_mb_fp8": fp8_bytes / 1e6,
                             "floor_us_fp8": fp8_bytes / (bw * 1e3), "rows": []}
    for m in ROWS:
        row: dict[str, Any] = {"M": m, "impls": {}, "auto": {
            g: "weight-only" if use_weight_only("auto", m, mod.weight, mod.weight_scale) else "W8A8"
            for g, mod in (("channel", mod_c), ("block", mod_b), ("group", mod_g))}}
        entry["rows"].append(row)
        x = torch.randn(m, k, device=dev, dtype=dt)
        refs: dict[int, torch.Tensor] = {}
        for label, kind, fn, (w, s) in _impls(x, lin, mod_c, mod_b, mod_g, not args.no_w8a8_block):
            rec: dict[str, Any] = {}
            row["impls"][label] = rec
            if time.monotonic() > deadline:
                rec["skipped"] = "time budget spent"
                continue
            try:
                out = fn()
                key = id(w) if s is None else id(s)
                if key not in refs:
                    refs[key] = _reference(x, w, s)
                err = _rel(out, refs[key])
                rec["rel_error"] = err
                rec["ok"] = err <= TOL[kind]
                med, iqr = gpu_us(fn, flush, args.reps)
                nbytes = fp8_bytes * (2 if kind == "bf16" else 1)
                rec.update(us=med, iqr_us=iqr, pct_floor=100 * nbytes / (bw * 1e3) / med,
                           weight_gbps=nbytes / (med * 1e3))
            except Exception as exc:  # a baseline cuBLAS refuses (shape or scale layout): n/a, with the reason
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                rec["ok"] = label in ("_scaled_mm", "bf16 F.linear")  # ours must run
        if args.launches and m in (1, 16) and time.monotonic() < deadline:
            row["launches"] = {
                "weight-only channel": kernels_per_call(lambda x=x: mod_c(x)),
                "weight-only block": kernels_per_call(lambda x=x: mod_b(x)),
                "W8A8 channel": kernels_per_call(
                    lambda x=x: fp8_linear(x, mod_c.weight, mod_c.weight_scale, None, "row", False, "w8a8")),
            }
    entry["plans"] = {"channel": _plan_info(mod_c, 1), "block": _plan_info(mod_b, 1), "group": _plan_info(mod_g, 1)}
    return entry


def _plan_info(mod, m: int) -> dict[str, Any] | None:
    """The weight-only launch config the module's M-row plan holds (from the plan cache)."""
    from fp8_gemm import linear as linear_mod

    for plan in linear_mod._PLANS._plans.values():
        wo = plan[0]
        if wo is not None and wo.m == m and wo.n == mod.out_features and wo.config is not None:
            return {**wo.config, "grid": list(wo.launch.grid)}
    return None


def host_times(args) -> list[dict[str, Any]]:
    """Host time per call at M = 1: FP8Linear (weight-only, and forced W8A8) against bf16 nn.Linear."""
    from fp8_gemm import FP8Linear

    from .host_overhead import host_us

    rows = []
    for k, n in HOST_SHAPES:
        lin = torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)
        x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
        rec: dict[str, Any] = {"in": k, "out": n}
        for recipe in ("channel", "block"):
            mod = FP8Linear.from_linear(lin, weight_granularity=recipe,
                                        activation_granularity="row" if recipe == "channel" else "block")
            times: dict[str, list[float]] = {"weight_only": [], "w8a8": []}
            for _ in range(2):  # alternated, the best of two: host time drifts within a run
                for path in ("weight_only", "w8a8"):
                    mod.path = path
                    times[path].append(host_us(lambda mod=mod, x=x: mod(x)))
            rec[f"weight-only {recipe}"], rec[f"W8A8 {recipe}"] = min(times["weight_only"]), min(times["w8a8"])
        rec["bf16 nn.Linear"] = min(host_us(lambda lin=lin, x=x: lin(x)) for _ in range(2))
        # the check: the one-launch path must cost the host no more than the path it replaces (10 % noise margin)
        rec["check_ok"] = all(rec[f"weight-only {r}"] <= 1.1 * rec[f"W8A8 {r}"] for r in ("channel", "block"))
        rows.append(rec)
    return rows


SWEEP = [
    {"USE_DOT": True, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 1},
    {"USE_DOT": True, "BLOCK_N": 32, "BLOCK_K": 512, "SPLIT_K": 1},
    {"USE_DOT": True, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 1},
    {"USE_DOT": True, "BLOCK_N": 16, "BLOCK_K": 512, "SPLIT_K": 1},
    {"USE_DOT": True, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 2},
    {"USE_DOT": True, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 4},
    {"USE_DOT": True, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 8},
    # FMA (M <= 4: BLOCK_M is M's next power of two)
    {"USE_DOT": False, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 1},
    {"USE_DOT": False, "BLOCK_N": 16, "BLOCK_K": 512, "SPLIT_K": 1},
    {"USE_DOT": False, "BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 1},
    {"USE_DOT": False, "BLOCK_N": 8, "BLOCK_K": 512, "SPLIT_K": 1},
    {"USE_DOT": False, "BLOCK_N": 16, "BLOCK_K": 1024, "SPLIT_K": 1},
    {"USE_DOT": False, "BLOCK_N": 16, "BLOCK_K": 512, "SPLIT_K": 2},
    {"USE_DOT": False, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 4},
]


def sweep(args, flush, bw: float) -> list[dict[str, Any]]:
    """The weight-only kernel's configs on every shape, M = 1, 4 and 16, per-channel scales (for the heuristic); 4
    pipeline stages for K tiles of 256 and more, 6 below. Stops at ``--sweep-budget-s``."""
    deadline = time.monotonic() + args.sweep_budget_s
    from fp8_gemm import FP8Linear
    from fp8_gemm.weight_only import build_plan

    out = []
    for name, k, n in SHAPES:
        lin = torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)
        mod = FP8Linear.from_linear(lin)
        for m in (1, 4, 16):
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            ref = _reference(x, mod.weight, mod.weight_scale)
            for cfg in SWEEP:
                if (not cfg["USE_DOT"] and m > 4) or time.monotonic() > deadline:
                    continue
                for stages in ((4,) if cfg["BLOCK_K"] >= 256 else (6,)):
                    full = {**cfg, "BLOCK_M": 16 if cfg["USE_DOT"] else m, "num_warps": 4, "num_stages": stages}
                    rec = {"shape": name, "M": m, **full}
                    try:
                        plan = build_plan(x, mod.weight, mod.weight_scale, None, full)

                        def fn(x=x, mod=mod, plan=plan):
                            return plan.run(x, mod.weight, mod.weight_scale, None)

                        rec["rel_error"] = _rel(fn(), ref)
                        med, _ = gpu_us(fn, flush, args.reps)
                        rec.update(us=med, pct_floor=100 * n * k / (bw * 1e3) / med)
                    except Exception as exc:  # out of shared memory, say
                        rec["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                    out.append(rec)
                    print(f"  sweep {name} M={m} {full}: {rec.get('us', rec.get('error'))}", file=sys.stderr)
    return out


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def render(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# FP8 decode GEMMs on Llama-3-8B's shapes ({env.get('device', '?')})", "",
        f"{env.get('date_utc', '')}; torch {env.get('torch')}, triton {env.get('triton')}, commit "
        f"{env.get('git_commit')}. Command: `python -m benchmarks.bench_fp8_decode` ({report['wall_s']:.0f} s).", "",
        f"Copy bandwidth measured in this run: **{report['copy_gbps']:.0f} GB/s** (bytes read plus written). "
        "Floor = the weight's bytes / that bandwidth; each cell: GPU time (median, L2 holding unrelated clean lines) "
        "and % of the floor (bf16: of its own, doubled, bytes). bf16 activations, no bias.", "",
        "- **weight-only**: `FP8Linear` with `path=\"weight_only\"`: one launch, the activation unquantized "
        "(W8A16). channel: per-channel weight scales; block: 128x128 weight blocks (the block recipes); group: one "
        "scale per output feature and 128 inputs (the `group` recipe, the default). The last column says which path "
        "`path=\"auto\"` (the default) takes for that row count (channel / block / group): "
        "`fp8_gemm.weight_only.use_weight_only`, a rule drawn from this table. "
        "dot (M = 1): the kernel's tensor-core variant with a 16-row tile's config; at M = 1 `path=\"auto\"` runs its "
        "CUDA-core FMA variant (`FMA_MAX_ROWS`).",
        "- **W8A8**: the same module with `path=\"w8a8\"` (activation quantized per row / in 1x128 blocks, then the "
        "FP8 GEMM); the path every decode call took before.",
        "- **_scaled_mm**: cuBLAS FP8 on the same weight, GEMM only (the activation quantized beforehand).", "",
    ]
    labels = ["weight-only channel", "weight-only block", "weight-only group", "weight-only dot channel",
              "W8A8 channel", "W8A8 block", "W8A8 group", "bf16 F.linear", "_scaled_mm"]
    present = [lb for lb in labels if any(lb in r["impls"] for s in report["shapes"] for r in s["rows"])]
    lines += ["| projection (in -> out) | M | FP8 weight | floor | " + " | ".join(present) +
              " | weight-only vs W8A8 | auto takes |",
              "| --- | --- | --- | --- | " + " | ".join("---" for _ in present) + " | --- | --- |"]
    for s in report["shapes"]:
        for r in s["rows"]:
            cells = []
            for lb in present:
                rec = r["impls"].get(lb, {})
                if "us" in rec:
                    flag = "" if rec.get("ok", True) else " **FAIL**"
                    cells.append(f"{rec['us']:.1f} us ({rec['pct_floor']:.0f} %){flag}")
                else:
                    cells.append(rec.get("skipped") or (rec.get("error", "-")[:40]))
            wo, w8 = r["impls"].get("weight-only channel", {}), r["impls"].get("W8A8 channel", {})
            speed = f"{w8['us'] / wo['us']:.2f}x" if "us" in wo and "us" in w8 else "-"
            lines.append(f"| {s['name']} ({s['in']} -> {s['out']}) | {r['M']} | {s['weight_mb_fp8']:.1f} MB | "
                         f"{s['floor_us_fp8']:.1f} us | " + " | ".join(cells) + f" | {speed} | "
                         f"{r.get('auto', {}).get('channel', '-')} / {r.get('auto', {}).get('block', '-')} / "
                         f"{r.get('auto', {}).get('group', '-')} |")
    lines += ["", "Relative error against float64 (the dequantized weight for the FP8 paths; W8A8 and `_scaled_mm` "
              "include the activation's E4M3 rounding):", "",
              "| projection | M | " + " | ".join(present) + " |",
              "| --- | --- | " + " | ".join("---" for _ in present) + " |"]
    for s in report["shapes"]:
        for r in s["rows"]:
            lines.append(f"| {s['name']} | {r['M']} | " + " | ".join(
                _fmt(r["impls"].get(lb, {}).get("rel_error"), ".1e") for lb in present) + " |")
    launch_rows = [(s, r) for s in report["shapes"] for r in s["rows"] if r.get("launches")]
    if launch_rows:
        lines += ["", "Kernel launches per call (profiler):", "", "| projection | M | weight-only channel | "
                  "weight-only block | W8A8 channel |", "| --- | --- | --- | --- | --- |"]
        for s, r in launch_rows:
            la = r["launches"]
            lines.append(f"| {s['name']} | {r['M']} | {_fmt(la.get('weight-only channel'), 'd')} | "
                         f"{_fmt(la.get('weight-only block'), 'd')} | {_fmt(la.get('W8A8 channel'), 'd')} |")
    lines += ["", "Weight-only configs at M = 1 (heuristic, `fp8_gemm.weight_only.weight_only_config`):", "",
              "| projection | scales | config | grid |", "| --- | --- | --- | --- |"]
    for s in report["shapes"]:
        for recipe, info in (s.get("plans") or {}).items():
            if info:
                cfg = {k: v for k, v in info.items() if k != "grid"}
                lines.append(f"| {s['name']} | {recipe} | `{cfg}` | {info['grid']} |")
    if report.get("host"):
        lines += ["", "Host time per call at M = 1 (300 back-to-back calls, no sync; host time on the lent machines "
                  "moves by up to 30 % between runs):", "",
                  "| in -> out | weight-only channel | W8A8 channel | weight-only block | W8A8 block | bf16 nn.Linear "
                  "| check: weight-only <= 1.1x W8A8 |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for h in report["host"]:
            lines.append(f"| {h['in']} -> {h['out']} | {h['weight-only channel']:.1f} us | {h['W8A8 channel']:.1f} us "
                         f"| {h['weight-only block']:.1f} us | {h['W8A8 block']:.1f} us | "
                         f"{h['bf16 nn.Linear']:.1f} us | {'ok' if h['check_ok'] else '**FAIL**'} |")
    if report.get("sweep"):
        lines += ["", "Config sweep of the weight-only kernel (per-channel scales):", "",
                  "| projection | M | config | time | % of floor |", "| --- | --- | --- | --- | --- |"]
        for rec in report["sweep"]:
            cfg = {k: rec[k] for k in ("USE_DOT", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_stages")}
            lines.append(f"| {rec['shape']} | {rec['M']} | `{cfg}` | {_fmt(rec.get('us'))} us | "
                         f"{_fmt(rec.get('pct_floor'), '.0f')} |")
    return "\n".join(lines) + "\n"


def run_interpreter() -> int:
    """No GPU: small shapes under Triton's interpreter, every path against float64 (no timing)."""
    from fp8_gemm import FP8Linear, fp8_linear

    bad = 0
    for k, n in ((64, 48), (200, 72)):
        torch.manual_seed(k)
        lin = torch.nn.Linear(k, n, bias=False)
        for recipe, act in (("channel", "row"), ("block", "block"), ("tensor", "tensor"), ("group", "block")):
            mod = FP8Linear.from_linear(lin, weight_granularity=recipe, activation_granularity=act)
            for m in (1, 4):
                x = torch.randn(m, k)
                ref = _reference(x, mod.weight, mod.weight_scale)
                for label, path, tol in (("weight-only", "weight_only", 1e-5), ("W8A8", "w8a8", TOL["W8A8"])):
                    err = _rel(fp8_linear(x, mod.weight, mod.weight_scale, None, act, False, path), ref)
                    ok = err <= tol
                    bad += not ok
                    print(f"{k} -> {n} {recipe:8s} M={m} {label:12s} rel. error {err:.1e} "
                          f"{'ok' if ok else 'FAIL'}")
    print("no GPU: correctness only (timings need a GPU)")
    return 1 if bad else 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_fp8_decode", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="report folder (default docs/benchmarks on a GPU)")
    p.add_argument("--reps", type=int, default=40, help="timed calls per measurement (default 40)")
    p.add_argument("--budget-s", type=float, default=55.0,
                   help="wall-clock budget of the timed table: cases past it are reported as skipped (default 55)")
    p.add_argument("--no-w8a8-block", action="store_true", help="leave out the W8A8 path with block and group scales")
    p.add_argument("--no-host", action="store_true", help="leave out the host-time table")
    p.add_argument("--no-launches", dest="launches", action="store_false", help="leave out the launch counts")
    p.add_argument("--sweep", action="store_true", help="also sweep the weight-only kernel's configs (minutes)")
    p.add_argument("--sweep-budget-s", type=float, default=240.0, help="wall-clock cap of the sweep (default 240)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        return run_interpreter()
    from triton_ops.benchmark._env import collect_environment, device_tag
    from triton_ops_core.device import L2Flush

    start = time.monotonic()
    deadline = start + args.budget_s
    env = collect_environment(measured=True)
    dev = torch.device(DEVICE)
    bw = copy_gbps(dev)
    flush = L2Flush(dev, by="read")
    report: dict[str, Any] = {"environment": env, "copy_gbps": bw, "shapes": [], "wall_s": 0.0}
    for name, k, n in SHAPES:
        print(f"{name} ({k} -> {n}) ...", file=sys.stderr, flush=True)
        report["shapes"].append(run_shape(name, k, n, args, flush, bw, deadline))
    if not args.no_host:
        report["host"] = host_times(args)
    if args.sweep:
        report["sweep"] = sweep(args, flush, bw)
    report["wall_s"] = time.monotonic() - start
    out = args.out or ROOT / "docs" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"fp8-decode-{device_tag(env['device'])}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    md = render(report)
    (out / f"{stem}.md").write_text(md)
    print(md)
    failed = [f"{s['name']} M={r['M']} {lb}" for s in report["shapes"] for r in s["rows"]
              for lb, rec in r["impls"].items() if rec and not rec.get("ok", True)]
    if failed:
        print("FAILED: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
