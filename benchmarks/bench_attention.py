"""Decode attention over a static cache (``decode_attention``) against transformers' attention and torch's sdpa:
``python -m benchmarks.bench_attention``.

On a GPU: bf16, one query per sequence, batch 1, 8 and 64, 1k, 8k and 32k valid positions in a static cache twice
as long (transformers' bool mask ``[B, 1, 1, L]`` covering the valid part; the tail is never attended), with
Llama-3-8B's heads (32 query, 8 KV, head dim 128) and gpt-oss's (64 / 8 / 64, attention sinks). Baselines, in the
same run:

- "transformers path": what transformers runs for that layer. Llama: ``sdpa_attention_forward`` (with a mask it
  expands the KV cache to every query head, ``repeat_kv``, then sdpa over the whole static cache; transformers 5.24,
  not 5.17, packs a single query's heads instead, in eager mode only). gpt-oss: its ``eager_attention_forward``
  (sdpa takes no sinks), with the additive mask transformers' eager path builds. Without transformers, an explicit
  repeat_kv + sdpa.
- "sdpa enable_gqa": ``F.scaled_dot_product_attention(..., attn_mask=mask, enable_gqa=True)`` (gpt-oss: without the
  sinks, checked against a reference without them).
- "torch.compile": the transformers path compiled (how transformers' compiled static-cache decode runs it: under
  ``torch.compile`` it always takes ``repeat_kv``). One compiled function per head shape, shared by the cases (it
  recompiles once with dynamic shapes), capped by ``--compile-budget-s`` (default 30 s).

Every implementation is checked against an fp32 reference of the same bf16 inputs before it is timed. The floor of a
case is its valid K/V bytes over the copy bandwidth measured in the run; "floor / ours" is floor over our time. The
run has a default budget of 70 s (``--budget-s``): cases past it are reported as skipped (batch 1 runs first, so a
cut keeps the decode cases).
Writes ``docs/benchmarks/attention-<device>.md`` and ``.json`` (``--out`` elsewhere).

Without a GPU: tiny heads (4 / 2 / 16, and 8 / 2 / 16 with sinks), 40 valid positions of an 80-long cache, batch 1
and 2, under the Triton interpreter: correctness only (ours and the eager baselines against the reference).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from ._common import DEFAULT_OUT, make_suite, parse_args

GROUP = "attention"
TOL_BF16 = 1.6e-2
DEFAULT_BUDGET_S = 70.0
DEFAULT_COMPILE_BUDGET_S = 30.0
# name -> (query heads, KV heads, head dim, sinks)
HEADS = {"Llama-3-8B": (32, 8, 128, False), "gpt-oss": (64, 8, 64, True)}
TINY_HEADS = {"tiny": (4, 2, 16, False), "tiny+sinks": (8, 2, 16, True)}
BATCHES = (1, 8, 64)
CONTEXTS = (1024, 8192, 32768)


class _AttentionModule(torch.nn.Module):
    """The attributes transformers' attention functions read from the attention module."""

    def __init__(self, hq: int, hkv: int, d: int, sinks: torch.Tensor | None) -> None:
        super().__init__()
        self.num_key_value_groups = hq // hkv
        self.scaling = d ** -0.5
        self.is_causal = True
        if sinks is not None:
            self.sinks = torch.nn.Parameter(sinks, requires_grad=False)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _replica_sdpa_path(module, q, k, v, mask, scaling):
    """transformers' sdpa path with a mask (repeat_kv, then sdpa), for when transformers is not installed."""
    k, v = _repeat_kv(k, module.num_key_value_groups), _repeat_kv(v, module.num_key_value_groups)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _transformers_path(with_sinks: bool):
    """(function(module, q, k, v, mask, scaling) -> (out, weights), description)."""
    try:
        import transformers
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward
    except Exception:
        if with_sinks:
            return None, "transformers missing"
        return _replica_sdpa_path, "repeat_kv + sdpa (transformers missing: a replica)"
    version = transformers.__version__
    if with_sinks:
        def eager(module, q, k, v, mask, scaling):
            return eager_attention_forward(module, q, k, v, mask, scaling=scaling, dropout=0.0)

        return eager, f"transformers {version} gpt-oss eager_attention_forward"

    def sdpa(module, q, k, v, mask, scaling):
        return sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=scaling)

    return sdpa, f"transformers {version} sdpa_attention_forward"


def _reference(q, k, v, ctx: int, sinks: torch.Tensor | None) -> torch.Tensor:
    """fp32 attention over the valid prefix, one sequence at a time (a whole 32k batch-64 cache repeated to every
    query head in fp32 would not fit)."""
    from decode_attention import decode_attention_reference

    out = [decode_attention_reference(q[i:i + 1].float(), k[i:i + 1, :, :ctx].float(), v[i:i + 1, :, :ctx].float(),
                                      sinks=None if sinks is None else sinks.float())
           for i in range(q.shape[0])]
    return torch.cat(out)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    from triton_ops_core.testing import relative_error

    return relative_error(out, ref)


