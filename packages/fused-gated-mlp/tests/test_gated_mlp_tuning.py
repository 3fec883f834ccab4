"""This package's kernel-autotune family (found by name, its shapes, a prepared call that runs the kernel), and config
selection keyed by the device: the H100's measured table serves the H100 only, the heuristic reads the device's
properties, an untuned GPU is announced once (GPUs simulated on the CPU)."""

from __future__ import annotations

import kernel_autotune
import pytest
import torch
from fused_gated_mlp import configs
from kernel_autotune import UntunedDeviceWarning
from kernel_autotune.select import reset_warnings
from kernel_autotune.testing import H100_SXM, H200, SMALL_GPU, UNTUNED_HOPPER, check_family
from triton_ops_core.device import simulate_device


def test_the_family_is_found_and_runs(device):
    small = {"tokens": 2, "hidden": 32, "intermediate": 16, "dtype": "float32"}
    tunable = check_family("fused_gated_mlp", "fused-gated-mlp", small, device)
    out = tunable.prepare({**small, "gpt_oss": 1}, device)()  # the gpt-oss expert's call
    assert out.shape == (2, 16) and torch.isfinite(out.float()).all()
    assert "gpt-oss expert" in tunable.label({**small, "gpt_oss": 1})


CPU = torch.device("cpu")


def test_the_h100_table_serves_the_h100_only():
    # (M <= 16, 6144 -> 22528): the H100's sweep found 64 x 256 tiles, 3 stages; the rule says 32 x 128, 4 stages
    with simulate_device(H100_SXM):
        h100 = configs.heuristic_config(1, 6144, 22528, torch.bfloat16, CPU)
    with simulate_device(UNTUNED_HOPPER):  # same SM count and capability, another GPU: the rules, not the H100's table
        h200 = configs.heuristic_config(1, 6144, 22528, torch.bfloat16, CPU)
    assert (h100["BLOCK_N"], h100["BLOCK_K"], h100["num_stages"]) == (64, 256, 3)
    assert (h200["BLOCK_N"], h200["BLOCK_K"], h200["num_stages"]) == (32, 128, 4)


def test_the_heuristic_reads_sm_count_and_shared_memory():
    # few column tiles (1024 / 32 = 32) for 132 SMs: split K; for 28 SMs they are plenty
    with simulate_device(UNTUNED_HOPPER):
        assert configs.heuristic_config(1, 4096, 1024, torch.bfloat16, CPU)["SPLIT_K"] == 3
        prefill = configs.heuristic_config(2048, 4096, 11264, torch.bfloat16, CPU)
        assert prefill["num_stages"] == 4 and configs.space_for(CPU) is configs.GATED_MLP_CONFIGS
    with simulate_device(SMALL_GPU):  # 28 SMs, 99 KB of shared memory per block
        assert configs.heuristic_config(1, 4096, 1024, torch.bfloat16, CPU)["SPLIT_K"] == 1
        prefill = configs.heuristic_config(2048, 4096, 11264, torch.bfloat16, CPU)
        assert configs._pipeline_bytes(prefill) <= 99 * 1024 and prefill["num_stages"] == 2
        space = configs.space_for(CPU)
        problem = {"tokens": 2048, "hidden": 4096, "intermediate": 11264}
        assert prefill in space.configs(problem)
        assert all(configs._pipeline_bytes(c) <= 99 * 1024 for c in space.configs(problem))


def test_an_untuned_gpu_is_announced_once_and_uses_the_heuristic(monkeypatch):
    monkeypatch.setenv("TRITON_OPS_AUTOTUNE", "0")
    reset_warnings()
    with simulate_device(UNTUNED_HOPPER), pytest.warns(UntunedDeviceWarning) as record:
        for m in (1, 2048):
            cfg = configs.select_gated_mlp_config(m, 4096, 11264, torch.bfloat16, CPU)
            assert cfg == configs.heuristic_config(m, 4096, 11264, torch.bfloat16, CPU)
    text = [str(w.message) for w in record if issubclass(w.category, UntunedDeviceWarning)]
    assert len(text) == 1 and "fused_gated_mlp has no tuned configs for Simulated untuned Hopper GPU" in text[0]
    assert "python -m kernel_autotune tune fused_gated_mlp" in text[0]
    with simulate_device(H100_SXM):  # the shipped H100 entry is served (prefill 2048 x 4096 -> 11264)
        assert configs.select_gated_mlp_config(2048, 4096, 11264, torch.bfloat16, CPU)["num_stages"] == 4
        src = kernel_autotune.config_source("fused_gated_mlp.fwd", version=configs.__version__,
                                            problem={"tokens": 2048, "hidden": 4096, "intermediate": 11264},
                                            dtypes=(torch.bfloat16,), device=CPU, bucket=("tokens",))
        assert src == "shipped"
    reset_warnings()


