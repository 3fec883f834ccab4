"""FP8 weights through the registered op (schema, opcheck, torch.compile equal to eager, gradients to x and the
biases, a named error for gradients of FP8 weights), through ``FusedGatedMLP.from_module`` on transformers'
``LlamaMLP`` (output against the module with dequantized weights, the high-precision weights replaced), and bad
FP8 input (missing, stray or misshapen scales, unsupported formats): named errors naming the argument."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from _fp8_gated_mlp_helpers import dequant64, fp8_operands, random_fp8, reference_fp8
from fused_gated_mlp import FP8Projection, FusedGatedMLP, fused_gated_mlp, quantize_weight_fp8
from triton_ops_core.exceptions import (
    DeviceMismatchError,
    InvalidArgumentError,
    LayoutError,
    ShapeMismatchError,
    UnsupportedDtypeError,
)
from triton_ops_core.testing import assert_close_rel, opcheck_op

OP = torch.ops.triton_ops.fused_gated_mlp.default
FP8 = torch.float8_e4m3fn


def _op_args(x, args, kwargs, activation="silu", bias=None):
    layout = kwargs.get("weight_layout", "separate")
    return (x, args[0], args[1], bias, None, activation, layout, 1.702, 7.0, None, kwargs["gate_scale"],
            kwargs.get("up_scale"))


def test_schema_carries_the_scales():
    schema = str(OP._schema)
    assert "Tensor? gate_scale=None" in schema and "Tensor? up_scale=None" in schema


@pytest.mark.parametrize("layout,scaling,requires_grad", [("separate", "channel", False),
                                                          ("separate", "channel", True),
                                                          ("interleaved", "block", True)])
def test_opcheck(device, layout, scaling, requires_grad):
    gen = torch.Generator().manual_seed(1)
    args, kwargs, _, _ = fp8_operands(16, 40, layout, scaling, gen, device=device)
    x = torch.randn(2, 3, 40, generator=gen).to(device).requires_grad_(requires_grad)
    bias = torch.randn(32 if layout != "separate" else 16, generator=gen).to(device).requires_grad_(requires_grad)
    opcheck_op(OP, _op_args(x, args, kwargs, "swiglu_oai", bias))


def test_compiled_function_and_module_equal_eager(device):
    gen = torch.Generator().manual_seed(2)
    args, kwargs, wg64, wu64 = fp8_operands(24, 48, "separate", "block", gen, device=device)
    x = torch.randn(5, 48, generator=gen).to(torch.bfloat16).to(device)
    eager = fused_gated_mlp(x, *args, "gelu", **kwargs)
    assert_close_rel(eager, reference_fp8(x, wg64, wu64, "gelu"), 1.5e-2)
    compiled = torch.compile(lambda x: fused_gated_mlp(x, *args, "gelu", **kwargs), fullgraph=True,
                             backend="aot_eager")
    assert torch.equal(compiled(x), eager)
    module = FusedGatedMLP.from_linear(torch.nn.Linear(48, 24, bias=False), torch.nn.Linear(48, 24, bias=False),
                                       "gelu", weight_dtype=FP8, fp8_scaling="block").to(device)
    module.gate_proj.weight, module.gate_proj.weight_scale = args[0], kwargs["gate_scale"]
    module.up_proj.weight, module.up_proj.weight_scale = args[1], kwargs["up_scale"]
    assert torch.equal(module(x), eager)
    assert torch.equal(torch.compile(module, fullgraph=True, backend="aot_eager")(x), eager)


@pytest.mark.parametrize("layout,scaling", [("separate", "channel"), ("concatenated", "block")])
def test_gradients_reach_x_and_biases(device, layout, scaling):
    # Through the dequantized weights: float64 autograd of the reference from the same dequantized weights.
    gen = torch.Generator().manual_seed(3)
    args, kwargs, wg64, wu64 = fp8_operands(20, 36, layout, scaling, gen, device=device)
    x = torch.randn(7, 36, generator=gen).to(device).requires_grad_(True)
    b = torch.randn(40 if layout != "separate" else 20, generator=gen).to(device).requires_grad_(True)
    out = fused_gated_mlp(x, *args, "gelu_tanh", gate_bias=b, **kwargs)
    grad = torch.randn(out.shape, generator=gen).to(device)
    out.backward(grad)
    x64 = x.detach().cpu().double().requires_grad_(True)
    b64 = b.detach().cpu().double().requires_grad_(True)
    if layout == "separate":
        bg, bu = b64, None
    else:
        bg, bu = b64[:20], b64[20:]
    reference_fp8(x64, wg64, wu64, "gelu_tanh", bg, bu).backward(grad.cpu().double())
    assert_close_rel(x.grad, x64.grad, 1e-5, what="dx")
    assert_close_rel(b.grad, b64.grad, 1e-5, what="dbias")


@pytest.mark.parametrize("which", ["gate_weight", "up_scale"])
def test_gradient_of_fp8_weights_is_a_named_error(device, which):
    gen = torch.Generator().manual_seed(4)
    args, kwargs, _, _ = fp8_operands(8, 32, "separate", "channel", gen, device=device)
    if which == "gate_weight":
        args[0] = args[0].clone().requires_grad_(True)
    else:
        kwargs["up_scale"] = kwargs["up_scale"].clone().requires_grad_(True)
    x = torch.randn(3, 32, generator=gen).to(device)
    out = fused_gated_mlp(x, *args, **kwargs)
    with pytest.raises(InvalidArgumentError, match=which):
        out.sum().backward()


# ---------------------------------------------------------------- FusedGatedMLP.from_module on LlamaMLP

def _llama_mlp(hidden, inter, hidden_act="silu", bias=False, dtype=torch.bfloat16, device="cpu"):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act=hidden_act, mlp_bias=bias,
                         num_attention_heads=1, num_key_value_heads=1)
    return LlamaMLP(config).to(dtype=dtype, device=device)


@pytest.mark.parametrize("scaling", ["channel", "block", "group"])
def test_from_module_matches_llama_mlp_with_dequantized_weights(device, scaling):
    pytest.importorskip("transformers")
    mlp = _llama_mlp(136, 150, device=device)
    original = copy.deepcopy(mlp)
    gate_ref = weakref.ref(mlp.gate_proj.weight)
    fused = FusedGatedMLP.from_module(mlp, weight_dtype=FP8, fp8_scaling=scaling)
    # The quantized projections replaced the bf16 ones: one copy of the weights, in FP8.
    assert mlp.gate_proj is fused.gate_proj and mlp.up_proj is fused.up_proj
    assert isinstance(fused.gate_proj, FP8Projection) and fused.weight_dtype == FP8
    gc.collect()
    assert gate_ref() is None, "the bf16 gate weight is still referenced"
    assert set(fused.state_dict()) == {"gate_proj.weight", "gate_proj.weight_scale", "up_proj.weight",
                                       "up_proj.weight_scale"}
    assert f"fp8_scaling={scaling!r}" in repr(fused)

    x = torch.randn(2, 9, 136).to(torch.bfloat16).to(device)
    h = fused(x)
    # Float64 reference with the dequantized weights, written here.
    g64 = dequant64(fused.gate_proj.weight, fused.gate_proj.weight_scale)
    u64 = dequant64(fused.up_proj.weight, fused.up_proj.weight_scale)
    ref = reference_fp8(x.reshape(-1, 136), g64, u64, "silu").reshape(2, 9, 150)
    assert_close_rel(h, ref, 1.5e-2)
    # transformers' own module, now running on its dequantized projections, and its down_proj on our output.
    assert_close_rel(mlp.down_proj(h), mlp(x).double(), 2e-2)
    # the quantization itself costs a few percent against the original bf16 module
    assert_close_rel(mlp.down_proj(h), original(x).double(), 8e-2)


def test_from_module_activation_bias_and_plain_weights(device):
    pytest.importorskip("transformers")
    mlp = _llama_mlp(64, 40, hidden_act="gelu_pytorch_tanh", bias=True, dtype=torch.float32, device=device)
    x = torch.randn(5, 64, device=device)
    expected = mlp(x).detach()
    plain = FusedGatedMLP.from_module(mlp)  # weight_dtype=None: shares the parameters
    assert plain.activation == "gelu_tanh" and plain.gate_proj is mlp.gate_proj
    assert_close_rel(mlp.down_proj(plain(x)), expected.double(), 1e-5)
    fused = FusedGatedMLP.from_module(mlp, weight_dtype=torch.float8_e5m2)
    assert fused.gate_proj.bias is plain.gate_proj.bias  # biases shared, not copied
    assert "weight_dtype=float8_e5m2" in repr(fused) and "bias=True" in repr(fused.gate_proj)
    # FP8Projection.forward is the dequantized projection
    g64 = fused.gate_proj.dequantized_weight(torch.float64)
    assert_close_rel(fused.gate_proj(x), x.double() @ g64.T + fused.gate_proj.bias.double(), 1e-6)
    assert_close_rel(mlp.down_proj(fused(x)), expected.double(), 0.15)  # E5M2: 2 mantissa bits


def test_from_module_errors():
    pytest.importorskip("transformers")
    mlp = _llama_mlp(32, 16, hidden_act="relu")
    with pytest.raises(InvalidArgumentError, match="activation"):
        FusedGatedMLP.from_module(mlp)
    with pytest.raises(UnsupportedDtypeError, match="weight_dtype"):
        FusedGatedMLP.from_module(mlp, "silu", weight_dtype=torch.float16)
    with pytest.raises(InvalidArgumentError, match="fp8_scaling"):
        FusedGatedMLP.from_module(mlp, "silu", weight_dtype=FP8, fp8_scaling="tensor")
    with pytest.raises(InvalidArgumentError, match="gate_proj"):
        FusedGatedMLP.from_module(torch.nn.Sequential(), "silu")
    assert isinstance(mlp.gate_proj, torch.nn.Linear), "a refused conversion must leave the module alone"


# ---------------------------------------------------------------- named errors

@pytest.fixture
def fp8_call(device):
    """A valid call on [3, 200] activations, [130, 200] FP8 weights with per-channel scales; block scales [2, 2]."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 200, generator=gen).to(torch.bfloat16).to(device)
    (qg, sg), (qu, su) = random_fp8(130, 200, "channel", gen, device=device), random_fp8(130, 200, "channel", gen,
                                                                                         device=device)
    blocks = torch.rand(2, 2, generator=gen).to(device) / 100
    return x, qg, qu, sg, su, blocks


