"""The Gluon kernel's launch arithmetic (CPU): wgmma's warp grid and instruction width for the tiles the package
launches, and that the interpreter never routes a call to it (Gluon kernels do not run there)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton
from fp8_gemm import gemm, gemm_wgmma
from fp8_gemm import gemm_configs as cfgs
from triton_ops_core.device import is_interpreter
from triton_ops_core.testing import device_for_tests


@pytest.mark.parametrize(
    "block_m, block_n, warps, grid, n",
    [(128, 128, 8, [8, 1], 128), (64, 128, 4, [4, 1], 128), (64, 128, 8, [4, 2], 64), (128, 256, 8, [8, 1], 256),
     (64, 200, 4, [4, 1], 200), (64, 96, 8, [4, 2], 48)],
)
def test_warp_grid_and_instruction_width(block_m, block_n, warps, grid, n):
    assert gemm_wgmma.warps_per_cta(block_m, warps) == grid
    got = gemm_wgmma.instr_n(block_m, block_n, warps)
    assert got == n
    # an instruction is a multiple of 8 columns, divides each warp column's share, and is at most 256 wide
    assert got % 8 == 0 and got <= 256 and (block_n // grid[1]) % got == 0


def test_launch_args_follow_the_config():
    cfg = gemm_wgmma.one_partition_config()
    assert gemm_wgmma.launch_args(cfg) == (128, 128, cfg["GROUP_M"], cfg["STAGES"], 8, 128)
    small = {**cfg, "BLOCK_M": 64, "num_warps": 4}
    assert gemm_wgmma.launch_args(small)[4:] == (4, 128)


def test_tall_tiles_take_their_own_kernel():
    tall = {"BLOCK_M": 256, "BLOCK_N": 128, "GROUP_M": 16, "STAGES": 4, "num_warps": 8}
    assert gemm_wgmma.launch_args(tall) == (16, 4, False)
    assert gemm_wgmma.launch_args({**tall, "A_REGS": True}) == (16, 4, True)  # a in registers: asked for only
    assert all(not c.get("A_REGS") for c in cfgs.FP8_GEMM_WGMMA_CONFIGS.configs())
    assert gemm_wgmma.kernel_for(tall) is gemm_wgmma.fp8_scaled_gemm_wgmma_tall_kernel
    assert gemm_wgmma.kernel_for(gemm_wgmma.one_partition_config()) is gemm_wgmma.fp8_group_gemm_wgmma_kernel
    # the default (session 50): the persistent warp-specialized kernel
    assert gemm_wgmma.kernel_for(gemm_wgmma.default_config()) is gemm_wgmma.fp8_scaled_gemm_wgmma_pingpong_kernel
    assert gemm_wgmma.default_config()["PERSISTENT"]
    for bad in ({"BLOCK_N": 64}, {"num_warps": 4}):
        with pytest.raises(ValueError, match="256 x 128"):
            gemm_wgmma.launch_args({**tall, **bad})
    space = cfgs.FP8_GEMM_WGMMA_CONFIGS.configs()
    assert tall in space and {**tall, "STAGES": 5} not in space  # five stages overflow shared memory


def test_ping_pong_tiles_take_the_warp_specialized_kernel():
    pingpong = {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "STAGES": 4, "num_warps": 4, "PINGPONG": True}
    assert gemm_wgmma.kernel_for(pingpong) is gemm_wgmma.fp8_scaled_gemm_wgmma_pingpong_kernel
    assert gemm_wgmma.launch_args(pingpong) == (8, 4, gemm_wgmma.PINGPONG_REGS)
    # 12 warps (the 4-warp default partition and two consumer warp groups) within the 64K-register file
    assert gemm_wgmma.launch_options(pingpong) == {"maxnreg": gemm_wgmma.PINGPONG_MAXNREG}
    assert gemm_wgmma.PINGPONG_MAXNREG * 12 * 32 <= 65536 and 2 * 128 * gemm_wgmma.PINGPONG_REGS < 65536
    assert gemm_wgmma.launch_options(gemm_wgmma.one_partition_config()) == {}
    for bad in ({"BLOCK_N": 64}, {"BLOCK_M": 64}, {"num_warps": 8}):
        with pytest.raises(ValueError, match="ping-pong"):
            gemm_wgmma.launch_args({**pingpong, **bad})
    assert all(not c.get("PINGPONG") for c in cfgs.FP8_GEMM_WGMMA_CONFIGS.configs())  # explicit configs only

    # one program a tile, or (persistent) at most one an SM walking several
    assert gemm_wgmma.programs(pingpong, 512, 132) == 512
    persistent = {**pingpong, "PERSISTENT": True}
    assert gemm_wgmma.launch_args(persistent) == gemm_wgmma.launch_args(pingpong)
    assert gemm_wgmma.programs(persistent, 512, 132) == 132 and gemm_wgmma.programs(persistent, 69, 132) == 69
    assert gemm_wgmma.programs(persistent, 0, 132) == 1
    balanced = {**persistent, "BALANCED": True}  # 768 tiles: 6 waves of 132, spread as 128 programs of 6
    assert gemm_wgmma.programs(balanced, 768, 132) == 128 and gemm_wgmma.programs(persistent, 768, 132) == 132
    assert gemm_wgmma.programs(balanced, 69, 132) == 69 and gemm_wgmma.programs({**pingpong, "BALANCED": True}, 768,
                                                                                132) == 768
    with pytest.raises(ValueError, match="PERSISTENT"):
        gemm_wgmma.launch_args({**gemm_wgmma.one_partition_config(), "PERSISTENT": True})


def test_wgmma_plans_launch_one_program_a_tile_or_for_persistent_configs_one_an_sm():
    """The plan's grid (CPU tensors, an H100 record simulated: the plan is built, never launched)."""
    from triton_ops_core.device import DeviceInfo, simulate_device

    fp8 = torch.float8_e4m3fn
    m, n, k = 2048, 4096, 4096
    a = torch.zeros(m, k, dtype=fp8)
    b = torch.zeros(n, k, dtype=fp8).t()  # K-major [K, N], as FP8Linear's weight.t()
    a_s, b_s = torch.ones(m, k // 128), torch.ones(k // 128, n // 128)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    h100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), 132, 50 * 2**20, 227 * 1024, 3.0e3, True)
    pingpong = {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "STAGES": 4, "num_warps": 4, "PINGPONG": True}
    with simulate_device(h100):
        for cfg, grid in ((gemm_wgmma.one_partition_config(), 512), (pingpong, 512),
                          ({**pingpong, "PERSISTENT": True}, 132), (gemm_wgmma.default_config(), 132)):
            plan = gemm._wgmma_plan(a, b, out, a_s, b_s, None, gemm.A_BLOCK, gemm.B_BLOCK, cfg)
            assert plan.grid == (grid, 1, 1) and plan.info["path"] == "wgmma"
            assert plan.kernel is gemm_wgmma.kernel_for(cfg)


def test_per_channel_and_per_tensor_weights_plan_the_ping_pong_kernel_only():
    """The weight-scale constexpr each kernel gets (an H100 record simulated: plans built, never launched)."""
    from triton_ops_core.device import DeviceInfo, simulate_device

    fp8 = torch.float8_e4m3fn
    m, n, k = 512, 384, 1024
    a, b = torch.zeros(m, k, dtype=fp8), torch.zeros(n, k, dtype=fp8).t()
    out = torch.empty(m, n, dtype=torch.bfloat16)
    h100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), 132, 50 * 2**20, 227 * 1024, 3.0e3, True)
    b_mode_at = 10  # the tail: m, n, k, 3 strides, 2 activation-scale strides, the weight scale's row stride, A_MODE
    cases = [(gemm.A_ROW, torch.ones(m, 1), gemm.B_CHANNEL, torch.ones(1, n)),
             (gemm.A_TENSOR, torch.tensor(1.0), gemm.B_TENSOR, torch.tensor(1.0)),
             (gemm.A_BLOCK, torch.ones(m, k // 128), gemm.B_CHANNEL, torch.ones(1, n)),
             (gemm.A_BLOCK, torch.ones(m, k // 128), gemm.B_GROUP, torch.ones(k // 128, n)),
             (gemm.A_BLOCK, torch.ones(m, k // 128), gemm.B_BLOCK, torch.ones(k // 128, 3))]
    with simulate_device(h100):
        for a_mode, a_s, b_mode, b_s in cases:
            plan = gemm._wgmma_plan(a, b, out, a_s, b_s, None, a_mode, b_mode, gemm_wgmma.default_config())
            assert plan.kernel is gemm_wgmma.fp8_scaled_gemm_wgmma_pingpong_kernel
            assert plan.tail[b_mode_at - 1] == a_mode and plan.tail[b_mode_at] == b_mode  # B_MODE: every mode
            if b_mode in (gemm.B_TENSOR, gemm.B_CHANNEL):
                with pytest.raises(ValueError, match="ping-pong kernel only"):
                    gemm._wgmma_plan(a, b, out, a_s, b_s, None, a_mode, b_mode, gemm_wgmma.one_partition_config())
            else:  # the one-partition kernel's B_BLOCKS
                plan = gemm._wgmma_plan(a, b, out, a_s, b_s, None, a_mode, b_mode, gemm_wgmma.one_partition_config())
                assert plan.tail[b_mode_at] is (b_mode == gemm.B_BLOCK)
    # their tuning space holds ping-pong configs alone
    assert all(c["PINGPONG"] and c["BLOCK_M"] == c["BLOCK_N"] == 128 for c in cfgs.FP8_GEMM_PINGPONG_CONFIGS.configs())
    assert gemm_wgmma.default_config() in cfgs.FP8_GEMM_PINGPONG_CONFIGS.configs()


def test_one_stage_is_refused():
    # the loop waits for block kp + 1 before its first refill: with one slot that block would never arrive
    with pytest.raises(ValueError, match="STAGES"):
        gemm_wgmma.launch_args({**gemm_wgmma.one_partition_config(), "STAGES": 1})


@pytest.mark.skipif(not is_interpreter(), reason="checks the interpreter's routing")
def test_interpreter_never_takes_the_gluon_kernel():
    out = torch.empty(4, 4, dtype=torch.bfloat16)
    assert not gemm_wgmma.AVAILABLE
    scales = torch.ones(2, 4)
    assert not gemm._wgmma_takes(gemm.A_BLOCK, gemm.B_GROUP, out, scales)


def test_which_weight_scales_the_gluon_kernel_takes(monkeypatch):
    # as on a Hopper GPU with Gluon: group weights with TMA-readable scale rows by default; 128x128 blocks only
    # when asked for (path="wgmma") or with WGMMA_BLOCK_SCALES on; per-channel and per-tensor weights likewise
    # (WGMMA_CHANNEL_SCALES), with faithful accumulation only
    monkeypatch.setattr(gemm_wgmma, "AVAILABLE", True)
    monkeypatch.setattr(gemm, "WGMMA_BLOCK_SCALES", False)
    monkeypatch.setattr(gemm, "WGMMA_CHANNEL_SCALES", False)
    out = torch.empty(4, 256, dtype=torch.bfloat16)
    group, blocks = torch.ones(2, 256), torch.ones(2, 2)
    assert gemm._wgmma_takes(gemm.A_BLOCK, gemm.B_GROUP, out, group)
    assert not gemm._wgmma_takes(gemm.A_BLOCK, gemm.B_GROUP, out, torch.ones(2, 258)[:, :255])  # rows off 16 bytes
    assert not gemm._wgmma_takes(gemm.A_BLOCK, gemm.B_BLOCK, out, blocks)
    assert gemm._wgmma_takes(gemm.A_BLOCK, gemm.B_BLOCK, out, blocks, explicit=True)
    assert gemm._wgmma_takes(gemm.A_ROW, gemm.B_BLOCK, out, blocks, explicit=True)
    assert not gemm._wgmma_takes(gemm.A_BLOCK, gemm.B_BLOCK, out, blocks.t(), explicit=True)  # strided columns
    assert not gemm._wgmma_takes(gemm.A_BLOCK, gemm.B_BLOCK, out.to(torch.float8_e4m3fn), blocks, explicit=True)
    monkeypatch.setattr(gemm, "WGMMA_BLOCK_SCALES", True)
    assert gemm._wgmma_takes(gemm.A_BLOCK, gemm.B_BLOCK, out, blocks)
    channel, tensor = torch.ones(1, 256), torch.tensor(1.0)  # (a 0-dim per-tensor scale: no stride read)
    assert not gemm._wgmma_takes(gemm.A_ROW, gemm.B_CHANNEL, out, channel)
    assert gemm._wgmma_takes(gemm.A_ROW, gemm.B_CHANNEL, out, channel, explicit=True)
    assert gemm._wgmma_takes(gemm.A_TENSOR, gemm.B_TENSOR, out, tensor, explicit=True)
    assert not gemm._wgmma_takes(gemm.A_ROW, gemm.B_CHANNEL, out, channel, explicit=True, fast_accum=True)
    monkeypatch.setattr(gemm, "WGMMA_CHANNEL_SCALES", True)
    assert gemm._wgmma_takes(gemm.A_BLOCK, gemm.B_CHANNEL, out, channel)
    assert gemm._wgmma_takes(gemm.A_TENSOR, gemm.B_TENSOR, out, tensor)
    assert not gemm._wgmma_takes(gemm.A_TENSOR, gemm.B_TENSOR, out, tensor, fast_accum=True)


@pytest.mark.parametrize("setting, expected", [(None, "True"), ("0", "False"), ("1", "True")])
def test_environment_switch_turns_the_gluon_kernel_off(setting, expected):
    # outside the interpreter (a fresh process: the flag is read at import)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_OPS_GLUON")}
    if setting is not None:
        env["TRITON_OPS_GLUON"] = setting
    code = "from fp8_gemm import gemm_wgmma; print(gemm_wgmma.AVAILABLE)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if gemm_wgmma.fp8_group_gemm_wgmma_kernel is None or not triton.__version__.startswith(gemm_wgmma.VALIDATED_TRITON):
        expected = "False"  # this Triton has no Gluon Hopper module, or is not one the kernel was validated with
    assert out.stdout.strip().splitlines()[-1] == expected


def test_config_space_holds_the_default_and_only_tiles_that_fit():
    space = cfgs.FP8_GEMM_WGMMA_CONFIGS.configs()
    assert gemm_wgmma.one_partition_config() in space and gemm_wgmma.default_config() not in space
    for cfg in space:  # a warp group per 64 rows (two for 256-row tiles), a ring of at least two slots
        assert cfg["num_warps"] == min(cfg["BLOCK_M"] // 16, 8) and cfg["STAGES"] >= 2
        gemm_wgmma.launch_args(cfg)
    assert {c["BLOCK_M"] for c in space} == {64, 128, 256}


def test_selection_falls_back_to_the_default_config():
    # nothing cached or shipped for this problem: kernel-autotune answers with gemm_wgmma.default_config
    dtypes = (torch.float8_e4m3fn, torch.float8_e4m3fn, torch.bfloat16)
    got = gemm._choose("wgmma", 2048, 4096, 4096, gemm.A_BLOCK, gemm.B_GROUP, False, torch.device("cpu"), dtypes, True)
    assert got == gemm_wgmma.default_config()


def test_tuning_family_prepares_the_default_recipes_prefill():
    from fp8_gemm import tuning

    groups = [s for s in tuning.SHAPES if s["scaling"] == "group"]
    assert {(s["n"], s["k"]) for s in groups} == {(6144, 4096), (4096, 4096), (14336, 4096), (4096, 14336)}
    out = tuning.prepare({"m": 70, "n": 32, "k": 256, "scaling": "group", "out_dtype": "float32"},
                         torch.device(device_for_tests()))()
    assert out.shape == (70, 32) and out.isfinite().all()
