"""Layer-level benchmark: one decoder layer's decode step, unpatched against ``patch_model``, on one GPU.

    python -m benchmarks.bench_decode_layer                     # Llama-3-8B and Qwen3-8B layers, M = 1, 8, 64
    python -m benchmarks.bench_decode_layer --models llama3-8b --rows 1
    python -m benchmarks.bench_decode_layer --tiny              # small layers (without a GPU: a correctness check)

Each model is built from its published config with ONE decoder layer and random bf16 weights on the GPU (nothing
is downloaded). A decode step is the base model's forward on ``M`` rows of one token each (``inputs_embeds``: no
embedding lookup, no LM head; the final RMSNorm and the rotary tables' lookup are included) against a
``StaticCache`` holding ``--context`` tokens (1k by default). Variants:

- ``transformers``: the layer as transformers runs it (sdpa attention), eager;
- ``transformers-compile``: the same under ``torch.compile`` (Inductor, default mode);
- ``patched``: ``patch_model(model)`` (packed q/k/v, RoPE in place, ``decode_attention``, fused add + RMSNorm,
  fused gated MLP);
- ``patched-fp8-default``: ``patch_model(model, fp8=True)`` with the default recipe's scales (group weight scales,
  1x128 activation blocks; one layer: no decoder stack, so every Linear converts, ``down_proj`` too);
- ``patched-fp8``: ``patch_model(model, fp8=True, fp8_recipe="channel")`` (every Linear FP8, per channel).

Measured per variant and row count, in one run: GPU time of a step (the profiler's kernel time: no host time) and
its kernels, the attention kernels' share of it (kernels whose name says attention, sdpa, fmha or flash: the
attention over the cache, reported apart), and the step replayed from a CUDA graph (event-timed; "n/a" where
capture fails). The floor: the bytes of the layer's weights and the final norm (FP8 where the variant made them
FP8) divided by the copy bandwidth measured in the same run. Writes ``decode-layer-<device>.md`` / ``.json`` to
``--out`` (default ``docs/benchmarks`` on a GPU). Without a GPU (``--tiny`` under Triton's interpreter): the
patched layers' outputs against transformers', no timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import ROOT
from .bench_model import (
    GRAPH_CALLS,
    build_config,
    cache_kwarg,
    check_known,
    copy_bandwidth_gbps,
    fill_cache,
    graph_us,
    known_variants,
    make_variant,
    profiled_gpu_us,
    static_cache,
)

LAYER_MODELS = ("llama3-8b", "qwen3-8b")
VARIANTS = ("transformers", "transformers-compile", "patched", "patched-fp8-default", "patched-fp8")
ATTENTION_NAMES = ("attention", "sdpa", "fmha", "flash")


def layer_config(name: str, tiny: bool, layers: int = 1):
    config = build_config(name, tiny)
    config.num_hidden_layers = layers
    if hasattr(config, "layer_types") and config.layer_types:
        config.layer_types = config.layer_types[:layers]
    return config


def layer_bytes(model: torch.nn.Module) -> int:
    """Bytes a step reads of weights: the decoder layer's parameters and buffers (FP8 weights and their scales
    where converted) and the final norm's weight; the rotary tables are left out (a few rows are read)."""
    base = model.model
    tensors = {id(t): t for m in (base.layers[0], base.norm) for t in (*m.parameters(), *m.buffers())}
    skip = {id(b) for name, b in base.layers[0].named_buffers() if "inv_freq" in name}
    return sum(t.numel() * t.element_size() for i, t in tensors.items() if i not in skip)


