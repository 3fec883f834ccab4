"""The weight-only kernel's ``NORM_OUT``: the launch that writes a decoder layer's residual stream (``out += x @ W^T``)
also writes that stream's next RMSNorm, bit for bit the RMSNorm kernel's output, from the last column block of each
row tile; counters back at zero after every call; bad norm arguments raise the named errors."""

from __future__ import annotations

import pytest
import torch
from fp8_gemm import weight_only as wo
from triton_ops_core import scratch as _scratch
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError
from triton_ops_core.testing import device_for_tests, normalized_like_the_prologue, poison_

FP8 = torch.float8_e4m3fn
DEV = device_for_tests()
EPS = 1e-5

# (name, config): the one-row FMA tile without and with split K, a two-row FMA tile over two row tiles, the dot tile
CONFIGS = {
    "fma-row": {"USE_DOT": False, "BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4,
                "num_stages": 1},
    "fma-row-splitk": {"USE_DOT": False, "BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 3, "num_warps": 4,
                       "num_stages": 1},
    "fma-rows-splitk": {"USE_DOT": False, "BLOCK_M": 2, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2, "num_warps": 4,
                        "num_stages": 1},
    "dot-splitk": {"USE_DOT": True, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "num_warps": 4,
                   "num_stages": 1},
}


def _case(m: int, n: int, k: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(n, k, generator=g) * 32).clamp(-448, 448).to(FP8).to(DEV)
    scale = (torch.rand(1, n, generator=g) * 0.02 + 0.001).to(DEV)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-1, 1, m)[:, None]).to(DEV, dtype)
    residual = (torch.randn(m, n, generator=g) * 4 + 1).to(DEV, dtype)
    norm_weight = (torch.rand(n, generator=g) + 0.5).to(DEV, dtype)
    return q, scale, x, residual, norm_weight


def _counters_at_rest(device) -> bool:
    return not bool(_scratch.scratch(wo._COUNTERS, device, 1, torch.int32, zeroed=True).any())


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("m", [1, 3])
def test_the_residual_stream_and_its_norm_in_one_launch(name, m):
    cfg = CONFIGS[name]
    n, k = 80, 200  # a partial last column block and K tile
    q, scale, x, residual, nw = _case(m, n, k, torch.float32, seed=10 * m + len(name))
    # the same launch without the norm: what the residual stream must hold, bit for bit
    expected = residual.clone()
    wo.build_plan(x, q, scale, None, config=cfg, add_out=expected).run(x, q, scale, None, out=expected)
    plan = wo.build_plan(x, q, scale, None, config=cfg, add_out=residual, norm_out_weight=nw, norm_out_eps=EPS)
    for _ in range(2):  # a second call: the counters were back at zero
        out = residual.clone()
        normed = poison_(torch.empty_like(out))
        plan.run(x, q, scale, None, out=out, normed=normed, norm_out_weight=nw)
        assert torch.equal(out, expected)
        assert torch.equal(normed, normalized_like_the_prologue(out, nw, EPS))
        assert _counters_at_rest(DEV)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_streams_are_normalized_as_the_norm_kernel_rounds_them(dtype):
    q, scale, x, residual, nw = _case(2, 64, 128, dtype, seed=3)
    cfg = CONFIGS["fma-rows-splitk"]
    plan = wo.build_plan(x, q, scale, None, config=cfg, add_out=residual, norm_out_weight=nw, norm_out_eps=EPS)
    out, normed = residual.clone(), poison_(torch.empty_like(residual))
    plan.run(x, q, scale, None, out=out, normed=normed, norm_out_weight=nw)
    assert torch.equal(normed, normalized_like_the_prologue(out, nw, EPS))
    assert torch.isfinite(normed).all()


def test_a_16_bit_weight_writes_the_norm_too():
    # decode_linear's kernel (a bf16/fp16 weight, no scale) with the residual add of an output projection
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(48, 96, generator=g) * 0.1).to(DEV, torch.float16)
    x = torch.randn(1, 96, generator=g).to(DEV, torch.float16)
    residual = torch.randn(1, 48, generator=g).to(DEV, torch.float16)
    nw = (torch.rand(48, generator=g) + 0.5).to(DEV, torch.float16)
    cfg = CONFIGS["fma-row-splitk"]
    expected = residual.clone()
    wo.build_plan(x, w, None, None, config=cfg, add_out=expected).run(x, w, None, None, out=expected)
    out, normed = residual.clone(), poison_(torch.empty_like(residual))
    wo.build_plan(x, w, None, None, config=cfg, add_out=out, norm_out_weight=nw, norm_out_eps=1e-6).run(
        x, w, None, None, out=out, normed=normed, norm_out_weight=nw)
    assert torch.equal(out, expected)
    assert torch.equal(normed, normalized_like_the_prologue(out, nw, 1e-6))


