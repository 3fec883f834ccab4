"""This package's kernel-autotune family (found by name, its shapes, a prepared call that runs the GEMM), and config
selection keyed by the device: the shipped H100 entries serve the H100 only, the heuristics read the device's SM
count, and ``choose`` tunes on first use when handed a bench (GPUs simulated on the CPU)."""

from __future__ import annotations

import kernel_autotune
import kernel_autotune.select as sel
import pytest
import torch
from fp8_gemm import gemm_configs as cfgs
from kernel_autotune import UntunedDeviceWarning
from kernel_autotune.testing import H100_SXM, H200, SMALL_GPU, UNTUNED_HOPPER, check_family
from triton_ops_core.device import simulate_device

CPU = torch.device("cpu")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fn, torch.bfloat16)


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("KERNEL_AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TRITON_OPS_AUTOTUNE", raising=False)
    monkeypatch.delenv("KERNEL_AUTOTUNE", raising=False)
    sel.reset_warnings()
    kernel_autotune.clear_memo()
    yield
    sel.reset_warnings()
    kernel_autotune.clear_memo()


def test_the_family_is_found_and_runs(device):
    small = {"m": 2, "n": 32, "k": 64, "scaling": "row", "out_dtype": "float32"}
    tunable = check_family("fp8_gemm", "fp8-gemm", small, device)
    faithful, fast = tunable.prepare({**small, "scaling": "tensor", "fast_accum": 2}, device)()  # both modes
    assert faithful.shape == fast.shape == (2, 32) and torch.isfinite(faithful).all() and torch.isfinite(fast).all()
    assert "faithful+fast" in tunable.label({**small, "fast_accum": 2})
    assert {s["fast_accum"] for s in tunable.shapes} == {0, 1, 2}


@pytest.mark.parametrize("scaling", ["tensor", "row", "group", "row-group"])
def test_every_scaling_of_the_family_computes_the_product(scaling, device):
    # the prepared call draws a = randn(m, k) and w = randn(n, k) / sqrt(k) and quantizes them with the scaling's
    # granularities: the same seed redraws them, and the FP8 GEMM must be their product within FP8's rounding
    from fp8_gemm.tuning import SHAPES, prepare

    shape = {"m": 4, "n": 128, "k": 256, "scaling": scaling, "out_dtype": "float32"}
    torch.manual_seed(3)
    out = prepare(shape, device)()
    torch.manual_seed(3)
    a = torch.randn(4, 256, device=device).double()
    w = torch.randn(128, 256, device=device).double() * 256 ** -0.5
    ref = a @ w.t()
    assert out.shape == (4, 128) and torch.isfinite(out).all()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 0.08
    assert scaling in {s["scaling"] for s in SHAPES}


def test_the_decode_heuristic_reads_the_sm_count():
    # K = 11264 and 4096 / 32 = 128 column blocks: fewer than 2 per SM on 132 SMs, so K splits in 4; not on 28 SMs
    with simulate_device(UNTUNED_HOPPER):
        assert cfgs.decode_heuristic(16, 4096, 11264, False, CPU, interpreter=False)["SPLIT_K"] == 4
    with simulate_device(SMALL_GPU):
        assert cfgs.decode_heuristic(16, 4096, 11264, False, CPU, interpreter=False)["SPLIT_K"] == 1


@pytest.mark.parametrize(("m", "n", "k", "split"), [
    (32, 6144, 4096, 4),    # Llama-3-8B q/k/v: 96 column blocks, split until about two programs per SM
    (64, 14336, 4096, 1),   # gate/up at 64 rows: 224 column blocks (1.7 per SM) need no split
    (32, 14336, 4096, 2),   # at 32 rows they split in 2
    (32, 2880, 4096, 8),    # gpt-oss o_proj: 45 column blocks, 8 ways at up to 32 rows
    (64, 2880, 4096, 4),    # ... at most 4 past 32 rows
    (64, 64, 256, 1),       # K of two 128-deep tiles: no split leaves a slice under two tiles
])
def test_block_and_group_scales_at_17_to_64_rows_take_wide_split_tiles(m, n, k, split):
    # measured on the H200 (gemm_configs._blocked_rows_config); per-channel scales keep the older rule
    with simulate_device(UNTUNED_HOPPER):
        cfg = cfgs.decode_heuristic(m, n, k, True, CPU, interpreter=False)
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]) == (max(32, m), 64, 128, split)
        assert cfgs.decode_heuristic(m, n, k, False, CPU, interpreter=False)["BLOCK_N"] in (32, 128)
        assert cfgs.decode_heuristic(16, n, k, True, CPU, interpreter=False)["BLOCK_M"] == 16  # 16 rows: as before


