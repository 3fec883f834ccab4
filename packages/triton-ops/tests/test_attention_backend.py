"""The "triton_ops" attention backend (decode_attention behind transformers' AttentionInterface) in small random
Llama, Qwen3 and gpt-oss models: the same prefill and cached decode-step logits (DynamicCache and StaticCache, a
padded batch, one and three new tokens) as transformers' sdpa (gpt-oss: eager, which takes its sinks), and the
calls it hands back to transformers. CPU under the interpreter (fp32), or a GPU (bf16)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from triton_ops.models import attention_backend
from triton_ops.models.attention_backend import (
    ATTENTION_NAME,
    MAX_QUERY_LEN,
    register_attention_backend,
    triton_ops_attention_forward,
)
from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.testing import device_for_tests

transformers = pytest.importorskip("transformers")

DEVICE = device_for_tests()
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TINY = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 96, "max_position_embeddings": 64}


def _config(kind: str):
    if kind == "llama":
        return transformers.LlamaConfig(**TINY)
    if kind == "qwen3":
        return transformers.Qwen3Config(**TINY)
    return transformers.GptOssConfig(**TINY, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                     layer_types=["sliding_attention", "full_attention"])


CLASSES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt_oss": "GptOssForCausalLM"}


def _model(kind: str, seed: int = 0):
    config = _config(kind)
    # transformers' own attention to compare with: sdpa, or eager for gpt-oss (sdpa cannot take its sinks)
    config._attn_implementation = "eager" if kind == "gpt_oss" else "sdpa"
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[kind])(config).to(DEVICE, DTYPE).eval()
    with torch.no_grad():  # weights large enough that the attention is far from uniform
        for name, p in model.named_parameters():
            if p.dim() >= 2 or "sinks" in name:
                p.normal_(0.0, 0.2 if p.dim() >= 2 else 1.0)
    return model


def _ours(model):
    register_attention_backend()
    ours = copy.deepcopy(model)
    ours.set_attn_implementation(ATTENTION_NAME)
    assert ours.config._attn_implementation == ATTENTION_NAME
    return ours


def _run(model, ids, mask, cache, steps):
    """Logits of a prefill, then of each step's new tokens, through ``cache`` (``cache`` from transformers 5.2x on,
    ``past_key_values`` before)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    logits = []
    with torch.no_grad():
        for new in [ids, *steps]:
            if new is not ids:
                mask = torch.cat([mask, torch.ones_like(new)], dim=1)
            out = model(new, attention_mask=mask, use_cache=True, **{name: cache})
            logits.append(out.logits)
    return logits


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    tol = 2e-2 if DTYPE == torch.bfloat16 else 2e-5
    err = ((a.double() - b.double()).norm() / b.double().norm()).item()
    assert err <= tol, err


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt_oss"])
def test_logits_match_transformers_attention(kind):
    reference = _model(kind)
    ours = _ours(reference)
    calls = []
    real = attention_backend.decode_attention
    attention_backend.decode_attention = lambda *a, **kw: calls.append(a[0].shape[2]) or real(*a, **kw)
    try:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 96, (2, 7), generator=g).to(DEVICE)
        mask = torch.ones(2, 7, dtype=torch.long, device=DEVICE)
        mask[1, :2] = 0  # a left-padded sequence
        steps = [torch.randint(0, 96, (2, n), generator=g).to(DEVICE) for n in (1, 3)]
        for make_cache in (lambda m: transformers.DynamicCache(config=m.config),
                           lambda m: transformers.StaticCache(config=m.config, max_cache_len=24)):
            got = _run(ours, ids, mask, make_cache(ours), steps)
            want = _run(reference, ids, mask, make_cache(reference), steps)
            for i, (a, b) in enumerate(zip(got, want)):
                if i == 0:  # the left-padded prompt's padding positions attend to nothing: no output to compare
                    a, b = a[mask.bool()], b[mask.bool()]  # (zeros here; sdpa's CUDA kernels give other values)
                _close(a, b)
    finally:
        attention_backend.decode_attention = real
    # every layer's prefill (7 queries) and steps (1, then 3) ran decode_attention, with both caches; with gpt-oss's
    # sinks the 3-token step after a cache goes to eager attention (see attention_backend._ours)
    if kind == "gpt_oss":
        assert set(calls) <= {1, 7} and calls.count(1) == 2 * 2  # every 1-token step, both caches
    else:
        assert sorted(set(calls)) == [1, 3, 7] and len(calls) == 2 * 3 * 2


def test_the_config_attribute_selects_it_too():
    reference = _model("llama")
    register_attention_backend()
    ours = copy.deepcopy(reference)
    ours.config._attn_implementation = ATTENTION_NAME
    ids = torch.randint(0, 96, (1, 5), device=DEVICE)
    with torch.no_grad():
        _close(ours(ids).logits, reference(ids).logits)
    assert transformers.AttentionInterface()[ATTENTION_NAME] is triton_ops_attention_forward
    assert register_attention_backend() == ATTENTION_NAME  # idempotent
    with pytest.raises(InvalidArgumentError, match="name"):
        register_attention_backend("")


