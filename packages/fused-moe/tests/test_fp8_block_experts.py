"""FP8 experts with 128x128 block scales (FP8 checkpoints' experts: transformers' ``FP8Experts``, DeepSeek-V3-style
``*_scale_inv``): ``moe_experts`` / ``fused_moe`` against a float64 reference of the dequantized weights, on the
tensor-core tiles, the CUDA-core tiles (one and two rows, the row layout), split K in the down GEMM, W8A8; the
scales' validation; the registered op. Sizes put the up half's rows across a block boundary (intermediate 144: up
starts 16 rows into the second block) and leave partial blocks along every dimension. Under the interpreter on
CPU, compiled on a GPU."""

from __future__ import annotations

import pytest
import torch
from _moe_helpers import TOL, f64, make_moe, to_layout
from fused_moe import MoEConfig, moe_experts, moe_experts_reference, moe_route, ops
from test_fp8_activations import w8a8_reference
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError
from triton_ops_core.testing import assert_close_rel, opcheck_op

EXPERTS = torch.ops.triton_ops.moe_experts.default
E4M3 = torch.float8_e4m3fn
BLOCK = 128
HIDDEN, INTER, NUM_EXPERTS = 200, 144, 5


def quantize_blocks(w: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E4M3 weight in w's layout, fp32 scales [E, ceil(out / 128), ceil(in / 128)])``: each 128x128 block's
    largest magnitude mapped to 448, as FP8 checkpoints quantize (the scale is the dequantization factor)."""
    wt = (w.transpose(1, 2) if transposed else w).float()  # [E, out, in], on w's device
    e, rows, cols = wt.shape
    pr, pc = -rows % BLOCK, -cols % BLOCK
    blocks = torch.nn.functional.pad(wt, (0, pc, 0, pr)).view(e, (rows + pr) // BLOCK, BLOCK, (cols + pc) // BLOCK,
                                                                BLOCK)
    amax = blocks.abs().amax(dim=(2, 4))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (wt / expand(scale, rows, cols)).clamp(-448, 448).to(E4M3)
    q = q.transpose(1, 2) if transposed else q
    return q.contiguous(), scale


def expand(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Block scales ``[E, R, C]`` to one per weight element ``[E, rows, cols]``."""
    return scale.repeat_interleave(BLOCK, 1)[:, :rows].repeat_interleave(BLOCK, 2)[:, :, :cols]


def dequant(q: torch.Tensor, scale: torch.Tensor, transposed: bool) -> torch.Tensor:
    """float64 on the CPU, in q's layout."""
    qt = (q.transpose(1, 2) if transposed else q).double().cpu()
    d = qt * expand(scale.double().cpu(), qt.shape[1], qt.shape[2])
    return d.transpose(1, 2) if transposed else d


def _operands(t: int, dtype: torch.dtype, device, transposed: bool, seed: int):
    x, rw, rb, w1, b1, w2, b2 = make_moe(t, HIDDEN, INTER, NUM_EXPERTS, dtype=dtype, device=device, seed=seed)
    w1, b1, w2 = to_layout(w1, b1, w2, "concatenated", transposed)
    (q1, s1), (q2, s2) = quantize_blocks(w1, transposed), quantize_blocks(w2, transposed)
    ids, wts = moe_route(x, rw, rb, 2)
    return x, ids, wts, (w1, b1, w2, b2), (q1, s1, q2, s2)


def _reference(x, ids, wts, b1, b2, q1, s1, q2, s2, transposed):
    xd, idd, wtd, b1d, b2d = f64(x, ids, wts, b1, b2)
    rounding = x.dtype if x.dtype != torch.float32 else None
    return moe_experts_reference(xd, idd, wtd, dequant(q1, s1, transposed), b1d, dequant(q2, s2, transposed), b2d,
                                 "silu", gate_up_layout="concatenated", transposed=transposed,
                                 round_intermediate=rounding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("t", [1, 9])
def test_block_scaled_experts_match_the_dequantized_reference(device, dtype, transposed, t):
    x, ids, wts, (w1, b1, w2, b2), (q1, s1, q2, s2) = _operands(t, dtype, device, transposed, 40 + t)
    out = moe_experts(x, ids, wts, q1, b1, q2, b2, "silu", gate_up_layout="concatenated", transposed=transposed,
                      gate_up_scale=s1, down_scale=s2)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_rel(out, _reference(x, ids, wts, b1, b2, q1, s1, q2, s2, transposed), TOL[dtype])
    # and close to the unquantized experts, within FP8's rounding of the weights
    full = moe_experts(x, ids, wts, w1, b1, w2, b2, "silu", gate_up_layout="concatenated", transposed=transposed)
    assert_close_rel(out, full.double().cpu(), 0.08)


@pytest.mark.parametrize("config", [
    MoEConfig(1, 16, 32, 16, 32, 4, 1, fma=True),  # one row on the CUDA cores, 32-deep K steps
    MoEConfig(2, 16, 64, 16, 64, 4, 1, fma=True),  # two rows
    MoEConfig(1, 16, 64, 16, 64, 4, 1, fma=True, row_layout=True),  # one row in the weight tile's layout
    MoEConfig(1, 16, 128, 16, 64, 4, 2, fma=True, row_layout=True),  # 128-deep gate/up steps (one token's, K-major)
    # tensor-core tiles: 32 gate/up columns become 16 (the up half starts 16 rows into a block), the down GEMM
    # split in 3 along K (its second and third splits start at 64 and 128: block columns 0 and 1)
    MoEConfig(16, 32, 64, 32, 64, 4, 1, down_split_k=3),
    MoEConfig(16, 64, 256, 256, 256, 4, 1),  # wider than a block: capped at 128 (K) and 128 / 16 (N)
], ids=["fma-row", "fma-two-rows", "row-layout", "row-layout-128", "dots-split-k", "dots-capped"])
def test_block_scales_on_every_tile(device, monkeypatch, config):
    monkeypatch.setattr(ops, "_config", lambda *a: config)
    ops.clear_caches()
    try:
        x, ids, wts, (_, b1, _, b2), (q1, s1, q2, s2) = _operands(7, torch.float32, device, False, 50)
        out = moe_experts(x, ids, wts, q1, b1, q2, b2, "silu", gate_up_layout="concatenated", transposed=False,
                          gate_up_scale=s1, down_scale=s2)
        assert_close_rel(out, _reference(x, ids, wts, b1, b2, q1, s1, q2, s2, False), TOL[torch.float32])
    finally:
        ops.clear_caches()


@pytest.mark.parametrize("transposed", [False, True])
def test_quantize_experts_fp8_makes_block_scales(device, transposed):
    # the package's block quantizer gives the checkpoint convention this file's own quantizer implements
    from fused_moe import quantize_experts_fp8

    _, _, _, (w1, _, w2, _), (q1, s1, q2, s2) = _operands(1, torch.float32, device, transposed, 30)
    w2 = w2.clone()
    w2[1].zero_()  # an all-zero expert: scale 1, codes 0
    q2, s2 = quantize_blocks(w2, transposed)
    got = quantize_experts_fp8(w1, w2, transposed=transposed, granularity="block")
    for a, b in zip(got, (q1, s1, q2, s2), strict=True):  # the same operations on the same device: the same bits
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
        assert torch.equal(a.float(), b.float())
    assert s1.shape == (NUM_EXPERTS, 3, 2) and torch.equal(s2[1].cpu(), torch.ones(2, 2))
    with pytest.raises(InvalidArgumentError, match="^granularity: expected one of"):
        quantize_experts_fp8(w1, w2, granularity="group")


def test_block_scales_for_tiles_stay_inside_one_block():
    # the host's caps: K steps inside a 128-deep block, gate/up tiles inside a block even where the up half starts
    # mid-block; no swapped W8A8 products
    cfg = MoEConfig(16, 64, 256, 256, 256, 4, 1, swap_ab=True)
    for inter, gate_up_n in ((768, 64), (144, 16), (176, 16), (160, 32)):
        got = ops._for_block_scales(cfg, inter)
        assert (got.gate_up_block_n, got.gate_up_block_k, got.down_block_n, got.down_block_k) == (
            gate_up_n, 128, 128, 128), inter
        assert not got.swap_ab
        assert (inter % 128) % got.gate_up_block_n == 0


def test_w8a8_with_block_scaled_experts(device):
    # E4M3 activations per row with block-scaled E4M3 experts: the reference quantizes the rows as the kernels do
    x, ids, wts, (_, b1, _, b2), (q1, s1, q2, s2) = _operands(6, torch.bfloat16, device, False, 60)
    out = moe_experts(x, ids, wts, q1, b1, q2, b2, "silu", gate_up_layout="concatenated", transposed=False,
                      gate_up_scale=s1, down_scale=s2, fp8_activations=True)
    ones1 = torch.ones(NUM_EXPERTS, 2 * INTER, dtype=torch.float64)
    ones2 = torch.ones(NUM_EXPERTS, HIDDEN, dtype=torch.float64)
    ref = w8a8_reference(x, ids, wts, dequant(q1, s1, False), ones1, b1, dequant(q2, s2, False), ones2, b2, "silu",
                         "concatenated", False)
    assert_close_rel(out, ref, 2e-2)


def test_nan_block_scale_reaches_only_the_tokens_of_its_expert(device):
    x, ids, wts, (_, b1, _, b2), (q1, s1, q2, s2) = _operands(9, torch.float32, device, False, 70)
    expert = int(ids[0, 0])
    s2 = s2.clone()
    s2[expert, 0, 1] = float("nan")  # down rows 0..127 of that expert, its K columns 128..143
    out = moe_experts(x, ids, wts, q1, b1, q2, b2, "silu", gate_up_layout="concatenated", transposed=False,
                      gate_up_scale=s1, down_scale=s2).cpu()
    hit = (ids.cpu() == expert).any(dim=1)
    assert out[hit][:, :128].isnan().all() and not out[hit][:, 128:].isnan().any()
    assert not out[~hit].isnan().any()


def test_block_scale_validation(device):
    x, ids, wts, (_, b1, _, b2), (q1, s1, q2, s2) = _operands(3, torch.float32, device, False, 80)

    def call(*, gate_up_scale=s1, down_scale=s2, layout="concatenated", gate_up=q1, down=q2):
        return moe_experts(x, ids, wts, gate_up, b1, down, b2, "silu", gate_up_layout=layout, transposed=False,
                           gate_up_scale=gate_up_scale, down_scale=down_scale)

    with pytest.raises(InvalidArgumentError, match="^gate_up_scale: 128x128 block scales go with the concatenated"):
        call(layout="interleaved")
    with pytest.raises(ShapeMismatchError, match=r"^gate_up_scale: expected size 3 in dimension 1"):
        call(gate_up_scale=s1[:, :2])
    with pytest.raises(ShapeMismatchError, match=r"^down_scale: expected 3 dimensions"):
        call(down_scale=torch.ones(NUM_EXPERTS, HIDDEN, device=device))  # per-column beside block scales
    with pytest.raises(InvalidArgumentError, match=r"^down_scale: FP8 expert weights need their fp32 scales, "
                                                   r"\[5, 2, 2\] \(128x128 block scales"):
        call(down_scale=None)
    # an intermediate size that is not a multiple of 16
    w1 = torch.zeros(NUM_EXPERTS, 2 * 40, HIDDEN, device=device).to(E4M3)
    w2 = torch.zeros(NUM_EXPERTS, HIDDEN, 40, device=device).to(E4M3)
    with pytest.raises(ShapeMismatchError, match="multiple of 16"):
        moe_experts(x, ids, wts, w1, None, w2, None, "silu", gate_up_layout="concatenated", transposed=False,
                    gate_up_scale=torch.ones(NUM_EXPERTS, 1, 2, device=device),
                    down_scale=torch.ones(NUM_EXPERTS, 2, 1, device=device))


def test_opcheck_and_compile_with_block_scales(device):
    x, ids, wts, (_, b1, _, b2), (q1, s1, q2, s2) = _operands(2, torch.float32, device, False, 90)
    opcheck_op(EXPERTS, (x, ids, wts, q1, b1, q2, b2, "silu", "concatenated", False, 1.702, 7.0, s1, s2))
    kw = {"gate_up_layout": "concatenated", "transposed": False, "gate_up_scale": s1, "down_scale": s2}
    eager = moe_experts(x, ids, wts, q1, b1, q2, b2, "silu", **kw)
    torch._dynamo.reset()
    fn = torch.compile(lambda x: moe_experts(x, ids, wts, q1, b1, q2, b2, "silu", **kw), fullgraph=True,
                       backend="aot_eager")
    assert torch.equal(fn(x), eager)


@pytest.mark.parametrize("transposed", [False, True])
def test_one_token_row_tile_asks_for_the_weights_layout(device, monkeypatch, transposed):
    # the plan hands configs.for_weights the token count, whether the gate/up weights are K-contiguous (Qwen3-MoE's
    # [E, 2I, H]: yes; [E, H, 2I]: no) and the norm prologue; the deeper steps it gives still match the reference
    from fused_moe import configs

    seen = []

    def spy(cfg, tokens, k_contiguous, norm):
        seen.append((tokens, k_contiguous, norm))
        return configs.for_weights(cfg, tokens, k_contiguous, norm)

    monkeypatch.setattr(ops, "_config", lambda *a: MoEConfig(1, 16, 32, 16, 32, 4, 2, fma=True, row_layout=True))
    monkeypatch.setattr(ops, "for_weights", spy)
    ops.clear_caches()
    try:
        x, ids, wts, (_, b1, _, b2), (q1, s1, q2, s2) = _operands(1, torch.float32, device, transposed, 61)
        out = moe_experts(x, ids, wts, q1, b1, q2, b2, "silu", gate_up_layout="concatenated", transposed=transposed,
                          gate_up_scale=s1, down_scale=s2)
        assert seen == [(1, not transposed, False)]
        assert_close_rel(out, _reference(x, ids, wts, b1, b2, q1, s1, q2, s2, transposed), TOL[torch.float32])
    finally:
        ops.clear_caches()
