"""The KV-cache write of a decode step in one launch: ``update_kv_cache_``, and its two registered ops.

A static KV cache (transformers' ``StaticCache``: per layer ``keys`` / ``values`` ``[B, Hkv, S_max, D]``) takes each
step's new K and V rows at their positions. transformers' ``StaticLayer.update`` does it with ``index_copy_``
twice plus, since 5.2x, an ``arange``, an add and an in-place add of its device-side length counter: five launches
per layer and step, about 7 us of a Llama-3-8B layer's decode step on the H200 in a CUDA graph. Here it is one:

- ``torch.ops.triton_ops.kv_cache_write_(keys, values, k, v, positions)``: rows to ``positions[t]`` (or to ``t``
  when ``positions`` is None), as ``index_copy_(2, positions, k)`` (transformers 5.0's ``cache_position``);
  mutates ``keys`` and ``values``.
- ``torch.ops.triton_ops.kv_cache_append_(keys, values, k, v, length, ring=False)``: rows to ``length + t``, then
  ``length += T`` (transformers 5.2x's ``cumulative_length``); mutates all three. Up to ``ONE_PROGRAM_ROWS`` rows
  (a decode step of up to 8 sequences with 8 KV heads) one program copies the rows and advances the counter in the
  same launch; more rows (larger batches, prefill) spread over programs and advance the counter with a second
  launch. With ``ring=True`` the rows go to ``(length + t) % S_max`` instead: the cache is a ring buffer, a full
  sliding window whose newest row overwrites its oldest while nothing else moves (where a shift,
  ``kv_cache_shift_``, moves the whole window each step).

With ``q``, ``cos`` and ``sin`` the same launch first applies the rotary embedding (``rotate_half`` form, float32):
K rotated in place and into the cache, Q in place (ops ``kv_cache_write_rope_`` / ``kv_cache_append_rope_``). A
Llama-style decode step's RoPE and cache update are then one launch instead of two; with ``q_norm_weight`` /
``k_norm_weight`` each head is RMS-normalized first (Qwen3's QK norm; with ``gemma=True`` scaled by ``1 + weight``,
Gemma 3's), so a Qwen3 or Gemma 3 step's QK-norm + RoPE and cache update are one launch too.

Inference only: nothing here is differentiable (``KVCacheGradientError`` when a gradient would be recorded).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from triton_ops_core import pdl
from triton_ops_core.exceptions import InvalidArgumentError, ShapeMismatchError, TritonKernelError
from triton_ops_core.launch import Plan, PlanCache, call_key, cdiv, next_pow2
from triton_ops_core.library import direct_call_ok, op_name
from triton_ops_core.validation.common import (
    FLOAT_DTYPES,
    check_dtype,
    check_kernel_device,
    check_last_dim_contiguous,
    check_ndim,
    check_same_device,
    check_tensor,
)

from . import _cache_kernels as K

# Rows (batch x KV heads x new positions) one program copies while it also advances the length counter; more rows
# spread over programs and a second launch advances it. Measured on the H200 (CUDA graph, Llama-3-8B's 8 KV heads of
# 128): one program took 1.6 us for 8 rows and 2.6 us for 64, but 10.9 us for 512 (batch 64), where transformers'
# five launches take 8.3-8.6 us.
ONE_PROGRAM_ROWS = 64
_INDEX_DTYPES = (torch.int32, torch.int64)


class KVCacheOverflowError(TritonKernelError, IndexError):
    """A KV-cache position outside ``[0, S_max)`` (checked on the host where that costs no device sync: under the
    interpreter; on a GPU the kernel traps instead, as ``index_copy_``'s device-side assertion does)."""


class KVCacheGradientError(TritonKernelError, RuntimeError):
    """A gradient would have to flow through the KV-cache write (it is an inference-only, in-place op)."""


@dataclass(frozen=True)
class KVCacheWrite:
    """A validated cache write: ``B`` batch, ``H`` KV heads, ``T`` new positions, ``S`` cache length, head dims."""

    batch: int
    heads: int
    new: int
    cache_len: int
    k_dim: int
    v_dim: int
    q_per_kv: int = 0  # query heads rotated per KV head (0: no RoPE in the launch)

    @property
    def rows(self) -> int:
        return self.batch * self.heads * self.new


def _check_pair(cache: object, new: object, cache_name: str, new_name: str) -> None:
    for t, name in ((cache, cache_name), (new, new_name)):
        check_tensor(t, name)
        check_ndim(t, name, exact=4)
        check_last_dim_contiguous(t, name)
    check_dtype(cache, cache_name, FLOAT_DTYPES)
    if new.dtype != cache.dtype:
        raise InvalidArgumentError(f"{new_name}: expected the dtype of {cache_name} "
                                   f"({str(cache.dtype).removeprefix('torch.')}), got "
                                   f"{str(new.dtype).removeprefix('torch.')}")
    b, h, _, d = cache.shape
    if (new.shape[0], new.shape[1], new.shape[3]) != (b, h, d):
        raise ShapeMismatchError(f"{new_name}: expected [B, Hkv, T, D] = [{b}, {h}, T, {d}] ({cache_name}'s batch, "
                                 f"heads and head dim), got {list(new.shape)}")


def validate_kv_cache_write(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            positions: torch.Tensor | None = None, length: torch.Tensor | None = None,
                            ring: bool = False) -> KVCacheWrite:
    """Check a cache write: ``keys``/``values`` ``[B, Hkv, S, D]`` (``D`` may differ between them), ``k``/``v``
    ``[B, Hkv, T, D]`` in their cache's dtype (fp16/bf16/fp32, unit last stride, any other strides); ``positions``
    an int32/int64 ``[T]``; ``length`` an int32/int64 tensor of one element; everything on one device; with
    ``ring``, ``length`` given and at most ``S`` new rows (each takes a slot of its own)."""
    _check_pair(keys, k, "keys", "k")
    _check_pair(values, v, "values", "v")
    if tuple(values.shape[:3]) != tuple(keys.shape[:3]):
        raise ShapeMismatchError(f"values: expected [B, Hkv, S] = {list(keys.shape[:3])} (keys'), got "
                                 f"{list(values.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ShapeMismatchError(f"v: expected {k.shape[2]} new positions (k's) in dimension 2, got {v.shape[2]}")
    check_same_device(keys=keys, values=values, k=k, v=v, positions=positions, length=length)
    check_kernel_device(keys, "keys")
    if positions is not None and length is not None:
        raise InvalidArgumentError("positions, length: expected at most one of them, got both")
    if positions is not None:
        check_dtype(positions, "positions", _INDEX_DTYPES)
        if tuple(positions.shape) != (k.shape[2],):
            raise ShapeMismatchError(f"positions: expected shape [{k.shape[2]}] (one per new position), got "
                                     f"{list(positions.shape)}")
    if length is not None:
        check_dtype(length, "length", _INDEX_DTYPES)
        if length.numel() != 1:
            raise ShapeMismatchError(f"length: expected one element (the cache's filled length), got shape "
                                     f"{list(length.shape)}")
    b, h, s, dk = keys.shape
    if ring:
        if length is None:
            raise InvalidArgumentError("ring: a ring buffer's write needs length (its device counter), got none")
        if k.shape[2] > s:
            raise ShapeMismatchError(f"k: a ring buffer of {s} rows takes at most {s} new rows at once, got "
                                     f"{k.shape[2]}")
    return KVCacheWrite(batch=b, heads=h, new=k.shape[2], cache_len=s, k_dim=dk, v_dim=values.shape[3])


def validate_rope_operands(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> int:
    """Check the rotary operands of a fused write; the query heads per KV head.

    ``q`` ``[B, G * Hkv, T, D]`` in k's dtype and device (unit last stride), ``D`` = k's head dim, even; ``cos`` /
    ``sin`` ``[B, T, D]``, ``[1, T, D]`` or ``[T, D]`` (transformers' ``position_embeddings``), a float dtype, unit
    last stride, on k's device.
    """
    check_tensor(q, "q")
    check_ndim(q, "q", exact=4)
    check_last_dim_contiguous(q, "q")
    if q.dtype != k.dtype:
        raise InvalidArgumentError(f"q: expected k's dtype ({str(k.dtype).removeprefix('torch.')}), got "
                                   f"{str(q.dtype).removeprefix('torch.')}")
    b, hkv, t, d = k.shape
    if d % 2:
        raise ShapeMismatchError(f"k: the rotary embedding needs an even head dim, got {d}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (b, t, d) or q.shape[1] % hkv:
        raise ShapeMismatchError(f"q: expected [B, G * Hkv, T, D] = [{b}, G * {hkv}, {t}, {d}] (k's batch, new "
                                 f"positions and head dim; a whole number of query heads per KV head), got "
                                 f"{list(q.shape)}")
    for table, name in ((cos, "cos"), (sin, "sin")):
        check_tensor(table, name)
        check_dtype(table, name, FLOAT_DTYPES)
        check_last_dim_contiguous(table, name)
        shape = tuple(table.shape)
        if not (shape == (t, d) or (len(shape) == 3 and shape[0] in (1, b) and shape[1:] == (t, d))):
            raise ShapeMismatchError(f"{name}: expected [{b}, {t}, {d}], [1, {t}, {d}] or [{t}, {d}] (batch, new "
                                     f"positions, head dim), got {list(shape)}")
    if cos.shape != sin.shape or cos.stride() != sin.stride():
        raise ShapeMismatchError(f"sin: expected cos's shape and strides {list(cos.shape)} / {cos.stride()}, got "
                                 f"{list(sin.shape)} / {sin.stride()}")
    check_same_device(k=k, q=q, cos=cos, sin=sin)
    return q.shape[1] // hkv


def validate_norm_weights(q_weight: torch.Tensor, k_weight: torch.Tensor, k: torch.Tensor, eps: float) -> None:
    """Check the per-head RMSNorm weights of a fused write: ``[D]`` each (k's head dim), a float dtype, on k's
    device; ``eps`` a positive number."""
    d = k.shape[3]
    for w, name in ((q_weight, "q_weight"), (k_weight, "k_weight")):
        check_tensor(w, name)
        check_dtype(w, name, FLOAT_DTYPES)
        if tuple(w.shape) != (d,) or w.stride() != (1,):
            raise ShapeMismatchError(f"{name}: expected a contiguous [{d}] (the head dim), got {list(w.shape)} with "
                                     f"strides {w.stride()}")
    check_same_device(k=k, q_weight=q_weight, k_weight=k_weight)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise InvalidArgumentError(f"eps: expected a positive number, got {eps!r}")


def _table_strides(table: torch.Tensor) -> tuple[int, int]:
    """(batch, position) strides of a ``[B', T, D]`` or ``[T, D]`` table; a single batch row is broadcast."""
    if table.dim() == 2:
        return 0, table.stride(0)
    return (0 if table.shape[0] == 1 else table.stride(0)), table.stride(1)


# ----------------------------------------------------------------------------------------------------------------
# Plan and launch
# ----------------------------------------------------------------------------------------------------------------

def _plan(keys, values, k, v, rope, norm, mode: int, info: KVCacheWrite) -> Plan | None:
    rows = info.rows
    if rows == 0:
        return None
    block_d = max(16, next_pow2(max(info.k_dim, info.v_dim)))
    block_r = max(2, min(next_pow2(rows), 8192 // block_d))  # ~16 KB of K and of V in 16-bit per step
    one = mode in (K.POS_LENGTH, K.POS_RING) and rows <= ONE_PROGRAM_ROWS
    per_program = rows if one else 4 * block_r
    kv_programs = cdiv(rows, per_program)
    q_strides, table_strides, q_rows, block_q, q_programs = (0, 0, 0), (0, 0), 0, 2, 0
    if rope is not None:
        q, cos, _ = rope
        q_strides, table_strides = (q.stride(0), q.stride(1), q.stride(2)), _table_strides(cos)
        q_rows = rows * info.q_per_kv
        # query rows on programs of their own, beside the write's (in parallel: they touch no cache or counter)
        block_q = max(2, min(next_pow2(q_rows), 4096 // block_d))
        q_programs = cdiv(q_rows, block_q)
    early = pdl.enabled(keys.device)  # launched before the previous kernel ends (triton_ops_core.pdl)
    return Plan(K._kv_cache_write_kernel, (kv_programs + q_programs,), (
        info.heads, info.new, rows, per_program, info.cache_len, info.heads * info.q_per_kv, q_rows, kv_programs,
        1e-6 if norm is None else float(norm[2]),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), *q_strides, *table_strides,
        mode, one, keys.device.type == "cuda", rope is not None, norm is not None,
        norm is not None and bool(norm[3]), info.k_dim, info.v_dim, block_d,
        block_r, block_q, early, pdl.release_early(early, kv_programs + q_programs, keys.device,
                                                     info.batch * info.new)), 4, extra=one,
        **pdl.launch_options(early))


_PLANS = PlanCache()


def clear_kv_cache_plans() -> None:
    """Forget the cached launch plans of the cache write and the shift."""
    _PLANS.clear()
    _SHIFT_PLANS.clear()


def _check_on_host(info: KVCacheWrite, positions: torch.Tensor | None, length: torch.Tensor | None) -> None:
    """The interpreter's stand-in for the kernel's trap (CPU tensors: reading them costs no device sync)."""
    if positions is not None:
        pos = positions.to(torch.int64)
    else:
        start = int(length.reshape(()).item()) if length is not None else 0
        pos = torch.arange(start, start + info.new)
    bad = (pos < 0) | (pos >= info.cache_len)
    if bool(bad.any()):
        raise KVCacheOverflowError(
            f"positions: expected every position in [0, {info.cache_len}) (the cache's length), got "
            f"{pos[bad][:4].tolist()}{' ...' if int(bad.sum()) > 4 else ''}; a static cache must be made long "
            "enough for the prompt and every generated token")


def _write(keys, values, k, v, positions, length, rope=None, norm=None, ring: bool = False) -> None:
    """The launch; ``rope``: ``(q, cos, sin)`` to rotate q and k first, or None; ``norm``: ``(q_weight, k_weight,
    eps, gemma)`` to RMS-normalize each head before (with ``rope`` only; ``gemma``: by ``1 + weight``), or None;
    ``ring``: rows at ``(length + t) % S_max``."""
    mode = K.POS_TENSOR if positions is not None else K.POS_LENGTH if length is not None else K.POS_INDEX
    if ring:
        mode = K.POS_RING
    key = call_key("kv_cache_write", keys, values, k, v, positions, length, *(rope or ()), *(norm or ()), ring)
    plan = _PLANS.get(key) if key is not None else None
    info = plan.info if plan is not None else None
    if plan is None:
        info = validate_kv_cache_write(keys, values, k, v, positions, length, ring)
        if rope is not None:
            info = replace(info, q_per_kv=validate_rope_operands(rope[0], k, rope[1], rope[2]))
        if norm is not None:
            validate_norm_weights(norm[0], norm[1], k, norm[2])
        plan = _plan(keys, values, k, v, rope, norm, mode, info)
        if plan is None:
            return
        plan.info = info
        if key is not None:
            _PLANS.put(key, plan)
    if keys.device.type != "cuda" and not ring:  # (a ring's every position is inside)
        _check_on_host(info, positions, length)
    dummy = keys  # never read: constexprs say which of positions / length / the rotary operands the kernel reads
    q, cos, sin = rope if rope is not None else (dummy, dummy, dummy)
    q_weight, k_weight = norm[:2] if norm is not None else (dummy, dummy)
    plan.launch(keys, values, k, v, dummy if positions is None else positions, dummy if length is None else length,
                q, cos, sin, q_weight, k_weight)
    if length is not None and not plan.extra:  # several programs: advance the counter after they all read it
        length.add_(info.new)


# ----------------------------------------------------------------------------------------------------------------
# Registration: triton_ops::kv_cache_write_ and kv_cache_append_
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op(op_name("kv_cache_write_"), mutates_args=("keys", "values"))
def _kv_cache_write_op(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       positions: torch.Tensor | None) -> None:
    _write(keys, values, k, v, positions, None)


@_kv_cache_write_op.register_fake
def _(keys, values, k, v, positions):
    return None


@torch.library.custom_op(op_name("kv_cache_append_"), mutates_args=("keys", "values", "length"))
def _kv_cache_append_op(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        length: torch.Tensor, ring: bool = False) -> None:
    _write(keys, values, k, v, None, length, ring=ring)


@_kv_cache_append_op.register_fake
def _(keys, values, k, v, length, ring=False):
    return None


def _norm(q_weight, k_weight, eps, gemma=False) -> tuple | None:
    return None if q_weight is None else (q_weight, k_weight, eps, gemma)


@torch.library.custom_op(op_name("kv_cache_write_rope_"), mutates_args=("keys", "values", "q", "k"))
def _kv_cache_write_rope_op(keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None,
                            q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                            gemma: bool = False) -> None:
    _write(keys, values, k, v, positions, None, (q, cos, sin), _norm(q_weight, k_weight, eps, gemma))


@_kv_cache_write_rope_op.register_fake
def _(keys, values, q, k, v, cos, sin, positions, q_weight, k_weight, eps, gemma=False):
    return None


@torch.library.custom_op(op_name("kv_cache_append_rope_"), mutates_args=("keys", "values", "q", "k", "length"))
def _kv_cache_append_rope_op(keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, length: torch.Tensor,
                             q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                             ring: bool = False, gemma: bool = False) -> None:
    _write(keys, values, k, v, None, length, (q, cos, sin), _norm(q_weight, k_weight, eps, gemma), ring)


@_kv_cache_append_rope_op.register_fake
def _(keys, values, q, k, v, cos, sin, length, q_weight, k_weight, eps, ring=False, gemma=False):
    return None


# ----------------------------------------------------------------------------------------------------------------
# A full sliding-window cache: triton_ops::kv_cache_shift_
# ----------------------------------------------------------------------------------------------------------------

# Columns per program of the shift, and rows per chunk: 16 columns of 2 bytes fill a 32-byte sector; a head of 256
# columns gives 16 programs per head and tensor, so Gemma 3's 8 KV heads at batch 1 run 256 programs.
SHIFT_BLOCK_D = 16
SHIFT_BLOCK_W = 256


def validate_kv_cache_shift(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor) -> KVCacheWrite:
    """Check a shift: a cache write (:func:`validate_kv_cache_write`) of exactly one new row."""
    info = validate_kv_cache_write(keys, values, k, v)
    if info.new != 1:
        raise ShapeMismatchError(f"k: expected one new row (dimension 2) for a shift, got {info.new}")
    if keys.numel() and keys.data_ptr() == values.data_ptr():
        raise InvalidArgumentError("keys, values: expected two caches, got one tensor's memory for both (it would "
                                   "be shifted twice)")
    return info


_SHIFT_PLANS = PlanCache()


def _shift_plan(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Plan:
    """The cached launch of a shift's call signature (validated on its first call; ``n_rows`` 0: nothing to do)."""
    key = call_key("kv_cache_shift", keys, values, k, v)
    plan = _SHIFT_PLANS.get(key) if key is not None else None
    if plan is not None:
        return plan
    info = validate_kv_cache_shift(keys, values, k, v)
    k_blocks, v_blocks = cdiv(info.k_dim, SHIFT_BLOCK_D), cdiv(info.v_dim, SHIFT_BLOCK_D)
    work = info.batch * info.heads * info.cache_len
    on = pdl.enabled(keys.device)
    plan = Plan(K._kv_cache_shift_kernel, (max(1, info.batch * info.heads), k_blocks + v_blocks), (
        info.heads, info.cache_len, info.k_dim, info.v_dim,
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_blocks,
        min(SHIFT_BLOCK_W, next_pow2(max(1, info.cache_len - 1))), SHIFT_BLOCK_D, on),
        4, work, num_stages=1,  # nothing to pipeline: a chunk's loads, a barrier, its stores
        **pdl.launch_options(on))
    if key is not None:
        _SHIFT_PLANS.put(key, plan)
    return plan


def _shift(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    plan = _shift_plan(keys, values, k, v)
    # per call: two caches of the same signature may still share memory (the key holds no addresses)
    if keys.numel() and keys.data_ptr() == values.data_ptr():
        validate_kv_cache_shift(keys, values, k, v)  # raises, naming it
    if plan.n_rows:
        plan.launch(keys, values, k, v)


@torch.library.custom_op(op_name("kv_cache_shift_"), mutates_args=("keys", "values"))
def _kv_cache_shift_op(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    _shift(keys, values, k, v)


@_kv_cache_shift_op.register_fake
def _(keys, values, k, v):
    return None


def shift_kv_cache_(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full sliding-window cache takes a step's one new row, in place, in one launch.

    ``keys[:, :, :-1] = keys[:, :, 1:]; keys[:, :, -1] = k[:, :, 0]`` (and so for ``values`` and ``v``): the oldest
    row dropped, the others one position earlier, the new one last. That is transformers' ``StaticSlidingWindowLayer``
    update once its window is full (``roll(-1)``, an indexed write of the new row, a copy back: six launches per
    layer and step, each pass over the whole window), bit for bit (a copy).

    Args:
        keys, values: the cache ``[B, Hkv, W, D]`` (``D`` may differ between them), fp16/bf16/fp32, unit last
            stride (any other strides).
        k, v: the new rows ``[B, Hkv, 1, D]`` in their cache's dtype, unit last stride.

    Returns ``(keys, values)``, updated. Registered as ``torch.ops.triton_ops.kv_cache_shift_`` (``keys`` and
    ``values`` mutated in its schema); inference only (``KVCacheGradientError`` if any argument requires a gradient
    with grad mode on).

    Raises:
        ShapeMismatchError, UnsupportedDtypeError, InvalidArgumentError, DeviceMismatchError,
        UnsupportedDeviceError, LayoutError, KVCacheGradientError.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (keys, values, k, v)
                                       if isinstance(t, torch.Tensor)):
        raise KVCacheGradientError(
            "shift_kv_cache_: the KV-cache shift is in place and inference-only; a gradient cannot flow through it "
            "(run under torch.no_grad() / torch.inference_mode(), or detach k and v)")
    if direct_call_ok(keys, values, k, v):
        _shift(keys, values, k, v)
    else:
        _kv_cache_shift_op(keys, values, k, v)
    return keys, values


def update_kv_cache_(
    keys: torch.Tensor,
    values: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    length: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    ring: bool = False,
    gemma: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write a step's new K and V rows into a static KV cache, in place, in one launch.

    ``keys[b, h, p(t)] = k[b, h, t]`` and ``values[b, h, p(t)] = v[b, h, t]`` for every new position ``t``, where
    ``p(t)`` is ``positions[t]``, or ``length + t`` (then ``length += T``: the cache's filled length advances), or
    ``t`` when neither is given. The first is ``keys.index_copy_(2, positions, k)`` (transformers 5.0's
    ``StaticLayer.update``); the second is transformers 5.2x's ``StaticLayer.update`` with its
    ``cumulative_length`` counter; both values bit for bit (a copy).

    Args:
        keys, values: the cache ``[B, Hkv, S_max, D]`` (``D`` may differ between them), fp16/bf16/fp32, unit last
            stride (any other strides).
        k, v: the new states ``[B, Hkv, T, D]`` in their cache's dtype, any strides with a unit last one (the
            transposed ``[B, T, Hkv, D]`` views of a packed QKV projection, as they are: nothing is copied first).
        positions: int32/int64 ``[T]``, the cache positions of the new rows.
        length: an int32/int64 tensor of one element (0-d or ``[1]``) on the cache's device: the filled length,
            read on the device (no host sync: a CUDA graph replays it step after step) and advanced by ``T``.
        q, cos, sin: all three or none. The rotary embedding in the same launch, before the write: ``k`` and ``q``
            (``[B, G * Hkv, T, D]``, k's dtype) become ``x * cos + rotate_half(x) * sin`` in place (computed in
            float32, rounded once; ``rotate_half`` as transformers' Llama defines it, over the whole head dim), and
            the rotated ``k`` is what the cache receives: ``apply_rope(q, k, cos, sin, inplace=True)`` then the
            write, in one launch. ``cos`` / ``sin``: ``[B, T, D]``, ``[1, T, D]`` or ``[T, D]``, any float dtype
            (transformers' ``position_embeddings``).
        q_norm_weight, k_norm_weight, eps: both weights or neither, with q, cos and sin only. Each q and k head is
            first RMS-normalized, ``x * rsqrt(mean(x^2) + eps) * weight`` over the head dim (Qwen3's ``q_norm`` /
            ``k_norm``, ``[D]`` each), then rotated: ``fused_qk_norm_rope(..., inplace=True)`` and the write in one
            launch.
        gemma: with the norm weights: scale by ``1 + weight`` (Gemma 3's ``q_norm`` / ``k_norm``):
            ``fused_qk_norm_rope(..., gemma=True, inplace=True)`` and the write in one launch.
        ring: with ``length``: the cache is a ring buffer of ``S_max`` slots (a full sliding window): new row
            ``t`` goes to slot ``(length + t) % S_max``, overwriting the oldest row, and ``length += T``; at most
            ``S_max`` new rows. The rows then sit in slot order, the oldest at slot ``length % S_max`` after the
            write: :func:`~decode_attention.decode_attention` with ``ring_start=length`` applies a mask laid out
            oldest first (as transformers lays out a sliding window) to them.

    Returns:
        ``(keys, values)``, updated (what ``StaticLayer.update`` returns).

    A position outside ``[0, S_max)`` is never written: under the interpreter ``KVCacheOverflowError`` is raised
    before anything is written; on a GPU the kernel stops with a ``trap`` (the launch fails, as ``index_copy_``'s
    device-side assertion makes it fail). Registered as ``torch.ops.triton_ops.kv_cache_write_`` (positions or none)
    and ``kv_cache_append_`` (length), with RoPE as ``kv_cache_write_rope_`` / ``kv_cache_append_rope_``, with the
    mutated arguments in their schemas; inference only
    (``KVCacheGradientError`` if any argument requires a gradient with grad mode on).

    Raises:
        ShapeMismatchError, UnsupportedDtypeError, InvalidArgumentError, DeviceMismatchError,
        UnsupportedDeviceError, LayoutError, KVCacheOverflowError, KVCacheGradientError.
    """
    rope_parts = (q, cos, sin)
    if any(t is not None for t in rope_parts) and any(t is None for t in rope_parts):
        missing = ", ".join(n for n, t in zip(("q", "cos", "sin"), rope_parts, strict=True) if t is None)
        raise InvalidArgumentError(f"q, cos, sin: the rotary embedding needs all three, got no {missing}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise InvalidArgumentError("q_norm_weight, k_norm_weight: expected both or neither, got one")
    if q_norm_weight is not None and q is None:
        raise InvalidArgumentError("q_norm_weight, k_norm_weight: the QK norm runs with the rotary embedding; "
                                   "expected q, cos and sin as well")
    if not isinstance(gemma, bool):
        raise InvalidArgumentError(f"gemma: expected a bool, got {gemma!r}")
    if gemma and q_norm_weight is None:
        raise InvalidArgumentError("gemma: scales the QK norm's weights; expected q_norm_weight and k_norm_weight")
    rope = None if q is None else rope_parts
    norm = _norm(q_norm_weight, k_norm_weight, eps, gemma)
    if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False)
                                       for t in (keys, values, k, v, q, q_norm_weight, k_norm_weight)):
        raise KVCacheGradientError(
            "update_kv_cache_: the KV-cache write is in place and inference-only; a gradient cannot flow through "
            "it (run under torch.no_grad() / torch.inference_mode(), or detach k and v)")
    if positions is not None and length is not None:
        raise InvalidArgumentError("positions, length: expected at most one of them, got both")
    if not isinstance(ring, bool):
        raise InvalidArgumentError(f"ring: expected a bool, got {ring!r}")
    if ring and length is None:
        raise InvalidArgumentError("ring: a ring buffer's write needs length (its device counter), got none")
    if direct_call_ok(keys, values, k, v, positions, length, *(rope or ()), q_norm_weight, k_norm_weight):
        _write(keys, values, k, v, positions, length, rope, norm, ring)
    elif rope is not None and length is not None:
        _kv_cache_append_rope_op(keys, values, q, k, v, cos, sin, length, q_norm_weight, k_norm_weight, eps, ring,
                                 gemma)
    elif rope is not None:
        _kv_cache_write_rope_op(keys, values, q, k, v, cos, sin, positions, q_norm_weight, k_norm_weight, eps, gemma)
    elif length is not None:
        _kv_cache_append_op(keys, values, k, v, length, ring)
    else:
        _kv_cache_write_op(keys, values, k, v, positions)
    return keys, values


__all__ = ["ONE_PROGRAM_ROWS", "SHIFT_BLOCK_D", "SHIFT_BLOCK_W", "KVCacheGradientError", "KVCacheOverflowError",
           "KVCacheWrite", "shift_kv_cache_", "update_kv_cache_", "validate_kv_cache_shift", "validate_kv_cache_write",
           "validate_norm_weights", "validate_rope_operands"]
