"""Shared checks of a patched model: transformers' documented fast path beside its eager generate() (the GPU tests':
a model compiles in a few frames and computes what eager does), greedy tokens against the unpatched model's with both
caches, and the logits of a prefill and of decode steps."""

from __future__ import annotations

import inspect

import torch


def assert_compiled_generate_matches_eager(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int = 16,
                                           min_cosine: float = 0.995) -> None:
    """``generate()`` with a static cache compiled with ``fullgraph=True, mode="reduce-overhead"`` (CUDA graphs)
    against ``disable_compile=True``: 1-4 compiled frames (prefill and decode, not one per length), the same
    number of tokens, and the logits of the prefill and the first decode step within ``min_cosine`` (later a near
    tie may part the two)."""
    import transformers
    from triton_ops_core.testing import count_compiles

    # min_new_tokens: a random model whose first greedy token is its EOS would stop after the prefill, which
    # transformers does not compile, and no decode step would be compiled at all
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
              "cache_implementation": "static", "return_dict_in_generate": True, "output_logits": True}
    compile_config = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        eager = model.generate(prompt, disable_compile=True, **kwargs)
        with count_compiles() as compiles:
            compiled = model.generate(prompt, compile_config=compile_config, **kwargs)
    assert 1 <= compiles["frames"] <= 4, compiles
    assert compiled.sequences.shape == eager.sequences.shape
    for step in range(2):
        a, b = compiled.logits[step].double().flatten(), eager.logits[step].double().flatten()
        assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() >= min_cosine, step


def assert_generates_alike(model: torch.nn.Module, reference: torch.nn.Module, prompt: torch.Tensor,
                           new_tokens: int = 5, min_cosine: float = 0.999) -> None:
    """Greedy ``generate()`` of ``model`` and ``reference`` gives the same tokens with a dynamic and a static cache:
    in float32 every token; in 16 bits (a GPU's bf16 run of a small random model, where rounding can part two
    near-tied logits) the same tokens up to the first step where they part, and every step's logits up to and
    including that one within ``min_cosine`` (the inputs are the same up to there: a parting is a near tie)."""
    exact = next(model.parameters()).dtype == torch.float32
    kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "return_dict_in_generate": True,
              "output_logits": True}
    for cache in ("dynamic", "static"):
        with torch.no_grad():
            ours = model.generate(prompt, cache_implementation=cache, **kwargs)
            ref = reference.generate(prompt, cache_implementation=cache, **kwargs)
        if exact or torch.equal(ours.sequences, ref.sequences):
            assert torch.equal(ours.sequences, ref.sequences), (cache, ours.sequences, ref.sequences)
            continue
        start, end = prompt.shape[1], min(ours.sequences.shape[1], ref.sequences.shape[1])
        differs = (ours.sequences[:, start:end] != ref.sequences[:, start:end]).any(0).nonzero()
        # (no differing token in the common length: one stopped at its EOS where the other did not, a parting too)
        parted = int(differs[0]) if len(differs) else end - start - 1
        for step in range(parted + 1):
            a, b = ours.logits[step].double().flatten(), ref.logits[step].double().flatten()
            assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() >= min_cosine, (cache, step)


def prefill_and_steps(model: torch.nn.Module, ids: torch.Tensor, steps: int = 3) -> list[torch.Tensor]:
    """Logits of a prefill and of ``steps`` decode steps through transformers' dynamic cache, the same next tokens
    for every model compared (the prompt's own, so a near tie cannot part two models' inputs). The cache argument is
    ``cache`` from transformers 5.2x on, ``past_key_values`` before."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        logits = [out.logits]
        for i in range(steps):
            out = model(ids[:, i:i + 1], use_cache=True, **{name: cache})
            logits.append(out.logits)
    return logits
