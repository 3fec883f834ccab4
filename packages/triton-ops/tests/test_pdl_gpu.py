"""On a Hopper GPU: a patched model's decode step with programmatic dependent launch (``triton_ops_core.pdl``, opt-in)
computes what it computes without, eagerly and replayed from a CUDA graph, and its decode kernels are planned with
it."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from triton_ops import patch_model  # noqa: E402
from triton_ops_core import launch as launch_module  # noqa: E402
from triton_ops_core import pdl  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                       reason="programmatic dependent launch needs a Hopper (or later) GPU"),
]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def _model(fp8: bool):
    torch.manual_seed(5)
    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=3,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=512)
    model = transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    return patch_model(model, fp8=fp8) if not fp8 else patch_model(model, fp8=True, fp8_recipe="channel")


def _decode(model, graph: bool) -> list[torch.Tensor]:
    """Prefill 40 tokens into a static cache, then the logits of one decode step at position 40 (eager, or replayed
    five times from a CUDA graph with poisoned outputs in between)."""
    cache = transformers.StaticCache(config=model.config, max_cache_len=64)
    # transformers 5.2x names the forward's cache argument `cache`, earlier releases `past_key_values`
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    torch.manual_seed(6)
    prompt = torch.randint(0, 512, (1, 40), device="cuda")
    token = torch.randint(0, 512, (1, 1), device="cuda")
    position = torch.tensor([40], device="cuda")
    with torch.inference_mode():
        model(input_ids=prompt, use_cache=True, **{kw: cache})

        def step():
            return model(input_ids=token, cache_position=position, use_cache=True, **{kw: cache}).logits

        if not graph:
            return [step().clone()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
            step()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = step()
        results = []
        for _ in range(5):
            out.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            results.append(out.clone())
        return results


@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_decode_step_with_pdl_equals_without(fp8):
    model = _model(fp8)
    with pdl.override(False):
        want = _decode(model, graph=False)[0]
        # the graph's own reference: transformers 5.1x's StaticLayer advances its length counter on every warm-up
        # and replay, whatever cache_position says, so each replay decodes at a later position than the eager step
        want_graph = _decode(model, graph=True)
    with pdl.override(True):
        assert pdl.enabled(torch.device("cuda"))
        eager = _decode(model, graph=False)[0]
        graphed = _decode(model, graph=True)
        plans = _weight_only_launches()
    for got, ref in [(eager, want), *zip(graphed, want_graph, strict=True)]:
        assert torch.isfinite(got).all()
        # the same kernels in the same order; split-K partial sums may meet in another order
        assert _cosine(got, ref) >= 0.99999
    # the decode kernels were planned with PDL: the weight-only GEMV's plans launch early
    assert plans and all(launch.options.get("launch_pdl") for launch in plans)


def _weight_only_launches() -> list:
    """The weight-only GEMV's cached launches (``decode_linear``'s and ``FP8Linear``'s plans)."""
    # the modules (the package's name decode_linear is the function, which shadows its module)
    decode_linear = importlib.import_module("fp8_gemm.decode_linear")
    fp8_linear = importlib.import_module("fp8_gemm.linear")

    # only caches looked up since the last invalidation: one this model never used may still hold plans an earlier
    # test made without PDL (invalidate_plans empties a cache on its next lookup; seen when every package's tests
    # share the workers, session 28)
    current = launch_module._generation
    caches = [decode_linear._PLANS, decode_linear._ADD_PLANS, fp8_linear._PLANS, fp8_linear._ADD_PLANS]
    entries = [e for cache in caches if cache._generation == current for e in cache._plans.values()]
    launches = [getattr(e[0] if isinstance(e, tuple) else e, "launch", None) for e in entries]
    return [launch for launch in launches if hasattr(launch, "options")]