def build(variant: str, config, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The one-layer model of ``variant`` and the callable that runs its base model (compiled for the compile
    variant)."""
    model = make_variant("transformers" if variant == "transformers-compile" else variant, config, device,
                         torch.bfloat16)
    base = model.model
    if variant == "transformers-compile":
        base = torch.compile(base)
    return model, base


def make_step(model, base, rows: int, context: int, steps: int):
    """A decode step of ``rows`` sequences of one token each, after ``context`` cached tokens."""
    kw = cache_kwarg(model)
    cache = static_cache(model, context + 8 + steps + GRAPH_CALLS)
    fill_cache(model, cache, rows, context)
    x = torch.randn(rows, 1, model.config.hidden_size, device=model.device, dtype=torch.bfloat16)

    @torch.inference_mode()
    def step():
        return base(inputs_embeds=x, **{kw: cache}, use_cache=True).last_hidden_state

    return step


def measure(variant: str, config, args, device, bandwidth: float, graphs: bool = True) -> dict[str, Any]:
    model, base = build(variant, config, device)
    nbytes = layer_bytes(model)
    rec: dict[str, Any] = {"variant": variant, "weight_bytes": nbytes, "floor_us": nbytes / (bandwidth * 1e3),
                           "rows": []}
    for m in args.rows:
        step = make_step(model, base, m, args.context, args.steps)
        for _ in range(3):  # warm-up: compiles, plans, autotunes outside the timing
            step()
        torch.cuda.synchronize()
        gpu_us, kernels, top = profiled_gpu_us(step, args.steps, top=64)
        attn_us = sum(k["us"] for k in top if any(a in k["kernel"].lower() for a in ATTENTION_NAMES))
        rec["rows"].append({"M": m, "gpu_us": gpu_us, "kernels": kernels, "attention_us": attn_us,
                            "graph_us": graph_us(step) if graphs else None, "top_kernels": top[:8]})
        print(f"  {variant} M={m}: {gpu_us:.1f} us GPU ({kernels:.0f} kernels, attention {attn_us:.1f} us), "
              f"floor {rec['floor_us']:.1f} us", file=sys.stderr)
    del model, base
    torch.cuda.empty_cache()
    return rec


def _marginal(row: dict[str, Any]) -> str:
    return f"{row['layer_us']:.1f} us ({row['layer_kernels']:.0f})" if "layer_us" in row else "-"


def _marginal_x_floor(row: dict[str, Any], floor_us: float) -> str:
    """The added layer against its own floor where recorded (runs before session 20: the one-layer model's)."""
    return f"{row['layer_us'] / row.get('layer_floor_us', floor_us):.2f}x" if "layer_us" in row else "-"


def add_marginal(rec: dict[str, Any], rec2: dict[str, Any]) -> None:
    """The cost of one more layer: the two-layer model's step minus the one-layer model's, per row count. What a
    32-layer model pays per layer: the step's once-per-model kernels (rotary tables, cache positions, the final
    norm) cancel out. Its floor is the two models' difference too: an FP8 recipe can convert the layers of a
    decoder stack differently from a lone layer (the default keeps ``down_proj`` in bf16 only where it finds a
    stack), so the one-layer model's floor is not the added layer's."""
    for row, row2 in zip(rec["rows"], rec2["rows"]):
        row["layer_us"] = row2["gpu_us"] - row["gpu_us"]
        row["layer_kernels"] = row2["kernels"] - row["kernels"]
        row["layer_floor_us"] = rec2["floor_us"] - rec["floor_us"]


def _cell(v: float | str | None) -> str:
    return v if isinstance(v, str) else "-" if v is None else f"{v:.1f} us"


def render(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# One decoder layer's decode step on the {env.get('device', '?')}", "",
             f"Command: `{report['command']}`; torch {env.get('torch')}, triton {env.get('triton')}, transformers "
             f"{env.get('transformers')}; {env.get('date_utc', '')}, commit {env.get('git_commit')}. Copy "
             f"bandwidth measured in this run: {report['copy_gbps']:,.0f} GB/s.", "",
             f"One layer built from each model's config, random bf16 weights, a `StaticCache` of "
             f"{report['context']} tokens; M rows of one token each. GPU time = the profiler's kernel time of a "
             "step (no host time); attention = its attention kernels; graph = the step replayed from a CUDA graph; "
             "floor = the layer's weight bytes (and the final norm's) / the copy bandwidth. The step includes the "
             "final RMSNorm and the rotary table lookup (no embedding, no LM head).", ""]
    for model in report["models"]:
        lines += [f"## {model['name']} (hidden {model['hidden']}, MLP {model['intermediate']})", "",
                  "| variant | M | GPU time | CUDA graph | kernels | attention | rest | floor | x floor | "
                  "vs transformers | vs torch.compile | one more layer (kernels) | x floor |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        base = {r["M"]: r["gpu_us"] for v in model["variants"] if v["variant"] == "transformers" for r in v["rows"]}
        comp = {r["M"]: r["gpu_us"] for v in model["variants"] if v["variant"] == "transformers-compile"
                for r in v["rows"]}
        for v in model["variants"]:
            for r in v["rows"]:
                t = r["gpu_us"]
                vs_base = f"{base[r['M']] / t:.2f}x" if r["M"] in base else "-"
                vs_comp = f"{comp[r['M']] / t:.2f}x" if r["M"] in comp else "-"
                lines.append(
                    f"| {v['variant']} | {r['M']} | {t:.1f} us | {_cell(r['graph_us'])} | {r['kernels']:.0f} | "
                    f"{r['attention_us']:.1f} us | {t - r['attention_us']:.1f} us | {v['floor_us']:.1f} us | "
                    f"{t / v['floor_us']:.2f}x | {vs_base} | {vs_comp} | {_marginal(r)} | "
                    f"{_marginal_x_floor(r, v['floor_us'])} |")
        lines += _where_time_goes(model)
        for err in model.get("errors", []):
            lines.append(f"\nFailed: {err}")
        lines.append("")
    return "\n".join(lines)


def _where_time_goes(model: dict[str, Any]) -> list[str]:
    """The patched variants' largest kernels at one row: what the rest of the step (beyond the floor) is made of."""
    lines = []
    for v in model["variants"]:
        row = next((r for r in v["rows"] if r["M"] == 1), None)
        if not v["variant"].startswith("patched") or row is None or not row.get("top_kernels"):
            continue
        listed = sum(k["us"] for k in row["top_kernels"])
        lines += ["", f"{v['variant']}, M = 1: its largest kernels ({listed:.1f} of {row['gpu_us']:.1f} us; the "
                  f"other {row['kernels'] - sum(k['launches'] for k in row['top_kernels']):.0f} launches take the "
                  "rest)", "", "| kernel | us per step | launches |", "| --- | --- | --- |"]
        lines += [f"| `{k['kernel'][:90].replace('|', '/')}` | {k['us']:.1f} | {k['launches']:.0f} |"
                  for k in row["top_kernels"]]
    return lines


def plot(report: dict[str, Any], path: Path) -> bool:
    """GPU time per step of every variant at each M, beside each variant's weight-read floor."""
    from triton_ops.benchmark._plots import pyplot

    plt = pyplot()
    if plt is None:
        return False
    models = report["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        variants = model["variants"]
        rows = sorted({r["M"] for v in variants for r in v["rows"]})
        width = 0.8 / max(1, len(variants))
        for i, v in enumerate(variants):
            times = {r["M"]: r["gpu_us"] for r in v["rows"]}
            xs = [j + i * width for j, m in enumerate(rows) if m in times]
            bars = ax.bar(xs, [times[m] for m in rows if m in times], width, label=v["variant"])
            ax.hlines(v["floor_us"], min(xs) - width / 2, max(xs) + width / 2, colors=bars.patches[0].get_facecolor(),
                      linestyles="dashed", linewidth=1) if xs else None
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(rows))], [f"M = {m}" for m in rows])
        ax.set(yscale="log", ylabel="GPU time per step (us); dashed: weight-read floor",
               title=f"{model['name']}: one decoder layer, {report['context']}-token cache")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def check_on_cpu(args) -> int:
    """No GPU: the patched one-layer models against transformers' on a tiny config under the interpreter."""
    bad = 0
    for name in args.models:
        config = layer_config(name, tiny=True)
        ids = torch.randint(0, config.vocab_size, (2, 5))
        ref = make_variant("transformers", config, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            want = ref.model(input_ids=ids).last_hidden_state
        for variant in ("patched",):
            model = make_variant(variant, config, torch.device("cpu"), torch.float32)
            with torch.no_grad():
                got = model.model(input_ids=ids).last_hidden_state
            err = ((got - want).norm() / want.norm()).item()
            ok = err < 1e-4
            bad += not ok
            print(f"{name} one layer, {variant}: rel. error {err:.1e} {'ok' if ok else 'FAIL'}")
    print("no GPU: correctness only (timings need a GPU)")
    return 1 if bad else 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_decode_layer", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(LAYER_MODELS), help=f"comma-separated, of {', '.join(LAYER_MODELS)}")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS)}; a patched one with the suffix -fused-norms: "
                        "its norms inside the GEMMs' launches")
    p.add_argument("--rows", default="1,8,64", help="row counts M (sequences of one token), comma-separated")
    p.add_argument("--context", type=int, default=1024, help="tokens in the cache")
    p.add_argument("--steps", type=int, default=10, help="profiled steps per measurement")
    p.add_argument("--tiny", action="store_true", help="small layers: checks the harness")
    p.add_argument("--out", type=Path, default=None, help="report folder (default docs/benchmarks on a GPU)")
    p.add_argument("--no-marginal", action="store_true",
                   help="skip the two-layer models (the 'one more layer' columns: half the run time)")
    p.add_argument("--from-json", type=Path, default=None,
                   help="render the report (markdown and plot) again from a saved JSON, beside it; no measuring")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    args.rows = [int(r) for r in args.rows.split(",") if r]
    check_known(p, (("model", args.models, LAYER_MODELS), ("variant", args.variants, known_variants(VARIANTS))))
    return args


def write_report(report: dict[str, Any], out: Path, stem: str, plots: bool = True) -> bool:
    """The JSON, the markdown and (with ``plots`` and matplotlib) the plot; whether a plot was written."""
    plotted = plots and plot(report, out / f"{stem}.png")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{stem}.md").write_text(render(report) + (f"\n![GPU time per step](./{stem}.png)\n" if plotted else ""))
    return plotted


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        path = args.from_json
        plotted = write_report(json.loads(path.read_text()), path.parent, path.stem)
        print(f"rendered {path.with_suffix('.md')}" + (f" and {path.with_suffix('.png')}" if plotted else
                                                         " (no plot: matplotlib is not installed)"))
        return 0
    if not torch.cuda.is_available():
        return check_on_cpu(args)
    import transformers
    from triton_ops.benchmark._env import collect_environment, device_tag

    device = torch.device("cuda")
    env = collect_environment(measured=True)
    env["transformers"] = transformers.__version__
    report: dict[str, Any] = {"environment": env, "copy_gbps": copy_bandwidth_gbps(device), "context": args.context,
                              "command": "python -m benchmarks.bench_decode_layer " + " ".join(sys.argv[1:]),
                              "models": []}
    out = args.out or ROOT / "docs" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"decode-layer-{device_tag(env['device'])}" + ("-tiny" if args.tiny else "")
    t0 = time.monotonic()
    for name in args.models:
        config = layer_config(name, args.tiny)
        config2 = None if args.no_marginal else layer_config(name, args.tiny, layers=2)
        entry: dict[str, Any] = {"name": name, "hidden": config.hidden_size,
                                 "intermediate": config.intermediate_size, "variants": []}
        report["models"].append(entry)
        for variant in args.variants:
            try:
                rec = measure(variant, config, args, device, report["copy_gbps"])
                if config2 is not None:
                    add_marginal(rec, measure(variant, config2, args, device, report["copy_gbps"], graphs=False))
                entry["variants"].append(rec)
            except Exception as exc:  # noqa: BLE001 - a variant that fails is reported, the others still run
                print(f"  {name} {variant} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                entry.setdefault("errors", []).append(f"{variant}: {type(exc).__name__}: {str(exc)[:300]}")
            write_report(report, out, stem, plots=False)
    write_report(report, out, stem)
    print(render(report))
    print(f"({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    return 1 if any(m.get("errors") for m in report["models"]) else 0


if __name__ == "__main__":
    sys.exit(main())