def _compiled_impl(suite, name: str, compiled, call):
    """The shared compiled function as an optional baseline; its first call in a case counts against the budget."""
    from triton_ops.benchmark._model import Impl

    if compiled is None:
        return Impl(name, lambda: None, unavailable="needs a GPU" if not suite.on_gpu else "disabled",
                    optional=True, gpu_only=True)
    budget = suite.compile_budget
    if budget.exhausted():
        return Impl(name, lambda: None, optional=True, gpu_only=True,
                    unavailable=f"skipped: compile time budget ({budget.seconds:g} s) spent")
    state = {"first": True}

    def run():
        if state["first"]:
            t0 = time.perf_counter()
            out = call(compiled)
            torch.cuda.synchronize()
            budget.spent += time.perf_counter() - t0
            state["first"] = False
            return out
        return call(compiled)

    return Impl(name, run, optional=True, gpu_only=True, check=lambda out: out[0])


def _case(suite, heads: str, spec: tuple, b: int, ctx: int, shared: dict):
    from decode_attention import decode_attention
    from triton_ops.benchmark._model import Case, Impl

    hq, hkv, d, with_sinks = spec
    dev = torch.device("cuda") if suite.on_gpu else torch.device("cpu")
    dtype = torch.bfloat16
    cache_len = 2 * ctx
    g = torch.Generator(device=dev).manual_seed(b * 100003 + ctx)

    def rnd(*shape):
        return torch.randn(*shape, device=dev, generator=g).to(dtype)

    q = rnd(b, 1, hq, d).transpose(1, 2)  # [B, Hq, 1, D], as the q projection's view makes it
    k, v = rnd(b, hkv, cache_len, d), rnd(b, hkv, cache_len, d)
    mask = torch.zeros(b, 1, 1, cache_len, dtype=torch.bool, device=dev)
    mask[..., :ctx] = True
    sinks = (torch.randn(hq, device=dev, generator=g) * 2).to(dtype) if with_sinks else None
    module, compiled = shared[heads]  # one module per head shape: the compiled function's guards hold across cases
    if sinks is not None:
        module.sinks.data.copy_(sinks)
    scaling = module.scaling
    path, path_note = _transformers_path(with_sinks)
    # transformers' eager attention adds its mask: 0 where attended, the dtype's lowest value elsewhere
    path_mask = torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype) if with_sinks else mask

    impls = [Impl("triton-ops", lambda: decode_attention(q, k, v, mask, scale=scaling, sinks=sinks), role="ours",
                  graph=suite.on_gpu, track_memory=True)]
    if path is not None:
        impls.append(Impl("transformers path", lambda: path(module, q, k, v, path_mask, scaling),
                          check=lambda out: out[0], optional=True, track_memory=True, note=path_note))
    else:
        impls.append(Impl("transformers path", lambda: None, optional=True, unavailable=path_note))

    def sdpa_gqa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True).transpose(1, 2)

    if with_sinks:  # sdpa takes no sinks: checked against a reference without them
        no_sinks = {}

        def error_fn(out):
            if "ref" not in no_sinks:
                no_sinks["ref"] = _reference(q, k, v, ctx, None)
            return _relative_error(out, no_sinks["ref"])

        impls.append(Impl("sdpa enable_gqa", sdpa_gqa, optional=True, error_fn=error_fn,
                          note="without the sinks (sdpa takes none)"))
    else:
        impls.append(Impl("sdpa enable_gqa", sdpa_gqa, optional=True))
    impls.append(_compiled_impl(suite, "torch.compile", compiled, lambda fn: fn(module, q, k, v, path_mask, scaling)))
    kv_bytes = 2 * b * hkv * ctx * d * q.element_size()
    return Case(
        group=GROUP, name=f"{heads} heads {hq}/{hkv}/{d} B={b} context={ctx} (cache {cache_len})",
        dtype="bfloat16", reference=lambda: _reference(q, k, v, ctx, sinks), impls=impls, tol=TOL_BF16,
        params={"heads": heads, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "sinks": with_sinks, "batch": b,
                "context": ctx, "cache_len": cache_len, "valid_kv_bytes": kv_bytes},
        bytes_moved=kv_bytes, flops=4 * b * hq * ctx * d,
        panel=f"decode attention, {heads} heads: valid K/V bytes", x=kv_bytes / 2**20,
        x_label="MB of valid K/V", metric="gbps",
        note=f"static cache of {cache_len} positions, {ctx} valid (bool mask); floor = valid K/V bytes / copy bw",
    )


