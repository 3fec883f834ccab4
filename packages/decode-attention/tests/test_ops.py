"""The registered op: torch.ops.triton_ops.decode_attention, opcheck, torch.compile(fullgraph=True) equal to eager,
torch.export, the named error when a gradient is asked for, and the direct eager path."""

from __future__ import annotations

import pytest
import torch
from _attention_helpers import make_qkv
from decode_attention import DecodeAttentionBackwardError, decode_attention
from triton_ops_core.testing import opcheck_op

OP = torch.ops.triton_ops.decode_attention.default


def test_op_is_registered():
    assert isinstance(OP, torch._ops.OpOverload)
    schema = str(OP._schema)
    assert "attn_mask" in schema and "sinks" in schema and "sliding_window" in schema and "softcap" in schema


@pytest.mark.parametrize("dtype,with_mask,with_sinks,softcap", [(torch.float32, True, True, None),
                                                                (torch.bfloat16, False, False, None),
                                                                (torch.float32, True, False, 2.0)])
def test_opcheck(device, dtype, with_mask, with_sinks, softcap):
    q, k, v = make_qkv(1, 4, 2, 2, 20, 16, dtype=dtype, device=device, seed=1)
    mask = torch.rand(1, 1, 2, 20, device=device) > 0.3 if with_mask else None
    sinks = torch.randn(4, device=device) if with_sinks else None
    opcheck_op(OP, (q, k, v, mask, 0.25, sinks, None, False, None, None, softcap))


class _Block(torch.nn.Module):
    """A gpt-oss-style attention core: q/k/v projections of a decode step against a static cache."""

    def __init__(self, device):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.randn(4, device=device))

    def forward(self, q, k, v, mask):
        out = decode_attention(q, k, v, mask, sinks=self.sinks, sliding_window=16)
        return out.reshape(out.shape[0], out.shape[1], -1)


def test_compiled_equals_eager(device):
    q, k, v = make_qkv(2, 4, 2, 1, 30, 16, device=device, seed=2)
    mask = torch.rand(2, 1, 1, 30, device=device) > 0.2
    block = _Block(device)
    with torch.no_grad():
        eager = block(q, k, v, mask)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(q, k, v, mask)
    assert torch.equal(compiled, eager)
    fn = torch.compile(lambda q, k, v: decode_attention(q, k, v, is_causal=True), fullgraph=True,
                       backend="aot_eager")
    assert torch.equal(fn(q, k, v), decode_attention(q, k, v, is_causal=True))
    capped = torch.compile(lambda q, k, v, m: decode_attention(q, k, v, m, softcap=3.0), fullgraph=True,
                           backend="aot_eager")  # Gemma 2's logit cap: a float argument of the op
    assert torch.equal(capped(q, k, v, mask), decode_attention(q, k, v, mask, softcap=3.0))


def test_export(device):
    q, k, v = make_qkv(1, 4, 2, 1, 12, 16, device=device, seed=3)
    mask = torch.ones(1, 1, 1, 12, dtype=torch.bool, device=device)
    block = _Block(device).eval()
    exported = torch.export.export(block, (q, k, v, mask))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "triton_ops.decode_attention.default" in targets
    with torch.no_grad():
        assert torch.equal(exported.module()(q, k, v, mask), block(q, k, v, mask))


def test_backward_raises_a_named_error(device):
    q, k, v = make_qkv(1, 4, 2, 1, 12, 16, device=device, seed=4)
    q.requires_grad_(True)
    out = decode_attention(q, k, v)  # the forward works with grad enabled (a model called outside no_grad)
    with pytest.raises(DecodeAttentionBackwardError, match="decode_attention"):
        out.sum().backward()
    assert issubclass(DecodeAttentionBackwardError, NotImplementedError)


def test_direct_path_equals_the_dispatcher_path(device):
    q, k, v = make_qkv(2, 8, 2, 3, 25, 32, device=device, seed=5)
    mask = torch.rand(2, 1, 3, 25, device=device) > 0.3
    direct = decode_attention(q, k, v, mask, scale=0.2)
    dispatched = OP(q, k, v, mask, 0.2, None, None, False, None)
    assert torch.equal(direct, dispatched)
    again = decode_attention(q, k, v, mask, scale=0.2)  # the cached plan
    assert torch.equal(again, direct)
