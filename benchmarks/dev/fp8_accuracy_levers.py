"""FP8 accuracy levers beyond the library's recipes, emulated on the CPU (issue 20's research, session 13).

    python -m benchmarks.dev.fp8_accuracy_levers [--levers sensitivity,weight-only,gptq]

Same model (SmolLM2-135M from its PyPI package), texts and scoring as ``python -m benchmarks.bench_accuracy``
(perplexity and KL(bf16 || FP8) over the twenty built-in texts); the calibration text only for statistics. "The
default" below is the library's default of sessions 13-14, the recipe now named ``block-mlp-out`` (128x128 weight
blocks, 1x128 activation blocks, every ``down_proj`` in bf16), which these levers started from:

- ``sensitivity``: each decoder layer alone in FP8 (the default recipe with SmoothQuant folded), its KL on the
  calibration text; then the default with the k most sensitive layers kept whole in bf16, k = 1..4.
- ``weight-only``: the activations left unquantized (W8A16, what the decode kernels compute at <= 16 rows) for three
  recipes: how much of the loss is the weights'.
- ``gptq``: the FP8 weights rounded with GPTQ's error feedback (column by column, the rounding error pushed onto the
  columns not yet rounded through the inverse Hessian of the calibration activations), scales unchanged.
- ``groups``: finer weight scales than the recipes have, one per output row and group of 128 (or 32) input columns
  (what the block-scale kernels' per-K-step scaling could read with a row granularity), activations as the recipe.
- ``combined``: the levers together: SmoothQuant, weight groups of 128, 64 or 32 columns, the first and last layers
  kept in bf16 (and GPTQ with 128-column groups).

Results: docs/benchmarks/fp8-accuracy.md ("Session 13").
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from fp8_gemm.emulate import EmulatedFP8Linear, fake_quantize
from fp8_gemm.recipes import select_linears
from fp8_gemm.smoothing import smooth_norm_fed_linears
from torch import nn

from benchmarks import bench_accuracy as bench

E4M3_MAX = 448.0
BLOCK = 128


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    head = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear and m is not head}


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def element_scales(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """The converter's scale of every element of an ``[out, in]`` weight: per output row, or per 128x128 block."""
    a = w.abs()
    if granularity.startswith("group"):  # "group<N>": per output row and N input columns
        group = int(granularity.removeprefix("group"))
        rows, cols = w.shape
        padded = torch.zeros(rows, -(-cols // group) * group)
        padded[:, :cols] = a
        s = padded.reshape(rows, -1, group).amax(-1).clamp_min(1e-12) / E4M3_MAX
        return s.repeat_interleave(group, 1)[:, :cols]
    if granularity == "channel":
        return (a.amax(1, keepdim=True).clamp_min(1e-12) / E4M3_MAX).expand_as(w)
    rows, cols = w.shape
    padded = torch.zeros(-(-rows // BLOCK) * BLOCK, -(-cols // BLOCK) * BLOCK)
    padded[:rows, :cols] = a
    s = padded.reshape(padded.shape[0] // BLOCK, BLOCK, padded.shape[1] // BLOCK, BLOCK).amax((1, 3))
    s = s.clamp_min(1e-12) / E4M3_MAX
    return s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]


def gptq_round(w: torch.Tensor, hessian: torch.Tensor, granularity: str, damp: float = 0.01) -> torch.Tensor:
    """GPTQ (Frantar et al., 2022) onto the E4M3 grid of the converter's own scales: the dequantized weight."""
    w = w.detach().float().clone()
    s = element_scales(w, granularity)
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0])
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], BLOCK):
        end = min(start + BLOCK, w.shape[1])
        part, errors = w[:, start:end].clone(), torch.empty(w.shape[0], end - start)
        for i in range(end - start):
            col = part[:, i]
            rounded = (col / s[:, start + i]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
            rounded = rounded * s[:, start + i]
            out[:, start + i] = rounded
            errors[:, i] = (col - rounded) / hinv[start + i, start + i]
            part[:, i:] -= errors[:, i:i + 1] * hinv[start + i, start + i:end][None, :]
        w[:, end:] -= errors @ hinv[start:end, end:]
    return out


def group_quantize(w: torch.Tensor, group: int) -> torch.Tensor:
    """``w [out, in]`` on the E4M3 grid of one scale per output row and ``group`` input columns (dequantized)."""
    rows, cols = w.shape
    padded = torch.zeros(rows, -(-cols // group) * group)
    padded[:, :cols] = w.float()
    g = padded.reshape(rows, -1, group)
    scale = (g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX)
    q = (g / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
    return q.reshape(rows, -1)[:, :cols]


def build(base: nn.Module, calibration: torch.Tensor, recipe: str, *, smooth: bool = False, gptq: bool = False,
          keep_layers: set[int] = frozenset(), only_layer: int | None = None, group: int | None = None) -> nn.Module:
    """An emulated FP8 copy of ``base``: the library recipe's Linears (minus ``keep_layers``, or only
    ``only_layer``'s) as EmulatedFP8Linear, the rest bf16 GEMMs."""
    from fp8_gemm.recipes import get_recipe

    r = get_recipe(recipe)
    model = copy.deepcopy(base).to(torch.bfloat16)
    names = {n for n in select_linears(model, recipe) if n in linears(model)}
    names = {n for n in names if bench.layer_index(n) not in keep_layers}
    if only_layer is not None:
        names = {n for n in names if bench.layer_index(n) == only_layer}
    if smooth:
        smooth_norm_fed_linears(model, calibration, linears=names)
    lins = linears(model)
    hessians: dict[str, torch.Tensor] = {}
    if gptq:
        def hook(mod, args, name):
            x = args[0].detach().float().reshape(-1, mod.in_features)
            hessians[name] = hessians.get(name, 0) + x.t() @ x

        handles = [lins[n].register_forward_pre_hook(lambda m, a, _n=n: hook(m, a, _n)) for n in names]
        with torch.no_grad():
            model(calibration)
        for h in handles:
            h.remove()
    for name, lin in lins.items():
        if name not in names:
            replace(model, name, bench.BF16Linear(lin))
            continue
        new = EmulatedFP8Linear(lin, weight_granularity=r.weight_granularity,
                                activation_granularity=r.activation_granularity)
        if gptq:
            granularity = r.weight_granularity if group is None else f"group{group}"
            new.weight = gptq_round(lin.weight, hessians[name], granularity)
        elif group is not None:
            w = lin.weight.detach().float() * (new.smooth if new.smooth is not None else 1.0)
            new.weight = group_quantize(w, group)
        replace(model, name, new)
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:
        model.set_output_embeddings(bench.BF16Linear(head))
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levers", default="sensitivity,weight-only,gptq")
    levers = p.parse_args().levers.split(",")
    torch.manual_seed(0)
    base, tok = bench.load_model("smollm2-135m")
    ids = [torch.tensor(tok(t).input_ids) for t in bench.read_texts()]
    calibration = bench.calibration_ids(tok, torch.device("cpu"))
    bf16 = build(base, calibration, "block-mlp-out", only_layer=-1)  # nothing in FP8
    ref = bench.score(bf16, ids, keep_logits=True)
    with torch.no_grad():
        ref_cal = torch.log_softmax(bf16(calibration).logits[0].float(), -1)
    print(f"bf16: ppl {ref.ppl:.4f}", flush=True)

    def report(label: str, model: nn.Module, t0: float) -> None:
        s = bench.score(model, ids, keep_logits=True)
        _, _, top1, kl = bench.compare_logits(s.logits, ref.logits)
        print(f"{label}: ppl {s.ppl:.4f} ({100 * (s.ppl / ref.ppl - 1):+.2f} % vs bf16) KL {kl:.5f} top1 {top1:.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)

    if "sensitivity" in levers:
        n_layers = 1 + max(bench.layer_index(n) or 0 for n in linears(base))
        kls = []
        for idx in range(n_layers):
            with torch.no_grad():
                lp = torch.log_softmax(build(base, calibration, "block-mlp-out", smooth=True, only_layer=idx)(
                    calibration).logits[0].float(), -1)
            kls.append(float((ref_cal.exp() * (ref_cal - lp)).sum(-1).mean()))
            print(f"layer {idx}: calibration KL {kls[-1]:.5f}", flush=True)
        order = sorted(range(n_layers), key=lambda i: -kls[i])
        for k in (1, 2, 3, 4):
            t0 = time.time()
            report(f"default+smooth, layers {sorted(order[:k])} kept",
                   build(base, calibration, "block-mlp-out", smooth=True, keep_layers=set(order[:k])), t0)
    if "weight-only" in levers:
        import fp8_gemm.emulate as emulate

        def weights_only(t, granularity, *, role="activation", scale=None):
            return t.float() if role == "activation" else fake_quantize(t, granularity, role=role, scale=scale)

        emulate.fake_quantize = weights_only
        try:
            for recipe in ("channel", "block", "block-mlp-out"):
                t0 = time.time()
                report(f"{recipe}, weights only (W8A16)", build(base, calibration, recipe), t0)
        finally:
            emulate.fake_quantize = fake_quantize
    if "gptq" in levers:
        for recipe, smooth in (("block-mlp-out", False), ("block-mlp-out", True), ("channel", False), ("block", False)):
            t0 = time.time()
            report(f"{recipe}{'+smooth' if smooth else ''}+gptq",
                   build(base, calibration, recipe, smooth=smooth, gptq=True), t0)


    if "groups" in levers:
        for group, smooth in ((128, False), (128, True), (32, True)):
            t0 = time.time()
            report(f"default{'+smooth' if smooth else ''}, weight scales per row and {group} columns",
                   build(base, calibration, "block-mlp-out", smooth=smooth, group=group), t0)
    if "combined" in levers:
        first_last = {0, 1 + max(bench.layer_index(n) or 0 for n in linears(base)) - 1}
        for group, gptq in ((128, False), (64, False), (32, False), (128, True)):
            t0 = time.time()
            report(f"default+smooth{'+gptq' if gptq else ''}, weight scales per row and {group} columns, layers "
                   f"{sorted(first_last)} kept",
                   build(base, calibration, "block-mlp-out", smooth=True, group=group, keep_layers=first_last,
                         gptq=gptq),
                   t0)


if __name__ == "__main__":
    main()
