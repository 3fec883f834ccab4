"""fused_gated_mlp(..., norm_weight=): the RMSNorm in the decode kernel (a decoder layer's post-attention norm inside
the gated MLP's launch, deferred: each x tile times the norm weight, the rows' squares summed alongside, both sums
times the row's ``rstd`` at the end). Every decode variant (tensor-core dots with split K, TMA, CUDA-core tiles of
one and more rows, FP8 channel / block / group scales) gives what the same kernel gives on the input normalized
outside (``triton_ops_core.rms_prologue``'s helpers in a launch of their own), up to that input's rounding to x's
dtype, and matches a float64 reference; errors, the op, and the gradient path. (Against
``fused_rmsnorm_rope.rmsnorm`` itself: the umbrella's test_norm_prologue.py.)"""

from __future__ import annotations

import pytest
import torch
from _fp8_gated_mlp_helpers import act_mul64, fp8_operands
from fused_gated_mlp import fused_gated_mlp
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError
from triton_ops_core.testing import assert_close_rel, normalized_like_the_prologue, opcheck_op

OP = torch.ops.triton_ops.fused_gated_mlp.default

DECODE_SPLIT3 = {"path": "decode", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 3, "num_warps": 4,
                 "num_stages": 2}
CONFIGS = {
    "heuristic": None,
    "dot-splitk": DECODE_SPLIT3,
    "tma": {**DECODE_SPLIT3, "SPLIT_K": 1, "BLOCK_K": 64, "USE_TMA": True},
    "fma-splitk": {**DECODE_SPLIT3, "BLOCK_M": 8, "BLOCK_K": 64, "FMA": True},
    "fma-row": {**DECODE_SPLIT3, "BLOCK_M": 1, "BLOCK_K": 128, "SPLIT_K": 1, "FMA": True},
    "fma-wide": {**DECODE_SPLIT3, "BLOCK_M": 2, "BLOCK_K": 256, "SPLIT_K": 1, "FMA": True},
}