def test_nan_in_a_row_stays_in_that_row():
    q, scale, x, residual, nw = _case(3, 64, 128, torch.float32, seed=8)
    x[1, 5] = float("nan")
    plan = wo.build_plan(x, q, scale, None, config=CONFIGS["fma-rows-splitk"], add_out=residual,
                         norm_out_weight=nw, norm_out_eps=EPS)
    out, normed = residual.clone(), poison_(torch.empty_like(residual))
    plan.run(x, q, scale, None, out=out, normed=normed, norm_out_weight=nw)
    assert torch.isnan(normed[1]).all()
    assert torch.isfinite(normed[[0, 2]]).all()
    assert torch.equal(normed[[0, 2]], normalized_like_the_prologue(out[[0, 2]], nw, EPS))


def test_no_k_writes_the_norm_of_the_residual():
    q, scale, x, residual, nw = _case(2, 32, 0, torch.float32, seed=4)
    plan = wo.build_plan(x, q, scale, None, add_out=residual, norm_out_weight=nw, norm_out_eps=EPS)
    out, normed = residual.clone(), poison_(torch.empty_like(residual))
    plan.run(x, q, scale, None, out=out, normed=normed, norm_out_weight=nw)
    assert torch.equal(out, residual)
    torch.testing.assert_close(normed, normalized_like_the_prologue(residual, nw, EPS), rtol=2e-7, atol=0)


def test_bad_norm_arguments_raise_named_errors():
    q, scale, x, residual, nw = _case(1, 32, 64, torch.float32, seed=6)
    with pytest.raises(ShapeMismatchError, match="norm_out_weight.*out_features"):
        wo.build_plan(x, q, scale, None, add_out=residual, norm_out_weight=nw[:16], norm_out_eps=EPS)
    with pytest.raises(InvalidArgumentError, match="norm_out_eps"):
        wo.build_plan(x, q, scale, None, add_out=residual, norm_out_weight=nw, norm_out_eps=0.0)
    with pytest.raises(ShapeMismatchError, match="norm_out_weight"):
        wo.build_plan(x, q, scale, None, add_out=residual, norm_out_weight=nw[None, :], norm_out_eps=EPS)


# ---- the public add ops: fp8_linear_add_ / decode_linear_add_ with norm_weight= and normed=

def _fp8_layer(k: int, n: int, seed: int = 0):
    from fp8_gemm import FP8Linear
    from torch import nn

    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=False, device=DEV)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.05)
    return FP8Linear.from_linear(lin, weight_granularity="channel")


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("path", ["auto", "w8a8"])
def test_fp8_linear_add_writes_the_updated_residuals_norm(m, path):
    from fp8_gemm import fp8_linear_add_

    layer = _fp8_layer(96, 40, seed=m)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 96, generator=g).to(DEV)
    residual = (torch.randn(m, 40, generator=g) * 3).to(DEV)
    nw = (torch.rand(40, generator=g) + 0.5).to(DEV)
    expected = residual.clone()
    with torch.no_grad():
        fp8_linear_add_(expected, x, layer.weight, layer.weight_scale, path=path)
        out, normed = residual.clone(), poison_(torch.empty_like(residual))
        fp8_linear_add_(out, x, layer.weight, layer.weight_scale, path=path, next_norm_weight=nw, next_norm_eps=EPS,
                        normed=normed)
    assert torch.equal(out, expected)
    if path == "auto":  # the weight-only launch: the RMSNorm kernel's bits
        assert torch.equal(normed, normalized_like_the_prologue(out, nw, EPS))
    else:  # after the W8A8 GEMM and the add: the norm in torch (fp32, one rounding)
        torch.testing.assert_close(normed, normalized_like_the_prologue(out, nw, EPS), rtol=3e-7, atol=1e-7)


def test_decode_linear_add_writes_the_updated_residuals_norm():
    from fp8_gemm import decode_linear_add_

    g = torch.Generator().manual_seed(2)
    w = (torch.randn(48, 64, generator=g) * 0.1).to(DEV, torch.float16)
    x = torch.randn(2, 1, 64, generator=g).to(DEV, torch.float16)
    residual = torch.randn(2, 1, 48, generator=g).to(DEV, torch.float16)
    nw = (torch.rand(48, generator=g) + 0.5).to(DEV, torch.float16)
    expected = residual.clone()
    with torch.no_grad():
        decode_linear_add_(expected, x, w)
        out, normed = residual.clone(), poison_(torch.empty_like(residual))
        decode_linear_add_(out, x, w, next_norm_weight=nw, next_norm_eps=1e-6, normed=normed)
    assert torch.equal(out, expected)
    assert torch.equal(normed, normalized_like_the_prologue(out, nw, 1e-6))


