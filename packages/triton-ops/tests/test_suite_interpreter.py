"""Every kernel family through the suite on small shapes (the interpreter on CPU; compiled kernels on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_ops.benchmark import BenchmarkSuite

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2] if (HERE.parents[2] / "benchmarks" / "__main__.py").is_file() else None


@pytest.fixture
def suite() -> BenchmarkSuite:
    # Correctness only: the small shapes here are for the gate, not for timing (and on a GPU, no torch.compile
    # or Liger baselines: the full suite covers them).
    return BenchmarkSuite(measure=False, progress=False, verbose=False, compile_baselines=False, liger=False)


def _assert_all_correct(results) -> None:
    assert results
    for r in results:
        for i in r.impls:
            assert i.status in ("ok", "n/a"), (r.name, r.dtype, i.name, i.status, i.error, i.message)
        assert any(i.role == "ours" and i.status == "ok" for i in r.impls)


def test_rmsnorm_rope_cases(suite) -> None:
    _assert_all_correct(suite.benchmark_rmsnorm_rope(shapes=[(2, 4, 128)], dtypes=(torch.float16,), head_dim=64))
    _assert_all_correct(suite.benchmark_rmsnorm_rope_decode(num_tokens=(3,), hidden_dims=(128,), head_dim=64,
                                                            max_position=32))
    _assert_all_correct(suite.benchmark_qk_norm_rope(batch_sizes=(1,), seq_lens=(3,), num_q_heads=2,
                                                     num_kv_heads=1, head_dim=64))


def test_gated_mlp_cases(suite) -> None:
    _assert_all_correct(suite.benchmark_gated_mlp(batch_sizes=(3,), hidden_dims=(), intermediate_dims=(),
                                                  shapes=[(64, 48)], dtypes=(torch.bfloat16,)))


def test_gpt_oss_expert_cases(suite) -> None:
    _assert_all_correct(suite.benchmark_gpt_oss_expert(batch_sizes=(3,), hidden=64, intermediate=48))


def test_fp8_cases(suite) -> None:
    _assert_all_correct(suite.benchmark_fp8_gemm(sizes=[(16, 32, 64)], granularities=("tensor", "row"),
                                                 decode_m=(1,), decode_nk=[(32, 64)]))
    _assert_all_correct(suite.benchmark_quantize_fp8(shapes=[(4, 256)], granularities=("tensor", "row", "block")))
    _assert_all_correct(suite.benchmark_fp8_linear(batch_sizes=(2,), in_features=64, out_features=32))


@pytest.mark.skipif(REPO is None, reason="needs the monorepo checkout (benchmarks/)")
def test_benchmarks_cli_without_gpu(tmp_path) -> None:
    """``python -m benchmarks.bench_gated_mlp`` without a GPU: correctness only, exit 0, writes only with --out."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("on a GPU this would run the full sweep")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_gated_mlp", "--out", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No timings: this run checked correctness only" in proc.stdout
    assert "0 failing" in proc.stdout
    md = (tmp_path / "gated-mlp.md").read_text()
    assert "under the Triton interpreter on the CPU" in md and "| triton-ops | ours | ok |" in md


@pytest.mark.skipif(REPO is None, reason="needs the monorepo checkout (benchmarks/)")
def test_budget_split_gives_each_family_its_share_of_what_is_left() -> None:
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks._common import SHARES, family_budget_s
    finally:
        sys.path.remove(str(REPO))
    families = ["rmsnorm-rope", "gated-mlp", "fp8-gemm", "moe", "attention"]
    assert set(families) <= set(SHARES)  # every family of `python -m benchmarks` has a share of its own
    total = sum(SHARES[f] for f in families)
    assert family_budget_s(0.0, 500.0, families) == pytest.approx(500.0 * SHARES["rmsnorm-rope"] / total)
    # the family before attention (the last) gets its share of what is left, not a sliver beside a default share
    moe_until = family_budget_s(200.0, 500.0, ["moe", "attention"])
    assert moe_until == pytest.approx(200.0 + 300.0 * SHARES["moe"] / (SHARES["moe"] + SHARES["attention"]))
    assert moe_until - 200.0 > 0.5 * 300.0
    assert family_budget_s(100.0, 500.0, ["attention"]) == pytest.approx(500.0)  # the last gets all that is left
    assert family_budget_s(600.0, 500.0, ["moe", "attention"]) == pytest.approx(600.0)  # overrun: nothing more
    # a family without a listed share gets the mean one
    unknown = family_budget_s(0.0, 100.0, ["new-family", "attention"])
    mean = total / len(SHARES)
    assert unknown == pytest.approx(100.0 * mean / (mean + SHARES["attention"]))
