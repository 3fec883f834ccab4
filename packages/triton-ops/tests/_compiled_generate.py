"""transformers' documented fast path over a patched model, beside its eager generate(): the GPU tests' shared
check that a model compiles in a few frames and computes what eager does."""

from __future__ import annotations

import torch


def assert_compiled_generate_matches_eager(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int = 16,
                                           min_cosine: float = 0.995) -> None:
    """``generate()`` with a static cache compiled with ``fullgraph=True, mode="reduce-overhead"`` (CUDA graphs)
    against ``disable_compile=True``: 1-4 compiled frames (prefill and decode, not one per length), the same
    number of tokens, and the logits of the prefill and the first decode step within ``min_cosine`` (later a near
    tie may part the two)."""
    import transformers
    from triton_ops_core.testing import count_compiles

    kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "cache_implementation": "static",
              "return_dict_in_generate": True, "output_logits": True}
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
