"""Helpers the model tests share: the cosine of two outputs, and a prefill then one cached decode step through the
model's own cache (transformers 5.2x renamed the forward's ``past_key_values`` to ``cache``)."""

from __future__ import annotations

import inspect

import torch


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def prefill_and_step(model, ids: torch.Tensor, **kwargs):
    """The outputs of a prefill of ``ids`` and of one decode step (``ids``' first column) on its cache."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(ids, use_cache=True, **kwargs)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        step = model(ids[:, :1], use_cache=True, **{name: cache}, **kwargs)
    return out, step


def assert_greedy_tokens_match(model, reference, prompt_len: int = 6, new_tokens: int = 4) -> None:
    """``generate()`` (greedy) of a patched model and of its unpatched copy from one random prompt: the same shape,
    and on fp32 the same tokens (bf16 rounding may part the two at a near tie)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, prompt_len), device=device)
    with torch.no_grad():
        ours = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        ref = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    assert ours.shape == ref.shape == (1, prompt_len + new_tokens)
    if next(model.parameters()).dtype == torch.float32:
        assert torch.equal(ours, ref)


def attention_keywords(reference, patch, ids: torch.Tensor, keys: tuple[str, ...], attention=None) -> tuple[list, list]:
    """What each attention call passes the attention function: ``(layer_idx, *kwargs[key] for keys)`` of every call,
    in order, for ``reference`` and for ``patch(copy of reference)``, both configured for a recording function
    (registered with transformers) that then runs ``attention`` (default: transformers' sdpa function)."""
    import copy

    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen: list[tuple] = []
    run = attention or sdpa_attention_forward

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, *(kwargs.get(k) for k in keys)))
        return run(module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register("triton_ops_test_recording", recording)
    reference.config._attn_implementation = "triton_ops_test_recording"
    model = patch(copy.deepcopy(reference))
    with torch.no_grad():
        reference(ids)
        expected = list(seen)
        seen.clear()
        model(ids)
    return expected, seen


def assert_gradients_match(model, reference, ids: torch.Tensor, names: tuple[str, ...], min_cosine: float) -> None:
    """A training step's gradients (``labels=ids``) of the named parameters point as the reference model's do."""
    model.train()
    reference.train()
    for m in (model, reference):
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
    ours, ref = dict(model.named_parameters()), dict(reference.named_parameters())
    for name in names:
        assert cosine(ours[name].grad, ref[name].grad) >= min_cosine, name
