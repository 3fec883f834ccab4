"""gpt-oss-20b's mixture of experts (``fused_moe``) against transformers' ``GptOssMLP`` eager and its
torch.compile: ``python -m benchmarks.bench_moe``.

On a GPU: bf16, the gpt-oss-20b layer (hidden 2880, 32 experts, top 4, expert intermediate 2880, biases) at 1, 8,
64 and 512 tokens (decode) and 2048 and 8192 tokens (prefill) (``--quick``: 1 and 64). Baselines: transformers'
``GptOssMLP`` (its eager loop over the experts hit), its torch.compile, and the best plain PyTorch offers,
``torch._grouped_mm`` (routing in torch, one CUTLASS grouped GEMM per projection; GPU only). Ours runs twice: with
the bf16 experts, with FP8 (E4M3, per-column scales) experts quantized once, and W8A8 (the same experts stored
K-major, the activations quantized per row: ``fp8_activations=True``); the floor table compares them in CUDA graphs
(the issue's target: FP8 decode at most 0.6x of bf16).
Every implementation is checked against an fp32 reference of the same
bf16 inputs before it is timed. Each case also reports the weight-read floor: the bytes of the experts the
routing actually touches (plus the router) over the run's measured peak copy bandwidth (4.23 TB/s on the H200, 3.00
on an H100; 4.25e12 B/s where none was measured), and our time as a percentage of that floor. The suite's
bandwidth columns use the same bytes (``bytes_moved``), so "% of copy bw" is over the bytes actually needed.

Without a GPU: a tiny layer (hidden 64, 8 experts, top 2, intermediate 48) at 1 and 5 tokens under the Triton
interpreter, correctness only (our kernel and transformers' eager module against the fp32 reference).
"""

from __future__ import annotations

import sys
import time

import torch

from ._common import run_groups

GROUP = "moe"
FLOOR_BPS = 4.25e12  # bytes per second the weight-read floor divides by where the run measured no copy bandwidth
FLOOR_FLOPS = 790e12  # bf16 dense matrix work the H200/H100 sustain (device notes): the floor of a prefill
GPT_OSS_20B = {"hidden": 2880, "intermediate": 2880, "experts": 32, "top_k": 4}
TINY = {"hidden": 64, "intermediate": 48, "experts": 8, "top_k": 2}
TOL_BF16 = 1.6e-2
FP8_NAME = "triton-ops FP8 experts"
W8A8_NAME = "triton-ops W8A8 experts"


def _weights(shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random gpt-oss-layout parameters (transformers' names), scaled so the projections are O(1)."""
    h, i, e = shape["hidden"], shape["intermediate"], shape["experts"]
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*s, scale):
        return (torch.randn(*s, device=device, generator=g) * scale).to(dtype)

    return {
        "router.weight": rnd(e, h, scale=3 * h ** -0.5), "router.bias": rnd(e, scale=0.5),
        "experts.gate_up_proj": rnd(e, h, 2 * i, scale=3 * h ** -0.5),
        "experts.gate_up_proj_bias": rnd(e, 2 * i, scale=0.5),
        "experts.down_proj": rnd(e, i, h, scale=i ** -0.5), "experts.down_proj_bias": rnd(e, h, scale=0.5),
    }


def _transformers_mlp(shape: dict, params: dict[str, torch.Tensor]):
    """transformers' ``GptOssMLP`` holding ``params`` (shared, not copied); None when transformers is missing."""
    try:
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    except Exception:
        return None
    cfg = GptOssConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                       num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"],
                       experts_implementation="eager")
    with torch.device("meta"):
        mlp = GptOssMLP(cfg)
    for name, value in params.items():
        owner, attr = name.split(".")
        setattr(getattr(mlp, owner), attr, torch.nn.Parameter(value, requires_grad=False))
    return mlp.eval()


def _touched_bytes(x: torch.Tensor, params: dict[str, torch.Tensor], top_k: int) -> tuple[int, int]:
    """(experts hit, bytes a forward must read: router + the hit experts' weights and biases + x, + the output)."""
    from fused_moe import route_reference

    w = params["router.weight"]
    ids, _ = route_reference(x.float(), w.float(), params["router.bias"].float(), top_k, round_to=x.dtype)
    hit = int(ids.unique().numel())
    es = x.element_size()
    per_expert = sum(params[n][0].numel() for n in ("experts.gate_up_proj", "experts.gate_up_proj_bias",
                                                    "experts.down_proj", "experts.down_proj_bias")) * es
    router = (w.numel() + params["router.bias"].numel()) * es
    return hit, hit * per_expert + router + 2 * x.numel() * es


