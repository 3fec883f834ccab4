"""Fused gated MLP against eager, torch.compile, one concatenated cuBLAS GEMM and Liger: ``python -m
benchmarks.bench_gated_mlp``.

On a GPU: bf16, (hidden, intermediate) = (4096, 5632), (4096, 11264), (6144, 22528); decode M = 1, 8, 32, 64
(weight streaming, % of copy bandwidth) and prefill M = 2048, 8192 (TFLOP/s, % of cuBLAS); peak memory vs eager.
Then one gpt-oss expert (2880 x 2880, interleaved packed weight and bias, clamped SwiGLU) at M = 1, 8, 32, 64 and
2048 against the model's own PyTorch code.

FP8 weights (``--fp8-only`` runs just these rows, into ``gated-mlp-fp8.md``, in well under a minute): decode
M = 1, 4, 16, 64 on Llama-3-8B's MLP (4096 -> 14336; per-channel and 128 x 128 block scales) and a gpt-oss expert
(2880 -> 2880, interleaved packed weight and bias, swiglu_oai; per-channel scales). The fused kernel with E4M3
weights against the same kernel with the bf16 weights, transformers' ``LlamaMLP`` (gate/up part, bf16; the gpt-oss
model's own code for the expert) and two ``fp8_gemm.FP8Linear`` projections followed by the activation in eager
(what an FP8 model runs without the fusion). ``bytes_moved`` is the FP8 weight bytes, so "% of peak copy" is the
FP8 weight-read floor (FP8 gate + up bytes / measured copy bandwidth) divided by the time.
"""

from __future__ import annotations

import sys

import torch

from ._common import run_groups

DIMS = [(4096, 5632), (4096, 11264), (6144, 22528)]

FP8_TOKENS = (1, 4, 16, 64)
# (hidden, intermediate, layout, activation, scalings)
FP8_SHAPES = [(4096, 14336, "separate", "silu", ("channel", "block")),
              (2880, 2880, "interleaved", "swiglu_oai", ("channel",))]
FP8_GEMM_TOL = 8e-2  # the FP8 GEMMs quantize the activations too (W8A8 above 16 tokens): E4M3 costs 3-4 %


def run(suite, quick: bool = False) -> None:
    if not suite.on_gpu:
        suite.benchmark_gated_mlp(batch_sizes=(1, 5), hidden_dims=(), intermediate_dims=(),
                                  shapes=[(64, 96)], dtypes=(torch.float16, torch.bfloat16))
        suite.benchmark_gpt_oss_expert(batch_sizes=(3,), hidden=64, intermediate=48)
        run_fp8(suite, quick)
        return
    if quick:
        suite.benchmark_gated_mlp(batch_sizes=(1, 64, 2048), hidden_dims=(), intermediate_dims=(),
                                  shapes=[(4096, 11264)])
        run_fp8(suite, quick)
        return
    suite.benchmark_gated_mlp(batch_sizes=(1, 8, 32, 64, 2048, 8192), hidden_dims=(), intermediate_dims=(),
                              shapes=DIMS, dtypes=(torch.bfloat16,))
    suite.benchmark_gpt_oss_expert()
    run_fp8(suite, quick)


def run_fp8(suite, quick: bool = False, group: str = "gated-mlp") -> None:
    """The FP8-weight rows (see the module docstring); small shapes, correctness only, without a GPU."""
    if not suite.on_gpu:
        shapes = [(64, 48, "separate", "silu", ("channel", "block")), (64, 48, "interleaved", "swiglu_oai",
                                                                         ("channel",))]
        tokens: tuple[int, ...] = (3,)
    else:
        shapes, tokens = FP8_SHAPES, ((1, 16) if quick else FP8_TOKENS)
    factories = [_fp8_factory(suite, group, m, h, i, layout, act, scaling)
                 for h, i, layout, act, scalings in shapes for scaling in scalings for m in tokens]
    suite.run(factories, "gated-mlp fp8")


