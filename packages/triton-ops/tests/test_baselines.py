"""The suite's eager baselines are the code users run instead: transformers' own modules, in the input dtype."""

from __future__ import annotations

import pytest
import torch
from triton_ops.benchmark import _references as ref
from triton_ops_core.testing import assert_close_rel


def _counting(monkeypatch, module, cls_name: str) -> list:
    calls = []
    cls = getattr(module, cls_name)
    forward = cls.forward

    def counted(self, hidden_states):
        calls.append(hidden_states.dtype)
        return forward(self, hidden_states)

    monkeypatch.setattr(cls, "forward", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rmsnorm_rope_eager_baseline_is_transformers_llama_code(monkeypatch, dtype):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    calls = _counting(monkeypatch, llama, "LlamaRMSNorm")
    x = torch.randn(2, 5, 64).to(dtype)
    w = (1 + 0.1 * torch.randn(64)).to(dtype)
    cos, sin = ref.rope_tables(5, 16, dtype, "cpu")
    out = ref.rmsnorm_rope_baseline()(x, w, cos, sin, 1e-6)
    assert calls == [dtype]  # transformers' forward ran, on the input dtype
    assert out.dtype == dtype and out.shape == x.shape
    # the same computation as the written-out Llama code, and the op's function up to input-dtype rounding
    assert torch.equal(out, ref.rmsnorm_rope_eager(x, w, cos, sin, 1e-6))
    assert_close_rel(out, ref.rmsnorm_rope_reference(x, w, cos, sin, 1e-6), 2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_qk_norm_rope_eager_baseline_is_transformers_qwen3_code(monkeypatch):
    qwen3 = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
    calls = _counting(monkeypatch, qwen3, "Qwen3RMSNorm")
    q, k = torch.randn(1, 4, 8, 16).bfloat16(), torch.randn(1, 4, 2, 16).bfloat16()
    qw, kw = torch.randn(16).bfloat16(), torch.randn(16).bfloat16()
    cos, sin = ref.rope_tables(4, 16, torch.bfloat16, "cpu")
    qo, ko = ref.qk_norm_rope_baseline()(q, k, qw, kw, cos, sin, 1e-6)
    assert calls == [torch.bfloat16, torch.bfloat16]
    eq, ek = ref.qk_norm_rope_eager(q, k, qw, kw, cos, sin, 1e-6)
    assert torch.equal(qo, eq) and torch.equal(ko, ek)
    assert_close_rel(torch.cat((qo.flatten(), ko.flatten())), ref.qk_norm_rope_reference(q, k, qw, kw, cos, sin), 2e-2)