def test_add_ops_refuse_bad_norm_arguments():
    from fp8_gemm import decode_linear_add_, fp8_linear_add_

    layer = _fp8_layer(64, 32)
    x = torch.randn(1, 64, device=DEV)
    residual = torch.randn(1, 32, device=DEV)
    nw = torch.rand(32, device=DEV) + 0.5
    with torch.no_grad():
        with pytest.raises(InvalidArgumentError, match="go together"):
            fp8_linear_add_(residual, x, layer.weight, layer.weight_scale, next_norm_weight=nw)
        with pytest.raises(InvalidArgumentError, match="go together"):
            decode_linear_add_(residual.half(), x.half(), layer.weight.half(), normed=torch.empty_like(residual))
        with pytest.raises(ShapeMismatchError, match="normed"):
            fp8_linear_add_(residual, x, layer.weight, layer.weight_scale, next_norm_weight=nw,
                            normed=torch.empty(2, 32, device=DEV))
        with pytest.raises(ShapeMismatchError, match="next_norm_weight"):
            fp8_linear_add_(residual, x, layer.weight, layer.weight_scale, next_norm_weight=nw[:8],
                            normed=torch.empty_like(residual))
        with pytest.raises(InvalidArgumentError, match="next_norm_eps"):
            fp8_linear_add_(residual, x, layer.weight, layer.weight_scale, next_norm_weight=nw, next_norm_eps=0.0,
                            normed=torch.empty_like(residual))
        with pytest.raises(InvalidArgumentError, match="normed: shares memory with residual"):
            fp8_linear_add_(residual, x, layer.weight, layer.weight_scale, next_norm_weight=nw, normed=residual)


def test_the_registered_ops_with_the_norm():
    from fp8_gemm import fp8_linear_add_
    from triton_ops_core.testing import assert_compiled_in_place_add, opcheck_op

    layer = _fp8_layer(64, 48)
    x = torch.randn(1, 64, device=DEV)
    residual = torch.randn(1, 48, device=DEV)
    nw = torch.rand(48, device=DEV) + 0.5
    normed = torch.empty_like(residual)
    opcheck_op(torch.ops.triton_ops.fp8_linear_add_norm_.default,
               (residual, x, layer.weight, layer.weight_scale, "row", False, "auto", nw, EPS, normed))
    w16 = layer.dequantized_weight(torch.float16)
    opcheck_op(torch.ops.triton_ops.decode_linear_add_norm_.default,
               (residual.half(), x.half(), w16, nw, EPS, torch.empty_like(residual.half())))

    def add_(r, x):  # the norm read after the compiled step too
        fp8_linear_add_(r, x, layer.weight, layer.weight_scale, next_norm_weight=nw, next_norm_eps=EPS, normed=normed)

    assert_compiled_in_place_add(add_, residual, x)
    with torch.no_grad():
        r = residual.clone()
        add_(r, x)
    assert torch.equal(normed, normalized_like_the_prologue(r, nw, EPS))


@pytest.mark.parametrize("fp8", [False, True])
def test_decode_linear_with_a_residual_writes_the_outputs_norm(fp8):
    # an output projection with its residual add into a new tensor (the layer's input left as it is) and the
    # post-attention norm of the sum, one launch
    from fp8_gemm import decode_linear

    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 1, 64, generator=g).to(DEV, torch.float16)
    residual = torch.randn(1, 1, 48, generator=g).to(DEV, torch.float16)
    nw = (torch.rand(48, generator=g) + 0.5).to(DEV)
    if fp8:
        layer = _fp8_layer(64, 48, seed=3)
        w, kw = layer.weight, {"weight_scale": layer.weight_scale}
    else:
        w, kw = (torch.randn(48, 64, generator=g) * 0.1).to(DEV, torch.float16), {}
    before = residual.clone()
    with torch.no_grad():
        want = decode_linear(x, w, residual=residual, **kw)
        normed = poison_(torch.empty_like(residual))
        out = decode_linear(x, w, residual=residual, next_norm_weight=nw, next_norm_eps=EPS, normed=normed, **kw)
    assert torch.equal(residual, before)  # the input is left as it is
    assert torch.equal(out, want)
    assert torch.equal(normed, normalized_like_the_prologue(out, nw, EPS))
    opcheck_args = (x, w, None, None, 0.0, kw.get("weight_scale"), residual, nw, EPS, torch.empty_like(residual))
    from triton_ops_core.testing import opcheck_op

    opcheck_op(torch.ops.triton_ops.decode_linear_norm_out.default, opcheck_args)


def test_decode_linear_refuses_a_norm_without_its_buffer_or_under_autograd():
    from fp8_gemm import decode_linear

    x = torch.randn(1, 32, device=DEV, dtype=torch.float16)
    w = torch.randn(16, 32, device=DEV, dtype=torch.float16)
    nw = torch.rand(16, device=DEV) + 0.5
    with pytest.raises(InvalidArgumentError, match="go together"):
        decode_linear(x, w, next_norm_weight=nw)
    with pytest.raises(InvalidArgumentError, match="inference-only"):
        decode_linear(x, w.requires_grad_(), next_norm_weight=nw, normed=torch.empty(1, 16, device=DEV,
                                                                                      dtype=torch.float16))
    with torch.no_grad(), pytest.raises(ShapeMismatchError, match="normed"):
        decode_linear(x, w, next_norm_weight=nw, normed=torch.empty(2, 16, device=DEV, dtype=torch.float16))
    with torch.no_grad(), pytest.raises(InvalidArgumentError, match="normed: shares memory with x"):
        decode_linear(x[:, :16], w[:, :16], next_norm_weight=nw, normed=x[:, :16])
