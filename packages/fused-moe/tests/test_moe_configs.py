"""The MoE launch heuristic reads the device's properties (SM count, shared memory per block): GPUs simulated on the
CPU with ``triton_ops_core.device.simulate_device``."""

from __future__ import annotations

import pytest
import torch
from fused_moe import MoEConfig, select_config
from fused_moe.configs import FP8_FMA_TILE, FP8_FMA_TILE_NARROW, FP8_ROW_TILE_ONE_TOKEN
from triton_ops_core.device import DeviceInfo, simulate_device

HOPPER = DeviceInfo("NVIDIA H200", (9, 0), 132, 60 * 2**20, 227 * 1024, 4300.0, True, "simulated")
SMALL = DeviceInfo("Simulated small GPU", (8, 6), 28, 4 * 2**20, 99 * 1024, 400.0, True, "simulated")
GPT_OSS = dict(top_k=4, hidden=2880, intermediate=2880, num_experts=32)


@pytest.fixture(autouse=True)
def fresh():
    select_config.cache_clear()
    yield
    select_config.cache_clear()


def cfg(tokens: int, on_gpu=True) -> MoEConfig:
    return select_config(tokens, GPT_OSS["top_k"], GPT_OSS["hidden"], GPT_OSS["intermediate"],
                         GPT_OSS["num_experts"], on_gpu)


def stage_bytes(c: MoEConfig) -> int:
    return (c.block_m + 2 * c.gate_up_block_n) * max(c.gate_up_block_k, c.down_block_k) * 2


def test_hopper_gets_the_tiles_measured_on_the_h200():
    with simulate_device(HOPPER):
        # 2880 = 45 x 64: K steps of 64; 4 experts: narrow gate/up tiles, the down GEMM split in two along K
        assert cfg(1) == MoEConfig(16, 32, 64, 64, 64, 4, 4, down_split_k=2)
        assert cfg(8) == MoEConfig(16, 64, 64, 64, 64, 4, 4)  # 32 experts hit: wide column tiles
        assert cfg(64) == MoEConfig(16, 64, 64, 64, 64, 4, 4)  # 16-row tiles, several per busy expert
        assert cfg(2048) == MoEConfig(64, 64, 64, 128, 64, 8, 3)
        assert cfg(64, on_gpu=torch.device("cuda", 0)) == cfg(64)  # the device itself may be passed


def test_fp8_experts_take_one_row_cuda_core_tiles_from_one_to_eight_tokens():
    def fp8(tokens):
        return select_config(tokens, GPT_OSS["top_k"], GPT_OSS["hidden"], GPT_OSS["intermediate"],
                             GPT_OSS["num_experts"], True, 1)

    with simulate_device(HOPPER):
        # one token: the row layout, gate/up columns narrowed to 32 (4 experts x 2880 / 32 = 360 programs)
        assert fp8(1) == FP8_ROW_TILE_ONE_TOKEN._replace(gate_up_block_n=32, down_split_k=3) and cfg(1).fma is False
        assert fp8(1).row_layout and not any(fp8(tokens).row_layout for tokens in range(2, 9))
        assert fp8(4) == FP8_FMA_TILE_NARROW and fp8(2) == FP8_FMA_TILE_NARROW._replace(down_split_k=2)
        assert fp8(5) == FP8_FMA_TILE._replace(num_stages=6)
        assert fp8(8) == FP8_FMA_TILE._replace(down_split_k=3)
        assert all(fp8(tokens).fma and fp8(tokens).block_m == 1 for tokens in range(1, 9))
        assert fp8(9) == cfg(9) and not fp8(9).fma
        assert cfg(8).fma is False  # bf16 experts keep the dot


def test_one_token_gate_up_columns_give_two_waves_of_programs():
    with simulate_device(HOPPER):  # 132 SMs
        # Qwen3-30B-A3B: 8 experts x 768 / 16 = 384 programs (32 columns: 192, under two waves)
        qwen = select_config(1, 8, 2048, 768, 128, True, 1)
        assert qwen.row_layout and qwen.gate_up_block_n == 16 and qwen.down_split_k == 3
        # Mixtral-like: 2 experts x 14336 / 64 = 448 programs: the widest tile
        assert select_config(1, 2, 4096, 14336, 8, True, 1).gate_up_block_n == 64
        # never narrower than 16 columns, however few the programs
        assert select_config(1, 1, 64, 64, 4, True, 1).gate_up_block_n == 16
        # bf16 experts keep their tiles
        assert not select_config(1, 8, 2048, 768, 128, True, 2).row_layout


