"""A decoder layer's input RMSNorm inside its q/k/v GEMM, against its own launch, in whole models on one GPU.

    python -m benchmarks.dev.norm_prologue                                # Llama-3-8B, bf16 and default FP8
    python -m benchmarks.dev.norm_prologue --models llama3-8b,qwen3-8b --decode 1x1024,8x1024

For each model and variant (``bench_model``'s: random weights at the published shape, a ``StaticCache`` filled with
``context`` tokens), one patched model is timed with ``triton_ops.models.decoder_layers.INPUT_NORM_IN_QKV`` on and
off, alternately (``--rounds`` times each), in the same process: the GPU time of a decode step (the profiler's
kernel time, as ``bench_model`` reports it), its kernel count, and the step in a CUDA graph (kernel time plus the
gaps between launches: what a compiled ``generate()`` pays). The decode step's logits are compared between the two
(the prologue writes what the norm kernel writes: they must be equal). Writes ``norm_prologue.json`` to ``--out``
(default /tmp). Needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from ..bench_model import build_config, cache_kwarg, fill_cache, make_variant, profiled_gpu_us, static_cache


def graphed_step_us(model, ids, cache, kw: str, replays: int = 20) -> float:
    """Median time of one decode step replayed from a CUDA graph (the cache's write position advances each replay:
    the cache has room)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            model(input_ids=ids, **{kw: cache}, use_cache=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(input_ids=ids, **{kw: cache}, use_cache=True)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    del graph
    return statistics.median(times)


@torch.inference_mode()
def measure(model, batch: int, context: int, rounds: int, steps: int) -> dict:
    from triton_ops.models import decoder_layers

    kw = cache_kwarg(model)
    room = 8 + rounds * 2 * (steps + 30)
    cache = static_cache(model, context + room)
    fill_cache(model, cache, batch, context)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=model.device)
    out: dict = {"batch": batch, "context": context, "on": [], "off": []}
    logits = {}
    for _ in range(rounds):
        for flag in (True, False):
            decoder_layers.INPUT_NORM_IN_QKV = flag
            key = "on" if flag else "off"
            logits[key] = model(input_ids=ids, **{kw: cache}, use_cache=True).logits.float()
            gpu_us, kernels, top = profiled_gpu_us(lambda: model(input_ids=ids, **{kw: cache}, use_cache=True),
                                                   steps, top=4)
            try:
                graph_us = graphed_step_us(model, ids, cache, kw)
            except Exception as e:  # noqa: BLE001 - an eager forward that cannot be captured: profiler time only
                print(f"no CUDA graph: {type(e).__name__}: {str(e)[:200]}", flush=True)
                graph_us = float("nan")
            out[key].append({"gpu_us": gpu_us, "kernels": kernels, "graph_us": graph_us, "top": top})
    decoder_layers.INPUT_NORM_IN_QKV = True
    # the two logits came from different cache positions (each step writes one): compare a fresh pair instead
    for flag in (True, False):
        decoder_layers.INPUT_NORM_IN_QKV = flag
        cache_b = static_cache(model, context + 4)
        torch.manual_seed(1)
        fill_cache(model, cache_b, batch, context)
        logits["on" if flag else "off"] = model(input_ids=ids, **{kw: cache_b}, use_cache=True).logits.float()
        del cache_b
    decoder_layers.INPUT_NORM_IN_QKV = True
    out["logits_equal"] = bool(torch.equal(logits["on"], logits["off"]))
    out["logits_max_abs_diff"] = (logits["on"] - logits["off"]).abs().max().item()
    for key in ("on", "off"):
        out[f"{key}_gpu_us"] = statistics.median(r["gpu_us"] for r in out[key])
        out[f"{key}_graph_us"] = statistics.median(r["graph_us"] for r in out[key])
        out[f"{key}_kernels"] = out[key][0]["kernels"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.norm_prologue", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llama3-8b")
    p.add_argument("--variants", default="patched,patched-fp8-default")
    p.add_argument("--decode", default="1x1024,8x1024")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("/tmp"))
    args = p.parse_args(argv)
    device = torch.device("cuda")
    results = []
    for name in args.models.split(","):
        config = build_config(name, tiny=False)
        for variant in args.variants.split(","):
            model = make_variant(variant, config, device, torch.bfloat16)
            for point in args.decode.split(","):
                batch, context = (int(v) for v in point.split("x"))
                r = measure(model, batch, context, args.rounds, args.steps)
                r.update(model=name, variant=variant)
                results.append(r)
                print(f"{name} {variant} {point}: GPU {r['off_gpu_us']:.0f} -> {r['on_gpu_us']:.0f} us, graph "
                      f"{r['off_graph_us']:.0f} -> {r['on_graph_us']:.0f} us, kernels {r['off_kernels']:.0f} -> "
                      f"{r['on_kernels']:.0f}, logits equal {r['logits_equal']} "
                      f"(max diff {r['logits_max_abs_diff']:.3g})", flush=True)
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "norm_prologue.json").write_text(json.dumps(results, indent=1))
            del model
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
