"""Tensor parallelism, measured: decode tokens/s on 1 GPU against N GPUs of one host, our kernels against transformers'
own tensor parallel (issue 19). Run with torchrun, one process per GPU:

    torchrun --nproc-per-node 2 benchmarks/bench_tensor_parallel.py                  # Llama-3-8B and Qwen3-8B shapes
    torchrun --nproc-per-node 2 benchmarks/bench_tensor_parallel.py --models llama3-8b --layers 32 --batches 1,8,64
    torchrun --nproc-per-node 2 benchmarks/bench_tensor_parallel.py --tiny           # harness check (CPU: gloo +
                                                                                     # interpreter, slow)

Models are built from transformers configs with random bf16 weights (the same seed on every rank: the same
weights; nothing is downloaded). For each model and each variant:

- ``bf16``: ``patch_model(model)``; ``fp8``: ``patch_model(model, fp8=True)`` with the default recipe's scales on every
  layer (its first/last-layer rule left out on these few-layer stand-ins); then
  ``triton_ops.parallel.parallelize_model`` (the plan of docs/tensor-parallel.md);
- ``transformers``: the unpatched model; on N GPUs transformers' own ``tp_plan="auto"`` (the random weights are saved
  once with ``save_pretrained`` to ``--hf-dir`` and loaded with ``from_pretrained(..., tp_plan="auto")``).

Rank 0 first runs the variant on one GPU (the other ranks wait), keeps its logits and greedy tokens, then every
rank runs the split model. Measured (eager, ``DynamicCache``, host time included: the tokens/s a user gets): decode
tokens/s at each batch size after a ``--context``-token prefill; the speedup of N GPUs over one; the GPU time in
NCCL kernels per decode step and per layer (profiler, rank 0); correctness of the split model against one GPU: the
cosine of the prefill's last-token logits and the agreement of ``--tokens`` greedy tokens.

Writes ``tensor-parallel-<device>x<N>.md`` / ``.json`` to ``--out`` (default ``docs/benchmarks``; rank 0 only).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import benchmarks  # noqa: E402,F401  (sets TRITON_INTERPRET without a GPU; finds the packages' src folders)

# Shapes of the published checkpoints (config.json of meta-llama/Meta-Llama-3-8B and Qwen/Qwen3-8B).
MODELS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     rope_theta=1000000.0, max_position_embeddings=8192, rms_norm_eps=1e-6),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=256, max_position_embeddings=256)
VARIANTS = ("bf16", "fp8", "transformers")


def log(*a) -> None:
    if dist.get_rank() == 0:
        print(*a, flush=True)


def build_model(name: str, args, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(MODELS[name])
    model_type = spec.pop("model_type")
    if args.tiny:
        spec.update(TINY)
    elif args.layers:
        spec["num_hidden_layers"] = args.layers
    config = AutoConfig.for_model(model_type, **spec)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # the same weights on every rank: seeded, generated on the same kind of device
        gen = torch.Generator(device=device).manual_seed(1)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def variant_model(name: str, variant: str, args, device, dtype):
    from triton_ops import patch_model

    model = build_model(name, args, device, dtype)
    if variant == "fp8":
        # the default recipe's scales and MLP rule on every layer: its first/last-layer rule would keep most of a
        # few-layer stand-in (all of a two-layer one) in bf16
        from dataclasses import replace

        from fp8_gemm import RECIPES

        patch_model(model, fp8=True, fp8_recipe=replace(RECIPES["default"], name="default (interior layers)",
                                                        keep_edge_layers=(0, 0)))
    elif variant != "transformers":
        patch_model(model)
    return model


def cache_kwarg(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_tokens_per_s(model, batch: int, context: int, steps: int, warmup: int, device, together: bool) -> float:
    """Prefill ``context`` tokens, then time ``steps`` decode steps (one token per sequence each)."""
    from transformers import DynamicCache

    gen = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)
    cache = DynamicCache()
    kw = cache_kwarg(model)
    out = model(ids, use_cache=True, **{kw: cache})
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(warmup):
        nxt = model(nxt, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
    _sync(device)
    if together:  # every rank starts the timed steps at once
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = model(nxt, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


@torch.inference_mode()
def profile_step(model, context: int, device, steps: int = 5) -> dict[str, float] | None:
    """Per batch-1 decode step on this rank (profiler): GPU kernels launched, copies among them, GPU time in NCCL
    (communication) kernels. At world size 1 the split model must launch what the unsplit one does."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(4))
    ids = ids.to(device)
    cache, kw = DynamicCache(), cache_kwarg(model)
    nxt = model(ids, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
    nxt = model(nxt, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            nxt = model(nxt, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
        _sync(device)
    gpu = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    nccl = sum(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
               for e in gpu if "nccl" in e.name.lower())
    return {"kernels_per_step": len(gpu) / steps,
            "copies_per_step": sum("memcpy" in e.name.lower() or "memset" in e.name.lower() for e in gpu) / steps,
            "nccl_us_per_step": nccl / steps}


@torch.inference_mode()
def reference(model, args, device) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=gen).to(device)
    logits = model(ids).logits[:, -1].float()
    tokens = model.generate(ids, max_new_tokens=args.tokens, do_sample=False, min_new_tokens=args.tokens,
                            pad_token_id=0)[:, ids.shape[1]:]
    return {"logits": logits.cpu(), "tokens": tokens.cpu()}


def measure(model, args, device, layers: int, comm: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"tokens_per_s": {}}
    for b in args.batches:
        res["tokens_per_s"][b] = decode_tokens_per_s(model, b, args.context, args.steps, args.warmup, device,
                                                     together=comm)
        log(f"    batch {b}: {res['tokens_per_s'][b]:.1f} tokens/s")
    prof = profile_step(model, args.context, device)
    if prof is not None:
        res.update(prof)
        res["nccl_us_per_layer"] = prof["nccl_us_per_step"] / layers
        log(f"    per step: {prof['kernels_per_step']:.0f} kernels ({prof['copies_per_step']:.0f} copies), "
            f"{prof['nccl_us_per_step']:.0f} us in NCCL")
    return res


def free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_tp_model(path: str, device, dtype):
    """transformers' own tensor parallel: ``from_pretrained(..., tp_plan="auto")``."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.distributed import DistributedConfig

        kwargs = {"distributed_config": DistributedConfig(tp_plan="auto")}
    except ImportError:
        kwargs = {"tp_plan": "auto"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def run_model(name: str, args, device, dtype, mesh) -> dict[str, Any]:
    from triton_ops.parallel import parallelize_model

    rank, world = dist.get_rank(), dist.get_world_size()
    entry: dict[str, Any] = {"variants": {}}
    hf_dir = None
    for variant in args.variants:
        log(f"== {name} {variant}")
        row: dict[str, Any] = {}
        ref = None
        layers = 0
        # one GPU: rank 0 alone
        if rank == 0:
            model = variant_model(name, variant, args, device, dtype)
            layers = model.config.num_hidden_layers
            log("  1 GPU")
            row["one"] = measure(model, args, device, layers, comm=False)
            ref = reference(model, args, device)
            if variant == "transformers" and world > 1:
                hf_dir = args.hf_dir or tempfile.mkdtemp(prefix="tp-bench-")
                model.save_pretrained(hf_dir)
            free(model)
            model = None
        holder = [hf_dir]
        dist.broadcast_object_list(holder, src=0)
        hf_dir = holder[0]
        dist.barrier()
        # N GPUs
        log(f"  {world} GPUs")
        if variant == "transformers":
            model = hf_tp_model(hf_dir, device, dtype) if world > 1 else variant_model(name, variant, args, device,
                                                                                        dtype)
        else:
            model = variant_model(name, variant, args, device, dtype)
            parallelize_model(model, mesh)
        layers = model.config.num_hidden_layers
        row["split"] = measure(model, args, device, layers, comm=True)
        out = reference(model, args, device)
        if rank == 0:
            cos = torch.nn.functional.cosine_similarity(out["logits"].double(), ref["logits"].double()).item()
            agree = (out["tokens"] == ref["tokens"]).float().mean().item()
            first = (out["tokens"] != ref["tokens"]).nonzero()
            row["logits_cosine"] = cos
            row["greedy_agreement"] = agree
            row["first_divergence"] = None if first.numel() == 0 else int(first[0, 1])
            row["speedup"] = {b: row["split"]["tokens_per_s"][b] / row["one"]["tokens_per_s"][b]
                              for b in args.batches}
            log(f"  cosine {cos:.5f}, greedy agreement {agree:.3f}, speedup "
                + ", ".join(f"b{b} {s:.2f}x" for b, s in row["speedup"].items()))
        free(model)
        model = None
        dist.barrier()
        entry["variants"][variant] = row
    return entry


def render(report: dict[str, Any]) -> str:
    world = report["world_size"]
    lines = [f"# Tensor parallelism: 1 vs {world} GPUs ({report['device']})", "",
             f"Command: `{report['command']}`", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
             f"NCCL environment: {report['nccl_env'] or 'defaults'}", "",
             f"Decode after a {report['args']['context']}-token prefill, eager, DynamicCache, host time included; "
             f"{report['args']['steps']} timed steps. `bf16` / `fp8`: `patch_model` then "
             "`triton_ops.parallel.parallelize_model`; `transformers`: unpatched, on N GPUs `tp_plan=\"auto\"`.", ""]
    for name, entry in report["models"].items():
        lines += [f"## {name} ({entry['layers']} layers)", "",
                  "| variant | batch | 1 GPU tok/s | " + f"{world} GPUs tok/s | speedup | NCCL us/step | "
                  "NCCL us/layer | kernels/step 1 GPU, split | logits cosine | greedy agreement |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for variant, row in entry["variants"].items():
            for b in report["args"]["batches"]:
                one = row["one"]["tokens_per_s"].get(b)
                split = row["split"]["tokens_per_s"].get(b)
                sp = row.get("speedup", {}).get(b)
                nccl = row["split"].get("nccl_us_per_step")
                per_layer = row["split"].get("nccl_us_per_layer")
                k1, k2 = row["one"].get("kernels_per_step"), row["split"].get("kernels_per_step")
                kernels = "-" if k1 is None else f"{k1:.0f}, {k2:.0f}"
                lines.append(
                    f"| {variant} | {b} | {one:.1f} | {split:.1f} | {sp:.2f}x | "
                    f"{'-' if nccl is None else f'{nccl:.0f}'} | {'-' if per_layer is None else f'{per_layer:.1f}'} | "
                    f"{kernels} | "
                    f"{row.get('logits_cosine', float('nan')):.5f} | {row.get('greedy_agreement', float('nan')):.3f} |")
        lines.append("")
    # ours against transformers' tensor parallel, same run
    lines += ["## Ours against transformers' tensor parallel (same GPUs, same run)", "",
              "| model | batch | bf16 / transformers | fp8 / transformers |", "| --- | --- | --- | --- |"]
    for name, entry in report["models"].items():
        v = entry["variants"]
        if "transformers" not in v:
            continue
        for b in report["args"]["batches"]:
            base = v["transformers"]["split"]["tokens_per_s"][b]
            cells = [f"{v[k]['split']['tokens_per_s'][b] / base:.2f}x" if k in v else "-" for k in ("bf16", "fp8")]
            lines.append(f"| {name} | {b} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama3-8b,qwen3-8b")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the checkpoint's)")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens compared against one GPU")
    p.add_argument("--hf-dir", default=None, help="where the random weights are saved for transformers' TP")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: checks the harness")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"--variants: {v!r} is not one of {VARIANTS}")
    if args.tiny:
        args.context, args.steps, args.warmup, args.tokens = min(args.context, 8), min(args.steps, 2), 1, 4
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    from torch.distributed.device_mesh import init_device_mesh

    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    import transformers
    import triton

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "world_size": dist.get_world_size(),
        "command": "torchrun --nproc-per-node {} benchmarks/bench_tensor_parallel.py {}".format(
            dist.get_world_size(), " ".join(sys.argv[1:] if argv is None else argv)).strip(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "transformers": transformers.__version__,
                     "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else "-"},
        "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": {},
    }
    try:
        for name in args.models:
            entry = run_model(name, args, device, dtype, mesh)
            spec = dict(MODELS[name], **(TINY if args.tiny else {}))
            entry["layers"] = spec["num_hidden_layers"] if args.tiny else (args.layers or spec["num_hidden_layers"])
            report["models"][name] = entry
    finally:
        if dist.get_rank() == 0 and report["models"]:
            args.out.mkdir(parents=True, exist_ok=True)
            dev = "cpu" if not cuda else torch.cuda.get_device_name(device).split()[-1].lower()
            stem = f"tensor-parallel-{dev}x{dist.get_world_size()}"
            (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
            (args.out / f"{stem}.md").write_text(render(report))
            print(f"wrote {args.out / stem}.md / .json", flush=True)
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
