"""This package's kernels as a kernel-autotune family: the operations ``python -m kernel_autotune tune`` times, and the
shapes it tunes (the benchmark suite's, and the decode and prefill of Llama-3-8B, Qwen3-8B and gpt-oss-20b).

A shape's ``op`` picks the operation: ``rmsnorm_rope`` (the default: ``fused_rmsnorm_rope``; fields ``batch``,
``seq``, ``hidden``, ``head_dim``, ``decode``), ``qk_norm_rope`` (``fused_qk_norm_rope`` on q and k as views of a
packed QKV output when ``packed``; ``batch``, ``seq``, ``q_heads``, ``kv_heads``, ``head_dim``, ``decode``: position
ids into a cos/sin cache), ``rmsnorm`` and ``add_rmsnorm`` (``tokens``, ``hidden``). ``dtype`` is a torch dtype name;
the CLI's ``--dtypes`` can replace it.

kernel-autotune finds the family through the ``kernel_autotune.tunables`` entry point in this package's
``pyproject.toml`` (also when run from source: it reads the file beside ``src``); ``--module
fused_rmsnorm_rope.tuning`` registers it explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from kernel_autotune import Tunable, register_tunable
from triton_ops_core.exceptions import InvalidArgumentError

from . import clear_caches, fused_add_rmsnorm, fused_qk_norm_rope, fused_rmsnorm_rope, rmsnorm

NAME = "fused_rmsnorm_rope"

_BF16 = "bfloat16"
_QWEN3_HEADS = {"q_heads": 32, "kv_heads": 8, "head_dim": 128}  # Qwen3-8B attention

SHAPES: tuple[dict[str, Any], ...] = tuple(
    # fused_rmsnorm_rope: the benchmark's prefill shapes, then decode (one token per sequence, position ids)
    [{"batch": b, "seq": s, "hidden": h, "head_dim": 128, "dtype": _BF16}
     for b, s, h in ((2, 1024, 4096), (1, 8192, 4096), (4, 2048, 8192), (8, 4096, 2048), (16, 8192, 4096))]
    + [{"batch": b, "seq": 1, "hidden": 4096, "head_dim": 128, "dtype": _BF16, "decode": 1} for b in (64, 8, 1)]
    # fused_qk_norm_rope on Qwen3-8B heads: the benchmark's packed 1x2048 and 8x2048, unpacked 1x8192, decode
    + [{"op": "qk_norm_rope", "batch": b, "seq": s, **_QWEN3_HEADS, "packed": p, "dtype": _BF16}
       for b, s, p in ((1, 2048, 1), (8, 2048, 1), (1, 8192, 0))]
    + [{"op": "qk_norm_rope", "batch": b, "seq": 1, **_QWEN3_HEADS, "packed": 1, "decode": 1, "dtype": _BF16}
       for b in (1, 8, 64)]
    # rmsnorm and the decoder layer's residual add + rmsnorm: Llama-3-8B / Qwen3-8B (4096), gpt-oss-20b (2880)
    + [{"op": op, "tokens": t, "hidden": h, "dtype": _BF16}
       for op in ("add_rmsnorm", "rmsnorm") for h in (4096, 2880) for t in (1, 64, 2048, 8192)]
)


def _randn(*size: int, dtype: torch.dtype, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    # Generated in fp32 then cast: random data everywhere, never zeros (zeros can take fast paths).
    return (torch.randn(*size, device=device, dtype=torch.float32) * scale).to(dtype)


def _tables(shape: Mapping[str, Any], seq: int, hd: int, dtype: torch.dtype, device: torch.device):
    """cos, sin (and position ids into them for a decode shape)."""
    if shape.get("decode"):  # one token per sequence, positions into a cos/sin cache
        max_pos = 4096
        cos, sin = _randn(max_pos, hd, dtype=dtype, device=device), _randn(max_pos, hd, dtype=dtype, device=device)
        return cos, sin, torch.randint(0, max_pos, (int(shape["batch"]), seq), device=device)
    return _randn(seq, hd, dtype=dtype, device=device), _randn(seq, hd, dtype=dtype, device=device), None


def prepare(shape: Mapping[str, Any], device: torch.device) -> Callable[[], Any]:
    """Random inputs of one shape; returns a call of the shape's operation on them."""
    op = str(shape.get("op", "rmsnorm_rope"))
    dtype = getattr(torch, str(shape.get("dtype", _BF16)))
    if op in ("rmsnorm", "add_rmsnorm"):
        t, h = int(shape["tokens"]), int(shape["hidden"])
        x = _randn(t, h, dtype=dtype, device=device)
        weight = _randn(h, dtype=dtype, device=device, scale=0.1) + 1
        if op == "rmsnorm":
            return lambda: rmsnorm(x, weight)
        residual = _randn(t, h, dtype=dtype, device=device)
        return lambda: fused_add_rmsnorm(x, residual, weight)
    if op == "qk_norm_rope":
        b, s = int(shape["batch"]), int(shape["seq"])
        nq, nk, hd = int(shape["q_heads"]), int(shape["kv_heads"]), int(shape["head_dim"])
        if shape.get("packed"):  # strided views of one [batch, seq, (nq + 2 nk) * hd] projection output
            qkv = _randn(b, s, (nq + 2 * nk) * hd, dtype=dtype, device=device)
            q = qkv[..., : nq * hd].view(b, s, nq, hd)
            k = qkv[..., nq * hd: (nq + nk) * hd].view(b, s, nk, hd)
        else:
            q, k = _randn(b, s, nq, hd, dtype=dtype, device=device), _randn(b, s, nk, hd, dtype=dtype, device=device)
        qw = _randn(hd, dtype=dtype, device=device, scale=0.1) + 1
        kw = _randn(hd, dtype=dtype, device=device, scale=0.1) + 1
        cos, sin, pos = _tables(shape, s, hd, dtype, device)
        return lambda: fused_qk_norm_rope(q, k, qw, kw, cos, sin, pos)
    if op != "rmsnorm_rope":
        raise InvalidArgumentError(f"shape op: expected rmsnorm_rope, qk_norm_rope, rmsnorm or add_rmsnorm, got {op!r}")
    b, s, h, hd = (int(shape[k]) for k in ("batch", "seq", "hidden", "head_dim"))
    x = _randn(b, s, h, dtype=dtype, device=device)
    weight = _randn(h, dtype=dtype, device=device, scale=0.1) + 1
    cos, sin, pos = _tables(shape, s, hd, dtype, device)
    if pos is not None:
        return lambda: fused_rmsnorm_rope(x, weight, cos, sin, position_ids=pos)
    return lambda: fused_rmsnorm_rope(x, weight, cos, sin)


def describe(shape: Mapping[str, Any]) -> str:
    op = shape.get("op", "rmsnorm_rope")
    tag = " decode" if shape.get("decode") else ""
    if op in ("rmsnorm", "add_rmsnorm"):
        return f"{op} {shape['tokens']}x{shape['hidden']} {shape.get('dtype')}"
    if op == "qk_norm_rope":
        packed = " packed" if shape.get("packed") else ""
        return (f"qk {shape['batch']}x{shape['seq']} {shape['q_heads']}q/{shape['kv_heads']}kv x{shape['head_dim']}"
                f"{packed} {shape.get('dtype')}{tag}")
    return f"({shape['batch']},{shape['seq']},{shape['hidden']}) hd{shape['head_dim']} {shape.get('dtype')}{tag}"


def tunable() -> Tunable:
    """The family (the entry point's target). ``clear_caches`` forgets the launch plans' configs between trials."""
    return Tunable(NAME, prepare, SHAPES, reset=clear_caches, shipped=Path(__file__).with_name("tuned_configs.json"),
                   describe=describe)


register_tunable(NAME, tunable)

__all__ = ["NAME", "SHAPES", "describe", "prepare", "tunable"]
