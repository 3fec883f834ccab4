"""Command line shared by the benchmark entry points: options, output files, the summary and the exit status."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from . import ROOT

DEFAULT_OUT = ROOT / "docs" / "benchmarks"

# Share of the time budget each family gets when the whole suite runs (unused time carries over), from the families'
# times on an H100 (session 36: 51, 49, 34, 53 s with its 2k and 8k-token cases cut by the budget, 62 s). A family
# missing here gets the mean share: before attention was listed it took the default 1.0, which left the moe family,
# the one before it, 11 % of the remaining time.
SHARES = {"rmsnorm-rope": 0.17, "gated-mlp": 0.17, "fp8-gemm": 0.14, "moe": 0.30, "attention": 0.22}
DEFAULT_SHARE = sum(SHARES.values()) / len(SHARES)


def family_budget_s(elapsed_s: float, budget_s: float, families: Sequence[str]) -> float:
    """The time since the suite's start until which ``families[0]`` may run, when ``families`` are the ones left and
    ``elapsed_s`` of ``budget_s`` are spent: the remaining time divided by their shares (``SHARES``)."""
    shares = [SHARES.get(name, DEFAULT_SHARE) for name in families]
    return elapsed_s + max(0.0, budget_s - elapsed_s) * shares[0] / sum(shares)


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    script = Path(sys.argv[0]).stem
    prog = "python -m benchmarks" + ("" if script in ("__main__", "") else f".{script}")
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the .md/.json/.png reports (default on a GPU: docs/benchmarks; without a GPU "
                        "nothing is written unless --out is given)")
    p.add_argument("--quick", action="store_true", help="a few representative shapes only")
    p.add_argument("--warmup", type=int, default=10, help="warm-up runs per measurement (default 10)")
    p.add_argument("--runs", type=int, default=100, help="timed runs per measurement, at most (default 100)")
    p.add_argument("--rep-ms", type=float, default=60.0,
                   help="cap on the time of the timed runs of one measurement, ms (default 60)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the whole run: cases past it are reported as skipped")
    p.add_argument("--compile-budget-s", type=float, default=None,
                   help="cap on time spent compiling torch.compile baselines; past it they are n/a")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baselines")
    p.add_argument("--no-liger", action="store_true", help="leave out Liger-Kernel")
    p.add_argument("--no-graphs", action="store_true", help="leave out CUDA-graph timings")
    p.add_argument("--no-plots", action="store_true", help="write no PNG")
    return p.parse_args(argv)


def make_suite(args: argparse.Namespace):
    from triton_ops.benchmark import BenchmarkSuite

    return BenchmarkSuite(
        warmup_runs=args.warmup, benchmark_runs=args.runs, max_ms_per_measurement=args.rep_ms,
        cuda_graphs=not args.no_graphs, compile_baselines=not args.no_compile, liger=not args.no_liger,
        time_budget_s=args.budget_s, compile_budget_s=args.compile_budget_s,
    )


def run_groups(groups: dict[str, Callable], description: str, argv: Sequence[str] | None = None,
               combined: bool = False) -> int:
    """Run the named families' sweeps into one suite, write their reports, print the summary; 0 if all correct."""
    args = parse_args(description, argv)
    suite = make_suite(args)
    mode = "full sweep" if not args.quick else "quick sweep"
    if not suite.on_gpu:
        mode = "no GPU: small shapes under the Triton interpreter, correctness only"
    print(f"triton-ops benchmarks ({', '.join(groups)}): {mode}", file=sys.stderr, flush=True)
    start = time.monotonic()
    out = args.out if args.out is not None else (DEFAULT_OUT if suite.measure else None)
    written: list[Path] = []
    crashed: list[str] = []
    budget = args.budget_s
    names = list(groups)
    for i, (name, runner) in enumerate(groups.items()):
        if budget is not None:  # this family may run until its share of the budget (plus what earlier ones left)
            suite.time_budget_s = family_budget_s(time.monotonic() - start, budget, names[i:])
        t0 = time.monotonic()
        try:
            runner(suite, quick=args.quick)
        except Exception:  # report what ran; the exit status says the run broke
            traceback.print_exc()
            crashed.append(name)
        print(f"{name}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        if out is not None and any(r.group == name for r in suite.results):
            # written as soon as the family is done, so a run stopped later still leaves its reports
            files = suite.save_report(out / f"{name}.md", groups=[name], plot=not args.no_plots)
            written += files.values()
            print("wrote " + ", ".join(str(p) for p in files.values()), file=sys.stderr, flush=True)
    if out is not None:
        if combined and suite.measure:
            files = suite.save_report(out / suite.report_name(), plot=not args.no_plots,
                                      title=f"triton-ops benchmarks on {suite.environment.get('device')}")
            written += files.values()
            print("wrote " + ", ".join(str(p) for p in files.values()), file=sys.stderr)
    print(f"\n== summary ({time.monotonic() - start:.0f} s) ==")
    print(suite.summary())
    if crashed:
        print(f"the sweep of {', '.join(crashed)} stopped with an exception (traceback above)")
    return 1 if suite.failed or crashed else 0
