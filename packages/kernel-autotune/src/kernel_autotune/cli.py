"""``python -m kernel_autotune``: tune kernel families, and show, export, import or clear tuned configs.

    python -m kernel_autotune tune fused_gated_mlp --shape tokens=64,hidden=4096,intermediate=11264
    python -m kernel_autotune tune --all --out tuned/          # every installed family, its benchmark shapes
    python -m kernel_autotune tune --all --write-shipped       # ... and write the results into each package's
                                                               # tuned_configs.json, keyed by this GPU
    python -m kernel_autotune show [--kernel fused_gated_mlp]
    python -m kernel_autotune export tuned_configs.json --kernel fused_gated_mlp
    python -m kernel_autotune import tuned_configs.json
    python -m kernel_autotune clear [--kernel fused_gated_mlp]
    python -m kernel_autotune ship tuned/                      # copy a tune --out folder into the packages
    python -m kernel_autotune list                             # the known kernel families

``--cache-dir DIR`` (before the command) sets ``KERNEL_AUTOTUNE_CACHE_DIR`` for the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import cache as _cache
from .keys import key_string

# ---- helpers -------------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text


def parse_shape(spec: str) -> dict[str, Any]:
    """``"tokens=64,hidden=4096"`` -> ``{"tokens": 64, "hidden": 4096}`` (ints where they parse)."""
    shape: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"shape {spec!r}: expected name=value pairs separated by commas")
        shape[name.strip()] = _parse_value(value.strip())
    if not shape:
        raise argparse.ArgumentTypeError(f"shape {spec!r} is empty")
    return shape


# The sweep that produces the shipped tables (tune --all --write-shipped): every family on its benchmark shapes in
# 5 minutes, so it fits one 6-minute run on the GPU machine with the imports and the cold-start check.
DEFAULT_SHIP_SECONDS = 300.0

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def _entry_row(entry: dict[str, Any]) -> list[str]:
    key = entry["key"]
    problem = ",".join(f"{k}={v}" for k, v in key.get("problem", {}).items())
    cfg = ",".join(f"{k}={v}" for k, v in entry["config"].items())
    lat = entry.get("latency_ms")
    dflt = entry.get("default_latency_ms")
    return [key["kernel"], problem, "/".join(key.get("dtypes", [])), str(key.get("device", "")),
            f"triton {key.get('triton', '?')}", f"v{key.get('version', '?')}", cfg,
            "" if lat is None else f"{lat:.4f} ms", "" if dflt is None else f"{dflt:.4f} ms"]


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _matches(entry: dict[str, Any], prefixes: Sequence[str], device: str | None) -> bool:
    kernel = entry["key"]["kernel"]
    if prefixes and not any(kernel.startswith(p) for p in prefixes):
        return False
    return device is None or entry["key"].get("device") == device


def _all_entries(directory: Path | None = None) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for path in _cache.cache_files(directory):
        entries.update(_cache.read_entries(path))
    return entries


def _strip(entry: dict[str, Any], trials: bool) -> dict[str, Any]:
    if not trials:
        return entry
    path = _cache.cache_file(entry["key"]["kernel"])
    return {**entry, "trials": _cache.load_trials(path, entry["key"])}


class _Progress:
    """tqdm when installed and stderr is a terminal, else one line per step on stderr (with the time so far)."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.n, self.desc = total, 0, desc
        self.started = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=desc, unit="shape", file=sys.stderr, dynamic_ncols=True)

    def step(self, text: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(text[:60])
            self.bar.update(1)
        else:
            elapsed = time.perf_counter() - self.started
            print(f"[{self.n}/{self.total} {elapsed:.0f} s] {self.desc}: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- tune ----------------------------------------------------------------------------------------


def _tune_jobs(args: argparse.Namespace) -> list[tuple[Any, dict[str, Any]]]:
    from .registry import available_tunables, get_tunable, import_modules

    import_modules(args.module or [])
    if args.all:
        names = list(available_tunables())
    else:
        names = list(args.families)
    if not names:
        raise SystemExit("tune: name kernel families (see `list`) or pass --all")
    per_family = []
    for name in names:
        tunable = get_tunable(name)
        shapes = [dict(s) for s in (args.shape or tunable.shapes)]
        if args.dtypes:
            dtypes = [_DTYPE_ALIASES.get(d, d) for d in args.dtypes.split(",")]
            shapes = [{**s, "dtype": d} for s in shapes for d in dtypes]
        per_family.append([(tunable, s) for s in shapes])
    # Families take turns, each in its own order (most important shapes first): a sweep that runs out of time
    # (--total-seconds) loses the last shapes of every family, not a whole family.
    jobs = []
    for i in range(max((len(f) for f in per_family), default=0)):
        jobs += [f[i] for f in per_family if i < len(f)]
    return jobs


def _pick_device(text: str | None):
    import torch
    from triton_ops_core.device import is_interpreter

    if text:
        return torch.device(text)
    if torch.cuda.is_available() and not is_interpreter():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _shipped_target(args: argparse.Namespace, device: Any) -> tuple[str, str | None] | None:
    """The device identity ``--write-shipped`` writes entries under (None without the flag); refuses the CPU."""
    if not args.write_shipped:
        return None
    from triton_ops_core.device import device_info

    info = device_info(device)
    if not info.is_gpu:
        raise SystemExit("tune --write-shipped: the device is the CPU interpreter, whose timings say nothing about a "
                         "GPU; run it on the GPU the entries are for")
    return info.identity


def write_shipped(path: Path, entries: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """Merge tuned ``entries`` into the shipped file ``path``: each replaces any entry of the same kernel, problem,
    dtypes and device (name and capability), whatever versions it was tuned under; entries of other devices and
    problems stay. Returns (entries written, entries kept)."""
    from .keys import relaxed_key_string

    new = {key_string(e["key"]): {k: v for k, v in e.items() if k != "trials"} for e in entries}
    replaced = {relaxed_key_string(e["key"]) for e in new.values()}
    current = _cache.read_entries(path)
    kept = {k: e for k, e in current.items() if relaxed_key_string(e["key"]) not in replaced}
    _cache.write_document(path, {**kept, **new})
    _cache.forget_parsed()
    return len(new), len(kept)


def cmd_tune(args: argparse.Namespace) -> int:
    from triton_ops_core.device import device_name

    from .keys import device_key, triton_version
    from .session import tune_operation

    device = _pick_device(args.device)
    jobs = _tune_jobs(args)  # imports --module first (a module may decide what the device is, in tests)
    ship_as = _shipped_target(args, device)
    if ship_as is not None and not args.total_seconds:
        args.total_seconds = DEFAULT_SHIP_SECONDS
    if ship_as is not None:
        missing = sorted({t.name for t, _ in jobs if t.shipped is None})
        if missing:
            raise SystemExit(f"tune --write-shipped: {', '.join(missing)} declare no shipped file")
    rows: list[dict[str, Any]] = []
    skipped_families: dict[str, str] = {}
    shipped_counts: dict[str, int] = {}
    families = list(dict.fromkeys(t.name for t, _ in jobs))
    print(f"tuning {len(jobs)} shapes of {', '.join(families) or 'no family'} on {device}"
          + (f" within {args.total_seconds:.0f} s" if args.total_seconds else ""), file=sys.stderr, flush=True)
    progress = _Progress(len(jobs), "tuning")
    started = time.perf_counter()
    for index, (tunable, shape) in enumerate(jobs):
        label = tunable.label(shape)
        if args.total_seconds and time.perf_counter() - started >= args.total_seconds:
            rows.append({"family": tunable.name, "shape": label,
                         "error": f"not started: the sweep's {args.total_seconds:.0f} s (--total-seconds) ran out"})
            progress.step(f"{tunable.name} {label}: skipped, out of time")
            continue
        shape_seconds = None
        if args.total_seconds:  # share what is left of the sweep's budget evenly among the shapes still to do
            left = args.total_seconds - (time.perf_counter() - started)
            shape_seconds = max(0.0, left) / (len(jobs) - index)
        if tunable.requires_gpu_feature is not None and tunable.name not in skipped_families:
            reason = tunable.requires_gpu_feature(device)
            if reason:
                skipped_families[tunable.name] = reason
        if tunable.name in skipped_families:
            rows.append({"family": tunable.name, "shape": label, "error": skipped_families[tunable.name]})
            progress.step(f"{label}: skipped")
            continue
        t0 = time.perf_counter()
        try:
            runner = tunable.prepare(shape, device)
            results = tune_operation(runner, reset=tunable.reset, warmup_runs=args.warmup, benchmark_runs=args.runs,
                                     time_budget_ms=args.budget_ms, strategy=args.strategy,
                                     max_seconds=args.max_seconds or None, total_seconds=shape_seconds,
                                     device=device)
        except Exception as e:  # noqa: BLE001 - one shape failing must not stop the sweep
            from .search import describe_error

            rows.append({"family": tunable.name, "shape": label, "error": describe_error(e),
                         "seconds": time.perf_counter() - t0})
            progress.step(f"{label}: failed")
            _free_memory()
            continue
        seconds = time.perf_counter() - t0
        if not results:
            rows.append({"family": tunable.name, "shape": label, "seconds": seconds,
                         "error": "the operation made no select_config call (nothing to tune)"})
        for r in results:
            row: dict[str, Any] = {"family": tunable.name, "shape": label, "kernel": r.kernel,
                                   "problem": r.key.get("problem"), "seconds": seconds}
            if r.entry is None:
                row["error"] = r.skipped
            else:
                e = r.entry
                row.update(config=e["config"], latency_ms=e["latency_ms"], default_config=e.get("default_config"),
                           default_latency_ms=e.get("default_latency_ms"), verified=e.get("verified"),
                           trials=e.get("trials_total", 0), failed=e.get("trials_failed", 0),
                           kernel_seconds=e.get("tuning_time_s"))
            rows.append(row)
        if ship_as is not None:
            done = [r.entry for r in results if r.entry is not None]
            if done:
                written, _ = write_shipped(tunable.shipped, done)
                shipped_counts[tunable.name] = shipped_counts.get(tunable.name, 0) + written
        progress.step(f"{tunable.name} {label}: " + "; ".join(_summary(r) for r in results) + f" ({seconds:.1f} s)")
        del runner
        _free_memory()
    progress.close()
    total = time.perf_counter() - started

    tuned = [r for r in rows if "config" in r]
    cold = None if args.no_cold_start or not tuned else measure_cold_start(
        [r for r in rows if "config" in r], device)
    report = {
        "device": device_name(device) if device.type == "cuda" else device_key(device),
        "device_key": device_key(device), "triton": triton_version(), "torch": _torch_version(),
        "cache_dir": str(_cache.cache_dir()), "warmup_runs": args.warmup, "benchmark_runs": args.runs,
        "time_budget_ms": args.budget_ms, "strategy": args.strategy, "max_seconds": args.max_seconds,
        "total_seconds_budget": args.total_seconds or None,
        "total_seconds": round(total, 2), "rows": rows, "cold_start": cold,
        "skipped_families": skipped_families,
        "clock": ("CUDA-event timings with L2 flushed" if device.type == "cuda"
                  else "wall-clock timings under the Triton interpreter (meaningless for a GPU)"),
    }
    print(render_table(rows))
    if cold:
        print(render_cold(cold))
    if args.out:
        _write_outputs(Path(args.out), report, {t.name: t for t, _ in jobs}, device_key(device))
    if ship_as is not None:
        for t in {t.name: t for t, _ in jobs}.values():
            if shipped_counts.get(t.name):
                n_dev = sum(1 for e in _cache.read_entries(t.shipped).values()
                            if (e["key"].get("device"), e["key"].get("capability")) == ship_as)
                n_all = len(_cache.read_entries(t.shipped))
                print(f"shipped: {t.shipped}: {n_dev} entries for {ship_as[0]} ({ship_as[1]}), {n_all} in all",
                      file=sys.stderr)
    n_err = sum(1 for r in rows if "error" in r)
    print(f"\n{len(tuned)} kernels tuned, {n_err} rows failed or skipped, {total:.1f} s in all", file=sys.stderr)
    return 0 if tuned or not rows else 1


def _summary(result: Any) -> str:
    """One kernel's outcome in a progress line."""
    if result.entry is None:
        return f"{result.kernel} not tuned"
    e = result.entry
    dflt = e.get("default_latency_ms")
    vs = f" vs default {dflt * 1e3:.1f} us" if dflt else ""
    return f"{result.kernel} {e['latency_ms'] * 1e3:.1f} us{vs}"


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def _fmt_cfg(cfg: dict[str, Any] | None) -> str:
    return "" if not cfg else ",".join(f"{k}={v}" for k, v in cfg.items())


def _report_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["family", "shape", "kernel", "best config", "best ms", "default ms", "speedup", "ok/trials",
              "tune s", "note"]
    out = []
    for r in rows:
        if "config" in r:
            d = r.get("default_latency_ms")
            speed = f"{d / r['latency_ms']:.2f}x" if d and r["latency_ms"] else ""
            out.append([r["family"], r["shape"], r["kernel"], _fmt_cfg(r["config"]), f"{r['latency_ms']:.4f}",
                        "" if d is None else f"{d:.4f}", speed, f"{r['trials'] - r['failed']}/{r['trials']}",
                        f"{r.get('kernel_seconds') or 0:.1f}",
                        "default kept" if r["config"] == r.get("default_config") else ""])
        else:
            out.append([r["family"], r["shape"], r.get("kernel", ""), "", "", "", "", "", f"{r.get('seconds', 0):.1f}",
                        r.get("error", "")])
    return header, out


def render_table(rows: list[dict[str, Any]]) -> str:
    header, out = _report_rows(rows)
    return _table(header, out)


def render_cold(cold: dict[str, Any]) -> str:
    return (f"cached lookup in a fresh process: import kernel_autotune {cold['import_ms']:.1f} ms; "
            f"first lookup {cold['first_lookup_us']:.0f} us (reads and parses the cache file), "
            f"each further kernel's first lookup {cold['other_lookups_us_median']:.0f} us median, "
            f"memoized {cold['hot_lookup_us']:.2f} us; {cold['hits']}/{cold['lookups']} served from the cache")


_COLD_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import kernel_autotune as ka
t1 = time.perf_counter()
import torch
from kernel_autotune.keys import device_key, triton_version
spec = json.loads(sys.argv[1])
dev = spec["device"]
if dev.startswith("cuda"):
    torch.zeros(1, device=dev)  # a process that launches kernels has CUDA up already
device_key(dev); triton_version()
out = {"import_ms": (t1 - t0) * 1e3, "lookups": [], "hits": 0}
default = {"__default__": True}
calls = []
for k in spec["keys"]:
    kw = dict(version=k["version"], problem=k["problem"], dtypes=tuple(k["dtypes"]), device=dev, default=default)
    s = time.perf_counter()
    cfg = ka.select_config(k["kernel"], **kw)
    out["lookups"].append((time.perf_counter() - s) * 1e6)
    out["hits"] += cfg != default
    calls.append((k["kernel"], kw))
name, kw = calls[0]
n = 20000
s = time.perf_counter()
for _ in range(n):
    ka.select_config(name, **kw)
out["hot_us"] = (time.perf_counter() - s) / n * 1e6
print(json.dumps(out))
"""


def measure_cold_start(rows: list[dict[str, Any]], device: Any) -> dict[str, Any] | None:
    """Time cached lookups in a fresh interpreter: import, first lookup (file parse), later lookups, memo hits."""
    keys, seen = [], set()
    for r in rows:
        entries = _cache.read_entries(_cache.cache_file(r["kernel"]))
        for e in entries.values():
            if e["key"]["kernel"] == r["kernel"] and e["key"].get("problem") == r["problem"]:
                ks = key_string(e["key"])
                if ks not in seen:
                    seen.add(ks)
                    keys.append(e["key"])
    if not keys:
        return None
    spec = json.dumps({"device": str(device), "keys": keys})
    proc = subprocess.run([sys.executable, "-c", _COLD_SCRIPT, spec], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-2000:]}
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    lookups = data["lookups"]
    others = sorted(lookups[1:]) or [lookups[0]]
    return {"import_ms": data["import_ms"], "first_lookup_us": lookups[0],
            "other_lookups_us_median": others[len(others) // 2], "other_lookups_us_max": max(others),
            "hot_lookup_us": data["hot_us"], "hits": data["hits"], "lookups": len(lookups)}


def _write_outputs(out: Path, report: dict[str, Any], tunables: dict[str, Any], device: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    header, rows = _report_rows(report["rows"])
    md = [f"# kernel-autotune tuning report: {report['device']}", "",
          f"triton {report['triton']}, torch {report['torch']}; {report['strategy']} search "
          f"(at most {report['max_seconds']} s per kernel); warm-up {report['warmup_runs']}, up to "
          f"{report['benchmark_runs']} timed runs per config (time budget {report['time_budget_ms']} ms); "
          f"{report['total_seconds']} s in all.", "",
          f"Times are medians of {report['clock']}, of the whole operation with this kernel's "
          "config overridden; `default` is the package's heuristic config timed in the same run.", "",
          _markdown(header, rows), ""]
    if report.get("cold_start") and "error" not in report["cold_start"]:
        md += ["## Cold start of a cached lookup", "", render_cold(report["cold_start"]), ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    print(f"\nwrote {out / 'report.json'} and {out / 'report.md'}", file=sys.stderr)
    entries = _all_entries()
    for name, tunable in tunables.items():
        mine = {k: _strip(e, False) for k, e in entries.items()
                if tunable.owns(e["key"]["kernel"]) and e["key"].get("device") == device}
        if not mine:
            continue
        path = out / name / "tuned_configs.json"
        _cache.write_document(path, mine)
        target = tunable.shipped or f"<{name} package>/tuned_configs.json"
        print(f"wrote {path} ({len(mine)} entries): ship it with `cp {path} {target}` "
              f"or `python -m kernel_autotune ship {out}`", file=sys.stderr)


# ---- show / export / import / clear / ship / list -------------------------------------------------


def cmd_show(args: argparse.Namespace) -> int:
    entries = _cache.read_entries(args.file) if args.file else _all_entries()
    chosen = [e for e in entries.values() if _matches(e, args.kernel or [], args.device)]
    chosen.sort(key=lambda e: key_string(e["key"]))
    if args.json:
        print(json.dumps(chosen, indent=1))
        return 0
    where = args.file or _cache.cache_dir()
    if not chosen:
        print(f"no tuned configs in {where}")
        return 0
    print(f"{len(chosen)} tuned configs in {where}")
    print(_table(["kernel", "problem", "dtypes", "device", "triton", "version", "config", "latency", "default"],
                 (_entry_row(e) for e in chosen)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    entries = {k: _strip(e, args.trials) for k, e in _all_entries().items()
               if _matches(e, args.kernel or [], args.device)}
    out = Path(args.output)
    if args.merge and out.exists():
        existing = _cache.read_entries(out)
        existing.update(entries)
        entries = existing
    _cache.write_document(out, entries)
    print(f"exported {len(entries)} entries to {out}")
    return 0


def _read_strict(path: Path) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"import: cannot read {path}: {e}") from None
    entries, problem = _cache.parse_document(doc)
    if entries is None:
        raise SystemExit(f"import: {path} is not a kernel-autotune file: {problem}")
    return entries


def cmd_import(args: argparse.Namespace) -> int:
    total = 0
    for name in args.files:
        entries = _read_strict(Path(name))
        by_kernel: dict[str, list[dict[str, Any]]] = {}
        for e in entries.values():
            by_kernel.setdefault(e["key"]["kernel"], []).append(e)
        for kernel, items in by_kernel.items():
            _cache.store(_cache.cache_file(kernel), items)
        total += len(entries)
    print(f"imported {total} entries into {_cache.cache_dir()}")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    files = _cache.cache_files()
    if not args.kernel and args.device is None:
        removed = 0
        for path in files:
            removed += len(_cache.read_entries(path))
            side = _cache.trials_file(path)
            for p in (path, Path(str(path) + ".lock"), Path(str(path) + ".corrupt"),
                      Path(str(path) + _cache.TUNING_LOCK_SUFFIX), side, Path(str(side) + ".lock")):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
        _cache.forget_parsed()
        print(f"cleared {removed} entries ({len(files)} files) from {_cache.cache_dir()}")
        return 0
    pick = lambda e: _matches(e, args.kernel or [], args.device)  # noqa: E731
    removed = sum(_cache.remove(p, pick) for p in files)
    for p in files:
        _cache.remove(_cache.trials_file(p), pick)
    print(f"cleared {removed} entries from {_cache.cache_dir()}")
    return 0


def cmd_ship(args: argparse.Namespace) -> int:
    from .registry import get_tunable, import_modules

    import_modules(args.module or [])
    src = Path(args.directory)
    done = 0
    for path in sorted(src.glob("*/tuned_configs.json")):
        tunable = get_tunable(path.parent.name)
        if tunable.shipped is None:
            print(f"ship: {tunable.name} has no shipped path; skipped", file=sys.stderr)
            continue
        new = _read_strict(path)
        merged = _cache.read_entries(tunable.shipped) if args.merge else {}
        merged.update(new)
        _cache.write_document(tunable.shipped, merged)
        print(f"shipped {len(new)} entries to {tunable.shipped}")
        done += 1
    return 0 if done else 1


def cmd_list(args: argparse.Namespace) -> int:
    from .registry import available_tunables, import_modules

    import_modules(args.module or [])
    for name, how in available_tunables().items():
        print(f"{name}\t{how}")
    return 0


# ---- argument parsing ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kernel_autotune", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", help="cache directory (sets KERNEL_AUTOTUNE_CACHE_DIR for this run)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tune", help="tune kernel families on a list of shapes")
    p.add_argument("families", nargs="*", help="kernel families (see `list`)")
    p.add_argument("--all", action="store_true", help="every installed family, on its benchmark shapes")
    p.add_argument("--shape", action="append", type=parse_shape, metavar="K=V,...",
                   help="a shape (repeatable), e.g. tokens=64,hidden=4096,intermediate=11264; default: the family's")
    p.add_argument("--dtypes", help="comma-separated dtypes replacing each shape's (bf16,fp16,...)")
    p.add_argument("--device", help="device to tune on (default: the current GPU, else the CPU interpreter)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up runs per config (default 5)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per config at most (default 50)")
    p.add_argument("--budget-ms", type=float, default=200.0, help="time budget of the timed runs per config, ms")
    p.add_argument("--strategy", choices=["coordinate", "exhaustive"], default="coordinate",
                   help="coordinate (default): one parameter at a time from the heuristic default; "
                        "exhaustive: every config of the pruned space")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop trying new configs of one kernel after this long (default 60; 0: no limit)")
    p.add_argument("--total-seconds", type=float, default=0.0,
                   help="time budget of the whole sweep, shared evenly among the shapes left (default 0: none); "
                        "each kernel's default config is timed whatever the budget, so it can be overrun by about "
                        "one shape; shapes not started by then are reported as skipped")
    p.add_argument("--module", action="append", help="import this module first (it may call register_tunable)")
    p.add_argument("--out", help="write report.json, report.md and <family>/tuned_configs.json here")
    p.add_argument("--no-cold-start", action="store_true", help="skip the fresh-process lookup timing")
    p.add_argument("--write-shipped", action="store_true",
                   help="write each shape's results into its family's shipped tuned_configs.json as soon as it is "
                        "tuned, keyed by this GPU's name and compute capability (other devices' entries stay); "
                        f"--total-seconds defaults to {DEFAULT_SHIP_SECONDS:.0f} then")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("show", help="list tuned configs")
    p.add_argument("--kernel", action="append", help="kernel name or prefix (repeatable)")
    p.add_argument("--device", help="only entries of this device name")
    p.add_argument("--file", help="show this file (a shipped tuned_configs.json) instead of the cache")
    p.add_argument("--json", action="store_true", help="print the entries as JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("export", help="write cache entries to a JSON file in the shipped format")
    p.add_argument("output")
    p.add_argument("--kernel", action="append", help="kernel name or prefix (repeatable)")
    p.add_argument("--device", help="only entries of this device name (e.g. 'NVIDIA H100 80GB HBM3')")
    p.add_argument("--trials", action="store_true", help="include every trial (default: best config and timing only)")
    p.add_argument("--merge", action="store_true", help="merge into the output file if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="merge entries of exported or shipped files into the cache")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("clear", help="delete cache entries (all of them without filters)")
    p.add_argument("--kernel", action="append", help="kernel name or prefix (repeatable)")
    p.add_argument("--device", help="only entries of this device name")
    p.set_defaults(func=cmd_clear)

    p = sub.add_parser("ship", help="copy <dir>/<family>/tuned_configs.json (from tune --out) into the packages")
    p.add_argument("directory")
    p.add_argument("--merge", action="store_true", help="merge with the package's existing file")
    p.add_argument("--module", action="append", help="import this module first (it may call register_tunable)")
    p.set_defaults(func=cmd_ship)

    p = sub.add_parser("list", help="list the known kernel families")
    p.add_argument("--module", action="append", help="import this module first (it may call register_tunable)")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m kernel_autotune``; returns the exit status."""
    args = build_parser().parse_args(argv)
    previous = os.environ.get(_cache.ENV_CACHE_DIR)
    if args.cache_dir:  # through the environment, so select_config and subprocesses see it too
        os.environ[_cache.ENV_CACHE_DIR] = str(Path(args.cache_dir).expanduser().resolve())
    from triton_ops_core.exceptions import TritonKernelError

    try:
        return int(args.func(args) or 0)
    except TritonKernelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:  # main() called in a process that goes on (tests, notebooks) leaves its environment as it was
        if args.cache_dir:
            if previous is None:
                os.environ.pop(_cache.ENV_CACHE_DIR, None)
            else:
                os.environ[_cache.ENV_CACHE_DIR] = previous


__all__ = ["DEFAULT_SHIP_SECONDS", "build_parser", "main", "parse_shape", "write_shipped"]
