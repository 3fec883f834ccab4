"""The registered op: torch.ops.triton_ops.fused_gated_mlp, opcheck, torch.compile(fullgraph=True) equal to eager
(function, module, packed layouts, gradients), no recompilation per token count, torch.export."""

from __future__ import annotations

import json

import pytest
import torch
from _gated_mlp_helpers import TOL, make_inputs, pack, reference64
from fused_gated_mlp import FusedGatedMLP, fused_gated_mlp
from triton_ops_core.testing import assert_close_rel, count_compiles, opcheck_op

OP = torch.ops.triton_ops.fused_gated_mlp.default


def test_op_is_registered():
    assert isinstance(OP, torch._ops.OpOverload)
    assert "config" in str(OP._schema)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("lead", [None, (2, 3)])
def test_opcheck(device, dtype, requires_grad, lead):
    x, wg, wu, _, _ = make_inputs(3, 32, 16, dtype, device, seed=1, lead=lead)
    x, wg, wu = (t.requires_grad_(requires_grad) for t in (x, wg, wu))
    opcheck_op(OP, (x, wg, wu, None, None, "silu", "separate", 1.702, 7.0, None))


@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_packed_with_bias(device, layout, requires_grad):
    x, wg, wu, bg, bu = make_inputs(4, 32, 16, torch.float32, device, bias=True, seed=2)
    w, b = pack(wg, wu, layout), pack(bg, bu, layout)
    x, w, b = (t.requires_grad_(requires_grad) for t in (x, w, b))
    opcheck_op(OP, (x, w, None, b, None, "swiglu_oai", layout, 1.702, 7.0, None))


def test_opcheck_forced_config(device):
    x, wg, wu, _, _ = make_inputs(3, 32, 16, torch.float32, device, seed=3)
    config = json.dumps({"path": "decode", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 2, "GROUP_M": 1,
                         "num_warps": 4, "num_stages": 1}, sort_keys=True)
    opcheck_op(OP, (x, wg, wu, None, None, "gelu", "separate", 1.702, 7.0, config))


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_compiled_function_and_module_equal_eager(device, activation):
    x, wg, wu, _, _ = make_inputs(5, 32, 16, torch.float32, device, seed=4, lead=(5,))
    eager = fused_gated_mlp(x, wg, wu, activation)
    assert_close_rel(eager, reference64(x, wg, wu, activation), TOL[torch.float32])
    compiled = torch.compile(lambda x: fused_gated_mlp(x, wg, wu, activation), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), eager)
    module = FusedGatedMLP(32, 16, activation, device=device)
    with torch.no_grad():
        module.gate_proj.weight.copy_(wg)
        module.up_proj.weight.copy_(wu)
        got = torch.compile(module, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(got, eager)


def test_compiled_forced_config_equals_eager(device):
    x, wg, wu, _, _ = make_inputs(3, 32, 16, torch.float32, device, seed=5)
    config = {"path": "decode", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 2, "GROUP_M": 1, "num_warps": 4,
              "num_stages": 1}
    eager = fused_gated_mlp(x, wg, wu, config=config)
    compiled = torch.compile(lambda x: fused_gated_mlp(x, wg, wu, config=config), fullgraph=True,
                             backend="aot_eager")(x)
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("layout", ["separate", "interleaved"])
def test_compiled_gradients_equal_eager(device, layout):
    x, wg, wu, bg, bu = make_inputs(4, 32, 16, torch.float32, device, bias=True, seed=6)
    if layout == "separate":
        params = [x, wg, wu, bg, bu]

        def fn(x, wg, wu, bg, bu):
            return fused_gated_mlp(x, wg, wu, "swiglu_oai", gate_bias=bg, up_bias=bu)
    else:
        params = [x, pack(wg, wu, layout), pack(bg, bu, layout)]

        def fn(x, w, b):
            return fused_gated_mlp(x, w, None, "swiglu_oai", gate_bias=b, weight_layout=layout)

    for p in params:
        p.requires_grad_(True)
    grads = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        for p in params:
            p.grad = None
        f(*params).square().sum().backward()
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    # against float64 autograd of the reference
    refs = [p.detach().double().requires_grad_() for p in params]
    if layout == "separate":
        reference64(refs[0], refs[1], refs[2], "swiglu_oai", refs[3], refs[4]).square().sum().backward()
    else:
        half = refs[1][0::2], refs[1][1::2]
        reference64(refs[0], *half, "swiglu_oai", refs[2][0::2], refs[2][1::2]).square().sum().backward()
    for got, ref in zip(grads[0], refs):
        assert_close_rel(got, ref.grad, 1e-4)


def test_dynamic_shapes_compile_once_over_token_counts(device):
    """Decode over 1..33 tokens with dynamic=True: at most one recompilation, eager results."""
    _, wg, wu, _, _ = make_inputs(1, 32, 16, torch.float32, device, seed=7)
    fn = torch.compile(lambda x: fused_gated_mlp(x, wg, wu), fullgraph=True, dynamic=True, backend="aot_eager")
    with count_compiles() as compiles:
        for m in (1, 2, 3, 5, 9, 17, 33):
            x = torch.randn(1, m, 32, device=device)
            assert torch.equal(fn(x), fused_gated_mlp(x, wg, wu))
    assert compiles["frames"] <= 2, compiles


def test_export_of_module(device):
    module = FusedGatedMLP(32, 16, device=device)
    x = torch.randn(2, 3, 32, device=device)
    exported = torch.export.export(module, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "triton_ops.fused_gated_mlp.default" in targets
    with torch.no_grad():
        assert torch.equal(exported.module()(x), module(x))