def _grouped_mm_moe(x, router_w, router_b, gate_up, gate_up_b, down, down_b, top_k: int,
                    alpha: float = 1.702, limit: float = 7.0):
    """The fastest gpt-oss MoE plain PyTorch offers: routing in torch, tokens sorted by expert, and the two expert
    GEMMs as ``torch._grouped_mm`` (one CUTLASS grouped GEMM each over all experts, empty experts free), biases,
    the clamped SwiGLU and the weighted combine as tensor ops. ``gate_up`` ``[E, H, 2I]`` and ``down`` ``[E, I, H]``
    as the model holds them (or a layout ``_grouped_mm`` prefers, prepared once outside the timed call)."""
    t, e = x.shape[0], gate_up.shape[0]
    logits = torch.nn.functional.linear(x, router_w, router_b)
    vals, ids = torch.topk(logits, top_k, dim=-1)
    wts = torch.softmax(vals.float(), dim=-1)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=e), 0).to(torch.int32)
    xs = x[order // top_k]
    h = torch._grouped_mm(xs, gate_up, offs=offs) + gate_up_b[flat[order]]
    gate, up = h[..., ::2].clamp(max=limit), h[..., 1::2].clamp(min=-limit, max=limit)
    act = ((up + 1) * (gate * torch.sigmoid(gate * alpha))).to(x.dtype)
    y = torch._grouped_mm(act, down, offs=offs) + down_b[flat[order]]
    y = y.float() * wts.reshape(-1)[order, None]
    out = torch.zeros(t, x.shape[1], device=x.device, dtype=torch.float32)
    return out.index_add_(0, order // top_k, y).to(x.dtype)


def _grouped_mm_impl(x, p: list[torch.Tensor], top_k: int):
    """``_grouped_mm_moe`` as a baseline, on the GPU where ``torch._grouped_mm`` runs (bf16, Hopper)."""
    from triton_ops.benchmark._model import Impl

    name = "torch._grouped_mm"
    if x.device.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return Impl(name, lambda: None, optional=True, gpu_only=True,
                    unavailable="needs torch._grouped_mm on a CUDA GPU")
    router_w, router_b, gate_up, gate_up_b, down, down_b = p
    try:
        _grouped_mm_moe(x[:1], *p, top_k)
    except RuntimeError:  # it wants the weights' K dimension contiguous: converted once, as a user would store them
        gate_up = gate_up.transpose(1, 2).contiguous().transpose(1, 2)
        down = down.transpose(1, 2).contiguous().transpose(1, 2)
        try:
            _grouped_mm_moe(x[:1], router_w, router_b, gate_up, gate_up_b, down, down_b, top_k)
        except RuntimeError as exc:
            return Impl(name, lambda: None, optional=True, gpu_only=True, unavailable=f"{exc}"[:120])
    return Impl(name, lambda: _grouped_mm_moe(x, router_w, router_b, gate_up, gate_up_b, down, down_b, top_k),
                track_memory=True)


def _compiled(suite, name: str, fn):
    """``torch.compile`` of ``fn`` as an optional baseline (n/a without a GPU, when disabled or out of budget)."""
    from triton_ops.benchmark._model import Impl

    if not suite.compile_baselines:
        return Impl(name, lambda: None, unavailable="needs a GPU" if not suite.on_gpu else "disabled",
                    optional=True, gpu_only=True)
    budget = suite.compile_budget
    if budget.exhausted():
        return Impl(name, lambda: None, optional=True, gpu_only=True,
                    unavailable=f"skipped: compile time budget ({budget.seconds:g} s) spent")
    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=False)
    state = {"first": True}

    def run():
        if state["first"]:
            t0 = time.perf_counter()
            out = compiled()
            budget.spent += time.perf_counter() - t0
            state["first"] = False
            return out
        return compiled()

    return Impl(name, run, optional=True, gpu_only=True)


def _floor_bps(suite) -> float:
    """The bandwidth the weight-read floor divides by: this run's measured peak copy bandwidth (bytes read plus
    written per second, as ``FLOOR_BPS``: 4.23 TB/s on the H200, 3.00 on an H100), else ``FLOOR_BPS``."""
    peak = getattr(suite, "peak_copy_gbps", None)
    return peak * 1e9 if peak else FLOOR_BPS


def _case(suite, t: int, shape: dict, dtype: torch.dtype):
    from fused_moe import fused_moe, moe_reference, quantize_experts_fp8
    from triton_ops.benchmark._model import Case, Impl
    from triton_ops_core.testing import relative_error

    dev = torch.device("cuda") if suite.on_gpu else torch.device("cpu")
    params = _weights(shape, dtype, dev, seed=t)
    x = (torch.randn(t, shape["hidden"], device=dev, generator=torch.Generator(device=dev).manual_seed(t + 1))
         .to(dtype))
    k = shape["top_k"]
    p = [params[n] for n in ("router.weight", "router.bias", "experts.gate_up_proj", "experts.gate_up_proj_bias",
                             "experts.down_proj", "experts.down_proj_bias")]
    hit, nbytes = _touched_bytes(x, params, k)
    flops = 2 * t * k * 3 * shape["hidden"] * shape["intermediate"]
    # decode is bound by the weights it reads, prefill by its matrix work: the floor is the larger of the two
    read_us, math_us = nbytes / _floor_bps(suite) * 1e6, flops / FLOOR_FLOPS * 1e6
    floor_us, floor_kind = (read_us, "weight read") if read_us >= math_us else (math_us, "matrix work")
    mlp = _transformers_mlp(shape, params)
    x3 = x[None]
    impls = [Impl("triton-ops", lambda: fused_moe(x, *p, k), role="ours", graph=suite.on_gpu, track_memory=True)]
    # FP8 expert weights (what patch_model(fp8=True, fp8_experts=True) holds), quantized once outside the timing;
    # checked against the reference of the dequantized weights at the bf16 tolerance (the kernel's own error, not
    # the weights' rounding)
    q1, s1, q2, s2 = quantize_experts_fp8(p[2], p[4])
    dequantized = [p[0], p[1], q1.float() * s1[:, None, :], p[3], q2.float() * s2[:, None, :], p[5]]

    def fp8_error(out):
        ref = moe_reference(*(a.float() for a in (x, *dequantized)), k, round_to=dtype)
        return relative_error(out, ref)

    impls.append(Impl(FP8_NAME, lambda: fused_moe(x, p[0], p[1], q1, p[3], q2, p[5], k, gate_up_scale=s1,
                                                  down_scale=s2),
                      role="ours", graph=suite.on_gpu, error_fn=fp8_error,
                      note="E4M3 experts, per-column scales, checked against the dequantized experts; bandwidth "
                           "columns count the bf16 bytes"))
    # W8A8: the same E4M3 experts stored K-major, the activations quantized per row (fp8_activations=True), checked
    # against the reference that quantizes the activations the same way
    k1, _, k2, _ = quantize_experts_fp8(p[2], p[4], k_major=True)

    def w8a8_error(out):
        ref = moe_reference(*(a.float() for a in (x, *dequantized)), k, round_to=dtype, fp8_activations=True)
        return relative_error(out, ref)

    impls.append(Impl(W8A8_NAME, lambda: fused_moe(x, p[0], p[1], k1, p[3], k2, p[5], k, gate_up_scale=s1,
                                                   down_scale=s2, fp8_activations=True),
                      role="ours", graph=suite.on_gpu, error_fn=w8a8_error,
                      note="E4M3 experts (K-major) and E4M3 activations per row, checked against the reference with "
                           "both quantized; bandwidth columns count the bf16 bytes"))
    if mlp is not None:
        def eager():
            with torch.no_grad():
                return mlp(x3)

        impls.append(Impl("transformers eager", eager, check=lambda out: out[0][0], track_memory=True))
        impls.append(_compiled(suite, "torch.compile", eager))
        impls[-1].check = lambda out: out[0][0]
    else:
        impls.append(Impl("transformers eager", lambda: None, optional=True, unavailable="transformers missing"))
    impls.append(_grouped_mm_impl(x, p, k))
    h, i, e = shape["hidden"], shape["intermediate"], shape["experts"]
    return Case(
        group=GROUP, name=f"gpt-oss MoE T={t} H={h} I={i} E={e} k={k}", dtype=str(dtype).removeprefix("torch."),
        reference=lambda: moe_reference(*(a.float() for a in (x, *p)), k, round_to=dtype),
        impls=impls, tol=TOL_BF16 if dtype == torch.bfloat16 else 1e-5,
        params={"tokens": t, "hidden": h, "intermediate": i, "experts": e, "top_k": k, "experts_hit": hit,
                "bytes_touched": nbytes, "weight_read_floor_us": round(read_us, 2),
                "matrix_work_floor_us": round(math_us, 2), "floor_us": round(floor_us, 2), "floor": floor_kind},
        bytes_moved=nbytes, flops=flops,
        panel="gpt-oss MoE: bytes of the experts hit (+ router, x, out)", x=nbytes / 2**20,
        x_label="MB needed (experts hit + router)", metric="gbps",
        note=f"{hit} of {e} experts hit; floor {floor_us:.1f} us ({floor_kind}: {_floor_bps(suite) / 1e12:.2f} TB/s, "
             f"{FLOOR_FLOPS / 1e12:.0f} TFLOP/s)",
    )


def _floor_table(suite) -> None:
    """Our time against the weight-read floor, per case (a table in the report, and lines on stderr)."""
    rows = []
    bps = _floor_bps(suite)  # (measured by now, if the run measures it at all)
    for r in suite.results:
        if r.group != GROUP or "bytes_touched" not in r.params:  # (a case past the time budget: no sizes)
            continue
        read_us, math_us = r.params["bytes_touched"] / bps * 1e6, r.params["matrix_work_floor_us"]
        floor, kind = (round(read_us, 2), "weight read") if read_us >= math_us else (math_us, "matrix work")
        cells = [r.params.get("tokens"), r.params.get("experts_hit"), kind, floor]
        for name in ("triton-ops", "transformers eager", "torch.compile", "torch._grouped_mm"):
            impl = r.impl(name)
            ms = impl.ms if impl is not None else None
            cells.append(round(ms * 1e3, 1) if ms else "-")
        ours = r.impl("triton-ops")
        graph = ours.graph_ms if ours is not None else None
        cells.append(round(graph * 1e3, 1) if graph else "-")
        fp8 = r.impl(FP8_NAME)
        fp8_graph = fp8.graph_ms if fp8 is not None else None
        cells.append(round(fp8_graph * 1e3, 1) if fp8_graph else "-")
        cells.append(f"{fp8_graph / graph:.2f}" if fp8_graph and graph else "-")
        w8a8 = r.impl(W8A8_NAME)
        w8a8_graph = w8a8.graph_ms if w8a8 is not None else None
        cells.append(round(w8a8_graph * 1e3, 1) if w8a8_graph else "-")
        cells.append(f"{w8a8_graph / graph:.2f}" if w8a8_graph and graph else "-")
        cells.append(f"{100 * floor / (ours.ms * 1e3):.0f} %" if ours is not None and ours.ms and floor else "-")
        rows.append(cells)
    if not rows:
        return
    suite.tables.append({
        "group": GROUP, "title": "gpt-oss MoE: time against the floor",
        "note": f"floor = the larger of the bytes of the experts hit (+ router, x, out) / {bps:.3g} B/s (this run's "
                f"peak copy bandwidth where measured) and "
                f"the matrix work / {FLOOR_FLOPS:.3g} FLOP/s; times are medians in us",
        "columns": ["tokens", "experts hit", "bound by", "floor (us)", "triton-ops (us)", "transformers eager (us)",
                    "torch.compile (us)", "torch._grouped_mm (us)", "triton-ops in a CUDA graph (us)",
                    "FP8 experts in a CUDA graph (us)", "FP8 / bf16 (graphs)", "W8A8 in a CUDA graph (us)",
                    "W8A8 / bf16 (graphs)", "floor / ours"],
        "rows": rows,
    })
    for row in rows:
        print("  [moe floor] " + ", ".join(f"{c}={v}" for c, v in zip(suite.tables[-1]["columns"], row)),
              file=sys.stderr)


def run(suite, quick: bool = False) -> None:
    from triton_ops.benchmark._cases import CaseFactory

    if not suite.on_gpu:
        cases = [(t, TINY) for t in (1, 5)]
    else:
        cases = [(t, GPT_OSS_20B) for t in ((1, 64) if quick else (1, 8, 64, 512, 2048, 8192))]
    suite.run([CaseFactory(f"{GROUP}:T{t}", lambda t=t, s=s: _case(suite, t, s, torch.bfloat16)) for t, s in cases],
              label=GROUP)
    _floor_table(suite)


def main(argv=None) -> int:
    return run_groups({GROUP: run}, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
