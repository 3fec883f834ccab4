"""Host (CPU) time per call of decode-size calls against their baselines: ``python -m benchmarks.host_overhead``.

A decode step issues one small call after another; when the GPU work takes a few microseconds, the Python and launch
path decides the latency. This times repeated calls without synchronizing (the host's cost per call, which bounds
the call rate outside CUDA graphs). Needs a GPU.
"""

from __future__ import annotations

import time

import torch


def host_us(fn, n: int = 300, *, until_done: bool = False) -> float:
    """Microseconds per call of ``n`` back-to-back calls: the host's cost (default), or with ``until_done`` the
    wall time until the GPU finished them all, what an eager decode loop sees (the larger of host and GPU time)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if until_done:
        torch.cuda.synchronize()
    per_call = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return per_call


def _gated_mlp(module, m: int, dtype: torch.dtype) -> None:
    x = torch.randn(m, 4096, device="cuda", dtype=dtype)
    wg = torch.randn(11264, 4096, device="cuda", dtype=dtype) * 0.02
    wu = torch.randn(11264, 4096, device="cuda", dtype=dtype) * 0.02
    ours = host_us(lambda: module.fused_gated_mlp(x, wg, wu))
    eager = host_us(lambda: torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t()))
    print(f"host/call gated M={m}: ours {ours:.1f} us, eager {eager:.1f} us")


def _fp8_linear(module, fin: int, fout: int, dtype: torch.dtype) -> None:
    lin = torch.nn.Linear(fin, fout, bias=False, device="cuda", dtype=dtype)
    q = module.FP8Linear.from_linear(lin)
    x = torch.randn(1, fin, device="cuda", dtype=dtype)
    ours, base = host_us(lambda: q(x)), host_us(lambda: lin(x))
    ours_loop, base_loop = host_us(lambda: q(x), until_done=True), host_us(lambda: lin(x), until_done=True)
    print(f"host/call FP8Linear M=1 {fin}->{fout}: {ours:.1f} us, bf16 nn.Linear {base:.1f} us | eager loop "
          f"(until the GPU is done) per call: FP8Linear {ours_loop:.1f} us, nn.Linear {base_loop:.1f} us")


def main() -> int:
    if not torch.cuda.is_available():
        print("host overhead needs a GPU: nothing measured")
        return 0
    import fp8_gemm
    import fused_gated_mlp
    import fused_rmsnorm_rope

    bf = torch.bfloat16
    for m in (1, 32):
        _gated_mlp(fused_gated_mlp, m, bf)
    a = torch.randn(1, 4096, device="cuda").to(torch.float8_e4m3fn)
    w = torch.randn(11264, 4096, device="cuda").to(torch.float8_e4m3fn)
    sa, sb = torch.ones(1, 1, device="cuda"), torch.ones(1, 11264, device="cuda")
    ours = host_us(lambda: fp8_gemm.fp8_gemm(a, w.t(), a_scale=sa, b_scale=sb, out_dtype=bf))
    cublas = host_us(lambda: torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sb, out_dtype=bf))
    print(f"host/call fp8_gemm M=1: ours {ours:.1f} us, _scaled_mm {cublas:.1f} us")
    for fin, fout in ((4096, 11264), (4096, 4096)):
        _fp8_linear(fp8_gemm, fin, fout, bf)
    x = torch.randn(64, 1, 4096, device="cuda", dtype=bf)
    cos = torch.randn(4096, 128, device="cuda", dtype=bf)
    pos = torch.randint(0, 4096, (64, 1), device="cuda")
    wn = torch.ones(4096, device="cuda", dtype=bf)
    ours = host_us(lambda: fused_rmsnorm_rope.fused_rmsnorm_rope(x, wn, cos, cos, position_ids=pos))
    print(f"host/call rmsnorm_rope decode: {ours:.1f} us")
    qkv = torch.randn(1, 1, 48 * 128, device="cuda", dtype=bf)
    q, k = qkv[..., : 32 * 128].unflatten(-1, (32, 128)), qkv[..., 32 * 128: 40 * 128].unflatten(-1, (8, 128))
    qw = torch.ones(128, device="cuda", dtype=bf)
    pos1 = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    ours = host_us(lambda: fused_rmsnorm_rope.fused_qk_norm_rope(q, k, qw, qw, cos, cos, pos1))
    print(f"host/call qk_norm_rope decode (packed QKV, 1 token): {ours:.1f} us")
    x1 = torch.randn(1, 4096, device="cuda", dtype=bf)
    ours = host_us(lambda: fp8_gemm.quantize_fp8(x1, "e4m3", "row"))
    print(f"host/call quantize_fp8 row, 1 x 4096: {ours:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