def _fp8_factory(suite, group, m, h, i, layout, activation, scaling):
    from triton_ops.benchmark import CaseFactory

    return CaseFactory(f"{group}:FP8 {scaling} M{m} H{h} I{i}",
                       lambda: _fp8_case(suite, group, m, h, i, layout, activation, scaling))


def _gpt_oss_act(gate_up: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """gpt-oss's expert activation on its packed projection (gate = even columns, up = odd ones)."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def _act_mul(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return torch.nn.functional.silu(gate) * up
    return _gpt_oss_act(torch.stack([gate, up], dim=-1).flatten(-2))


def _fp8_case(suite, group, m, h, i, layout, activation, scaling):
    from fused_gated_mlp import dequantize_weight_fp8, fused_gated_mlp, quantize_weight_fp8, split_packed
    from triton_ops.benchmark import TOLERANCES, Case, Impl
    from triton_ops_core.models import dtype_name

    dev = torch.device("cuda") if suite.on_gpu else torch.device("cpu")
    gen = torch.Generator(device=dev).manual_seed(m + h)
    x = torch.randn(m, h, device=dev, generator=gen).to(torch.bfloat16)
    packed = layout != "separate"
    w = (torch.randn(2 * i, h, device=dev, generator=gen) * h**-0.5).to(torch.bfloat16)  # gate rows, then up
    bias = (torch.randn(2 * i, device=dev, generator=gen) * 0.1).to(torch.bfloat16) if packed else None
    if packed:  # one packed interleaved weight, quantized as one tensor (as a gpt-oss FP8 checkpoint would be)
        w = torch.stack([w[:i], w[i:]], dim=1).reshape(2 * i, h)
        q, s = quantize_weight_fp8(w, scaling)
        del w
        w16 = dequantize_weight_fp8(q, s, torch.bfloat16)  # the bf16 weights every baseline uses
        fp8_args, fp8_kw = (q, None), {"gate_scale": s, "weight_layout": layout, "gate_bias": bias}
        bf16_args, bf16_kw = (w16, None), {"weight_layout": layout, "gate_bias": bias}
        wg16, wu16 = split_packed(w16, layout)
        bg, bu = split_packed(bias, layout)
    else:
        (qg, sg), (qu, su) = quantize_weight_fp8(w[:i], scaling), quantize_weight_fp8(w[i:], scaling)
        del w
        wg16, wu16 = dequantize_weight_fp8(qg, sg, torch.bfloat16), dequantize_weight_fp8(qu, su, torch.bfloat16)
        fp8_args, fp8_kw = (qg, qu), {"gate_scale": sg, "up_scale": su}
        bf16_args, bf16_kw = (wg16, wu16), {}
        bg = bu = None
    fp8_bytes = 2 * i * h  # gate + up, one byte each

    ref_dtype = torch.float32 if suite.on_gpu else torch.float64

    def reference() -> torch.Tensor:
        # From the bf16 weights the baselines use: the dequantized FP8 weights up to bf16 rounding (2^-9).
        xr = x.to(ref_dtype)
        gate, up = xr @ wg16.to(ref_dtype).T, xr @ wu16.to(ref_dtype).T
        if bg is not None:
            gate, up = gate + bg.to(ref_dtype), up + bu.to(ref_dtype)
        return _act_mul(gate, up, activation)

    impls = [
        Impl("triton-ops FP8", lambda: fused_gated_mlp(x, *fp8_args, activation, **fp8_kw), role="ours",
             track_memory=True, note=f"E4M3 weights, {scaling} scales, one kernel"),
        Impl("triton-ops bf16", lambda: fused_gated_mlp(x, *bf16_args, activation, **bf16_kw),
             note="the same kernel on the bf16 weights"),
        _transformers_impl(x, wg16, wu16, bg, bu, activation, packed),
        _fp8_gemms_impl(x, wg16, wu16, bg, bu, activation, scaling),
    ]
    if suite.on_gpu:
        from triton_ops.benchmark._ceilings import weights_read

        if packed:  # the packed weight's two halves of bytes (the ceiling reads two equal buffers)
            a, b = q.view(torch.uint8).view(-1).chunk(2)
        else:
            a, b = qg.view(torch.uint8), qu.view(torch.uint8)
        impls.append(Impl("FP8 weights read", weights_read(a, b), role="ceiling", gpu_only=True, optional=True,
                          error_fn=lambda out: 0.0, note="reads the FP8 gate and up weights once (no GEMM)"))
    name = f"FP8 {scaling} M={m} H={h} I={i}" + (" gpt-oss" if packed else "")
    return Case(
        group=group, name=name, dtype=dtype_name(torch.bfloat16), reference=reference, impls=impls,
        tol=TOLERANCES[torch.bfloat16],
        params={"M": m, "hidden": h, "intermediate": i, "activation": activation, "layout": layout,
                "weights": "float8_e4m3fn", "scaling": scaling},
        bytes_moved=fp8_bytes, flops=2 * m * h * 2 * i,
        panel="FP8 weights, decode: % of peak copy = the FP8 weight-read floor (FP8 gate + up bytes / copy "
              "bandwidth) over the time",
        x=fp8_bytes / 2**20, x_label="MB of FP8 weights", metric="gbps", compute_dtype="bf16",
        note="bytes_moved counts the FP8 weights only; every baseline runs on the same weights in bf16",
    )


def _transformers_impl(x, wg16, wu16, bg, bu, activation, packed):
    """transformers' LlamaMLP (down_proj = Identity: its gate/up part) on the bf16 weights; for the gpt-oss expert
    the model's own code (one packed GEMM with bias, then the clamped SwiGLU)."""
    from triton_ops.benchmark import Impl

    if packed:
        w_packed = torch.stack([wg16, wu16], dim=1).reshape(-1, wg16.shape[1])
        b_packed = torch.stack([bg, bu], dim=1).reshape(-1)
        return Impl("gpt-oss eager (bf16)", lambda: _gpt_oss_act(torch.nn.functional.linear(x, w_packed,
                                                                                            b_packed)))
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP
    except ImportError as exc:
        return Impl("LlamaMLP (bf16)", lambda: None, optional=True, unavailable=f"transformers: {exc}")
    inter, hidden = wg16.shape
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act=activation,
                         num_attention_heads=1, num_key_value_heads=1)
    with torch.device("meta"):
        mlp = LlamaMLP(config)
    mlp.down_proj = torch.nn.Identity()  # the gated intermediate only: the fused op's output
    mlp = mlp.to_empty(device=x.device).to(torch.bfloat16)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(wg16)
        mlp.up_proj.weight.copy_(wu16)
    return Impl("LlamaMLP (bf16)", lambda: mlp(x), note="transformers' LlamaMLP, down_proj = Identity")


