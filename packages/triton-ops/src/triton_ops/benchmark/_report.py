"""Markdown rendering of benchmark results: environment, headline, per-panel tables, every measurement."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ._model import FAIL, OK, CaseResult, ImplResult

GROUP_TITLES = {
    "rmsnorm-rope": "Fused RMSNorm + RoPE",
    "gated-mlp": "Fused gated MLP",
    "fp8-gemm": "FP8 quantization, GEMM and FP8Linear",
}


def fmt_time(ms: float | None) -> str:
    if ms is None or not math.isfinite(ms):
        return "-"
    if ms < 1.0:
        return f"{ms * 1e3:.1f} us"
    return f"{ms:.3f} ms"


def _num(v: float | None, digits: int = 0, suffix: str = "") -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:,.{digits}f}{suffix}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def _err(r: ImplResult) -> str:
    if r.error is None:
        return "-"
    if not math.isfinite(r.error):
        return "NaN"
    return f"{r.error:.1e}"


def geomean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def _check_word(r: ImplResult) -> str:
    if r.status == OK:
        return f"ok ({_err(r)})"
    if r.status == FAIL:
        return f"**FAIL** ({_err(r)} > {r.tol:.2g})"
    return f"**{r.status}**" if r.status in ("error",) else r.status


def _panels(results: Sequence[CaseResult]) -> dict[tuple[str, str], list[CaseResult]]:
    panels: dict[tuple[str, str], list[CaseResult]] = {}
    for r in results:
        panels.setdefault((r.group, r.panel), []).append(r)
    return panels


def _baseline_names(cases: Sequence[CaseResult]) -> list[str]:
    names: list[str] = []
    for c in cases:
        for r in c.baselines:
            if r.name not in names:
                names.append(r.name)
    return names


def _baseline_cell(case: CaseResult, ours: ImplResult, name: str) -> str:
    b = case.impl(name)
    if b is None:
        return "-"
    if b.status != OK:
        return "FAIL" if b.status == FAIL else b.status
    if b.timing is None:
        return "ok"
    cell = fmt_time(b.ms) + _mark(b)
    if ours.ms and (case.speedups(ours).get(name) is not None):
        cell += f" ({b.ms / ours.ms:.2f}x)"
    return cell


def panel_table(cases: Sequence[CaseResult]) -> list[str]:
    """One row per (case, our implementation): our metrics, then each baseline's time and our speedup over it."""
    multi = any(len(c.ours) > 1 for c in cases)
    baselines = _baseline_names(cases)
    metric = cases[0].metric
    show_gbps = metric == "gbps" or not any(c.flops for c in cases)
    show_tflops = metric == "tflops"
    show_cublas = any(r.pct_cublas is not None for c in cases for r in c.ours)
    show_datasheet = any(r.pct_datasheet is not None for c in cases for r in c.ours)
    show_graph = any(r.graph_ms is not None for c in cases for r in c.impls)
    show_mem = any(r.peak_mem_bytes is not None for c in cases for r in c.impls)
    show_clean = any(r.clean_ms is not None for c in cases for r in c.ours)
    head = ["case", "dtype"] + (["impl"] if multi else []) + ["check (rel. err)", "time (IQR)"]
    if show_gbps:
        head += ["GB/s", "% of copy, same bytes", "% of peak copy"]
    if show_clean:
        head += ["clean L2: time (% of peak copy)"]
    if show_tflops:
        head += ["TFLOP/s"]
    if show_cublas:
        head += ["% of cuBLAS"]
    if show_datasheet:
        head += ["% of datasheet peak"]
    if show_graph:
        head += ["CUDA graph", "host time per call"]
    if show_mem:
        head += ["peak mem (eager)"]
    head += [f"{b} (speedup)" for b in baselines]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for c in cases:
        for o in c.ours:
            t = "-" if o.timing is None else f"{fmt_time(o.ms)} ({fmt_time(o.timing.iqr_ms)})" + _mark(o)
            row = [c.name, c.dtype] + ([o.name] if multi else []) + [_check_word(o), t]
            if show_gbps:
                row += [_num(o.gbps), _num(o.pct_copy_same, 1, " %"), _num(o.pct_peak, 1, " %")]
            if show_clean:
                row += [_clean_cell(o)]
            if show_tflops:
                row += [_num(o.tflops, 1)]
            if show_cublas:
                row += [_num(o.pct_cublas, 1, " %")]
            if show_datasheet:
                row += [_num(o.pct_datasheet, 1, " %")]
            if show_graph:
                row += [fmt_time(o.graph_ms), fmt_time(o.host_ms)]
            if show_mem:
                eager = c.impl("eager")
                row += [f"{_bytes(o.peak_mem_bytes)} ({_bytes(eager.peak_mem_bytes if eager else None)})"]
            row += [_baseline_cell(c, o, b) for b in baselines]
            lines.append("| " + " | ".join(row) + " |")
    if any(r.timing is not None and r.timing.unstable for c in cases for r in c.impls):
        lines += ["", UNSTABLE_NOTE]
    return lines


