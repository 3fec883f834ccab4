"""Where the host time of transformers' compiled ``generate()`` goes, per token, by layer count (needs a GPU).

    python -m benchmarks.dev.generate_host                         # Llama-3-8B shape, 4, 12 and 32 layers
    python -m benchmarks.dev.generate_host --layers 32 --variants patched

transformers' fast path (``cache_implementation="static"``) compiles the forward with CUDA graphs; a token then costs
the graph's GPU time plus the host work that does not overlap it: Dynamo's guard evaluation before each replay
("TorchDynamo Cache Lookup"), the CUDA-graph tree's input checks and the graph launch, and ``generate()``'s own
logits processing and stopping checks, which synchronize once per token. This prints, per variant and layer count,
the ms per token (the ``bench_model`` method: time of ``new + 1`` tokens minus time of one, after warm-ups), the
profiler's kernel time per token, and per-token host time of those parts. Random bf16 weights, batch 1, a 64-token
prompt. The layer count separates what grows with the model (guards and graph nodes grow per layer) from what
does not.
"""

from __future__ import annotations

import argparse
import time

import torch

from ..bench_model import build_config, make_variant

# profiler event names (prefixes) whose host time is reported
PARTS = ("TorchDynamo Cache Lookup", "Torch-Compiled Region", "Pregraph bytecode", "cudaGraphLaunch",
         "cudaLaunchKernel", "cudaMemcpyAsync")


def _generate(model, ids: torch.Tensor, new: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                       cache_implementation="static")
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(variant: str, layers: int, new: int = 32) -> dict:
    """ms per token, kernel ms per token and the host ms per token of each of ``PARTS``."""
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    config = build_config("llama3-8b", False)
    config.num_hidden_layers = layers
    model = make_variant(variant, config, torch.device("cuda"), torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (1, 64), device="cuda")
    for n in (new + 1, 1, new + 1):  # compiles both shapes, then the replays' first-time work
        _generate(model, ids, n)
    long = min(_generate(model, ids, new + 1) for _ in range(3))
    short = min(_generate(model, ids, 1) for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _generate(model, ids, new + 1)
    events = prof.key_averages()
    tokens = new + 1
    host = {part: sum(e.self_cpu_time_total for e in events if e.key.startswith(part)) / 1e3 / tokens
            for part in PARTS}
    kernels = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3 / tokens
    del model
    torch.cuda.empty_cache()
    return {"variant": variant, "layers": layers, "ms_per_token": (long - short) / new * 1e3,
            "kernel_ms_per_token": kernels, "host_ms_per_token": host}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dev.generate_host", description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="4,12,32", help="comma-separated layer counts")
    p.add_argument("--variants", default="transformers,patched", help="bench_model variants, comma-separated")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("generate_host needs a GPU")
        return 2
    print("| layers | variant | ms/token | kernels ms/token | " + " | ".join(PARTS) + " |")
    print("| --- " * (4 + len(PARTS)) + "|")
    for layers in (int(v) for v in args.layers.split(",") if v):
        for variant in (v for v in args.variants.split(",") if v):
            r = measure(variant, layers)
            parts = " | ".join(f"{r['host_ms_per_token'][part]:.3f}" for part in PARTS)
            print(f"| {layers} | {variant} | {r['ms_per_token']:.3f} | {r['kernel_ms_per_token']:.3f} | {parts} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