def _choose(bench=None, m=4096):
    name = "fp8_gemm.tma.a0b0.faithful"
    return cfgs.choose(name, {"m": m, "n": 4096, "k": 4096}, FP8_DTYPES, CPU,
                       lambda: cfgs.tma_heuristic(m, 4096, 4096, False, False, CPU, False), cfgs.FP8_GEMM_CONFIGS,
                       bench=bench)


def test_shipped_h100_entries_serve_the_h100_only(monkeypatch):
    monkeypatch.setenv("TRITON_OPS_AUTOTUNE", "0")
    with simulate_device(H100_SXM):
        shipped = _choose()
        assert shipped["EPI_SUBTILE"] is True and shipped["BLOCK_M"] == 256
    with simulate_device(UNTUNED_HOPPER), pytest.warns(UntunedDeviceWarning, match="fp8_gemm has no tuned configs"):
        assert _choose() == cfgs.tma_heuristic(4096, 4096, 4096, False, False, CPU, False)


@pytest.mark.parametrize(("a_mode", "n", "k", "want"), [
    # the H200's shipped entries of the Gluon group kernel (session 20): per-row activations (a1) and 1x128 blocks
    # (a2), Llama-3-8B's down and q/k/v projections at 2048 rows
    (1, 4096, 14336, {"BLOCK_M": 128, "GROUP_M": 8, "STAGES": 4, "num_warps": 8}),
    (2, 6144, 4096, {"BLOCK_M": 64, "GROUP_M": 16, "STAGES": 3, "num_warps": 4}),
])
def test_shipped_h200_entries_of_the_group_kernel_serve_the_h200_only(monkeypatch, a_mode, n, k, want):
    from fp8_gemm import gemm_wgmma

    monkeypatch.setenv("TRITON_OPS_AUTOTUNE", "0")
    name = f"fp8_gemm.wgmma.a{a_mode}b3.faithful"

    def choose():
        return cfgs.choose(name, {"m": 2048, "n": n, "k": k}, FP8_DTYPES, CPU, gemm_wgmma.default_config,
                           cfgs.FP8_GEMM_WGMMA_CONFIGS)

    with simulate_device(H200):
        got = choose()
        assert {key: got[key] for key in want} == want
    with simulate_device(UNTUNED_HOPPER), pytest.warns(UntunedDeviceWarning):
        assert choose() == gemm_wgmma.default_config()


def test_choose_tunes_on_first_use_when_handed_a_bench(monkeypatch):
    class Clock:
        now = 0.0

        def timer(self, fn, config):
            start = self.now
            fn()
            return self.now - start

    clock = Clock()
    monkeypatch.setattr(sel, "default_timer", lambda device=None, flush_l2=True: clock.timer)
    monkeypatch.setenv("KERNEL_AUTOTUNE_WARMUP_RUNS", "1")
    monkeypatch.setenv("KERNEL_AUTOTUNE_BENCHMARK_RUNS", "1")
    monkeypatch.setenv("KERNEL_AUTOTUNE_MAX_SECONDS", "5")
    ran = []

    def bench(cfg):  # on this clock each pipeline stage costs 1 ms: the winner has 2, the heuristic 4
        def run():
            ran.append(cfg)
            clock.now += cfg["num_stages"]
        return run

    with simulate_device(UNTUNED_HOPPER), pytest.warns(UntunedDeviceWarning, match="tuned on first use"):
        tuned = _choose(bench=bench, m=2048)
        assert ran and tuned["num_stages"] == 2
        assert kernel_autotune.config_source("fp8_gemm.tma.a0b0.faithful", version=cfgs.__version__,
                                             problem={"m": 2048, "n": 4096, "k": 4096}, dtypes=FP8_DTYPES,
                                             device=CPU, bucket=("m",)) == "tuned"


@pytest.mark.gpu
def test_the_shipped_configs_of_this_gpu_are_the_ones_used(tmp_path, monkeypatch):
    # every benchmark shape once, with an empty cache and no tuning: each kernel call whose problem has a shipped
    # entry for this GPU (name and compute capability) must have been served exactly that entry
    from kernel_autotune.testing import check_shipped_served
    from triton_ops_core.device import device_info

    monkeypatch.setenv("KERNEL_AUTOTUNE_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TRITON_OPS_AUTOTUNE", "0")
    served, shipped = check_shipped_served("fp8_gemm", torch.device("cuda"))
    print(f"\nfp8_gemm on {device_info().describe()}: {served} calls served from {shipped} shipped entries")
    if shipped == 0:
        pytest.skip(f"no shipped fp8_gemm entries for {device_info().name} yet "
                    "(python -m kernel_autotune tune --all --write-shipped writes them)")
    assert served > 0
