"""``fused_gated_mlp``: the launcher, the autograd Function and the public function.

Forward runs the Triton kernels of ``_kernels``. Backward is a composite of PyTorch operations that recomputes
the two projections from the saved inputs (nothing ``[tokens, intermediate]``-sized is kept between forward and
backward) and applies the analytic derivative of each activation; it is exact up to the rounding of the
recomputed projections, which is that of ``torch.nn.functional.linear``.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
from triton_ops_core.device import is_hopper
from triton_ops_core.validation.gated_mlp import validate_gated_mlp_inputs

from . import _kernels as K
from .configs import DECODE_MAX_TOKENS, select_gated_mlp_config

_ACTIVATION_CODES = {
    "silu": K.ACT_SILU,
    "gelu": K.ACT_GELU,
    "gelu_tanh": K.ACT_GELU_TANH,
    "swiglu_oai": K.ACT_SWIGLU_OAI,
}


# ----------------------------------------------------------------------------------------------------------------
# Host-side helpers
# ----------------------------------------------------------------------------------------------------------------

def _alloc_descriptor_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # Called by Triton at launch, on the launching (current) device.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need global scratch, handed out by ``triton.set_allocator``'s allocator.

    The allocator lives in a ContextVar (per thread), and a user's own allocator wins: ours is installed only
    where none is set.
    """
    from triton.runtime import _allocation

    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_alloc_descriptor_scratch)