def test_a_smaller_gpu_gets_tiles_that_fit_and_fill_it():
    with simulate_device(SMALL):
        decode = cfg(64)
        assert decode.num_stages * stage_bytes(decode) <= SMALL.smem_per_block
        # 32 experts hit x 45 column tiles of 64 fill two waves of 28 SMs: the wide tile stays
        assert decode.gate_up_block_n == 64
    narrow_gpu_wide = DeviceInfo("Simulated wide GPU", (9, 0), 1024, 60 * 2**20, 227 * 1024, 8000.0, True, "sim")
    select_config.cache_clear()
    with simulate_device(narrow_gpu_wide):  # 1440 programs of 64 columns are under two waves of 1024 SMs: narrower
        assert cfg(64).gate_up_block_n == 32


def test_the_interpreter_ignores_the_device():
    with simulate_device(SMALL):
        assert cfg(3, on_gpu=False) == cfg(3, on_gpu=torch.device("cpu"))
        assert cfg(3, on_gpu=False).num_stages == 1


def test_one_row_tiles_only_while_each_expert_hit_gets_one_or_two_rows():
    with simulate_device(HOPPER):
        # Mixtral-like: 8 experts, top 2. 8 tokens: 16 pairs over 8 experts (2 rows each): one-row tiles
        assert select_config(8, 2, 4096, 14336, 8, True, 1).fma
        # 4 experts, top 2, 8 tokens: 4 rows per expert would read each expert's weights 4 times
        assert not select_config(8, 2, 4096, 14336, 4, True, 1).fma


def test_the_down_split_never_exceeds_the_k_steps():
    with simulate_device(HOPPER):
        one_step = select_config(1, 4, 2880, 64, 32, True)  # intermediate 64: one K step of 64
        assert one_step.down_split_k == 1
        assert select_config(1, 4, 2880, 2880, 32, True).down_split_k == 2
        assert select_config(2, 4, 2880, 32, 32, True, 1).down_split_k == 1  # FMA tile: one K step of 32


def test_the_ops_ask_for_fp8_tiles_with_fp8_experts(monkeypatch, device):
    from _moe_helpers import make_moe
    from fused_moe import moe_experts, moe_route, ops, quantize_experts_fp8

    seen = []

    def spy(*args):
        seen.append(args)
        return MoEConfig(16, 16, 32, 16, 32, 4, 1)  # (K steps of 32: Hopper's FP8 dot takes no fewer)

    spy.cache_clear = lambda: None  # clear_caches() clears select_config's memo
    ops.clear_caches()
    monkeypatch.setattr(ops, "select_config", spy)
    x, rw, rb, w1, b1, w2, b2 = make_moe(3, 32, 16, 4, device=device, seed=1)
    q1, s1, q2, s2 = quantize_experts_fp8(w1, w2)
    ids, wts = moe_route(x, rw, rb, 2)
    moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=s1, down_scale=s2)
    moe_experts(x, ids, wts, w1, b1, w2, b2)
    moe_experts(x, ids, wts, q1, b1, q2, b2, gate_up_scale=s1, down_scale=s2, fp8_activations=True)
    ops.clear_caches()
    # FP8 experts: 1-byte weights; then fp32 ones; then W8A8's tiles
    assert [args[-2:] for args in seen] == [(1, False), (4, False), (1, True)]


def test_one_token_row_tile_steps_a_line_deep_over_k_contiguous_gate_up_weights():
    # configs.for_weights: K-contiguous gate/up weights (Qwen3-MoE's [E, 2I, H]) take 128-deep K steps at one token,
    # unless the RMSNorm prologue feeds the gate/up GEMM; N-contiguous ones (gpt-oss) and other tiles keep theirs
    from fused_moe.configs import ONE_TOKEN_K_MAJOR_GATE_UP_K, for_weights

    with simulate_device(HOPPER):
        one = select_config(1, 8, 2048, 768, 128, True, 1)
        eight = select_config(8, 8, 2048, 768, 128, True, 1)
    assert one.row_layout and one.gate_up_block_k < ONE_TOKEN_K_MAJOR_GATE_UP_K
    deeper = for_weights(one, 1, gate_up_k_contiguous=True, norm_prologue=False)
    assert deeper == one._replace(gate_up_block_k=ONE_TOKEN_K_MAJOR_GATE_UP_K)
    assert deeper.down_block_k == one.down_block_k
    assert for_weights(one, 1, gate_up_k_contiguous=False, norm_prologue=False) == one
    assert for_weights(one, 1, gate_up_k_contiguous=True, norm_prologue=True) == one
    assert for_weights(eight, 8, gate_up_k_contiguous=True, norm_prologue=False) == eight
    assert for_weights(one, 2, gate_up_k_contiguous=True, norm_prologue=False) == one  # (a row tile forced at two)