def _floor_table(suite) -> None:
    """Our time against the K/V-read floor and the baselines' times, per case (timed runs only)."""
    if not suite.measure:
        return
    peak = suite.peak_copy_gbps
    rows = []
    for r in suite.results:
        if r.group != GROUP or not r.params:
            continue
        ours = r.impl("triton-ops")
        floor_us = r.params["valid_kv_bytes"] / (peak * 1e9) * 1e6 if peak else None
        cells = [r.params["heads"], r.params["batch"], r.params["context"],
                 round(floor_us, 1) if floor_us else "-"]
        ours_us = ours.ms * 1e3 if ours is not None and ours.ms else None
        cells.append(round(ours_us, 1) if ours_us else "-")
        graph = ours.graph_ms if ours is not None else None
        cells.append(round(graph * 1e3, 1) if graph else "-")
        for name in ("transformers path", "sdpa enable_gqa", "torch.compile"):
            impl = r.impl(name)
            ms = impl.ms if impl is not None else None
            cells.append(f"{ms * 1e3:.1f} ({ms * 1e3 / ours_us:.1f}x)" if ms and ours_us else "-")
        cells.append(f"{100 * floor_us / ours_us:.0f} %" if floor_us and ours_us else "-")
        rows.append(cells)
    if not rows:
        return
    suite.tables.append({
        "group": GROUP, "title": "Decode attention: time against the K/V-read floor",
        "note": (f"floor = valid K/V bytes / the copy bandwidth measured in this run ({peak or 0:.0f} GB/s); times "
                 "are medians in us, a baseline's ratio is its time over ours"),
        "columns": ["heads", "batch", "context", "floor (us)", "triton-ops (us)", "triton-ops in a CUDA graph (us)",
                    "transformers path (us)", "sdpa enable_gqa (us)", "torch.compile (us)", "floor / ours"],
        "rows": rows,
    })
    for row in rows:
        print("  [attention floor] " + ", ".join(f"{c}={v}" for c, v in zip(suite.tables[-1]["columns"], row)),
              file=sys.stderr)


def _shared(suite, heads: dict) -> dict:
    """Per head shape: the attention module the transformers functions read, and one torch.compile of the
    transformers path (None without a GPU), which turns dynamic at its first recompile."""
    dev = torch.device("cuda") if suite.on_gpu else torch.device("cpu")
    out = {}
    for name, (hq, hkv, d, with_sinks) in heads.items():
        module = _AttentionModule(hq, hkv, d, torch.zeros(hq, dtype=torch.bfloat16) if with_sinks else None).to(dev)
        path, _ = _transformers_path(with_sinks)
        out[name] = (module, torch.compile(path) if suite.compile_baselines and path is not None else None)
    return out


def run(suite, quick: bool = False) -> None:
    """The sweep: batch-major (batch 1 first, so that a run cut by its budget keeps the decode cases)."""
    from triton_ops.benchmark._cases import CaseFactory

    if not suite.on_gpu:
        heads, batches, contexts = TINY_HEADS, (1, 2), (40,)
    else:
        heads = HEADS
        batches, contexts = ((1, 64), (1024, 32768)) if quick else (BATCHES, CONTEXTS)
    shared = _shared(suite, heads)
    factories = [CaseFactory(f"{GROUP}:{name} B{b} ctx{ctx}",
                             lambda name=name, spec=spec, b=b, ctx=ctx: _case(suite, name, spec, b, ctx, shared))
                 for b in batches for name, spec in heads.items() for ctx in contexts]
    suite.run(factories, label=GROUP)
    _floor_table(suite)


def main(argv=None) -> int:
    from triton_ops.benchmark._cases import CompileBudget
    from triton_ops.benchmark._env import device_tag

    args = parse_args(__doc__.splitlines()[0], argv)
    suite = make_suite(args)
    if args.budget_s is None:
        suite.time_budget_s = DEFAULT_BUDGET_S
    if args.compile_budget_s is None:
        suite.compile_budget = CompileBudget(DEFAULT_COMPILE_BUDGET_S)
    mode = "full sweep" if not args.quick else "quick sweep"
    if not suite.on_gpu:
        mode = "no GPU: tiny shapes under the Triton interpreter, correctness only"
    print(f"triton-ops benchmarks ({GROUP}): {mode}", file=sys.stderr, flush=True)
    start = time.monotonic()
    run(suite, quick=args.quick)
    out = args.out if args.out is not None else (DEFAULT_OUT if suite.measure else None)
    if out is not None:
        tag = device_tag(suite.environment.get("device", "device")) if suite.measure else "interpreter"
        files = suite.save_report(out / f"{GROUP}-{tag}.md", groups=[GROUP], plot=not args.no_plots,
                                  title=f"Decode attention on {suite.environment.get('device')}")
        print("wrote " + ", ".join(str(p) for p in files.values()), file=sys.stderr)
    print(f"\n== summary ({time.monotonic() - start:.0f} s) ==")
    print(suite.summary())
    return 1 if suite.failed else 0


if __name__ == "__main__":
    sys.exit(main())

