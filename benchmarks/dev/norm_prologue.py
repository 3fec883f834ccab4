"""A decode step's RMSNorms inside the GEMMs they feed, against their own launches, in whole models on one GPU.

    python -m benchmarks.dev.norm_prologue                                # Llama-3-8B, bf16 and default FP8
    python -m benchmarks.dev.norm_prologue --models llama3-8b,qwen3-8b --decode 1x1024,8x1024

For each model and variant (``bench_model``'s: random weights at the published shape, a ``StaticCache`` filled with
``context`` tokens), one patched model is timed in three modes, alternately (``--rounds`` times each), in the same
process: ``off`` (both norms their own launches: ``triton_ops.models.decoder_layers.INPUT_NORM_IN_QKV`` and
``POST_NORM_IN_MLP`` False), ``input`` (the input norm inside the packed q/k/v GEMM) and ``both`` (also the
post-attention norm inside the gated MLP, the residual add inside ``o_proj``): the GPU time of a decode step (the
profiler's kernel time, as ``bench_model`` reports it), its kernel count, and the step in a CUDA graph (kernel time
plus the gaps between launches: what a compiled ``generate()`` pays). The logits of one step from the same cache are
compared with ``off``'s (``input`` must be equal: the prologue writes what the norm kernel writes; ``both`` rounds
the residual sum once instead of twice). Writes ``norm_prologue.json`` to ``--out`` (default /tmp). Needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from ..bench_model import build_config, cache_kwarg, fill_cache, make_variant, profiled_gpu_us, static_cache
from .weight_only_chain import graph_us as graph_step_us

MODES = {"off": (False, False), "input": (True, False), "both": (True, True)}


def set_mode(mode: str) -> None:
    """The decoder layers' switches for ``mode`` (gpt-oss's residual add in its MoE's combine goes with ``both``)."""
    from triton_ops.models import decoder_layers

    decoder_layers.INPUT_NORM_IN_QKV, decoder_layers.POST_NORM_IN_MLP = MODES[mode]
    decoder_layers.RESIDUAL_IN_MOE_COMBINE = mode == "both"


@torch.inference_mode()
def measure(model, batch: int, context: int, rounds: int, steps: int) -> dict:
    kw = cache_kwarg(model)
    room = 8 + rounds * len(MODES) * (steps + 110)  # each mode's profiled steps, graph warm-up, capture, 100 replays
    cache = static_cache(model, context + room)
    fill_cache(model, cache, batch, context)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=model.device)
    out: dict = {"batch": batch, "context": context, **{mode: [] for mode in MODES}}
    for _ in range(rounds if model.device.type == "cuda" else 0):  # (on a CPU: the logits check alone)
        for key in MODES:
            set_mode(key)
            model(input_ids=ids, **{kw: cache}, use_cache=True)
            gpu_us, kernels, top = profiled_gpu_us(lambda: model(input_ids=ids, **{kw: cache}, use_cache=True),
                                                   steps, top=4)
            try:
                graph_us = graph_step_us(lambda: model(input_ids=ids, **{kw: cache}, use_cache=True))
            except Exception as e:  # noqa: BLE001 - an eager forward that cannot be captured: profiler time only
                print(f"no CUDA graph: {type(e).__name__}: {str(e)[:200]}", flush=True)
                graph_us = float("nan")
            out[key].append({"gpu_us": gpu_us, "kernels": kernels, "graph_us": graph_us, "top": top})
    # one step's logits from the same cache contents in each mode (the timed steps wrote at different positions): a
    # fresh cache per mode, filled alike with the separate norms (a sliding-window layer rolls its buffer, so
    # rewinding a cache's counters would not restore it)
    logits = {}
    for key in MODES:
        set_mode("off")
        torch.manual_seed(1)
        cache_b = static_cache(model, context + 2)
        fill_cache(model, cache_b, batch, context)
        set_mode(key)
        logits[key] = model(input_ids=ids, **{kw: cache_b}, use_cache=True).logits.float()
        del cache_b
    set_mode("both")
    nan = float("nan")
    for key in MODES:
        runs = out[key]
        out[f"{key}_gpu_us"] = statistics.median(r["gpu_us"] for r in runs) if runs else nan
        out[f"{key}_graph_us"] = statistics.median(r["graph_us"] for r in runs) if runs else nan
        out[f"{key}_kernels"] = runs[0]["kernels"] if runs else nan
        out[f"{key}_logits_equal_off"] = bool(torch.equal(logits[key], logits["off"]))
        out[f"{key}_logits_max_abs_diff"] = (logits[key] - logits["off"]).abs().max().item()
        out[f"{key}_logits_cosine"] = torch.nn.functional.cosine_similarity(
            logits[key].flatten().double(), logits["off"].flatten().double(), dim=0).item()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.norm_prologue", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llama3-8b")
    p.add_argument("--variants", default="patched,patched-fp8-default")
    p.add_argument("--decode", default="1x1024,8x1024")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("/tmp"))
    p.add_argument("--bf16-rows", type=int, default=None,
                   help="triton_ops.models.layers.BF16_FUSED_MAX_ROWS for the run: the most 16-bit rows whose "
                        "projections take decode_linear to fuse a norm or an add (default: the package's, 1)")
    p.add_argument("--tiny", action="store_true", help="bench_model's 2 small layers, on the CPU without a GPU: the "
                   "logits check alone (under TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    if args.bf16_rows is not None:
        from triton_ops.models import layers as model_layers

        model_layers.BF16_FUSED_MAX_ROWS = args.bf16_rows
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for name in args.models.split(","):
        config = build_config(name, tiny=args.tiny)
        for variant in args.variants.split(","):
            model = make_variant(variant, config, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
            for point in args.decode.split(","):
                batch, context = (int(v) for v in point.split("x"))
                r = measure(model, batch, context, args.rounds, args.steps)
                r.update(model=name, variant=variant)
                results.append(r)
                print(f"{name} {variant} {point}: " + "; ".join(
                    f"{key} GPU {r[key + '_gpu_us']:.0f} us, graph {r[key + '_graph_us']:.0f} us, "
                    f"{r[key + '_kernels']:.0f} kernels, logits equal {r[key + '_logits_equal_off']} "
                    f"(cos {r[key + '_logits_cosine']:.6f})" for key in MODES), flush=True)
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "norm_prologue.json").write_text(json.dumps(results, indent=1))
            del model
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