def _fp8_gemms_impl(x, wg16, wu16, bg, bu, activation, scaling):
    """Two ``fp8_gemm.FP8Linear`` projections (gate, up: the FP8 model without the fusion) and the activation in
    eager. FP8Linear's own scheme: weight-only below 17 tokens, activations quantized per row above."""
    from triton_ops.benchmark import Impl

    try:
        from fp8_gemm import FP8Linear

        def fp8_linear(w, b):
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
            return FP8Linear.from_linear(lin, weight_granularity=scaling).requires_grad_(False)

        gate, up = fp8_linear(wg16, bg), fp8_linear(wu16, bu)
    except Exception as exc:  # noqa: BLE001 - not installed, or refused on this device: n/a, not an error
        return Impl("2 x FP8Linear + act", lambda: None, optional=True,
                    unavailable=f"fp8_gemm: {type(exc).__name__}: {str(exc)[:80]}")
    return Impl("2 x FP8Linear + act", lambda: _act_mul(gate(x), up(x), activation), optional=True,
                tol=FP8_GEMM_TOL, note=f"fp8_gemm.FP8Linear ({scaling} weight scales) for gate and up, eager "
                                       "activation")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--fp8-only" in argv:
        argv.remove("--fp8-only")
        return run_groups({"gated-mlp-fp8": lambda suite, quick: run_fp8(suite, quick, "gated-mlp-fp8")},
                          "The gated MLP with FP8 weights (decode).", argv)
    return run_groups({"gated-mlp": run}, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
