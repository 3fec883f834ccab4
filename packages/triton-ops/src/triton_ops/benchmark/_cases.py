"""The cases of each sweep: inputs, the reference, our kernel and every baseline, built one case at a time.

Shapes follow the kernel issues: under the interpreter (no GPU) the sweeps shrink to small shapes that still
exercise every kernel path, and only implementations that run on the CPU are kept.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from triton_ops_core.models import dtype_name

from . import _references as ref
from ._ceilings import weights_read
from ._compare import relative_error
from ._model import Case, Impl

if TYPE_CHECKING:
    from ._suite import BenchmarkSuite

# Stated tolerances (relative Frobenius error against a float64/float32 reference): output rounding of the
# dtype plus fp32 accumulation; a kernel that is right lands well inside them, a wrong one far outside.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FP8_GEMM_TOL = 6e-3        # fp32 accumulation + bf16 output rounding, operands exact (dequantized FP8)
FP8_GEMM_FAST_TOL = 1e-2   # Hopper's reduced-precision accumulation grows with K (fp8-on-hopper notes)
QUANT_BASELINE_TOL = 1e-3  # eager/compiled quantization: a few values one rounding step off is still the op
FP8_LINEAR_TOL = 8e-2      # against the unquantized product: E4M3's 3 mantissa bits cost 3-4 % on random data


@dataclass
class CaseFactory:
    """A case to build later (``label`` is ``group:name`` for reports when building fails)."""

    label: str
    build: Callable[[], Case]

    def __call__(self) -> Case:
        return self.build()


def _device(suite: BenchmarkSuite) -> torch.device:
    return torch.device("cuda") if suite.on_gpu else torch.device("cpu")


def _ref_dtype(numel: int) -> torch.dtype:
    # float64 where it is cheap; float32 for the largest GPU cases (still 2^-24 against bf16's 2^-8).
    return torch.float64 if numel <= 2**24 else torch.float32


def _import(module: str, *names: str) -> tuple[Any, ...]:
    mod = importlib.import_module(module)
    return tuple(getattr(mod, n) for n in names)


def _ours(name: str, module: str, attr: str, call: Callable[[Any], Any], **kw: Any) -> Impl:
    """Our kernel as an implementation; an import failure becomes an error of this case, not of the run."""
    try:
        (fn,) = _import(module, attr)
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"

        def missing() -> Any:
            raise ImportError(msg)

        return Impl(name, missing, role="ours", **kw)
    return Impl(name, lambda: call(fn), role="ours", **kw)


class CompileBudget:
    """Caps the total time spent compiling ``torch.compile`` baselines in one run (first calls)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.spent = 0.0

    def exhausted(self) -> bool:
        return self.seconds is not None and self.spent >= self.seconds