def _attention_args(sq: int, s: int = 9, *, sinks: bool = False, grad: bool = False):
    g = torch.Generator().manual_seed(sq)
    q = torch.randn(2, 4, sq, 16, generator=g).to(DEVICE, DTYPE).requires_grad_(grad)
    k = torch.randn(2, 1, s, 16, generator=g).to(DEVICE, DTYPE)
    v = torch.randn(2, 1, s, 16, generator=g).to(DEVICE, DTYPE)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.scaling, module.training = True, 4, 0.25, False
    if sinks:
        module.sinks = torch.nn.Parameter(torch.randn(4, device=DEVICE, dtype=DTYPE))
    return module, q, k, v


def test_what_falls_back_to_transformers(monkeypatch):
    from transformers.integrations import sdpa_attention

    used = []
    monkeypatch.setattr(attention_backend, "decode_attention", lambda *a, **kw: used.append("ours"))
    real_sdpa = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                        lambda *a, **kw: used.append("sdpa") or real_sdpa(*a, **kw))
    module, q, k, v = _attention_args(MAX_QUERY_LEN + 1, 20)
    out, weights = triton_ops_attention_forward(module, q, k, v, None, scaling=0.25)  # a long prompt
    assert used == ["sdpa"] and out.shape == (2, MAX_QUERY_LEN + 1, 4, 16) and weights is None
    module, q, k, v = _attention_args(1, grad=True)
    triton_ops_attention_forward(module, q, k, v, None)  # a gradient to record
    triton_ops_attention_forward(module, q.detach(), k, v, None, dropout=0.1)  # dropout
    assert used == ["sdpa"] * 3
    triton_ops_attention_forward(module, q.detach(), k, v, None)
    assert used[-1] == "ours"


def test_softcapped_logits_run_in_our_kernel_or_the_models_eager_attention(monkeypatch):
    # Gemma 2's cap: decode_attention caps in the kernel; a call it does not take goes to the model's own eager
    # attention, which caps too, never to transformers' sdpa function (5.2x refuses a cap, earlier releases ignored
    # it: a silent wrong answer)
    from transformers.integrations import sdpa_attention
    from transformers.models.gemma2 import modeling_gemma2

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **kw: pytest.fail("sdpa with a cap"))
    module, q, k, v = _attention_args(3, 11)
    module.__class__ = type("Gemma2Like", (torch.nn.Module,), {"__module__": modeling_gemma2.__name__})
    module.head_dim = 16
    mask = torch.rand(2, 1, 3, 11, device=DEVICE) > 0.3
    mask[..., -1] = True
    kk, vv = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    logits = torch.tanh((q @ kk.transpose(-1, -2)).double() * 0.25 / 0.5) * 0.5
    want = logits.masked_fill(~mask, float("-inf")).softmax(-1).to(DTYPE) @ vv
    with torch.no_grad():
        ours, _ = triton_ops_attention_forward(module, q, k, v, mask, scaling=0.25, softcap=0.5)
    _close(ours, want.transpose(1, 2))
    eager, _ = triton_ops_attention_forward(module, q.requires_grad_(), k, v, mask, scaling=0.25, softcap=0.5)
    assert eager.requires_grad  # a gradient to record: the model's eager attention, capped as well
    _close(eager.detach(), want.transpose(1, 2))
    _, q, k, v = _attention_args(MAX_QUERY_LEN + 1, MAX_QUERY_LEN + 1)
    with torch.no_grad():  # a long prompt, causal without a mask: the model's eager attention with sdpa's causal mask
        ours, _ = triton_ops_attention_forward(module, q, k, v, None, scaling=0.25, softcap=0.5)
    kk, vv = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    logits = torch.tanh((q @ kk.transpose(-1, -2)).double() * 0.25 / 0.5) * 0.5
    causal = torch.ones(MAX_QUERY_LEN + 1, MAX_QUERY_LEN + 1, dtype=torch.bool, device=DEVICE).tril()
    _close(ours, (logits.masked_fill(~causal, float("-inf")).softmax(-1).to(DTYPE) @ vv).transpose(1, 2))


def test_sinks_fall_back_to_the_models_eager_attention():
    from transformers.models.gpt_oss import modeling_gpt_oss

    module, q, k, v = _attention_args(3, sinks=True)
    module.__class__ = type("GptOssLike", (torch.nn.Module,), {"__module__": modeling_gpt_oss.__name__})
    mask = torch.rand(2, 1, 3, 9, device=DEVICE) > 0.3
    with torch.no_grad():
        ours, _ = triton_ops_attention_forward(module, q, k, v, mask, scaling=0.25, s_aux=module.sinks)
    # with a gradient to record (the sinks are parameters), the model's eager attention runs, with the bool mask
    # turned additive, and computes the same
    eager, _ = triton_ops_attention_forward(module, q, k, v, mask, scaling=0.25, s_aux=module.sinks)
    assert eager.requires_grad
    _close(ours, eager.detach())
    # no mask and several queries: causal, as sdpa would make it
    with torch.no_grad():
        ours, _ = triton_ops_attention_forward(module, q, k[:, :, :3], v[:, :, :3], None, s_aux=module.sinks)
    eager, _ = triton_ops_attention_forward(module, q, k[:, :, :3], v[:, :, :3], None, s_aux=module.sinks)
    _close(ours, eager.detach())
    module.__class__ = torch.nn.Module  # a module whose modeling code has no eager attention: a named error
    with pytest.raises(InvalidArgumentError, match="eager_attention_forward"):
        triton_ops_attention_forward(module, q, k, v, mask, s_aux=module.sinks)


