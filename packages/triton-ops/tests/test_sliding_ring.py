"""A patched model's full sliding windows as ring buffers (triton_ops.models.cache_updates): each decode step's row
overwrites the window's oldest in place, the attention reads transformers' age-ordered mask against the slot order
(our kernel) or gets it reordered (sdpa, eager). Against the unpatched model step by step: left padding inside the
window, several new rows into a full ring (put back in age order first), the ring switched off mid-sequence, a
reset cache, gpt-oss's sinks with the rotation inside the ring write, and the slot-order mask itself. Small random
Gemma 3 and gpt-oss models (CPU: fp32 under the interpreter; GPU: bf16)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from test_patch_gemma import DEVICE, DTYPE, TOL, _cosine  # (skips this module where transformers has no Gemma 3)
from test_patch_gemma import _model as gemma_model
from triton_ops import patch_model
from triton_ops.models import cache_updates
from triton_ops.models.attention_backend import slot_order_mask

transformers = pytest.importorskip("transformers")
# transformers 5.0's sliding-window layer keeps no device counter: its full windows are shifted, never rings
needs_ring = pytest.mark.skipif(not cache_updates.ring_available(),
                                reason="this transformers' StaticSlidingWindowLayer has no device counter for a ring")
WINDOW = 8
GPT_OSS = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 64,
           "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW,
           "layer_types": ["sliding_attention", "full_attention"]}


def _model(kind: str = "gemma3", seed: int = 0, attn: str = "sdpa"):
    """test_patch_gemma's Gemma 3 (two sliding layers and a full one) with a window of 8, or a gpt-oss of a sliding
    and a full layer (eager: its sinks), random weights large enough that the logits differ."""
    if kind == "gemma3":
        model = gemma_model(seed, sliding_window=WINDOW)
    else:
        torch.manual_seed(seed)
        model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**GPT_OSS)).to(DEVICE, DTYPE).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.08 if p.dim() == 2 else 0.3)
        attn = "eager"
    model.config._attn_implementation = attn
    return model


def _run(model, ids: torch.Tensor, mask: torch.Tensor, chunks: list[int], cache=None, between=None) -> tuple:
    """Logits of ``ids`` fed in ``chunks`` (a prefill, then steps of one or more rows) through a StaticCache, with
    the 2-D padding ``mask`` and generate()'s position ids; ``between(i, cache)`` runs after chunk ``i``."""
    if cache is None:
        cache = transformers.StaticCache(config=model.config, max_cache_len=ids.shape[1] + 2)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits, start = [], 0
    with torch.no_grad():
        for i, n in enumerate(chunks):
            end = start + n
            out = model(ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end],
                        cache_position=torch.arange(start, end, device=DEVICE), use_cache=True, **{name: cache})
            logits.append(out.logits * mask[:, start:end, None])  # (a pad's logits: each attention's own)
            if between is not None:
                between(i, cache)
            start = end
    return logits, cache