def _raises(exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fused_gated_mlp(*args, **kwargs)


def test_valid_call_runs(fp8_call):
    x, qg, qu, sg, su, blocks = fp8_call
    assert fused_gated_mlp(x, qg, qu, gate_scale=sg, up_scale=su).shape == (3, 130)
    assert fused_gated_mlp(x, qg, qu, gate_scale=blocks, up_scale=blocks).shape == (3, 130)


def test_missing_and_stray_scales(fp8_call):
    x, qg, qu, sg, su, blocks = fp8_call
    _raises(InvalidArgumentError, "gate_scale", x, qg, qu)
    _raises(InvalidArgumentError, "up_scale", x, qg, qu, gate_scale=sg)
    _raises(InvalidArgumentError, "gate_scale", x, qg, qu, up_scale=su)
    wb = qg.float().to(torch.bfloat16)
    _raises(InvalidArgumentError, "gate_scale", x, wb, wb, gate_scale=sg, up_scale=su)
    _raises(InvalidArgumentError, "up_scale", x, wb, wb, up_scale=su)
    packed = torch.cat([qg, qu])
    _raises(InvalidArgumentError, "up_scale", x, packed, None, weight_layout="concatenated",
            gate_scale=torch.cat([sg, su]), up_scale=su)
    _raises(InvalidArgumentError, "gate_scale", x, packed, None, weight_layout="interleaved")


def test_scale_shapes(fp8_call):
    x, qg, qu, sg, su, blocks = fp8_call
    _raises(ShapeMismatchError, "gate_scale", x, qg, qu, gate_scale=sg[:129], up_scale=su)
    _raises(ShapeMismatchError, "up_scale", x, qg, qu, gate_scale=sg, up_scale=sg.reshape(1, 130, 1))
    _raises(ShapeMismatchError, "gate_scale", x, qg, qu, gate_scale=blocks[:1], up_scale=blocks)
    _raises(ShapeMismatchError, "up_scale", x, qg, qu, gate_scale=blocks, up_scale=torch.ones_like(blocks)[:, :1])
    _raises(ShapeMismatchError, "gate_scale", x, qg, qu, gate_scale=sg.sum(), up_scale=su)  # 0-d: expand it
    # a packed weight's scale covers the packed rows
    packed = torch.cat([qg, qu])
    _raises(ShapeMismatchError, "gate_scale", x, packed, None, weight_layout="concatenated", gate_scale=sg)
    _raises(ShapeMismatchError, "gate_scale", x, packed, None, weight_layout="concatenated", gate_scale=blocks)
    # one kind for both halves
    _raises(InvalidArgumentError, "up_scale", x, qg, qu, gate_scale=sg, up_scale=blocks)


def test_scale_dtype_device_layout(fp8_call):
    x, qg, qu, sg, su, blocks = fp8_call
    _raises(UnsupportedDtypeError, "gate_scale", x, qg, qu, gate_scale=sg.bfloat16(), up_scale=su)
    _raises(UnsupportedDtypeError, "up_scale", x, qg, qu, gate_scale=sg, up_scale=su.double())
    _raises(DeviceMismatchError, "up_scale", x, qg, qu, gate_scale=sg, up_scale=su.to("meta"))
    strided = torch.ones(2, 4, device=x.device)[:, ::2]
    _raises(LayoutError, "gate_scale", x, qg, qu, gate_scale=strided, up_scale=blocks)
    _raises(InvalidArgumentError, "gate_scale", x, qg, qu, gate_scale=sg.tolist(), up_scale=su)


def test_weight_dtypes(fp8_call):
    x, qg, qu, sg, su, blocks = fp8_call
    _raises(UnsupportedDtypeError, "up_weight", x, qg, qu.to(torch.float8_e5m2), gate_scale=sg, up_scale=su)
    _raises(UnsupportedDtypeError, "up_weight", x, qg, qu.float().bfloat16(), gate_scale=sg, up_scale=su)
    fnuz = qg.float().to(torch.float8_e4m3fnuz)
    _raises(UnsupportedDtypeError, "gate_weight", x, fnuz, fnuz, gate_scale=sg, up_scale=su)
    _raises(UnsupportedDtypeError, "x", x.to(FP8), qg, qu, gate_scale=sg, up_scale=su)  # weight-only FP8


def test_quantize_weight_fp8_errors():
    w = torch.randn(8, 16)
    with pytest.raises(InvalidArgumentError, match="scaling"):
        quantize_weight_fp8(w, "tensor")
    with pytest.raises(UnsupportedDtypeError, match="dtype"):
        quantize_weight_fp8(w, "channel", torch.float8_e4m3fnuz)
    with pytest.raises(UnsupportedDtypeError, match="weight"):
        quantize_weight_fp8(w.to(FP8), "channel")
    with pytest.raises(ShapeMismatchError, match="weight"):
        quantize_weight_fp8(w[0], "channel")
    w[3, 4] = float("nan")
    with pytest.raises(InvalidArgumentError, match="finite"):
        quantize_weight_fp8(w, "block")
    with pytest.raises(UnsupportedDtypeError, match="weight"):
        FP8Projection(torch.randn(4, 4), torch.ones(4))