def test_causal_prefill_over_a_longer_static_cache():
    # no mask, 5 queries, a 9-position cache (a static cache's prefill): sdpa's upper-left causal attention
    module, q, k, v = _attention_args(5)
    with torch.no_grad():
        ours, _ = triton_ops_attention_forward(module, q, k, v, None, scaling=0.25)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True, scale=0.25).transpose(1, 2)
    _close(ours, want)


def _mask_call(**overrides):
    from transformers.masking_utils import causal_mask_function

    call = {"batch_size": 2, "q_length": 6, "kv_length": 6, "q_offset": 0, "kv_offset": 0,
            "mask_function": causal_mask_function, "attention_mask": None, "allow_is_causal_skip": True,
            "dtype": DTYPE, "device": DEVICE}
    call.update(overrides)
    if "cache_position" in inspect.signature(transformers.masking_utils.sdpa_mask).parameters:
        # transformers before 5.1x: the queries' cache positions instead of their count and offset (no device)
        first = call.pop("q_offset")
        call["cache_position"] = torch.arange(first, first + call.pop("q_length"), device=call.pop("device"))
    return call


@pytest.mark.parametrize("case", [
    {"attention_mask": "padded"}, {"kv_length": 9}, {"q_length": 1, "kv_length": 1}, {"local_size": 4},
    {"allow_is_causal_skip": False}, {"mask_function": "or"}, {"kv_offset": 2},
])
def test_the_mask_is_sdpa_mask_unless_plainly_causal(case):
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    case = dict(case)
    if case.get("attention_mask") == "padded":
        case["attention_mask"] = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]], dtype=torch.bool, device=DEVICE)
    if case.get("mask_function") == "or":  # a custom pattern (transformers' or_mask_function): never skipped
        case["mask_function"] = lambda b, h, q, kv: causal_mask_function(b, h, q, kv) | (kv == 0)
    call = _mask_call(**case)
    # traced (dynamo, no Inductor) as torch.compile traces it: sdpa_mask keeps every mask there
    want = torch.compile(lambda: sdpa_mask(**call), backend="eager", fullgraph=True)()
    got = torch.compile(lambda: attention_backend.triton_ops_mask(**call), backend="eager", fullgraph=True)()
    assert (got is None) == (want is None)
    if want is not None:
        assert torch.equal(got, want)


def test_a_plain_causal_mask_is_left_out_while_compiling():
    from transformers.masking_utils import sdpa_mask

    call = _mask_call()
    assert attention_backend.triton_ops_mask(**call) is None
    assert sdpa_mask(**call) is None  # eager: transformers skips it too
    # compiled (dynamo): transformers up to 5.2x (with torch before 2.14) builds the full causal mask; we do not
    traced = torch.compile(lambda: attention_backend.triton_ops_mask(**call), backend="eager", fullgraph=True)()
    assert traced is None
    transformers_traced = torch.compile(lambda: sdpa_mask(**call), backend="eager", fullgraph=True)()
    if transformers_traced is not None:  # what our skip replaces: exactly the causal mask
        rows = torch.arange(6, device=DEVICE)
        assert torch.equal(transformers_traced, (rows[None, :] <= rows[:, None]).expand(2, 1, 6, 6))


def test_compiled_prefill_runs_causal_without_a_mask():
    # a patched model's prefill into an empty DynamicCache without padding, traced by dynamo (no Inductor: CPU CI):
    # the attention function gets no mask, and the logits are transformers' sdpa ones. (Without a cache,
    # transformers checks position_ids for packed sequences, which it cannot read while tracing: a mask stays.)
    reference = _model("llama")
    ours = _ours(reference)
    masks = []
    real = attention_backend.triton_ops_attention_forward

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        masks.append(attention_mask is None)
        return real(module, query, key, value, attention_mask, *args, **kwargs)

    transformers.AttentionInterface.register(ATTENTION_NAME, spy)
    try:
        ids = torch.randint(0, 96, (2, 20), device=DEVICE)  # more queries than MAX_QUERY_LEN: transformers' sdpa
        name = "cache" if "cache" in inspect.signature(ours.forward).parameters else "past_key_values"
        with torch.no_grad():
            got = torch.compile(ours, backend="eager")(ids, **{name: transformers.DynamicCache(config=ours.config)})
            want = reference(ids, **{name: transformers.DynamicCache(config=reference.config)})
    finally:
        register_attention_backend()
    assert masks and all(masks), masks
    _close(got.logits, want.logits)