def _inputs(batch: int = 2, length: int = 16, pad: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a left-padding mask: row 0 padded by ``pad`` tokens (inside the window of the first steps)."""
    ids = torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    mask = torch.ones(batch, length, dtype=torch.long, device=DEVICE)
    mask[0, :pad] = 0
    return ids, mask


def _sliding(cache) -> list:
    return [layer for layer in cache.layers if type(layer).__name__ == "StaticSlidingWindowLayer"]


def _assert_alike(ours: list, ref: list) -> None:
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert torch.isfinite(a).all() and _cosine(a, b) >= TOL, i


def _patched_steps_alike(kind: str, seed: int, steps: int) -> None:
    """A 10-token prompt (row 0 left-padded) and ``steps`` decode steps: the patched model's logits are the
    unpatched one's at every call."""
    reference = _model(kind, seed=seed)
    model = patch_model(copy.deepcopy(reference))
    ids, mask = _inputs(seed=seed)
    chunks = [10] + [1] * steps
    _assert_alike(_run(model, ids, mask, chunks)[0], _run(reference, ids, mask, chunks)[0])


@needs_ring
@pytest.mark.parametrize("attn", ["triton_ops", "sdpa", "eager"])
def test_decode_steps_into_full_windows_with_left_padding_inside_them(attn, monkeypatch):
    # 10-token prompt (window 8, row 0 five pads: positions 3 and 4 are pads inside the first step's window), then
    # six steps: every step a ring write per sliding layer and the mask read (or reordered) in slot order
    writes = []
    real = cache_updates.update_kv_cache_
    monkeypatch.setattr(cache_updates, "update_kv_cache_",
                        lambda *a, **kw: kw.get("ring") and writes.append(1) or real(*a, **kw))
    reference = _model(attn="sdpa" if attn == "triton_ops" else attn)  # (pad rows: each function its own way)
    model = patch_model(copy.deepcopy(reference), attention=attn == "triton_ops")
    ids, mask = _inputs()
    chunks = [10] + [1] * 6
    ours, cache = _run(model, ids, mask, chunks)
    ref, _ = _run(reference, ids, mask, chunks)
    _assert_alike(ours, ref)
    assert len(writes) == 2 * 6  # two sliding layers, six steps
    for layer in _sliding(cache):
        assert getattr(layer, cache_updates.RING_ATTR) and int(layer.cumulative_length) == 6
        assert layer.cumulative_length_int == 16


@needs_ring
def test_several_rows_into_a_full_ring_put_it_back_in_age_order_first():
    # ring steps, then three rows in one call (transformers' own update: it expects age order), then ring steps
    # again from slot 0
    reference = _model(seed=1)
    model = patch_model(copy.deepcopy(reference))
    ids, mask = _inputs(length=18, pad=3, seed=1)
    chunks = [10, 1, 1, 1, 3, 1, 1]
    states = []

    def record(i, cache):
        layer = _sliding(cache)[0]
        states.append((getattr(layer, cache_updates.RING_ATTR, False), layer.keys.clone()))

    ours, cache = _run(model, ids, mask, chunks, between=record)
    ref, ref_cache = _run(reference, ids, mask, chunks, between=record)
    _assert_alike(ours, ref)
    ours_states, ref_states = states[:len(chunks)], states[len(chunks):]
    assert [ring for ring, _ in ours_states] == [False, True, True, True, False, True, True]
    # after the three rows the window is in transformers' order again: the same rows at the same slots
    assert _cosine(ours_states[4][1], ref_states[4][1]) >= TOL
    # after the last step, slot order: the reference's age order rotated by the ring's start
    start = int(_sliding(cache)[0].cumulative_length)
    assert start == 2
    order = torch.remainder(torch.arange(WINDOW, device=DEVICE) - start, WINDOW)
    assert _cosine(ours_states[-1][1], ref_states[-1][1].index_select(-2, order)) >= TOL


@needs_ring
def test_switching_the_ring_off_mid_sequence_shifts_from_age_order(monkeypatch):
    reference = _model(seed=2)
    model = patch_model(copy.deepcopy(reference))
    ids, mask = _inputs(seed=2)
    shifts = []
    real = cache_updates.shift_kv_cache_
    monkeypatch.setattr(cache_updates, "shift_kv_cache_", lambda *a: shifts.append(1) or real(*a))

    def switch(i, cache):
        if i == 3:  # after three ring steps
            monkeypatch.setattr(cache_updates, "SLIDING_RING", False)

    ours, cache = _run(model, ids, mask, [10] + [1] * 6, between=switch)
    ref, ref_cache = _run(reference, ids, mask, [10] + [1] * 6)
    _assert_alike(ours, ref)
    assert len(shifts) == 2 * 3
    for mine, theirs in zip(_sliding(cache), _sliding(ref_cache), strict=True):
        assert not getattr(mine, cache_updates.RING_ATTR)
        assert _cosine(mine.keys, theirs.keys) >= TOL and _cosine(mine.values, theirs.values) >= TOL


def test_a_reset_cache_starts_over():
    reference = _model(seed=3)
    model = patch_model(copy.deepcopy(reference))
    ids, mask = _inputs(seed=3)
    chunks = [10, 1, 1]  # (the prefill fills the 8-token windows: both decode steps write into full rings; CI time)
    first, cache = _run(model, ids, mask, chunks)
    cache.reset()
    again, _ = _run(model, ids, mask, chunks, cache=cache)
    ref, _ = _run(reference, ids, mask, chunks)
    _assert_alike(first, ref)
    _assert_alike(again, ref)


@needs_ring
def test_gpt_oss_sliding_layers_rotate_inside_the_ring_write(monkeypatch):
    # gpt-oss: attention sinks, q/k rotated by the ring write's own launch (no separate RoPE launch at decode)
    calls = []
    real = cache_updates.update_kv_cache_
    monkeypatch.setattr(cache_updates, "update_kv_cache_",
                        lambda *a, **kw: calls.append((kw.get("ring", False), "q" in kw)) or real(*a, **kw))
    _patched_steps_alike("gpt_oss", seed=4, steps=5)
    assert calls.count((True, True)) == 5  # the sliding layer's five steps: ring writes with the rotation
    assert calls.count((False, True)) == 5  # the full layer's: StaticLayer writes with the rotation


@needs_ring
def test_gemma_steps_normalize_and_rotate_q_and_k_inside_the_cache_write(monkeypatch):
    # Gemma 3's q/k norms (1 + weight) and RoPE: in the full layer's StaticLayer write and the sliding layers' ring
    # writes, one launch each, with no fused_qk_norm_rope launch of their own after the prefill
    from triton_ops.models import decoder_layers

    writes, separate = [], []
    real_write, real_norm = cache_updates.update_kv_cache_, decoder_layers.fused_qk_norm_rope
    monkeypatch.setattr(cache_updates, "update_kv_cache_",
                        lambda *a, **kw: writes.append((kw.get("gemma"), kw.get("ring", False)))
                        or real_write(*a, **kw))
    monkeypatch.setattr(decoder_layers, "fused_qk_norm_rope",
                        lambda *a, **kw: separate.append(kw.get("gemma")) or real_norm(*a, **kw))
    _patched_steps_alike("gemma3", seed=5, steps=3)
    assert separate == [True] * 3  # the prefill's three layers (transformers' own update allocates the cache)
    assert sorted(writes) == sorted([(True, True)] * 2 * 3 + [(True, False)] * 3)  # 2 rings, 1 full layer; 3 steps


@pytest.mark.parametrize("start", [0, 3, 8, 21])
def test_slot_order_mask_puts_each_column_at_its_slot(start):
    age = torch.randn(2, 1, 3, WINDOW, device=DEVICE)
    slots = slot_order_mask(age, torch.tensor([start], device=DEVICE))
    for j in range(WINDOW):  # slot j holds the entry of age (j - start) mod W
        assert torch.equal(slots[..., j], age[..., (j - start) % WINDOW])
