"""The correctness gate: a wrong kernel is flagged FAIL and never timed; errors and missing baselines are marked."""

from __future__ import annotations

import math

import torch
from triton_ops.benchmark import BenchmarkSuite, Case, Impl, Timing


class CountingTimer:
    """Stands in for the device timer: records what it was asked to time."""

    def __init__(self) -> None:
        self.timed: list[str] = []

    def __call__(self, fn) -> Timing:
        name = fn.__name__
        self.timed.append(name)
        return Timing.from_samples([0.010, 0.011, 0.012])


def _named(name, fn):
    fn.__name__ = name
    return fn


def _case(impls, tol=1e-3) -> Case:
    x = torch.randn(64, 32, dtype=torch.float64)
    return Case(group="demo", name="64x32", dtype="float64", reference=lambda: torch.tanh(x), tol=tol,
                impls=[Impl(n, _named(n, (lambda f=f: f(x))), role=role, optional=opt) for n, f, role, opt in impls],
                bytes_moved=2 * x.numel() * 8, panel="demo", x=1.0)


def test_wrong_kernel_is_flagged_and_not_timed() -> None:
    timer = CountingTimer()
    suite = BenchmarkSuite(measure=True, timer=timer, progress=False, verbose=False)
    result = suite.run_case(_case([
        ("ours-wrong", lambda x: torch.tanh(x) * 1.01, "ours", False),   # 1 % off: above the 1e-3 tolerance
        ("eager", torch.tanh, "baseline", False),
    ]))
    wrong, eager = result.impl("ours-wrong"), result.impl("eager")
    assert wrong.status == "FAIL" and wrong.timing is None
    assert math.isclose(wrong.error, 0.01, rel_tol=1e-6)
    assert "not timed" in wrong.message
    assert timer.timed == ["eager"]  # the wrong kernel was never handed to the timer
    assert eager.status == "ok" and eager.timing is not None
    assert result.failed and suite.failed == [result]
    report = suite.generate_report()
    assert "**FAIL**" in report


def test_nan_output_fails_the_gate() -> None:
    timer = CountingTimer()
    suite = BenchmarkSuite(measure=True, timer=timer, progress=False, verbose=False)

    def nan_row(x):
        y = torch.tanh(x)
        y[3] = float("nan")
        return y

    result = suite.run_case(_case([("ours-nan", nan_row, "ours", False)]))
    assert result.impl("ours-nan").status == "FAIL"
    assert math.isnan(result.impl("ours-nan").error)
    assert timer.timed == []


def test_correct_kernel_is_timed_and_gets_metrics() -> None:
    timer = CountingTimer()
    suite = BenchmarkSuite(measure=True, timer=timer, progress=False, verbose=False)
    result = suite.run_case(_case([("ours", torch.tanh, "ours", False), ("eager", lambda x: torch.tanh(x), "baseline",
                                                                          False)]))
    ours = result.impl("ours")
    assert ours.status == "ok" and ours.timing.median_ms == 0.011
    assert ours.gbps == result.bytes_moved / 0.011e-3 / 1e9
    assert result.speedups(ours) == {"eager": 1.0}
    assert not result.failed


def test_raising_kernel_is_an_error_and_optional_baseline_is_na() -> None:
    suite = BenchmarkSuite(measure=True, timer=CountingTimer(), progress=False, verbose=False)

    def boom(x):
        raise RuntimeError("kernel exploded")

    result = suite.run_case(_case([("ours", boom, "ours", False), ("compiled", boom, "baseline", True)]))
    assert result.impl("ours").status == "error" and "kernel exploded" in result.impl("ours").message
    assert result.impl("compiled").status == "n/a"
    assert result.failed


def test_untimed_run_checks_only() -> None:
    suite = BenchmarkSuite(measure=False, progress=False, verbose=False)
    result = suite.run_case(_case([("ours", torch.tanh, "ours", False)]))
    assert result.impl("ours").status == "ok" and result.impl("ours").timing is None
    assert "No timings: this run checked correctness only" in suite.summary()


def test_time_budget_skips_remaining_cases() -> None:
    suite = BenchmarkSuite(measure=False, progress=False, verbose=False, time_budget_s=0.0)
    from triton_ops.benchmark import CaseFactory

    results = suite.run([CaseFactory("demo:never built", lambda: (_ for _ in ()).throw(AssertionError("built")))])
    assert results[0].impls[0].status == "skipped"
    assert not suite.failed
