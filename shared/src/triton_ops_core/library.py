"""What every package needs to register its ops with ``torch.library``: the namespace and the eager shortcut.

Each kernel package registers its own ops, under one namespace, when it is imported
(``torch.ops.triton_ops.<name>``): an opaque ``torch.library.custom_op`` with a fake implementation, and autograd
through ``register_autograd`` where the op has a backward. ``torch.compile``, CUDA graphs and ``torch.export`` then
see one node per op, never the launch machinery behind it.

The launch machinery (cached plans keyed by the inputs' metadata and data-pointer alignment, Triton's direct
launcher, per-stream scratch buffers) is host logic that cannot run on fake tensors, which is why the ops are
``custom_op`` and not ``triton_op``: the op's implementation is the cached launch itself.

In plain eager, the dispatcher's round trip into a Python op costs tens of microseconds of host time (42 us per
call measured on the CPU machine with torch 2.13, against 3 us for a direct call), more than a decode step's
kernel. The public functions therefore call the op's implementation directly when nothing could observe the
difference (:func:`direct_call_ok`) and go through ``torch.ops.triton_ops`` otherwise: under ``torch.compile`` /
``torch.export``, under any dispatch or function mode (fake tensors, ``make_fx``, profilers' modes), for tensor
subclasses (DTensor, FakeTensor, FunctionalTensor) and whenever autograd must record the call.
"""

from __future__ import annotations

import torch

NAMESPACE = "triton_ops"

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled


def op_name(name: str) -> str:
    """The qualified name ``triton_ops::<name>`` under which an op is registered."""
    return f"{NAMESPACE}::{name}"


def direct_call_ok(*tensors: torch.Tensor | None) -> bool:
    """True when a call may run the op's implementation without the dispatcher, with the same result.

    That is: not tracing (``torch.compile`` / ``torch.export``), no dispatch or function mode active, every tensor
    argument a plain tensor or parameter, and no gradient to record (``torch.is_grad_enabled()`` is off, or no
    argument requires one). The checks cost well under a microsecond. A non-tensor where a tensor belongs also
    takes the direct path: the op's own validation then names it (the schema's error would not).
    """
    if _compiling() or _dispatch_modes() or _function_modes():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if type(t) not in _PLAIN or (grad and t.requires_grad):
            return False
    return True


def capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream of ``device`` is capturing a graph (no tuning, no host sync then)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


__all__ = ["NAMESPACE", "capturing", "direct_call_ok", "op_name"]