def _cdiv(a: int, b: int) -> int:
    # Plain integer math: triton.cdiv is a JIT function and costs microseconds per host call.
    return -(-a // b)


@functools.cache
def _is_hopper(index: int | None) -> bool:
    # Asked on every launch: cached, since the device query costs microseconds of host time.
    return is_hopper(torch.device("cuda", index if index is not None else torch.cuda.current_device()))


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned base addresses and row strides (and a unit last stride)."""
    for t in tensors:
        esize = t.element_size()
        if t.data_ptr() % 16 or (t.stride(0) * esize) % 16 or t.shape[1] * esize < 16:
            return False
    return True


POINTER_PREFILL_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}

_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_k_workspace(device: torch.device, ws_numel: int, lock_numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 partial-sum buffer and int32 tile semaphores, one pair per (device, stream).

    The decode kernel leaves both zeroed after every call (the last program of a tile resets its part), so they
    are allocated once and reused; a separate pair per stream keeps concurrent streams from sharing counters.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    ws, lock = _workspaces.get(key, (None, None))
    if ws is None or ws.numel() < ws_numel:
        ws = torch.zeros(max(ws_numel, 1 << 16), dtype=torch.float32, device=device)
    if lock is None or lock.numel() < lock_numel:
        lock = torch.zeros(max(lock_numel, 1024), dtype=torch.int32, device=device)
    _workspaces[key] = (ws, lock)
    return ws, lock


def _new_output(m: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # One place that allocates the result, so tests can hand the kernel a poisoned buffer.
    return torch.empty((m, n), dtype=dtype, device=device)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting (TF32 only where the user allowed it); halves are exact anyway.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def gated_mlp_forward(
    x2d: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    activation: str,
    alpha: float,
    limit: float,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch the fused kernel on validated 2-D operands (``[M, K]``, ``[N, K]`` views with unit last stride)."""
    if x2d.device.type == "cuda" and x2d.device.index != torch.cuda.current_device():
        # Triton launches on the current device: make it the tensors' one (multi-GPU processes).
        with torch.cuda.device(x2d.device):
            return gated_mlp_forward(x2d, gate_weight, up_weight, gate_bias, up_bias, activation, alpha, limit,
                                     config)
    M, K_dim = x2d.shape
    N = gate_weight.shape[0]
    out = _new_output(M, N, x2d.dtype, x2d.device)
    if M == 0 or N == 0:
        return out
    if config is not None:
        cfg = dict(config)
    else:
        def bench(candidate: dict):  # for opt-in tune-on-first-use (KERNEL_AUTOTUNE=1)
            return functools.partial(gated_mlp_forward, x2d, gate_weight, up_weight, gate_bias, up_bias,
                                     activation, alpha, limit, candidate)

        cfg = select_gated_mlp_config(M, K_dim, N, x2d.dtype, x2d.device, bench=bench)
    act = _ACTIVATION_CODES[activation]
    bg = gate_bias.contiguous() if gate_bias is not None else out
    bu = up_bias.contiguous() if up_bias is not None else out
    common = dict(
        ACTIVATION=act, HAS_GATE_BIAS=gate_bias is not None, HAS_UP_BIAS=up_bias is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        DOT_PRECISION=_dot_precision(x2d.dtype), UPCAST=x2d.device.type == "cpu" and x2d.dtype != torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    strides = (x2d.stride(0), gate_weight.stride(0), up_weight.stride(0), out.stride(0))
    use_tma = (cfg.get("USE_TMA", True) and K_dim > 0
               and (x2d.device.type == "cpu" or _is_hopper(x2d.device.index))
               and _tma_ok(x2d, gate_weight, up_weight))
    if use_tma and x2d.device.type == "cuda":
        _ensure_tma_allocator()
    # The path follows the token count; a forced config may name it (tests run both paths on any size).
    path = cfg.get("path", "decode" if M <= DECODE_MAX_TOKENS else "prefill")
    if path == "decode":
        split_k = cfg.get("SPLIT_K", 1)
        grid_n = _cdiv(N, cfg["BLOCK_N"])
        grid_m = _cdiv(M, cfg["BLOCK_M"])
        if split_k > 1:
            ws, lock = _split_k_workspace(x2d.device, 2 * M * N, grid_m * grid_n)
        else:
            ws, lock = out, out
        # EVEN_K only matters to the pointer loads; fixing it under TMA lets all shapes share one binary.
        even_k = use_tma or K_dim % (cfg["BLOCK_K"] * split_k) == 0
        K._gated_mlp_decode_kernel[(grid_n, split_k, grid_m)](
            x2d, gate_weight, up_weight, bg, bu, out, ws, lock,
            M, N, K_dim, *strides, float(alpha), float(limit),
            SPLIT_K=split_k, EVEN_K=even_k, NUM_STAGES=cfg["num_stages"], USE_TMA=use_tma,
            INTERPRET=x2d.device.type == "cpu", **common,
        )
        return out
    if not use_tma and config is None and x2d.element_size() == 2:
        # Without TMA the pointer GEMM keeps operands in registers: larger tiles spill (seen in ptxas reports).
        cfg.update(POINTER_PREFILL_CONFIG)
        common.update(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    grid = (_cdiv(M, cfg["BLOCK_M"]) * _cdiv(N, cfg["BLOCK_N"]),)
    K._gated_mlp_prefill_kernel[grid](
        x2d, gate_weight, up_weight, bg, bu, out,
        M, N, K_dim, *strides, float(alpha), float(limit),
        GROUP_M=cfg.get("GROUP_M", 8), NUM_STAGES=cfg["num_stages"], USE_TMA=use_tma, **common,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Backward: analytic derivatives of act(gate) * up, in fp32
# ----------------------------------------------------------------------------------------------------------------

def _activation_grads(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, activation: str,
                      alpha: float, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``d(act(gate) * up)`` with respect to gate and up, given the upstream gradient (all fp32)."""
    if activation == "silu":
        s = torch.sigmoid(gate)
        act = gate * s
        dact = s * (1.0 + gate * (1.0 - s))
        return grad * up * dact, grad * act
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(gate * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * gate * gate) * (1.0 / math.sqrt(2.0 * math.pi))
        return grad * up * (cdf + gate * pdf), grad * gate * cdf
    if activation == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (gate + 0.044715 * gate**3))
        act = 0.5 * gate * (1.0 + t)
        dact = 0.5 * (1.0 + t) + 0.5 * gate * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * gate * gate)
        return grad * up * dact, grad * act
    # swiglu_oai: torch.clamp passes the gradient where min <= v <= max, and so do we.
    g = gate.clamp(max=limit)
    u = up.clamp(-limit, limit)
    s = torch.sigmoid(alpha * g)
    glu = g * s
    dglu = s * (1.0 + alpha * g * (1.0 - s))
    d_gate = grad * (u + 1.0) * dglu * (gate <= limit)
    d_up = grad * glu * ((up >= -limit) & (up <= limit))
    return d_gate, d_up


class FusedGatedMLPFunction(torch.autograd.Function):
    """Autograd of ``act(x @ Wg^T + bg) * (x @ Wu^T + bu)``: Triton forward, recomputing composite backward."""

    @staticmethod
    def forward(ctx, x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha, limit, config):
        hidden = x.shape[-1]
        x2d = x.reshape(-1, hidden)
        out = gated_mlp_forward(x2d, gate_weight, up_weight, gate_bias, up_bias, activation, alpha, limit, config)
        ctx.save_for_backward(x, gate_weight, up_weight, gate_bias, up_bias)
        ctx.activation, ctx.alpha, ctx.limit = activation, alpha, limit
        return out.reshape(*x.shape[:-1], gate_weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, wg, wu, bg, bu = ctx.saved_tensors
        hidden, inter = x.shape[-1], wg.shape[0]
        x2d = x.reshape(-1, hidden)
        gate = torch.nn.functional.linear(x2d, wg).float()
        up = torch.nn.functional.linear(x2d, wu).float()
        if bg is not None:
            gate += bg.float()
        if bu is not None:
            up += bu.float()
        grad = grad_out.reshape(-1, inter).float()
        d_gate, d_up = _activation_grads(gate, up, grad, ctx.activation, ctx.alpha, ctx.limit)
        del gate, up, grad
        dg, du = d_gate.to(x.dtype), d_up.to(x.dtype)
        need = ctx.needs_input_grad
        dx = (dg @ wg + du @ wu).reshape(x.shape) if need[0] else None
        dwg = dg.t() @ x2d if need[1] else None
        dwu = du.t() @ x2d if need[2] else None
        dbg = d_gate.sum(0).to(bg.dtype) if bg is not None and need[3] else None
        dbu = d_up.sum(0).to(bu.dtype) if bu is not None and need[4] else None
        return dx, dwg, dwu, dbg, dbu, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def split_packed(weight: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the gate and up halves of a packed ``[2 * intermediate, ...]`` weight (or bias).

    ``"concatenated"``: rows ``[0, I)`` are the gate, ``[I, 2I)`` the up projection (``torch.cat([Wg, Wu])``,
    vLLM's ``gate_up_proj``). ``"interleaved"``: even rows are the gate, odd rows the up projection (gpt-oss's
    ``mlp1_weight``: its ``swiglu`` reads ``x[..., ::2]`` as the gate and ``x[..., 1::2]`` as the linear part).
    The views share storage with ``weight``, so gradients flow back into the packed tensor.
    """
    if layout == "concatenated":
        half = weight.shape[0] // 2
        return weight[:half], weight[half:]
    return weight[0::2], weight[1::2]


def fused_gated_mlp(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor | None = None,
    activation: str = "silu",
    *,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    weight_layout: str = "separate",
    alpha: float = 1.702,
    limit: float = 7.0,
    config: dict | None = None,
) -> torch.Tensor:
    """Gated MLP intermediate ``act(x @ Wg^T + bg) * (x @ Wu^T + bu)`` in one Triton kernel.

    The activation applies to the **gate** projection, as in LLaMA and Hugging Face checkpoints
    (``act_fn(gate_proj(x)) * up_proj(x)``), so their ``gate_proj``/``up_proj`` weights plug in unchanged. The
    down projection is not part of this op.

    Args:
        x: ``[..., hidden]``, float16, bfloat16 or float32, unit stride in the last dimension.
        gate_weight: ``[intermediate, hidden]`` (``nn.Linear`` layout), or with a packed ``weight_layout`` the
            packed ``[2 * intermediate, hidden]`` weight holding both projections.
        up_weight: ``[intermediate, hidden]``; None with a packed layout.
        activation: ``"silu"`` (SwiGLU), ``"gelu"`` (exact, erf; GeGLU), ``"gelu_tanh"`` (tanh approximation)
            or ``"swiglu_oai"`` (gpt-oss: ``g = gate.clamp(max=limit)``, ``u = up.clamp(-limit, limit)``,
            ``g * sigmoid(alpha * g) * (u + 1)``).
        gate_bias, up_bias: optional ``[intermediate]`` biases (any float dtype; added in fp32). With a packed
            layout pass the packed ``[2 * intermediate]`` bias as ``gate_bias`` and leave ``up_bias`` None.
        weight_layout: ``"separate"``, ``"concatenated"`` (gate rows first, then up rows) or ``"interleaved"``
            (even rows gate, odd rows up, as gpt-oss stores ``mlp1``).
        alpha, limit: parameters of ``"swiglu_oai"`` (gpt-oss uses 1.702 and 7.0); ignored otherwise.
        config: a launch config (see ``fused_gated_mlp.configs``) overriding the automatic choice.

    Returns:
        ``[..., intermediate]`` in ``x``'s dtype. Products accumulate in fp32; the activation runs in fp32.

    Gradients flow to ``x``, the weights and the biases (composite PyTorch backward recomputing the
    projections; see the module docstring).

    Raises:
        ShapeMismatchError, UnsupportedDtypeError, DeviceMismatchError, UnsupportedDeviceError, LayoutError,
        InvalidArgumentError: from ``triton_ops_core`` validation, naming the offending argument.
    """
    spec = validate_gated_mlp_inputs(
        x, gate_weight, up_weight, activation, gate_bias=gate_bias, up_bias=up_bias,
        weight_layout=weight_layout, alpha=alpha, limit=limit,
    )
    if weight_layout != "separate":
        gate_weight, up_weight = split_packed(gate_weight, weight_layout)
        if gate_bias is not None:
            gate_bias, up_bias = split_packed(gate_bias, weight_layout)
    tensors = (x, gate_weight, up_weight, gate_bias, up_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return FusedGatedMLPFunction.apply(x, gate_weight, up_weight, gate_bias, up_bias, activation,
                                           float(alpha), float(limit), config)
    out = gated_mlp_forward(x.reshape(-1, spec.hidden_dim), gate_weight, up_weight, gate_bias, up_bias,
                            activation, alpha, limit, config)
    return out.reshape(*x.shape[:-1], spec.intermediate_dim)


def gated_mlp_reference(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor | None = None,
    activation: str = "silu",
    *,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    weight_layout: str = "separate",
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    """The same function in plain PyTorch, computed in the inputs' dtype (cast to float64 for a reference)."""
    if weight_layout != "separate":
        gate_weight, up_weight = split_packed(gate_weight, weight_layout)
        if gate_bias is not None:
            gate_bias, up_bias = split_packed(gate_bias, weight_layout)
    gate = torch.nn.functional.linear(x, gate_weight)
    up = torch.nn.functional.linear(x, up_weight)
    if gate_bias is not None:
        gate = gate + gate_bias.to(gate.dtype)
    if up_bias is not None:
        up = up + up_bias.to(up.dtype)
    if activation == "silu":
        return torch.nn.functional.silu(gate) * up
    if activation == "gelu":
        return torch.nn.functional.gelu(gate) * up
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(gate, approximate="tanh") * up
    g = gate.clamp(max=limit)
    u = up.clamp(-limit, limit)
    return g * torch.sigmoid(alpha * g) * (u + 1)


__all__ = ["FusedGatedMLPFunction", "fused_gated_mlp", "gated_mlp_forward", "gated_mlp_reference", "split_packed"]
