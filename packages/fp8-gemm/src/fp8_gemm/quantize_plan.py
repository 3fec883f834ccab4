"""Launch plans of FP8 quantization: how a tensor becomes the row-major 2-D problem the kernels read, which kernels
run with which grids, and the per-call part of a launch (``_QuantPlan.run``). Validation and the public API are in
``quantize``."""

from __future__ import annotations

import functools

import torch
from triton_ops_core import scratch as _scratch
from triton_ops_core.device import is_interpreter, sm_count
from triton_ops_core.launch import Plan, PlanCache, cdiv, next_pow2
from triton_ops_core.models import FP8Format

from .quantize_kernels import (
    _quant_blocks_kernel,
    _quant_lines_kernel,
    _quant_tensor_coop_kernel,
    _quant_tensor_given_fixup_kernel,
    _quant_tensor_given_kernel,
)
from .validation import ACTIVATION_BLOCK, WEIGHT_BLOCK

# Per-tensor scaling: tile elements and programs per SM of the cooperative kernel (H100: 4 x 8192 streamed best,
# docs/fp8-gemm.md); fewer programs per SM if a GPU cannot keep that many resident.
_TENSOR_TILE = 8192
_TENSOR_PROGS_PER_SM = 4
# A given per-tensor scale takes the two-launch grid path (no grid barrier) beyond this many tiles per program
# of the cooperative grid (H100: from 17 M elements; docs/fp8-gemm.md).
_GIVEN_GRID_TILES_PER_PROG = 4


