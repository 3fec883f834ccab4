"""Ceilings timed beside the kernels: what the hardware allows for the bytes a case must move.

``weights_read`` streams two equal-sized buffers once and reduces them to a few numbers, so it moves the bytes a
decode step must read and nothing else. Timed the suite's way (L2 emptied by a write before every run, which
leaves dirty lines the kernel must first write back), it is the bound for any weight-streaming kernel, lower than
a copy of the same bytes, whose writes stay in L2 at these sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

_BLOCK = 4096


@triton.jit
def _stream_read_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # Each program sums one equal contiguous range of both buffers; the sum keeps the loads alive.
    pid = tl.program_id(0)
    per = tl.cdiv(tl.cdiv(n, tl.num_programs(0)), BLOCK) * BLOCK
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.range(pid * per, tl.minimum(n, (pid + 1) * per), BLOCK, num_stages=4):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(a_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        acc += tl.load(b_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


def weights_read(a: torch.Tensor, b: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A zero-argument callable reading ``a`` and ``b`` (contiguous, same size, one device) once each."""
    if a.numel() != b.numel() or not (a.is_contiguous() and b.is_contiguous()):
        raise ValueError("weights_read: a and b must be contiguous and of the same size")
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 2
    programs = 2 * sms
    sums = torch.empty(programs, dtype=torch.float32, device=a.device)
    flat_a, flat_b, n = a.view(-1), b.view(-1), a.numel()

    def run() -> torch.Tensor:
        _stream_read_kernel[(programs,)](flat_a, flat_b, sums, n, BLOCK=_BLOCK, num_warps=8)
        return sums

    return run