UNSTABLE_NOTE = ("† unstable: interquartile range above a quarter of the median, most often host stalls (the L2 "
                 "flush hides only ~90 us of host time per run); read with care.")


def _mark(r: ImplResult) -> str:
    return " †" if r.timing is not None and r.timing.unstable else ""


def _clean_cell(r: ImplResult) -> str:
    if r.clean_ms is None:
        return "-"
    return f"{fmt_time(r.clean_ms)} ({_num(r.clean_pct_peak, 1, ' %')})"


def all_measurements_table(cases: Sequence[CaseResult], timed: bool) -> list[str]:
    head = ["case", "dtype", "impl", "role", "status", "rel. error (tol)"]
    show_clean = timed and any(r.clean_ms is not None for c in cases for r in c.impls)
    if timed:
        head += ["median", "IQR", "std", "runs", "GB/s", "% copy same bytes", "TFLOP/s", "% cuBLAS", "CUDA graph",
                 "host/call", "peak mem", "first call"]
    if show_clean:
        head += ["clean L2 (% of peak copy)"]
    head += ["note"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for c in cases:
        for r in c.impls:
            tol = f"{r.tol:.2g}" if r.tol is not None and math.isfinite(r.tol) else "-"
            row = [c.name, c.dtype, r.name, r.role, r.status if r.status != FAIL else "**FAIL**", f"{_err(r)} ({tol})"]
            if timed:
                t = r.timing
                row += [fmt_time(r.ms) + _mark(r), fmt_time(t.iqr_ms) if t else "-", fmt_time(t.std_ms) if t else "-",
                        str(t.runs) if t else "-", _num(r.gbps), _num(r.pct_copy_same, 1, " %"), _num(r.tflops, 1),
                        _num(r.pct_cublas, 1, " %"), fmt_time(r.graph_ms), fmt_time(r.host_ms),
                        _bytes(r.peak_mem_bytes),
                        "-" if r.first_call_s is None else f"{r.first_call_s:.2f} s"]
            if show_clean:
                row += [_clean_cell(r)]
            note = "; ".join(x for x in (r.message, r.note) if x)
            row += [note.replace("|", "/")[:160] or "-"]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def extra_table(table: dict[str, Any]) -> list[str]:
    """An accuracy study or other table the suite attached to a group."""
    out = [f"### {table['title']}", ""]
    if table.get("note"):
        out += [f"_{table['note']}_", ""]
    cols = table["columns"]
    out += ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for row in table["rows"]:
        out.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return out + [""]


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "NaN" if math.isnan(v) else "inf"
        return f"{v:.2e}" if abs(v) < 0.01 and v != 0 else f"{v:.2f}"
    return str(v)


def headline_rows(results: Sequence[CaseResult]) -> list[dict[str, Any]]:
    """Per panel: cases, correct count, geometric-mean speedup of our main kernel over each baseline, and its
    median % of copy bandwidth (same bytes) or % of cuBLAS."""
    rows = []
    for (group, panel), cases in _panels(results).items():
        ours_all = [o for c in cases for o in c.ours]
        correct = sum(o.status == OK for o in ours_all)
        skipped = sum(all(i.status == "skipped" for i in c.impls) for c in cases)
        speed: dict[str, list[float]] = {}
        pct_copy, pct_cublas, pct_peak, clean_peak = [], [], [], []
        for c in cases:
            if not c.ours:
                continue
            o = c.ours[0]
            for name, s in c.speedups(o).items():
                if s is not None:
                    speed.setdefault(name, []).append(s)
            if o.pct_copy_same is not None and c.metric == "gbps":
                pct_copy.append(o.pct_copy_same)
            if o.pct_peak is not None and c.metric == "gbps":
                pct_peak.append(o.pct_peak)
            if o.clean_pct_peak is not None:
                clean_peak.append(o.clean_pct_peak)
            if o.pct_cublas is not None:
                pct_cublas.append(o.pct_cublas)
        rows.append({
            "group": group, "panel": panel, "cases": len(cases), "kernels": len(ours_all), "correct": correct,
            "skipped": skipped,
            "speedups": {k: (geomean(v), min(v), max(v)) for k, v in speed.items()},
            "pct_copy": (_median(pct_copy), min(pct_copy), max(pct_copy)) if pct_copy else None,
            "pct_cublas": (_median(pct_cublas), min(pct_cublas), max(pct_cublas)) if pct_cublas else None,
            "pct_peak": (_median(pct_peak), min(pct_peak), max(pct_peak)) if pct_peak else None,
            "clean_pct_peak": (_median(clean_peak), min(clean_peak), max(clean_peak)) if clean_peak else None,
        })
    return rows


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def headline_table(results: Sequence[CaseResult]) -> list[str]:
    rows = headline_rows(results)
    show_peak = any(row["pct_peak"] for row in rows)
    head = ("| kernel | cases | correct | speedup (geo-mean, min-max) | % of copy bw, same bytes (median, min-max) "
            + ("| % of peak copy bw (median, min-max): L2 zero-filled / clean L2 " if show_peak else "")
            + "| % of cuBLAS (median) |")
    lines = [head, "|" + " --- |" * (7 if show_peak else 6)]

    def span(p: tuple | None) -> str:
        return "-" if p is None else f"{p[0]:.0f} % ({p[1]:.0f}-{p[2]:.0f})"

    for row in rows:
        sp = "; ".join(f"{g:.2f}x vs {name} ({lo:.2f}-{hi:.2f})" for name, (g, lo, hi) in row["speedups"].items()
                       if g is not None) or "-"
        pb = row["pct_cublas"]
        peak = f"{span(row['pct_peak'])} / {span(row['clean_pct_peak'])} | " if show_peak else ""
        # cases past the time budget (never run, so without a panel title) are said to be skipped, not wrong
        panel = row["panel"] or "cases past the time budget"
        skipped = f", {row['skipped']} skipped" if row.get("skipped") else ""
        lines.append(
            f"| {GROUP_TITLES.get(row['group'], row['group'])}: {panel} | {row['cases']} | "
            f"{row['correct']}/{row['kernels']}{skipped} | {sp} | {span(row['pct_copy'])} | {peak}"
            f"{'-' if pb is None else f'{pb[0]:.0f} %'} |"
        )
    return lines


def summary_lines(results: Sequence[CaseResult], timed: bool) -> list[str]:
    lines = []
    total = len(results)
    failed = [r for r in results if r.failed]
    skipped = [r for r in results if all(i.status == "skipped" for i in r.impls)]
    baseline_fail = [(r, i) for r in results for i in r.baselines if i.status == FAIL]
    lines.append(f"{total} cases: {total - len(failed) - len(skipped)} correct, {len(failed)} failing, "
                 f"{len(skipped)} skipped; {len(baseline_fail)} baseline results outside tolerance")
    for r in failed:
        for o in r.ours:
            if o.status != OK:
                lines.append(f"  {o.status.upper()}: {r.group} {r.name} {r.dtype} {o.name}: {o.message}")
    for r, i in baseline_fail:
        lines.append(f"  baseline outside tolerance: {r.group} {r.name} {r.dtype} {i.name}: {i.message}")
    if not timed:
        lines.append("No timings: this run checked correctness only (timings need a GPU).")
        return lines
    for row in headline_rows(results):
        sp = ", ".join(f"{g:.2f}x vs {n}" for n, (g, _, _) in row["speedups"].items() if g is not None)
        extra = []
        if row["pct_copy"]:
            extra.append(f"{row['pct_copy'][0]:.0f} % of copy bw (median)")
        if row["pct_cublas"]:
            extra.append(f"{row['pct_cublas'][0]:.0f} % of cuBLAS (median)")
        lines.append(f"  {row['group']} / {row['panel']}: {row['correct']}/{row['kernels']} correct; {sp}"
                     + (f"; {', '.join(extra)}" if extra else ""))
    return lines


def environment_lines(env: dict[str, Any], peak_copy_gbps: float | None, timing_note: str | None) -> list[str]:
    smi = env.get("nvidia_smi") or {}
    clocks = ", ".join(f"{k} {v}" for k, v in smi.items() if k.startswith("clocks"))
    pk = env.get("packages") or {}
    lines = [
        f"- Device: **{env.get('device', '?')}**"
        + (f" ({env['sm_count']} SMs, {env.get('memory_gib')} GiB, L2 {env.get('l2_mib', '?')} MiB, "
           f"compute capability {env.get('compute_capability')})" if env.get("sm_count") else ""),
    ]
    if smi:
        lines.append(f"- Driver {smi.get('driver_version', '?')}; clocks at report time: {clocks or 'not readable'}"
                     + (f"; power limit {smi['power.limit']}" if "power.limit" in smi else ""))
    lines += [
        f"- torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, Python {env.get('python')}"
        f", Liger-Kernel {env.get('liger_kernel') or 'not installed'}",
        "- triton-ops packages: " + ", ".join(f"{k} {v}" for k, v in pk.items() if v),
        f"- Date: {env.get('date_utc')}; commit {env.get('git_commit') or '?'}",
        f"- Command: `{env.get('command')}`",
    ]
    if peak_copy_gbps:
        lines.append(f"- Peak copy bandwidth measured in this run: **{peak_copy_gbps:,.0f} GB/s** (1 GiB "
                     "device-to-device copy, bytes read plus written); each case also times a copy of its own bytes")
    if timing_note:
        lines.append(f"- Timing: {timing_note}")
    else:
        where = "under the Triton interpreter on the CPU" if env.get("interpreter") else "without timing"
        lines.append(f"- **No timings**: this run checked correctness only, {where} (timings need a GPU).")
    lines.append("- Correctness: every implementation is checked first against a float64 (float32 for the largest "
                 "GPU cases) reference by relative Frobenius error; a result above the tolerance is marked **FAIL** "
                 "and not timed. Speedup = baseline time / our time (above 1: ours is faster).")
    return lines


def render_markdown(results: Sequence[CaseResult], *, environment: dict[str, Any], peak_copy_gbps: float | None,
                    timing_note: str | None, title: str | None = None, plots: dict[str, str] | None = None,
                    tables: Sequence[dict[str, Any]] = ()) -> str:
    groups = list(dict.fromkeys(r.group for r in results))
    if title is None:
        title = (GROUP_TITLES.get(groups[0], groups[0]) if len(groups) == 1 else "triton-ops benchmarks") + \
            f" on {environment.get('device', '?')}"
    timed = timing_note is not None
    out = [f"# {title}", "", *environment_lines(environment, peak_copy_gbps, timing_note), ""]
    out += ["## Summary", "", *headline_table(results), ""] if timed else \
        ["## Summary", "", "```", *summary_lines(results, timed), "```", ""]
    for png in (plots or {}).values():
        out += [f"![speed against size]({png})", ""]
    for group in groups:
        gres = [r for r in results if r.group == group]
        out += [f"## {GROUP_TITLES.get(group, group)}", ""]
        for (_, panel), cases in _panels(gres).items():
            out += [f"### {panel or group}", ""]
            notes = sorted({c.note for c in cases if c.note})
            out += [f"_{n}_" for n in notes] + ([""] if notes else [])
            if timed:
                out += [*panel_table(cases), ""]
            else:
                out += [*all_measurements_table(cases, timed=False), ""]
        for table in tables:
            if table.get("group") == group:
                out += extra_table(table)
        if timed:
            out += ["<details><summary>Every measurement</summary>", "",
                    *all_measurements_table(gres, timed=True), "", "</details>", ""]
    return "\n".join(out).rstrip() + "\n"
