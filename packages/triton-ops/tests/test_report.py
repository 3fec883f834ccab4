"""Reports rendered from recorded results (a fixture in the suite's JSON format), without a GPU."""

from __future__ import annotations

import json
import math

import pytest
from triton_ops.benchmark import BenchmarkSuite, CaseResult, Timing
from triton_ops.benchmark._report import fmt_time, geomean, headline_rows


def test_report_from_recorded_results(recorded_json) -> None:
    suite = BenchmarkSuite.from_json(recorded_json)
    md = suite.generate_report()
    assert md.startswith("# triton-ops benchmarks on NVIDIA H100 80GB HBM3")
    # environment: device, versions, command, measured peak
    for text in ("torch 2.11.0+cu130", "triton 3.6.0", "`python3 -m benchmarks`", "3,017 GB/s", "clocks.sm 1980 MHz"):
        assert text in md
    # the prefill table: our time with its IQR, % of the same-bytes copy, each baseline with our speedup
    row = next(line for line in md.splitlines() if line.startswith("| 2x1024x4096 | bfloat16 | ok"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "18.5 us (0.9 us)"
    assert cells[5] == "91.1 %"
    assert cells[7] == "334.0 us (18.05x)"  # eager / ours
    assert cells[8] == "19.5 us (1.05x)"
    assert cells[9] == "n/a"  # Liger not installed
    # the failing kernel is marked and has no time
    fail = next(line for line in md.splitlines() if line.startswith("| 4x2048x8192 | float16"))
    assert "**FAIL** (3.1e-01 > 0.002)" in fail
    assert "not timed" in md
    # GEMM: % of cuBLAS per accumulation mode, speedups only against the matching baselines
    fast = next(line for line in md.splitlines() if "| triton-ops fast-accum | ok" in line)
    assert "98.8 %" in fast and "840.0 us (0.99x)" in fast and "870.0 us |" in fast
    assert "% of datasheet peak" in md and "65.4 %" in fast  # 1293.5 TFLOP/s of the H100's dense 1979
    # an attached accuracy table, rendered under its group
    assert "### FP8 GEMM accuracy" in md
    assert "| tensor x tensor | 16384 | 1.30e-04 | 3.10e-03 | 1.30e-04 | 3.10e-03 |" in md
    assert "| block 1x128 x 128x128 | 16384 | 1.20e-04 | 1.20e-04 | - | - |" in md


def test_summary_counts_failures(recorded_json) -> None:
    suite = BenchmarkSuite.from_json(recorded_json)
    text = suite.summary()
    assert text.splitlines()[0].startswith("4 cases: 3 correct, 1 failing")
    assert "FAIL: rmsnorm-rope 4x2048x8192 float16 triton-ops" in text
    assert [r.name for r in suite.failed] == ["4x2048x8192"]


def test_headline_geomean(recorded_json) -> None:
    suite = BenchmarkSuite.from_json(recorded_json)
    rows = {r["panel"]: r for r in headline_rows(suite.results)}
    prefill = rows["prefill: [batch, seq, hidden]"]
    g, lo, hi = prefill["speedups"]["eager"]
    assert g == pytest.approx(math.sqrt((0.334 / 0.0185) * (1.136 / 0.052)))
    assert (lo, hi) == (pytest.approx(0.334 / 0.0185), pytest.approx(1.136 / 0.052))
    assert prefill["correct"] == 2 and prefill["kernels"] == 3


def test_save_report_writes_markdown_json_and_plot(recorded_json, tmp_path) -> None:
    suite = BenchmarkSuite.from_json(recorded_json)
    written = suite.save_report(tmp_path / "rmsnorm-rope.md", groups=["rmsnorm-rope"])
    md = written["md"].read_text()
    assert "FP8" not in md and "4x2048x8192" in md
    data = json.loads(written["json"].read_text())
    assert {r["group"] for r in data["results"]} == {"rmsnorm-rope"}
    # the JSON round-trips into the same report
    again = BenchmarkSuite.from_json(written["json"])
    assert again.generate_report() == suite.generate_report(groups=["rmsnorm-rope"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "png" not in written
    else:
        assert written["png"].stat().st_size > 1000
        assert f"]({written['png'].name})" in md
    assert suite.report_name() == "report-h100.md"


def test_timing_statistics_and_formatting() -> None:
    t = Timing.from_samples([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (t.median_ms, t.p25_ms, t.p75_ms, t.min_ms, t.runs) == (3.0, 2.0, 4.0, 1.0, 5)
    assert t.iqr_ms == 2.0
    assert fmt_time(0.0123) == "12.3 us" and fmt_time(2.5) == "2.500 ms" and fmt_time(None) == "-"
    assert geomean([2.0, 8.0]) == pytest.approx(4.0) and geomean([]) is None


def test_case_result_round_trip(recorded_json) -> None:
    data = json.loads(recorded_json.read_text())
    for d in data["results"]:
        assert CaseResult.from_dict(d).to_dict() == CaseResult.from_dict(CaseResult.from_dict(d).to_dict()).to_dict()


def test_unstable_timings_are_marked(recorded_json, tmp_path) -> None:
    data = json.loads(open(recorded_json).read())
    case = next(r for r in data["results"] if r["name"] == "2x1024x4096")
    ours = next(i for i in case["impls"] if i["role"] == "ours")
    ours["timing"].update(p25_ms=0.010, p75_ms=0.030, attempts=3)  # IQR 20 us on an 18.5 us median
    path = tmp_path / "unstable.json"
    path.write_text(json.dumps(data))
    md = BenchmarkSuite.from_json(path).generate_report()
    row = next(line for line in md.splitlines() if line.startswith("| 2x1024x4096 | bfloat16 | ok"))
    assert "18.5 us (20.0 us) †" in row
    assert "† unstable: interquartile range above a quarter of the median, most often host stalls" in md
    stable = BenchmarkSuite.from_json(recorded_json).generate_report()
    assert "†" not in stable


def test_cases_past_the_budget_are_counted_as_skipped_not_wrong() -> None:
    from triton_ops.benchmark._model import ImplResult
    from triton_ops.benchmark._report import headline_table

    skipped = CaseResult(group="moe", name="T8192", dtype="", tol=0.0)
    skipped.impls.append(ImplResult(name="triton-ops", role="ours", status="skipped", message="time budget spent"))
    row = next(line for line in headline_table([skipped]) if line.startswith("| moe"))
    assert "cases past the time budget | 1 | 0/1, 1 skipped |" in row
