"""A real pretrained decoder, patched against unpatched: a prompt longer than its sliding window, then greedy decode
steps through a static cache (the sliding layers' windows full: ring buffers in the patched model).

    python -m benchmarks.dev.real_model_decode --model gemma3-270m --prompt 530 --steps 8

The model comes from its PyPI package as ``benchmarks.bench_accuracy`` loads it (Gemma 3 270M: sliding windows of
512 on 15 of its 18 layers); the prompt is the start of ``benchmarks/data/accuracy_texts.txt``. Prints both token
sequences, each step's logits cosine and how many cache layers ended as rings. On CPU the patched model runs under
Triton's interpreter (``TRITON_INTERPRET=1``; about ten minutes for the default sizes on one thread).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import sys
import time

import torch

from benchmarks.bench_accuracy import MODELS, TEXTS, load_model


def decode(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor], list]:
    """Greedy tokens and last-position logits of a prefill and ``steps`` decode steps, and the cache's layers."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens, logits, nxt, start = [], [], ids, 0
    with torch.no_grad():
        for _ in range(steps + 1):
            end = start + nxt.shape[1]
            out = model(nxt, use_cache=True, cache_position=torch.arange(start, end, device=ids.device),
                        **{name: cache})
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            start = end
    return torch.cat(tokens, -1), logits, cache.layers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.real_model_decode", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gemma3-270m", choices=sorted(MODELS))
    p.add_argument("--prompt", type=int, default=530, help="prompt tokens (past the sliding window)")
    p.add_argument("--steps", type=int, default=8, help="greedy decode steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    import triton_ops
    from triton_ops.models import cache_updates

    torch.set_num_threads(1)
    reference, tok = load_model(args.model)
    reference = reference.to(args.device)
    reference.config._attn_implementation = "sdpa"
    model = triton_ops.patch_model(copy.deepcopy(reference))
    ids = tok(TEXTS.read_text(encoding="utf-8"), return_tensors="pt").input_ids[:, : args.prompt].to(args.device)
    results = []
    for m in (model, reference):
        t0 = time.time()
        results.append(decode(m, ids, args.steps))
        print(f"{'patched' if m is model else 'transformers'}: {time.time() - t0:.0f} s", flush=True)
    (ours, ours_logits, layers), (ref, ref_logits, _) = results
    cosines = [torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min().item()
               for a, b in zip(ours_logits, ref_logits, strict=True)]
    rings = sum(bool(getattr(layer, cache_updates.RING_ATTR, False)) for layer in layers)
    print(f"prompt {ids.shape[1]} tokens, {args.steps} steps; attention {model.triton_ops_patch.attention}")
    print(f"tokens equal: {torch.equal(ours, ref)}\n  patched      {ours.tolist()}\n  transformers {ref.tolist()}")
    print("logits cosine per step: " + ", ".join(f"{c:.6f}" for c in cosines))
    print(f"ring layers: {rings} of {len(layers)}; continuation: {tok.decode(ours[0])!r}")
    return 0 if torch.equal(ours, ref) else 1


if __name__ == "__main__":
    sys.exit(main())