def _compiled(suite: BenchmarkSuite, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Impl:
    """``torch.compile`` (mode default, static shapes) of ``fn``; a failure to compile is reported as n/a."""
    if not suite.compile_baselines:
        return Impl(name, lambda: None, unavailable="needs a GPU" if not suite.on_gpu else "disabled",
                    optional=True, gpu_only=True)
    budget: CompileBudget = suite.compile_budget
    if budget.exhausted():
        return Impl(name, lambda: None, optional=True, gpu_only=True,
                    unavailable=f"skipped: compile time budget ({budget.seconds:g} s) spent")
    torch._dynamo.reset()  # a fresh static graph per case, never the recompiled dynamic one
    compiled = torch.compile(fn, dynamic=False)
    state = {"first": True}

    def run() -> Any:
        if state["first"]:
            t0 = time.perf_counter()
            out = compiled(*args, **kwargs)
            budget.spent += time.perf_counter() - t0
            state["first"] = False
            return out
        return compiled(*args, **kwargs)

    return Impl(name, run, optional=True, gpu_only=True)


def _liger(suite: BenchmarkSuite, name: str, build: Callable[[], Callable[[], Any]], **kw: Any) -> Impl:
    if not suite.liger:
        return Impl(name, lambda: None, optional=True, gpu_only=True, unavailable="disabled")
    try:
        fn = build()
    except Exception as exc:  # not installed, or an API change
        return Impl(name, lambda: None, optional=True, gpu_only=True,
                    unavailable=f"Liger-Kernel unavailable ({type(exc).__name__}: {str(exc)[:80]})")
    return Impl(name, fn, optional=True, gpu_only=True, **kw)


def _randn(shape, dtype, device, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)


# --------------------------------------------------------------------------- RMSNorm + RoPE

def _reference_module(module: str) -> Any | None:
    try:
        return importlib.import_module(f"{module}.reference")
    except Exception:
        return None


def rmsnorm_rope_cases(suite: BenchmarkSuite, shapes: Sequence[tuple[int, int, int]],
                       dtypes: Sequence[torch.dtype], head_dim: int, eps: float) -> list[CaseFactory]:
    out = []
    for b, s, h in shapes:
        for dtype in dtypes:
            def build(b=b, s=s, h=h, dtype=dtype) -> Case:
                return _rmsnorm_rope_case(suite, b, s, h, dtype, head_dim, eps)

            out.append(CaseFactory(f"rmsnorm-rope:{b}x{s}x{h}", build))
    return out


def _rmsnorm_rope_case(suite, b, s, h, dtype, head_dim, eps) -> Case:
    dev = _device(suite)
    x = _randn((b, s, h), dtype, dev)
    w = (1 + 0.1 * torch.randn(h, device=dev)).to(dtype)
    cos, sin = ref.rope_tables(s, head_dim, dtype, dev)
    rdt = _ref_dtype(x.numel())
    es = x.element_size()
    base = ref.rmsnorm_rope_baseline()
    impls = [
        _ours("triton-ops", "fused_rmsnorm_rope", "fused_rmsnorm_rope", lambda f: f(x, w, cos, sin, eps)),
        Impl("eager", lambda: base(x, w, cos, sin, eps)),
        _compiled(suite, "torch.compile", base, x, w, cos, sin, eps),
        _liger(suite, "liger", lambda: _liger_rmsnorm_rope(x, w, cos, sin, eps)),
    ]
    return Case(
        group="rmsnorm-rope", name=f"{b}x{s}x{h}", dtype=dtype_name(dtype),
        reference=lambda: ref.rmsnorm_rope_reference(x, w, cos, sin, eps, dtype=rdt), impls=impls,
        tol=TOLERANCES[dtype], params={"batch": b, "seq": s, "hidden": h, "head_dim": head_dim},
        bytes_moved=2 * x.numel() * es + h * es + 2 * s * head_dim * es,
        panel="prefill: [batch, seq, hidden]", x=2 * x.numel() * es / 2**20, x_label="MB moved (x read + y written)",
    )


def _liger_rmsnorm_rope(x, w, cos, sin, eps, position_ids=None) -> Callable[[], torch.Tensor]:
    """Liger-Kernel's two launches: rms_norm, then rope on the [batch, heads, seq, head_dim] view."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.rope import LigerRopeFunction

    b, s, h = x.shape
    hd = cos.shape[-1]
    # Liger's rope needs a k tensor; one head of it (1/num_heads of the work) is the least it accepts.
    k = torch.zeros(b, s, 1, hd, device=x.device, dtype=x.dtype).transpose(1, 2)

    def run() -> torch.Tensor:
        y = LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)
        q = y.view(b, s, h // hd, hd).transpose(1, 2)
        c, sn = (cos, sin) if position_ids is None else (cos[position_ids], sin[position_ids])
        q, _ = LigerRopeFunction.apply(q, k, c, sn)
        return q.transpose(1, 2).reshape(b, s, h)

    return run


def rmsnorm_rope_decode_cases(suite: BenchmarkSuite, num_tokens: Sequence[int], hidden_dims: Sequence[int],
                              dtypes: Sequence[torch.dtype], head_dim: int, max_position: int) -> list[CaseFactory]:
    out = []
    for n in num_tokens:
        for h in hidden_dims:
            for dtype in dtypes:
                def build(n=n, h=h, dtype=dtype) -> Case:
                    return _rmsnorm_rope_decode_case(suite, n, h, dtype, head_dim, max_position)

                out.append(CaseFactory(f"rmsnorm-rope:decode {n}x{h}", build))
    return out


def _rmsnorm_rope_decode_case(suite, n, h, dtype, head_dim, max_position, eps=1e-6) -> Case:
    dev = _device(suite)
    x = _randn((n, 1, h), dtype, dev)
    w = (1 + 0.1 * torch.randn(h, device=dev)).to(dtype)
    cos, sin = ref.rope_tables(max_position, head_dim, dtype, dev)
    pos = torch.randint(0, max_position, (n, 1), device=dev)
    es = x.element_size()
    kw = {"graph": True}
    base = ref.rmsnorm_rope_baseline()
    impls = [
        _ours("triton-ops", "fused_rmsnorm_rope", "fused_rmsnorm_rope",
              lambda f: f(x, w, cos, sin, eps, position_ids=pos), **kw),
        Impl("eager", lambda: base(x, w, cos, sin, eps, pos), **kw),
        _compiled(suite, "torch.compile", base, x, w, cos, sin, eps, pos),
        _liger(suite, "liger", lambda: _liger_rmsnorm_rope(x, w, cos, sin, eps, pos), **kw),
    ]
    impls[2].graph = True
    return Case(
        group="rmsnorm-rope", name=f"decode {n} tok x {h}", dtype=dtype_name(dtype),
        reference=lambda: ref.rmsnorm_rope_reference(x, w, cos, sin, eps, pos), impls=impls, tol=TOLERANCES[dtype],
        params={"tokens": n, "hidden": h, "head_dim": head_dim, "max_position": max_position, "position_ids": True},
        bytes_moved=2 * x.numel() * es + h * es + 2 * n * head_dim * es + pos.numel() * pos.element_size(),
        panel="decode: position_ids into a cos/sin cache", x=n, x_label="tokens",
        note="CUDA-graph column: per-call time of 20 calls replayed from one graph (no host overhead)",
    )


def qk_norm_rope_cases(suite: BenchmarkSuite, shapes: Sequence[tuple[int, int]], dtypes: Sequence[torch.dtype],
                       nq: int, nk: int, head_dim: int, packed: bool) -> list[CaseFactory]:
    out = []
    for b, s in shapes:
        for dtype in dtypes:
            def build(b=b, s=s, dtype=dtype) -> Case:
                return _qk_case(suite, b, s, dtype, nq, nk, head_dim, packed)

            out.append(CaseFactory(f"rmsnorm-rope:qk {b}x{s}", build))
    return out


def _qk_case(suite, b, s, dtype, nq, nk, hd, packed, eps=1e-6) -> Case:
    dev = _device(suite)
    if packed:  # q and k as strided views of one [batch, seq, (nq + 2 nk) * hd] projection output
        qkv = _randn((b, s, (nq + 2 * nk) * hd), dtype, dev)
        q = qkv[..., : nq * hd].view(b, s, nq, hd)
        k = qkv[..., nq * hd: (nq + nk) * hd].view(b, s, nk, hd)
    else:
        q, k = _randn((b, s, nq, hd), dtype, dev), _randn((b, s, nk, hd), dtype, dev)
    qw = (1 + 0.1 * torch.randn(hd, device=dev)).to(dtype)
    kw_ = (1 + 0.1 * torch.randn(hd, device=dev)).to(dtype)
    cos, sin = ref.rope_tables(s, hd, dtype, dev)
    es = q.element_size()
    n = q.numel() + k.numel()
    rdt = _ref_dtype(n)

    base = ref.qk_norm_rope_baseline()

    def flat(out: Any) -> torch.Tensor:
        qo, ko = out
        return torch.cat((qo.reshape(-1), ko.reshape(-1)))

    impls = [
        _ours("triton-ops", "fused_rmsnorm_rope", "fused_qk_norm_rope",
              lambda f: f(q, k, qw, kw_, cos, sin, eps=eps), check=flat),
        Impl("eager", lambda: base(q, k, qw, kw_, cos, sin, eps), check=flat),
        _compiled(suite, "torch.compile", base, q, k, qw, kw_, cos, sin, eps),
    ]
    impls[2].check = flat
    return Case(
        group="rmsnorm-rope", name=f"qk {b}x{s} ({nq}q/{nk}kv x {hd}{', packed' if packed else ''})",
        dtype=dtype_name(dtype), reference=lambda: ref.qk_norm_rope_reference(q, k, qw, kw_, cos, sin, eps, dtype=rdt),
        impls=impls, tol=TOLERANCES[dtype],
        params={"batch": b, "seq": s, "q_heads": nq, "kv_heads": nk, "head_dim": hd, "packed": packed},
        bytes_moved=2 * n * es + 2 * hd * es + 2 * s * hd * es,
        panel="fused_qk_norm_rope (Qwen3-8B heads)", x=2 * n * es / 2**20, x_label="MB moved (q, k read + written)",
    )


def add_rmsnorm_cases(suite: BenchmarkSuite, num_tokens: Sequence[int], hidden_dims: Sequence[int],
                      dtypes: Sequence[torch.dtype]) -> list[CaseFactory]:
    out = []
    for n in num_tokens:
        for h in hidden_dims:
            for dtype in dtypes:
                def build(n=n, h=h, dtype=dtype) -> Case:
                    return _add_rmsnorm_case(suite, n, h, dtype)

                out.append(CaseFactory(f"rmsnorm-rope:add-rmsnorm {n}x{h}", build))
    return out


def _add_rmsnorm_case(suite, n, h, dtype, eps=1e-6) -> Case:
    dev = _device(suite)
    x, r = _randn((n, h), dtype, dev), _randn((n, h), dtype, dev)
    w = (1 + 0.1 * torch.randn(h, device=dev)).to(dtype)
    es = x.element_size()
    base = ref.add_rmsnorm_baseline()

    def flat(out: Any) -> torch.Tensor:
        y, s = out
        return torch.cat((y.reshape(-1), s.reshape(-1)))

    kw = {"graph": True, "check": flat}
    impls = [
        _ours("triton-ops", "fused_rmsnorm_rope", "fused_add_rmsnorm", lambda f: f(x, r, w, eps), **kw),
        Impl("eager", lambda: base(x, r, w, eps), **kw),
        _compiled(suite, "torch.compile", base, x, r, w, eps),
    ]
    impls[2].check, impls[2].graph = flat, True
    return Case(
        group="rmsnorm-rope", name=f"add+rmsnorm {n} tok x {h}", dtype=dtype_name(dtype),
        reference=lambda: ref.add_rmsnorm_reference(x, r, w, eps, dtype=_ref_dtype(2 * x.numel())), impls=impls,
        tol=TOLERANCES[dtype], params={"tokens": n, "hidden": h},
        bytes_moved=4 * x.numel() * es + h * es,  # x and residual read; the new residual and y written
        panel="residual add + RMSNorm (decoder layer)", x=n, x_label="tokens",
        note="transformers' own add + LlamaRMSNorm as the eager baseline; CUDA-graph column: replayed per call",
    )


# --------------------------------------------------------------------------- gated MLP

def gated_mlp_cases(suite: BenchmarkSuite, batch_sizes: Sequence[int], dims: Sequence[tuple[int, int]],
                    dtypes: Sequence[torch.dtype], activation: str) -> list[CaseFactory]:
    out = []
    for m in batch_sizes:  # decode sizes first, prefill last (the heaviest)
        for h, i in dims:
            for dtype in dtypes:
                def build(m=m, h=h, i=i, dtype=dtype) -> Case:
                    return _gated_case(suite, m, h, i, dtype, activation)

                out.append(CaseFactory(f"gated-mlp:M{m} H{h} I{i}", build))
    return out


def _gated_case(suite, m, h, i, dtype, activation) -> Case:
    dev = _device(suite)
    x = _randn((m, h), dtype, dev)
    wg = _randn((i, h), dtype, dev, scale=h ** -0.5)
    wu = _randn((i, h), dtype, dev, scale=h ** -0.5)
    es = x.element_size()
    decode = m <= 64
    rdt = _ref_dtype(max(m * i * 2, i * h * 2) if suite.on_gpu else 0)
    base = ref.gated_mlp_baseline()
    impls = [
        _ours("triton-ops", "fused_gated_mlp", "fused_gated_mlp", lambda f: f(x, wg, wu, activation),
              track_memory=True),
        Impl("eager", lambda: base(x, wg, wu, activation), track_memory=True),
        _compiled(suite, "torch.compile", base, x, wg, wu, activation),
    ]
    if suite.on_gpu:
        w_cat = torch.cat((wg, wu), 0)
        # One concatenated cuBLAS GEMM, no activation: a ceiling for the GEMM part (its output is [M, 2I]).
        impls.append(Impl("cuBLAS cat-GEMM", lambda: F.linear(x, w_cat), gpu_only=True, optional=True,
                          error_fn=lambda out: 0.0 if out.shape == (m, 2 * i) else math.nan,
                          note="GEMM only (x @ [Wg; Wu]^T), no activation"))
        if decode:
            # Both weights read once and nothing else: the streaming bound under this timing.
            impls.append(Impl("weights read", weights_read(wg, wu), role="ceiling", gpu_only=True, optional=True,
                              error_fn=lambda out: 0.0, note="reads Wg and Wu once (no GEMM): the streaming ceiling"))
    if activation == "silu":
        impls.append(_liger(suite, "liger", lambda: _liger_swiglu(x, wg, wu)))
    return Case(
        group="gated-mlp", name=f"M={m} H={h} I={i}", dtype=dtype_name(dtype),
        reference=lambda: ref.gated_mlp_reference(x, wg, wu, activation, dtype=rdt), impls=impls, tol=TOLERANCES[dtype],
        params={"M": m, "hidden": h, "intermediate": i, "activation": activation},
        bytes_moved=(2 * i * h + m * h + m * i) * es, flops=2 * m * h * 2 * i,
        panel="decode (M <= 64): weight streaming" if decode else "prefill: TFLOP/s",
        x=(2 * i * h + m * h + m * i) * es / 2**20 if decode else 2 * m * h * 2 * i / 1e9,
        x_label="MB moved (weights + x + out)" if decode else "GFLOP per call", metric="gbps" if decode else "tflops",
        cublas="cuBLAS cat-GEMM" if suite.on_gpu else None, compute_dtype="bf16",
    )


def gpt_oss_expert_cases(suite: BenchmarkSuite, batch_sizes: Sequence[int], hidden: int, intermediate: int,
                         dtypes: Sequence[torch.dtype]) -> list[CaseFactory]:
    out = []
    for m in batch_sizes:
        for dtype in dtypes:
            def build(m=m, dtype=dtype) -> Case:
                return _gpt_oss_case(suite, m, hidden, intermediate, dtype)

            out.append(CaseFactory(f"gated-mlp:gpt-oss M{m} H{hidden} I{intermediate}", build))
    return out


def _gpt_oss_case(suite, m, h, i, dtype) -> Case:
    """One gpt-oss expert as the checkpoint stores it (interleaved packed weight and bias, clamped SwiGLU),
    against the model's own PyTorch formulation."""
    dev = _device(suite)
    x = _randn((m, h), dtype, dev, scale=2.0)
    w = _randn((2 * i, h), dtype, dev, scale=h ** -0.5)
    b = _randn((2 * i,), dtype, dev, scale=0.1)
    es = x.element_size()
    decode = m <= 64
    impls = [
        _ours("triton-ops", "fused_gated_mlp", "fused_gated_mlp",
              lambda f: f(x, w, activation="swiglu_oai", weight_layout="interleaved", gate_bias=b),
              track_memory=True),
        Impl("eager (gpt-oss code)", lambda: ref.gpt_oss_expert_eager(x, w, b), track_memory=True),
        _compiled(suite, "torch.compile", ref.gpt_oss_expert_eager, x, w, b),
    ]
    if suite.on_gpu:
        impls.append(Impl("cuBLAS GEMM + bias", lambda: F.linear(x, w, b), gpu_only=True, optional=True,
                          error_fn=lambda out: 0.0 if out.shape == (m, 2 * i) else math.nan,
                          note="the packed GEMM with its bias only, no activation"))
    return Case(
        group="gated-mlp", name=f"gpt-oss expert M={m} H={h} I={i}", dtype=dtype_name(dtype),
        reference=lambda: ref.gpt_oss_expert_exact(x, w, b, dtype=_ref_dtype(m * i * 2 if suite.on_gpu else 0)),
        impls=impls, tol=TOLERANCES[dtype],
        params={"M": m, "hidden": h, "intermediate": i, "activation": "swiglu_oai", "layout": "interleaved"},
        bytes_moved=(2 * i * h + 2 * i + m * h + m * i) * es, flops=2 * m * h * 2 * i,
        panel=("gpt-oss expert, decode: interleaved packed weight + bias, clamped SwiGLU" if decode
               else "gpt-oss expert, prefill: TFLOP/s"),
        x=(2 * i * h + m * h + m * i) * es / 2**20 if decode else 2 * m * h * 2 * i / 1e9,
        x_label="MB moved (weights + x + out)" if decode else "GFLOP per call",
        metric="gbps" if decode else "tflops", cublas="cuBLAS GEMM + bias" if suite.on_gpu else None,
        compute_dtype="bf16",
    )


def _liger_swiglu(x, wg, wu) -> Callable[[], torch.Tensor]:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return lambda: LigerSiLUMulFunction.apply(F.linear(x, wg), F.linear(x, wu))


# --------------------------------------------------------------------------- FP8

def _fp8_operands(suite, m, n, k, granularity, dev):
    """E4M3 operands quantized in plain torch: a [M, K] row-major, b [K, N] column-major (cuBLAS's layout)."""
    a16 = _randn((m, k), torch.bfloat16, dev)
    b16_t = _randn((n, k), torch.bfloat16, dev, scale=k ** -0.5)  # [N, K]: a weight as nn.Linear stores it
    g = "tensor" if granularity == "tensor" else "row"
    a8, sa = ref.quantize_fp8_eager(a16, g)
    bt8, sb = ref.quantize_fp8_eager(b16_t, g)  # per row of [N, K] = per output channel of b
    b8 = bt8.t()  # [K, N], column-major
    if granularity == "tensor":
        sa_k, sb_k = sa.reshape(()), sb.reshape(())
    else:
        sa_k, sb_k = sa.reshape(m, 1).contiguous(), sb.reshape(1, n).contiguous()
    return a16, b16_t, a8, b8, sa_k, sb_k


def fp8_gemm_cases(suite: BenchmarkSuite, sizes, granularities, decode_m, decode_nk, out_dtype) -> list[CaseFactory]:
    out = []
    for (m, n, k) in sizes:
        for g in granularities:
            out.append(CaseFactory(f"fp8-gemm:{m}x{n}x{k} {g}",
                                   lambda m=m, n=n, k=k, g=g: _fp8_gemm_case(suite, m, n, k, g, out_dtype, False)))
    for (n, k) in decode_nk:
        for m in decode_m:
            out.append(CaseFactory(f"fp8-gemm:decode {m}x{n}x{k}",
                                   lambda m=m, n=n, k=k: _fp8_gemm_case(suite, m, n, k, "tensor", out_dtype, True)))
    return out


def _fp8_gemm_case(suite, m, n, k, granularity, out_dtype, decode) -> Case:
    dev = _device(suite)
    a16, b16_t, a8, b8, sa, sb = _fp8_operands(suite, m, n, k, granularity, dev)
    rdt = torch.float64

    def reference() -> torch.Tensor:
        a = a8.to(rdt) * (sa.to(rdt) if sa.dim() else sa.to(rdt))
        b = b8.to(rdt) * (sb.to(rdt) if sb.dim() else sb.to(rdt))
        return a @ b

    impls = [
        _ours("triton-ops", "fp8_gemm", "fp8_gemm",
              lambda f: f(a8, b8, a_scale=sa, b_scale=sb, out_dtype=out_dtype)),
        _ours("triton-ops fast-accum", "fp8_gemm", "fp8_gemm",
              lambda f: f(a8, b8, a_scale=sa, b_scale=sb, out_dtype=out_dtype, fast_accum=True),
              tol=FP8_GEMM_FAST_TOL),
    ]
    pairs = {"triton-ops": ["cuBLAS _scaled_mm", "bf16 matmul"],
             "triton-ops fast-accum": ["cuBLAS _scaled_mm fast-accum", "bf16 matmul"]}
    if suite.on_gpu:
        sa_c = sa.reshape(1) if granularity == "tensor" else sa
        sb_c = sb.reshape(1) if granularity == "tensor" else sb
        impls += [
            Impl("cuBLAS _scaled_mm", gpu_only=True, optional=True, fn=lambda: torch._scaled_mm(
                a8, b8, scale_a=sa_c.float(), scale_b=sb_c.float(), out_dtype=out_dtype)),
            Impl("cuBLAS _scaled_mm fast-accum", gpu_only=True, optional=True, tol=FP8_GEMM_FAST_TOL,
                 fn=lambda: torch._scaled_mm(
                a8, b8, scale_a=sa_c.float(), scale_b=sb_c.float(), out_dtype=out_dtype, use_fast_accum=True)),
        ]
        b16 = b16_t.t()
        # bf16 GEMM on the unquantized operands: compared by shape only (its values are not the FP8 product).
        impls.append(Impl("bf16 matmul", lambda: a16 @ b16, gpu_only=True, optional=True,
                          error_fn=lambda out: 0.0 if out.shape == (m, n) else math.nan,
                          note="unquantized bf16 operands"))
    name = f"{m}x{n}x{k}" if not decode else f"decode M={m} N={n} K={k}"
    return Case(
        group="fp8-gemm", name=f"{name} {granularity}", dtype="e4m3",
        reference=reference, impls=impls, tol=FP8_GEMM_TOL,
        params={"M": m, "N": n, "K": k, "scales": granularity, "out_dtype": dtype_name(out_dtype)},
        bytes_moved=m * k + k * n + m * n * torch.empty((), dtype=out_dtype).element_size(),
        flops=2 * m * n * k,
        panel=("decode: weight streaming (GB/s)" if decode else f"GEMM: TFLOP/s, {granularity} scales"),
        x=(m * k + k * n) / 2**20 if decode else 2 * m * n * k / 1e9,
        x_label="MB of operands (weights + x)" if decode else "GFLOP per call",
        metric="gbps" if decode else "tflops",
        cublas={"triton-ops": "cuBLAS _scaled_mm", "triton-ops fast-accum": "cuBLAS _scaled_mm fast-accum"}
        if suite.on_gpu else None,
        speedup_pairs=pairs, compute_dtype="fp8",
    )


def quantize_fp8_cases(suite: BenchmarkSuite, shapes, granularities, dtype) -> list[CaseFactory]:
    return [CaseFactory(f"fp8-gemm:quantize {m}x{k} {g}", lambda m=m, k=k, g=g: _quant_case(suite, m, k, g, dtype))
            for (m, k) in shapes for g in granularities]


def _quant_error(x: torch.Tensor, granularity: str) -> Callable[[Any], float]:
    """The quantized values must equal the package's bit-exact reference (torch's own cast of ``x * (1/scale)``)
    and the scale its ``amax / 448``: the error is the larger of the fraction of mismatched values and the
    scale's relative error."""
    q_ref, s_ref = ref.quantize_fp8_spec(x, granularity)

    def error(out: Any) -> float:
        q, scale = out
        if q.shape != q_ref.shape or q.dtype != q_ref.dtype:
            return math.nan
        mismatch = (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item()
        scale_err = relative_error(scale.float().reshape(s_ref.shape), s_ref)
        return max(mismatch, scale_err)

    return error


def _quant_case(suite, m, k, granularity, dtype) -> Case:
    dev = _device(suite)
    x = _randn((m, k), dtype, dev)
    err = _quant_error(x, granularity)
    impls = [
        _ours("triton-ops", "fp8_gemm", "quantize_fp8", lambda f: f(x, "e4m3", granularity), error_fn=err),
        Impl("eager", lambda: ref.quantize_fp8_eager(x, granularity), error_fn=err, tol=QUANT_BASELINE_TOL),
        _compiled(suite, "torch.compile", ref.quantize_fp8_eager, x, granularity),
    ]
    impls[2].error_fn = err
    impls[2].tol = QUANT_BASELINE_TOL
    es = x.element_size()
    n_scales = 1 if granularity == "tensor" else m if granularity == "row" else m * (k // 128)
    return Case(
        group="fp8-gemm", name=f"quantize {m}x{k} {granularity}", dtype=dtype_name(dtype), reference=None,
        impls=impls, tol=1e-6, params={"M": m, "K": k, "granularity": granularity, "fmt": "e4m3"},
        bytes_moved=m * k * (es + 1) + 4 * n_scales, panel="quantize_fp8 (dynamic, E4M3)",
        x=m * k * (es + 1) / 2**20, x_label="MB moved",
        note="error = max(fraction of values differing from the bit-exact reference, relative error of the scale); "
             "ours must match it (1e-6), the baselines may round a few values differently (a compiled division "
             "need not be IEEE-exact): 1e-3",
    )


def fp8_linear_cases(suite: BenchmarkSuite, batch_sizes, in_features, out_features, dtype) -> list[CaseFactory]:
    return [CaseFactory(f"fp8-gemm:FP8Linear M{m}",
                        lambda m=m: _fp8_linear_case(suite, m, in_features, out_features, dtype))
            for m in batch_sizes]


def _fp8_linear_case(suite, m, fin, fout, dtype) -> Case:
    dev = _device(suite)
    lin = torch.nn.Linear(fin, fout, bias=False, device=dev, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(_randn((fout, fin), dtype, dev, scale=fin ** -0.5))
    x = _randn((m, fin), dtype, dev)
    try:
        (cls,) = _import("fp8_gemm", "FP8Linear")
        fp8 = cls.from_linear(lin)
        ours = Impl("triton-ops FP8Linear", lambda: fp8(x), role="ours",
                    note="per-channel weights, per-row activations quantized per call")
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"

        def missing() -> Any:
            raise RuntimeError(msg)

        ours = Impl("triton-ops FP8Linear", missing, role="ours")
    es = x.element_size()
    return Case(
        group="fp8-gemm", name=f"FP8Linear M={m} {fin}->{fout}", dtype=dtype_name(dtype),
        reference=lambda: F.linear(x.double(), lin.weight.double()),
        impls=[ours, Impl("bf16 nn.Linear", lambda: lin(x))], tol=FP8_LINEAR_TOL,
        params={"M": m, "in_features": fin, "out_features": fout},
        bytes_moved=fin * fout + m * fin * es + m * fout * es, flops=2 * m * fin * fout,
        panel="FP8Linear vs bf16 nn.Linear", x=2 * m * fin * fout / 1e9, x_label="GFLOP per call", metric="tflops",
        compute_dtype="fp8",
        note="tolerance against the unquantized product: FP8's own error (3-4 % on random data)",
    )


# --------------------------------------------------------------------------- FP8 accuracy (no timing)

_GRANULARITY_PAIRS = [("tensor", "tensor", "tensor x tensor"), ("row", "channel", "row x channel"),
                      ("block", "block", "block 1x128 x 128x128")]


def fp8_accuracy_tables(suite: BenchmarkSuite, m: int, n: int, ks: Sequence[int]) -> list[dict[str, Any]]:
    """The GEMM's own error (fp32 output, against the float64 product of the same FP8 operands) per scale
    granularity and K, and quantization SQNR per granularity (the package's ``sqnr_report``)."""
    from fp8_gemm import fp8_gemm, quantize_fp8
    from fp8_gemm.reference import fp8_matmul_reference

    dev = _device(suite)
    rows = []
    for k in ks:
        a16 = _randn((m, k), torch.bfloat16, dev)
        b16 = _randn((k, n), torch.bfloat16, dev, scale=k ** -0.5)
        for ga, gb, label in _GRANULARITY_PAIRS:
            a8, sa = quantize_fp8(a16, "e4m3", ga)
            b8, sb = quantize_fp8(b16, "e4m3", gb, role="weight")
            ref64 = fp8_matmul_reference(a8, b8, sa, sb)
            row: list[Any] = [label, k]
            for fast in (False, True):
                row.append(_try_error(ref64, fp8_gemm, a8, b8, a_scale=sa, b_scale=sb, out_dtype=torch.float32,
                                      fast_accum=fast))
            if suite.on_gpu and ga != "block":
                b_cm = b8.t().contiguous().t()  # cuBLAS wants b column-major
                sa_c = sa.reshape(1).float() if ga == "tensor" else sa.reshape(m, 1).float()
                sb_c = sb.reshape(1).float() if gb == "tensor" else sb.reshape(1, n).float()
                # cuBLAS's row-wise scaling produces bf16 only: its figure then includes bf16 rounding.
                out_dtype = torch.float32 if ga == "tensor" else torch.bfloat16
                for fast in (False, True):
                    row.append(_try_error(ref64, torch._scaled_mm, a8, b_cm, scale_a=sa_c, scale_b=sb_c,
                                          out_dtype=out_dtype, use_fast_accum=fast))
            else:
                row += [None, None]
            rows.append(row)
        del a16, b16
    tables = [{
        "group": "fp8-gemm",
        "title": f"FP8 GEMM accuracy: the kernel's own error ({m} x {n} x K, fp32 output)",
        "note": "relative Frobenius error against the float64 product of the same dequantized FP8 operands (so only "
                "accumulation and output rounding count); cuBLAS's row-wise scaling outputs bf16 only (its column "
                "then includes bf16 rounding, ~3e-3); block scales have no cuBLAS counterpart in torch"
                + ("" if suite.on_gpu else "; under the interpreter accumulation is exact, so only a GPU run can "
                   "show the difference between the modes"),
        "columns": ["scales (a x b)", "K", "triton-ops (faithful)", "triton-ops fast-accum", "cuBLAS _scaled_mm",
                    "cuBLAS fast-accum"],
        "rows": rows,
    }]
    try:
        from fp8_gemm import sqnr_report

        sq = sqnr_report(256, 1024, device=dev)
        tables.append({
            "group": "fp8-gemm",
            "title": "Quantization accuracy: SQNR per granularity (E4M3, 256 x 1024)",
            "note": "SQNR of dequantize(quantize(x)) in dB on Gaussian data and on activations whose 4 outlier "
                    "columns are 100x larger; noise ratio = outlier-case relative error / normal-case (1.0: the "
                    "outliers cost nothing), on all values and on the ordinary columns alone",
            "columns": ["granularity", "SQNR normal (dB)", "SQNR outliers (dB)", "SQNR outliers, ordinary columns (dB)",
                        "noise ratio", "noise ratio, ordinary columns"],
            "rows": [[r["granularity"], r["sqnr_db"], r["sqnr_outliers_db"], r["sqnr_outliers_inliers_db"],
                      r["noise_ratio"], r["inlier_noise_ratio"]] for r in sq],
        })
    except Exception as exc:  # an older fp8-gemm without the accuracy helpers
        tables.append({"group": "fp8-gemm", "title": "Quantization accuracy", "note": f"not available: {exc}",
                       "columns": ["-"], "rows": []})
    return tables


def _try_error(ref: torch.Tensor, fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> float | str:
    try:
        return relative_error(fn(*args, **kwargs), ref)
    except Exception as exc:
        return f"{type(exc).__name__}"