# --------------------------------------------------------------------------------------------------------------
# Launch heuristics: memory-bound kernels want 4-16 K elements per program and enough programs to fill the GPU.
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _tile_config(r: int, c: int, elements: int = 8192) -> dict[str, int]:
    block_c = min(next_pow2(c), elements)
    block_r = max(1, min(next_pow2(r), elements // block_c))
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": 8 if block_r * block_c >= 4096 else 4}


@functools.lru_cache(maxsize=4096)
def _lines_config(r: int, c: int, reduce_rows: bool) -> dict[str, int]:
    if reduce_rows:  # per-column scales: a strip of columns per program, walking all rows
        block_c = min(next_pow2(c), 64)
        block_r = min(next_pow2(r), 64)
        return {"BLOCK_R": block_r, "BLOCK_C": block_c, "SINGLE": r <= block_r, "num_warps": 4}
    block_c = min(next_pow2(c), 8192)  # a whole row of up to 8192 stays in registers: one read
    block_r = max(1, min(next_pow2(r), 4096 // block_c))
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "SINGLE": c <= block_c,
            "num_warps": 8 if block_r * block_c >= 4096 else 4}


def _row_major(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 or t.shape[-1] == 1


def _column_major(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[0] > 1 and t.stride(0) == 1 and t.stride(1) >= t.shape[0]


def _as_rows(t: torch.Tensor, mode: int) -> torch.Tensor:
    """``t`` as the row-major 2-D problem the kernels read (``mode``: see ``_QuantPlan``)."""
    if mode == 0:
        return t
    if mode == 1:
        return t.t()
    if mode == 2:
        return t.contiguous()
    x = t.reshape(-1, t.shape[-1])
    return x if mode == 3 else x.contiguous()


class _QuantPlan:
    """Everything but the tensors of one ``quantize_fp8`` call signature: how ``t`` becomes the row-major 2-D
    problem, how the given scale reaches the kernel, the launches and the output views.

    ``x_mode``: 0 ``t``, 1 ``t.t()`` (column-major input), 2 ``t.contiguous()``, 3 ``t.reshape(-1, C)``, 4 the
    reshape made contiguous. ``given_mode``: 0 the given scale as is (its elements already lie in the order the
    kernel reads), 1 flattened and contiguous, 2 contiguous, 3 transposed then contiguous.
    """

    __slots__ = ("x_mode", "given_mode", "gran", "dtype", "emulate", "r", "c", "scale_shape", "launches",
                 "transposed", "out_shape", "expected", "has_given", "fmt", "granularity", "reshape", "delayed")

    def run(self, t: torch.Tensor, given: torch.Tensor | None,
            delayed: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(q, scale, overflow_count)`` in the caller's layout; ``overflow_count`` is a device int32 tensor
        (None without a given scale). ``delayed``: the (history, state) buffers of a ``DelayedScaler``."""
        x = _as_rows(t, self.x_mode)
        device = t.device
        q = torch.empty((self.r, self.c), dtype=self.dtype, device=device)
        flag = None
        if not self.launches:  # nothing to read: every (empty) group has amax 0, hence scale 1
            s = torch.ones(self.scale_shape, dtype=torch.float32, device=device)
        else:
            q_arg = q.view(torch.uint8) if self.emulate else q
            s = torch.empty(self.scale_shape, dtype=torch.float32, device=device)
            g = given
            if self.has_given:
                gm = self.given_mode
                if gm == 1:
                    g = given.reshape(-1).contiguous()
                elif gm == 2:
                    g = given.contiguous()
                elif gm == 3:
                    g = given.t().contiguous()
            if self.has_given or delayed is not None:
                # Other granularities count overflowing groups with atomics (a zeroed counter); the per-tensor
                # kernel stores its one flag (no memset launch: it cost 8 % of a 4096 x 4096 cast).
                alloc = torch.empty if self.gran == "tensor" else torch.zeros
                flag = alloc(1, dtype=torch.int32, device=device)
            gran = self.gran
            if gran == "tensor" and len(self.launches) == 2:  # a given scale, grid kernel and fix-up
                over = _scratch.scratch("quantize.over", device, 2, torch.int32, zeroed=True)
                self.launches[0].launch(x, q_arg, g, over)
                self.launches[1].launch(x, q_arg, s, g, flag, over)
            elif gran == "tensor":
                hist, sync = delayed if delayed is not None else (s, _scratch.scratch(
                    "quantize.sync", device, 4, torch.int32, zeroed=True))
                _launch_coop(self, x, q_arg, s, g if self.has_given else s, flag if flag is not None else s, hist,
                             sync)
            else:
                self.launches[0].launch(x, q_arg, s, g if self.has_given else s, flag if self.has_given else s)
        if self.transposed:
            return q.t(), (s.t().contiguous() if self.gran != "tensor" else s), flag
        if self.reshape:
            return q.view(self.out_shape), s.view(self.expected), flag
        return q, s, flag


def _plan_2d(plan: _QuantPlan, x: torch.Tensor, fmt: FP8Format, granularity: str, block) -> None:
    """The launches of a row-major ``x`` ``[R, C]`` (kernels, grids and scalar tails)."""
    r, c = x.shape
    emulate = is_interpreter()
    plan.r, plan.c, plan.gran, plan.dtype, plan.emulate = r, c, granularity, fmt.torch_dtype, emulate
    if granularity in ("row", "channel"):
        plan.scale_shape = (1, c) if granularity == "channel" else (r, 1)
    elif granularity == "block":
        plan.scale_shape = (cdiv(r, block[0]), cdiv(c, block[1]))
    else:
        plan.scale_shape = (1,)
    if r == 0 or c == 0:
        plan.launches = ()
        return
    has_given = plan.has_given
    max_value, is_e4m3 = fmt.max_value, fmt.name == "e4m3"
    stride_xr = x.stride(0) if r > 1 else c
    # Constexprs go positionally, in each kernel's signature order (the direct launcher takes every argument).
    if granularity in ("row", "channel"):
        reduce_rows = granularity == "channel"
        cfg = _lines_config(r, c, reduce_rows)
        n_prog = cdiv(c, cfg["BLOCK_C"]) if reduce_rows else cdiv(r, cfg["BLOCK_R"])
        tail = (r, c, stride_xr, c, max_value, reduce_rows, has_given, is_e4m3, emulate, cfg["BLOCK_R"],
                cfg["BLOCK_C"], cfg["SINGLE"])
        plan.launches = (Plan(_quant_lines_kernel, (n_prog,), tail, cfg["num_warps"]),)
    elif granularity == "block":
        bm, bk = block
        block_r = 32 if bm == 1 else bm
        tail = (r, c, stride_xr, c, cdiv(c, bk), max_value, bm, has_given, is_e4m3, emulate, block_r, bk)
        plan.launches = (Plan(_quant_blocks_kernel, (cdiv(r, block_r), cdiv(c, bk)), tail, 8 if bm > 1 else 4),)
    else:
        # A contiguous tensor is one long row: long tiles, no row masks.
        flat = x.is_contiguous()
        rr, cc, sr = (1, r * c, r * c) if flat else (r, c, stride_xr)
        cfg = _tile_config(rr, cc, _TENSOR_TILE)
        br, bc = cfg["BLOCK_R"], cfg["BLOCK_C"]
        tiles_c = cdiv(cc, bc)
        n_tiles = cdiv(rr, br) * tiles_c
        progs = 1 if emulate else min(n_tiles, _TENSOR_PROGS_PER_SM * sm_count(x.device, cpu=1))
        if has_given and not plan.delayed and n_tiles > _GIVEN_GRID_TILES_PER_PROG * progs:
            # A given scale on a large tensor: a plain grid that casts and flags overflowing tiles, then a small
            # launch that stores the scale and re-casts only after an overflow (_quant_tensor_given_kernel).
            # No grid barrier, so no program waits for the slowest: 95 % of copy at 8192^2 bf16 on the H100
            # against 89 % cooperative. It costs one more launch on the host (10-30 us on the benchmark
            # machine), which smaller tensors do not earn back: 4096^2 gains 2 us on the device (88 % vs 82 %).
            consts = (max_value, is_e4m3, emulate, br, bc)
            fix_progs = min(n_tiles, 2 if emulate else sm_count(x.device, cpu=1))
            plan.launches = (
                Plan(_quant_tensor_given_kernel, (n_tiles,), (rr, cc, sr, cc, tiles_c, *consts), cfg["num_warps"]),
                Plan(_quant_tensor_given_fixup_kernel, (fix_progs,), (rr, cc, sr, cc, tiles_c, n_tiles, *consts),
                     cfg["num_warps"]),
            )
            return
        # One cooperative launch (see _quant_tensor_coop_kernel).
        hist_len, margin_mul = plan.delayed or (1, 1.0)
        mode = 2 if plan.delayed else 1 if has_given else 0
        tail = (rr, cc, sr, cc, tiles_c, n_tiles, hist_len, margin_mul, max_value, mode, is_e4m3, emulate, br, bc,
                next_pow2(hist_len), True)
        options = {} if emulate else {"launch_cooperative_grid": True}
        plan.launches = (Plan(_quant_tensor_coop_kernel, (progs,), tail, cfg["num_warps"], **options),)


def _launch_coop(plan: _QuantPlan, *tensors: torch.Tensor) -> None:
    """Launch the cooperative per-tensor kernel; if the GPU cannot keep that many programs resident (the launch
    is refused before anything runs), halve the programs for good and retry."""
    launch = plan.launches[0]
    try:
        launch.launch(*tensors)
    except RuntimeError as exc:
        if "cooperative" not in str(exc) or launch.grid[0] <= 1:
            raise
        plan.launches = (Plan(launch.kernel, (max(1, launch.grid[0] // 2),), launch.tail, launch.num_warps,
                              **launch.options),)
        _launch_coop(plan, *tensors)


def _build_plan(t: torch.Tensor, fmt: FP8Format, granularity: str, given: torch.Tensor | None, block,
                expected: tuple[int, ...], delayed: tuple[int, float] | None = None) -> _QuantPlan:
    """The plan of a validated call (the layout decisions of the quantization, taken once per signature).
    ``delayed``: (history length, 2**margin) of a DelayedScaler (per-tensor only)."""
    plan = _QuantPlan()
    plan.delayed = delayed
    plan.fmt, plan.granularity, plan.expected, plan.has_given = fmt, granularity, expected, given is not None
    plan.transposed = False
    plan.out_shape = t.shape
    transpose_given = False
    if t.dim() == 2 and not _row_major(t) and _column_major(t):
        # A column-major [K, N] operand (a weight stored [N, K] and passed as w.t()) is a row-major [N, K]
        # problem with the roles of rows and columns swapped: read it along its contiguous dimension.
        gran = {"row": "channel", "channel": "row"}.get(granularity, granularity)
        blk = (block[1], block[0]) if block is not None else None
        if blk is not None and blk not in (ACTIVATION_BLOCK, WEIGHT_BLOCK):
            plan.x_mode, gran, blk = 2, granularity, block
        else:
            plan.x_mode, plan.transposed = 1, True
            transpose_given = given is not None and granularity != "tensor"
    else:
        gran, blk = granularity, block
        if t.dim() == 2 and _row_major(t):
            plan.x_mode = 0
        else:
            plan.x_mode = 3 if _row_major(t.reshape(-1, t.shape[-1])) else 4
    x = _as_rows(t, plan.x_mode)
    plan.given_mode = 0
    if given is not None:
        g = given.t() if transpose_given else given
        if gran == "block":
            plan.given_mode = 0 if g.is_contiguous() else (3 if transpose_given else 2)
        elif gran == "tensor" or g.is_contiguous():
            plan.given_mode = 0  # one value, or the groups' scales already in line order
        else:
            plan.given_mode = 1
    _plan_2d(plan, x, fmt, gran, blk)
    # the views of the outputs, skipped when they would not change the shape (views cost on the hot path)
    plan.reshape = tuple(plan.out_shape) != (plan.r, plan.c) or tuple(expected) != tuple(plan.scale_shape)
    return plan


_PLANS = PlanCache()


def _put(key: tuple | None, plan):
    if key is not None:
        try:
            _PLANS.put(key, plan)
        except TypeError:  # an unhashable option (a list block_size): no caching, same results
            pass
    return plan
