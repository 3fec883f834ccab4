"""Every kernel of every package on typical and edge shapes, for compute-sanitizer (run by ``.ci/sanitize``).

``python .ci/sanitize_cases.py memcheck`` runs every case; ``racecheck`` runs the kernels whose programs share memory
through split-K partials, tile semaphores, grid barriers or persistent tile loops. Sizes are small (the sanitizer
slows kernels a hundredfold) but cover M = 1, odd sizes, sizes that are not a multiple of any tile, and empty tensors.
"""

from __future__ import annotations

import sys

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the cases under the interpreter
BF16 = torch.bfloat16


def _rand(*shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


def rmsnorm_rope_cases(race: bool = False):
    from fused_rmsnorm_rope import fused_qk_norm_rope, fused_rmsnorm_rope

    for b, s, h, hd in ((1, 1, 128, 64), (2, 7, 320, 64), (3, 5, 4096, 128), (1, 0, 128, 64)):
        x, w = _rand(b, s, h), _rand(h)
        cos, sin = _rand(max(s, 1) + 9, hd), _rand(max(s, 1) + 9, hd)
        pos = torch.randint(0, max(s, 1) + 9, (b, s), device=DEV)
        fused_rmsnorm_rope(x, w, cos, sin, position_ids=pos)
        xg = x.float().requires_grad_(True)
        fused_rmsnorm_rope(xg, w.float(), cos.float(), sin.float(), position_ids=pos).sum().backward()
    qkv = _rand(2, 5, (8 + 2 * 2) * 64)
    q, k = qkv[..., : 8 * 64].unflatten(-1, (8, 64)), qkv[..., 8 * 64: 10 * 64].unflatten(-1, (2, 64))
    cos, sin = _rand(5, 64), _rand(5, 64)
    fused_qk_norm_rope(q, k, _rand(64), _rand(64), cos, sin)
    fused_qk_norm_rope(q, k, _rand(64), _rand(64), cos, sin, inplace=True)


def rmsnorm_cases(race: bool = False):
    from fused_rmsnorm_rope import fused_add_rmsnorm, rmsnorm, rmsnorm_add, rmsnorm_add_rmsnorm

    for rows, n in ((1, 1), (3, 7), (5, 2880), (2, 9000), (0, 64)):
        x, r, w = _rand(rows, n), _rand(rows, n), _rand(n)
        rmsnorm(x, w)
        fused_add_rmsnorm(x, r, w)
        fused_add_rmsnorm(x, r.clone(), w, inplace=True)
        rmsnorm_add_rmsnorm(x, r, w, _rand(n), gemma=True)
        rmsnorm_add(x, r, w, gemma=True)


def gated_mlp_cases(race: bool = False):
    from fused_gated_mlp import fused_gated_mlp

    shapes = ((1, 4096, 11264), (16, 4096, 5632), (3, 2880, 2880)) if race else \
        ((1, 4096, 11264), (3, 100, 70), (65, 256, 192), (300, 512, 1000), (0, 64, 32), (5, 2880, 2880))
    for m, h, i in shapes:
        x, wg, wu = _rand(m, h), _rand(i, h, scale=h ** -0.5), _rand(i, h, scale=h ** -0.5)
        fused_gated_mlp(x, wg, wu)
    if race:
        return
    w, b = _rand(2 * 2880, 2880, scale=0.02), _rand(2 * 2880)
    fused_gated_mlp(_rand(4, 2880), w, None, "swiglu_oai", gate_bias=b, weight_layout="interleaved")
    # FP8 weights (weight-only): per-channel and 128x128 block scales, decode and tiled paths, odd sizes
    from fused_gated_mlp import quantize_weight_fp8

    for m, h, i in ((1, 4096, 14336), (70, 300, 200), (3, 131, 45)):
        for scaling in ("channel", "block"):
            (qg, sg), (qu, su) = (quantize_weight_fp8(_rand(i, h, scale=h ** -0.5), scaling, torch.float8_e4m3fn)
                                  for _ in range(2))
            fused_gated_mlp(_rand(m, h), qg, qu, gate_scale=sg, up_scale=su)


def fp8_cases(race: bool = False):
    from fp8_gemm import DelayedScaler, FP8Linear, fp8_gemm, quantize_fp8

    if not race:
        for shape in ((1, 1), (3, 200), (129, 257), (0, 128), (4096, 4096)):
            t = _rand(*shape, dtype=torch.float32)
            for gran in ("tensor", "row"):
                quantize_fp8(t, "e4m3", gran)
            if shape[0] and shape[1]:
                quantize_fp8(t, "e4m3", "block")
                quantize_fp8(t.t(), "e4m3", "channel", role="weight")
                quantize_fp8(t, "e4m3", "tensor", scale=torch.tensor([0.01], device=DEV))
    quantize_fp8(_rand(8192, 4096, dtype=torch.float32), "e4m3", "tensor")  # cooperative grid barrier
    quantize_fp8(_rand(8192, 8192, dtype=torch.float32), "e4m3", "tensor", scale=torch.tensor([0.1], device=DEV))
    DelayedScaler().quantize(_rand(4096, 1024, dtype=torch.float32))
    for m, n, k in ((1, 11264, 4096), (16, 4096, 11264), (64, 4096, 4096), (300, 1000, 512), (2048, 4096, 4096)):
        a, b = _rand(m, k), _rand(n, k, scale=k ** -0.5)
        fp8_gemm(a, b.t())  # small M: the split-K decode kernel; larger: the persistent TMA kernel
        if not race:
            fp8_gemm(a[:, 1:], b.t()[1:])  # unaligned: the pointer kernel
    if not race:
        lin = torch.nn.Linear(4096, 1000, device=DEV, dtype=BF16)
        FP8Linear.from_linear(lin)(_rand(3, 4096))
    # weight-only decode (M <= 16: one launch, split-K partials and arrival counters), every weight scaling
    for (n, k), gran in (((11264, 4096), "channel"), ((1000, 4096), "block"), ((333, 200), "tensor"),
                         ((4096, 14336), "block")):
        lin = torch.nn.Linear(k, n, bias=gran != "tensor", device=DEV, dtype=BF16)
        layer = FP8Linear.from_linear(lin, weight_granularity=gran)
        for m in ((1, 16) if race else (1, 3, 16)):
            layer(_rand(m, k))


def moe_cases(race: bool = False):
    from fused_moe import fused_moe

    # decode (a few experts hit, the rest skipped), a grouped prefill, an empty batch, both layouts
    e, h, i = 8, 256, 192
    for t, layout, transposed in ((1, "interleaved", True), (37, "interleaved", True), (0, "interleaved", True),
                                  (300, "concatenated", False)):
        gu = _rand(e, h, 2 * i, scale=h ** -0.5) if transposed else _rand(e, 2 * i, h, scale=h ** -0.5)
        down = _rand(e, i, h, scale=i ** -0.5) if transposed else _rand(e, h, i, scale=i ** -0.5)
        fused_moe(_rand(t, h), _rand(e, h), _rand(e), gu, _rand(e, 2 * i), down, _rand(e, h), top_k=2,
                  activation="swiglu_oai" if layout == "interleaved" else "silu",
                  gate_up_layout=layout, transposed=transposed)


def attention_cases(race: bool = False):
    from decode_attention import decode_attention

    # decode over a static cache with a masked tail (the default splits the KV length: partials + combine), one
    # program holding all rows (num_splits=1), gpt-oss-style sinks + window + causal rows, an additive mask, a padded
    # head dim, strided slices of a bigger cache, a long query (80 rows: two row blocks), an empty cache and batch
    for b, hq, hkv, sq, s, d in ((1, 8, 2, 1, 301, 128), (3, 16, 2, 3, 77, 64), (2, 8, 2, 20, 45, 80)):
        q = _rand(b, sq, hq, d).transpose(1, 2)
        cache_k, cache_v = _rand(b, 2 * hkv, 2 * s, d), _rand(b, 2 * hkv, 2 * s, d)
        k, v = cache_k[:, ::2], cache_v[:, ::2]  # every other head of a bigger cache
        mask = torch.zeros(b, 1, sq, 2 * s, dtype=torch.bool, device=DEV)
        mask[..., : s] = True
        decode_attention(q, k, v, mask)
        decode_attention(q, k, v, mask, num_splits=1)
        decode_attention(q, k[:, :, :s], v[:, :, :s], sinks=_rand(hq), sliding_window=17, is_causal=True)
        additive = torch.where(mask, 0.0, float("-inf")).to(BF16)
        decode_attention(q, k, v, additive, scale=0.1)
        decode_attention(q, k[:, :, :0], v[:, :, :0])
        decode_attention(q[:0], k[:0], v[:0])
    # a full sliding window moved on by one row, in place: Gemma 3's window, a short one, a window of one row
    from decode_attention import shift_kv_cache_

    for b, h, w, d in ((1, 8, 1024, 256), (3, 2, 5, 64), (2, 2, 1, 16)):
        shift_kv_cache_(_rand(b, h, w, d), _rand(b, h, w, d), _rand(b, h, 1, d), _rand(b, h, 1, d))


def main(tool: str) -> int:
    race = tool == "racecheck"
    cases = [gated_mlp_cases, fp8_cases] if race else \
        [rmsnorm_rope_cases, rmsnorm_cases, gated_mlp_cases, fp8_cases, moe_cases, attention_cases]
    for case in cases:
        case(race)
        torch.cuda.synchronize()
        print(f"{tool}: {case.__name__} ran", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "memcheck"))