def rmsnorm_like_the_kernel(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The normalized rows as the prologue's own helpers write them (``normalized_like_the_prologue``); float64
    inputs: in torch."""
    if x.dtype == torch.float64:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    return normalized_like_the_prologue(x, weight, eps)


def _row_values(m: int, hidden: int, gen: torch.Generator) -> torch.Tensor:
    """Random rows far from unit RMS (the normalization matters), off-centre, with a few large entries."""
    rows = torch.randn(m, hidden, generator=gen) * 3 + 0.5
    rows[:, ::17] *= 8
    return rows


def _norm_weight(hidden: int, dtype: torch.dtype, device, gen) -> torch.Tensor:
    return (torch.rand(hidden, generator=gen) + 0.5).to(device, dtype)


def _bf16_weights(inter, hidden, dtype, device, gen):
    wg = (torch.randn(inter, hidden, generator=gen) * hidden ** -0.5).to(device, dtype)
    wu = (torch.randn(inter, hidden, generator=gen) * hidden ** -0.5).to(device, dtype)
    return (wg, wu), {}, wg.double().cpu(), wu.double().cpu()


# fp16 activations on every tile and weight kind, fp32 on a few (the interpreter's fp32 -> bf16 cast truncates
# where a GPU rounds: bf16 is checked on the GPU and, against rmsnorm, in the umbrella's test_norm_prologue.py)
CASES = [(torch.float16, config, weights) for config in sorted(CONFIGS)
         for weights in ("x-dtype", "channel", "block", "group")]
CASES += [(torch.float32, config, weights) for config in ("heuristic", "fma-row", "dot-splitk")
          for weights in ("x-dtype", "group")]


# The kernel feeds its products ``x * w`` in fp32 (rounded to x's dtype only for a tensor-core dot) and scales the
# sums by ``rstd``; normalized outside, the input is rounded to x's dtype first: one rounding of the input apart
# (bf16: 2^-9 relative at most per element, fp16 2^-12), plus the output's own rounding.
WITHIN_ONE_ROUNDING = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_within_one_rounding(fused: torch.Tensor, outside: torch.Tensor, what) -> None:
    """``fused`` (the norm in the kernel) against ``outside`` (the input normalized by a launch of its own): finite
    where it is, and within the rounding of the normalized input (``WITHIN_ONE_ROUNDING``)."""
    assert torch.equal(torch.isfinite(fused), torch.isfinite(outside)), what
    assert_close_rel(fused, outside, WITHIN_ONE_ROUNDING[fused.dtype])


@pytest.mark.parametrize(("dtype", "config", "weights"), CASES,
                         ids=[f"{str(d)[6:]}-{c}-{w}" for d, c, w in CASES])
def test_prologue_equals_the_kernel_on_the_input_normalized_outside(device, config, weights, dtype):
    hidden, inter = 300, 40  # three 128-wide K blocks, the last partial; several column tiles
    gen = torch.Generator().manual_seed(sum(map(ord, config + weights)) + dtype.itemsize)
    cfg = CONFIGS[config]
    if weights == "x-dtype":
        args, kwargs, wg64, wu64 = _bf16_weights(inter, hidden, dtype, device, gen)
    else:
        args, kwargs, wg64, wu64 = fp8_operands(inter, hidden, "separate", weights, gen, device=device)
        if dtype == torch.float32 and cfg is not None and cfg.get("USE_TMA"):
            pytest.skip("FP8 weights with fp32 activations take no TMA tile")
    norm_w = _norm_weight(hidden, dtype, device, gen)
    for m in (1, 3, 17):
        x = _row_values(m, hidden, gen).to(device, dtype)
        fused = fused_gated_mlp(x, *args, "silu", **kwargs, config=cfg, norm_weight=norm_w, norm_eps=1e-5)
        outside = fused_gated_mlp(rmsnorm_like_the_kernel(x, norm_w, 1e-5), *args, "silu", **kwargs, config=cfg)
        assert_within_one_rounding(fused, outside, (config, weights, m))
        x64 = rmsnorm_like_the_kernel(x.double().cpu(), norm_w.double().cpu(), 1e-5)
        want = act_mul64(x64 @ wg64.T, x64 @ wu64.T, "silu")
        assert_close_rel(fused, want, 2e-2 if dtype == torch.float16 else 1e-4)
        assert not torch.equal(fused, fused_gated_mlp(x, *args, "silu", **kwargs, config=cfg))


def test_prologue_on_a_packed_weight_with_biases_and_more_rows_than_decode(device):
    # gpt-oss's layout (interleaved, biases, swiglu_oai) and 70 rows: past DECODE_MAX_TOKENS the decode kernel still
    # runs (the prologue is its own), with the config chosen for the most rows it is made for
    gen = torch.Generator().manual_seed(5)
    hidden, inter = 96, 24
    w = (torch.randn(2 * inter, hidden, generator=gen) * hidden ** -0.5).to(device)
    b = torch.randn(2 * inter, generator=gen).to(device)
    norm_w = _norm_weight(hidden, torch.float32, device, gen)
    for m in (2, 70):
        x = torch.randn(m, hidden, generator=gen).to(device) * 2
        kw = dict(gate_bias=b, weight_layout="interleaved")
        fused = fused_gated_mlp(x, w, None, "swiglu_oai", **kw, norm_weight=norm_w, norm_eps=1e-6)
        outside = fused_gated_mlp(rmsnorm_like_the_kernel(x, norm_w, 1e-6), w, None, "swiglu_oai", **kw)
        assert_close_rel(fused, outside, 1e-5)


def test_nan_in_a_row_stays_in_that_row(device):
    gen = torch.Generator().manual_seed(6)
    (wg, wu), _, _, _ = _bf16_weights(32, 64, torch.float32, device, gen)
    x = torch.randn(3, 64, generator=gen).to(device)
    x[1, 5] = float("nan")
    out = fused_gated_mlp(x, wg, wu, norm_weight=torch.ones(64, device=device))
    assert out[1].isnan().all() and torch.isfinite(out[[0, 2]]).all()


def test_bad_norm_arguments_are_named(device):
    x = torch.randn(2, 64, device=device)
    wg, wu = torch.randn(32, 64, device=device), torch.randn(32, 64, device=device)
    with pytest.raises(ShapeMismatchError, match="norm_weight"):
        fused_gated_mlp(x, wg, wu, norm_weight=torch.ones(32, device=device))
    with pytest.raises(ShapeMismatchError, match="norm_weight"):
        fused_gated_mlp(x, wg, wu, norm_weight=torch.ones(64, 2, device=device)[:, 0])  # strided
    with pytest.raises(InvalidArgumentError, match="norm_eps"):
        fused_gated_mlp(x, wg, wu, norm_weight=torch.ones(64, device=device), norm_eps=-1.0)
    with pytest.raises(InvalidArgumentError, match="norm_eps"):
        fused_gated_mlp(x, wg, wu, norm_weight=torch.ones(64, device=device), norm_eps=float("inf"))
    with pytest.raises(InvalidArgumentError, match="norm_eps"):  # rmsnorm's rule: a zero row would give NaN
        fused_gated_mlp(x, wg, wu, norm_weight=torch.ones(64, device=device), norm_eps=0.0)
    ones = torch.ones(64, device=device)
    fused_gated_mlp(x, wg, wu, norm_weight=ones, norm_eps=1)  # an int is a number ...
    with pytest.raises(InvalidArgumentError, match="norm_eps"):  # ... a bool is not, after it as before it
        fused_gated_mlp(x, wg, wu, norm_weight=ones, norm_eps=True)
    # the differentiable path refuses what the kernel's path refuses (no broadcast of a wrong weight)
    xg = x.clone().requires_grad_()
    with pytest.raises(ShapeMismatchError, match="norm_weight"):
        fused_gated_mlp(xg, wg, wu, norm_weight=torch.ones(1, device=device))
    with pytest.raises(InvalidArgumentError, match="norm_eps"):
        fused_gated_mlp(xg, wg, wu, norm_weight=ones, norm_eps=-1.0)
    with pytest.raises(InvalidArgumentError, match="decode kernel"):
        fused_gated_mlp(x, wg, wu, norm_weight=torch.ones(64, device=device),
                        config={**DECODE_SPLIT3, "path": "prefill"})


def test_op_opcheck_compile_and_gradient(device):
    gen = torch.Generator().manual_seed(7)
    (wg, wu), _, _, _ = _bf16_weights(24, 64, torch.float32, device, gen)
    x = torch.randn(2, 64, generator=gen).to(device)
    norm_w = _norm_weight(64, torch.float32, device, gen)
    expected = fused_gated_mlp(x, wg, wu, norm_weight=norm_w, norm_eps=1e-5)
    opcheck_op(OP, (x, wg, wu, None, None, "silu", "separate", 1.702, 7.0, None, None, None, norm_w, 1e-5))
    fn = torch.compile(lambda x: fused_gated_mlp(x, wg, wu, norm_weight=norm_w, norm_eps=1e-5), fullgraph=True,
                       backend="aot_eager")
    assert torch.equal(fn(x), expected)
    # a gradient to record: the norm in torch, differentiable; the values agree with the prologue's
    xg = x.clone().requires_grad_()
    wn = norm_w.clone().requires_grad_()
    out = fused_gated_mlp(xg, wg, wu, norm_weight=wn, norm_eps=1e-5)
    out.sum().backward()
    assert_close_rel(out.detach(), expected, 1e-5)
    assert xg.grad is not None and wn.grad is not None and torch.isfinite(xg.grad).all()
    # the op itself with a norm weight has no backward: a named error, not a wrong gradient
    with pytest.raises(InvalidArgumentError, match="no backward"):
        OP(xg, wg, wu, None, None, "silu", "separate", 1.702, 7.0, None, None, None, norm_w, 1e-5).sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("weights", ["x-dtype", "channel", "group"])
@pytest.mark.parametrize("m", [1, 2, 8, 16])
def test_gpu_prologue_at_model_shapes_in_bf16(weights, m):
    # Llama-3-8B's MLP (4096 -> 14336), the tiles the heuristic picks for each row count, bf16 activations
    gen = torch.Generator().manual_seed(m)
    hidden, inter = 4096, 14336
    if weights == "x-dtype":
        args, kwargs, _, _ = _bf16_weights(inter, hidden, torch.bfloat16, "cuda", gen)
    else:
        args, kwargs, _, _ = fp8_operands(inter, hidden, "separate", weights, gen, device="cuda")
    x = (torch.randn(m, hidden, generator=gen) * 3).to("cuda", torch.bfloat16)
    norm_w = _norm_weight(hidden, torch.bfloat16, "cuda", gen)
    fused = fused_gated_mlp(x, *args, "silu", **kwargs, norm_weight=norm_w, norm_eps=1e-5)
    outside = fused_gated_mlp(rmsnorm_like_the_kernel(x, norm_w, 1e-5), *args, "silu", **kwargs)
    assert_within_one_rounding(fused, outside, m)