@pytest.mark.gpu
def test_the_shipped_configs_of_this_gpu_are_the_ones_used(tmp_path, monkeypatch):
    # every benchmark shape once, with an empty cache and no tuning: each kernel call whose problem has a shipped
    # entry for this GPU (name and compute capability) must have been served exactly that entry
    from kernel_autotune.testing import check_shipped_served
    from triton_ops_core.device import device_info

    monkeypatch.setenv("KERNEL_AUTOTUNE_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TRITON_OPS_AUTOTUNE", "0")
    served, shipped = check_shipped_served("fused_gated_mlp", torch.device("cuda"))
    print(f"\nfused_gated_mlp on {device_info().describe()}: {served} calls served from {shipped} shipped entries")
    if shipped == 0:
        pytest.skip(f"no shipped fused_gated_mlp entries for {device_info().name} yet "
                    "(python -m kernel_autotune tune --all --write-shipped writes them)")
    assert served > 0


def test_fp8_channel_weights_at_one_or_two_rows_take_the_cuda_core_tiles():
    for tokens, block_k in ((1, 512), (2, 256)):
        cfg = configs.heuristic_config(tokens, 4096, 14336, torch.bfloat16, CPU, weights="fp8_channel")
        assert cfg["FMA"] and (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) == (tokens, 8, block_k)
        chosen = configs.select_gated_mlp_config(tokens, 4096, 14336, torch.bfloat16, CPU, weights="fp8_channel")
        assert chosen == cfg
    # group and 128x128 block scales: the CUDA-core tile at one row on every shape; at two rows only where
    # 32-column tensor-core tiles leave SMs idle (gpt-oss-20b's 2880 columns)
    for weights in ("fp8_group", "fp8_block"):
        for hidden, inter in ((2880, 2880), (4096, 12288), (4096, 14336)):
            cfg = configs.heuristic_config(1, hidden, inter, torch.bfloat16, CPU, weights=weights)
            assert cfg["FMA"] and (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) == (1, 8, 512), inter
        cfg = configs.heuristic_config(2, 2880, 2880, torch.bfloat16, CPU, weights=weights)
        assert cfg["FMA"] and (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) == (2, 8, 256)
        cfg = configs.heuristic_config(2, 4096, 14336, torch.bfloat16, CPU, weights=weights)
        assert not cfg.get("FMA") and cfg["BLOCK_M"] == 16
    # three rows, bf16 weights: tensor-core tiles of 16+ rows
    for tokens, weights in ((3, "fp8_channel"), (3, "fp8_group"), (3, "fp8_block"), (1, "same")):
        cfg = configs.heuristic_config(tokens, 4096, 14336, torch.bfloat16, CPU, weights=weights)
        assert not cfg.get("FMA") and cfg["BLOCK_M"] == 16, (tokens, weights)
    with pytest.raises(configs.InvalidArgumentError, match=r"^weights: expected one of same, fp8_channel"):
        configs.heuristic_config(1, 4096, 14336, torch.bfloat16, CPU, weights="fp8")


def test_fp8_channel_group_and_block_weights_at_3_to_16_rows_take_fp16_tensor_core_dots():
    # the 16-row tensor-core tile with F16_DOT: 64 columns where they fill the SMs (Llama-3-8B, Qwen3-8B), else 32
    # with split-K (gpt-oss-20b's 2880 columns); group and block scales keep one 128-wide scale group a K step
    for tokens in (3, 8, 16):
        for (hidden, inter), weights, tile in (
                ((4096, 14336), "fp8_channel", (64, 256, 1)), ((4096, 12288), "fp8_group", (64, 128, 1)),
                ((4096, 14336), "fp8_block", (64, 128, 1)), ((2880, 2880), "fp8_block", (32, 128, 4)),
                ((2880, 2880), "fp8_channel", (32, 128, 4)), ((2880, 2880), "fp8_group", (32, 128, 4))):
            cfg = configs.heuristic_config(tokens, hidden, inter, torch.bfloat16, CPU, weights=weights)
            assert cfg["F16_DOT"] and not cfg.get("FMA"), (tokens, inter, weights)
            assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]) == (16, *tile), cfg
    # not for 17+ rows or bf16 weights
    for tokens, weights in ((17, "fp8_channel"), (17, "fp8_block"), (8, "same")):
        assert not configs.heuristic_config(tokens, 4096, 14336, torch.bfloat16, CPU, weights=weights).get("F16_DOT")


def test_the_h200_fp8_table_serves_fp8_channel_weights_on_the_h200_only():
    # M = 64 on Qwen3-8B's MLP: the H200 sweep's 64 x 64 x 128 tile (90.9 -> 69.9 us); bf16 weights, block scales
    # and another GPU keep the bf16-derived choice (32 columns)
    with simulate_device(H200):
        assert configs.heuristic_config(64, 4096, 12288, torch.bfloat16, CPU, weights="fp8_channel")["BLOCK_N"] == 64
        for weights in ("same", "fp8_block"):
            assert configs.heuristic_config(64, 4096, 12288, torch.bfloat16, CPU, weights=weights)["BLOCK_N"] == 32
    with simulate_device(H100_SXM):
        assert configs.heuristic_config(64, 4096, 12288, torch.bfloat16, CPU, weights="fp8_channel")["BLOCK_N"] == 32
