"""``BenchmarkSuite``: correctness gate, timing and metrics for every case, then reports."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from triton_ops_core.device import datasheet_tflops, has_gpu, is_interpreter

from . import _cases
from ._compare import relative_error
from ._env import collect_environment, device_tag
from ._model import ERROR, FAIL, NA, OK, SKIPPED, Case, CaseResult, ImplResult, Timing
from ._report import render_markdown, summary_lines

CaseFactory = Callable[[], Case]


class BenchmarkSuite:
    """Benchmarks the triton-ops kernels against PyTorch eager, ``torch.compile``, cuBLAS and Liger-Kernel.

    Every implementation of every case is first checked against a float64/float32 reference by relative error;
    a wrong one is marked ``FAIL`` in the report and is not timed. On a GPU the correct ones are then timed
    (``warmup_runs`` warm-ups, up to ``benchmark_runs`` runs of at most ``max_ms_per_measurement`` ms, L2
    flushed before each run, CUDA events) and their bandwidth is compared with a device copy of the same bytes
    and with the peak copy bandwidth measured once per run. Without a GPU (Triton's interpreter) only the
    correctness of every kernel is checked, on small shapes.

    Example::

        suite = BenchmarkSuite(warmup_runs=10, benchmark_runs=100)
        suite.benchmark_rmsnorm_rope(batch_sizes=[2], seq_lens=[1024], hidden_dims=[4096])
        print(suite.generate_report())
        suite.save_report("docs/benchmarks/rmsnorm-rope.md")   # + .json and .png beside it
    """

    def __init__(
        self,
        warmup_runs: int = 10,
        benchmark_runs: int = 100,
        *,
        max_ms_per_measurement: float = 100.0,
        flush_l2: bool = True,
        cuda_graphs: bool = True,
        compile_baselines: bool = True,
        liger: bool = True,
        measure: bool | None = None,
        timer: Callable[[Callable[[], Any]], Timing] | None = None,
        progress: bool = True,
        time_budget_s: float | None = None,
        compile_budget_s: float | None = None,
        verbose: bool = True,
    ) -> None:
        self.warmup_runs = warmup_runs
        self.benchmark_runs = benchmark_runs
        self.on_gpu = has_gpu() and not is_interpreter()
        self.measure = self.on_gpu if measure is None else measure
        self.cuda_graphs = cuda_graphs and self.on_gpu
        self.compile_baselines = compile_baselines and self.on_gpu
        self.liger = liger and self.on_gpu
        self.progress = progress
        self.verbose = verbose
        self.time_budget_s = time_budget_s
        self.compile_budget = _cases.CompileBudget(compile_budget_s)
        self.results: list[CaseResult] = []
        # Extra tables (accuracy studies): {"group", "title", "note", "columns", "rows"}, rendered after a group.
        self.tables: list[dict[str, Any]] = []
        self.environment: dict[str, Any] = {}
        self.peak_copy_gbps: float | None = None
        self._started = time.monotonic()
        self._gpu_timer = None
        self._clean_timer = None
        self._copy = None
        if self.measure and timer is None:
            from ._timing import CopyBandwidth, CudaTimer

            self._gpu_timer = CudaTimer(warmup_runs, benchmark_runs, max_ms=max_ms_per_measurement,
                                        flush_l2=flush_l2)
            self._copy = CopyBandwidth(self._gpu_timer)
            if flush_l2:
                # Bandwidth-bound cases are timed a second time with L2 emptied by a read (see CudaTimer).
                self._clean_timer = CudaTimer(warmup_runs, benchmark_runs, max_ms=max_ms_per_measurement / 2,
                                              flush_by="read")
        self._timer = timer or self._gpu_timer
        self.timing_note = (
            f"median of up to {benchmark_runs} runs (at most ~{max_ms_per_measurement:g} ms of runs per "
            f"measurement) after {warmup_runs} warm-up runs, L2 {'flushed' if flush_l2 else 'not flushed'} "
            "before every run (zero-filled), CUDA events; spread = interquartile range (a measurement whose IQR "
            "exceeds a quarter of its median is taken again, up to three times, and the steadiest kept)"
            + ("; bandwidth-bound cases are timed again with L2 emptied by a read (\"clean L2\": no dirty lines "
               "for the timed kernel to write back)" if flush_l2 else "")
        )

    # ------------------------------------------------------------------ sweeps

    def benchmark_rmsnorm_rope(self, batch_sizes: Sequence[int] = (), seq_lens: Sequence[int] = (),
                               hidden_dims: Sequence[int] = (), dtypes: Sequence[torch.dtype] | None = None,
                               *, shapes: Sequence[tuple[int, int, int]] = (), head_dim: int = 128,
                               eps: float = 1e-6) -> list[CaseResult]:
        """``fused_rmsnorm_rope`` on every (batch, seq, hidden) of the product of the three lists plus ``shapes``,
        against eager, ``torch.compile`` of the same reference, Liger-Kernel (rms_norm then rope) and a copy."""
        all_shapes = [*((b, s, h) for b in batch_sizes for s in seq_lens for h in hidden_dims), *shapes]
        dtypes = dtypes or (torch.float16, torch.bfloat16)
        return self.run(_cases.rmsnorm_rope_cases(self, all_shapes, dtypes, head_dim, eps), "rmsnorm-rope")

    def benchmark_rmsnorm_rope_decode(self, num_tokens: Sequence[int] = (64,), hidden_dims: Sequence[int] = (4096,),
                                      dtypes: Sequence[torch.dtype] = (torch.bfloat16,), *, head_dim: int = 128,
                                      max_position: int = 8192) -> list[CaseResult]:
        """Decode: ``tokens`` rows of one position each, cos/sin gathered from a cache by ``position_ids``;
        per-call time under the timer and replayed from a CUDA graph."""
        return self.run(_cases.rmsnorm_rope_decode_cases(self, num_tokens, hidden_dims, dtypes, head_dim,
                                                         max_position), "rmsnorm-rope decode")

    def benchmark_add_rmsnorm(self, num_tokens: Sequence[int] = (1, 64, 2048, 8192),
                              hidden_dims: Sequence[int] = (4096,),
                              dtypes: Sequence[torch.dtype] = (torch.bfloat16,)) -> list[CaseResult]:
        """``fused_add_rmsnorm`` (the decoder layer's residual add + RMSNorm in one pass) against transformers' own
        add + ``LlamaRMSNorm`` in eager and under ``torch.compile``."""
        return self.run(_cases.add_rmsnorm_cases(self, num_tokens, hidden_dims, dtypes), "add + rmsnorm")

    def benchmark_qk_norm_rope(self, batch_sizes: Sequence[int] = (1,), seq_lens: Sequence[int] = (8192,),
                               dtypes: Sequence[torch.dtype] = (torch.bfloat16,), *, num_q_heads: int = 32,
                               num_kv_heads: int = 8, head_dim: int = 128, packed: bool = True) -> list[CaseResult]:
        """``fused_qk_norm_rope`` on Qwen3-8B-like heads (32 q, 8 kv, head_dim 128), by default on strided views
        of a packed QKV projection output (no copy), against eager and ``torch.compile``."""
        shapes = [(b, s) for b in batch_sizes for s in seq_lens]
        return self.run(_cases.qk_norm_rope_cases(self, shapes, dtypes, num_q_heads, num_kv_heads, head_dim,
                                                  packed), "qk-norm-rope")

    def benchmark_gated_mlp(self, batch_sizes: Sequence[int] = (1, 8, 32, 64, 2048, 8192),
                            hidden_dims: Sequence[int] = (4096,), intermediate_dims: Sequence[int] = (5632, 11264),
                            dtypes: Sequence[torch.dtype] = (torch.bfloat16,), *,
                            shapes: Sequence[tuple[int, int]] = (), activation: str = "silu") -> list[CaseResult]:
        """``fused_gated_mlp`` for M tokens in ``batch_sizes`` on every (hidden, intermediate) of the product plus
        ``shapes``, against eager, ``torch.compile``, one concatenated cuBLAS GEMM and Liger's SiLU-mul."""
        dims = [*((h, i) for h in hidden_dims for i in intermediate_dims), *shapes]
        return self.run(_cases.gated_mlp_cases(self, batch_sizes, dims, dtypes, activation), "gated-mlp")

    def benchmark_gpt_oss_expert(self, batch_sizes: Sequence[int] = (1, 8, 32, 64, 2048), hidden: int = 2880,
                                 intermediate: int = 2880,
                                 dtypes: Sequence[torch.dtype] = (torch.bfloat16,)) -> list[CaseResult]:
        """One gpt-oss expert MLP as the checkpoint stores it (interleaved packed ``[2 * I, H]`` weight and bias,
        ``swiglu_oai``) through ``fused_gated_mlp``, against the model's own PyTorch code, its ``torch.compile``
        and the packed cuBLAS GEMM alone."""
        return self.run(_cases.gpt_oss_expert_cases(self, batch_sizes, hidden, intermediate, dtypes), "gated-mlp")

    def benchmark_fp8_gemm(self, sizes: Sequence[tuple[int, int, int]] = ((4096, 4096, 4096), (8192, 8192, 8192)),
                           granularities: Sequence[str] = ("tensor", "row"), *,
                           decode_m: Sequence[int] = (1, 16, 64),
                           decode_nk: Sequence[tuple[int, int]] = ((4096, 4096), (11264, 4096), (4096, 11264)),
                           out_dtype: torch.dtype = torch.bfloat16) -> list[CaseResult]:
        """``fp8_gemm`` (faithful and fast accumulation) on (M, N, K) ``sizes`` for each scale granularity and on
        decode shapes, against ``torch._scaled_mm`` with the same scaling (default and ``use_fast_accum``) and
        bf16 ``torch.matmul``."""
        return self.run(_cases.fp8_gemm_cases(self, sizes, granularities, decode_m, decode_nk, out_dtype),
                        "fp8-gemm")

    def benchmark_quantize_fp8(self, shapes: Sequence[tuple[int, int]] = ((4096, 4096), (8192, 8192)),
                               granularities: Sequence[str] = ("tensor", "row", "block"),
                               dtype: torch.dtype = torch.bfloat16) -> list[CaseResult]:
        """``quantize_fp8`` (dynamic scaling, E4M3) against eager amax + scale + cast and its ``torch.compile``."""
        return self.run(_cases.quantize_fp8_cases(self, shapes, granularities, dtype), "quantize-fp8")

    def benchmark_fp8_linear(self, batch_sizes: Sequence[int] = (1, 64, 2048, 8192),
                             in_features: int = 4096, out_features: int = 11264,
                             dtype: torch.dtype = torch.bfloat16) -> list[CaseResult]:
        """``FP8Linear`` (activation quantization + FP8 GEMM) against bf16 ``nn.Linear``."""
        return self.run(_cases.fp8_linear_cases(self, batch_sizes, in_features, out_features, dtype), "fp8-linear")

    def benchmark_fp8_accuracy(self, m: int = 1024, n: int = 1024, ks: Sequence[int] = (4096, 16384)) -> None:
        """Accuracy tables of the FP8 path (no timing): the GEMM's own error with fp32 output, per scale
        granularity and K, for both accumulation modes and cuBLAS; and quantization SQNR per granularity on
        normal data and on activations with outlier channels."""
        self._ensure_environment()
        if self.over_budget():
            self.tables.append({"group": "fp8-gemm", "title": "FP8 accuracy", "columns": ["-"], "rows": [],
                                "note": "skipped: time budget spent"})
            return
        try:
            self.tables.extend(_cases.fp8_accuracy_tables(self, m, n, ks))
        except Exception as exc:
            self.tables.append({"group": "fp8-gemm", "title": "FP8 accuracy", "columns": ["-"], "rows": [],
                                "note": f"failed: {type(exc).__name__}: {str(exc)[:200]}"})

    # ------------------------------------------------------------------ engine

    def run(self, factories: Iterable[CaseFactory], label: str = "cases") -> list[CaseResult]:
        """Run cases built lazily (one at a time, so a sweep never holds every input at once)."""
        factories = list(factories)
        self._ensure_environment()
        bar = _progress(len(factories), label) if self.progress and sys.stderr.isatty() else None
        out = []
        for make in factories:
            result = self._run_one(make)
            out.append(result)
            self.results.append(result)
            if bar is not None:
                bar.set_postfix_str(f"{result.name} {result.dtype}: {_status_word(result)}", refresh=False)
                bar.update(1)
            elif self.verbose:
                print(f"  [{label}] {result.name} {result.dtype}: {_status_word(result)}", file=sys.stderr, flush=True)
        if bar is not None:
            bar.close()
        return out

    def run_case(self, case: Case) -> CaseResult:
        """Check and time one case built by hand (for custom kernels, and for testing the gate)."""
        self._ensure_environment()
        result = self._run_case(case)
        self.results.append(result)
        return result

    def _run_one(self, make: CaseFactory) -> CaseResult:
        if self.over_budget():
            return _skipped(None, getattr(make, "label", "case"), "skipped: time budget spent")
        try:
            case = make()
        except Exception as exc:  # building inputs failed (out of memory, a missing package)
            return _skipped(None, getattr(make, "label", "case"), f"{type(exc).__name__}: {exc}", status=ERROR)
        try:
            return self._run_case(case)
        finally:
            del case
            if self.on_gpu:
                try:
                    torch.cuda.empty_cache()
                except Exception:  # a kernel left the device in an error state: later cases report it
                    pass

    def over_budget(self) -> bool:
        return self.time_budget_s is not None and time.monotonic() - self._started > self.time_budget_s

    def _ensure_environment(self) -> None:
        if not self.environment:
            self.environment = collect_environment(self.measure)
            if self._copy is not None:
                self.peak_copy_gbps = self._copy.peak()

    def _run_case(self, case: Case) -> CaseResult:
        result = CaseResult(
            group=case.group, name=case.name, dtype=case.dtype, tol=case.tol, params=dict(case.params),
            bytes_moved=case.bytes_moved, flops=case.flops, panel=case.panel, x=case.x, x_label=case.x_label,
            metric=case.metric, cublas=case.cublas, note=case.note, compute_dtype=case.compute_dtype,
            speedup_pairs={k: list(v) for k, v in case.speedup_pairs.items()} if case.speedup_pairs else None,
        )
        try:
            reference = _exact(case.reference) if case.reference is not None else None
        except Exception as exc:
            for impl in case.impls:
                result.impls.append(ImplResult(impl.name, impl.role, ERROR,
                                               message=f"reference failed: {type(exc).__name__}: {exc}"[:300]))
            return result
        for impl in case.impls:
            if impl.gpu_only and not self.on_gpu:
                continue
            result.impls.append(self._run_impl(case, impl, reference))
        del reference
        if self.measure:
            try:
                self._derive_metrics(result)
            except Exception as exc:  # the copy ceiling could not be measured (out of memory, a device error)
                result.note = (result.note + "; " if result.note else "") + f"metrics: {type(exc).__name__}: {exc}"
        return result

    def _run_impl(self, case: Case, impl, reference: torch.Tensor | None) -> ImplResult:
        tol = impl.tol if impl.tol is not None else case.tol
        r = ImplResult(impl.name, impl.role, OK, tol=tol, note=impl.note)
        if impl.unavailable:
            r.status, r.message = NA, impl.unavailable
            return r
        # 1. correctness: one call, compared with the reference (this call also compiles / warms caches).
        try:
            t0 = time.perf_counter()
            out = impl.fn()
            if self.on_gpu:
                torch.cuda.synchronize()
            r.first_call_s = time.perf_counter() - t0
            if impl.error_fn is not None:
                r.error = float(impl.error_fn(out))
            else:
                r.error = relative_error(impl.check(out) if impl.check else out, reference)
            del out
        except Exception as exc:
            r.status = NA if impl.optional else ERROR
            r.message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            return r
        if not (r.error <= tol):  # NaN fails too
            r.status = FAIL
            r.message = f"relative error {r.error:.3g} above the tolerance {tol:.1g}: not timed"
            return r
        if not self.measure or self._timer is None:
            return r
        # 2. timing, only for correct implementations.
        try:
            r.timing = self._timer(impl.fn)
            if case.metric == "gbps" and self._clean_timer is not None:
                r.clean_ms = self._clean_timer(impl.fn).median_ms
            if impl.graph and self.cuda_graphs and self._gpu_timer is not None:
                r.host_ms = self._gpu_timer.host_ms(impl.fn)
                try:
                    r.graph_ms = self._gpu_timer.graph_ms(impl.fn)
                except Exception as exc:
                    r.note = (r.note + "; " if r.note else "") + f"CUDA graph failed: {type(exc).__name__}"
            if impl.track_memory and self.on_gpu:
                r.peak_mem_bytes = _peak_memory(impl.fn)
        except Exception as exc:
            r.status = NA if impl.optional else ERROR
            r.message = f"timing failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
            r.timing = None
        return r

    def _derive_metrics(self, result: CaseResult) -> None:
        if result.bytes_moved and self._copy is not None and any(r.timing for r in result.impls):
            result.copy_same_gbps = self._copy.same_bytes(result.bytes_moved)
        for r in result.impls:
            if r.timing is None:
                continue
            cublas = result.impl(_cublas_for(result, r.name)) if result.cublas else None
            seconds = r.timing.median_ms * 1e-3
            if result.bytes_moved:
                r.gbps = result.bytes_moved / seconds / 1e9
                if result.copy_same_gbps:
                    r.pct_copy_same = 100 * r.gbps / result.copy_same_gbps
                if self.peak_copy_gbps:
                    r.pct_peak = 100 * r.gbps / self.peak_copy_gbps
                    if r.clean_ms:
                        r.clean_pct_peak = 100 * result.bytes_moved / (r.clean_ms * 1e-3) / 1e9 / self.peak_copy_gbps
            if result.flops:
                r.tflops = result.flops / seconds / 1e12
                peak = datasheet_tflops(self.environment.get("device", ""), result.compute_dtype)
                if peak:
                    r.pct_datasheet = 100 * r.tflops / peak
            if cublas is not None and cublas.timing is not None:
                r.pct_cublas = 100 * cublas.timing.median_ms / r.timing.median_ms

    # ------------------------------------------------------------------ reports

    @property
    def failed(self) -> list[CaseResult]:
        """Cases where one of our kernels is wrong or raised."""
        return [r for r in self.results if r.failed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "triton-ops-benchmark/1",
            "environment": self.environment,
            "peak_copy_gbps": self.peak_copy_gbps,
            "timing": self.timing_note if self.measure else "not timed (no GPU): correctness only",
            "settings": {"warmup_runs": self.warmup_runs, "benchmark_runs": self.benchmark_runs},
            "results": [r.to_dict() for r in self.results],
            "tables": self.tables,
        }

    def save_json(self, path: str | os.PathLike, groups: Sequence[str] | None = None) -> Path:
        data = self.to_dict()
        if groups is not None:
            data["results"] = [r for r in data["results"] if r["group"] in groups]
            data["tables"] = [t for t in data["tables"] if t["group"] in groups]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BenchmarkSuite:
        """A suite holding recorded results (to re-render reports without a GPU)."""
        data = json.loads(Path(path).read_text())
        suite = cls(measure=False, progress=False, verbose=False)
        suite.measure = bool(data.get("environment", {}).get("timed", False))
        suite.environment = data.get("environment", {})
        suite.peak_copy_gbps = data.get("peak_copy_gbps")
        suite.timing_note = data.get("timing", suite.timing_note)
        suite.results = [CaseResult.from_dict(r) for r in data.get("results", [])]
        suite.tables = list(data.get("tables", []))
        return suite

    def generate_report(self, groups: Sequence[str] | None = None, *, title: str | None = None,
                        plots: dict[str, str] | None = None) -> str:
        """The Markdown report: environment, summary, one table per panel, every measurement."""
        results = [r for r in self.results if groups is None or r.group in groups]
        tables = [t for t in self.tables if groups is None or t["group"] in groups]
        return render_markdown(results, environment=self.environment, peak_copy_gbps=self.peak_copy_gbps,
                               timing_note=self.timing_note if self.measure else None, title=title, plots=plots,
                               tables=tables)

    def save_report(self, path: str | os.PathLike, groups: Sequence[str] | None = None, *,
                    title: str | None = None, plot: bool = True) -> dict[str, Path]:
        """Write ``path`` (Markdown), the same name with ``.json``, and a ``.png`` plot when matplotlib is
        importable and there are timings. Returns the paths written."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {"json": self.save_json(path.with_suffix(".json"), groups)}
        plots: dict[str, str] = {}
        if plot and self.measure:
            from ._plots import plot_results

            results = [r for r in self.results if groups is None or r.group in groups]
            try:
                png = plot_results(results, path.with_suffix(".png"), title=title)
            except Exception as exc:  # a plot is never worth losing the report
                print(f"plot {path.with_suffix('.png')} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                png = None
            if png is not None:
                written["png"] = png
                plots["all"] = png.name
        path.write_text(self.generate_report(groups, title=title, plots=plots))
        written["md"] = path
        return written

    def summary(self) -> str:
        """A few lines for the end of a run: cases, failures, geometric-mean speedups per baseline."""
        return "\n".join(summary_lines(self.results, timed=self.measure))

    def report_name(self) -> str:
        """``report-h100.md`` on an H100: the name of the combined report for this device."""
        return f"report-{device_tag(self.environment.get('device', 'device'))}.md"


def _exact(reference: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Evaluate a reference with TF32 off: a float32 reference GEMM must not round its inputs to 10 bits."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return reference()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _cublas_for(result: CaseResult, name: str) -> str:
    """The implementation ``name``'s "% of cuBLAS" divides by (a per-implementation choice, or one for all)."""
    if isinstance(result.cublas, dict):
        return result.cublas.get(name, next(iter(result.cublas.values())))
    return result.cublas


def _peak_memory(fn: Callable[[], Any]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def _skipped(case: Case | None, label: str, why: str, status: str = SKIPPED) -> CaseResult:
    if case is None:
        group, _, name = label.partition(":")
        return CaseResult(group=group or "unknown", name=name or label, dtype="", tol=math.nan, note=why,
                          impls=[ImplResult("all", "ours", status, message=why)])
    return CaseResult(group=case.group, name=case.name, dtype=case.dtype, tol=case.tol, params=case.params,
                      panel=case.panel, note=why, impls=[ImplResult(i.name, i.role, status, message=why)
                                                         for i in case.impls])


def _status_word(result: CaseResult) -> str:
    words = []
    for r in result.ours:
        if r.status == OK and r.timing is not None:
            words.append(f"{r.name} {r.timing.median_ms * 1e3:.1f} us")
        else:
            words.append(f"{r.name} {r.status}" + (f" ({r.error:.2g})" if r.error is not None else ""))
    return ", ".join(words) or "no kernel"


def _progress(total: int, label: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=label, unit="case", dynamic_ncols=True, file=sys.stderr)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
